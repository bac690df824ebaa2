"""``eos-search --demo``: the whole method on a laptop CPU, no GPU and no download.

On the shipped demo model (:mod:`eos_kernels.demo.build`, 8 decoder layers,
64 visual tokens, one per grid cell) and the synthetic task
(:mod:`eos_kernels.demo.task`):

1. writes a search split and a held-out eval split (deterministic by seed);
2. runs the differentiable search (:func:`eos_kernels.search.run`, progress
   bar) at an aggressive budget: ``--budget`` visual tokens leave the last
   layer (default 8, 1/8 of the 64);
3. evaluates on the held-out split, at the search budget and at a second
   budget (``--second-budget``, default 16 = 1/4): the full model; FastV-style
   pruning (one prune layer, the first warm-start slot); SparseVLM-style
   multi-layer pruning at the warm-start slots (SparseVLM v2's keep ratios,
   rescaled to the budget); the merge (ToMe) and pool corners with the same
   layers and schedule; and the searched Θ -- at the search budget as searched
   -- at the search budget and at the second budget by :meth:`Theta.rescale`
   of the same Θ (same layers and operators, retain schedule scaled so that
   at most the budget leaves the last layer), and, when it differs, with the
   search's own schedule (the one-sided budget penalty of equation 13 lets a
   search end below its budget).
   For each: accuracy (greedy generation, exact one-word match), the token
   report (final, mean leaving, mean processed, prefill FLOPs ratio) and the
   measured prefill time;
4. prints the table and where each layer's gate, discard and operator
   parameters started and ended; writes ``demo_results.json`` /
   ``demo_results.md`` and ``accuracy_vs_tokens.png`` beside the search's
   ``theta.json``, ``log.jsonl``, ``trajectories.png``, ``profile.png`` and
   ``loss.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch

from eos_kernels.theta import Theta

#: final visual tokens of the demo (1/8 of the demo model's 64) and the second budget (1/4)
DEMO_BUDGET = 8
SECOND_BUDGET = 16
FAMILIES = ("fastv", "sparsevlm-style", "merge", "pool", "eos-searched")
_OPS = ("gamma", "tau", "theta", "rho", "nu")


def baselines(budget: int, layers, num_visual_tokens: int, num_layers: int) -> list[Theta]:
    """FastV-, SparseVLM-, ToMe- and Pool-style Θ with (at most) ``budget`` final visual tokens."""
    kw = dict(count="final", num_visual_tokens=num_visual_tokens, num_layers=num_layers)
    merge = Theta.tome(budget, layers, name=f"merge@{budget}", **kw)
    pool = Theta.pool(budget, layers, name=f"pool@{budget}", **kw)
    prune = Theta([dataclasses.replace(r, gamma=0.0, tau=1.0, theta=0.0, rho=0.0, nu=0.0) for r in merge],
                  name=f"sparsevlm-style@{budget}")
    fastv = Theta.fastv(layers[0], budget, name=f"fastv@{budget}")
    return [fastv, prune, merge, pool]


def searched_at(searched: Theta, budget: int, n: int, L: int) -> Theta:
    """The searched Θ deployed at ``budget`` final tokens: same layers and operators, retain schedule rescaled
    (:meth:`Theta.rescale`, ``count="final"``), as the paper deploys one Θ at several budgets."""
    return searched.rescale(budget, "final", num_visual_tokens=n, num_layers=L, name=f"eos-searched@{budget}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eos-search --demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", default="eos-demo-output", help="output folder (default: eos-demo-output)")
    p.add_argument("--budget", type=int, default=DEMO_BUDGET, help=f"final visual tokens (default {DEMO_BUDGET})")
    p.add_argument("--second-budget", type=int, default=SECOND_BUDGET,
                   help=f"second evaluation budget, the searched Θ rescaled (default {SECOND_BUDGET})")
    p.add_argument("--steps", type=int, default=300, help="search steps (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="search batch (default 8)")
    p.add_argument("--lr", type=float, default=2e-2, help="search learning rate (default 2e-2)")
    p.add_argument("--local-moves-every", type=int, default=20,
                   help="local moves of the search every N steps (eos_kernels.search, decision 6; 0: off; default 20)")
    p.add_argument("--search-images", type=int, default=400, help="images of the search split (default 400)")
    p.add_argument("--eval-images", type=int, default=500, help="held-out questions (default 500)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--impl", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


# ----------------------------------------------------------------------------- measurements
@torch.no_grad()
def prefill_seconds(model, data, theta: Theta, batch_size: int = 50, batches: int = 2, repeats: int = 3) -> float:
    """Median wall time of one prefill forward (prompt only, ``logits_to_keep=1``) per prompt, in seconds."""
    from eos_kernels.integrations.llava import patch_llava, unpatch_llava

    items = [(i, 0) for i in range(min(len(data), batch_size * batches))]
    chunks = [data.prompt_batch(items[s:s + batch_size]) for s in range(0, len(items), batch_size)]
    patch_llava(model, theta)
    try:
        ids, mask, px = chunks[0]
        model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False, logits_to_keep=1)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for ids, mask, px in chunks:
                model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False, logits_to_keep=1)
            times.append((time.perf_counter() - t0) / len(items))
    finally:
        unpatch_llava(model)
    return statistics.median(times)


def parameter_table(log_path: str, space, theta: Theta) -> list[dict]:
    """Per layer: every searched value at the first step's forward (the init) and at the end."""
    with open(log_path, encoding="utf-8") as f:
        first = json.loads(f.readline())
    with torch.no_grad():
        end = {k: v.double().tolist() for k, v in space.constrained_values().items()}
    keep = {r.layer: r.keep for r in theta.reducers}
    rows = []
    for layer in range(len(end["g"])):
        row = {"layer": layer, "reducer": layer in keep, "keep": keep.get(layer)}
        moved = False
        for k in ("g", "c") + _OPS:
            row[k] = [first[k][layer], end[k][layer]]
            moved |= abs(end[k][layer] - first[k][layer]) > 1e-3
        row["moved"] = moved
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- formatting
def _fmt_row(r):
    t = r["tokens"]
    ms = r["prefill_ms"]
    return (r["config"], str(r["budget"]) if r["budget"] else "-", f"{r['accuracy']:.3f}",
            str(t["final"]), f"{t['mean_leaving']:.2f}", f"{t['mean_processed']:.2f}",
            f"{t['prefill_flops_ratio']:.3f}", f"{ms:.2f}" if ms is not None else "-",
            " ".join(f"L{s[0]}:{s[1]}->{s[2]}" for s in t["schedule"]) or "-")


