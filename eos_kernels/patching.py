"""EOS token reduction inside a stock Hugging Face decoder, per model instance.

This module is the model-agnostic half of :func:`eos_kernels.patch_llava`; a
model family plugs in through a small :class:`DecoderAdapter` (the LLaVA-1.5
one lives in ``eos_kernels.integrations.llava``). Supported transformers:
``5.0 <= version < 6`` (the 5.x decoder-layer API), tested in CI on the oldest
and newest releases of :data:`TESTED_TRANSFORMERS`; an older release raises
``RuntimeError`` at patch time, a newer one warns once.

Living on transformers' internals: everything the hooks read from a call is
found by type or role -- the ``Cache`` among the arguments (whatever its
keyword: ``past_key_values`` before 5.24, ``cache`` since), the rotary
``(cos, sin)`` pair, the hidden states -- and every call that does not look as
expected (a decode step on a reduced cache the decoder stack did not show, no
rotary pair, a mask that does not cover the prefill, an unknown argument with a
sequence dimension, a layer output of unknown type) raises
:class:`TransformersDriftError` naming the installed version, never degrades
quietly. Nothing reduced means nothing changed: a reducer that keeps all its
tokens does not run, and image placeholders whose embeddings received no image
feature (a forward without ``pixel_values``) are text.

What a patched model does
-------------------------
At each reducer layer ``l`` of a :class:`~eos_kernels.theta.Theta`, during a
*prefill* forward (the KV cache is empty or absent) that contains visual tokens:

1. layer ``l`` runs at full length with the model's own attention
   implementation (eager, sdpa or flash: nothing is switched);
2. its query and key after RoPE are rebuilt from the outputs of the layer's
   ``q_proj``/``k_proj`` (forward hooks, registered on reducer layers only) and
   the very ``(cos, sin)`` the layer received, with the model's own
   ``apply_rotary_pos_emb`` -- so no attention weights are needed, no eager
   attention is forced and no projection is computed twice. (A function
   registered with transformers' ``AttentionInterface`` would also see q/k, but
   it is selected through ``config._attn_implementation``, which the text
   config shares across layers and which also picks the mask builder; the
   projection hooks leave both untouched.)
3. :func:`~eos_kernels.importance.text_to_visual_importance` rates each visual
   token by the attention the *rating rows* pay it: the non-visual, non-padded
   tokens after the sample's first visual token that belong to the prompt
   (inside ``model.generate`` the prompt is the input given to ``generate``, so
   generated tokens never rate; for a plain forward it is the whole input);
4. :func:`~eos_kernels.selection.select_anchors` keeps the ``K`` best visual
   tokens of each sample, :func:`~eos_kernels.operator.eos_reduce` folds the
   other ``M = N - K`` into them, and the sequence leaving layer ``l`` is the
   non-visual tokens (padding included) plus the reduced anchors, in their
   original order.

Later layers get the shorter sequence; their position embeddings ``(cos,
sin)``, position ids and attention mask are gathered at the kept tokens'
*original* positions (RoPE positions are never renumbered), so every layer's
KV cache holds exactly the tokens that layer processed. After the last layer
the hidden states are scattered back to the input length so that logits,
labels and ``logits_to_keep`` keep their usual shapes: positions whose token
was removed get a zero hidden state (zero logits), and with ``labels=`` they
are left out of the loss (the forward gets its own copy of ``labels`` with -100
at the label each removed position would predict).

Decoding (the KV cache not empty) never re-reduces. The layers behind a
reducer have shorter caches, so each one gets the model's attention mask
gathered at the original positions its cache slots hold (for sdpa without
padding the mask is ``None`` and stays ``None``). The slot -> position map
lives on the cache object itself (``cache._eos_map``), and the cache's
``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave`` /
``crop`` are wrapped on that instance so that beam search and batch
manipulation keep the map aligned with the cache rows. ``generate`` with the
cache therefore gives the same tokens as ``generate(use_cache=False)``, where
every step is a fresh reduced prefill.

Mechanics, all per instance and removable: forward (pre-)hooks on the input
module (it sees ``input_ids``, hence the visual positions), the decoder stack
(per-forward state, the report) and the decoder layers from the first reducer
on (slicing, reduction, the scatter back), forward hooks on the reducer
layers' ``q_proj``/``k_proj``, and an instance attribute ``generate`` that
records the prompt length. No class, global registry or config is modified.
:func:`unpatch_model` removes everything; outputs are then bit-identical to the
unpatched model. The report of the last prefill is ``model.eos_report``
(:func:`get_report`), an :class:`EOSReport`.

Plans, suspension, prompts: a Theta is turned into a :class:`ReductionPlan`
that the prefill asks for its schedule and each reducer's operator arguments;
the differentiable search (:mod:`eos_kernels.search`) patches with its own plan
(``patch_model(model, None, adapter, plan=...)``: differentiable 0-d operator
parameters, a schedule re-derived from the search space at every forward, a
straight-through factor on the anchors) and runs through exactly the same
reduction code. :func:`suspended` runs prefills unreduced without removing the
hooks (the search's reference forward); :func:`prompt_lengths` limits the
rating rows to each sample's prompt in a teacher-forced forward.

Limitations: every sample of a batch must hold the same number of visual tokens
at prefill (true for LLaVA-1.5: one image of ``(image_size / patch_size)^2``
tokens each; otherwise ``ValueError``); flex attention's ``BlockMask`` is not
supported (``NotImplementedError``); a prefill is one forward (chunked prefill
would reduce the first chunk only); visual tokens arriving after the prefill
(a later turn on the same cache) are not reduced; ``output_hidden_states``
gives each layer's states at that layer's own length; a compiled forward
(``torch.compile``, static cache) is tested to compile no more graphs while
decoding than the stock model; a patched instance is not safe to run from
several threads at once. ``copy.deepcopy`` gives an independent patched copy;
pickling a patched model raises ``TypeError`` (unpatch first). Assisted
generation may crop the rejected candidate tokens of its reduced prefill (they
lie after the visual tokens); cropping into the visual tokens raises.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import sys
import types
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from eos_kernels.importance import text_to_visual_importance
from eos_kernels.operator import eos_reduce
from eos_kernels.selection import select_anchors
from eos_kernels.theta import Reducer, Theta

__all__ = [
    "TRANSFORMERS_MIN",
    "TRANSFORMERS_MAX",
    "DecoderAdapter",
    "EOSReport",
    "ReductionPlan",
    "StageRecord",
    "as_theta",
    "check_transformers_version",
    "get_report",
    "is_patched",
    "patch_model",
    "prompt_lengths",
    "suspended",
    "unpatch_model",
]

#: Supported transformers versions: ``TRANSFORMERS_MIN <= version < TRANSFORMERS_MAX`` (setup.py's range).
TRANSFORMERS_MIN = "5.0"
TRANSFORMERS_MAX = "6.0"
#: The oldest and newest releases CI runs the patching tests on (``.ci/run`` pins both exactly).
#: A release newer than ``TESTED_TRANSFORMERS[1]`` patches with one warning naming this range.
TESTED_TRANSFORMERS = ("5.0.0", "5.24.0")

_STATE_ATTR = "_eos_patch_state"
_REPORT_ATTR = "eos_report"
_CACHE_MAP_ATTR = "_eos_map"
_CACHE_WRAPPED_ATTR = "_eos_wrapped"


# --------------------------------------------------------------------------- versions / drift
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


def as_theta(theta: Any) -> Theta:
    """A :class:`Theta` from a Theta, a mapping (the JSON schema) or a path / JSON string."""
    if isinstance(theta, Theta):
        return theta
    if isinstance(theta, Mapping):
        return Theta.from_dict(theta)
    if isinstance(theta, (str, os.PathLike)):
        return Theta.from_json(theta)
    raise TypeError(
        f"theta must be a Theta, a dict in the Theta JSON schema, or a path to a Theta JSON file; "
        f"got {type(theta).__name__}"
    )


# --------------------------------------------------------------------------- plans
class ReductionPlan:
    """Where, how much and how a patched model reduces, asked afresh at every prefill.

    A :class:`~eos_kernels.theta.Theta` is the usual plan (:class:`_ThetaPlan`,
    made by :func:`patch_model`). The differentiable search
    (:mod:`eos_kernels.search`) passes its own plan to ``patch_model(...,
    plan=...)``: the reduction machinery is the same, only these answers differ.

    Attributes:
        name: label written into the report (``EOSReport.theta_name``).
        layers: the decoder layers that may reduce (hooks are installed there).
    """

    name: str | None = None
    layers: tuple[int, ...] = ()
    #: report note when :meth:`schedule` returns no reducer
    empty_note = "no reducer is active"

    def schedule(self, num_visual_tokens: int) -> list[tuple[int, int, int]]:
        """``(layer, incoming, kept)`` of the reducers of this prefill, chained, in layer order."""
        raise NotImplementedError

    def operator_kwargs(self, layer: int) -> dict:
        """Keyword arguments of :func:`~eos_kernels.operator.eos_reduce` for ``layer``."""
        raise NotImplementedError

    def regime(self, layer: int) -> str:
        """Display name of ``layer``'s operator regime (for the report)."""
        raise NotImplementedError

    def finish(self, layer: int, reduced: torch.Tensor, scores: torch.Tensor, anchor_idx: torch.Tensor,
               kept: int) -> torch.Tensor:
        """Last word on the reduced anchors [B, K, d] of ``layer`` (identity by default).

        ``scores`` [B, N] are the importance of the incoming visual tokens,
        ``anchor_idx`` [B, K] the anchors' indices into them."""
        return reduced


