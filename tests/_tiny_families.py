"""Tiny randomly initialised Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, LLaVA-OneVision, InternVL and Gemma 3 models for
CPU tests (no downloads).

Built from transformers configs on transformers 5.0 to 5.24, fp32, eval mode,
weights drawn with a fixed seed and a larger standard deviation than the
Hugging Face default (0.02) so that attention is far from uniform (the same
recipe as ``tests/_tiny_models.py``). Text models: hidden 64, 4 query / 2
key-value heads (head_dim 16), 6 layers, vocab 256.

Qwen2-VL / Qwen2.5-VL (``tiny_qwen(version="2" | "2.5")``)
    vision: patch 4, temporal patch 2, spatial merge 2, so an image of
    ``grid = (t, h, w)`` patches gives ``t * h * w / 4`` visual tokens
    (dynamic resolution: each image its own count). Multimodal RoPE with
    ``mrope_section = [2, 3, 3]`` (head_dim / 2 = 8). Prompts follow the Qwen
    chat format: ``<|im_start|>user\\n <|vision_start|> <|image_pad|> * n
    <|vision_end|> question <|im_end|>\\n <|im_start|>assistant\\n``;
    :func:`qwen_inputs` adds ``pixel_values`` (flattened patches),
    ``image_grid_thw`` and, on releases whose forward takes it (5.24),
    ``mm_token_type_ids`` (0 text, 1 image, 2 video).

LLaVA-NeXT (``tiny_llava_next()``)
    CLIP vision 56 px / patch 14 (16 tokens per tile, CLS dropped), any-resolution
    tiling over ``image_grid_pinpoints`` [[56, 112], [112, 56], [112, 112]]: an
    image of ``image_size = (h, w)`` pixels is seen as a base tile plus a grid of
    tiles, unpadded to its aspect ratio, and every row of the grid ends with an
    image-newline token. All of them (base, grid, newlines) carry the image
    token id in ``input_ids``; :func:`next_visual_count` asks the model itself
    how many an image gets. Prompts: ``[bos, text..., <image> * n, text...]``.

LLaVA-OneVision (``tiny_llava_onevision()``)
    SigLIP 56 px / patch 14 + Qwen2 text, the same tiling; videos of ``f`` frames
    give ``4 f + 1`` video tokens (2x2 pooling, one trailing newline).

InternVL (``tiny_internvl()``)
    InternViT 56 px / patch 7 with the 0.5 pixel shuffle: 16 tokens per tile; Qwen2 text. Prompts (ChatML):
    ``<|im_start|> user \\n <img> <IMG_CONTEXT> * 16 t </img> \\n question <|im_end|> ...`` per image of
    ``t`` tiles (``pixel_values`` [all tiles, 3, 56, 56]).

Gemma 3 (``tiny_gemma3()``)
    SigLIP 56 px / patch 7 pooled to 16 tokens per image; the Gemma 3 text model (head_dim 16, q/k norms,
    scaled embeddings) with a sliding window of 8 tokens on layers 0-4 and layer 5 global. Prompts:
    ``<bos> <start_of_turn> user \\n`` text ``\\n <start_of_image> <image_soft_token> * 16 <end_of_image> \\n``
    ... ``<end_of_turn> \\n <start_of_turn> model \\n`` (the ChatML ids stand for Gemma's turn tokens), with
    ``token_type_ids`` (1 at the image tokens) as the processor gives them.

Model folders (``save_tiny_qwen``, ``save_tiny_llava_next``, ``save_tiny_llava_onevision``, ``save_tiny_internvl``,
``save_tiny_gemma3``)
    ``save_pretrained`` folders with a word-level tokenizer over the tiny words of
    ``_tiny_models.py`` and the family's chat template. The processors of Qwen
    and OneVision need torchvision in transformers 5.x (their video half);
    without it the folder holds the tokenizer and the image processor, loadable
    on their own. OneVision's chat format is Qwen's without the vision markers:
    ``<|im_start|>user <image>\n question <|im_end|> <|im_start|>assistant\n``.
"""
from __future__ import annotations

import inspect

import torch

VOCAB = 256
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
#: the image placeholder of every family here (LLaVA-NeXT's and OneVision's <image>, Qwen's <|image_pad|>)
IMAGE_TOKEN_ID = VOCAB - 1
# Qwen special tokens
VIDEO_TOKEN_ID = 254
VISION_END_TOKEN_ID = 253
VISION_START_TOKEN_ID = 252
IM_END_TOKEN_ID = 251
IM_START_TOKEN_ID = 250
NEWLINE_TOKEN_ID = 249   # "\n"
USER_TOKEN_ID = 248      # "user"
ASSISTANT_TOKEN_ID = 247  # "assistant"
SYSTEM_TOKEN_ID = 246    # "system"
#: random prompt text is drawn from [TEXT_LO, TEXT_HI)
TEXT_LO, TEXT_HI = 3, 240

QWEN_PATCH = 4
QWEN_TEMPORAL = 2
QWEN_MERGE = 2
NEXT_TILE = 56
NEXT_PATCH = 14
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def _randomise(model, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("image_newline"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _generation_defaults(model, suppress) -> None:
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None  # never stop early: fixed-length comparisons
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    # a generated placeholder would desynchronise placeholders and features without a cache
    model.generation_config.suppress_tokens = list(suppress)


def _text_kwargs(num_layers: int) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)


# --------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
def tiny_qwen_config(version: str = "2.5", num_layers: int = 6, attn_implementation: str = "sdpa"):
    """Config of a tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``)."""
    text = dict(_text_kwargs(num_layers),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
               vision_start_token_id=VISION_START_TOKEN_ID, vision_end_token_id=VISION_END_TOKEN_ID)
    if version == "2":
        from transformers import Qwen2VLConfig as Config

        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, in_channels=3,
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig as Config

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3,
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                      window_size=2 * QWEN_PATCH * QWEN_MERGE, out_hidden_size=64, fullatt_block_indexes=[1],
                      tokens_per_second=2)
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config = Config(text_config=text, vision_config=vision, **ids)
    config.pad_token_id = PAD_TOKEN_ID
    config.text_config.pad_token_id = PAD_TOKEN_ID
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def tiny_qwen(version: str = "2.5", seed: int = 0, attn_implementation: str = "sdpa", num_layers: int = 6,
              std: float = 0.15):
    """A tiny ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` (eval, fp32)."""
    config = tiny_qwen_config(version, num_layers=num_layers, attn_implementation=attn_implementation)
    if version == "2":
        from transformers import Qwen2VLForConditionalGeneration as Model
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    torch.manual_seed(seed)
    model = Model(config)
    _randomise(model, seed, std)
    _generation_defaults(model, [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_TOKEN_ID, VISION_END_TOKEN_ID])
    return model.eval()


