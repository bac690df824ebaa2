"""EOS inside a stock Hugging Face Qwen3-VL or Qwen3-VL-MoE.

Usage::

    import eos_kernels
    model = Qwen3VLForConditionalGeneration.from_pretrained("Qwen/Qwen3-VL-8B-Instruct", ...)
    eos_kernels.patch(model, eos_kernels.Theta(...))   # or patch_qwen3_vl; fractions suit dynamic resolution
    out = model.generate(**processor(...), max_new_tokens=32)
    print(model.eos_report)
    eos_kernels.unpatch(model)

Supported classes: ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel`` and
``Qwen3VLMoeForConditionalGeneration`` / ``Qwen3VLMoeModel``.

What is model-specific here (everything else is :mod:`eos_kernels.patching`):

- **Visual tokens**: every ``<|image_pad|>`` and ``<|video_pad|>`` position, as for
  Qwen2(.5)-VL; the images and videos of one prompt form one visual set. A video is
  one ``<|vision_start|> ... <|vision_end|>`` block per frame, each after a textual
  timestamp (``<1.5 seconds>``): markers and timestamps are text and are never
  reduced. Dynamic resolution: no count to validate a Theta against at patch time;
  an integer keep above a sample's count is clipped, fractions fit any count.
  Nothing in the language model needs a token per frame or per image (positions are
  fixed at the prefill, DeepStack follows the kept set), so a reduction may empty a
  whole frame: its markers and timestamp stay, as for any removed visual token.
- **DeepStack**: the vision tower also returns features of some of its blocks
  (``deepstack_visual_indexes``); the text model adds level ``i`` to the hidden
  states at the visual positions right after its decoder layer ``i``
  (``Qwen3VLTextModel._deepstack_process(hidden_states, visual_pos_masks,
  visual_embeds)`` inside its own layer loop, for ``i < len(deepstack_visual_embeds)``).
  A reducer at layer ``l`` shrinks the output of decoder layer ``l`` (its hooks run
  inside the layer's call), so every DeepStack addition from level ``l`` on meets the
  shorter sequence. The patch puts a per-instance wrapper of ``_deepstack_process`` on
  the text model that, once a reduction has happened, gathers ``visual_pos_masks`` at
  the kept tokens' original positions (per sample; a ragged batch's padding slots get
  nothing) and hands over the DeepStack rows of exactly those tokens, in order, to the
  model's own method: each kept token gets its own features, a removed token gets
  nothing, merged and pooled anchors get their own (an anchor's features are not
  merged). Before any reduction the wrapper passes the call through unchanged. A
  DeepStack level after the *last* decoder layer (a model with no more layers than
  levels) meets the hidden states already scattered back to the input length: it
  reaches the kept visual positions there; removed positions stay zero.
- **Interleaved MRoPE**: the rotary module merges the (t, h, w) frequencies
  (``mrope_section``, interleaved) before the decoder layers, which receive ``(cos,
  sin)`` of shape [B, L, head_dim] on every supported release: the generic patch
  gathers them at the kept tokens' original positions (kept tokens keep their 3-D
  positions) and the default query/key rebuild applies the modeling file's
  ``apply_rotary_pos_emb`` to the outputs of ``q_norm`` / ``k_norm``.
- **Decoding**: as Qwen2(.5)-VL: positions of generated tokens come from the
  ``rope_deltas`` computed at the prefill from ``input_ids``, the grids and (5.24
  and later) ``mm_token_type_ids``, plus layer 0's cache length, which is never
  shortened; a reduced prefill decodes at the stock model's positions.
- **MoE**: the decoder layers' sparse MLP routes every token on its own, so nothing
  changes for the patch; the FLOPs estimate counts the active experts'
  intermediate size (``num_experts_per_tok * moe_intermediate_size``) on sparse layers.

Drift guards (:class:`~eos_kernels.patching.TransformersDriftError`): the text model
called without ``visual_pos_masks`` / ``deepstack_visual_embeds`` in a reducing
prefill, or with a mask or features of unexpected shape; ``_deepstack_process``
called with a mask or features the text model was not given, out of level order, or on
hidden states of a length the patch does not hold; fewer ``_deepstack_process``
calls than DeepStack levels (the addition moved out of that method); the method itself
missing at patch time.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from eos_kernels.patching import get_report, patch_model, unpatch_model
from eos_kernels.patching.compat import _drift

from eos_kernels.integrations.qwen2_vl import QwenVLAdapter

__all__ = ["SUPPORTED_CLASSES", "Qwen3VLAdapter", "get_report", "patch_qwen3_vl", "unpatch_qwen3_vl"]

#: (generation class, base model class) names, from ``transformers``.
SUPPORTED_CLASSES = (
    ("Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
    ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel"),
)

_METHOD = "_deepstack_process"


class _Handle:
    """Removes a per-instance attribute (the ``_deepstack_process`` wrapper) like a hook handle."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


