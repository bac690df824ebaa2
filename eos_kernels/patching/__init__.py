"""EOS token reduction inside a stock Hugging Face decoder, per model instance.

This package is the model-agnostic half of :func:`eos_kernels.patch`; a model
family plugs in through a small :class:`~.adapter.VisionLanguageAdapter` (one
file each in ``eos_kernels.integrations``: LLaVA-1.5, LLaVA-NeXT/OneVision,
Qwen2(.5)-VL, Qwen3-VL, InternVL, Gemma 3; a family may add removable hooks of its own,
``DecoderAdapter.install_hooks``). Its modules: ``compat`` (versions, lookups by type or role, the
drift error), ``plan`` (what to reduce), ``adapter``, ``report``, ``cache`` (the
slot map of a reduced KV cache and the masks fitted to it), ``hooks`` (the
per-forward context and the reduction step); patching and unpatching here.
Supported transformers:
``5.0 <= version < 6`` (the 5.x decoder-layer API), tested in CI on the oldest
and newest releases of :data:`TESTED_TRANSFORMERS`; an older release raises
``RuntimeError`` at patch time, a newer one warns once.

Living on transformers' internals: everything the hooks read from a call is
found by type or role -- the ``Cache`` among the arguments (whatever its
keyword: ``past_key_values`` before 5.24, ``cache`` since), the rotary
``(cos, sin)`` pair, the hidden states -- and every call that does not look as
expected (a decode step on a reduced cache the decoder stack did not show, no
rotary pair, a mask that does not cover the prefill, an unknown argument with a
sequence dimension, a layer output of unknown type) raises
:class:`TransformersDriftError` naming the installed version, never degrades
quietly. Nothing reduced means nothing changed: a reducer that keeps all its
tokens does not run, and image placeholders whose embeddings received no image
feature (a forward without ``pixel_values``) are text.

What a patched model does
-------------------------
At each reducer layer ``l`` of a :class:`~eos_kernels.theta.Theta`, during a
*prefill* forward (the KV cache is empty or absent) that contains visual tokens:

1. layer ``l`` runs at full length with the model's own attention
   implementation (eager, sdpa or flash: nothing is switched);
2. its query and key after RoPE are rebuilt from the outputs of the layer's
   ``q_proj``/``k_proj`` (forward hooks, registered on reducer layers only) and
   the very ``(cos, sin)`` the layer received, with the model's own
   ``apply_rotary_pos_emb`` -- so no attention weights are needed, no eager
   attention is forced and no projection is computed twice. (A function
   registered with transformers' ``AttentionInterface`` would also see q/k, but
   it is selected through ``config._attn_implementation``, which the text
   config shares across layers and which also picks the mask builder; the
   projection hooks leave both untouched.)
3. :func:`~eos_kernels.importance.text_to_visual_importance` rates each visual
   token by the attention the *rating rows* pay it: the non-visual, non-padded
   tokens after the sample's first visual token that belong to the prompt
   (inside ``model.generate`` the prompt is the input given to ``generate``, so
   generated tokens never rate; for a plain forward it is the whole input);
4. :func:`~eos_kernels.selection.select_anchors` keeps the ``K`` best visual
   tokens of each sample, :func:`~eos_kernels.operator.eos_reduce` folds the
   other ``M = N - K`` into them, and the sequence leaving layer ``l`` is the
   non-visual tokens (padding included) plus the reduced anchors, in their
   original order.

Later layers get the shorter sequence; their position embeddings ``(cos,
sin)``, position ids and attention mask are gathered at the kept tokens'
*original* positions (RoPE positions are never renumbered), so every layer's
KV cache holds exactly the tokens that layer processed. After the last layer
the hidden states are scattered back to the input length so that logits,
labels and ``logits_to_keep`` keep their usual shapes: positions whose token
was removed get a zero hidden state (zero logits), and with ``labels=`` they
are left out of the loss (the forward gets its own copy of ``labels`` with -100
at the label each removed position would predict).

Decoding (the KV cache not empty) never re-reduces. The layers behind a
reducer have shorter caches, so each one gets the model's attention mask
gathered at the original positions its cache slots hold (for sdpa without
padding the mask is ``None`` and stays ``None``, unless a ragged prefill left
padding slots to mask). The slot -> position map
lives on the cache object itself (``cache._eos_map``), and the cache's
``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave`` /
``crop`` are wrapped on that instance so that beam search and batch
manipulation keep the map aligned with the cache rows. ``generate`` with the
cache therefore gives the same tokens as ``generate(use_cache=False)``, where
every step is a fresh reduced prefill.

Per-layer masks and sliding windows: a decoder stack that hands its layers
different masks and rotary tables (Gemma 3: a sliding-window and a global mask,
local and global RoPE bases) has each sliced once per stage for every distinct
(mask, rotary pair, cache layout). A sliding-window KV cache layer
(``DynamicSlidingWindowLayer``: its last ``W - 1`` slots;
``StaticSlidingWindowLayer``: a rolling buffer) keeps a reduced layer's last
slots, which reach further back than ``W - 1`` positions: decode-step masks map
each slot to its original position and the window, measured in original
positions as RoPE is, masks the slots before it. transformers sizes each mask
by the first cache layer of its kind (full or sliding); where that layer is
behind a reducer (Gemma 3's layer 5), decode-step masks are rebuilt from what
they mean (causal, padding, window) rather than gathered. A ragged batch's
padding slots come first in each row, so that a sliding-window cache keeps
each sample's latest tokens.

Mechanics, all per instance and removable: forward (pre-)hooks on the input
module (it sees ``input_ids``, hence the visual positions), the decoder stack
(per-forward state, the report) and the decoder layers from the first reducer
on (slicing, reduction, the scatter back), forward hooks on the reducer
layers' ``q_proj``/``k_proj``, and an instance attribute ``generate`` that
records the prompt length. No class, global registry or config is modified.
:func:`unpatch_model` removes everything; outputs are then bit-identical to the
unpatched model. The report of the last prefill is ``model.eos_report``
(:func:`get_report`), an :class:`EOSReport`; None from patching until the
first prefill.

Plans, suspension, prompts: a Theta is turned into a :class:`ReductionPlan`
that the prefill asks for its schedule and each reducer's operator arguments;
the differentiable search (:mod:`eos_kernels.search`) patches with its own plan
(``patch_model(model, None, adapter, plan=...)``: differentiable 0-d operator
parameters, a schedule re-derived from the search space at every forward, a
straight-through factor on the anchors) and runs through exactly the same
reduction code. :func:`suspended` runs prefills unreduced without removing the
hooks (the search's reference forward); :func:`prompt_lengths` limits the
rating rows to each sample's prompt in a teacher-forced forward.

Batches: each sample is reduced at its own visual-token count (one image, several
images -- all of a prompt's images form one visual set -- or none): it follows
the plan's schedule for its count, counts above what it holds are clipped, and
a sample without visual tokens passes through. Samples reducing alike share one
batched operator call; when they end at different lengths, the shorter ones
are padded with masked slots inside the patched layers and their KV caches
(``StageRecord.valid_slots``), so decoding, beam search and the scatter back
stay right. Limitations: flex attention's ``BlockMask`` is not
supported (``NotImplementedError``), nor are packed rows (transformers'
padding-free format: a reducing prefill whose first reducer layer sees
flash-attention varlen arguments, or position ids that do not rise by one without
an attention mask, raises ``NotImplementedError``); a prefill is one forward (chunked prefill
would reduce the first chunk only); visual tokens arriving after the prefill
(a later turn on the same cache) are not reduced; ``output_hidden_states``
gives each layer's states at that layer's own length; a compiled forward
(``torch.compile``, static cache) is tested to compile no more graphs while
decoding than the stock model; a patched instance is not safe to run from
several threads at once. ``copy.deepcopy`` gives an independent patched copy;
pickling a patched model raises ``TypeError`` (unpatch first). Assisted
generation may crop the rejected candidate tokens of its reduced prefill (they
lie after the visual tokens); cropping into the visual tokens raises.
"""
from __future__ import annotations

