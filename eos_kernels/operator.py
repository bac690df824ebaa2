"""The public entry point of the unified reduction operator: validation and dispatch."""
from __future__ import annotations

import math

import torch

from eos_kernels._checks import BETA_MAX, RHO_MAX, TAU_MIN, is_real
from eos_kernels._dispatch import resolve_impl
from eos_kernels.reference import eos_reduce_reference

NORM_MODES = ("token", "frobenius")
PARAM_NAMES = ("gamma", "tau", "theta", "rho", "nu")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: closed range (low, high) of each parameter, None for no bound; every value must also be finite.
#: gamma and nu are the paper's [0, 1] (a transfer gate, a blend weight); rho >= 0 up to RHO_MAX and
#: tau >= TAU_MIN > 0 keep both implementations finite and in agreement in float32 (eos_kernels._checks)
PARAM_RANGES = {"gamma": (0.0, 1.0), "tau": (TAU_MIN, None), "theta": (None, None), "rho": (0.0, RHO_MAX),
                "nu": (0.0, 1.0)}


def _value_error(name, value):
    if name == "tau":  # W = softmax(S / tau)
        need = f"> 0 (at least 2**-40 = {TAU_MIN:.2g}) and finite"
    elif name == "theta":
        need = "finite"
    else:
        low, high = PARAM_RANGES[name]
        need = f"in [{low:g}, {high:g}] and finite"
    return ValueError(f"{name} must be {need}, got {value!r}")


def _in_range(name, value):
    """``value`` (a float, or a tensor compared elementwise) within ``PARAM_RANGES[name]`` and finite."""
    low, high = PARAM_RANGES[name]
    ok = torch.isfinite(value) if torch.is_tensor(value) else math.isfinite(value)
    if low is not None:
        ok = ok & (value >= low)
    if high is not None:
        ok = ok & (value <= high)
    return ok


def _check_param(name, value, device):
    if not (is_real(value) or torch.is_tensor(value)):
        raise TypeError(f"{name} must be a Python float or a 0-d floating tensor, got {type(value).__name__}")
    if torch.is_tensor(value):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return value if value.device == device else value.to(device)
    value = float(value)
    if not _in_range(name, value):
        raise _value_error(name, value)
    return value


def _check_tensor_params(params):
    """Tensor parameters in their ``PARAM_RANGES`` or a ValueError naming the first bad one.

    One host read for all of them together (the tau > 0 check of a tensor tau
    always needed one); the flags are computed on detached values, so the
    autograd graph of the parameters is untouched. Compared in float32 (float64
    stays float64), which holds every bound exactly: in float16 TAU_MIN would be
    0 and RHO_MAX inf.
    """
    named = [(n, p.detach()) for n, p in zip(PARAM_NAMES, params) if torch.is_tensor(p)]
    if not named:
        return
    flags = torch.stack([_in_range(n, p if p.dtype == torch.float64 else p.float()) for n, p in named])
    for (name, p), ok in zip(named, flags.tolist()):
        if not ok:
            raise _value_error(name, p.item())


