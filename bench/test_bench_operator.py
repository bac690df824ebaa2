"""The unified operator: fused Triton vs eager reference vs torch.compile(reference).

Shapes of LLaVA-1.5-7B: d = 4096, N = 576 visual tokens split into K anchors and
M = N - K candidates, K in {192, 128, 64, 16}, batch B in {1, 8, 32}, bf16 and
fp16 (GPU); the CPU subset is B = 1, K in {192, 64, 16}, fp32, eager and
compiled reference only.

Implementations (the ``impl`` axis of the ids):

- ``triton``: ``eos_reduce(..., impl="triton")``, the fused kernels (CUDA only);
- ``torch``: ``eos_reduce(..., impl="torch")``, the eager PyTorch reference;
- ``compile``: ``torch.compile(eos_reduce_reference, dynamic=False)``, compiled
  for each shape (the compile time is recorded as ``compile_s``, outside timing).

Modes: ``fwd`` (parameters as Python floats, the paper's interior hybrid
γ=0.083, τ=0.22, θ=0.10, ρ=ν=0, nothing requires grad) and ``fwdbwd`` (the same
values as 0-d fp32 tensors requiring grad; anchors, candidates and scores
require grad; ``torch.autograd.grad`` of all eight inputs with a random output
gradient).

Byte-count model (``extra_info["bytes"]``, the minimal traffic: every input
read once, every output written once; the scalars are negligible). With
``A = B·K·d·s``, ``D = B·M·d·s`` (``s`` bytes per element), ``Q = B·M·4``
(fp32 scores):

- fwd: read A, D, Q, write out (A): ``2A + D + Q``;
- fwdbwd: the forward, then read A, D, Q and dOut (A), write dA, dD, dQ:
  ``5A + 3D + 3Q``.

``gbps = bytes / median time``, ``bandwidth_fraction = gbps / peak`` with the
peak bandwidth of the GPU by name (``bench.common.PEAK_BANDWIDTH_RULES``).
"""
from __future__ import annotations

import time

import pytest
import torch

from bench.common import (DTYPES, bandwidth_info, cpu_param, device_label, gpu_param,
                          median_seconds, peak_extra_memory, sync)
from eos_kernels import eos_reduce
from eos_kernels.reference import eos_reduce_reference

D_MODEL = 4096
N_VISUAL = 576
HYBRID = dict(gamma=0.083, tau=0.22, theta=0.10, rho=0.0, nu=0.0)  # table 6, layer 6
PARAM_ORDER = ("gamma", "tau", "theta", "rho", "nu")

GPU_K = (192, 128, 64, 16)
GPU_B = (1, 8, 32)
GPU_DTYPES = ("bf16", "fp16")
CPU_K = (192, 64, 16)


def _cases():
    cases = []
    for impl in ("triton", "torch", "compile"):
        for dtype in GPU_DTYPES:
            for B in GPU_B:
                for K in GPU_K:
                    cases.append(gpu_param("cuda", impl, B, K, dtype, id=f"cuda-{impl}-B{B}-K{K}-{dtype}"))
    for impl in ("torch", "compile"):
        for K in CPU_K:
            cases.append(cpu_param("cpu", impl, 1, K, "fp32", id=f"cpu-{impl}-B1-K{K}-fp32"))
    return cases


CASES = _cases()


def min_traffic_bytes(B, K, M, d, elem, mode):
    """The byte-count model of the module docstring."""
    a, dd, q = B * K * d * elem, B * M * d * elem, B * M * 4
    if mode == "fwd":
        return 2 * a + dd + q
    return 5 * a + 3 * dd + 3 * q


