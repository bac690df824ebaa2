"""Packed rows (transformers' padding-free format) are never reduced silently wrong (issue 19, item 5).

``DataCollatorWithFlattening`` puts several sequences in one row with ``position_ids`` that
restart (and, for flash attention, ``cu_seq_lens_*`` / ``max_length_*``); transformers' own
``test_{eager,sdpa}_padding_matches_padding_free_with_position_ids`` compare such a row with
the padded batch. A patched model reduces per row, so a packed row would mix its sequences'
visual tokens and budgets: under a reducing Theta the first such forward raises a clear
``NotImplementedError`` instead (checked here on the inputs of transformers' test, images
included, for Qwen2-VL, Qwen2.5-VL and Qwen3-VL with eager and sdpa attention). Where nothing
is reduced (a keep-all Theta, no image features, ``suspended``) the packed forward is the
stock model's bit for bit, so transformers' test passes as on a stock model.
"""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

import eos_kernels  # noqa: E402
from eos_kernels.patching import suspended  # noqa: E402
from eos_kernels.theta import Reducer, Theta  # noqa: E402

import _tiny_families as tf  # noqa: E402
import _tiny_qwen3_vl as tq  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRUNE = Theta([Reducer(1, 0.5)], name="prune")
KEEP_ALL = Theta([Reducer(1, 1.0)], name="keep-all")
GRIDS = [[(1, 4, 8)], [(1, 4, 4)]]


def _build(family, attn):
    if family == "qwen3":
        model = tq.tiny_qwen3(attn_implementation=attn, num_layers=3)
        prompts = [tq.qwen3_prompt(g, seed=i, after=3 + 2 * i) for i, g in enumerate(GRIDS)]
    else:
        model = tf.tiny_qwen(family[len("qwen"):], attn_implementation=attn, num_layers=3)
        prompts = [tf.qwen_prompt(g, seed=i, after=3 + 2 * i) for i, g in enumerate(GRIDS)]
    return model, prompts


@torch.no_grad()
def _padded_and_packed(model, prompts):
    """transformers' test inputs: a padded batch, and the same sequences flattened into one row
    (pixel values and grids as in the padded batch) with the position ids Qwen's text models read
    as packed: ``[4, 1, total]``, text positions restarting at 0 for each sequence, then each
    sequence's own (t, h, w) positions (the padded forward's, at its real tokens)."""
    padded = tf.qwen_inputs(model, prompts, GRIDS, side="left")
    mask = padded["attention_mask"].bool()
    seen = {}
    def grab(module, args, kwargs):
        seen["pid"] = kwargs["position_ids"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**padded, use_cache=False)
    finally:
        handle.remove()
    thw = seen["pid"][-3:]  # [3, B, L]
    text = torch.cat([torch.arange(len(p)) for p in prompts])
    spatial = torch.cat([thw[:, b, mask[b]] for b in range(len(prompts))], dim=1)
    packed = {"input_ids": padded["input_ids"][mask][None],
              "position_ids": torch.cat([text[None], spatial])[:, None],
              "pixel_values": padded["pixel_values"], "image_grid_thw": padded["image_grid_thw"]}
    if "mm_token_type_ids" in padded:
        packed["mm_token_type_ids"] = padded["mm_token_type_ids"][mask][None]
    return padded, packed


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["qwen2", "qwen2.5", "qwen3"])
def test_packed_row_under_a_reducing_theta_raises_and_is_stock_otherwise(family, attn):
    model, prompts = _build(family, attn)
    padded, packed = _padded_and_packed(model, prompts)
    stock_packed = _logits(model, packed)
    text_only = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"][0]}
    stock_text = _logits(model, text_only)
    try:
        eos_kernels.patch(model, PRUNE)
        _logits(model, padded)  # the padded batch reduces as usual
        assert model.eos_report.reduced and model.eos_report.batch_size == 2
        with pytest.raises(NotImplementedError, match="several packed sequences.*DataCollatorWithFlattening"):
            _logits(model, packed)
        # flash attention's varlen keywords name a packed row too (sdpa / eager ignore them)
        lengths = torch.tensor([0] + [len(p) for p in prompts]).cumsum(0).to(torch.int32)
        varlen = dict(packed, position_ids=None, cu_seq_lens_q=lengths, cu_seq_lens_k=lengths,
                      max_length_q=max(len(p) for p in prompts), max_length_k=max(len(p) for p in prompts))
        with pytest.raises(NotImplementedError, match="varlen"):
            _logits(model, varlen)
        # [1, total] position ids (DataCollatorWithFlattening's): packed by intent, also where Qwen's own
        # mask would not separate the sequences (it reads packing from a [4, B, L] text row only)
        with pytest.raises(NotImplementedError, match="several packed sequences"):
            _logits(model, dict(packed, position_ids=packed["position_ids"][0]))
        # nothing reduced, nothing changed: transformers' own test inputs (text only), suspension, keep-all
        assert torch.equal(_logits(model, text_only), stock_text)
        with suspended(model):
            assert torch.equal(_logits(model, packed), stock_packed)
        eos_kernels.patch(model, KEEP_ALL)
        assert torch.equal(_logits(model, packed), stock_packed)
    finally:
        eos_kernels.unpatch(model)


