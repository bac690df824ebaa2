"""The relaxed search's schedule over its steps (decision 7 of :mod:`eos_kernels.search`): the soft top-K's
temperature, the gates' sharpness, when the gates are sampled, their noise, and where the hard finish begins.

Everything is a function of the step number and the configuration, so a resumed or data-parallel search
follows the very same schedule."""
from __future__ import annotations

import math

import torch

__all__ = ["Annealing", "SAMPLED_SHARPNESS"]

#: λ of sampled structures (decision 8): their gates are 0/1 draws, and what deploys is 1[g > 1/2]
SAMPLED_SHARPNESS = 1e-6


class Annealing:
    """The schedule of a search of ``config.steps`` steps (the hard search has no relaxed steps)."""

    def __init__(self, config, num_layers: int):
        self.config = config
        self.num_layers = num_layers
        relaxed = config.search_forward == "relaxed"
        #: steps of the relaxed forward; the rest is the hard finish
        self.relaxed_steps = config.steps - int(math.floor(config.hard_finish * config.steps + 0.5)) if relaxed else 0

    def progress(self, step: int) -> float:
        """Progress through the relaxed steps, 0 at the first, 1 at the last and after."""
        return min(1.0, step / max(1, self.relaxed_steps - 1))

    def temperature(self, step: int) -> float:
        """T of the soft top-K: geometric from ``temperature_start`` to ``temperature_end``."""
        cfg = self.config
        return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** self.progress(step)

    def sharpness(self, step: int) -> float:
        """λ of the gates: 1 until ``sharpen_from``, then geometric to ``sharpness_end`` (1 for the hard search:
        the paper's rule)."""
        cfg = self.config
        if not self.relaxed_steps:
            return 1.0
        if cfg.sampled:
            return SAMPLED_SHARPNESS
        frac = self.progress(step)
        if frac <= cfg.sharpen_from:
            return 1.0
        return cfg.sharpness_end ** ((frac - cfg.sharpen_from) / (1.0 - cfg.sharpen_from))

    def relaxed(self, step: int) -> bool:
        return step < self.relaxed_steps

    def stochastic(self, step: int) -> bool:
        """Binary-concrete gates once the gates sharpen: a gate held between 0 and 1 would deploy as a coin flip,
        and a deterministic relaxed gate can hold one there (a layer at part strength costs little); sampled
        gates show the forward each layer wholly on or off, with probability g. Sampled structures (decision 8)
        draw theirs at every relaxed step."""
        return self.relaxed(step) and (self.config.sampled or self.progress(step) > self.config.sharpen_from)

    def gate_noise(self, step: int, batch: int) -> torch.Tensor:
        """Logistic noise [num_layers, global batch] of ``step``: the same on every rank and on a resume."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        u = torch.rand(self.num_layers, batch, generator=gen, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
        return (torch.log(u) - torch.log1p(-u)).float()
