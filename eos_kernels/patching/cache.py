"""The KV cache of a reduced prefill: which original positions each reduced layer's slots hold, the
cache methods wrapped (per instance) to keep that map aligned, and attention masks fitted to it."""
from __future__ import annotations

import types
from typing import Mapping

import torch

from .compat import _drift

CACHE_MAP_ATTR = "_eos_map"
_CACHE_WRAPPED_ATTR = "_eos_wrapped"


class _CacheMap:
    """Which original positions each reduced layer's cache slots hold (prefill part)."""

    __slots__ = ("prefill_length", "first_layers", "kept", "valid", "real", "rebuilds")

    def __init__(self, prefill_length: int, real: torch.Tensor | None = None):
        self.prefill_length = prefill_length
        self.first_layers: list[int] = []   # first layer of each stage (reducer layer + 1)
        self.kept: list[torch.Tensor] = []  # long [B, L'_s]: original positions of the stage's prefill slots
        self.valid: list[torch.Tensor | None] = []  # bool [B, L'_s], False at a ragged prefill's padding slots
        self.real = real  # bool [B, prefill_length], False at the prefill's padding (None: no padding)
        self.rebuilds = False  # some decode-step masks are sized by a reduced layer (hooks._decode_mask)

    def move_rows(self, fn) -> None:
        """Apply ``fn`` (a batch-row selection / reordering) to every per-row tensor of the map."""
        self.kept = [fn(k) for k in self.kept]
        self.valid = [None if v is None else fn(v) for v in self.valid]
        self.real = None if self.real is None else fn(self.real)

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
    if any(v is not None for v in m.valid):
        raise NotImplementedError(
            "EOS: cannot crop into the prefill of a ragged batch (samples reduced to different lengths)"
        )
    if new_length < 0 or not all(bool(((kept >= new_length).sum(dim=1) == drop).all()) for kept in m.kept):
        raise NotImplementedError(
            f"EOS: cannot crop a KV cache to {new_length} tokens: that cuts into the visual tokens its "
            "reduced prefill removed (only tokens after the last visual token can be cropped)"
        )
    m.kept = [kept[:, :kept.shape[1] - drop] for kept in m.kept]
    m.real = None if m.real is None else m.real[:, :new_length]
    m.prefill_length = new_length


def _crop_takes_a_count(cache) -> bool:
    """Whether ``cache.crop`` takes the number of tokens to remove (transformers 5.15 and later), not a length."""
    import inspect

    try:
        return "tokens_to_remove" in inspect.signature(type(cache).crop).parameters
    except (TypeError, ValueError, AttributeError):  # pragma: no cover - a crop without a signature
        return False


def _wrap_cache_methods(cache) -> None:
    """Keep ``cache._eos_map`` aligned when the cache's batch rows move (per instance)."""
    if cache.__dict__.get(_CACHE_WRAPPED_ATTR):
        return

    def _bound(name):
        return getattr(type(cache), name, None)

    def reorder_cache(self, beam_idx):
        m = self.__dict__.get(CACHE_MAP_ATTR)
        if m is not None:
            m.move_rows(lambda k: k.index_select(0, beam_idx.to(k.device)))
        return _bound("reorder_cache")(self, beam_idx)

    def batch_select_indices(self, indices):
        m = self.__dict__.get(CACHE_MAP_ATTR)
        if m is not None:
            m.move_rows(lambda k: k[indices.to(k.device) if torch.is_tensor(indices) else indices])
        return _bound("batch_select_indices")(self, indices)

    def batch_repeat_interleave(self, repeats):
        m = self.__dict__.get(CACHE_MAP_ATTR)
        if m is not None:
            m.move_rows(lambda k: k.repeat_interleave(repeats, dim=0))
        return _bound("batch_repeat_interleave")(self, repeats)

    def crop(self, tokens):
        # transformers 5.23: crop(-n) removes the last n tokens of every layer (crop(0) removes none);
        # older releases also took crop(max_length > 0), an absolute length, which is wrong for layers
        # holding fewer tokens: it is turned into a removal count here
        m = self.__dict__.get(CACHE_MAP_ATTR)
        if m is not None:
            length = _cache_seq_length(self)  # layer 0 runs before any reducer: original positions
            remove = length - tokens if tokens > 0 else -tokens
            if remove <= 0:
                # nothing to remove. crop(0) empties every layer where crop takes a length (transformers 5.0);
                # where it takes a count of tokens to remove (5.15 on) it removes none, and it brings the sliding-
                # window layers of an assisted generation back to their window: let those releases have it
                return _bound("crop")(self, 0) if _crop_takes_a_count(self) else None
            if remove > length - m.prefill_length:
                _crop_prefill(m, length - remove)
            return _bound("crop")(self, -remove)
        return _bound("crop")(self, tokens)

    for name, fn in (("reorder_cache", reorder_cache), ("batch_select_indices", batch_select_indices),
                     ("batch_repeat_interleave", batch_repeat_interleave), ("crop", crop)):
        if _bound(name) is not None:
            setattr(cache, name, types.MethodType(fn, cache))
    cache.__dict__[_CACHE_WRAPPED_ATTR] = True


