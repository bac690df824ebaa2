"""Gemma 3's masks after a reduction: bidirectional image blocks and sliding windows in original positions.

Tiny random Gemma 3 of ``tests/_tiny_families.py`` (CPU, fp32, sdpa): layers 0-4
attend within a sliding window of 8 tokens, layer 5 globally; 16 tokens per image,
so the window is shorter than an image block and than every prompt. The guarantees
every family has are in ``test_patch_families.py``; here, what is Gemma's own:

- a hand reference that builds both masks itself, in original positions (causal or
  within the token's own image block; the sliding layers' window on top, as this
  transformers release composes them: the reference first checks that its masks are
  the stock model's own), drops the tokens by hand and runs every layer with its
  own mask and rotary table; a variant that measures the window in slots instead
  must differ (the test can fail);
- decoding, where a reduced sliding layer's cache keeps its last ``W - 1`` slots,
  which reach further back than ``W - 1`` positions: cache, no cache and static
  cache give the same tokens, and the run really had such slots outside the window;
- ``token_type_ids`` left out (no bidirectional blocks, as in the stock model);
- drift: simulated changes of the mask functions and of the sliding cache layer
  raise ``TransformersDriftError`` naming the version; bad configurations and
  Thetas give clear errors.
"""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

import transformers  # noqa: E402

from eos_kernels.integrations.gemma3 import patch_gemma3, unpatch_gemma3  # noqa: E402
from eos_kernels.patching import TransformersDriftError, is_patched  # noqa: E402
from eos_kernels.theta import Reducer, Theta  # noqa: E402

import _tiny_families as tf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W = tf.GEMMA_WINDOW
HYBRID = dict(gamma=0.083, tau=0.22, theta=0.1)
THETA = Theta([Reducer(1, 0.6), Reducer(2, 0.5, **HYBRID), Reducer(4, 0.5)], name="paper")
#: the stock model's batch-vs-alone difference is up to 3e-5 (tests/test_patch_families.py, Gemma3.tol)
TOL = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    return tf.tiny_gemma3(seed=0, attn_implementation="sdpa")


@pytest.fixture(autouse=True)
def _unpatch_after(model):
    yield
    unpatch_gemma3(model)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, n=6, **kw):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


def _layers(model):
    return model.model.language_model.layers


# --------------------------------------------------------------------------- the masks, by hand
def _hand_masks(ids: torch.Tensor, pos: torch.Tensor, composition: str):
    """bool [n, n] full-attention and sliding-window masks of the tokens at original positions ``pos``
    (a 1-D prompt ``ids``): query i sees key j when pos[j] <= pos[i] or both lie in one image block; the
    sliding layers add the window, pos[j] > pos[i] - W, either on the whole (``"and"``: transformers 5.25's
    AND(window, OR(causal, block))) or on the causal part (``"or"``: 5.0's OR(AND(causal, window), block))."""
    image = ids == tf.IMAGE_TOKEN_ID
    start = image & ~torch.cat([torch.zeros(1, dtype=torch.bool), image[:-1]])
    block = torch.where(image, start.cumsum(0) - 1, -1)[pos]
    i, j = pos[:, None], pos[None, :]
    causal = j <= i
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    window = j > i - W
    full = causal | same
    sliding = (full & window) if composition == "and" else ((causal & window) | same)
    return full, sliding


