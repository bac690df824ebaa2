"""The EOS patch on more model families: Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3
(tiny random models, CPU, fp32).

The same guarantees as LLaVA-1.5 (``test_patch_llava.py``), under each model's own
prompt format (``tests/_tiny_families.py``): a keep-all Theta is the stock model bit
for bit; a reducing Theta reduces and the report says so; ``generate`` with the KV
cache equals ``generate(use_cache=False)`` (greedy, beam, sampling with a seed);
unpatching restores the stock model bit for bit; the rows that rate the visual
tokens are the prompt's text after the image (checked against a reference that
drops the tokens by hand, with the model's own -- for Qwen multimodal -- rotary
positions); a padded batch equals each sample alone.

Qwen: images and videos are visual, ``<|vision_start|>``/``<|vision_end|>`` are not;
kept tokens keep their original 3-D (t, h, w) rotary positions and decoding uses
the stock model's positions (rope deltas). LLaVA-NeXT: the image-newline tokens
carry the image token id and are reducible visual tokens. LLaVA-OneVision runs the
same tests (its adapter is LLaVA-NeXT's with video tokens visual too). InternVL:
``<img>`` / ``</img>`` are text, every tile's ``<IMG_CONTEXT>`` tokens visual. Gemma 3:
bidirectional image blocks and sliding-window layers whose window (8 tokens here) is
shorter than an image block and every prompt, so that the windows cut image blocks,
prompts and every sliding layer's KV cache (``test_patch_gemma3.py`` checks the masks
by hand); its logits are larger (scaled embeddings), hence its own tolerance.

Batches whose samples hold different visual counts (ragged: different image
sizes, a text-only prompt) are built by :func:`ragged_batch`.
"""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

from eos_kernels.integrations.llava_next import (  # noqa: E402
    patch_llava_next, patch_llava_onevision, unpatch_llava_next, unpatch_llava_onevision,
)
from eos_kernels.integrations.gemma3 import patch_gemma3, unpatch_gemma3  # noqa: E402
from eos_kernels.integrations.internvl import patch_internvl, unpatch_internvl  # noqa: E402
from eos_kernels.integrations.qwen2_vl import patch_qwen2_vl, unpatch_qwen2_vl  # noqa: E402
from eos_kernels.integrations.qwen3_vl import patch_qwen3_vl, unpatch_qwen3_vl  # noqa: E402
from eos_kernels.patching import get_report, is_patched  # noqa: E402
from eos_kernels.theta import Reducer, Theta  # noqa: E402

import _tiny_families as tf  # noqa: E402
import _tiny_qwen3_vl as tq  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HYBRID = dict(gamma=0.083, tau=0.22, theta=0.1)
MERGE = dict(gamma=1.0, tau=1e-4, theta=-1e9)
# fractions: the visual counts of these families depend on the image
PAPER = Theta([Reducer(1, 0.6), Reducer(2, 0.5, **HYBRID), Reducer(4, 0.5)], name="paper")
MERGING = Theta([Reducer(1, 0.5, **MERGE), Reducer(3, 0.5, **MERGE)], name="merge")
KEEP_ALL = Theta([Reducer(1, 1.0), Reducer(3, 1.0, tau=0.5, theta=0.3)], name="keep-all")


# --------------------------------------------------------------------------- families
class Family:
    """One model family: its tiny model, prompts in its own format, patch / unpatch."""

    name: str
    #: fp32 logits of two runs that should agree (a batch vs each sample alone, eager vs sdpa): at least the
    #: stock model's own batch-vs-alone difference (tests/_tiny_families.py models, CPU)
    tol = dict(atol=2e-5, rtol=1e-5)

    def build(self, seed=0, attn_implementation="sdpa"):
        raise NotImplementedError

    def one(self, model, seed=0) -> dict:
        """Inputs of one prompt with one image (batch 1)."""
        raise NotImplementedError

    def pair(self, model, side="left", seed=0) -> tuple[dict, list[dict]]:
        """A padded batch of two prompts with equal visual counts, and each sample's own inputs."""
        raise NotImplementedError

    def ragged(self, model, seed=0) -> tuple[dict, list[dict]]:
        """A padded batch whose samples hold different visual counts (one without any), and each alone."""
        raise NotImplementedError

    def text_only(self, model) -> dict:
        raise NotImplementedError

    @staticmethod
    def text_model(model):
        return model.model.language_model


