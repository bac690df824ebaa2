"""Qwen3-VL and Qwen3-VL-MoE specifics (issue 19, item 1): DeepStack, videos, drift (tiny random models, CPU).

The guarantees every family has (keep-all bit-exact, cache = no cache for greedy / beam /
sampling / static cache, padded and ragged batches = each sample alone, eager = sdpa,
assisted decoding and prompt lookup, unpatch, text-only = stock) run on Qwen3-VL and
Qwen3-VL-MoE in ``test_patch_families.py``. Here:

- a hand reference of the reduction at a layer before (0), between (1, 2) and after (4)
  the DeepStack layers 0-2, and of two chained reducers: layers run one by one, the visual
  tokens rated by the prompt's text after the first image with the model's own q/k norms and
  interleaved-MRoPE phases, pruned (or merged) by hand, and **every later DeepStack level
  added to exactly the kept visual tokens, each with its own features** -- checked both on the
  logits and on what the model's ``_deepstack_process`` receives;
- videos (per-frame ``<|vision_start|>`` blocks after a timestamp), also a Theta that empties
  whole frames, and a model whose last layer is a DeepStack layer;
- drift: a simulated change of the DeepStack call raises ``TransformersDriftError``;
- deepcopy, the MoE FLOPs estimate, refusals.
"""
import copy
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

import eos_kernels  # noqa: E402
from eos_kernels.integrations.qwen3_vl import patch_qwen3_vl, unpatch_qwen3_vl  # noqa: E402
from eos_kernels.operator import eos_reduce  # noqa: E402
from eos_kernels.patching import TransformersDriftError, is_patched  # noqa: E402
from eos_kernels.theta import Reducer, Theta  # noqa: E402

import _tiny_families as tf  # noqa: E402
import _tiny_qwen3_vl as tq  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MERGE = dict(gamma=1.0, tau=1e-4, theta=-1e9)
IMAGE, VIDEO = (1, 4, 8), (2, 4, 4)  # 8 image tokens; a video of 2 frames of 4 tokens each


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def model(request):
    return tq.tiny_qwen3(moe=request.param)


@pytest.fixture(autouse=True)
def _unpatch_after(request):
    yield
    if "model" in request.fixturenames:
        unpatch_qwen3_vl(request.getfixturevalue("model"))


def _inputs(model, seed=0, grids=(IMAGE,), videos=(VIDEO,)):
    prompt = tq.qwen3_prompt(list(grids), video_grids=list(videos), seed=seed)
    return tq.qwen3_inputs(model, [prompt], [list(grids)], [list(videos)] if videos else None, seed=seed)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _visual(ids):
    return (ids == tf.IMAGE_TOKEN_ID) | (ids == tf.VIDEO_TOKEN_ID)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class _Recorder:
    """Wraps the class's ``_deepstack_process`` (before patching, so the patch's wrapper calls it):
    records the (mask, features) each call receives."""

    def __init__(self, monkeypatch, text):
        self.calls = []
        real = type(text)._deepstack_process

        def recording(self_, hidden_states, visual_pos_masks, visual_embeds):
            self.calls.append((visual_pos_masks.clone(), visual_embeds.clone()))
            return real(self_, hidden_states, visual_pos_masks, visual_embeds)

        monkeypatch.setattr(type(text), "_deepstack_process", recording)


