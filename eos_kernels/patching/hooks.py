"""The per-forward context, the hooks of a patched model and the reduction step.

Data flows one way: an adapter describes a model; :func:`~eos_kernels.patching.patch_model`
installs these hooks; at each prefill they ask the plan for the schedule, reduce, and record
into the report and the cache map; decoding reads the cache map."""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from torch import nn

from eos_kernels.importance import text_to_visual_importance
from eos_kernels.operator import eos_reduce
from eos_kernels.selection import select_anchors

from .adapter import DecoderAdapter
from .cache import (CACHE_MAP_ATTR, _CacheMap, _cache_layout, _cache_seq_length, _check_mask, _gather_mask,
                    _gather_seq, _is_flash, _key_count, _key_window, _layout_name, _mask_cols, _sizing_layer,
                    _take, _wrap_cache_methods)
from .compat import (_CACHE_POSITION_KEYS, _MASK_KEYS, _POSITION_ID_KEYS, _drift, _is_cache, _output_cache,
                     find_cache, find_position_embeddings)
from .plan import ReductionPlan
from .report import EOSReport, StageRecord

REPORT_ATTR = "eos_report"

class _Context:
    """State of one forward of the decoder stack."""

    def __init__(self):
        self.mode = "off"  # "prefill" (reducing), "decode" (on a reduced cache), "continue" (on another cache), "off"
        self.batch = 0
        self.length = 0             # input length of this forward
        self.visual: torch.Tensor | None = None   # bool [B, L]
        self.real: torch.Tensor | None = None     # bool [B, L] or None (no padding)
        self.rows: torch.Tensor | None = None     # bool [B, L] rating rows
        self.schedule: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # layer -> per-sample (in, kept)
        self.cur_idx: torch.Tensor | None = None  # long [B, L_cur] original positions (prefill)
        self.valid: torch.Tensor | None = None    # bool [B, L_cur]: False at padding slots (ragged), or None
        self.past = 0                             # decode: tokens in the cache before this step (layer 0)
        self.stage_kwargs: dict | None = None     # sliced kwargs of the current stage, per kind of layer
        self.capturing: int | None = None
        self.captured: dict[str, torch.Tensor] = {}
        self.cache = None
        self.cache_map: _CacheMap | None = None
        self.decode_cols: dict[tuple, Any] = {}
        self.stages: list[StageRecord] = []
        self.note: str | None = None
        self.visual_counts: tuple[int, ...] = ()
        self.text_counts: tuple[int, ...] = ()     # real (not padding) non-visual tokens per sample
        self.found_cache = None                   # the Cache among the decoder stack's arguments (prefill)
        self.labels: torch.Tensor | None = None   # this forward's own copy of `labels`, if any
        self.mask_given = False                   # the decoder stack received an attention mask (prefill)
        self.packing_checked = False              # the packed-rows guard ran on this prefill
        self.padding: torch.Tensor | None = None  # the 2-D attention mask [B, >= L] of this forward, if one was given


class _PatchState:
    def __init__(self, model, adapter: DecoderAdapter, plan: ReductionPlan):
        self.adapter = adapter
        self.plan = plan
        self.reducers: frozenset[int] = frozenset(plan.layers)  # layers that may reduce (hooked)
        self.num_layers = adapter.num_layers(model)
        self.text_sizes = adapter.text_sizes(model)
        self.handles: list = []
        self.pending_visual: torch.Tensor | None = None
        self.pending_padding: torch.Tensor | None = None
        self.pending_caller_mask: bool | None = None  # the input module's caller gave an attention mask
        self.pending_labels: torch.Tensor | None = None
        self.prompt_length: int | torch.Tensor | None = None
        self.suspended = False
        self.ctx: _Context | None = None
        self.had_generate_attr = "generate" in model.__dict__
        self.old_generate = model.__dict__.get("generate")
        self.first_reducer = min(self.reducers) if self.reducers else None
        self.installed_generate = None
        layers = adapter.decoder_layers(model)
        # transformers releases whose GradientCheckpointingLayer checkpoints __call__ run module hooks
        # again in the backward recomputation; 5.23 checkpoints forward (hooks outside)
        self.hooks_in_checkpoint = bool(layers) and type(layers[0]).__call__ is not nn.Module.__call__
        self.layers = layers


