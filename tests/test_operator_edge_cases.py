"""Edge cases of ``eos_reduce`` (issue 10, item 6), on both implementations.

* A sample whose scores are all -inf (every candidate masked): finite output and
  gradients. Documented semantics (``eos_reduce``'s docstring, the notation block
  of ``eos_kernels/triton/reduce.py``): softmax over no finite score is the zero
  vector, so s_imp = 0 and A^ = A~ for that sample whatever rho is, and its score
  gradient is 0. With rho = 0 the scores never matter: bit-identical output.
* Non-finite gamma, tau, theta, rho, nu (floats or 0-d tensors) and a non-finite
  or non-positive beta are ValueErrors naming the parameter; so are finite
  values outside the accepted ranges (gamma, nu in [0, 1], rho in [0, 10],
  tau >= 2**-40, beta within float32), and at those bounds both paths agree.
* The fused backward is first order: under ``create_graph=True`` it still gives
  the right gradients, and differentiating them again raises a clear error.

Kernels run through Triton's interpreter on the CPU (tests/conftest.py). The
comparisons against the float64 oracle reuse ``compare`` of test_eos_reduce.py,
whose per-dtype tolerances (fp32 rtol 1e-5; fp16/bf16 one ulp of the dtype) are
justified there; the semantics checks are bit-for-bit, because the masked
sample's reweighting factor is exactly 1 + rho * 0 = 1 in both implementations.
"""
from __future__ import annotations

import math

import pytest
import torch

from eos_kernels import eos_reduce
from eos_kernels._checks import BETA_MAX, RHO_MAX, TAU_MIN
from eos_kernels.reference import masked_softmax
from test_eos_reduce import DTYPES, HYBRID, PARAM_NAMES, compare, make_inputs, make_params, run

IMPLS = ("torch", "triton")
NEG_INF = float("-inf")
# B = 3: a normal sample, a fully masked one, one with some scores masked;
# M = 37 spans several candidate blocks and score chunks of the interpreted kernels
SHAPE = (3, 6, 37, 40)


def masked_inputs(dtype=torch.float32, seed=0):
    A, D, q = make_inputs(*SHAPE, dtype=dtype, seed=seed)
    q = q.clone()
    q[1] = NEG_INF
    q[2, ::3] = NEG_INF
    return A, D, q


def assert_all_finite(out, grads, what):
    assert torch.isfinite(out).all(), f"{what}: output"
    for name, g in grads.items():
        assert torch.isfinite(g).all(), f"{what}: d/d{name}"


# ----------------------------------------------------------------------------- all -inf scores
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["token", "frobenius"])
def test_masked_sample_is_finite_and_triton_matches_reference(dtype, norm):
    # seed 1: with seed 0, d/dtheta = -0.066 is a near-cancelling sum of O(1) per-candidate
    # terms (unmasked too), where even the fp32 reference is 7e-5 relative off the float64
    # oracle; a scalar's tolerance is relative to itself, so that draw tests fp32 rounding only
    A, D, q = masked_inputs(dtype, seed=1)
    out_r, grads_r = compare(A, D, q, HYBRID, dtype, norm=norm)  # triton vs the float64 oracle
    assert_all_finite(out_r, grads_r, "float64 oracle")
    for impl in IMPLS:  # each implementation in the dtype itself
        out, grads = run(impl, A, D, q, make_params(HYBRID, True, device=A.device), norm=norm)
        assert_all_finite(out, grads, impl)
        assert torch.count_nonzero(grads["scores"][1]) == 0, impl  # the masked sample's scores do nothing
        assert grads["scores"][0].abs().max() > 0 and grads["scores"][2].abs().max() > 0, impl
        assert torch.count_nonzero(grads["scores"][2, ::3]) == 0, impl  # masked entries of the mixed sample


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values", [HYBRID, (0.3, 0.5, 0.1, 0.4, 0.0), (0.0, 1.0, 0.0, 0.7, 0.0)],
                         ids=["hybrid", "final_write", "reweight_only"])
def test_masked_sample_inference_paths(values, dtype):
    """No autograd and float parameters: the kernels' shortcut paths (one fused
    output write when nu == 0; no transfer when gamma == 0)."""
    A, D, q = masked_inputs(dtype, seed=2)
    with torch.no_grad():
        fast = eos_reduce(A, D, q, *values, impl="triton")
        ref = eos_reduce(A, D, q, *values, impl="torch")
    assert torch.isfinite(fast).all() and torch.isfinite(ref).all()
    # the reference computes in fp32 and rounds once, as the kernels do: at most an ulp of
    # the dtype apart (fp32: the kernels' other summation order, < 1e-6 relative here)
    rtol = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    torch.testing.assert_close(fast.float(), ref.float(), rtol=rtol, atol=rtol * ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["token", "frobenius"])
