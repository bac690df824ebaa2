"""``eos-search --demo``: the search against tuned baselines at matched cost, on a laptop CPU -- or on your model.

By default on the shipped demo model (:mod:`eos_kernels.demo.build`, 8
decoder layers, 64 visual tokens, one per grid cell) and the synthetic task
(:mod:`eos_kernels.demo.task`). ``--model DIR`` runs the same comparison on
any supported checkpoint (the class from its config), ``--data SEARCH.json
--eval-data HELDOUT.json`` on your own LLaVA-format data. The driver:

1. writes a search split and a held-out split (deterministic by seed) unless
   ``--data`` / ``--eval-data`` are given;
2. runs the search (:func:`eos_kernels.search.run`, gradient only, eos-search's
   default forward) once per budget of the grid (``--budgets``; built-in model:
   4, 8, 16, 32 final visual tokens of 64), each into ``searches/B<budget>/``;
3. tunes every baseline family (:mod:`eos_kernels.demo.baselines`: FastV at
   each layer; SparseVLM-style, merge and pool schedules at every set of one to
   three layers) on the *search* split: one exact-match score per placement
   (:mod:`eos_kernels.search.scoring`);
4. scores on the *held-out* split, once each: the full model, each searched Θ,
   the searched layers and counts with the prune corner (what the operator
   adds), each family's matched baseline (its best tuned placement at no more
   final tokens and estimated prefill FLOPs than the searched Θ) and each
   family's tuning frontier (:mod:`eos_kernels.demo.compare`);
5. reports, per budget, the table (held-out accuracy, tuning accuracy, token
   counts, the FLOPs ratio of ``Theta.token_report``, the measured prefill time:
   warm-up first, then the median of repeats) and which baselines the searched Θ
   dominates (higher accuracy at no more FLOPs) and which dominate it; a plot of
   held-out accuracy against FLOPs with each family's frontier; every reported Θ
   in ``thetas/<name>.json``, named as in the tables; ``demo_results.{json,md}``.

Where images give different visual counts (LLaVA-NeXT, LLaVA-OneVision,
Qwen2(.5)-VL, InternVL), budgets and the token report are at N0 = the held-out
images' mean count, and every reducing Θ is deployed as fractions of its
schedule at N0 (:meth:`Theta.as_fractions`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from eos_kernels.demo.baselines import FAMILIES, Candidate, placements, prune_at, tune
from eos_kernels.theta import Theta

__all__ = ["main", "build_parser", "run_demo", "prefill_seconds", "FAMILIES", "DEMO_BUDGETS", "QUICK_BUDGETS"]

#: the budget grid on the built-in model (final visual tokens of its 64), and the --quick one
DEMO_BUDGETS = (4, 8, 16, 32)
QUICK_BUDGETS = (8, 16)
#: the search's settings on the built-in model (eos-search's own defaults on a --model checkpoint)
_DEMO_SEARCH = {"steps": 200, "batch_size": 8, "lr": 3e-2}
_QUICK_SEARCH = {"steps": 80, "batch_size": 8, "lr": 5e-2}
#: search split questions that tune the baselines, and held-out questions (built-in model; --quick)
_SIZES = {"tune": 200, "search_images": 400, "eval_images": 500}
#: the first round of the baselines' successive halving: every placement on this many tuning questions
_FIRST_ROUND = 50
_QUICK_SIZES = {"tune": 100, "search_images": 200, "eval_images": 200}
#: what the demo writes beside the searches (the synthetic splits in data/ are regenerated inputs, not results)
_RESULT_FILES = ("demo_results.json", "demo_results.md", "accuracy_vs_flops.png", "searches", "thetas")
#: the other searches --compare-searches runs at each budget: the paper's hard forward, with and without local moves
_VARIANTS = {"paper-search": {"search_forward": "hard", "local_moves_every": 0},
             "paper+local-moves": {"search_forward": "hard", "local_moves_every": 20}}


def _search_defaults() -> dict:
    from eos_kernels.search.config import SearchConfig

    d = SearchConfig()
    return {key: getattr(d, key) for key in _DEMO_SEARCH}


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
    p.add_argument("--budgets", type=int, nargs="+", default=None, metavar="B",
                   help=f"final visual tokens to search and compare at (built-in model: {' '.join(map(str, DEMO_BUDGETS))};"
                        f" --quick: {' '.join(map(str, QUICK_BUDGETS))}; with --model give --budgets or --budget)")
    p.add_argument("--budget", type=int, default=None, help="a budget (joins --budgets)")
    p.add_argument("--second-budget", type=int, default=None, help="another budget (joins --budgets)")
    p.add_argument("--quick", action="store_true",
                   help="built-in model: budgets 8 and 16, shorter searches, fewer questions (a few minutes); the "
                        "README's table comes from the full run")
    p.add_argument("--steps", type=int, default=None,
                   help=f"search steps per budget (built-in model: {_DEMO_SEARCH['steps']}, --quick "
                        f"{_QUICK_SEARCH['steps']}; else eos-search's {search['steps']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"search batch (built-in model: {_DEMO_SEARCH['batch_size']}, else eos-search's "
                        f"{search['batch_size']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"search learning rate (built-in model: {_DEMO_SEARCH['lr']:g}, --quick "
                        f"{_QUICK_SEARCH['lr']:g}; else eos-search's {search['lr']:g})")
    p.add_argument("--search-forward", choices=("relaxed", "hard"), default="relaxed",
                   help="the searched Θ's forward (eos_kernels.search: relaxed, the default, or the paper's hard one)")
    p.add_argument("--local-moves-every", type=int, default=0,
                   help="local moves of a hard search every N steps (decision 6; default 0: off, gradient only)")
    p.add_argument("--compare-searches", action="store_true",
                   help="also run the paper's hard search, gradient only and with local moves every 20 steps, at "
                        "each budget, and report them beside the default search")
    p.add_argument("--search-images", type=int, default=None,
                   help=f"images of the synthetic search split (default {_SIZES['search_images']}; not with --data)")
    p.add_argument("--eval-images", type=int, default=None,
                   help=f"held-out questions of the synthetic task (default {_SIZES['eval_images']}; not with "
                        "--eval-data)")
    p.add_argument("--tune-questions", type=int, default=None,
                   help=f"search-split questions that tune the baselines (default {_SIZES['tune']}, at most the split)")
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
    p.add_argument("--workers", type=int, default=None,
                   help="processes that run the searches and evaluations (one torch thread each; default: 2 on a "
                        "CPU with 2+ cores for the built-in model, else 1, in this process)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


# ----------------------------------------------------------------------------- measurements
@torch.no_grad()
def prefill_seconds(model, data, theta: Theta, batch_size: int = 50, batches: int = 1, repeats: int = 5) -> float:
    """Median wall time of one prefill forward (prompt only, ``logits_to_keep=1``) per prompt, in seconds, after a
    warm-up forward of the same configuration (any supported family; CUDA synchronised)."""
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
        for inputs in chunks:  # warm-up: allocations and lazy initialisation stay out of the measurement
            model(**inputs, use_cache=False, logits_to_keep=1)
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


# ----------------------------------------------------------------------------- options
def _check_options(args) -> None:
    """Every option's range, before anything is loaded or searched (ValueError naming the flag)."""
    for flag, key, low in (("--budget", "budget", 1), ("--second-budget", "second_budget", 1),
                           ("--steps", "steps", 1), ("--batch-size", "batch_size", 1),
                           ("--local-moves-every", "local_moves_every", 0), ("--eval-batch-size", "eval_batch_size", 1),
                           ("--max-new-tokens", "max_new_tokens", 1), ("--threads", "threads", 1),
                           ("--workers", "workers", 1), ("--tune-questions", "tune_questions", 1),
                           ("--search-images", "search_images", 1), ("--eval-images", "eval_images", 1)):
        value = getattr(args, key)
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    for b in args.budgets or ():
        if b < 1:
            raise ValueError(f"--budgets must be >= 1, got {b}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.image_folder is not None and args.data is None:
        raise ValueError("--image-folder applies to --data / --eval-data (the synthetic task writes its own images)")
    if args.local_moves_every and args.search_forward != "hard":
        raise ValueError("--local-moves-every needs --search-forward hard (the local moves probe the paper's hard "
                         "forward)")
    if args.quick and args.model is not None:
        raise ValueError("--quick sizes the built-in demo; with --model give --budgets, --steps and your data")


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
    sizes = _QUICK_SIZES if args.quick else _SIZES
    data = os.path.join(args.output, "data")
    return (task.generate_split(data, "search", args.search_images or sizes["search_images"], args.seed),
            task.generate_split(data, "eval", args.eval_images or sizes["eval_images"], args.seed), True)


def _resolve_defaults(args, n: int) -> None:
    """Fill what is unset: the budget grid and the search settings (the built-in model's, else eos-search's)."""
    builtin = args.model is None
    given = list(args.budgets or []) + [b for b in (args.budget, args.second_budget) if b is not None]
    if not given:
        if not builtin:
            raise ValueError(f"--model needs --budgets or --budget (final visual tokens; this model's images "
                             f"give {n})")
        given = list(QUICK_BUDGETS if args.quick else DEMO_BUDGETS)
    args.budgets = sorted(set(given))
    defaults = (_QUICK_SEARCH if args.quick else _DEMO_SEARCH) if builtin else _search_defaults()
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        from eos_kernels.demo.workers import cpu_workers

        args.workers = cpu_workers() if builtin else 1


# ----------------------------------------------------------------------------- the demo
def run_demo(args) -> dict:
    from eos_kernels.demo.workers import Jobs, Setup
    from eos_kernels.integrations.auto import adapter_for

    _check_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    search_json, eval_json, synthetic = _splits(args)  # before the model: a missing file fails fast
    model, processor = _load_model(args)
    adapter = adapter_for(model)
    L = adapter.num_layers(model)
    fixed = adapter.visual_tokens_per_image(model)  # None: each image its own count
    varying = fixed is None
    _resolve_defaults(args, "a varying number of" if varying else fixed)
    setup = Setup(model=args.model, device=args.device, dtype=args.dtype, search_json=search_json, eval_json=eval_json,
                  image_folder=args.image_folder, impl=args.impl)
    jobs = Jobs(setup, args.workers, model=model, processor=processor)
    try:
        return _run(args, jobs, model, adapter, L, varying, synthetic, search_json, eval_json, t0)
    finally:
        jobs.close()


def _run(args, jobs, model, adapter, L, varying, synthetic, search_json, eval_json, t0) -> dict:
    from tqdm.auto import tqdm

    from eos_kernels.demo import compare, report
    from eos_kernels.search.config import SearchConfig
    from eos_kernels.search.evaluate import _reference_count, model_sizes

    state = jobs.state
    held, search_data = state["held"], state["search"]
    n = _reference_count(held)  # the fixed count, else the held-out images' mean
    for b in args.budgets:
        if not 1 <= b < n:
            raise ValueError(f"--budgets must be in 1..{n - 1}, fewer than the visual tokens per image"
                             + (" (the held-out images' mean)" if varying else "") + f"; got {b}")
    sizes = model_sizes(model, adapter)  # as evaluate's token report counts them
    prompt_text = [e.prompt_length - e.num_visual_tokens for e in held.examples]
    text = int(round(sum(prompt_text) / len(prompt_text)))

    def deploy(theta: Theta) -> Theta:  # each image keeps the share of its own tokens the schedule keeps at N0
        return theta.as_fractions(n) if varying and len(theta) else theta

    def candidate(name, family, budget, theta) -> Candidate:
        theta = Theta(theta.reducers, name=name)
        return Candidate(name, family, budget, deploy(theta),
                         theta.token_report(n, L, text, **sizes)["prefill_flops_ratio"])

    bar = (lambda total, desc: tqdm(total=total, desc=desc, dynamic_ncols=True)) if args.progress else None

    def tick(b):
        return (lambda _: b.update(1)) if b is not None else None

    # 1. the searches, one per budget (and the paper's variants with --compare-searches)
    plan = [("eos-searched", b, {}) for b in args.budgets]
    if args.compare_searches:
        plan += [(name, b, over) for b in args.budgets for name, over in _VARIANTS.items()]
    configs = []
    for name, b, over in plan:
        sub = os.path.join(args.output, "searches", f"{name}-B{b}")
        cfg = SearchConfig(data=search_json, image_folder=args.image_folder, output=sub, budget=b, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, impl=args.impl,
                           progress=False, overwrite=args.overwrite, checkpoint_every=0,
                           search_forward=over.get("search_forward", args.search_forward),
                           local_moves_every=over.get("local_moves_every", args.local_moves_every))
        configs.append(cfg.to_dict())
    b_ = bar(len(configs), "searches") if bar else None
    t_search = time.time()
    results = jobs.search(configs, progress=tick(b_))
    if b_ is not None:
        b_.close()
    t_search = time.time() - t_search
    searched, extra, search_info = {}, [], {}
    for (name, b, _), res in zip(plan, results):
        theta = Theta.from_dict(res["theta"])
        rescaled = False
        final = theta.token_report(n, L)["final"] if len(theta) else n
        if final > b:  # the one-sided budget penalty is soft: deploy at the budget, as the paper rescales
            theta = theta.rescale(b, "final", num_visual_tokens=n, num_layers=L)
            rescaled = True
        c = candidate(f"{name}@{b}", name, b, theta)
        search_info[c.name] = {"log": res["log"], "plots": res["plots"], "steps": res["steps"],
                               "median_step_s": res["step_time"], "rescaled_to_budget": rescaled,
                               "parameters": res["parameters"], "searched_theta": res["theta"]}
        if name == "eos-searched":
            searched[b] = c
        else:
            extra.append(c)
    prunes = {b: candidate(f"prune-at-searched@{b}", "prune-at-searched", b, prune_at(s.theta, n, "p"))
              if len(s.theta) else None for b, s in searched.items()}

    # 2. tuning on the search split
    baselines = [candidate(t.name, fam, b, t) for b in args.budgets for fam in FAMILIES
                 for t in placements(fam, b, n, L)]
    sizes_ = _QUICK_SIZES if args.quick else _SIZES
    tune_n = min(len(search_data), args.tune_questions or sizes_["tune"])
    first = min(tune_n, _FIRST_ROUND)
    b_ = bar(None, f"tuning {len(baselines)} baselines") if bar else None
    t_tune = time.time()

    def score(cands, questions):
        return jobs.tune([c.theta.to_dict() for c in cands], list(questions), args.eval_batch_size * 2,
                         progress=tick(b_))

    contenders = tune(baselines, score, tune_n, first)
    if b_ is not None:
        b_.close()
    t_tune = time.time() - t_tune
    # the searched Θs are scored on the tuning questions too (a column of the table, not a choice)
    own = list(searched.values()) + [p for p in prunes.values() if p is not None] + extra
    for c, s in zip(own, jobs.tune([c.theta.to_dict() for c in own], list(range(tune_n)), args.eval_batch_size * 2)):
        c.tuning = s

    # 3. the held-out split, once per configuration
    full = Candidate("full", "full", n, Theta(name="full"), 1.0)
    chosen = compare.to_evaluate(contenders, list(searched.values()))
    evaluated = [full] + own + chosen
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (
        3 if synthetic else SearchConfig().max_new_tokens)
    b_ = bar(len(evaluated), "held-out evaluation") if bar else None
    t_eval = time.time()
    for c, r in zip(evaluated, jobs.evaluate([c.theta.to_dict() for c in evaluated], args.eval_batch_size, max_new,
                                             progress=tick(b_))):
        c.heldout = r
    if b_ is not None:
        b_.close()
    t_eval = time.time() - t_eval

    # 4. per-budget comparison and measured prefill times of the table rows
    summaries = []
    for b in args.budgets:
        s = searched[b]
        summaries.append(compare.budget_summary(b, s, prunes[b], contenders,
                                                extra=[e for e in extra if e.budget == b]))
    table_names = ["full"]
    for s in summaries:
        table_names += [s["searched"]] + [e for e in s["extra"]] + ([s["prune_at_searched"]] if s["prune_at_searched"]
                                                                     else [])
        table_names += [m for m in s["matched"].values() if m is not None]
    by_name = {c.name: c for c in evaluated}
    table_names = list(dict.fromkeys(table_names))
    prefill_ms = {}
    b_ = bar(len(table_names), "prefill timing") if bar else None
    prefill_seconds(model, held, Theta(name="warm-up"), batch_size=args.eval_batch_size)  # the process's first forward
    for name in table_names:
        prefill_ms[name] = 1000 * prefill_seconds(model, held, by_name[name].theta, batch_size=args.eval_batch_size)
        if b_ is not None:
            b_.update(1)
    if b_ is not None:
        b_.close()

    # 5. outputs
    accuracy = {c.name: c.heldout["accuracy"] for c in evaluated}
    rows = [report.row(c, prefill_ms.get(c.name)) for c in evaluated]
    report.write_thetas(args.output, evaluated)
    plot = report.plot_frontiers(chosen, list(searched.values()), accuracy["full"],
                                 os.path.join(args.output, "accuracy_vs_flops.png"), extra=extra)
    seconds = round(time.time() - t0, 1)
    argv = [a for a in (getattr(args, "_argv", None) or []) if a != "--demo"]
    summary = {
        "command": " ".join(["eos-search", "--demo"] + argv), "seconds": seconds,
        "stage_seconds": {"searches": round(t_search, 1), "tuning": round(t_tune, 1), "held_out": round(t_eval, 1)},
        "model": os.path.abspath(args.model) if args.model else "built-in demo model",
        "model_class": type(model).__name__, "workers": args.workers, "threads": torch.get_num_threads(),
        "data": {"search": os.path.abspath(search_json), "eval": os.path.abspath(eval_json), "synthetic": synthetic},
        "budgets": args.budgets, "num_visual_tokens": n, "num_layers": L, "text_tokens": text,
        "visual_tokens_vary": varying, "held_out_visual_counts": sorted(set(held.visual_counts)),
        "search": {"forward": args.search_forward, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                   "local_moves_every": args.local_moves_every, "compare_searches": args.compare_searches},
        "tuning_questions": tune_n, "tuning_first_round": first, "eval_questions": rows[0]["answers"],
        "baselines_tuned": len(baselines), "baselines_second_round": len(contenders),
        "searches": search_info, "comparison": summaries, "results": rows,
        "plots": [plot] + [p for info in search_info.values() for p in info["plots"]],
    }
    with open(os.path.join(args.output, "demo_results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    md = report.markdown(summary, rows, summaries, accuracy, varying, synthetic, eval_json)
    with open(os.path.join(args.output, "demo_results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    table_rows = [r for r in rows if r["config"] in table_names]
    print(report.format_table(table_rows))
    print()
    for s in summaries:
        print(report.verdict(s, accuracy))
    print(f"\neos-search --demo: {seconds} s; results in {os.path.join(args.output, 'demo_results.md')}")
    return summary


def _load_model(args):
    """``(model, processor)``: the built-in demo model, or ``--model`` on ``--device`` in ``--dtype``."""
    if args.model is None:
        from eos_kernels.demo import build

        return build.load_demo_model()
    from eos_kernels.search.model_loading import load_model, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model, processor = load_model(args.model, device, resolve_dtype(args.dtype, device))
    return model.eval(), processor


def main(argv=None) -> int:
    from eos_kernels.search.output import output_dir, refuse_to_replace

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    try:
        with output_dir(args.output):  # before the model is loaded; removed again if the demo fails and it is empty
            if not args.overwrite:  # the synthetic splits too, unless the user's own data are given
                refuse_to_replace(args.output, _RESULT_FILES + (("data",) if args.data is None else ()), "the demo")
            run_demo(args)
    except (FileNotFoundError, ValueError) as exc:  # no trained checkpoint in this installation, bad options
        print(f"eos-search --demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