def _inputs(device, B, K, dtype, requires_grad):
    M = N_VISUAL - K
    gen = torch.Generator(device=device).manual_seed(1234 + K + 1000 * B)
    A = torch.randn(B, K, D_MODEL, device=device, dtype=dtype, generator=gen)
    D = torch.randn(B, M, D_MODEL, device=device, dtype=dtype, generator=gen)
    q = torch.randn(B, M, device=device, dtype=torch.float32, generator=gen)
    if requires_grad:
        A.requires_grad_(True)
        D.requires_grad_(True)
        q.requires_grad_(True)
        params = [torch.tensor(HYBRID[n], device=device, dtype=torch.float32, requires_grad=True)
                  for n in PARAM_ORDER]
    else:
        params = [HYBRID[n] for n in PARAM_ORDER]
    return A, D, q, params


_COMPILE_LIMITS_RAISED = False


def _compiled_reference(device):
    """A fresh ``torch.compile`` of the reference, specialised to each shape.

    On the CPU inductor compiles in this process (``compile_threads = 1``): its
    pool of compile workers would otherwise start up beside the first timed
    cases and take the few cores from them.
    """
    global _COMPILE_LIMITS_RAISED
    import torch._dynamo as dynamo

    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1

    if not _COMPILE_LIMITS_RAISED:
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 256))
        _COMPILE_LIMITS_RAISED = True
    dynamo.reset()  # no recompilation budget is shared between cases
    return torch.compile(eos_reduce_reference, dynamic=False)


def _operator(impl, device):
    if impl == "compile":
        return _compiled_reference(device)
    return lambda *args, **kwargs: eos_reduce(*args, impl=impl, **kwargs)


def _run(benchmark, mode, device, impl, B, K, dtype_name):
    device = torch.device(device)
    dtype = DTYPES[dtype_name]
    M = N_VISUAL - K
    op = _operator(impl, device)
    A, D, q, params = _inputs(device, B, K, dtype, requires_grad=(mode == "fwdbwd"))

    if mode == "fwd":
        def call():
            out = op(A, D, q, *params, beta=10.0, norm="token")
            sync(device)
            return out
    else:
        grad_out = torch.randn(B, K, D_MODEL, device=device, dtype=dtype)
        wrt = (A, D, q, *params)

        def call():
            out = op(A, D, q, *params, beta=10.0, norm="token")
            grads = torch.autograd.grad(out, wrt, grad_out)
            sync(device)
            return grads

    t0 = time.perf_counter()
    call()  # JIT / compile / allocator warm-up, outside timing
    first_call_s = time.perf_counter() - t0
    peak, _ = peak_extra_memory(call, device)

    benchmark.group = f"operator {mode} {device.type} {dtype_name} B{B}"
    benchmark(call)

    nbytes = min_traffic_bytes(B, K, M, D_MODEL, torch.empty((), dtype=dtype).element_size(), mode)
    benchmark.extra_info.update({
        "subject": "operator", "mode": mode, "impl": impl, "device": device.type,
        "device_name": device_label(device), "B": B, "K": K, "M": M, "d": D_MODEL,
        "N": N_VISUAL, "dtype": dtype_name, "norm": "token", "beta": 10.0, **HYBRID,
        "params_require_grad": mode == "fwdbwd",
        "bytes_model": "fwd: 2A+D+Q; fwdbwd: 5A+3D+3Q (A=B*K*d*s, D=B*M*d*s, Q=B*M*4)",
        "peak_extra_mem_bytes": peak,
        "first_call_s": first_call_s,
        "compile_s": first_call_s if impl == "compile" else None,
        **bandwidth_info(nbytes, median_seconds(benchmark), device),
    })


@pytest.mark.parametrize("device, impl, B, K, dtype", CASES)
def test_operator_fwd(benchmark, device, impl, B, K, dtype):
    _run(benchmark, "fwd", device, impl, B, K, dtype)


@pytest.mark.parametrize("device, impl, B, K, dtype", CASES)
def test_operator_fwdbwd(benchmark, device, impl, B, K, dtype):
    _run(benchmark, "fwdbwd", device, impl, B, K, dtype)