def _gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x [*lead, Bx, L, *rest] gathered at idx [B, L'] along the sequence ``dim`` (the batch is ``dim - 1``;
    Bx may be 1: broadcast). Rotary tables [B, L, hd] / [3, B, L, hd] (dim -2), position ids [B, L] /
    [k, B, L] (dim -1)."""
    lead, rest = x.shape[:dim - 1], x.shape[dim + 1:]
    B = idx.shape[0]
    if x.shape[dim - 1] != B:
        x = x.expand(*lead, B, *x.shape[dim:])
    index = idx.view(*([1] * len(lead)), *idx.shape, *([1] * len(rest))).expand(*lead, *idx.shape, *rest)
    return x.gather(dim, index)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of x [B, L, d] at idx [B, k] (no bounds check: no device sync)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _is_flash(impl: str) -> bool:
    return "flash" in impl or "paged" in impl


def _mask_cols(kept: torch.Tensor, prefill_len: int, kv_total: int, slots: int,
               valid: torch.Tensor | None = None, start: int = 0, offset: int = 0):
    """Mask column of each key slot ``start .. slots - 1`` of a reduced layer, and which are invalid.

    Slot s < L' holds ``kept[:, s]``; later slots hold the tokens appended after
    the prefill, at original position ``prefill_len + (s - L')`` (a static
    buffer's unwritten slots map to positions after the last token, which every
    causal mask hides). Column j of the mask stands for original position
    ``offset + j`` (a sliding-window mask starts at its window). Invalid (always
    masked): a position the mask has no column for (before the window, or past
    its ``kv_total`` columns, e.g. empty slots of a static cache) and the padding
    slots of a ragged prefill (``valid`` False).
    """
    B, Lk = kept.shape
    device = kept.device
    first = max(start, Lk)
    n_extra = max(slots - first, 0)
    extra = torch.arange(prefill_len + first - Lk, prefill_len + first - Lk + n_extra, device=device)
    cols = torch.cat([kept[:, min(start, Lk):min(slots, Lk)], extra.unsqueeze(0).expand(B, -1)], dim=1)
    invalid = None
    if offset:  # a window: positions before it have no column
        cols = cols - offset
        invalid = cols < 0
    if offset or prefill_len + first - Lk + n_extra > kv_total + offset:
        # kept positions are always < prefill_len <= kv_total + offset
        invalid = cols >= kv_total if invalid is None else invalid | (cols >= kv_total)
        cols = cols.clamp(min=0, max=kv_total - 1)
    if valid is not None:
        pad = torch.zeros(B, cols.shape[1], dtype=torch.bool, device=device)
        head = max(min(Lk, slots) - min(start, Lk), 0)
        pad[:, :head] = ~valid[:, min(start, Lk):min(Lk, slots)].to(device)
        invalid = pad if invalid is None else invalid | pad
    return cols, invalid


def _cache_layer(cache, layer_idx: int):
    """The cache's own layer object for ``layer_idx``, or None (no cache, or a layer it creates lazily)."""
    layers = getattr(cache, "layers", None) if cache is not None else None
    if isinstance(layers, (list, tuple)) and 0 <= layer_idx < len(layers):
        return layers[layer_idx]
    return None


