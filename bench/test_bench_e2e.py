"""End to end: prefill and per-token decode latency of a LLaVA model, with and without EOS.

Models (``transformers.LlavaForConditionalGeneration`` built from configs,
random weights, sdpa attention, eval mode, no hub download):

- ``cuda``: LLaVA-1.5-7B-shaped, bf16: Llama text model with 32 layers,
  d = 4096, 32 heads (MHA), ffn 11008, vocab 32064; CLIP ViT-L/14 at 336 px
  (24 layers, width 1024) -> 576 visual tokens; batch 1 and 8;
- ``cpu``: the same 32 layers and 576 visual tokens, but d = 128, 4 heads,
  ffn 344, vocab 1024 and a one-layer CLIP of width 32, fp32, batch 1.

Prompt per sample: ``[bos] + 7 text + 576 <image> + 56 text`` = 640 tokens
(64 text tokens, as ``Theta.token_report(text_tokens=64)``).

Configurations (the ``config`` axis of the ids), at retain budget
``r`` in {192, 128, 64, 16}:

- ``unpatched``: the stock model;
- ``paper-r``: ``Theta.paper(r)`` -- the paper's searched Θ (reducers at
  layers 3, 6, 16; layer 6 the interior hybrid γ=0.083, τ=0.22, θ=0.10). The
  budget is counted as ``mean_leaving`` where that is reachable and as the
  ``final`` count otherwise (r = 16; ``extra_info["count"]`` says which);
- ``prune-r``: the same layers and kept counts with γ = ρ = ν = 0 (pure prune).

Phases:

- ``prefill``: ``model(input_ids, pixel_values, use_cache=True,
  logits_to_keep=1)`` -- the vision tower, the projector, the decoder (with
  the reducers) and the KV cache written, as ``generate``'s first step;
- ``decode``: one ``model(next_token, past_key_values=cache)`` step after that
  prefill; the cache is cropped back to the prompt (``setup``, untimed) before
  every round, so every round is the first generated token;
- ``vision``: the vision tower + projector alone (``get_image_features``), so
  the report can compare the decoder's share of the prefill with the FLOPs
  prediction of ``Theta.token_report`` (which counts decoder layers only).

``extra_info`` carries the token report of each configuration (final count,
mean leaving / processed per layer, the prefill FLOPs ratio for this model's
d and ffn and its predicted speed-up), the visual tokens each reducer actually
kept in the run (``model.eos_report``), the KV cache size after the prefill
and the peak extra CUDA memory of one prefill.

Other families (``test_e2e_family_prefill`` / ``test_e2e_family_vision``,
``extra_info["family"]``): InternVL (Qwen2 text; InternViT at 336 px / patch
14, four tiles of 144 tokens after the pixel shuffle: ``<img>`` 576
``<IMG_CONTEXT>`` ``</img>``), Gemma 3 (its text model with five of six
layers in a sliding window of 512 tokens, shorter than the prompt; SigLIP at
336 px / patch 14, 576 tokens: ``<start_of_image>`` 576 ``<image_soft_token>``
``<end_of_image>``, with ``token_type_ids``: bidirectional image block) and
Qwen3-VL (interleaved MRoPE, DeepStack features added after decoder layers
0-2; on CUDA Qwen3-VL-8B's vision tower, 27 blocks of width 1152, patch 16, one
image of a 48 x 48 merged-patch grid: ``<|vision_start|>`` 576
``<|image_pad|>`` ``<|vision_end|>``), each with the LLaVA rows' decoder sizes
(grouped-query attention on CUDA: 8 key-value heads) and the same 64 text
tokens; stock vs ``Theta.paper(64)`` (a 1/9 budget of the 576 visual tokens),
prefill and the vision tower alone.
"""
from __future__ import annotations

import dataclasses
import gc
import inspect

import pytest
import torch

from bench.common import (HAS_CUDA, cpu_param, device_label, gpu_param,
                          peak_extra_memory, pedantic_rounds, sync)

pytest.importorskip("transformers", reason="the end-to-end benchmark needs transformers")
from eos_kernels import patch_llava, unpatch_llava  # noqa: E402

from eos_kernels.theta import Theta  # noqa: E402

BUDGETS = (192, 128, 64, 16)
N_VISUAL = 576
TEXT_BEFORE, TEXT_AFTER = 7, 56     # + bos: 64 text tokens
TEXT_TOKENS = 1 + TEXT_BEFORE + TEXT_AFTER
NEXT_TOKEN = 3                      # a fixed text token fed to the decode step

