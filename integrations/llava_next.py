"""EOS inside a stock Hugging Face LLaVA-NeXT (LLaVA-1.6) or LLaVA-OneVision.

Usage::

    import eos_kernels
    from eos_kernels.integrations.llava_next import patch_llava_next, unpatch_llava_next
    model = LlavaNextForConditionalGeneration.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf", ...)
    patch_llava_next(model, eos_kernels.Theta(...))   # fractions suit any-resolution counts best
    out = model.generate(**processor(...), max_new_tokens=32)
    print(model.eos_report)
    unpatch_llava_next(model)

Supported classes: ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``
(:func:`patch_llava_next`) and ``LlavaOnevisionForConditionalGeneration`` /
``LlavaOnevisionModel`` (:func:`patch_llava_onevision`). The text model is a
stock Llama / Mistral / Qwen2 decoder, so the generic Llama-style defaults of
:class:`~eos_kernels.patching.DecoderAdapter` apply unchanged.

Visual tokens and counts
------------------------
Any-resolution tiling: an image is seen as a base tile plus a grid of tiles
chosen from ``config.image_grid_pinpoints`` by its size (``image_sizes``); the
grid features are unpadded to the image's aspect ratio and each row of the
grid ends with an *image-newline* token (the learned ``model.image_newline``
vector). The number of tokens per image therefore depends on the image size
(:meth:`LlavaNextAdapter.visual_tokens_per_image` is None: an integer keep above
what a sample holds is clipped to it at every prefill; fractions fit any count).

**Image-newline tokens are visual and reducible.** In ``input_ids`` they carry
the image token id like every other position of the image (the processor
expands one ``<image>`` into base + grid + newlines, and the model scatters
the packed features, newlines included, into all of them), so they are part
of the per-image count and compete for the kept slots on their importance
like any visual token. Treating them as text would also make them rate the
visual tokens (every non-visual token after the first visual token rates),
which they should not: they hold one learned constant, not prompt text.
LLaVA-OneVision: its video tokens (``config.video_token_id``) are visual too;
the images and videos of one prompt form one visual set.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from eos_kernels.patching import get_report, patch_model, unpatch_model
from eos_kernels.patching.adapter import VisionLanguageAdapter

__all__ = [
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "get_report",
    "patch_llava_next",
    "patch_llava_onevision",
    "unpatch_llava_next",
    "unpatch_llava_onevision",
]


class LlavaNextAdapter(VisionLanguageAdapter):
    """LLaVA-NeXT: CLIP vision tower + projector + any-resolution packing + Llama-style text model."""

    name = "llava_next"
    classes = (("LlavaNextForConditionalGeneration", "LlavaNextModel"),)
    entry = "patch_llava_next"

    def visual_tokens_per_image(self, model: nn.Module) -> int | None:
        return None  # any-resolution: the count depends on each image's size


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: SigLIP + any-resolution (anyres_max) packing + Qwen2 text model; images and videos."""

    name = "llava_onevision"
    classes = (("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"),)
    placeholder_attrs = ("image_token_id", "video_token_id")
    entry = "patch_llava_onevision"


_NEXT = LlavaNextAdapter()
_ONEVISION = LlavaOnevisionAdapter()


def patch_llava_next(model: nn.Module, theta: Any, *, num_visual_tokens: int | None = None) -> nn.Module:
    """Run the EOS configuration ``theta`` inside this LLaVA-NeXT model instance.

    Args:
        model: a ``transformers.LlavaNextForConditionalGeneration`` (or ``LlavaNextModel``).
        theta: a :class:`~eos_kernels.theta.Theta`, a dict in the Theta JSON
            schema, or a path to a Theta JSON file.
        num_visual_tokens: visual tokens per prompt to validate ``theta``
            against at patch time. Without it only the reducer layers are
            checked (the count depends on the image size); at every
            prefill a keep above a sample's count is clipped to it.

    Returns:
        ``model``, patched in place (see :func:`eos_kernels.patch_llava` for the report and the guarantees).
    """
    return patch_model(model, theta, _NEXT, num_visual_tokens=num_visual_tokens)


def unpatch_llava_next(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_llava_next`: the model is the stock instance again (bit-identical outputs)."""
    return unpatch_model(model)


def patch_llava_onevision(model: nn.Module, theta: Any, *, num_visual_tokens: int | None = None) -> nn.Module:
    """:func:`patch_llava_next` for ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``."""
    return patch_model(model, theta, _ONEVISION, num_visual_tokens=num_visual_tokens)


def unpatch_llava_onevision(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_llava_onevision`."""
    return unpatch_model(model)
