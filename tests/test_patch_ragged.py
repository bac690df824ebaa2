"""Ragged batches: samples holding different numbers of visual tokens (tiny LLaVA, CPU, fp32).

Each sample is reduced at its own count; the shorter reduced sequences are
padded with masked slots inside the patched layers. A batch must give each
sample what it gives alone, and generate with the cache what it gives without.
"""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

from eos_kernels import patch_llava, unpatch_llava  # noqa: E402
from eos_kernels.theta import Reducer, Theta  # noqa: E402

from _tiny_models import make_pixels, make_prompt, pad_batch, tiny_llava  # noqa: E402

N_VIS = 16
HYBRID = dict(gamma=0.083, tau=0.22, theta=0.1)
THETA = Theta([Reducer(1, 10), Reducer(2, 0.5, **HYBRID), Reducer(4, 3)], name="ragged")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0, attn_implementation="sdpa")


@pytest.fixture(autouse=True)
def _unpatch_after(model):
    yield
    unpatch_llava(model)


def two_images(before, between, after, seed):
    first = make_prompt(N_VIS, before, between, seed=seed)
    return torch.cat([first, make_prompt(N_VIS, 0, after, seed=seed + 1)[1:]])


def ragged_samples():
    """(prompt, images) with 1, 0 and 2 images: 16, 0 and 32 visual tokens."""
    px = make_pixels(3, seed=21)
    return [(make_prompt(N_VIS, 3, 6, seed=0), px[:1]),
            (make_prompt(0, 7, 9, seed=1), px[:0]),
            (two_images(2, 3, 5, seed=2), px[1:3])]


def _logits(model, ids, px, mask=None, pos=None):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px if px.shape[0] else None, attention_mask=mask,
                     position_ids=pos).logits


def _greedy(model, ids, px, n=5, **kw):
    if px.shape[0]:  # a text-only prompt gets no pixel_values argument at all
        kw["pixel_values"] = px
    return model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, **kw)


def _batch(samples, side="left"):
    ids, mask = pad_batch([p for p, _ in samples], side)
    return ids, mask, torch.cat([px for _, px in samples])