SHAPES = {
    "cuda": dict(dtype=torch.bfloat16, hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32,
                 vocab=32064, image_token=32000,
                 vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
                 batches=(1, 8), prefill_rounds=(10, 2), decode_rounds=(30, 3), vision_rounds=(10, 2)),
    "cpu": dict(dtype=torch.float32, hidden=128, ffn=344, layers=32, heads=4, kv_heads=4,
                vocab=1024, image_token=1023,
                vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, image_size=336, patch_size=14, projection_dim=32),
                batches=(1,), prefill_rounds=(15, 5), decode_rounds=(30, 5), vision_rounds=(10, 2)),
}
CONFIGS = ("unpatched",) + tuple(f"{kind}-r{r}" for r in BUDGETS for kind in ("paper", "prune"))


# --------------------------------------------------------------------------- configurations
def paper_theta(budget: int) -> tuple[Theta, str]:
    """``Theta.paper(budget)``; ``count="final"`` where ``mean_leaving`` cannot reach it."""
    try:
        return Theta.paper(budget), "mean_leaving"
    except ValueError:
        return Theta.paper(budget, count="final"), "final"


def prune_theta(budget: int) -> tuple[Theta, str]:
    """The paper's layers and kept counts at ``budget`` with γ = ρ = ν = 0 (pure prune)."""
    theta, count = paper_theta(budget)
    reducers = [dataclasses.replace(r, gamma=0.0, rho=0.0, nu=0.0) for r in theta]
    return Theta(reducers, name=f"prune-{budget}"), count


def config_theta(config: str):
    if config == "unpatched":
        return None, None, None
    kind, budget = config.split("-r")
    budget = int(budget)
    theta, count = (paper_theta if kind == "paper" else prune_theta)(budget)
    return theta, count, budget


def token_info(theta, count, budget, shape) -> dict:
    base = {"budget": budget, "count": count, "theta_name": None, "theta": None}
    if theta is None:
        flops_ratio = 1.0
        rep = {"final": N_VISUAL, "mean_leaving": float(N_VISUAL), "mean_processed": float(N_VISUAL),
               "schedule": []}
    else:
        rep = theta.token_report(N_VISUAL, shape["layers"], TEXT_TOKENS,
                                 hidden_size=shape["hidden"], intermediate_size=shape["ffn"])
        flops_ratio = rep["prefill_flops_ratio"]
        base.update(theta_name=theta.name, theta=theta.to_dict())
    base.update({
        "final": rep["final"], "mean_leaving": rep["mean_leaving"], "mean_processed": rep["mean_processed"],
        "schedule": [list(s) for s in rep["schedule"]],
        "prefill_flops_ratio": flops_ratio, "predicted_speedup": 1.0 / flops_ratio,
    })
    return base


# --------------------------------------------------------------------------- models
def build_llava(device: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    shape = SHAPES[device]
    vision = CLIPVisionConfig(**shape["vision"])
    text = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=shape["image_token"],
        vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=N_VISUAL,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=shape["dtype"],
                                                          attn_implementation="sdpa")
    return model.to(device).eval()


def make_inputs(device: str, B: int):
    shape = SHAPES[device]
    gen = torch.Generator().manual_seed(B)
    before = torch.randint(3, shape["image_token"], (B, TEXT_BEFORE), generator=gen)
    after = torch.randint(3, shape["image_token"], (B, TEXT_AFTER), generator=gen)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), before,
                     torch.full((B, N_VISUAL), shape["image_token"]), after], dim=1)
    size = shape["vision"]["image_size"]
    pixels = torch.randn(B, 3, size, size, generator=gen)
    return ids.to(device), pixels.to(device=device, dtype=shape["dtype"])


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(device):
        if device not in cache:
            cache[device] = build_llava(device)
        return cache[device]

    yield get
    cache.clear()
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- other families
FAMILIES = ("internvl", "gemma3", "qwen3_vl")
FAMILY_CONFIGS = ("unpatched", "paper-r64")
#: the image of each family: InternVL 4 tiles x 144 tokens, Gemma 3 one image of 576 (24 x 24 SigLIP patches)
FAMILY_IMAGE = dict(image_size=336, patch_size=14)
INTERNVL_TILES = 4
GEMMA_SLIDING_WINDOW = 512
#: Qwen3-VL's vision tower (CUDA: Qwen3-VL-8B's; CPU: 3 blocks) and its image: a 48 x 48 grid of merged 2 x 2
#: patches = 576 visual tokens; DeepStack after decoder layers 0-2 (the 8B model feeds its first three)
QWEN3_VISION = {
    "cuda": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                 num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    "cpu": dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2]),
}
QWEN3_GRID = (1, 48, 48)


