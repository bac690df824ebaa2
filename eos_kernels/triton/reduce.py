"""Fused Triton kernels of the unified reduction operator, forward and backward.

Notation per sample: anchors A [K, d], candidates D [M, d], scores q [M],
parameters (gamma, tau, theta, rho, nu), gate sharpness beta.

    S = Dn An^T (cosine)   W = softmax_j(S / tau)   m = sigmoid(beta (max_j S - theta))
    C = W * m              P = softmax_j(S)         u = softmax_i(q)
    T = C^T D              s = P^T u                A~ = A + gamma T
    A^ = A~ * h, h = 1 + rho s                      out = A^ * f,  f = 1 - nu + nu r

Masked scores: q_i = -inf gives u_i = 0. A sample whose scores are all -inf
(fully masked) has no finite score to normalise over; its softmax is taken as
u = 0 (lse_q = +inf below), so s = 0, h = 1 and A^ = A~ whatever rho is, and
dL/dq = 0 for it. Scores are otherwise finite (+inf or NaN are unsupported).

Nothing [M, d]-sized is ever materialised besides the inputs and dD: the
[M, K] matrices (S, C and, in backward, dS) are small next to D, so they are
kept in fp32 and the heavy products (S, T, dD, dA) stream D and A through
tl.dot tiles. Every reduction has a fixed order (per-block partials reduced by
a later kernel), so results are bitwise deterministic; there are no atomics.

Forward kernels:  _pairwise_dot (S and norms) -> _row_stats (row max/argmax,
log-sum-exps, gate, C, column partials of P^T u) -> _transfer (T, A~, partial
||A~||^2 or the final output) -> [_anchor_scale -> _anchor_axpby] (norm blend).
Backward kernels: _row_partial_dot (G.A~) -> _anchor_grad_coef (per-anchor
scalars) -> _anchor_axpby (E = dL/dA~) -> _pairwise_dot (Q = D E^T) -> _dsim
(dS) -> _grad_candidates, _grad_anchors, _grad_scores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from eos_kernels.reference import FROBENIUS_EPS, NORMALIZE_EPS, TOKEN_RATIO_EPS
from eos_kernels.triton._runtime import (
    INTERPRETED,
    check_launchable,
    next_pow2,
    round_bf16_on_store,
    round_to_bf16_grid,
)

# Tile sizes. Under the interpreter the cost is per program and loop iteration,
# and tests use small shapes, so smaller tiles there exercise the multi-block paths.
if INTERPRETED:
    BLOCK_M, BLOCK_K, BLOCK_D, NUM_WARPS = 16, 16, 32, 1
else:
    BLOCK_M, BLOCK_K, BLOCK_D, NUM_WARPS = 64, 64, 64, 4
BLOCK_VEC = 128 if not INTERPRETED else 32  # 1-D loops over M or K in per-sample kernels


# --------------------------------------------------------------------------- #
# Products with fp32 operands (the [M, K] intermediates C, dS, E of any dtype, and
# the inputs when they are fp32).
# fp32 inputs: input_precision="ieee", exact fp32 products (fp32 loads, no upcast).
# fp16/bf16 inputs: their values upcast to fp32 are tf32 values (<= 10 mantissa bits,
# fp32's exponent range), but the fp32 intermediates are not, and a tf32 product
# keeps only 10 of their bits (Hopper truncates the other 13): a biased 2^-11..2^-10
# error per product that the backward's cancelling sums (dtau = -sum dz S / tau^2,
# dA) turned into 2-3 % errors on an H200. So an intermediate is split, x = hi + lo,
# hi = x with its 13 low mantissa bits cleared (a tf32 value, |lo| < 2^-10 |x|), and
#     x y ~ hi_x hi_y + hi_x lo_y + lo_x hi_y      (lo_x lo_y < 2^-20 |x y| dropped)
# on tf32 tensor cores: 2^-20 of sum |x_i y_i|, a thousandth of an fp16 ulp (not
# enough for fp32's 1e-5 once a sum cancels: hence ieee there). Bit masks rather
# than input_precision="ieee" for upcast operands, which some Triton releases lower
# to tf32 (triton-lang/triton#10176).
# --------------------------------------------------------------------------- #
@triton.jit
def _tf32_hi(x):
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _dot_fp32(x, y, acc, SPLIT_X: tl.constexpr, SPLIT_Y: tl.constexpr, IEEE: tl.constexpr):
    # acc + x @ y for fp32 tiles (see above); SPLIT_*: the operand is an fp32 intermediate
    if IEEE:
        acc = tl.dot(x, y, acc, input_precision="ieee")
    else:
        xh = x
        yh = y
        if SPLIT_X:
            xh = _tf32_hi(x)
        if SPLIT_Y:
            yh = _tf32_hi(y)
        acc = tl.dot(xh, yh, acc, input_precision="tf32")
        if SPLIT_Y:
            acc = tl.dot(xh, y - yh, acc, input_precision="tf32")
        if SPLIT_X:
            acc = tl.dot(x - xh, yh, acc, input_precision="tf32")
    return acc


# --------------------------------------------------------------------------- #
# out[b, i, j] = <x_i, y_j>; with NORMALIZE: / (max(|x_i|, eps) max(|y_j|, eps))
# and the raw norms |x_i|, |y_j| are stored. Grid (K-blocks, M-blocks, B): the
# K-blocks of one M-block run back to back and share its x tile through L2.
# --------------------------------------------------------------------------- #
@triton.jit
def _pairwise_dot_kernel(
    x_ptr, y_ptr, out_ptr, xnorm_ptr, ynorm_ptr,
    M, K, D,
    sxb, sxm, sxd, syb, syk, syd,
    eps,
    NORMALIZE: tl.constexpr, FP32_DOT: tl.constexpr, SPLIT_Y: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask_m = offs_m < M
    mask_k = offs_k < K
    x_rows = x_ptr + b * sxb + offs_m.to(tl.int64)[:, None] * sxm
    y_rows = y_ptr + b * syb + offs_k.to(tl.int64)[:, None] * syk
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    sqx = tl.zeros((BM,), dtype=tl.float32)
    sqy = tl.zeros((BK,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        offs_d = (d0 + tl.arange(0, BD)).to(tl.int64)
        mask_d = offs_d < D
        x = tl.load(x_rows + offs_d[None, :] * sxd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        y = tl.load(y_rows + offs_d[None, :] * syd, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        if FP32_DOT:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
            acc = _dot_fp32(x, tl.trans(y), acc, False, SPLIT_Y, IEEE)
        else:  # fp16/bf16 tiles on the GPU: exact products, fp32 accumulation
            acc = tl.dot(x, tl.trans(y), acc)
        if NORMALIZE:
            xf = x.to(tl.float32)
            yf = y.to(tl.float32)
            sqx += tl.sum(xf * xf, axis=1)
            sqy += tl.sum(yf * yf, axis=1)
    if NORMALIZE:
        nx = tl.sqrt(sqx)
        ny = tl.sqrt(sqy)
        acc = acc / tl.maximum(nx, eps)[:, None] / tl.maximum(ny, eps)[None, :]
        if pid_k == 0:
            tl.store(xnorm_ptr + b * M + offs_m, nx, mask=mask_m)
        if pid_m == 0:
            tl.store(ynorm_ptr + b * K + offs_k, ny, mask=mask_k)
    out = out_ptr + b * M * K + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _gate_and_slope(pre):
    # m = sigmoid(x) and dm/dx = sigmoid(x) sigmoid(-x) from z = exp(-|x|) <= 1:
    # no overflow for theta = -1e9 and no cancellation in 1 - m when m ~ 1
    z = tl.exp(-tl.abs(pre))
    inv = 1.0 / (1.0 + z)
    return tl.where(pre >= 0, inv, z * inv), z * inv * inv


# --------------------------------------------------------------------------- #
# Per candidate row i (grid (M-blocks, B)):
#   smax_i = max_j S_ij (first index on ties), lse_tau_i = logsumexp_j((S_ij - smax_i) / tau),
#   lse1_i = logsumexp_j S_ij, m_i = sigmoid(beta (smax_i - theta)),
#   C_ij = exp((S_ij - smax_i) / tau - lse_tau_i) m_i, and the block's column partial
#   sum_i exp(S_ij - lse1_i) u_i of s = P^T u, with u = softmax(q) over all M
#   (log-sum-exp of q recomputed per program: M scalars, cheap). The gate's
#   pre-activation beta (smax - theta) is stored for the backward's slope.
# A fully masked sample (max_i q_i = -inf) stores lse_q = +inf instead of
# -inf + log(0): then u_i = exp(q_i - lse_q) = 0 for every i, here and in the
# backward (_dsim, _grad_scores), which read u only through lse_q.
# Since tau > 0, max_j S_ij / tau = smax_i / tau: one max pass serves both lse.
# The max is subtracted BEFORE dividing by tau: S / tau - lse with S / tau ~ 1e4
# (tau = 1e-4, the merge corner) has an ulp of 1e-3, and a fused multiply-add in
# one kernel but not another would put ~1e-3 into W's row sums, which the
# backward's 1 / tau then amplifies (seen on an H200).
# --------------------------------------------------------------------------- #
@triton.jit
def _row_stats_kernel(
    s_ptr, c_ptr, q_ptr, params_ptr,
    smax_ptr, lse_tau_ptr, lse1_ptr, pre_ptr, amax_ptr, lseq_ptr, spart_ptr,
    beta, M, K, sqb, sqm,
    BM: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_mb = tl.num_programs(0)
    inv_tau = 1.0 / tl.load(params_ptr + 1)
    theta = tl.load(params_ptr + 2)

    # log-sum-exp of the candidate scores
    qmax_lane = tl.full((BQ,), float("-inf"), tl.float32)
    for q0 in range(0, M, BQ):
        offs_q = q0 + tl.arange(0, BQ)
        qv = tl.load(q_ptr + b * sqb + offs_q.to(tl.int64) * sqm, mask=offs_q < M, other=float("-inf"))
        qmax_lane = tl.maximum(qmax_lane, qv.to(tl.float32))
    qmax = tl.max(qmax_lane, axis=0)
    has_score = qmax > float("-inf")  # False: every score is -inf (a fully masked sample)
    qmax = tl.where(has_score, qmax, 0.0)  # no -inf - (-inf) = NaN below
    qsum_lane = tl.zeros((BQ,), tl.float32)
    for q0 in range(0, M, BQ):
        offs_q = q0 + tl.arange(0, BQ)
        mask_q = offs_q < M
        qv = tl.load(q_ptr + b * sqb + offs_q.to(tl.int64) * sqm, mask=mask_q, other=0.0).to(tl.float32)
        qsum_lane += tl.where(mask_q, tl.exp(qv - qmax), 0.0)
    qsum = tl.where(has_score, tl.sum(qsum_lane, axis=0), 1.0)  # >= 1 when a score is finite
    lse_q = tl.where(has_score, qmax + tl.log(qsum), float("inf"))
    if pid_m == 0:
        tl.store(lseq_ptr + b, lse_q)

    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    row = s_ptr + b * M * K + offs_m.to(tl.int64)[:, None] * K
    # pass 1: row max and its first index
    smax = tl.full((BM,), float("-inf"), tl.float32)
    amax = tl.zeros((BM,), tl.int32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        tile = tl.load(row + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=float("-inf"))
        tmax = tl.max(tile, axis=1)
        targ = tl.argmax(tile, axis=1, tie_break_left=True).to(tl.int32) + k0
        better = tmax > smax
        amax = tl.where(better, targ, amax)
        smax = tl.where(better, tmax, smax)
    smax = tl.where(mask_m, smax, 0.0)
    # pass 2: the two normalisers
    sum_tau = tl.zeros((BM,), tl.float32)
    sum_one = tl.zeros((BM,), tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        valid = mask_m[:, None] & (offs_k < K)[None, :]
        tile = tl.load(row + offs_k[None, :], mask=valid, other=0.0)
        sum_tau += tl.sum(tl.where(valid, tl.exp((tile - smax[:, None]) * inv_tau), 0.0), axis=1)
        sum_one += tl.sum(tl.where(valid, tl.exp(tile - smax[:, None]), 0.0), axis=1)
    sum_tau = tl.where(mask_m, sum_tau, 1.0)
    sum_one = tl.where(mask_m, sum_one, 1.0)
    lse_tau = tl.log(sum_tau)  # of the shifted logits (S - smax) / tau
    lse_one = smax + tl.log(sum_one)
    pre = beta * (smax - theta)
    gate, _ = _gate_and_slope(pre)
    qv = tl.load(q_ptr + b * sqb + offs_m.to(tl.int64) * sqm, mask=mask_m, other=0.0).to(tl.float32)
    u = tl.where(mask_m, tl.exp(qv - lse_q), 0.0)
    stat = b * M + offs_m
    tl.store(smax_ptr + stat, smax, mask=mask_m)
    tl.store(lse_tau_ptr + stat, lse_tau, mask=mask_m)
    tl.store(lse1_ptr + stat, lse_one, mask=mask_m)
    tl.store(pre_ptr + stat, pre, mask=mask_m)
    tl.store(amax_ptr + stat, amax, mask=mask_m)
    # pass 3: C and the column partials of s = P^T u
    crow = c_ptr + b * M * K + offs_m.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        valid = mask_m[:, None] & mask_k[None, :]
        tile = tl.load(row + offs_k[None, :], mask=valid, other=0.0)
        c = tl.where(valid, tl.exp((tile - smax[:, None]) * inv_tau - lse_tau[:, None]) * gate[:, None], 0.0)
        tl.store(crow + offs_k[None, :], c, mask=valid)
        p = tl.where(valid, tl.exp(tile - lse_one[:, None]) * u[:, None], 0.0)
        tl.store(spart_ptr + (b * num_mb + pid_m) * K + offs_k, tl.sum(p, axis=0), mask=mask_k)


@triton.jit
def _sum_over_candidates(x_ptr, d_ptr, b, M, K, offs_k, mask_k, offs_d, mask_d, sdb, sdm, sdd,
                         IEEE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    # sum_i X[b, i, k] D[b, i, d] for the (anchor, feature) tile: X^T D with X an
    # fp32 [B, M, K] matrix (C forward, dS backward), streamed over candidate blocks
    acc = tl.zeros((BK, BD), dtype=tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < M
        x = tl.load(x_ptr + b * M * K + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        dt = tl.load(d_ptr + b * sdb + offs_m.to(tl.int64)[:, None] * sdm + offs_d[None, :] * sdd,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc = _dot_fp32(tl.trans(x), dt, acc, True, False, IEEE)
    return acc


# --------------------------------------------------------------------------- #
# Grid (K-blocks, d-blocks, B). For anchors j in the block and features in the
# d-block: T = C^T D over all candidates, s_j = sum of the column partials,
#   A~ = A + gamma T,  A^ = A~ (1 + rho s).
# FINAL: write A^ as the output (nu == 0, no backward). Otherwise write A~ in
# fp32, the block's partials of ||a_j||^2 and of delta_j = ||A~_j||^2 - ||a_j||^2
# = sum gamma T (2 a + gamma T) (accumulated directly: no cancellation when
# A~ ~ a), and (first d-block) s_j.
# --------------------------------------------------------------------------- #
@triton.jit
def _transfer_kernel(
    a_ptr, d_ptr, c_ptr, spart_ptr, params_ptr,
    out_ptr, at_ptr, pdelta_ptr, pna_ptr, s_ptr,
    M, K, D, num_mb,
    sab, sak, sad, sdb, sdm, sdd,
    HAS_TRANSFER: tl.constexpr, FINAL: tl.constexpr, ROUND_BF16: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    num_db = tl.num_programs(1)
    gamma = tl.load(params_ptr + 0)
    rho = tl.load(params_ptr + 3)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_k = offs_k < K
    mask_d = offs_d < D
    if HAS_TRANSFER:
        acc = _sum_over_candidates(c_ptr, d_ptr, b, M, K, offs_k, mask_k, offs_d, mask_d, sdb, sdm, sdd,
                                   IEEE, BM, BK, BD)
    else:
        acc = tl.zeros((BK, BD), dtype=tl.float32)
    s = tl.zeros((BK,), tl.float32)
    for p in range(0, num_mb):
        s += tl.load(spart_ptr + (b * num_mb + p) * K + offs_k, mask=mask_k, other=0.0)
    a = tl.load(a_ptr + b * sab + offs_k.to(tl.int64)[:, None] * sak + offs_d[None, :] * sad,
                mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    transfer = gamma * acc
    a_tilde = a + transfer
    valid = mask_k[:, None] & mask_d[None, :]
    if FINAL:
        out = a_tilde * (1.0 + rho * s)[:, None]
        if ROUND_BF16:
            out = round_to_bf16_grid(out)
        tl.store(out_ptr + b * K * D + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(at_ptr + b * K * D + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :], a_tilde, mask=valid)
        tl.store(pdelta_ptr + (b * K + offs_k) * num_db + pid_d, tl.sum(transfer * (a + a_tilde), axis=1),
                 mask=mask_k)
        tl.store(pna_ptr + (b * K + offs_k) * num_db + pid_d, tl.sum(a * a, axis=1), mask=mask_k)
        if pid_d == 0:
            tl.store(s_ptr + b * K + offs_k, s, mask=mask_k)


# --------------------------------------------------------------------------- #
# r - 1 of the norm-preserving ratio, without cancellation. With n = |a_j|,
# delta = |A~_j|^2 - n^2 (accumulated directly) and h = 1 + rs, rs = rho s_j:
#   |A^_j|^2 - n^2 = (h^2 - 1) n^2 + h^2 delta,  h^2 - 1 = rs (2 + rs),
# so n - |A^_j| = -(that) / (n + |A^_j|) keeps full relative precision even
# when A^ ~ A (small gamma and rho), where n / |A^_j| - 1 would lose digits.
# --------------------------------------------------------------------------- #
@triton.jit
def _token_ratio_minus_one(na, nat2, delta, rs, eps):
    h = 1.0 + rs
    n_hat = h * tl.sqrt(nat2)
    grow = rs * (2.0 + rs) * na * na + h * h * delta
    unclamped = n_hat > eps
    safe = tl.where(unclamped, n_hat, 1.0)
    rm1 = tl.where(unclamped, -grow / (safe * (na + safe)), na / eps - 1.0)
    return rm1, n_hat


@triton.jit
def _frobenius_ratio_minus_one(sq_a, sq_hat, grow, eps):
    # r = ||A||_F / (||A^||_F + eps): r - 1 = (||A|| - ||A^|| - eps) / (||A^|| + eps)
    norm_a = tl.sqrt(sq_a)
    norm_hat = tl.sqrt(sq_hat)
    both = norm_a + norm_hat
    diff = tl.where(both > 0, -grow / tl.where(both > 0, both, 1.0), 0.0)
    return (diff - eps) / (norm_hat + eps), norm_a, norm_hat


# --------------------------------------------------------------------------- #
# Per sample (grid (B,)): |a_j|, delta_j and |A~_j|^2 = |a_j|^2 + delta_j from
# the d-block partials, then each anchor's output scale h_j f_j with
# h_j = 1 + rho s_j and f = 1 + nu (r - 1):
#   token:      r_j = |a_j| / max(|A^_j|, 1e-6)
#   frobenius:  r   = ||A||_F / (||A^||_F + 1e-6).
# --------------------------------------------------------------------------- #
@triton.jit
def _anchor_scale_kernel(
    pdelta_ptr, pna_ptr, s_ptr, params_ptr, nat2_ptr, delta_ptr, na_ptr, scale_ptr,
    K, num_db, ratio_eps,
    FROBENIUS: tl.constexpr, BK: tl.constexpr, BDB: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rho = tl.load(params_ptr + 3)
    nu = tl.load(params_ptr + 4)
    offs_p = tl.arange(0, BDB)
    sq_a = tl.zeros((BK,), tl.float32)
    sq_hat = tl.zeros((BK,), tl.float32)
    grow = tl.zeros((BK,), tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        parts = (b * K + offs_k)[:, None] * num_db + offs_p[None, :]
        pmask = mask_k[:, None] & (offs_p < num_db)[None, :]
        delta = tl.sum(tl.load(pdelta_ptr + parts, mask=pmask, other=0.0), axis=1)
        na2 = tl.sum(tl.load(pna_ptr + parts, mask=pmask, other=0.0), axis=1)
        na = tl.sqrt(na2)
        nat2 = na2 + delta
        tl.store(nat2_ptr + b * K + offs_k, nat2, mask=mask_k)
        tl.store(delta_ptr + b * K + offs_k, delta, mask=mask_k)
        tl.store(na_ptr + b * K + offs_k, na, mask=mask_k)
        rs = rho * tl.load(s_ptr + b * K + offs_k, mask=mask_k, other=0.0)
        if FROBENIUS:
            h = 1.0 + rs
            sq_a += na2
            sq_hat += h * h * nat2
            grow += rs * (2.0 + rs) * na2 + h * h * delta
        else:
            rm1, n_hat = _token_ratio_minus_one(na, nat2, delta, rs, ratio_eps)
            tl.store(scale_ptr + b * K + offs_k, (1.0 + rs) * (1.0 + nu * rm1), mask=mask_k)
    if FROBENIUS:
        rm1, norm_a, norm_hat = _frobenius_ratio_minus_one(
            tl.sum(sq_a, axis=0), tl.sum(sq_hat, axis=0), tl.sum(grow, axis=0), ratio_eps)
        f = 1.0 + nu * rm1
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < K
            h = 1.0 + rho * tl.load(s_ptr + b * K + offs_k, mask=mask_k, other=0.0)
            tl.store(scale_ptr + b * K + offs_k, h * f, mask=mask_k)


# --------------------------------------------------------------------------- #
# out[b, j, :] = alpha[b, j] x[b, j, :] (+ coef[b, j] y[b, j, :] when HAS_Y).
# Forward: out = (h f)_j A~_j.  Backward: E = dL/dA~ = alpha_j G_j + coef_j A~_j.
# Grid (K-blocks, d-blocks, B).
# --------------------------------------------------------------------------- #
@triton.jit
def _anchor_axpby_kernel(
    x_ptr, y_ptr, alpha_ptr, coef_ptr, out_ptr,
    K, D, sxb, sxk, sxd,
    HAS_Y: tl.constexpr, ROUND_BF16: tl.constexpr,
    BK: tl.constexpr, BD: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_k = offs_k < K
    valid = mask_k[:, None] & (offs_d < D)[None, :]
    x = tl.load(x_ptr + b * sxb + offs_k.to(tl.int64)[:, None] * sxk + offs_d[None, :] * sxd,
                mask=valid, other=0.0).to(tl.float32)
    out = tl.load(alpha_ptr + b * K + offs_k, mask=mask_k, other=0.0)[:, None] * x
    dense = b * K * D + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :]
    if HAS_Y:
        y = tl.load(y_ptr + dense, mask=valid, other=0.0)
        out += tl.load(coef_ptr + b * K + offs_k, mask=mask_k, other=0.0)[:, None] * y
    if ROUND_BF16:
        out = round_to_bf16_grid(out)
    tl.store(out_ptr + dense, out.to(out_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- #
# part[b, j, d-block] = sum over the d-block of G_j . A~_j   (grid (K-blocks, d-blocks, B))
# --------------------------------------------------------------------------- #
@triton.jit
def _row_partial_dot_kernel(
    g_ptr, at_ptr, part_ptr, K, D, sgb, sgk, sgd,
    BK: tl.constexpr, BD: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    num_db = tl.num_programs(1)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_k = offs_k < K
    valid = mask_k[:, None] & (offs_d < D)[None, :]
    g = tl.load(g_ptr + b * sgb + offs_k.to(tl.int64)[:, None] * sgk + offs_d[None, :] * sgd,
                mask=valid, other=0.0).to(tl.float32)
    at = tl.load(at_ptr + b * K * D + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :], mask=valid, other=0.0)
    tl.store(part_ptr + (b * K + offs_k) * num_db + pid_d, tl.sum(g * at, axis=1), mask=mask_k)


# --------------------------------------------------------------------------- #
# Per sample (grid (B,)): per-anchor backward scalars from g_j = G_j . A~_j.
# With A^_j = h_j A~_j, n^_j = |A^_j|, GA_j = G_j . A^_j = h_j g_j:
#   dL/dA^_j = f_j G_j - c_j A~_j     (c_j from the ratio's dependence on A^)
#   token:  c_j = nu GA_j |a_j| h_j / n^_j^3      (0 when n^_j <= 1e-6, clamped)
#           omega_j = nu GA_j / (max(n^_j, 1e-6) |a_j|)   (dL/da_j += omega_j a_j)
#           dnu += GA_j (r_j - 1)
#   frob.:  c_j = nu GA ||A||_F h_j / ((N^ + eps)^2 N^), omega = nu GA / ((N^ + eps) ||A||_F),
#           dnu = GA (r - 1), with GA = sum_j GA_j and N^ = ||A^||_F
# then E_j = dL/dA~_j = alpha_j G_j + coef_j A~_j with alpha_j = h_j f_j, coef_j = -h_j c_j,
#   e_j = dL/dA^_j . A~_j = f_j g_j - c_j |A~_j|^2,  ds_j = rho e_j,  drho = sum_j e_j s_j.
# ds_bar = sum_l s_l ds_l = rho drho is stored too, and _dsim reads ds centred, ds_j - ds_bar:
# the backward needs ds only through differences (ds_j - Ps_i in dS, Ps_i - sum_l u_l Ps_l in
# dq, = sum_j (P_ij - s_j) ds_j), unchanged by any shift as P's rows and u sum to 1. Those
# differences can be small next to ds itself: when G runs along A (G = out for |out|^2 / 2),
# ds_j ~ rho |a_j|^2 for every j (40 +- 4 for unit inputs at K = 24, d = 256, while
# Ps_i - sum u Ps ~ 0.1). Uncentred, P = exp(S - lse), whose rows sum to 1 only to a few
# ulps, put those ulps of ds_bar into every Ps_i, and u_i times that was 1e-6 in dq, as large
# as dq's whole fp32 tolerance (and growing with d); centred, only ulps of ds_j - ds_bar.
# --------------------------------------------------------------------------- #
@triton.jit
def _anchor_grad_coef_kernel(
    gpart_ptr, nat2_ptr, delta_ptr, s_ptr, na_ptr, params_ptr,
    alpha_ptr, coef_ptr, omega_ptr, ds_ptr, dsbar_ptr, pgrad_ptr,
    K, num_db, ratio_eps,
    FROBENIUS: tl.constexpr, BK: tl.constexpr, BDB: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rho = tl.load(params_ptr + 3)
    nu = tl.load(params_ptr + 4)
    offs_p = tl.arange(0, BDB)
    if FROBENIUS:
        sq_a = tl.zeros((BK,), tl.float32)
        sq_hat = tl.zeros((BK,), tl.float32)
        grow = tl.zeros((BK,), tl.float32)
        ga_lane = tl.zeros((BK,), tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < K
            g = tl.sum(tl.load(gpart_ptr + (b * K + offs_k)[:, None] * num_db + offs_p[None, :],
                               mask=mask_k[:, None] & (offs_p < num_db)[None, :], other=0.0), axis=1)
            rs = rho * tl.load(s_ptr + b * K + offs_k, mask=mask_k, other=0.0)
            h = 1.0 + rs
            na = tl.load(na_ptr + b * K + offs_k, mask=mask_k, other=0.0)
            nat2 = tl.load(nat2_ptr + b * K + offs_k, mask=mask_k, other=0.0)
            delta = tl.load(delta_ptr + b * K + offs_k, mask=mask_k, other=0.0)
            sq_a += na * na
            sq_hat += h * h * nat2
            grow += rs * (2.0 + rs) * na * na + h * h * delta
            ga_lane += h * g
        rm1_f, norm_a, norm_hat = _frobenius_ratio_minus_one(
            tl.sum(sq_a, axis=0), tl.sum(sq_hat, axis=0), tl.sum(grow, axis=0), ratio_eps)
        ga = tl.sum(ga_lane, axis=0)
        f_f = 1.0 + nu * rm1_f
        safe_hat = tl.where(norm_hat > 0, norm_hat, 1.0)
        c_f = tl.where(norm_hat > 0, nu * ga * norm_a / ((norm_hat + ratio_eps) * (norm_hat + ratio_eps) * safe_hat), 0.0)
        omega_f = tl.where(norm_a > 0, nu * ga / ((norm_hat + ratio_eps) * tl.where(norm_a > 0, norm_a, 1.0)), 0.0)
        dnu = ga * rm1_f
    else:
        dnu_lane = tl.zeros((BK,), tl.float32)
    drho_lane = tl.zeros((BK,), tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        g = tl.sum(tl.load(gpart_ptr + (b * K + offs_k)[:, None] * num_db + offs_p[None, :],
                           mask=mask_k[:, None] & (offs_p < num_db)[None, :], other=0.0), axis=1)
        s = tl.load(s_ptr + b * K + offs_k, mask=mask_k, other=0.0)
        rs = rho * s
        h = 1.0 + rs
        na = tl.load(na_ptr + b * K + offs_k, mask=mask_k, other=0.0)
        nat2 = tl.load(nat2_ptr + b * K + offs_k, mask=mask_k, other=0.0)
        if FROBENIUS:
            f = f_f + tl.zeros((BK,), tl.float32)
            c = c_f * h
            omega = omega_f + tl.zeros((BK,), tl.float32)
        else:
            delta = tl.load(delta_ptr + b * K + offs_k, mask=mask_k, other=0.0)
            rm1, n_hat = _token_ratio_minus_one(na, nat2, delta, rs, ratio_eps)
            ga_j = h * g
            f = 1.0 + nu * rm1
            n_safe = tl.maximum(n_hat, ratio_eps)  # the clamp of the ratio; c is 0 where it binds
            c = tl.where(n_hat > ratio_eps, nu * ga_j * na * h / (n_safe * n_safe * n_safe), 0.0)
            omega = tl.where(na > 0, nu * ga_j / (n_safe * tl.where(na > 0, na, 1.0)), 0.0)
            dnu_lane += tl.where(mask_k, ga_j * rm1, 0.0)
        e = f * g - c * nat2
        drho_lane += tl.where(mask_k, e * s, 0.0)
        tl.store(alpha_ptr + b * K + offs_k, h * f, mask=mask_k)
        tl.store(coef_ptr + b * K + offs_k, -h * c, mask=mask_k)
        tl.store(omega_ptr + b * K + offs_k, omega, mask=mask_k)
        tl.store(ds_ptr + b * K + offs_k, rho * e, mask=mask_k)
    if not FROBENIUS:
        dnu = tl.sum(dnu_lane, axis=0)
    drho = tl.sum(drho_lane, axis=0)
    tl.store(pgrad_ptr + b * 5 + 3, drho)
    tl.store(pgrad_ptr + b * 5 + 4, dnu)
    tl.store(dsbar_ptr + b, rho * drho)  # sum_j s_j ds_j, the centre of ds (see above)


# --------------------------------------------------------------------------- #
# dL/dS per candidate row block (grid (M-blocks, B)), given Q = D E^T:
#   R_i = sum_j W_ij Q_ij,  Ps_i = sum_j P_ij ds_j (ds_j - ds_bar, above),  dm_i = gamma R_i,
#   dpre_i = dm_i m_i (1 - m_i)                       (gate pre-activation)
#   dS_ij = gamma m_i W_ij (Q_ij - R_i) / tau          (through W)
#         + P_ij u_i (ds_j - Ps_i)                     (through s = P^T u)
#         + beta dpre_i [j == argmax_i]                (through the gate's max)
#   dgamma += sum_i m_i R_i, dtau -= sum_ij gamma m_i W_ij (Q_ij - R_i) (S_ij - smax_i) / tau^2,
#   dtheta -= beta sum_i dpre_i.
# Q_ij - R_i is formed as (Q_ij - Q_ia) - R'_i, R'_i = sum_j W_ij (Q_ij - Q_ia) / sum_j W_ij
# with a = argmax_i: exact centring (sum_j W_ij (Q_ij - R_i) = 0 to rounding) even when
# W's row sum is 1 only to rounding, and exactly 0 for a one-hot row (tau -> 0), where
# the 1 / tau would otherwise amplify rounding into O(1) errors. dtau uses S - smax (the
# same exact value, since the W (Q - R) row sums vanish; better conditioned).
# Also the normalisation's back-projections: kappa_i = sum_j dS_ij S_ij / |d_i|^2
# (0 when |d_i| is clamped), column partials of sum_i dS_ij S_ij for the anchors.
# dS is written pre-scaled as dS_ij / (max|d_i|,eps) / (max|a_j|,eps) over Q in place.
# --------------------------------------------------------------------------- #
@triton.jit
def _dsim_tile(srow, qrow, ds_ptr, ds_bar, b, k0, K, mask_m, inv_tau, smax, lse_tau, lse_one,
               BK: tl.constexpr):
    # one [BM, BK] tile of the row block: S, Q, W = softmax(S / tau), P = softmax(S), ds_j - ds_bar
    offs_k = k0 + tl.arange(0, BK)
    mask_k = offs_k < K
    valid = mask_m[:, None] & mask_k[None, :]
    st = tl.load(srow + offs_k[None, :], mask=valid, other=0.0)
    qt = tl.load(qrow + offs_k[None, :], mask=valid, other=0.0)
    w = tl.where(valid, tl.exp((st - smax[:, None]) * inv_tau - lse_tau[:, None]), 0.0)
    p = tl.where(valid, tl.exp(st - lse_one[:, None]), 0.0)
    dsk = tl.where(mask_k, tl.load(ds_ptr + b * K + offs_k, mask=mask_k, other=0.0) - ds_bar, 0.0)
    return offs_k, mask_k, valid, st, qt, w, p, dsk


@triton.jit
def _dsim_kernel(
    s_ptr, q_ptr, params_ptr,
    smax_ptr, lse_tau_ptr, lse1_ptr, pre_ptr, amax_ptr, lseq_ptr, nd_ptr, na_ptr, ds_ptr, dsbar_ptr, sc_ptr,
    kappa_ptr, ps_ptr, lampart_ptr, ppart_ptr,
    beta, eps, M, K, ssb, ssm,
    BM: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_mb = tl.num_programs(0)
    gamma = tl.load(params_ptr + 0)
    inv_tau = 1.0 / tl.load(params_ptr + 1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    stat = b * M + offs_m
    smax = tl.load(smax_ptr + stat, mask=mask_m, other=0.0)
    lse_tau = tl.load(lse_tau_ptr + stat, mask=mask_m, other=0.0)
    lse_one = tl.load(lse1_ptr + stat, mask=mask_m, other=0.0)
    pre = tl.load(pre_ptr + stat, mask=mask_m, other=0.0)
    gate, slope = _gate_and_slope(pre)
    amax = tl.load(amax_ptr + stat, mask=mask_m, other=-1)
    nd = tl.load(nd_ptr + stat, mask=mask_m, other=1.0)
    sc = tl.load(sc_ptr + b * ssb + offs_m.to(tl.int64) * ssm, mask=mask_m, other=0.0).to(tl.float32)
    u = tl.where(mask_m, tl.exp(sc - tl.load(lseq_ptr + b)), 0.0)
    srow = s_ptr + b * M * K + offs_m.to(tl.int64)[:, None] * K
    qrow = q_ptr + b * M * K + offs_m.to(tl.int64)[:, None] * K
    ds_bar = tl.load(dsbar_ptr + b)
    q_arg = tl.load(q_ptr + b * M * K + offs_m.to(tl.int64) * K + amax, mask=mask_m, other=0.0)  # Q_ia
    # pass 1: row sums sum_j W_ij, R'_i (shifted by Q_ia) and Ps_i
    w_sum = tl.zeros((BM,), tl.float32)
    r_shift = tl.zeros((BM,), tl.float32)
    ps = tl.zeros((BM,), tl.float32)
    for k0 in range(0, K, BK):
        offs_k, mask_k, valid, st, qt, w, p, dsk = _dsim_tile(srow, qrow, ds_ptr, ds_bar, b, k0, K, mask_m,
                                                              inv_tau, smax, lse_tau, lse_one, BK)
        w_sum += tl.sum(w, axis=1)
        r_shift += tl.sum(w * (qt - q_arg[:, None]), axis=1)
        ps += tl.sum(p * dsk[None, :], axis=1)
    r_shift = r_shift / tl.where(mask_m, w_sum, 1.0)  # w_sum ~ 1 (>= W_ia >= 1 / K) on a valid row
    r_sum = q_arg + r_shift
    dpre = gamma * r_sum * slope
    # pass 2: dS, its projections, dtau
    rowdot = tl.zeros((BM,), tl.float32)
    dtau_lane = tl.zeros((BM,), tl.float32)
    rnd = 1.0 / tl.maximum(nd, eps)
    for k0 in range(0, K, BK):
        offs_k, mask_k, valid, st, qt, w, p, dsk = _dsim_tile(srow, qrow, ds_ptr, ds_bar, b, k0, K, mask_m,
                                                              inv_tau, smax, lse_tau, lse_one, BK)
        dz = gamma * gate[:, None] * w * ((qt - q_arg[:, None]) - r_shift[:, None])
        dst = dz * inv_tau + p * u[:, None] * (dsk[None, :] - ps[:, None])
        dst += tl.where(offs_k[None, :] == amax[:, None], beta * dpre[:, None], 0.0)
        dst = tl.where(valid, dst, 0.0)
        dtau_lane += tl.sum(tl.where(valid, dz * (st - smax[:, None]), 0.0), axis=1)
        proj = dst * st
        rowdot += tl.sum(proj, axis=1)
        tl.store(lampart_ptr + (b * num_mb + pid_m) * K + offs_k, tl.sum(proj, axis=0), mask=mask_k)
        na = tl.load(na_ptr + b * K + offs_k, mask=mask_k, other=1.0)
        tl.store(qrow + offs_k[None, :], dst * rnd[:, None] / tl.maximum(na, eps)[None, :], mask=valid)
    kappa = tl.where(nd >= eps, rowdot * rnd * rnd, 0.0)
    tl.store(kappa_ptr + stat, kappa, mask=mask_m)
    tl.store(ps_ptr + stat, ps, mask=mask_m)
    part = ppart_ptr + (b * num_mb + pid_m) * 3
    tl.store(part + 0, tl.sum(tl.where(mask_m, gate * r_sum, 0.0), axis=0))
    tl.store(part + 1, -tl.sum(dtau_lane, axis=0) * inv_tau * inv_tau)
    tl.store(part + 2, -beta * tl.sum(tl.where(mask_m, dpre, 0.0), axis=0))


# --------------------------------------------------------------------------- #
# dD_i = gamma sum_j C_ij E_j + sum_j dS^_ij a_j - kappa_i d_i
# (dS^ the pre-scaled dS; grid (M-blocks, d-blocks, B), loop over anchors)
# --------------------------------------------------------------------------- #
@triton.jit
def _grad_candidates_kernel(
    c_ptr, dsc_ptr, e_ptr, a_ptr, d_ptr, kappa_ptr, params_ptr, dd_ptr,
    M, K, D, sab, sak, sad, sdb, sdm, sdd,
    ROUND_BF16: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    gamma = tl.load(params_ptr + 0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_m = offs_m < M
    mask_d = offs_d < D
    acc = tl.zeros((BM, BD), tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        mk = mask_m[:, None] & mask_k[None, :]
        kd = mask_k[:, None] & mask_d[None, :]
        mat = b * M * K + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
        c = tl.load(c_ptr + mat, mask=mk, other=0.0) * gamma
        dsc = tl.load(dsc_ptr + mat, mask=mk, other=0.0)
        e = tl.load(e_ptr + b * K * D + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :], mask=kd, other=0.0)
        a = tl.load(a_ptr + b * sab + offs_k.to(tl.int64)[:, None] * sak + offs_d[None, :] * sad,
                    mask=kd, other=0.0).to(tl.float32)
        acc = _dot_fp32(c, e, acc, True, True, IEEE)
        acc = _dot_fp32(dsc, a, acc, True, False, IEEE)
    valid = mask_m[:, None] & mask_d[None, :]
    dt = tl.load(d_ptr + b * sdb + offs_m.to(tl.int64)[:, None] * sdm + offs_d[None, :] * sdd,
                 mask=valid, other=0.0).to(tl.float32)
    kappa = tl.load(kappa_ptr + b * M + offs_m, mask=mask_m, other=0.0)
    out = acc - kappa[:, None] * dt
    if ROUND_BF16:
        out = round_to_bf16_grid(out)
    tl.store(dd_ptr + b * M * D + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :],
             out.to(dd_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- #
# dA_j = E_j + (omega_j - lambda_j) a_j + sum_i dS^_ij d_i,
# lambda_j = sum_i dS_ij S_ij / |a_j|^2 (0 when |a_j| is clamped).
# Grid (K-blocks, d-blocks, B), loop over candidates.
# --------------------------------------------------------------------------- #
@triton.jit
def _grad_anchors_kernel(
    dsc_ptr, d_ptr, e_ptr, a_ptr, lampart_ptr, omega_ptr, na_ptr, da_ptr,
    M, K, D, num_mb, eps, sab, sak, sad, sdb, sdm, sdd,
    ROUND_BF16: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_k = offs_k < K
    mask_d = offs_d < D
    acc = _sum_over_candidates(dsc_ptr, d_ptr, b, M, K, offs_k, mask_k, offs_d, mask_d, sdb, sdm, sdd,
                               IEEE, BM, BK, BD)
    lam = tl.zeros((BK,), tl.float32)
    for p in range(0, num_mb):
        lam += tl.load(lampart_ptr + (b * num_mb + p) * K + offs_k, mask=mask_k, other=0.0)
    na = tl.load(na_ptr + b * K + offs_k, mask=mask_k, other=1.0)
    rna = 1.0 / tl.maximum(na, eps)
    lam = tl.where(na >= eps, lam * rna * rna, 0.0)
    omega = tl.load(omega_ptr + b * K + offs_k, mask=mask_k, other=0.0)
    valid = mask_k[:, None] & mask_d[None, :]
    dense = b * K * D + offs_k.to(tl.int64)[:, None] * D + offs_d[None, :]
    e = tl.load(e_ptr + dense, mask=valid, other=0.0)
    a = tl.load(a_ptr + b * sab + offs_k.to(tl.int64)[:, None] * sak + offs_d[None, :] * sad,
                mask=valid, other=0.0).to(tl.float32)
    out = e + (omega - lam)[:, None] * a + acc
    if ROUND_BF16:
        out = round_to_bf16_grid(out)
    tl.store(da_ptr + dense, out.to(da_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- #
# Per sample (grid (B,)): dq_i = u_i (Ps_i - sum_l u_l Ps_l) (softmax backward),
# and the (gamma, tau, theta) gradient partials of the M-blocks summed in order.
# u_i = exp(q_i - lse_q): 0 for a masked q_i, and for every i of a fully masked
# sample (lse_q = +inf), whose dq is then 0.
# --------------------------------------------------------------------------- #
@triton.jit
def _grad_scores_kernel(
    sc_ptr, lseq_ptr, ps_ptr, ppart_ptr, dq_ptr, pgrad_ptr,
    M, num_mb, ssb, ssm,
    ROUND_BF16: tl.constexpr, BQ: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    lse_q = tl.load(lseq_ptr + b)
    tot_lane = tl.zeros((BQ,), tl.float32)
    for m0 in range(0, M, BQ):
        offs = m0 + tl.arange(0, BQ)
        mask = offs < M
        sc = tl.load(sc_ptr + b * ssb + offs.to(tl.int64) * ssm, mask=mask, other=0.0).to(tl.float32)
        ps = tl.load(ps_ptr + b * M + offs, mask=mask, other=0.0)
        tot_lane += tl.where(mask, tl.exp(sc - lse_q) * ps, 0.0)
    tot = tl.sum(tot_lane, axis=0)
    for m0 in range(0, M, BQ):
        offs = m0 + tl.arange(0, BQ)
        mask = offs < M
        sc = tl.load(sc_ptr + b * ssb + offs.to(tl.int64) * ssm, mask=mask, other=0.0).to(tl.float32)
        ps = tl.load(ps_ptr + b * M + offs, mask=mask, other=0.0)
        dq = tl.exp(sc - lse_q) * (ps - tot)
        if ROUND_BF16:
            dq = round_to_bf16_grid(dq)
        tl.store(dq_ptr + b * M + offs, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    for i in tl.static_range(3):
        lane = tl.zeros((BQ,), tl.float32)
        for p0 in range(0, num_mb, BQ):
            offs_p = p0 + tl.arange(0, BQ)
            lane += tl.load(ppart_ptr + (b * num_mb + offs_p) * 3 + i, mask=offs_p < num_mb, other=0.0)
        tl.store(pgrad_ptr + b * 5 + i, tl.sum(lane, axis=0))


# =========================================================================== #
# Launchers
# =========================================================================== #
def _ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs: exact fp32 products; fp16/bf16: tf32 products of split intermediates (``_dot_fp32``)."""
    return dtype == torch.float32


