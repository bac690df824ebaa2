"""Hopper's tf32 tensor-core products, emulated in Triton's interpreter.

The interpreter computes ``tl.dot`` in exact fp32 whatever ``input_precision``
says, so kernels that lean on fp32 products without meaning to pass there and
fail on a GPU (the first H200 run: d/dtau off by 2-3 % in fp16/bf16). Inside
:func:`hopper_tf32`, every ``tl.dot`` with ``input_precision="tf32"`` first
truncates its fp32 operands to tf32 (the 13 low mantissa bits cleared), as
Hopper's ``wgmma`` does, so those tests see the GPU's products on the CPU.

It patches the interpreter's ``InterpreterBuilder.create_dot`` (private to
Triton): where a release no longer has it, :func:`available` is False and the
tests that need it skip with that reason.
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np

try:
    from triton._C.libtriton import ir
    from triton.runtime import interpreter as _interp

    _ORIGINAL = _interp.InterpreterBuilder.create_dot
    _PARAMS = list(inspect.signature(_ORIGINAL).parameters)
except (ImportError, AttributeError):  # pragma: no cover - another Triton layout
    _ORIGINAL, _PARAMS = None, []

#: why the emulation cannot run here ("" where it can)
UNAVAILABLE = "" if _PARAMS[:5] == ["self", "a", "b", "d", "input_precision"] else (
    "this Triton's interpreter has no InterpreterBuilder.create_dot(self, a, b, d, input_precision, ...) to patch")


def truncate_to_tf32(x: np.ndarray) -> np.ndarray:
    """fp32 values with their 13 low mantissa bits cleared (other dtypes unchanged)."""
    if x.dtype != np.float32:
        return x
    return (x.view(np.int32) & np.int32(-8192)).view(np.float32)


def _create_dot(self, a, b, d, input_precision, *rest, **kw):
    if input_precision == ir.INPUT_PRECISION.TF32:
        a = _interp.TensorHandle(truncate_to_tf32(a.data), a.dtype.scalar)
        b = _interp.TensorHandle(truncate_to_tf32(b.data), b.dtype.scalar)
    return _ORIGINAL(self, a, b, d, input_precision, *rest, **kw)


@contextlib.contextmanager
def hopper_tf32():
    """Interpreted ``tl.dot`` calls truncate fp32 operands to tf32 while the context is open."""
    if UNAVAILABLE:
        raise RuntimeError(UNAVAILABLE)
    _interp.InterpreterBuilder.create_dot = _create_dot
    try:
        yield
    finally:
        _interp.InterpreterBuilder.create_dot = _ORIGINAL