class Qwen(Family):
    patch = staticmethod(patch_qwen2_vl)
    unpatch = staticmethod(unpatch_qwen2_vl)

    def __init__(self, version):
        self.version = version
        self.name = f"qwen{version}"

    def build(self, seed=0, attn_implementation="sdpa"):
        return tf.tiny_qwen(self.version, seed=seed, attn_implementation=attn_implementation)

    def one(self, model, seed=0, grid=(1, 4, 8)):
        return tf.qwen_inputs(model, [tf.qwen_prompt([grid], seed=seed)], [[grid]], seed=seed)

    def pair(self, model, side="left", seed=0):
        # different grids (so different 3-D positions), the same count: 8 tokens each
        grids = [[(1, 4, 8)], [(1, 8, 4)]]
        prompts = [tf.qwen_prompt(grids[0], seed=seed, after=4), tf.qwen_prompt(grids[1], seed=seed + 1, after=9)]
        batch = tf.qwen_inputs(model, prompts, grids, side=side, seed=seed)
        alone = [tf.qwen_inputs(model, [p], [g], seed=seed) for p, g in zip(prompts, grids)]
        # the same pixels as in the batch: the batch's pixel rows are the samples' rows in order
        n0 = 4 * 8
        alone[0]["pixel_values"] = batch["pixel_values"][:n0]
        alone[1]["pixel_values"] = batch["pixel_values"][n0:]
        return batch, alone

    def ragged(self, model, seed=0):
        return tf.qwen_ragged(model, seed)

    def text_only(self, model):
        return tf.qwen_inputs(model, [tf.qwen_prompt([], seed=5)], [[]])

    @staticmethod
    def mrope(cos):
        """(cos|sin) [3, B, L, hd] (transformers 5.0) -> [B, L, hd] merged by mrope_section (as the model does)."""
        if cos.dim() == 3:
            return cos
        section = [2, 3, 3] * 2
        return torch.cat([m[i % 3] for i, m in enumerate(cos.split(section, dim=-1))], dim=-1)


class Qwen3(Qwen):
    """Qwen3-VL (dense or MoE): the Qwen prompt format with DeepStack after text layers 0-2; its hand
    reference of the reduction (with DeepStack) is in ``test_patch_qwen3_vl.py``."""

    patch = staticmethod(patch_qwen3_vl)
    unpatch = staticmethod(unpatch_qwen3_vl)
    own_reference = True

    def __init__(self, moe):
        self.moe = moe
        self.name = "qwen3_moe" if moe else "qwen3"

    def build(self, seed=0, attn_implementation="sdpa"):
        return tq.tiny_qwen3(self.moe, seed=seed, attn_implementation=attn_implementation)

    def one(self, model, seed=0, grid=(1, 4, 8)):
        return tq.qwen3_inputs(model, [tq.qwen3_prompt([grid], seed=seed)], [[grid]], seed=seed)

    def pair(self, model, side="left", seed=0):
        grids = [[(1, 4, 8)], [(1, 8, 4)]]
        prompts = [tq.qwen3_prompt(grids[0], seed=seed, after=4), tq.qwen3_prompt(grids[1], seed=seed + 1, after=9)]
        batch = tq.qwen3_inputs(model, prompts, grids, side=side, seed=seed)
        alone = [tq.qwen3_inputs(model, [p], [g], seed=seed) for p, g in zip(prompts, grids)]
        alone[0]["pixel_values"] = batch["pixel_values"][:32]
        alone[1]["pixel_values"] = batch["pixel_values"][32:]
        return batch, alone

    def ragged(self, model, seed=0):
        return tq.qwen3_ragged(model, seed)

    def text_only(self, model):
        return tq.qwen3_inputs(model, [tq.qwen3_prompt([], seed=5)], [[]])


class Next(Family):
    name = "llava_next"
    patch = staticmethod(patch_llava_next)
    unpatch = staticmethod(unpatch_llava_next)

    def build(self, seed=0, attn_implementation="sdpa"):
        return tf.tiny_llava_next(seed=seed, attn_implementation=attn_implementation)

    def one(self, model, seed=0, size=(50, 100)):
        return tf.next_inputs(model, [size], seed=seed)

    def _split(self, batch, prompts):
        alone = []
        for b, p in enumerate(prompts):
            alone.append({"input_ids": p[None], "pixel_values": batch["pixel_values"][b:b + 1],
                          "image_sizes": batch["image_sizes"][b:b + 1]})
        return alone

    def pair(self, model, side="left", seed=0):
        # 3 and 5 tiles, 52 image tokens each (newlines included)
        sizes = [(50, 100), (60, 110)]
        n = [tf.next_visual_count(model, s) for s in sizes]
        assert n[0] == n[1] == 52
        prompts = [tf.next_prompt(n[0], 3, 4, seed=seed), tf.next_prompt(n[1], 5, 9, seed=seed + 1)]
        ids, mask = tf.pad_batch(prompts, side)
        batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": tf.next_pixels(sizes, seed=seed),
                 "image_sizes": torch.tensor(sizes)}
        return batch, self._split(batch, prompts)

    def ragged(self, model, seed=0):
        return tf.next_ragged(model, seed)

    def text_only(self, model):
        return {"input_ids": tf.next_prompt(0, 4, 6, seed=5)[None]}

    @staticmethod
    def mrope(cos):
        return cos


