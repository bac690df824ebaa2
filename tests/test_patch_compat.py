"""Living on transformers' internals: drift is loud, no-ops are bit-exact, a stock workflow works.

Tiny random LLaVA models from ``tests/_tiny_models.py`` (CPU, fp32). The drift
tests simulate a transformers release that hands its modules their arguments
differently, with forward (pre-)hooks registered *before* the patch's own
(``prepend=True``), exactly where such a release would change them.
"""
import copy
import os
import pickle
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

import transformers  # noqa: E402

from eos_kernels import patch_llava, unpatch_llava  # noqa: E402
from eos_kernels import patching  # noqa: E402
from eos_kernels.patching import TransformersDriftError, find_cache  # noqa: E402
from eos_kernels.patching.compat import _output_cache as out_cache  # noqa: E402
from eos_kernels.theta import Reducer, Theta  # noqa: E402

from _tiny_models import EOS_TOKEN_ID, IMAGE_TOKEN_ID, make_pixels, make_prompt, pad_batch, tiny_llava  # noqa: E402

N_VIS = 16
PRUNE = Theta([Reducer(1, 10), Reducer(3, 6), Reducer(4, 3)], name="prune")
HYBRID = Theta([Reducer(1, 10), Reducer(2, 6, gamma=0.083, tau=0.22, theta=0.1), Reducer(4, 3)], name="hybrid")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def prompts():
    return [make_prompt(N_VIS, b, a, seed=i) for i, (b, a) in enumerate([(3, 6), (5, 9), (1, 4)])]


@pytest.fixture(autouse=True)
def _unpatch_after(model):
    yield
    unpatch_llava(model)


def _layers(model):
    return model.model.language_model.layers


def _logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


def _greedy(model, ids, px, n=6, **kw):
    return model.generate(input_ids=ids, pixel_values=px, max_new_tokens=n, do_sample=False, **kw)


@pytest.fixture
def extra_hooks():
    """Hooks that simulate a transformers release; removed after the test."""
    handles = []
    yield handles
    for h in handles:
        h.remove()


def _cache_key(kwargs):
    keys = [k for k, v in kwargs.items() if v is not None and find_cache((), {k: v}) is not None]
    return keys[0] if keys else None


# --------------------------------------------------------------------------- the cache found by type
def test_cache_is_found_by_type_under_any_keyword(model, prompts, extra_hooks):
    """A release that renames the cache keyword again (here to `kv_state`) changes nothing."""
    ids, px = prompts[0][None], make_pixels(1)
    patch_llava(model, PRUNE)
    expected = _greedy(model, ids, px)
    report = model.eos_report

    def rename(module, args, kwargs):
        key = _cache_key(kwargs)
        if key is None:
            return None
        kwargs = dict(kwargs)
        kwargs["kv_state"] = kwargs.pop(key)
        return args, kwargs

    def restore(module, args, kwargs):  # what the stock modules of this release understand
        if "kv_state" not in kwargs:
            return None
        kwargs = dict(kwargs)
        kwargs[module.__eos_cache_name] = kwargs.pop("kv_state")
        return args, kwargs

    # the patch's hooks run between `rename` (before them) and `restore` (after them)
    import inspect
    names = inspect.signature(_layers(model)[0].forward).parameters
    cache_name = "cache" if "cache" in names else "past_key_values"
    for module in (model.model.language_model, *_layers(model)):
        module.__eos_cache_name = cache_name
        extra_hooks.append(module.register_forward_pre_hook(rename, with_kwargs=True, prepend=True))
        extra_hooks.append(module.register_forward_pre_hook(restore, with_kwargs=True))
    assert torch.equal(_greedy(model, ids, px), expected)
    assert [s.visual_out for s in model.eos_report.stages] == [s.visual_out for s in report.stages]


