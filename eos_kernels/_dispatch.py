"""Choosing between the Triton kernels and the PyTorch reference."""
import os

import torch

IMPLS = ("auto", "triton", "torch")


def triton_interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_impl(impl: str, device: torch.device, name: str = "impl") -> str:
    """Map ``impl`` ("auto" | "triton" | "torch") to "triton" or "torch" for ``device``.

    "auto" uses the kernels on CUDA and the reference elsewhere. "triton" on a
    non-CUDA device needs Triton's interpreter, else a RuntimeError says how to
    get it.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{name} must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            f"{name}='triton' on a {device.type} tensor needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before Triton is imported, or use "
            f"{name}='torch' (or 'auto') for the PyTorch reference"
        )
    return impl
