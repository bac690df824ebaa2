"""``python -m eos_kernels.search`` == ``eos-search``."""
import sys

from eos_kernels.search.cli import main

sys.exit(main())