class _ThetaPlan(ReductionPlan):
    """A fixed :class:`Theta`: float operator parameters, counts from the Theta's keeps."""

    empty_note = "no reducer of the theta removes a visual token (a keep-all reducer does not run)"

    def __init__(self, theta: Theta):
        self.theta = theta
        self.name = theta.name
        self.reducers: dict[int, Reducer] = {r.layer: r for r in theta.reducers}
        self.layers = tuple(self.reducers)

    def schedule(self, num_visual_tokens: int) -> list[tuple[int, int, int]]:
        # ValueError for a keep > incoming, naming the reducer; a reducer that keeps every token it
        # receives does not run at all, so a keep-all Theta is the stock model bit for bit
        return [s for s in self.theta.schedule(num_visual_tokens) if s[2] < s[1]]

    def operator_kwargs(self, layer: int) -> dict:
        return self.reducers[layer].operator_kwargs()

    def regime(self, layer: int) -> str:
        return self.reducers[layer].regime


# --------------------------------------------------------------------------- adapter
class DecoderAdapter:
    """What the generic patcher needs to know about one model family.

    The defaults fit Llama-style decoder layers of transformers 5.x (Llama,
    Mistral, Qwen2, ...): ``layer.self_attn`` with ``q_proj``/``k_proj`` (or
    ``q_norm``/``k_norm`` applied after them), ``head_dim``, ``scaling``, and a
    module-level ``apply_rotary_pos_emb(q, k, cos, sin)`` in the attention
    module's own modeling file. A subclass provides the model-specific parts
    marked below; :mod:`eos_kernels.integrations.llava` is the example.
    """

    #: Human-readable family name used in messages.
    name = "decoder"

    # ---- model-specific (override)
    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the problem if ``model`` is not supported."""
        raise NotImplementedError

    def input_module(self, model: nn.Module) -> nn.Module:
        """The module called with ``input_ids`` before the decoder stack runs."""
        raise NotImplementedError

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack: its ``forward`` runs the decoder-layer loop."""
        raise NotImplementedError

    def visual_mask(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """bool [B, L] of visual-token positions, from the input module's call arguments."""
        raise NotImplementedError

    def visual_tokens_per_image(self, model: nn.Module) -> int | None:
        """Visual tokens per image from the config (for patch-time validation), or None."""
        return None

    def placeholder_rows(self, model: nn.Module) -> torch.Tensor:
        """[P, d] input-embedding rows of the visual placeholder token ids.

        A visual position whose embedding still equals one of them when the
        decoder stack starts holds no image feature (a forward without
        ``pixel_values``): it is text and is never reduced."""
        raise NotImplementedError

    # ---- Llama-style defaults
    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        text = self.text_model(model)
        layers = getattr(text, "layers", None)
        if not isinstance(layers, (nn.ModuleList, list, tuple)):
            raise ValueError(f"{type(text).__name__} has no `layers` list of decoder layers")
        n = self.num_layers(model)
        return list(layers)[:n]

    def num_layers(self, model: nn.Module) -> int:
        text = self.text_model(model)
        n = getattr(getattr(text, "config", None), "num_hidden_layers", None)
        return int(n) if n is not None else len(text.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise ValueError(f"decoder layer {type(layer).__name__} has no `self_attn`")
        return attn

    def check_layer(self, layer: nn.Module) -> None:
        attn = self.attention(layer)
        for name in ("q_proj", "k_proj"):
            if not isinstance(getattr(attn, name, None), nn.Module):
                raise ValueError(
                    f"attention module {type(attn).__name__} has no `{name}`; this adapter expects "
                    "Llama-style attention (separate q_proj / k_proj)"
                )
        if getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None) is None:
            raise ValueError(
                f"no apply_rotary_pos_emb in {type(attn).__module__}; this adapter expects Llama-style RoPE"
            )

    def qk_modules(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Modules whose outputs are the query / key before RoPE (hooked on reducer layers)."""
        attn = self.attention(layer)
        q = getattr(attn, "q_norm", None)
        k = getattr(attn, "k_norm", None)
        if isinstance(q, nn.Module) and isinstance(k, nn.Module):
            return q, k
        return attn.q_proj, attn.k_proj

    def query_key(self, layer: nn.Module, q_out: torch.Tensor, k_out: torch.Tensor,
                  position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Query [B, Hq, L, dh] and key [B, Hkv, L, dh] after RoPE, as the attention saw them."""
        attn = self.attention(layer)
        head_dim = attn.head_dim
        B, L = q_out.shape[0], q_out.shape[1]
        q = q_out.reshape(B, L, -1, head_dim).transpose(1, 2)
        k = k_out.reshape(B, L, -1, head_dim).transpose(1, 2)
        if position_embeddings is None:
            raise RuntimeError(
                f"decoder layer {type(layer).__name__} was called without position_embeddings; "
                "this adapter expects transformers 5.x Llama-style layers"
            )
        cos, sin = position_embeddings
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return rope(q, k, cos, sin)

    def attention_scale(self, layer: nn.Module) -> float:
        attn = self.attention(layer)
        scale = getattr(attn, "scaling", None)
        return float(scale) if scale is not None else float(attn.head_dim) ** -0.5

    def attn_implementation(self, model: nn.Module) -> str:
        config = getattr(self.text_model(model), "config", None)
        impl = getattr(config, "_attn_implementation", None) or "eager"
        return str(impl)


# --------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One reduction at one layer of one prefill forward.

    Attributes:
        layer: the reducer's decoder layer (it ran at ``seq_in`` tokens).
        regime: the operator regime (prune, merge, pool, reweight, hybrid).
        visual_in, visual_out: visual tokens entering / leaving, per sample.
        seq_in, seq_out: sequence length (padding included) entering / leaving.
        kept_positions: long [B, seq_out], the original positions (indices into
            the input sequence) of the tokens leaving the layer, ascending.
    """

    layer: int
    regime: str
    visual_in: tuple[int, ...]
    visual_out: tuple[int, ...]
    seq_in: int
    seq_out: int
    kept_positions: torch.Tensor = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class EOSReport:
    """What the last prefill forward of a patched model did (``model.eos_report``).

    Attributes:
        theta_name: the Theta's name (or None).
        num_layers: decoder layers of the model.
        batch_size, sequence_length: shape of the prefill input.
        visual_tokens: visual tokens per sample in the input.
        stages: one :class:`StageRecord` per reducer that ran, in layer order.
        note: why nothing was reduced, when nothing was.
    """

    theta_name: str | None
    num_layers: int
    batch_size: int
    sequence_length: int
    visual_tokens: tuple[int, ...]
    stages: tuple[StageRecord, ...]
    note: str | None = None

    @property
    def reduced(self) -> bool:
        return bool(self.stages)

    def leaving_per_layer(self, sample: int = 0) -> list[int]:
        """Visual tokens leaving each decoder layer for ``sample``."""
        current, out = self.visual_tokens[sample], []
        by_layer = {s.layer: s for s in self.stages}
        for layer in range(self.num_layers):
            if layer in by_layer:
                current = by_layer[layer].visual_out[sample]
            out.append(current)
        return out

    def processed_per_layer(self, sample: int = 0) -> list[int]:
        """Visual tokens each decoder layer processes (what enters it) for ``sample``."""
        leaving = self.leaving_per_layer(sample)
        return [self.visual_tokens[sample]] + leaving[:-1]

    def to_dict(self) -> dict:
        return {
            "theta_name": self.theta_name,
            "num_layers": self.num_layers,
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            "visual_tokens": list(self.visual_tokens),
            "note": self.note,
            "stages": [
                {"layer": s.layer, "regime": s.regime, "visual_in": list(s.visual_in),
                 "visual_out": list(s.visual_out), "seq_in": s.seq_in, "seq_out": s.seq_out}
                for s in self.stages
            ],
        }

    def __str__(self) -> str:
        name = f" {self.theta_name!r}" if self.theta_name else ""
        head = (f"EOS report{name}: batch {self.batch_size}, {self.sequence_length} tokens per sample, "
                f"visual tokens per sample {list(self.visual_tokens)}, {self.num_layers} layers")
        if not self.stages:
            return head + "\n  no reduction" + (f" ({self.note})" if self.note else "")
        header = ("layer", "regime", "sample", "visual in", "visual out", "seq in", "seq out")
        rows = [header]
        for s in self.stages:
            for b in range(self.batch_size):
                rows.append((str(s.layer), s.regime, str(b), str(s.visual_in[b]), str(s.visual_out[b]),
                             str(s.seq_in), str(s.seq_out)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [head]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        means = [sum(self.leaving_per_layer(b)) / self.num_layers for b in range(self.batch_size)]
        lines.append("  mean visual tokens leaving a layer, per sample: "
                     + ", ".join(f"{m:.2f}" for m in means))
        return "\n".join(lines)


def get_report(model: nn.Module) -> EOSReport | None:
    """The :class:`EOSReport` of the last prefill forward of a patched model (None before any)."""
    return model.__dict__.get(_REPORT_ATTR)


def is_patched(model: nn.Module) -> bool:
    return _STATE_ATTR in model.__dict__


def _state_of(model: nn.Module, what: str) -> "_PatchState":
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError(f"{what}: the model is not patched (patch_llava / patch_model first)")
    return state


@contextlib.contextmanager
def suspended(model: nn.Module):
    """Within the block, prefill forwards of the patched ``model`` run unreduced.

    The hooks stay installed (the model is never left unpatched by accident);
    the report of such a forward says the reduction was suspended. Decoding on
    a cache that a reduced prefill filled still reads it correctly. Nests.
    """
    state = _state_of(model, "suspended")
    previous, state.suspended = state.suspended, True
    try:
        yield model
    finally:
        state.suspended = previous


@contextlib.contextmanager
def prompt_lengths(model: nn.Module, lengths):
    """Within the block, only each sample's first ``lengths[b]`` tokens rate the visual tokens.

    A plain forward otherwise lets every text token after the image rate them
    (inside ``generate``, the prompt). A teacher-forced forward of
    prompt + answer uses this to rate with the prompt alone, as ``generate``
    would at deployment. ``lengths``: an int (every sample) or a sequence /
    long tensor [B]. ``generate`` inside the block still uses its own prompt.
    """
    state = _state_of(model, "prompt_lengths")
    if not isinstance(lengths, int):
        lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    previous, state.prompt_length = state.prompt_length, lengths
    try:
        yield model
    finally:
        state.prompt_length = previous


# --------------------------------------------------------------------------- cache map
class _CacheMap:
    """Which original positions each reduced layer's cache slots hold (prefill part)."""

    __slots__ = ("prefill_length", "first_layers", "kept")

    def __init__(self, prefill_length: int):
        self.prefill_length = prefill_length
        self.first_layers: list[int] = []   # first layer of each stage (reducer layer + 1)
        self.kept: list[torch.Tensor] = []  # long [B, L'_s]: original positions of the stage's prefill slots

    def stage_of(self, layer_idx: int) -> int | None:
        stage = None
        for s, first in enumerate(self.first_layers):
            if first <= layer_idx:
                stage = s
        return stage


def _cache_seq_length(cache, layer_idx: int = 0) -> int:
    n = cache.get_seq_length(layer_idx) if layer_idx else cache.get_seq_length()
    return int(n)


def _crop_prefill(m: _CacheMap, new_length: int) -> None:
    """Shorten the map's prefill to its first ``new_length`` original positions.

    Assisted generation verifies candidate tokens appended to the prompt in
    the same (reduced) prefill forward and crops the rejected ones. That is
    possible when every removed position was kept by every reducer (it lies
    after the visual tokens), so that each layer drops the same number of
    slots; cropping into the reduced visual tokens is not."""
    drop = m.prefill_length - new_length
    if new_length < 0 or not all(bool(((kept >= new_length).sum(dim=1) == drop).all()) for kept in m.kept):
        raise NotImplementedError(
            f"EOS: cannot crop a KV cache to {new_length} tokens: that cuts into the visual tokens its "
            "reduced prefill removed (only tokens after the last visual token can be cropped)"
        )
    m.kept = [kept[:, :kept.shape[1] - drop] for kept in m.kept]
    m.prefill_length = new_length


def _wrap_cache_methods(cache) -> None:
    """Keep ``cache._eos_map`` aligned when the cache's batch rows move (per instance)."""
    if cache.__dict__.get(_CACHE_WRAPPED_ATTR):
        return

    def _bound(name):
        return getattr(type(cache), name, None)

    def reorder_cache(self, beam_idx):
        m = self.__dict__.get(_CACHE_MAP_ATTR)
        if m is not None:
            m.kept = [k.index_select(0, beam_idx.to(k.device)) for k in m.kept]
        return _bound("reorder_cache")(self, beam_idx)

    def batch_select_indices(self, indices):
        m = self.__dict__.get(_CACHE_MAP_ATTR)
        if m is not None:
            m.kept = [k[indices.to(k.device) if torch.is_tensor(indices) else indices] for k in m.kept]
        return _bound("batch_select_indices")(self, indices)

    def batch_repeat_interleave(self, repeats):
        m = self.__dict__.get(_CACHE_MAP_ATTR)
        if m is not None:
            m.kept = [k.repeat_interleave(repeats, dim=0) for k in m.kept]
        return _bound("batch_repeat_interleave")(self, repeats)

    def crop(self, tokens):
        # transformers 5.23: crop(-n) removes the last n tokens of every layer (crop(0) removes none);
        # older releases also took crop(max_length > 0), an absolute length, which is wrong for layers
        # holding fewer tokens: it is turned into a removal count here
        m = self.__dict__.get(_CACHE_MAP_ATTR)
        if m is not None:
            length = _cache_seq_length(self)  # layer 0 runs before any reducer: original positions
            remove = length - tokens if tokens > 0 else -tokens
            if remove <= 0:
                return None  # nothing to remove (and crop(0) empties every layer on transformers < 5.23)
            if remove > length - m.prefill_length:
                _crop_prefill(m, length - remove)
            return _bound("crop")(self, -remove)
        return _bound("crop")(self, tokens)

    for name, fn in (("reorder_cache", reorder_cache), ("batch_select_indices", batch_select_indices),
                     ("batch_repeat_interleave", batch_repeat_interleave), ("crop", crop)):
        if _bound(name) is not None:
            setattr(cache, name, types.MethodType(fn, cache))
    cache.__dict__[_CACHE_WRAPPED_ATTR] = True


# --------------------------------------------------------------------------- per-forward context
class _Context:
    """State of one forward of the decoder stack."""

    def __init__(self):
        self.mode = "off"  # "prefill" (reducing), "decode" (on a reduced cache), "continue" (on another cache), "off"
        self.batch = 0
        self.length = 0             # input length of this forward
        self.visual: torch.Tensor | None = None   # bool [B, L]
        self.real: torch.Tensor | None = None     # bool [B, L] or None (no padding)
        self.rows: torch.Tensor | None = None     # bool [B, L] rating rows
        self.schedule: dict[int, tuple[int, int]] = {}
        self.cur_idx: torch.Tensor | None = None  # long [B, L_cur] original positions (prefill)
        self.stage_kwargs: dict | None = None     # sliced kwargs cached for the current stage
        self.capturing: int | None = None
        self.captured: dict[str, torch.Tensor] = {}
        self.cache = None
        self.cache_map: _CacheMap | None = None
        self.decode_cols: dict[tuple, Any] = {}
        self.stages: list[StageRecord] = []
        self.note: str | None = None
        self.visual_counts: tuple[int, ...] = ()
        self.found_cache = None                   # the Cache among the decoder stack's arguments (prefill)
        self.labels: torch.Tensor | None = None   # this forward's own copy of `labels`, if any


class _PatchState:
    def __init__(self, model, adapter: DecoderAdapter, plan: ReductionPlan):
        self.adapter = adapter
        self.plan = plan
        self.reducers: frozenset[int] = frozenset(plan.layers)  # layers that may reduce (hooked)
        self.num_layers = adapter.num_layers(model)
        self.handles: list = []
        self.pending_visual: torch.Tensor | None = None
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


# --------------------------------------------------------------------------- helpers
def _gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x [*lead, Bx, L, *rest] gathered at idx [B, L'] along the sequence ``dim`` (the batch is ``dim - 1``;
    Bx may be 1: broadcast)."""
    lead, rest = x.shape[:dim - 1], x.shape[dim + 1:]
    B = idx.shape[0]
    if x.shape[dim - 1] != B:
        x = x.expand(*lead, B, *x.shape[dim:])
    index = idx.view(*([1] * len(lead)), *idx.shape, *([1] * len(rest))).expand(*lead, *idx.shape, *rest)
    return x.gather(dim, index)


def _gather_last(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [..., Bx, L] (position ids, also multimodal [k, B, L]) gathered at idx [B, L'] along the last dim."""
    lead = x.shape[:-2]
    B = idx.shape[0]
    x = x.expand(*lead, B, x.shape[-1]) if x.shape[-2] != B else x
    return x.gather(-1, idx.expand(*lead, *idx.shape))


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, L, d] at idx [B, k] (no bounds check: no device sync)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _is_flash(impl: str) -> bool:
    return "flash" in impl or "paged" in impl


def _mask_cols(kept: torch.Tensor, prefill_len: int, kv_total: int, slots: int):
    """Original kv column for each of a layer's ``slots`` cache slots, and which are invalid.

    Slot s < L' holds ``kept[:, s]``; later slots hold the tokens appended after
    the prefill, at original position ``prefill_len + (s - L')``. With a static
    cache the layer has more slots than the mask has columns left for it: those
    slots are empty and come back marked invalid (always masked).
    """
    B, Lk = kept.shape
    device = kept.device
    n_extra = max(slots - Lk, 0)
    extra = torch.arange(prefill_len, prefill_len + n_extra, device=device)
    cols = torch.cat([kept[:, :slots], extra.unsqueeze(0).expand(B, -1)], dim=1)
    if prefill_len + n_extra > kv_total:  # kept positions are always < prefill_len <= kv_total
        invalid = cols >= kv_total
        return cols.clamp(max=kv_total - 1), invalid
    return cols, None


def _check_mask(mask) -> None:
    if mask is not None and not (torch.is_tensor(mask) and mask.dim() in (2, 4)):
        raise NotImplementedError(
            "EOS patching supports 2-D or 4-D tensor attention masks (eager, sdpa, flash attention); "
            f"got {type(mask).__name__} (flex attention's BlockMask and per-layer-type mask dicts are not "
            "supported)"
        )


def _gather_mask(mask, rows: torch.Tensor | None, cols: torch.Tensor, invalid: torch.Tensor | None):
    """Gather a 4-D [B|1, H|1, q, kv] or 2-D [B, kv] attention mask at query rows / kv columns."""
    if mask is None:
        return None
    _check_mask(mask)
    B = cols.shape[0]
    if mask.dim() == 2:
        m = mask if mask.shape[0] == B else mask.expand(B, -1)
        m = m.gather(1, cols.to(m.device))
        if invalid is not None:
            m = m.masked_fill(invalid.to(m.device), 0)
        return m
    m = mask if mask.shape[0] == B else mask.expand(B, *mask.shape[1:])
    H, q, _ = m.shape[1], m.shape[2], m.shape[3]
    if rows is not None:
        rows = rows.to(m.device)
        m = m.gather(2, rows[:, None, :, None].expand(B, H, rows.shape[1], m.shape[3]))
        q = rows.shape[1]
    cols = cols.to(m.device)
    m = m.gather(3, cols[:, None, None, :].expand(B, H, q, cols.shape[1]))
    if invalid is not None:
        fill = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
        m = m.masked_fill(invalid.to(m.device)[:, None, None, :], fill)
    return m


# --------------------------------------------------------------------------- hooks
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
        state.pending_visual = state.adapter.visual_mask(model, args, kwargs)
        return None

    return hook


def _input_post_hook(state: _PatchState):
    def hook(module, args, kwargs, output):
        state.pending_visual = None
        return None

    return hook


def _text_pre_hook(state: _PatchState, model):
    def hook(module, args, kwargs):
        ctx = _Context()
        state.ctx = ctx
        visual, state.pending_visual = state.pending_visual, None
        ctx.labels, state.pending_labels = state.pending_labels, None
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
            cmap = cache.__dict__.get(_CACHE_MAP_ATTR) if hasattr(cache, "__dict__") else None
            if cmap is not None and cmap.first_layers:
                ctx.mode = "decode"
                ctx.cache = cache
                ctx.cache_map = cmap
            else:
                ctx.mode = "continue"
            return None
        ctx.found_cache = cache
        # ---- prefill
        if cache is not None and hasattr(cache, "__dict__"):
            cache.__dict__.pop(_CACHE_MAP_ATTR, None)  # a reused cache: forget the old map
        if state.suspended:
            ctx.note = "reduction suspended (eos_kernels.patching.suspended)"
            ctx.mode = "off"
            return None
        if visual is None or visual.shape != (B, L):
            ctx.note = "no visual-token information (the input module was not called)"
            ctx.visual_counts = (0,) * B
            ctx.mode = "off"
            return None
        visual = visual.to(device=ref.device, dtype=torch.bool)
        visual = _with_features(state.adapter, model, visual, embeds)
        counts = visual.sum(dim=1).tolist()
        ctx.visual_counts = tuple(int(c) for c in counts)
        if not any(counts):
            ctx.note = "no image tokens in the input: passed through unreduced"
            ctx.mode = "off"
            return None
        if not state.reducers:
            ctx.note = state.plan.empty_note
            ctx.mode = "off"
            return None
        if len(set(counts)) != 1:
            raise ValueError(
                f"EOS: every sample of a batch must hold the same number of visual tokens, got {counts} "
                "(batch prompts with the same number of images together)"
            )
        n = int(counts[0])
        if state.hooks_in_checkpoint and torch.is_grad_enabled() and any(
                getattr(layer, "gradient_checkpointing", False) and layer.training for layer in state.layers):
            raise NotImplementedError(
                "EOS: gradient checkpointing through a patched model needs a transformers release that "
                "checkpoints decoder-layer forward() with hooks outside the checkpoint (5.23 does); "
                "disable gradient checkpointing or upgrade transformers"
            )
        sched = state.plan.schedule(n)  # Theta: ValueError for a keep > incoming, naming the reducer
        if not sched:
            ctx.note = state.plan.empty_note
            ctx.mode = "off"
            return None
        ctx.schedule = {layer: (inc, kept) for layer, inc, kept in sched}
        real = _real_tokens(kwargs.get("attention_mask"), B, L)
        if real is not None:
            real = real.to(ref.device)
            if bool(real.all()):
                real = None
        ctx.visual, ctx.real = visual, real
        ctx.rows = _rating_rows(visual, real, state.prompt_length)
        ctx.cache = cache
        ctx.mode = "prefill"
        return None

    return hook


def _with_features(adapter: DecoderAdapter, model, visual: torch.Tensor, embeds) -> torch.Tensor:
    """The visual positions that hold an image feature: placeholders without one are text.

    Decided from what the decoder stack receives, not from the name of the
    argument that carried the image (``pixel_values``, precomputed encoder
    outputs, ...): a placeholder whose embedding is still the token's own row
    received no feature."""
    if embeds is None or not bool(visual.any()):
        return visual if embeds is not None else torch.zeros_like(visual)
    rows = adapter.placeholder_rows(model).to(device=embeds.device, dtype=embeds.dtype)  # [P, d]
    plain = (embeds.unsqueeze(-2) == rows).all(dim=-1).any(dim=-1)  # [B, L]
    return visual & ~plain


def _real_tokens(mask, B: int, L: int) -> torch.Tensor | None:
    """bool [B, L], False at padding, from the prefill's attention mask (2-D, or a prepared 4-D one)."""
    if not torch.is_tensor(mask):
        return None
    if mask.dim() == 2 and mask.shape[-1] >= L:
        real = mask[:, :L] != 0
    elif mask.dim() == 4 and mask.shape[-2] >= L and mask.shape[-1] >= L:
        # a prepared mask (e.g. generate with a static cache): at prefill, token j sees itself
        # unless it is padding, so the diagonal tells the padding apart
        ar = torch.arange(L, device=mask.device)
        diag = mask[:, 0, ar, ar]
        real = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
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
            cmap = out_cache.__dict__.get(_CACHE_MAP_ATTR)
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
        model.__dict__[_REPORT_ATTR] = EOSReport(
            theta_name=state.plan.name,
            num_layers=state.num_layers,
            batch_size=ctx.batch,
            sequence_length=ctx.length,
            visual_tokens=ctx.visual_counts or (0,) * ctx.batch,
            stages=tuple(ctx.stages),
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
            return _decode_kwargs(state, ctx, layer_idx, module, args, kwargs)
        if (cache is not None and ctx.mode != "continue" and hasattr(cache, "__dict__")
                and cache.__dict__.get(_CACHE_MAP_ATTR) is not None and _cache_seq_length(cache) > 0
                and ctx.found_cache is not cache):
            raise _drift(f"decoder layer {layer_idx} received a KV cache filled by a reduced prefill that the "
                         "decoder stack's call did not show, so this decode step was taken for a new prefill")
        if ctx.mode != "prefill":
            return None
        if layer_idx in ctx.schedule:
            ctx.capturing = layer_idx
            ctx.captured = {}
        if ctx.cur_idx is None:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not torch.is_tensor(hidden) or hidden.shape[1] != ctx.cur_idx.shape[1]:
            raise _drift(f"decoder layer {layer_idx} did not receive the shortened hidden states as its first "
                         "argument or `hidden_states`")
        if ctx.stage_kwargs is None:
            ctx.stage_kwargs = _slice_prefill_kwargs(state, model, ctx, layer_idx, args, kwargs)
        new = dict(kwargs)
        new.update(ctx.stage_kwargs)
        for name in _CACHE_POSITION_KEYS:
            if kwargs.get(name) is not None:
                new[name] = torch.arange(ctx.cur_idx.shape[1], device=ctx.cur_idx.device)
        return args, new

    return hook


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
                          kwargs: dict) -> dict:
    """The arguments of a layer behind a reducer, fitted to the kept tokens (once per stage)."""
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
            out[name] = _gather_last(pid, idx.to(pid.device))
    for name in _MASK_KEYS:
        known.add(name)
        if name not in kwargs:
            continue
        mask = kwargs[name]
        _check_mask(mask)
        if mask is not None:
            kv_total = mask.shape[-1]
            if kv_total < ctx.length or (mask.dim() == 4 and mask.shape[-2] != ctx.length):
                raise _drift(f"decoder layer {layer_idx}'s attention mask of shape {tuple(mask.shape)} does not "
                             f"cover the prefill of {ctx.length} tokens")
            slots = kv_total - (ctx.length - idx.shape[1])
            if getattr(ctx.cache, "is_compileable", False):
                slots = kv_total
            cols, invalid = _mask_cols(idx, ctx.length, kv_total, slots)
            rows = idx if mask.dim() == 4 else None
            out[name] = _gather_mask(mask, rows, cols, invalid)
    known.update(_CACHE_POSITION_KEYS)
    known.update(k for k, v in kwargs.items() if v is not None and not torch.is_tensor(v) and _is_cache(v))
    _check_unknown_args(ctx, layer_idx, args, kwargs, known, {ctx.length})
    return out


def _decode_kwargs(state: _PatchState, ctx: _Context, layer_idx: int, module, args, kwargs):
    cmap = ctx.cache_map
    stage = cmap.stage_of(layer_idx)
    if stage is None:
        return None
    kept = cmap.kept[stage]
    changed = {}
    hidden = args[0] if args else kwargs.get("hidden_states")
    q = hidden.shape[1] if torch.is_tensor(hidden) else None
    for name in _MASK_KEYS:
        mask = kwargs.get(name)
        _check_mask(mask)
        if mask is None:
            continue
        kv_total = mask.shape[-1]
        if kv_total < cmap.prefill_length:
            raise _drift(f"decoder layer {layer_idx}'s attention mask has {kv_total} key columns during a decode "
                         f"step, fewer than the {cmap.prefill_length} tokens of the reduced prefill")
        # one gathered mask per stage and attention type for the whole forward; keyed on nothing that
        # changes between decode steps (torch.compile guards on such keys and would recompile every step)
        key = (stage, name, getattr(module, "attention_type", None))
        if key not in ctx.decode_cols:
            removed = cmap.prefill_length - kept.shape[1]
            slots = kv_total if getattr(ctx.cache, "is_compileable", False) else kv_total - removed
            cols, invalid = _mask_cols(kept, cmap.prefill_length, kv_total, slots)
            ctx.decode_cols[key] = _gather_mask(mask, None, cols, invalid)
        changed[name] = ctx.decode_cols[key]
    for name in _CACHE_POSITION_KEYS:
        if kwargs.get(name) is not None and q is not None:
            removed = cmap.prefill_length - kept.shape[1]
            start = _cache_seq_length(ctx.cache) - q - removed if ctx.cache is not None else 0
            changed[name] = torch.arange(start, start + q, device=kept.device)
    if not changed:
        return None
    new = dict(kwargs)
    new.update(changed)
    return args, new


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
            full = new_hidden.new_zeros(B, ctx.length, d)
            idx = ctx.cur_idx.to(new_hidden.device)
            new_hidden = full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), new_hidden)
        if new_hidden is hidden:
            return None
        if isinstance(output, (tuple, list)):
            return type(output)((new_hidden, *output[1:]))
        return new_hidden

    return hook