class Onevision(Next):
    name = "llava_onevision"
    patch = staticmethod(patch_llava_onevision)
    unpatch = staticmethod(unpatch_llava_onevision)

    def build(self, seed=0, attn_implementation="sdpa"):
        return tf.tiny_llava_onevision(seed=seed, attn_implementation=attn_implementation)


class InternVL(Family):
    name = "internvl"
    patch = staticmethod(patch_internvl)
    unpatch = staticmethod(unpatch_internvl)

    def build(self, seed=0, attn_implementation="sdpa"):
        return tf.tiny_internvl(seed=seed, attn_implementation=attn_implementation)

    def one(self, model, seed=0, tiles=2):
        return tf.internvl_inputs([tf.internvl_prompt([tiles], seed=seed)], [[tiles]], seed=seed)

    def pair(self, model, side="left", seed=0):
        # one tile each (16 image tokens): transformers 5.0's generate expands pixel_values per beam by rows,
        # which gives a beam of a multi-tile image other tiles (the stock model's beam search then differs)
        tiles = [[1], [1]]
        prompts = [tf.internvl_prompt(tiles[0], seed=seed, after=4),
                   tf.internvl_prompt(tiles[1], seed=seed + 1, after=9)]
        batch = tf.internvl_inputs(prompts, tiles, side=side, seed=seed)
        return batch, tf._split_tiles(batch, prompts, tiles, lambda p, t: tf.internvl_inputs([p], [t], seed=seed))

    def ragged(self, model, seed=0):
        return tf.internvl_ragged(seed)

    def text_only(self, model):
        return tf.internvl_inputs([tf.internvl_prompt([], seed=5)], [[]])

    @staticmethod
    def mrope(cos):
        return cos


class Gemma3(Family):
    name = "gemma3"
    patch = staticmethod(patch_gemma3)
    unpatch = staticmethod(unpatch_gemma3)
    #: the stock model's batch-vs-alone logits differ by up to 3.5e-5 (embeddings scaled by 8, logits ~10x
    #: those of the other tiny families)
    tol = dict(atol=1e-4, rtol=1e-5)

    def build(self, seed=0, attn_implementation="sdpa"):
        return tf.tiny_gemma3(seed=seed, attn_implementation=attn_implementation)

    def one(self, model, seed=0):
        return tf.gemma_inputs([tf.gemma_prompt(1, seed=seed, after=10)], [1], seed=seed)

    def pair(self, model, side="left", seed=0):
        prompts = [tf.gemma_prompt(1, seed=seed, after=4), tf.gemma_prompt(1, seed=seed + 1, after=9)]
        batch = tf.gemma_inputs(prompts, [1, 1], side=side, seed=seed)
        return batch, tf._split_tiles(batch, prompts, [[1], [1]], lambda p, t: tf.gemma_inputs([p], [1], seed=seed))

    def ragged(self, model, seed=0):
        return tf.gemma_ragged(seed)

    def text_only(self, model):
        return tf.gemma_inputs([tf.gemma_prompt(0, seed=5)], [0])

    @staticmethod
    def mrope(cos):
        return cos


FAMILIES = {"qwen2": Qwen("2"), "qwen2.5": Qwen("2.5"), "llava_next": Next(), "llava_onevision": Onevision(),
            "qwen3": Qwen3(moe=False), "qwen3_moe": Qwen3(moe=True), "internvl": InternVL(), "gemma3": Gemma3()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    family = FAMILIES[request.param]
    return family, family.build()


@pytest.fixture(autouse=True)
def _unpatch_after(request):
    yield
    if "fam" in request.fixturenames:
        family, model = request.getfixturevalue("fam")
        family.unpatch(model)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, n=5, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, max_new_tokens=n, **kw)


def _visual(ids):
    return (ids == tf.IMAGE_TOKEN_ID) | (ids == tf.VIDEO_TOKEN_ID)


# --------------------------------------------------------------------------- identities
def test_keep_all_theta_is_bit_identical(fam):
    family, model = fam
    inputs = family.one(model)
    ref_logits, ref_tokens = _logits(model, inputs), _generate(model, inputs)
    for theta in (Theta(), KEEP_ALL):
        family.patch(model, theta)
        assert torch.equal(_logits(model, inputs), ref_logits), theta
        assert torch.equal(_generate(model, inputs), ref_tokens), theta
        assert torch.equal(_generate(model, inputs, use_cache=False), ref_tokens), theta
    report = model.eos_report
    assert report.stages == () and "keep-all" in report.note
    assert report.visual_tokens == (int(_visual(inputs["input_ids"]).sum()),)


def test_prompt_without_image_passes_through(fam):
    family, model = fam
    inputs = family.text_only(model)
    ref_logits, ref_tokens = _logits(model, inputs), _generate(model, inputs)
    family.patch(model, PAPER)
    assert torch.equal(_logits(model, inputs), ref_logits)
    assert torch.equal(_generate(model, inputs), ref_tokens)
    assert not model.eos_report.reduced and "no image tokens" in model.eos_report.note