def _stock_inputs_and_masks(model, inputs):
    """What the stock decoder layers receive: layer 0's hidden states, each layer type's (cos, sin) and mask."""
    got = {}

    def grab(i):
        def hook(module, args, kwargs):
            kind = model.config.text_config.layer_types[i]
            got.setdefault("x", args[0] if args else kwargs["hidden_states"])
            got[kind] = (kwargs["position_embeddings"], kwargs["attention_mask"])
        return hook

    handles = [_layers(model)[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (0, 5)]
    try:
        _logits(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return got


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@torch.no_grad()
def _reference(model, inputs, layer_r, keep, composition, window_in_slots=False):
    """Logits at the kept positions of a one-reducer prune, computed by hand; and the kept positions."""
    ids = inputs["input_ids"]
    L = ids.shape[1]
    visual = ids[0] == tf.IMAGE_TOKEN_ID
    vis_idx = visual.nonzero().squeeze(1)
    rows = ~visual & (torch.arange(L) > vis_idx.min())  # the prompt's text after the first image token
    got = _stock_inputs_and_masks(model, inputs)
    x = got["x"]
    rope = {k: got[k][0] for k in ("sliding_attention", "full_attention")}
    types = model.config.text_config.layer_types
    pos = torch.arange(L)
    sel = pos
    for i, layer in enumerate(_layers(model)):
        n = len(sel)
        if window_in_slots:  # the wrong reading: the window counted in the reduced sequence's slots
            full, _ = _hand_masks(ids[0], sel, composition)
            _, sliding = _hand_masks(ids[0][sel], torch.arange(n), composition)
        else:
            full, sliding = _hand_masks(ids[0], sel, composition)
        mask = (sliding if types[i] == "sliding_attention" else full)[None, None]
        cos, sin = (t[:, sel] for t in rope[types[i]])
        if i == layer_r:
            attn = layer.self_attn
            hn = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(hn).view(1, n, -1, attn.head_dim).transpose(1, 2))
            k = attn.k_norm(attn.k_proj(hn).view(1, n, -1, attn.head_dim).transpose(1, 2))
            c, s = cos[:, None], sin[:, None]
            q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            # the rating: causal text -> visual attention (the window is not applied to it, see integrations.gemma3)
            scores = (q @ k.transpose(-1, -2) * attn.scaling).masked_fill(~torch.ones(n, n).tril().bool(),
                                                                          float("-inf"))
            importance = scores.softmax(-1)[0][:, rows].mean(dim=(0, 1))
        out = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        x = out[0] if isinstance(out, tuple) else out
        if i == layer_r:
            order = torch.sort(importance[vis_idx], descending=True, stable=True).indices[:keep]
            keep_mask = ~visual.clone()
            keep_mask[vis_idx[order]] = True
            sel = keep_mask.nonzero().squeeze(1)
            x = x[:, sel]
    return model.lm_head(model.model.language_model.norm(x)), sel


def _composition(model, inputs):
    """Which composition of window and image blocks this release's stock masks are (checked exactly)."""
    got = _stock_inputs_and_masks(model, inputs)
    ids = inputs["input_ids"][0]
    full_stock, sliding_stock = got["full_attention"][1], got["sliding_attention"][1]
    pos = torch.arange(ids.shape[0])
    found = []
    for composition in ("and", "or"):
        full, sliding = _hand_masks(ids, pos, composition)
        assert torch.equal(full_stock[0, 0], full), "the full-attention mask is not causal-or-same-image-block"
        if torch.equal(sliding_stock[0, 0], sliding):
            found.append(composition)
    assert found, "the stock sliding-window mask is neither composition of window and image blocks"
    return found[0]


def test_hand_reference_with_blocks_and_windows_in_original_positions(model):
    """Two images (two bidirectional blocks of 16 > W), a prune at sliding layer 2: the patched model is the
    hand reference whose masks are the stock masks restricted to the kept tokens, and not the one whose window
    is counted in slots."""
    prompt = tf.gemma_prompt(2, before=2, after=9, seed=21, between=3)
    inputs = tf.gemma_inputs([prompt], [2], seed=21)
    composition = _composition(model, inputs)
    layer_r, keep = 2, 20  # keeps parts of both images
    ref, sel = _reference(model, inputs, layer_r, keep, composition)
    wrong, _ = _reference(model, inputs, layer_r, keep, composition, window_in_slots=True)
    patch_gemma3(model, Theta([Reducer(layer_r, keep)], name="prune-one"), num_visual_tokens=32)
    out = _logits(model, inputs)
    stage = model.eos_report.stages[0]
    assert torch.equal(stage.kept_positions[0], sel)
    kept_images = [int(((sel > a) & (sel < b)).sum()) for a, b in  # tokens kept of each image block
                   zip(*[(prompt == t).nonzero().squeeze(1).tolist() for t in (tf.BOI_TOKEN_ID, tf.EOI_TOKEN_ID)])]
    assert all(k >= 2 for k in kept_images) and sum(kept_images) == keep, kept_images
    torch.testing.assert_close(out[0, sel], ref[0], **TOL)
    removed = torch.ones(prompt.numel(), dtype=torch.bool)
    removed[sel] = False
    assert torch.equal(out[0, removed], torch.zeros_like(out[0, removed]))
    assert (wrong[0] - out[0, sel]).abs().max() > 1e-2  # the window really is measured in positions


def test_decoding_masks_slots_the_sliding_cache_keeps_beyond_the_window(model):
    """The image ends just before a short question: the last W - 1 slots of each reduced sliding layer
    reach back over removed image tokens, further than W - 1 positions. Those beyond the window are masked:
    cache, no cache and static cache give the same tokens, also in a left-padded batch with beam search."""
    def ending_with_the_image(before, seed):  # ... <image_soft_token> * 16 <end_of_image> model \n
        p = tf.gemma_prompt(1, before=before, after=0, seed=seed)
        end = int((p == tf.EOI_TOKEN_ID).nonzero()) + 1
        return torch.cat([p[:end], torch.tensor([tf.ASSISTANT_TOKEN_ID, tf.NEWLINE_TOKEN_ID])])

    prompts = [ending_with_the_image(3, 22), ending_with_the_image(6, 23)]
    inputs = tf.gemma_inputs(prompts[:1], [1], seed=22)
    patch_gemma3(model, THETA)
    n = W + 3  # the window moves past every slot of the reduced prefill
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
    cmap = out.past_key_values.__dict__["_eos_map"]
    last = cmap.kept[-1][0, -(W - 1):]  # the reduced prefill slots the last stage's sliding layers keep
    assert int(last[-1] - last[0]) > W - 1, last  # they span more than the window
    expected = out.sequences
    assert torch.equal(_generate(model, inputs, n=n, use_cache=False), expected)
    batch = tf.gemma_inputs(prompts, [1, 1], side="left", seed=22)
    beams = [_generate(model, batch, n=4, num_beams=3, use_cache=uc) for uc in (True, False)]
    assert torch.equal(beams[0], beams[1])
    unpatch_gemma3(model)
    try:  # transformers 5.15's stock model cannot build the image-block mask of a static cache
        _generate(model, inputs, n=2, cache_implementation="static")
    except IndexError as exc:
        pytest.skip(f"the stock static cache fails on transformers {transformers.__version__}: {exc}")
    patch_gemma3(model, THETA)
    assert torch.equal(_generate(model, inputs, n=n, cache_implementation="static"), expected)


def test_without_token_type_ids_the_blocks_are_causal_as_in_the_stock_model(model):
    inputs = tf.gemma_inputs([tf.gemma_prompt(1, seed=24, after=8)], [1], seed=24, token_types=False)
    ref = _logits(model, inputs)
    with_types = _logits(model, {**inputs, "token_type_ids": tf.gemma_token_type_ids(inputs["input_ids"])})
    assert not torch.allclose(ref, with_types)  # the overlay changes the stock model's output
    patch_gemma3(model, Theta([Reducer(1, 1.0)]))
    assert torch.equal(_logits(model, inputs), ref)
    patch_gemma3(model, THETA)
    assert torch.equal(_generate(model, inputs), _generate(model, inputs, use_cache=False))
    assert model.eos_report.reduced


# --------------------------------------------------------------------------- drift
def _mask_functions():
    """The Gemma 3 modeling module's mask builders that exist in this release (5.0: create_causal_mask_mapping
    -> create_masks_for_generate; 5.25: create_masks_for_vision_model, create_masks_for_generate)."""
    from transformers.models.gemma3 import modeling_gemma3 as mod

    names = [n for n in ("create_masks_for_vision_model", "create_masks_for_generate") if hasattr(mod, n)]
    assert "create_masks_for_generate" in names
    return mod, names


def test_a_mask_function_giving_an_unknown_mask_type_is_a_drift_error(model, monkeypatch):
    """A release whose Gemma 3 mask functions hand the decoder stack something else than tensors."""
    mod, names = _mask_functions()

    def wrap(fn):
        def changed(*args, **kwargs):
            return {**fn(*args, **kwargs), "sliding_attention": object()}
        return changed

    for name in names:
        monkeypatch.setattr(mod, name, wrap(getattr(mod, name)))
    inputs = tf.gemma_inputs([tf.gemma_prompt(1, seed=25, after=10)], [1], seed=25)
    patch_gemma3(model, THETA)
    with pytest.raises(TransformersDriftError, match=rf"mapping of attention masks.*transformers "
                                                     rf"{transformers.__version__}"):
        _logits(model, {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])})