def _cache_layout(cache, layer_idx: int) -> tuple:
    """How a layer's KV cache holds its slots: ``("dynamic",)`` (all of them), ``("static", max_len)``
    (all, in a buffer of ``max_len``), ``("sliding", W)`` (a dynamic sliding window: the last W - 1) or
    ``("static-sliding", C)`` (a rolling buffer of C); found by the cache layer's class."""
    from transformers.cache_utils import DynamicSlidingWindowLayer, StaticSlidingWindowLayer

    layer = _cache_layer(cache, layer_idx)
    if layer is None:
        replicate = getattr(cache, "layer_class_to_replicate", None) if cache is not None else None
        if replicate is not None and getattr(replicate, "is_sliding", False):
            raise _drift(f"cache layer {layer_idx} is created lazily as a sliding-window "
                         f"{replicate.__name__}, whose window the patch cannot read")
        return ("dynamic",)
    if getattr(layer, "is_sliding", False):
        # the subclass test first: neither class derives from the other today, a release might change that
        if isinstance(layer, StaticSlidingWindowLayer):
            return ("static-sliding", int(layer.max_cache_len))
        if isinstance(layer, DynamicSlidingWindowLayer):
            return ("sliding", int(layer.sliding_window))
        raise _drift(f"cache layer {layer_idx} is a sliding-window {type(layer).__name__}, a layer type whose "
                     "slots the patch cannot map to positions")
    if getattr(layer, "is_compileable", False):
        return ("static", int(layer.max_cache_len))
    return ("dynamic",)


def _key_window(layout: tuple, held: int, new: int) -> tuple[int, int]:
    """``(first, empty)``: a layer that held ``held`` slots and is given ``new`` more attends to its slots
    ``first .. held + new - 1`` and then ``empty`` unwritten slots (a static buffer), as its cache returns
    them (``DynamicSlidingWindowLayer`` / ``StaticSlidingWindowLayer.update``, transformers 5.0-5.25)."""
    kind = layout[0]
    if kind == "dynamic":
        return 0, 0
    size = layout[1]
    if kind == "static":
        return 0, max(size - held - new, 0)
    if kind == "sliding":  # the last W - 1 slots are kept, the new ones appended
        return max(held - (size - 1), 0), 0
    # static-sliding: a full buffer rolls (the last C - 1, then the new), else it fills up to C
    if held >= size:
        return held - (size - 1), 0
    if held + new > size:
        return 0, 0
    return 0, size - held - new


def _layout_name(layout: tuple) -> str:
    kind = layout[0]
    return kind if kind == "dynamic" else f"{kind} ({layout[1]} slots)"


def _key_count(layout: tuple, held: int, new: int) -> int:
    """Keys a layer of ``layout`` holding ``held`` slots attends to when given ``new`` more."""
    first, empty = _key_window(layout, held, new)
    return held + new - first + empty


def _sizing_layer(cache, layer_idx: int) -> int:
    """The layer whose cache transformers sizes ``layer_idx``'s attention mask by: the first layer with the
    same ``is_sliding`` (``create_causal_mask`` / ``create_sliding_window_causal_mask``), else 0."""
    layers = getattr(cache, "layers", None) if cache is not None else None
    if not isinstance(layers, (list, tuple)) or not layers:
        return 0
    own = _cache_layer(cache, layer_idx)
    sliding = [bool(getattr(layer, "is_sliding", False)) for layer in layers]
    want = bool(getattr(own, "is_sliding", False))
    return sliding.index(want) if want in sliding else 0


def _check_mask(mask) -> None:
    if isinstance(mask, Mapping):  # the decoder stack picks each layer's mask from such a mapping (Gemma 3)
        raise _drift(f"a decoder layer received a mapping of attention masks ({sorted(mask)}) instead of its own "
                     "mask")
    if mask is not None and not (torch.is_tensor(mask) and mask.dim() in (2, 4)):
        raise NotImplementedError(
            "EOS patching supports 2-D or 4-D tensor attention masks (eager, sdpa, flash attention); "
            f"got {type(mask).__name__} (flex attention's BlockMask is not supported)"
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