# --------------------------------------------------------------------------- reduction
@torch.no_grad()
def test_reducing_theta_reduces_and_reports(fam):
    family, model = fam
    inputs = family.one(model)
    ids = inputs["input_ids"]
    L, n = ids.shape[1], int(_visual(ids).sum())
    ref = _logits(model, inputs)
    family.patch(model, PAPER)
    out = model(**inputs, use_cache=True)
    report = model.eos_report
    expected = PAPER.schedule(n)
    assert [(s.layer, s.visual_in[0], s.visual_out[0]) for s in report.stages] == expected
    assert report.visual_tokens == (n,)
    assert report.stages[-1].seq_out == L - (n - expected[-1][2])
    assert "visual in" in str(report)
    # each layer's cache holds the tokens that layer processed; logits keep the input length
    cache = getattr(out, "cache", None) or out.past_key_values
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    seq = L
    want = []
    for i, layer in enumerate(cache.layers):  # a sliding-window layer (Gemma 3) keeps its last W - 1 slots
        window = getattr(layer, "sliding_window", None)
        want.append(seq if window is None else min(seq, window - 1))
        for s in report.stages:
            if s.layer == i:
                seq = s.seq_out
    assert lengths == want
    assert out.logits.shape == ref.shape
    assert not torch.allclose(out.logits[0, -1], ref[0, -1])
    # only visual tokens were removed: every non-visual position is kept
    kept = report.stages[-1].kept_positions[0]
    assert set(torch.nonzero(~_visual(ids[0])).squeeze(1).tolist()) <= set(kept.tolist())


def test_generate_cache_equals_no_cache(fam):
    family, model = fam
    family.patch(model, PAPER)
    inputs = family.one(model, seed=1)
    assert torch.equal(_generate(model, inputs, n=6), _generate(model, inputs, n=6, use_cache=False))
    assert model.eos_report.reduced
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outs.append(_generate(model, inputs, n=6, do_sample=True, top_k=0, temperature=1.0, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])
    # beam search on a left-padded batch: cache rows and per-layer slot maps are reordered every step
    batch, _ = family.pair(model, "left", seed=2)
    family.patch(model, MERGING)
    beams = [_generate(model, batch, n=4, num_beams=3, use_cache=uc) for uc in (True, False)]
    assert torch.equal(beams[0], beams[1])
    assert len(model.eos_report.stages) == 2


@torch.no_grad()
def test_decoding_positions_are_the_stock_models(fam):
    """After a reduced prefill each generated token gets the rotary phase it gets in the stock model
    (Qwen: rope deltas computed from the full prompt; positions read from layer 0's full cache)."""
    family, model = fam
    inputs = family.one(model, seed=3)
    layer0 = family.text_model(model).layers[0]
    seen = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            seen[-1].append(tuple(t.clone() for t in kwargs["position_embeddings"]))

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        seen.append([])
        _generate(model, inputs, n=4)
        family.patch(model, PAPER)
        seen.append([])
        _generate(model, inputs, n=4)
        assert model.eos_report.reduced
    finally:
        handle.remove()
    assert len(seen[0]) == len(seen[1]) == 3
    for (c0, s0), (c1, s1) in zip(*seen):
        assert torch.equal(c0, c1) and torch.equal(s0, s1)


