"""EOS inside a stock Hugging Face InternVL (InternVL3 / InternVL3.5: ``InternVLForConditionalGeneration``).

Usage::

    import eos_kernels
    from eos_kernels.integrations.internvl import patch_internvl, unpatch_internvl
    model = InternVLForConditionalGeneration.from_pretrained("OpenGVLab/InternVL3-1B-hf", ...)
    patch_internvl(model, eos_kernels.Theta(...))     # fractions suit the dynamic tiling best
    out = model.generate(**processor(...), max_new_tokens=32)
    print(model.eos_report)
    unpatch_internvl(model)

Supported classes: ``InternVLForConditionalGeneration`` / ``InternVLModel``
(InternViT + pixel-shuffle projector + a Qwen2 / Qwen3 / Llama text model, the
usual LLaVA layout: the projected features are scattered into the image
placeholder positions of ``inputs_embeds`` before the decoder stack).

What is model-specific here (everything else is :mod:`eos_kernels.patching`):

- **Visual tokens**: every ``<IMG_CONTEXT>`` (``config.image_token_id``)
  position. The processor writes one image as ``<img> <IMG_CONTEXT> * n
  </img>``; ``<img>`` / ``</img>`` carry their own ids and are text (never
  reduced; ``</img>`` and the question after it rate the visual tokens). A
  video is a sequence of frames, each such an image block of the same id, so
  its frames are visual tokens too; all the images and frames of a prompt form
  one visual set.
- **Counts**: ``image_seq_length`` tokens per tile (256 for InternVL3 at 448 px,
  after the 0.5 pixel shuffle) times the number of tiles the processor cuts
  the image into (dynamic tiling, plus a thumbnail), so the count depends on
  the image (:meth:`InternVLAdapter.visual_tokens_per_image` is None: an
  integer keep above what a sample holds is clipped to it at every prefill;
  fractions fit any count).
- RoPE, masks, cache: those of the stock Llama-style text model.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from eos_kernels.patching import get_report, patch_model, unpatch_model
from eos_kernels.patching.adapter import VisionLanguageAdapter

__all__ = ["InternVLAdapter", "get_report", "patch_internvl", "unpatch_internvl"]


class InternVLAdapter(VisionLanguageAdapter):
    """InternVL: InternViT + pixel shuffle + MLP projector + Llama-style text model (Qwen2 / Qwen3 / Llama)."""

    name = "internvl"
    classes = (("InternVLForConditionalGeneration", "InternVLModel"),)
    entry = "patch_internvl"

    def visual_tokens_per_image(self, model: nn.Module) -> int | None:
        return None  # dynamic tiling: image_seq_length tokens per tile, the tiles depend on the image


_ADAPTER = InternVLAdapter()


def patch_internvl(model: nn.Module, theta: Any, *, num_visual_tokens: int | None = None) -> nn.Module:
    """Run the EOS configuration ``theta`` inside this InternVL model instance.

    Args:
        model: a ``transformers.InternVLForConditionalGeneration`` (or ``InternVLModel``).
        theta: a :class:`~eos_kernels.theta.Theta`, a dict in the Theta JSON
            schema, or a path to a Theta JSON file.
        num_visual_tokens: visual tokens per prompt to validate ``theta``
            against at patch time. Without it only the reducer layers are
            checked (the count depends on each image's tiles); at every
            prefill a keep above a sample's count is clipped to it.

    Returns:
        ``model``, patched in place (see :func:`eos_kernels.patch_llava` for the report and the guarantees).
    """
    return patch_model(model, theta, _ADAPTER, num_visual_tokens=num_visual_tokens)


def unpatch_internvl(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_internvl`: the model is the stock instance again (bit-identical outputs)."""
    return unpatch_model(model)
