"""Living on transformers' internals: the supported range, finding what a call carries by type or
role, and the error raised when a call does not look as expected."""
from __future__ import annotations

from typing import Mapping

import torch

#: Supported transformers versions: ``TRANSFORMERS_MIN <= version < TRANSFORMERS_MAX`` (setup.py's range).
TRANSFORMERS_MIN = "5.0"
TRANSFORMERS_MAX = "6.0"
#: The oldest and newest releases CI runs the patching tests on (``.ci/run`` pins both exactly).
#: A release newer than ``TESTED_TRANSFORMERS[1]`` patches with one warning naming this range.
TESTED_TRANSFORMERS = ("5.0.0", "5.25.0")

class TransformersDriftError(RuntimeError):
    """A patched model met a call from transformers that it does not understand.

    Raised instead of running on with a guess: the patch reads what
    transformers' modules hand each other (the KV cache, the position
    embeddings, the attention mask, a layer's output), and a release that
    changes those would otherwise make the reduction silently wrong. The
    message names the installed transformers version, the tested range and the
    expectation that failed."""


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:  # pragma: no cover - only reached without transformers
        return "(not installed)"
    return str(transformers.__version__)


def _drift(what: str) -> TransformersDriftError:
    lo, hi = TESTED_TRANSFORMERS
    return TransformersDriftError(
        f"EOS patch: {what} (transformers {_transformers_version()}; eos_kernels' model patching is "
        f"tested on transformers {lo} to {hi}). Refusing to guess: unpatch the model, or install a tested "
        "release, and report this error with the transformers version."
    )


def check_transformers_version(version: str | None = None) -> str:
    """Return the installed transformers version (or ``version``) after checking it against the supported range.

    Raises ``RuntimeError`` below ``TRANSFORMERS_MIN`` (or without transformers);
    a release newer than the newest tested one (``TESTED_TRANSFORMERS[1]``)
    gives one ``UserWarning`` naming the tested range, and the patch's runtime
    checks (:class:`TransformersDriftError`) guard what such a release may have
    changed.
    """
    if version is None:
        try:
            import transformers
        except ImportError as exc:  # pragma: no cover - transformers is a hard requirement here
            raise RuntimeError(
                "eos_kernels model patching needs transformers "
                f">={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX} (pip install 'eos_kernels[hf]')"
            ) from exc
        version = transformers.__version__
    from packaging.version import Version

    v = Version(Version(version).base_version)
    lo, hi = TESTED_TRANSFORMERS
    if v < Version(TRANSFORMERS_MIN):
        raise RuntimeError(
            f"eos_kernels model patching needs transformers >={TRANSFORMERS_MIN} (the 5.x decoder-layer "
            f"API; tested on {lo} to {hi}); found transformers {version}"
        )
    newest = Version(hi)
    if v.release[:2] > newest.release[:2]:
        import warnings

        warnings.warn(
            f"eos_kernels model patching is tested on transformers {lo} to {hi}; found {version}. "
            "It checks what it reads from transformers at every call and raises TransformersDriftError "
            "if that changed, rather than reducing wrongly.",
            UserWarning,
            stacklevel=3,
        )
    return version


def _is_cache(obj) -> bool:
    # imported here, not at module level (transformers is optional for the operator); a plain import, not an
    # lru_cache, which torch.compile traces around with a warning at every compiled forward
    from transformers.cache_utils import Cache

    return isinstance(obj, Cache)


def find_cache(args: tuple, kwargs: dict):
    """The ``transformers.Cache`` among a call's arguments, found by type (any keyword), or None.

    transformers renames the keyword that carries the cache between its own
    modules (``past_key_value`` -> ``past_key_values`` -> ``cache`` in 5.24), so
    the patch never looks for it by name. Raises :class:`TransformersDriftError`
    when the arguments hold two different caches, or a legacy tuple cache.
    """
    found = None
    for value in (*args, *kwargs.values()):
        if value is None or torch.is_tensor(value):
            continue
        if _is_cache(value):
            if found is not None and found is not value:
                raise _drift("a call received two different KV caches; cannot tell which one is the model's")
            found = value
    for name in ("cache", "past_key_values", "past_key_value"):
        value = kwargs.get(name)
        if isinstance(value, (tuple, list)) and value:
            raise _drift(f"the KV cache arrived as a {type(value).__name__} under `{name}`, not a "
                         "transformers Cache")
    return found


def _output_cache(output):
    """The Cache held by a model output (a ``ModelOutput`` mapping or a tuple), found by type."""
    if output is None or torch.is_tensor(output):
        return None
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple) else ()
    for value in values:
        if value is not None and not torch.is_tensor(value) and _is_cache(value):
            return value
    return None


def _is_rope_pair(value, length: int) -> bool:
    """(cos, sin): two tensors of one shape [..., length, head_dim]."""
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(torch.is_tensor(t) for t in value) and value[0].shape == value[1].shape
            and value[0].dim() >= 3 and value[0].shape[-2] == length)


def find_position_embeddings(kwargs: dict, length: int) -> str | None:
    """Keyword of the rotary ``(cos, sin)`` pair of a decoder-layer call, found by role, or None.

    The role: a pair of same-shaped tensors whose second-last dimension is the
    sequence length. ``TransformersDriftError`` if several arguments look like it.
    """
    names = [k for k, v in kwargs.items() if _is_rope_pair(v, length)]
    if len(names) > 1:
        if "position_embeddings" in names:
            return "position_embeddings"
        raise _drift(f"several arguments of a decoder layer look like rotary (cos, sin) pairs: {names}")
    return names[0] if names else None


#: Decoder-layer keywords the patch understands besides the cache (found by type) and the rotary pair
#: (found by role). A tensor argument with the sequence length under any other name is drift.
_MASK_KEYS = ("attention_mask",)
_POSITION_ID_KEYS = ("position_ids",)
_CACHE_POSITION_KEYS = ("cache_position",)