# --------------------------------------------------------------------------- importance rows, by hand
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@torch.no_grad()
def test_rows_are_the_prompt_text_after_the_image(fam):
    """A one-reducer prune equals a reference that rates the visual tokens with the prompt's text
    after the image (the model's own format: Qwen's <|vision_end|>, question and generation prompt)
    and drops the others by hand, with the kept tokens' original (Qwen: 3-D) rotary phases."""
    family, model = fam
    if getattr(family, "own_reference", False):
        pytest.skip("Qwen3-VL's reference (q/k norms, DeepStack) is test_patch_qwen3_vl.py's")
    if isinstance(family, Gemma3):
        pytest.skip("Gemma 3's sliding-window and bidirectional masks: its own hand reference in test_patch_gemma3.py")
    inputs = family.one(model, seed=4)
    ids = inputs["input_ids"]
    L = ids.shape[1]
    visual = _visual(ids)[0]
    vis_idx = visual.nonzero().squeeze(1)
    rows = torch.arange(L) > vis_idx.max()  # one image: everything after it is prompt text
    assert not bool(rows[vis_idx].any()) and int(rows.sum()) >= 5
    if isinstance(family, Qwen):
        assert ids[0, vis_idx.min() - 1] == tf.VISION_START_TOKEN_ID
        assert ids[0, vis_idx.max() + 1] == tf.VISION_END_TOKEN_ID  # <|vision_end|> is the first rating row
    layer_r, keep = 2, max(2, len(vis_idx) // 3)

    lm = family.text_model(model)
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["pe"] = kwargs["position_embeddings"]

    handle = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _logits(model, inputs)
    finally:
        handle.remove()
    x = captured["x"]
    cos, sin = captured["pe"]
    for i, layer in enumerate(lm.layers):
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        if i == layer_r:
            attn = layer.self_attn
            hn = layer.input_layernorm(x)
            q = attn.q_proj(hn).view(1, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(hn).view(1, n, -1, attn.head_dim).transpose(1, 2)
            c, s = family.mrope(cos)[:, None], family.mrope(sin)[:, None]
            q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            probs = (q @ k.transpose(-1, -2) * attn.head_dim ** -0.5).masked_fill(mask[0] != 0, float("-inf"))
            importance = probs.softmax(-1)[0][:, rows].mean(dim=(0, 1))
        out = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        x = out[0] if isinstance(out, tuple) else out
        if i == layer_r:
            order = torch.sort(importance[vis_idx], descending=True, stable=True).indices[:keep]
            keep_mask = ~visual.clone()
            keep_mask[vis_idx[order]] = True
            sel = keep_mask.nonzero().squeeze(1)
            x, cos, sin = x[:, sel], cos[..., sel, :], sin[..., sel, :]
    ref = model.lm_head(lm.norm(x))

    family.patch(model, Theta([Reducer(layer_r, keep)], name="prune-one"))
    out = _logits(model, inputs)
    stage = model.eos_report.stages[0]
    assert torch.equal(stage.kept_positions[0], sel)
    torch.testing.assert_close(out[0, sel], ref[0], atol=2e-5, rtol=1e-5)
    removed = torch.ones(L, dtype=torch.bool)
    removed[sel] = False
    assert torch.equal(out[0, removed], torch.zeros_like(out[0, removed]))


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_equal_counts_matches_each_sample_alone(fam, side):
    family, model = fam
    family.patch(model, PAPER)
    batch, alone = family.pair(model, side, seed=6)
    out = _logits(model, batch)
    assert model.eos_report.batch_size == 2 and model.eos_report.reduced
    mask = batch["attention_mask"].bool()
    for b, inputs in enumerate(alone):
        torch.testing.assert_close(out[b, mask[b]], _logits(model, inputs)[0], **family.tol)
    if side == "left":
        gen = _generate(model, batch, n=4)
        for b, inputs in enumerate(alone):
            assert torch.equal(gen[b, -4:], _generate(model, inputs, n=4)[0, -4:])


def ragged_batch(family, model, seed=0):
    """A left-padded batch whose samples hold different visual counts (the last one none), and each alone."""
    return family.ragged(model, seed=seed)


def test_ragged_batch_matches_each_sample_alone(fam):
    family, model = fam
    family.patch(model, PAPER)
    batch, alone = ragged_batch(family, model, seed=8)
    counts = tuple(int(_visual(a["input_ids"]).sum()) for a in alone)
    assert len(set(counts)) == len(counts) and counts[-1] == 0
    out = _logits(model, batch)
    report = model.eos_report
    assert report.visual_tokens == counts
    for b, n in enumerate(counts):  # each sample follows the schedule of its own count
        want = [(inc, kept) for _, inc, kept in PAPER.schedule(n)] if n else [(0, 0)] * len(report.stages)
        assert [(s.visual_in[b], s.visual_out[b]) for s in report.stages] == want
    mask = batch["attention_mask"].bool()
    for b, inputs in enumerate(alone):
        torch.testing.assert_close(out[b, mask[b]], _logits(model, inputs)[0], **family.tol)
    gen = _generate(model, batch, n=4)
    assert torch.equal(gen, _generate(model, batch, n=4, use_cache=False))
    for b, inputs in enumerate(alone):
        assert torch.equal(gen[b, -4:], _generate(model, inputs, n=4)[0, -4:])


# --------------------------------------------------------------------------- attention, caches, inputs
def test_eager_and_sdpa_agree_and_static_cache_equals_dynamic(fam):
    family, model = fam
    eager = family.build(attn_implementation="eager")
    batch, _ = family.pair(model, "left", seed=14)
    mask = batch["attention_mask"].bool()
    stock_static = _stock_failure(lambda: _generate(model, batch, n=4, cache_implementation="static"))
    results = []
    try:
        for m in (model, eager):
            family.patch(m, PAPER)
            results.append((_logits(m, batch), [s.kept_positions for s in m.eos_report.stages],
                            _generate(m, batch, n=4)))
    finally:
        family.unpatch(eager)
    tol = {**family.tol, "atol": max(5e-5, family.tol["atol"])}
    torch.testing.assert_close(results[0][0][mask], results[1][0][mask], **tol)
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert torch.equal(results[0][2], results[1][2])
    if stock_static is not None:
        pytest.skip(f"the stock static cache fails here: {stock_static}")
    assert torch.equal(_generate(model, batch, n=4, cache_implementation="static"), results[0][2])


def _stock_failure(fn, errors=(IndexError, RuntimeError, ValueError)) -> str | None:
    """None if the stock model does ``fn()``, else what it raised on this transformers release (transformers
    5.15's Gemma 3 cannot build the image-block mask for a static cache: an IndexError in its mask function)."""
    import transformers

    try:
        fn()
    except errors as exc:
        return f"transformers {transformers.__version__}: {type(exc).__name__}: {exc}"
    return None


def _stock_or_skip(fn, what, errors=(TypeError, AttributeError)):
    try:
        return fn()
    except errors as exc:  # the stock model of this release cannot do it either
        import transformers

        pytest.skip(f"stock {what} fails on transformers {transformers.__version__}: {type(exc).__name__}: {exc}")


def test_assisted_and_prompt_lookup_generation_equal_greedy(fam):
    family, model = fam
    inputs = family.one(model, seed=15)
    kw = dict(n=6, eos_token_id=tf.EOS_TOKEN_ID)  # transformers 5.0's prompt lookup needs an eos id
    # transformers 5.0 cannot crop a sliding-window cache past its window (Gemma 3): the stock model refuses
    # assisted decoding there with a ValueError; 5.15's fails inside its sdpa call (a mask one key short)
    _stock_or_skip(lambda: _generate(model, inputs, prompt_lookup_num_tokens=3, **kw), "prompt lookup",
                   (TypeError, AttributeError, ValueError, RuntimeError))
    family.patch(model, PAPER)
    expected = _generate(model, inputs, **kw)
    assert model.eos_report.reduced
    assert torch.equal(_generate(model, inputs, prompt_lookup_num_tokens=3, **kw), expected)
    assistant = family.build(seed=1)  # a different (unpatched) draft model
    assert torch.equal(_generate(model, inputs, assistant_model=assistant, **kw), expected)


@torch.no_grad()
def test_inputs_embeds_only(fam):
    """Visual tokens are found from the placeholder embeddings when no input_ids are given."""
    family, model = fam
    inputs = family.one(model, seed=16)
    n = int(_visual(inputs["input_ids"]).sum())
    embeds = dict(inputs)
    embeds["inputs_embeds"] = model.get_input_embeddings()(embeds.pop("input_ids"))

    def forward():
        if hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None  # Qwen keeps the last prefill's deltas on the module
        return model(**embeds).logits

    ref = _stock_or_skip(forward, "forward from inputs_embeds")
    family.patch(model, KEEP_ALL)
    assert torch.equal(forward(), ref)
    family.patch(model, PAPER)
    forward()
    assert [(s.layer, s.visual_in[0], s.visual_out[0]) for s in model.eos_report.stages] == PAPER.schedule(n)


# --------------------------------------------------------------------------- hygiene
def _hook_snapshot(model):
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), dict(vars(m)).keys() - {"training"})
            for name, m in model.named_modules()}


