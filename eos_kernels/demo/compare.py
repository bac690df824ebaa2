"""The matched-cost comparison of the demo: which tuned baselines meet the held-out split, and who dominates whom.

Protocol (how a careful reader compares a searched Θ with baselines, DESIGN.md §8):

1. every placement of every family (:mod:`eos_kernels.demo.baselines`) is scored on
   the *search* split (tuning: :func:`~eos_kernels.search.scoring.exact_match_accuracy`);
2. for the budget B of a searched Θ (FLOPs F), a family's **matched** baseline is
   its placement with the best tuning score among those that keep at most B final
   visual tokens *and* cost at most F; the held-out split then scores it once;
3. each family's tuning frontier (over all its placements and budgets, up to a
   little above the dearest searched Θ) is scored on the held-out split too, for
   the accuracy-FLOPs plot and the dominance lists;
4. per budget, a held-out configuration *dominates* another when it is more
   accurate at no more estimated prefill FLOPs (:func:`~eos_kernels.demo.frontier.dominates`).

Nothing about the held-out split feeds back into a choice: it is read once per
configuration, after every choice is made.
"""
from __future__ import annotations

from typing import Sequence

from eos_kernels.demo.baselines import FAMILIES, Candidate
from eos_kernels.demo.frontier import best_within, dominates, pareto_front

__all__ = ["matched", "to_evaluate", "budget_summary"]


def _eligible(candidates: Sequence[Candidate], family: str, budget: int) -> list[Candidate]:
    return [c for c in candidates if c.family == family and c.budget <= budget]


def matched(candidates: Sequence[Candidate], searched: Candidate) -> dict[str, Candidate | None]:
    """Per family, its best placement on the tuning split at no more final tokens and FLOPs than ``searched``
    (None when the family has no placement that cheap)."""
    return {f: best_within(_eligible(candidates, f, searched.budget), searched.flops,
                           accuracy=lambda c: c.tuning, flops=lambda c: c.flops)
            for f in FAMILIES}


#: a family's tuning frontier is scored on the held-out split up to this much above the dearest searched Θ
FRONTIER_REACH = 0.05
#: ... and only its points at least this much more accurate (tuning) than the previous one scored
FRONTIER_STEP = 0.02


def to_evaluate(candidates: Sequence[Candidate], searched: Sequence[Candidate]) -> list[Candidate]:
    """The baselines the held-out split scores: every matched one, and every family's tuning frontier up to
    :data:`FRONTIER_REACH` above the dearest searched Θ (a dearer baseline cannot dominate a searched Θ), thinned
    to steps of :data:`FRONTIER_STEP` in tuning accuracy; each once (first seen first)."""
    out: dict[str, Candidate] = {}
    for s in searched:
        for c in matched(candidates, s).values():
            if c is not None:
                out.setdefault(c.name, c)
    reach = max((s.flops for s in searched), default=1.0) + FRONTIER_REACH
    for f in FAMILIES:
        last = -float("inf")
        for c in pareto_front([c for c in candidates if c.family == f], accuracy=lambda c: c.tuning,
                              flops=lambda c: c.flops):
            # a frontier point a hair more accurate than the last one kept adds a held-out run and no information
            if c.flops <= reach and c.tuning >= last + FRONTIER_STEP:
                out.setdefault(c.name, c)
                last = c.tuning
    return list(out.values())


def _acc(c: Candidate) -> float:
    return c.heldout["accuracy"]


def budget_summary(budget: int, searched: Candidate, prune: Candidate | None, candidates: Sequence[Candidate],
                   extra: Sequence[Candidate] = ()) -> dict:
    """The per-budget comparison on the held-out split.

    ``candidates``: every tuned baseline (those with a held-out result take
    part in the dominance lists); ``prune``: the searched Θ's layers and counts
    with the prune corner; ``extra``: other searched variants to report beside it.
    """
    pairs = matched(candidates, searched)
    evaluated = [c for c in candidates if c.heldout is not None and c.budget <= budget]
    a, f = _acc(searched), searched.flops
    best = max((c for c in pairs.values() if c is not None), key=lambda c: (_acc(c), -c.flops), default=None)
    return {
        "budget": budget,
        "searched": searched.name,
        "prune_at_searched": prune.name if prune is not None else None,
        "extra": [c.name for c in extra],
        "matched": {fam: (c.name if c is not None else None) for fam, c in pairs.items()},
        "best_matched": best.name if best is not None else None,
        "lead_over_best_matched": (a - _acc(best)) if best is not None else None,
        "lead_over_prune": (a - _acc(prune)) if prune is not None else None,
        "dominates": sorted(c.name for c in evaluated if dominates(a, f, _acc(c), c.flops)),
        "dominated_by": sorted(c.name for c in evaluated if dominates(_acc(c), c.flops, a, f)),
    }