def test_hidden_cache_during_decoding_is_a_drift_error(model, prompts, extra_hooks):
    """A release that hides the cache from the decoder stack's arguments must not pass as a new prefill."""
    ids, mask = pad_batch([prompts[0], prompts[2]], "left")
    px = make_pixels(2, seed=3)
    patch_llava(model, PRUNE)

    class Box:  # not a transformers Cache: invisible to a lookup by type
        def __init__(self, cache):
            self.cache = cache

    def hide(module, args, kwargs):
        key = _cache_key(kwargs)
        if key is None:
            return None
        kwargs = dict(kwargs)
        kwargs["state_box"] = Box(kwargs.pop(key))
        return args, kwargs

    def unbox(module, args, kwargs):
        if "state_box" not in kwargs:
            return None
        kwargs = dict(kwargs)
        kwargs[module.__eos_cache_name] = kwargs.pop("state_box").cache
        return args, kwargs

    import inspect
    names = inspect.signature(_layers(model)[0].forward).parameters
    text = model.model.language_model
    extra_hooks.append(text.register_forward_pre_hook(hide, with_kwargs=True, prepend=True))
    for layer in _layers(model):
        layer.__eos_cache_name = "cache" if "cache" in names else "past_key_values"
        extra_hooks.append(layer.register_forward_pre_hook(unbox, with_kwargs=True, prepend=True))
    with pytest.raises(TransformersDriftError, match=rf"transformers {transformers.__version__}.*"):
        _greedy(model, ids, px, attention_mask=mask)


def test_drift_errors_name_the_version_and_the_expectation(model, prompts, extra_hooks):
    ids, px = prompts[1][None], make_pixels(1, seed=5)
    patch_llava(model, PRUNE)
    layer = _layers(model)[2]  # behind the first reducer: runs on the shortened sequence

    def drop_rope(module, args, kwargs):
        kwargs = dict(kwargs)
        cos, sin = kwargs.pop("position_embeddings")
        kwargs["rotary"] = torch.stack([cos, sin])  # some other form the patch does not know
        return args, kwargs

    def extra_tensor(module, args, kwargs):
        n = kwargs["position_embeddings"][0].shape[1]
        return args, {**kwargs, "token_type": torch.zeros(1, n, dtype=torch.long)}

    def bad_mask(module, args, kwargs):
        n = kwargs["position_embeddings"][0].shape[1]
        return args, {**kwargs, "attention_mask": torch.zeros(1, 1, n, n - 3, dtype=torch.bool)}

    def odd_output(module, args, kwargs, output):
        return {"hidden_states": output}

    cases = [
        (lambda: layer.register_forward_pre_hook(drop_rope, with_kwargs=True, prepend=True),
         "without rotary position embeddings"),
        (lambda: layer.register_forward_pre_hook(extra_tensor, with_kwargs=True, prepend=True),
         "`token_type` with a sequence dimension"),
        (lambda: layer.register_forward_pre_hook(bad_mask, with_kwargs=True, prepend=True),
         "does not cover the prefill"),
        (lambda: _layers(model)[1].register_forward_hook(odd_output, with_kwargs=True, prepend=True),
         "returned dict"),
    ]
    for install, message in cases:
        handle = install()
        try:
            with pytest.raises(TransformersDriftError) as info:
                _logits(model, input_ids=ids, pixel_values=px)
        finally:
            handle.remove()
        text = str(info.value)
        assert message in text and transformers.__version__ in text, text
    # and the model works again once the simulated drift is gone
    _logits(model, input_ids=ids, pixel_values=px)
    assert model.eos_report.reduced


def test_version_range():
    lo, hi = patching.TESTED_TRANSFORMERS
    assert patching.check_transformers_version() == transformers.__version__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patching.check_transformers_version(hi) == hi
        assert patching.check_transformers_version(lo) == lo
    major, minor = (int(x) for x in hi.split(".")[:2])
    with pytest.warns(UserWarning, match=rf"tested on transformers {lo} to {hi}") as record:
        patching.check_transformers_version(f"{major}.{minor + 1}.0")
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="needs transformers >=5.0"):
        patching.check_transformers_version("4.57.6")