def test_unpatch_restores_bit_for_bit(fam):
    family, model = fam
    inputs = family.one(model, seed=9)
    ref_logits, ref_tokens = _logits(model, inputs), _generate(model, inputs)
    hooks = _hook_snapshot(model)
    family.patch(model, MERGING)
    assert is_patched(model)
    assert not torch.equal(_logits(model, inputs), ref_logits)
    family.unpatch(model)
    assert not is_patched(model) and get_report(model) is None
    assert torch.equal(_logits(model, inputs), ref_logits)
    assert torch.equal(_generate(model, inputs), ref_tokens)
    assert "generate" not in vars(model)
    assert _hook_snapshot(model) == hooks


def test_deepcopy_gives_an_independent_patched_model(fam):
    import copy

    family, model = fam
    inputs = family.one(model, seed=9)
    family.patch(model, PAPER)
    expected = _generate(model, inputs)
    report = model.eos_report
    clone = copy.deepcopy(model)
    assert is_patched(clone) and clone.__dict__["_eos_patch_state"] is not model.__dict__["_eos_patch_state"]
    assert torch.equal(_generate(clone, inputs), expected)
    assert clone.eos_report is not report and clone.eos_report.reduced and model.eos_report is report
    with torch.no_grad():  # the clone's hooks drive the clone
        clone.get_output_embeddings().weight.mul_(2)
    assert torch.equal(_generate(model, inputs), expected)
    family.unpatch(clone)
    assert is_patched(model) and not is_patched(clone)