def qwen_tokens(grid) -> int:
    """Visual tokens of one image / video of ``grid = (t, h, w)`` patches (after the 2x2 merge)."""
    t, h, w = grid
    return t * h * w // (QWEN_MERGE * QWEN_MERGE)


def _text(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(TEXT_LO, TEXT_HI, (n,), generator=gen)


def qwen_prompt(grids, before: int = 3, after: int = 5, seed: int = 0, video_grids=(), between: int = 2,
                system: bool = True) -> torch.Tensor:
    """A Qwen chat prompt (1-D ids) with one ``<|vision_start|> pad * n <|vision_end|>`` block per image.

    ``[<|im_start|> system \\n text*before <|im_end|> \\n]`` (if ``system``), then
    ``<|im_start|> user \\n``, the image blocks (``between`` text tokens between
    two blocks), the video blocks, ``after`` question tokens, ``<|im_end|> \\n
    <|im_start|> assistant \\n`` (the generation prompt)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    parts = []
    if system:
        parts += [torch.tensor([IM_START_TOKEN_ID, SYSTEM_TOKEN_ID, NEWLINE_TOKEN_ID]), _text(before, gen),
                  torch.tensor([IM_END_TOKEN_ID, NEWLINE_TOKEN_ID])]
    parts.append(torch.tensor([IM_START_TOKEN_ID, USER_TOKEN_ID, NEWLINE_TOKEN_ID]))
    blocks = [(IMAGE_TOKEN_ID, g) for g in grids] + [(VIDEO_TOKEN_ID, g) for g in video_grids]
    for i, (token, grid) in enumerate(blocks):
        if i:
            parts.append(_text(between, gen))
        parts += [torch.tensor([VISION_START_TOKEN_ID]), torch.full((qwen_tokens(grid),), token),
                  torch.tensor([VISION_END_TOKEN_ID])]
    parts += [_text(after, gen), torch.tensor([IM_END_TOKEN_ID, NEWLINE_TOKEN_ID, IM_START_TOKEN_ID,
                                                ASSISTANT_TOKEN_ID, NEWLINE_TOKEN_ID])]
    return torch.cat(parts)


def qwen_pixels(grids, seed: int = 0) -> torch.Tensor:
    """Flattened patches [sum(t*h*w), 3 * temporal * patch * patch] for images / videos of these grids."""
    gen = torch.Generator().manual_seed(2000 + seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH, generator=gen)


def takes_mm_token_type_ids(model) -> bool:
    """Whether this transformers release's Qwen forward takes ``mm_token_type_ids`` (5.24 needs it for M-RoPE)."""
    return "mm_token_type_ids" in inspect.signature(type(model).forward).parameters


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == IMAGE_TOKEN_ID] = 1
    types[input_ids == VIDEO_TOKEN_ID] = 2
    return types


def pad_batch(prompts, side: str = "left"):
    """Pad 1-D prompts to one length on ``side`` ("left" or "right"): ``(input_ids, attention_mask)``."""
    length = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), length), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = p.numel()
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        ids[i, sl] = p
        mask[i, sl] = 1
    return ids, mask


def qwen_inputs(model, prompts, grids, video_grids=None, side: str = "left", seed: int = 0) -> dict:
    """Model inputs for a batch of Qwen prompts.

    ``prompts``: 1-D id tensors (:func:`qwen_prompt`); ``grids[b]`` / ``video_grids[b]``:
    the image / video grids of sample ``b`` in prompt order. Returns
    ``input_ids``, ``attention_mask`` (only when padding is needed),
    ``pixel_values`` + ``image_grid_thw`` (if any image),
    ``pixel_values_videos`` + ``video_grid_thw`` (if any video) and
    ``mm_token_type_ids`` where the release takes it."""
    if torch.is_tensor(prompts):
        prompts = [prompts]
    ids, mask = pad_batch(prompts, side)
    out = {"input_ids": ids}
    if not bool(mask.all()):
        out["attention_mask"] = mask
    images = [tuple(g) for sample in grids for g in sample]
    if images:
        out["pixel_values"] = qwen_pixels(images, seed=seed)
        out["image_grid_thw"] = torch.tensor(images, dtype=torch.long)
    videos = [tuple(g) for sample in (video_grids or []) for g in sample]
    if videos:
        out["pixel_values_videos"] = qwen_pixels(videos, seed=seed + 500)
        out["video_grid_thw"] = torch.tensor(videos, dtype=torch.long)
    if takes_mm_token_type_ids(model):
        out["mm_token_type_ids"] = mm_token_type_ids(ids)
    return out


