"""Train the demo model on the synthetic task and write the shipped checkpoint.

    python scripts/train_demo.py [--steps 2500] [--batch-size 32] [--out eos_kernels/demo/checkpoint]

Runs on 2 CPU cores in about a quarter of an hour (torch threads = --threads).
Deterministic for a given seed and thread count. Steps:

1. generate the task's train split (``--train-images`` scenes, 4 questions
   each) and eval split (``--eval-images`` scenes, 1 question each) into a
   temporary folder, tokenised with the search's own data pipeline
   (:func:`eos_kernels.search.data.load_dataset`: the LLaVA-1.5 prompt format,
   labels on the answer tokens only);
2. train every weight (vision tower, projector, decoder) with AdamW, linear
   warm-up and cosine decay, cross-entropy on the answer tokens;
3. report held-out accuracy (greedy generation, exact one-word match) with all
   64 visual tokens and under aggressive pruning (``Theta`` prune-only
   reducers), and write the checkpoint and ``training_report.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eos_kernels import Reducer, Theta  # noqa: E402
from eos_kernels.demo import build, task  # noqa: E402
from eos_kernels.search import SearchConfig, evaluate  # noqa: E402
from eos_kernels.search.data import load_dataset  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=build.checkpoint_path())
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=32, help="images per step (4 questions each)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--train-images", type=int, default=6000)
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    return ap.parse_args(argv)


def cached_pixels(dataset):
    """Process every image once; batches then index the cache."""
    paths = sorted({ex.image for ex in dataset.examples})
    table = {}
    for s in range(0, len(paths), 256):
        chunk = paths[s:s + 256]
        for p, px in zip(chunk, dataset.pixels(chunk)):
            table[p] = px
    dataset.pixels = lambda ps: torch.stack([table[p] for p in ps])
    return dataset


@torch.no_grad()
def teacher_forced_accuracy(model, dataset, n=256, batch=64):
    """Fraction of the first ``n`` eval answers whose every token is the argmax (fast check)."""
    model.eval()
    right = total = 0
    for s in range(0, min(n, len(dataset)), batch):
        b = dataset.collate(range(s, min(n, len(dataset), s + batch)))
        logits = model(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask).logits
        pred = logits[:, :-1].argmax(-1)
        gold = b.labels[:, 1:]
        ok = ((pred == gold) | (gold == -100)).all(dim=1)
        right += int(ok.sum())
        total += ok.numel()
    model.train()
    return right / max(total, 1)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = tempfile.mkdtemp(prefix="eos-demo-train-")
    t0 = time.time()
    train_json = task.generate_split(work, "train", args.train_images, args.seed, turns_per_image=4)
    eval_json = task.generate_split(work, "eval", args.eval_images, args.seed, turns_per_image=1)
    processor = build.build_processor()
    model = build.build_model(args.seed).train()
    image_token = model.config.image_token_id
    train = cached_pixels(load_dataset(train_json, processor, num_visual_tokens=build.NUM_VISUAL_TOKENS,
                                       image_token_id=image_token))
    held = cached_pixels(load_dataset(eval_json, processor, num_visual_tokens=build.NUM_VISUAL_TOKENS,
                                      image_token_id=image_token))
    print(f"data: {len(train)} train images x 4 questions, {len(held)} eval questions "
          f"({time.time() - t0:.0f} s); model: {sum(p.numel() for p in model.parameters()):,} parameters",
          flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen).tolist()
    pos, running = 0, []
    t_train = time.time()
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen).tolist(), 0
        b = train.collate(order[pos:pos + args.batch_size])
        pos += args.batch_size
        loss = model(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask,
                     labels=b.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            acc = teacher_forced_accuracy(model, held)
            print(f"step {step:5d}  loss {sum(running) / len(running):.4f}  eval(teacher-forced) {acc:.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t_train:.0f} s", flush=True)
            running = []
    model.eval()

    # held-out accuracy: full tokens, and aggressive prune-only reductions (the demo must need its tokens)
    n = build.NUM_VISUAL_TOKENS
    thetas = [
        Theta(name="full"),
        Theta([Reducer(1, 16)], name="prune-16-after-layer-1"),
        Theta([Reducer(1, 8)], name="prune-8-after-layer-1"),
        Theta([Reducer(0, 4)], name="prune-4-after-layer-0"),
    ]
    cfg = SearchConfig(data=eval_json, output=work, budget=8)
    result = evaluate(cfg, thetas, model=model, processor=processor, write=False)["results"]
    for r in result:
        print(f"  {r['theta']:26s} accuracy {r['accuracy']:.3f}  final visual tokens {r['tokens']['final']}/{n}",
              flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    report = {
        "command": "python scripts/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "train_seconds": round(time.time() - t_train, 1),
        "torch": torch.__version__, "threads": args.threads,
        "eval": [{"theta": r["theta"], "accuracy": r["accuracy"], "answers": r["answers"],
                  "final_visual_tokens": r["tokens"]["final"]} for r in result],
    }
    with open(os.path.join(args.out, "training_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
