"""One entry point for every supported model family: :func:`patch` / :func:`unpatch`.

The adapter is chosen from the model's class (subclasses included)::

    import eos_kernels
    eos_kernels.patch(model, eos_kernels.Theta.paper(64))   # LLaVA-1.5/NeXT/OneVision, Qwen2(.5)/3-VL, InternVL, Gemma 3
    eos_kernels.unpatch(model)

The family-specific entry points (``patch_llava`` ...) stay; they do the same
with their family's adapter.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from torch import nn

from eos_kernels.patching import patch_model, unpatch_model

__all__ = ["SUPPORTED_MODELS", "adapter_for", "patch", "unpatch"]

#: (family, adapter module, adapter object); each adapter lists the transformers classes it serves
SUPPORTED_MODELS = (
    ("LLaVA-1.5", "eos_kernels.integrations.llava", "_ADAPTER"),
    ("LLaVA-NeXT", "eos_kernels.integrations.llava_next", "_NEXT"),
    ("LLaVA-OneVision", "eos_kernels.integrations.llava_next", "_ONEVISION"),
    ("Qwen2-VL / Qwen2.5-VL", "eos_kernels.integrations.qwen2_vl", "_ADAPTER"),
    ("Qwen3-VL / Qwen3-VL-MoE", "eos_kernels.integrations.qwen3_vl", "_ADAPTER"),
    ("InternVL", "eos_kernels.integrations.internvl", "_ADAPTER"),
    ("Gemma 3", "eos_kernels.integrations.gemma3", "_ADAPTER"),
)


def _adapters():
    return [getattr(import_module(module), attr) for _, module, attr in SUPPORTED_MODELS]


def adapter_for(model: nn.Module):
    """The :class:`~eos_kernels.patching.adapter.VisionLanguageAdapter` of ``model``'s family.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no adapter serves its class; the message lists the supported classes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    adapters = _adapters()
    for adapter in adapters:
        gens, bases = adapter._classes()
        if isinstance(model, gens + bases):
            return adapter
    supported = ", ".join(n for adapter in adapters for pair in adapter.classes for n in pair)
    raise ValueError(
        f"eos_kernels.patch: no adapter for {type(model).__module__}.{type(model).__name__}; "
        f"supported (transformers classes and their subclasses): {supported}"
    )


def patch(model: nn.Module, theta: Any, *, num_visual_tokens: int | None = None) -> nn.Module:
    """Run the EOS configuration ``theta`` inside ``model`` (this instance only), any supported family.

    Args:
        model: a supported Hugging Face model (:data:`SUPPORTED_MODELS`).
        theta: a :class:`~eos_kernels.theta.Theta`, a dict in its JSON schema, or a path to a JSON file.
        num_visual_tokens: visual tokens per prompt to validate ``theta`` against at patch
            time (default: the family's fixed count where it has one).

    Returns:
        ``model``, patched in place; ``model.eos_report`` describes each prefill.
    """
    return patch_model(model, theta, adapter_for(model), num_visual_tokens=num_visual_tokens)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (or any family's ``patch_*``): the stock instance again, bit for bit."""
    return unpatch_model(model)
