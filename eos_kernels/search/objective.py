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

__all__ = ["SearchPlan", "LayerCapture", "data_terms", "relaxed_data_terms", "penalty_terms", "relaxed_penalty_terms",
           "forward_inputs", "visual_positions", "LOG_SCORE_FLOOR"]

#: Scores are clamped to at least this before the log of equation 12 (attention probabilities may underflow).
LOG_SCORE_FLOOR = 1e-30


class SearchPlan(ReductionPlan):
    """Reduction plan of the search forward (decisions 1 and 2 of :mod:`eos_kernels.search`).

    Batches may hold samples with different visual-token counts (LLaVA-NeXT,
    Qwen2(.5)-VL): the patch asks :meth:`schedule` once per distinct count of a
    forward (each sample follows equation 11 from its own count; a count below
    K_min passes through) and :meth:`finish` once per layer and group of
    samples reducing alike. Bookkeeping of the last reduced forward (since
    :meth:`new_forward`, else since the first ``schedule`` after a ``finish``):

    - ``schedules``: ``{count: [(layer, incoming, kept), ...]}`` of every count seen;
    - ``last_schedule``: the schedule of the largest count seen;
    - ``soft_kept``: ``{layer: Σ_i p_i}`` (equation 12's soft kept count,
      detached) averaged over the samples that reduced at ``layer``, every sample
      weighing one (a sample-weighted mean over the groups); for logging only --
      the budget penalty uses the expected chain N̄ of the search space.

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
        self.schedules: dict[int, list[tuple[int, int, int]]] = {}
        self.soft_kept: dict[int, torch.Tensor] = {}
        self._soft_sum: dict[int, torch.Tensor] = {}
        self._soft_n: dict[int, int] = {}
        self._fresh = True
        #: extra arguments of SearchSpace.export: the relaxed search's hard finish deploys its sharpened gates
        self.export_kwargs: dict = {}

    def new_forward(self) -> None:
        """Start the bookkeeping of a new forward (:func:`data_terms` calls it before each reduced forward)."""
        self._fresh = True

    def export(self, num_visual_tokens: int | None = None, name: str | None = None):
        """The Θ the search would deploy now (the rule of every search forward)."""
        return self.space.export(self.gate_threshold, self.max_reducers, num_visual_tokens, name=name,
                                 **self.export_kwargs)

    def schedule(self, num_visual_tokens: int):
        # asked once per distinct visual count at the start of every prefill, before any `finish`:
        # the first call of a forward starts its bookkeeping afresh
        if self._fresh:
            self._fresh = False
            self.schedules = {}
            self._soft_sum, self._soft_n = {}, {}
            self.soft_kept = {}
        if num_visual_tokens < self.space.k_min:  # too few to reduce: this sample passes through
            sched = []
        else:
            theta = self.export(num_visual_tokens)
            # the active layers and operator parameters depend on the space only, not on the count
            self.current = {r.layer: r for r in theta.reducers}
            sched = theta.schedule(num_visual_tokens)
        self.schedules[num_visual_tokens] = sched
        self.last_schedule = self.schedules[max(self.schedules)]
        return sched

    def operator_kwargs(self, layer: int) -> dict:
        kwargs = self.space.operator_params(layer)
        kwargs.update(beta=self.space.beta, norm=self.space.norm, impl=self.impl)
        return kwargs

    def regime(self, layer: int) -> str:
        return self.current[layer].regime

    def finish(self, layer, reduced, scores, anchor_idx, kept):
        self._fresh = True  # the next `schedule` belongs to the next forward
        # equation 12 on log-scores: alpha acts on log(q_i / q_(K)), whatever N is
        z = torch.log(scores.float().clamp_min(LOG_SCORE_FLOOR))
        p = self.space.keep_probability(z, layer, kept)
        # sample-weighted mean over the groups of this forward (samples reducing alike form one group)
        total = p.detach().sum(dim=1).sum()
        self._soft_sum[layer] = self._soft_sum.get(layer, 0) + total
        self._soft_n[layer] = self._soft_n.get(layer, 0) + p.shape[0]
        self.soft_kept[layer] = self._soft_sum[layer] / self._soft_n[layer]
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


def _positions_after(report, layer: int, batch: int, length: int, device):
    """Original positions [B, L_l] of the rows leaving ``layer`` in the last reduced forward, and
    which of them are real (bool [B, L_l], False at the padding slots of a ragged batch; None: all)."""
    kept, valid = None, None
    if report is not None:
        for stage in report.stages:
            if stage.layer <= layer:
                kept, valid = stage.kept_positions, stage.valid_slots
    if kept is None or kept.shape[1] != length:
        # unreduced so far, or the last layer (scattered back to the input length)
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, length), None
    return kept.to(device), (None if valid is None else valid.to(device))


def _answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict an answer token (any sample): 1-D long, ascending."""
    targets = labels[:, 1:] != -100
    return targets.any(dim=0).nonzero().flatten()


