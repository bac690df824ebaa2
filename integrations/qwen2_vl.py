"""EOS inside a stock Hugging Face Qwen2-VL or Qwen2.5-VL.

Usage::

    import eos_kernels
    from eos_kernels.integrations.qwen2_vl import patch_qwen2_vl, unpatch_qwen2_vl
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", ...)
    patch_qwen2_vl(model, eos_kernels.Theta(...))     # fractions suit dynamic resolution best
    out = model.generate(**processor(...), max_new_tokens=32)
    print(model.eos_report)
    unpatch_qwen2_vl(model)

Supported classes: ``Qwen2VLForConditionalGeneration`` / ``Qwen2VLModel`` and
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel``.

What is model-specific here (everything else is :mod:`eos_kernels.patching`):

- **Visual tokens**: every ``<|image_pad|>`` (``config.image_token_id``) and
  ``<|video_pad|>`` (``config.video_token_id``) position; images and videos of
  one prompt form one visual set. ``<|vision_start|>`` / ``<|vision_end|>``
  carry their own ids and are text: never reduced (``<|vision_end|>`` and the
  text after the image rate the visual tokens, like any prompt text after the
  first visual token).
- **Counts**: dynamic resolution gives each image ``t * h * w /
  spatial_merge_size**2`` tokens (``image_grid_thw``), so there is no per-image
  count to validate a Theta against at patch time
  (:meth:`QwenVLAdapter.visual_tokens_per_image` is None): an integer keep above
  what a sample holds is clipped to it at every prefill; fractions fit any count.
- **Multimodal RoPE**: the model computes each token's 3-row position ids
  (temporal, height, width) from ``input_ids`` and ``image_grid_thw``
  (``get_rope_index``), before the decoder stack. The decoder layers receive
  the rotary ``(cos, sin)`` computed from them -- on transformers 5.0 un-merged,
  ``[3, B, L, head_dim]``, merged by the attention with
  ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)``; on 5.24
  already merged by the rotary module, ``[B, L, head_dim]``, applied with the
  plain ``apply_rotary_pos_emb``. The generic patch gathers ``(cos, sin)`` at
  the kept tokens' original positions along the sequence dimension (either
  layout), so kept tokens keep their original 3-D positions;
  :meth:`QwenVLAdapter.query_key` rebuilds the post-RoPE query/key with the
  model's own function for the layout it sees.
- **Decoding**: the positions of generated tokens are ``cache_position +
  rope_deltas`` (5.0) or ``text position + rope_deltas`` (5.24), where
  ``rope_deltas`` is computed at the prefill from ``input_ids`` and the grids,
  and the cache length read by the model is layer 0's (never shortened: a
  reducer at layer ``l`` shortens layers ``> l``). A reduced prefill therefore
  decodes at exactly the stock model's positions.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from eos_kernels.patching import get_report, patch_model, unpatch_model
from eos_kernels.patching.adapter import VisionLanguageAdapter

__all__ = ["SUPPORTED_CLASSES", "QwenVLAdapter", "get_report", "patch_qwen2_vl", "unpatch_qwen2_vl"]

#: (generation class, base model class) names, from ``transformers``.
SUPPORTED_CLASSES = (
    ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
    ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
)


def mrope_section(attn: nn.Module) -> list[int]:
    """The attention's multimodal RoPE section sizes (temporal, height, width), from its config."""
    for holder in (getattr(attn, "rope_parameters", None), getattr(attn.config, "rope_parameters", None),
                   getattr(attn.config, "rope_scaling", None)):
        if isinstance(holder, dict) and holder.get("mrope_section") is not None:
            return list(holder["mrope_section"])
    raise ValueError(f"{type(attn).__name__}: no mrope_section in its config's rope_parameters / rope_scaling")


class QwenVLAdapter(VisionLanguageAdapter):
    """Qwen2-VL / Qwen2.5-VL: ViT with 2x2 patch merge + Qwen2 text model with multimodal RoPE."""

    name = "qwen2_vl"
    classes = SUPPORTED_CLASSES
    placeholder_attrs = ("image_token_id", "video_token_id")
    entry = "patch_qwen2_vl"

    def visual_tokens_per_image(self, model: nn.Module) -> int | None:
        return None  # dynamic resolution: image_grid_thw gives each image its own count

    def check_layer(self, layer: nn.Module) -> None:
        attn = self.attention(layer)
        for name in ("q_proj", "k_proj"):
            if not isinstance(getattr(attn, name, None), nn.Module):
                raise ValueError(f"attention module {type(attn).__name__} has no `{name}`")
        module = sys.modules.get(type(attn).__module__)
        if (getattr(module, "apply_rotary_pos_emb", None) is None
                and getattr(module, "apply_multimodal_rotary_pos_emb", None) is None):
            raise ValueError(f"no apply_rotary_pos_emb / apply_multimodal_rotary_pos_emb in {type(attn).__module__}")

    def query_key(self, layer: nn.Module, q_out: torch.Tensor, k_out: torch.Tensor,
                  position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attention(layer)
        if position_embeddings is None:
            raise RuntimeError(f"decoder layer {type(layer).__name__} was called without position_embeddings")
        cos, sin = position_embeddings
        B, L = q_out.shape[0], q_out.shape[1]
        head_dim = attn.head_dim
        q = q_out.reshape(B, L, -1, head_dim).transpose(1, 2)
        k = k_out.reshape(B, L, -1, head_dim).transpose(1, 2)
        module = sys.modules[type(attn).__module__]
        if cos.dim() == 4:  # [3, B, L, head_dim]: the sections are merged inside the attention (transformers 5.0)
            multimodal = getattr(module, "apply_multimodal_rotary_pos_emb", None)
            if multimodal is not None:
                return multimodal(q, k, cos, sin, mrope_section(attn))
            section = mrope_section(attn) * 2
            cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(section, dim=-1))], dim=-1)
            sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(section, dim=-1))], dim=-1)
        rope = getattr(module, "apply_rotary_pos_emb", None)
        if rope is None:
            raise RuntimeError(f"{type(attn).__module__} has no apply_rotary_pos_emb for merged (cos, sin) "
                               f"of shape {tuple(cos.shape)}")
        return rope(q, k, cos, sin)


_ADAPTER = QwenVLAdapter()


def patch_qwen2_vl(model: nn.Module, theta: Any, *, num_visual_tokens: int | None = None) -> nn.Module:
    """Run the EOS configuration ``theta`` inside this Qwen2-VL / Qwen2.5-VL model instance.

    Args:
        model: a ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
            (or the ``...Model`` base class).
        theta: a :class:`~eos_kernels.theta.Theta`, a dict in the Theta JSON
            schema, or a path to a Theta JSON file.
        num_visual_tokens: visual tokens per prompt to validate ``theta``
            against at patch time. Without it only the reducer layers are
            checked (the count depends on each image's resolution); at every
            prefill a keep above a sample's count is clipped to it.

    Returns:
        ``model``, patched in place (see :func:`eos_kernels.patch_llava` for the report and the guarantees).
    """
    return patch_model(model, theta, _ADAPTER, num_visual_tokens=num_visual_tokens)


def unpatch_qwen2_vl(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_qwen2_vl`: the model is the stock instance again (bit-identical outputs)."""
    return unpatch_model(model)
