"""Θ presets of the known methods: FastV, SparseVLM, ToMe-style merge, pooling and the paper's Θ*.

Each is a plain function returning a :class:`~eos_kernels.theta.Theta`; ``Theta.fastv(...)``,
``Theta.sparsevlm(...)``, ``Theta.tome(...)``, ``Theta.pool(...)`` and ``Theta.paper(...)`` call them
(their docstrings there are the reference). The published numbers they rest on (SparseVLM's
schedules, the operator corners, table 6 of the paper) live here, in one place.

:mod:`eos_kernels.theta` imports this module's tables when it loads, so ``Theta`` is imported here
where a preset is built, not at the top.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Mapping, Sequence

from eos_kernels._checks import check_int, is_int

__all__ = ["SPARSEVLM_SCHEDULES", "SPARSEVLM_LAYERS", "MERGE_CORNER", "POOL_CORNER", "PAPER_LAYERS",
           "PAPER_HYBRID", "fastv", "sparsevlm", "tome", "pool", "paper"]

#: SparseVLM's public schedules: visual tokens kept after layers 2, 6, 15 (0-indexed),
#: by version and by budget (DESIGN.md §4).
SPARSEVLM_SCHEDULES: dict[int, dict[int, tuple[int, int, int]]] = {
    1: {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    2: {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
SPARSEVLM_LAYERS = (2, 6, 15)

# Operator corners (DESIGN.md §2, appendix B listing 3).
MERGE_CORNER = dict(gamma=1.0, tau=1e-4, theta=-1e9, rho=0.0, nu=0.0)
POOL_CORNER = dict(gamma=1.0, tau=1e6, theta=-1e9, rho=0.0, nu=0.0)
# Table 6 of the paper: the searched interior hybrid at layer 6.
PAPER_LAYERS = (3, 6, 16)
PAPER_HYBRID = dict(gamma=0.083, tau=0.22, theta=0.10, rho=0.0, nu=0.0)


def fastv(layer: int, keep: int | float, *, name: str | None = None):
    """FastV: one prune reducer at ``layer`` keeping ``keep`` (count or fraction); see :meth:`Theta.fastv`."""
    from eos_kernels.theta import Reducer, Theta

    return Theta([Reducer(layer, keep)], name=name or f"fastv-L{layer}-keep{keep!r}")


def sparsevlm(version: int, budget: int):
    """SparseVLM's public schedule (:data:`SPARSEVLM_SCHEDULES`), prune corners after layers 2, 6, 15;
    see :meth:`Theta.sparsevlm`."""
    from eos_kernels.theta import Reducer, Theta

    if not is_int(version) or version not in SPARSEVLM_SCHEDULES:
        raise ValueError(f"version must be one of {sorted(SPARSEVLM_SCHEDULES)}, got {version!r}")
    table = SPARSEVLM_SCHEDULES[version]
    if not is_int(budget) or budget not in table:
        raise ValueError(f"budget for SparseVLM v{version} must be one of {sorted(table, reverse=True)}, got {budget!r}")
    reducers = [Reducer(layer, k) for layer, k in zip(SPARSEVLM_LAYERS, table[budget])]
    return Theta(reducers, name=f"sparsevlm-v{version}-{budget}")


def _v2_base(budget: float, num_visual_tokens: int = 576) -> tuple[int, ...]:
    """SparseVLM v2's schedule at the published budget nearest ``budget``, for ``num_visual_tokens``.

    The published schedules are for 576 visual tokens: the nearest budget is
    chosen by ratio (budget / num_visual_tokens against b / 576, ties: larger)
    and its kept counts are scaled by num_visual_tokens / 576 (floored, at
    least 1): the same keep ratios. At 576 tokens the schedule is as published.
    """
    table = SPARSEVLM_SCHEDULES[2]
    nearest = min(table, key=lambda b: (abs(Fraction(b, 576) - Fraction(budget) / num_visual_tokens), -b))
    return tuple(max(1, k * num_visual_tokens // 576) for k in table[nearest])


def _corner_preset(
    label: str,
    operator: Mapping[str, Any],
    budget: float | None,
    layers: Sequence[int],
    count: str,
    schedule: Sequence[int | float] | None,
    num_visual_tokens: int,
    num_layers: int,
    name: str | None,
):
    """Reducers with the ``operator`` values at ``layers``; the schedule as :meth:`Theta.tome` describes."""
    from eos_kernels.theta import Reducer, Theta, _check_budget

    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"layers must be a non-empty sequence of ints, got {layers!r}")
    if schedule is None:
        if budget is None:
            raise ValueError("budget must be given when schedule is None")
        base = _v2_base(_check_budget(budget), check_int("num_visual_tokens", num_visual_tokens, 1))
        if len(layers) != len(base):
            raise ValueError(
                f"layers must have {len(base)} entries to take SparseVLM v2's keep ratios "
                f"(or pass schedule=), got {len(layers)}"
            )
        schedule = base
    elif isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or len(schedule) != len(layers):
        raise ValueError(f"schedule must be a sequence with one keep per layer ({len(layers)}), got {schedule!r}")
    theta = Theta([Reducer(layer, keep, **operator) for layer, keep in zip(layers, schedule)], name=label)
    if budget is not None:
        theta = theta.rescale(budget, count, num_visual_tokens=num_visual_tokens, num_layers=num_layers)
    else:
        theta.validate(num_layers, num_visual_tokens)
    return Theta(theta.reducers, name=name or (f"{label}-{budget:g}" if budget is not None else label))


def tome(
    budget: float | None,
    layers: Sequence[int] = SPARSEVLM_LAYERS,
    *,
    count: str = "mean_leaving",
    schedule: Sequence[int | float] | None = None,
    num_visual_tokens: int = 576,
    num_layers: int = 32,
    name: str | None = None,
):
    """ToMe-style hard merge (γ=1, τ=1e-4, θ=−1e9, ρ=ν=0) at ``layers``; see :meth:`Theta.tome`."""
    return _corner_preset("tome", MERGE_CORNER, budget, layers, count, schedule, num_visual_tokens, num_layers,
                         name)


def pool(
    budget: float | None,
    layers: Sequence[int] = SPARSEVLM_LAYERS,
    *,
    count: str = "mean_leaving",
    schedule: Sequence[int | float] | None = None,
    num_visual_tokens: int = 576,
    num_layers: int = 32,
    name: str | None = None,
):
    """Uniform pooling (γ=1, τ=1e6, θ=−1e9, ρ=ν=0) at ``layers``; see :meth:`Theta.pool`."""
    return _corner_preset("pool", POOL_CORNER, budget, layers, count, schedule, num_visual_tokens, num_layers,
                         name)


def paper(budget: float, *, count: str = "mean_leaving", num_visual_tokens: int = 576, num_layers: int = 32):
    """The paper's searched Θ* (table 6) at a retain budget, its schedule assumed; see :meth:`Theta.paper`."""
    from eos_kernels.theta import Reducer, Theta, _check_budget

    budget = _check_budget(budget)
    base = _v2_base(budget, check_int("num_visual_tokens", num_visual_tokens, 1))
    ops = [{}, PAPER_HYBRID, {}]
    theta = Theta([Reducer(layer, k, **op) for layer, k, op in zip(PAPER_LAYERS, base, ops)], name="eos-paper")
    theta = theta.rescale(budget, count, num_visual_tokens=num_visual_tokens, num_layers=num_layers)
    return Theta(theta.reducers, name=f"eos-paper-{budget:g}")