def _model_pre_hook(state: _PatchState, model):
    """Give the forward its own copy of ``labels``, so that removed positions can leave the loss."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters)
        labels_pos = params.index("labels") if "labels" in params else None
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        labels_pos = None

    def hook(module, args, kwargs):
        state.pending_labels = None
        if torch.is_tensor(kwargs.get("labels")):
            state.pending_labels = kwargs["labels"].clone()
            return args, {**kwargs, "labels": state.pending_labels}
        if labels_pos is not None and len(args) > labels_pos and torch.is_tensor(args[labels_pos]):
            state.pending_labels = args[labels_pos].clone()
            return args[:labels_pos] + (state.pending_labels,) + args[labels_pos + 1:], kwargs
        return None

    return hook


def _mask_removed_labels(ctx: _Context) -> None:
    """labels[t + 1] = -100 where the token at t was removed (its logits are zero; the loss shifts by one)."""
    labels = ctx.labels
    if labels.shape != (ctx.batch, ctx.length):
        return  # not the prefill's labels; transformers raises its own error on a mismatch
    idx = ctx.cur_idx.to(labels.device)
    removed = torch.ones(labels.shape, dtype=torch.bool, device=labels.device).scatter(1, idx, False)
    labels[:, 1:].masked_fill_(removed[:, :-1], -100)


def _input_pre_hook(state: _PatchState, model):
    def hook(module, args, kwargs):
        state.pending_visual = None
        # the 2-D padding mask of a decode step whose masks are rebuilt (_rebuilt_mask); kept only then: a
        # tensor stored at every step would cost a compiled decode loop graphs
        cache = find_cache(args, kwargs)
        cmap = cache.__dict__.get(CACHE_MAP_ATTR) if cache is not None and hasattr(cache, "__dict__") else None
        state.pending_padding = (_padding_2d(kwargs.get("attention_mask"))
                                 if cmap is not None and cmap.rebuilds else None)
        state.pending_caller_mask = kwargs.get("attention_mask") is not None
        state.pending_visual = state.adapter.visual_mask(model, args, kwargs)
        return None

    return hook


def _input_post_hook(state: _PatchState):
    def hook(module, args, kwargs, output):
        state.pending_visual = state.pending_padding = state.pending_caller_mask = None
        return None

    return hook


def _text_pre_hook(state: _PatchState, model):
    def hook(module, args, kwargs):
        ctx = _Context()
        state.ctx = ctx
        visual, state.pending_visual = state.pending_visual, None
        ctx.labels, state.pending_labels = state.pending_labels, None
        padding, state.pending_padding = state.pending_padding, None
        caller_mask, state.pending_caller_mask = state.pending_caller_mask, None
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = embeds if embeds is not None else ids
        if ref is None:
            if visual is not None and bool(visual.any()):
                raise _drift("the decoder stack was called without `inputs_embeds` or `input_ids` after an input "
                             "with visual tokens")
            return None
        B, L = ref.shape[0], ref.shape[1]
        ctx.batch, ctx.length = B, L
        cache = find_cache(args, kwargs)
        past = _cache_seq_length(cache) if cache is not None else 0
        if past > 0:  # decoding (or continuing) on a filled cache: never reduce
            cmap = cache.__dict__.get(CACHE_MAP_ATTR) if hasattr(cache, "__dict__") else None
            if cmap is not None and cmap.first_layers:
                ctx.mode = "decode"
                ctx.cache = cache
                ctx.cache_map = cmap
                ctx.past = past
                if cmap.rebuilds:  # the 2-D padding mask in original positions: the decoder stack's own, else
                    # its caller's (Gemma 3's stack gets a mapping of prepared masks)
                    ctx.padding = _padding_2d(kwargs.get("attention_mask"))
                    ctx.padding = padding if ctx.padding is None else ctx.padding
            else:
                ctx.mode = "continue"
            return None
        ctx.found_cache = cache
        # ---- prefill
        if cache is not None and hasattr(cache, "__dict__"):
            cache.__dict__.pop(CACHE_MAP_ATTR, None)  # a reused cache: forget the old map
        # a mapping of prepared masks (Gemma 3's stack) is what the input module built, from the position ids alone
        # where its caller gave no mask: a packed row's masks then keep its sequences apart, so no mask was given
        mask = kwargs.get("attention_mask")
        ctx.mask_given = mask is not None and not (isinstance(mask, Mapping) and caller_mask is False)
        real = _real_tokens(mask, B, L)
        if real is not None:
            real = real.to(ref.device)
        if state.suspended or visual is None or visual.shape != (B, L):
            ctx.note = ("reduction suspended (eos_kernels.patching.suspended)" if state.suspended else
                        "no visual-token information (the input module was not called)")
            ctx.visual_counts = (0,) * B  # not identified: every real token counts as text
            ctx.text_counts = tuple(real.sum(dim=1).tolist()) if real is not None else (L,) * B
            ctx.mode = "off"
            return None
        visual = visual.to(device=ref.device, dtype=torch.bool)
        visual = _with_features(state.adapter, model, visual, embeds)
        text = ~visual if real is None else real & ~visual
        counts, texts = torch.stack((visual.sum(dim=1), text.sum(dim=1))).tolist()  # one device sync
        ctx.visual_counts, ctx.text_counts = tuple(counts), tuple(texts)
        if not any(counts):
            ctx.note = "no image tokens in the input: passed through unreduced"
            ctx.mode = "off"
            return None
        if not state.reducers:
            ctx.note = state.plan.empty_note
            ctx.mode = "off"
            return None
        if state.hooks_in_checkpoint and torch.is_grad_enabled() and any(
                getattr(layer, "gradient_checkpointing", False) and layer.training for layer in state.layers):
            raise NotImplementedError(
                "EOS: gradient checkpointing through a patched model needs a transformers release that "
                "checkpoints decoder-layer forward() with hooks outside the checkpoint (5.23 does); "
                "disable gradient checkpointing or upgrade transformers"
            )
        ctx.schedule = _per_sample_schedule(state.plan, ctx.visual_counts)
        if not ctx.schedule:
            ctx.note = state.plan.empty_note
            ctx.mode = "off"
            return None
        if real is not None and bool(real.all()):
            real = None
        ctx.visual, ctx.real = visual, real
        ctx.rows = _rating_rows(visual, real, state.prompt_length)
        _refuse_packed_rows(state, model, ctx, kwargs, cache, given=True)
        ctx.cache = cache
        ctx.mode = "prefill"
        return None

    return hook


def _per_sample_schedule(plan: ReductionPlan, counts: tuple[int, ...]) -> dict:
    """``{layer: (incoming per sample, kept per sample)}`` over the layers where some sample reduces.

    Each sample follows the plan's schedule for its own visual-token count (a
    sample without visual tokens, or past its own reducers, passes through)."""
    by_count = {n: {layer: kept for layer, _, kept in plan.schedule(n)} for n in set(counts) if n > 0}
    layers = sorted({layer for sched in by_count.values() for layer in sched})
    current = list(counts)
    out = {}
    for layer in layers:
        incoming = tuple(current)
        current = [by_count[n].get(layer, c) if n > 0 else 0 for n, c in zip(counts, current)]
        if any(k < i for k, i in zip(current, incoming)):
            out[layer] = (incoming, tuple(current))
    return out


def _with_features(adapter: DecoderAdapter, model, visual: torch.Tensor, embeds) -> torch.Tensor:
    """The visual positions that hold an image feature: placeholders without one are text.

    Decided from what the decoder stack receives, not from the name of the
    argument that carried the image (``pixel_values``, precomputed encoder
    outputs, ...): a placeholder whose embedding is still the token's own row
    received no feature."""
    if embeds is None or not bool(visual.any()):
        return visual if embeds is not None else torch.zeros_like(visual)
    rows = adapter.placeholder_rows(model).to(device=embeds.device, dtype=embeds.dtype)  # [P, d]
    plain = (embeds[visual].unsqueeze(-2) == rows).all(dim=-1).any(dim=-1)  # only the visual positions
    return visual.masked_scatter(visual, ~plain)


def _padding_2d(mask) -> torch.Tensor | None:
    """``mask`` if it is a 2-D padding mask [B, L] (nonzero at real tokens), else None."""
    return mask if torch.is_tensor(mask) and mask.dim() == 2 else None


def _real_tokens(mask, B: int, L: int) -> torch.Tensor | None:
    """bool [B, L], False at padding, from the prefill's attention mask (2-D, a prepared 4-D one, or a
    mapping of prepared masks per layer type: Gemma 3's ``{"full_attention": ..., "sliding_attention": ...}``)."""
    if isinstance(mask, Mapping):
        values = list(mask.values())
        if any(v is not None and not torch.is_tensor(v) for v in values):
            raise _drift(f"the decoder stack received a mapping of attention masks holding "
                         f"{sorted({type(v).__name__ for v in values})}; expected tensors or None per layer type")
        # every layer type's mask tells padding apart on its diagonal (a token sees itself unless it is padding)
        full = mask.get("full_attention")
        mask = full if torch.is_tensor(full) else next((v for v in values if torch.is_tensor(v)), None)
    if not torch.is_tensor(mask):
        return None
    if mask.dim() == 2 and mask.shape[-1] >= L:
        real = mask[:, :L] != 0
    elif mask.dim() == 4 and mask.shape[-2] >= L and mask.shape[-1] >= L:
        # a prepared mask (e.g. generate with a static cache): at prefill, token j sees itself
        # unless it is padding, so the diagonal tells the padding apart
        ar = torch.arange(L, device=mask.device)
        diag = mask[:, 0, ar, ar]
        if diag.dtype == torch.bool:
            real = diag
        elif diag.is_floating_point():  # additive
            real = diag > torch.finfo(diag.dtype).min / 2
        else:  # an integer 4-D mask is neither kind: added to the scores as is, it hides nothing
            return None
    else:
        return None
    return real.expand(B, L) if real.shape[0] != B else real