@torch.no_grad()
def _reference(model, inputs, reducers):
    """Logits at the kept positions and the kept positions, by hand: ``reducers`` maps a layer to
    ``(keep, merge)``; DeepStack level i goes to the kept visual tokens after layer i."""
    lm = model.model.language_model
    captured = {}

    def grab_text(module, args, kwargs):
        captured["mask"] = kwargs["visual_pos_masks"][0].clone()
        captured["levels"] = [e.clone() for e in kwargs["deepstack_visual_embeds"]]

    def grab_layer(module, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).clone()
        captured["pe"] = kwargs["position_embeddings"]

    handles = [lm.register_forward_pre_hook(grab_text, with_kwargs=True),
               lm.layers[0].register_forward_pre_hook(grab_layer, with_kwargs=True)]
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    ids = inputs["input_ids"][0]
    L = ids.shape[0]
    visual = _visual(ids)
    assert torch.equal(captured["mask"], visual)  # DeepStack goes to every image / video position
    rank = visual.long().cumsum(0) - 1  # row of each visual position in the DeepStack features
    first = int(visual.nonzero()[0])
    rows = ~visual & (torch.arange(L) > first)  # rating rows: the prompt's text after the first visual token
    x, (cos, sin) = captured["x"], captured["pe"]
    sel = torch.arange(L)  # original positions of the tokens the layers hold
    levels = captured["levels"]
    for i, layer in enumerate(lm.layers):
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        c, s = cos[:, sel], sin[:, sel]
        if i in reducers:
            attn = layer.self_attn
            hn = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(hn).view(1, n, -1, attn.head_dim)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(hn).view(1, n, -1, attn.head_dim)).transpose(1, 2)
            q, k = q * c[:, None] + _rotate_half(q) * s[:, None], k * c[:, None] + _rotate_half(k) * s[:, None]
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            probs = (q @ k.transpose(-1, -2) * attn.scaling).masked_fill(mask[0] != 0, float("-inf")).softmax(-1)
            importance = probs[0][:, rows[sel]].mean(dim=(0, 1))  # [n]
        out = layer(x, attention_mask=mask, position_embeddings=(c, s))
        x = out[0] if isinstance(out, tuple) else out
        if i in reducers:
            keep, merge = reducers[i]
            vis = visual[sel].nonzero().squeeze(1)  # current coordinates
            order = torch.sort(importance[vis], descending=True, stable=True).indices
            anchors, cands = vis[order[:keep]].sort().values, vis[order[keep:]].sort().values
            if merge:
                reduced = eos_reduce(x[:, anchors], x[:, cands], importance[cands][None], impl="torch",
                                     **Reducer(i, keep, **MERGE).operator_kwargs())
                x = x.clone()
                x[:, anchors] = reduced
            keep_mask = ~visual[sel]
            keep_mask[anchors] = True
            x, sel = x[:, keep_mask], sel[keep_mask]
        if i < len(levels):  # DeepStack: the kept visual tokens, each with its own row
            vis = visual[sel]
            x = x.clone()
            x[0, vis] = x[0, vis] + levels[i][rank[sel[vis]]]
    return model.lm_head(lm.norm(x)), sel, levels, rank


@pytest.mark.parametrize("reducers", [
    {0: (5, False)},                 # before every DeepStack addition but level 0's
    {1: (6, False)},                 # between the DeepStack layers
    {2: (4, True)},                  # merged anchors get their own level-2 features
    {4: (5, False)},                 # after the DeepStack layers
    {0: (10, False), 2: (4, False)},  # chained, ragged schedule of kept visual tokens
], ids=["layer0", "layer1", "layer2-merge", "layer4", "layers0+2"])
def test_reduction_equals_a_hand_reference_with_deepstack_on_the_kept_tokens(model, reducers, monkeypatch):
    inputs = _inputs(model, seed=4)
    n = int(_visual(inputs["input_ids"]).sum())
    assert n == 16
    ref, sel, levels, rank = _reference(model, inputs, reducers)
    recorder = _Recorder(monkeypatch, model.model.language_model)
    theta = Theta([Reducer(layer, keep, **(MERGE if merge else {}))
                   for layer, (keep, merge) in sorted(reducers.items())])
    patch_qwen3_vl(model, theta)
    out = _logits(model, inputs)
    stages = model.eos_report.stages
    assert [s.layer for s in stages] == sorted(reducers)
    assert torch.equal(stages[-1].kept_positions[0], sel)
    torch.testing.assert_close(out[0, sel], ref[0], atol=2e-5, rtol=1e-5)
    removed = torch.ones(out.shape[1], dtype=torch.bool)
    removed[sel] = False
    assert torch.equal(out[0, removed], torch.zeros_like(out[0, removed]))
    # what the model's DeepStack method received: after each reduction exactly the kept visual tokens' rows
    visual = _visual(inputs["input_ids"][0])
    assert len(recorder.calls) == len(levels) == 3
    for level, (mask, feats) in enumerate(recorder.calls):
        done = [s for s in stages if s.layer <= level]
        kept = done[-1].kept_positions[0] if done else torch.arange(visual.numel())
        assert torch.equal(mask[0], visual[kept])
        assert torch.equal(feats, levels[level][rank[kept[visual[kept]]]])


