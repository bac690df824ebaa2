"""Matched-cost comparison: accuracy-FLOPs Pareto frontiers and dominance.

A configuration is a point (estimated prefill FLOPs ratio, accuracy). ``a``
*dominates* ``b`` when it is more accurate at no more FLOPs (the issue's and the
field's "matched cost": DESIGN.md §8). A family's frontier is the set of its
points that no other point of the family dominates or ties at lower cost.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, TypeVar

__all__ = ["dominates", "pareto_front", "best_within", "FLOPS_TOL"]

#: FLOPs ratios closer than this count as equal (they come from one formula; only float rounding differs)
FLOPS_TOL = 1e-9

P = TypeVar("P")


def dominates(acc_a: float, flops_a: float, acc_b: float, flops_b: float) -> bool:
    """``a`` is more accurate than ``b`` at no more estimated prefill FLOPs."""
    return acc_a > acc_b and flops_a <= flops_b + FLOPS_TOL


def pareto_front(points: Iterable[P], accuracy: Callable[[P], float], flops: Callable[[P], float]) -> list[P]:
    """The points no other point beats: sorted by FLOPs, each strictly more accurate than every cheaper one
    (of equally accurate points the cheapest is kept; of equal cost, the most accurate; ties: the first)."""
    ordered = sorted(enumerate(points), key=lambda ip: (flops(ip[1]), -accuracy(ip[1]), ip[0]))
    front, best = [], -float("inf")
    for _, p in ordered:
        if accuracy(p) > best:
            front.append(p)
            best = accuracy(p)
    return front


def best_within(points: Sequence[P], limit: float, accuracy: Callable[[P], float],
                flops: Callable[[P], float]) -> P | None:
    """The most accurate point whose FLOPs are at most ``limit`` (ties: the cheaper, then the first), or None."""
    inside = [(i, p) for i, p in enumerate(points) if flops(p) <= limit + FLOPS_TOL]
    if not inside:
        return None
    return min(inside, key=lambda ip: (-accuracy(ip[1]), flops(ip[1]), ip[0]))[1]
