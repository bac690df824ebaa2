"""The relaxed search forward: every layer's keep decision enters softly (decision 7 of :mod:`eos_kernels.search`).

The paper's search forward (decisions 1-2) is the deployed one: hard top-K at
the layers whose gate is above 1/2, and equation 12's straight-through factor
on the kept anchors. Its gradient cannot see a layer that does not reduce, and
reaches ``g``/``c`` of the active ones only through a rescaling of the anchors
that the next RMSNorm mostly undoes. The relaxed forward removes nothing: every
visual token stays in the sequence with a *presence* in (0, 1], and every layer
reduces by a soft top-K whose kept share depends smoothly on its ``g`` and ``c``.
Its loss is a smooth function of every entry of Θ.

Notation (one sample; ``i``, ``j`` its visual tokens; layer ``l`` of ``L``)::

    P⁽⁻¹⁾_i = 1                                   presence entering layer 0
    z_i     = log q⁽ˡ⁾_i + log P⁽ˡ⁻¹⁾_i            score: layer l's text->visual attention
                                                  (importance kernel), damped by the presence;
                                                  a constant (no gradient, as eq. 12's q_(K))
    ĝ_l     = σ(logit(g_l) / λ)                   the gate sharpened by λ (annealed 1 -> λ_end)
    u_l     = 1 − ĝ_l c_l                          kept share (eq. 11 with ĝ)
    κ_i     = σ((z_i − t_l) / T)                   soft top-K; t_l solves
              Σ_i P⁽ˡ⁻¹⁾_i κ_i = u_l Σ_i P⁽ˡ⁻¹⁾_i      (implicit gradient, :class:`_SoftThreshold`)
    P⁽ˡ⁾_i  = P⁽ˡ⁻¹⁾_i κ_i                          presence leaving layer l
    δ_i     = P⁽ˡ⁻¹⁾_i − P⁽ˡ⁾_i                     what layer l discards of token i

- **Keep decisions as attention bias.** Layer ``l + 1`` (and every later one)
  attends to visual key ``i`` with the additive bias ``log P⁽ˡ⁾_i`` on its
  logits: a present token (P = 1) is untouched, a discarded one (P → 0) is
  invisible, exactly as a removed one (a visual token influences the text only
  as a key/value).
- **The operator, soft.** The output of layer ``l`` at the visual positions is
  the unified operator (DESIGN.md §2) with every token an anchor of weight
  ``a_j = P⁽ˡ⁾_j`` and a candidate of mass ``δ_i``::

      S = normalize(X) normalize(X)ᵀ,   W_ij = softmax_{j ≠ i}(S_ij / τ + log a_j)
      m_i = σ(β (max_{j: a_j > 1/2} S_ij − θ))
      Ã_j = X_j + γ Σ_i W_ij m_i δ_i X_i
      Â_j = Ã_j (1 + ρ Σ_i softmax_{j ≠ i}(S_ij + log a_j) π_i),
      π   = min(1, Σ_i δ_i) · softmax_i(q_i + log δ_i)
      out_j = (1 − ν) Â_j + ν (‖X_j‖ / max(‖Â_j‖, 1e-6)) Â_j

  At hard presences (κ ∈ {0, 1}) this is :func:`~eos_kernels.eos_reduce` on the
  kept anchors and the discarded candidates, and the bias removes the
  candidates: the relaxed forward *is* the deployed one (tested).
- **Annealing.** ``T`` (soft top-K temperature, in nats of the score) and ``λ``
  (gate sharpness) fall geometrically over the relaxed phase, so the forward
  approaches hard top-K at the layers with ``g > 1/2`` only (ĝ → 1[g > 1/2]);
  the search then finishes with the paper's hard forward (decisions 1-2).

Departures from the paper, all ours: the keep decision of *every* layer enters
the forward (the paper's forward holds the active layers only); the straight-
through factor of equation 12 is replaced by the soft top-K (its gradient is
that of removing the boundary tokens, not of rescaling the kept ones); the gate
enters through the kept share ``1 − ĝ c`` rather than as a 0/1 switch.

The forward runs at full length (no token is removed while relaxed), so it
costs what the unreduced model costs, plus one [N, N] similarity per layer and
sample; it needs an attention that takes an additive mask (sdpa or eager).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from eos_kernels.importance import text_to_visual_importance
from eos_kernels.search_space import _sharpen

__all__ = ["RelaxedForward", "soft_threshold", "relaxed_reduce", "sharpen_gates", "LOG_PRESENCE_FLOOR"]

#: presences are clamped to at least exp(this) before the log (a finite bias; exp(-60) is 1e-26)
LOG_PRESENCE_FLOOR = -60.0
_SCORE_FLOOR = 1e-30


def sharpen_gates(g: torch.Tensor, sharpness: float) -> torch.Tensor:
    """ĝ = σ(logit(g) / λ): g itself at λ = 1, the step 1[g > 1/2] as λ → 0."""
    return _sharpen(g, sharpness)


class _SoftThreshold(torch.autograd.Function):
    """t with Σ_i w_i σ((z_i − t)/T) = u Σ_i w_i per row; gradients by the implicit function theorem."""

    @staticmethod
    def forward(ctx, z, w, u, temperature):
        zd, wd, ud = z.double(), w.double(), u.double().expand(z.shape[0]).unsqueeze(-1)  # u: 0-d or [B]
        total = wd.sum(-1, keepdim=True)
        valid = wd > 0
        big = torch.finfo(torch.float64).max
        lo = torch.where(valid, zd, torch.full_like(zd, big)).amin(-1, keepdim=True) - 40 * temperature
        hi = torch.where(valid, zd, torch.full_like(zd, -big)).amax(-1, keepdim=True) + 40 * temperature
        for _ in range(50):  # bisection (to 80 T / 2^50): the kept mass falls as t rises
            mid = (lo + hi) / 2
            kept = (wd * torch.sigmoid((zd - mid) / temperature)).sum(-1, keepdim=True)
            above = kept > ud * total
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        t = ((lo + hi) / 2).to(z.dtype)
        ctx.save_for_backward(z, w, u, t)
        ctx.temperature = temperature
        return t.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_t):
        z, w, u, t = ctx.saved_tensors
        T = ctx.temperature
        s = torch.sigmoid((z - t) / T)
        slope = (w * s * (1 - s)).sum(-1, keepdim=True) / T        # -dF/dt
        slope = slope.clamp_min(torch.finfo(slope.dtype).tiny)
        g = grad_t.unsqueeze(-1) / slope
        grad_z = g * w * s * (1 - s) / T if ctx.needs_input_grad[0] else None
        grad_w = g * (s - (u if u.dim() == 0 else u.unsqueeze(-1))) if ctx.needs_input_grad[1] else None
        grad_u = None
        if ctx.needs_input_grad[2]:
            grad_u = -(g * w.sum(-1, keepdim=True)).squeeze(-1)
            grad_u = grad_u.sum().reshape(u.shape) if u.dim() == 0 else grad_u
        return grad_z, grad_w, grad_u, None


def soft_threshold(z: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row of ``z`` [B, N], the threshold t [B] with ``Σ w σ((z − t)/T) = keep · Σ w``.

    ``weights`` [B, N] (>= 0; 0 leaves a token out), ``keep`` a 0-d tensor or one
    per row [B], in (0, 1), ``temperature`` > 0. Differentiable in ``z``,
    ``weights`` and ``keep``."""
    return _SoftThreshold.apply(z, weights, keep, float(temperature))


