"""Sampled structures (decision 8, eos_kernels.search.sampled): the budget by construction and the gates' score
function, against brute force on small cases; then the search on the built-in model."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from eos_kernels.search.sampled import (deployed_discard, log_budget_ratio, mean_field_chain, sample_structure,
                                        score_sums, score_surrogate, structure_keep)


def _logistic(shape, seed):
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    return (torch.log(u) - torch.log1p(-u)).float()


def test_structures_are_drawn_with_probability_g_and_never_empty():
    g = torch.tensor([0.9, 0.2, 0.5, 0.05, 0.7])
    z = sample_structure(g, _logistic((5, 20000), 0))
    assert z.shape == (5, 20000) and set(z.unique().tolist()) <= {0.0, 1.0}
    assert (z[-1] == 0).all()  # the last layer never reduces
    assert (z[:-1].sum(0) >= 1).all()  # every sample reduces somewhere
    rate = z[:-1].mean(1)
    # drawn at rate g (σ = sqrt(g(1-g)/n) <= 0.0036; 5σ), plus the empty draws given to the largest g (layer 0:
    # P(all four off) = 0.1 * 0.8 * 0.5 * 0.95 = 0.038)
    want = torch.tensor([0.9 + 0.038, 0.2, 0.5, 0.05])
    assert torch.allclose(rate, want, atol=0.018), rate
    # the draw is the noise's: the same noise, the same structures
    assert torch.equal(sample_structure(g, _logistic((5, 64), 1)), sample_structure(g, _logistic((5, 64), 1)))


def test_every_structure_meets_the_budget_and_the_counts_get_gradients():
    r = log_budget_ratio(8, 64)
    assert math.isclose(r, math.log(1 / 8)) and log_budget_ratio(64, 64) == 0.0 and log_budget_ratio(80, 64) == 0.0
    c = torch.tensor([0.9, 0.3, 0.6, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    k = structure_keep(c, z, r)
    kd = k.detach()
    assert torch.allclose(kd.prod(0), torch.full((4,), 1 / 8, dtype=torch.float64), rtol=1e-12)
    assert (kd[z == 0] == 1).all() and (kd[z == 1] < 1).all()
    # one active layer takes the whole reduction; two share it by their log(1 - c)
    assert math.isclose(float(kd[0, 3]), 1 / 8, rel_tol=1e-12)
    a, b = math.log(1 - 0.9), math.log(1 - 0.6)
    assert math.isclose(float(kd[0, 0]), math.exp(r * a / (a + b)), rel_tol=1e-12)
    # a larger c claims more of the reduction: d k_0 / d c_0 < 0 in a shared sample, 0 where it is alone
    grad, = torch.autograd.grad(k[0, 0], c, retain_graph=True)
    assert grad[0] < 0 and grad[2] > 0 and grad[1] == 0
    grad, = torch.autograd.grad(k[0, 3], c)
    assert torch.count_nonzero(grad) == 0
    # gradcheck of the kept shares in c
    assert torch.autograd.gradcheck(lambda cc: structure_keep(cc, z, r), (c,))


def test_mean_field_and_deployed_counts_meet_the_budget():
    r = log_budget_ratio(8, 64)
    g = torch.tensor([0.9, 0.1, 0.7, 0.6, 0.3], dtype=torch.float64)
    c = torch.tensor([0.8, 0.5, 0.4, 0.6, 0.5], dtype=torch.float64)
    chain = mean_field_chain(g, c, 64, r)
    assert chain.shape == (5,) and math.isclose(float(chain[0]), 64)
    assert math.isclose(float(chain[-1]), 8, rel_tol=1e-12)
    assert (chain[1:] <= chain[:-1]).all()
    # at 0/1 gates the mean field is the structure itself
    hard = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    k = structure_keep(c, hard.unsqueeze(-1), r)[:, 0]
    assert torch.allclose(mean_field_chain(hard, c, 64, r), 64 * torch.cat([torch.ones(1, dtype=torch.float64),
                                                                             k[:-1].cumprod(0)]))
    ct = deployed_discard(c, [0, 2], r)
    assert math.isclose(float((1 - ct[0]) * (1 - ct[2])), 1 / 8, rel_tol=1e-12)
    assert torch.equal(ct[[1, 3, 4]], c[[1, 3, 4]])
    assert torch.allclose(deployed_discard(ct, [0, 2], r), ct, rtol=1e-12)  # idempotent
    assert torch.equal(deployed_discard(c, [], r), c)


def test_score_surrogate_is_the_leave_one_out_score_function():
    """The surrogate's gradient equals that of Σ_i (ℓ_i − b_i) log p(z_i) written out sample by sample; the sums
    add over micro-batches (and ranks)."""
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    noise = _logistic((5, 9), 3)
    z = sample_structure(torch.sigmoid(w), noise).double()
    ell = torch.rand(9, dtype=torch.float64)
    sums = score_sums(ell, z)
    grad, = torch.autograd.grad(score_surrogate(torch.sigmoid(w), sums), w)
    g = torch.sigmoid(w)
    n = 9
    base = (ell.sum() - ell) / (n - 1)
    logp = (z * torch.log(g).unsqueeze(-1) + (1 - z) * torch.log1p(-g).unsqueeze(-1)).sum(0)
    want, = torch.autograd.grad(((ell - base) * logp).sum(), w)
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-12)
    split = score_sums(ell[:4], z[:, :4]) + score_sums(ell[4:], z[:, 4:])
    assert torch.allclose(split, sums, rtol=1e-12)
    one = score_surrogate(torch.sigmoid(w), score_sums(ell[:1], z[:, :1]))
    assert float(one.detach()) == 0.0  # one sample: no baseline, no estimate


def test_score_function_estimate_is_unbiased():
    """On a loss of the structure alone, the mean of many batch estimates approaches the exact gradient of
    E_z[ℓ(z)] (2³ structures enumerated; the empty draw's rule included)."""
    w = torch.tensor([1.5, -0.5, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    table = {s: float(v) for s, v in zip(itertools.product((0, 1), repeat=3),
                                         [3.0, 0.5, 1.0, 2.0, 0.2, 1.5, 0.7, 0.4])}

    def loss(z):  # [4, B] -> [B]
        return torch.tensor([table[tuple(int(x) for x in col[:3])] for col in z.T], dtype=torch.float64)

    # exact: P(structure) with the empty draw moved to the largest gate (layer 0)
    g = torch.sigmoid(w)
    exact = torch.zeros((), dtype=torch.float64)
    for s in itertools.product((0, 1), repeat=3):
        p = torch.prod(torch.stack([g[i] if s[i] else 1 - g[i] for i in range(3)]))
        target = (1, 0, 0) if s == (0, 0, 0) else s
        exact = exact + p * table[target]
    want, = torch.autograd.grad(exact, w)
    total = torch.zeros(4, dtype=torch.float64)
    batches = 400
    for b in range(batches):
        z = sample_structure(torch.sigmoid(w), _logistic((4, 64), 100 + b)).double()
        grad, = torch.autograd.grad(score_surrogate(torch.sigmoid(w), score_sums(loss(z), z)), w)
        total += grad / 64  # the surrogate sums over the batch; E[ℓ] is a mean
    est = total / batches
    # the empty-draw rule is not in log p (a bias of P(empty) ~ 0.05 of layer 0's term); the rest is noise
    # (25600 samples): every entry within 0.05 of the exact gradient (|exact| ~ 0.1-0.5)
    assert est[3] == 0 and torch.allclose(est[:3], want[:3], atol=0.05), (est, want)
    assert (torch.sign(est[:3]) == torch.sign(want[:3])).all()


def test_the_structures_removal_is_the_hard_top_k_with_the_soft_gradient():
    """At an active layer a sampled structure removes what the deployed forward removes: floor(keep · n) of the
    present tokens, the highest scores; the gradient is the soft top-K's (straight through)."""
    from eos_kernels.search.relaxed import _straight_through_top_k, soft_threshold

    torch.manual_seed(0)
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    prev = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    keep = torch.tensor([0.5, 0.45, 0.3], dtype=torch.float64, requires_grad=True)
    t = soft_threshold(z, prev, keep, 0.2)
    soft = torch.sigmoid((z - t.unsqueeze(-1)) / 0.2)
    kappa = _straight_through_top_k(z, prev, keep, soft)
    got = (kappa * prev).detach()
    assert got.sum(-1).tolist() == [3.0, 2.0, 1.0]  # floor(0.5·7), floor(0.45·5), max(1, floor(0.3·2))
    for b in range(3):
        present = prev[b] > 0
        top = torch.where(present, z[b].detach(), torch.tensor(-math.inf, dtype=torch.float64)).argsort(
            descending=True)[:int(got[b].sum())]
        assert set(top.tolist()) == set(torch.nonzero(got[b]).flatten().tolist())
    w = torch.randn(3, 7, dtype=torch.float64)
    g_st = torch.autograd.grad((kappa * w).sum(), (z, keep), retain_graph=True)
    g_soft = torch.autograd.grad((soft * w).sum(), (z, keep))
    assert all(torch.equal(a, b) for a, b in zip(g_st, g_soft))


# --------------------------------------------------------------------------- the search on the built-in model
def test_sampled_search_logs_budget_met_structures_and_exports_the_budget(demo_search, tmp_path):
    from eos_kernels.search import SearchConfig, run

    model, processor, data = demo_search
    result = run(SearchConfig(data=data, output=str(tmp_path / "o"), budget=8, init_layers=[2, 4], steps=6,
                              batch_size=4, lr=5e-2, progress=False, plots=False, checkpoint_every=0,
                              lambda_align=0.0, hard_finish=0.5, seed=0),
                 model=model, processor=processor)
    log = [json.loads(line) for line in open(result.log_path)]
    relaxed = log[:3]  # hard_finish 0.5 of 6 steps
    assert all(math.isclose(r["expected_tokens"], 8, rel_tol=1e-6) and r["budget"] < 1e-12 for r in relaxed)
    assert all(len(r["drawn"]) == 8 and r["drawn"][-1] == 0 and sum(r["drawn"]) >= 1 for r in relaxed)
    assert all("drawn" not in r for r in log[3:])
    # the deployed Θ keeps the budget (floors of the shares: within one token a reducer)
    final = result.theta.schedule(64)[-1][2]
    assert 8 - len(result.theta.layers) <= final <= 8, result.theta.schedule(64)
    # the hard finish froze g and c: its steps deploy the same Θ
    assert log[3]["kept"] == log[-1]["kept"]
