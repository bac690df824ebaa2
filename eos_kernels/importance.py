"""Text -> visual token importance without eager attention.

:func:`text_to_visual_importance` rates every visual token by the attention the
text tokens pay it at one decoder layer: the mean, over query heads and text
rows, of each row's causal softmax probability on that token. It takes the
layer's query and key states after RoPE, so the model can keep running
SDPA/flash attention: nothing here needs the attention weights.

Two implementations give the same numbers:

- a fused Triton kernel (:mod:`eos_kernels.triton.importance`) that computes
  each text row's log-sum-exp itself and never materialises an [L, L] matrix;
- a PyTorch reference (plain eager softmax with explicit masks, float32), used
  for CPU tensors and to check the kernel.
"""
import math
import numbers

import torch

from eos_kernels._dispatch import IMPLS, resolve_impl



def text_to_visual_importance(query, key, visual, text, attention_mask=None, scale=None,
                              impl="auto"):
    """Mean text -> visual attention probability per token, computed from Q and K.

    For sample ``b`` with text rows ``t`` (positions where ``text`` is true and
    the token is not padding), query heads ``h`` and visual position ``v``::

        out[b, v] = 1 / (Hq * T_b) * sum_{h, t} softmax_t(scale * q[b, h, t] . k[b, h', :])[v]

    where ``h' = h // (Hq // Hkv)`` (grouped-query attention) and the softmax of
    row ``t`` runs over the keys it can see: positions ``<= t`` (causal) that are
    not padding. A visual key after a text row is invisible to that row and adds
    0 for it; the mean still divides by all ``T_b`` rows. ``out`` is 0 at
    non-visual positions (and at padded ones).

    Args:
        query: [B, Hq, L, dh] floating query states after RoPE (any strides).
        key: [B, Hkv, L, dh] key states after RoPE, same dtype and device;
            ``Hq`` must be a multiple of ``Hkv``.
        visual: bool [B, L], true at visual token positions (the rated keys).
        text: bool [B, L], true at the query rows that rate them. Every sample
            needs at least one non-padded text row. A position may be both
            visual and text (it then also rates itself).
        attention_mask: optional [B, L], bool or integer, nonzero for real
            tokens and 0 for padding (left or right). ``None``: no padding.
        scale: softmax scale; defaults to ``dh ** -0.5``.
        impl: ``"auto"`` (Triton for CUDA tensors, the reference otherwise),
            ``"triton"`` (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``)
            or ``"torch"`` (the reference).

    Returns:
        float32 [B, L] on the inputs' device. Forward only: the result carries
        no gradient. fp16/bf16 inputs are accumulated in fp32; float64 inputs
        are computed in float32.

    Raises:
        TypeError / ValueError naming the offending argument; ValueError when a
        sample has no text rows; RuntimeError for ``impl="triton"`` on CPU
        without ``TRITON_INTERPRET=1``.
    """
    prep = _prepare(query, key, visual, text, attention_mask, scale, impl)
    if prep.use_triton:
        return _run_triton(prep)
    return _run_reference(prep)


class _Prepared:
    """Validated inputs plus the per-sample row lists both paths share."""

    __slots__ = ("query", "key", "visual", "keep", "text_rows", "counts", "t_max", "scale",
                 "use_triton")

    def __init__(self, **kw):
        for name, value in kw.items():
            setattr(self, name, value)


def _check_mask(name, mask, B, L, device, allow_int):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if allow_int:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must be bool or integer, got {mask.dtype}")
    elif mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"{name} must have shape [B, L] = [{B}, {L}], got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, query is on {device}")


