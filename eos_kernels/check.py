"""Self-test: the unified operator at each corner against the independent corner algorithms.

``python -m eos_kernels check`` runs the paper's listing-3 check (K=8, M=16,
d=64, seed 42, fp32) for every available implementation and exits non-zero if
any max |unified - corner| exceeds the tolerance.
"""
from __future__ import annotations

import torch

from eos_kernels.corners import CORNER_SETTINGS, CORNERS
from eos_kernels._dispatch import triton_interpreting
from eos_kernels.operator import eos_reduce

#: fp32 tolerance of the corner check. Listing 3 reports O(1e-6): the footprint
#: of finite tau (1e-4, 1e6) and theta (-1e9) standing in for the limits.
CORNER_TOLERANCE = 1e-5


def listing3_inputs(K=8, M=16, d=64, seed=42, device="cpu"):
    """The random anchors, candidates and scores of the paper's listing 3."""
    torch.manual_seed(seed)
    A, D, s = torch.randn(K, d), torch.randn(M, d), torch.randn(M)
    return A.to(device), D.to(device), s.to(device)


def available_impls():
    """(impl, device, reason-if-skipped) for each implementation this machine can run."""
    impls = [("torch", "cpu", None)]
    if torch.cuda.is_available():
        impls.append(("triton", "cuda", None))
    elif triton_interpreting():
        impls.append(("triton", "cpu", None))
    else:
        impls.append(("triton", None, "no CUDA device; set TRITON_INTERPRET=1 to run the kernels on the CPU"))
    return impls


def corner_errors(impl, device, **sizes):
    """max |eos_reduce(corner setting) - corner algorithm| for every corner."""
    A, D, s = listing3_inputs(device=device, **sizes)
    errors = {}
    for name, (gamma, tau, theta, rho, nu) in CORNER_SETTINGS.items():
        unified = eos_reduce(A, D, s, gamma, tau, theta, rho, nu, impl=impl)
        errors[name] = (unified - CORNERS[name](A, D, s)).abs().max().item()
    return errors


def run_check(out=print) -> int:
    """Print one line per (implementation, corner) and return the process exit code."""
    failures = 0
    for impl, device, skipped in available_impls():
        if skipped:
            out(f"{impl:7s} skipped: {skipped}")
            continue
        for name, err in corner_errors(impl, device).items():
            ok = err <= CORNER_TOLERANCE
            failures += not ok
            out(f"{impl:7s} {device:5s} {name:9s} max|unified - corner| = {err:.2e}  "
                f"{'PASS' if ok else 'FAIL'} (tolerance {CORNER_TOLERANCE:.0e})")
    out("all corners PASS" if not failures else f"{failures} corner check(s) FAILED")
    return 1 if failures else 0