def _rating_rows(visual: torch.Tensor, real: torch.Tensor | None,
                 prompt_length: int | torch.Tensor | None) -> torch.Tensor:
    """Text rows that rate the visual tokens: real, non-visual, after the first visual token, in the prompt.

    ``prompt_length``: None (the whole input), an int (every sample) or a long
    tensor [B] (per sample, :func:`prompt_lengths`)."""
    B, L = visual.shape
    pos = torch.arange(L, device=visual.device).unsqueeze(0)
    first = torch.where(visual, pos, L).min(dim=1, keepdim=True).values
    base = ~visual if real is None else (~visual & real)
    rows = base & (pos > first)
    if torch.is_tensor(prompt_length):
        rows = rows & (pos < prompt_length.to(visual.device).view(B, 1))
    elif prompt_length is not None and prompt_length < L:
        rows = rows & (pos < prompt_length)
    # fallbacks for a sample without such rows (e.g. a prompt ending with its image):
    # every real non-visual token, then every real token
    empty = ~rows.any(dim=1, keepdim=True)
    rows = torch.where(empty, base, rows)
    empty = ~rows.any(dim=1, keepdim=True)
    every = torch.ones_like(visual) if real is None else real
    return torch.where(empty, every, rows)


def _text_post_hook(state: _PatchState, model):
    def hook(module, args, kwargs, output):
        ctx, state.ctx = state.ctx, None
        if ctx is None or ctx.mode in ("decode", "continue") or ctx.batch == 0:
            return None
        out_cache = _output_cache(output)
        if out_cache is not None and out_cache is not ctx.found_cache and hasattr(out_cache, "__dict__"):
            cmap = out_cache.__dict__.get(CACHE_MAP_ATTR)
            if cmap is not None and not ctx.stages:
                # the forward ran on a cache that a reduced prefill filled, but the call did not show it
                raise _drift("a forward ran on a KV cache filled by a reduced prefill, but that cache was not "
                             "among the decoder stack's arguments, so the step was treated as a new prefill")
            if ctx.stages and cmap is None:
                raise _drift("a reduced prefill returned a KV cache that its decoder layers never received "
                             "among their arguments; the reduced layers' cache slots cannot be mapped")
        if ctx.stages and ctx.labels is not None:
            _mask_removed_labels(ctx)
        note = ctx.note
        if ctx.mode == "prefill" and len(ctx.stages) != len(ctx.schedule):
            note = "the forward stopped before every reducer ran"
        model.__dict__[REPORT_ATTR] = EOSReport(
            theta_name=state.plan.name,
            num_layers=state.num_layers,
            batch_size=ctx.batch,
            sequence_length=ctx.length,
            visual_tokens=ctx.visual_counts or (0,) * ctx.batch,
            stages=tuple(ctx.stages),
            text_tokens=ctx.text_counts or (ctx.length,) * ctx.batch,
            text_sizes=state.text_sizes,
            note=note,
        )
        return None

    return hook


