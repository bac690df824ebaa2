"""The four corner operators as independent plain algorithms.

None of these calls the unified operator or shares code with it, so checking
``eos_reduce`` at a corner setting against them is a real check (paper,
appendix B, listings 2 and 3). Inputs are batched: anchors [B, K, d],
candidates [B, M, d], scores [B, M]; unbatched [K, d] / [M, d] / [M] also work.

``CORNER_SETTINGS`` holds the (gamma, tau, theta, rho, nu) of listing 3 that
make the unified operator collapse to each corner; finite tau = 1e-4 / 1e6 and
theta = -1e9 stand in for the limits tau -> 0+, tau -> inf, theta -> -inf.
"""
from __future__ import annotations

import torch

#: theta = -1e9 realises theta -> -inf, which opens every transfer gate (m = 1)
NEG = -1e9
#: reweighting strength used by listing 3
REWEIGHT_ALPHA = 1.5

#: corner name -> (gamma, tau, theta, rho, nu), the settings of listing 3
CORNER_SETTINGS = {
    "prune": (0.0, 1.0, NEG, 0.0, 0.0),
    "merge": (1.0, 1e-4, NEG, 0.0, 0.0),
    "pool": (1.0, 1e6, NEG, 0.0, 0.0),
    "reweight": (0.0, 1.0, NEG, REWEIGHT_ALPHA, 0.0),
}


def _batched(anchors, candidates, scores):
    if anchors.dim() == 2:
        return anchors[None], candidates[None], scores[None], True
    return anchors, candidates, scores, False


def _unit_rows(x):
    lengths = torch.sqrt((x * x).sum(dim=-1, keepdim=True))
    return x / torch.clamp(lengths, min=1e-12)


def prune(anchors, candidates, scores):
    """Keep the anchors, drop the candidates."""
    return anchors.clone()


def merge(anchors, candidates, scores):
    """Add each candidate, whole, to its most cosine-similar anchor (ToMe-style)."""
    A, D, _, squeeze = _batched(anchors, candidates, scores)
    out = A.clone()
    for b in range(A.shape[0]):
        cosine = torch.einsum("md,kd->mk", _unit_rows(D[b]), _unit_rows(A[b]))
        nearest = cosine.argmax(dim=-1) if D.shape[1] else torch.empty(0, dtype=torch.long)
        for i in range(D.shape[1]):
            out[b, nearest[i]] += D[b, i]
    return out[0] if squeeze else out


def pool(anchors, candidates, scores):
    """Every anchor receives sum(candidates) / K."""
    A, D, _, squeeze = _batched(anchors, candidates, scores)
    out = A + D.sum(dim=1, keepdim=True) / A.shape[1]
    return out[0] if squeeze else out


def reweight(anchors, candidates, scores, alpha: float = REWEIGHT_ALPHA):
    """Scale each anchor by 1 + alpha * importance.

    importance_j = sum_i P_ij * u_i, with P_ij the candidate's softmax over
    anchors of cosine similarity and u the softmax of the candidate scores
    (u = 0 when every score of the sample is -inf: nothing left to weigh).
    """
    A, D, q, squeeze = _batched(anchors, candidates, scores)
    out = A.clone()
    for b in range(A.shape[0]):
        cosine = torch.einsum("md,kd->mk", _unit_rows(D[b]), _unit_rows(A[b]))
        e = torch.exp(cosine - cosine.amax(dim=-1, keepdim=True)) if D.shape[1] else cosine
        share = e / e.sum(dim=-1, keepdim=True)                     # [M, K]
        if bool((q[b] > float("-inf")).any()):
            eq = torch.exp(q[b] - q[b].max())
            weight = eq / eq.sum()                                  # [M]
        else:  # no candidate, or every score -inf (masked): no importance to share
            weight = torch.zeros_like(q[b])
        importance = (share * weight[:, None]).sum(dim=0)           # [K]
        out[b] = A[b] * (1.0 + alpha * importance[:, None])
    return out[0] if squeeze else out


#: corner name -> independent implementation
CORNERS = {"prune": prune, "merge": merge, "pool": pool, "reweight": reweight}
