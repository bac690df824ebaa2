"""pytest configuration of the benchmark suites.

``EOS_BENCH_CPU_THREADS=n`` sets torch's intra-op thread count. Records versions, the GPU and its peak bandwidth, thread counts and the load
average at the start and end of the session into pytest-benchmark's
``machine_info["eos_bench"]`` (the report names them), and frees CUDA memory
between test modules. Triton's interpreter is never switched on here: the
benchmarks do not run the kernels on the CPU.
"""
import gc
import os

import pytest
import torch

from bench.common import environment_info

_LOADAVG = {}


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def pytest_configure(config):
    # EOS_BENCH_CPU_THREADS=n: torch's intra-op threads (default: torch's own choice). On a
    # machine whose cores are shared with other processes, 1 thread avoids the stalls of a
    # parallel region waiting for a preempted thread.
    threads = os.environ.get("EOS_BENCH_CPU_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_sessionstart(session):
    _LOADAVG["start"] = _loadavg()


def pytest_benchmark_update_machine_info(config, machine_info):
    info = environment_info()
    info["loadavg_start"] = _LOADAVG.get("start")
    info["loadavg_end"] = _loadavg()
    machine_info["eos_bench"] = info


@pytest.fixture(scope="module", autouse=True)
def _free_memory_after_module():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
