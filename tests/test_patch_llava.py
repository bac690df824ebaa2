"""eos_kernels.patch_llava on tiny random LLaVA models (CPU, fp32, eval mode).

The models come from ``tests/_tiny_models.py``: CLIP vision (56 px, patch 14 ->
16 visual tokens) + Llama text (6 layers, 4 query / 2 key-value heads).
"""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

import eos_kernels  # noqa: E402
from eos_kernels import patch_llava, unpatch_llava  # noqa: E402
from eos_kernels.importance import text_to_visual_importance  # noqa: E402
from eos_kernels.patching import get_report  # noqa: E402
from eos_kernels.theta import Reducer, Theta  # noqa: E402

from _tiny_models import (  # noqa: E402
    IMAGE_TOKEN_ID, make_pixels, make_prompt, num_visual_tokens, pad_batch, tiny_llava,
)

N_VIS = 16
MERGE = dict(gamma=1.0, tau=1e-4, theta=-1e9)
POOL = dict(gamma=1.0, tau=1e6, theta=-1e9)
HYBRID = dict(gamma=0.083, tau=0.22, theta=0.1)

THETAS = {
    "prune": Theta([Reducer(1, 10), Reducer(3, 6), Reducer(4, 3)], name="prune"),
    "merge": Theta([Reducer(1, 10, **MERGE), Reducer(3, 6, **MERGE), Reducer(4, 3, **MERGE)], name="merge"),
    "pool": Theta([Reducer(1, 10, **POOL), Reducer(3, 6, **POOL), Reducer(4, 3, **POOL)], name="pool"),
    # paper-like: prune, interior hybrid, prune (table 6 shape, on 6 layers)
    "paper": Theta([Reducer(1, 10), Reducer(2, 6, **HYBRID), Reducer(4, 3)], name="paper"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llava(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def prompts():
    # (before, after) text lengths around the 16 image tokens
    shapes = [(3, 6), (5, 9), (1, 4)]
    return [make_prompt(N_VIS, b, a, seed=i) for i, (b, a) in enumerate(shapes)]


@pytest.fixture(autouse=True)
def _unpatch_after(sdpa_model):
    yield
    unpatch_llava(sdpa_model)


def logits(model, ids, pixels, mask=None, position_ids=None):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                     position_ids=position_ids).logits


def greedy(model, ids, pixels, n=6, **kw):
    return model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, do_sample=False, **kw)


# --------------------------------------------------------------------------- identities
def test_no_reducer_and_keep_all_are_identical(sdpa_model, prompts):
    model = sdpa_model
    ids, px = prompts[0][None], make_pixels(1)
    ref_logits, ref_tokens = logits(model, ids, px), greedy(model, ids, px)
    keep_all = Theta([Reducer(1, N_VIS), Reducer(3, 1.0, tau=0.5, theta=0.3)], name="keep-all")
    for theta in (Theta(), keep_all):
        patch_llava(model, theta)
        assert torch.equal(logits(model, ids, px), ref_logits), theta
        assert torch.equal(greedy(model, ids, px), ref_tokens), theta
        assert torch.equal(greedy(model, ids, px, use_cache=False), ref_tokens), theta
    report = model.eos_report  # a reducer that keeps everything does not run at all
    assert report.stages == () and "keep-all" in report.note


def test_text_only_prompts_pass_through_with_any_4d_mask():
    """A patched model passes a text-only batch through bit for bit whatever its 4-D mask (bool, additive
    float, or integer as eager attention takes it), and reports the real tokens of each sample as text."""
    model = tiny_llava(num_layers=2, attn_implementation="eager")
    ids, mask = pad_batch([make_prompt(0, 3, 5, seed=0), make_prompt(0, 6, 5, seed=1)], "left")
    L = ids.shape[1]
    causal = torch.tril(torch.ones(L, L, dtype=torch.long))[None, None] * mask[:, None, None, :]
    additive = torch.zeros(causal.shape).masked_fill(causal == 0, torch.finfo(torch.float32).min)
    for m in (mask, causal.bool(), additive, causal):
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=m).logits
        patch_llava(model, Theta([Reducer(0, 4)]))
        try:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=m).logits
            report = model.eos_report
        finally:
            unpatch_llava(model)
        assert torch.equal(out, ref), m.dtype
        assert report.visual_tokens == (0, 0) and report.stages == ()
        # an integer 4-D mask hides nothing when eager attention adds it: no padding is known there
        want = (L, L) if (m.dim() == 4 and not (m.dtype == torch.bool or m.is_floating_point())) \
            else tuple(mask.sum(dim=1).tolist())
        assert report.text_tokens == want, m.dtype