import contextlib
import copy
import types
from typing import Any

import torch
from torch import nn

from .adapter import DecoderAdapter
from .compat import (TESTED_TRANSFORMERS, TRANSFORMERS_MAX, TRANSFORMERS_MIN, TransformersDriftError,
                     check_transformers_version, find_cache, find_position_embeddings)
from .hooks import (REPORT_ATTR as _REPORT_ATTR, _PatchState, _capture_hook, _generate_wrapper, _input_post_hook,
                    _input_pre_hook, _layer_post_hook, _layer_pre_hook, _model_pre_hook, _text_post_hook,
                    _text_pre_hook)
from .plan import ReductionPlan, _ThetaPlan, as_theta
from .report import EOSReport, StageRecord

__all__ = [
    "TESTED_TRANSFORMERS",
    "TRANSFORMERS_MIN",
    "TRANSFORMERS_MAX",
    "TransformersDriftError",
    "find_cache",
    "find_position_embeddings",
    "DecoderAdapter",
    "EOSReport",
    "ReductionPlan",
    "StageRecord",
    "as_theta",
    "check_transformers_version",
    "get_report",
    "is_patched",
    "patch_model",
    "prompt_lengths",
    "suspended",
    "unpatch_model",
]

_STATE_ATTR = "_eos_patch_state"


