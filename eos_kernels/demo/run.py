"""``eos-search --demo``: the whole method on a laptop CPU, no GPU and no download -- or on your model and data.

By default on the shipped demo model (:mod:`eos_kernels.demo.build`, 8
decoder layers, 64 visual tokens, one per grid cell) and the synthetic task
(:mod:`eos_kernels.demo.task`). ``--model DIR`` runs the same comparison on
any supported checkpoint (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, InternVL, Gemma 3: the class from its config), ``--data SEARCH.json
--eval-data HELDOUT.json`` on your own LLaVA-format data instead of the
synthetic task (prompts rendered with the checkpoint's chat template, as
``eos-search`` does). The driver:

1. writes a search split and a held-out eval split (deterministic by seed),
   unless ``--data`` / ``--eval-data`` are given;
2. runs the differentiable search (:func:`eos_kernels.search.run`, progress
   bar) at an aggressive budget: ``--budget`` visual tokens leave the last
   layer (default 8, 1/8 of the demo model's 64);
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
   For each: accuracy (greedy generation, exact match after normalisation),
   the token report (final, mean leaving, mean processed, prefill FLOPs
   ratio) and the measured prefill time;
4. prints the table and where each layer's gate, discard and operator
   parameters started and ended; writes ``demo_results.json`` /
   ``demo_results.md`` and ``accuracy_vs_tokens.png`` beside the search's
   ``theta.json``, ``log.jsonl``, ``trajectories.png``, ``profile.png`` and
   ``loss.png``.

Where images give different visual counts (LLaVA-NeXT, LLaVA-OneVision,
Qwen2(.5)-VL), budgets and the token report are at N0 = the held-out images'
mean count, and every reducing Θ is deployed as fractions of its schedule at
N0 (:meth:`Theta.as_fractions`), so each image keeps the same share of its
own tokens; the search exports fractions there too.
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
#: the search's settings tuned for the built-in model (300 steps in ~1 min on 2 CPU cores); a --model checkpoint
#: gets eos-search's own defaults (the paper's table 5) for what is not given
_DEMO_SEARCH = {"steps": 300, "batch_size": 8, "lr": 2e-2, "local_moves_every": 20}


def _search_defaults() -> dict:
    from eos_kernels.search.config import SearchConfig

    d = SearchConfig()
    return {key: getattr(d, key) for key in _DEMO_SEARCH}
_OPS = ("gamma", "tau", "theta", "rho", "nu")
#: what the demo writes beside the search's files (the synthetic splits in data/ are regenerated, not results)
_RESULT_FILES = ("demo_results.json", "demo_results.md", "accuracy_vs_tokens.png")


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
    search = _search_defaults()
    p = argparse.ArgumentParser(prog="eos-search --demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", default="eos-demo-output", help="output folder (default: eos-demo-output)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --output (without it the demo refuses to write "
                        "over any file)")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="local Hugging Face checkpoint of any supported family (default: the built-in demo model)")
    p.add_argument("--data", metavar="JSON", default=None,
                   help="LLaVA-format search split (with --eval-data; default: the synthetic task)")
    p.add_argument("--eval-data", metavar="JSON", default=None, help="LLaVA-format held-out split (with --data)")
    p.add_argument("--image-folder", metavar="DIR", default=None,
                   help="folder the image paths of --data/--eval-data are relative to (default: each file's folder)")
    p.add_argument("--budget", type=int, default=None,
                   help=f"final visual tokens (built-in model: default {DEMO_BUDGET}; required with --model)")
    p.add_argument("--second-budget", type=int, default=None,
                   help=f"second evaluation budget, the searched Θ rescaled (default {SECOND_BUDGET} on the built-in "
                        "model, else twice --budget, at most the visual tokens)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"search steps (default {_DEMO_SEARCH['steps']} on the built-in model, else eos-search's "
                        f"{search['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"search batch (default {_DEMO_SEARCH['batch_size']}, else eos-search's "
                        f"{search['batch_size']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"search learning rate (default {_DEMO_SEARCH['lr']:g}, else eos-search's "
                        f"{search['lr']:g})")
    p.add_argument("--local-moves-every", type=int, default=None,
                   help="local moves of the search every N steps (eos_kernels.search, decision 6; 0: off; default "
                        f"{_DEMO_SEARCH['local_moves_every']} on the built-in model, else eos-search's "
                        f"{search['local_moves_every']})")
    p.add_argument("--search-images", type=int, default=None,
                   help="images of the synthetic search split (default 400; not with --data)")
    p.add_argument("--eval-images", type=int, default=None,
                   help="held-out questions of the synthetic task (default 500; not with --eval-data)")
    p.add_argument("--eval-batch-size", type=int, default=50, help="held-out evaluation batch (default 50)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated answer tokens (default: 3 on the synthetic task, eos-search's default on --data)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--impl", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--device", default="auto",
                   help="device of a --model checkpoint: auto (default: CUDA if there is one), cpu, cuda, cuda:N; "
                        "the built-in model runs on the CPU")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights of a --model checkpoint (default auto: bfloat16 on CUDA, float32 on the CPU); "
                        "the built-in model runs in float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


# ----------------------------------------------------------------------------- measurements
@torch.no_grad()
def prefill_seconds(model, data, theta: Theta, batch_size: int = 50, batches: int = 2, repeats: int = 3) -> float:
    """Median wall time of one prefill forward (prompt only, ``logits_to_keep=1``) per prompt, in seconds
    (any supported family; CUDA synchronised)."""
    from eos_kernels.integrations.auto import adapter_for
    from eos_kernels.patching import patch_model, unpatch_model
    from eos_kernels.search.objective import forward_inputs

    param = next(model.parameters())
    device, dtype = param.device, param.dtype

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def to(v):
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)

    items = [(i, 0) for i in range(min(len(data), batch_size * batches))]
    chunks = []
    for s in range(0, len(items), batch_size):
        ids, mask, px, extra = data.prompt_batch(items[s:s + batch_size], with_image_inputs=True)
        chunks.append(forward_inputs(model, None, input_ids=ids.to(device), attention_mask=mask.to(device),
                                     pixel_values=to(px), image_inputs={k: to(v) for k, v in extra.items()}))
    patch_model(model, theta, adapter_for(model))
    try:
        model(**chunks[0], use_cache=False, logits_to_keep=1)  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for inputs in chunks:
                model(**inputs, use_cache=False, logits_to_keep=1)
            sync()
            times.append((time.perf_counter() - t0) / len(items))
    finally:
        unpatch_model(model)
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
        keep = r["keep"]
        keep = f"{keep:.3g}" if isinstance(keep, float) else str(keep)
        body.append((str(r["layer"]), f"yes ({keep})" if r["reducer"] else "no", pair(r["g"]), pair(r["c"]),
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
def _load_model(args):
    """``(model, processor)``: the built-in demo model, or ``--model`` on ``--device`` in ``--dtype``."""
    if args.model is None:
        from eos_kernels.demo import build

        return build.load_demo_model()
    from eos_kernels.search.model_loading import load_model, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model, processor = load_model(args.model, device, resolve_dtype(args.dtype, device))
    return model.eval(), processor


def _check_options(args) -> None:
    """Every option's range, before anything is loaded or searched (ValueError naming the flag)."""
    for flag, key, low in (("--budget", "budget", 1), ("--second-budget", "second_budget", 1),
                           ("--steps", "steps", 1), ("--batch-size", "batch_size", 1),
                           ("--local-moves-every", "local_moves_every", 0), ("--eval-batch-size", "eval_batch_size", 1),
                           ("--max-new-tokens", "max_new_tokens", 1), ("--threads", "threads", 1),
                           ("--search-images", "search_images", 1), ("--eval-images", "eval_images", 1)):
        value = getattr(args, key)
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.image_folder is not None and args.data is None:
        raise ValueError("--image-folder applies to --data / --eval-data (the synthetic task writes its own images)")