# --------------------------------------------------------------------------- generate: cache == no cache
@pytest.mark.parametrize("name", list(THETAS))
def test_generate_cache_equals_no_cache(sdpa_model, prompts, name):
    model = sdpa_model
    theta = THETAS[name]
    patch_llava(model, theta)
    expected = [(layer, inc, kept) for layer, inc, kept in theta.schedule(N_VIS)]
    for i, p in enumerate(prompts):
        ids, px = p[None], make_pixels(1, seed=i)
        with_cache = greedy(model, ids, px, n=6)
        report = model.eos_report
        assert [(s.layer, s.visual_in[0], s.visual_out[0]) for s in report.stages] == expected
        assert report.stages[-1].seq_out == ids.shape[1] - (N_VIS - expected[-1][2])
        no_cache = greedy(model, ids, px, n=6, use_cache=False)
        assert torch.equal(with_cache, no_cache), (name, i)
    # the reduction does something: logits differ from the unpatched model's
    ids, px = prompts[0][None], make_pixels(1, seed=0)
    patched = logits(model, ids, px)
    unpatch_llava(model)
    assert not torch.allclose(patched[0, -1], logits(model, ids, px)[0, -1])


def test_sampling_and_beam_search_cache_equals_no_cache(sdpa_model, prompts):
    model = sdpa_model
    patch_llava(model, THETAS["paper"])
    ids, px = prompts[1][None], make_pixels(1, seed=1)
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outs.append(model.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=True,
                                   top_k=0, temperature=1.0, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])
    # beam search: the cache rows (and the per-layer slot maps) are reordered every step
    ids2, mask2 = pad_batch([prompts[0], prompts[1]], "left")
    px2 = make_pixels(2, seed=5)
    beams = [model.generate(input_ids=ids2, attention_mask=mask2, pixel_values=px2, max_new_tokens=5,
                            num_beams=3, do_sample=False, use_cache=uc) for uc in (True, False)]
    assert torch.equal(beams[0], beams[1])
    assert [s.visual_out for s in model.eos_report.stages] == [(10,) * 6, (6,) * 6, (3,) * 6]


