"""Tiny randomly initialised Qwen3-VL and Qwen3-VL-MoE models for CPU tests (no downloads).

Same recipe as ``tests/_tiny_families.py`` (fp32, eval mode, weights drawn with a fixed seed
and std 0.15), same special token ids as its Qwen2(.5)-VL models. Text model: hidden 64,
4 query / 2 key-value heads (head_dim 16) with q/k RMS norms, 6 layers, vocab 256,
interleaved multimodal RoPE with ``mrope_section = [2, 3, 3]``. MoE: 4 experts, 2 per
token, every layer sparse.

Vision: patch 4, temporal patch 2, spatial merge 2 (an image of ``grid = (t, h, w)``
patches gives ``t * h * w / 4`` visual tokens), 3 blocks, **DeepStack** from vision
blocks 0, 1, 2 (``deepstack_visual_indexes``), so the text model adds a DeepStack level
to the visual positions after each of its decoder layers 0, 1 and 2.

Prompts follow Qwen3-VL's processor: an image is ``<|vision_start|> <|image_pad|> * n
<|vision_end|>``; a video of ``t`` frames (its grid ``(t, h, w)`` counts temporal
patches) is, per frame, ``<{seconds} seconds>`` (here: two text tokens) then
``<|vision_start|> <|video_pad|> * (h w / 4) <|vision_end|>``. ``mm_token_type_ids``
(0 text, 1 image, 2 video) is what the processor returns; transformers 5.0's forward
does not take it, 5.24 and later need it for M-RoPE (:func:`qwen3_inputs` adds it where
the release takes it).
"""
from __future__ import annotations

import torch

import _tiny_families as tf

QWEN3_DEEPSTACK = (0, 1, 2)
#: the "<x.y seconds>" timestamp of a video frame: two text tokens here
TIMESTAMP_TOKENS = 2


def tiny_qwen3_config(moe: bool = False, num_layers: int = 6, attn_implementation: str = "sdpa",
                      deepstack=QWEN3_DEEPSTACK):
    """Config of a tiny Qwen3-VL (``moe=False``) or Qwen3-VL-MoE."""
    text = dict(tf._text_kwargs(num_layers), head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3,
                  patch_size=tf.QWEN_PATCH, spatial_merge_size=tf.QWEN_MERGE, temporal_patch_size=tf.QWEN_TEMPORAL,
                  out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=list(deepstack))
    ids = dict(image_token_id=tf.IMAGE_TOKEN_ID, video_token_id=tf.VIDEO_TOKEN_ID,
               vision_start_token_id=tf.VISION_START_TOKEN_ID, vision_end_token_id=tf.VISION_END_TOKEN_ID)
    if moe:
        from transformers import Qwen3VLMoeConfig as Config
    else:
        from transformers import Qwen3VLConfig as Config
    config = Config(text_config=text, vision_config=vision, **ids)
    config.pad_token_id = tf.PAD_TOKEN_ID
    config.text_config.pad_token_id = tf.PAD_TOKEN_ID
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def tiny_qwen3(moe: bool = False, seed: int = 0, attn_implementation: str = "sdpa", num_layers: int = 6,
               std: float = 0.15, deepstack=QWEN3_DEEPSTACK):
    """A tiny ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoeForConditionalGeneration`` (eval, fp32)."""
    config = tiny_qwen3_config(moe, num_layers=num_layers, attn_implementation=attn_implementation,
                               deepstack=deepstack)
    if moe:
        from transformers import Qwen3VLMoeForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLForConditionalGeneration as Model
    torch.manual_seed(seed)
    model = Model(config)
    tf._randomise(model, seed, std)
    tf._generation_defaults(model, [tf.IMAGE_TOKEN_ID, tf.VIDEO_TOKEN_ID, tf.VISION_START_TOKEN_ID,
                                    tf.VISION_END_TOKEN_ID])
    return model.eval()


