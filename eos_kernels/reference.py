"""PyTorch reference of the unified reduction operator (the oracle for the kernels).

Follows DESIGN.md §2, i.e. the paper's executed code (appendix B, listing 1)
where the paper contradicts itself. Written for clarity, not speed: every
intermediate of the maths is a named tensor and autograd does the backward.

Per sample, with anchors A [K, d], candidates D [M, d], candidate scores q [M]:

    S     = normalize(D) @ normalize(A)^T          [M, K]   cosine similarity
    W     = softmax_anchors(S / tau)               [M, K]   soft assignment
    m     = sigmoid(beta * (max_j S - theta))      [M]      transfer gate
    A~    = A + gamma * W^T (D * m)                [K, d]   information transfer
    s_imp = softmax_anchors(S)^T softmax(q)        [K]      anchor importance
    A^    = A~ * (1 + rho * s_imp)                         reweighting
    out   = (1 - nu) * A^ + nu * r * A^                    norm-preserving blend

with ``normalize(x) = x / max(||x||, 1e-12)`` and r either the per-token ratio
``||a_j|| / max(||A^_j||, 1e-6)`` (``norm="token"``, the executed code) or the
whole-matrix ratio ``||A||_F / (||A^||_F + 1e-6)`` per sample (``norm="frobenius"``,
equation 6).

Masked candidates: a score of -inf gives u_i = softmax(q)_i = 0. When every
score of a sample is -inf, softmax(q) is a softmax over an empty set of finite
scores; it is taken as the zero vector (0/0 avoided), so s_imp = 0 and
A^ = A~ for that sample, whatever rho is, and its score gradients are 0.
Scores must otherwise be finite (+inf or NaN have no meaningful softmax).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: clamp of the token norm inside ``normalize`` (F.normalize's default)
NORMALIZE_EPS = 1e-12
#: lower clamp of ||A^_j|| in the per-token ratio (listing 1)
TOKEN_RATIO_EPS = 1e-6
#: epsilon added to ||A^||_F in the whole-matrix ratio (equation 6)
FROBENIUS_EPS = 1e-6


def masked_softmax(q):
    """softmax over the last dim, with an all -inf row giving zeros instead of NaN.

    Rows holding a finite score are exactly ``torch.softmax``. All -inf rows go
    through softmax(0) and are then zeroed: the double ``where`` keeps their
    gradient 0 (a single ``where`` over softmax(-inf) would send NaN back).
    """
    empty = torch.isneginf(q).all(dim=-1, keepdim=True)
    u = torch.softmax(torch.where(empty, torch.zeros_like(q), q), dim=-1)
    return torch.where(empty, torch.zeros_like(u), u)


def eos_reduce_reference(anchors, candidates, scores, gamma, tau, theta, rho, nu,
                         *, beta: float = 10.0, norm: str = "token"):
    """Unified operator on batched inputs, in plain PyTorch.

    Args are already validated by :func:`eos_kernels.eos_reduce`: ``anchors``
    [B, K, d], ``candidates`` [B, M, d], ``scores`` [B, M]; the five operator
    parameters are Python floats or 0-d tensors. fp16/bf16 inputs are computed
    in fp32 and the result is cast back to the anchors' dtype (fp64 stays fp64).
    """
    out_dtype = anchors.dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    A = anchors.to(compute)
    D = candidates.to(compute)
    q = scores.to(compute)
    gamma, tau, theta, rho, nu = (
        p.to(compute) if torch.is_tensor(p) else p for p in (gamma, tau, theta, rho, nu)
    )

    S = F.normalize(D, dim=-1, eps=NORMALIZE_EPS) @ F.normalize(A, dim=-1, eps=NORMALIZE_EPS).transpose(-1, -2)
    W = torch.softmax(S / tau, dim=-1)                                   # [B, M, K]
    m = torch.sigmoid(beta * (S.max(dim=-1).values - theta))             # [B, M]
    transfer = W.transpose(-1, -2) @ (D * m.unsqueeze(-1))               # [B, K, d]
    A_tilde = A + gamma * transfer

    s_imp = (torch.softmax(S, dim=-1) * masked_softmax(q).unsqueeze(-1)).sum(dim=-2)  # [B, K]
    A_hat = A_tilde * (1.0 + rho * s_imp.unsqueeze(-1))

    if norm == "token":
        ratio = A.norm(dim=-1, keepdim=True) / A_hat.norm(dim=-1, keepdim=True).clamp(min=TOKEN_RATIO_EPS)
    elif norm == "frobenius":
        ratio = (A.flatten(1).norm(dim=-1) / (A_hat.flatten(1).norm(dim=-1) + FROBENIUS_EPS))[:, None, None]
    else:  # validated upstream; kept so the oracle never silently guesses
        raise ValueError(f"norm must be 'token' or 'frobenius', got {norm!r}")
    out = (1.0 - nu) * A_hat + nu * (A_hat * ratio)
    return out.to(out_dtype)
