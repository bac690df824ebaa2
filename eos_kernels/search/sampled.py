"""Sampled structures: the budget met by construction, and the gates' score-function gradient (decision 8 of
:mod:`eos_kernels.search`).

The relaxed forward (:mod:`.relaxed`) lets the gradient reach every gate, but
where one layer's reduction is simply wrong (a warm start on a layer the model
cannot lose its visual tokens at), keeping a few more tokens there changes the
loss too little for the pathwise gradient to see it, and the budget penalty
holds that gate open: among all gates, the one already doing most of the
reduction has the largest lever on the final count. This estimator asks the
question directly. Each sample of a batch runs one *structure*: a set of active
layers drawn from the gates, whose counts always meet the budget; how much
better the samples that ran without a layer did is what moves that layer's gate.

Notation (sample ``i`` of a global batch of ``n``; layers ``l`` that can reduce, all but the last)::

    z_il  = 1[logit g_l + ε_il > 0],  ε logistic     layer l active in sample i: P(z_il = 1) = g_l
                                                      (none drawn: the layer of the largest g)
    r     = log(B / N₀)                               the log of the budget's kept share
    α_i   = r / Σ_l z_il log(1 − c_l)                 one exponent per sample
    k_il  = (1 − c_l)^(α_i z_il)                      kept share of layer l in sample i:
                                                      Π_l k_il = B / N₀ for every i
    ℓ_i   = λ_ce · CE_i / G                           sample i's share of the answer loss
    A_l   = Σ_i (ℓ_i − b_i) z_il,  b_i = (Σ_j ℓ_j − ℓ_i)/(n − 1)   leave-one-out baseline
    ∇_{w_g} E[ℓ] ≈ Σ_l A_l ∇ logit g_l                score function: Σ_i (ℓ_i − b_i) ∇ log p(z_i)
                                                      = Σ_l A_l ∇ logit g_l, since Σ_i (ℓ_i − b_i) = 0

Each structure runs the deployed removal: at an active layer the hard top-K of
the present tokens (``floor(k_il · n)`` by importance), with the soft top-K's
gradient passed straight through (:func:`~eos_kernels.search.relaxed` forward).
The soft top-K alone would not do here: over importances that are nearly equal
(a layer that cannot rank its tokens yet) it dims every token a little instead
of removing some, and the loss then hides what removing them costs -- on the
built-in model a reducer after layer 1 kept 54 of 64 tokens, harmless softly,
and lost 25 points deployed.

The c's are no longer each layer's own discarded share but its claim on the
reduction: the share of ``r`` a layer takes is ``log(1 − c_l)`` over the active
layers' sum, so the budget holds whatever the gates draw, and where the
reduction goes is decided by the task loss, pathwise through the soft top-K
(:mod:`.relaxed`) for the c's and by the score function for the gates. ``A``
is built from sums over the batch (``S = Σ ℓ``, ``U_l = Σ ℓ_i z_il``,
``Z_l = Σ z_il``: ``A = (n U − S Z)/(n − 1)``), which data-parallel ranks add
up before use, so a torchrun search stays equal to one process.

The structure deployed (logged each step, exported, and frozen for the hard
finish) is the export's: the layers with ``g > 1/2`` (the ``max_reducers``
strongest), each keeping ``1 − c̃_l = (1 − c_l)^α*`` with α* over those layers
(:func:`deployed_discard`). The FLOPs cap and the layer-count penalty act on
the expectation with ``z`` replaced by ``g`` (:func:`mean_field_chain`).
"""
from __future__ import annotations

import math

import torch

__all__ = ["sample_structure", "structure_keep", "mean_field_chain", "deployed_discard", "score_sums",
           "score_surrogate", "log_budget_ratio"]

_CLAMP = 1e-6


def log_budget_ratio(budget: float, n0: float) -> float:
    """r = log(B / N₀), at most 0 (a budget of all the tokens or more reduces nothing)."""
    return min(0.0, math.log(budget / n0))