def build_family(family: str, device: str):
    """A family's model with the LLaVA rows' decoder sizes on ``device`` (random weights, sdpa, eval)."""
    import transformers

    shape = SHAPES[device]
    vision = {**shape["vision"], **FAMILY_IMAGE}
    vision.pop("projection_dim", None)
    kv = 8 if device == "cuda" else shape["kv_heads"]
    text = dict(hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                num_attention_heads=shape["heads"], num_key_value_heads=kv, vocab_size=shape["vocab"],
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    image = shape["image_token"]
    if family == "internvl":
        config = transformers.InternVLConfig(
            vision_config=transformers.InternVLVisionConfig(**vision), text_config=transformers.Qwen2Config(**text),
            image_token_id=image, image_seq_length=N_VISUAL // INTERNVL_TILES, downsample_ratio=0.5,
            vision_feature_layer=-1, vision_feature_select_strategy="default")
        cls = transformers.InternVLForConditionalGeneration
    elif family == "gemma3":
        head_dim = shape["hidden"] // shape["heads"]
        config = transformers.Gemma3Config(
            vision_config=transformers.SiglipVisionConfig(**vision),
            text_config=transformers.Gemma3TextConfig(**text, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                                      sliding_window=GEMMA_SLIDING_WINDOW),
            mm_tokens_per_image=N_VISUAL, boi_token_index=image - 1, eoi_token_index=image - 2,
            image_token_index=image)
        cls = transformers.Gemma3ForConditionalGeneration
    elif family == "qwen3_vl":
        head_dim = shape["hidden"] // shape["heads"]
        hw = round(head_dim / 2 * 20 / 64)
        sections = [head_dim // 2 - 2 * hw, hw, hw]  # t, h, w frequencies: Qwen3-VL's [24, 20, 20] at head_dim 128
        qv = QWEN3_VISION[device]
        config = transformers.Qwen3VLConfig(
            text_config=dict(text, head_dim=head_dim, rope_parameters={
                "rope_type": "default", "rope_theta": 5e6, "mrope_section": sections, "mrope_interleaved": True}),
            vision_config=dict(qv, in_channels=3, spatial_merge_size=2, temporal_patch_size=2,
                               out_hidden_size=shape["hidden"]),
            image_token_id=image, video_token_id=image - 3, vision_start_token_id=image - 1,
            vision_end_token_id=image - 2)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=shape["dtype"], attn_implementation="sdpa")
    return model.to(device).eval()


def make_family_inputs(family: str, device: str, B: int) -> dict:
    """``[bos] + 7 text + <open> + 576 image tokens + <close> + 54 text`` (64 text tokens) and the pixels."""
    shape = SHAPES[device]
    image = shape["image_token"]
    gen = torch.Generator().manual_seed(B)
    before = torch.randint(3, image - 3, (B, TEXT_BEFORE), generator=gen)
    after = torch.randint(3, image - 3, (B, TEXT_AFTER - 2), generator=gen)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), before, torch.full((B, 1), image - 1),
                     torch.full((B, N_VISUAL), image), torch.full((B, 1), image - 2), after], dim=1)
    if family == "qwen3_vl":  # flattened patches, as Qwen2VLImageProcessor gives them, and each image's grid
        t, h, w = QWEN3_GRID
        patch = QWEN3_VISION[device]["patch_size"]
        pixels = torch.randn(B * t * h * w, 3 * 2 * patch * patch, generator=gen)
        out = {"input_ids": ids.to(device), "pixel_values": pixels.to(device=device, dtype=shape["dtype"]),
               "image_grid_thw": torch.tensor([list(QWEN3_GRID)] * B, device=device)}
        if "mm_token_type_ids" in inspect.signature(transformers_forward("qwen3_vl")).parameters:  # >= 5.24
            out["mm_token_type_ids"] = (ids == image).to(device=device, dtype=torch.int32)
        return out
    size = FAMILY_IMAGE["image_size"]
    n_images = B * (INTERNVL_TILES if family == "internvl" else 1)
    out = {"input_ids": ids.to(device),
           "pixel_values": torch.randn(n_images, 3, size, size, generator=gen).to(device=device, dtype=shape["dtype"])}
    if family == "gemma3":  # as Gemma3Processor gives them: the image block attends to itself bidirectionally
        out["token_type_ids"] = (ids == image).long().to(device)
    return out


