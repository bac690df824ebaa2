"""Command line: ``python -m eos_kernels check``."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eos_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="check the unified operator against the corner operators "
                                 "(paper appendix B, listing 3) for every available implementation")
    args = parser.parse_args(argv)
    if args.command == "check":
        from eos_kernels.check import run_check

        return run_check()
    return 2


if __name__ == "__main__":
    sys.exit(main())
