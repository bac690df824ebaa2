"""eos-search on every family (issue 12, item 6; issue 19): tiny random Qwen2.5-VL, Qwen2-VL, LLaVA-NeXT,
LLaVA-OneVision, InternVL and Gemma 3 saved with ``save_pretrained``.

The models and processors come from ``tests/_tiny_families.py`` (6 layers);
the data set is the tiny LLaVA-format JSON of ``_tiny_models.write_llava_dataset``
with its PNGs resized to different sizes, so that the images give different
visual counts (any-resolution tiling / dynamic resolution / InternVL's tiles) and
every training batch is ragged (Gemma 3: 16 tokens for every image, a fixed count).
Prompts are rendered with the checkpoint's chat template (the processor's for
LLaVA-NeXT and Gemma 3; the tokenizer's for Qwen, OneVision and InternVL when their
processor cannot be built, i.e. without torchvision, OneVision's counts then coming
from its image processor and the model's config, InternVL's from its tiles).
"""
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

from eos_kernels.patching import is_patched, patch_model, unpatch_model  # noqa: E402
from eos_kernels.search import SearchConfig, run  # noqa: E402
from eos_kernels.search import objective  # noqa: E402
from eos_kernels.search.data import TokenizerAndImageProcessor, load_dataset, load_processor  # noqa: E402
from eos_kernels.search_space import SearchSpace  # noqa: E402
from eos_kernels.theta import Theta  # noqa: E402

from _tiny_families import (  # noqa: E402
    BOI_TOKEN_ID, EOI_TOKEN_ID, GEMMA_IMAGE_TOKENS, IMAGE_TOKEN_ID, IMG_END_TOKEN_ID, IMG_START_TOKEN_ID,
    INTERNVL_TILE_TOKENS, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID, next_visual_count, onevision_tokenizer,
    save_tiny_gemma3, save_tiny_internvl, save_tiny_llava_next, save_tiny_llava_onevision, save_tiny_qwen,
    tiny_anyres_image_processor, tiny_internvl_image_processor, tiny_llava_onevision_config,
)
from _tiny_models import write_ragged_llava_dataset  # noqa: E402
from _tiny_qwen3_vl import save_tiny_qwen3  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("qwen2.5", "qwen2", "llava_next", "llava_onevision", "qwen3", "internvl", "gemma3")


@pytest.fixture(scope="module", params=FAMILIES)
def env(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param.replace(".", ""))
    if request.param == "qwen3":
        model_dir = save_tiny_qwen3(str(root / "model"))
    elif request.param.startswith("qwen"):
        model_dir = save_tiny_qwen(str(root / "model"), version=request.param[len("qwen"):])
    elif request.param == "llava_onevision":
        model_dir = save_tiny_llava_onevision(str(root / "model"))
    elif request.param == "internvl":
        model_dir = save_tiny_internvl(str(root / "model"))
    elif request.param == "gemma3":
        model_dir = save_tiny_gemma3(str(root / "model"))
    else:
        model_dir = save_tiny_llava_next(str(root / "model"))
    data = write_ragged_llava_dataset(root / "data")
    return SimpleNamespace(family=request.param, root=root, model=model_dir, data=data)


@pytest.fixture(scope="module")
def loaded(env):
    from eos_kernels.search.model_loading import load_model

    model, processor = load_model(env.model, torch.device("cpu"), torch.float32)
    return model.eval(), processor


def _dataset(env, processor):
    return load_dataset(env.data, processor, num_visual_tokens=None, image_token_id=IMAGE_TOKEN_ID)