def _splits(args) -> tuple[str, str, bool]:
    """``(search JSON, held-out JSON, synthetic?)``: ``--data``/``--eval-data``, else the synthetic task's."""
    from eos_kernels.demo import task

    if (args.data is None) != (args.eval_data is None):
        raise ValueError("--data and --eval-data go together (a search split and a held-out split)")
    if args.data is not None:
        if args.search_images is not None or args.eval_images is not None:
            raise ValueError("--search-images / --eval-images size the synthetic task; with --data / --eval-data "
                             "the files decide")
        for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag}: no such file: {path}")
        return args.data, args.eval_data, False
    data = os.path.join(args.output, "data")
    return (task.generate_split(data, "search", 400 if args.search_images is None else args.search_images, args.seed),
            task.generate_split(data, "eval", 500 if args.eval_images is None else args.eval_images, args.seed), True)


def _resolve_defaults(args, n: int) -> None:
    """Fill the options left unset: the demo's tuned search and budgets on the built-in model; on a --model
    checkpoint eos-search's defaults, --budget required and the second budget twice it (at most ``n``)."""
    builtin = args.model is None
    if args.budget is None:
        if not builtin:
            raise ValueError(f"--model needs --budget (final visual tokens; this model's images give {n})")
        args.budget = DEMO_BUDGET
    if args.second_budget is None:
        args.second_budget = SECOND_BUDGET if builtin else min(n, 2 * args.budget)
    for key, value in (_DEMO_SEARCH if builtin else _search_defaults()).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def run_demo(args) -> dict:
    from eos_kernels.integrations.auto import adapter_for
    from eos_kernels.search import SearchConfig, evaluate, run
    from eos_kernels.search.config import scale_init_layers
    from eos_kernels.search.data import load_dataset
    from eos_kernels.search.evaluate import _reference_count

    _check_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    search_json, eval_json, synthetic = _splits(args)  # before the model: a missing file fails fast
    model, processor = _load_model(args)
    adapter = adapter_for(model)
    L = adapter.num_layers(model)
    fixed = adapter.visual_tokens_per_image(model)  # None: each image its own count
    held = load_dataset(eval_json, processor, num_visual_tokens=fixed, image_token_id=model.config.image_token_id,
                        image_folder=args.image_folder)
    n = _reference_count(held)  # the fixed count, else the held-out images' mean
    varying = fixed is None
    _resolve_defaults(args, n)
    if not 1 <= args.budget <= n or not 1 <= args.second_budget <= n:
        raise ValueError(f"--budget and --second-budget must be in 1..{n}, the visual tokens per image"
                         + (" (the held-out images' mean)" if varying else "")
                         + f"; got {args.budget} and {args.second_budget}")

    # 1. the search
    config = SearchConfig(data=search_json, image_folder=args.image_folder, output=args.output, budget=args.budget,
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, impl=args.impl,
                          progress=args.progress, overwrite=args.overwrite, checkpoint_every=0,
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
    if varying:  # each image keeps the share of its own tokens that the schedule keeps at N0
        configs = [(fam, b, th.as_fractions(n)) for fam, b, th in configs]

    # 3. held-out evaluation (+ measured prefill time)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (
        3 if synthetic else SearchConfig().max_new_tokens)
    eval_cfg = SearchConfig(data=eval_json, image_folder=args.image_folder, output=args.output, budget=args.budget,
                            max_new_tokens=max_new, batch_size=args.eval_batch_size, impl=args.impl)
    rows = []
    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configs), desc="held-out evaluation", dynamic_ncols=True)
    for fam, b, theta in configs:
        r = evaluate(eval_cfg, [theta], model=model, processor=processor, dataset=held, write=False)["results"][0]
        rows.append({"config": theta.name, "family": fam, "budget": b, "accuracy": r["accuracy"],
                     "correct": r["correct"], "answers": r["answers"], "answer_ce": r["answer_ce"],
                     "tokens": r["tokens"], "measured_final": r["measured_final"],
                     "prefill_ms": 1000 * prefill_seconds(model, held, theta, batch_size=args.eval_batch_size),
                     "theta_config": r["theta_config"]})
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
        "model": os.path.abspath(args.model) if args.model else "built-in demo model",
        "model_class": type(model).__name__,
        "data": {"search": os.path.abspath(search_json), "eval": os.path.abspath(eval_json), "synthetic": synthetic},
        "budget": args.budget, "second_budget": args.second_budget, "num_visual_tokens": n, "num_layers": L,
        "visual_tokens_vary": varying, "held_out_visual_counts": sorted(set(held.visual_counts)),
        "search_steps": result.step, "search_lr": args.lr, "search_batch_size": args.batch_size,
        "search_local_moves_every": args.local_moves_every,
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
    counts = (f"{n} visual tokens per image (the held-out images' mean; Θ deployed as fractions of the schedule "
              f"at {n})" if varying else f"{n} visual tokens")
    split = f"eval split, seed {args.seed}" if synthetic else os.path.basename(eval_json)
    md = (f"# `{summary['command']}`\n\n{summary['model_class']} ({summary['model']}); "
          f"{rows[0]['answers']} held-out questions ({split}); "
          f"{counts}, {L} decoder layers; search: {result.step} steps at budget {args.budget}, "
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
    from eos_kernels.search.output import output_dir, refuse_to_replace, search_files

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    try:
        with output_dir(args.output):  # before the model is loaded; removed again if the demo fails and it is empty
            if not args.overwrite:
                refuse_to_replace(args.output, search_files() + _RESULT_FILES, "the demo")
            run_demo(args)
    except (FileNotFoundError, ValueError) as exc:  # no trained checkpoint in this installation, bad options
        print(f"eos-search --demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
