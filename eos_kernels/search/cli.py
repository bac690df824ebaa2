"""``eos-search``: the command line of :func:`eos_kernels.search.run` and :func:`eos_kernels.search.evaluate`.

Every option is a field of :class:`~eos_kernels.search.config.SearchConfig`;
``--config FILE`` (YAML or JSON) sets any of them, options given on the
command line override the file. ``--eval THETA [...]`` evaluates instead of
searching. Also ``python -m eos_kernels.search``. Under
``torchrun --nproc_per_node=N`` the same command runs data-parallel.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from eos_kernels.search.config import DTYPES, FORWARDS, GATE_ESTIMATORS, IMPLS, SearchConfig
from eos_kernels.search.output import output_dir

__all__ = ["main", "build_parser"]


def _bool_flag(parser, name, help_on, help_off, dest):
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=dest, action="store_const", const=True, help=help_on)
    group.add_argument(f"--no-{name}", dest=dest, action="store_const", const=False, help=help_off)


def build_parser() -> argparse.ArgumentParser:
    d = SearchConfig()
    p = argparse.ArgumentParser(
        prog="eos-search",
        description="Differentiable EOS search on a frozen Hugging Face vision-language model (LLaVA-1.5, "
                    "LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, Gemma 3; paper §2.4-2.6), "
                    "or, with "
                    "--eval, accuracy and token accounting of Θ configurations on a held-out split.",
        epilog="Built-in demo on the CPU, no download: eos-search --demo (options: eos-search --demo --help; "
               "--demo --model DIR [--data S.json --eval-data H.json] compares on your model and data). "
               "Outputs in --output: theta.json, search_state.pt, log.jsonl, trajectories.png, profile.png, "
               "loss.png (eval: eval.json). Multi-GPU: torchrun --nproc_per_node=N -m eos_kernels.search ...",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file setting any option below "
                   "(keys are option names); the command line overrides it")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (model + processor) of a "
                   "supported family; the class comes from its config")
    g.add_argument("--data", metavar="JSON", help="LLaVA-format JSON, prompts rendered with the checkpoint's "
                   "chat template (with --eval: the held-out split)")
    g.add_argument("--image-folder", metavar="DIR", help="folder the image paths are relative to "
                   "(default: the data file's folder)")
    g.add_argument("--output", metavar="DIR", help=f"output folder (default: {d.output})")
    g = p.add_argument_group("objective (equations 13-14)")
    g.add_argument("--budget", type=float, metavar="B", help="target visual tokens leaving the last layer (required)")
    g.add_argument("--max-reducers", type=int, metavar="C", help=f"most active reduction layers (default {d.max_reducers})")
    g.add_argument("--lambda-ce", type=float, help=f"weight of the answer cross-entropy (default {d.lambda_ce})")
    g.add_argument("--lambda-align", type=float, help=f"λ_a, hidden-state alignment (default {d.lambda_align})")
    g.add_argument("--lambda-budget", type=float, help=f"λ_b, budget penalty (default {d.lambda_budget})")
    g.add_argument("--lambda-layers", type=float, help=f"λ_c, active-layer penalty (default {d.lambda_layers})")
    g.add_argument("--max-flops", metavar="R|auto|none", help="cap on the estimated prefill FLOPs ratio of the "
                   "searched Θ (relaxed forward; default auto: the warm start's plus half of what it saves)")
    g.add_argument("--lambda-flops", type=float, help=f"weight of the FLOPs cap (default {d.lambda_flops})")
    g.add_argument("--align-layers", type=int, nargs="+", metavar="L",
                   help="decoder layers (0-indexed) whose outputs are aligned (default: every round(L/8)-th: "
                        "4 8 ... 28 for 32 layers)")
    g = p.add_argument_group("optimisation (table 5)")
    g.add_argument("--steps", type=int, help=f"search steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, help=f"global batch, split across processes (default {d.batch_size})")
    g.add_argument("--micro-batch-size", type=int, help="per-process micro-batch (gradient accumulation)")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, help=f"gradient norm clip (default {d.grad_clip})")
    g.add_argument("--warmup-ratio", type=float, help=f"linear warm-up share of the cosine schedule (default {d.warmup_ratio})")
    g.add_argument("--adam-betas", type=float, nargs=2, help="(default 0.9 0.999)")
    g.add_argument("--adam-eps", type=float, help=f"(default {d.adam_eps})")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g = p.add_argument_group("the search forward (eos_kernels.search, decisions 1-2, 7 and 8)")
    g.add_argument("--search-forward", choices=FORWARDS, help="relaxed (default: every layer's keep decision enters "
                   "softly, so the gradient reaches every gate, count and operator) or hard (the paper's)")
    g.add_argument("--gate-estimator", choices=GATE_ESTIMATORS, help="with the relaxed forward: score (default: "
                   "each sample runs a structure drawn from the gates that meets the budget by construction; a gate "
                   "moves by how much better the samples without its layer did) or relaxed (soft gates, the budget "
                   "as a penalty)")
    g.add_argument("--temperature-start", type=float, help=f"soft top-K temperature at the first step, nats of the "
                   f"score (default {d.temperature_start})")
    g.add_argument("--temperature-end", type=float, help=f"... at the last step (default {d.temperature_end})")
    g.add_argument("--sharpen-from", type=float, help=f"share of the relaxed steps after which the gates are "
                   f"binary-concrete samples sharpening towards the deployed 0/1 (default {d.sharpen_from})")
    g.add_argument("--sharpness-end", type=float, help=f"gate temperature λ at the last relaxed step (default "
                   f"{d.sharpness_end})")
    g.add_argument("--hard-finish", type=float, help=f"share of the steps, at the end, on the paper's hard forward "
                   f"with the layers and counts frozen: Ω finishes on the deployed forward (default {d.hard_finish})")
    g = p.add_argument_group("search space and warm start (equations 10-12, §2.6)")
    g.add_argument("--init-layers", type=int, nargs="+", metavar="L",
                   help="reducer slots that start active (default: 2 6 15 scaled to the depth)")
    g.add_argument("--init-gate", type=float, help=f"initial g of the slots (default {d.init_gate})")
    g.add_argument("--off-gate", type=float, help="initial g elsewhere (default 0.01; with --gate-estimator score "
                   "min(0.2, max-reducers / (layers - 1)))")
    g.add_argument("--init-discard", type=float, help="initial c of the slots (default: the chain meets the budget)")
    g.add_argument("--off-discard", type=float, help=f"initial c elsewhere (default {d.off_discard})")
    for name in ("gamma0", "tau0", "theta0", "rho0", "nu0"):
        g.add_argument(f"--{name}", type=float, help=f"(default {getattr(d, name)})")
    g.add_argument("--gate-temperature", type=float, help="T_g (default: 4 with the relaxed forward, 1 with the "
                   "hard one)")
    g.add_argument("--keep-temperature", type=float, help="T_c (default 1)")
    g.add_argument("--alpha", type=float, help=f"α of equation 12, on log-scores (default {d.alpha})")
    g.add_argument("--beta", type=float, help=f"operator gate sharpness β (default {d.beta})")
    g.add_argument("--k-min", type=int, help=f"K_min (default {d.k_min})")
    g.add_argument("--gate-threshold", type=float, help=f"a layer reduces when g > this (default {d.gate_threshold})")
    g.add_argument("--local-moves-every", type=int, metavar="N", help="every N steps try moving each reducer to a "
                   "neighbouring layer and shifting tokens between reducers, keeping the best move that lowers the "
                   "probe-set CE (not in the paper; default 0: off)")
    g.add_argument("--local-moves-samples", type=int, metavar="N",
                   help=f"probe set of the local moves: the first N search examples (default {d.local_moves_samples})")
    g.add_argument("--local-moves-margin", type=float,
                   help=f"CE improvement a move needs, nats per answer token (default {d.local_moves_margin})")
    g.add_argument("--local-moves-factor", type=float,
                   help=f"kept-fraction factor of a token shift (default {d.local_moves_factor})")
    g = p.add_argument_group("execution")
    g.add_argument("--impl", choices=IMPLS, help="operator implementation (default auto: fused Triton on CUDA)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=DTYPES, help="model weights (default auto: bfloat16 on CUDA for the search, "
                   "float16 for --eval, float32 on CPU)")
    _bool_flag(g, "autocast", "bf16 autocast on CUDA (default)", "no autocast", "autocast")
    g.add_argument("--attn-implementation", help="e.g. sdpa, eager, flash_attention_2 (default: the checkpoint's)")
    g = p.add_argument_group("run control")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help=f"steps between checkpoints, 0: only at the end "
                   f"(default {d.checkpoint_every})")
    g.add_argument("--resume", action="store_const", const=True, help="continue the search in --output")
    g.add_argument("--overwrite", action="store_const", const=True, help="replace what --output already holds: "
                   "start a search over, or replace an earlier --eval's eval.json (without it eos-search refuses to "
                   "write over any file)")
    g.add_argument("--stop-after", type=int, metavar="N", help="end this invocation after N steps in total "
                   "(checkpointed; the schedule still spans --steps)")
    _bool_flag(g, "progress", "tqdm progress bar (default)", "no progress bar", "progress")
    _bool_flag(g, "plots", "PNG plots of log.jsonl at the end (default)", "no plots (eos_kernels.search.plots."
               "plot_log draws them later)", "plots")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", nargs="+", metavar="THETA", help="evaluate these Θ (JSON files, 'none', or presets "
                   "sparsevlm-v2-192, paper-64, tome-64, pool-64, fastv-2-0.5, ...) on --data instead of searching")
    g.add_argument("--eval-limit", type=int, metavar="N", help="evaluate the first N records")
    g.add_argument("--max-new-tokens", type=int, help=f"generation length for --eval (default {d.max_new_tokens})")
    return p


def parse_config(argv=None) -> SearchConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    try:
        base = SearchConfig.from_file(config_file) if config_file else SearchConfig()
        return SearchConfig.from_dict(args, base=base, source="command line")
    except ValueError as exc:
        parser.error(str(exc))


def main(argv=None) -> int:
    """Entry point of ``eos-search``; returns the exit status (0 success, 1 failure, 130 interrupted)."""
    from eos_kernels.search.driver import NonFiniteLossError

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo" in argv:  # the built-in demo has its own options (eos-search --demo --help)
        from eos_kernels.demo.run import main as demo_main

        return demo_main(argv)
    config = parse_config(argv)
    try:
        # rank 0 makes --output (before any model loads) and removes it again if it stays empty on a failure
        with output_dir(config.output) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
            if config.eval:
                from eos_kernels.search.evaluate import evaluate, format_table

                out = evaluate(config)
                print(format_table(out["results"]))
                if out["path"]:
                    print(f"eos-search: evaluation written to {out['path']}")
                return 0
            from eos_kernels.search.driver import run

            result = run(config)
    except ValueError as exc:
        print(f"eos-search: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"eos-search: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        state = "finished" if result.completed else "stopped"
        print(f"eos-search: {state} at step {result.step}/{config.steps}; Θ in {result.theta_path}")
        print(result.theta)
        print(json.dumps({k: v for k, v in result.theta.token_report(
            result.space.num_visual_tokens, result.space.num_layers).items()
            if k in ("final", "mean_leaving", "mean_processed")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