def test_model_class_processor_and_prompts_follow_the_checkpoint(env, loaded):
    import transformers
    from PIL import Image

    model, processor = loaded
    want = {"qwen2.5": "Qwen2_5_VLForConditionalGeneration", "qwen2": "Qwen2VLForConditionalGeneration",
            "llava_next": "LlavaNextForConditionalGeneration",
            "llava_onevision": "LlavaOnevisionForConditionalGeneration",
            "qwen3": "Qwen3VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration",
            "gemma3": "Gemma3ForConditionalGeneration"}[env.family]
    assert type(model) is getattr(transformers, want)
    ds = _dataset(env, processor)
    counts = ds.visual_counts
    if env.family == "gemma3":  # a fixed count per image
        assert set(counts) == {GEMMA_IMAGE_TOKENS}, counts
    else:
        assert ds.num_visual_tokens is None and len(set(counts)) >= 3, counts
    tok = processor.tokenizer
    for ex in ds.examples:
        assert ex.input_ids.count(IMAGE_TOKEN_ID) == ex.num_visual_tokens
        words = tok.convert_ids_to_tokens(ex.input_ids)
        answers = [t["value"] for t in json.load(open(env.data))[ex.index]["conversations"][1::2]]
        labelled = [w for w, y in zip(words, ex.labels) if y != -100]
        at = ex.input_ids.index(IMAGE_TOKEN_ID)
        if env.family == "gemma3":  # <bos><start_of_turn>user <start_of_image> soft * 16 <end_of_image> ...
            assert words[:3] == ["<s>", "<start_of_turn>", "user"]
            assert ex.input_ids[at - 1] == BOI_TOKEN_ID and ex.input_ids[at + ex.num_visual_tokens] == EOI_TOKEN_ID
            assert words[ex.prompt_length - 2:ex.prompt_length] == ["<start_of_turn>", "model"]
            assert labelled == [w for a in answers for w in a.split() + ["<end_of_turn>"]]
        elif env.family == "internvl":  # ChatML, <img> <IMG_CONTEXT> * 16 t </img>: InternVLProcessor's layout
            assert words[:2] == ["<|im_start|>", "user"]
            assert ex.input_ids[at - 1] == IMG_START_TOKEN_ID
            assert ex.input_ids[at + ex.num_visual_tokens] == IMG_END_TOKEN_ID
            with Image.open(ex.image) as im:  # each of the image's tiles gives 16 tokens
                tiles = int(tiny_internvl_image_processor()([im.convert("RGB")], return_tensors="pt")["num_patches"][0])
            assert ex.num_visual_tokens == tiles * INTERNVL_TILE_TOKENS
            assert words[ex.prompt_length - 1] == "assistant"
            assert labelled == [w for a in answers for w in a.split() + ["<|im_end|>"]]
        elif env.family != "llava_next":
            # the ChatML format of Qwen / OneVision (the tokenizer's template), not LLaVA-1.5's
            if env.family.startswith("qwen"):
                assert ex.input_ids[at - 1] == VISION_START_TOKEN_ID
                assert ex.input_ids[at + ex.num_visual_tokens] == VISION_END_TOKEN_ID
            else:  # OneVision: the image opens the user turn, no vision markers
                assert words[:at] == ["<|im_start|>", "user"] and VISION_START_TOKEN_ID not in ex.input_ids
            assert words[0] == "<|im_start|>" and "USER:" not in words
            assert words[ex.prompt_length - 1] == "assistant"
            assert labelled == [w for a in answers for w in a.split() + ["<|im_end|>"]]
        else:
            assert words[ex.prompt_length - 1] == "ASSISTANT:"
            assert labelled == [w for a in answers for w in a.split() + ["</s>"]]
    if env.family not in ("llava_next", "gemma3"):  # Gemma3Processor needs no torchvision
        try:
            import torchvision  # noqa: F401
        except ImportError:  # Qwen's / OneVision's processor needs torchvision in transformers 5.x: the fallback
            assert isinstance(processor, TokenizerAndImageProcessor)
    if env.family.startswith("llava"):
        # any-resolution tiling: each image's count is what the model's image features give
        for ex in ds.examples:
            with Image.open(ex.image) as im:
                assert ex.num_visual_tokens == next_visual_count(model, im.size[::-1]), (ex.index, im.size)
    if env.family.startswith("llava") and not isinstance(processor, TokenizerAndImageProcessor):
        # the family's own processor expands <image> to the same ids
        ex = ds.examples[1]
        text = tok.decode(ex.input_ids[:ex.prompt_length], skip_special_tokens=False)
        with Image.open(ex.image) as im:
            own = processor(text=[text.replace("<image> " * ex.num_visual_tokens, "<image> ", 1)
                                  .replace("<s> ", "", 1)], images=[im.convert("RGB")])["input_ids"][0]
        assert list(own) == ex.input_ids[:ex.prompt_length]
    # the stock model accepts the collated inputs: the counts match its image features
    batch = ds.collate([0, 1, 2])
    with torch.no_grad():
        out = model(**objective.forward_inputs(model, batch), use_cache=False)
    assert torch.isfinite(out.logits).all()


def _space(n0, layers=6):
    return SearchSpace(num_layers=layers, num_visual_tokens=n0, init_layers=(1, 3), init_discard=0.5)