def test_video_frames_are_visual_timestamps_and_markers_are_not(model):
    inputs = _inputs(model, seed=11, grids=(), videos=((3, 4, 4),))  # 3 frames of 4 tokens
    ids = inputs["input_ids"][0]
    assert int((ids == tf.VIDEO_TOKEN_ID).sum()) == 12 and int((ids == tf.VISION_START_TOKEN_ID).sum()) == 3
    ref = _logits(model, inputs)
    patch_qwen3_vl(model, Theta([Reducer(1, 1.0)]))
    assert torch.equal(_logits(model, inputs), ref)
    # down to 2 of 12 tokens: at least one frame loses all of its tokens; the model needs none per frame
    patch_qwen3_vl(model, Theta([Reducer(0, 2)]))
    _logits(model, inputs)
    stage = model.eos_report.stages[0]
    assert (stage.visual_in, stage.visual_out) == ((12,), (2,))
    kept = set(stage.kept_positions[0].tolist())
    assert set((~_visual(ids)).nonzero().squeeze(1).tolist()) <= kept  # timestamps, markers, text
    frames = (ids == tf.VIDEO_TOKEN_ID).nonzero().squeeze(1).view(3, 4)
    assert any(not (set(f.tolist()) & kept) for f in frames)
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False))


def test_image_and_video_batch_generates_like_each_sample_alone(model):
    """Images and videos in one left-padded batch (DeepStack's joint image + video path), reduced before
    the last DeepStack layer: each sample gets what it gets alone, with and without the cache."""
    grids, videos = [[IMAGE], []], [[VIDEO], [(2, 4, 8)]]
    prompts = [tq.qwen3_prompt(g, video_grids=v, seed=20 + i) for i, (g, v) in enumerate(zip(grids, videos))]
    batch = tq.qwen3_inputs(model, prompts, grids, videos, side="left", seed=3)
    alone = [tq.qwen3_inputs(model, [p], [g], [v], seed=3) for p, g, v in zip(prompts, grids, videos)]
    alone[0]["pixel_values"] = batch["pixel_values"]
    alone[0]["pixel_values_videos"] = batch["pixel_values_videos"][:32]
    alone[1]["pixel_values_videos"] = batch["pixel_values_videos"][32:]
    patch_qwen3_vl(model, Theta([Reducer(1, 0.5), Reducer(3, 0.5)]))
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert model.eos_report.visual_tokens == (16, 16) and model.eos_report.reduced
    assert torch.equal(gen, model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False))
    for b, inputs in enumerate(alone):
        assert torch.equal(gen[b, -4:], model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, -4:])


def test_deepstack_after_the_last_layer_reaches_the_kept_tokens():
    """A model with as many layers as DeepStack levels: the last level meets the hidden states the last
    layer scattered back to the input length; kept tokens get it, removed ones stay zero."""
    small = tq.tiny_qwen3(num_layers=3, seed=2)
    inputs = _inputs(small, seed=5)
    ref, sel, _, _ = _reference(small, inputs, {1: (6, False)})
    try:
        patch_qwen3_vl(small, Theta([Reducer(1, 6)]))
        out = _logits(small, inputs)
        torch.testing.assert_close(out[0, sel], ref[0], atol=2e-5, rtol=1e-5)
        gen = small.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(gen, small.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False))
    finally:
        unpatch_qwen3_vl(small)


# --------------------------------------------------------------------------- drift (simulated changes)
def _drop_deepstack_kwargs(module, args, kwargs):
    kwargs = dict(kwargs)
    kwargs.pop("visual_pos_masks")
    kwargs.pop("deepstack_visual_embeds")
    return args, kwargs


def _short_features(module, args, kwargs):
    return args, dict(kwargs, deepstack_visual_embeds=[e[1:] for e in kwargs["deepstack_visual_embeds"]])


@pytest.mark.parametrize("change", ["renamed", "features", "inlined", "other-mask"])
def test_a_changed_deepstack_call_raises_drift(model, change):
    inputs = _inputs(model, seed=6)
    text = model.model.language_model
    theta = Theta([Reducer(4 if change == "inlined" else 1, 0.5)])
    patch_qwen3_vl(model, theta)
    handle = None
    if change == "renamed":  # the text model no longer receives visual_pos_masks / deepstack_visual_embeds
        handle = text.register_forward_pre_hook(_drop_deepstack_kwargs, with_kwargs=True, prepend=True)
        match = "without .*visual_pos_masks"
    elif change == "features":  # features no longer one row per visual position
        handle = text.register_forward_pre_hook(_short_features, with_kwargs=True, prepend=True)
        match = "one row per visual position"
    elif change == "inlined":  # the addition no longer goes through _deepstack_process (reducer after it)
        text.__dict__["_deepstack_process"] = type(text)._deepstack_process.__get__(text)
        match = "applied 0 of its 3 DeepStack levels"
    else:  # the model hands _deepstack_process a mask of its own
        wrapper = text.__dict__["_deepstack_process"]
        text.__dict__["_deepstack_process"] = lambda h, m, e: wrapper(h, m.clone(), e)
        match = "mask or DeepStack features that the text model was not given"
    try:
        with pytest.raises(TransformersDriftError, match=match):
            _logits(model, inputs)
    finally:
        if handle is not None:
            handle.remove()
    unpatch_qwen3_vl(model)
    assert "_deepstack_process" not in text.__dict__
    # nothing reduced, nothing checked: the same change under a keep-all Theta is the stock model's business
    patch_qwen3_vl(model, Theta([Reducer(1, 1.0)]))
    _logits(model, inputs)