def _reduce(state: _PatchState, model, ctx: _Context, layer_idx: int, layer: nn.Module, args: tuple,
            kwargs: dict, hidden: torch.Tensor, captured: dict) -> torch.Tensor:
    """Reduce the visual tokens leaving ``layer_idx``; returns the shorter hidden states."""
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
    visual = ctx.visual.to(device).gather(1, cur)
    rows = ctx.rows.to(device).gather(1, cur)
    real = ctx.real.to(device).gather(1, cur) if ctx.real is not None else None
    pe_key = find_position_embeddings(kwargs, Lc)
    query, key = state.adapter.query_key(layer, captured["q"], captured["k"],
                                         kwargs[pe_key] if pe_key is not None else None)
    scores = text_to_visual_importance(query, key, visual, rows, real,
                                       scale=state.adapter.attention_scale(layer))
    # positions (current coordinates) of each sample's visual tokens, ascending
    vis_pos = torch.sort((~visual).to(torch.int8), dim=1, stable=True).indices[:, :incoming]
    vis_scores = scores.gather(1, vis_pos)
    a_idx, c_idx = select_anchors(vis_scores, kept)
    anchor_pos = vis_pos.gather(1, a_idx)
    cand_pos = vis_pos.gather(1, c_idx)
    anchors = _take(hidden, anchor_pos)
    candidates = _take(hidden, cand_pos)
    reduced = eos_reduce(anchors, candidates, vis_scores.gather(1, c_idx), **plan.operator_kwargs(layer_idx))
    reduced = plan.finish(layer_idx, reduced, vis_scores, a_idx, kept)
    keep = (~visual).scatter(1, anchor_pos, True)
    new_len = Lc - (incoming - kept)
    new_pos = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :new_len]
    slots = (keep.to(torch.long).cumsum(dim=1) - 1).gather(1, anchor_pos)
    out = _take(hidden, new_pos)
    out = out.scatter(1, slots.unsqueeze(-1).expand(-1, -1, d), reduced.to(out.dtype))
    ctx.cur_idx = cur.gather(1, new_pos)
    ctx.stage_kwargs = None
    ctx.stages.append(StageRecord(
        layer=layer_idx, regime=plan.regime(layer_idx), visual_in=(incoming,) * B, visual_out=(kept,) * B,
        seq_in=Lc, seq_out=new_len, kept_positions=ctx.cur_idx.detach(),
    ))
    cache = find_cache(args, kwargs)
    if cache is not None and hasattr(cache, "__dict__"):
        if len(ctx.stages) == 1:  # first reduction of this prefill: a fresh map
            cache.__dict__[_CACHE_MAP_ATTR] = _CacheMap(ctx.length)
            _wrap_cache_methods(cache)
            ctx.found_cache = cache  # this prefill's own cache (possibly created inside the decoder stack)
        cmap = cache.__dict__[_CACHE_MAP_ATTR]
        cmap.first_layers.append(layer_idx + 1)
        cmap.kept.append(ctx.cur_idx.detach())
    return out


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