@torch.no_grad()
def test_each_layer_cache_holds_the_tokens_it_processed(sdpa_model, prompts):
    model = sdpa_model
    patch_llava(model, THETAS["prune"])  # keeps 10, 6, 3 of 16 after layers 1, 3, 4
    ids = prompts[0][None]
    L = ids.shape[1]
    out = model(input_ids=ids, pixel_values=make_pixels(1), use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [L, L, L - 6, L - 6, L - 10, L - 13]
    assert out.logits.shape[1] == L  # logits keep the input length


@torch.no_grad()
def test_cache_batch_ops_keep_the_slot_maps_aligned(sdpa_model, prompts):
    """Swapping / selecting cache rows (as beam search does) moves each row's slot map with it."""
    model = sdpa_model
    patch_llava(model, THETAS["paper"])
    # the short sample gets 9 pads; the long one keeps anchors among its first 9 slots, so a
    # map left behind by the swap would let the short one attend to its own padding
    ids, mask = pad_batch([prompts[1], prompts[2]], "left")
    px = make_pixels(2, seed=17)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def prefill_and_step(perm=None, select=None):
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        m2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        p2 = pos[:, -1:] + 1
        if perm is not None:
            cache.reorder_cache(perm)
            nxt, m2, p2 = nxt[perm], m2[perm], p2[perm]
        if select is not None:
            cache.batch_select_indices(select)
            nxt, m2, p2 = nxt[select], m2[select], p2[select]
        return model(input_ids=nxt, attention_mask=m2, position_ids=p2, past_key_values=cache).logits[:, -1]

    ref = prefill_and_step()
    swapped = prefill_and_step(perm=torch.tensor([1, 0]))
    torch.testing.assert_close(swapped, ref[[1, 0]], atol=1e-5, rtol=1e-5)
    selected = prefill_and_step(select=torch.tensor([1]))
    torch.testing.assert_close(selected, ref[[1]], atol=1e-5, rtol=1e-5)


def test_two_images_per_prompt(sdpa_model):
    model = sdpa_model
    first, second = make_prompt(N_VIS, 3, 2, seed=0), make_prompt(N_VIS, 0, 6, seed=1)[1:]
    ids = torch.cat([first, second])[None]  # 32 visual tokens in two blocks
    px = make_pixels(2, seed=19)
    theta = Theta([Reducer(1, 20), Reducer(3, 0.5, **HYBRID)], name="two-images")
    with pytest.raises(ValueError, match="16 incoming"):  # patch time assumes one image
        patch_llava(model, theta)
    patch_llava(model, theta, num_visual_tokens=2 * N_VIS)
    out = greedy(model, ids, px)
    assert [(s.visual_in[0], s.visual_out[0]) for s in model.eos_report.stages] == [(32, 20), (20, 10)]
    assert torch.equal(out, greedy(model, ids, px, use_cache=False))


# --------------------------------------------------------------------------- batches with padding
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sample_alone(sdpa_model, prompts, side):
    model = sdpa_model
    patch_llava(model, THETAS["paper"])
    pair = [prompts[0], prompts[1]]
    px = make_pixels(2, seed=7)
    ids, mask = pad_batch(pair, side)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = logits(model, ids, px, mask=mask, position_ids=pos)
    assert model.eos_report.batch_size == 2
    for b, p in enumerate(pair):
        alone = logits(model, p[None], px[b:b + 1])
        real = mask[b].bool()
        torch.testing.assert_close(batch[b, real], alone[0], atol=2e-5, rtol=1e-5)
    if side == "left":  # batched generation (left padding is how generate batches)
        out = greedy(model, ids, px, n=5, attention_mask=mask)
        for b, p in enumerate(pair):
            alone = greedy(model, p[None], px[b:b + 1], n=5)
            assert torch.equal(out[b, -5:], alone[0, -5:])
        assert torch.equal(out, greedy(model, ids, px, n=5, attention_mask=mask, use_cache=False))


# --------------------------------------------------------------------------- independent prune check
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _hand_importance(q, k, visual, rows):
    """Mean over heads and rating rows of each row's causal softmax (eager, by hand)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    L = q.shape[2]
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [1, H, L, L]
    mean = probs[0][:, rows[0]].mean(dim=(0, 1))
    return torch.where(visual[0], mean, torch.zeros_like(mean))


@torch.no_grad()
def test_prune_matches_reference_that_drops_tokens(sdpa_model, prompts):
    model = sdpa_model
    ids, px = prompts[1][None], make_pixels(1, seed=3)
    layer_r, keep = 2, 5
    captured = {}
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]),
                                     with_kwargs=True)
    try:
        logits(model, ids, px)
    finally:
        h.remove()

    # reference: the decoder layers by hand, candidates physically dropped after layer_r
    x = captured["embeds"]
    L = x.shape[1]
    visual = ids == IMAGE_TOKEN_ID
    pos = torch.arange(L)[None]
    first = int(visual[0].nonzero()[0])
    rows = ~visual & (pos > first)
    cos, sin = lm.rotary_emb(x, pos)
    kept_pos = pos
    for i, layer in enumerate(lm.layers):
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        if i == layer_r:
            attn = layer.self_attn
            hn = layer.input_layernorm(x)
            q = attn.q_proj(hn).view(1, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(hn).view(1, n, -1, attn.head_dim).transpose(1, 2)
            c, s = cos[:, None], sin[:, None]
            q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
            imp = _hand_importance(q, k, visual, rows)
            lib = text_to_visual_importance(q, k, visual, rows, None, impl="torch")[0]
            torch.testing.assert_close(imp, lib, atol=1e-6, rtol=1e-5)
        x = layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=kept_pos)
        if i == layer_r:
            vis_idx = visual[0].nonzero().squeeze(1)
            order = torch.sort(imp[vis_idx], descending=True, stable=True).indices[:keep]
            keep_mask = ~visual[0]
            keep_mask[vis_idx[order]] = True
            sel = keep_mask.nonzero().squeeze(1)
            x, cos, sin, kept_pos = x[:, sel], cos[:, sel], sin[:, sel], kept_pos[:, sel]
    ref = model.lm_head(lm.norm(x))

    patch_llava(model, Theta([Reducer(layer_r, keep)], name="prune-one"))
    out = logits(model, ids, px)
    stage = model.eos_report.stages[0]
    assert torch.equal(stage.kept_positions[0], sel)
    torch.testing.assert_close(out[0, sel], ref[0], atol=2e-5, rtol=1e-5)
    removed = torch.ones(L, dtype=torch.bool)
    removed[sel] = False
    assert torch.equal(out[0, removed], torch.zeros_like(out[0, removed]))


# --------------------------------------------------------------------------- attention implementations
def test_eager_and_sdpa_agree(sdpa_model, prompts):
    eager = tiny_llava(seed=0, attn_implementation="eager")
    assert eager.config.text_config._attn_implementation == "eager"
    theta = THETAS["paper"]
    pair = [prompts[0], prompts[2]]
    ids, mask = pad_batch(pair, "left")
    px = make_pixels(2, seed=11)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    results = []
    for model in (sdpa_model, eager):
        patch_llava(model, theta)
        results.append((logits(model, ids, px, mask=mask, position_ids=pos),
                        greedy(model, ids, px, n=5, attention_mask=mask),
                        [s.kept_positions for s in model.eos_report.stages]))
    real = mask.bool()
    torch.testing.assert_close(results[0][0][real], results[1][0][real], atol=2e-5, rtol=1e-5)
    assert torch.equal(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.equal(a, b)
    out_nc = greedy(eager, ids, px, n=5, attention_mask=mask, use_cache=False)
    assert torch.equal(results[1][1], out_nc)


def test_flash_attention_2(prompts):
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("flash_attention_2 needs CUDA")
    model = tiny_llava(seed=0, attn_implementation="sdpa").to("cuda", torch.float16)
    ids, px = prompts[0][None].cuda(), make_pixels(1).to("cuda", torch.float16)
    ref = greedy(model, ids, px)
    model.set_attn_implementation("flash_attention_2")
    patch_llava(model, THETAS["prune"])
    out = greedy(model, ids, px)
    assert out.shape == ref.shape
    assert torch.equal(out, greedy(model, ids, px, use_cache=False))


def test_static_cache_generate(sdpa_model, prompts):
    model = sdpa_model
    patch_llava(model, THETAS["merge"])
    ids, mask = pad_batch([prompts[0], prompts[2]], "left")
    px = make_pixels(2, seed=13)
    dyn = greedy(model, ids, px, n=5, attention_mask=mask)
    static = greedy(model, ids, px, n=5, attention_mask=mask, cache_implementation="static")
    assert torch.equal(dyn, static)


# --------------------------------------------------------------------------- patch hygiene
def _class_snapshot():
    import transformers
    from transformers.cache_utils import DynamicCache, DynamicLayer
    from transformers.models.llama import modeling_llama as ml
    from transformers.models.llava import modeling_llava as mv

    classes = [mv.LlavaForConditionalGeneration, mv.LlavaModel, ml.LlamaModel, ml.LlamaDecoderLayer,
               ml.LlamaAttention, torch.nn.Linear, torch.nn.Module, DynamicCache, DynamicLayer,
               transformers.GenerationMixin]
    snap = {cls: dict(vars(cls)) for cls in classes}
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    snap["attn"] = dict(ALL_ATTENTION_FUNCTIONS._global_mapping)
    snap["mask"] = dict(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
    return snap


def _hook_snapshot(model):
    """Every module's hooks (transformers installs its own output-capturing hooks lazily)."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), dict(vars(m)).keys() - {"training"})
            for name, m in model.named_modules()}


