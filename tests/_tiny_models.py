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


# --------------------------------------------------------------------------- a tiny model directory
#: Words of the tiny word-level tokenizer (ids 4...), then filler words up to the image token.
TINY_WORDS = (
    ["USER:", "ASSISTANT:", "what", "colour", "is", "the", "image", "?", "which", "shape", "are", "there",
     "how", "many", "red", "green", "blue", "yellow", "purple", "white", "black", "yes", "no",
     "circle", "square", "triangle", "cross", "one", "two", "three", "four", "a", "an", "of", "in"]
)
UNK_TOKEN_ID = 3


def tiny_tokenizer(chat_template: str | None = None):
    """A word-level fast tokenizer over :data:`TINY_WORDS` (vocab 256, ``<image>`` = 255).

    Ids: 0 ``<pad>``, 1 ``<s>`` (prepended), 2 ``</s>``, 3 ``<unk>``; text is split
    on whitespace (so write ``"colour ?"``, not ``"colour?"``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + list(TINY_WORDS)
    words += [f"t{i}" for i in range(VOCAB - 1 - len(words))] + ["<image>"]
    assert len(words) == VOCAB and words[IMAGE_TOKEN_ID] == "<image>"
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_TOKEN_ID)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_processor(image_size: int = 56, patch_size: int = 14, chat_template: str | None = None):
    """A ``LlavaProcessor`` (PIL CLIP image processor + :func:`tiny_tokenizer`) for :func:`tiny_llava`."""
    from transformers import LlavaProcessor

    try:  # transformers >= 5.x with torchvision-based defaults names the PIL processor explicitly
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 5.0: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor

    images = ImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tiny_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template)


def save_tiny_llava(path, seed: int = 0, num_layers: int = 6, image_size: int = 56,
                    chat_template: str | None = None, attn_implementation: str = "sdpa") -> str:
    """Write :func:`tiny_llava` and :func:`tiny_processor` into the directory ``path`` with
    ``save_pretrained``, so that it loads like a hub checkpoint (``from_pretrained(path)``)."""
    import os

    path = os.fspath(path)
    model = tiny_llava(seed=seed, num_layers=num_layers, image_size=image_size,
                       attn_implementation=attn_implementation)
    model.save_pretrained(path)
    tiny_processor(image_size=image_size, chat_template=chat_template).save_pretrained(path)
    return path


_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20)}
_SHAPES = ("circle", "square", "triangle", "cross")


def write_llava_dataset(root, n: int = 8, seed: int = 0, json_name: str = "data.json") -> str:
    """``n`` records of a tiny LLaVA-format data set with real PNG files under ``root/images``.

    Each image is a plain colour with a few random dots (sizes vary, so the
    image processor's resize and crop are exercised); questions and answers use
    :data:`TINY_WORDS` only. Every third record has a second human/gpt turn.
    Returns the JSON path (image paths are relative to ``root``)."""
    import json
    import os
    import random

    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        colour = rng.choice(sorted(_COLOURS))
        image = Image.new("RGB", (48 + 4 * (i % 3), 56 - 3 * (i % 2)), _COLOURS[colour])
        for _ in range(40):
            image.putpixel((rng.randrange(image.width), rng.randrange(image.height)),
                           tuple(rng.randrange(256) for _ in range(3)))
        rel = f"images/{i:03d}.png"
        image.save(os.path.join(root, rel))
        conv = [{"from": "human", "value": "<image>\nwhat colour is the image ?"},
                {"from": "gpt", "value": colour}]
        if i % 3 == 2:
            conv += [{"from": "human", "value": "which shape is in the image ?"},
                     {"from": "gpt", "value": f"a {rng.choice(_SHAPES)}"}]
        records.append({"id": f"rec-{i}", "image": rel, "conversations": conv})
    path = os.path.join(root, json_name)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


#: (width, height) of :func:`write_ragged_llava_dataset`'s images, in turn: a different visual count
#: for every family whose count depends on the image's size
RAGGED_SIZES = [(56, 56), (50, 100), (100, 40), (112, 112), (40, 60), (64, 32)]


def write_ragged_llava_dataset(root, n: int = 6, seed: int = 0, offset: int = 0) -> str:
    """:func:`write_llava_dataset` with record i's image resized to ``RAGGED_SIZES[(i + offset) % 6]``."""
    import json
    import os

    from PIL import Image

    path = write_llava_dataset(str(root), n=n, seed=seed)
    for i, rec in enumerate(json.load(open(path))):
        full = os.path.join(str(root), rec["image"])
        with Image.open(full) as im:
            im.convert("RGB").resize(RAGGED_SIZES[(i + offset) % len(RAGGED_SIZES)]).save(full)
    return path