_HEADER = ("configuration", "budget", "accuracy", "final", "mean leaving", "mean processed", "FLOPs ratio",
           "prefill ms/prompt", "schedule (layer:in->kept)")


def format_table(rows) -> str:
    body = [_HEADER] + [_fmt_row(r) for r in rows]
    widths = [max(len(b[i]) for b in body) for i in range(len(_HEADER))]
    return "\n".join("  ".join(c.ljust(w) if j in (0, 8) else c.rjust(w) for j, (c, w) in enumerate(zip(b, widths)))
                     for b in body)


def markdown_table(rows) -> str:
    out = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    out += ["| " + " | ".join(_fmt_row(r)) + " |" for r in rows]
    return "\n".join(out)


def format_parameters(rows, markdown: bool = False) -> str:
    def pair(v, digits=3):
        return f"{v[0]:.{digits}f} -> {v[1]:.{digits}f}"

    header = ("layer", "reducer (keep)", "g", "c", "gamma", "tau", "theta", "rho", "nu", "moved")
    body = [header]
    for r in rows:
        body.append((str(r["layer"]), f"yes ({r['keep']})" if r["reducer"] else "no", pair(r["g"]), pair(r["c"]),
                     pair(r["gamma"]), pair(r["tau"]), pair(r["theta"]), pair(r["rho"]), pair(r["nu"]),
                     "yes" if r["moved"] else "no"))
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(b) + " |" for b in body[1:]])
    widths = [max(len(b[i]) for b in body) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body)


