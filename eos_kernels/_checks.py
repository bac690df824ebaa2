"""Argument checks shared by the public API: clear TypeError/ValueError naming the argument."""
from __future__ import annotations

import math
import numbers
from typing import Any


# Operator parameter limits beyond the paper's ranges (gamma, nu in [0, 1], rho >= 0, tau > 0), set by
# float32, in which both implementations hold the parameters for fp32/fp16/bf16 inputs. Checked by
# eos_reduce (eos_kernels.operator.PARAM_RANGES), and by SearchSpace for its eps and beta.
#: smallest tau: the gradient of S / tau goes as 1 / tau**2, which underflows float32 (a NaN d/dtau
#: in the reference) below ~1e-19; a power of two, so that float32 and bfloat16 hold it exactly
TAU_MIN = 2.0 ** -40
#: largest rho: anchors are scaled by up to h = 1 + rho, which the fused kernels' float32 norm blend
#: does not survive far: at nu = 1 its output is off by ~1e-7 h relative (7e-6 at rho = 100, 2.6 %
#: at 1e6, NaN from ~1e19, where the squared norms overflow). The paper uses rho <= 1 (a sigmoid in
#: the search) and 1.5 (listing 3's reweight corner): 10 leaves room and stays accurate (6e-7)
RHO_MAX = 10.0
#: largest beta: float32's largest value (a larger one becomes inf there: NaN gradients)
BETA_MAX = 3.4028234663852886e38


def is_int(x: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int >= ``minimum``; TypeError/ValueError naming ``name`` otherwise."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the given (half-)open or closed range."""
    if not is_real(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must be finite and in {rng}, got {value!r}")
    return value
