"""The search's local moves (decision 6 of :mod:`eos_kernels.search`; not in the paper, off by default).

Every ``local_moves_every`` steps the search tries what its gradient cannot see: moving an active
reducer to a free neighbouring layer, and shifting retained tokens between two active reducers. Each
candidate is scored by the answer CE of the search forward on a fixed probe set; the best one is kept
if it beats the current Θ by more than ``local_moves_margin`` without deploying more final tokens.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["LocalMoves", "probe_ce"]


@torch.no_grad()
def probe_ce(model, data, indices, batch_size: int, device, autocast, dist) -> float:
    """Answer CE per token of the current search forward on the probe set ``indices`` (each rank its share,
    ``batch_size`` at a time; all ranks return the same number)."""
    from eos_kernels.search import objective

    mine = indices[dist.rank::dist.world]
    pixel_dtype = next(model.parameters()).dtype
    sums = torch.zeros(2, dtype=torch.float64)
    for s in range(0, len(mine), batch_size):
        batch = data.collate(mine[s:s + batch_size]).to(device, pixel_dtype)
        terms = objective.data_terms(model, batch, None, autocast=autocast, align=False)
        sums[0] += float(terms["ce_sum"])
        sums[1] += terms["answer_tokens"]
    sums = sums.to(dist.comm_device)
    dist.all_sum(sums)
    return float(sums[0]) / max(float(sums[1]), 1.0)


class LocalMoves:
    """One round of local moves on the search's parameters, its deployment rule and its optimiser.

    Args:
        config: the :class:`~eos_kernels.search.config.SearchConfig` (``budget`` and the
            ``local_moves_*`` options).
        space: the :class:`~eos_kernels.search_space.SearchSpace`, edited in place.
        plan: the search's :class:`~eos_kernels.search.objective.SearchPlan` (which layers reduce).
        optimizer: AdamW over ``space``'s parameters; a move carries their moments along.
        n0, num_layers: the visual tokens per image (N_0) and the model's depth.
        probe: the probe CE of the current parameters (:func:`probe_ce` bound to the probe set).

    Calling it runs one round and returns its log record.
    """

    def __init__(self, config, space, plan, optimizer, n0: int, num_layers: int, probe: Callable[[], float]):
        self.config, self.space, self.plan, self.optimizer = config, space, plan, optimizer
        self.n0, self.num_layers, self.probe = n0, num_layers, probe

    def candidates(self):
        """(description, apply) pairs; ``apply`` edits the search parameters in place (no grad)."""
        space, cfg = self.space, self.config
        active = list(self.plan.export(self.n0).layers)
        L = self.num_layers
        out = []

        def swap(a, b):
            def apply():
                for p in space.parameters():
                    p.data[[a, b]] = p.data[[b, a]]
            return apply

        for layer in active:
            for other in (layer - 1, layer + 1):
                if 0 <= other < L and other not in active:
                    out.append(({"kind": "move", "from": layer, "to": other}, swap(layer, other)))

        def shift(a, b, f):
            def apply():
                g = space.gates().double()
                c = space.discard().double()
                for layer, factor in ((a, f), (b, 1.0 / f)):
                    u = min(0.999, float(1.0 - g[layer] * c[layer]) * factor)
                    new_c = min(1.0 - 1e-3, max(1e-3, (1.0 - u) / float(g[layer])))
                    space.w_c.data[layer] = math.log(new_c / (1.0 - new_c)) / space.keep_temperature
            return apply

        for a in active:
            for b in active:
                if a != b:
                    out.append(({"kind": "shift", "more": a, "fewer": b, "factor": cfg.local_moves_factor},
                                shift(a, b, cfg.local_moves_factor)))
        return out

    def __call__(self) -> dict:
        """Try every candidate on the probe set; keep the best one that lowers the CE by more than the margin.

        A candidate may not deploy more final visual tokens than the current Θ
        (or the budget, whichever is larger), so it cannot buy accuracy with tokens.
        """
        cfg, space = self.config, self.space
        saved = [p.detach().clone() for p in space.parameters()]
        base_final = self.plan.export(self.n0).token_report(self.n0, self.num_layers)["final"]
        limit = max(base_final, math.floor(cfg.budget))
        base = self.probe()
        tried, best = [], None
        with torch.no_grad():
            for desc, apply in self.candidates():
                apply()
                final = self.plan.export(self.n0).token_report(self.n0, self.num_layers)["final"]
                if final <= limit:
                    ce = self.probe()
                    tried.append({**desc, "ce": ce, "final": final})
                    if ce < base - cfg.local_moves_margin and (best is None or ce < best[0]["ce"]):
                        best = ({**desc, "ce": ce, "final": final}, apply)
                for p, v in zip(space.parameters(), saved):
                    p.data.copy_(v)
            if best is not None:
                desc, apply = best
                apply()
                if desc["kind"] == "move":  # the optimiser's moments travel with the parameters
                    a, b = desc["from"], desc["to"]
                    for p in space.parameters():
                        for buf in self.optimizer.state.get(p, {}).values():
                            if torch.is_tensor(buf) and buf.dim() == 1 and buf.shape[0] == self.num_layers:
                                buf[[a, b]] = buf[[b, a]]
        return {"base_ce": base, "tried": tried, "accepted": best[0] if best is not None else None}