def _layer_pre_hook(state: _PatchState, model, layer_idx: int):
    def hook(module, args, kwargs):
        ctx = state.ctx
        if ctx is None:
            return None
        cache = find_cache(args, kwargs)
        if ctx.mode == "decode":
            if cache is None:
                raise _drift(f"decoder layer {layer_idx} was called without the KV cache during a decode step "
                             "(no transformers Cache among its arguments)")
            return _decode_kwargs(state, model, ctx, layer_idx, module, args, kwargs)
        if (cache is not None and ctx.mode != "continue" and hasattr(cache, "__dict__")
                and cache.__dict__.get(CACHE_MAP_ATTR) is not None and _cache_seq_length(cache) > 0
                and ctx.found_cache is not cache):
            raise _drift(f"decoder layer {layer_idx} received a KV cache filled by a reduced prefill that the "
                         "decoder stack's call did not show, so this decode step was taken for a new prefill")
        if ctx.mode != "prefill":
            return None
        if not ctx.packing_checked:  # the first hooked layer runs before any reduction
            ctx.packing_checked = True
            _refuse_packed_rows(state, model, ctx, kwargs, cache)
        if layer_idx in ctx.schedule:
            ctx.capturing = layer_idx
            ctx.captured = {}
        if ctx.cur_idx is None:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not torch.is_tensor(hidden) or hidden.shape[1] != ctx.cur_idx.shape[1]:
            raise _drift(f"decoder layer {layer_idx} did not receive the shortened hidden states as its first "
                         "argument or `hidden_states`")
        # the arguments fitted to the kept tokens once per stage and kind of layer (attention type, cache layout:
        # Gemma 3's sliding-window and global layers get their own mask, rotary table and cache layer); keyed on
        # constants, as the decode steps are (torch.compile guards on what a key reads)
        layout = _cache_layout(cache, layer_idx) if cache is not None else ("dynamic",)
        key = (_layer_kind(module), layout)
        if ctx.stage_kwargs is None:
            ctx.stage_kwargs = {}
        if key not in ctx.stage_kwargs:
            ctx.stage_kwargs[key] = _slice_prefill_kwargs(state, model, ctx, layer_idx, args, kwargs, layout)
        new = dict(kwargs)
        new.update(ctx.stage_kwargs[key])
        for name in _CACHE_POSITION_KEYS:
            if kwargs.get(name) is not None:
                new[name] = torch.arange(ctx.cur_idx.shape[1], device=ctx.cur_idx.device)
        return args, new

    return hook


#: flash-attention varlen keywords of transformers' padding-free path (``DataCollatorWithFlattening``)
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _refuse_packed_rows(state: _PatchState, model, ctx: _Context, kwargs: dict, cache, given: bool = False) -> None:
    """Refuse a prefill whose rows hold several packed sequences.

    transformers' padding-free format (``DataCollatorWithFlattening``: several sequences in one
    row, ``position_ids`` restarting, optionally flash-attention varlen keywords) keeps the
    sequences apart inside attention only. The reduction works per row: it would rate one
    sequence's visual tokens with another's text and keep one budget for all of them, so the
    outputs would differ from the padded batch without a sign. Checked twice, without an
    attention mask: on the decoder stack's arguments (``given``: what the caller passed, i.e.
    varlen keywords or text position ids -- [B, L], or row 0 of Qwen's [4, B, L] -- that do not
    rise by one: packed by intent, even where a model's mask would not separate them), and on the
    first reducer layer's, by transformers' own rules for the position ids it builds its mask
    from (sdpa / eager without a cache; flash with batch 1)."""
    varlen = [k for k in _VARLEN_KEYS if kwargs.get(k) is not None]
    packed = bool(varlen)
    pid = kwargs.get("position_ids")
    if given and torch.is_tensor(pid) and pid.dim() == 3 and pid.shape[0] == 4:
        pid = pid[0]  # Qwen-VL's text row (the other three are the multimodal (t, h, w) positions)
    if not packed and not ctx.mask_given and torch.is_tensor(pid) and pid.dim() == 2 and pid.shape[-1] > 1:
        steps = pid[:, 1:] - pid[:, :-1]
        if given:
            packed = bool((steps != 1).any())
        elif _is_flash(state.adapter.attn_implementation(model)):
            packed = pid.shape[0] == 1 and bool((steps != 1).any())
        elif cache is None:
            packed = bool((steps != 1).any())
    if packed:
        how = (f"flash-attention varlen arguments {varlen}" if varlen else
               "no attention mask and position ids that do not rise by one within a row")
        raise NotImplementedError(
            f"EOS: the model's attention treats this forward's rows as several packed sequences ({how}: "
            "transformers' padding-free format, e.g. DataCollatorWithFlattening; transformers 5.0's Qwen3-VL also "
            "reads its own position ids this way in a forward without attention mask and cache). The reduction "
            "works per row and would mix the packed sequences' visual tokens and budgets. Pass a padded batch "
            "with an attention_mask (one sequence per row), or run the packed forward unreduced inside "
            "eos_kernels.patching.suspended(model)."
        )