def biased_importance(query, key, visual, rows, real, log_bias, scale: float) -> torch.Tensor:
    """:func:`~eos_kernels.importance.text_to_visual_importance` with an additive key bias [B, L] in each row's
    softmax (the presences of the relaxed forward): float32 [B, L], 0 outside the visual positions.

    In PyTorch over the rating rows only ([B, H, rows, L]), forward only."""
    B, Hq, L, dh = query.shape
    rep = Hq // key.shape[1]
    k = key.float().repeat_interleave(rep, dim=1) if rep > 1 else key.float()
    # each sample's rating rows, padded to the longest (a padded row is dropped from the mean)
    counts = rows.sum(1)
    R = int(counts.max())
    r_idx = torch.sort((~rows).to(torch.int8), dim=1, stable=True).indices[:, :R]         # [B, R]
    r_ok = torch.arange(R, device=rows.device)[None, :] < counts[:, None]
    q = query.float().gather(2, r_idx[:, None, :, None].expand(-1, Hq, -1, dh))          # [B, H, R, dh]
    logits = (q @ k.transpose(-1, -2)) * scale + log_bias.float()[:, None, None, :]
    pos = torch.arange(L, device=query.device)
    allowed = pos[None, None, :] <= r_idx[:, :, None]                                   # [B, R, L]
    if real is not None:
        allowed = allowed & real[:, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], -math.inf), dim=-1)
    probs = probs * r_ok[:, None, :, None]
    out = probs.sum(dim=(1, 2)) / (Hq * counts.clamp_min(1)[:, None])
    return out * visual


