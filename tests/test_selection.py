"""Tests for eos_kernels.select_anchors and gather_tokens."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eos_kernels
from eos_kernels.selection import gather_tokens, select_anchors


def brute_force(scores_row, k):
    """Anchors by definition: rank by (score descending, index ascending)."""
    ranked = sorted(range(len(scores_row)), key=lambda i: (-scores_row[i], i))
    anchors = sorted(ranked[:k])
    return anchors, sorted(set(range(len(scores_row))) - set(anchors))


def test_exported_from_package():
    assert eos_kernels.select_anchors is select_anchors


def test_top_k_in_original_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]])
    anchors, candidates = select_anchors(scores, 3)
    assert anchors.tolist() == [[1, 3, 5]]
    assert candidates.tolist() == [[0, 2, 4]]
    assert anchors.dtype == candidates.dtype == torch.int64


def test_batch_with_different_orders_per_sample():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0],
                           [3.0, 5.0, 1.0, 4.0, 2.0]])
    anchors, candidates = select_anchors(scores, 2)
    assert anchors.tolist() == [[0, 1], [3, 4], [1, 3]]
    assert candidates.tolist() == [[2, 3, 4], [0, 1, 2], [0, 2, 4]]


def test_ties_prefer_the_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, -0.0, 0.0, -0.0, 1.0, 1.0]])
    anchors, candidates = select_anchors(scores, 3)
    assert anchors.tolist() == [[1, 2, 4], [0, 1, 2], [0, 4, 5]]
    assert candidates.tolist() == [[0, 3, 5], [3, 4, 5], [1, 2, 3]]


def test_ties_deterministic_on_long_rows():
    """Many equal scores (beyond any small-sort fast path): lowest indices win."""
    scores = torch.zeros(2, 3000)
    scores[1, 2500:] = 1.0
    anchors, candidates = select_anchors(scores, 700)
    assert torch.equal(anchors[0], torch.arange(700))
    assert torch.equal(anchors[1], torch.cat([torch.arange(200), torch.arange(2500, 3000)]))
    assert torch.equal(candidates[0], torch.arange(700, 3000))


def test_k_equals_n_gives_no_candidates():
    scores = torch.randn(3, 7)
    anchors, candidates = select_anchors(scores, 7)
    assert torch.equal(anchors, torch.arange(7).expand(3, 7))
    assert candidates.shape == (3, 0) and candidates.dtype == torch.int64


def test_k_equals_one():
    scores = torch.tensor([[0.2, -1.0, 3.0, 3.0], [float("-inf"), -5.0, float("inf"), 0.0]])
    anchors, candidates = select_anchors(scores, 1)
    assert anchors.tolist() == [[2], [2]]
    assert candidates.tolist() == [[0, 1, 3], [0, 1, 3]]


def test_one_dimensional_scores():
    anchors, candidates = select_anchors(torch.tensor([0.5, 0.1, 0.9, 0.3]), 2)
    assert anchors.tolist() == [0, 2] and candidates.tolist() == [1, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    scores = torch.tensor([[3.0, 1.0, 2.0, 1.0]], dtype=dtype)
    anchors, candidates = select_anchors(scores, 2)
    assert anchors.tolist() == [[0, 2]] and candidates.tolist() == [[1, 3]]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_matches_brute_force(data):
    n = data.draw(st.integers(1, 12))
    b = data.draw(st.integers(1, 3))
    k = data.draw(st.integers(1, n))
    # few distinct values, so ties are common
    values = st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("inf")])
    rows = [data.draw(st.lists(values, min_size=n, max_size=n)) for _ in range(b)]
    anchors, candidates = select_anchors(torch.tensor(rows), k)
    for i, row in enumerate(rows):
        want_a, want_c = brute_force(row, k)
        assert anchors[i].tolist() == want_a
        assert candidates[i].tolist() == want_c


def test_gather_tokens():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3).requires_grad_()
    idx = torch.tensor([[0, 4], [1, 3]])
    out = gather_tokens(x, idx)
    assert torch.equal(out, torch.stack([x[0, [0, 4]], x[1, [1, 3]]]))
    out.sum().backward()
    assert x.grad[0, 4].tolist() == [1.0, 1.0, 1.0] and x.grad[0, 1].tolist() == [0.0] * 3
    assert gather_tokens(x, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 3)


@pytest.mark.parametrize("x,idx,exc", [
    (torch.zeros(2, 5), torch.zeros(2, 1, dtype=torch.long), ValueError),
    (torch.zeros(2, 5, 3), torch.zeros(3, 1, dtype=torch.long), ValueError),
    (torch.zeros(2, 5, 3), torch.zeros(2, 1), TypeError),
    (torch.zeros(2, 5, 3), torch.full((2, 1), 5), ValueError),
    (torch.zeros(2, 5, 3), torch.full((2, 1), -1), ValueError),
])
def test_gather_tokens_bad_input(x, idx, exc):
    with pytest.raises(exc):
        gather_tokens(x, idx)


@pytest.mark.parametrize("scores,k,exc,match", [
    (torch.randn(2, 5), 0, ValueError, "k must be in"),
    (torch.randn(2, 5), 6, ValueError, "k must be in"),
    (torch.randn(2, 5), -1, ValueError, "k must be in"),
    (torch.randn(2, 5), 2.0, TypeError, "k must be an integer"),
    (torch.randn(2, 5), True, TypeError, "k must be an integer"),
    (torch.randn(2, 5, 1), 2, ValueError, "scores must be"),
    (torch.tensor(1.0), 1, ValueError, "scores must be"),
    (torch.arange(5).reshape(1, 5), 2, TypeError, "floating"),
    ([[0.1, 0.2]], 1, TypeError, "torch.Tensor"),
    (torch.tensor([[0.1, float("nan"), 0.3]]), 1, ValueError, "NaN"),
])
def test_select_anchors_bad_input(scores, k, exc, match):
    with pytest.raises(exc, match=match):
        select_anchors(scores, k)


def test_numpy_integer_k_accepted():
    np = pytest.importorskip("numpy")
    anchors, _ = select_anchors(torch.tensor([[1.0, 3.0, 2.0]]), np.int64(2))
    assert anchors.tolist() == [[1, 2]]