def qwen_ragged(model, seed: int = 0, prompt=None, inputs=None):
    """A left-padded batch of three Qwen prompts with different visual counts (one image of 8 tokens, two
    of 4 + 6, none) and each prompt's own inputs with the same pixels: ``(batch, [alone, ...])``.
    ``prompt`` / ``inputs``: the family's builders (default: :func:`qwen_prompt`, :func:`qwen_inputs`)."""
    prompt = prompt or qwen_prompt
    inputs = inputs or qwen_inputs
    grids = [[(1, 4, 8)], [(1, 4, 4), (1, 6, 4)], []]
    prompts = [prompt(g, seed=seed + i, after=4 + i) for i, g in enumerate(grids)]
    batch = inputs(model, prompts, grids, side="left", seed=seed)
    alone, row = [], 0
    for p, g in zip(prompts, grids):
        a = inputs(model, [p], [g], seed=seed)
        n = sum(t * h * w for t, h, w in g)
        if n:
            a["pixel_values"] = batch["pixel_values"][row:row + n]
        row += n
        alone.append(a)
    return batch, alone


# --------------------------------------------------------------------------- LLaVA-NeXT
def tiny_llava_next_config(num_layers: int = 6, attn_implementation: str = "sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=NEXT_TILE, patch_size=NEXT_PATCH, projection_dim=32)
    text = LlamaConfig(**_text_kwargs(num_layers))
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             image_grid_pinpoints=NEXT_PINPOINTS, image_seq_length=(NEXT_TILE // NEXT_PATCH) ** 2)
    config.pad_token_id = PAD_TOKEN_ID
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa", num_layers: int = 6, std: float = 0.15):
    """A tiny ``LlavaNextForConditionalGeneration`` (eval, fp32)."""
    from transformers import LlavaNextForConditionalGeneration

    config = tiny_llava_next_config(num_layers=num_layers, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    _randomise(model, seed, std)
    _generation_defaults(model, [IMAGE_TOKEN_ID])
    return model.eval()


def next_num_tiles(image_size) -> int:
    """Tiles (the base image + the any-resolution grid) LLaVA-NeXT cuts an image of ``(h, w)`` pixels into."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(list(image_size), NEXT_PINPOINTS, NEXT_TILE)


def next_pixels(image_sizes, seed: int = 0) -> torch.Tensor:
    """pixel_values [num_images, max_tiles, 3, 56, 56] (zero-padded tiles, as the processor pads them)."""
    gen = torch.Generator().manual_seed(2000 + seed)
    tiles = [next_num_tiles(s) for s in image_sizes]
    px = torch.zeros(len(image_sizes), max(tiles), 3, NEXT_TILE, NEXT_TILE)
    for i, n in enumerate(tiles):
        px[i, :n] = torch.randn(n, 3, NEXT_TILE, NEXT_TILE, generator=gen)
    return px


@torch.no_grad()
def next_visual_count(model, image_size) -> int:
    """Image tokens (base tile + unpadded grid + one newline per grid row) of one image, from the model."""
    px = next_pixels([image_size])
    sizes = torch.tensor([list(image_size)])
    feats = model.model.get_image_features(px, sizes, vision_feature_layer=model.config.vision_feature_layer,
                                           vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    pooled = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    if isinstance(pooled, (list, tuple)):
        return int(pooled[0].shape[0])
    return int(pooled.shape[0])


@torch.no_grad()
def next_newline_mask(model, image_size) -> torch.Tensor:
    """bool [n]: which of an image's tokens are image-newline tokens (their feature is ``image_newline``)."""
    px = next_pixels([image_size])
    sizes = torch.tensor([list(image_size)])
    feats = model.model.get_image_features(px, sizes, vision_feature_layer=model.config.vision_feature_layer,
                                           vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    pooled = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    f = pooled[0] if isinstance(pooled, (list, tuple)) else pooled
    return (f == model.model.image_newline.to(f.dtype)).all(dim=-1)


def next_prompt(n_visual: int, before: int = 3, after: int = 6, seed: int = 0) -> torch.Tensor:
    """``[bos, before text tokens, <image> * n_visual, after text tokens]`` (1-D)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.cat([torch.tensor([BOS_TOKEN_ID]), _text(before, gen), torch.full((n_visual,), IMAGE_TOKEN_ID),
                      _text(after, gen)])


def next_ragged(model, seed: int = 0):
    """A left-padded batch of two LLaVA-NeXT (or OneVision) images of different sizes (52 and 88 image
    tokens with the tiny tiling, newlines included) and a text-only prompt, and each prompt's own inputs
    with the same pixels: ``(batch, [alone, ...])``."""
    sizes = [(50, 100), (112, 112)]
    prompts = [next_prompt(next_visual_count(model, s), 3, 4 + i, seed=seed + i) for i, s in enumerate(sizes)]
    text = next_prompt(0, 4, 6, seed=seed + 7)
    ids, mask = pad_batch(prompts + [text], "left")
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": next_pixels(sizes, seed=seed),
             "image_sizes": torch.tensor(sizes)}
    alone = [{"input_ids": p[None], "pixel_values": batch["pixel_values"][b:b + 1],
              "image_sizes": batch["image_sizes"][b:b + 1]} for b, p in enumerate(prompts)]
    return batch, alone + [{"input_ids": text[None]}]


def next_inputs(model, image_sizes, before=3, after=6, seed: int = 0, side: str = "left") -> dict:
    """Inputs of a batch with one image per sample (``image_sizes[b] = (h, w)`` pixels)."""
    prompts = [next_prompt(next_visual_count(model, s), before, after + b, seed=seed + b)
               for b, s in enumerate(image_sizes)]
    ids, mask = pad_batch(prompts, side)
    out = {"input_ids": ids, "pixel_values": next_pixels(image_sizes, seed=seed),
           "image_sizes": torch.tensor([list(s) for s in image_sizes])}
    if not bool(mask.all()):
        out["attention_mask"] = mask
    return out


# --------------------------------------------------------------------------- LLaVA-OneVision
ONEVISION_VIDEO_TOKEN_ID = VIDEO_TOKEN_ID


def tiny_llava_onevision_config(num_layers: int = 6, attn_implementation: str = "sdpa"):
    """SigLIP 56 px / patch 14 (16 tokens per tile, no CLS) + Qwen2 text; the NeXT tiling grid."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=NEXT_TILE, patch_size=NEXT_PATCH)
    text = Qwen2Config(**_text_kwargs(num_layers))
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                                  video_token_index=ONEVISION_VIDEO_TOKEN_ID, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, image_grid_pinpoints=NEXT_PINPOINTS,
                                  vision_aspect_ratio="anyres_max_9")
    config.pad_token_id = PAD_TOKEN_ID
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa", num_layers: int = 6,
                         std: float = 0.15):
    """A tiny ``LlavaOnevisionForConditionalGeneration`` (eval, fp32)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    config = tiny_llava_onevision_config(num_layers=num_layers, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    _randomise(model, seed, std)
    _generation_defaults(model, [IMAGE_TOKEN_ID, ONEVISION_VIDEO_TOKEN_ID])
    return model.eval()


def onevision_video_count(model, frames: int) -> int:
    """Video tokens of ``frames`` frames: 2x2-pooled tile features per frame, then one newline."""
    side = -(-(NEXT_TILE // NEXT_PATCH) // 2)
    return frames * side * side + 1


def onevision_inputs(model, image_size=None, frames: int = 0, before=3, after=6, seed: int = 0) -> dict:
    """One prompt ``[bos, text, <image> * n, <video> * m, text]`` with an image of ``image_size`` and/or
    a video of ``frames`` frames."""
    gen = torch.Generator().manual_seed(1000 + seed)
    parts = [torch.tensor([BOS_TOKEN_ID]), _text(before, gen)]
    out = {}
    if image_size is not None:
        parts.append(torch.full((next_visual_count(model, image_size),), IMAGE_TOKEN_ID))
        out["pixel_values"] = next_pixels([image_size], seed=seed)
        out["image_sizes"] = torch.tensor([list(image_size)])
    if frames:
        parts.append(torch.full((onevision_video_count(model, frames),), ONEVISION_VIDEO_TOKEN_ID))
        g = torch.Generator().manual_seed(3000 + seed)
        out["pixel_values_videos"] = torch.randn(1, frames, 3, NEXT_TILE, NEXT_TILE, generator=g)
    parts.append(_text(after, gen))
    out["input_ids"] = torch.cat(parts)[None]
    return out


# --------------------------------------------------------------------------- InternVL
#: InternVL's <img> / </img> / <IMG_CONTEXT>, and Gemma 3's <start_of_image> / <end_of_image> / <image_soft_token>
IMG_START_TOKEN_ID, IMG_END_TOKEN_ID = VISION_START_TOKEN_ID, VISION_END_TOKEN_ID
INTERNVL_TILE = 56
INTERNVL_PATCH = 7
#: tokens per tile: (56 / 7)^2 patches, pixel-shuffled by 0.5 in each direction
INTERNVL_TILE_TOKENS = (INTERNVL_TILE // INTERNVL_PATCH) ** 2 // 4


def tiny_internvl_config(num_layers: int = 6, attn_implementation: str = "sdpa", text: str = "qwen2"):
    """InternViT 56 px / patch 7 (16 tokens per tile after the pixel shuffle) + Qwen2 text (InternVL3), or
    ``text="qwen3"`` (InternVL3.5: q/k norms, head_dim 16)."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config, Qwen3Config

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=INTERNVL_TILE, patch_size=INTERNVL_PATCH)
    if text not in ("qwen2", "qwen3"):
        raise ValueError(f"text must be 'qwen2' or 'qwen3', got {text!r}")
    text_config = (Qwen2Config if text == "qwen2" else Qwen3Config)(**_text_kwargs(num_layers))
    config = InternVLConfig(vision_config=vision, text_config=text_config,
                            image_token_id=IMAGE_TOKEN_ID, image_seq_length=INTERNVL_TILE_TOKENS,
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    config.pad_token_id = PAD_TOKEN_ID
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def tiny_internvl(seed: int = 0, attn_implementation: str = "sdpa", num_layers: int = 6, std: float = 0.15,
                  text: str = "qwen2"):
    """A tiny ``InternVLForConditionalGeneration`` (eval, fp32)."""
    from transformers import InternVLForConditionalGeneration

    config = tiny_internvl_config(num_layers=num_layers, attn_implementation=attn_implementation, text=text)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    _randomise(model, seed, std)
    _generation_defaults(model, [IMAGE_TOKEN_ID, IMG_START_TOKEN_ID, IMG_END_TOKEN_ID])
    return model.eval()


def internvl_prompt(tiles, after: int = 5, seed: int = 0, between: int = 2) -> torch.Tensor:
    """An InternVL (ChatML) prompt: ``<|im_start|> user \n``, one ``<img> <IMG_CONTEXT> * 16 t </img> \n``
    block per image of ``t`` tiles (``between`` text tokens between two), ``after`` question tokens,
    ``<|im_end|> \n <|im_start|> assistant \n``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    parts = [torch.tensor([IM_START_TOKEN_ID, USER_TOKEN_ID, NEWLINE_TOKEN_ID])]
    for i, t in enumerate(tiles):
        if i:
            parts.append(_text(between, gen))
        parts += [torch.tensor([IMG_START_TOKEN_ID]), torch.full((t * INTERNVL_TILE_TOKENS,), IMAGE_TOKEN_ID),
                  torch.tensor([IMG_END_TOKEN_ID, NEWLINE_TOKEN_ID])]
    parts += [_text(after, gen), torch.tensor([IM_END_TOKEN_ID, NEWLINE_TOKEN_ID, IM_START_TOKEN_ID,
                                                ASSISTANT_TOKEN_ID, NEWLINE_TOKEN_ID])]
    return torch.cat(parts)


def tile_pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2000 + seed)
    return torch.randn(n, 3, size, size, generator=gen)


def internvl_inputs(prompts, tiles, side: str = "left", seed: int = 0) -> dict:
    """Inputs of a batch of InternVL prompts; ``tiles[b]``: the tiles of each image of sample ``b``
    (``pixel_values`` [all tiles, 3, 56, 56], the samples' tiles in order)."""
    if torch.is_tensor(prompts):
        prompts = [prompts]
    ids, mask = pad_batch(prompts, side)
    out = {"input_ids": ids}
    if not bool(mask.all()):
        out["attention_mask"] = mask
    n = sum(sum(t) for t in tiles)
    if n:
        out["pixel_values"] = tile_pixels(n, INTERNVL_TILE, seed)
    return out


def _split_tiles(batch, prompts, tiles, make):
    """Each sample's own inputs (``make(prompt, tiles)``) with the batch's pixel rows of its tiles."""
    alone, row = [], 0
    for p, t in zip(prompts, tiles):
        a = make(p, t)
        if sum(t):
            a["pixel_values"] = batch["pixel_values"][row:row + sum(t)]
        row += sum(t)
        alone.append(a)
    return alone


def internvl_ragged(seed: int = 0):
    """A left-padded batch of three InternVL prompts with different visual counts (one image of 2 tiles:
    32 tokens; two of 1 + 3 tiles: 64; none), and each alone with the same pixels: ``(batch, [alone, ...])``."""
    tiles = [[2], [1, 3], []]
    prompts = [internvl_prompt(t, seed=seed + i, after=4 + i) for i, t in enumerate(tiles)]
    batch = internvl_inputs(prompts, tiles, side="left", seed=seed)
    return batch, _split_tiles(batch, prompts, tiles, lambda p, t: internvl_inputs([p], [t], seed=seed))


# --------------------------------------------------------------------------- Gemma 3
GEMMA_IMAGE = 56
GEMMA_PATCH = 7
#: image tokens per image: (56 / 7)^2 SigLIP patches average-pooled 2 x 2
GEMMA_IMAGE_TOKENS = 16
#: the tiny text model's sliding window: shorter than an image block and than every prompt, so that the
#: window cuts image blocks, prompts and the KV cache of every sliding layer
GEMMA_WINDOW = 8
BOI_TOKEN_ID, EOI_TOKEN_ID = VISION_START_TOKEN_ID, VISION_END_TOKEN_ID


def tiny_gemma3_config(num_layers: int = 6, attn_implementation: str = "sdpa", sliding_window: int = GEMMA_WINDOW):
    """SigLIP 56 px / patch 7, pooled to 16 tokens per image + the Gemma 3 text model (q/k norms, scaled
    embeddings, layers 0-4 sliding-window, layer 5 global: the stock ``layer_types`` pattern)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    kw = _text_kwargs(num_layers)
    text = Gemma3TextConfig(**kw, head_dim=16, query_pre_attn_scalar=16, sliding_window=sliding_window)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=GEMMA_IMAGE, patch_size=GEMMA_PATCH)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA_IMAGE_TOKENS,
                          boi_token_index=BOI_TOKEN_ID, eoi_token_index=EOI_TOKEN_ID, image_token_index=IMAGE_TOKEN_ID)
    config.pad_token_id = PAD_TOKEN_ID
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def tiny_gemma3(seed: int = 0, attn_implementation: str = "sdpa", num_layers: int = 6, std: float = 0.15,
                sliding_window: int = GEMMA_WINDOW):
    """A tiny ``Gemma3ForConditionalGeneration`` (eval, fp32)."""
    from transformers import Gemma3ForConditionalGeneration

    config = tiny_gemma3_config(num_layers=num_layers, attn_implementation=attn_implementation,
                                sliding_window=sliding_window)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    _randomise(model, seed, std)
    _generation_defaults(model, [IMAGE_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID])
    return model.eval()


def gemma_prompt(n_images: int, before: int = 2, after: int = 5, seed: int = 0, between: int = 2) -> torch.Tensor:
    """A Gemma 3 chat prompt: ``<bos> <start_of_turn> user \n`` text, one ``\n <start_of_image>
    <image_soft_token> * 16 <end_of_image> \n`` block per image (``between`` text tokens between two), the
    question, ``<end_of_turn> \n <start_of_turn> model \n`` (``<start_of_turn>``/``<end_of_turn>`` are the
    ChatML ids here, "model" is ``ASSISTANT_TOKEN_ID``)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    parts = [torch.tensor([BOS_TOKEN_ID, IM_START_TOKEN_ID, USER_TOKEN_ID, NEWLINE_TOKEN_ID]), _text(before, gen)]
    for i in range(n_images):
        if i:
            parts.append(_text(between, gen))
        parts += [torch.tensor([NEWLINE_TOKEN_ID, BOI_TOKEN_ID]), torch.full((GEMMA_IMAGE_TOKENS,), IMAGE_TOKEN_ID),
                  torch.tensor([EOI_TOKEN_ID, NEWLINE_TOKEN_ID])]
    parts += [_text(after, gen), torch.tensor([IM_END_TOKEN_ID, NEWLINE_TOKEN_ID, IM_START_TOKEN_ID,
                                                ASSISTANT_TOKEN_ID, NEWLINE_TOKEN_ID])]
    return torch.cat(parts)


def gemma_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """What Gemma3Processor returns as ``token_type_ids``: 1 at the image tokens, 0 elsewhere."""
    return (input_ids == IMAGE_TOKEN_ID).long()


def gemma_inputs(prompts, images, side: str = "left", seed: int = 0, token_types: bool = True) -> dict:
    """Inputs of a batch of Gemma 3 prompts; ``images[b]``: sample ``b``'s number of images
    (``pixel_values`` [all images, 3, 56, 56]); ``token_type_ids`` as the processor gives them."""
    if torch.is_tensor(prompts):
        prompts = [prompts]
    ids, mask = pad_batch(prompts, side)
    out = {"input_ids": ids}
    if not bool(mask.all()):
        out["attention_mask"] = mask
    if sum(images):
        out["pixel_values"] = tile_pixels(sum(images), GEMMA_IMAGE, seed)
    if token_types:
        out["token_type_ids"] = gemma_token_type_ids(ids)
    return out


def gemma_ragged(seed: int = 0):
    """A left-padded batch of three Gemma 3 prompts with different visual counts (one image: 16 tokens, two
    images: 32, none), and each alone with the same pixels: ``(batch, [alone, ...])``."""
    images = [1, 2, 0]
    prompts = [gemma_prompt(n, seed=seed + i, after=4 + i) for i, n in enumerate(images)]
    batch = gemma_inputs(prompts, images, side="left", seed=seed)
    return batch, _split_tiles(batch, prompts, [[1] * n for n in images],
                               lambda p, t: gemma_inputs([p], [len(t)], seed=seed))


# --------------------------------------------------------------------------- tokenizers, processors, model folders
def _word_tokenizer(top: dict, chat_template: str | None = None, bos: bool = True, extra: dict | None = None):
    """A word-level fast tokenizer of vocab 256: ``<pad> <s> </s> <unk>``, the tiny words of
    ``_tiny_models.TINY_WORDS``, fillers ``t{i}``, and ``top`` (id -> token) at the top ids.
    Text is split on whitespace; the special tokens of ``top`` are split out first. ``extra``: named
    special tokens (``extra_special_tokens``: ``tokenizer.boi_token``, ``.boi_token_id``, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from _tiny_models import TINY_WORDS

    words = ["<pad>", "<s>", "</s>", "<unk>"] + list(TINY_WORDS)
    first_top = min(top)
    words += [f"t{i}" for i in range(first_top - len(words))]
    words += [top[i] for i in range(first_top, VOCAB)]
    assert len(words) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_TOKEN_ID)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    specials = [w for w in top.values() if w.startswith("<")]
    if extra:  # named special tokens replace the list of additional ones: every special token gets a name
        named = {f"special_{i}_token": w for i, w in enumerate(w for w in specials if w not in extra.values())}
        kw = {"extra_special_tokens": {**named, **extra}}
    else:
        kw = {"additional_special_tokens": specials}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", **kw)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


#: a short Qwen2-VL-style chat template (system prompt, vision blocks, generation prompt)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nwhat is the image ?<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: the LLaVA-1.6 (vicuna) format: ``USER: <image>\n{question} ASSISTANT: {answer}</s>``
NEXT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% if m['content'] is string %}{{ m['content'] + ' ' }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


#: LLaVA-OneVision's (Qwen2 ChatML) format, images then videos then text in a turn, as its hub template:
#: ``<|im_start|>user <image>\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n``
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chatml_tokenizer(image: str, video: str, chat_template: str | None):
    """The tiny word tokenizer with Qwen2's ChatML specials (no BOS, eos ``<|im_end|>``) and the
    family's image / video placeholders at ``IMAGE_TOKEN_ID`` / ``VIDEO_TOKEN_ID``."""
    top = {SYSTEM_TOKEN_ID: "system", ASSISTANT_TOKEN_ID: "assistant", USER_TOKEN_ID: "user",
           NEWLINE_TOKEN_ID: "<nl>", IM_START_TOKEN_ID: "<|im_start|>", IM_END_TOKEN_ID: "<|im_end|>",
           VISION_START_TOKEN_ID: "<|vision_start|>", VISION_END_TOKEN_ID: "<|vision_end|>",
           VIDEO_TOKEN_ID: video, IMAGE_TOKEN_ID: image}
    tok = _word_tokenizer(top, chat_template, bos=False)  # Qwen2 prepends no BOS
    tok.eos_token = "<|im_end|>"
    return tok


def qwen_tokenizer(chat_template: str | None = QWEN_CHAT_TEMPLATE):
    return _chatml_tokenizer("<|image_pad|>", "<|video_pad|>", chat_template)


def onevision_tokenizer(chat_template: str | None = ONEVISION_CHAT_TEMPLATE):
    """OneVision's Qwen2 tokenizer: ChatML, ``<image>`` = 255, ``<video>`` = 254."""
    return _chatml_tokenizer("<image>", "<video>", chat_template)


#: InternVL3's format (ChatML; the image item is ``<IMG_CONTEXT>\n``, which InternVLProcessor expands to
#: ``<img> <IMG_CONTEXT> * n </img>``)
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Gemma 3's format: ``<bos><start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n``
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def internvl_tokenizer(chat_template: str | None = INTERNVL_CHAT_TEMPLATE):
    """InternVL's Qwen2 tokenizer: ChatML, ``<img>`` 252, ``</img>`` 253, ``<IMG_CONTEXT>`` 255 (named as
    InternVLProcessor reads them: ``start_image_token``, ``end_image_token``, ``context_image_token``)."""
    top = {SYSTEM_TOKEN_ID: "system", ASSISTANT_TOKEN_ID: "assistant", USER_TOKEN_ID: "user",
           NEWLINE_TOKEN_ID: "<nl>", IM_START_TOKEN_ID: "<|im_start|>", IM_END_TOKEN_ID: "<|im_end|>",
           IMG_START_TOKEN_ID: "<img>", IMG_END_TOKEN_ID: "</img>", VIDEO_TOKEN_ID: "<video>",
           IMAGE_TOKEN_ID: "<IMG_CONTEXT>"}
    tok = _word_tokenizer(top, chat_template, bos=False, extra={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    tok.eos_token = "<|im_end|>"
    return tok


def gemma_tokenizer(chat_template: str | None = GEMMA_CHAT_TEMPLATE):
    """Gemma 3's tokenizer: BOS ``<s>``, ``<start_of_turn>`` / ``<end_of_turn>`` (the ChatML ids), "model",
    ``<start_of_image>`` 252, ``<end_of_image>`` 253, ``<image_soft_token>`` 255 (named as Gemma3Processor
    reads them: ``boi_token``, ``eoi_token``, ``image_token``)."""
    top = {SYSTEM_TOKEN_ID: "system", ASSISTANT_TOKEN_ID: "model", USER_TOKEN_ID: "user",
           NEWLINE_TOKEN_ID: "<nl>", IM_START_TOKEN_ID: "<start_of_turn>", IM_END_TOKEN_ID: "<end_of_turn>",
           BOI_TOKEN_ID: "<start_of_image>", EOI_TOKEN_ID: "<end_of_image>", VIDEO_TOKEN_ID: "<unused0>",
           IMAGE_TOKEN_ID: "<image_soft_token>"}
    tok = _word_tokenizer(top, chat_template, bos=True, extra={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    tok.eos_token = "<end_of_turn>"
    return tok


def tiny_internvl_image_processor():
    """InternVL's (GotOcr2) PIL image processor: 56 px tiles, up to 6 by the aspect ratio, plus a thumbnail."""
    return _pil_class("GotOcr2ImageProcessorPil", "GotOcr2ImageProcessor")(
        size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, crop_to_patches=True, min_patches=1, max_patches=6)


def tiny_gemma3_processor(chat_template: str | None = GEMMA_CHAT_TEMPLATE):
    """A ``Gemma3Processor`` for :func:`tiny_gemma3`: its PIL image processor at 56 px, :func:`gemma_tokenizer`,
    16 image tokens per image (no torchvision needed)."""
    import transformers

    ip = _pil_class("Gemma3ImageProcessorPil", "Gemma3ImageProcessor")(size={"height": GEMMA_IMAGE,
                                                                              "width": GEMMA_IMAGE})
    return transformers.Gemma3Processor(image_processor=ip, tokenizer=gemma_tokenizer(chat_template),
                                        image_seq_length=GEMMA_IMAGE_TOKENS, chat_template=chat_template)


def tiny_internvl_processor(chat_template: str | None = INTERNVL_CHAT_TEMPLATE):
    """An ``InternVLProcessor`` for :func:`tiny_internvl`. Like Qwen's, it needs torchvision in transformers 5.x
    (its video processor): without it this raises ``ImportError``."""
    import transformers

    try:
        video = transformers.InternVLVideoProcessor()
    except ImportError as exc:
        raise ImportError(f"InternVLProcessor needs InternVLVideoProcessor, which needs torchvision "
                          f"(transformers {transformers.__version__})") from exc
    return transformers.InternVLProcessor(image_processor=tiny_internvl_image_processor(),
                                          tokenizer=internvl_tokenizer(chat_template), video_processor=video,
                                          image_seq_length=INTERNVL_TILE_TOKENS, chat_template=chat_template)


def _pil_class(*names):
    import transformers

    for n in names:
        cls = getattr(transformers, n, None)
        if cls is not None:
            return cls
    raise ImportError(f"none of {names} in transformers {transformers.__version__}")


def tiny_qwen_image_processor(max_pixels: int = 32 * 32):
    """Qwen2-VL's PIL image processor with patch 4, temporal patch 2, merge 2; images are resized to
    at most ``max_pixels`` (<= 16 visual tokens with the default) and at least 4 merged patches."""
    min_pixels = 4 * (QWEN_PATCH * QWEN_MERGE) ** 2
    return _pil_class("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor")(
        patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL, merge_size=QWEN_MERGE,
        min_pixels=min_pixels, max_pixels=max_pixels, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def tiny_qwen_video_size(max_pixels: int = 32 * 32) -> dict:
    """The frame size bounds of the tiny Qwen video processors: those of the images (the default's are
    for 14 / 16 px patches: thousands of tokens a frame here)."""
    return {"shortest_edge": 4 * (QWEN_PATCH * QWEN_MERGE) ** 2, "longest_edge": max_pixels}


def tiny_qwen_processor(version: str = "2.5", chat_template: str | None = QWEN_CHAT_TEMPLATE,
                        max_pixels: int = 32 * 32):
    """A ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` for :func:`tiny_qwen`
    (:func:`tiny_qwen_image_processor`, :func:`qwen_tokenizer`, the Qwen chat template).

    transformers 5.x builds these processors only with a Qwen video processor, which needs
    torchvision: without it this raises ``ImportError`` (use the tokenizer and the image
    processor on their own, as :func:`save_tiny_qwen` saves them)."""
    import transformers

    cls = transformers.Qwen2VLProcessor if version == "2" else transformers.Qwen2_5_VLProcessor
    try:
        video = transformers.Qwen2VLVideoProcessor(patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL,
                                                   merge_size=QWEN_MERGE, size=tiny_qwen_video_size(max_pixels))
    except ImportError as exc:
        raise ImportError(f"{cls.__name__} needs Qwen2VLVideoProcessor, which needs torchvision "
                          f"(transformers {transformers.__version__})") from exc
    return cls(image_processor=tiny_qwen_image_processor(max_pixels), tokenizer=qwen_tokenizer(chat_template),
               video_processor=video, chat_template=chat_template)


def tiny_anyres_image_processor(family: str = "llava_next"):
    """The PIL any-resolution image processor of ``"llava_next"`` / ``"llava_onevision"``: 56 px tiles
    over ``NEXT_PINPOINTS`` (NeXT resizes the base image's shortest edge and centre-crops it,
    OneVision resizes it to the square tile)."""
    if family == "llava_next":
        return _pil_class("LlavaNextImageProcessorPil", "LlavaNextImageProcessor")(
            size={"shortest_edge": NEXT_TILE}, crop_size={"height": NEXT_TILE, "width": NEXT_TILE},
            image_grid_pinpoints=NEXT_PINPOINTS)
    if family == "llava_onevision":
        return _pil_class("LlavaOnevisionImageProcessorPil", "LlavaOnevisionImageProcessor")(
            size={"height": NEXT_TILE, "width": NEXT_TILE}, image_grid_pinpoints=NEXT_PINPOINTS)
    raise ValueError(f"family must be 'llava_next' or 'llava_onevision', got {family!r}")


def tiny_next_processor(chat_template: str | None = NEXT_CHAT_TEMPLATE):
    """A ``LlavaNextProcessor`` for :func:`tiny_llava_next`: PIL any-resolution image processor (56 px
    tiles, the pinpoints of the model), the tiny word tokenizer (``<image>`` = 255), a vicuna-style template."""
    from transformers import LlavaNextProcessor

    from _tiny_models import tiny_tokenizer

    return LlavaNextProcessor(image_processor=tiny_anyres_image_processor("llava_next"),
                              tokenizer=tiny_tokenizer(chat_template), patch_size=NEXT_PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=chat_template)


def tiny_onevision_processor(chat_template: str | None = ONEVISION_CHAT_TEMPLATE):
    """A ``LlavaOnevisionProcessor`` for :func:`tiny_llava_onevision`: the any-resolution image processor
    of :func:`tiny_anyres_image_processor`, :func:`onevision_tokenizer`, a 56 px video processor.

    Like Qwen's, it needs torchvision in transformers 5.x (the video processor): without it this
    raises ``ImportError``."""
    import transformers

    try:
        video = transformers.LlavaOnevisionVideoProcessor(size={"height": NEXT_TILE, "width": NEXT_TILE})
    except ImportError as exc:
        raise ImportError(f"LlavaOnevisionProcessor needs LlavaOnevisionVideoProcessor, which needs torchvision "
                          f"(transformers {transformers.__version__})") from exc
    return transformers.LlavaOnevisionProcessor(
        image_processor=tiny_anyres_image_processor("llava_onevision"), tokenizer=onevision_tokenizer(chat_template),
        video_processor=video, num_image_tokens=(NEXT_TILE // NEXT_PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=chat_template)


def _save(path, model, processor, tokenizer=None, image_processor=None) -> str:
    """``model`` and ``processor()`` saved into ``path``; where the processor cannot be built (it raises
    ImportError: no torchvision for its video half) ``tokenizer()`` and ``image_processor()`` instead."""
    import os

    path = os.fspath(path)
    model.save_pretrained(path)
    try:
        processor().save_pretrained(path)
    except ImportError:
        if tokenizer is None:
            raise
        tokenizer().save_pretrained(path)  # with the chat template
        image_processor().save_pretrained(path)
    return path


def save_tiny_qwen(path, version: str = "2.5", seed: int = 0, num_layers: int = 6,
                   chat_template: str | None = QWEN_CHAT_TEMPLATE, attn_implementation: str = "sdpa") -> str:
    """:func:`tiny_qwen` and :func:`tiny_qwen_processor` saved into ``path`` with ``save_pretrained``.

    Without torchvision (the Qwen processor's video half needs it) the folder holds the model,
    the tokenizer with its chat template and the image processor: ``AutoTokenizer`` and
    ``AutoImageProcessor.from_pretrained(path)`` load them, ``AutoProcessor`` raises ImportError."""
    return _save(path, tiny_qwen(version, seed=seed, num_layers=num_layers, attn_implementation=attn_implementation),
                 lambda: tiny_qwen_processor(version, chat_template=chat_template),
                 lambda: qwen_tokenizer(chat_template), tiny_qwen_image_processor)


def save_tiny_llava_next(path, seed: int = 0, num_layers: int = 6, chat_template: str | None = NEXT_CHAT_TEMPLATE,
                         attn_implementation: str = "sdpa") -> str:
    """:func:`tiny_llava_next` and :func:`tiny_next_processor` saved into ``path``."""
    return _save(path, tiny_llava_next(seed=seed, num_layers=num_layers, attn_implementation=attn_implementation),
                 lambda: tiny_next_processor(chat_template=chat_template))


def save_tiny_llava_onevision(path, seed: int = 0, num_layers: int = 6,
                              chat_template: str | None = ONEVISION_CHAT_TEMPLATE,
                              attn_implementation: str = "sdpa") -> str:
    """:func:`tiny_llava_onevision` and :func:`tiny_onevision_processor` saved into ``path``.

    Without torchvision (the OneVision processor's video half needs it), as :func:`save_tiny_qwen`: the
    model, :func:`onevision_tokenizer` with its chat template and the any-resolution image processor."""
    return _save(path, tiny_llava_onevision(seed=seed, num_layers=num_layers, attn_implementation=attn_implementation),
                 lambda: tiny_onevision_processor(chat_template=chat_template),
                 lambda: onevision_tokenizer(chat_template), lambda: tiny_anyres_image_processor("llava_onevision"))


def save_tiny_internvl(path, seed: int = 0, num_layers: int = 6, chat_template: str | None = INTERNVL_CHAT_TEMPLATE,
                       attn_implementation: str = "sdpa") -> str:
    """:func:`tiny_internvl` and :func:`tiny_internvl_processor` saved into ``path``; without torchvision (the
    processor's video half needs it), as :func:`save_tiny_qwen`: the model, :func:`internvl_tokenizer` with its
    chat template and the image processor."""
    return _save(path, tiny_internvl(seed=seed, num_layers=num_layers, attn_implementation=attn_implementation),
                 lambda: tiny_internvl_processor(chat_template=chat_template),
                 lambda: internvl_tokenizer(chat_template), tiny_internvl_image_processor)


def save_tiny_gemma3(path, seed: int = 0, num_layers: int = 6, chat_template: str | None = GEMMA_CHAT_TEMPLATE,
                     attn_implementation: str = "sdpa") -> str:
    """:func:`tiny_gemma3` and :func:`tiny_gemma3_processor` saved into ``path``."""
    return _save(path, tiny_gemma3(seed=seed, num_layers=num_layers, attn_implementation=attn_implementation),
                 lambda: tiny_gemma3_processor(chat_template=chat_template))
