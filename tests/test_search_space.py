"""Tests for eos_kernels.search_space.SearchSpace (paper equations 10-13, table 5, §2.6)."""
import math

import pytest
import torch

from eos_kernels.search_space import SearchSpace
from eos_kernels.theta import Reducer, Theta

L, N0 = 32, 576


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _set(ss, **values):
    """Hand-set unconstrained parameters from lists/tensors."""
    with torch.no_grad():
        for name, v in values.items():
            getattr(ss, name).copy_(torch.as_tensor(v, dtype=torch.float32))


def _random_state(ss, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("w_g", "w_c", "w_gamma", "w_tau", "w_theta", "w_rho", "w_nu"):
            getattr(ss, name).copy_(torch.randn(ss.num_layers, generator=g) * 3)


class TestTransforms:
    def test_parameters(self):
        ss = SearchSpace(L, N0)
        names = dict(ss.named_parameters())
        assert set(names) == {"w_g", "w_c", "w_gamma", "w_tau", "w_theta", "w_rho", "w_nu"}
        assert all(p.shape == (L,) and p.requires_grad for p in names.values())

    @pytest.mark.parametrize("tg, tc, eps", [(1.0, 1.0, 1e-4), (2.5, 0.5, 1e-2)])
    def test_equation_10(self, tg, tc, eps):
        ss = SearchSpace(L, N0, gate_temperature=tg, keep_temperature=tc, eps=eps)
        _random_state(ss)
        w = {n: getattr(ss, n).detach().double().tolist() for n in
             ("w_g", "w_c", "w_gamma", "w_tau", "w_theta", "w_rho", "w_nu")}
        expected = {
            "g": [_sig(x * tg) for x in w["w_g"]],
            "c": [_sig(x * tc) for x in w["w_c"]],
            "gamma": [_sig(x) for x in w["w_gamma"]],
            "tau": [math.log1p(math.exp(x)) + eps for x in w["w_tau"]],
            "theta": [2 * _sig(x) - 1 for x in w["w_theta"]],
            "rho": [_sig(x) for x in w["w_rho"]],
            "nu": [_sig(x) for x in w["w_nu"]],
        }
        got = {"g": ss.gates(), "c": ss.discard(), "gamma": ss.gamma(), "tau": ss.tau(),
               "theta": ss.theta(), "rho": ss.rho(), "nu": ss.nu()}
        assert {k: v.shape for k, v in ss.constrained_values().items()} == {k: (L,) for k in expected}
        for key in expected:
            torch.testing.assert_close(got[key].double(), torch.tensor(expected[key], dtype=torch.float64),
                                       rtol=1e-6, atol=1e-6, msg=key)
            torch.testing.assert_close(ss.constrained_values()[key], got[key])

    def test_operator_params(self):
        ss = SearchSpace(L, N0)
        _random_state(ss, 1)
        p = ss.operator_params(7)
        assert set(p) == {"gamma", "tau", "theta", "rho", "nu"}
        for key, fn in (("gamma", ss.gamma), ("tau", ss.tau), ("theta", ss.theta), ("rho", ss.rho), ("nu", ss.nu)):
            assert p[key].dim() == 0 and p[key].requires_grad
            assert p[key].item() == fn()[7].item()
        sum(p.values()).backward()
        for name in ("w_gamma", "w_tau", "w_theta", "w_rho", "w_nu"):
            grad = getattr(ss, name).grad
            assert grad[7] != 0 and torch.count_nonzero(grad) == 1


class TestInitialisation:
    @pytest.mark.parametrize("tg, tc", [(1.0, 1.0), (3.0, 0.25)])
    def test_table_5(self, tg, tc):
        ss = SearchSpace(L, N0, gate_temperature=tg, keep_temperature=tc)
        active = torch.zeros(L, dtype=torch.bool)
        active[[2, 6, 15]] = True
        g, c = ss.gates(), ss.discard()
        torch.testing.assert_close(g[active], torch.full((3,), 0.95))
        torch.testing.assert_close(g[~active], torch.full((L - 3,), 0.01))
        torch.testing.assert_close(c, torch.full((L,), 0.5))
        torch.testing.assert_close(ss.gamma(), torch.full((L,), 0.5))
        torch.testing.assert_close(ss.tau(), torch.full((L,), 0.5))
        torch.testing.assert_close(ss.theta(), torch.zeros(L), atol=1e-7, rtol=0)
        # rho0 = nu0 = 0 lie on the sigmoid's boundary: they start init_margin inside
        torch.testing.assert_close(ss.rho(), torch.full((L,), 1e-3))
        torch.testing.assert_close(ss.nu(), torch.full((L,), 1e-3))
        assert ss.rho().max() < 1.01e-3 and ss.nu().max() < 1.01e-3

    def test_custom_values(self):
        ss = SearchSpace(12, 100, init_layers=(1, 5), init_gate=0.9, init_discard=(0.3, 0.7), off_gate=0.05,
                         off_discard=0.2, gamma0=0.1, tau0=2.0, theta0=-0.5, rho0=0.25, nu0=1.0, eps=1e-3)
        expected_g = [0.05] * 12
        expected_c = [0.2] * 12
        expected_g[1], expected_g[5] = 0.9, 0.9
        expected_c[1], expected_c[5] = 0.3, 0.7
        torch.testing.assert_close(ss.gates(), torch.tensor(expected_g))
        torch.testing.assert_close(ss.discard(), torch.tensor(expected_c))
        torch.testing.assert_close(ss.gamma(), torch.full((12,), 0.1))
        torch.testing.assert_close(ss.tau(), torch.full((12,), 2.0))
        torch.testing.assert_close(ss.theta(), torch.full((12,), -0.5))
        torch.testing.assert_close(ss.rho(), torch.full((12,), 0.25))
        torch.testing.assert_close(ss.nu(), torch.full((12,), 1.0 - 1e-3))

    def test_large_and_small_tau0(self):
        for tau0 in (1e-3, 50.0):
            ss = SearchSpace(4, 10, init_layers=(), tau0=tau0)
            torch.testing.assert_close(ss.tau(), torch.full((4,), tau0))


class TestCounts:
    def test_expected_tokens(self):
        ss = SearchSpace(L, N0)
        _random_state(ss, 2)
        g = ss.gates().detach().double().tolist()
        c = ss.discard().detach().double().tolist()
        chain = [float(N0)]
        for l in range(L):
            chain.append((1 - g[l] * c[l]) * chain[-1])
        got = ss.expected_tokens()
        assert got.shape == (L + 1,)
        torch.testing.assert_close(got.double(), torch.tensor(chain, dtype=torch.float64), rtol=1e-5, atol=1e-5)

    def test_kept_count_equation_11(self):
        ss = SearchSpace(8, N0, init_layers=(), k_min=3)
        _set(ss, w_g=[10.0, 0.0, -10.0, 2.0, 10.0, 10.0, 1.0, 0.5], w_c=[0.0, 1.0, 5.0, -1.0, 10.0, 0.3, -0.2, 0.4])
        for l in range(8):
            g = float(ss.gates()[l].detach().double())
            c = float(ss.discard()[l].detach().double())
            for incoming in (0, 1, 2, 5, 100, 576):
                expected = min(incoming, max(3, math.floor((1 - g * c) * incoming)))
                assert ss.kept_count(l, incoming) == expected, (l, incoming)
        # layer 4: g ~= c ~= 1 -> floor((1 - gc) 576) = 0 -> K_min
        assert ss.kept_count(4, 576) == 3
        # layer 2: g ~= 4.5e-5, yet the floor of equation 11 still drops one token
        assert ss.kept_count(2, 576) == 575


class TestPenalties:
    def test_budget_penalty_one_sided(self):
        ss = SearchSpace(L, N0)
        n_final = ss.expected_tokens()[-1].item()
        for budget in (n_final, n_final * 1.01, 2 * n_final, 1000.0):
            ss.zero_grad()
            pen = ss.budget_penalty(budget)
            assert pen.item() == 0.0
            pen.backward()
            assert ss.w_g.grad is None or torch.count_nonzero(ss.w_g.grad) == 0
        for budget in (n_final * 0.99, n_final / 2, 16.0):
            pen = ss.budget_penalty(budget, weight=3.0)
            expected = 3.0 * (n_final / budget - 1.0) ** 2
            assert pen.item() > 0
            assert pen.item() == pytest.approx(expected, rel=1e-3)  # float32 cancellation in N/B - 1

    def test_budget_penalty_with_tokens(self):
        ss = SearchSpace(L, N0)
        assert ss.budget_penalty(64, tokens=torch.tensor(64.0)).item() == 0.0
        assert ss.budget_penalty(64, tokens=torch.tensor(96.0)).item() == pytest.approx(0.25)

    def test_budget_penalty_gradients(self):
        ss = SearchSpace(L, N0)
        pen = ss.budget_penalty(16.0)
        pen.backward()
        # every layer's g and c moves N_final; pushing them up lowers the penalty
        assert torch.all(ss.w_g.grad < 0) and torch.all(ss.w_c.grad < 0)
        assert ss.w_gamma.grad is None or torch.count_nonzero(ss.w_gamma.grad) == 0

    def test_layer_penalty_one_sided(self):
        ss = SearchSpace(L, N0)
        total = ss.gates().sum().item()  # 3 * 0.95 + 29 * 0.01 = 3.14
        assert total == pytest.approx(3 * 0.95 + 29 * 0.01, rel=1e-5)
        for c in (total, 4, 10):
            ss.zero_grad()
            pen = ss.layer_penalty(c)
            assert pen.item() == 0.0
            pen.backward()
            assert ss.w_g.grad is None or torch.count_nonzero(ss.w_g.grad) == 0
        pen = ss.layer_penalty(3, weight=2.0)
        assert pen.item() == pytest.approx(2.0 * (total - 3) ** 2, rel=1e-4)
        pen.backward()
        assert torch.all(ss.w_g.grad > 0)
        assert ss.layer_penalty(0).item() == pytest.approx(total ** 2, rel=1e-5)


class TestKeepProbability:
    def test_forward_value(self):
        ss = SearchSpace(L, N0, alpha=50.0)
        _random_state(ss, 3)
        scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
        k = 12
        p = ss.keep_probability(scores, 6, k)
        q_k = scores.sort(dim=-1, descending=True).values[:, k - 1:k]
        torch.testing.assert_close(p, torch.sigmoid(50.0 * (scores - q_k)), rtol=0, atol=0)
        assert p.shape == scores.shape
        # the k-th largest sits exactly on the boundary
        assert torch.all((p == 0.5).sum(-1) >= 1)
        # per-call alpha and 1-d scores
        p1 = ss.keep_probability(scores[0], 6, k, alpha=2.0)
        torch.testing.assert_close(p1, torch.sigmoid(2.0 * (scores[0] - q_k[0])), rtol=0, atol=0)

    def test_gradient_reaches_gate_and_discard(self):
        tg, tc = 2.0, 0.5
        ss = SearchSpace(L, N0, gate_temperature=tg, keep_temperature=tc)
        scores = torch.randn(2, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        p = ss.keep_probability(scores, 6, 20)
        p.sum().backward()
        # d/dw of the factor (1 - gc)/(1 - sg(gc)) at its forward value 1 is -d(gc)/dw / (1 - gc)
        g, c = ss.gates()[6].item(), ss.discard()[6].item()
        soft_sum = p.detach().sum().item()
        dg = -soft_sum * c * g * (1 - g) * tg / (1 - g * c)
        dc = -soft_sum * g * c * (1 - c) * tc / (1 - g * c)
        assert ss.w_g.grad[6].item() == pytest.approx(dg, rel=1e-4)
        assert ss.w_c.grad[6].item() == pytest.approx(dc, rel=1e-4)
        assert torch.count_nonzero(ss.w_g.grad) == 1 and torch.count_nonzero(ss.w_c.grad) == 1
        assert scores.grad is not None and torch.count_nonzero(scores.grad) > 0

    def test_saturated_gate_stays_finite(self):
        ss = SearchSpace(4, 10, init_layers=())
        _set(ss, w_g=[100.0] * 4, w_c=[100.0] * 4)  # g = c = 1 in float32
        p = ss.keep_probability(torch.arange(10.0), 1, 3)
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, torch.sigmoid(10.0 * (torch.arange(10.0) - 7.0)), rtol=0, atol=0)


class TestExport:
    def _hand_set(self):
        ss = SearchSpace(24, N0, init_layers=(), k_min=2, beta=7.0, norm="frobenius")
        w_g = [-3.0] * 24
        w_g[4], w_g[9], w_g[20], w_g[13] = 2.0, 3.0, 1.0, 0.1  # g = .881, .953, .731, .525
        w_c = [0.0] * 24
        w_c[4], w_c[9], w_c[20], w_c[13] = 1.0, -1.0, 2.0, 0.5
        _set(ss, w_g=w_g, w_c=w_c)
        with torch.no_grad():
            ss.w_gamma[9] = 0.5
            ss.w_tau[9] = -1.0
            ss.w_theta[9] = 0.25
            ss.w_rho[20] = 1.5
        return ss

    def _expected(self, ss, layers, n):
        reducers = []
        for l in layers:
            g, c = _sig(ss.w_g[l].item()), _sig(ss.w_c[l].item())
            kept = min(n, max(2, math.floor((1 - g * c) * n)))
            reducers.append(Reducer(
                l, kept, gamma=ss.gamma()[l].item(), tau=ss.tau()[l].item(), theta=ss.theta()[l].item(),
                rho=ss.rho()[l].item(), nu=ss.nu()[l].item(), beta=7.0, k_min=2, norm="frobenius"))
            n = kept
        return reducers

    def test_threshold(self):
        ss = self._hand_set()
        t = ss.export()
        assert isinstance(t, Theta)
        assert t.layers == (4, 9, 13, 20)
        assert list(t) == self._expected(ss, (4, 9, 13, 20), N0)
        # the hand-written formulas, spelled out for the first reducer
        assert t[0].keep == math.floor((1 - _sig(2.0) * _sig(1.0)) * 576)
        assert t[1].gamma == pytest.approx(_sig(0.5), rel=1e-6)
        assert t[1].tau == pytest.approx(math.log1p(math.exp(-1.0)) + 1e-4, rel=1e-6)
        assert t[1].theta == pytest.approx(2 * _sig(0.25) - 1, rel=1e-6)
        assert t[3].rho == pytest.approx(_sig(1.5), rel=1e-6)
        assert all(type(getattr(r, f)) is float for r in t for f in ("gamma", "tau", "theta", "rho", "nu"))
        t.validate(24, N0)

    def test_max_reducers_and_tokens(self):
        ss = self._hand_set()
        t = ss.export(max_reducers=2)  # strongest gates: 9 (.953) and 4 (.881)
        assert t.layers == (4, 9)
        assert list(t) == self._expected(ss, (4, 9), N0)
        t = ss.export(gate_threshold=0.8, num_visual_tokens=100, name="s")
        assert t.layers == (4, 9) and t.name == "s"
        assert list(t) == self._expected(ss, (4, 9), 100)
        assert len(ss.export(gate_threshold=0.99)) == 0
        assert len(ss.export(max_reducers=0)) == 0
        # a JSON round trip of an export is exact
        assert Theta.from_json(t.to_json()) == t

    def test_default_export_is_table_5_slots(self):
        t = SearchSpace(L, N0).export()
        assert t.layers == (2, 6, 15)
        # 1 - g c = 1 - 0.95 * 0.5 = 0.525, chained and floored (no product is near an integer)
        k1 = math.floor(0.525 * 576)
        k2 = math.floor(0.525 * k1)
        k3 = math.floor(0.525 * k2)
        assert [r.keep for r in t] == [k1, k2, k3]
        assert all(r.gamma == 0.5 for r in t)


class TestBadInput:
    @pytest.mark.parametrize(
        "kwargs, exc, name",
        [
            (dict(num_layers=0), ValueError, "num_layers"),
            (dict(num_layers=32.0), TypeError, "num_layers"),
            (dict(num_visual_tokens=0), ValueError, "num_visual_tokens"),
            (dict(init_layers=(2, 40)), ValueError, "init_layers"),
            (dict(init_layers=(2, 2)), ValueError, "init_layers"),
            (dict(init_layers=(-1,)), ValueError, "init_layers"),
            (dict(init_layers="2"), TypeError, "init_layers"),
            (dict(gate_temperature=0.0), ValueError, "gate_temperature"),
            (dict(keep_temperature=-1.0), ValueError, "keep_temperature"),
            (dict(gamma0=1.5), ValueError, "gamma0"),
            (dict(tau0=0.0), ValueError, "tau0"),
            (dict(tau0=1e-5), ValueError, "tau0"),
            (dict(theta0=2.0), ValueError, "theta0"),
            (dict(rho0=-0.1), ValueError, "rho0"),
            (dict(nu0="0"), TypeError, "nu0"),
            (dict(init_gate=1.0), ValueError, "init_gate"),
            (dict(init_discard=0.0), ValueError, "init_discard"),
            (dict(init_discard=(0.5, 0.5)), ValueError, "init_discard"),
            (dict(init_discard=(0.5, 0.5, 1.5)), ValueError, "init_discard"),
            (dict(off_gate=0.0), ValueError, "off_gate"),
            (dict(k_min=0), ValueError, "k_min"),
            (dict(eps=0.0), ValueError, "eps"),
            (dict(eps=1e-13), ValueError, "eps"),  # tau = softplus + eps could fall below eos_reduce's 2**-40
            (dict(beta=-1.0), ValueError, "beta"),
            (dict(beta=1e39), ValueError, "beta"),  # inf in float32
            (dict(alpha=0.0), ValueError, "alpha"),
            (dict(norm="l2"), ValueError, "norm"),
            (dict(gamma0=float("nan")), ValueError, "gamma0"),
        ],
    )
    def test_constructor(self, kwargs, exc, name):
        args = dict(num_layers=L, num_visual_tokens=N0)
        args.update(kwargs)
        with pytest.raises(exc, match=name):
            SearchSpace(args.pop("num_layers"), args.pop("num_visual_tokens"), **args)

    def test_smallest_eps_and_largest_beta_run_in_eos_reduce(self):
        """At eps = 2**-40 a fully saturated tau (softplus underflowing to 0) is still one eos_reduce accepts,
        and exports as a valid Theta."""
        from eos_kernels import eos_reduce
        from eos_kernels._checks import BETA_MAX, TAU_MIN

        ss = SearchSpace(4, 16, init_layers=(1,), eps=TAU_MIN, beta=BETA_MAX)
        with torch.no_grad():
            ss.w_tau.fill_(-200.0)
        params = ss.operator_params(1)
        assert params["tau"].item() == TAU_MIN
        g = torch.Generator().manual_seed(0)
        A, D, q = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, generator=g)
        out = eos_reduce(A, D, q, **params, beta=ss.beta, norm=ss.norm, impl="torch")
        assert torch.isfinite(out).all()
        assert ss.export().reducers[0].tau == TAU_MIN

    def test_methods(self):
        ss = SearchSpace(L, N0)
        with pytest.raises(ValueError, match="layer"):
            ss.operator_params(L)
        with pytest.raises(TypeError, match="layer"):
            ss.kept_count(1.0, 10)
        with pytest.raises(ValueError, match="incoming"):
            ss.kept_count(1, -1)
        with pytest.raises(ValueError, match="budget"):
            ss.budget_penalty(0)
        with pytest.raises(TypeError, match="tokens"):
            ss.budget_penalty(10, tokens=5.0)
        with pytest.raises(ValueError, match="max_reducers"):
            ss.layer_penalty(-1)
        with pytest.raises(TypeError, match="scores"):
            ss.keep_probability([1.0, 2.0], 2, 1)
        with pytest.raises(ValueError, match="scores"):
            ss.keep_probability(torch.arange(5), 2, 1)
        with pytest.raises(ValueError, match="k"):
            ss.keep_probability(torch.rand(5), 2, 6)
        with pytest.raises(ValueError, match="k"):
            ss.keep_probability(torch.rand(5), 2, 0)
        with pytest.raises(ValueError, match="gate_threshold"):
            ss.export(gate_threshold=1.5)
        with pytest.raises(ValueError, match="max_reducers"):
            ss.export(max_reducers=-1)
        with pytest.raises(ValueError, match="num_visual_tokens"):
            ss.export(num_visual_tokens=0)
        with pytest.raises(ValueError, match="num_visual_tokens"):
            SearchSpace(L, N0, k_min=4).export(num_visual_tokens=3)
