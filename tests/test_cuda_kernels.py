"""CUDA-only: the compiled Triton kernels against the references at LLaVA-1.5-7B shapes.

- ``eos_reduce``: forward and all eight gradients (anchors, candidates, scores,
  γ, τ, θ, ρ, ν) against the PyTorch reference evaluated in float64 on the same
  rounded inputs (the oracle of ``tests/test_eos_reduce.py``, same tolerances),
  at d = 4096, N = 576 visual tokens, K ∈ {192, 64, 16}, B ∈ {1, 2, 32}, in
  fp32 / fp16 / bf16 and both norm modes; the inference fast path at the
  benchmark's shapes (B ∈ {1, 32}, K = 64, bf16, the paper's hybrid);
  run-to-run determinism; strided inputs and the merge / pool corners; awkward
  shapes last (d and M not multiples of the tile, K just over a tile, every
  visual token kept, one anchor), since each recompiles every kernel.
- ``text_to_visual_importance``: the kernel against the fp32 reference (run on
  the CPU: no TF32) at LLaVA-1.5-7B prefill shapes (32 heads × 128, 576 visual
  tokens, T ∈ {16, 128} text rows, MHA and GQA, left padding), every dtype.

Most informative first: a run cut off by its time limit keeps the LLaVA-shape
and importance results. Failures keep the first mismatching values
(``tests/_cuda_subset.py``). Without CUDA the file skips; with
``EOS_CUDA_TESTS_ON_CPU=1`` the same tests run at small shapes through Triton's
interpreter (``scripts/gpu_check.sh --cpu``).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _cuda_subset import DEVICE, HAS_CUDA, assert_close_verbose, requires_device  # noqa: E402
from test_eos_reduce import make_inputs as _make_inputs  # noqa: E402

pytestmark = requires_device

PARAM_NAMES = ("gamma", "tau", "theta", "rho", "nu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (rtol, atol as a fraction of max |oracle|): tests/test_eos_reduce.py's, justified there
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2.0 ** -10, 2.0 ** -10),
    torch.bfloat16: (2.0 ** -7, 2.0 ** -8),
}
ABS_FLOOR = 1e-6
HYBRID = (0.3, 0.5, 0.1, 0.4, 0.6)          # every term of the operator active
PAPER_HYBRID = (0.083, 0.22, 0.10, 0.0, 0.0)  # the benchmark's forward parameters (table 6, layer 6)

if HAS_CUDA:
    N_VISUAL, D_MODEL = 576, 4096
else:  # interpreter subset: the same cases, scaled down and fewer (it costs ~ms per loop iteration)
    N_VISUAL, D_MODEL = 24, 40


def on_gpu_else(gpu_values, cpu_values):
    """Parametrize values: all of them on the GPU, a few in the interpreter subset."""
    return list(gpu_values) if HAS_CUDA else list(cpu_values)


ALL_DTYPES = on_gpu_else(DTYPES, ["fp32"])
NORMS = on_gpu_else(["token", "frobenius"], ["token"])


# --------------------------------------------------------------------------- operator helpers
def make_inputs(B, K, M, d, dtype, seed, clustered=False, noncontiguous=False):
    """The operator suite's inputs (``test_eos_reduce.make_inputs``) on this module's device."""
    return _make_inputs(B, K, M, d, dtype, seed, clustered=clustered, noncontiguous=noncontiguous, device=DEVICE)


def run_op(impl, A, D, q, values, as_tensors=True, grad_seed=1, grad_dtype=None, **kw):
    from eos_kernels import eos_reduce

    leaves = [t.detach().clone().requires_grad_(True) for t in (A, D, q)]
    if as_tensors:
        ps = [torch.tensor(float(v), device=A.device, dtype=torch.float64 if A.dtype == torch.float64
                           else torch.float32, requires_grad=True) for v in values]
    else:
        ps = list(values)
    out = eos_reduce(*leaves, *ps, impl=impl, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    g = g.to(grad_dtype or out.dtype).to(out.device, out.dtype)
    wrt = leaves + [p for p in ps if torch.is_tensor(p)]
    grads = torch.autograd.grad(out, wrt, g)
    names = ["anchors", "candidates", "scores"] + [n for n, p in zip(PARAM_NAMES, ps) if torch.is_tensor(p)]
    return out, dict(zip(names, grads))


def oracle(A, D, q, values, **kw):
    """The reference in float64 on the same inputs, rounded back to their dtypes."""
    out, grads = run_op("torch", A.double(), D.double(), q.double(), values, grad_dtype=A.dtype, **kw)
    dtypes = {"anchors": A.dtype, "candidates": D.dtype, "scores": q.dtype}
    return out.to(A.dtype), {n: g.to(dtypes.get(n, torch.float32)) for n, g in grads.items()}


def check(actual, expected, dtype, what, context):
    rtol, afrac = TOL[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    assert_close_verbose(actual.float(), expected.float(), rtol=rtol, atol=afrac * scale + ABS_FLOOR,
                         what=f"{what} ({dtype})", context=context)


def compare(A, D, q, values, context, **kw):
    dtype = A.dtype
    out_t, grads_t = run_op("triton", A, D, q, values, **kw)
    out_r, grads_r = oracle(A, D, q, values, **kw)
    context = (f"{context}; B,K,M,d = {tuple(A.shape[:2]) + (D.shape[1], A.shape[2])}; params {values}; "
               f"{kw}; device {A.device}")
    assert out_t.dtype == dtype and out_t.shape == A.shape, (out_t.dtype, out_t.shape, context)
    check(out_t, out_r, dtype, "output", context)
    assert grads_t.keys() == grads_r.keys()
    for name in grads_r:
        assert grads_t[name].dtype == grads_r[name].dtype, (name, grads_t[name].dtype, context)
        check(grads_t[name], grads_r[name], dtype, f"d/d{name}", context)
    return out_r, grads_r


# --------------------------------------------------------------------------- operator: LLaVA shapes
def _llava_cases():
    if HAS_CUDA:
        shapes = [(1, 192), (2, 64), (1, 16), (32, 64)]
    else:
        shapes = [(2, 4)]
    return [pytest.param(B, K, id=f"B{B}-K{K}") for B, K in shapes]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", on_gpu_else(DTYPES, ["fp32", "bf16"]))
@pytest.mark.parametrize("B, K", _llava_cases())
def test_operator_llava_shapes_forward_and_all_gradients(B, K, dtype, norm):
    M = N_VISUAL - K
    seed = 100 * B + K
    A, D, q = make_inputs(B, K, M, D_MODEL, DTYPES[dtype], seed=seed)
    _, grads = compare(A, D, q, HYBRID, f"seed {seed}", norm=norm)
    assert grads["candidates"].abs().max() > 0 and grads["tau"].abs() > 0


# --------------------------------------------------------------------------- importance
def _importance_cases():
    if HAS_CUDA:
        shapes = [(1, 16, 32), (1, 128, 32), (8, 128, 32), (2, 64, 8)]  # (B, T, key heads); 32 query heads
    else:
        shapes = [(2, 9, 2)]
    return [pytest.param(B, T, hkv, id=f"B{B}-T{T}-kv{hkv}") for B, T, hkv in shapes]


@pytest.mark.parametrize("dtype", on_gpu_else(DTYPES, ["bf16"]))
@pytest.mark.parametrize("B, T, hkv", _importance_cases())
def test_importance_llava_shapes(B, T, hkv, dtype):
    """Kernel on the device vs the fp32 reference on the CPU; sample 1 (if any) left-padded."""
    from eos_kernels import text_to_visual_importance

    Hq, dh, prefix = (32, 128, 8) if HAS_CUDA else (4, 16, 3)
    n_vis = N_VISUAL if HAS_CUDA else 16
    L = prefix + n_vis + T
    seed = 11 + B + T + hkv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, dh, generator=g).transpose(1, 2).to(DTYPES[dtype])  # strided, as from a model
    k = torch.randn(B, L, hkv, dh, generator=g).transpose(1, 2).to(DTYPES[dtype])
    pos = torch.arange(L)
    visual = ((pos >= prefix) & (pos < prefix + n_vis)).repeat(B, 1)
    text = pos.ge(prefix + n_vis).repeat(B, 1)
    text[0, 1:prefix] = True  # sample 0 also has text rows before the image
    amask = torch.ones(B, L, dtype=torch.long)
    if B > 1:
        amask[1, :2] = 0  # left padding (covers the image-free prefix only)
    out = text_to_visual_importance(q.to(DEVICE), k.to(DEVICE), visual.to(DEVICE), text.to(DEVICE),
                                    amask.to(DEVICE), impl="triton")
    again = text_to_visual_importance(q.to(DEVICE), k.to(DEVICE), visual.to(DEVICE), text.to(DEVICE),
                                      amask.to(DEVICE), impl="triton")
    assert torch.equal(out, again), "importance differs run to run"
    ref = text_to_visual_importance(q, k, visual, text, amask, impl="torch")
    assert out.dtype == torch.float32 and out.shape == (B, L)
    # tests/test_importance.py's GPU tolerance (dh = 128 terms per logit, the GPU's exp2)
    assert_close_verbose(out.cpu(), ref, rtol=5e-5, atol=1e-8, what=f"importance ({dtype})",
                         context=f"B={B}, Hq={Hq}, Hkv={hkv}, dh={dh}, L={L}, T={T}, seed {seed}")
    assert torch.all(out.cpu()[~visual] == 0)
    assert ref.sum() > 0.1


# --------------------------------------------------------------------------- operator: the benchmark's paths
@pytest.mark.parametrize("B", on_gpu_else([1, 32], [2]))
@pytest.mark.parametrize("values", [PAPER_HYBRID, (0.0, 1.0, 0.0, 0.0, 0.0)], ids=["paper_hybrid", "prune"])
def test_operator_inference_fast_path_bf16(B, values):
    """What ``bench/test_bench_operator.py`` times in ``fwd`` mode: float parameters, no autograd."""
    from eos_kernels import eos_reduce

    K = 64 if HAS_CUDA else 4
    A, D, q = make_inputs(B, K, N_VISUAL - K, D_MODEL, torch.bfloat16, seed=B)
    with torch.no_grad():
        fast = eos_reduce(A, D, q, *values, beta=10.0, norm="token", impl="triton")
    out_r, _ = oracle(A, D, q, values, norm="token")
    check(fast, out_r, torch.bfloat16, "output (no-grad fast path)", f"B={B}, K={K}, params {values}, seed {B}")
    if values[0] == 0.0 and values[3] == 0.0:
        assert torch.equal(fast, A), "prune: anchors must pass through bit for bit"


@pytest.mark.parametrize("dtype", on_gpu_else(["fp32", "bf16"], ["bf16"]))
def test_operator_deterministic(dtype):
    B, K = (2, 64) if HAS_CUDA else (2, 4)
    A, D, q = make_inputs(B, K, N_VISUAL - K, D_MODEL, DTYPES[dtype], seed=13)
    first = run_op("triton", A, D, q, HYBRID)
    second = run_op("triton", A, D, q, HYBRID)
    assert torch.equal(first[0], second[0]), "forward differs run to run"
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"d/d{name} differs run to run"


# --------------------------------------------------------------------------- operator: strided, extreme parameters
@pytest.mark.parametrize("dtype", on_gpu_else(["bf16", "fp32"], ["fp32"]))
def test_operator_strided_inputs(dtype):
    B, K, M, d = (2, 64, 512, D_MODEL) if HAS_CUDA else (2, 9, 21, 40)
    A, D, q = make_inputs(B, K, M, d, DTYPES[dtype], seed=3, noncontiguous=True)
    assert not A.is_contiguous() and not D.is_contiguous()
    compare(A, D, q, HYBRID, "seed 3, strided views")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("values", [
    (1.0, 1e-4, -1e9, 0.0, 0.0),   # merge corner: tau -> 0
    (1.0, 1e6, -1e9, 0.0, 0.0),    # pool corner: tau -> inf
    (0.5, 1e-4, 0.2, 0.7, 0.5),    # sharp assignment with an active gate
], ids=["merge", "pool", "sharp_hybrid"])
def test_operator_extreme_parameters(values, dtype):
    B, K, M, d = (2, 64, 512, D_MODEL) if HAS_CUDA else (2, 7, 18, 48)
    A, D, q = make_inputs(B, K, M, d, DTYPES[dtype], seed=5, clustered=True)
    compare(A, D, q, values, "seed 5, clustered candidates")


# --------------------------------------------------------------------------- operator: awkward shapes
# Each odd shape recompiles every kernel (Triton specialises on divisibility by 16), so the GPU
# list pairs each shape with one or two dtypes; the interpreter subset runs small ones (CI runs
# the full small-shape grid of tests/test_eos_reduce.py through the interpreter anyway).
if HAS_CUDA:
    AWKWARD = [
        # (B, K, M, d), dtype, norm
        pytest.param((3, 37, 539, 4095), "bf16", "token", id="odd_everything-bf16-token"),
        pytest.param((3, 37, 539, 4095), "fp32", "frobenius", id="odd_everything-fp32-frobenius"),
        pytest.param((1, 65, 511, 4096), "bf16", "token", id="K_just_over_a_tile-bf16-token"),
        pytest.param((1, 576, 0, 4096), "bf16", "token", id="keep_all_576-bf16-token"),
        pytest.param((1, 575, 1, 4096), "bf16", "frobenius", id="K575_M1-bf16-frobenius"),
        pytest.param((2, 1, 575, 4096), "bf16", "token", id="one_anchor-bf16-token"),
    ]
else:
    AWKWARD = [pytest.param(shape, "fp32", "token", id=f"{name}-fp32-token") for name, shape in (
        ("one_anchor", (2, 1, 7, 24)), ("no_candidates", (2, 5, 0, 24)), ("one_candidate_B3", (3, 4, 1, 33)),
        ("d1", (1, 3, 9, 1)))]


@pytest.mark.parametrize("shape, dtype, norm", AWKWARD)
def test_operator_awkward_shapes(shape, dtype, norm):
    seed = sum(shape)
    A, D, q = make_inputs(*shape, DTYPES[dtype], seed=seed)
    compare(A, D, q, HYBRID, f"seed {seed}", norm=norm)
