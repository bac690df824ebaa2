"""Loading a model for the search and its evaluation: device, dtype, the checkpoint's class, weights, processor.

Shared by :func:`eos_kernels.search.run`, :func:`eos_kernels.search.evaluate`, ``eos-search --demo --model``
and the lmms-eval plugin, so that each loads any supported family the same way (the class from the
checkpoint's config, never a guess from its folder name).
"""
from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "resolve_dtype", "load_model", "load_model_config", "model_class",
           "load_model_processor"]


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def resolve_dtype(spec: str, device: torch.device, cuda_default=torch.bfloat16) -> torch.dtype:
    if spec == "auto":
        return cuda_default if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def load_model_config(path):
    """The checkpoint's config, its transformers model class and the family's adapter (any supported family)."""
    if not isinstance(path, str) or not os.path.isdir(path):
        raise ValueError(f"model: not a local Hugging Face checkpoint directory: {path!r}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: cannot read the config of {path}: {exc}") from None
    cls, adapter = model_class(config, path)
    return config, cls, adapter


def model_class(config, path="the checkpoint"):
    """``(transformers class, adapter)`` of a config: its ``architectures`` name, else the
    ``AutoModelForImageTextToText`` mapping; the adapter serving that class (ValueError if none)."""
    import transformers

    from eos_kernels.integrations.auto import _adapters

    adapters = _adapters()
    supported = ", ".join(g for ad in adapters for g, _ in ad.classes)
    candidates = [getattr(transformers, name, None) for name in (getattr(config, "architectures", None) or [])]
    try:
        from transformers import AutoModelForImageTextToText

        candidates.append(AutoModelForImageTextToText._model_mapping[type(config)])
    except (ImportError, KeyError, AttributeError):
        pass
    for cls in candidates:
        if not isinstance(cls, type):
            continue
        for adapter in adapters:
            gens, _ = adapter._classes()
            if gens and issubclass(cls, gens):
                return cls, adapter
    names = [c.__name__ for c in candidates if isinstance(c, type)] or getattr(config, "architectures", None)
    raise ValueError(f"model: {path} is not a supported model (model_type {getattr(config, 'model_type', None)!r}, "
                     f"class {names}); eos-search supports transformers' {supported}")


def load_model_processor(path):
    """The checkpoint's processor (:func:`eos_kernels.search.data.load_processor`), errors naming ``model``."""
    from eos_kernels.search.data import load_processor

    try:
        return load_processor(path)
    except ValueError as exc:
        raise ValueError(f"model: {exc}") from None


def load_model(path: str, device: torch.device, dtype: torch.dtype, attn_implementation: str | None = None,
               *, processor: bool = True):
    """``(model, processor or None)`` from a local checkpoint directory, the class chosen by its config
    (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2(.5)-VL, InternVL, Gemma 3)."""
    _, cls, _ = load_model_config(path)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: cannot load a {cls.__name__} from {path}: {exc}") from None
    return model.to(device), (load_model_processor(path) if processor else None)