# --------------------------------------------------------------------------- patch / unpatch
def patch_model(model: nn.Module, theta: Any, adapter: DecoderAdapter, *,
                num_visual_tokens: int | None = None, plan: ReductionPlan | None = None) -> nn.Module:
    """Patch ``model`` (this instance only) to run ``theta`` through ``adapter``.

    Args:
        model: the model instance.
        theta: a :class:`Theta`, a dict in its JSON schema, or a path to a JSON file.
        adapter: the model family's :class:`DecoderAdapter`.
        num_visual_tokens: visual tokens per prompt used to validate ``theta``
            at patch time; defaults to ``adapter.visual_tokens_per_image``.
            The actual count is validated again at every prefill.
        plan: instead of ``theta`` (which must then be None), a
            :class:`ReductionPlan` asked at every prefill which layers reduce,
            how many tokens they keep and with which operator parameters (the
            differentiable search's mode, :mod:`eos_kernels.search`).

    Returns:
        ``model`` itself. Patching an already patched model replaces the old
        configuration.

    Raises:
        RuntimeError: unsupported transformers version.
        ValueError: unsupported model, or ``theta`` invalid for this model
            (a layer beyond the model's layers, a keep above the incoming tokens).
    """
    check_transformers_version()
    if plan is None:
        theta = as_theta(theta)
    elif theta is not None:
        raise TypeError("patch_model: pass either theta or plan, not both")
    elif not isinstance(plan, ReductionPlan):
        raise TypeError(f"plan must be a ReductionPlan, got {type(plan).__name__}")
    adapter.check_model(model)
    num_layers = adapter.num_layers(model)
    if plan is None:
        n_vis = num_visual_tokens if num_visual_tokens is not None else adapter.visual_tokens_per_image(model)
        if n_vis is not None:
            theta.validate(num_layers, int(n_vis))
        else:
            for i, r in enumerate(theta.reducers):
                if r.layer >= num_layers:
                    raise ValueError(
                        f"reducers[{i}].layer: layer {r.layer} does not exist in a model with "
                        f"{num_layers} layers (valid: 0..{num_layers - 1})"
                    )
        plan = _ThetaPlan(theta)
    else:
        for layer_idx in plan.layers:
            if not 0 <= layer_idx < num_layers:
                raise ValueError(f"plan layer {layer_idx} does not exist in a model with {num_layers} layers")
    layers = adapter.decoder_layers(model)
    for layer_idx in plan.layers:
        adapter.check_layer(layers[layer_idx])
    if is_patched(model):
        unpatch_model(model)
    _install(model, adapter, plan)
    model.__dict__.pop(_REPORT_ATTR, None)
    return model