def _check_inputs(anchors, candidates, scores):
    for name, t in (("anchors", anchors), ("candidates", candidates), ("scores", scores)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if anchors.dim() not in (2, 3):
        raise ValueError(f"anchors must be [B, K, d] or [K, d], got shape {tuple(anchors.shape)}")
    if candidates.dim() != anchors.dim():
        raise ValueError(
            f"candidates must have the same rank as anchors ({anchors.dim()}), got shape {tuple(candidates.shape)}"
        )
    if scores.dim() != anchors.dim() - 1:
        raise ValueError(
            f"scores must have rank {anchors.dim() - 1} ([B, M] or [M]), got shape {tuple(scores.shape)}"
        )
    if candidates.dtype != anchors.dtype:
        raise TypeError(f"candidates dtype {candidates.dtype} does not match anchors dtype {anchors.dtype}")
    for name, t in (("candidates", candidates), ("scores", scores)):
        if t.device != anchors.device:
            raise ValueError(f"{name} is on {t.device} but anchors are on {anchors.device}")
    if candidates.shape[-1] != anchors.shape[-1]:
        raise ValueError(
            f"candidates feature size {candidates.shape[-1]} does not match anchors feature size {anchors.shape[-1]}"
        )
    if anchors.dim() == 3 and candidates.shape[0] != anchors.shape[0]:
        raise ValueError(f"candidates batch {candidates.shape[0]} does not match anchors batch {anchors.shape[0]}")
    if tuple(scores.shape) != tuple(candidates.shape[:-1]):
        raise ValueError(
            f"scores must have shape {tuple(candidates.shape[:-1])} (one per candidate), got {tuple(scores.shape)}"
        )
    if anchors.shape[-2] == 0:
        raise ValueError("anchors must hold at least one token (K >= 1)")
    if anchors.shape[-1] == 0:
        raise ValueError("anchors must have a non-empty feature dimension (d >= 1)")


def eos_reduce(anchors, candidates, scores, gamma, tau, theta, rho, nu,
               *, beta=10.0, norm="token", impl="auto"):
    """Reduce ``candidates`` into ``anchors`` with the unified EOS operator.

    Per sample (DESIGN.md §2; paper eqs. 2-7, executed code of appendix B)::

        S = normalize(D) normalize(A)^T;  W = softmax_anchors(S / tau)
        m = sigmoid(beta (max_j S - theta));  A~ = A + gamma W^T (D * m)
        A^ = A~ * (1 + rho softmax_anchors(S)^T softmax(scores))
        out = (1 - nu) A^ + nu r A^

    Args:
        anchors: [B, K, d] or [K, d] kept tokens (K >= 1).
        candidates: [B, M, d] or [M, d] tokens being reduced (M may be 0);
            same dtype and device as ``anchors``.
        scores: [B, M] or [M] importance of each candidate (any floating dtype),
            finite or -inf; -inf masks a candidate out of softmax(scores) (see
            "Masked samples" below). +inf and NaN scores are not supported.
        gamma, tau, theta, rho, nu: operator parameters, Python floats or 0-d
            floating tensors (which may require grad), all finite: ``gamma``
            and ``nu`` in [0, 1] (the paper's transfer gate and blend weight);
            ``rho`` in [0, 10] (the paper's search keeps it in [0, 1], its
            reweight corner uses 1.5); ``tau`` >= 2**-40 (~9.1e-13; > 0 in the
            paper, the corners use 1e-4 and 1e6); ``theta`` any finite value
            (the corners use -1e9). The bounds on ``rho`` and ``tau`` keep the
            two implementations, which work in float32, finite and in
            agreement (``eos_kernels._checks``). Tensor values are checked
            with one host read (a device sync).
        beta: gate sharpness, a finite Python float > 0, at most float32's
            largest value (3.4e38).
        norm: "token" (per-token ratio r_j = ||a_j|| / max(||A^_j||, 1e-6),
            the default) or "frobenius" (r = ||A||_F / (||A^||_F + 1e-6) per
            sample, equation 6).
        impl: "auto" (fused Triton kernels for CUDA tensors, the PyTorch
            reference otherwise), "triton" (the kernels; on CPU only under
            ``TRITON_INTERPRET=1``) or "torch" (the reference).

    Returns:
        Tensor of the anchors' shape and dtype. Gradients flow to anchors,
        candidates, scores and every tensor parameter on both paths.

    Raises:
        ValueError naming the parameter when gamma, tau, theta, rho, nu or
        beta is not finite or outside its range above (TypeError for a wrong
        type); see also the shape, dtype and device checks.

    Masked samples:
        A sample whose scores are all -inf (every candidate masked) has no
        finite score to take softmax(scores) over. Its softmax is defined as
        the zero vector (an empty set of candidates gives no importance), so
        its s_imp = 0 and A^ = A~: it gets the transfer (gamma, tau, theta)
        and the norm blend (nu) but no reweighting, whatever rho is; the
        gradient with respect to its scores is 0. Output and gradients are
        finite on both paths. With rho = 0 the scores never matter: the output
        is bit-identical whatever the (finite or -inf) scores. A sample with
        some finite scores gives -inf candidates softmax weight 0, as usual.

    Higher-order gradients:
        ``impl="torch"`` is differentiable any number of times. The fused
        Triton backward is first order only: gradients taken with
        ``create_graph=True`` are correct, but differentiating them again
        raises a RuntimeError that says to use ``impl="torch"``.
    """
    _check_inputs(anchors, candidates, scores)
    device = anchors.device
    params = [_check_param(n, v, device) for n, v in zip(PARAM_NAMES, (gamma, tau, theta, rho, nu))]
    _check_tensor_params(params)
    if not is_real(beta):
        raise TypeError(f"beta must be a Python float, got {type(beta).__name__}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be > 0 and finite, got {beta!r}")
    if beta > BETA_MAX:
        raise ValueError(f"beta must be at most float32's largest value {BETA_MAX!r} (the kernels, and the "
                         f"reference for float32/16 inputs, compute the gate in float32), got {beta!r}")
    if not isinstance(norm, str) or norm not in NORM_MODES:
        raise ValueError(f"norm must be one of {NORM_MODES}, got {norm!r}")
    impl = resolve_impl(impl, device)

    unbatched = anchors.dim() == 2
    if unbatched:
        anchors, candidates, scores = anchors[None], candidates[None], scores[None]

    if impl == "triton":
        if anchors.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"impl='triton' supports float32, float16 and bfloat16 anchors, got {anchors.dtype}; "
                "use impl='torch' for other dtypes"
            )
        from eos_kernels.triton.reduce import eos_reduce_triton

        out = eos_reduce_triton(anchors, candidates, scores, *params, beta=float(beta), norm=norm)
    else:
        out = eos_reduce_reference(anchors, candidates, scores, *params, beta=float(beta), norm=norm)
    return out[0] if unbatched else out
