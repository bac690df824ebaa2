"""End to end, other model families: one patched-prefill row each (issue 19).

Stock vs reduced prefill at a 1/9 budget (a prune after decoder layer 2, 576 -> 64 visual
tokens), and the vision tower alone for the decoder-only speed-up, with the FLOPs-predicted
speed-up of ``Theta.token_report`` (decoder layers only, the model's own sizes) beside the
measured one in ``extra_info`` (``subject: "e2e-family"``; ``python -m bench.report`` gives
them a table of their own). Prompt: 7 text tokens, ``<|vision_start|>``, 576 image tokens,
``<|vision_end|>``, 55 text tokens, batch 1, random weights, sdpa, eval mode, no download.
A separate file from ``test_bench_e2e.py`` (LLaVA) so that the LLaVA steps of
``scripts/gpu_check.sh``, which select that file by keyword, do not pick these up.

Families: Qwen3-VL (DeepStack after decoder layers 0-2, as the 8B model's vision blocks 8/16/24
feed its first three layers). Selection on a GPU: ``pytest bench/test_bench_e2e_families.py -k cuda
--benchmark-only``; the CPU subset: ``-k cpu``.
"""
from __future__ import annotations

import gc

import pytest
import torch

from bench.common import HAS_CUDA, cpu_param, device_label, gpu_param, pedantic_rounds, sync

pytest.importorskip("transformers", reason="the end-to-end benchmark needs transformers")

from bench.test_bench_e2e import N_VISUAL, TEXT_AFTER, TEXT_BEFORE, _observed  # noqa: E402
from eos_kernels.theta import Theta  # noqa: E402


#: Qwen3-VL-shaped models (DeepStack after decoder layers 0-2 as the 8B model's vision blocks 8/16/24 feed
#: its first three layers), 576 visual tokens from one image of 48 x 48 merged-patch grid, 64 text tokens.
#: cuda: Qwen3-VL-8B's text model (36 layers, d 4096, 32 / 8 heads of 128, ffn 12288) with a
#: 27-block vision tower of width 1152, bf16; cpu: the same 36 layers at d 128, a 3-block tower, fp32.
FAMILY_SHAPES = {
    "qwen3_vl": {
        "cuda": dict(dtype=torch.bfloat16, hidden=4096, ffn=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                     vocab=32064, vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                              patch_size=16, out_hidden_size=4096, num_position_embeddings=2304,
                                              deepstack_visual_indexes=[8, 16, 24]),
                     prefill_rounds=(10, 2), vision_rounds=(10, 2)),
        "cpu": dict(dtype=torch.float32, hidden=128, ffn=344, layers=36, heads=4, kv_heads=2, head_dim=32,
                    vocab=1024, vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2,
                                            patch_size=4, out_hidden_size=128, num_position_embeddings=64,
                                            deepstack_visual_indexes=[0, 1, 2]),
                    prefill_rounds=(10, 3), vision_rounds=(5, 1)),
    },
}
FAMILY_GRID = (1, 48, 48)  # temporal, height, width patches: 48 * 48 / 4 = 576 visual tokens
#: the reduced row: a prune after layer 2 keeping 1/9 of the visual tokens (576 -> 64)
FAMILY_THETA = Theta([{"layer": 2, "keep": 1 / 9}], name="prune-1/9")
FAMILY_CONFIGS = ("unpatched", "prune-1/9", "vision")


def build_qwen3_vl(device: str):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    shape = FAMILY_SHAPES["qwen3_vl"][device]
    text = dict(hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
                vocab_size=shape["vocab"], max_position_embeddings=4096, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]
                                 if shape["head_dim"] == 128 else [6, 5, 5], "mrope_interleaved": True})
    vision = dict(shape["vision"], in_channels=3, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=shape["vocab"] - 1,
                           video_token_id=shape["vocab"] - 2, vision_start_token_id=shape["vocab"] - 3,
                           vision_end_token_id=shape["vocab"] - 4)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=shape["dtype"], attn_implementation="sdpa")
    return model.to(device).eval()