def _params_tensor(params, device):
    """The five operator parameters as one fp32 device tensor, read by the kernels."""
    if all(not torch.is_tensor(p) for p in params):
        return torch.tensor([float(p) for p in params], dtype=torch.float32).to(device, non_blocking=True)
    return torch.stack([
        p.detach().to(device=device, dtype=torch.float32).reshape(())
        if torch.is_tensor(p) else torch.tensor(float(p), dtype=torch.float32, device=device)
        for p in params
    ])


def _is_zero(p) -> bool:
    return not torch.is_tensor(p) and float(p) == 0.0


def _forward(anchors, candidates, scores, params, beta, norm, need_backward):
    B, K, D = anchors.shape
    M = candidates.shape[1]
    device = anchors.device
    f32 = torch.float32
    gamma, _, _, rho, nu = params
    pvec = _params_tensor(params, device)
    has_transfer = M > 0 and not _is_zero(gamma)
    need_sim = M > 0 and (need_backward or has_transfer or not _is_zero(rho))
    final = not need_backward and _is_zero(nu)
    num_mb = triton.cdiv(M, BLOCK_M) if need_sim else 0
    num_kb = triton.cdiv(K, BLOCK_K)
    num_db = triton.cdiv(D, BLOCK_D)
    sal = dict(num_warps=NUM_WARPS)

    sim = torch.empty(B, M, K, device=device, dtype=f32)
    comb = torch.empty(B, M, K, device=device, dtype=f32)
    n_cand = torch.empty(B, M, device=device, dtype=f32)
    n_anch = torch.empty(B, K, device=device, dtype=f32)
    smax = torch.empty(B, M, device=device, dtype=f32)
    lse_tau = torch.empty(B, M, device=device, dtype=f32)
    lse_one = torch.empty(B, M, device=device, dtype=f32)
    pre = torch.empty(B, M, device=device, dtype=f32)
    amax = torch.empty(B, M, device=device, dtype=torch.int32)
    lse_q = torch.empty(B, device=device, dtype=f32)
    s_part = torch.empty(B, num_mb, K, device=device, dtype=f32)
    if need_sim:
        _pairwise_dot_kernel[(num_kb, num_mb, B)](
            candidates, anchors, sim, n_cand, n_anch, M, K, D,
            *candidates.stride(), *anchors.stride(), NORMALIZE_EPS,
            NORMALIZE=True, FP32_DOT=INTERPRETED or anchors.dtype == f32,
            SPLIT_Y=False, IEEE=_ieee(anchors.dtype),
            BM=BLOCK_M, BK=BLOCK_K, BD=BLOCK_D, **sal)
        _row_stats_kernel[(num_mb, B)](
            sim, comb, scores, pvec, smax, lse_tau, lse_one, pre, amax, lse_q, s_part,
            float(beta), M, K, *scores.stride(), BM=BLOCK_M, BK=BLOCK_K, BQ=BLOCK_VEC, **sal)

    out = torch.empty(B, K, D, device=device, dtype=anchors.dtype)
    rb = round_bf16_on_store(anchors.dtype)
    if final:
        a_tilde = pdelta = pna = s_vec = out  # unused pointers
    else:
        a_tilde = torch.empty(B, K, D, device=device, dtype=f32)
        pdelta = torch.empty(B, K, num_db, device=device, dtype=f32)
        pna = torch.empty(B, K, num_db, device=device, dtype=f32)
        s_vec = torch.empty(B, K, device=device, dtype=f32)
    _transfer_kernel[(num_kb, num_db, B)](
        anchors, candidates, comb, s_part, pvec, out, a_tilde, pdelta, pna, s_vec,
        M, K, D, num_mb, *anchors.stride(), *candidates.stride(),
        HAS_TRANSFER=has_transfer, FINAL=final, ROUND_BF16=rb, IEEE=_ieee(anchors.dtype),
        BM=BLOCK_M, BK=BLOCK_K, BD=BLOCK_D, **sal)
    if final:
        return out, None
    nat2 = torch.empty(B, K, device=device, dtype=f32)
    delta = torch.empty(B, K, device=device, dtype=f32)
    n_ratio = torch.empty(B, K, device=device, dtype=f32)  # |a_j| of the norm blend
    scale = torch.empty(B, K, device=device, dtype=f32)
    _anchor_scale_kernel[(B,)](
        pdelta, pna, s_vec, pvec, nat2, delta, n_ratio, scale, K, num_db,
        TOKEN_RATIO_EPS if norm == "token" else FROBENIUS_EPS,
        FROBENIUS=norm == "frobenius", BK=BLOCK_VEC, BDB=next_pow2(num_db), **sal)
    _anchor_axpby_kernel[(num_kb, num_db, B)](
        a_tilde, a_tilde, scale, scale, out, K, D, *a_tilde.stride(),
        HAS_Y=False, ROUND_BF16=rb, BK=BLOCK_K, BD=BLOCK_D, **sal)
    saved = dict(pvec=pvec, sim=sim, comb=comb, n_cand=n_cand, smax=smax, lse_tau=lse_tau,
                 lse_one=lse_one, pre=pre, amax=amax, lse_q=lse_q, a_tilde=a_tilde, nat2=nat2, delta=delta,
                 s_vec=s_vec, n_ratio=n_ratio,
                 # |a_j| of the similarity's normalisation (only computed when there are candidates)
                 n_anch=n_anch if need_sim else n_ratio)
    return out, saved