def test_padded_batches_and_generation_are_not_taken_for_packed_rows():
    """Left padding gives non-contiguous position ids too, but with an attention mask: not packed."""
    model, prompts = _build("qwen2.5", "sdpa")
    padded, _ = _padded_and_packed(model, prompts)
    try:
        eos_kernels.patch(model, PRUNE)
        out = model.generate(**padded, max_new_tokens=3, do_sample=False)
        assert model.eos_report.reduced
        assert torch.equal(out, model.generate(**padded, max_new_tokens=3, do_sample=False, use_cache=False))
    finally:
        eos_kernels.unpatch(model)


def test_a_forward_the_stock_model_itself_reads_as_packed_is_refused_too():
    """transformers 5.0's Qwen3-VL text model builds its mask from its temporal position row, which stays
    constant over an image: without attention mask and cache its own attention splits the prompt at the
    image (the stock logits then differ from those with an all-ones mask). A reducing forward there is
    refused; where the stock model reads the row as one sequence (later releases), it reduces."""
    model = tq.tiny_qwen3(num_layers=3)
    inputs = tq.qwen3_inputs(model, [tq.qwen3_prompt([(1, 4, 8)])], [[(1, 4, 8)]])
    stock = _logits(model, inputs)
    stock_packed = not torch.equal(stock, _logits(model, dict(inputs, attention_mask=torch.ones_like(
        inputs["input_ids"]))))
    try:
        eos_kernels.patch(model, PRUNE)
        if stock_packed:
            with pytest.raises(NotImplementedError, match="several packed sequences"):
                _logits(model, inputs)
        else:
            _logits(model, inputs)
            assert model.eos_report.reduced
    finally:
        eos_kernels.unpatch(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llava_packed_row_is_refused_and_padded_batch_matches_the_packed_stock_text(attn):
    """LLaVA-1.5 (a Llama text model whose mask honours packed position ids): transformers' own test
    passes unchanged on the text-only packed row, and a packed row with images is refused."""
    from _tiny_models import make_pixels, make_prompt, num_visual_tokens, pad_batch, tiny_llava

    model = tiny_llava(attn_implementation=attn, num_layers=3)
    n = num_visual_tokens(model)
    prompts = [make_prompt(n, 2, 4, seed=0), make_prompt(n, 3, 6, seed=1)]
    ids, mask = pad_batch(prompts, "left")
    pixels = make_pixels(2)
    text_ids = ids.masked_fill(ids == model.config.image_token_id, 5)  # transformers' test: text only
    padded_text = _logits(model, {"input_ids": text_ids, "attention_mask": mask})
    flat = {"input_ids": ids[mask.bool()][None], "pixel_values": pixels,
            "position_ids": torch.cat([torch.arange(len(p)) for p in prompts])[None]}
    try:
        eos_kernels.patch(model, PRUNE)
        packed_text = _logits(model, dict(flat, input_ids=text_ids[mask.bool()][None], pixel_values=None))
        torch.testing.assert_close(packed_text[0], padded_text[mask.bool()], atol=1e-5, rtol=1e-5)
        with pytest.raises(NotImplementedError, match="several packed sequences"):
            _logits(model, flat)
    finally:
        eos_kernels.unpatch(model)


def _packed_row(family):
    """A tiny model of ``family`` and two of its prompts with images flattened into one row
    (DataCollatorWithFlattening's layout: ``position_ids`` [1, total] restarting at each sequence, no
    attention mask; the processor's ``token_type_ids`` flattened alike for Gemma 3)."""
    if family == "internvl":
        model = tf.tiny_internvl(num_layers=3)
        tiles = [[2], [1]]
        prompts = [tf.internvl_prompt(t, seed=i, after=3 + 2 * i) for i, t in enumerate(tiles)]
        flat = tf.internvl_inputs([torch.cat(prompts)], [sum(tiles, [])])
    elif family == "gemma3":
        model = tf.tiny_gemma3(num_layers=3)
        prompts = [tf.gemma_prompt(1, seed=i, after=3 + 2 * i) for i in range(2)]
        flat = tf.gemma_inputs([torch.cat(prompts)], [2])
    else:
        model = tf.tiny_llava_next(num_layers=3)
        sizes = [(40, 56), (56, 56)]
        prompts = [tf.next_prompt(tf.next_visual_count(model, s), seed=i, after=3 + 2 * i)
                   for i, s in enumerate(sizes)]
        ids = torch.cat(prompts)[None]
        flat = {"input_ids": ids, "pixel_values": tf.next_pixels(sizes), "image_sizes": torch.tensor(sizes)}
    flat["position_ids"] = torch.cat([torch.arange(len(p)) for p in prompts])[None]
    return model, flat


@pytest.mark.parametrize("family", ["internvl", "gemma3", "llava_next"])
def test_other_families_refuse_a_packed_row_under_a_reducing_theta(family):
    """The guard is the patch's own (not one family's): InternVL, Gemma 3 (sliding windows, bidirectional image
    blocks) and LLaVA-NeXT refuse a packed row with images under a reducing Θ, and run it as the stock model does
    where nothing is reduced (keep-all, suspended)."""
    model, flat = _packed_row(family)
    stock = _logits(model, flat)
    try:
        eos_kernels.patch(model, PRUNE)
        with pytest.raises(NotImplementedError, match="several packed sequences"):
            _logits(model, flat)
        with suspended(model):
            assert torch.equal(_logits(model, flat), stock)
        eos_kernels.patch(model, KEEP_ALL)
        assert torch.equal(_logits(model, flat), stock)
    finally:
        eos_kernels.unpatch(model)
