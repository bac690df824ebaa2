"""Tests for eos_kernels.theta: Reducer, Theta, JSON schema, presets, accounting, rescale."""
import dataclasses
import copy
import json
import math
from fractions import Fraction

import pytest

from eos_kernels.theta import Reducer, Theta

N0, L = 576, 32

# The public SparseVLM schedules (DESIGN.md §4): kept after layers 2, 6, 15.
PUBLISHED = {
    (1, 192): (300, 200, 110),
    (1, 128): (303, 110, 36),
    (1, 96): (238, 48, 26),
    (1, 64): (66, 30, 17),
    (2, 192): (300, 200, 118),
    (2, 128): (238, 108, 60),
    (2, 96): (246, 54, 28),
    (2, 64): (66, 34, 20),
}

# Hand-written accounting for reducers at layers 2, 6, 15 and 32 layers:
# leaving: layers 0-1 leave 576, 2-5 leave k1 (4 layers), 6-14 leave k2 (9), 15-31 leave k3 (17).
# processed: layers 0-2 process 576 (3), 3-6 k1 (4), 7-15 k2 (9), 16-31 k3 (16).
MEAN_LEAVING = {
    (1, 192): (2 * 576 + 4 * 300 + 9 * 200 + 17 * 110) / 32,
    (1, 128): (2 * 576 + 4 * 303 + 9 * 110 + 17 * 36) / 32,
    (1, 96): (2 * 576 + 4 * 238 + 9 * 48 + 17 * 26) / 32,
    (1, 64): (2 * 576 + 4 * 66 + 9 * 30 + 17 * 17) / 32,
    (2, 192): (2 * 576 + 4 * 300 + 9 * 200 + 17 * 118) / 32,
    (2, 128): (2 * 576 + 4 * 238 + 9 * 108 + 17 * 60) / 32,
    (2, 96): (2 * 576 + 4 * 246 + 9 * 54 + 17 * 28) / 32,
    (2, 64): (2 * 576 + 4 * 66 + 9 * 34 + 17 * 20) / 32,
}
MEAN_PROCESSED = {
    (1, 192): (3 * 576 + 4 * 300 + 9 * 200 + 16 * 110) / 32,
    (1, 128): (3 * 576 + 4 * 303 + 9 * 110 + 16 * 36) / 32,
    (1, 96): (3 * 576 + 4 * 238 + 9 * 48 + 16 * 26) / 32,
    (1, 64): (3 * 576 + 4 * 66 + 9 * 30 + 16 * 17) / 32,
    (2, 192): (3 * 576 + 4 * 300 + 9 * 200 + 16 * 118) / 32,
    (2, 128): (3 * 576 + 4 * 238 + 9 * 108 + 16 * 60) / 32,
    (2, 96): (3 * 576 + 4 * 246 + 9 * 54 + 16 * 28) / 32,
    (2, 64): (3 * 576 + 4 * 66 + 9 * 34 + 16 * 20) / 32,
}


def _layer_flops(n, d=4096, ffn=11008):
    # projections q, k, v, o (4 d^2) + gated MLP (3 d ffn) multiply-adds per token, x2 FLOPs;
    # attention: QK^T and PV, n^2 d multiply-adds each, x2 FLOPs.
    return 2 * n * (4 * d * d + 3 * d * ffn) + 2 * 2 * n * n * d


_DELETE = object()  # marks a key to remove in TestJSON.test_rejects


def _valid_doc():
    return {
        "schema": "eos_kernels.theta",
        "version": 1,
        "name": "t",
        "reducers": [
            {"layer": 2, "keep": 300, "gamma": 0.0, "tau": 1.0, "theta": 0.0, "rho": 0.0, "nu": 0.0,
             "beta": 10.0, "k_min": 1, "norm": "token"},
            {"layer": 6, "keep": 0.5, "gamma": 0.25, "tau": 0.5, "theta": 0.1, "rho": 0.2, "nu": 0.3,
             "beta": 5.0, "k_min": 2, "norm": "frobenius"},
        ],
    }


