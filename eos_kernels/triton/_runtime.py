"""Shared Triton helpers: interpreter detection, dtype handling, rounding.

Import this module only after ``TRITON_INTERPRET`` has its final value: Triton
decides at decoration time whether a ``@triton.jit`` function is interpreted.
"""
import torch
import triton
import triton.language as tl

from eos_kernels._dispatch import triton_interpreting

#: whether the kernels of this process were decorated for Triton's CPU interpreter
INTERPRETED = triton_interpreting()


def check_launchable(device: torch.device) -> None:
    """Raise a clear RuntimeError when the kernels cannot run on ``device``."""
    if INTERPRETED or device.type == "cuda":
        return
    raise RuntimeError(
        "the Triton kernels were imported without TRITON_INTERPRET=1 and the tensors are on "
        f"{device.type}: set TRITON_INTERPRET=1 before anything imports triton to run them "
        "on the CPU, or use impl='torch'"
    )


def round_bf16_on_store(dtype: torch.dtype) -> bool:
    """The interpreter truncates fp32 -> bf16 on store; round to nearest-even first."""
    return INTERPRETED and dtype == torch.bfloat16


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def round_to_bf16_grid(x):
    """Round fp32 values to the nearest-even bf16 value (kept in fp32).

    Used before a bf16 store under the interpreter, whose conversion truncates;
    on the GPU the conversion already rounds to nearest-even and this is skipped.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)
