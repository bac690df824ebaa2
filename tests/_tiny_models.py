"""Tiny randomly initialised Hugging Face models for CPU tests (no hub downloads).

``tiny_llava()`` builds a ``transformers.LlavaForConditionalGeneration`` shaped
like LLaVA-1.5 (CLIP vision tower + Llama text model with grouped-query
attention), small enough that a forward takes milliseconds:

- vision: CLIP, 56 px images, patch 14 -> 16 patches (+ CLS, dropped by the
  "default" feature select strategy) -> 16 visual tokens per image;
- text: Llama, hidden 64, 4 query heads / 2 key-value heads, 6 layers, vocab 256.

Weights are drawn with a fixed seed and a larger standard deviation than the
Hugging Face default (0.02), so that attention is far from uniform and the
token importance scores are well separated (no near-ties deciding the anchors).

``make_prompts`` builds LLaVA-style prompts ``[bos, text..., <image> x N, text...]``.
"""
from __future__ import annotations

import torch

VOCAB = 256
IMAGE_TOKEN_ID = VOCAB - 1
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2


def tiny_llava_config(num_layers: int = 6, image_size: int = 56, patch_size: int = 14,
                      attn_implementation: str = "sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=512, pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    config.pad_token_id = PAD_TOKEN_ID
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", num_layers: int = 6,
               std: float = 0.15, image_size: int = 56):
    """A tiny LLaVA in eval mode, fp32, with reproducible random weights."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(num_layers=num_layers, image_size=image_size,
                               attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None  # never stop early: fixed-length comparisons
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    # a generated <image> token would desynchronise image tokens and features without a cache
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]
    return model.eval()


def num_visual_tokens(model) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def make_prompt(n_visual: int, before: int, after: int, seed: int) -> torch.Tensor:
    """``[bos, before random tokens, <image> * n_visual, after random tokens]`` (1-D)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    lo, hi = 3, IMAGE_TOKEN_ID  # avoid pad/bos/eos/image ids
    pre = torch.randint(lo, hi, (before,), generator=gen)
    post = torch.randint(lo, hi, (after,), generator=gen)
    img = torch.full((n_visual,), IMAGE_TOKEN_ID)
    return torch.cat([torch.tensor([BOS_TOKEN_ID]), pre, img, post])


def make_pixels(batch: int, image_size: int = 56, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2000 + seed)
    return torch.randn(batch, 3, image_size, image_size, generator=gen)


def pad_batch(prompts, side: str):
    """Pad 1-D prompts to one length on ``side`` ("left" or "right")."""
    length = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), length), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = p.numel()
        if side == "left":
            ids[i, length - n:] = p
            mask[i, length - n:] = 1
        else:
            ids[i, :n] = p
            mask[i, :n] = 1
    return ids, mask
