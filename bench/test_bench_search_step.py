"""One search step (forward, alignment reference, backward), ``impl="triton"`` vs ``impl="torch"``.

Placeholder until the search driver exists: the module skips unless
``eos_kernels.search`` is importable (a folder without ``__init__.py`` being
written does not count). When it lands, time one optimisation step of the
search on the LLaVA-7B-shaped model of ``test_bench_e2e.py`` (frozen backbone,
Θ trainable) with the operator's ``impl`` set to "triton" and to "torch",
``benchmark.group = "search step cuda B4"``, ids ``cuda-triton-B4`` /
``cuda-torch-B4`` and ``extra_info`` subject="search", impl, B, device: the
report already pairs them.
"""
import importlib

import pytest

try:
    _search = importlib.import_module("eos_kernels.search")
except Exception:  # ImportError, or a module being written
    _search = None
if _search is None or getattr(_search, "__file__", None) is None:
    pytest.skip("eos_kernels.search is not implemented yet", allow_module_level=True)


def test_search_step(benchmark):
    pytest.skip("eos_kernels.search exists, but this benchmark has not been written against its API yet")
