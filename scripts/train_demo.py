"""Train the demo model on the synthetic task and write the checkpoint shipped in the package.

    python scripts/train_demo.py train  --work DIR [--steps 5000] [--batch-size 32] [--seed 0]
    python scripts/train_demo.py export --work DIR [--out eos_kernels/demo/checkpoint]

``train`` streams fresh scenes of the train split (:mod:`eos_kernels.demo.task`,
4 different questions per image, rendered on the fly; the scenes of step ``s``
come from the train stream seeded by ``(seed, s)``, so a run is deterministic
for a seed and thread count and resumes exactly), trains every weight (vision
tower, projector, decoder) with AdamW, linear warm-up and cosine decay, and
cross-entropy on the answer tokens of the LLaVA-1.5 prompt format that
:mod:`eos_kernels.search.data` uses (checked against it at start-up).

Learnability (why the first demo model stayed at the answer prior): one object
is one visual token of 64, and the answer loss alone gives the model no usable
signal to find it -- a two-layer decoder stays at the prior for 250 steps even
when the scene holds a single object, while a scene filling the whole image is
learned in 50. So training adds, none of it part of the exported model:

- a curriculum: scenes grow from 1-4 objects to the task's 10-18 over
  ``--curriculum-steps``, ``--easy-share`` of them stay easier, and a dominant
  colour (``--dominant``, fading out over ``--dominant-steps``) makes early
  answers readable from an average of the tokens;
- :class:`CellProbe` (``--aux-weight``): each visual token's hidden state after
  decoder layer ``--aux-layer`` must tell its cell's colour, shape, row, column;
- :class:`AttentionProbe` (``--attn-weight``): one head of layer
  ``--attn-layer`` is supervised to attend, from each answer position, to the
  cells the question is about (training runs eager attention for it);
- :class:`AnswerProbe` (``--answer-weight``): the attended object's colour and
  shape must be readable at the answer position after that layer.

Every ``--eval-every`` steps it logs the held-out (eval split) exact-match
accuracy per question type -- teacher-forced, which for one-word answers equals
greedy generation -- and writes ``DIR/last.pt`` (model, probes, optimiser,
step: ``train`` again with the same ``--work`` resumes from it, also with
changed loss options) and ``DIR/best.pt`` (best held-out accuracy so far). The
log is ``DIR/log.txt``; each invocation is appended to ``DIR/runs.json``
(command, seed, start time, steps, seconds).

``export`` loads ``DIR/best.pt`` (or ``--which last``), measures held-out accuracy
with greedy ``generate`` (:func:`eos_kernels.search.evaluate`) with all 64 visual
tokens and pruned to 1/8 (8 tokens) after an early layer, and writes the
checkpoint (safetensors, config, tokenizer, processor) and ``training_report.json``
(those accuracies, the sample the tests re-measure, and every training run).

Use one torch thread on a shared machine (``--threads 1``, the default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eos_kernels import Reducer, Theta  # noqa: E402
from eos_kernels.demo import build, task  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("train", "export"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "eos-demo-train"),
                    help="folder of the resumable checkpoints, log and run records")
    ap.add_argument("--out", default=build.checkpoint_path(), help="export: the checkpoint folder")
    ap.add_argument("--which", choices=("best", "last"), default="best", help="export: which checkpoint")
    ap.add_argument("--steps", type=int, default=6000, help="total steps of the schedule")
    ap.add_argument("--stop-at", type=int, default=None, help="stop (resumably) after this step")
    ap.add_argument("--batch-size", type=int, default=32, help="images per step")
    ap.add_argument("--turns", type=int, default=4, help="questions per image (all different)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=600, help="held-out questions of the periodic check")
    ap.add_argument("--export-eval-n", type=int, default=1000, help="export: held-out questions (greedy)")
    ap.add_argument("--test-sample", type=int, default=200,
                    help="export: the first N held-out questions, measured again for tests/test_demo.py")
    ap.add_argument("--headline", default="prune-8-after-layer-1", help="export: the pruned Θ the test checks")
    ap.add_argument("--discarded-runs", nargs="*", default=[], metavar="RUNS_JSON",
                    help="export: runs.json files of abandoned runs, recorded in the report as such")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--curriculum-steps", type=int, default=1500,
                    help="steps over which scenes grow from 1-4 objects to the task's 10-18 (0: no curriculum)")
    ap.add_argument("--easy-share", type=float, default=0.2, help="share of images with 1..high objects")
    ap.add_argument("--dominant", type=float, default=0.9,
                    help="curriculum: initial probability that an object takes its scene's dominant colour")
    ap.add_argument("--dominant-steps", type=int, default=800, help="steps over which --dominant falls to 0")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the training-only cell probe")
    ap.add_argument("--aux-layer", type=int, default=1, help="decoder layer whose output the probe reads")
    ap.add_argument("--attn-weight", type=float, default=0.5, help="weight of the training-only attention probe")
    ap.add_argument("--attn-layer", type=int, default=2, help="decoder layer of the supervised attention head")
    ap.add_argument("--attn-head", type=int, default=0, help="the supervised attention head")
    ap.add_argument("--answer-weight", type=float, default=0.5, help="weight of the training-only answer probe")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- data
class Encoder:
    """Conversations -> ids/labels in the LLaVA-1.5 format of eos_kernels.search.data; images -> pixels."""

    def __init__(self, processor, image_token_id: int):
        self.tok = processor.tokenizer
        self.image_token_id = image_token_id
        self.bos, self.eos, self.pad = self.tok.bos_token_id, self.tok.eos_token_id, self.tok.pad_token_id
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)
        self._cache = {}

    def _ids(self, text):
        if text not in self._cache:
            self._cache[text] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def conversation(self, qa):
        ids, labels = [self.bos], [-100]
        for t, (q, a, _, _) in enumerate(qa):
            human = self._ids(("USER: <image>\n" if t == 0 else "USER: ") + q + " ASSISTANT:")
            if t == 0:
                at = human.index(self.image_token_id)
                human = human[:at] + [self.image_token_id] * build.NUM_VISUAL_TOKENS + human[at + 1:]
            ans = self._ids(f" {a}{self.tok.eos_token}")
            ids += human + ans
            labels += [-100] * len(human) + ans
        return ids, labels

    def pixels(self, image):
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(task.IMAGE_SIZE, task.IMAGE_SIZE, 3)
        return (x.permute(2, 0, 1).float() / 255.0 - self.mean) / self.std

    def batch(self, examples):
        encoded = [self.conversation(ex["qa"]) for ex in examples]
        L = max(len(i) for i, _ in encoded)
        B = len(encoded)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, (i, lab) in enumerate(encoded):
            ids[b, :len(i)] = torch.tensor(i)
            mask[b, :len(i)] = 1
            labels[b, :len(i)] = torch.tensor(lab)
        px = torch.stack([self.pixels(ex["image"]) for ex in examples])
        return ids, mask, labels, px


def curriculum(step: int, args):
    """Objects per scene at ``step``: a ``rng -> (low, high)`` drawer (None: the task's own 10-18).

    The range grows linearly from 1-4 objects to the task's 10-18 over
    ``--curriculum-steps``; ``--easy-share`` of the images are drawn from 1..high
    throughout. Few objects make the answer visible even to the untrained
    model's near-uniform attention (a plain average of 64 tokens hides one
    object among 10-18), so the visual pathway gets a gradient from the start.
    """
    if not args.curriculum_steps:
        return None
    level = min(1.0, step / args.curriculum_steps)
    low = 1 + round((task.MIN_OBJECTS - 1) * level)
    high = 4 + round((task.MAX_OBJECTS - 4) * level)
    share = args.easy_share
    dominant = max(0.0, args.dominant * (1.0 - step / args.dominant_steps)) if args.dominant_steps else 0.0

    def draw(rng):
        return ((1, high) if rng.random() < share else (low, high)), dominant
    return draw


class CellProbe(torch.nn.Module):
    """Training-only auxiliary heads (not part of the exported model).

    A linear read-out of each visual token's hidden state after decoder layer
    ``--aux-layer`` predicts its cell's colour (or none), shape (or none), row
    and column; its cross-entropy (weight ``--aux-weight``) gives the vision
    tower, the projector and the first decoder layers a dense per-token signal,
    so the features the questions select on exist before the (slow to learn)
    question-dependent attention does.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = (len(task.COLOURS) + 1, len(task.SHAPES) + 1, task.GRID, task.GRID)
        self.head = torch.nn.Linear(hidden, sum(self.sizes))

    @staticmethod
    def targets(examples):
        colours, shapes = [None] + list(task.COLOURS), [None] + list(task.SHAPES)
        out = []
        for ex in examples:
            rows = []
            for r in range(task.GRID):
                for c in range(task.GRID):
                    it = ex["scene"].cells[r][c]
                    rows.append([colours.index(it and it.colour), shapes.index(it and it.shape), r, c])
            out.append(rows)
        return torch.tensor(out)  # [B, N, 4]

    def loss(self, hidden, ids, image_token_id, examples):
        visual = hidden[ids == image_token_id].view(len(examples), -1, hidden.shape[-1])
        logits = self.head(visual).split(self.sizes, dim=-1)
        tgt = self.targets(examples)
        return sum(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt[..., i].reshape(-1))
                   for i, lg in enumerate(logits)) / len(logits)