def _backward(grad_out, anchors, candidates, scores, saved, beta, norm, needs):
    B, K, D = anchors.shape
    M = candidates.shape[1]
    device = anchors.device
    f32 = torch.float32
    num_kb = triton.cdiv(K, BLOCK_K)
    num_db = triton.cdiv(D, BLOCK_D)
    num_mb = triton.cdiv(M, BLOCK_M)
    sal = dict(num_warps=NUM_WARPS)
    ratio_eps = TOKEN_RATIO_EPS if norm == "token" else FROBENIUS_EPS
    pvec, a_tilde = saved["pvec"], saved["a_tilde"]

    g_part = torch.empty(B, K, num_db, device=device, dtype=f32)
    _row_partial_dot_kernel[(num_kb, num_db, B)](
        grad_out, a_tilde, g_part, K, D, *grad_out.stride(), BK=BLOCK_K, BD=BLOCK_D, **sal)
    alpha = torch.empty(B, K, device=device, dtype=f32)
    coef = torch.empty_like(alpha)
    omega = torch.empty_like(alpha)
    ds = torch.empty_like(alpha)
    ds_bar = torch.empty(B, device=device, dtype=f32)
    pgrad = torch.zeros(B, 5, device=device, dtype=f32)
    _anchor_grad_coef_kernel[(B,)](
        g_part, saved["nat2"], saved["delta"], saved["s_vec"], saved["n_ratio"], pvec,
        alpha, coef, omega, ds, ds_bar, pgrad,
        K, num_db, ratio_eps, FROBENIUS=norm == "frobenius", BK=BLOCK_VEC, BDB=next_pow2(num_db), **sal)
    e_grad = torch.empty(B, K, D, device=device, dtype=f32)
    _anchor_axpby_kernel[(num_kb, num_db, B)](
        grad_out, a_tilde, alpha, coef, e_grad, K, D, *grad_out.stride(),
        HAS_Y=True, ROUND_BF16=False, BK=BLOCK_K, BD=BLOCK_D, **sal)

    d_cand = d_scores = None
    kappa = torch.empty(B, M, device=device, dtype=f32)
    lam_part = torch.zeros(B, num_mb, K, device=device, dtype=f32)
    if M > 0:
        dsc = torch.empty(B, M, K, device=device, dtype=f32)  # Q, then dS (pre-scaled) in place
        _pairwise_dot_kernel[(num_kb, num_mb, B)](
            candidates, e_grad, dsc, dsc, dsc, M, K, D, *candidates.stride(), *e_grad.stride(), 0.0,
            NORMALIZE=False, FP32_DOT=True, SPLIT_Y=True, IEEE=_ieee(anchors.dtype),
            BM=BLOCK_M, BK=BLOCK_K, BD=BLOCK_D, **sal)
        ps = torch.empty(B, M, device=device, dtype=f32)
        p_part = torch.empty(B, num_mb, 3, device=device, dtype=f32)
        _dsim_kernel[(num_mb, B)](
            saved["sim"], dsc, pvec, saved["smax"], saved["lse_tau"], saved["lse_one"], saved["pre"], saved["amax"],
            saved["lse_q"], saved["n_cand"], saved["n_anch"], ds, ds_bar, scores, kappa, ps, lam_part, p_part,
            float(beta), NORMALIZE_EPS, M, K, *scores.stride(), BM=BLOCK_M, BK=BLOCK_K, **sal)
        if needs[1]:
            d_cand = torch.empty(B, M, D, device=device, dtype=candidates.dtype)
            _grad_candidates_kernel[(num_mb, num_db, B)](
                saved["comb"], dsc, e_grad, anchors, candidates, kappa, pvec, d_cand,
                M, K, D, *anchors.stride(), *candidates.stride(),
                ROUND_BF16=round_bf16_on_store(candidates.dtype), IEEE=_ieee(anchors.dtype),
                BM=BLOCK_M, BK=BLOCK_K, BD=BLOCK_D, **sal)
        d_scores = torch.empty(B, M, device=device, dtype=scores.dtype)
        _grad_scores_kernel[(B,)](
            scores, saved["lse_q"], ps, p_part, d_scores, pgrad, M, num_mb, *scores.stride(),
            ROUND_BF16=round_bf16_on_store(scores.dtype), BQ=BLOCK_VEC, **sal)
    else:
        dsc = e_grad  # never read: the loop over candidates is empty
        if needs[1]:
            d_cand = candidates.new_zeros(B, 0, D)
        d_scores = scores.new_zeros(B, 0)
    d_anch = None
    if needs[0]:
        d_anch = torch.empty(B, K, D, device=device, dtype=anchors.dtype)
        _grad_anchors_kernel[(num_kb, num_db, B)](
            dsc, candidates, e_grad, anchors, lam_part, omega, saved["n_anch"], d_anch,
            M, K, D, num_mb if M > 0 else 0, NORMALIZE_EPS, *anchors.stride(), *candidates.stride(),
            ROUND_BF16=round_bf16_on_store(anchors.dtype), IEEE=_ieee(anchors.dtype),
            BM=BLOCK_M, BK=BLOCK_K, BD=BLOCK_D, **sal)
    return d_anch, d_cand, d_scores, pgrad.sum(dim=0)