def test_rho_positive_masked_sample_gets_no_reweighting(impl, dtype, norm):
    """The documented semantics: s_imp = 0, so A^ = A~ for a fully masked sample,
    whatever rho is; the samples beside it are untouched."""
    A, D, q = masked_inputs(dtype, seed=3)
    values = dict(zip(PARAM_NAMES, HYBRID))
    with_rho = eos_reduce(A, D, q, **values, norm=norm, impl=impl)
    without_rho = eos_reduce(A, D, q, **{**values, "rho": 0.0}, norm=norm, impl=impl)
    assert torch.equal(with_rho[1], without_rho[1])
    assert not torch.equal(with_rho[0], without_rho[0])  # rho does act on a normal sample
    # the normal sample does not depend on its neighbour being masked
    q_unmasked = q.clone()
    q_unmasked[1] = torch.randn(q.shape[1], generator=torch.Generator().manual_seed(4)).to(q)
    beside = eos_reduce(A, D, q_unmasked, **values, norm=norm, impl=impl)
    assert torch.equal(beside[0], with_rho[0]) and torch.equal(beside[2], with_rho[2])
    assert not torch.equal(beside[1], with_rho[1])


def _scores_variants(B, M):
    g = torch.Generator().manual_seed(5)
    mixed = torch.randn(B, M, generator=g)
    mixed[:, 1::2] = NEG_INF
    return {
        "randn": torch.randn(B, M, generator=g),
        "large": 1e4 * torch.randn(B, M, generator=g),
        "zeros": torch.zeros(B, M),
        "all_masked": torch.full((B, M), NEG_INF),
        "mixed_masked": mixed,
        "fp16": torch.randn(B, M, generator=g).half(),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("as_tensors", [False, True], ids=["floats", "tensors"])
def test_rho_zero_scores_do_not_matter(impl, dtype, as_tensors):
    """rho = 0: output and the gradients of anchors, candidates, gamma, tau, theta
    and nu are bit-identical whatever the scores (finite or -inf); d/dscores is 0."""
    A, D, _ = make_inputs(2, 5, 21, 24, dtype=dtype, seed=4)
    values = (0.3, 0.5, 0.1, 0.0, 0.6)
    results = {}
    for name, q in _scores_variants(2, 21).items():
        out, grads = run(impl, A, D, q.to(A.device), make_params(values, as_tensors, device=A.device))
        assert torch.count_nonzero(grads.pop("scores")) == 0, name
        grads.pop("rho", None)  # d/drho = sum_j e_j s_j legitimately depends on the scores
        results[name] = (out, grads)
    out0, grads0 = results.pop("randn")
    for name, (out, grads) in results.items():
        assert torch.equal(out, out0), name
        for g in grads0:
            assert torch.equal(grads[g], grads0[g]), (name, g)


@pytest.mark.parametrize("impl", IMPLS)
def test_partly_masked_scores_work_as_before(impl):
    """-inf scores beside finite ones: exactly what a finite score far below the
    others gives (weight exp(-1e4 - max) = 0 in fp32, supported all along)."""
    A, D, q = make_inputs(*SHAPE, seed=6)
    q_inf = q.clone()
    q_inf[:, 1::3] = NEG_INF
    q_inf[1, :-1] = NEG_INF  # one finite score left
    q_fin = torch.where(torch.isneginf(q_inf), torch.full_like(q, -1e4), q_inf)
    params = make_params(HYBRID, True, device=A.device)
    out_inf, grads_inf = run(impl, A, D, q_inf, params)
    out_fin, grads_fin = run(impl, A, D, q_fin, params)
    assert torch.equal(out_inf, out_fin)
    for name in grads_fin:
        assert torch.equal(grads_inf[name], grads_fin[name]), name


def test_masked_softmax_is_torch_softmax_on_rows_with_a_finite_score():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(4, 11, generator=g, dtype=torch.float64)
    q[1, :5] = NEG_INF
    q[2] = NEG_INF
    u = masked_softmax(q)
    rows = [0, 1, 3]
    assert torch.equal(u[rows], torch.softmax(q[rows], dim=-1))
    assert torch.equal(u[2], torch.zeros(11, dtype=torch.float64))
    q.requires_grad_(True)
    (grad,) = torch.autograd.grad((masked_softmax(q) * torch.randn(4, 11, generator=g)).sum(), q)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad[2]) == 0