class _DeepStackCall:
    """What the text model received for one reducing prefill: the mask, the levels, the calls seen."""

    __slots__ = ("ctx", "mask", "levels", "rank", "calls", "scattered")

    def __init__(self, ctx, mask, levels):
        self.ctx, self.mask, self.levels = ctx, mask, levels
        self.rank = None  # long [B, L]: row of each visual position in the DeepStack tensors (lazily)
        self.calls = 0
        self.scattered = False  # the last decoder layer has scattered the kept tokens back to the input length


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL / Qwen3-VL-MoE: ViT with DeepStack + Qwen3 (or Qwen3-MoE) text model with interleaved MRoPE."""

    name = "qwen3_vl"
    classes = SUPPORTED_CLASSES
    entry = "patch_qwen3_vl"

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        text = self.text_model(model)
        if not callable(getattr(type(text), _METHOD, None)):
            raise ValueError(f"{self.entry}: {type(text).__name__} has no `{_METHOD}` method (the DeepStack "
                             "addition this adapter fits to the kept tokens)")

    def text_sizes(self, model: nn.Module) -> tuple[int, int] | None:
        """``(hidden_size, mean active FFN width)``: sparse MoE layers count ``num_experts_per_tok *
        moe_intermediate_size``, dense ones ``intermediate_size``."""
        cfg = getattr(self.text_model(model), "config", None)
        d, ffn = getattr(cfg, "hidden_size", None), getattr(cfg, "intermediate_size", None)
        if not isinstance(d, int) or not isinstance(ffn, int):
            return None
        experts, k = getattr(cfg, "num_experts", 0) or 0, getattr(cfg, "num_experts_per_tok", 0) or 0
        moe = getattr(cfg, "moe_intermediate_size", None)
        if not (experts and k and isinstance(moe, int)):
            return (d, ffn)
        widths = []
        for layer in self.decoder_layers(model):
            sparse = hasattr(getattr(layer, "mlp", None), "experts")
            widths.append(k * moe if sparse else ffn)
        return (d, round(sum(widths) / len(widths)) if widths else ffn)

    def install_hooks(self, model: nn.Module, state) -> list:
        text = self.text_model(model)
        original = getattr(text, _METHOD)  # the bound stock method
        seen: list[_DeepStackCall | None] = [None]

        def pre(module, args, kwargs):
            seen[0] = None
            ctx = state.ctx
            if ctx is None or ctx.mode != "prefill":
                return None
            missing = [k for k in ("visual_pos_masks", "deepstack_visual_embeds") if k not in kwargs]
            if missing:
                raise _drift(f"{type(module).__name__} was called without {missing} in a prefill with visual "
                             "tokens (the DeepStack inputs the patch fits to the kept tokens)")
            mask, levels = kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"]
            if levels is None:
                raise _drift(f"{type(module).__name__} received visual tokens with image features but no "
                             "`deepstack_visual_embeds`")
            shape = (ctx.batch, ctx.length)
            if not (torch.is_tensor(mask) and mask.dtype == torch.bool and tuple(mask.shape) == shape):
                raise _drift(f"`visual_pos_masks` is not a bool tensor [{ctx.batch}, {ctx.length}] (got "
                             f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))})")
            levels = list(levels)
            if levels:
                n = int(mask.sum())
                bad = [tuple(getattr(e, "shape", ())) for e in levels
                       if not (torch.is_tensor(e) and e.dim() == 2 and e.shape[0] == n)]
                if bad:
                    raise _drift(f"`deepstack_visual_embeds` are not [{n}, d] tensors (one row per visual position "
                                 f"of `visual_pos_masks`): {bad}")
            seen[0] = _DeepStackCall(ctx, mask, levels)
            return None

        def post(module, args, kwargs, output):
            call, seen[0] = seen[0], None
            if call is None or call.ctx is not state.ctx or state.ctx.mode != "prefill":
                return None
            if call.calls != len(call.levels):
                raise _drift(f"{type(module).__name__} applied {call.calls} of its {len(call.levels)} DeepStack levels "
                             f"through `{_METHOD}`; the patch cannot tell where the others went")
            return None

        def deepstack_process(self_, hidden_states, visual_pos_masks, visual_embeds):
            call, ctx = seen[0], state.ctx
            if call is None or ctx is None or call.ctx is not ctx or ctx.mode != "prefill":
                return original(hidden_states, visual_pos_masks, visual_embeds)
            level = next((i for i, e in enumerate(call.levels) if e is visual_embeds), None)
            if visual_pos_masks is not call.mask or level is None:
                raise _drift(f"`{_METHOD}` was called with a mask or DeepStack features that the text model "
                             "was not given")
            if level != call.calls:
                raise _drift(f"`{_METHOD}` applied DeepStack level {level} after {call.calls} levels")
            call.calls += 1
            idx = ctx.cur_idx
            if idx is None:  # nothing reduced yet: the stock call
                return original(hidden_states, visual_pos_masks, visual_embeds)
            mask = visual_pos_masks
            want = tuple(mask.shape) if call.scattered else tuple(idx.shape)
            if not torch.is_tensor(hidden_states) or tuple(hidden_states.shape[:2]) != want:
                raise _drift(f"`{_METHOD}` received hidden states of shape "
                             f"{tuple(getattr(hidden_states, 'shape', ()))}, not the {want} tokens the patched "
                             "layers hold")
            if call.rank is None:  # row of each visual position in the [n_visual, d] features (row-major)
                call.rank = (mask.reshape(-1).cumsum(0) - 1).view(mask.shape)
            idx = idx.to(mask.device)
            if call.scattered:  # a DeepStack level after the last layer: input length, removed tokens are zeros
                kept = torch.zeros_like(mask).scatter(1, idx, True) & mask
                rows = call.rank[kept]
            else:
                kept = mask.gather(1, idx)
                if ctx.valid is not None:
                    kept = kept & ctx.valid.to(mask.device)
                rows = call.rank.gather(1, idx)[kept]
            return original(hidden_states, kept, visual_embeds[rows.to(visual_embeds.device)])

        def after_last_layer(module, args, output):
            call, ctx = seen[0], state.ctx
            if call is not None and ctx is not None and call.ctx is ctx and ctx.cur_idx is not None:
                call.scattered = True
            return None

        handles = [text.register_forward_pre_hook(pre, with_kwargs=True)]
        handles.append(text.register_forward_hook(post, with_kwargs=True, prepend=True))
        # after the generic hook of the last layer, which scatters the kept tokens back to the input length
        handles.append(self.decoder_layers(model)[-1].register_forward_hook(after_last_layer))
        text.__dict__[_METHOD] = types.MethodType(deepstack_process, text)
        handles.append(_Handle(text, _METHOD))
        return handles


_ADAPTER = Qwen3VLAdapter()


def patch_qwen3_vl(model: nn.Module, theta: Any, *, num_visual_tokens: int | None = None) -> nn.Module:
    """Run the EOS configuration ``theta`` inside this Qwen3-VL / Qwen3-VL-MoE model instance.

    Args:
        model: a ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoeForConditionalGeneration``
            (or the ``...Model`` base class).
        theta: a :class:`~eos_kernels.theta.Theta`, a dict in the Theta JSON
            schema, or a path to a Theta JSON file.
        num_visual_tokens: visual tokens per prompt to validate ``theta`` against at
            patch time. Without it only the reducer layers are checked (the count
            depends on each image's resolution); at every prefill a keep above a
            sample's count is clipped to it.

    Returns:
        ``model``, patched in place (see :func:`eos_kernels.patch_llava` for the report and the guarantees).
    """
    return patch_model(model, theta, _ADAPTER, num_visual_tokens=num_visual_tokens)


def unpatch_qwen3_vl(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_qwen3_vl`: the model is the stock instance again (bit-identical outputs)."""
    return unpatch_model(model)
