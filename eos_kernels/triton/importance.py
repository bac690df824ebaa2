"""Fused Triton kernel for text -> visual attention importance (forward only).

The public entry point, validation and the PyTorch reference live in
:mod:`eos_kernels.importance`; this module holds only the kernel and its
launcher, and is imported lazily (it imports Triton).
"""
import math

import torch
import triton
import triton.language as tl

from eos_kernels.triton._runtime import INTERPRETED, check_launchable

# Under TRITON_INTERPRET=1, ``triton.jit`` returns an interpreted function; the
# interpreter's bf16 maths is broken, so loaded 16-bit tiles are upcast to fp32
# there (a constexpr flag: nothing changes in the compiled GPU kernel).
_LOG2E = math.log2(math.e)


@triton.jit
def _masked_scores(q, k_base, keep_base, rows, offs_n, offs_d, L, qk_scale,
                   stride_kl, stride_kd,
                   DH: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores s = qk_scale * q @ k^T for one key block, -inf where not visible."""
    n_ok = offs_n < L
    kt_ptrs = k_base + offs_n.to(tl.int64)[None, :] * stride_kl + offs_d[:, None] * stride_kd
    kt = tl.load(kt_ptrs, mask=n_ok[None, :] & (offs_d[:, None] < DH), other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    keep = tl.load(keep_base + offs_n, mask=n_ok, other=0)
    # Causal: key position <= row position.  Padding rows carry position -1, so
    # they see no key at all and contribute nothing.
    visible = (offs_n[None, :] <= rows[:, None]) & (keep[None, :] != 0)
    return tl.where(visible, s, float("-inf"))


# Maths (base-2 domain, c = scale * log2(e), so 2^(c q.k) = e^(scale q.k)):
#   pass 1, per text row t of the block:  m_t = max_j c q_t.k_j,
#           l_t = sum_j 2^(c q_t.k_j - m_t) (online: rescale l by 2^(m_old - m_new)),
#           lse_t = m_t + log2(l_t)          over visible keys j <= t, not padded.
#   pass 2, per key column v (visual only):
#           part[b, h, block, v] = sum_{t in block} 2^(c q_t.k_v - lse_t)
#   host:   importance[b, v] = sum_{h, block} part[b, h, block, v] / (Hq * T_b)
# Only text rows are query rows (gathered through ``rows``); no [L, L] matrix
# exists; the cross-program sum is a fixed-order torch reduction (deterministic).
@triton.jit
def _text_to_visual_importance_kernel(
    q_ptr, k_ptr, rows_ptr, keep_ptr, vis_ptr, bounds_ptr, part_ptr,
    L, T_max, qk_scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_pb, stride_ph, stride_pr,
    GROUP: tl.constexpr, DH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // GROUP).to(tl.int64)

    # Text-row positions of this block (-1 = no row: past this sample's T).
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + b64 * T_max + offs_m, mask=offs_m < T_max, other=-1)
    row_ok = rows >= 0
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (q_ptr + b64 * stride_qb + h64 * stride_qh
              + rows.to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < DH), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    k_base = k_ptr + b64 * stride_kb + kvh64 * stride_kh
    keep_base = keep_ptr + b64 * L
    # bounds[b] = (first non-padded key, first visual key, last visual key + 1)
    key_lo = tl.load(bounds_ptr + b64 * 3)
    vis_lo = tl.load(bounds_ptr + b64 * 3 + 1)
    vis_hi = tl.load(bounds_ptr + b64 * 3 + 2)
    row_hi = tl.max(tl.where(row_ok, rows, -1), axis=0) + 1  # keys past it are invisible

    # Pass 1: online max / sum -> per-row log-sum-exp (base 2).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range((key_lo // BLOCK_N) * BLOCK_N, row_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _masked_scores(q, k_base, keep_base, rows, offs_n, offs_d, L, qk_scale,
                           stride_kl, stride_kd, DH, UPCAST, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))

    # Pass 2: probabilities of the visual key columns, summed over the block's rows.
    part_base = part_ptr + b64 * stride_pb + h64 * stride_ph + rb.to(tl.int64) * stride_pr
    for n0 in range((vis_lo // BLOCK_N) * BLOCK_N, tl.minimum(vis_hi, row_hi), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        s = _masked_scores(q, k_base, keep_base, rows, offs_n, offs_d, L, qk_scale,
                           stride_kl, stride_kd, DH, UPCAST, DOT_PRECISION)
        col = tl.sum(tl.exp2(s - lse[:, None]), axis=0)
        vis = tl.load(vis_ptr + b64 * L + offs_n, mask=n_ok, other=0)
        tl.store(part_base + offs_n, tl.where(vis != 0, col, 0.0), mask=n_ok)


def _pick_block_m(t_max, programs_per_row_block, device):
    """Rows per program: 16..64, halved while the grid would leave SMs idle."""
    block_m = min(64, max(16, triton.next_power_of_2(max(t_max, 1))))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while block_m > 16 and programs_per_row_block * triton.cdiv(t_max, block_m) < 2 * sms:
            block_m //= 2
    return block_m


def text_to_visual_importance_sums(query, key, rows, keep, visual, bounds, scale,
                                   block_m=None, block_n=None):
    """Launch the kernel; return float32 [B, L] sums over heads and text rows.

    Args (already validated by :func:`eos_kernels.importance.text_to_visual_importance`):
        query: [B, Hq, L, dh] fp16/bf16/fp32, any strides.
        key: [B, Hkv, L, dh], same dtype and device, any strides.
        rows: int32 [B, T_max], contiguous: each sample's text-row positions,
            ascending, padded with -1.
        keep: int8 [B, L], contiguous: 1 for real (non-padded) tokens.
        visual: int8 [B, L], contiguous: 1 for visual tokens.
        bounds: int32 [B, 3], contiguous: first non-padded key, first visual key,
            last visual key + 1 (0, 0 when a sample has no visual token).
        scale: softmax scale (float).
        block_m, block_n: tile sizes (powers of two >= 16); ``None`` picks them.

    Returns:
        float32 [B, L]: sum over query heads and text rows of the attention
        probability on each visual key (0 elsewhere). Divide by Hq * T_b for the
        mean.
    """
    check_launchable(query.device)
    B, Hq, L, dh = query.shape
    Hkv = key.shape[1]
    t_max = rows.shape[1]
    if block_m is None:
        block_m = _pick_block_m(t_max, B * Hq, query.device)
    if block_n is None:
        block_n = 64
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    block_d = max(16, triton.next_power_of_2(dh))
    n_row_blocks = triton.cdiv(t_max, block_m)
    # One partial-sum row per (sample, head, row block); columns no program
    # writes (non-visual or invisible keys) stay 0.
    part = torch.zeros((B, Hq, n_row_blocks, L), dtype=torch.float32, device=query.device)
    if B == 0 or t_max == 0 or L == 0:
        return part.sum(dim=(1, 2))
    upcast = INTERPRETED and query.dtype != torch.float32
    # fp32 inputs: exact fp32 products (no TF32); 16-bit inputs use the tensor
    # cores with fp32 accumulation either way.
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    grid = (n_row_blocks, Hq, B)
    _text_to_visual_importance_kernel[grid](
        query, key, rows, keep, visual, bounds, part,
        L, t_max, float(scale) * _LOG2E,
        *query.stride(), *key.stride(),
        part.stride(0), part.stride(1), part.stride(2),
        GROUP=Hq // Hkv, DH=dh,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=4 if block_d <= 128 else 8,
    )
    # Fixed-order reduction over (head, row block): deterministic run to run.
    return part.sum(dim=(1, 2))


__all__ = ["text_to_visual_importance_sums"]