def test_tested_range_matches_setup_and_ci():
    """setup.py declares the range, .ci/run pins both tested releases, the README names them."""
    root = os.path.join(os.path.dirname(__file__), "..")
    lo, hi = patching.TESTED_TRANSFORMERS
    setup = open(os.path.join(root, "setup.py")).read()
    assert f"transformers>={patching.TRANSFORMERS_MIN},<{patching.TRANSFORMERS_MAX}" in setup
    ci = open(os.path.join(root, ".ci", "run")).read()
    assert f"TRANSFORMERS_OLDEST={lo}\n" in ci and f"TRANSFORMERS_NEWEST={hi}\n" in ci
    readme = open(os.path.join(root, "README.md")).read()
    assert lo in readme and hi in readme


# --------------------------------------------------------------------------- no-op guarantees
def test_keep_all_theta_is_bit_exact(model, prompts):
    ids, mask = pad_batch([prompts[0], prompts[1]], "left")
    px = make_pixels(2, seed=7)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = _logits(model, input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos)
    ref_gen = _greedy(model, ids, px, attention_mask=mask)
    for keep in (N_VIS, 1.0):
        theta = Theta([Reducer(1, keep, gamma=0.5, tau=0.3, rho=0.4, nu=0.5), Reducer(3, keep)], name="keep")
        patch_llava(model, theta)
        assert torch.equal(_logits(model, input_ids=ids, pixel_values=px, attention_mask=mask, position_ids=pos),
                           ref)
        assert torch.equal(_greedy(model, ids, px, attention_mask=mask), ref_gen)
        assert not model.eos_report.reduced


def test_forward_without_pixel_values_is_bit_exact(model, prompts):
    """Image-token ids without an image are text: never reduced (they used to be)."""
    ids = prompts[0][None]
    assert bool((ids == IMAGE_TOKEN_ID).any())
    ref = _logits(model, input_ids=ids)
    ref_gen = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    patch_llava(model, PRUNE)
    assert torch.equal(_logits(model, input_ids=ids), ref)
    assert not model.eos_report.reduced
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False), ref_gen)
    embeds = model.get_input_embeddings()(ids)  # the same prompt given as embeddings
    unpatch_llava(model)
    ref_embeds = _logits(model, inputs_embeds=embeds)
    patch_llava(model, PRUNE)
    assert torch.equal(_logits(model, inputs_embeds=embeds), ref_embeds)
    assert not model.eos_report.reduced


def test_unpatch_is_bit_exact(model, prompts):
    ids, px = prompts[2][None], make_pixels(1, seed=9)
    ref = _logits(model, input_ids=ids, pixel_values=px)
    patch_llava(model, HYBRID)
    assert not torch.equal(_logits(model, input_ids=ids, pixel_values=px), ref)
    unpatch_llava(model)
    assert torch.equal(_logits(model, input_ids=ids, pixel_values=px), ref)
    assert "__deepcopy__" not in model.__dict__ and "__reduce_ex__" not in model.__dict__


# --------------------------------------------------------------------------- a stock user's workflow
def test_assisted_and_prompt_lookup_generation_equal_greedy(model, prompts):
    ids, px = prompts[1][None], make_pixels(1, seed=2)
    patch_llava(model, PRUNE)
    kw = dict(n=8, eos_token_id=EOS_TOKEN_ID)  # transformers 5.0's prompt lookup needs an eos id
    expected = _greedy(model, ids, px, **kw)
    assistant = tiny_llava(seed=1, attn_implementation="sdpa")  # a different (unpatched) draft model
    assisted = _greedy(model, ids, px, assistant_model=assistant, **kw)
    assert torch.equal(assisted, expected)
    lookup = _greedy(model, ids, px, prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(lookup, expected)


def test_crop_into_removed_visual_tokens_is_refused(model, prompts):
    ids, px = prompts[0][None], make_pixels(1)
    patch_llava(model, PRUNE)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, use_cache=True)
    cache = out_cache(out)
    first_visual = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    with pytest.raises(NotImplementedError, match="cuts into the visual tokens"):
        cache.crop(-(ids.shape[1] - first_visual - 2))
    cache.crop(-2)  # text after the image: allowed
    assert cache.get_seq_length() == ids.shape[1] - 2


