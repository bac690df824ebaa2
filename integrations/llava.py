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

import torch
from torch import nn

from eos_kernels.patching import DecoderAdapter, get_report, patch_model, unpatch_model

__all__ = ["LlavaAdapter", "patch_llava", "unpatch_llava", "get_report"]


def _llava_classes():
    from transformers import LlavaForConditionalGeneration, LlavaModel

    return LlavaForConditionalGeneration, LlavaModel


class LlavaAdapter(DecoderAdapter):
    """LLaVA-1.5: CLIP vision tower + projector + Llama-style text model."""

    name = "llava"

    def _llava_model(self, model: nn.Module) -> nn.Module:
        for_generation, base = _llava_classes()
        return model.model if isinstance(model, for_generation) else model

    def check_model(self, model: nn.Module) -> None:
        for_generation, base = _llava_classes()
        if not isinstance(model, (for_generation, base)):
            raise ValueError(
                f"patch_llava supports transformers.LlavaForConditionalGeneration and LlavaModel "
                f"(the llava-hf LLaVA-1.5 architecture); got {type(model).__module__}.{type(model).__name__}"
            )
        text = getattr(self._llava_model(model), "language_model", None)
        if not isinstance(getattr(text, "layers", None), nn.ModuleList):
            raise ValueError(
                f"patch_llava: the language model {type(text).__name__} has no `layers` ModuleList "
                "of decoder layers"
            )
        if getattr(model.config, "image_token_id", None) is None:
            raise ValueError("patch_llava: model.config.image_token_id is not set")

    def input_module(self, model: nn.Module) -> nn.Module:
        return self._llava_model(model)

    def text_model(self, model: nn.Module) -> nn.Module:
        return self._llava_model(model).language_model

    def visual_mask(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        # LlavaModel.forward(input_ids=None, pixel_values=None, ..., inputs_embeds=None, ...)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        image_token_id = model.config.image_token_id
        if input_ids is not None:
            return input_ids == image_token_id
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        # the placeholder test LlavaModel itself uses when only embeddings are given
        table = self._llava_model(model).get_input_embeddings()
        token = table(torch.tensor(image_token_id, device=embeds.device))
        return (embeds == token.to(embeds.dtype)).all(dim=-1)

    def placeholder_rows(self, model: nn.Module) -> torch.Tensor:
        table = self._llava_model(model).get_input_embeddings()
        return table.weight[model.config.image_token_id].unsqueeze(0)

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