def make_qwen3_vl_inputs(model, device: str) -> dict:
    shape = FAMILY_SHAPES["qwen3_vl"][device]
    cfg = model.config
    t, h, w = FAMILY_GRID
    gen = torch.Generator().manual_seed(0)
    before = torch.randint(3, shape["vocab"] - 4, (TEXT_BEFORE,), generator=gen)
    after = torch.randint(3, shape["vocab"] - 4, (TEXT_AFTER - 1,), generator=gen)
    ids = torch.cat([before, torch.tensor([cfg.vision_start_token_id]), torch.full((N_VISUAL,), cfg.image_token_id),
                     torch.tensor([cfg.vision_end_token_id]), after])[None]
    patch = shape["vision"]["patch_size"]
    pixels = torch.randn(t * h * w, 3 * 2 * patch * patch, generator=gen)
    inputs = {"input_ids": ids, "pixel_values": pixels.to(shape["dtype"]),
              "image_grid_thw": torch.tensor([list(FAMILY_GRID)])}
    import inspect

    if "mm_token_type_ids" in inspect.signature(type(model).forward).parameters:  # transformers >= 5.24
        inputs["mm_token_type_ids"] = (ids == cfg.image_token_id).to(torch.int32)
    return {k: v.to(device) for k, v in inputs.items()}


def _family_cases():
    return [param(device, family, config, id=f"{device}-{family}-{config}")
            for family in FAMILY_SHAPES for device, param in (("cuda", gpu_param), ("cpu", cpu_param))
            for config in FAMILY_CONFIGS]


@pytest.fixture(scope="module")
def family_models():
    cache = {}

    def get(device, family):
        if (device, family) not in cache:
            cache.clear()  # one large model on the device at a time
            gc.collect()
            cache[(device, family)] = build_qwen3_vl(device)
        return cache[(device, family)]

    yield get
    cache.clear()
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("device, family, config", _family_cases())
def test_e2e_family_prefill(benchmark, family_models, device, family, config):
    """Stock vs reduced prefill (vision + decoder + KV cache, ``logits_to_keep=1``) of another family at a
    1/9 budget, with the vision tower alone for the decoder-only speed-up; ``extra_info`` has the
    FLOPs-predicted speed-up of the reduced row (``Theta.token_report`` with the model's sizes)."""
    import eos_kernels

    model = family_models(device, family)
    shape = FAMILY_SHAPES[family][device]
    inputs = make_qwen3_vl_inputs(model, device)
    text_tokens = int(inputs["input_ids"].shape[1]) - N_VISUAL
    theta = FAMILY_THETA if config == "prune-1/9" else None

    @torch.inference_mode()
    def prefill():
        model.model.rope_deltas = None
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        sync(device)
        return out

    @torch.inference_mode()
    def vision():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        sync(device)
        return feats

    fn = vision if config == "vision" else prefill
    if theta is not None:
        eos_kernels.patch(model, theta)
    try:
        fn()  # warm-up
        observed = _observed(model) if theta is not None else None
        benchmark.group = f"e2e family prefill {device} {family}"
        rounds, warmup = pedantic_rounds(*shape["vision_rounds" if config == "vision" else "prefill_rounds"])
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    finally:
        if theta is not None:
            eos_kernels.unpatch(model)
    info = {"subject": "e2e-family", "family": family, "phase": "vision" if config == "vision" else "prefill",
            "config_id": config, "device": device, "device_name": device_label(device), "B": 1,
            "dtype": str(shape["dtype"]).replace("torch.", ""), "n_visual": N_VISUAL, "text_tokens": text_tokens,
            "model": {k: shape[k] for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "head_dim")},
            "observed_stages": observed}
    if theta is not None:
        rep = theta.token_report(N_VISUAL, shape["layers"], text_tokens, hidden_size=shape["hidden"],
                                 intermediate_size=shape["ffn"])
        info.update(theta=theta.to_dict(), final=rep["final"], mean_processed=rep["mean_processed"],
                    prefill_flops_ratio=rep["prefill_flops_ratio"],
                    predicted_speedup=1.0 / rep["prefill_flops_ratio"])
    benchmark.extra_info.update(info)