def _graphs_added_by_decoding(model, generate):
    """Graphs torch.compile (eager backend) builds for 5 more decode steps, after a warm-up generate."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    original = model.forward
    model.forward = torch.compile(original, backend="eager", dynamic=False)
    try:
        generate(3)  # the prefill and the first decode steps compile their frames
        warm = counters["stats"]["unique_graphs"]
        out = generate(8)
        return out, counters["stats"]["unique_graphs"] - warm
    finally:
        model.forward = original
        dynamo.reset()


def test_compiled_static_cache_decoding_does_not_recompile(model, prompts):
    """Nothing is keyed on per-step tensors: decoding compiles no more graphs than on the stock model."""
    ids, mask = pad_batch([prompts[0], prompts[2]], "left")
    px = make_pixels(2, seed=4)

    def generate(n):
        return _greedy(model, ids, px, n=n, attention_mask=mask, cache_implementation="static")

    _, stock_added = _graphs_added_by_decoding(model, generate)
    patch_llava(model, PRUNE)
    expected = generate(8)
    out, added = _graphs_added_by_decoding(model, generate)
    assert torch.equal(out, expected)
    assert added <= stock_added, f"decode steps compiled {added} new graphs (stock model: {stock_added})"


def test_deepcopy_gives_an_independent_patched_model(model, prompts):
    ids, px = prompts[0][None], make_pixels(1, seed=6)
    patch_llava(model, PRUNE)
    expected = _greedy(model, ids, px)
    clone = copy.deepcopy(model)
    try:
        report_before = model.eos_report
        out = _greedy(clone, ids, px)
        assert torch.equal(out, expected)
        assert clone.eos_report is not report_before and clone.eos_report.reduced
        assert model.eos_report is report_before  # the clone's reports land on the clone
        # the clone's hooks drive the clone: changing its weights changes its output, not the original's
        with torch.no_grad():
            clone.lm_head.weight.mul_(2)
        assert torch.equal(_greedy(model, ids, px), expected)
        unpatch_llava(clone)
        assert patching.is_patched(model) and not patching.is_patched(clone)
        assert torch.equal(_greedy(model, ids, px), expected)
    finally:
        del clone


def test_pickling_a_patched_model_says_unpatch_first(model, tmp_path):
    patch_llava(model, PRUNE)
    with pytest.raises(TypeError, match="Unpatch it first"):
        pickle.dumps(model)
    with pytest.raises(TypeError, match="Unpatch it first"):
        torch.save(model, tmp_path / "m.pt")
    unpatch_llava(model)
    assert "__reduce_ex__" not in model.__dict__  # pickling is the stock model's business again


def test_removed_positions_do_not_count_in_the_loss(model, prompts):
    ids = prompts[0][None]
    px = make_pixels(1, seed=8)
    labels = ids.clone()  # language-model loss on every position, image included (the hard case)
    patch_llava(model, PRUNE)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, labels=labels)
    assert torch.equal(labels, ids)  # the caller's labels are not modified
    kept = model.eos_report.stages[-1].kept_positions[0]
    removed = torch.ones(ids.shape[1], dtype=torch.bool)
    removed[kept] = False
    target = labels.clone()
    target[0, 1:][removed[:-1]] = -100
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], target[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # before: every removed position counted, with zero logits (ln(vocab) each)
    naive = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:])
    assert removed.sum() > 0 and not torch.isclose(out.loss, naive)


def test_eos_kernels_patch_serves_llava(model, prompts):
    import eos_kernels

    ids, px = prompts[0][None], make_pixels(1, seed=12)
    patch_llava(model, HYBRID)
    expected = _logits(model, input_ids=ids, pixel_values=px)
    unpatch_llava(model)
    eos_kernels.patch(model, HYBRID)
    assert torch.equal(_logits(model, input_ids=ids, pixel_values=px), expected)
    eos_kernels.unpatch(model)
    assert not patching.is_patched(model)
