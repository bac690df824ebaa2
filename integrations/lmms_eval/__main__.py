"""``python -m eos_kernels.integrations.lmms_eval``: the paths the lmms-eval commands need, and the budget table.

    --tasks-dir         the folder of the shipped tasks (lmms-eval's --include_path)
    --demo-checkpoint   the shipped demo model (pretrained= for the eos_demo task)
    --table RESULTS     each task's scores in an lmms-eval results file with the budget that produced them
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eos_kernels.integrations.lmms_eval",
                                description="Paths for lmms-eval's eos model, and its results with their budget.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tasks-dir", action="store_true", help="print the folder of the shipped lmms-eval tasks")
    g.add_argument("--demo-checkpoint", action="store_true", help="print the shipped demo model's folder")
    g.add_argument("--table", metavar="RESULTS_JSON", help="print each task's scores with its token budget")
    args = p.parse_args(argv)
    if args.tasks_dir:
        from eos_kernels.integrations.lmms_eval import TASKS_DIR

        print(TASKS_DIR)
    elif args.demo_checkpoint:
        from eos_kernels.integrations.lmms_eval import demo_checkpoint

        print(demo_checkpoint())
    else:
        from eos_kernels.integrations.lmms_eval.budget import format_results

        try:
            print(format_results(args.table))
        except (OSError, ValueError) as exc:
            print(f"error: {args.table}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