def _check_unknown_args(ctx: _Context, layer_idx: int, args: tuple, kwargs: dict, known: set, lengths) -> None:
    """Drift guard: no tensor argument the patch does not understand may carry a sequence dimension."""
    def has_length(value):
        tensors = [value] if torch.is_tensor(value) else (
            [t for t in value if torch.is_tensor(t)] if isinstance(value, (tuple, list)) else [])
        return any(t.dim() >= 2 and any(n in lengths for n in t.shape[1:]) for t in tensors)

    unknown = [f"`{k}`" for k, v in kwargs.items() if k not in known and has_length(v)]
    unknown += [f"positional argument {i}" for i, v in enumerate(args[1:], 1) if has_length(v)]
    if unknown:
        raise _drift(f"decoder layer {layer_idx} received {', '.join(unknown)} with a sequence dimension that "
                     "the patch does not know how to fit to the layer's shortened sequence")


def _slice_prefill_kwargs(state: _PatchState, model, ctx: _Context, layer_idx: int, args: tuple,
                          kwargs: dict, layout: tuple = ("dynamic",)) -> dict:
    """The arguments of a layer behind a reducer, fitted to the kept tokens; ``layout``: its cache layer's
    (:func:`~.cache._cache_layout`)."""
    idx = ctx.cur_idx
    out = {}
    known = {"hidden_states"}
    pe_key = find_position_embeddings(kwargs, ctx.length)
    if pe_key is None:
        raise _drift(f"decoder layer {layer_idx} was called without rotary position embeddings (no (cos, sin) "
                     f"pair of tensors with the sequence length {ctx.length} among its arguments)")
    known.add(pe_key)
    out[pe_key] = tuple(_gather_seq(t, idx.to(t.device), dim=t.dim() - 2) for t in kwargs[pe_key])
    for name in _POSITION_ID_KEYS:
        pid = kwargs.get(name)
        known.add(name)
        if pid is None:
            continue
        if not (torch.is_tensor(pid) and pid.shape[-1] == ctx.length):
            raise _drift(f"decoder layer {layer_idx}'s `{name}` is not a tensor [..., {ctx.length}]")
        if _is_flash(state.adapter.attn_implementation(model)):
            # flash attention reads non-contiguous position ids as packed sequences (batch 1, no mask);
            # RoPE already comes from the sliced position embeddings
            out[name] = None
        else:
            out[name] = _gather_seq(pid, idx.to(pid.device), dim=pid.dim() - 1)
    if _is_flash(state.adapter.attn_implementation(model)) and (
            layout[0] in ("sliding", "static-sliding")
            or getattr(state.adapter.attention(state.layers[layer_idx]), "sliding_window", None)):
        raise NotImplementedError(
            f"EOS: decoder layer {layer_idx} has a sliding-window attention, which flash attention measures in "
            "cache slots; behind a reducer the window must be measured in original positions: use sdpa or eager")
    # the keys this layer attends to at the prefill: its kept tokens (slots 0 .. L' - 1), then the empty slots
    # of a static buffer. (The slot counts read idx.shape only where the base formulas did: torch.compile
    # specialises on every shape a Python int is taken from.)
    kept_len = idx.shape[1]
    for name in _MASK_KEYS:
        known.add(name)
        if name not in kwargs:
            continue
        mask = kwargs[name]
        _check_mask(mask)
        if mask is None and ctx.valid is not None:
            # ragged reduction: padding slots must be masked even though the batch had no padding (and with no
            # mask the window, if any, cuts nothing: transformers leaves it out only below the window size)
            _, empty = _key_window(layout, 0, kept_len)
            cols, invalid = _mask_cols(idx, ctx.length, ctx.length, kept_len + empty, ctx.valid)
            out[name] = _causal_mask(state, model, idx, cols, invalid, kwargs[pe_key][0].dtype)
        elif mask is not None:
            kv_total = mask.shape[-1]
            if kv_total < ctx.length or (mask.dim() == 4 and mask.shape[-2] != ctx.length):
                raise _drift(f"decoder layer {layer_idx}'s attention mask of shape {tuple(mask.shape)} does not "
                             f"cover the prefill of {ctx.length} tokens")
            if mask.dim() == 4:
                expected = _key_count(layout, 0, ctx.length)
                if kv_total != expected:
                    raise _drift(f"decoder layer {layer_idx}'s attention mask has {kv_total} key columns at a "
                                 f"prefill of {ctx.length} tokens, where its {_layout_name(layout)} cache layer "
                                 f"gives the attention {expected} keys")
                if layout[0] == "static":
                    slots = kv_total  # the whole buffer (its empty slots map after the prompt: masked)
                elif layout[0] == "dynamic":
                    slots = kv_total - (ctx.length - kept_len)
                else:
                    slots = kept_len + _key_window(layout, 0, kept_len)[1]
            else:  # flash attention's 2-D padding mask
                slots = kv_total - (ctx.length - kept_len)
                if getattr(ctx.cache, "is_compileable", False):
                    slots = kv_total
            cols, invalid = _mask_cols(idx, ctx.length, kv_total, slots, ctx.valid)
            rows = idx if mask.dim() == 4 else None
            out[name] = _gather_mask(mask, rows, cols, invalid)
    known.update(_CACHE_POSITION_KEYS)
    known.update(k for k, v in kwargs.items() if v is not None and not torch.is_tensor(v) and _is_cache(v))
    _check_unknown_args(ctx, layer_idx, args, kwargs, known, {ctx.length})
    return out


def _layer_kind(layer: nn.Module):
    """The layer's attention type (Gemma 3, Qwen2: "sliding_attention" / "full_attention"), or None."""
    kind = getattr(layer, "attention_type", None)
    if kind is None:
        attn = getattr(layer, "self_attn", None)
        kind = getattr(attn, "layer_type", None) or getattr(attn, "sliding_window", None)
    return kind


