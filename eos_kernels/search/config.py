"""The search configuration: :class:`SearchConfig`, its defaults and how files and the CLI set it.

Every field can be set from Python (``SearchConfig(model=..., ...)``), from a
YAML or JSON file (:meth:`SearchConfig.from_file`: a mapping whose keys are the
field names; ``-`` and ``_`` are interchangeable) and from the command line
(``--field-name``); the command line overrides the file, which overrides the
defaults. An unknown key is a ``ValueError`` naming it and the known keys.

Defaults are table 5 of the paper where it gives one (AdamW, lr 1e-3, weight
decay 0, clip 1.0, cosine schedule with 5% warm-up, 4,000 steps, batch 4,
λ_a = 0.1, alignment layers every 4th layer, 3 reducer slots starting at layers
2, 6, 15 of 32, γ0 = τ0 = 0.5, θ0 = ρ0 = ν0 = 0, seed 42, bf16 on CUDA); see
the package docstring (:mod:`eos_kernels.search`) for the choices the paper
leaves open (λ_b, λ_c, the scaled layers, the warm-start discard, ...).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = [
    "SearchConfig",
    "PAPER_NUM_LAYERS",
    "PAPER_INIT_LAYERS",
    "default_align_layers",
    "scale_init_layers",
    "warm_start_discard",
]

#: Depth of LLaVA-1.5-7B, the model of table 5.
PAPER_NUM_LAYERS = 32
#: Table 5: the three reducer slots start at these layers of the 32-layer model.
PAPER_INIT_LAYERS = (2, 6, 15)

IMPLS = ("auto", "triton", "torch")
#: the search forward: the relaxed one (decision 7, every keep decision soft) or the paper's hard one (decisions 1-2)
FORWARDS = ("relaxed", "hard")
GATE_ESTIMATORS = ("score", "relaxed")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# fields that only steer one invocation: they may differ between a run and its --resume
RUN_CONTROL_FIELDS = frozenset({
    "output", "resume", "overwrite", "checkpoint_every", "stop_after", "progress", "plots", "impl", "device",
    "micro_batch_size", "eval", "eval_limit", "max_new_tokens", "attn_implementation",
})


@dataclass
class SearchConfig:
    """Options of ``eos_kernels.search.run`` / ``eos-search`` (one field per CLI option).

    Data and model:
        model: directory of a Hugging Face checkpoint (model + processor,
            ``from_pretrained``) of a supported family: LLaVA-1.5, LLaVA-NeXT,
            LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, Gemma 3 (the class from its
            config).
        data: LLaVA-format JSON: a list of ``{"image": path, "conversations":
            [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
            "value": "..."}, ...]}`` (the data format, whatever the model
            family: prompts are rendered with the checkpoint's chat template).
        image_folder: folder the ``image`` paths are relative to (default: the
            folder of the ``data`` file).
        output: directory for ``theta.json``, ``search_state.pt``,
            ``log.jsonl`` and the plots.

    Objective (equations 13 and 14):
        budget: B, the target number of visual tokens leaving the last layer
            (required; 0 < B <= the model's visual tokens per image).
        max_reducers: C, the most active reduction layers (also the most
            reducers the exported Θ gets).
        lambda_ce: weight of the answer cross-entropy (1 in the paper; 0 leaves
            the alignment and the penalties, for ablations).
        lambda_align: λ_a. lambda_budget: λ_b. lambda_layers: λ_c.
        align_layers: 𝒜, decoder layers (0-indexed) whose *output* hidden
            states are aligned; default: every ``round(L / 8)``-th layer,
            ``{4, 8, ..., 28}`` for L = 32.

    Optimisation: steps, batch_size (global, split across ranks), lr,
    weight_decay, grad_clip, warmup_ratio (linear warm-up over
    ``round(warmup_ratio * steps)`` steps, then cosine to 0), adam_betas,
    adam_eps, seed, micro_batch_size (per-rank micro-batches with gradient
    accumulation; None: the whole per-rank batch at once).

    The search forward (:mod:`eos_kernels.search`, decisions 1-2 and 7):
        search_forward: "relaxed" (default; every layer's keep decision enters
            the forward softly, :mod:`eos_kernels.search.relaxed`) or "hard"
            (the paper's: hard top-K at the layers whose gate is above the
            threshold, equation 12's straight-through factor).
        gate_estimator: how the relaxed forward's gates learn. "score" (default;
            decision 8, :mod:`eos_kernels.search.sampled`): each sample runs
            a structure drawn from the gates whose counts meet the budget by
            construction, and a gate moves by how much better the samples
            that ran without (or with) its layer did (score function, leave-
            one-out baseline); the c's become each layer's claim on the
            budget's reduction. "relaxed" (decision 7): gates enter softly
            (then as binary-concrete samples) and the budget is a penalty.
        temperature_start, temperature_end: T of the relaxed soft top-K (nats of
            the importance score), annealed geometrically over the steps.
        sharpen_from, sharpness_end: from this share of the relaxed steps on,
            the gates are binary-concrete samples per sample (on with
            probability g) of temperature λ falling geometrically from 1 to
            ``sharpness_end``, so that the forward ends at the deployed
            structure (ĝ → 1[g > 1/2]).
        hard_finish: share of the steps, at the end, run with the paper's hard
            forward on the structure the relaxed steps reached (layers and
            counts frozen), so that the operator parameters Ω finish on the
            exact deployed forward (0: relaxed to the end). Relaxed only.
        max_flops: a cap on the estimated prefill FLOPs ratio of the searched Θ
            (``Theta.token_report``'s formula on the relaxed forward's expected
            token chain), as a one-sided penalty weighted by lambda_flops (a
            wall: 100). "auto" (default, relaxed forward): the warm start's ratio
            plus half of what it saves, ``F_ws + (1 - F_ws) / 2``; None: no cap.
            Why a cap at all: the paper's objective bounds only the final count
            and the number of active layers, and a gradient that reaches every
            layer finds that a reducer just before the last layer meets any
            final budget at no cost in accuracy -- and saves nothing. The hard
            forward cannot move a reducer, so "auto" means no cap there.

    Search space (equations 10-12, :class:`~eos_kernels.search_space.SearchSpace`):
        init_layers: the reducer slots that start active (default: 2, 6, 15
            scaled to the model's depth, the first ``max_reducers`` of them).
        init_gate, off_gate: initial g at the slots / elsewhere (off_gate None:
            0.01, or for sampled structures min(0.2, max_reducers / (L - 1))).
        init_discard: initial c at the slots; None: the warm start that meets
            the budget (:func:`warm_start_discard`). off_discard: c elsewhere.
        gamma0, tau0, theta0, rho0, nu0: initial operator values.
        gate_temperature, keep_temperature: T_g, T_c (None: T_g = 4 with the
            relaxed forward, whose gates must be able to move, 1 with the hard
            one, the paper's). alpha: α of eq. 12 (on
            log-scores). beta: the operator's gate sharpness. k_min: K_min.
        gate_threshold: a layer reduces when g > this (search and export).

    Local moves (not in the paper; :mod:`eos_kernels.search`, decision 6):
        local_moves_every: every that many steps, try moving each active
            reducer to a neighbouring layer and shifting retained tokens
            between active reducers, keeping the best candidate that lowers
            the answer CE on a fixed probe set (0: off, the paper's search).
        local_moves_samples: the probe set: the first that many search examples.
        local_moves_margin: a candidate must lower the probe CE by more than
            this (nats per answer token).
        local_moves_factor: a shift multiplies one reducer's kept fraction by
            this and another's by its inverse.

    Execution: impl ("auto" | "triton" | "torch", the operator), device
    ("auto": cuda:<local rank> when CUDA is available, else cpu), dtype (model
    weights; "auto": bfloat16 on CUDA, float32 on CPU), autocast (bf16 autocast
    on CUDA; ignored on CPU), attn_implementation (None: the checkpoint's).

    Run control: checkpoint_every (steps; 0: only at the end), resume,
    overwrite (replace files already in the output folder: start a search over,
    replace an evaluation's ``eval.json``; without it nothing there is written over),
    stop_after (end this invocation after that many steps in total, with a
    checkpoint; the schedule still spans ``steps``), progress (tqdm bar),
    plots (draw trajectories/profile/loss PNGs from ``log.jsonl`` at the end;
    ``eos_kernels.search.plots.plot_log`` draws them later).

    Evaluation (``eos-search --eval``): eval (Θ JSON files, preset names or
    "none"), eval_limit (first N examples), max_new_tokens.
    """

    # data and model
    model: str | None = None
    data: str | None = None
    image_folder: str | None = None
    output: str = "eos-search-output"
    # objective
    budget: float | None = None
    max_reducers: int = 3
    lambda_ce: float = 1.0
    lambda_align: float = 0.1
    lambda_budget: float = 10.0
    lambda_layers: float = 10.0
    align_layers: list[int] | None = None
    lambda_flops: float = 100.0
    max_flops: float | str | None = "auto"
    # the search forward
    search_forward: str = "relaxed"
    gate_estimator: str = "score"
    temperature_start: float = 0.5
    temperature_end: float = 0.05
    sharpen_from: float = 0.35
    sharpness_end: float = 0.02
    hard_finish: float = 0.25
    # optimisation
    steps: int = 4000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_ratio: float = 0.05
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    seed: int = 42
    micro_batch_size: int | None = None
    # search space
    init_layers: list[int] | None = None
    init_gate: float = 0.95
    off_gate: float | None = None
    init_discard: float | None = None
    off_discard: float = 0.5
    gamma0: float = 0.5
    tau0: float = 0.5
    theta0: float = 0.0
    rho0: float = 0.0
    nu0: float = 0.0
    gate_temperature: float | None = None
    keep_temperature: float = 1.0
    alpha: float = 10.0
    beta: float = 10.0
    k_min: int = 1
    gate_threshold: float = 0.5
    # local moves (not in the paper; see eos_kernels.search, decision 6)
    local_moves_every: int = 0
    local_moves_samples: int = 32
    local_moves_margin: float = 0.005
    local_moves_factor: float = 1.25
    # execution
    impl: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    autocast: bool = True
    attn_implementation: str | None = None
    # run control
    checkpoint_every: int = 200
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    progress: bool = True
    plots: bool = True
    # evaluation
    eval: list[str] | None = None
    eval_limit: int | None = None
    max_new_tokens: int = 16

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: "SearchConfig | None" = None,
                  source: str = "config") -> "SearchConfig":
        """A config from a mapping (keys: field names, ``-`` or ``_``), on top of ``base``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping of option names to values, got {type(data).__name__}")
        names = set(cls.field_names())
        values = dataclasses.asdict(base) if base is not None else {}
        unknown = []
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in names:
                unknown.append(str(key))
                continue
            values[name] = value
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {sorted(unknown)}; known options: "
                             f"{', '.join(sorted(names))}")
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, base: "SearchConfig | None" = None) -> "SearchConfig":
        """Load a YAML (``.yaml``/``.yml``) or JSON file of options."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"config file {path}: invalid YAML: {exc}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"config file {path}: invalid JSON: {exc}") from None
        if data is None:
            data = {}
        return cls.from_dict(data, base=base, source=f"config file {path}")

    @classmethod
    def coerce(cls, config: "SearchConfig | Mapping[str, Any] | None" = None, **overrides) -> "SearchConfig":
        """A validated config from a SearchConfig, a mapping or None, plus keyword overrides."""
        if config is None:
            config = cls()
        elif isinstance(config, Mapping):
            config = cls.from_dict(config)
        elif not isinstance(config, cls):
            raise TypeError(f"config must be a SearchConfig or a mapping, got {type(config).__name__}")
        if overrides:
            config = cls.from_dict(overrides, base=config, source="keyword arguments")
        config.validate()
        return config

    def replace(self, **changes) -> "SearchConfig":
        return SearchConfig.from_dict(changes, base=self, source="replace()")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Types and ranges of every field (``ValueError`` naming the option)."""

        def is_int(x):
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def is_real(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        def need_int(name, lo=None, hi=None, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if not is_int(v):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"{name} must be {rng}, got {v}")
            setattr(self, name, int(v))

        def need_real(name, lo=None, hi=None, lo_open=False, hi_open=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if not is_real(v) or not math.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            v = float(v)
            bad = (lo is not None and (v <= lo if lo_open else v < lo)) or \
                  (hi is not None and (v >= hi if hi_open else v > hi))
            if bad:
                lb = "(" if lo_open else "["
                hb = ")" if hi_open else "]"
                raise ValueError(f"{name} must be in {lb}{'-inf' if lo is None else lo}, "
                                 f"{'inf' if hi is None else hi}{hb}, got {v!r}")
            setattr(self, name, v)

        def need_str(name, optional=False, choices=None):
            v = getattr(self, name)
            if v is None and optional:
                return
            if not isinstance(v, str) or not v:
                raise ValueError(f"{name} must be a non-empty string, got {v!r}")
            if choices is not None and v not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {v!r}")

        def need_bool(name):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")

        def need_int_list(name, optional=True):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(is_int(x) for x in v):
                raise ValueError(f"{name} must be a list of integers, got {v!r}")
            if any(x < 0 for x in v):
                raise ValueError(f"{name} must hold layers >= 0, got {list(v)}")
            if len(set(v)) != len(v):
                raise ValueError(f"{name} must not repeat a layer, got {list(v)}")
            setattr(self, name, [int(x) for x in v])

        need_str("model", optional=True)
        need_str("data", optional=True)
        need_str("image_folder", optional=True)
        need_str("output")
        need_real("budget", lo=0.0, lo_open=True, optional=True)
        need_int("max_reducers", lo=1)
        for name in ("lambda_ce", "lambda_align", "lambda_budget", "lambda_layers", "lambda_flops"):
            need_real(name, lo=0.0)
        if isinstance(self.max_flops, str):  # the command line's spelling
            word = self.max_flops.strip().lower()
            if word in ("none", "auto"):
                self.max_flops = None if word == "none" else "auto"
            else:
                try:
                    self.max_flops = float(word)
                except ValueError:
                    raise ValueError(f"max_flops must be a number in (0, 1], 'auto' or 'none', got "
                                     f"{self.max_flops!r}") from None
        if self.max_flops != "auto":
            need_real("max_flops", lo=0.0, hi=1.0, lo_open=True, optional=True)
        need_str("search_forward", choices=FORWARDS)
        need_str("gate_estimator", choices=GATE_ESTIMATORS)
        if self.max_flops not in (None, "auto") and self.search_forward != "relaxed":
            raise ValueError("max_flops needs search_forward='relaxed' (the hard forward has no expected FLOPs "
                             "that depend on every layer's decision)")
        need_real("temperature_start", lo=0.0, lo_open=True)
        need_real("temperature_end", lo=0.0, lo_open=True)
        if self.temperature_end > self.temperature_start:
            raise ValueError(f"temperature_end ({self.temperature_end}) must be <= temperature_start "
                             f"({self.temperature_start}): the soft top-K anneals towards the hard one")
        need_real("sharpen_from", lo=0.0, hi=1.0, hi_open=True)
        need_real("hard_finish", lo=0.0, hi=1.0, hi_open=True)
        need_real("sharpness_end", lo=0.0, hi=1.0, lo_open=True)
        need_int_list("align_layers")
        need_int("steps", lo=1)
        need_int("batch_size", lo=1)
        need_real("lr", lo=0.0, lo_open=True)
        need_real("weight_decay", lo=0.0)
        need_real("grad_clip", lo=0.0, lo_open=True)
        need_real("warmup_ratio", lo=0.0, hi=1.0, hi_open=True)
        betas = self.adam_betas
        if (isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2
                or not all(is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        self.adam_betas = [float(b) for b in betas]
        need_real("adam_eps", lo=0.0, lo_open=True)
        need_int("seed", lo=0)
        need_int("micro_batch_size", lo=1, optional=True)
        need_int_list("init_layers")
        for name in ("init_gate", "off_gate", "off_discard"):
            need_real(name, lo=0.0, hi=1.0, lo_open=True, hi_open=True, optional=name == "off_gate")
        need_real("init_discard", lo=0.0, hi=1.0, lo_open=True, hi_open=True, optional=True)
        for name in ("gamma0", "rho0", "nu0"):
            need_real(name, lo=0.0, hi=1.0)
        need_real("tau0", lo=0.0, lo_open=True)
        need_real("theta0", lo=-1.0, hi=1.0)
        need_real("gate_temperature", lo=0.0, lo_open=True, optional=True)
        for name in ("keep_temperature", "alpha", "beta"):
            need_real(name, lo=0.0, lo_open=True)
        need_int("k_min", lo=1)
        need_real("gate_threshold", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        need_int("local_moves_every", lo=0)
        need_int("local_moves_samples", lo=1)
        need_real("local_moves_margin", lo=0.0)
        need_real("local_moves_factor", lo=1.0, lo_open=True)
        if self.local_moves_every and self.search_forward != "hard":
            raise ValueError("local_moves_every needs search_forward='hard': the local moves probe the paper's hard "
                             "forward (decision 6); the relaxed forward reaches every layer by its gradient")
        need_str("impl", choices=IMPLS)
        need_str("device")
        need_str("dtype", choices=DTYPES)
        need_bool("autocast")
        need_str("attn_implementation", optional=True)
        need_int("checkpoint_every", lo=0)
        need_bool("resume")
        need_bool("overwrite")
        need_int("stop_after", lo=1, optional=True)
        need_bool("progress")
        need_bool("plots")
        if self.eval is not None:
            if isinstance(self.eval, str):
                self.eval = [self.eval]
            if (isinstance(self.eval, (bytes,)) or not isinstance(self.eval, Sequence) or not self.eval
                    or not all(isinstance(x, str) and x for x in self.eval)):
                raise ValueError(f"eval must be a list of Θ JSON paths or preset names, got {self.eval!r}")
            self.eval = list(self.eval)
        need_int("eval_limit", lo=1, optional=True)
        need_int("max_new_tokens", lo=1)

    @property
    def sampled(self) -> bool:
        """Whether the search runs sampled structures (decision 8): the relaxed forward with gate_estimator
        "score"."""
        return self.search_forward == "relaxed" and self.gate_estimator == "score"

    def resolved_off_gate(self, num_layers: int) -> float:
        """The initial g of the layers outside the warm start: the option, else 0.01, or for sampled structures
        (decision 8) min(0.2, max_reducers / (num_layers - 1)): each such layer is drawn in that share of the
        samples, so that the score function sees it on as well as off."""
        if self.off_gate is not None:
            return self.off_gate
        if self.sampled:
            return min(0.2, self.max_reducers / max(1, num_layers - 1))
        return 0.01

    @property
    def resolved_gate_temperature(self) -> float:
        """T_g: the option, else 4 for the relaxed forward and 1 (the paper's) for the hard one."""
        if self.gate_temperature is not None:
            return self.gate_temperature
        return 4.0 if self.search_forward == "relaxed" else 1.0

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError("missing required option(s): " + ", ".join(
                f"{n} (--{n.replace('_', '-')})" for n in missing))


# ---------------------------------------------------------------------- depth-dependent defaults
def scale_init_layers(num_layers: int, slots: int | None = None,
                      layers: Sequence[int] = PAPER_INIT_LAYERS) -> list[int]:
    """The paper's slots (2, 6, 15 of 32 layers) scaled to ``num_layers``.

    Layer ``l`` of 32 becomes ``floor(l · L / 32 + 1/2)`` (identity at L = 32;
    (0, 1, 3) at L = 6; (3, 8, 19) at L = 40); a slot that lands on an earlier
    slot moves to the next free layer. At most ``slots`` (and at most L) slots.
    """
    out: list[int] = []
    for layer in layers:
        x = min(num_layers - 1, int(math.floor(layer * num_layers / PAPER_NUM_LAYERS + 0.5)))
        while x in out and x < num_layers - 1:
            x += 1
        if x in out:
            continue
        out.append(x)
    out = sorted(out)
    if slots is not None:
        out = out[:slots]
    return out


def default_align_layers(num_layers: int) -> list[int]:
    """Every ``s``-th layer with ``s = max(1, round(L / 8))``: 4, 8, ..., 28 at L = 32.

    The paper aligns layers {4, 8, ..., 28} of 32 (every 4th, seven layers);
    other depths keep about eight layers per step. Layers are 0-indexed decoder
    layers whose output is aligned; L = 6 gives 1..5, L = 40 gives 5, 10, ..., 35.
    """
    step = max(1, int(math.floor(num_layers / 8 + 0.5)))
    return list(range(step, num_layers, step))


def warm_start_discard(budget: float, num_visual_tokens: int, slots: int, init_gate: float) -> float:
    """Discard fraction c0 at each of ``slots`` reducers such that their chain meets the budget.

    ``N0 · (1 − g0 c0)^slots = B`` gives ``c0 = (1 − (B / N0)^(1/slots)) / g0``,
    clamped to [0.01, 0.99]: the warm start of §2.6 is a known feasible
    configuration (the deployed schedule keeps about B tokens at the end).
    """
    if slots <= 0:
        return 0.5
    keep = (budget / num_visual_tokens) ** (1.0 / slots)
    return min(0.99, max(0.01, (1.0 - keep) / init_gate))
