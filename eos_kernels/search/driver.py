"""The search loop: :func:`run`, its setup, steps, checkpoints, logs and plots.

See :mod:`eos_kernels.search` for the method and its decisions; this module is
the machinery. :func:`run` is the public entry point. The pieces it drives live
beside it: loading the model (:mod:`~eos_kernels.search.model_loading`), the
processes of a ``torchrun`` launch (:mod:`~eos_kernels.search.distributed`), the
checkpoint (:mod:`~eos_kernels.search.state`), the local moves
(:mod:`~eos_kernels.search.local_moves`) and the output folder
(:mod:`~eos_kernels.search.output`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import signal
import threading
import time
import types
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from eos_kernels.search.annealing import Annealing
from eos_kernels.search.config import (
    SearchConfig,
    default_align_layers,
    scale_init_layers,
    warm_start_discard,
)
from eos_kernels.search.distributed import Dist
from eos_kernels.search.local_moves import LocalMoves, probe_ce
from eos_kernels.search.model_loading import load_model, load_model_config, load_model_processor, resolve_device, \
    resolve_dtype
from eos_kernels.search.sampled import deployed_discard, log_budget_ratio, sample_structure, score_sums, \
    score_surrogate
from eos_kernels.search.output import LOG_FILE, STATE_FILE, THETA_FILE, refuse_to_replace, search_files
from eos_kernels.search.state import atomic_save, atomic_text, make_state, read_state, restore_state

__all__ = ["run", "SearchResult", "NonFiniteLossError", "TIMING_FIELDS"]

#: log fields that hold wall-clock measurements (excluded when comparing runs)
TIMING_FIELDS = ("step_time", "time")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is left as it was."""


@dataclasses.dataclass
class SearchResult:
    """What :func:`run` returns.

    Attributes:
        theta: the exported deployable Θ (also ``output/theta.json``).
        space: the search space (on the CPU) after the last step.
        step: steps completed in total.
        completed: True when all ``config.steps`` steps ran.
        output: the output directory; ``theta_path``, ``state_path``,
            ``log_path`` and ``plots`` the files written there (rank 0; other
            ranks get the same paths but write nothing).
        last: the last step's log record (None if no step ran in this call).
        config: the resolved configuration.
    """

    theta: Any
    space: Any
    step: int
    completed: bool
    output: str
    theta_path: str
    state_path: str
    log_path: str
    plots: list
    last: dict | None
    config: SearchConfig


@contextlib.contextmanager
def _defer_sigint():
    """Hold Ctrl-C during a block (the commit of a step) and raise it after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        received.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


class _CosineWarmup:
    """lr factor: linear warm-up ``(s + 1) / W`` for s < W, then ``(1 + cos(π (s − W) / (T − W))) / 2``."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- the search
