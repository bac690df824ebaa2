"""Helpers shared by the benchmark suites: devices, CUDA sync, peak memory, bandwidth.

Conventions of every suite in ``bench/``:

- every timed function synchronizes CUDA inside itself (:func:`sync`), so the
  wall-clock time pytest-benchmark takes is the time until the GPU finished;
- the first call (Triton JIT, ``torch.compile``, cuDNN/cuBLAS heuristics) is
  made before timing, and measures the peak extra memory
  (:func:`peak_extra_memory`);
- parameters are in the test ids (``cuda-triton-B8-K64-bf16``) and in
  ``benchmark.extra_info``; ``benchmark.group`` groups what should be compared;
- GPU cases are parametrized on every machine and skip with
  :data:`GPU_REASON` without CUDA; the CPU subset (PyTorch paths only: Triton's
  interpreter is meaningless for timing) runs on machines without CUDA, or
  everywhere with ``EOS_BENCH_CPU=1``;
- fixed-round cases take their counts through :func:`pedantic_rounds`
  (``EOS_BENCH_MAX_ROUNDS`` caps them for a quick dry run).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform
import subprocess

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAS_CUDA = torch.cuda.is_available()
RUN_CPU_SUBSET = (not HAS_CUDA) or os.environ.get("EOS_BENCH_CPU", "0") == "1"

GPU_REASON = ("GPU case: needs a CUDA device (this grid is meant for an H100/H200; "
              "see bench/results/README.md for the command)")
CPU_SUBSET_REASON = ("CPU subset: runs only on machines without CUDA "
                     "(set EOS_BENCH_CPU=1 to run it on a GPU machine too)")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Peak memory bandwidth in bytes/s of some GPUs, by device name (vendor data sheets).
#: Each rule: (substrings that must all occur in the lower-cased device name, B/s, label).
#: The first matching rule wins; an unknown GPU gets None (no fraction is reported).
PEAK_BANDWIDTH_RULES = (
    (("h100", "pcie"), 2.0e12, "H100 PCIe (HBM2e) 2.0 TB/s"),
    (("h100", "nvl"), 3.9e12, "H100 NVL 3.9 TB/s"),
    (("h100", "hbm3"), 3.35e12, "H100 SXM (HBM3) 3.35 TB/s"),
    (("h100", "sxm"), 3.35e12, "H100 SXM (HBM3) 3.35 TB/s"),
    (("h200",), 4.8e12, "H200 (HBM3e) 4.8 TB/s"),
    (("a100", "sxm4", "80gb"), 2.039e12, "A100 SXM4 80GB 2.039 TB/s"),
    (("a100", "80gb", "pcie"), 1.935e12, "A100 PCIe 80GB 1.935 TB/s"),
    (("a100", "40gb"), 1.555e12, "A100 40GB 1.555 TB/s"),
    (("l40s",), 0.864e12, "L40S 0.864 TB/s"),
)


def gpu_param(*values, id):
    """A parametrize case that runs only with CUDA (skips with :data:`GPU_REASON`)."""
    return pytest.param(*values, id=id, marks=pytest.mark.skipif(not HAS_CUDA, reason=GPU_REASON))


def cpu_param(*values, id):
    """A CPU-subset case (skips on CUDA machines unless ``EOS_BENCH_CPU=1``)."""
    return pytest.param(*values, id=id, marks=pytest.mark.skipif(not RUN_CPU_SUBSET, reason=CPU_SUBSET_REASON))


def pedantic_rounds(rounds: int, warmup: int) -> tuple[int, int]:
    """``(rounds, warmup_rounds)`` of a fixed-round (``benchmark.pedantic``) case.

    ``EOS_BENCH_MAX_ROUNDS=n`` caps them at ``n`` rounds and ``n - 1`` warm-up
    rounds (a quick walk through the suites, as ``scripts/gpu_check.sh --cpu``
    does); unset, the suites' own counts are used unchanged.
    """
    cap = os.environ.get("EOS_BENCH_MAX_ROUNDS")
    if not cap:
        return rounds, warmup
    n = max(1, int(cap))
    return min(rounds, n), min(warmup, n - 1)


def sync(device) -> None:
    """Wait for the device: a no-op on the CPU, ``torch.cuda.synchronize`` on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_memory(fn, device):
    """Run ``fn()`` once; return the peak extra CUDA memory it allocated, in bytes.

    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    what was allocated before the call: everything the call allocates at its
    peak, its output (and, for a backward, the gradients) included. Returns
    ``(None, result)`` on a CPU (the CPU allocator keeps no such statistic).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base), result


def median_seconds(benchmark):
    """Median time of the finished benchmark in seconds (None if benchmarking is disabled)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return float(stats.stats.median)


def gpu_name(device=None):
    if not HAS_CUDA:
        return None
    return torch.cuda.get_device_name(device if device is not None else torch.cuda.current_device())


def peak_bandwidth(name):
    """``(bytes_per_second, label)`` of the GPU called ``name``, or ``(None, None)`` if unknown."""
    if not name:
        return None, None
    low = name.lower()
    for needles, bw, label in PEAK_BANDWIDTH_RULES:
        if all(n in low for n in needles):
            return bw, label
    return None, None


def bandwidth_info(nbytes, seconds, device):
    """Achieved GB/s and the fraction of the device's peak bandwidth, for ``extra_info``."""
    device = torch.device(device)
    info = {"bytes": int(nbytes), "gbps": None, "peak_bandwidth_Bps": None, "bandwidth_fraction": None}
    if seconds:
        info["gbps"] = nbytes / seconds / 1e9
    if device.type == "cuda":
        bw, _ = peak_bandwidth(gpu_name(device))
        info["peak_bandwidth_Bps"] = bw
        if bw and seconds:
            info["bandwidth_fraction"] = nbytes / seconds / bw
    return info


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU's brand string (py-cpuinfo when installed), else the platform's."""
    try:
        import cpuinfo

        name = cpuinfo.get_cpu_info().get("brand_raw")
        if name:
            return name
    except Exception:
        pass
    return platform.processor() or platform.machine()


def device_label(device) -> str:
    """GPU name for CUDA, CPU brand for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_name(device)
    return cpu_name()


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_info() -> dict:
    """Versions, devices and thread counts, stored in pytest-benchmark's machine_info."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "eos_kernels": _version("eos_kernels"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "cuda_available": HAS_CUDA,
        "gpu_count": torch.cuda.device_count() if HAS_CUDA else 0,
        "gpu_name": gpu_name(),
        "gpu_memory_bytes": None,
        "gpu_capability": None,
        "peak_bandwidth_Bps": None,
        "peak_bandwidth_source": None,
    }
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["peak_bandwidth_Bps"], info["peak_bandwidth_source"] = peak_bandwidth(info["gpu_name"])
    return info