def test_ragged_alignment_and_plan_bookkeeping_equal_each_sample_alone(env, loaded):
    model, processor = loaded
    ds = _dataset(env, processor)
    space = _space(round(ds.mean_visual_tokens))
    plan = objective.SearchPlan(space, max_reducers=2)
    from eos_kernels.integrations.auto import adapter_for

    adapter = adapter_for(model)
    capture = None
    picks, seen = [], set()
    fixed = env.family == "gemma3"  # 16 tokens per image: a right-padded batch of equal counts
    for ex in ds.examples:  # three samples with three different counts
        if (fixed or ex.num_visual_tokens not in seen) and len(picks) < 3:
            picks.append(ex.index)
            seen.add(ex.num_visual_tokens)
    assert len(picks) == 3, ds.visual_counts
    patch_model(model, None, adapter, plan=plan)
    try:
        capture = objective.LayerCapture(adapter.decoder_layers(model), [1, 2, 4, 5])
        with torch.no_grad():
            together = objective.data_terms(model, ds.collate(picks), capture, adapter=adapter)
            soft_together = dict(plan.soft_kept)
            stages = together["report"].stages
            assert stages and (fixed or stages[-1].valid_slots is not None)  # ragged after a reducer
            assert set(plan.schedules) == {ds.examples[i].num_visual_tokens for i in picks}
            alone = []
            for i in picks:
                alone.append((objective.data_terms(model, ds.collate([i]), capture, adapter=adapter),
                              dict(plan.soft_kept)))
    finally:
        if capture is not None:
            capture.remove()
        unpatch_model(model)
    assert not is_patched(model)
    ce = sum(float(t["ce_sum"]) for t, _ in alone)
    assert math.isclose(float(together["ce_sum"]), ce, rel_tol=1e-4)
    for layer in (1, 2, 4, 5):
        sep = sum(float(t["align_sse"][layer]) for t, _ in alone)
        assert math.isclose(float(together["align_sse"][layer]), sep, rel_tol=1e-4, abs_tol=1e-6), layer
    assert together["text_tokens"] == sum(t["text_tokens"] for t, _ in alone)
    # soft kept: the sample-weighted mean of each sample's own value
    for layer, value in soft_together.items():
        mean = sum(float(s[layer]) for _, s in alone) / len(alone)
        assert math.isclose(float(value), mean, rel_tol=1e-4), layer


def test_short_search_from_the_command_line_writes_theta(env, tmp_path):
    from eos_kernels.search.cli import main

    # the plots read log.jsonl alone (nothing of the family) and take most of a 2-step search's time on a
    # CPU: drawn (and checked) for the first family, --no-plots for the others
    plotted = env.family == FAMILIES[0]
    out = tmp_path / "out"
    assert main(["--model", env.model, "--data", env.data, "--budget", "6", "--steps", "2", "--batch-size", "4",
                 "--micro-batch-size", "2", "--output", str(out), "--no-progress"]
                + ([] if plotted else ["--no-plots"])) == 0
    assert sorted(f.name for f in out.glob("*.png")) == \
        (["loss.png", "profile.png", "trajectories.png"] if plotted else [])
    theta = Theta.from_json(str(out / "theta.json"))
    fixed = env.family == "gemma3"  # one count for every image (16): Θ keeps counts, as for LLaVA-1.5
    assert all(r.is_fraction != fixed for r in theta.reducers)  # counts differ per image: Θ keeps fractions
    assert theta.reducers, "the warm start has active reducers"
    log = [json.loads(line) for line in open(out / "log.jsonl") if line.strip()]
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("ce", "align", "total", "grad_norm"))
        assert r["align"] > 0 and r["kept"]
    state = torch.load(out / "search_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 2
    # N_0 is the data's mean count; the fractions apply equation 11 at every count
    counts = _dataset(env, load_processor(env.model)).visual_counts
    assert state["space_kwargs"]["num_visual_tokens"] == (16 if fixed else round(sum(counts) / len(counts)))
    space = SearchSpace(**state["space_kwargs"])
    space.load_state_dict(state["space"])
    # the relaxed search (the default) deploys its gates sharpened as at its end (2 steps: progress 1, λ_end)
    # and never a reducer on the last layer
    sharp = dict(sharpness=SearchConfig().sharpness_end, last_layer=False)
    for n in sorted(set(counts)):
        assert theta.schedule(n) == space.export(0.5, 3, n, **sharp).schedule(n), n


def test_eval_runs_on_the_family(env, loaded, tmp_path):
    from eos_kernels.search import evaluate

    model, processor = loaded
    held_out = write_ragged_llava_dataset(tmp_path / "heldout", n=2, seed=5)
    theta = Theta.fastv(1, 0.5)
    res = evaluate(SearchConfig(data=held_out, output=str(tmp_path), batch_size=2, max_new_tokens=2),
                   [theta, "none"], model=model, processor=processor, write=False)["results"]
    assert [r["answers"] for r in res] == [2, 2]
    assert all(math.isfinite(r["answer_ce"]) for r in res)
    assert res[1]["measured_final"] > res[0]["measured_final"]
    assert not is_patched(model)


def test_onevision_counts_without_its_processor_follow_the_model(tmp_path):
    """Without its processor (it needs torchvision in transformers 5.x) OneVision's counts come from the
    image processor and the model's config: they are the model's own, also where ``anyres_max`` shrinks
    the grid of tiles (``anyres_max_1``: every image of more than one tile), and with a CLIP tower whose
    CLS token the "default" feature strategy drops."""
    from PIL import Image
    from transformers import CLIPVisionConfig, LlavaOnevisionForConditionalGeneration

    data = write_ragged_llava_dataset(tmp_path)
    counts = {}
    for aspect in ("anyres_max_9", "anyres_max_1", "clip-default"):
        config = tiny_llava_onevision_config(num_layers=1)
        if aspect == "clip-default":
            v = config.vision_config
            config.vision_config = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                                    num_hidden_layers=1, num_attention_heads=v.num_attention_heads,
                                                    image_size=v.image_size, patch_size=v.patch_size)
            config.vision_feature_select_strategy = "default"
        else:
            config.vision_aspect_ratio = aspect
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        processor = TokenizerAndImageProcessor(onevision_tokenizer(), tiny_anyres_image_processor("llava_onevision"),
                                               model_config=config)
        ds = load_dataset(data, processor, num_visual_tokens=None, image_token_id=IMAGE_TOKEN_ID)
        for ex in ds.examples:
            with Image.open(ex.image) as im:
                assert ex.num_visual_tokens == next_visual_count(model, im.size[::-1]), (aspect, im.size)
        counts[aspect] = ds.visual_counts
    # the first image is one tile; every other one is a grid of 2 or 4, shrunk under anyres_max_1
    assert counts["anyres_max_9"][0] == counts["anyres_max_1"][0]
    assert all(a < b for a, b in zip(counts["anyres_max_1"][1:], counts["anyres_max_9"][1:])), counts
    assert counts["clip-default"] == counts["anyres_max_9"]  # the same patches² per tile
    # without the model's config there is no way to count: said clearly
    with pytest.raises(ValueError, match="cannot tell how many visual tokens"):
        load_dataset(data, TokenizerAndImageProcessor(processor.tokenizer, processor.image_processor),
                     num_visual_tokens=None, image_token_id=IMAGE_TOKEN_ID)


