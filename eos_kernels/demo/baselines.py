"""The baseline families of the matched-cost comparison and the placements each is tuned over.

Every configuration keeps exactly ``budget`` visual tokens after its last
reducer. A family is an operator (prune, the merge corner, the pool corner) and
a shape of schedule; *tuning* a family means trying each of its placements on
the search split (:func:`tune`) and keeping, for the comparison, the best one at
no more estimated prefill FLOPs than the configuration it is compared with:

- ``fastv``: prune once, at any layer ``l`` (FastV's "prune after layer K", keeping
  ``budget``);
- ``sparsevlm``: prune at two or three layers; three layers take SparseVLM v2's keep
  ratios (its public schedule nearest the budget, rescaled to end at ``budget``),
  two layers keep ``round(sqrt(N0 * budget))`` after the first (the geometric middle);
- ``merge`` / ``pool``: the ToMe-style merge and the pool corner (appendix B) at one,
  two or three layers with the same schedules;
- ``prune@searched`` (not tuned): the searched Θ's own layers and counts with the
  prune corner (γ = ρ = ν = 0), which isolates what the operator adds.

Reducers go on layers ``0 .. L - 2``: a reducer at the last layer changes the
count leaving the model and nothing else (the last layer has run at full length).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Sequence

from eos_kernels.presets import MERGE_CORNER, POOL_CORNER
from eos_kernels.theta import Reducer, Theta

__all__ = ["FAMILIES", "Candidate", "placements", "prune_at", "tune"]

#: the tuned baseline families, in table order
FAMILIES = ("fastv", "sparsevlm", "merge", "pool")


@dataclasses.dataclass
class Candidate:
    """One configuration of the comparison and what is known of it."""

    name: str
    family: str
    budget: int
    theta: Theta
    flops: float                      # estimated prefill FLOPs ratio (Theta.token_report)
    tuning: float | None = None       # exact-match accuracy on the tuning questions of the search split
    heldout: dict | None = None       # evaluate()'s result on the held-out split (touched once)


def _label(family: str, budget: int, layers: Sequence[int]) -> str:
    return f"{family}@{budget}-L{'.'.join(str(x) for x in layers)}"


def _schedules(layers: Sequence[int], budget: int, n0: int, num_layers: int) -> list[int] | None:
    """Kept counts at ``layers`` ending at ``budget`` (None where the shape does not fit the counts)."""
    if len(layers) == 1:
        return [budget]
    if len(layers) == 2:
        mid = round(math.sqrt(n0 * budget))
        mid = min(n0 - 1, max(budget + 1, mid))
        return [mid, budget] if budget < mid < n0 else None
    base = Theta.tome(budget, layers, count="final", num_visual_tokens=n0, num_layers=num_layers)
    kept = [s[2] for s in base.schedule(n0)]
    # a rescaled v2 schedule may keep everything at its first layers: that shape is a shorter placement
    return kept if len(kept) == 3 and kept[-1] == budget and len(set(kept)) == 3 and kept[0] < n0 else None


def _operator(family: str) -> dict:
    """The operator corner of ``family`` (fastv and sparsevlm prune: the Reducer's defaults)."""
    return dict({"merge": MERGE_CORNER, "pool": POOL_CORNER}.get(family, {}))


def placements(family: str, budget: int, n0: int, num_layers: int) -> list[Theta]:
    """Every placement of ``family`` (see the module docstring) ending at ``budget`` of ``n0`` visual tokens."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not 1 <= budget < n0:
        raise ValueError(f"budget must be in 1..{n0 - 1} (fewer than the {n0} visual tokens), got {budget}")
    last = num_layers - 2  # the last layer may not reduce
    if last < 0:
        return []
    sizes = (1,) if family == "fastv" else ((2, 3) if family == "sparsevlm" else (1, 2, 3))
    op = _operator(family)
    out = []
    for size in sizes:
        for layers in itertools.combinations(range(last + 1), size):
            kept = _schedules(layers, budget, n0, num_layers)
            if kept is None:
                continue
            out.append(Theta([Reducer(layer, k, **op) for layer, k in zip(layers, kept)],
                             name=_label(family, budget, layers)))
    return out


def prune_at(theta: Theta, num_visual_tokens: int, name: str) -> Theta:
    """``theta``'s layers and counts (its schedule at ``num_visual_tokens``) with the prune corner."""
    kept = {layer: k for layer, _, k in theta.schedule(num_visual_tokens)}
    return Theta([Reducer(r.layer, kept[r.layer], k_min=r.k_min) for r in theta.reducers if r.layer in kept],
                 name=name)


def tune(candidates: Sequence[Candidate], score: Callable[[Sequence[Candidate], Sequence[int]], list[float]],
         questions: int, first: int | None = None) -> list[Candidate]:
    """Tune by successive halving on the search split's first ``questions`` questions: every candidate on the
    first ``first`` of them, then each family's and budget's first-round frontier on the rest; their pooled
    score is ``candidate.tuning``. Returns the candidates still in the running (the others keep their first-round score
    and are not chosen). ``score(candidates, question_indices)`` scores a list on those questions."""
    first = questions if first is None or first >= questions else first
    scores = score(candidates, range(first))
    for c, s in zip(candidates, scores):
        c.tuning = s
    if first == questions:
        return list(candidates)
    # the first round's frontier of each family and budget: on 50 questions most placements of a family score
    # within a standard error of each other, and a cut half a standard error wide kept 58 % of them (measured)
    from eos_kernels.demo.frontier import pareto_front

    groups: dict[tuple[str, int], list[Candidate]] = {}
    for c in candidates:
        groups.setdefault((c.family, c.budget), []).append(c)
    kept = [c for group in groups.values()
            for c in pareto_front(group, accuracy=lambda c: c.tuning, flops=lambda c: c.flops)]
    rest = questions - first
    for c, s in zip(kept, score(kept, range(first, questions))):
        c.tuning = (c.tuning * first + s * rest) / questions
    return kept