def sample_structure(gates: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z [L, B] in {0, 1}: layer ``l`` active in sample ``b`` where ``logit g_l + noise[l, b] > 0`` (probability
    g_l), never the last layer; a sample that draws none gets the layer of the largest g (first on ties)."""
    g = gates.detach().double().clamp(_CLAMP, 1 - _CLAMP)
    logit = (torch.log(g) - torch.log1p(-g)).unsqueeze(-1)
    z = (logit + noise.to(logit.device, torch.float64) > 0).to(gates.dtype)
    z[-1] = 0
    empty = z[:-1].sum(0) == 0
    if bool(empty.any()):
        z[int(torch.argmax(g[:-1])), empty] = 1
    return z


def structure_keep(discard: torch.Tensor, z: torch.Tensor, log_ratio: float) -> torch.Tensor:
    """k [L, B]: the kept share of each layer in each sample, ``(1 − c_l)^(α_b z_lb)`` with α_b such that the
    product over the layers is ``exp(log_ratio)`` (1 at inactive layers). Differentiable in ``discard``."""
    log_keep = torch.log1p(-discard.clamp(_CLAMP, 1 - _CLAMP)).unsqueeze(-1) * z  # [L, B], <= 0
    total = log_keep.sum(0, keepdim=True)                                          # [1, B], < 0
    return torch.exp(log_ratio * log_keep / total)


def mean_field_chain(gates: torch.Tensor, discard: torch.Tensor, n0: float, log_ratio: float) -> torch.Tensor:
    """Visual tokens entering each layer, [L], with every z replaced by its probability g: n0, then × the kept
    share of each layer but the last; the last entry is n0 · exp(log_ratio) by construction."""
    log_keep = torch.log1p(-discard.clamp(_CLAMP, 1 - _CLAMP))[:-1] * gates[:-1]
    log_keep = log_ratio * log_keep / log_keep.sum()
    zero = torch.zeros(1, dtype=log_keep.dtype, device=log_keep.device)
    return n0 * torch.exp(torch.cat([zero, torch.cumsum(log_keep, 0)]))


def deployed_discard(discard: torch.Tensor, layers, log_ratio: float) -> torch.Tensor:
    """c̃ [L]: at the deployed ``layers``, ``1 − (1 − c_l)^α*`` with α* such that their kept shares multiply to
    ``exp(log_ratio)``; ``discard`` elsewhere (no layer: ``discard`` as it is)."""
    layers = list(layers)
    out = discard.detach().clone()
    if not layers:
        return out
    log_keep = torch.log1p(-discard.detach().double().clamp(_CLAMP, 1 - _CLAMP))[layers]
    kept = torch.exp(log_ratio * log_keep / log_keep.sum())
    out[layers] = (1.0 - kept).clamp(_CLAMP, 1 - _CLAMP).to(out.dtype)
    return out


def score_sums(losses: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[2 + 2L] float64 sums of one (micro-)batch for :func:`score_surrogate`: n, S = Σ ℓ_i, U = Σ_i ℓ_i z_i,
    Z = Σ_i z_i (``losses`` [B], ``z`` [L, B]); they add across micro-batches and ranks."""
    ell = losses.detach().double().cpu()
    zz = z.detach().double().cpu()
    head = torch.tensor([float(ell.numel()), float(ell.sum())], dtype=torch.float64)
    return torch.cat([head, zz @ ell, zz.sum(1)])


def score_surrogate(gates: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Σ_l A_l logit(g_l), A = (n U − S Z)/(n − 1) from the batch's :func:`score_sums`: its gradient is the
    score-function estimate of the gates' gradient with the leave-one-out baseline (0 below two samples)."""
    n, s = float(sums[0]), float(sums[1])
    L = gates.shape[0]
    if n < 2:
        return gates.sum() * 0.0
    u, zc = sums[2:2 + L], sums[2 + L:2 + 2 * L]
    a = ((n * u - s * zc) / (n - 1)).to(gates.device, gates.dtype)
    g = gates.clamp(_CLAMP, 1 - _CLAMP)
    return (a * (torch.log(g) - torch.log1p(-g))).sum()
