"""``eos-search --demo``: the whole method on a laptop CPU, no GPU and no download.

On the shipped demo model (:mod:`eos_kernels.demo.build`, 8 decoder layers,
64 visual tokens) and the synthetic task (:mod:`eos_kernels.demo.task`):

1. writes a search split and a held-out eval split (deterministic by seed);
2. runs the differentiable search (:func:`eos_kernels.search.run`) at an
   aggressive budget: ``--budget`` visual tokens leave the last layer
   (default 8, 1/8 of the 64);
3. evaluates on the held-out split, at the same final visual-token count:
   the full model; FastV-style pruning (one prune layer); SparseVLM-style
   multi-layer pruning at the warm-start layers; the merge (ToMe) and pool
   corners at those layers with the same schedule; and the searched Θ --
   accuracy (greedy, exact one-word match) and the token report of each;
4. prints the table and writes ``demo_results.json`` / ``demo_results.md``
   beside the search's ``theta.json``, ``log.jsonl`` and plots.

The baselines' schedule is the SparseVLM v2 keep ratios at the slots, rescaled
(:meth:`Theta.rescale`, ``count="final"``) so that at most ``budget`` tokens
leave the last layer; FastV keeps ``budget`` tokens after the first slot.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from eos_kernels.theta import Theta

#: final visual tokens of the demo (1/8 of the demo model's 64)
DEMO_BUDGET = 8


def baselines(budget: int, layers, num_visual_tokens: int, num_layers: int) -> list[Theta]:
    """FastV-, SparseVLM-, ToMe- and Pool-style Θ with (at most) ``budget`` final visual tokens."""
    kw = dict(count="final", num_visual_tokens=num_visual_tokens, num_layers=num_layers)
    merge = Theta.tome(budget, layers, name=f"tome-{budget}", **kw)
    pool = Theta.pool(budget, layers, name=f"pool-{budget}", **kw)
    prune = Theta([dataclasses.replace(r, gamma=0.0, tau=1.0, theta=0.0, rho=0.0, nu=0.0) for r in merge],
                  name=f"sparsevlm-style-{budget}")
    fastv = Theta.fastv(layers[0], budget, name=f"fastv-{budget}")
    return [fastv, prune, merge, pool]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eos-search --demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", default="eos-demo-output", help="output folder (default: eos-demo-output)")
    p.add_argument("--budget", type=int, default=DEMO_BUDGET, help=f"final visual tokens (default {DEMO_BUDGET})")
    p.add_argument("--steps", type=int, default=300, help="search steps (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="search batch (default 8)")
    p.add_argument("--lr", type=float, default=1e-2, help="search learning rate (default 1e-2)")
    p.add_argument("--search-images", type=int, default=400, help="images of the search split (default 400)")
    p.add_argument("--eval-images", type=int, default=500, help="held-out questions (default 500)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--impl", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def run_demo(args) -> dict:
    from eos_kernels.demo import build, task
    from eos_kernels.search import SearchConfig, evaluate, run
    from eos_kernels.search.config import scale_init_layers
    from eos_kernels.search.evaluate import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = build.load_demo_model()
    data = os.path.join(args.output, "data")
    search_json = task.generate_split(data, "search", args.search_images, args.seed)
    eval_json = task.generate_split(data, "eval", args.eval_images, args.seed)
    n, L = build.NUM_VISUAL_TOKENS, model.config.text_config.num_hidden_layers

    config = SearchConfig(data=search_json, output=args.output, budget=args.budget, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed, impl=args.impl,
                          progress=args.progress, overwrite=True, checkpoint_every=0)
    result = run(config, model=model, processor=processor)
    searched = Theta(result.theta.reducers, name=f"eos-searched-{args.budget}")
    layers = tuple(scale_init_layers(L))  # the search's warm-start slots: the baselines reduce there too
    thetas = [Theta(name="full")] + baselines(args.budget, layers, n, L) + [searched]
    eval_cfg = SearchConfig(data=eval_json, output=args.output, budget=args.budget, max_new_tokens=3,
                            impl=args.impl)
    results = evaluate(eval_cfg, thetas, model=model, processor=processor, write=False)["results"]
    table = format_table(results)
    summary = {
        "budget": args.budget, "num_visual_tokens": n, "num_layers": L, "seconds": round(time.time() - t0, 1),
        "search_steps": result.step, "command": "eos-search " + " ".join(sys.argv[1:]),
        "results": [{"theta": r["theta"], "accuracy": r["accuracy"], "answers": r["answers"],
                     "final": r["tokens"]["final"], "mean_leaving": r["tokens"]["mean_leaving"],
                     "mean_processed": r["tokens"]["mean_processed"],
                     "prefill_flops_ratio": r["tokens"]["prefill_flops_ratio"],
                     "theta_config": r["theta_config"]} for r in results],
    }
    with open(os.path.join(args.output, "demo_results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.output, "demo_results.md"), "w") as f:
        f.write(f"# `{summary['command']}`\n\n```\n{table}\n```\n\n{results[0]['answers']} held-out "
                f"questions; budget {args.budget} of {n} visual tokens; {summary['seconds']} s in all.\n")
    print(table)
    print(f"eos-search --demo: {summary['seconds']} s; results in {os.path.join(args.output, 'demo_results.md')}")
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except FileNotFoundError as exc:  # no trained checkpoint in this installation
        print(f"eos-search --demo: error: {exc}", file=sys.stderr)
        return 2
    return 0
