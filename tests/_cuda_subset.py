"""Shared by the CUDA-only tests (``tests/test_cuda_*.py``): device choice and verbose comparisons.

The CUDA-only tests compile the Triton kernels on a GPU. They skip with a
reason on a machine without CUDA, unless ``EOS_CUDA_TESTS_ON_CPU=1`` (set by
``scripts/gpu_check.sh --cpu``): then the same test functions run on the CPU
at small shapes, through Triton's interpreter, so that the test code itself
cannot rot between GPU windows. GPU-sized cases are marked with
:func:`gpu_only` and skip in that mode.

:func:`assert_close_verbose` fails with the first mismatching elements (index,
actual, expected, allowed error), the counts of NaN/Inf and the case's shapes
and seed, so that a failure seen once on a GPU can be diagnosed offline from
the test report alone.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
ON_CPU = (not HAS_CUDA) and os.environ.get("EOS_CUDA_TESTS_ON_CPU", "0") == "1"
#: the device of the CUDA-only tests: "cuda", "cpu" (interpreter subset) or None (skip)
DEVICE = "cuda" if HAS_CUDA else ("cpu" if ON_CPU else None)

SKIP_REASON = ("CUDA-only test: needs a CUDA GPU (compiled Triton kernels); "
               "EOS_CUDA_TESTS_ON_CPU=1 runs a small-shape subset through TRITON_INTERPRET=1 "
               "(scripts/gpu_check.sh --cpu)")

#: module-level mark of every CUDA-only test file
requires_device = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)


def gpu_only(*values, id):
    """A parametrize case that needs the GPU (too large for the interpreter subset)."""
    return pytest.param(*values, id=id, marks=pytest.mark.skipif(
        not HAS_CUDA, reason="GPU-sized case: skipped in the interpreter subset (EOS_CUDA_TESTS_ON_CPU=1)"))


def first_mismatches(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, limit: int = 10):
    """``(bad mask, lines)``: where ``|actual - expected| > atol + rtol |expected|`` (NaN/Inf aware)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    close = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    bad = ~close
    lines = []
    idx = bad.nonzero()
    for i in idx[:limit].tolist():
        t = tuple(i)
        av, ev = a[t].item(), e[t].item()
        allowed = atol + rtol * abs(ev) if ev == ev else float("nan")
        lines.append(f"  at {t}: actual {av!r}, expected {ev!r}, |diff| {abs(av - ev):.3e}, allowed {allowed:.3e}")
    return bad, lines


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str,
                         context: str = "") -> None:
    """``torch.testing.assert_close``-like check whose message keeps the first mismatching values."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}; {context}")
    bad, lines = first_mismatches(actual, expected, rtol, atol)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    diff = (a - e).abs()
    finite = torch.isfinite(diff)
    worst = None
    if finite.any():
        masked = torch.where(finite, diff, torch.zeros_like(diff))
        flat = int(masked.argmax())
        worst = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    e_finite = e[torch.isfinite(e)]
    msg = [
        f"{what}: {n_bad} of {a.numel()} elements differ beyond atol={atol:.3e} + rtol={rtol:.3e}*|expected|"
        f" (actual {actual.dtype} on {actual.device}, expected {expected.dtype})",
        f"  {context}" if context else "",
        f"  actual NaN {int(torch.isnan(a).sum())}, Inf {int(torch.isinf(a).sum())}; "
        f"expected NaN {int(torch.isnan(e).sum())}, Inf {int(torch.isinf(e).sum())}; "
        f"max |expected| {e_finite.abs().max().item() if e_finite.numel() else float('nan'):.4e}",
    ]
    if worst is not None:
        msg.append(f"  largest |diff| {diff[worst].item():.4e} at {worst}: actual {a[worst].item()!r}, "
                   f"expected {e[worst].item()!r}")
    msg.append("  first mismatches (row-major order):")
    msg += lines
    raise AssertionError("\n".join(m for m in msg if m))