def get_report(model: nn.Module) -> EOSReport | None:
    """The :class:`EOSReport` of the last prefill forward of a patched model (None before any).

    The same as ``model.eos_report``, which a patched model has from patching on (None until its
    first prefill, and again after a re-patch); an unpatched model has no such attribute, and
    ``get_report`` gives None for it."""
    return model.__dict__.get(_REPORT_ATTR)


def is_patched(model: nn.Module) -> bool:
    return _STATE_ATTR in model.__dict__


def _state_of(model: nn.Module, what: str) -> "_PatchState":
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError(f"{what}: the model is not patched (patch_llava / patch_model first)")
    return state


@contextlib.contextmanager
def suspended(model: nn.Module):
    """Within the block, prefill forwards of the patched ``model`` run unreduced.

    The hooks stay installed (the model is never left unpatched by accident);
    the report of such a forward says the reduction was suspended. Decoding on
    a cache that a reduced prefill filled still reads it correctly. Nests.
    """
    state = _state_of(model, "suspended")
    previous, state.suspended = state.suspended, True
    try:
        yield model
    finally:
        state.suspended = previous


@contextlib.contextmanager
def prompt_lengths(model: nn.Module, lengths):
    """Within the block, only each sample's first ``lengths[b]`` tokens rate the visual tokens.

    A plain forward otherwise lets every text token after the image rate them
    (inside ``generate``, the prompt). A teacher-forced forward of
    prompt + answer uses this to rate with the prompt alone, as ``generate``
    would at deployment. ``lengths``: an int (every sample) or a sequence /
    long tensor [B]. ``generate`` inside the block still uses its own prompt.
    """
    state = _state_of(model, "prompt_lengths")
    if not isinstance(lengths, int):
        lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    previous, state.prompt_length = state.prompt_length, lengths
    try:
        yield model
    finally:
        state.prompt_length = previous


def patch_model(model: nn.Module, theta: Any, adapter: DecoderAdapter, *,
                num_visual_tokens: int | None = None, plan: ReductionPlan | None = None) -> nn.Module:
    """Patch ``model`` (this instance only) to run ``theta`` through ``adapter``.

    Args:
        model: the model instance.
        theta: a :class:`Theta`, a dict in its JSON schema, or a path to a JSON file.
        adapter: the model family's :class:`DecoderAdapter`.
        num_visual_tokens: visual tokens per prompt used to validate ``theta``
            at patch time; defaults to ``adapter.visual_tokens_per_image``.
            The actual count is validated again at every prefill.
        plan: instead of ``theta`` (which must then be None), a
            :class:`ReductionPlan` asked at every prefill which layers reduce,
            how many tokens they keep and with which operator parameters (the
            differentiable search's mode, :mod:`eos_kernels.search`).

    Returns:
        ``model`` itself. Patching an already patched model replaces the old
        configuration.

    Raises:
        RuntimeError: unsupported transformers version.
        ValueError: unsupported model, or ``theta`` invalid for this model
            (a layer beyond the model's layers, a keep above the incoming tokens).
    """
    check_transformers_version()
    if plan is None:
        theta = as_theta(theta)
    elif theta is not None:
        raise TypeError("patch_model: pass either theta or plan, not both")
    elif not isinstance(plan, ReductionPlan):
        raise TypeError(f"plan must be a ReductionPlan, got {type(plan).__name__}")
    adapter.check_model(model)
    num_layers = adapter.num_layers(model)
    if plan is None:
        n_vis = num_visual_tokens if num_visual_tokens is not None else adapter.visual_tokens_per_image(model)
        if n_vis is not None:
            theta.validate(num_layers, int(n_vis))
        else:
            for i, r in enumerate(theta.reducers):
                if r.layer >= num_layers:
                    raise ValueError(
                        f"reducers[{i}].layer: layer {r.layer} does not exist in a model with "
                        f"{num_layers} layers (valid: 0..{num_layers - 1})"
                    )
        plan = _ThetaPlan(theta)
    else:
        for layer_idx in plan.layers:
            if not 0 <= layer_idx < num_layers:
                raise ValueError(f"plan layer {layer_idx} does not exist in a model with {num_layers} layers")
    layers = adapter.decoder_layers(model)
    for layer_idx in plan.layers:
        adapter.check_layer(layers[layer_idx])
    if is_patched(model):
        unpatch_model(model)
    _install(model, adapter, plan)
    return model