DOUBLE_BACKWARD_ERROR = (
    "eos_reduce(impl='triton') is differentiable once: its fused backward kernels compute "
    "first-order gradients and build no autograd graph, so gradients taken with "
    "create_graph=True cannot be differentiated again (double backward, Hessian-vector "
    "products, gradient penalties). Use eos_reduce(..., impl='torch') for higher-order gradients."
)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the fused backward's gradients, whose own backward raises.

    ``forward(n, *tensors)`` returns the first ``n`` tensors (the gradients);
    the others are the inputs of the operator and the incoming gradient, which
    only link the result into the graph. Unlike ``@once_differentiable``, which
    looks at the incoming gradient alone (a constant in the common
    ``grad(out.sum(), x, create_graph=True)``, so it would silently return
    gradients with no graph), any input that requires grad is linked here.
    """

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


class EOSReduceFunction(torch.autograd.Function):
    """Autograd glue: Triton forward, Triton backward (no PyTorch reference inside).

    The backward is first order only; under ``create_graph=True`` its results
    are routed through :class:`_FirstOrderOnly`, so that a second
    differentiation raises ``DOUBLE_BACKWARD_ERROR`` instead of silently
    returning gradients that are missing their second-order terms.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, scores, gamma, tau, theta, rho, nu, beta, norm):
        params = (gamma, tau, theta, rho, nu)
        need_backward = any(ctx.needs_input_grad[:8])
        out, saved = _forward(anchors, candidates, scores, params, beta, norm, need_backward)
        if need_backward:
            # Everything goes through save_for_backward, so autograd frees it after the
            # backward, or keeps it for another one under retain_graph=True. The tensor
            # parameters are saved only to link a create_graph backward (see above).
            tensor_params = [p for p in params if torch.is_tensor(p)]
            ctx.n_tensor_params = len(tensor_params)
            ctx.saved_keys = tuple(saved)
            ctx.save_for_backward(anchors, candidates, scores, *tensor_params, *saved.values())
            ctx.beta, ctx.norm = beta, norm
            ctx.param_dtypes = [p.dtype if torch.is_tensor(p) else None for p in params]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        anchors, candidates, scores, *rest = ctx.saved_tensors
        tensor_params, rest = rest[:ctx.n_tensor_params], rest[ctx.n_tensor_params:]
        saved = dict(zip(ctx.saved_keys, rest))
        needs = ctx.needs_input_grad
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            d_a, d_c, d_s, pgrad = _backward(grad_out, anchors, candidates, scores, saved,
                                             ctx.beta, ctx.norm, needs)
            param_grads = [
                pgrad[i].to(dt) if (dt is not None and needs[3 + i]) else None
                for i, dt in enumerate(ctx.param_dtypes)
            ]
        grads = [d_a if needs[0] else None, d_c if needs[1] else None, d_s if needs[2] else None, *param_grads]
        links = [t for t in (grad_out, anchors, candidates, scores, *tensor_params) if t.requires_grad]
        given = [i for i, g in enumerate(grads) if g is not None]
        if create_graph and links and given:
            guarded = _FirstOrderOnly.apply(len(given), *(grads[i] for i in given), *links)
            for i, g in zip(given, guarded):
                grads[i] = g
        return (*grads, None, None)


def eos_reduce_triton(anchors, candidates, scores, gamma, tau, theta, rho, nu, *, beta=10.0, norm="token"):
    """Fused Triton implementation; inputs are batched and validated by ``eos_reduce``."""
    check_launchable(anchors.device)
    return EOSReduceFunction.apply(anchors, candidates, scores, gamma, tau, theta, rho, nu, beta, norm)