def transformers_forward(family: str):
    import transformers

    return {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[family].forward


@pytest.fixture(scope="module")
def family_models():
    cache = {}

    def get(family, device):
        if (family, device) not in cache:
            cache.clear()  # one at a time (GPU memory)
            gc.collect()
            cache[(family, device)] = build_family(family, device)
        return cache[(family, device)]

    yield get
    cache.clear()
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


#: batch sizes of the other families' rows (B = 1 only: one row per family and configuration, also on the GPU)
FAMILY_BATCHES = (1,)


def _family_cases(with_config=True):
    cases = []
    for device, param in (("cuda", gpu_param), ("cpu", cpu_param)):
        for B in FAMILY_BATCHES:
            for family in FAMILIES:
                for config in (FAMILY_CONFIGS if with_config else ("unpatched",)):
                    cid = f"{device}-B{B}-{family}-{config}" if with_config else f"{device}-B{B}-{family}"
                    cases.append(param(device, B, family, config, id=cid))
    return cases


@pytest.mark.parametrize("device, B, family, config", _family_cases())
def test_e2e_family_prefill(benchmark, family_models, device, B, family, config):
    import eos_kernels

    model = family_models(family, device)
    inputs = make_family_inputs(family, device, B)
    theta, count, budget = config_theta(config)

    @torch.inference_mode()
    def prefill():
        if family == "qwen3_vl":
            model.model.rope_deltas = None  # computed by the first forward of a prompt, cached on the model
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        sync(device)
        return out

    if theta is not None:
        eos_kernels.patch(model, theta)
    try:
        prefill()  # warm-up
        peak, out = peak_extra_memory(prefill, device)
        kv_bytes = _kv_cache_bytes(getattr(out, "cache", None) or out.past_key_values)
        observed = _observed(model) if theta is not None else None
        del out
        benchmark.group = f"e2e prefill {device} B{B} {family}"
        rounds, warmup = pedantic_rounds(*SHAPES[device]["prefill_rounds"])
        benchmark.pedantic(prefill, rounds=rounds, warmup_rounds=warmup, iterations=1)
    finally:
        if theta is not None:
            eos_kernels.unpatch(model)
    info = _common_info("prefill", device, B, config, theta, count, budget)
    info["model"] = {**info["model"], "family": family, "class": type(model).__name__,
                     "kv_heads": model.config.text_config.num_key_value_heads,
                     "vision": {**SHAPES[device]["vision"], **FAMILY_IMAGE}}
    if family == "gemma3":
        info["model"]["sliding_window"] = GEMMA_SLIDING_WINDOW
    benchmark.extra_info.update({**info, "family": family, "observed_stages": observed, "kv_cache_bytes": kv_bytes,
                                 "peak_extra_mem_bytes": peak})


@pytest.mark.parametrize("device, B, family, config", _family_cases(with_config=False))
def test_e2e_family_vision(benchmark, family_models, device, B, family, config):
    model = family_models(family, device)
    inputs = make_family_inputs(family, device, B)
    pixels = inputs["pixel_values"]
    kw = dict(vision_feature_layer=-1, vision_feature_select_strategy="default") if family == "internvl" else {}
    if family == "qwen3_vl":
        kw = dict(image_grid_thw=inputs["image_grid_thw"])

    @torch.inference_mode()
    def vision():
        feats = model.model.get_image_features(pixel_values=pixels, **kw)
        sync(device)
        return feats

    vision()
    benchmark.group = f"e2e vision {device} B{B} {family}"
    rounds, warmup = pedantic_rounds(*SHAPES[device]["vision_rounds"])
    benchmark.pedantic(vision, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update({
        "subject": "e2e", "phase": "vision", "config": "vision", "config_id": "vision", "family": family,
        "device": device, "device_name": device_label(device), "B": B,
        "dtype": str(SHAPES[device]["dtype"]).replace("torch.", ""), "vision": {**SHAPES[device]["vision"],
                                                                               **FAMILY_IMAGE},
    })


# --------------------------------------------------------------------------- cases
def _cases(phases_with_config=True):
    cases = []
    for device, param in (("cuda", gpu_param), ("cpu", cpu_param)):
        for B in SHAPES[device]["batches"]:
            for config in (CONFIGS if phases_with_config else ("unpatched",)):
                cid = f"{device}-B{B}-{config}" if phases_with_config else f"{device}-B{B}"
                cases.append(param(device, B, config, id=cid))
    return cases


def _kv_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


def _observed(model) -> list | None:
    report = getattr(model, "eos_report", None)
    if report is None:
        return None
    return [{"layer": s.layer, "regime": s.regime, "visual_in": list(s.visual_in),
             "visual_out": list(s.visual_out)} for s in report.stages]


def _common_info(phase, device, B, config, theta, count, budget):
    shape = SHAPES[device]
    return {
        "subject": "e2e", "phase": phase, "config": config.split("-r")[0], "config_id": config,
        "device": device, "device_name": device_label(device), "B": B,
        "model": {"hidden": shape["hidden"], "ffn": shape["ffn"], "layers": shape["layers"],
                  "heads": shape["heads"], "kv_heads": shape["kv_heads"], "vocab": shape["vocab"],
                  "vision": shape["vision"], "attn_implementation": "sdpa"},
        "dtype": str(shape["dtype"]).replace("torch.", ""), "n_visual": N_VISUAL,
        "text_tokens": TEXT_TOKENS, "seq_len": TEXT_TOKENS + N_VISUAL,
        **token_info(theta, count, budget, shape),
    }


def _patched(model, theta):
    if theta is not None:
        patch_llava(model, theta)


def _unpatch(model, theta):
    if theta is not None:
        unpatch_llava(model)


@pytest.mark.parametrize("device, B, config", _cases())
def test_e2e_prefill(benchmark, models, device, B, config):
    model = models(device)
    ids, pixels = make_inputs(device, B)
    theta, count, budget = config_theta(config)

    @torch.inference_mode()
    def prefill():
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
        sync(device)
        return out

    _patched(model, theta)
    try:
        prefill()  # warm-up
        peak, out = peak_extra_memory(prefill, device)
        kv_bytes = _kv_cache_bytes(out.past_key_values)
        observed = _observed(model) if theta is not None else None
        del out
        benchmark.group = f"e2e prefill {device} B{B}"
        rounds, warmup = pedantic_rounds(*SHAPES[device]["prefill_rounds"])
        benchmark.pedantic(prefill, rounds=rounds, warmup_rounds=warmup, iterations=1)
    finally:
        _unpatch(model, theta)
    benchmark.extra_info.update({
        **_common_info("prefill", device, B, config, theta, count, budget),
        "observed_stages": observed, "kv_cache_bytes": kv_bytes, "peak_extra_mem_bytes": peak,
    })


@pytest.mark.parametrize("device, B, config", _cases())
def test_e2e_decode(benchmark, models, device, B, config):
    model = models(device)
    ids, pixels = make_inputs(device, B)
    theta, count, budget = config_theta(config)
    prompt_len = ids.shape[1]
    token = torch.full((B, 1), NEXT_TOKEN, dtype=torch.long, device=device)

    _patched(model, theta)
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        kv_bytes = _kv_cache_bytes(cache)
        del out

        def rewind():
            # a negative argument removes that many tokens (transformers 5.17 and 5.23 alike)
            extra = int(cache.get_seq_length()) - prompt_len
            if extra > 0:
                cache.crop(-extra)

        @torch.inference_mode()
        def step():
            o = model(input_ids=token, past_key_values=cache, use_cache=True)
            sync(device)
            return o

        rewind()
        step()  # warm-up
        rewind()
        benchmark.group = f"e2e decode {device} B{B}"
        rounds, warmup = pedantic_rounds(*SHAPES[device]["decode_rounds"])
        benchmark.pedantic(step, setup=rewind, rounds=rounds, warmup_rounds=warmup, iterations=1)
        length_after = cache.get_seq_length()
    finally:
        _unpatch(model, theta)
    benchmark.extra_info.update({
        **_common_info("decode", device, B, config, theta, count, budget),
        "kv_cache_bytes": kv_bytes, "prompt_len": prompt_len, "cache_len_after_step": int(length_after),
    })


@pytest.mark.parametrize("device, B, config", _cases(phases_with_config=False))
def test_e2e_vision(benchmark, models, device, B, config):
    model = models(device)
    ids, pixels = make_inputs(device, B)
    shape = SHAPES[device]

    @torch.inference_mode()
    def vision():
        feats = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default")
        sync(device)
        return feats

    vision()
    benchmark.group = f"e2e vision {device} B{B}"
    rounds, warmup = pedantic_rounds(*shape["vision_rounds"])
    benchmark.pedantic(vision, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update({
        "subject": "e2e", "phase": "vision", "config": "vision", "config_id": "vision",
        "device": device, "device_name": device_label(device), "B": B,
        "dtype": str(shape["dtype"]).replace("torch.", ""), "vision": shape["vision"],
    })