def _prepare(query, key, visual, text, attention_mask, scale, impl):
    """Validate the arguments and build the shared per-sample row information."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, x in (("query", query), ("key", key)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, dh], got shape {list(x.shape)}")
    if key.dtype != query.dtype:
        raise TypeError(f"key dtype {key.dtype} does not match query dtype {query.dtype}")
    if key.device != query.device:
        raise ValueError(f"key is on {key.device}, query is on {query.device}")
    B, Hq, L, dh = query.shape
    kB, Hkv, kL, kdh = key.shape
    if (kB, kL, kdh) != (B, L, dh):
        raise ValueError(f"key shape {list(key.shape)} does not match query shape "
                         f"{list(query.shape)} in B, L or dh")
    if Hq < 1 or Hkv < 1 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a positive multiple of key heads ({Hkv})")
    if dh < 1:
        raise ValueError("query/key head dimension dh must be >= 1")
    _check_mask("visual", visual, B, L, query.device, allow_int=False)
    _check_mask("text", text, B, L, query.device, allow_int=False)
    if attention_mask is not None:
        _check_mask("attention_mask", attention_mask, B, L, query.device, allow_int=True)
    if scale is None:
        scale = dh ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    use_triton = resolve_impl(impl, query.device) == "triton"

    query = query.detach()
    key = key.detach()
    if attention_mask is None:
        keep = torch.ones((B, L), dtype=torch.bool, device=query.device)
    else:
        keep = attention_mask.detach() != 0
    text_rows = text.detach() & keep
    counts = text_rows.sum(dim=1)
    t_min, t_max = torch.stack([counts.min(), counts.max()]).tolist() if B else (1, 0)
    if t_min == 0:
        sample = int((counts == 0).nonzero()[0, 0])
        raise ValueError(f"text: sample {sample} has no text rows "
                         "(no non-padded position marked in text)")
    return _Prepared(query=query, key=key, visual=visual.detach(), keep=keep,
                     text_rows=text_rows, counts=counts, t_max=t_max, scale=scale,
                     use_triton=use_triton)


@torch.no_grad()
def _run_reference(prep):
    """Eager PyTorch reference: per sample, softmax over masked float32 scores."""
    q, k = prep.query, prep.key
    B, Hq, L, _ = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros((B, L), dtype=torch.float32, device=q.device)
    positions = torch.arange(L, device=q.device)
    for b in range(B):
        rows = prep.text_rows[b].nonzero().squeeze(1)                      # [T]
        qb = q[b, :, rows].float()                                         # [Hq, T, dh]
        kb = k[b].float().repeat_interleave(group, dim=0)                  # [Hq, L, dh]
        scores = prep.scale * torch.matmul(qb, kb.transpose(-1, -2))       # [Hq, T, L]
        visible = (positions[None, :] <= rows[:, None]) & prep.keep[b][None, :]  # [T, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)          # each row sees at least itself
        mean = probs.sum(dim=(0, 1)) / (Hq * rows.numel())
        out[b] = torch.where(prep.visual[b], mean, torch.zeros_like(mean))
    return out


@torch.no_grad()
def _run_triton(prep, block_m=None, block_n=None):
    """Fused Triton path; ``block_m``/``block_n`` override the tile sizes (tests)."""
    from eos_kernels.triton.importance import text_to_visual_importance_sums

    q, k = prep.query, prep.key
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        q, k = q.float(), k.float()
    B, Hq, L, _ = q.shape
    device = q.device
    counts = prep.counts
    t_max = prep.t_max
    # Each sample's text-row positions, ascending, left-packed, padded with -1.
    order = torch.sort((~prep.text_rows).to(torch.int8), dim=1, stable=True).indices[:, :t_max]
    slot = torch.arange(t_max, device=device)
    rows = torch.where(slot[None, :] < counts[:, None], order, -1).to(torch.int32).contiguous()
    vis = prep.visual & prep.keep
    has_vis = vis.any(dim=1)
    vis_i = vis.to(torch.int8)
    vis_lo = torch.where(has_vis, vis_i.argmax(dim=1), 0)
    vis_hi = torch.where(has_vis, L - vis_i.flip(1).argmax(dim=1), 0)
    key_lo = prep.keep.to(torch.int8).argmax(dim=1)
    bounds = torch.stack([key_lo, vis_lo, vis_hi], dim=1).to(torch.int32).contiguous()
    sums = text_to_visual_importance_sums(
        q, k, rows, prep.keep.to(torch.int8).contiguous(), vis_i.contiguous(), bounds,
        prep.scale, block_m=block_m, block_n=block_n)
    return sums / (Hq * counts.to(torch.float32))[:, None]


__all__ = ["text_to_visual_importance"]