def _install(model: nn.Module, adapter: DecoderAdapter, plan: ReductionPlan) -> None:
    """Register the hooks and instance attributes of a patch (the checks are :func:`patch_model`'s)."""
    num_layers = adapter.num_layers(model)
    layers = adapter.decoder_layers(model)
    state = _PatchState(model, adapter, plan)
    handles = state.handles
    try:
        handles.append(model.register_forward_pre_hook(_model_pre_hook(state, model), with_kwargs=True))
        inp = adapter.input_module(model)
        handles.append(inp.register_forward_pre_hook(_input_pre_hook(state, model), with_kwargs=True))
        handles.append(inp.register_forward_hook(_input_post_hook(state), with_kwargs=True, always_call=True))
        text = adapter.text_model(model)
        handles.append(text.register_forward_pre_hook(_text_pre_hook(state, model), with_kwargs=True))
        handles.append(text.register_forward_hook(_text_post_hook(state, model), with_kwargs=True,
                                                  always_call=True))
        if state.reducers:
            first = state.first_reducer
            last = num_layers - 1
            for i, layer in enumerate(layers):
                if i < first:
                    continue
                handles.append(layer.register_forward_pre_hook(_layer_pre_hook(state, model, i), with_kwargs=True))
                if i in state.reducers or i == last:
                    handles.append(layer.register_forward_hook(
                        _layer_post_hook(state, model, i, i == last), with_kwargs=True))
                if i in state.reducers:
                    qm, km = adapter.qk_modules(layer)
                    handles.append(qm.register_forward_hook(_capture_hook(state, i, "q")))
                    handles.append(km.register_forward_hook(_capture_hook(state, i, "k")))
        gen = getattr(model, "generate", None)
        if callable(gen):
            model.__dict__["generate"] = _generate_wrapper(state, model)
            state.installed_generate = model.__dict__["generate"]
    except Exception:
        for h in handles:
            h.remove()
        raise
    # copy.deepcopy and pickle look these up on the instance: a copy gets its own hooks and state
    model.__dict__["__deepcopy__"] = types.MethodType(_deepcopy_patched, model)
    model.__dict__["__reduce_ex__"] = types.MethodType(_refuse_pickle, model)
    model.__dict__[_STATE_ATTR] = state