def relaxed_reduce(x, prev, presence, scores, gamma, tau, theta, rho, nu, *, beta: float = 10.0):
    """The soft operator (module docstring) on visual hidden states ``x`` [B, N, d].

    ``prev`` / ``presence`` [B, N]: presences entering and leaving the layer
    (0 at padding); ``scores`` [B, N] importance (probabilities, as
    :func:`~eos_kernels.eos_reduce` receives them). Returns [B, N, d] in ``x``'s
    dtype. The per-token norm ratio ("token" mode, the operator's default)."""
    out_dtype = x.dtype
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    X = x.to(compute)
    B, N, _ = X.shape
    Xn = F.normalize(X, dim=-1, eps=1e-12)
    S = Xn @ Xn.transpose(1, 2)                                            # [B, N(i), N(j)]
    eye = torch.eye(N, dtype=torch.bool, device=X.device)
    log_a = presence.to(compute).clamp_min(math.exp(LOG_PRESENCE_FLOOR)).log()
    no_anchor = eye | (presence <= 0)[:, None, :]
    lonely = no_anchor.all(-1, keepdim=True)  # a token with no other token to go to (a one-token sample)
    W = torch.softmax((S / tau + log_a[:, None, :]).masked_fill(no_anchor & ~lonely, -math.inf), dim=-1)
    W = W.masked_fill(no_anchor, 0.0)
    anchors = (presence > 0.5)[:, None, :] & ~eye
    s_max = S.masked_fill(~anchors, -math.inf).amax(-1)
    s_max = torch.where(torch.isfinite(s_max), s_max, torch.zeros_like(s_max))  # no anchor: no transfer below
    m = torch.sigmoid(beta * (s_max - theta))
    delta = (prev.to(compute) - presence.to(compute)).clamp_min(0)
    transfer = W.transpose(1, 2) @ (X * (m * delta).unsqueeze(-1))
    A_tilde = X + gamma * transfer
    # reweighting: candidates' importance share π (mass-weighted), carried to anchors by softmax(S)
    log_d = torch.where(delta > 0, delta.clamp_min(1e-45).log(), torch.full_like(delta, -math.inf))
    logits = scores.to(compute) + log_d
    empty = torch.isneginf(logits).all(-1, keepdim=True)
    pi = torch.softmax(torch.where(empty, torch.zeros_like(logits), logits), -1)
    # the hard operator's softmax(q) sums to 1 once one candidate exists: scaled by the discarded mass up to 1
    pi = torch.where(empty, torch.zeros_like(pi), pi) * delta.sum(-1, keepdim=True).clamp_max(1.0)
    W1 = torch.softmax((S + log_a[:, None, :]).masked_fill(no_anchor & ~lonely, -math.inf), dim=-1)
    W1 = W1.masked_fill(no_anchor, 0.0)
    s_imp = (W1 * pi.unsqueeze(-1)).sum(1)
    A_hat = A_tilde * (1.0 + rho * s_imp.unsqueeze(-1))
    ratio = X.norm(dim=-1, keepdim=True) / A_hat.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    out = (1.0 - nu) * A_hat + nu * (A_hat * ratio)
    return out.to(out_dtype)


