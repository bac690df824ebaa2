"""Anchor selection: the top-K tokens per sample by importance, in original order.

A reducer keeps the K most important visual tokens ("anchors") and hands the
other M = N - K ("candidates") to the operator. Both index sets come back
sorted ascending, so anchors keep their original order and, through the
indices, their original positions (RoPE positions are not renumbered).
"""
import operator

import torch


def select_anchors(scores, k):
    """Split token indices into the top-``k`` anchors and the remaining candidates.

    Args:
        scores: floating [B, N] (or [N]) importance per token; higher is more
            important. NaN is rejected; +-inf are ordinary values.
        k: number of anchors per sample, an integer in [1, N].

    Returns:
        ``(anchor_idx, candidate_idx)``: int64 tensors [B, k] and [B, N - k]
        (or [k] and [N - k] for 1-D ``scores``) of indices into the N
        dimension, each sorted ascending per sample. Ties are broken
        deterministically: among equal scores the lower index becomes the
        anchor (a stable descending sort).

    Raises:
        TypeError: ``scores`` not a floating tensor, or ``k`` not an integer.
        ValueError: wrong rank, ``k`` outside [1, N], or NaN in ``scores``.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating tensor, got {scores.dtype}")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [B, N] or [N], got shape {list(scores.shape)}")
    if isinstance(k, bool):
        raise TypeError("k must be an integer, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N] = [1, {n}], got {k}")
    if torch.isnan(scores).any():
        raise ValueError("scores contains NaN")
    batched = scores.dim() == 2
    s = scores.detach() if batched else scores.detach().unsqueeze(0)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    anchor_idx = order[:, :k].sort(dim=1).values
    candidate_idx = order[:, k:].sort(dim=1).values
    if not batched:
        return anchor_idx[0], candidate_idx[0]
    return anchor_idx, candidate_idx


def gather_tokens(x, idx):
    """Rows of ``x`` at ``idx`` per sample: [B, N, d] and [B, k] -> [B, k, d].

    Differentiable with respect to ``x``. ``idx`` must be an integer tensor with
    values in [0, N) (checked).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(idx, torch.Tensor):
        raise TypeError("x and idx must be torch.Tensors")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, d], got shape {list(x.shape)}")
    if idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must be [B, k] with B = {x.shape[0]}, got shape {list(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"idx must be an integer tensor, got {idx.dtype}")
    if idx.device != x.device:
        raise ValueError(f"idx is on {idx.device}, x is on {x.device}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= x.shape[1]):
        raise ValueError(f"idx values must be in [0, {x.shape[1]})")
    return torch.gather(x, 1, idx.long().unsqueeze(-1).expand(-1, -1, x.shape[2]))


__all__ = ["select_anchors", "gather_tokens"]