def plot_accuracy(rows, path: str, num_visual_tokens: int) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    full = next((r for r in rows if r["family"] == "full"), None)
    for fam in FAMILIES:
        pts = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["tokens"]["final"])
        if not pts:
            continue
        style = dict(marker="*", markersize=12, lw=2.5) if fam == "eos-searched" else dict(marker="o")
        axes[0].plot([r["tokens"]["final"] for r in pts], [r["accuracy"] for r in pts], label=fam, **style)
        axes[1].plot([r["tokens"]["prefill_flops_ratio"] for r in pts], [r["accuracy"] for r in pts], label=fam,
                     **style)
    if full is not None:
        axes[0].scatter([num_visual_tokens], [full["accuracy"]], marker="D", color="black", label="full", zorder=5)
        axes[1].scatter([1.0], [full["accuracy"]], marker="D", color="black", label="full", zorder=5)
    axes[0].set(title="held-out accuracy vs visual tokens leaving the last layer", xlabel="final visual tokens",
                ylabel="accuracy")
    axes[0].set_xscale("log", base=2)
    axes[1].set(title="held-out accuracy vs estimated prefill FLOPs", xlabel="prefill FLOPs / full model",
                ylabel="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- the demo
def run_demo(args) -> dict:
    from eos_kernels.demo import build, task
    from eos_kernels.search import SearchConfig, evaluate, run
    from eos_kernels.search.config import scale_init_layers
    from eos_kernels.search.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = build.load_demo_model()
    data = os.path.join(args.output, "data")
    search_json = task.generate_split(data, "search", args.search_images, args.seed)
    eval_json = task.generate_split(data, "eval", args.eval_images, args.seed)
    n, L = build.NUM_VISUAL_TOKENS, model.config.text_config.num_hidden_layers
    if not 1 <= args.budget <= n or not 1 <= args.second_budget <= n:
        raise ValueError(f"budgets must be in 1..{n}")

    # 1. the search
    config = SearchConfig(data=search_json, output=args.output, budget=args.budget, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed, impl=args.impl,
                          progress=args.progress, overwrite=True, checkpoint_every=0,
                          local_moves_every=args.local_moves_every)
    result = run(config, model=model, processor=processor)
    t_search = time.time() - t0
    searched = Theta(result.theta.reducers, name="eos-searched")
    params = parameter_table(result.log_path, result.space, searched)

    # 2. the configurations
    layers = tuple(scale_init_layers(L))  # the search's warm-start slots: the baselines reduce there too
    configs = [("full", None, Theta(name="full"))]
    for b in (args.budget, args.second_budget):
        for fam, th in zip(FAMILIES, baselines(b, layers, n, L)):
            configs.append((fam, b, th))
        configs.append(("eos-searched", b, searched_at(searched, b, n, L)))
    final = searched.token_report(n, L)["final"]
    if searched.schedule(n) != configs[len(FAMILIES)][2].schedule(n):
        # the search's own schedule (the one-sided budget penalty lets it end below the budget)
        configs.append(("eos-searched", final, Theta(searched.reducers, name=f"eos-searched-as-searched@{final}")))

    # 3. held-out evaluation (+ measured prefill time)
    eval_cfg = SearchConfig(data=eval_json, output=args.output, budget=args.budget, max_new_tokens=3,
                            batch_size=50, impl=args.impl)
    held = load_dataset(eval_json, processor, num_visual_tokens=n, image_token_id=model.config.image_token_id)
    rows = []
    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configs), desc="held-out evaluation", dynamic_ncols=True)
    for fam, b, theta in configs:
        r = evaluate(eval_cfg, [theta], model=model, processor=processor, write=False)["results"][0]
        rows.append({"config": theta.name, "family": fam, "budget": b, "accuracy": r["accuracy"],
                     "correct": r["correct"], "answers": r["answers"], "answer_ce": r["answer_ce"],
                     "tokens": r["tokens"], "measured_final": r["measured_final"],
                     "prefill_ms": 1000 * prefill_seconds(model, held, theta), "theta_config": r["theta_config"]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(config=theta.name, acc=f"{r['accuracy']:.3f}")
    if bar is not None:
        bar.close()

    # 4. outputs
    plot = plot_accuracy(rows, os.path.join(args.output, "accuracy_vs_tokens.png"), n)
    seconds = round(time.time() - t0, 1)
    argv = [a for a in (getattr(args, "_argv", None) or []) if a != "--demo"]
    command = " ".join(["eos-search", "--demo"] + argv)
    best_corner = max((r for r in rows if r["budget"] == args.budget and r["family"] != "eos-searched"),
                      key=lambda r: r["accuracy"])
    eos = next(r for r in rows if r["budget"] == args.budget and r["family"] == "eos-searched")
    summary = {
        "command": command, "seconds": seconds, "search_seconds": round(t_search, 1),
        "budget": args.budget, "second_budget": args.second_budget, "num_visual_tokens": n, "num_layers": L,
        "search_steps": result.step, "search_lr": args.lr, "search_batch_size": args.batch_size,
        "eval_questions": rows[0]["answers"], "threads": torch.get_num_threads(),
        "warm_start_layers": list(layers), "searched_theta": searched.to_dict(), "search_parameters": params,
        "parameters_moved": [p["layer"] for p in params if p["moved"]],
        "best_baseline_at_budget": {"config": best_corner["config"], "accuracy": best_corner["accuracy"]},
        "searched_at_budget": {"config": eos["config"], "accuracy": eos["accuracy"]},
        "results": rows, "plots": [plot] + list(result.plots),
    }
    flops = eos["tokens"]["prefill_flops_ratio"]
    cheaper = [r for r in rows if r["family"] not in ("eos-searched", "full")
               and r["tokens"]["prefill_flops_ratio"] <= flops + 1e-9]
    best_cheaper = max(cheaper, key=lambda r: r["accuracy"]) if cheaper else None
    summary["best_baseline_at_most_searched_flops"] = (
        {"config": best_cheaper["config"], "accuracy": best_cheaper["accuracy"],
         "prefill_flops_ratio": best_cheaper["tokens"]["prefill_flops_ratio"]} if best_cheaper else None)
    verdict = (f"At {args.budget} final visual tokens the searched Θ reaches {eos['accuracy']:.3f}; the best fixed "
               f"baseline at that budget is {best_corner['config']} with {best_corner['accuracy']:.3f} "
               f"({'the searched Θ matches or beats it' if eos['accuracy'] >= best_corner['accuracy'] else 'the searched Θ is below it'}). "
               f"Counted in estimated prefill FLOPs the searched Θ costs {flops:.3f} of the full model against "
               f"{best_corner['tokens']['prefill_flops_ratio']:.3f} for {best_corner['config']}")
    if best_cheaper is not None:
        verdict += (f"; the best baseline at no more FLOPs than the searched Θ is {best_cheaper['config']} with "
                    f"{best_cheaper['accuracy']:.3f} at {best_cheaper['tokens']['prefill_flops_ratio']:.3f} "
                    f"({'the searched Θ matches or beats it' if eos['accuracy'] >= best_cheaper['accuracy'] else 'above the searched Θ'})")
    summary["verdict"] = verdict
    with open(os.path.join(args.output, "demo_results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    moved = ", ".join(str(p["layer"]) for p in params if p["moved"]) or "none"
    md = (f"# `{summary['command']}`\n\n{rows[0]['answers']} held-out questions (eval split, seed {args.seed}); "
          f"{n} visual tokens, {L} decoder layers; search: {result.step} steps at budget {args.budget}, "
          f"{summary['search_seconds']} s; {seconds} s in all on {summary['threads']} thread(s).\n\n"
          f"{markdown_table(rows)}\n\n{verdict}.\n\n"
          f"## Where the search ended (value at the first step -> at the end; layers that moved: {moved})\n\n"
          f"{format_parameters(params, markdown=True)}\n\n"
          f"Searched Θ: `{json.dumps(searched.to_dict()['reducers'])}`\n")
    with open(os.path.join(args.output, "demo_results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(format_table(rows))
    print()
    print(verdict)
    print(f"\nsearch parameters (first step -> end); layers that moved: {moved}")
    print(format_parameters(params))
    print(f"\neos-search --demo: {seconds} s; results in {os.path.join(args.output, 'demo_results.md')}")
    return summary


def main(argv=None) -> int:
    from eos_kernels.search.cli import check_output_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    try:
        check_output_dir(args.output)  # before the model is loaded
        run_demo(args)
    except (FileNotFoundError, ValueError) as exc:  # no trained checkpoint in this installation, bad options
        print(f"eos-search --demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