# --------------------------------------------------------------------------- Reducer
class TestReducer:
    def test_defaults_and_coercion(self):
        r = Reducer(3, 100, gamma=1, tau=2)
        assert (r.gamma, r.tau, r.theta, r.rho, r.nu, r.beta, r.k_min, r.norm) == (1.0, 2.0, 0.0, 0.0, 0.0, 10.0, 1, "token")
        assert type(r.gamma) is float and type(r.tau) is float
        assert type(r.keep) is int and not r.is_fraction
        assert Reducer(3, 0.5).is_fraction and Reducer(3, 1.0).is_fraction

    def test_fraction_is_exact(self):
        # binary floating point gets these wrong by one; the reducer must not
        assert math.floor(0.29 * 100) == 28
        assert Reducer(0, 0.29).kept(100) == 29
        # reading 1/3 as the decimal its repr spells would be one short
        assert math.floor(Fraction(repr(1 / 3)) * 576) == 191
        assert Reducer(0, 1 / 3).kept(576) == 192
        assert Reducer(0, 2 / 3).kept(300) == 200
        assert math.floor(0.57 * 100) == 56
        assert Reducer(0, 0.57).kept(100) == 57
        # exhaustive over 2-decimal fractions and small counts, against exact integer arithmetic
        for p in range(1, 101):
            keep = p / 100
            for n in (1, 7, 100, 576, 577, 1000):
                assert Reducer(0, keep).kept(n) == max(1, (p * n) // 100), (keep, n)

    def test_fraction_non_decimal(self):
        # a float that is no simple rational is read as the decimal its repr spells
        keep = 0.123456789123
        assert Reducer(0, keep).kept(10**12) == math.floor(Fraction(repr(keep)) * 10**12)

    def test_kept_k_min_and_errors(self):
        assert Reducer(0, 0.01, k_min=4).kept(100) == 4
        assert Reducer(0, 0.5).kept(1) == 1  # floor(0.5) = 0 -> k_min 1
        assert Reducer(0, 1.0).kept(576) == 576
        assert Reducer(0, 10).kept(10) == 10
        with pytest.raises(ValueError, match="more than the 9 incoming"):
            Reducer(0, 10).kept(9)
        with pytest.raises(ValueError, match="incoming"):
            Reducer(0, 0.5, k_min=5).kept(4)
        with pytest.raises(ValueError, match="incoming"):
            Reducer(0, 10).kept(-1)
        with pytest.raises(TypeError, match="incoming"):
            Reducer(0, 10).kept(10.0)

    def test_operator_kwargs(self):
        r = Reducer(1, 5, gamma=0.1, tau=0.2, theta=-0.3, rho=0.4, nu=0.5, beta=7.0, norm="frobenius")
        assert r.operator_kwargs() == {"gamma": 0.1, "tau": 0.2, "theta": -0.3, "rho": 0.4, "nu": 0.5,
                                       "beta": 7.0, "norm": "frobenius"}

    @pytest.mark.parametrize(
        "kwargs, exc, field",
        [
            (dict(layer=-1), ValueError, "layer"),
            (dict(layer=1.0), TypeError, "layer"),
            (dict(layer=True), TypeError, "layer"),
            (dict(keep=0), ValueError, "keep"),
            (dict(keep=-3), ValueError, "keep"),
            (dict(keep=0.0), ValueError, "keep"),
            (dict(keep=1.5), ValueError, "keep"),
            (dict(keep=float("nan")), ValueError, "keep"),
            (dict(keep="300"), TypeError, "keep"),
            (dict(keep=True), TypeError, "keep"),
            (dict(gamma=1.5), ValueError, "gamma"),
            (dict(gamma=-0.1), ValueError, "gamma"),
            (dict(rho=1.01), ValueError, "rho"),
            (dict(nu=-1e-9), ValueError, "nu"),
            (dict(tau=0.0), ValueError, "tau"),
            (dict(tau=-1.0), ValueError, "tau"),
            (dict(tau=float("inf")), ValueError, "tau"),
            (dict(theta=float("-inf")), ValueError, "theta"),
            (dict(theta=float("nan")), ValueError, "theta"),
            (dict(beta=0.0), ValueError, "beta"),
            (dict(gamma="0"), TypeError, "gamma"),
            (dict(gamma=None), TypeError, "gamma"),
            (dict(rho=False), TypeError, "rho"),
            (dict(k_min=0), ValueError, "k_min"),
            (dict(k_min=1.0), TypeError, "k_min"),
            (dict(norm="l2"), ValueError, "norm"),
        ],
    )
    def test_invalid(self, kwargs, exc, field):
        args = dict(layer=2, keep=10)
        args.update(kwargs)
        with pytest.raises(exc, match=field):
            Reducer(**args)

    def test_theta_may_be_any_finite_value(self):
        assert Reducer(0, 1, theta=-1e9).theta == -1e9
        assert Reducer(0, 1, theta=5.0).theta == 5.0

    @pytest.mark.parametrize(
        "kwargs, regime",
        [
            (dict(), "prune"),
            (dict(rho=0.3), "reweight"),
            (dict(gamma=1.0, tau=1e-4, theta=-1e9), "merge"),
            (dict(gamma=1.0, tau=1e6, theta=-1e9), "pool"),
            (dict(gamma=0.083, tau=0.22, theta=0.1), "hybrid"),
            (dict(gamma=1.0, tau=0.5, theta=-1e9), "hybrid"),
        ],
    )
    def test_regime(self, kwargs, regime):
        assert Reducer(0, 1, **kwargs).regime == regime


# --------------------------------------------------------------------------- Theta basics
class TestThetaBasics:
    def test_layers_must_increase(self):
        with pytest.raises(ValueError, match=r"reducers\[1\].layer.*out of order"):
            Theta([Reducer(6, 10), Reducer(2, 5)])
        with pytest.raises(ValueError, match=r"reducers\[2\].layer.*repeated"):
            Theta([Reducer(1, 10), Reducer(6, 10), Reducer(6, 5)])

    def test_reducers_from_mappings_and_errors(self):
        t = Theta([{"layer": 2, "keep": 3}])
        assert t.reducers == (Reducer(2, 3),)
        with pytest.raises(TypeError, match=r"reducers\[0\]"):
            Theta([(2, 3)])
        with pytest.raises(ValueError, match=r"reducers\[0\].*gamma"):
            Theta([{"layer": 2, "keep": 3, "gamma": 2.0}])
        with pytest.raises(TypeError, match="reducers"):
            Theta(Reducer(2, 3))
        with pytest.raises(TypeError, match="name"):
            Theta([], name=3)

    def test_equality_and_hash(self):
        a = Theta([Reducer(2, 10, gamma=0.5)], name="x")
        b = Theta([Reducer(2, 10, gamma=0.5)], name="x")
        assert a == b and hash(a) == hash(b)
        assert a != Theta([Reducer(2, 10, gamma=0.25)], name="x")
        assert a != Theta([Reducer(2, 10, gamma=0.5)], name="y")
        assert Theta([Reducer(2, 1)]) != Theta([Reducer(2, 1.0)])  # a count of 1 vs the fraction 1
        assert Reducer(2, 1) != Reducer(2, 1.0) and Reducer(2, 1, gamma=0) == Reducer(2, 1, gamma=0.0)
        assert hash(Reducer(2, 5, tau=0.5)) == hash(Reducer(2, 5, tau=0.5))
        assert len(a) == 1 and list(a) == [Reducer(2, 10, gamma=0.5)] and a[0].layer == 2

    def test_schedule_chains(self):
        t = Theta([Reducer(2, 0.5), Reducer(6, 0.5), Reducer(9, 100)])
        assert t.schedule(576) == [(2, 576, 288), (6, 288, 144), (9, 144, 100)]
        with pytest.raises(ValueError, match=r"reducers\[2\].keep.*more than the 25 incoming"):
            t.schedule(100)
        assert Theta().schedule(576) == []

    def test_validate(self):
        t = Theta([Reducer(2, 300), Reducer(31, 100)])
        t.validate(32, 576)
        with pytest.raises(ValueError, match=r"reducers\[1\].layer.*31.*30 layers"):
            t.validate(30, 576)
        with pytest.raises(ValueError, match=r"reducers\[0\].keep.*more than the 200 incoming"):
            t.validate(32, 200)
        with pytest.raises(TypeError, match="num_layers"):
            t.validate(32.0, 576)
        with pytest.raises(ValueError, match="num_visual_tokens"):
            t.validate(32, 0)

    def test_str_table(self):
        t = Theta([Reducer(2, 300), Reducer(6, 0.5, gamma=0.083, tau=0.22, theta=0.1),
                   Reducer(15, 20, gamma=1.0, tau=1e-4, theta=-1e9)], name="demo")
        s = str(t)
        lines = s.splitlines()
        assert "demo" in lines[0]
        assert all(h in lines[1] for h in ("layer", "keep", "γ", "τ", "θ", "ρ", "ν", "regime"))
        assert lines[2].split()[0] == "2" and lines[2].split()[1] == "300" and lines[2].endswith("prune")
        assert lines[3].split()[0] == "6" and "0.083" in lines[3] and lines[3].endswith("hybrid")
        assert lines[4].split()[0] == "15" and lines[4].endswith("merge")
        assert "no reduction" in str(Theta())


# --------------------------------------------------------------------------- JSON
class TestJSON:
    def _samples(self):
        return [
            Theta(),
            Theta(name="empty-named"),
            Theta.sparsevlm(2, 192),
            Theta.paper(128),
            Theta.tome(96),
            Theta.fastv(1, 0.5),
            Theta([Reducer(0, 1.0), Reducer(1, 1), Reducer(5, 0.1 + 0.2, gamma=0.1 + 0.2, tau=5e-324,
                                                               theta=-1e9, rho=1 / 3, nu=1.0, beta=1e-300,
                                                               k_min=3, norm="frobenius")], name="wéird ✓"),
        ]

    def test_round_trip_exact(self, tmp_path):
        for i, t in enumerate(self._samples()):
            text = t.to_json()
            back = Theta.from_json(text)
            assert back == t
            for a, b in zip(t, back):
                for field in ("gamma", "tau", "theta", "rho", "nu", "beta"):
                    assert getattr(a, field).hex() == getattr(b, field).hex()
                assert type(a.keep) is type(b.keep) and a.keep == b.keep
            assert back.to_json() == text
            assert Theta.from_dict(json.loads(json.dumps(t.to_dict()))) == t
            # paths, as str and as PathLike
            p = tmp_path / f"theta{i}.json"
            assert t.to_json(p) == text
            assert Theta.from_json(p) == t
            assert Theta.from_json(str(p)) == t

    def test_keep_kinds_in_text(self):
        text = Theta([Reducer(0, 1.0), Reducer(1, 1)]).to_json(indent=None)
        doc = json.loads(text)
        assert '"keep": 1.0' in text and '"keep": 1,' in text
        assert isinstance(doc["reducers"][0]["keep"], float) and isinstance(doc["reducers"][1]["keep"], int)

    def test_schema_header(self):
        doc = Theta.sparsevlm(1, 64).to_dict()
        assert doc["schema"] == "eos_kernels.theta" and doc["version"] == 1
        assert set(doc) == {"schema", "version", "name", "reducers"}
        assert set(doc["reducers"][0]) == {"layer", "keep", "gamma", "tau", "theta", "rho", "nu", "beta", "k_min", "norm"}

    def test_optional_fields(self):
        doc = {"schema": "eos_kernels.theta", "version": 1, "reducers": [{"layer": 4, "keep": 0.25}]}
        t = Theta.from_dict(doc)
        assert t.name is None and t.reducers == (Reducer(4, 0.25),)

    @staticmethod
    def _set(doc, path, value):
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    @pytest.mark.parametrize(
        "path, value, exc, pattern",
        [
            (("extra",), 1, ValueError, "unknown top-level key.*extra"),
            (("reducers", 0, "sigma"), 1.0, ValueError, "reducers\\[0\\].*unknown reducer key.*sigma"),
            (("schema",), "eos.theta", ValueError, "schema"),
            (("schema",), _DELETE, ValueError, "schema"),
            (("version",), 2, ValueError, "version"),
            (("version",), "1", ValueError, "version"),
            (("version",), _DELETE, ValueError, "version"),
            (("reducers",), _DELETE, ValueError, "reducers"),
            (("reducers",), {"layer": 1}, TypeError, "reducers"),
            (("reducers", 0), [2, 300], TypeError, "reducers\\[0\\]"),
            (("name",), 5, TypeError, "name"),
            (("reducers", 1, "layer"), 2, ValueError, "reducers\\[1\\].layer.*repeated"),
            (("reducers", 1, "layer"), 1, ValueError, "reducers\\[1\\].layer.*out of order"),
            (("reducers", 0, "layer"), -1, ValueError, "reducers\\[0\\].*layer"),
            (("reducers", 0, "layer"), 2.0, TypeError, "reducers\\[0\\].*layer"),
            (("reducers", 0, "layer"), _DELETE, ValueError, "reducers\\[0\\].*layer"),
            (("reducers", 0, "keep"), _DELETE, ValueError, "reducers\\[0\\].*keep"),
            (("reducers", 0, "keep"), 0, ValueError, "reducers\\[0\\].*keep"),
            (("reducers", 0, "keep"), 1.5, ValueError, "reducers\\[0\\].*keep"),
            (("reducers", 0, "keep"), -0.5, ValueError, "reducers\\[0\\].*keep"),
            (("reducers", 0, "keep"), "300", TypeError, "reducers\\[0\\].*keep"),
            (("reducers", 0, "keep"), True, TypeError, "reducers\\[0\\].*keep"),
            (("reducers", 1, "tau"), 0.0, ValueError, "reducers\\[1\\].*tau"),
            (("reducers", 1, "tau"), -0.5, ValueError, "reducers\\[1\\].*tau"),
            (("reducers", 1, "gamma"), 1.5, ValueError, "reducers\\[1\\].*gamma"),
            (("reducers", 1, "rho"), -0.1, ValueError, "reducers\\[1\\].*rho"),
            (("reducers", 1, "nu"), 2, ValueError, "reducers\\[1\\].*nu"),
            (("reducers", 1, "gamma"), "0.5", TypeError, "reducers\\[1\\].*gamma"),
            (("reducers", 1, "beta"), 0, ValueError, "reducers\\[1\\].*beta"),
            (("reducers", 1, "k_min"), 0, ValueError, "reducers\\[1\\].*k_min"),
            (("reducers", 1, "k_min"), 2.5, TypeError, "reducers\\[1\\].*k_min"),
            (("reducers", 1, "norm"), "l2", ValueError, "reducers\\[1\\].*norm"),
            (("reducers", 1, "theta"), None, TypeError, "reducers\\[1\\].*theta"),
        ],
    )
    def test_rejects(self, path, value, exc, pattern):
        doc = _valid_doc()
        Theta.from_dict(copy.deepcopy(doc))  # the base document is valid
        self._set(doc, path, value)
        with pytest.raises(exc, match=pattern):
            Theta.from_dict(doc)
        with pytest.raises(exc, match=pattern):
            Theta.from_json(json.dumps(doc))

    def test_rejects_non_finite_and_bad_text(self, tmp_path):
        text = json.dumps(_valid_doc()).replace('"theta": 0.1', '"theta": NaN')
        assert "NaN" in text
        with pytest.raises(ValueError, match="NaN"):
            Theta.from_json(text)
        with pytest.raises(ValueError, match="invalid JSON"):
            Theta.from_json('{"schema": ')
        with pytest.raises(TypeError, match="mapping"):
            Theta.from_dict([1, 2])
        with pytest.raises(TypeError, match="mapping"):
            Theta.from_json("[1, 2]")
        with pytest.raises(TypeError, match="text_or_path"):
            Theta.from_json(42)
        with pytest.raises(FileNotFoundError):
            Theta.from_json(tmp_path / "missing.json")

    @pytest.mark.parametrize(
        "old, new, pattern",
        [
            # the repeat comes last, so a silent last-one-wins would load a valid Theta
            ('"name": "t",', '"name": "t", "name": "u",', r"^duplicate top-level key\(s\) \['name'\]"),
            ('"version": 1,', '"version": 1, "version": 1,', r"^duplicate top-level key\(s\) \['version'\]"),
            ('"theta": 0.1,', '"theta": 0.1, "theta": 0.9,', r"^reducers\[1\]: duplicate reducer key\(s\) \['theta'\]"),
            ('"layer": 2,', '"layer": 2, "layer": 2,', r"^reducers\[0\]: duplicate reducer key\(s\) \['layer'\]"),
        ],
        ids=["top-level-name", "top-level-same-value", "reducer-theta", "reducer-same-value"],
    )
    def test_rejects_duplicate_keys(self, old, new, pattern, tmp_path):
        text = json.dumps(_valid_doc())
        assert text.count(old) == 1
        text = text.replace(old, new)
        with pytest.raises(ValueError, match=pattern):
            Theta.from_json(text)
        path = tmp_path / "theta.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=pattern):
            Theta.from_json(path)

    def test_to_json_has_no_nan(self):
        assert "NaN" not in Theta.pool(64).to_json() and "Infinity" not in Theta.tome(64).to_json()


# --------------------------------------------------------------------------- presets
class TestPresets:
    @pytest.mark.parametrize("version, budget", sorted(PUBLISHED))
    def test_sparsevlm_exact(self, version, budget):
        t = Theta.sparsevlm(version, budget)
        assert t.layers == (2, 6, 15)
        assert tuple(r.keep for r in t) == PUBLISHED[version, budget]
        assert all(type(r.keep) is int for r in t)
        assert all(r.gamma == 0.0 and r.rho == 0.0 and r.regime == "prune" for r in t)
        assert [s[2] for s in t.schedule(576)] == list(PUBLISHED[version, budget])
        t.validate(32, 576)

    def test_sparsevlm_unknown(self):
        with pytest.raises(ValueError, match=r"version.*\[1, 2\]"):
            Theta.sparsevlm(3, 192)
        with pytest.raises(ValueError, match=r"budget.*192, 128, 96, 64"):
            Theta.sparsevlm(2, 100)
        with pytest.raises(ValueError, match="budget"):
            Theta.sparsevlm(2, 192.0)

    def test_fastv(self):
        t = Theta.fastv(1, 0.5)
        assert t.layers == (1,) and t[0].keep == 0.5 and t[0].regime == "prune"
        assert t.schedule(576) == [(1, 576, 288)]
        t = Theta.fastv(2, 144)
        assert t.schedule(576) == [(2, 576, 144)]
        with pytest.raises(ValueError, match="keep"):
            Theta.fastv(2, 1.5)

    @pytest.mark.parametrize("budget", [192, 128, 96, 64])
    @pytest.mark.parametrize("kind", ["tome", "pool"])
    def test_tome_pool(self, kind, budget):
        t = getattr(Theta, kind)(budget)
        assert t.layers == (2, 6, 15)
        for r in t:
            assert (r.gamma, r.theta, r.rho, r.nu) == (1.0, -1e9, 0.0, 0.0)
            assert r.tau == (1e-4 if kind == "tome" else 1e6)
            assert r.regime == ("merge" if kind == "tome" else "pool")
        rep = t.token_report()
        assert rep["mean_leaving"] <= budget
        # within one rescale step of the budget (see Theta.rescale)
        assert budget - rep["mean_leaving"] <= (30 + 26 + 17) / 32
        # same shape as SparseVLM v2 at this budget: kept counts within rounding of a common scale
        # i.e. one scale s with floor(s * b_i) == k_i for all i: the intervals [k/b, (k+1)/b) meet
        base = PUBLISHED[2, budget]
        kept = [r.keep for r in t]
        assert max(Fraction(k, b) for k, b in zip(kept, base)) < min(Fraction(k + 1, b) for k, b in zip(kept, base))

    def test_tome_explicit_schedule(self):
        t = Theta.tome(None, schedule=(300, 200, 118))
        assert tuple(r.keep for r in t) == (300, 200, 118)
        t = Theta.pool(None, layers=(1, 8), schedule=(0.5, 0.5))
        assert t.schedule(576) == [(1, 576, 288), (8, 288, 144)]
        with pytest.raises(ValueError, match="schedule"):
            Theta.tome(None, schedule=(300, 200))
        with pytest.raises(ValueError, match="budget"):
            Theta.tome(None)
        with pytest.raises(ValueError, match="layers"):
            Theta.tome(64, layers=(2, 6))
        t = Theta.tome(16, count="final")
        assert t.token_report()["final"] == 16

    @pytest.mark.parametrize("budget", [192, 128, 96, 64])
    def test_paper(self, budget):
        t = Theta.paper(budget)
        assert t.layers == (3, 6, 16)
        a, b, c = t
        assert a.regime == "prune" and c.regime == "prune"
        assert (a.gamma, a.rho, a.nu, c.gamma, c.rho, c.nu) == (0.0,) * 6
        assert (b.gamma, b.tau, b.theta, b.rho, b.nu) == (0.083, 0.22, 0.10, 0.0, 0.0)
        assert b.regime == "hybrid"
        rep = t.token_report()
        assert rep["mean_leaving"] <= budget
        assert budget - rep["mean_leaving"] <= (29 + 26 + 16) / 32

    @pytest.mark.parametrize("budget", [192, 128, 96, 64, 32, 16])
    def test_paper_final(self, budget):
        t = Theta.paper(budget, count="final")
        assert t.token_report()["final"] == budget
        assert t.layers == (3, 6, 16) and t[1].gamma == 0.083

    @pytest.mark.parametrize("budget", [32, 16])
    def test_paper_mean_leaving_infeasible(self, budget):
        # layers 0-2 leave all 576 tokens before the first reducer at layer 3, so
        # mean_leaving >= (3*576 + 29*1)/32 > 32 whatever the schedule
        assert (3 * 576 + 29 * 1) / 32 > budget
        with pytest.raises(ValueError, match="count='final'"):
            Theta.paper(budget)


# --------------------------------------------------------------------------- accounting
class TestTokenReport:
    @pytest.mark.parametrize("version, budget", sorted(PUBLISHED))
    def test_sparsevlm_numbers(self, version, budget):
        k1, k2, k3 = PUBLISHED[version, budget]
        rep = Theta.sparsevlm(version, budget).token_report(576, 32)
        assert rep["final"] == k3
        assert rep["mean_leaving"] == pytest.approx(MEAN_LEAVING[version, budget], abs=1e-12)
        assert rep["mean_processed"] == pytest.approx(MEAN_PROCESSED[version, budget], abs=1e-12)
        assert rep["schedule"] == [(2, 576, k1), (6, k1, k2), (15, k2, k3)]
        assert rep["leaving"] == [576] * 2 + [k1] * 4 + [k2] * 9 + [k3] * 17
        assert rep["processed"] == [576] * 3 + [k1] * 4 + [k2] * 9 + [k3] * 16
        T = 64
        expected = (3 * _layer_flops(T + 576) + 4 * _layer_flops(T + k1) + 9 * _layer_flops(T + k2)
                    + 16 * _layer_flops(T + k3)) / (32 * _layer_flops(T + 576))
        assert rep["prefill_flops_ratio"] == pytest.approx(expected, rel=1e-12)
        assert rep["text_tokens"] == 64

    def test_published_figures(self):
        # DESIGN.md §4: v2/192 is 192.44 by the published accounting, 206.75 processed
        rep = Theta.sparsevlm(2, 192).token_report()
        assert round(rep["mean_leaving"], 2) == 192.44
        assert rep["mean_processed"] == 206.75
        assert round(Theta.sparsevlm(2, 64).token_report()["mean_processed"]) == 82

    def test_other_text_length_and_dims(self):
        rep = Theta.sparsevlm(1, 64).token_report(576, 32, text_tokens=0, hidden_size=8, intermediate_size=16)
        f = lambda n: _layer_flops(n, 8, 16)  # noqa: E731
        expected = (3 * f(576) + 4 * f(66) + 9 * f(30) + 16 * f(17)) / (32 * f(576))
        assert rep["prefill_flops_ratio"] == pytest.approx(expected, rel=1e-12)

    def test_unreduced_and_last_layer(self):
        rep = Theta().token_report()
        assert rep["final"] == 576 and rep["mean_leaving"] == 576 and rep["mean_processed"] == 576
        assert rep["prefill_flops_ratio"] == 1.0
        rep = Theta([Reducer(31, 10)]).token_report()
        assert rep["final"] == 10 and rep["mean_leaving"] == (31 * 576 + 10) / 32
        assert rep["mean_processed"] == 576 and rep["prefill_flops_ratio"] == 1.0

    def test_errors(self):
        with pytest.raises(ValueError, match="layer"):
            Theta([Reducer(40, 10)]).token_report()
        with pytest.raises(ValueError, match="text_tokens"):
            Theta().token_report(text_tokens=-1)


# --------------------------------------------------------------------------- rescale
BUDGETS = [192, 128, 96, 64, 32, 16]


def _bases():
    out = [Theta.sparsevlm(v, b) for v, b in sorted(PUBLISHED)]
    out += [Theta.paper(192), Theta.fastv(1, 0.5), Theta.tome(None, schedule=(0.6, 0.5, 0.5)),
            Theta([Reducer(0, 0.9, k_min=2), Reducer(4, 0.5, gamma=0.3, tau=0.7, k_min=3), Reducer(20, 0.8, rho=0.2, k_min=4)]),
            Theta([Reducer(1, 0.9, k_min=40), Reducer(4, 0.5, k_min=30), Reducer(9, 0.8, nu=0.5, k_min=20)])]
    return out


class TestRescale:
    @pytest.mark.parametrize("count", ["mean_leaving", "final"])
    @pytest.mark.parametrize("budget", BUDGETS)
    def test_meets_budget(self, budget, count):
        for base in _bases():
            # lowest achievable count: every reducer at the largest k_min from it onwards
            lows = [max(r.k_min for r in base.reducers[i:]) for i in range(len(base))]
            floor = Theta([Reducer(r.layer, m) for r, m in zip(base, lows)]).token_report()[count]
            if floor > budget:
                with pytest.raises(ValueError, match="cannot be met"):
                    base.rescale(budget, count)
                continue
            t = base.rescale(budget, count)
            rep = t.token_report(576, 32)
            assert rep[count] <= budget
            # closeness: each breakpoint step moves every kept count by at most one token
            step = 1 if count == "final" else sum(32 - r.layer for r in base) / 32
            saturated = all(r.keep == 576 for r in t)
            assert saturated or budget - rep[count] <= step
            if count == "final" and not saturated:
                assert rep["final"] == budget
            # layers and operators unchanged, counts integer, non-increasing, >= k_min
            assert t.layers == base.layers
            for a, b in zip(t, base):
                assert a.operator_kwargs() == b.operator_kwargs() and a.k_min == b.k_min
                assert type(a.keep) is int and a.keep >= a.k_min
            kept = [s[2] for s in rep["schedule"]]
            assert kept == sorted(kept, reverse=True)
            assert base.rescale(budget, count) == t  # deterministic

    def test_mean_leaving_infeasible_for_late_first_reducer(self):
        # reducers from layer 2: mean_leaving >= (2*576 + 30)/32 = 36.94 > 32
        with pytest.raises(ValueError, match="36.94"):
            Theta.sparsevlm(2, 64).rescale(32)
        # FastV at layer 1 can reach it: (576 + 31 k)/32 <= 32 -> k <= 14
        t = Theta.fastv(1, 0.5).rescale(32)
        assert t[0].keep == 14 and t.token_report()["mean_leaving"] == (576 + 31 * 14) / 32

    def test_infeasible_messages_name_the_cause_of_each_count(self):
        base = Theta([Reducer(2, 100, k_min=4), Reducer(6, 50, k_min=20), Reducer(10, 30, k_min=10)])
        # final: only the last reducer's k_min bounds it; telling the user to use count='final' is wrong
        with pytest.raises(ValueError) as info:
            base.rescale(5, "final")
        msg = str(info.value)
        assert "lowest reachable final at 576 tokens and 32 layers is 10, the k_min of the last reducer " \
               "(layer 10); raise the budget or lower that k_min" in msg
        assert "count='final'" in msg and "use count" not in msg and "before the first reducer" not in msg
        with pytest.raises(ValueError, match=r"is 1 \(a reducer keeps at least one token\); raise the budget$"):
            Theta.fastv(0, 8).rescale(0.5, "final")
        # mean_leaving: the layers before the first reducer and the k_min bounds; count='final' offered
        # only where the budget is reachable as a final count (>= 10 here)
        with pytest.raises(ValueError) as info:
            base.rescale(30)
        msg = str(info.value)
        assert "lowest reachable mean_leaving at 576 tokens and 32 layers is 47.88: the 2 layer(s) before the " \
               "first reducer (layer 2) leave all 576 tokens and the reducers keep at least [20, 20, 10] tokens" in msg
        assert msg.endswith("raise the budget, put the first reducer earlier, lower k_min or use count='final' if "
                            "the budget is meant for the tokens leaving the last layer")
        with pytest.raises(ValueError, match=r"earlier or lower k_min$"):
            base.rescale(8)
        # k_min 1 everywhere: no k_min advice
        with pytest.raises(ValueError, match=r"is 36.94: the 2 layer\(s\) before the first reducer \(layer 2\) "
                                             r"leave all 576 tokens; raise the budget, put the first reducer "
                                             r"earlier or use count='final'"):
            Theta.sparsevlm(2, 64).rescale(32)

    @pytest.mark.parametrize("version, budget", sorted(PUBLISHED))
    def test_identity_at_own_count(self, version, budget):
        # a schedule already at the best reachable count is kept as it is
        base = Theta.sparsevlm(version, budget)
        k1, k2, k3 = PUBLISHED[version, budget]
        assert [r.keep for r in base.rescale(k3, "final")] == [k1, k2, k3]
        assert [r.keep for r in base.rescale(MEAN_LEAVING[version, budget])] == [k1, k2, k3]

    def test_exact_example(self):
        # v2/192 to final 64: the final count floor(118 s) is at most 64 for s < 65/118, so the
        # best reachable final count is 64, first reached at s = 64/118 (itself a breakpoint).
        s = Fraction(64, 118)
        assert math.floor(s * 118) == 64 and math.floor(Fraction(65, 118) * 118) == 65
        t = Theta.sparsevlm(2, 192).rescale(64, "final")
        assert [r.keep for r in t] == [(64 * 300) // 118, (64 * 200) // 118, 64] == [162, 108, 64]

    def test_upscale_and_errors(self):
        t = Theta.sparsevlm(2, 64).rescale(192)
        assert t.token_report()["mean_leaving"] <= 192
        assert all(r.keep > k for r, k in zip(t, PUBLISHED[2, 64]))
        assert Theta.sparsevlm(2, 64).rescale(1000)[0].keep == 576
        with pytest.raises(ValueError, match="count"):
            Theta.sparsevlm(2, 64).rescale(64, "mean")
        with pytest.raises(ValueError, match="budget"):
            Theta.sparsevlm(2, 64).rescale(0)
        with pytest.raises(TypeError, match="budget"):
            Theta.sparsevlm(2, 64).rescale("64")
        with pytest.raises(ValueError, match="no reducers"):
            Theta().rescale(64)
        assert Theta().rescale(600) == Theta()

    def test_name(self):
        assert Theta.sparsevlm(2, 192).rescale(64).name == "sparsevlm-v2-192@mean_leaving=64"
        assert Theta.sparsevlm(2, 192).rescale(64, name="mine").name == "mine"


@pytest.mark.parametrize("preset", ["tome", "pool"])
@pytest.mark.parametrize("n, layers, budget", [(64, (1, 2, 4), 8), (144, (2, 6, 15), 24), (100, (0, 3, 5), 10)])
def test_corner_presets_scale_the_sparsevlm_ratios_to_other_token_counts(preset, n, layers, budget):
    """Regression: the presets applied SparseVLM's 576-token counts to any model (66 > 64 incoming)."""
    theta = getattr(Theta, preset)(budget, layers, count="final", num_visual_tokens=n, num_layers=16)
    sched = theta.schedule(n)
    assert [s[0] for s in sched] == list(layers)
    kept = [s[2] for s in sched]
    assert kept == sorted(kept, reverse=True) and kept[0] <= n
    assert kept[-1] <= budget
    # the retain ratios start from SparseVLM v2's (the 64 budget is nearest to 1/8 .. 1/6 of the tokens)
    assert theta.token_report(n, 16)["final"] == kept[-1]


def test_paper_preset_on_another_token_count():
    theta = Theta.paper(16, count="final", num_visual_tokens=144, num_layers=32)
    assert theta.token_report(144, 32)["final"] <= 16


# ---- as_fractions: a schedule designed at one count, deployed at any
@pytest.mark.parametrize("n0", [576, 64, 7, 1])
def test_as_fractions_gives_the_same_schedule_at_its_count(n0):
    base = Theta.tome(max(1, n0 // 8), (1, 3, 5), count="final", num_visual_tokens=n0, num_layers=8, name="t")
    frac = base.as_fractions(n0)
    assert all(r.is_fraction for r in frac) and frac.name == "t"
    assert frac.schedule(n0) == base.schedule(n0)
    # everything but keep is untouched
    for a, b in zip(base, frac):
        assert dataclasses.replace(a, keep=1.0) == dataclasses.replace(b, keep=1.0)
    assert Theta.from_json(frac.to_json()) == frac


def test_as_fractions_scales_with_the_count():
    base = Theta([Reducer(2, 300), Reducer(6, 150)], name="x")
    frac = base.as_fractions(600, name="y")
    assert frac.name == "y" and [r.keep for r in frac] == [0.5, 0.5]
    assert frac.schedule(1200) == [(2, 1200, 600), (6, 600, 300)]
    assert frac.schedule(601) == [(2, 601, 300), (6, 300, 150)]
    # the count version clips nothing at 600 but cannot serve 200 tokens
    with pytest.raises(ValueError, match="more than the 200 incoming"):
        base.schedule(200)
    assert frac.schedule(200) == [(2, 200, 100), (6, 100, 50)]
    # exact rationals: 1/3 of 999 is 333, not 332
    assert Theta([Reducer(0, 333)]).as_fractions(999).schedule(999) == [(0, 999, 333)]
    assert Theta().as_fractions(5) == Theta()
    # fractions stay as they are (re-deriving them at n would change them elsewhere), k_min too
    mixed = Theta([Reducer(0, 0.5), Reducer(2, 100), Reducer(4, 0.01, k_min=5)])
    frac = mixed.as_fractions(7 * 400)
    assert [r.keep for r in frac] == [0.5, 100 / 1400, 0.01] and frac[2].k_min == 5
    assert frac.schedule(2800) == mixed.schedule(2800)
    assert frac.schedule(1000) == [(0, 1000, 500), (2, 500, 35), (4, 35, 5)]


def test_as_fractions_rejects_bad_input():
    with pytest.raises(ValueError, match="cannot be stored exactly"):
        Theta([Reducer(0, 7977)]).as_fractions(1_000_001)
    with pytest.raises(ValueError, match="more than"):
        Theta([Reducer(0, 10)]).as_fractions(5)
    with pytest.raises(ValueError, match="num_visual_tokens"):
        Theta([Reducer(0, 1)]).as_fractions(0)
    with pytest.raises(TypeError, match="name"):
        Theta([Reducer(0, 1)]).as_fractions(4, name=3)