def _deepcopy_patched(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a patched model: an independent copy, patched with a copy of the same plan."""
    state = model.__dict__[_STATE_ATTR]
    report = model.__dict__.get(_REPORT_ATTR)
    adapter, plan = state.adapter, state.plan
    prompt_length, suspended_ = state.prompt_length, state.suspended
    _uninstall(model)
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        _install(model, adapter, plan)
        new_state = model.__dict__[_STATE_ATTR]
        new_state.prompt_length, new_state.suspended = prompt_length, suspended_
        if report is not None:
            model.__dict__[_REPORT_ATTR] = report
    _install(clone, copy.deepcopy(adapter, memo), copy.deepcopy(plan, memo))
    if report is not None:
        clone.__dict__[_REPORT_ATTR] = report
    return clone


def _refuse_pickle(model: nn.Module, protocol):
    raise TypeError(
        f"cannot pickle a model patched by eos_kernels ({type(model).__name__}): its hooks hold per-instance "
        "state. Unpatch it first (eos_kernels.unpatch_llava / unpatch_model), save it (or its state_dict), "
        "and patch the loaded model again with the same Theta."
    )


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove every hook and attribute :func:`patch_model` added; a no-op on an unpatched model."""
    model.__dict__.pop(_REPORT_ATTR, None)
    _uninstall(model)
    return model


def _uninstall(model: nn.Module) -> None:
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    for name in ("__deepcopy__", "__reduce_ex__"):
        model.__dict__.pop(name, None)
    for h in state.handles:
        h.remove()
    state.handles.clear()
    state.ctx = None
    if getattr(state, "installed_generate", None) is not None and model.__dict__.get("generate") is state.installed_generate:
        if state.had_generate_attr:
            model.__dict__["generate"] = state.old_generate
        else:
            del model.__dict__["generate"]