def _decode_kwargs(state: _PatchState, model, ctx: _Context, layer_idx: int, module, args, kwargs):
    cmap = ctx.cache_map
    stage = cmap.stage_of(layer_idx)
    if stage is None:
        return None
    kept, valid = cmap.kept[stage], cmap.valid[stage]
    changed = {}
    hidden = args[0] if args else kwargs.get("hidden_states")
    q = hidden.shape[1] if torch.is_tensor(hidden) else None
    layout = _cache_layout(ctx.cache, layer_idx)
    removed = cmap.prefill_length - kept.shape[1]
    for name in _MASK_KEYS:
        mask = kwargs.get(name)
        _check_mask(mask)
        if mask is None and (valid is None or q is None):
            continue
        # one mask per stage, attention type and cache layout for the whole forward; keyed on nothing that
        # changes between decode steps (torch.compile guards on such keys and would recompile every step)
        key = (stage, name, _layer_kind(module), layout, None if mask is None else tuple(mask.shape))
        if key not in ctx.decode_cols:
            ctx.decode_cols[key] = _decode_mask(state, model, ctx, layer_idx, mask, q, layout, stage, hidden.dtype)
        changed[name] = ctx.decode_cols[key]
    for name in _CACHE_POSITION_KEYS:
        if kwargs.get(name) is not None and q is not None:
            start = _cache_seq_length(ctx.cache) - q - removed if ctx.cache is not None else 0
            changed[name] = torch.arange(start, start + q, device=kept.device)
    if not changed:
        return None
    new = dict(kwargs)
    new.update(changed)
    return args, new


def _decode_mask(state: _PatchState, model, ctx: _Context, layer_idx: int, mask, q: int, layout: tuple,
                 stage: int, dtype: torch.dtype):
    """Layer ``layer_idx``'s attention mask of a decode step, fitted to its reduced cache.

    The mask transformers made is gathered at the original positions the
    layer's key slots hold when it was sized by a layer in front of every
    reducer (a sliding-window mask starts at its window, so do the keys of a
    sliding cache layer). A mask sized by a layer behind a reducer
    (transformers sizes every full-attention mask by the first full-attention
    layer's cache: layer 5 of Gemma 3) has columns, and on transformers 5.25
    query rows, counted in that layer's shortened slots; it is rebuilt from
    what it means (:func:`_rebuilt_mask`)."""
    cmap = ctx.cache_map
    kept, valid = cmap.kept[stage], cmap.valid[stage]
    prefill = cmap.prefill_length
    removed = prefill - kept.shape[1]
    # ctx.past is read only where needed: torch.compile guards on every int it reads, and a static cache's
    # mask must not depend on it (one graph for every decode step)
    if mask is None:
        total = ctx.past + q  # original positions after this step
        # a ragged prefill left padding slots in this layer's cache: mask them (transformers passed None because
        # the batch has no padding of its own; the window, if any, cuts nothing below its size)
        held = ctx.past - removed
        first, empty = _key_window(layout, held, q)
        cols, invalid = _mask_cols(kept, prefill, total, held + q + empty, valid, start=first)
        rows = torch.arange(ctx.past, total, device=kept.device).expand(kept.shape[0], q)
        return _causal_mask(state, model, rows, cols, invalid, dtype)
    kv_total = mask.shape[-1]
    sizing = _sizing_layer(ctx.cache, layer_idx)
    sizing_stage = cmap.stage_of(sizing)
    if mask.dim() == 2 or (layout[0] == "static" and sizing_stage is None):
        # flash attention's padding mask, or a static buffer's mask: one column per original position
        if kv_total < prefill:
            raise _drift(f"decoder layer {layer_idx}'s attention mask has {kv_total} key columns during a decode "
                         f"step, fewer than the {prefill} tokens of the reduced prefill")
        if layout[0] == "static" and kv_total != layout[1]:
            raise _drift(f"decoder layer {layer_idx}'s attention mask has {kv_total} key columns, its static "
                         f"cache layer {layout[1]} slots")
        slots = kv_total if getattr(ctx.cache, "is_compileable", False) else kv_total - removed
        cols, invalid = _mask_cols(kept, prefill, kv_total, slots, valid)
        return _gather_mask(mask, None, cols, invalid)
    total = ctx.past + q
    held = ctx.past - removed
    first, empty = _key_window(layout, held, q)
    slots = held + q + empty
    if sizing_stage is None:  # sized by an unreduced layer: column j is original position offset + j
        expected = _key_count(layout, ctx.past, q)
        if kv_total != expected:
            raise _drift(f"decoder layer {layer_idx}'s attention mask has {kv_total} key columns during a decode "
                         f"step after {ctx.past} tokens, where a {_layout_name(layout)} cache layer in front of the "
                         f"reducers gives the attention {expected} keys")
        offset = total - kv_total if layout[0] != "dynamic" and total > kv_total else 0
        cols, invalid = _mask_cols(kept, prefill, kv_total, slots, valid, start=first, offset=offset)
        return _gather_mask(mask, None, cols, invalid)
    sizing_removed = prefill - cmap.kept[sizing_stage].shape[1]
    expected = _key_count(_cache_layout(ctx.cache, sizing), ctx.past - sizing_removed, q)
    if kv_total != expected:
        raise _drift(f"decoder layer {layer_idx}'s attention mask has {kv_total} key columns during a decode step; "
                     f"transformers sizes it by layer {sizing}'s cache, which holds {expected} keys for it")
    cols, invalid = _mask_cols(kept, prefill, total, slots, valid, start=first)
    rows = torch.arange(ctx.past, total, device=kept.device).expand(kept.shape[0], q)
    window = layout[1] if layout[0] in ("sliding", "static-sliding") else None
    return _rebuilt_mask(ctx, rows, cols, invalid, window, mask)