def test_unpatch_restores_and_instances_are_independent(sdpa_model, prompts):
    a = sdpa_model
    b = tiny_llava(seed=1)
    ids, px = prompts[0][None], make_pixels(1)
    ref_a, ref_b = logits(a, ids, px), logits(b, ids, px)
    gen_a = greedy(a, ids, px)
    config_a = a.config.to_dict()
    before = _class_snapshot()
    hooks_a = _hook_snapshot(a)
    hooks_b = _hook_snapshot(b)

    patch_llava(a, THETAS["merge"])
    merged = logits(a, ids, px)
    assert not torch.equal(merged, ref_a)
    assert torch.equal(logits(b, ids, px), ref_b)  # B untouched
    assert get_report(b) is None and not hasattr(b, "eos_report")
    assert _hook_snapshot(b) == hooks_b
    assert _hook_snapshot(a) != hooks_a
    after = _class_snapshot()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key] == after[key], key
    assert a.config.to_dict() == config_a

    patch_llava(a, THETAS["prune"])  # re-patching replaces the configuration
    assert get_report(a) is None  # the old report went with the old configuration
    logits(a, ids, px)
    assert a.eos_report.theta_name == "prune"
    assert [s.regime for s in a.eos_report.stages] == ["prune"] * 3

    unpatch_llava(a)
    assert torch.equal(logits(a, ids, px), ref_a)
    assert torch.equal(greedy(a, ids, px), gen_a)
    assert "generate" not in vars(a) and not hasattr(a, "eos_report")
    assert _hook_snapshot(a) == hooks_a
    unpatch_llava(a)  # a no-op the second time