def test_wrong_family_and_bad_theta_are_refused(fam):
    family, model = fam
    other = {"llava_next": patch_llava_onevision}.get(family.name, patch_llava_next)
    if not isinstance(family, (Qwen, Gemma3)):
        with pytest.raises(ValueError, match=type(model).__name__):
            patch_gemma3(model, PAPER)
    if isinstance(family, Gemma3):
        with pytest.raises(ValueError, match=type(model).__name__):
            patch_internvl(model, PAPER)
    if isinstance(family, Next):
        with pytest.raises(ValueError, match=type(model).__name__):
            patch_qwen2_vl(model, PAPER)
    with pytest.raises(ValueError, match=type(model).__name__):
        other(model, PAPER)
    assert not is_patched(model)
    with pytest.raises(ValueError, match="layer 6 does not exist"):
        family.patch(model, Theta([Reducer(6, 0.5)]))
    # counts are per image: an integer keep above what the prompt holds is clipped to it at the prefill
    inputs = family.one(model)
    n = int(_visual(inputs["input_ids"]).sum())
    big = Theta([Reducer(1, 10_000), Reducer(2, 3)])
    from eos_kernels.integrations.auto import adapter_for

    fixed = adapter_for(model).visual_tokens_per_image(model)
    if fixed is not None:  # one image's count (Gemma 3): validated at patch time, as for LLaVA-1.5
        with pytest.raises(ValueError, match=rf"more than the {fixed} incoming visual tokens"):
            family.patch(model, big)
        assert not is_patched(model)
        family.patch(model, big, num_visual_tokens=10_000)  # prompts with more tokens: say so
    else:
        family.patch(model, big)
    _logits(model, inputs)
    assert [(s.layer, s.visual_in, s.visual_out) for s in model.eos_report.stages] == [(2, (n,), (3,))]


# --------------------------------------------------------------------------- family specifics
@torch.no_grad()
def test_qwen_video_tokens_are_visual_and_vision_markers_are_not():
    family = FAMILIES["qwen2.5"]
    model = family.build(seed=1)
    grids, videos = [[(1, 4, 4)]], [[(2, 4, 4)]]  # 4 image tokens + 8 video tokens
    prompt = tf.qwen_prompt(grids[0], video_grids=videos[0], seed=11)
    inputs = tf.qwen_inputs(model, [prompt], grids, videos, seed=11)
    try:
        patch_qwen2_vl(model, Theta([Reducer(1, 6)]))
        _logits(model, inputs)
        stage = model.eos_report.stages[0]
        assert (stage.visual_in, stage.visual_out) == ((12,), (6,))
        kept = set(stage.kept_positions[0].tolist())
        markers = ((prompt == tf.VISION_START_TOKEN_ID) | (prompt == tf.VISION_END_TOKEN_ID)).nonzero().squeeze(1)
        assert len(markers) == 4 and set(markers.tolist()) <= kept
        assert torch.equal(_generate(model, inputs, n=4), _generate(model, inputs, n=4, use_cache=False))
    finally:
        unpatch_qwen2_vl(model)


@torch.no_grad()
def test_llava_next_newline_tokens_are_reducible_visual_tokens():
    family = FAMILIES["llava_next"]
    model = family.build(seed=1)
    size = (100, 40)
    newline = tf.next_newline_mask(model, size)
    n = newline.numel()
    assert n == tf.next_visual_count(model, size) and int(newline.sum()) >= 2
    inputs = tf.next_inputs(model, [size], seed=12)
    assert int((inputs["input_ids"] == tf.IMAGE_TOKEN_ID).sum()) == n  # newlines carry the image token id
    try:
        patch_llava_next(model, Theta([Reducer(1, 4)]))
        _logits(model, inputs)
        stage = model.eos_report.stages[0]
        assert (stage.visual_in, stage.visual_out) == ((n,), (4,))
        first = int((inputs["input_ids"][0] == tf.IMAGE_TOKEN_ID).nonzero()[0])
        kept = set(stage.kept_positions[0].tolist())
        newline_pos = set((first + newline.nonzero().squeeze(1)).tolist())
        assert len(newline_pos - kept) >= len(newline_pos) - 4  # they compete like any visual token
    finally:
        unpatch_llava_next(model)


def test_internvl35_on_a_qwen3_text_model():
    """InternVL3.5's text model is Qwen3 (q/k norms before the transpose): keep-all is the stock model, the reduced
    model generates the same with and without the cache, and a padded batch is each sample alone."""
    family = FAMILIES["internvl"]
    model = tf.tiny_internvl(seed=2, text="qwen3")
    assert type(model.model.language_model).__name__ == "Qwen3Model"
    inputs = family.one(model, seed=18)
    stock = _logits(model, inputs)
    try:
        patch_internvl(model, KEEP_ALL)
        assert torch.equal(_logits(model, inputs), stock)
        patch_internvl(model, PAPER)
        assert torch.equal(_generate(model, inputs, n=5), _generate(model, inputs, n=5, use_cache=False))
        assert model.eos_report.reduced
        batch, alone = family.pair(model, "left", seed=19)
        out, mask = _logits(model, batch), batch["attention_mask"].bool()
        for b, a in enumerate(alone):
            torch.testing.assert_close(out[b, mask[b]], _logits(model, a)[0], **family.tol)
    finally:
        unpatch_internvl(model)