@pytest.mark.parametrize("side", ["left", "right"])
def test_ragged_batch_matches_each_sample_alone(model, side):
    samples = ragged_samples()
    patch_llava(model, THETA)
    ids, mask, px = _batch(samples, side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = _logits(model, ids, px, mask, pos)
    report = model.eos_report
    assert report.visual_tokens == (16, 0, 32)
    assert [(s.visual_in, s.visual_out) for s in report.stages] == [
        ((16, 0, 32), (10, 0, 10)), ((10, 0, 10), (5, 0, 5)), ((5, 0, 5), (3, 0, 3))]
    for b, (p, img) in enumerate(samples):
        alone = _logits(model, p[None], img)
        torch.testing.assert_close(batch[b, mask[b].bool()], alone[0], atol=2e-5, rtol=1e-5)


def test_ragged_counts_clip_per_sample(model):
    """A reducer's count above what a sample has is clipped: the 16-token sample keeps all at layer 1."""
    samples = ragged_samples()
    theta = Theta([Reducer(1, 20), Reducer(3, 8)], name="clip")
    patch_llava(model, theta, num_visual_tokens=32)
    ids, mask, px = _batch(samples)
    batch = _logits(model, ids, px, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    assert [(s.layer, s.visual_in, s.visual_out) for s in model.eos_report.stages] == [
        (1, (16, 0, 32), (16, 0, 20)), (3, (16, 0, 20), (8, 0, 8))]
    for b, (p, img) in enumerate(samples):
        alone = _logits(model, p[None], img)
        torch.testing.assert_close(batch[b, mask[b].bool()], alone[0], atol=2e-5, rtol=1e-5)


def test_token_report_per_sample_is_what_each_sample_ran(model):
    """``eos_report.token_report(b)``: sample b's own count, kept counts, real text tokens and the model's sizes,
    the same numbers as ``Theta.token_report`` at that sample's count (LLaVA: 16 and 32 tokens, none)."""
    samples = ragged_samples()
    patch_llava(model, THETA, num_visual_tokens=32)
    ids, mask, px = _batch(samples)
    _logits(model, ids, px, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    report = model.eos_report
    cfg = model.config.text_config
    L = cfg.num_hidden_layers
    for b, (prompt, _) in enumerate(samples):
        n = report.visual_tokens[b]
        text = int((prompt != model.config.image_token_id).sum())  # the padding is not counted
        got = report.token_report(b)
        assert got["num_visual_tokens"] == n and got["text_tokens"] == text
        assert (got["hidden_size"], got["intermediate_size"]) == (cfg.hidden_size, cfg.intermediate_size)
        if n == 0:  # a text-only sample: nothing to reduce, nothing saved
            assert got["final"] == 0 and got["prefill_flops_ratio"] == 1.0
            assert [s[1:] for s in got["schedule"]] == [(0, 0)] * len(THETA)
            continue
        want = THETA.token_report(n, L, text, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size)
        for key in ("schedule", "leaving", "processed", "final", "mean_leaving", "mean_processed",
                    "prefill_flops", "prefill_flops_full", "prefill_flops_ratio"):
            assert got[key] == want[key], (b, key)
        assert got["prefill_flops_ratio"] < 1
    assert report.to_dict()["text_tokens"] == [int((p != model.config.image_token_id).sum()) for p, _ in samples]
    assert report.token_report(-1) == report.token_report(2) == report.token_report(torch.tensor(2))
    with pytest.raises(ValueError, match="sample must be in 0..2"):
        report.token_report(3)
    with pytest.raises(ValueError, match="sample must be in 0..2"):
        report.token_report(-4)
    with pytest.raises(TypeError, match="sample must be an int"):
        report.token_report("0")


def test_ragged_generate_cache_equals_no_cache_and_alone(model):
    samples = ragged_samples()
    patch_llava(model, THETA)
    ids, mask, px = _batch(samples)
    out = _greedy(model, ids, px, attention_mask=mask)
    assert torch.equal(out, _greedy(model, ids, px, attention_mask=mask, use_cache=False))
    for b, (p, img) in enumerate(samples):
        assert torch.equal(out[b, -5:], _greedy(model, p[None], img)[0, -5:])
    assert torch.equal(out, _greedy(model, ids, px, attention_mask=mask, cache_implementation="static"))
    # beam search on the image + text-only pair: transformers 5.0's own beam search without a cache
    # differs from its cached one for a two-image prompt, on the stock model too
    ids2, mask2, px2 = _batch(samples[:2])
    beam = _greedy(model, ids2, px2, attention_mask=mask2, num_beams=3)
    assert torch.equal(beam, _greedy(model, ids2, px2, attention_mask=mask2, num_beams=3, use_cache=False))
    torch.manual_seed(5)
    sampled = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=5,
                             do_sample=True, top_k=20)
    torch.manual_seed(5)
    again = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=5,
                           do_sample=True, top_k=20, use_cache=False)
    assert torch.equal(sampled, again)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_ragged_batch_without_padding(impl):
    """Equal lengths, different visual counts: transformers passes no mask under sdpa; the patch builds one."""
    model = tiny_llava(seed=0, attn_implementation=impl)
    a = make_prompt(N_VIS, 5, 20, seed=3)        # 16 visual tokens
    b = two_images(2, 3, 4, seed=4)              # 32 visual tokens
    assert a.numel() == b.numel()
    px = make_pixels(3, seed=8)
    ids = torch.stack([a, b])
    patch_llava(model, THETA)
    batch = _logits(model, ids, px)
    out = _greedy(model, ids, px)
    assert torch.equal(out, _greedy(model, ids, px, use_cache=False))
    for i, (p, img) in enumerate([(a, px[:1]), (b, px[1:])]):
        torch.testing.assert_close(batch[i], _logits(model, p[None], img)[0], atol=2e-5, rtol=1e-5)
        assert torch.equal(out[i, -5:], _greedy(model, p[None], img)[0, -5:])


def test_image_prompt_beside_text_only_prompt(model):
    """The case users hit first: one prompt with an image, one without (used to raise `got [16, 0]`)."""
    samples = ragged_samples()[:2]
    ids, mask, px = _batch(samples)
    stock = _greedy(model, ids, px, attention_mask=mask)
    keep_all = Theta([Reducer(1, 1.0), Reducer(3, N_VIS)], name="keep-all")
    patch_llava(model, keep_all)
    assert torch.equal(_greedy(model, ids, px, attention_mask=mask), stock)  # keep-all: bit for bit
    patch_llava(model, THETA)
    out = _greedy(model, ids, px, attention_mask=mask)
    assert model.eos_report.stages[0].visual_out == (10, 0)
    for b, (p, img) in enumerate(samples):
        assert torch.equal(out[b, -5:], _greedy(model, p[None], img)[0, -5:])
