"""Where, how much and how a patched model reduces: :class:`ReductionPlan` and the Theta plan."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from eos_kernels.theta import Reducer, Theta


def as_theta(theta: Any) -> Theta:
    """A :class:`Theta` from a Theta, a mapping (the JSON schema) or a path / JSON string."""
    if isinstance(theta, Theta):
        return theta
    if isinstance(theta, Mapping):
        return Theta.from_dict(theta)
    if isinstance(theta, (str, os.PathLike)):
        return Theta.from_json(theta)
    raise TypeError(
        f"theta must be a Theta, a dict in the Theta JSON schema, or a path to a Theta JSON file; "
        f"got {type(theta).__name__}"
    )


class ReductionPlan:
    """Where, how much and how a patched model reduces, asked afresh at every prefill.

    A :class:`~eos_kernels.theta.Theta` is the usual plan (:class:`_ThetaPlan`,
    made by :func:`patch_model`). The differentiable search
    (:mod:`eos_kernels.search`) passes its own plan to ``patch_model(...,
    plan=...)``: the reduction machinery is the same, only these answers differ.

    Attributes:
        name: label written into the report (``EOSReport.theta_name``).
        layers: the decoder layers that may reduce (hooks are installed there).
    """

    name: str | None = None
    layers: tuple[int, ...] = ()
    #: report note when :meth:`schedule` returns no reducer
    empty_note = "no reducer is active"

    def schedule(self, num_visual_tokens: int) -> list[tuple[int, int, int]]:
        """``(layer, incoming, kept)`` of the reducers of this prefill, chained, in layer order."""
        raise NotImplementedError

    def operator_kwargs(self, layer: int) -> dict:
        """Keyword arguments of :func:`~eos_kernels.operator.eos_reduce` for ``layer``."""
        raise NotImplementedError

    def regime(self, layer: int) -> str:
        """Display name of ``layer``'s operator regime (for the report)."""
        raise NotImplementedError

    def finish(self, layer: int, reduced: torch.Tensor, scores: torch.Tensor, anchor_idx: torch.Tensor,
               kept: int) -> torch.Tensor:
        """Last word on the reduced anchors [B, K, d] of ``layer`` (identity by default).

        ``scores`` [B, N] are the importance of the incoming visual tokens,
        ``anchor_idx`` [B, K] the anchors' indices into them."""
        return reduced


class _ThetaPlan(ReductionPlan):
    """A fixed :class:`Theta`: float operator parameters, counts from the Theta's keeps."""

    empty_note = "no reducer of the theta removes a visual token (a keep-all reducer does not run)"

    def __init__(self, theta: Theta):
        self.theta = theta
        self.name = theta.name
        self.reducers: dict[int, Reducer] = {r.layer: r for r in theta.reducers}
        self.layers = tuple(self.reducers)

    def schedule(self, num_visual_tokens: int) -> list[tuple[int, int, int]]:
        # a count above what a sample has is clipped to it (samples differ: one image or several, any
        # resolution); a reducer that keeps every token it receives does not run at all, so a keep-all
        # Theta is the stock model bit for bit
        current, out = num_visual_tokens, []
        for r in self.theta.reducers:
            try:
                kept = r.kept(current)
            except ValueError:  # keep > incoming
                kept = current
            if kept < current:
                out.append((r.layer, current, kept))
            current = kept
        return out

    def operator_kwargs(self, layer: int) -> dict:
        return self.reducers[layer].operator_kwargs()

    def regime(self, layer: int) -> str:
        return self.reducers[layer].regime