@torch.no_grad()
def test_llava_onevision_video_tokens_are_visual():
    model = FAMILIES["llava_onevision"].build(seed=1)
    inputs = tf.onevision_inputs(model, image_size=(56, 56), frames=2, seed=13)
    n_img = tf.next_visual_count(model, (56, 56))
    n_vid = tf.onevision_video_count(model, 2)
    ref = _logits(model, inputs)
    try:
        patch_llava_onevision(model, KEEP_ALL)
        assert torch.equal(_logits(model, inputs), ref)
        patch_llava_onevision(model, Theta([Reducer(1, 0.5)]))
        _logits(model, inputs)
        stage = model.eos_report.stages[0]
        assert (stage.visual_in, stage.visual_out) == ((n_img + n_vid,), ((n_img + n_vid) // 2,))
        assert torch.equal(_generate(model, inputs, n=4), _generate(model, inputs, n=4, use_cache=False))
    finally:
        unpatch_llava_onevision(model)


# --------------------------------------------------------------------------- saved model folders (issue 12, item 6)
@pytest.mark.parametrize("kind", ["qwen2.5", "llava_next"])
def test_saved_tiny_model_loads_with_its_processor_and_runs_patched(kind, tmp_path):
    """``save_pretrained`` folders for the search / demo: the model, a tokenizer with the family's chat
    template and an image processor load with ``from_pretrained``; the processor's token counts are the
    model's; a patched ``generate`` reduces and equals ``use_cache=False``."""
    import transformers
    from PIL import Image

    from eos_kernels.search.data import load_image_processor

    path = str(tmp_path / kind)
    if kind == "qwen2.5":
        tf.save_tiny_qwen(path, version="2.5")
    else:
        tf.save_tiny_llava_next(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    image = Image.new("RGB", (52, 40), (200, 30, 30))
    question = "what colour is the image ?"
    if kind == "qwen2.5":
        # the Qwen processor needs torchvision (its video half): tokenizer + image processor here
        images = load_image_processor(path)([image], return_tensors="pt")  # AutoImageProcessor where it can
        n = int(images["image_grid_thw"].prod(-1).sum()) // tf.QWEN_MERGE ** 2
        text = tok.apply_chat_template(
            [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>" + question}],
            add_generation_prompt=True, tokenize=False)
        assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
        inputs = dict(tok([text.replace("<|image_pad|>", "<|image_pad|> " * n)], return_tensors="pt"))
        inputs.pop("token_type_ids", None)
        inputs.update(images)
        if tf.takes_mm_token_type_ids(model):
            inputs["mm_token_type_ids"] = tf.mm_token_type_ids(inputs["input_ids"])
        patch = patch_qwen2_vl
    else:
        processor = transformers.AutoProcessor.from_pretrained(path)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        n = tf.next_visual_count(model, tuple(inputs["image_sizes"][0].tolist()))
        patch = patch_llava_next
    assert int((inputs["input_ids"] == tf.IMAGE_TOKEN_ID).sum()) == n
    patch(model, PAPER)
    out = _generate(model, inputs, n=4)
    assert model.eos_report.visual_tokens == (n,) and model.eos_report.reduced
    assert torch.equal(out, _generate(model, inputs, n=4, use_cache=False))


# --------------------------------------------------------------------------- one entry point
def test_eos_kernels_patch_chooses_the_adapter_from_the_class(fam):
    """``eos_kernels.patch`` gives what the family's own entry point gives; ``unpatch`` restores."""
    import eos_kernels
    from eos_kernels.integrations.auto import adapter_for

    family, model = fam
    inputs = family.one(model)
    stock = _logits(model, inputs)
    family.patch(model, PAPER)
    expected = _logits(model, inputs)
    family.unpatch(model)
    eos_kernels.patch(model, PAPER)
    assert type(adapter_for(model)).__name__ == type(model.__dict__["_eos_patch_state"].adapter).__name__
    assert torch.equal(_logits(model, inputs), expected)
    eos_kernels.unpatch(model)
    assert torch.equal(_logits(model, inputs), stock)


@torch.no_grad()
def test_the_base_model_class_is_patched_alike(fam):
    """``eos_kernels.patch`` on the family's ``...Model`` (no LM head): the generation model's reduced forward,
    bit for bit; keep-all and unpatch are the stock base model."""
    import eos_kernels

    family, model = fam
    base = model.model
    inputs = family.one(model, seed=17)
    stock = base(**inputs).last_hidden_state
    family.patch(model, PAPER)
    expected = _logits(model, inputs)
    family.unpatch(model)
    eos_kernels.patch(base, KEEP_ALL)
    assert torch.equal(base(**inputs).last_hidden_state, stock)
    eos_kernels.patch(base, PAPER)
    try:
        assert torch.equal(model.lm_head(base(**inputs).last_hidden_state), expected)
        assert base.eos_report.reduced
    finally:
        eos_kernels.unpatch(base)
    assert torch.equal(base(**inputs).last_hidden_state, stock)


def test_eos_kernels_patch_refuses_unsupported_models():
    import eos_kernels
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"no adapter for .*LlamaForCausalLM.*Qwen2_5_VLForConditionalGeneration"
                                         r".*InternVLForConditionalGeneration.*Gemma3ForConditionalGeneration"):
        eos_kernels.patch(llama, PAPER)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        eos_kernels.patch("llava", PAPER)