def test_a_text_model_without_deepstack_method_is_refused(model, monkeypatch):
    monkeypatch.delattr(type(model.model.language_model), "_deepstack_process")
    with pytest.raises(ValueError, match="no `_deepstack_process`"):
        patch_qwen3_vl(model, Theta([Reducer(1, 0.5)]))
    assert not is_patched(model)


# --------------------------------------------------------------------------- hygiene, accounting, refusals
def test_deepcopy_is_an_independent_patched_copy(model):
    inputs = _inputs(model, seed=7)
    stock = _logits(model, inputs)
    patch_qwen3_vl(model, Theta([Reducer(1, 0.5)]))
    reduced = _logits(model, inputs)
    clone = copy.deepcopy(model)
    try:
        clone_text = clone.model.language_model
        assert clone_text.__dict__["_deepstack_process"].__self__ is clone_text
        assert torch.equal(_logits(clone, inputs), reduced)
        unpatch_qwen3_vl(model)
        assert torch.equal(_logits(model, inputs), stock)
        assert torch.equal(_logits(clone, inputs), reduced) and clone.eos_report.reduced
    finally:
        unpatch_qwen3_vl(clone)
    assert torch.equal(_logits(clone, inputs), stock)


def test_token_report_counts_the_active_experts(model):
    inputs = _inputs(model, seed=8)
    patch_qwen3_vl(model, Theta([Reducer(1, 0.5)]))
    _logits(model, inputs)
    report = model.eos_report.token_report(0)
    moe = hasattr(model.model.language_model.layers[0].mlp, "experts")
    assert report["intermediate_size"] == (2 * 32 if moe else 128)
    assert report["hidden_size"] == 64 and 0 < report["prefill_flops_ratio"] < 1


def test_bad_theta_and_other_families_are_refused(model):
    with pytest.raises(ValueError, match="layer 6 does not exist"):
        patch_qwen3_vl(model, Theta([Reducer(6, 0.5)]))
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Reducer(1, 0)
    from eos_kernels.integrations.qwen2_vl import patch_qwen2_vl

    with pytest.raises(ValueError, match=type(model).__name__):
        patch_qwen2_vl(model, Theta([Reducer(1, 0.5)]))
    assert not is_patched(model)
    eos_kernels.patch(model, Theta([Reducer(1, 0.5)]))  # the auto entry point picks this adapter
    assert type(model.__dict__["_eos_patch_state"].adapter).__name__ == "Qwen3VLAdapter"


def test_unsupported_models_list_qwen3_vl():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"Qwen3VLForConditionalGeneration.*Qwen3VLMoeForConditionalGeneration"):
        eos_kernels.patch(llama, Theta([Reducer(1, 0.5)]))


@torch.no_grad()
def test_the_base_model_class_is_patched_alike(model):
    """``Qwen3VLModel`` / ``Qwen3VLMoeModel`` on their own (no LM head): keep-all bit-exact, a reducing
    Theta gives the hidden states of the full model's reduced forward."""
    base = model.model
    inputs = _inputs(model, seed=9)
    stock = base(**inputs).last_hidden_state
    try:
        patch_qwen3_vl(base, Theta([Reducer(1, 1.0)]))
        assert torch.equal(base(**inputs).last_hidden_state, stock)
        patch_qwen3_vl(base, Theta([Reducer(1, 0.5)]))
        reduced = base(**inputs).last_hidden_state
        assert base.eos_report.reduced and not torch.equal(reduced, stock)
    finally:
        unpatch_qwen3_vl(base)
    patch_qwen3_vl(model, Theta([Reducer(1, 0.5)]))
    assert torch.equal(model.lm_head(reduced), _logits(model, inputs))