class _Search:
    def __init__(self, config: SearchConfig, model=None, processor=None):
        self.config = config
        self.dist = Dist()
        self.device = None
        self.model = None
        self.patched = False
        self.capture = None
        self.relaxed = None
        self.log_file = None
        self.saved_flags = None
        self.bar = None
        self.saved_step = None
        try:
            self._setup(model, processor)
        except BaseException:
            self._cleanup()
            raise

    # ---------------------------------------------------------------- setup
    def _setup(self, model, processor):
        from eos_kernels._dispatch import resolve_impl
        from eos_kernels.integrations.auto import adapter_for
        from eos_kernels.search.data import BatchSampler, load_dataset
        from eos_kernels.search_space import SearchSpace

        cfg = self.config
        if model is None:
            cfg.require("model")
        cfg.require("data", "budget")
        dist = self.dist
        if model is not None:
            self.device = next(model.parameters()).device
        else:
            self.device = resolve_device(cfg.device, dist.local_rank)
        try:
            resolve_impl(cfg.impl, self.device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"impl={cfg.impl!r}: {exc}") from None
        dist.setup(self.device)
        dist.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        if cfg.batch_size % dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be a multiple of the "
                             f"number of processes ({dist.world})")
        self.local_batch = cfg.batch_size // dist.world

        # output folder
        self.out = os.path.abspath(cfg.output)
        self.state_path = os.path.join(self.out, STATE_FILE)
        self.theta_path = os.path.join(self.out, THETA_FILE)
        self.log_path = os.path.join(self.out, LOG_FILE)
        if cfg.resume:
            if not os.path.isfile(self.state_path):
                raise ValueError(f"--resume: no checkpoint {self.state_path} to resume from")
        elif not cfg.overwrite:
            if os.path.exists(self.state_path) or os.path.exists(self.log_path):
                raise ValueError(f"output folder {self.out} already holds a search ({STATE_FILE} / {LOG_FILE}); "
                                 "pass --resume to continue it or --overwrite to start over")
            # anything else the search would write, e.g. the user's own theta.json
            refuse_to_replace(self.out, search_files(cfg.plots), "this search")

        # the model's shape, processor and data first: every check before loading the weights
        if model is not None:
            try:
                self.adapter = adapter_for(model)
            except ValueError as exc:
                raise ValueError("model: " + str(exc).replace("eos_kernels.patch", "eos-search", 1)) from None
            self.adapter.check_model(model)
            mconfig = model.config
        else:
            mconfig, _, self.adapter = load_model_config(cfg.model)
        if processor is None:
            if cfg.model is None:
                raise ValueError("run(config, model=...) needs processor= or config.model (to load the processor)")
            processor = load_model_processor(cfg.model)
        self.num_layers = L = int(mconfig.text_config.num_hidden_layers)
        # a fixed count per image (LLaVA-1.5), or None: each image its own (LLaVA-NeXT, Qwen2(.5)-VL), and
        # N_0 is then the data's mean count (the budget is a mean per sample; Θ is exported as fractions)
        self.fixed_count = self.adapter.visual_tokens_per_image(types.SimpleNamespace(config=mconfig))
        image_size = getattr(getattr(mconfig, "vision_config", None), "image_size", None)
        if isinstance(image_size, (list, tuple)):
            image_size = image_size[0]
        self.data = load_dataset(cfg.data, processor, num_visual_tokens=self.fixed_count,
                                 image_token_id=mconfig.image_token_id, image_folder=cfg.image_folder,
                                 check_image_size=image_size if self.fixed_count is not None else None)
        n0 = self.fixed_count if self.fixed_count is not None else max(1, round(self.data.mean_visual_tokens))
        self.n0 = n0
        if cfg.budget > n0:
            raise ValueError(f"budget {cfg.budget:g} is larger than the {n0} visual tokens per image of this "
                             "model" + ("" if self.fixed_count is not None else " (the data's mean)")
                             + ": nothing to search for")
        if cfg.k_min > n0:
            raise ValueError(f"k_min {cfg.k_min} exceeds the {n0} visual tokens per image of this model"
                             + ("" if self.fixed_count is not None else " (the data's mean)")
                             + ": no reducer could keep that many")
        if cfg.budget < cfg.k_min and dist.main:
            # equation 11: K = max(K_min, floor((1 - g c) N)) whatever g and c, so the final count never goes
            # below K_min while the penalty on the continuous N_L keeps pushing: a search that cannot succeed
            warnings.warn(f"--budget {cfg.budget:g} cannot be reached: the lowest final visual count this search "
                          f"can deploy is {cfg.k_min} (--k-min {cfg.k_min}: every reducer keeps at least K_min "
                          f"tokens, however many of the --max-reducers {cfg.max_reducers} slots reduce); the "
                          f"exported Θ will keep {cfg.k_min} or more. Pass --budget >= {cfg.k_min} or a lower "
                          "--k-min", UserWarning, stacklevel=2)
        if cfg.max_reducers > L:
            raise ValueError(f"max_reducers {cfg.max_reducers} exceeds the model's {L} decoder layers")
        self.align_layers = list(cfg.align_layers) if cfg.align_layers is not None else default_align_layers(L)
        for x in self.align_layers:
            if x >= L:
                raise ValueError(f"align_layers: layer {x} does not exist in a model with {L} layers "
                                 f"(valid: 0..{L - 1})")
        self.init_layers = (list(cfg.init_layers) if cfg.init_layers is not None
                            else scale_init_layers(L, cfg.max_reducers))
        for x in self.init_layers:
            if x >= L:
                raise ValueError(f"init_layers: layer {x} does not exist in a model with {L} layers")
        if cfg.search_forward == "relaxed" and L - 1 in self.init_layers:
            raise ValueError(f"init_layers: layer {L - 1} is the model's last; a reducer there removes nothing that "
                             "runs (the relaxed search never places one there)")
        self.init_discard = (cfg.init_discard if cfg.init_discard is not None else
                             warm_start_discard(cfg.budget, n0, len(self.init_layers), cfg.init_gate))

        if model is None:
            model, _ = load_model(cfg.model, self.device, resolve_dtype(cfg.dtype, self.device),
                                  cfg.attn_implementation, processor=False)
            self.adapter.check_model(model)
        self.model = model
        self.text_sizes = self.adapter.text_sizes(model)
        if cfg.max_flops not in (None, "auto") and self.text_sizes is None:
            raise ValueError(f"max_flops: the FLOPs estimate needs the decoder's hidden and intermediate sizes, "
                             f"which {type(model).__name__}'s text config does not give")
        self.saved_flags = ([p.requires_grad for p in model.parameters()], model.training)
        model.requires_grad_(False)
        model.eval()
        self.sampler = BatchSampler(len(self.data), cfg.batch_size, cfg.seed)
        # the prefill-FLOPs estimate of Theta.token_report, on the expected chain of the relaxed search
        prompt_text = [e.prompt_length - e.num_visual_tokens for e in self.data.examples]
        self.text_tokens = int(round(sum(prompt_text) / len(prompt_text)))
        self.processor = processor
        self.probe_indices = list(range(min(cfg.local_moves_samples, len(self.data))))

        # search space, optimiser, schedule
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.space_kwargs = dict(
            num_layers=L, num_visual_tokens=n0, init_layers=tuple(self.init_layers),
            gate_temperature=cfg.resolved_gate_temperature, keep_temperature=cfg.keep_temperature,
            gamma0=cfg.gamma0, tau0=cfg.tau0, theta0=cfg.theta0, rho0=cfg.rho0, nu0=cfg.nu0,
            init_gate=cfg.init_gate, init_discard=self.init_discard, off_gate=cfg.resolved_off_gate(L),
            off_discard=cfg.off_discard, k_min=cfg.k_min, beta=cfg.beta, alpha=cfg.alpha,
        )
        self.space = SearchSpace(**self.space_kwargs).to(self.device)
        #: r = log(B / N0) of sampled structures (decision 8), None otherwise
        self.log_ratio = log_budget_ratio(cfg.budget, n0) if cfg.sampled else None
        self.annealing = Annealing(cfg, L)
        self.max_flops = self._flops_cap()
        self.params = list(self.space.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        warmup = int(math.floor(cfg.warmup_ratio * cfg.steps + 0.5))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _CosineWarmup(cfg.steps, warmup))
        self.step = 0
        self.data_state = self.sampler.initial_state()
        if cfg.resume:
            self._load_state()
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
            if (cfg.autocast and self.device.type == "cuda") else None

        # make sure no rank writes before every rank has checked the output folder
        self.dist.barrier()

    # ---------------------------------------------------------------- state
    def _state(self) -> dict:
        return make_state(step=self.step, space=self.space, space_kwargs=self.space_kwargs, optimizer=self.optimizer,
                          scheduler=self.scheduler, data_state=self.data_state, device=self.device,
                          config=self.config, world_size=self.dist.world)

    def _load_state(self):
        state = read_state(self.state_path, self.config, self.space_kwargs)
        self.step, self.data_state = restore_state(state, self.space, self.optimizer, self.scheduler, self.device)

    def _export(self):
        name = f"eos-search-B{self.config.budget:g}"
        return self._deployed_space().export(
            self.config.gate_threshold, self.config.max_reducers, self.n0, name=name,
            fractions=self.fixed_count is None, sharpness=self.annealing.sharpness(self.step),
            last_layer=self.config.search_forward == "hard")

    def _deployed_space(self):
        """The search space as it deploys: itself, or for sampled structures (decision 8) a copy whose c's at the
        deployed layers (g above the threshold, the max_reducers strongest, never the last) are c̃, their
        shares of the budget (:func:`~eos_kernels.search.sampled.deployed_discard`). Idempotent: c̃ of c̃ is c̃."""
        if self.log_ratio is None:
            return self.space
        cfg = self.config
        layers = self.space.export(cfg.gate_threshold, cfg.max_reducers, self.n0, last_layer=False).layers
        out = copy.deepcopy(self.space)
        with torch.no_grad():
            c = deployed_discard(self.space.discard(), layers, self.log_ratio)
            out.w_c.copy_(torch.logit(c.double()).to(out.w_c.dtype) / self.space.keep_temperature)
        return out

    # ---------------------------------------------------------------- the relaxed forward (decision 7)
    def _install_forward(self, relaxed: bool) -> None:
        """The search forward: the relaxed hooks (decision 7) or the patch with the search plan (decisions 1-2);
        then the layer capture, registered (again) after them so that it sees each layer's output after its
        reduction."""
        from eos_kernels.patching import patch_model
        from eos_kernels.search.objective import LayerCapture

        if self.capture is not None:
            self.capture.remove()
        if relaxed:
            from eos_kernels.search.relaxed import RelaxedForward

            self.relaxed = RelaxedForward(self.space, self.adapter).install(self.model)
        else:
            patch_model(self.model, None, self.adapter, plan=self.plan)
            self.patched = True
        self.capture = LayerCapture(self.adapter.decoder_layers(self.model), self.align_layers)

    def _enter_hard_finish(self) -> None:
        """From the relaxed forward to the paper's hard one on the structure reached (decision 7's finish)."""
        self.relaxed.remove()
        self.relaxed = None
        if self.log_ratio is not None:  # the deployed c̃ become the c's the hard forward and the export read
            with torch.no_grad():
                self.space.w_c.copy_(self._deployed_space().w_c)
        self.plan.export_kwargs = {"sharpness": self.annealing.sharpness(self.annealing.relaxed_steps),
                                   "last_layer": False}
        self._install_forward(relaxed=False)

    def _flops_cap(self) -> float | None:
        """The FLOPs cap of the relaxed search: ``max_flops``, or for "auto" the warm start's ratio plus half of
        what it saves (None for the hard forward or without the decoder's sizes)."""
        cfg = self.config
        if cfg.search_forward != "relaxed" or cfg.max_flops is None:
            return None
        if cfg.max_flops != "auto":
            return float(cfg.max_flops)
        if self.text_sizes is None:
            return None
        hidden, ffn = self.text_sizes
        warm = self._deployed_space().export(cfg.gate_threshold, cfg.max_reducers, self.n0, last_layer=False)
        ratio = warm.token_report(self.n0, self.num_layers, self.text_tokens, hidden_size=hidden,
                                  intermediate_size=ffn)["prefill_flops_ratio"]
        return ratio + (1.0 - ratio) / 2.0

    def _flops_ratio(self, chain):
        from eos_kernels.theta import prefill_flops

        hidden, ffn = self.text_sizes
        reduced, full = prefill_flops(list(chain), self.text_tokens, hidden, ffn)
        return reduced / full

    def _checkpoint(self):
        self.saved_step = self.step
        if not self.dist.main:
            return
        os.makedirs(self.out, exist_ok=True)
        atomic_save(self._state(), self.state_path)
        atomic_text(self._export().to_json() + "\n", self.theta_path)
        if self.log_file is not None:
            self.log_file.flush()

    def _open_log(self):
        if not self.dist.main:
            return
        os.makedirs(self.out, exist_ok=True)
        if self.config.resume and os.path.exists(self.log_path):
            # keep the lines of the steps the checkpoint holds (a crash may have logged more)
            with open(self.log_path, encoding="utf-8") as f:
                lines = [ln for ln in f if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.step]
            atomic_text("".join(keep), self.log_path)
            self.log_file = open(self.log_path, "a", encoding="utf-8")
        else:
            self.log_file = open(self.log_path, "w", encoding="utf-8")

    # ---------------------------------------------------------------- one step
    def _one_step(self) -> dict:
        from eos_kernels.search import objective

        cfg, dist, space, model = self.config, self.dist, self.space, self.model
        t0 = time.perf_counter()
        moves = None
        if cfg.local_moves_every and self.step > 0 and self.step % cfg.local_moves_every == 0:
            moves = self._local_moves()
        indices, next_state = self.sampler.batch(self.data_state)
        mine = indices[dist.rank * self.local_batch:(dist.rank + 1) * self.local_batch]
        pixel_dtype = next(model.parameters()).dtype
        batch = self.data.collate(mine).to(self.device, pixel_dtype)

        # global counts first: every rank normalises by the whole batch's tokens
        labels = batch.labels
        n_answer = int((labels[:, 1:] != -100).sum())
        n_text = int((batch.attention_mask.bool() & ~objective.visual_positions(model, batch.input_ids,
                                                                                  self.adapter)).sum())
        counts = torch.tensor([n_answer, n_text], dtype=torch.float64, device=dist.comm_device)
        dist.all_sum(counts)
        g_answer, g_text = float(counts[0]), float(counts[1])
        hidden = self.adapter.text_model(model).config.hidden_size

        # values used by this step's forward (logged)
        with torch.no_grad():
            values = {k: v.detach().double().cpu().tolist() for k, v in space.constrained_values().items()}
        self.optimizer.zero_grad(set_to_none=True)
        use_align = cfg.lambda_align > 0 and bool(self.align_layers)
        micro = batch.split(cfg.micro_batch_size) if cfg.micro_batch_size else [batch]
        ce_sum = torch.zeros((), dtype=torch.float64)
        sse = torch.zeros(len(self.align_layers), dtype=torch.float64)
        report = None
        soft = {}
        if self.relaxed is not None and not self.annealing.relaxed(self.step):
            self._enter_hard_finish()
        relaxed = self.relaxed is not None
        finishing = cfg.search_forward == "relaxed" and not relaxed  # layers and counts stay as they are
        noise = None
        if relaxed:  # decision 7: this step's annealing, and binary-concrete gates while they sharpen
            self.relaxed.temperature = self.annealing.temperature(self.step)
            self.relaxed.sharpness = self.annealing.sharpness(self.step)
            if self.annealing.stochastic(self.step):
                noise = self.annealing.gate_noise(self.step, len(indices))[:, dist.rank * self.local_batch:]
        kept = {}
        offset = 0
        sampled = relaxed and self.log_ratio is not None
        score = torch.zeros(2 + 2 * space.num_layers, dtype=torch.float64)  # decision 8's sums (score_sums)
        for mb in micro:
            if relaxed:
                mb_noise = None if noise is None else noise[:, offset:offset + len(mb)].to(self.device)
                offset += len(mb)
                structure = sample_structure(space.gates(), mb_noise) if sampled else None
                terms = objective.relaxed_data_terms(
                    model, mb, self.capture, self.relaxed, autocast=self.autocast, align=use_align,
                    adapter=self.adapter, gate_noise=None if sampled else mb_noise, structure=structure,
                    log_ratio=self.log_ratio)
                kept = terms["kept"]
                if sampled:
                    score += score_sums(cfg.lambda_ce * terms["ce_rows"] / max(g_answer, 1.0), structure)
            else:
                terms = objective.data_terms(model, mb, self.capture, autocast=self.autocast, align=use_align,
                                             adapter=self.adapter)
            loss = cfg.lambda_ce * terms["ce_sum"] / max(g_answer, 1.0)
            if use_align:
                per_layer = torch.stack([terms["align_sse"][i] for i in self.align_layers])
                loss = loss + cfg.lambda_align * per_layer.sum() / (len(self.align_layers) * max(g_text, 1.0) * hidden)
                sse += per_layer.detach().double().cpu()
            if loss.requires_grad:
                loss.backward()
            ce_sum += terms["ce_sum"].detach().double().cpu()
            report = terms["report"]
            soft = kept if relaxed else {k: float(v) for k, v in self.plan.soft_kept.items()}
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist.enabled:
            flat = torch.cat([p.grad.reshape(-1) for p in self.params]
                             + ([score.to(self.params[0].grad.dtype)] if sampled else [])).to(dist.comm_device)
            dist.all_sum(flat)
            offset = 0
            for p in self.params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p).to(p.device))
                offset += n
            if sampled:
                score = flat[offset:].double().cpu()
            stats = torch.cat([ce_sum.view(1), sse]).to(dist.comm_device)
            dist.all_sum(stats)
            stats = stats.cpu()
            ce_sum, sse = stats[0], stats[1:]
        elif sampled:  # the precision the ranks' sum would have
            score = score.to(self.params[0].grad.dtype).double()
        ce = float(ce_sum) / max(g_answer, 1.0)
        align = float(sse.sum()) / (len(self.align_layers) * max(g_text, 1.0) * hidden) if use_align else 0.0

        if finishing:  # only Ω trains: the penalties of the frozen g, c are constants
            zero = torch.zeros((), device=self.device)
            pen = {"budget": zero, "layers": zero, "flops": zero, "expected_flops": None,
                   "expected_tokens": torch.tensor(float(self._export().token_report(self.n0, self.num_layers)["final"]))}
        elif relaxed:
            pen = objective.relaxed_penalty_terms(space, self.relaxed.sharpness, cfg.budget, cfg.max_reducers,
                                                  flops=(self.max_flops, self._flops_ratio)
                                                  if self.text_sizes is not None else None,
                                                  stochastic=noise is not None, log_ratio=self.log_ratio)
        else:
            pen = objective.penalty_terms(space, cfg.budget, cfg.max_reducers)
            pen["flops"] = torch.zeros(())
        pen_loss = cfg.lambda_budget * pen["budget"] + cfg.lambda_layers * pen["layers"] \
            + cfg.lambda_flops * pen["flops"]
        if sampled:  # the gates' score function, from the whole batch's sums (equal on every rank)
            pen_loss = pen_loss + score_surrogate(space.gates(), score)
        if pen_loss.requires_grad:
            pen_loss.backward()
        budget_term, layers_term = float(pen["budget"].detach()), float(pen["layers"].detach())
        flops_term = float(pen["flops"].detach())
        total = (cfg.lambda_ce * ce + cfg.lambda_align * align + cfg.lambda_budget * budget_term
                 + cfg.lambda_layers * layers_term + cfg.lambda_flops * flops_term)
        step_no = self.step + 1
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f"non-finite loss at step {step_no} (ce={ce!r}, align={align!r}, budget={budget_term!r}, "
                f"layers={layers_term!r})")
        if finishing:  # None, not zero: AdamW's moments would still move a zero-gradient parameter
            self.space.w_g.grad = None
            self.space.w_c.grad = None
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None],
                                                          cfg.grad_clip))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"non-finite gradient at step {step_no} (norm {grad_norm!r}, loss {total!r})")
        lr = self.optimizer.param_groups[0]["lr"]
        if relaxed:  # the structure the relaxed forward is heading to: the Θ that would be deployed now
            schedule = self._export().schedule(self.n0)
        else:
            schedule = self.plan.last_schedule if report is not None and report.stages else []
            if self.fixed_count is None and schedule:  # samples differ: log the rule at N_0
                schedule = self.plan.export(self.n0).schedule(self.n0)
        deployed = schedule[-1][2] if schedule else self.n0
        record = {
            "step": step_no,
            "ce": ce,
            "align": align,
            "budget": budget_term,
            "layers": layers_term,
            "flops": flops_term,
            "total": total,
            "expected_tokens": float(pen["expected_tokens"].detach()),
            "deployed_tokens": deployed,
            "active_layers": [s[0] for s in schedule],
            "kept": [[s[0], s[1], s[2]] for s in schedule],
            "soft_kept": {str(k): v for k, v in sorted(soft.items())},
            **({"drawn": (score[2 + space.num_layers:] / max(float(score[0]), 1.0)).tolist()} if sampled else {}),
            **{k: values[k] for k in ("g", "c", "gamma", "tau", "theta", "rho", "nu")},
            "lr": lr,
            "grad_norm": grad_norm,
            "answer_tokens": int(g_answer),
            "text_tokens": int(g_text),
            "samples": indices,
            "local_moves": moves,
        }
        if finishing:
            record.update(forward="hard-finish")
        if relaxed:
            expected = pen["expected_flops"]
            record.update(forward="relaxed", temperature=self.relaxed.temperature, sharpness=self.relaxed.sharpness,
                          concrete_gates=noise is not None,
                          expected_flops=float(expected.detach()) if expected is not None else None,
                          max_flops=self.max_flops)
        return record, next_state, t0

    def _commit(self, record, next_state, t0):
        with _defer_sigint():
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.data_state = next_state
            record["step_time"] = time.perf_counter() - t0
            record["time"] = time.time()
            if self.log_file is not None:
                self.log_file.write(json.dumps(record, allow_nan=True) + "\n")
                self.log_file.flush()
        self.last = record

    # ---------------------------------------------------------------- the loop
    def run(self) -> SearchResult:
        from eos_kernels.search.objective import SearchPlan

        cfg = self.config
        self.plan = SearchPlan(self.space, cfg.max_reducers, cfg.gate_threshold, cfg.impl)
        # decision 6; _one_step calls it every local_moves_every steps
        self._local_moves = LocalMoves(cfg, self.space, self.plan, self.optimizer, self.n0, self.num_layers,
                                       probe=functools.partial(probe_ce, self.model, self.data, self.probe_indices,
                                                               self.local_batch, self.device, self.autocast,
                                                               self.dist))
        self.last = None
        self.saved_step = self.step if cfg.resume else None
        stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
        plots = []
        try:
            self._install_forward(relaxed=cfg.search_forward == "relaxed")
            self._open_log()
            if self.saved_step is None:
                self._checkpoint()  # step 0: the warm start, so a failure at step 1 leaves a good checkpoint
            if self.dist.main and cfg.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=cfg.steps, initial=self.step, desc="eos-search", dynamic_ncols=True)
            try:
                while self.step < stop:
                    record, next_state, t0 = self._one_step()
                    self._commit(record, next_state, t0)
                    if self.bar is not None:
                        self.bar.update(1)
                        self.bar.set_postfix(loss=f"{record['total']:.4g}", tokens=f"{record['expected_tokens']:.1f}",
                                             active=len(record["active_layers"]),
                                             s_step=f"{record['step_time']:.2f}")
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < stop:
                        self._checkpoint()
            except KeyboardInterrupt:
                if self.bar is not None:
                    self.bar.close()
                self._checkpoint()
                if self.dist.main:
                    print(f"\neos-search: interrupted; checkpoint of step {self.step} saved in {self.state_path} "
                          "(continue with --resume)", flush=True)
                raise
            except NonFiniteLossError as exc:
                where = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.state_path}"
                         if self.saved_step is not None else "no checkpoint was written")
                raise NonFiniteLossError(f"{exc}; stopping: {where}") from None
            self._checkpoint()
            if self.dist.main and cfg.plots:
                from eos_kernels.search.plots import plot_log

                try:
                    plots = plot_log(self.log_path, self.out)
                except Exception as exc:  # noqa: BLE001 - a plot must not lose a finished search
                    warnings.warn(f"eos-search: plotting failed: {exc}")
        finally:
            if self.bar is not None:
                self.bar.close()
            self._cleanup()
        space = self.space.to("cpu")
        return SearchResult(theta=self._export(), space=space, step=self.step, completed=self.step >= cfg.steps,
                            output=self.out, theta_path=self.theta_path, state_path=self.state_path,
                            log_path=self.log_path, plots=plots, last=self.last, config=cfg)

    def _cleanup(self):
        from eos_kernels.patching import unpatch_model

        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        if self.relaxed is not None:
            self.relaxed.remove()
            self.relaxed = None
        if self.patched:
            unpatch_model(self.model)
            self.patched = False
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        if self.saved_flags is not None:
            flags, training = self.saved_flags
            for p, f in zip(self.model.parameters(), flags):
                p.requires_grad_(f)
            self.model.train(training)
            self.saved_flags = None
        self.dist.teardown()


def run(config: SearchConfig | Mapping[str, Any] | None = None, *, model: nn.Module | None = None,
        processor=None, **overrides) -> SearchResult:
    """Run the EOS search (see :mod:`eos_kernels.search`).

    Args:
        config: a :class:`SearchConfig`, a mapping of its fields, or None.
        model: optionally an already loaded model of a supported family (LLaVA, LLaVA-NeXT,
            LLaVA-OneVision, Qwen2(.5)-VL, InternVL, Gemma 3: ``eos_kernels.integrations.auto.SUPPORTED_MODELS``)
            (used instead of loading ``config.model``; it is patched during the
            run and unpatched, with its ``requires_grad`` flags and mode
            restored, afterwards).
        processor: the processor matching ``model`` (default: loaded from
            ``config.model``).
        **overrides: fields of :class:`SearchConfig` overriding ``config``.

    Returns:
        :class:`SearchResult`.

    Raises:
        ValueError: bad options, data or model, found before any step.
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
        KeyboardInterrupt: after saving a checkpoint of the last completed step.
    """
    config = SearchConfig.coerce(config, **overrides)
    search = _Search(config, model=model, processor=processor)
    try:
        return search.run()
    except BaseException:
        search._cleanup()
        raise
