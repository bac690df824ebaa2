"""The matched-cost comparison of eos-search --demo: frontiers, dominance, matched baselines, placements."""
import pytest

from eos_kernels.demo import compare
from eos_kernels.demo.baselines import FAMILIES, Candidate, placements, prune_at
from eos_kernels.demo.frontier import best_within, dominates, pareto_front
from eos_kernels.theta import Reducer, Theta


def test_dominates_means_more_accurate_at_no_more_flops():
    assert dominates(0.8, 0.5, 0.7, 0.5) and dominates(0.8, 0.4, 0.7, 0.5)
    assert not dominates(0.8, 0.6, 0.7, 0.5)  # more accurate but dearer
    assert not dominates(0.7, 0.4, 0.7, 0.5)  # as accurate: no
    assert not dominates(0.6, 0.4, 0.7, 0.5)


def test_pareto_front_and_best_within():
    pts = [("a", 0.3, 0.5), ("b", 0.5, 0.6), ("c", 0.4, 0.55), ("d", 0.6, 0.6), ("e", 0.7, 0.9), ("f", 0.45, 0.5)]
    acc, fl = (lambda p: p[2]), (lambda p: p[1])
    assert [p[0] for p in pareto_front(pts, acc, fl)] == ["a", "c", "b", "e"]
    assert best_within(pts, 0.45, acc, fl)[0] == "c"
    assert best_within(pts, 0.5, acc, fl)[0] == "b"  # ties in accuracy: the cheaper
    assert best_within(pts, 0.2, acc, fl) is None


def test_placements_end_at_the_budget_and_never_reduce_at_the_last_layer():
    n, L = 64, 8
    for fam in FAMILIES:
        for b in (4, 8, 16, 32):
            ps = placements(fam, b, n, L)
            assert ps, (fam, b)
            names = [t.name for t in ps]
            assert len(set(names)) == len(names)
            for t in ps:
                sched = t.schedule(n)
                assert sched[-1][2] == b and all(k < i for _, i, k in sched), (t.name, sched)
                assert max(t.layers) <= L - 2
                assert t.name.startswith(f"{fam}@{b}-L")
    assert len(placements("fastv", 8, 64, 8)) == 7
    assert {r.regime for t in placements("pool", 8, 64, 8) for r in t} == {"pool"}
    assert {r.regime for t in placements("merge", 8, 64, 8) for r in t} == {"merge"}
    assert {r.regime for t in placements("sparsevlm", 8, 64, 8) for r in t} == {"prune"}
    with pytest.raises(ValueError, match="family"):
        placements("tome", 8, 64, 8)
    with pytest.raises(ValueError, match="budget"):
        placements("fastv", 64, 64, 8)


def test_prune_at_keeps_the_layers_and_counts():
    theta = Theta([Reducer(2, 20, gamma=0.6, tau=0.3, rho=0.2), Reducer(4, 0.25, gamma=0.5)])
    p = prune_at(theta, 64, "p")
    assert p.schedule(64) == theta.schedule(64) and {r.regime for r in p} == {"prune"} and p.name == "p"


def _c(name, family, budget, flops, tuning, heldout=None):
    return Candidate(name, family, budget, Theta(name=name), flops, tuning,
                     None if heldout is None else {"accuracy": heldout})


def test_matched_baseline_is_the_best_tuned_one_within_budget_and_flops():
    cands = [_c("fastv@8-a", "fastv", 8, 0.50, 0.70), _c("fastv@8-b", "fastv", 8, 0.60, 0.90),
             _c("fastv@4-a", "fastv", 4, 0.45, 0.75), _c("fastv@16-a", "fastv", 16, 0.50, 0.95),
             _c("pool@8-a", "pool", 8, 0.52, 0.80)]
    searched = _c("eos@8", "eos", 8, 0.55, 0.85)
    m = compare.matched(cands, searched)
    # fastv@8-b is too dear, fastv@16-a keeps too many tokens: fastv@4-a (fewer tokens, cheaper) is the best
    assert m["fastv"].name == "fastv@4-a" and m["pool"].name == "pool@8-a"
    assert m["merge"] is None and m["sparsevlm"] is None
    chosen = [c.name for c in compare.to_evaluate(cands, [searched])]
    assert len(chosen) == len(set(chosen))
    assert {"fastv@4-a", "pool@8-a", "fastv@16-a"} <= set(chosen)  # matched ones and the tuning frontier
    assert "fastv@8-b" not in chosen  # off its family's frontier (fastv@16-a is cheaper and better)


def test_budget_summary_uses_held_out_accuracy_for_dominance():
    cands = [_c("fastv@8-a", "fastv", 8, 0.50, 0.70, heldout=0.60), _c("pool@8-a", "pool", 8, 0.52, 0.80, 0.82),
             _c("pool@8-b", "pool", 8, 0.70, 0.99, 0.70), _c("merge@16-a", "merge", 16, 0.40, 0.99, 0.99)]
    searched = _c("eos@8", "eos", 8, 0.55, 0.85, heldout=0.75)
    prune = _c("prune@8", "prune", 8, 0.55, 0.7, heldout=0.70)
    s = compare.budget_summary(8, searched, prune, cands)
    assert s["matched"]["pool"] == "pool@8-a" and s["best_matched"] == "pool@8-a"
    assert s["lead_over_best_matched"] == pytest.approx(0.75 - 0.82)
    assert s["lead_over_prune"] == pytest.approx(0.05)
    assert s["dominated_by"] == ["pool@8-a"]  # merge@16 keeps more tokens than the budget: not compared
    assert s["dominates"] == ["pool@8-b"]
