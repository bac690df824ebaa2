"""The EOS search space Θ (paper §2.3–§2.6, equations 10–13) as an ``nn.Module``.

For every decoder layer ``l`` the module holds seven unconstrained parameters
(each an ``nn.Parameter`` of shape ``[num_layers]``) and maps them to their
ranges with equation 10::

    g_l     = σ(w_g[l] · T_g)          gate: is layer l a reducer
    c_l     = σ(w_c[l] · T_c)          fraction of the incoming visual tokens discarded
    γ_l     = σ(w_gamma[l])
    τ_l     = softplus(w_tau[l]) + ε
    θ_l     = 2 σ(w_theta[l]) − 1
    ρ_l     = σ(w_rho[l]),   ν_l = σ(w_nu[l])

Discrete kept count (equation 11): ``K_l = max(K_min, floor((1 − g_l c_l) N_l))``,
capped at ``N_l``. Expected token chain (§2.5): ``N̄_0 = N_0``,
``N̄_{l+1} = (1 − g_l c_l) N̄_l``. Penalties (equation 13, one-sided):
``[N̄_L / B − 1]_+²`` and ``[Σ_l g_l − C]_+²``. Straight-through keep
probability (equation 12): ``σ(α (q_i − sg(q_(K)))) · (1 − g c) / (1 − sg(g c))``.

Initialisation (table 5 and the warm start of §2.6)
---------------------------------------------------
- Gates: layers in ``init_layers`` (default {2, 6, 15}) start active at
  ``g = init_gate`` (0.95), all others inactive at ``g = off_gate`` (0.01).
- Discard: ``c = init_discard`` (0.5; one value, or one per init layer) at the
  active slots, ``c = off_discard`` (0.5) elsewhere, so that a layer the search
  switches on starts from a moderate discard.
- Operator: γ0 = 0.5, τ0 = 0.5, θ0 = 0, ρ0 = 0, ν0 = 0 at every layer (table 5).
- Every initial value is mapped back through the exact inverse transform
  (``w_g = logit(g0) / T_g``, ``w_tau = softplus⁻¹(τ0 − ε)``, ``w_theta =
  logit((θ0 + 1) / 2)``, ...), computed in float64. A sigmoid never reaches 0
  or 1, so values on the boundary of [0, 1] (ρ0 = ν0 = 0 in table 5) are first
  moved ``init_margin`` (1e-3) inside: ρ and ν start at 0.001, not 0, and
  still receive gradient. Likewise θ0 = ±1 starts ``2·init_margin`` inside.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._checks import BETA_MAX, TAU_MIN, check_int, check_real, is_real
from .theta import Reducer, Theta

__all__ = ["SearchSpace"]

_PARAM_NAMES = ("w_g", "w_c", "w_gamma", "w_tau", "w_theta", "w_rho", "w_nu")
_NORMS = ("token", "frobenius")


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _sharpen(g: Tensor, sharpness: float) -> Tensor:
    """σ(logit(g) / λ) (see :func:`eos_kernels.search.relaxed.sharpen_gates`)."""
    g = g.clamp(1e-12, 1 - 1e-12)
    return torch.sigmoid((torch.log(g) - torch.log1p(-g)) / sharpness)


def _softplus_inv(y: float) -> float:
    # log(exp(y) - 1), stable for small and large y
    return y + math.log(-math.expm1(-y))


class SearchSpace(nn.Module):
    """Learnable EOS search space over ``num_layers`` decoder layers.

    Args:
        num_layers: decoder layers L (32 for LLaVA-1.5-7B).
        num_visual_tokens: visual tokens N_0 entering the first layer (576).
        init_layers: layers whose gates start active (table 5: {2, 6, 15}).
        gate_temperature: T_g of equation 10 (> 0).
        keep_temperature: T_c of equation 10 (> 0).
        gamma0, tau0, theta0, rho0, nu0: initial operator values at every layer
            (table 5: 0.5, 0.5, 0, 0, 0). gamma0, rho0, nu0 in [0, 1];
            tau0 > eps; theta0 in [-1, 1].
        init_gate: initial g at ``init_layers``, in (0, 1).
        init_discard: initial c at ``init_layers``: one value in (0, 1) or one
            per init layer.
        off_gate: initial g elsewhere, in (0, 1).
        off_discard: initial c elsewhere, in (0, 1).
        k_min: K_min of equation 11 (int >= 1).
        eps: ε of equation 10 (> 0 in the paper; at least 2**-40 ~ 9.1e-13,
            the smallest τ :func:`eos_kernels.eos_reduce` accepts).
        beta: operator gate sharpness β carried into :meth:`export` (> 0, at
            most float32's largest value).
        alpha: boundary sharpness α of equation 12 (> 0), in units of
            1 / score: with attention-probability scores (~1/N) use a large α
            or pass log-scores.
        norm: ``"token"`` or ``"frobenius"`` (carried into :meth:`export`).
        init_margin: how far boundary initial values are moved inside (0, 1)
            before the inverse sigmoid (see the module docstring).

    Parameters: ``w_g, w_c, w_gamma, w_tau, w_theta, w_rho, w_nu``, each
    ``[num_layers]`` float32.
    """

    def __init__(
        self,
        num_layers: int,
        num_visual_tokens: int,
        *,
        init_layers: Sequence[int] = (2, 6, 15),
        gate_temperature: float = 1.0,
        keep_temperature: float = 1.0,
        gamma0: float = 0.5,
        tau0: float = 0.5,
        theta0: float = 0.0,
        rho0: float = 0.0,
        nu0: float = 0.0,
        init_gate: float = 0.95,
        init_discard: float | Sequence[float] = 0.5,
        off_gate: float = 0.01,
        off_discard: float = 0.5,
        k_min: int = 1,
        eps: float = 1e-4,
        beta: float = 10.0,
        alpha: float = 10.0,
        norm: str = "token",
        init_margin: float = 1e-3,
    ):
        super().__init__()
        L = check_int("num_layers", num_layers, 1)
        self.num_layers = L
        self.num_visual_tokens = check_int("num_visual_tokens", num_visual_tokens, 1)
        if isinstance(init_layers, (str, bytes)) or not isinstance(init_layers, Sequence):
            raise TypeError(f"init_layers must be a sequence of ints, got {type(init_layers).__name__}")
        layers = [check_int(f"init_layers[{i}]", x, 0) for i, x in enumerate(init_layers)]
        for i, x in enumerate(layers):
            if x >= L:
                raise ValueError(f"init_layers[{i}] = {x} is not a layer of a {L}-layer model (valid: 0..{L - 1})")
        if len(set(layers)) != len(layers):
            raise ValueError(f"init_layers must not repeat a layer, got {list(init_layers)}")
        self.init_layers = tuple(layers)
        self.gate_temperature = check_real("gate_temperature", gate_temperature, low=0.0, low_open=True)
        self.keep_temperature = check_real("keep_temperature", keep_temperature, low=0.0, low_open=True)
        # eos_reduce's float32 limits: tau = softplus + eps >= eps must stay >= TAU_MIN
        self.eps = check_real("eps", eps, low=TAU_MIN)
        self.beta = check_real("beta", beta, low=0.0, high=BETA_MAX, low_open=True)
        self.alpha = check_real("alpha", alpha, low=0.0, low_open=True)
        self.k_min = check_int("k_min", k_min, 1)
        if not isinstance(norm, str) or norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        self.norm = norm
        m = check_real("init_margin", init_margin, low=0.0, high=0.5, low_open=True, high_open=True)
        self.init_margin = m

        gamma0 = check_real("gamma0", gamma0, low=0.0, high=1.0)
        tau0 = check_real("tau0", tau0, low=self.eps, low_open=True)
        theta0 = check_real("theta0", theta0, low=-1.0, high=1.0)
        rho0 = check_real("rho0", rho0, low=0.0, high=1.0)
        nu0 = check_real("nu0", nu0, low=0.0, high=1.0)
        init_gate = check_real("init_gate", init_gate, low=0.0, high=1.0, low_open=True, high_open=True)
        off_gate = check_real("off_gate", off_gate, low=0.0, high=1.0, low_open=True, high_open=True)
        off_discard = check_real("off_discard", off_discard, low=0.0, high=1.0, low_open=True, high_open=True)
        if is_real(init_discard):
            discards = [init_discard] * len(layers)
        elif isinstance(init_discard, Sequence) and not isinstance(init_discard, (str, bytes)):
            discards = list(init_discard)
            if len(discards) != len(layers):
                raise ValueError(
                    f"init_discard must be one value or one per init layer ({len(layers)}), got {len(discards)}"
                )
        else:
            raise TypeError(f"init_discard must be a float or a sequence of floats, got {type(init_discard).__name__}")
        discards = [check_real(f"init_discard[{i}]" if not is_real(init_discard) else "init_discard", c,
                              low=0.0, high=1.0, low_open=True, high_open=True) for i, c in enumerate(discards)]

        def unit_logit(p: float) -> float:
            return _logit(min(max(p, m), 1.0 - m))

        w_g = [_logit(off_gate) / self.gate_temperature] * L
        w_c = [_logit(off_discard) / self.keep_temperature] * L
        for layer, c in zip(layers, discards):
            w_g[layer] = _logit(init_gate) / self.gate_temperature
            w_c[layer] = _logit(c) / self.keep_temperature

        def full(value: float) -> nn.Parameter:
            return nn.Parameter(torch.full((L,), value, dtype=torch.float64).float())

        self.w_g = nn.Parameter(torch.tensor(w_g, dtype=torch.float64).float())
        self.w_c = nn.Parameter(torch.tensor(w_c, dtype=torch.float64).float())
        self.w_gamma = full(unit_logit(gamma0))
        self.w_tau = full(_softplus_inv(tau0 - self.eps))
        self.w_theta = full(unit_logit((theta0 + 1.0) / 2.0))
        self.w_rho = full(unit_logit(rho0))
        self.w_nu = full(unit_logit(nu0))

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_visual_tokens={self.num_visual_tokens}, "
                f"init_layers={self.init_layers}, T_g={self.gate_temperature}, T_c={self.keep_temperature}, "
                f"k_min={self.k_min}, eps={self.eps}, alpha={self.alpha}, beta={self.beta}, norm={self.norm!r}")

    # ---- equation 10
    def gates(self) -> Tensor:
        """g = σ(w_g · T_g), shape [num_layers]."""
        return torch.sigmoid(self.w_g * self.gate_temperature)

    def discard(self) -> Tensor:
        """c = σ(w_c · T_c), shape [num_layers]: fraction of incoming tokens discarded."""
        return torch.sigmoid(self.w_c * self.keep_temperature)

    def gamma(self) -> Tensor:
        """γ = σ(w_gamma), shape [num_layers]."""
        return torch.sigmoid(self.w_gamma)

    def tau(self) -> Tensor:
        """τ = softplus(w_tau) + ε, shape [num_layers]."""
        return F.softplus(self.w_tau) + self.eps

    def theta(self) -> Tensor:
        """θ = 2σ(w_theta) − 1, shape [num_layers]."""
        return 2.0 * torch.sigmoid(self.w_theta) - 1.0

    def rho(self) -> Tensor:
        """ρ = σ(w_rho), shape [num_layers]."""
        return torch.sigmoid(self.w_rho)

    def nu(self) -> Tensor:
        """ν = σ(w_nu), shape [num_layers]."""
        return torch.sigmoid(self.w_nu)

    def constrained_values(self) -> dict[str, Tensor]:
        """All constrained values: ``g, c, gamma, tau, theta, rho, nu``, each [num_layers]."""
        return {"g": self.gates(), "c": self.discard(), "gamma": self.gamma(), "tau": self.tau(),
                "theta": self.theta(), "rho": self.rho(), "nu": self.nu()}

    def _layer(self, layer: Any) -> int:
        layer = check_int("layer", layer, 0)
        if layer >= self.num_layers:
            raise ValueError(f"layer must be in 0..{self.num_layers - 1}, got {layer}")
        return layer

    def operator_params(self, layer: int) -> dict[str, Tensor]:
        """Differentiable 0-d tensors ``gamma, tau, theta, rho, nu`` of ``layer``,
        ready for ``eos_reduce(..., **params, beta=self.beta, norm=self.norm)``."""
        layer = self._layer(layer)
        return {"gamma": self.gamma()[layer], "tau": self.tau()[layer], "theta": self.theta()[layer],
                "rho": self.rho()[layer], "nu": self.nu()[layer]}

    # ---- equation 11 and the expected chain
    def kept_count(self, layer: int, incoming: int) -> int:
        """Equation 11: ``min(incoming, max(K_min, floor((1 − g_l c_l) · incoming)))`` (no grad).

        The product is taken in float64 from the current g and c."""
        layer = self._layer(layer)
        incoming = check_int("incoming", incoming, 0)
        with torch.no_grad():
            gc = float(self.gates()[layer].double() * self.discard()[layer].double())
        return min(incoming, max(self.k_min, math.floor((1.0 - gc) * incoming)))

    def expected_tokens(self) -> Tensor:
        """N̄ chain of §2.5, shape [num_layers + 1]: N̄_0 = N_0, N̄_{l+1} = (1 − g_l c_l) N̄_l."""
        keep = 1.0 - self.gates() * self.discard()
        ones = torch.ones(1, dtype=keep.dtype, device=keep.device)
        return self.num_visual_tokens * torch.cat([ones, torch.cumprod(keep, 0)])

    # ---- equation 13
    def budget_penalty(self, budget: float, *, weight: float = 1.0, tokens: Tensor | None = None) -> Tensor:
        """``weight · [N / budget − 1]_+²`` with N = ``tokens`` if given, else N̄_L.

        Zero whenever N <= budget (one-sided)."""
        budget = check_real("budget", budget, low=0.0, low_open=True)
        weight = check_real("weight", weight, low=0.0)
        if tokens is None:
            tokens = self.expected_tokens()[-1]
        elif not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a Tensor or None, got {type(tokens).__name__}")
        return weight * torch.relu(tokens / budget - 1.0) ** 2

    def layer_penalty(self, max_reducers: float, *, weight: float = 1.0) -> Tensor:
        """``weight · [Σ_l g_l − max_reducers]_+²``; zero whenever Σ g <= max_reducers."""
        c = check_real("max_reducers", max_reducers, low=0.0)
        weight = check_real("weight", weight, low=0.0)
        return weight * torch.relu(self.gates().sum() - c) ** 2

    # ---- equation 12
    def keep_probability(self, scores: Tensor, layer: int, k: int, *, alpha: float | None = None) -> Tensor:
        """Straight-through keep probability of equation 12.

        ``p_i = σ(α (q_i − sg(q_(k)))) · (1 − g c) / (1 − sg(g c))`` with
        ``q_(k)`` the k-th largest score along the last dimension (per row).
        The second factor is computed as ``1 + (u − sg(u)) / sg(u)``,
        ``u = 1 − g_l c_l``: its forward value is exactly 1 and its gradient is
        that of equation 12, so gradient reaches ``w_g[layer]`` and
        ``w_c[layer]`` without changing the forward value.

        Args:
            scores: importance, [..., N] floating point (not detached: the
                first factor passes gradient to the scores).
            layer: the reducer's layer.
            k: kept count K_l, 1 <= k <= N.
            alpha: overrides the module's α.

        Returns:
            Tensor of the shape of ``scores``.
        """
        if not isinstance(scores, Tensor):
            raise TypeError(f"scores must be a Tensor, got {type(scores).__name__}")
        if scores.dim() < 1 or not scores.is_floating_point():
            raise ValueError(f"scores must be a floating-point tensor with at least 1 dim, got "
                             f"shape {tuple(scores.shape)} dtype {scores.dtype}")
        layer = self._layer(layer)
        n = scores.shape[-1]
        k = check_int("k", k, 1)
        if k > n:
            raise ValueError(f"k must be <= the number of scores ({n}), got {k}")
        a = self.alpha if alpha is None else check_real("alpha", alpha, low=0.0, low_open=True)
        q_k = torch.topk(scores.detach(), k, dim=-1).values[..., k - 1:k]
        soft = torch.sigmoid(a * (scores - q_k))
        u = 1.0 - self.gates()[layer] * self.discard()[layer]
        u_sg = u.detach()
        ratio = 1.0 + (u - u_sg) / u_sg.clamp_min(torch.finfo(u.dtype).tiny)
        return soft * ratio.to(soft.dtype)

    # ---- deployment (§2.6)
    def export(
        self,
        gate_threshold: float = 0.5,
        max_reducers: int | None = None,
        num_visual_tokens: int | None = None,
        *,
        name: str | None = None,
        fractions: bool = False,
        sharpness: float = 1.0,
        last_layer: bool = True,
    ) -> Theta:
        """Deterministic :class:`Theta` from the current state.

        Layers with ``g > gate_threshold`` are candidates; the ``max_reducers``
        strongest (by g; ties by lower layer) become reducers, in layer order.
        Their kept counts follow equation 11 along the chain of the selected
        layers only, from ``num_visual_tokens`` (default: the module's N_0):
        ``K = max(K_min, floor((1 − g_l c_l) · N))``, capped at N. Operator
        parameters become floats; β, K_min and norm come from the module.

        With ``fractions`` each reducer keeps the fraction ``1 − g_l c_l`` of its
        incoming tokens instead of a count (``keep`` a float): the same rule
        (equation 11) at *any* visual count, for models whose images give
        different counts (LLaVA-NeXT, Qwen2(.5)-VL). ``num_visual_tokens`` is
        then only checked against K_min.

        ``sharpness`` λ < 1 (the relaxed search's annealed gates,
        :mod:`eos_kernels.search.relaxed`): the kept share of a selected layer
        is ``1 − ĝ c`` with ``ĝ = σ(logit(g) / λ)``, the share its relaxed
        forward keeps (λ = 1: ĝ = g, equation 11). ``last_layer=False`` never
        selects the last layer (a reducer there removes nothing that runs).
        """
        thr = check_real("gate_threshold", gate_threshold, low=0.0, high=1.0)
        sharpness = check_real("sharpness", sharpness, low=0.0, high=1.0, low_open=True)
        if max_reducers is not None:
            max_reducers = check_int("max_reducers", max_reducers, 0)
        n = self.num_visual_tokens if num_visual_tokens is None else check_int("num_visual_tokens", num_visual_tokens, 1)
        if n < self.k_min:
            raise ValueError(f"num_visual_tokens ({n}) must be >= k_min ({self.k_min})")
        # the maps evaluated on the CPU wherever the parameters live: a CUDA sigmoid or
        # softplus can differ from the CPU's by an ulp, and the exported Θ must not
        # depend on the device (theta.json written during a GPU search equals the result)
        src = self if self.w_g.device.type == "cpu" else copy.deepcopy(self).cpu()
        with torch.no_grad():
            gates = src.gates().double()
            g = gates.tolist()
            # the gate that scales the kept share: g itself (equation 11), or its sharpened form
            g_keep = g if sharpness == 1.0 else _sharpen(gates, sharpness).tolist()
            c = src.discard().double().tolist()
            ops = {"gamma": src.gamma().tolist(), "tau": src.tau().tolist(), "theta": src.theta().tolist(),
                   "rho": src.rho().tolist(), "nu": src.nu().tolist()}
        selectable = range(self.num_layers if last_layer else self.num_layers - 1)
        active = [l for l in selectable if g[l] > thr]
        active.sort(key=lambda l: (-g[l], l))
        if max_reducers is not None:
            active = active[:max_reducers]
        reducers, incoming = [], n
        for l in sorted(active):
            if fractions:
                keep = min(1.0, max(float(1.0 - g_keep[l] * c[l]), 1e-12))
                reducers.append(Reducer(l, keep, **{key: ops[key][l] for key in ops},
                                        beta=self.beta, k_min=self.k_min, norm=self.norm))
                continue
            kept = min(incoming, max(self.k_min, math.floor((1.0 - g_keep[l] * c[l]) * incoming)))
            reducers.append(Reducer(l, kept, **{key: ops[key][l] for key in ops},
                                    beta=self.beta, k_min=self.k_min, norm=self.norm))
            incoming = kept
        return Theta(reducers, name=name)