def _adapter(model, adapter=None):
    if adapter is not None:
        return adapter
    from eos_kernels.integrations.auto import adapter_for

    return adapter_for(model)


def visual_positions(model: nn.Module, input_ids: torch.Tensor, adapter=None) -> torch.Tensor:
    """bool [B, L]: the visual placeholder positions (the adapter's ids: images, and videos where the family has them)."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in _adapter(model, adapter).placeholder_ids(model):
        mask |= input_ids == i
    return mask


_FORWARD_PARAMETERS: dict = {}  # forward function -> its named parameters (inspect.signature is slow per batch)


def _forward_parameters(model: nn.Module) -> frozenset:
    import inspect

    forward = model.forward
    key = getattr(forward, "__func__", None)
    names = _FORWARD_PARAMETERS.get(key) if key is not None else None
    if names is None:
        names = frozenset(n for n, p in inspect.signature(forward).parameters.items()
                          if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        if key is not None:  # a method: its signature is its function's (keyed on the function, not the model)
            _FORWARD_PARAMETERS[key] = names
    return names


def forward_inputs(model: nn.Module, batch, *, input_ids=None, attention_mask=None, pixel_values=None,
                   image_inputs=None) -> dict:
    """The keyword arguments of ``model(...)`` for ``batch`` (or the given tensors), any family.

    ``input_ids``, ``attention_mask``, ``pixel_values`` and those of the image
    processor's other outputs (``image_sizes``, ``image_grid_thw``, ...) that the
    model's forward names; ``mm_token_type_ids`` (0 text, 1 image, 2 video) when
    the forward takes it (Qwen2(.5)-VL on recent transformers), ``token_type_ids``
    (1 image, Gemma 3) likewise. Inputs the forward
    does not name are dropped: a ``**kwargs`` forward would hand them to its layers."""
    ids = batch.input_ids if input_ids is None else input_ids
    if batch is None and image_inputs is None:
        image_inputs = {}
    names = _forward_parameters(model)
    out = {"input_ids": ids,
           "attention_mask": batch.attention_mask if attention_mask is None else attention_mask,
           "pixel_values": batch.pixel_values if pixel_values is None else pixel_values}
    extra = getattr(batch, "image_inputs", {}) if image_inputs is None else image_inputs
    for k, v in extra.items():
        if k in names and k not in out:
            out[k] = v
    if "mm_token_type_ids" in names and "mm_token_type_ids" not in out:
        types_ = torch.zeros_like(ids)
        image_id = getattr(model.config, "image_token_id", None)
        video_id = getattr(model.config, "video_token_id", None)
        if image_id is not None:
            types_ = types_.masked_fill(ids == image_id, 1)
        if video_id is not None:
            types_ = types_.masked_fill(ids == video_id, 2)
        out["mm_token_type_ids"] = types_
    if "token_type_ids" in names and "token_type_ids" not in out and getattr(model.config, "image_token_id", None) \
            is not None:  # Gemma 3: 1 at the image tokens (its bidirectional image blocks), as its processor gives
        out["token_type_ids"] = (ids == model.config.image_token_id).long()
    return out


def _patch_plan(model: nn.Module):
    """The plan ``model`` is patched with (None when not patched)."""
    from eos_kernels.patching import _STATE_ATTR

    state = model.__dict__.get(_STATE_ATTR)
    return getattr(state, "plan", None)


def data_terms(model: nn.Module, batch, capture: LayerCapture | None, *, autocast=None,
               align: bool = True, adapter=None) -> dict:
    """Answer CE and alignment *sums* of one micro-batch (the model must be patched with a SearchPlan).

    Returns a dict: ``ce_sum`` (0-d, with grad), ``answer_tokens`` (int),
    ``align_sse`` (dict layer -> 0-d sum of squared errors over the text
    positions and features, with grad; empty without ``align``),
    ``text_tokens`` (int), ``hidden_size`` (int), ``report`` (the reduced
    forward's :class:`~eos_kernels.patching.EOSReport`).

    Any supported family (``adapter``: default from the model's class): the
    visual positions are the adapter's placeholder ids, the family's image
    inputs come from :func:`forward_inputs`. In a ragged batch (samples reduced
    at different counts) the padding slots of the shorter samples
    (``StageRecord.valid_slots``) are left out of the alignment.
    """
    ctx = autocast if autocast is not None else contextlib.nullcontext
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    visual = visual_positions(model, ids, adapter)
    text = mask.bool() & ~visual
    inputs = forward_inputs(model, batch)
    reference = _reference_states(model, inputs, capture, text, ctx, suspended(model)) if align else {}
    keep = _answer_positions(labels)
    grab = capture.capturing() if reference else contextlib.nullcontext({})
    plan = _patch_plan(model)
    if hasattr(plan, "new_forward"):
        plan.new_forward()
    with prompt_lengths(model, batch.prompt_lengths), grab as out, ctx():
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    report = get_report(model)
    sse = {}
    hidden_size = 0
    for i, ref in reference.items():
        h = out[i]
        B, Ll, d = h.shape
        hidden_size = d
        pos, valid = _positions_after(report, i, B, Ll, h.device)
        cur_text = text.gather(1, pos)
        if valid is not None:  # a padding slot repeats its sample's last position: count it once
            cur_text = cur_text & valid
        diff = h[cur_text].float() - ref.float()
        sse[i] = diff.pow(2).sum()
    return _terms(logits, labels[:, keep + 1], sse, text, hidden_size, report)


def _reference_states(model: nn.Module, inputs: dict, capture: LayerCapture | None, text: torch.Tensor, ctx,
                      unreduced) -> dict:
    """The captured layers' hidden states at the ``text`` positions of a no-grad forward with the search's
    hooks idle (``unreduced``: the context that idles them); empty without a capture."""
    if capture is None or not capture.indices:
        return {}
    with torch.no_grad(), unreduced, capture.capturing() as out, ctx():
        model(**inputs, use_cache=False, logits_to_keep=1)
    return {i: out[i][text] for i in capture.indices}


def _terms(logits: torch.Tensor, targets: torch.Tensor, sse: dict, text: torch.Tensor, hidden_size: int,
           report, **extra) -> dict:
    """The result of :func:`data_terms` / :func:`relaxed_data_terms`: the answer CE sum over ``targets``
    (-100: no answer token) and the given alignment sums."""
    ce_each = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=-100, reduction="none").view(targets.shape)
    return {
        "ce_sum": ce_each.sum(),
        "ce_rows": ce_each.detach().sum(-1),  # [B]: each sample's answer CE sum (sampled structures' score)
        "answer_tokens": int((targets != -100).sum()),
        "align_sse": sse,
        "text_tokens": int(text.sum()),
        "hidden_size": hidden_size,
        "report": report,
        **extra,
    }


def relaxed_data_terms(model: nn.Module, batch, capture: LayerCapture | None, relaxed, *, autocast=None,
                       align: bool = True, adapter=None, gate_noise: torch.Tensor | None = None,
                       structure: torch.Tensor | None = None, log_ratio: float | None = None) -> dict:
    """:func:`data_terms` of the relaxed forward (:mod:`eos_kernels.search.relaxed`, installed as ``relaxed``).

    The same sums: answer CE, and the squared alignment errors at the text
    positions against a no-grad forward of the stock model (the relaxed hooks
    idle). Nothing is removed while relaxed, so text positions are the same in
    both forwards. ``gate_noise`` [num_layers, B]: this batch's binary-concrete
    gate noise (None: deterministic gates); ``structure`` with ``log_ratio``: this batch's sampled
    structures (decision 8, :meth:`RelaxedForward.active`). ``report`` is None; ``kept`` holds
    each layer's mean Σ of the presences leaving it (the relaxed kept count, for
    the log)."""
    from eos_kernels.patching.hooks import _rating_rows

    ctx = autocast if autocast is not None else contextlib.nullcontext
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    visual = visual_positions(model, ids, adapter)
    real = mask.bool()
    text = real & ~visual
    real_or_none = None if bool(real.all()) else real
    rows = _rating_rows(visual, real_or_none, batch.prompt_lengths)
    inputs = forward_inputs(model, batch)
    # the relaxed hooks act only inside relaxed.active: outside it the forward is the stock model's
    reference = _reference_states(model, inputs, capture, text, ctx, contextlib.nullcontext()) if align else {}
    keep = _answer_positions(labels)
    grab = capture.capturing() if reference else contextlib.nullcontext({})
    with relaxed.active(visual, rows, real_or_none, gate_noise, structure, log_ratio) as state, grab as out, ctx():
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    sse = {i: (out[i][text].float() - ref.float()).pow(2).sum() for i, ref in reference.items()}
    hidden_size = next(iter(reference.values())).shape[-1] if reference else 0
    return _terms(logits, labels[:, keep + 1], sse, text, hidden_size, None,
                  kept={layer: float(k.mean()) for layer, k in state.kept.items()})


def relaxed_penalty_terms(space: SearchSpace, sharpness: float, budget: float, max_reducers: float,
                          flops=None, stochastic: bool = False, log_ratio: float | None = None) -> dict:
    """The one-sided penalties of the relaxed search, on its expected token chain
    (:func:`~eos_kernels.search.relaxed.expected_chain`): ``budget`` on the tokens entering the last layer,
    ``layers`` on the expected number of active layers among those that can reduce (Σ ĝ, or Σ g with
    binary-concrete gates), and, with ``flops`` = ``(cap, ratio_fn)``, the estimated prefill FLOPs ratio
    ``ratio_fn(chain)`` over ``cap`` (0 without a cap). With ``log_ratio`` (sampled structures, decision 8)
    the chain is :func:`~eos_kernels.search.sampled.mean_field_chain`, whose final count is the budget by
    construction (a zero budget penalty), and the gates are g."""
    from eos_kernels.search.relaxed import expected_chain, sharpen_gates
    from eos_kernels.search.sampled import mean_field_chain

    if log_ratio is not None:
        chain = mean_field_chain(space.gates(), space.discard(), space.num_visual_tokens, log_ratio)
        stochastic = True
    else:
        chain = expected_chain(space, sharpness, space.num_visual_tokens, stochastic)
    tokens = chain[-1]
    gates = space.gates() if stochastic else sharpen_gates(space.gates(), sharpness)
    active = gates[:-1].sum()
    out = {
        "budget": space.budget_penalty(budget, tokens=tokens),
        "layers": torch.relu(active - max_reducers) ** 2,
        "expected_tokens": tokens,
        "flops": torch.zeros((), dtype=chain.dtype, device=chain.device),
        "expected_flops": None,
    }
    if flops is not None:
        cap, ratio_fn = flops
        ratio = ratio_fn(chain)
        out["expected_flops"] = ratio
        if cap is not None:
            out["flops"] = torch.relu(ratio / cap - 1.0) ** 2
    return out


def penalty_terms(space: SearchSpace, budget: float, max_reducers: float) -> dict:
    """Unweighted one-sided penalties of equation 13 and the expected final count N̄_L."""
    tokens = space.expected_tokens()[-1]
    return {
        "budget": space.budget_penalty(budget, tokens=tokens),
        "layers": space.layer_penalty(max_reducers),
        "expected_tokens": tokens,
    }