# ----------------------------------------------------------------------------- parameter values
_BAD_VALUES = [math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("value", _BAD_VALUES, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", PARAM_NAMES)
def test_non_finite_parameter_is_a_value_error(name, value, as_tensor, impl):
    A, D, q = make_inputs(2, 3, 4, 8)
    args = dict(zip(PARAM_NAMES, HYBRID))
    args[name] = torch.tensor(value, device=A.device, requires_grad=True) if as_tensor else value
    with pytest.raises(ValueError, match=rf"^{name} must be .*finite, got (-?inf|nan)$"):
        eos_reduce(A, D, q, **args, impl=impl)


@pytest.mark.parametrize("value", [0.0, -1.0, -0.0], ids=["zero", "negative", "neg_zero"])
def test_non_positive_tau_tensor_still_a_value_error(value):
    A, D, q = make_inputs(2, 3, 4, 8)
    args = dict(zip(PARAM_NAMES, HYBRID), tau=torch.tensor(value, device=A.device, requires_grad=True))
    with pytest.raises(ValueError, match="tau must be > 0"):
        eos_reduce(A, D, q, **args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [math.inf, -math.inf, math.nan, 0.0, -1.0], ids=["inf", "-inf", "nan", "0", "-1"])
def test_bad_beta_is_a_value_error(beta, impl):
    A, D, q = make_inputs(2, 3, 4, 8)
    with pytest.raises(ValueError, match=r"^beta must be > 0 and finite, got "):
        eos_reduce(A, D, q, *HYBRID, beta=beta, impl=impl)


# finite values outside the accepted ranges: gamma or rho 1e19 gave NaN on the Triton path while the
# reference stayed finite (the kernels square gamma T and the rho-scaled anchor norms in fp32), rho 1e3
# an output 7e-5 off at nu = 1 (their norm blend cancels), tau <= 1e-20 a NaN d/dtau from the fp32
# reference (its 1 / tau**2 underflows)
_OUT_OF_RANGE = [
    ("gamma", 1e19, r"gamma must be in \[0, 1\] and finite"),
    ("gamma", 1.5, r"gamma must be in \[0, 1\] and finite"),
    ("gamma", -0.25, r"gamma must be in \[0, 1\] and finite"),
    ("nu", 2.0, r"nu must be in \[0, 1\] and finite"),
    ("nu", -0.5, r"nu must be in \[0, 1\] and finite"),
    ("rho", 1e19, r"rho must be in \[0, 10\] and finite"),
    ("rho", 1e3, r"rho must be in \[0, 10\] and finite"),
    ("rho", -0.5, r"rho must be in \[0, 10\] and finite"),
    ("tau", 1e-20, r"tau must be > 0 \(at least 2\*\*-40 = 9.1e-13\) and finite"),
    ("tau", 1e-45, r"tau must be > 0 \(at least 2\*\*-40 = 9.1e-13\) and finite"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("name, value, pattern", _OUT_OF_RANGE,
                         ids=[f"{n}={v:g}" for n, v, _ in _OUT_OF_RANGE])
def test_out_of_range_parameter_is_a_value_error(name, value, pattern, as_tensor, impl):
    A, D, q = make_inputs(2, 3, 4, 8)
    args = dict(zip(PARAM_NAMES, HYBRID))
    args[name] = torch.tensor(value, device=A.device, requires_grad=True) if as_tensor else value
    with pytest.raises(ValueError, match=rf"^{pattern}, got -?\d"):
        eos_reduce(A, D, q, **args, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_beta_above_float32_range_is_a_value_error(impl):
    A, D, q = make_inputs(2, 3, 4, 8)
    with pytest.raises(ValueError, match=r"^beta must be at most float32's largest value 3.40282"):
        eos_reduce(A, D, q, *HYBRID, beta=1e39, impl=impl)  # inf in fp32: NaN gradients on both paths


# beta (smax - theta) overflows float32 to +-inf on purpose: the gate saturates to exactly 0 or 1
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["token", "frobenius"])
@pytest.mark.parametrize("values, beta", [
    ((1.0, TAU_MIN, 1e30, RHO_MAX, 1.0), 10.0),     # every bound at once
    ((0.0, 1e30, -1e30, 0.0, 0.0), BETA_MAX),       # the other ends; theta far beyond the gate's saturation
    ((0.5, 1e-4, -3e38, 1.5, 0.5), BETA_MAX),
], ids=["upper-gamma-rho-nu-lowest-tau", "lower-gamma-rho-nu-beta-max", "theta-near-float32-max"])
def test_triton_matches_reference_at_the_range_bounds(values, beta, norm, dtype):
    """At the edges of the accepted ranges the fused kernels agree with the float64 oracle and are
    finite, output and every gradient (the bounds are where that stops being true for gamma, rho, tau)."""
    A, D, q = make_inputs(2, 5, 13, 24, dtype=dtype, seed=3, clustered=True)
    out, grads = compare(A, D, q, values, dtype, norm=norm, beta=beta)
    assert_all_finite(out, grads, "float64 oracle")


def test_parameter_checks_keep_autograd_of_tensor_parameters():
    """The value checks read detached copies: valid tensor parameters (leaves and
    non-leaves) keep their graph and get the gradients of the unchecked maths."""
    A, D, q = make_inputs(2, 3, 4, 8)
    base = [torch.tensor(v, dtype=torch.float64, device=A.device, requires_grad=True) for v in HYBRID]
    params = [p * 1.0 for p in base]  # non-leaf tensors, as produced by a learnable schedule
    out = eos_reduce(A, D, q, *params, impl="torch")
    grads = torch.autograd.grad(out.sum(), base)
    from eos_kernels.reference import eos_reduce_reference
    expected = torch.autograd.grad(eos_reduce_reference(A, D, q, *(p * 1.0 for p in base)).sum(), base)
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)


# ----------------------------------------------------------------------------- higher-order gradients
def _leaves(A, D, q, values):
    return ([t.detach().clone().requires_grad_(True) for t in (A, D, q)],
            [torch.tensor(v, device=A.device, requires_grad=True) for v in values])


@pytest.mark.parametrize("wrt", ["anchors", "candidates", "scores", "rho"])
def test_triton_double_backward_is_a_clear_error(wrt):
    """create_graph=True: first-order gradients as without it, carrying a graph;
    differentiating them again raises an error that names the way out. The
    incoming gradient is a constant here (out.square().sum() w.r.t. one input),
    the case ``@once_differentiable`` alone would let through silently."""
    A, D, q = make_inputs(2, 5, 9, 16)
    (leaves, params) = _leaves(A, D, q, HYBRID)
    target = dict(zip(("anchors", "candidates", "scores"), leaves), rho=params[3])[wrt]
    out = eos_reduce(*leaves, *params, impl="triton")
    (plain,) = torch.autograd.grad(out.square().sum(), target, retain_graph=True)
    (g,) = torch.autograd.grad(out.square().sum(), target, create_graph=True)
    assert torch.equal(g, plain) and g.requires_grad
    clear = r"eos_reduce\(impl='triton'\) is differentiable once.*Use eos_reduce\(\.\.\., impl='torch'\)"
    with pytest.raises(RuntimeError, match=clear):
        torch.autograd.grad(g.square().sum(), leaves + params, allow_unused=True)


def test_triton_double_backward_through_backward_call_is_a_clear_error():
    A, D, q = make_inputs(2, 5, 9, 16)
    (leaves, params) = _leaves(A, D, q, HYBRID)
    out = eos_reduce(*leaves, *params, impl="triton")
    (g,) = torch.autograd.grad(out.sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        g.norm().backward()


def test_reference_supports_double_backward():
    """The path the error message points to: impl='torch' differentiates twice (fp64 gradgradcheck)."""
    from torch.autograd import gradgradcheck

    g = torch.Generator().manual_seed(8)
    A = torch.randn(1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    D = torch.randn(1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 4, generator=g, dtype=torch.float64)
    q[0, 1] = NEG_INF  # the masked softmax is twice differentiable too
    ps = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in HYBRID]
    assert gradgradcheck(lambda a, d, *p: eos_reduce(a, d, q, *p, impl="torch"), (A, D, *ps))


def test_triton_backward_twice_with_retain_graph():
    """retain_graph=True keeps the fused backward's saved state for a second backward."""
    A, D, q = make_inputs(2, 5, 9, 16)
    (leaves, params) = _leaves(A, D, q, HYBRID)
    out = eos_reduce(*leaves, *params, impl="triton")
    first = torch.autograd.grad(out.sum(), leaves + params, retain_graph=True)
    second = torch.autograd.grad(out.sum(), leaves + params)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out.sum(), leaves[0])