def step_examples(seed: int, step: int, batch_size: int, turns: int, n_objects=None):
    stream = task.iter_examples("train", seed * 1_000_003 + step, turns, n_objects)
    return [next(stream) for _ in range(batch_size)]


def check_encoder_matches_search_pipeline(encoder, processor, image_token_id):
    """The training ids/labels/pixels equal what eos_kernels.search.data makes of the same records."""
    from eos_kernels.search.data import load_dataset

    with tempfile.TemporaryDirectory() as d:
        path = task.generate_split(d, "train", 4, seed=123, turns_per_image=4)
        ds = load_dataset(path, processor, num_visual_tokens=build.NUM_VISUAL_TOKENS, image_token_id=image_token_id)
        records = json.load(open(path))
        from PIL import Image
        for ex, rec in zip(ds.examples, records):
            conv = rec["conversations"]
            qa = [(conv[2 * t]["value"].replace("<image>\n", ""), conv[2 * t + 1]["value"], None, None)
                  for t in range(len(conv) // 2)]
            ids, labels = encoder.conversation(qa)
            assert ids == ex.input_ids and labels == ex.labels, "training encoding differs from the search's"
            mine = encoder.pixels(Image.open(ex.image).convert("RGB"))
            theirs = ds.pixels([ex.image])[0]
            assert torch.allclose(mine, theirs, atol=1e-5), float((mine - theirs).abs().max())


def heldout_examples(n: int, seed: int = 0, n_objects=None):
    stream = task.iter_examples("eval", seed, 1, n_objects)
    return [next(stream) for _ in range(n)]


@torch.no_grad()
def heldout_accuracy(model, encoder, examples, batch=100):
    """Exact match of every answer token under teacher forcing (= greedy for one-word answers), per type."""
    was = model.training
    model.eval()
    per = {}
    for s in range(0, len(examples), batch):
        chunk = examples[s:s + batch]
        ids, mask, labels, px = encoder.batch(chunk)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
        ok = ((pred == gold) | (gold == -100)).all(dim=1).tolist()
        for ex, o in zip(chunk, ok):
            t = ex["qa"][0][2]
            r, n = per.get(t, (0, 0))
            per[t] = (r + o, n + 1)
    model.train(was)
    total = sum(r for r, _ in per.values()) / max(1, sum(n for _, n in per.values()))
    return total, {t: round(r / n, 3) for t, (r, n) in sorted(per.items())}


class AttentionProbe:
    """Training-only attention supervision (``--attn-weight``; the exported model is a stock LLaVA).

    Reads the attention probabilities of one head (``--attn-head``) of decoder
    layer ``--attn-layer`` (the training forward runs eager attention) and, at
    each position that predicts an answer, adds ``-log`` of the attention mass
    on the visual tokens of the cells the question is about: the named cell
    (colour / shape), the only object of the named kind (only), the objects of
    the named colour (count; none when there are none). Selecting the right
    visual token is the slow part to learn from the answer loss alone (it must
    first be guessed to be rewarded); this gives it a direct signal.
    """

    def __init__(self, model, layer: int, head: int):
        self.layer, self.head, self.weights = layer, head, None
        attn = model.model.language_model.layers[layer].self_attn
        self.handle = attn.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.weights = output[1]

    @staticmethod
    def cells(scene, qtype, qargs):
        g = task.GRID
        if qtype in ("colour", "shape"):
            r, c = qargs["cell"]
            return [(r - 1) * g + (c - 1)]
        if qtype == "only":
            return [r * g + c for r in range(g) for c in range(g)
                    if scene.cells[r][c] is not None and scene.cells[r][c].shape == qargs["shape"]]
        return [r * g + c for r in range(g) for c in range(g)
                if scene.cells[r][c] is not None and scene.cells[r][c].colour == qargs["colour"]]

    def loss(self, ids, labels, image_token_id, examples):
        w = self.weights
        terms = []
        for b, ex in enumerate(examples):
            vis = (ids[b] == image_token_id).nonzero().flatten()
            lab = labels[b].tolist()
            starts = [p for p in range(1, len(lab)) if lab[p] != -100 and lab[p - 1] == -100]
            for (_, _, qtype, qargs), start in zip(ex["qa"], starts):
                cells = self.cells(ex["scene"], qtype, qargs)
                if cells:
                    mass = w[b, self.head, start - 1, vis[cells]].sum()
                    terms.append(-torch.log(mass + 1e-6))
        return torch.stack(terms).mean() if terms else torch.zeros(())


class AnswerProbe(torch.nn.Module):
    """Training-only read-out at the answer positions (``--answer-weight``; not part of the exported model).

    For the questions about one object (colour, shape, only), a linear head on
    the hidden state after decoder layer ``--attn-layer`` at the position that
    predicts the answer must tell that object's colour AND shape (or none): the
    value path of the supervised attention head then carries both, whatever
    the question asks, so the shape read-out learns from every such question.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = (len(task.COLOURS) + 1, len(task.SHAPES) + 1)
        self.head = torch.nn.Linear(hidden, sum(self.sizes))

    def loss(self, hidden, labels, examples):
        colours, shapes = [None] + list(task.COLOURS), [None] + list(task.SHAPES)
        rows, targets = [], []
        for b, ex in enumerate(examples):
            lab = labels[b].tolist()
            starts = [p for p in range(1, len(lab)) if lab[p] != -100 and lab[p - 1] == -100]
            for (_, _, qtype, qargs), start in zip(ex["qa"], starts):
                if qtype == "count":
                    continue
                cells = AttentionProbe.cells(ex["scene"], qtype, qargs)
                it = ex["scene"].cells[cells[0] // task.GRID][cells[0] % task.GRID]
                rows.append(hidden[b, start - 1])
                targets.append([colours.index(it and it.colour), shapes.index(it and it.shape)])
        if not rows:
            return torch.zeros(())
        logits = self.head(torch.stack(rows)).split(self.sizes, dim=-1)
        tgt = torch.tensor(targets)
        return sum(torch.nn.functional.cross_entropy(lg, tgt[:, i]) for i, lg in enumerate(logits)) / 2


# ----------------------------------------------------------------------------- train
def lr_factor(step, args):
    if step < args.warmup:
        return (step + 1) / args.warmup
    p = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def log(work, msg):
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    with open(os.path.join(work, "log.txt"), "a") as f:
        f.write(line + "\n")


def record_run(work, entry):
    path = os.path.join(work, "runs.json")
    runs = json.load(open(path)) if os.path.isfile(path) else []
    runs = [r for r in runs if r.get("started") != entry["started"]] + [entry]
    with open(path, "w") as f:
        json.dump(runs, f, indent=1)


def train(args, argv):
    os.makedirs(args.work, exist_ok=True)
    torch.manual_seed(args.seed)
    processor = build.build_processor()
    model = build.build_model(args.seed).train()
    image_token = model.config.image_token_id
    encoder = Encoder(processor, image_token)
    check_encoder_matches_search_pipeline(encoder, processor, image_token)
    probe = CellProbe(model.config.text_config.hidden_size)
    answer_probe = AnswerProbe(model.config.text_config.hidden_size)
    attn_probe = None
    if args.attn_weight:
        model.set_attn_implementation("eager")  # attention probabilities for the probe
        attn_probe = AttentionProbe(model, args.attn_layer, args.attn_head)
    params = list(model.parameters()) + (list(probe.parameters()) if args.aux_weight else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    if args.answer_weight:
        opt.add_param_group({"params": list(answer_probe.parameters())})
    start, best = 0, -1.0
    last = os.path.join(args.work, "last.pt")
    if os.path.isfile(last):
        state = torch.load(last, weights_only=False)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        if len(state["opt"]["param_groups"]) == len(opt.param_groups):
            opt.load_state_dict(state["opt"])
        else:  # a checkpoint from before the answer probe: the other moments carry over
            old = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
            old.load_state_dict(state["opt"])
            for p in params:
                if p in old.state:
                    opt.state[p] = old.state[p]
        if "answer_probe" in state:
            answer_probe.load_state_dict(state["answer_probe"])
        start, best = state["step"], state["best"]
        log(args.work, f"resumed from {last} at step {start} (best held-out {best:.3f})")
    entry = {"command": "python scripts/train_demo.py " + " ".join(argv), "seed": args.seed,
             "threads": args.threads, "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "from_step": start, "to_step": start, "seconds": 0.0, "args": vars(args)}
    record_run(args.work, entry)
    held = heldout_examples(args.eval_n)
    easy = heldout_examples(200, n_objects=(1, 4))
    log(args.work, f"model {sum(p.numel() for p in model.parameters()):,} parameters; steps {start}..{args.steps}")
    t0, running, running_aux, running_att, running_ans = time.time(), [], [], [], []
    stop = min(args.steps, args.stop_at or args.steps)
    for step in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args)
        examples = step_examples(args.seed, step, args.batch_size, args.turns, curriculum(step, args))
        ids, mask, labels, px = encoder.batch(examples)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels,
                    output_hidden_states=bool(args.aux_weight or args.answer_weight))
        loss = out.loss
        total = loss
        if args.aux_weight:
            aux = probe.loss(out.hidden_states[args.aux_layer + 1], ids, image_token, examples)
            total = total + args.aux_weight * aux
            running_aux.append(aux.item())
        if args.answer_weight:
            ans = answer_probe.loss(out.hidden_states[args.attn_layer + 1], labels, examples)
            total = total + args.answer_weight * ans
            running_ans.append(ans.item())
        if attn_probe is not None:
            att = attn_probe.loss(ids, labels, image_token, examples)
            total = total + args.attn_weight * att
            running_att.append(att.item())
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running.append(loss.item())
        done = step + 1
        if done % args.log_every == 0:
            aux_text = f"  aux {sum(running_aux) / len(running_aux):.4f}" if running_aux else ""
            aux_text += f"  attn {sum(running_att) / len(running_att):.4f}" if running_att else ""
            aux_text += f"  answer {sum(running_ans) / len(running_ans):.4f}" if running_ans else ""
            log(args.work, f"step {done:6d}  loss {sum(running) / len(running):.4f}{aux_text}  "
                           f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f} s")
            running, running_aux, running_att, running_ans = [], [], [], []
        if done % args.eval_every == 0 or done == stop:
            acc, per = heldout_accuracy(model, encoder, held)
            easy_acc, easy_per = heldout_accuracy(model, encoder, easy)
            log(args.work, f"step {done:6d}  HELD-OUT accuracy {acc:.3f}  {per}   "
                           f"(easy scenes, 1-4 objects: {easy_acc:.3f} {easy_per})")
            state = {"model": model.state_dict(), "probe": probe.state_dict(), "answer_probe": answer_probe.state_dict(),
                     "opt": opt.state_dict(), "step": done,
                     "best": max(best, acc), "heldout": acc, "per_type": per}
            torch.save(state, last + ".tmp")
            os.replace(last + ".tmp", last)
            if acc > best:
                best = acc
                shutil.copyfile(last, os.path.join(args.work, "best.pt"))
            entry.update(to_step=done, seconds=round(entry["seconds"] + time.time() - t0, 1),
                         ended=time.strftime("%Y-%m-%d %H:%M:%S"), heldout=acc)
            t0 = time.time()
            record_run(args.work, entry)
    log(args.work, f"stopped at step {stop}; best held-out {best:.3f}")


# ----------------------------------------------------------------------------- export
PRUNED = [  # the demo model must need its visual tokens: pruned to 1/8 (8 of 64) after an early layer
    Theta([Reducer(0, 8)], name="prune-8-after-layer-0"),
    Theta([Reducer(1, 8)], name="prune-8-after-layer-1"),
    Theta([Reducer(2, 8)], name="prune-8-after-layer-2"),
    Theta([Reducer(1, 16)], name="prune-16-after-layer-1"),
]


def export(args, argv):
    from eos_kernels.search import SearchConfig, evaluate

    state = torch.load(os.path.join(args.work, f"{args.which}.pt"), weights_only=False)
    processor = build.build_processor()
    model = build.build_model(args.seed)
    model.load_state_dict(state["model"])
    model.eval()
    thetas = [Theta(name="full")] + PRUNED
    headline = next(t for t in PRUNED if t.name == args.headline)
    with tempfile.TemporaryDirectory() as d:
        eval_json = task.generate_split(os.path.join(d, "all"), "eval", args.export_eval_n, seed=0)
        cfg = SearchConfig(data=eval_json, output=d, budget=8, batch_size=100, max_new_tokens=3)
        results = evaluate(cfg, thetas, model=model, processor=processor, write=False)["results"]
        # the held-out sample of tests/test_demo.py: the first questions of the same split
        sample_json = task.generate_split(os.path.join(d, "sample"), "eval", args.test_sample, seed=0)
        cfg = SearchConfig(data=sample_json, output=d, budget=8, batch_size=100, max_new_tokens=3)
        sample = evaluate(cfg, [Theta(name="full"), headline], model=model, processor=processor,
                          write=False)["results"]
    for r in results:
        print(f"  {r['theta']:26s} accuracy {r['accuracy']:.4f} ({r['correct']}/{r['answers']})  "
              f"final visual tokens {r['tokens']['final']}/{build.NUM_VISUAL_TOKENS}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):  # nothing stale from an earlier export
        os.remove(os.path.join(args.out, name))
    model.save_pretrained(args.out, safe_serialization=True)
    _portable_weights(model, os.path.join(args.out, "model.safetensors"))
    processor.save_pretrained(args.out)
    runs = json.load(open(os.path.join(args.work, "runs.json")))
    for r in runs:  # runs recorded before an option existed ran without it: say so in today's terms
        missing = [opt for opt in ("attn_weight", "answer_weight") if opt not in r["args"]]
        if missing:
            r["equivalent_command_today"] = r["command"] + "".join(
                f" --{opt.replace('_', '-')} 0" for opt in missing)
    full = results[0]["accuracy"]
    report = {
        "model": "eos_kernels.demo.build.build_config() (LlavaForConditionalGeneration), trained from scratch by "
                 "scripts/train_demo.py",
        "checkpoint": {"which": args.which, "step": state["step"],
                       "heldout_teacher_forced_at_save": state.get("heldout"), "per_type": state.get("per_type")},
        "heldout": {"split": "eval", "seed": 0, "questions": results[0]["answers"],
                    "metric": "greedy generation, exact match after normalisation (eos_kernels.search.evaluate)"},
        "accuracy_full": full,
        "pruned_headline": headline.name,
        "accuracy_pruned": {r["theta"]: r["accuracy"] for r in results[1:]},
        "pruned_drop_points": {r["theta"]: round(100 * (full - r["accuracy"]), 1) for r in results[1:]},
        "eval": [{"theta": r["theta"], "accuracy": r["accuracy"], "correct": r["correct"], "answers": r["answers"],
                  "final_visual_tokens": r["tokens"]["final"], "theta_config": r["theta_config"]} for r in results],
        "test_sample": {"split": "eval", "seed": 0, "questions": sample[0]["answers"],
                        "accuracy_full": sample[0]["accuracy"], "accuracy_pruned": sample[1]["accuracy"],
                        "pruned_theta": headline.to_dict()},
        "training_runs": runs,
        "discarded_runs": {
            "note": "abandoned earlier attempts, NOT in this checkpoint's lineage (recorded for completeness)",
            "runs": [r for path in args.discarded_runs for r in json.load(open(path))]},
        "export_command": "python scripts/train_demo.py " + " ".join(argv),
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out, "training_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    for name in os.listdir(args.out):
        os.chmod(os.path.join(args.out, name), 0o644)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)", flush=True)



def _portable_weights(model, path: str) -> None:
    """Rewrite the saved weights under the model's own parameter names, with CLIP under ``vision_model``.

    transformers 5.24 saves a LLaVA's tensors under legacy names (``vision_tower.encoder...``) that 5.0
    does not map back (it silently re-initialises the vision tower); the in-memory names of 5.0
    (``model.vision_tower.vision_model....``) load unchanged on both releases (checked bit for bit)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.vision_tower.") and not name.startswith("model.vision_tower.vision_model."):
            name = "model.vision_tower.vision_model." + name[len("model.vision_tower."):]
        tensors[name] = tensor.detach().contiguous().clone()
    save_file(tensors, path, metadata=metadata)

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode == "train":
        train(args, argv)
    else:
        export(args, argv)


if __name__ == "__main__":
    main()