def _rebuilt_mask(ctx: _Context, rows: torch.Tensor, cols: torch.Tensor, invalid, window, like: torch.Tensor):
    """What a decode step's mask means, in original positions: query ``rows[i]`` sees the key at ``cols[j]``
    when ``cols[j] <= rows[i]`` (and ``> rows[i] - window``), the slot is valid and the token is not padding
    (the forward's 2-D attention mask, else the prefill's padding; tokens after the prefill are real). In the
    form of ``like``, the mask transformers made (4-D, bool or additive)."""
    allowed = cols[:, None, :] <= rows[:, :, None]
    if window is not None:
        allowed = allowed & (cols[:, None, :] > rows[:, :, None] - window)
    cmap = ctx.cache_map
    if ctx.padding is not None and ctx.padding.shape[-1] >= ctx.past + rows.shape[1]:
        pad = ctx.padding.to(cols.device)
        pad = pad if pad.shape[0] == cols.shape[0] else pad.expand(cols.shape[0], -1)
        real = pad.gather(1, cols) != 0
    elif cmap.real is not None:
        head = cmap.real.to(cols.device).gather(1, cols.clamp(max=cmap.prefill_length - 1))
        real = head | (cols >= cmap.prefill_length)
    else:
        real = None
    if real is not None:
        allowed = allowed & real[:, None, :]
    if invalid is not None:
        allowed = allowed & ~invalid[:, None, :]
    allowed = allowed[:, None].to(like.device)
    if like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
        ~allowed, torch.finfo(like.dtype).min)


def _capture_hook(state: _PatchState, layer_idx: int, which: str):
    def hook(module, args, output):
        ctx = state.ctx
        if ctx is not None and ctx.capturing == layer_idx:
            ctx.captured[which] = output
        return None

    return hook


def _layer_post_hook(state: _PatchState, model, layer_idx: int, is_last: bool):
    def hook(module, args, kwargs, output):
        ctx = state.ctx
        if ctx is None or ctx.mode != "prefill":
            return None
        hidden = output[0] if isinstance(output, (tuple, list)) and output else output
        if not torch.is_tensor(hidden) or hidden.dim() != 3:
            raise _drift(f"decoder layer {layer_idx} returned {type(output).__name__}; expected the hidden "
                         "states [B, L, d] (a tensor, or a tuple starting with one)")
        new_hidden = hidden
        if layer_idx in ctx.schedule and ctx.capturing == layer_idx:
            ctx.capturing = None
            captured, ctx.captured = ctx.captured, {}
            new_hidden = _reduce(state, model, ctx, layer_idx, module, args, kwargs, hidden, captured)
        if is_last and ctx.cur_idx is not None:
            B, _, d = new_hidden.shape
            idx = ctx.cur_idx.to(new_hidden.device)
            if ctx.valid is None:
                full = new_hidden.new_zeros(B, ctx.length, d)
                new_hidden = full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), new_hidden)
            else:  # padding slots go to a spare column that is cut off
                idx = idx.masked_fill(~ctx.valid.to(idx.device), ctx.length)
                full = new_hidden.new_zeros(B, ctx.length + 1, d)
                new_hidden = full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), new_hidden)[:, :ctx.length]
        if new_hidden is hidden:
            return None
        if isinstance(output, (tuple, list)):
            return type(output)((new_hidden, *output[1:]))
        return new_hidden

    return hook