def test_sliding_masks_sized_for_another_cache_are_a_drift_error(model, monkeypatch):
    """A release whose sliding-window cache keeps the last W slots (not W - 1) and whose mask functions size
    the sliding masks for that: the stock model still runs, the patch cannot map the reduced layers' slots
    and says so at the first decode step instead of masking the wrong keys."""
    from transformers.cache_utils import DynamicSlidingWindowLayer as Layer

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys, values = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        self.keys, self.values = keys[:, :, -self.sliding_window:], values[:, :, -self.sliding_window:]
        return keys, values

    def get_mask_sizes(self, query, *args, **kwargs):  # (cache_position) on 5.0, (query_length) on 5.25
        q = query.shape[0] if torch.is_tensor(query) else int(query)
        held, window = self.cumulative_length, self.sliding_window
        return min(held, window) + q, max(held - window, 0)

    monkeypatch.setattr(Layer, "update", update)
    monkeypatch.setattr(Layer, "get_mask_sizes", get_mask_sizes)
    inputs = tf.gemma_inputs([tf.gemma_prompt(1, seed=26, after=10)], [1], seed=26)
    stock = _generate(model, inputs, n=3)
    assert torch.equal(stock, _generate(model, inputs, n=3, use_cache=False))  # a consistent stock release
    patch_gemma3(model, THETA)
    with pytest.raises(TransformersDriftError, match=rf"key columns during a decode step.*sliding \({W} slots\)"
                                                     rf".*transformers {transformers.__version__}"):
        _generate(model, inputs, n=3)


