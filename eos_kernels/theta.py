"""Deployable EOS configurations: :class:`Theta` and its :class:`Reducer` entries.

A :class:`Theta` is an ordered list of reducers. Each :class:`Reducer` sits at a
0-indexed decoder layer ``l`` and shrinks the visual tokens *leaving* layer
``l``: layer ``l`` itself runs at full length, layers after it (and their KV
caches) see ``kept`` visual tokens (DESIGN.md §4). Its operator parameters
``gamma, tau, theta, rho, nu`` (plus ``beta`` and ``norm``) are those of
:func:`eos_kernels.eos_reduce`; :meth:`Reducer.operator_kwargs` returns them
ready to splat into it.

How many tokens a reducer keeps
-------------------------------
``keep`` is either an ``int`` -- the exact number of visual tokens kept out of
the incoming ones -- or a ``float`` in (0, 1] -- a fraction of the incoming
tokens. A fraction gives ``max(k_min, floor(keep * incoming))`` computed in
exact rational arithmetic: the float is read as the simplest rational ``p/q``
with ``q <= 10**6`` that rounds to the very same float (``0.29`` is 29/100,
``1/3`` is 1/3), or, when there is none, as the decimal its ``repr`` spells.
So ``floor(0.29 * 100)`` is 29, not the 28 that binary floating point gives.
A count larger than the incoming tokens is an error (:meth:`Theta.schedule`,
:meth:`Theta.validate`): it depends on the number of visual tokens, so it is
checked against a model, not when a file is loaded.

JSON schema (version 1)
-----------------------
::

    {
      "schema": "eos_kernels.theta",     # required, exactly this string
      "version": 1,                      # required, exactly 1
      "name": "sparsevlm-v2-192",        # optional, string or null
      "reducers": [                      # required, list (may be empty)
        {
          "layer": 2,          # required, int >= 0; strictly increasing along the list
          "keep": 300,         # required, int >= 1 (count) or float in (0, 1] (fraction)
          "gamma": 0.0,        # float in [0, 1]          default 0.0
          "tau": 1.0,          # finite float > 0         default 1.0
          "theta": 0.0,        # finite float             default 0.0
          "rho": 0.0,          # float in [0, 1]          default 0.0
          "nu": 0.0,           # float in [0, 1]          default 0.0
          "beta": 10.0,        # finite float > 0         default 10.0
          "k_min": 1,          # int >= 1                 default 1
          "norm": "token"      # "token" or "frobenius"   default "token"
        }
      ]
    }

:meth:`Theta.to_json` always writes every field. Floats are written with
Python's ``repr`` (shortest round-trip form), so ``from_json(to_json())``
reproduces every value bit for bit; an integer ``keep`` is written as ``300``
and a fractional one as ``0.5`` (a whole fraction as ``1.0``), so the two kinds
stay distinct. Loading rejects, with a ``ValueError`` (``TypeError`` for a
wrong type) naming the field: unknown keys at the top level or in a reducer,
keys repeated in one of those objects (:meth:`Theta.from_json`), missing
required keys, another schema or version, layers out of order or repeated,
``tau <= 0``, ``gamma``/``rho``/``nu`` outside [0, 1], non-finite numbers, a
bad ``keep``/``k_min``/``norm``, booleans where numbers belong.

``theta`` is the operator's similarity threshold. The search space keeps it in
(-1, 1) (equation 10 of the paper), but a deployed configuration may use any
finite value: the merge and pool corners use ``theta = -1e9`` to switch the
transfer gate fully on (θ → −∞).

Token accounting
----------------
:meth:`Theta.token_report` gives the final count, the mean over all layers of
the visual tokens *leaving* each layer (SparseVLM's "retain" number:
``Theta.sparsevlm(2, 192)`` gives 192.4375), the mean of the tokens each layer
*processes*, and an estimate of the prefill FLOPs against the unreduced model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Iterator, Mapping, Sequence

from eos_kernels._checks import check_int, is_int, is_real
from eos_kernels import presets as _presets
from eos_kernels.presets import SPARSEVLM_LAYERS, SPARSEVLM_SCHEDULES  # noqa: F401 - public here too

__all__ = ["Reducer", "Theta", "SCHEMA", "SCHEMA_VERSION", "SPARSEVLM_SCHEDULES"]

SCHEMA = "eos_kernels.theta"
SCHEMA_VERSION = 1

_NORMS = ("token", "frobenius")
_FLOAT_FIELDS = ("gamma", "tau", "theta", "rho", "nu", "beta")
_UNIT_FIELDS = ("gamma", "rho", "nu")
_REDUCER_FIELDS = ("layer", "keep", "gamma", "tau", "theta", "rho", "nu", "beta", "k_min", "norm")
_TOP_FIELDS = ("schema", "version", "name", "reducers")
_COUNTS = ("mean_leaving", "final")

# --------------------------------------------------------------------------- helpers
def _fraction_of(keep: float) -> Fraction:
    """Exact rational meant by the float ``keep`` (see the module docstring)."""
    simple = Fraction(keep).limit_denominator(10**6)
    if float(simple) == keep:
        return simple
    return Fraction(repr(keep))


def _regime(gamma: float, tau: float, theta: float, rho: float, nu: float) -> str:
    """Name of the operator regime; a label for display, not a behaviour switch."""
    if gamma == 0.0:
        return "prune" if rho == 0.0 else "reweight"
    if gamma == 1.0 and rho == 0.0 and nu == 0.0 and theta <= -1.0:
        if tau <= 1e-2:
            return "merge"
        if tau >= 1e2:
            return "pool"
    return "hybrid"


def prefill_flops(processed: Sequence[int], text_tokens: int, hidden_size: int,
                  intermediate_size: int) -> tuple[int, int]:
    """``(reduced, full)`` estimated prefill FLOPs of the decoder layers, each processing ``text_tokens`` +
    its entry of ``processed`` visual tokens, against all layers at ``processed[0]`` (see
    :meth:`Theta.token_report` for the formula)."""
    d, ffn = hidden_size, intermediate_size

    def layer(n: int) -> int:
        return 2 * n * (4 * d * d + 3 * d * ffn) + 4 * n * n * d

    reduced = sum(layer(text_tokens + p) for p in processed)
    return reduced, len(processed) * layer(text_tokens + processed[0])


def _leaving_per_layer(layers: Sequence[int], kept: Sequence[int], n0: int, num_layers: int) -> list[int]:
    """Visual tokens leaving each of ``num_layers`` layers for a chained schedule."""
    out, current, j = [], n0, 0
    for layer in range(num_layers):
        if j < len(layers) and layers[j] == layer:
            current = kept[j]
            j += 1
        out.append(current)
    return out


def _count(layers: Sequence[int], kept: Sequence[int], n0: int, num_layers: int, count: str) -> float:
    if count == "final":
        return kept[-1] if kept else n0
    leaving = _leaving_per_layer(layers, kept, n0, num_layers)
    return sum(leaving) / num_layers


def _check_count(count: Any) -> str:
    if count not in _COUNTS:
        raise ValueError(f"count must be one of {_COUNTS}, got {count!r}")
    return count


def _check_budget(budget: Any) -> float:
    if not is_real(budget):
        raise TypeError(f"budget must be a number, got {type(budget).__name__} {budget!r}")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    return budget


class _KeyCheckedObject(dict):
    """A parsed JSON object (``object_pairs_hook``) that remembers which of its keys were repeated."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        counts: dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        self.duplicates = sorted(k for k, n in counts.items() if n > 1)