def _reduce(state: _PatchState, model, ctx: _Context, layer_idx: int, layer: nn.Module, args: tuple,
            kwargs: dict, hidden: torch.Tensor, captured: dict) -> torch.Tensor:
    """Reduce the visual tokens leaving ``layer_idx``; returns the shorter hidden states.

    Samples reducing from the same count to the same count form one batched
    operator call (one group when every sample holds as many visual tokens).
    When samples end at different lengths, the shorter ones are padded in
    front with copies of their last slot, marked invalid (``ctx.valid``):
    masked as keys in every later layer and its cache, and never scattered back."""
    plan = state.plan
    incoming, kept = ctx.schedule[layer_idx]
    if "q" not in captured or "k" not in captured:
        raise RuntimeError(
            f"EOS: the query/key of layer {layer_idx} were not captured (is {type(layer).__name__} "
            "a Llama-style layer?)"
        )
    B, Lc, d = hidden.shape
    device = hidden.device
    if ctx.cur_idx is None:
        cur = torch.arange(Lc, device=device).unsqueeze(0).expand(B, Lc)
    else:
        cur = ctx.cur_idx.to(device)
    valid = ctx.valid.to(device) if ctx.valid is not None else None
    visual = ctx.visual.to(device).gather(1, cur)
    rows = ctx.rows.to(device).gather(1, cur)
    real = ctx.real.to(device).gather(1, cur) if ctx.real is not None else None
    if valid is not None:
        visual, rows = visual & valid, rows & valid
        real = valid if real is None else real & valid
    pe_key = find_position_embeddings(kwargs, Lc)
    query, key = state.adapter.query_key(layer, captured["q"], captured["k"],
                                         kwargs[pe_key] if pe_key is not None else None)
    scores = text_to_visual_importance(query, key, visual, rows, real,
                                       scale=state.adapter.attention_scale(layer))
    # positions (current coordinates) of each sample's visual tokens, ascending
    vis_pos = torch.sort((~visual).to(torch.int8), dim=1, stable=True).indices[:, :max(incoming)]
    keep = ~visual if valid is None else valid & ~visual
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (n_in, n_kept) in enumerate(zip(incoming, kept)):
        if n_kept < n_in:
            groups.setdefault((n_in, n_kept), []).append(b)
        else:  # this sample passes this layer unreduced
            keep[b] = keep[b] | visual[b]
    reduced_rows = []  # (samples, anchor positions, reduced anchors)
    for (n_in, n_kept), members in groups.items():
        whole = len(members) == B
        g = None if whole else torch.tensor(members, device=device)
        g_pos = vis_pos[:, :n_in] if whole else vis_pos[g, :n_in]
        g_hidden = hidden if whole else hidden[g]
        g_scores = (scores if whole else scores[g]).gather(1, g_pos)
        a_idx, c_idx = select_anchors(g_scores, n_kept)
        anchor_pos = g_pos.gather(1, a_idx)
        reduced = eos_reduce(_take(g_hidden, anchor_pos), _take(g_hidden, g_pos.gather(1, c_idx)),
                             g_scores.gather(1, c_idx), **plan.operator_kwargs(layer_idx))
        reduced = plan.finish(layer_idx, reduced, g_scores, a_idx, n_kept)
        if whole:
            keep = keep.scatter(1, anchor_pos, True)
        else:
            keep[g] = keep[g].scatter(1, anchor_pos, True)
        reduced_rows.append((g, anchor_pos, reduced))
    lengths = keep.sum(dim=1)
    new_len = int(lengths.max())
    new_pos = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :new_len]
    new_valid = None
    slot_of = keep.to(torch.long).cumsum(dim=1) - 1
    if int(lengths.min()) < new_len:
        # ragged: a shorter sample's slots move right and its first slots repeat its last position, invalid
        # (masked as keys everywhere; seeing every real key, their own rows are never fully masked). At the
        # front, not the end: a sliding-window cache keeps a layer's last W - 1 slots, the latest tokens
        shift = (new_len - lengths).unsqueeze(1)
        src = torch.arange(new_len, device=device).unsqueeze(0) - shift
        new_valid = src >= 0
        last = new_pos.gather(1, (lengths - 1).unsqueeze(1))
        new_pos = torch.where(new_valid, new_pos.gather(1, src.clamp(min=0)), last)
        slot_of = slot_of + shift
    out = _take(hidden, new_pos)
    for g, anchor_pos, reduced in reduced_rows:
        if g is None:
            slots = slot_of.gather(1, anchor_pos)
            out = out.scatter(1, slots.unsqueeze(-1).expand(-1, -1, d), reduced.to(out.dtype))
        else:
            slots = slot_of[g].gather(1, anchor_pos)
            rows_g = out[g].scatter(1, slots.unsqueeze(-1).expand(-1, -1, d), reduced.to(out.dtype))
            out = out.index_copy(0, g, rows_g)
    ctx.cur_idx = cur.gather(1, new_pos)
    ctx.valid = new_valid
    ctx.stage_kwargs = None
    ctx.stages.append(StageRecord(
        layer=layer_idx, regime=plan.regime(layer_idx), visual_in=tuple(incoming), visual_out=tuple(kept),
        seq_in=Lc, seq_out=new_len, kept_positions=ctx.cur_idx.detach(),
        valid_slots=None if new_valid is None else new_valid.detach(),
    ))
    cache = find_cache(args, kwargs)
    if cache is not None and hasattr(cache, "__dict__"):
        if len(ctx.stages) == 1:  # first reduction of this prefill: a fresh map
            cache.__dict__[CACHE_MAP_ATTR] = _CacheMap(ctx.length, ctx.real)
            _wrap_cache_methods(cache)
            ctx.found_cache = cache  # this prefill's own cache (possibly created inside the decoder stack)
        cmap = cache.__dict__[CACHE_MAP_ATTR]
        cmap.first_layers.append(layer_idx + 1)
        cmap.kept.append(ctx.cur_idx.detach())
        cmap.valid.append(None if new_valid is None else new_valid.detach())
        # a layer transformers sizes masks by (the first full-attention / sliding-window layer) behind a reducer:
        # decode steps rebuild those masks (_decode_mask)
        layers = getattr(cache, "layers", None)
        sizing = {_sizing_layer(cache, i) for i in range(len(layers))} if isinstance(layers, (list, tuple)) else {0}
        cmap.rebuilds = any(cmap.stage_of(i) is not None for i in sizing)
    return out


def _causal_mask(state: _PatchState, model, rows: torch.Tensor, cols: torch.Tensor, invalid: torch.Tensor,
                 dtype: torch.dtype):
    """A mask for a layer transformers gave none (no padding), hiding a ragged reduction's padding slots.

    ``rows`` [B, q] and ``cols`` [B, S] are original positions: query i sees
    key j when ``cols[j] <= rows[i]`` and slot j is valid. In the form the
    model's attention implementation takes: 4-D bool (sdpa), 4-D additive
    (eager), 2-D padding mask (flash attention, causal by itself)."""
    impl = state.adapter.attn_implementation(model)
    if _is_flash(impl):
        return (~invalid).to(torch.long)
    allowed = (cols[:, None, :] <= rows[:, :, None]) & ~invalid[:, None, :]
    allowed = allowed[:, None]  # [B, 1, q, S]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def _generate_wrapper(state: _PatchState, model):
    original = model.generate  # bound method (or an existing instance attribute)

    def generate(*args, **kwargs):
        prompt = args[0] if args else kwargs.get("inputs")
        if prompt is None:
            prompt = kwargs.get("input_ids")
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        previous = state.prompt_length
        state.prompt_length = int(prompt.shape[1]) if torch.is_tensor(prompt) and prompt.dim() >= 2 else None
        try:
            return original(*args, **kwargs)
        finally:
            state.prompt_length = previous

    functools.update_wrapper(generate, original, updated=())
    return generate