def test_an_unknown_sliding_cache_layer_is_a_drift_error(model):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    inputs = tf.gemma_inputs([tf.gemma_prompt(1, seed=27, after=10)], [1], seed=27)
    patch_gemma3(model, THETA)
    cache = DynamicCache(config=model.config)
    cache.layers[3].__class__ = type("ChunkedWindowLayer", (DynamicLayer,), {"is_sliding": True})
    with pytest.raises(TransformersDriftError, match="sliding-window ChunkedWindowLayer"):
        with torch.no_grad():
            model(**inputs, past_key_values=cache, use_cache=True)


def test_a_decoder_layer_given_the_whole_mask_mapping_is_a_drift_error(model):
    inputs = tf.gemma_inputs([tf.gemma_prompt(1, seed=28, after=10)], [1], seed=28)
    patch_gemma3(model, THETA)
    seen = {}

    def keep_mapping(module, args, kwargs):
        seen["masks"] = kwargs["attention_mask"]

    def whole_mapping(module, args, kwargs):  # a release whose layers pick their own mask
        return args, {**kwargs, "attention_mask": seen["masks"]}

    text = model.model.language_model
    handles = [text.register_forward_pre_hook(keep_mapping, with_kwargs=True, prepend=True),
               _layers(model)[2].register_forward_pre_hook(whole_mapping, with_kwargs=True, prepend=True)]
    try:
        with pytest.raises(TransformersDriftError, match="mapping of attention masks"):
            _logits(model, inputs)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- bad input
def test_bad_configurations_and_thetas_are_refused():
    inputs = tf.gemma_inputs([tf.gemma_prompt(1, seed=28)], [1], seed=28)
    model = tf.tiny_gemma3(seed=1, num_layers=6)
    # a Theta is checked against one image block (16 tokens) unless told the prompts hold more
    with pytest.raises(ValueError, match=r"reducers\[0\].keep: .*more than the 16 incoming visual tokens"):
        patch_gemma3(model, Theta([Reducer(1, 17)]))
    with pytest.raises(ValueError, match="layer 6 does not exist"):
        patch_gemma3(model, Theta([Reducer(6, 0.5)]))
    assert not is_patched(model)
    patch_gemma3(model, Theta([Reducer(1, 17)]), num_visual_tokens=32)  # two images per prompt
    _logits(model, inputs)  # one image here: clipped to its 16, nothing reduced
    assert model.eos_report.visual_tokens == (16,) and not model.eos_report.reduced
    unpatch_gemma3(model)
    for attr, value, said in (("use_bidirectional_attention", True, "attends bidirectionally"),
                              ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0")):
        config = tf.tiny_gemma3_config(num_layers=2)
        setattr(config.text_config, attr, value)
        other = transformers.Gemma3ForConditionalGeneration(config).eval()
        with pytest.raises(ValueError, match=said):
            patch_gemma3(other, THETA)
        assert not is_patched(other)