def _refuse_duplicates(obj: Any, what: str) -> None:
    duplicates = getattr(obj, "duplicates", None)
    if duplicates:
        raise ValueError(f"duplicate {what} key(s) {duplicates}: each key may appear only once "
                         "(JSON parsers differ on which of the values wins)")


# --------------------------------------------------------------------------- Reducer
@dataclass(frozen=True, eq=False)
class Reducer:
    """One reduction step: at decoder ``layer`` keep ``keep`` visual tokens.

    Args:
        layer: 0-indexed decoder layer; the reduction applies to the tokens
            leaving this layer.
        keep: ``int`` >= 1, the exact number of visual tokens kept out of the
            incoming ones; or ``float`` in (0, 1], a fraction of the incoming
            tokens (floored exactly, then at least ``k_min``).
        gamma, tau, theta, rho, nu: operator parameters Ω of
            :func:`eos_kernels.eos_reduce`: gamma, rho, nu in [0, 1]; tau finite
            and > 0; theta any finite float (the corners use -1e9).
            ``eos_reduce`` itself also needs tau >= 2**-40 (~9.1e-13): a
            smaller tau is stored (the schema is the paper's) but refused
            when the reducer runs.
        beta: transfer-gate sharpness, finite and > 0 (``eos_reduce``: at
            most float32's largest value, 3.4e38).
        k_min: lower bound on the kept count (equation 11), int >= 1.
        norm: ``"token"`` or ``"frobenius"`` norm-preservation mode.

    Ints are accepted for the float fields and stored as floats; booleans are
    rejected everywhere.
    """

    layer: int
    keep: int | float
    gamma: float = 0.0
    tau: float = 1.0
    theta: float = 0.0
    rho: float = 0.0
    nu: float = 0.0
    beta: float = 10.0
    k_min: int = 1
    norm: str = "token"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "layer", check_int("layer", self.layer, 0))
        keep = self.keep
        if is_int(keep):
            set_(self, "keep", check_int("keep", keep, 1))
        elif is_real(keep):
            keep = float(keep)
            if not (math.isfinite(keep) and 0.0 < keep <= 1.0):
                raise ValueError(
                    f"keep must be an int >= 1 (a count) or a float in (0, 1] (a fraction), got {keep!r}"
                )
            set_(self, "keep", keep)
        else:
            raise TypeError(
                f"keep must be an int (a count) or a float (a fraction), got {type(keep).__name__} {keep!r}"
            )
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not is_real(value):
                raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            set_(self, name, value)
        for name in _UNIT_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.tau <= 0.0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if self.beta <= 0.0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")
        set_(self, "k_min", check_int("k_min", self.k_min, 1))
        if not isinstance(self.norm, str) or self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")

    def _key(self) -> tuple:
        # keep's kind is part of the value: a count of 1 is not the fraction 1.0
        return tuple((type(v), v) if n == "keep" else v for n, v in
                     ((n, getattr(self, n)) for n in _REDUCER_FIELDS))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reducer):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def is_fraction(self) -> bool:
        """True when ``keep`` is a fraction of the incoming tokens, False for a count."""
        return isinstance(self.keep, float)

    @property
    def regime(self) -> str:
        """Display name of the operator regime: prune, reweight, merge, pool or hybrid.

        prune: gamma = 0, rho = 0; reweight: gamma = 0, rho > 0; merge / pool:
        gamma = 1, rho = nu = 0, theta <= -1 and tau <= 1e-2 / tau >= 1e2;
        anything else: hybrid.
        """
        return _regime(self.gamma, self.tau, self.theta, self.rho, self.nu)

    def kept(self, incoming: int) -> int:
        """Exact number of visual tokens kept out of ``incoming``.

        A count is returned as is; a fraction gives ``floor(keep * incoming)``
        in exact rational arithmetic; either way at least ``k_min``.

        Raises:
            ValueError: if the result exceeds ``incoming``.
        """
        incoming = check_int("incoming", incoming, 0)
        if self.is_fraction:
            n = math.floor(_fraction_of(self.keep) * incoming)
        else:
            n = self.keep
        n = max(self.k_min, n)
        if n > incoming:
            raise ValueError(
                f"reducer at layer {self.layer}: keep={self.keep!r} (k_min={self.k_min}) gives {n} "
                f"kept tokens, more than the {incoming} incoming visual tokens"
            )
        return n

    def operator_kwargs(self) -> dict:
        """``gamma, tau, theta, rho, nu, beta, norm`` for :func:`eos_kernels.eos_reduce`."""
        return {
            "gamma": self.gamma,
            "tau": self.tau,
            "theta": self.theta,
            "rho": self.rho,
            "nu": self.nu,
            "beta": self.beta,
            "norm": self.norm,
        }

    def to_dict(self) -> dict:
        """All fields, in schema order (see the module docstring)."""
        return {name: getattr(self, name) for name in _REDUCER_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Reducer":
        """Build from a mapping; unknown or missing required keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a reducer must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_REDUCER_FIELDS), key=str)
        if unknown:
            raise ValueError(f"unknown reducer key(s) {unknown}; allowed: {list(_REDUCER_FIELDS)}")
        for required in ("layer", "keep"):
            if required not in data:
                raise ValueError(f"reducer is missing the required key {required!r}")
        return cls(**data)


# --------------------------------------------------------------------------- Theta
class Theta:
    """A deployable EOS configuration: an ordered tuple of :class:`Reducer`.

    Args:
        reducers: :class:`Reducer` instances or mappings accepted by
            :meth:`Reducer.from_dict`, with strictly increasing layers.
        name: optional label.

    Equality and hashing are by value (reducers and name). An empty Theta is
    the unreduced model.
    """

    __slots__ = ("_reducers", "_name")

    def __init__(self, reducers: Iterable[Reducer | Mapping[str, Any]] = (), *, name: str | None = None):
        if isinstance(reducers, (str, bytes, Mapping, Reducer)) or not isinstance(reducers, Iterable):
            raise TypeError(
                f"reducers must be a sequence of Reducer or mappings, got {type(reducers).__name__}"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        items = []
        for i, r in enumerate(reducers):
            try:
                if isinstance(r, Reducer):
                    items.append(r)
                elif isinstance(r, Mapping):
                    items.append(Reducer.from_dict(r))
                else:
                    raise TypeError(f"must be a Reducer or a mapping, got {type(r).__name__}")
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"reducers[{i}]: {exc}") from None
        for i in range(1, len(items)):
            if items[i].layer <= items[i - 1].layer:
                what = "repeated" if items[i].layer == items[i - 1].layer else "out of order"
                raise ValueError(
                    f"reducers[{i}].layer: layers must be strictly increasing, got "
                    f"{items[i - 1].layer} then {items[i].layer} ({what})"
                )
        self._reducers: tuple[Reducer, ...] = tuple(items)
        self._name = name

    # ---- basic protocol
    @property
    def reducers(self) -> tuple[Reducer, ...]:
        """The reducers, in layer order."""
        return self._reducers

    @property
    def name(self) -> str | None:
        """Optional label."""
        return self._name

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers of the reducers."""
        return tuple(r.layer for r in self._reducers)

    def __len__(self) -> int:
        return len(self._reducers)

    def __iter__(self) -> Iterator[Reducer]:
        return iter(self._reducers)

    def __getitem__(self, index: int) -> Reducer:
        return self._reducers[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Theta):
            return NotImplemented
        return self._reducers == other._reducers and self._name == other._name

    def __hash__(self) -> int:
        return hash((self._reducers, self._name))

    def __repr__(self) -> str:
        return f"Theta({list(self._reducers)!r}, name={self._name!r})"

    def __str__(self) -> str:
        title = f"Theta {self._name!r}" if self._name else "Theta"
        title += f" ({len(self)} reducer{'s' if len(self) != 1 else ''})"
        if not self._reducers:
            return title + ": no reduction"
        header = ("layer", "keep", "γ", "τ", "θ", "ρ", "ν", "β", "k_min", "norm", "regime")
        rows = [header]
        for r in self._reducers:
            keep = f"{r.keep:g}" if r.is_fraction else str(r.keep)
            if r.is_fraction:
                keep += " (frac)"
            rows.append(
                (str(r.layer), keep, f"{r.gamma:g}", f"{r.tau:g}", f"{r.theta:g}", f"{r.rho:g}",
                 f"{r.nu:g}", f"{r.beta:g}", str(r.k_min), r.norm, r.regime)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [title]
        for row in rows:
            lines.append("  ".join(cell.rjust(w) if i < 9 else cell.ljust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        return "\n".join(lines)

    # ---- schedule and validation
    def schedule(self, num_visual_tokens: int) -> list[tuple[int, int, int]]:
        """``(layer, incoming, kept)`` for each reducer, chained from ``num_visual_tokens``.

        Raises:
            ValueError: if a reducer would keep more tokens than it receives.
        """
        current = check_int("num_visual_tokens", num_visual_tokens, 1)
        out = []
        for i, r in enumerate(self._reducers):
            try:
                kept = r.kept(current)
            except ValueError as exc:
                raise ValueError(f"reducers[{i}].keep: {exc}") from None
            out.append((r.layer, current, kept))
            current = kept
        return out

    def validate(self, num_layers: int, num_visual_tokens: int) -> None:
        """Check this configuration against a model with ``num_layers`` decoder layers
        and ``num_visual_tokens`` visual tokens per image.

        Raises:
            ValueError: naming the reducer and field (a layer >= num_layers, a
                keep larger than its incoming count, ...).
        """
        num_layers = check_int("num_layers", num_layers, 1)
        check_int("num_visual_tokens", num_visual_tokens, 1)
        for i, r in enumerate(self._reducers):
            if r.layer >= num_layers:
                raise ValueError(
                    f"reducers[{i}].layer: layer {r.layer} does not exist in a model with "
                    f"{num_layers} layers (valid: 0..{num_layers - 1})"
                )
        self.schedule(num_visual_tokens)

    # ---- accounting
    def token_report(
        self,
        num_visual_tokens: int = 576,
        num_layers: int = 32,
        text_tokens: int = 64,
        *,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
    ) -> dict:
        """Visual-token accounting and a prefill-cost estimate.

        Returns a dict with:

        - ``schedule``: ``(layer, incoming, kept)`` per reducer;
        - ``leaving``: visual tokens leaving each layer (a reducer at layer l
          makes layer l leave its kept count); ``processed``: visual tokens each
          layer processes (what entered it);
        - ``final``: tokens leaving the last layer; ``mean_leaving``:
          ``mean(leaving)`` (SparseVLM's "retain" accounting);
          ``mean_processed``: ``mean(processed)``;
        - ``prefill_flops``, ``prefill_flops_full``, ``prefill_flops_ratio``:
          estimated prefill FLOPs of the decoder layers, reduced vs. unreduced;
        - the arguments (``num_visual_tokens``, ``num_layers``, ``text_tokens``,
          ``hidden_size``, ``intermediate_size``).

        FLOPs model (LLaMA-style layer with multi-head attention, as
        LLaVA-1.5-7B: d = 4096, ffn = 11008): a layer processing ``n`` tokens
        costs ``F(n) = 2·n·(4·d² + 3·d·ffn) + 4·n²·d`` -- the q/k/v/o
        projections and the gated MLP (2 FLOPs per multiply-add), plus QKᵀ and
        attention·V over the full n×n square. With ``n_l = text_tokens +
        processed[l]``, ``prefill_flops_ratio = Σ_l F(n_l) / (num_layers ·
        F(text_tokens + num_visual_tokens))``. Not counted: embeddings, norms,
        softmax, the LM head, the vision tower, and the reducers' own small cost
        (importance scores and the operator, O(K·M·d) each).
        """
        self.validate(num_layers, num_visual_tokens)
        text_tokens = check_int("text_tokens", text_tokens, 0)
        d = check_int("hidden_size", hidden_size, 1)
        ffn = check_int("intermediate_size", intermediate_size, 1)
        sched = self.schedule(num_visual_tokens)
        layers = [s[0] for s in sched]
        kept = [s[2] for s in sched]
        leaving = _leaving_per_layer(layers, kept, num_visual_tokens, num_layers)
        processed = [num_visual_tokens] + leaving[:-1]

        reduced, full = prefill_flops(processed, text_tokens, d, ffn)
        return {
            "schedule": sched,
            "leaving": leaving,
            "processed": processed,
            "final": leaving[-1],
            "mean_leaving": sum(leaving) / num_layers,
            "mean_processed": sum(processed) / num_layers,
            "prefill_flops": reduced,
            "prefill_flops_full": full,
            "prefill_flops_ratio": reduced / full,
            "num_visual_tokens": num_visual_tokens,
            "num_layers": num_layers,
            "text_tokens": text_tokens,
            "hidden_size": d,
            "intermediate_size": ffn,
        }

    # ---- rescaling (§2.6 of the paper)
    def rescale(
        self,
        budget: float,
        count: str = "mean_leaving",
        *,
        num_visual_tokens: int = 576,
        num_layers: int = 32,
        name: str | None = None,
    ) -> "Theta":
        """Same layers and operators, retain schedule rescaled to ``budget``.

        ``count`` names what must not exceed the budget at ``num_visual_tokens``
        visual tokens and ``num_layers`` layers: ``"mean_leaving"`` (the
        published tables' accounting, see :meth:`token_report`) or ``"final"``.

        Rule: let ``b_i`` be the kept counts of the current schedule at
        ``num_visual_tokens`` (N0). For a scale ``s >= 0`` the candidate
        schedule is chained as ``k_i(s) = max(m_i, min(k_{i-1}(s),
        floor(s·b_i)))`` with ``k_{-1} = N0`` and ``m_i = max_{j >= i} k_min_j``
        (so every later reducer can still keep its ``k_min``). Each ``k_i(s)``
        is at most ``k_{i-1}(s)``, is non-decreasing in ``s`` and changes only
        at the breakpoints ``s = m / b_i`` (integer ``0 <= m <= N0``, exact
        rationals); so is the count. Let ``C`` be the largest count
        ``<= budget`` over the breakpoints -- the closest to the budget from
        below along this uniform scaling. The result is the schedule at the
        smallest breakpoint whose count is ``C`` (so a schedule already at the
        best reachable count is kept as it is, e.g. SparseVLM v2/192 rescaled
        to a final count of 118). Between neighbouring breakpoints each
        ``k_i`` moves by at most one token, so the count ends within one step
        of the budget (``"final"``: 1 token; ``"mean_leaving"``:
        ``Σ_i (num_layers − layer_i) / num_layers``) unless every reducer
        already keeps all N0 tokens. Keeps become integer counts; the name
        defaults to ``"<name>@<count>=<budget>"``.

        Raises:
            ValueError: if no schedule meets the budget, i.e. the budget is
                below the count at ``s = 0`` (every reducer at its ``m_i``),
                with that lowest count and its cause. For ``"final"`` it is
                the last reducer's ``k_min``. For ``"mean_leaving"`` it is at
                least ``l_1·N0 / L`` because the ``l_1`` layers before the
                first reducer carry all ``N0`` tokens: 36.94 for reducers from
                layer 2 at 576 tokens and 32 layers, so budgets 32 and 16 need
                an earlier first reducer (or ``count="final"``) there. Also if
                there are no reducers and the unreduced count exceeds the
                budget.
        """
        budget = _check_budget(budget)
        count = _check_count(count)
        self.validate(num_layers, num_visual_tokens)
        n0 = num_visual_tokens
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        if name is None and self._name is not None:
            name = f"{self._name}@{count}={budget:g}"
        if not self._reducers:
            if _count((), (), n0, num_layers, count) > budget:
                raise ValueError(f"Theta has no reducers to rescale; its {count} is {n0} > budget {budget:g}")
            return Theta((), name=name)
        layers = self.layers
        base = [s[2] for s in self.schedule(n0)]
        # lower bound of each count: its own k_min and those of all later reducers
        lows = [max(r.k_min for r in self._reducers[i:]) for i in range(len(self._reducers))]
        if lows[0] > n0:
            raise ValueError(f"k_min of the reducers ({lows[0]}) exceeds the {n0} visual tokens")

        def at(s: Fraction) -> list[int]:
            out, prev = [], n0
            for b, low in zip(base, lows):
                prev = max(low, min(prev, math.floor(s * b)))
                out.append(prev)
            return out

        breakpoints = sorted({Fraction(m, b) for b in set(base) for m in range(n0 + 1)})

        def count_at(i: int) -> float:
            return _count(layers, at(breakpoints[i]), n0, num_layers, count)

        def first_above(limit: float) -> int:
            # the count is non-decreasing along the breakpoints: binary search
            lo, hi = 0, len(breakpoints)
            while lo < hi:
                mid = (lo + hi) // 2
                if count_at(mid) > limit:
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        top = first_above(budget) - 1  # the largest breakpoint with count <= budget
        if top < 0:
            lowest = count_at(0)  # every reducer at its lower bound lows[i]
            head = (f"budget {budget:g} cannot be met for count={count!r} with reducers at layers "
                    f"{list(layers)}: the lowest reachable {count} at {n0} tokens and {num_layers} layers is "
                    f"{lowest:.4g}")
            if count == "final":
                # only the last reducer's k_min bounds the final count
                last = self._reducers[-1]
                if last.k_min == 1:
                    raise ValueError(f"{head} (a reducer keeps at least one token); raise the budget")
                raise ValueError(f"{head}, the k_min of the last reducer (layer {last.layer}); raise the "
                                 f"budget or lower that k_min")
            first = layers[0]
            causes, hints = [], ["raise the budget"]
            if first > 0:
                causes.append(f"the {first} layer(s) before the first reducer (layer {first}) leave all {n0} tokens")
                hints.append("put the first reducer earlier")
            if max(lows) > 1:
                causes.append(f"the reducers keep at least {lows} tokens (each one's k_min and those of the "
                              "reducers after it)")
                hints.append("lower k_min")
            if lows[-1] <= budget:  # the same budget is reachable as a final count
                hints.append("use count='final' if the budget is meant for the tokens leaving the last layer")
            raise ValueError(f"{head}" + (": " + " and ".join(causes) if causes else
                                          " (a reducer keeps at least one token)") + "; "
                             + ", ".join(hints[:-1]) + (" or " if len(hints) > 1 else "") + hints[-1])
        best_count = count_at(top)
        lo, hi = 0, top  # the smallest breakpoint reaching best_count
        while lo < hi:
            mid = (lo + hi) // 2
            if count_at(mid) >= best_count:
                hi = mid
            else:
                lo = mid + 1
        best = at(breakpoints[lo])
        reducers = [dataclasses.replace(r, keep=k) for r, k in zip(self._reducers, best)]
        return Theta(reducers, name=name)

    def as_fractions(self, num_visual_tokens: int, *, name: str | None = None) -> "Theta":
        """The same reducers with each count keep turned into the fraction ``kept / incoming`` of the
        schedule at ``num_visual_tokens``: the identical schedule at that count, proportional at any other.

        For models whose images give different visual counts (LLaVA-NeXT,
        LLaVA-OneVision, Qwen2(.5)-VL), where a count designed for one image
        would be clipped at a smaller one and leave most tokens of a larger
        one. Keeps that already are fractions stay as they are. Exact: the
        fraction ``k / n`` is read back as that rational (see the module
        docstring; denominators up to 10**6), so ``floor(k / n * n) == k``.
        The name defaults to this Θ's.

        Raises:
            ValueError: if a count does not fit (see :meth:`schedule`), or if
                a fraction cannot be stored exactly (incoming counts above 10**6).
        """
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        sched = self.schedule(num_visual_tokens)
        reducers = [r if r.is_fraction else dataclasses.replace(r, keep=float(Fraction(kept, incoming)))
                    for r, (_, incoming, kept) in zip(self._reducers, sched)]
        out = Theta(reducers, name=self._name if name is None else name)
        if out.schedule(num_visual_tokens) != sched:
            raise ValueError(f"as_fractions: the schedule at {num_visual_tokens} visual tokens cannot be stored "
                             "exactly as fractions (incoming counts above 10**6)")
        return out

    # ---- serialisation
    def to_dict(self) -> dict:
        """The versioned schema as a dict (see the module docstring)."""
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "name": self._name,
            "reducers": [r.to_dict() for r in self._reducers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Theta":
        """Validate and load the versioned schema (see the module docstring)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a Theta document must be a JSON object/mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_TOP_FIELDS), key=str)
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}; allowed: {list(_TOP_FIELDS)}")
        for required in ("schema", "version", "reducers"):
            if required not in data:
                raise ValueError(f"missing the required top-level key {required!r}")
        if data["schema"] != SCHEMA:
            raise ValueError(f"schema must be {SCHEMA!r}, got {data['schema']!r}")
        version = data["version"]
        if not is_int(version) or version != SCHEMA_VERSION:
            raise ValueError(f"version: unsupported schema version {version!r} (supported: {SCHEMA_VERSION})")
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or null, got {type(name).__name__}")
        reducers = data["reducers"]
        if not isinstance(reducers, (list, tuple)):
            raise TypeError(f"reducers must be a list, got {type(reducers).__name__}")
        for i, r in enumerate(reducers):
            if not isinstance(r, Mapping):
                raise TypeError(f"reducers[{i}] must be an object/mapping, got {type(r).__name__}")
        return cls(reducers, name=name)

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int | None = 2) -> str:
        """Serialise to JSON (floats by ``repr``: exact round trip); also write ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)
        if path is not None:
            with open(os.fspath(path), "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "Theta":
        """Load from a JSON string, or from a file given as a path (``str`` or ``os.PathLike``).

        A ``str`` whose first non-blank character is ``{`` or ``[`` is parsed
        as JSON text; any other ``str`` is a path. Besides :meth:`from_dict`'s
        checks, a key repeated in the top-level object or in a reducer is a
        ``ValueError`` naming it (``json`` alone would keep the last value).
        """
        if isinstance(text_or_path, os.PathLike) or (
            isinstance(text_or_path, str) and not text_or_path.lstrip().startswith(("{", "["))
        ):
            with open(os.fspath(text_or_path), encoding="utf-8") as f:
                text = f.read()
        elif isinstance(text_or_path, str):
            text = text_or_path
        else:
            raise TypeError(
                f"text_or_path must be a JSON string or a path, got {type(text_or_path).__name__}"
            )

        def reject_constant(c: str):
            raise ValueError(f"non-finite number {c} is not allowed")

        try:
            data = json.loads(text, parse_constant=reject_constant, object_pairs_hook=_KeyCheckedObject)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON for a Theta: {exc}") from None
        # a plain dict keeps the last of repeated keys: refuse them, as unknown keys are refused
        _refuse_duplicates(data, "top-level")
        if isinstance(data, Mapping) and isinstance(data.get("reducers"), list):
            for i, r in enumerate(data["reducers"]):
                try:
                    _refuse_duplicates(r, "reducer")
                except ValueError as exc:
                    raise ValueError(f"reducers[{i}]: {exc}") from None
        return cls.from_dict(data)

    # ---- presets (defined in eos_kernels.presets)
    @classmethod
    def fastv(cls, layer: int, keep: int | float, *, name: str | None = None) -> "Theta":
        """FastV: one prune reducer at ``layer`` keeping ``keep`` (count or fraction).

        FastV's "prune after layer K" (1-indexed K, keeping 1 − R of the tokens)
        is ``Theta.fastv(K - 1, 1 - R)``, e.g. K=2, R=50% → ``fastv(1, 0.5)``.
        """
        return _presets.fastv(layer, keep, name=name)

    @classmethod
    def sparsevlm(cls, version: int, budget: int) -> "Theta":
        """SparseVLM's public schedule: prune corners after layers 2, 6, 15.

        Versions 1 and 2, budgets 192, 128, 96, 64 (:data:`SPARSEVLM_SCHEDULES`).
        The budget is SparseVLM's "retain" label (its ``mean_leaving`` is
        192.4375 for v2/192, see :meth:`token_report`).
        """
        return _presets.sparsevlm(version, budget)

    @classmethod
    def tome(
        cls,
        budget: float | None,
        layers: Sequence[int] = SPARSEVLM_LAYERS,
        *,
        count: str = "mean_leaving",
        schedule: Sequence[int | float] | None = None,
        num_visual_tokens: int = 576,
        num_layers: int = 32,
        name: str | None = None,
    ) -> "Theta":
        """ToMe-style hard merge (γ=1, τ=1e-4, θ=−1e9, ρ=ν=0) at ``layers``.

        Retain schedule: ``schedule`` (one keep per layer) if given, else
        SparseVLM v2's schedule at the published budget nearest ``budget``
        (its keep ratios, applied at ``layers``); then, if ``budget`` is not
        None, rescaled with :meth:`rescale` so that ``count`` is <= ``budget``
        at ``num_visual_tokens``/``num_layers``. ``budget=None`` with a
        ``schedule`` uses the schedule as given.
        """
        return _presets.tome(budget, layers, count=count, schedule=schedule, num_visual_tokens=num_visual_tokens,
                             num_layers=num_layers, name=name)

    @classmethod
    def pool(
        cls,
        budget: float | None,
        layers: Sequence[int] = SPARSEVLM_LAYERS,
        *,
        count: str = "mean_leaving",
        schedule: Sequence[int | float] | None = None,
        num_visual_tokens: int = 576,
        num_layers: int = 32,
        name: str | None = None,
    ) -> "Theta":
        """Uniform pooling (γ=1, τ=1e6, θ=−1e9, ρ=ν=0) at ``layers``; schedule as :meth:`tome`."""
        return _presets.pool(budget, layers, count=count, schedule=schedule, num_visual_tokens=num_visual_tokens,
                             num_layers=num_layers, name=name)

    @classmethod
    def paper(
        cls,
        budget: float,
        *,
        count: str = "mean_leaving",
        num_visual_tokens: int = 576,
        num_layers: int = 32,
    ) -> "Theta":
        """The paper's searched configuration Θ* (table 6), at a retain budget.

        Reducers at layers 3, 6, 16; layer 6 is the interior hybrid
        (γ=0.083, τ=0.22, θ=0.10, ρ=ν=0), layers 3 and 16 are prune corners.
        The paper does not publish its searched retain schedule, so the
        schedule here is an assumption: SparseVLM v2's keep ratios (its
        schedule at the published budget nearest ``budget``) applied at these
        three reducers, then rescaled with :meth:`rescale` so that ``count``
        is <= ``budget``.
        """
        return _presets.paper(budget, count=count, num_visual_tokens=num_visual_tokens, num_layers=num_layers)
