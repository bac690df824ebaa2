"""The search forward and the objective of equations 13 and 14.

:class:`SearchPlan` is the :class:`~eos_kernels.patching.ReductionPlan` the
search patches the model with: at every prefill it exports the current
:class:`~eos_kernels.search_space.SearchSpace` with the deployment rule (so the
layers and counts of the search forward are those of the Θ that would be
deployed now), hands :func:`~eos_kernels.operator.eos_reduce` the layer's
differentiable 0-d operator parameters, and multiplies the reduced anchors by
the straight-through factor ``p_i / sg(p_i)`` of equation 12.

:func:`data_terms` runs one micro-batch: the no-grad unreduced reference
forward (``patching.suspended``) and the reduced forward, and returns the
*sums* of the answer-token cross-entropy and of the squared alignment errors,
so the caller can normalise by global counts (identical gradients on one
process or many). :func:`penalty_terms` gives the two one-sided penalties.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from eos_kernels.patching import ReductionPlan, get_report, prompt_lengths, suspended
from eos_kernels.search_space import SearchSpace

__all__ = ["SearchPlan", "LayerCapture", "data_terms", "penalty_terms", "LOG_SCORE_FLOOR"]

#: Scores are clamped to at least this before the log of equation 12 (attention probabilities may underflow).
LOG_SCORE_FLOOR = 1e-30


class SearchPlan(ReductionPlan):
    """Reduction plan of the search forward (decisions 1 and 2 of :mod:`eos_kernels.search`).

    Args:
        space: the search space (its parameters are the only trainable tensors).
        max_reducers: C: at most this many reducers (the strongest gates).
        gate_threshold: a layer reduces when ``g > gate_threshold``.
        impl: the operator implementation ("auto", "triton", "torch").
    """

    name = "eos-search"
    empty_note = "no gate of the search space is above the threshold"

    def __init__(self, space: SearchSpace, max_reducers: int, gate_threshold: float = 0.5, impl: str = "auto"):
        self.space = space
        self.max_reducers = int(max_reducers)
        self.gate_threshold = float(gate_threshold)
        self.impl = impl
        self.layers = tuple(range(space.num_layers))
        self.current: dict = {}
        self.last_schedule: list[tuple[int, int, int]] = []
        self.soft_kept: dict[int, torch.Tensor] = {}

    def export(self, num_visual_tokens: int | None = None, name: str | None = None):
        """The Θ the search would deploy now (the rule of every search forward)."""
        return self.space.export(self.gate_threshold, self.max_reducers, num_visual_tokens, name=name)

    def schedule(self, num_visual_tokens: int):
        theta = self.export(num_visual_tokens)
        self.current = {r.layer: r for r in theta.reducers}
        self.last_schedule = theta.schedule(num_visual_tokens)
        self.soft_kept = {}
        return self.last_schedule

    def operator_kwargs(self, layer: int) -> dict:
        kwargs = self.space.operator_params(layer)
        kwargs.update(beta=self.space.beta, norm=self.space.norm, impl=self.impl)
        return kwargs

    def regime(self, layer: int) -> str:
        return self.current[layer].regime

    def finish(self, layer, reduced, scores, anchor_idx, kept):
        # equation 12 on log-scores: alpha acts on log(q_i / q_(K)), whatever N is
        z = torch.log(scores.float().clamp_min(LOG_SCORE_FLOOR))
        p = self.space.keep_probability(z, layer, kept)
        self.soft_kept[layer] = p.detach().sum(dim=1).mean()
        pa = p.gather(1, anchor_idx)
        factor = pa / pa.detach()  # forward value exactly 1 (p >= 1/2 for anchors)
        return reduced * factor.unsqueeze(-1).to(reduced.dtype)


class LayerCapture:
    """Forward hooks keeping the output hidden states of some decoder layers while ``active``."""

    def __init__(self, layers: Sequence[nn.Module], indices: Sequence[int]):
        self.indices = list(indices)
        self.outputs: dict[int, torch.Tensor] = {}
        self.active = False
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in self.indices]

    def _hook(self, i):
        def hook(module, args, output):
            if self.active:
                self.outputs[i] = output[0] if isinstance(output, tuple) else output
            return None

        return hook

    @contextlib.contextmanager
    def capturing(self):
        self.outputs = {}
        self.active = True
        try:
            yield self.outputs
        finally:
            self.active = False

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _positions_after(report, layer: int, batch: int, length: int, device) -> torch.Tensor:
    """Original positions [B, L_l] of the rows leaving ``layer`` in the last reduced forward."""
    kept = None
    if report is not None:
        for stage in report.stages:
            if stage.layer <= layer:
                kept = stage.kept_positions
    if kept is None or kept.shape[1] != length:
        # unreduced so far, or the last layer (scattered back to the input length)
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, length)
    return kept.to(device)


def _answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict an answer token (any sample): 1-D long, ascending."""
    targets = labels[:, 1:] != -100
    return targets.any(dim=0).nonzero().flatten()


def data_terms(model: nn.Module, batch, capture: LayerCapture | None, *, autocast=None,
               align: bool = True) -> dict:
    """Answer CE and alignment *sums* of one micro-batch (the model must be patched with a SearchPlan).

    Returns a dict: ``ce_sum`` (0-d, with grad), ``answer_tokens`` (int),
    ``align_sse`` (dict layer -> 0-d sum of squared errors over the text
    positions and features, with grad; empty without ``align``),
    ``text_tokens`` (int), ``hidden_size`` (int), ``report`` (the reduced
    forward's :class:`~eos_kernels.patching.EOSReport`).
    """
    ctx = autocast if autocast is not None else contextlib.nullcontext
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    visual = ids == model.config.image_token_id
    text = mask.bool() & ~visual
    reference = {}
    if align and capture is not None and capture.indices:
        with torch.no_grad(), suspended(model), capture.capturing() as out, ctx():
            model(input_ids=ids, pixel_values=batch.pixel_values, attention_mask=mask, use_cache=False,
                  logits_to_keep=1)
        reference = {i: out[i][text] for i in capture.indices}
    keep = _answer_positions(labels)
    grab = capture.capturing() if reference else contextlib.nullcontext({})
    with prompt_lengths(model, batch.prompt_lengths), grab as out, ctx():
        logits = model(input_ids=ids, pixel_values=batch.pixel_values, attention_mask=mask, use_cache=False,
                       logits_to_keep=keep).logits
    report = get_report(model)
    targets = labels[:, keep + 1]
    ce_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=-100, reduction="sum")
    sse = {}
    hidden_size = 0
    for i, ref in reference.items():
        h = out[i]
        B, Ll, d = h.shape
        hidden_size = d
        pos = _positions_after(report, i, B, Ll, h.device)
        cur_text = text.gather(1, pos)
        diff = h[cur_text].float() - ref.float()
        sse[i] = diff.pow(2).sum()
    return {
        "ce_sum": ce_sum,
        "answer_tokens": int((targets != -100).sum()),
        "align_sse": sse,
        "text_tokens": int(text.sum()),
        "hidden_size": hidden_size,
        "report": report,
    }


def penalty_terms(space: SearchSpace, budget: float, max_reducers: float) -> dict:
    """Unweighted one-sided penalties of equation 13 and the expected final count N̄_L."""
    tokens = space.expected_tokens()[-1]
    return {
        "budget": space.budget_penalty(budget, tokens=tokens),
        "layers": space.layer_penalty(max_reducers),
        "expected_tokens": tokens,
    }
