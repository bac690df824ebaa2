"""EOS inside a stock Hugging Face LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``).

Usage::

    import eos_kernels
    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf", ...)
    eos_kernels.patch_llava(model, eos_kernels.Theta.paper(64))   # or a dict / JSON path
    out = model.generate(**inputs, max_new_tokens=32)             # as usual
    print(model.eos_report)             # visual tokens entering / leaving each reducer, per sample
    eos_kernels.unpatch_llava(model)    # back to the stock model, bit for bit

Only this model instance is touched (hooks and one instance attribute, see
:mod:`eos_kernels.patching` for the mechanics, the KV-cache handling and the
limitations). transformers ``>=5.0,<6`` (the CPU tests run on 5.23).

This file is the model-specific part: where the decoder stack is, how visual
tokens are recognised (``input_ids == config.image_token_id``), how many there
are per image. Everything else is generic.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from eos_kernels.patching import get_report, patch_model, unpatch_model
from eos_kernels.patching.adapter import VisionLanguageAdapter

__all__ = ["LlavaAdapter", "patch_llava", "unpatch_llava", "get_report"]


class LlavaAdapter(VisionLanguageAdapter):
    """LLaVA-1.5: CLIP vision tower + projector + Llama-style text model."""

    name = "llava"
    classes = (("LlavaForConditionalGeneration", "LlavaModel"),)
    entry = "patch_llava"

    def visual_tokens_per_image(self, model: nn.Module) -> int | None:
        config = model.config
        vision = getattr(config, "vision_config", None)
        image_size = getattr(vision, "image_size", None)
        patch_size = getattr(vision, "patch_size", None)
        if not image_size or not patch_size:
            return None
        if isinstance(image_size, (tuple, list)):
            image_size = image_size[0]
        n = (int(image_size) // int(patch_size)) ** 2
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            n += 1  # the CLS token is kept
        return n


_ADAPTER = LlavaAdapter()


def patch_llava(model: nn.Module, theta: Any, *, num_visual_tokens: int | None = None) -> nn.Module:
    """Run the EOS configuration ``theta`` inside this LLaVA model instance.

    Args:
        model: a ``transformers.LlavaForConditionalGeneration`` (or ``LlavaModel``).
        theta: a :class:`~eos_kernels.theta.Theta`, a dict in the Theta JSON
            schema, or a path to a Theta JSON file.
        num_visual_tokens: visual tokens per prompt to validate ``theta``
            against at patch time (default: one image, ``(image_size /
            patch_size)^2``, +1 with the "full" feature strategy). At every
            prefill each sample follows the schedule for its own count; a
            reducer's count above what a sample holds is clipped to it.

    Returns:
        ``model`` (patched in place). After each prefill forward,
        ``model.eos_report`` (also :func:`get_report`) tells how many visual
        tokens entered and left each reducer, per sample.

    Raises:
        ValueError: unsupported model class, or ``theta`` invalid for this
            model (a reducer layer >= the number of decoder layers, a keep above
            the incoming visual tokens).
        RuntimeError: transformers outside ``>=5.0,<6``.
    """
    return patch_model(model, theta, _ADAPTER, num_visual_tokens=num_visual_tokens)


def unpatch_llava(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_llava`: the model is the stock instance again (bit-identical outputs)."""
    return unpatch_model(model)