def _install(model: nn.Module, adapter: DecoderAdapter, plan: ReductionPlan) -> None:
    """Register the hooks and instance attributes of a patch (the checks are :func:`patch_model`'s)."""
    num_layers = adapter.num_layers(model)
    layers = adapter.decoder_layers(model)
    state = _PatchState(model, adapter, plan)
    handles = state.handles
    try:
        handles.append(model.register_forward_pre_hook(_model_pre_hook(state, model), with_kwargs=True))
        inp = adapter.input_module(model)
        handles.append(inp.register_forward_pre_hook(_input_pre_hook(state, model), with_kwargs=True))
        handles.append(inp.register_forward_hook(_input_post_hook(state), with_kwargs=True, always_call=True))
        text = adapter.text_model(model)
        handles.append(text.register_forward_pre_hook(_text_pre_hook(state, model), with_kwargs=True))
        handles.append(text.register_forward_hook(_text_post_hook(state, model), with_kwargs=True,
                                                  always_call=True))
        if state.reducers:
            first = state.first_reducer
            last = num_layers - 1
            for i, layer in enumerate(layers):
                if i < first:
                    continue
                handles.append(layer.register_forward_pre_hook(_layer_pre_hook(state, model, i), with_kwargs=True))
                if i in state.reducers or i == last:
                    handles.append(layer.register_forward_hook(
                        _layer_post_hook(state, model, i, i == last), with_kwargs=True))
                if i in state.reducers:
                    qm, km = adapter.qk_modules(layer)
                    handles.append(qm.register_forward_hook(_capture_hook(state, i, "q")))
                    handles.append(km.register_forward_hook(_capture_hook(state, i, "k")))
        handles.extend(adapter.install_hooks(model, state))
        gen = getattr(model, "generate", None)
        if callable(gen):
            model.__dict__["generate"] = _generate_wrapper(state, model)
            state.installed_generate = model.__dict__["generate"]
    except Exception:
        for h in handles:
            h.remove()
        raise
    # copy.deepcopy and pickle look these up on the instance: a copy gets its own hooks and state
    model.__dict__["__deepcopy__"] = types.MethodType(_deepcopy_patched, model)
    model.__dict__["__reduce_ex__"] = types.MethodType(_refuse_pickle, model)
    model.__dict__[_STATE_ATTR] = state
    # no prefill yet: model.eos_report is None (as get_report says) rather than an AttributeError
    model.__dict__[_REPORT_ATTR] = None


def _deepcopy_patched(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a patched model: an independent copy, patched with a copy of the same plan."""
    state = model.__dict__[_STATE_ATTR]
    report = model.__dict__.get(_REPORT_ATTR)
    adapter, plan = state.adapter, state.plan
    prompt_length, suspended_ = state.prompt_length, state.suspended
    _uninstall(model)
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        _install(model, adapter, plan)
        new_state = model.__dict__[_STATE_ATTR]
        new_state.prompt_length, new_state.suspended = prompt_length, suspended_
        if report is not None:
            model.__dict__[_REPORT_ATTR] = report
    _install(clone, copy.deepcopy(adapter, memo), copy.deepcopy(plan, memo))
    if report is not None:
        clone.__dict__[_REPORT_ATTR] = report
    return clone


def _refuse_pickle(model: nn.Module, protocol):
    raise TypeError(
        f"cannot pickle a model patched by eos_kernels ({type(model).__name__}): its hooks hold per-instance "
        "state. Unpatch it first (eos_kernels.unpatch_llava / unpatch_model), save it (or its state_dict), "
        "and patch the loaded model again with the same Theta."
    )


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove every hook and attribute :func:`patch_model` added; a no-op on an unpatched model."""
    model.__dict__.pop(_REPORT_ATTR, None)
    _uninstall(model)
    return model


def _uninstall(model: nn.Module) -> None:
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    for name in ("__deepcopy__", "__reduce_ex__"):
        model.__dict__.pop(name, None)
    for h in state.handles:
        h.remove()
    state.handles.clear()
    state.ctx = None
    if getattr(state, "installed_generate", None) is not None and model.__dict__.get("generate") is state.installed_generate:
        if state.had_generate_attr:
            model.__dict__["generate"] = state.old_generate
        else:
            del model.__dict__["generate"]
