"""Text -> visual importance: the attention-free kernel vs eager attention probabilities.

LLaVA-1.5-7B prefill shapes: 32 query heads (= key heads), head dim 128, a
prompt of ``P = 8`` text tokens, 576 visual tokens and ``T`` text rows after
them (the rows that rate the visual tokens), ``L = P + 576 + T`` tokens
(600 to 712, "~650"), ``T`` in {16, 32, 64, 128}, batch 1 and 8, bf16 (GPU).
The CPU subset is B = 1, T in {16, 128}, fp32, without the Triton kernel.

Implementations (the ``impl`` axis of the ids):

- ``triton``: ``text_to_visual_importance(..., impl="triton")``, the fused
  kernel: each text row's log-sum-exp computed in the kernel, no [L, L]
  matrix (CUDA only);
- ``torch``: ``text_to_visual_importance(..., impl="torch")``, the package's
  eager reference (fp32 scores of the T text rows only, [H, T, L] per sample);
- ``eager``: what a FastV-style method does with eager attention: the full
  causal attention probabilities ``softmax(QKᵀ·scale)`` materialised as
  [B, H, L, L] (scores in the input dtype, softmax in fp32 cast back, as
  transformers' eager attention), then the same mean over heads and text rows
  at the visual columns.

Recorded: time (median of the rounds) and the peak extra CUDA memory of one
call (``peak_extra_mem_bytes``; None on the CPU).
"""
from __future__ import annotations

import pytest
import torch

from bench.common import DTYPES, cpu_param, device_label, gpu_param, peak_extra_memory, sync
from eos_kernels import text_to_visual_importance

HEADS = 32
HEAD_DIM = 128
PREFIX = 8
N_VISUAL = 576

GPU_T = (16, 32, 64, 128)
GPU_B = (1, 8)
CPU_T = (16, 128)


def _cases():
    cases = []
    for impl in ("triton", "torch", "eager"):
        for B in GPU_B:
            for T in GPU_T:
                cases.append(gpu_param("cuda", impl, B, T, "bf16", id=f"cuda-{impl}-B{B}-T{T}-bf16"))
    for impl in ("torch", "eager"):
        for T in CPU_T:
            cases.append(cpu_param("cpu", impl, 1, T, "fp32", id=f"cpu-{impl}-B1-T{T}-fp32"))
    return cases


def eager_attention_importance(query, key, visual, text, scale):
    """Mean text -> visual attention probability from fully materialised eager attention."""
    B, H, L, _ = query.shape
    group = H // key.shape[1]
    if group > 1:
        key = key.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale                       # [B, H, L, L]
    causal = torch.full((L, L), float("-inf"), device=query.device, dtype=scores.dtype).triu(1)
    probs = torch.softmax(scores + causal, dim=-1, dtype=torch.float32).to(query.dtype)
    rows = text.to(probs.dtype)
    summed = torch.einsum("bhij,bi->bj", probs, rows).float()                           # [B, L]
    mean = summed / (H * text.sum(dim=1, keepdim=True).float())
    return torch.where(visual, mean, torch.zeros_like(mean))


def _inputs(device, B, T, dtype):
    L = PREFIX + N_VISUAL + T
    gen = torch.Generator(device=device).manual_seed(7 + T + 100 * B)
    q = torch.randn(B, HEADS, L, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, HEADS, L, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    pos = torch.arange(L, device=device)
    visual = ((pos >= PREFIX) & (pos < PREFIX + N_VISUAL)).expand(B, L).contiguous()
    text = (pos >= PREFIX + N_VISUAL).expand(B, L).contiguous()
    return q, k, visual, text, L


@pytest.mark.parametrize("device, impl, B, T, dtype", _cases())
def test_importance(benchmark, device, impl, B, T, dtype):
    device = torch.device(device)
    q, k, visual, text, L = _inputs(device, B, T, DTYPES[dtype])
    scale = HEAD_DIM ** -0.5

    if impl == "eager":
        def compute():
            return eager_attention_importance(q, k, visual, text, scale)
    else:
        def compute():
            return text_to_visual_importance(q, k, visual, text, scale=scale, impl=impl)

    @torch.no_grad()
    def call():
        out = compute()
        sync(device)
        return out

    out = call()  # JIT / allocator warm-up, outside timing
    if DTYPES[dtype] == torch.float32:  # the three compute the same numbers: check before timing
        ref = text_to_visual_importance(q, k, visual, text, scale=scale, impl="torch")
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-7)
    peak, _ = peak_extra_memory(call, device)

    benchmark.group = f"importance {device.type} {dtype} B{B}"
    benchmark(call)
    benchmark.extra_info.update({
        "subject": "importance", "impl": impl, "device": device.type,
        "device_name": device_label(device), "B": B, "T": T, "L": L, "prefix": PREFIX,
        "n_visual": N_VISUAL, "heads": HEADS, "kv_heads": HEADS, "head_dim": HEAD_DIM,
        "dtype": dtype, "peak_extra_mem_bytes": peak,
        "attention_matrix_bytes": B * HEADS * L * L * torch.empty((), dtype=DTYPES[dtype]).element_size(),
    })