class _Forward:
    """State of one relaxed forward."""

    def __init__(self, visual, rows, real):
        self.visual = visual                  # bool [B, L]
        self.rows = rows                      # bool [B, L] rating rows
        self.real = real                      # bool [B, L] or None
        counts = visual.sum(1)
        self.n = int(counts.max()) if visual.numel() else 0
        # positions [B, n] of each sample's visual tokens (ascending) and which of them are real
        self.pos = torch.sort((~visual).to(torch.int8), dim=1, stable=True).indices[:, :self.n]
        self.slot_valid = torch.arange(self.n, device=visual.device)[None, :] < counts[:, None]
        self.presence = self.slot_valid.float()   # P leaving the last processed layer
        self.log_bias = None                      # [B, L] additive key bias for the next layer, or None
        self.captured: dict = {}
        self.gate_noise: torch.Tensor | None = None  # [num_layers, B], see RelaxedForward.active
        self.structure: torch.Tensor | None = None   # z [num_layers, B] in {0, 1}, see RelaxedForward.active
        self.keep: torch.Tensor | None = None        # [num_layers, B] kept shares of the structure
        self.kept: dict[int, torch.Tensor] = {}   # layer -> Σ_i P leaving it, per sample (for logging)


class RelaxedForward:
    """Hooks that turn a (frozen, unpatched) model's forward into the relaxed search forward.

    ``install`` once; then every forward inside ``with relaxed.active(input_ids,
    attention_mask, prompt_lengths):`` is relaxed; outside it the model is its
    stock self. ``temperature`` (T) and ``sharpness`` (λ) are attributes the
    search anneals. ``scores_override`` replays recorded scores (``record``)
    for finite-difference checks: the scores are constants of the relaxed loss.
    """

    def __init__(self, space, adapter, *, temperature: float = 1.0, sharpness: float = 1.0):
        self.space = space
        self.adapter = adapter
        self.temperature = float(temperature)
        self.sharpness = float(sharpness)
        self.handles: list = []
        self.state: _Forward | None = None
        self.record: dict[int, torch.Tensor] | None = None
        self.scores_override: dict[int, torch.Tensor] | None = None

        self.model = None

    # ---------------------------------------------------------------- install / remove
    def install(self, model: nn.Module) -> "RelaxedForward":
        impl = self.adapter.attn_implementation(model)
        if "flash" in impl:
            raise ValueError(f"the relaxed search forward needs an attention that takes an additive mask (sdpa or "
                             f"eager); the model uses {impl!r}: load it with attn_implementation='sdpa'")
        self.model = model
        layers = self.adapter.decoder_layers(model)
        for idx, layer in enumerate(layers):
            q_mod, k_mod = self.adapter.qk_modules(layer)
            self.handles.append(q_mod.register_forward_hook(self._capture(idx, "q")))
            self.handles.append(k_mod.register_forward_hook(self._capture(idx, "k")))
            self.handles.append(layer.register_forward_pre_hook(self._pre(idx), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(idx, idx == len(layers) - 1),
                                                            with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.state = None

    @contextlib.contextmanager
    def active(self, visual: torch.Tensor, rows: torch.Tensor, real: torch.Tensor | None,
               gate_noise: torch.Tensor | None = None, structure: torch.Tensor | None = None,
               log_ratio: float | None = None):
        """Relax the forwards inside the block; ``visual``/``rows``/``real`` bool [B, L].

        ``gate_noise`` [num_layers, B]: logistic noise that makes each sample's gates binary-concrete samples
        (``ĝ = σ((logit g + noise) / λ)``, on with probability g as λ → 0); None: the deterministic ĝ.
        ``structure`` z [num_layers, B] in {0, 1} with ``log_ratio`` (decision 8, :mod:`.sampled`): sample b
        reduces at the layers with z = 1 only (ĝ = z), each keeping its share of ``exp(log_ratio)``
        (:func:`~eos_kernels.search.sampled.structure_keep`, differentiable in the c's)."""
        self.state = _Forward(visual, rows, real)
        self.state.gate_noise = gate_noise
        if structure is not None:
            from eos_kernels.search.sampled import structure_keep

            if log_ratio is None:
                raise ValueError("a sampled structure needs log_ratio (the log of the budget's kept share)")
            self.state.structure = structure
            self.state.keep = structure_keep(self.space.discard(), structure, log_ratio)
        try:
            yield self.state
        finally:
            self.state = None

    # ---------------------------------------------------------------- hooks
    def _capture(self, idx: int, which: str):
        def hook(module, args, output):
            if self.state is not None:
                self.state.captured[which] = output
            return None
        return hook

    def _pre(self, idx: int):
        def hook(module, args, kwargs):
            st = self.state
            if st is None:
                return None
            st.captured = {}
            st.position_embeddings = kwargs.get("position_embeddings")
            if st.log_bias is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = kwargs.get("attention_mask")
            new = dict(kwargs)
            new["attention_mask"] = self._biased_mask(mask, st, hidden.dtype, hidden.shape[1])
            return args, new
        return hook

    def _biased_mask(self, mask, st: _Forward, dtype, L: int) -> torch.Tensor:
        """The layer's mask as an additive [B, 1, L, L] float mask plus the presence bias on the visual keys."""
        device = st.visual.device
        lowest = torch.finfo(torch.float32).min / 2
        if mask is None:
            allowed = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]
            if st.real is not None:
                allowed = allowed & st.real[:, None, None, :]
            base = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, lowest)
        elif torch.is_tensor(mask) and mask.dim() == 4:
            mask = mask[..., :L, :L]
            base = (torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, lowest)
                    if mask.dtype == torch.bool else mask.float().clamp_min(lowest))
        else:
            raise ValueError(f"the relaxed search forward got an attention mask it cannot bias "
                             f"({type(mask).__name__} {getattr(mask, 'shape', '')}); expected None or a 4-D mask")
        return (base + st.log_bias[:, None, None, :].to(base.device)).to(dtype)

    def _post(self, idx: int, is_last: bool):
        def hook(module, args, kwargs, output):
            st = self.state
            if st is None or is_last or st.n == 0:
                return None
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            new_hidden = self._reduce(idx, module, hidden, st)
            if isinstance(output, (tuple, list)):
                return type(output)((new_hidden, *output[1:]))
            return new_hidden
        return hook

    # ---------------------------------------------------------------- one layer
    def _scores(self, idx: int, layer, st: _Forward) -> torch.Tensor:
        """Layer ``idx``'s importance of each sample's visual slots [B, n] (no gradient)."""
        if self.scores_override is not None:
            return self.scores_override[idx]
        query, key = self.adapter.query_key(layer, st.captured["q"], st.captured["k"], st.position_embeddings)
        with torch.no_grad():
            if st.log_bias is None:  # nothing discarded yet: the importance kernel
                imp = text_to_visual_importance(query.detach(), key.detach(), st.visual, st.rows, st.real,
                                                scale=self.adapter.attention_scale(layer))
            else:
                imp = biased_importance(query.detach(), key.detach(), st.visual, st.rows, st.real,
                                        st.log_bias.detach(), self.adapter.attention_scale(layer))
            q = imp.gather(1, st.pos).float()
        if self.record is not None:
            self.record[idx] = q
        return q

    def _reduce(self, idx: int, layer, hidden: torch.Tensor, st: _Forward) -> torch.Tensor:
        space = self.space
        q = self._scores(idx, layer, st)
        if hidden.dtype == torch.float64:  # a float64 model (gradient checks) keeps its precision throughout
            q = q.double()
        prev = st.presence.to(q.dtype)
        z = q.clamp_min(_SCORE_FLOOR).log() + prev.clamp_min(math.exp(LOG_PRESENCE_FLOOR)).log()
        z = torch.where(st.slot_valid, z, torch.zeros_like(z))
        if st.structure is not None:  # decision 8: this sample's structure, its share of the budget
            g_hat = st.structure[idx].to(q.dtype).unsqueeze(-1)
            share = st.keep[idx].to(q.dtype)
        elif st.gate_noise is None:
            g_hat = sharpen_gates(space.gates()[idx], self.sharpness)
            share = 1.0 - space.discard()[idx]
        else:  # a binary-concrete sample per sample of the batch: P(ĝ > 1/2) = g
            g = space.gates()[idx]
            logit = torch.log(g.clamp_min(1e-12)) - torch.log1p(-g.clamp_max(1 - 1e-12))
            g_hat = torch.sigmoid((logit + st.gate_noise[idx].to(logit)) / self.sharpness).unsqueeze(-1)
            share = 1.0 - space.discard()[idx]
        # equation 11's K_min: a layer keeps at least k_min of the (soft) tokens entering it
        keep = torch.maximum(share, space.k_min / prev.sum(-1).clamp_min(space.k_min))
        t = soft_threshold(z, prev, keep, self.temperature)
        kappa = torch.sigmoid((z - t.unsqueeze(-1)) / self.temperature)
        if st.structure is not None:
            kappa = _straight_through_top_k(z, prev, keep, kappa)
        presence = prev * (1.0 - g_hat * (1.0 - kappa))
        st.kept[idx] = presence.detach().sum(-1)
        ops = space.operator_params(idx)
        idx_d = st.pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        x = hidden.gather(1, idx_d)
        reduced = relaxed_reduce(x, prev, presence, q, ops["gamma"], ops["tau"], ops["theta"], ops["rho"],
                                 ops["nu"], beta=space.beta)
        # padding slots point at position 0 of their sample: write the real slots only
        reduced = torch.where(st.slot_valid.unsqueeze(-1), reduced, x)
        new_hidden = hidden.scatter(1, idx_d, reduced)
        st.presence = presence
        log_p = presence.clamp_min(math.exp(LOG_PRESENCE_FLOOR)).log()
        bias = torch.zeros(st.visual.shape, dtype=log_p.dtype, device=log_p.device)
        st.log_bias = bias.scatter(1, st.pos, torch.where(st.slot_valid, log_p, torch.zeros_like(log_p)))
        return new_hidden