def test_image_processor_loads_where_auto_image_processor_needs_torchvision(env, monkeypatch, tmp_path):
    """transformers 5.4-5.17 make ``AutoImageProcessor`` a torchvision placeholder: the class the checkpoint
    names is loaded instead (its PIL variant), and processes images as the usual one does."""
    import transformers
    from PIL import Image

    from eos_kernels.search.data import load_image_processor

    image = Image.new("RGB", (50, 70), (10, 200, 30))
    usual = load_image_processor(env.model)

    class Placeholder:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise ImportError("AutoImageProcessor requires the Torchvision library")

    monkeypatch.setattr(transformers, "AutoImageProcessor", Placeholder)
    fallback = load_image_processor(env.model)
    assert not type(fallback).__name__.endswith("Fast")  # the PIL one (named ...Pil from 5.x on where both exist)
    a, b = usual([image], return_tensors="pt"), fallback([image], return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ImportError, match="Torchvision"):  # nothing to fall back to: the error as it was
        load_image_processor(str(tmp_path))


def test_unsupported_models_are_refused_clearly(tmp_path):
    from transformers import LlamaConfig

    from eos_kernels.search.model_loading import load_model

    folder = tmp_path / "llama"
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                architectures=["LlamaForCausalLM"]).save_pretrained(str(folder))
    with pytest.raises(ValueError, match=r"not a supported model.*LlamaForCausalLM.*supports transformers'.*"
                                         r"LlavaNextForConditionalGeneration.*Qwen2_5_VLForConditionalGeneration"):
        load_model(str(folder), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="not a supported model"):
        run(SearchConfig(model=str(folder), data=str(folder / "config.json"), budget=4, output=str(tmp_path / "o")))
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig.from_pretrained(str(folder)))
    with pytest.raises(ValueError, match=r"model: eos-search: no adapter for .*LlamaForCausalLM.*supported"):
        run(SearchConfig(data=str(folder / "config.json"), budget=4, output=str(tmp_path / "o")), model=llama,
            processor=object())
    assert not (tmp_path / "o").exists()


def test_plan_passes_through_counts_below_k_min_and_keeps_per_count_schedules():
    space = SearchSpace(num_layers=6, num_visual_tokens=20, init_layers=(1, 3), init_discard=0.5, k_min=4)
    plan = objective.SearchPlan(space, max_reducers=2)
    plan.new_forward()
    assert plan.schedule(3) == []  # fewer than K_min: the sample passes through
    big = plan.schedule(40)
    small = plan.schedule(10)
    assert plan.schedules == {3: [], 40: big, 10: small} and plan.last_schedule == big
    assert [s[0] for s in big] == [s[0] for s in small] == [1, 3]
    assert big == space.export(0.5, 2, 40).schedule(40) and small[-1][2] >= 4