def qwen3_prompt(grids=(), video_grids=(), before: int = 3, after: int = 5, seed: int = 0, between: int = 2):
    """A Qwen3-VL chat prompt (1-D ids): system turn, user turn with the image blocks, then the
    video blocks (one timestamped ``vision_start .. vision_end`` block per frame), ``after``
    question tokens and the generation prompt."""
    gen = torch.Generator().manual_seed(1000 + seed)
    parts = [torch.tensor([tf.IM_START_TOKEN_ID, tf.SYSTEM_TOKEN_ID, tf.NEWLINE_TOKEN_ID]), tf._text(before, gen),
             torch.tensor([tf.IM_END_TOKEN_ID, tf.NEWLINE_TOKEN_ID, tf.IM_START_TOKEN_ID, tf.USER_TOKEN_ID,
                           tf.NEWLINE_TOKEN_ID])]
    first = True
    for grid in grids:
        if not first:
            parts.append(tf._text(between, gen))
        first = False
        parts += [torch.tensor([tf.VISION_START_TOKEN_ID]), torch.full((tf.qwen_tokens(grid),), tf.IMAGE_TOKEN_ID),
                  torch.tensor([tf.VISION_END_TOKEN_ID])]
    for t, h, w in video_grids:
        if not first:
            parts.append(tf._text(between, gen))
        first = False
        for _ in range(t):
            parts += [tf._text(TIMESTAMP_TOKENS, gen), torch.tensor([tf.VISION_START_TOKEN_ID]),
                      torch.full((tf.qwen_tokens((1, h, w)),), tf.VIDEO_TOKEN_ID),
                      torch.tensor([tf.VISION_END_TOKEN_ID])]
    parts += [tf._text(after, gen), torch.tensor([tf.IM_END_TOKEN_ID, tf.NEWLINE_TOKEN_ID, tf.IM_START_TOKEN_ID,
                                                   tf.ASSISTANT_TOKEN_ID, tf.NEWLINE_TOKEN_ID])]
    return torch.cat(parts)


def qwen3_inputs(model, prompts, grids, video_grids=None, side: str = "left", seed: int = 0) -> dict:
    """Model inputs for a batch of Qwen3-VL prompts (:func:`qwen3_prompt`); as
    ``_tiny_families.qwen_inputs`` (the pixel layout is Qwen2-VL's: a video's grid counts
    temporal patches of ``temporal_patch_size`` frames each)."""
    return tf.qwen_inputs(model, prompts, grids, video_grids, side=side, seed=seed)


def qwen3_ragged(model, seed: int = 0):
    """``_tiny_families.qwen_ragged`` with Qwen3-VL's prompts: a left-padded batch of three prompts with
    different visual counts (one image of 8 tokens, two of 4 + 6, none) and each prompt's own inputs with
    the same pixels: ``(batch, [alone, ...])``."""
    return tf.qwen_ragged(model, seed, prompt=qwen3_prompt, inputs=qwen3_inputs)


def tiny_qwen3_processor(chat_template: str | None = tf.QWEN_CHAT_TEMPLATE):
    """A ``Qwen3VLProcessor`` for :func:`tiny_qwen3`: Qwen2-VL's PIL image processor (patch 4, merge 2), a
    ``Qwen3VLVideoProcessor`` of the same patches (frames of the images' size bounds), the Qwen tokenizer.
    Needs torchvision in transformers 5.x (the video processor): without it this raises ``ImportError``."""
    import transformers

    try:
        video = transformers.Qwen3VLVideoProcessor(patch_size=tf.QWEN_PATCH, temporal_patch_size=tf.QWEN_TEMPORAL,
                                                   merge_size=tf.QWEN_MERGE, size=tf.tiny_qwen_video_size())
    except ImportError as exc:
        raise ImportError(f"Qwen3VLProcessor needs Qwen3VLVideoProcessor, which needs torchvision "
                          f"(transformers {transformers.__version__})") from exc
    return transformers.Qwen3VLProcessor(image_processor=tf.tiny_qwen_image_processor(),
                                         tokenizer=tf.qwen_tokenizer(chat_template), video_processor=video,
                                         chat_template=chat_template)


def save_tiny_qwen3(path, moe: bool = False, seed: int = 0, num_layers: int = 6,
                    chat_template: str | None = tf.QWEN_CHAT_TEMPLATE, attn_implementation: str = "sdpa") -> str:
    """:func:`tiny_qwen3` saved into ``path`` with ``save_pretrained``, with the Qwen tokenizer (its chat
    template) and Qwen2-VL's PIL image processor (patch 4, merge 2: Qwen3-VL's processor has the same
    image half; its video half needs torchvision, so the folder never holds a full processor here)."""
    import os

    path = os.fspath(path)
    tiny_qwen3(moe, seed=seed, num_layers=num_layers, attn_implementation=attn_implementation).save_pretrained(path)
    tf.qwen_tokenizer(chat_template).save_pretrained(path)
    tf.tiny_qwen_image_processor().save_pretrained(path)
    return path