def test_eos_report_attribute_agrees_with_get_report(sdpa_model, prompts):
    """``model.eos_report`` is None from patching until the first prefill (it raised AttributeError while
    get_report gave None), then that prefill's report; a re-patch resets it; unpatching removes it."""
    model = sdpa_model
    ids, px = prompts[0][None], make_pixels(1)
    assert not hasattr(model, "eos_report") and get_report(model) is None
    patch_llava(model, THETAS["prune"])
    assert model.eos_report is None and get_report(model) is None
    logits(model, ids, px)
    report = get_report(model)
    assert report is not None and model.eos_report is report and report.theta_name == "prune"
    patch_llava(model, THETAS["merge"])
    assert model.eos_report is None and get_report(model) is None
    logits(model, ids, px)
    assert model.eos_report is get_report(model) and model.eos_report.theta_name == "merge"
    unpatch_llava(model)
    assert not hasattr(model, "eos_report") and "eos_report" not in vars(model) and get_report(model) is None


def test_theta_from_dict_and_path(sdpa_model, prompts, tmp_path):
    model = sdpa_model
    theta = THETAS["paper"]
    path = tmp_path / "theta.json"
    theta.to_json(path)
    ids, px = prompts[0][None], make_pixels(1)
    out = []
    for spec in (theta, theta.to_dict(), str(path), path):
        patch_llava(model, spec)
        out.append(logits(model, ids, px))
    for o in out[1:]:
        assert torch.equal(o, out[0])


