"""The unified operator at each corner equals the independent corner algorithms (appendix B)."""
import subprocess
import sys

import pytest
import torch

from eos_kernels import eos_reduce
from eos_kernels.check import CORNER_TOLERANCE, corner_errors, listing3_inputs
from eos_kernels.corners import CORNER_SETTINGS, CORNERS, merge, pool, prune, reweight

IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
def test_listing3_sizes(impl):
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    errors = corner_errors(impl, device)
    assert set(errors) == {"prune", "merge", "pool", "reweight"}
    for name, err in errors.items():
        assert err <= CORNER_TOLERANCE, (name, err)


def clustered(B, K, M, d, seed):
    """Candidates near one anchor each: merge's nearest anchor is unambiguous (no near-ties,
    which tau = 1e-4 would resolve differently from argmax)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, K, d, generator=g)
    owner = torch.randint(0, K, (B, M), generator=g)
    D = torch.gather(A, 1, owner[..., None].expand(B, M, d)) + 0.5 * torch.randn(B, M, d, generator=g)
    return A, D, torch.randn(B, M, generator=g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("corner", list(CORNER_SETTINGS))
@pytest.mark.parametrize("B,K,M,d", [(3, 24, 70, 100), (2, 1, 9, 33), (2, 5, 0, 16)])
def test_larger_and_awkward_sizes(impl, corner, B, K, M, d):
    A, D, q = clustered(B, K, M, d, seed=K + M)
    if impl == "triton" and torch.cuda.is_available():
        A, D, q = A.cuda(), D.cuda(), q.cuda()
    unified = eos_reduce(A, D, q, *CORNER_SETTINGS[corner], impl=impl)
    expected = CORNERS[corner](A, D, q)
    assert (unified - expected).abs().max().item() <= CORNER_TOLERANCE


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("corner", list(CORNER_SETTINGS))
def test_fully_masked_sample(impl, corner):
    """A sample whose scores are all -inf beside a normal one: finite, and at the
    reweight corner the masked sample gets no importance at all (out = A)."""
    A, D, q = clustered(2, 6, 20, 32, seed=3)
    q[1] = float("-inf")
    if impl == "triton" and torch.cuda.is_available():
        A, D, q = A.cuda(), D.cuda(), q.cuda()
    unified = eos_reduce(A, D, q, *CORNER_SETTINGS[corner], impl=impl)
    expected = CORNERS[corner](A, D, q)
    assert torch.isfinite(unified).all() and torch.isfinite(expected).all()
    assert (unified - expected).abs().max().item() <= CORNER_TOLERANCE
    if corner == "reweight":
        assert torch.equal(expected[1], A[1]) and torch.equal(unified[1], A[1])


def test_corner_algorithms_by_hand():
    """The corner algorithms themselves, on a case small enough to do by hand."""
    A = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    D = torch.tensor([[3.0, 0.1], [0.0, -1.0], [-0.2, 5.0]])
    q = torch.tensor([0.0, 0.0, 0.0])
    assert torch.equal(prune(A, D, q), A)
    # candidate 0 is nearest to anchor 0; candidates 1 and 2 point along +-y: 1 is nearest to anchor 0
    # (cosine 0 vs -1), 2 to anchor 1
    torch.testing.assert_close(merge(A, D, q), torch.tensor([[4.0, -0.9], [-0.2, 7.0]]))
    torch.testing.assert_close(pool(A, D, q), A + torch.tensor([2.8, 4.1]) / 2)
    out = reweight(A, D, q, alpha=1.0)
    # importance sums to 1 over anchors (a distribution); both anchors scaled up
    factors = out.norm(dim=-1) / A.norm(dim=-1) - 1.0
    torch.testing.assert_close(factors.sum(), torch.tensor(1.0))
    assert (factors > 0).all()


def test_corners_accept_unbatched_and_batched():
    A, D, q = listing3_inputs()
    for name, fn in CORNERS.items():
        single = fn(A, D, q)
        batched = fn(A[None].repeat(2, 1, 1), D[None].repeat(2, 1, 1), q[None].repeat(2, 1))
        assert torch.equal(batched[0], single) and torch.equal(batched[1], single), name


def test_check_command_passes_and_lists_both_impls():
    proc = subprocess.run([sys.executable, "-m", "eos_kernels", "check"], capture_output=True, text=True,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for impl in ("torch", "triton"):
        for corner in CORNER_SETTINGS:
            assert any(l.startswith(impl) and corner in l and "PASS" in l for l in lines), (impl, corner)
    assert lines[-1] == "all corners PASS"


def test_check_exits_nonzero_on_failure(monkeypatch, capsys):
    from eos_kernels import check

    monkeypatch.setitem(check.CORNERS, "pool", lambda A, D, s: A)  # a wrong corner
    assert check.run_check() == 1
    out = capsys.readouterr().out
    assert "pool" in out and "FAIL" in out