def _straight_through_top_k(z: torch.Tensor, prev: torch.Tensor, keep: torch.Tensor,
                            soft: torch.Tensor) -> torch.Tensor:
    """Sampled structures (decision 8): the hard top-K of the deployed forward, ``floor(keep · Σ prev)`` of the
    present tokens (prev > 1/2: presences are 0/1 there) by ``z``, with the soft top-K's gradient (straight
    through). A soft top-K over nearly equal scores dims every token a little instead of removing some, which
    can hide what removing them costs; the score function must see the deployed loss of each structure."""
    present = prev > 0.5
    n = present.sum(-1)
    k = torch.floor(keep.detach().to(torch.float64) * n.to(torch.float64) + 1e-9).to(torch.long)
    k = torch.minimum(torch.maximum(k, torch.ones_like(k)), n)
    ranked = torch.where(present, z.detach(), torch.full_like(z, -torch.inf))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(z.shape[-1], device=z.device).expand_as(order))
    hard = ((rank < k.unsqueeze(-1)) & present).to(soft.dtype)
    return hard + soft - soft.detach()


def effective_keep(g_hat: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """φ(ĝ, c): the effective count leaving a layer over the count entering it, when the layer keeps the
    share 1 − c at full presence and leaves the rest at presence 1 − ĝ. The effective count of presences
    P is (Σ P)² / Σ P², the number of tokens at hard presences: φ = 1 − c at ĝ = 1, 1 at ĝ = 0, and a
    uniform down-weighting (c → 1) earns no credit, so partial gates cannot meet the budget by
    dimming every token a little."""
    kept, rest = 1.0 - c, (1.0 - g_hat) * c
    return (kept + rest) ** 2 / (kept + (1.0 - g_hat) * rest).clamp_min(1e-30)


def expected_chain(space, sharpness: float, n0: float, stochastic: bool = False) -> torch.Tensor:
    """Visual tokens entering each layer, [L], of the relaxed forward: n0, then × the kept factor of each layer
    but the last (its decision reduces nothing that runs): φ(ĝ_l, c_l) with deterministic gates, and with
    binary-concrete ones (``stochastic``) the expectation over the gate, ``1 − g_l c_l`` (equation 13's N̄)."""
    if stochastic:
        keep = 1.0 - space.gates() * space.discard()
    else:
        keep = effective_keep(sharpen_gates(space.gates(), sharpness), space.discard())
    keep = keep[:-1]
    ones = torch.ones(1, dtype=keep.dtype, device=keep.device)
    return n0 * torch.cat([ones, torch.cumprod(keep, 0)])