# --------------------------------------------------------------------------- errors and pass-through
def test_bad_theta_and_unsupported_model(sdpa_model, prompts):
    model = sdpa_model
    with pytest.raises(ValueError, match="layer 6 does not exist"):
        patch_llava(model, Theta([Reducer(6, 4)]))
    with pytest.raises(ValueError, match="more than the 16 incoming"):
        patch_llava(model, Theta([Reducer(1, 17)]))
    with pytest.raises(ValueError, match="more than the 8 incoming"):
        patch_llava(model, Theta([Reducer(1, 8), Reducer(2, 9)]))
    assert not hasattr(model, "eos_report")
    from transformers import LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        patch_llava(llama, Theta([Reducer(0, 4)]))
    with pytest.raises(TypeError):
        patch_llava(model, 42)
    # valid at patch time (told to expect 32 visual tokens); a prompt with 16 has its count clipped to 16
    # (samples of a batch may hold fewer visual tokens than the Theta was made for): nothing is removed
    stock = logits(model, prompts[0][None], make_pixels(1))
    patch_llava(model, Theta([Reducer(1, 20), Reducer(2, 12)]), num_visual_tokens=32)
    out = logits(model, prompts[0][None], make_pixels(1))
    assert [(s.visual_in, s.visual_out) for s in model.eos_report.stages] == [((16,), (12,))]
    assert not torch.equal(out, stock)


def test_prompt_without_image_passes_through(sdpa_model):
    model = sdpa_model
    ids = torch.tensor([[1, 5, 9, 33, 70, 101, 7]])
    ref_logits = logits(model, ids, None)
    ref_tokens = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    patch_llava(model, THETAS["paper"])
    assert torch.equal(logits(model, ids, None), ref_logits)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False), ref_tokens)
    report = model.eos_report
    assert not report.reduced and "no image tokens" in report.note
    assert "no reduction" in str(report)


def test_report_is_readable(sdpa_model, prompts):
    model = sdpa_model
    patch_llava(model, THETAS["paper"])
    ids, mask = pad_batch([prompts[0], prompts[1]], "right")
    logits(model, ids, make_pixels(2), mask=mask)
    report = eos_kernels.patching.get_report(model)
    assert report is model.eos_report
    text = str(report)
    assert "layer" in text and "visual in" in text and "visual out" in text
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(("1 ", "2 ", "4 "))]
    assert len(lines) == 6  # 3 reducers x 2 samples
    assert report.leaving_per_layer(1) == [16, 10, 6, 6, 3, 3]
    assert report.processed_per_layer(0) == [16, 16, 10, 6, 6, 3]
    assert report.to_dict()["stages"][1]["regime"] == "hybrid"
    assert num_visual_tokens(model) == N_VIS


# --------------------------------------------------------------------------- training with gradient checkpointing
def test_gradient_checkpointing_gives_the_same_gradients_or_a_clear_error():
    """Fine-tuning a patched model with gradient checkpointing: where transformers checkpoints the decoder
    layers' ``forward`` (5.23 on) the reduction hooks stay outside the checkpoint and the gradients equal
    those without checkpointing; where it checkpoints ``__call__`` (hooks inside, run again in the backward)
    the patched forward refuses with a clear error instead of reducing twice."""
    model = tiny_llava(seed=3, num_layers=4)
    theta = Theta([Reducer(1, 10, **HYBRID), Reducer(2, 4)], name="ft")
    ids, px = make_prompt(N_VIS, 3, 6, seed=0)[None], make_pixels(1)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_ID, -100)
    layers = model.model.language_model.layers
    hooks_inside = type(layers[0]).__call__ is not torch.nn.Module.__call__

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, pixel_values=px, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    patch_llava(model, theta)
    try:
        ref_loss, ref_grads = loss_and_grads()
        assert [s.visual_out for s in model.eos_report.stages] == [(10,), (4,)]
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hooks_inside:
            with pytest.raises(NotImplementedError, match="gradient checkpointing"):
                loss_and_grads()
            return
        loss, grads = loss_and_grads()
        assert [s.visual_out for s in model.eos_report.stages] == [(10,), (4,)]
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and len(grads) > 10
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    finally:
        unpatch_llava(model)
        model.gradient_checkpointing_disable()
        model.eval()
