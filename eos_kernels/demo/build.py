"""The demo model: a small LLaVA-architecture model for the synthetic task of :mod:`eos_kernels.demo.task`.

``transformers.LlavaForConditionalGeneration`` built from configs: a 2-layer
CLIP vision tower (64 px images, 8 px patches: 64 visual tokens, one per 8x8
grid cell of the task, so each token sees one whole object; the CLS token
dropped by the "default" feature strategy), LLaVA's 2-layer projector, and an
8-layer Llama decoder with grouped-query attention (4 query heads, 2 key-value
heads, d = 128), 1.3 M parameters. A word-level tokenizer over the task's vocabulary, a
``CLIPImageProcessor`` and a ``LlavaProcessor`` complete it; prompts use the
LLaVA-1.5 format ``"USER: <image>\\n{question} ASSISTANT:"`` + ``" {answer}</s>"``
(the format of :mod:`eos_kernels.search`, which has no chat template to follow).

``scripts/train_demo.py`` trains it and writes the checkpoint shipped in
``eos_kernels/demo/checkpoint/`` (safetensors + config + tokenizer + processor,
about 5 MB, and ``training_report.json`` with the measured held-out
accuracies and every training run), which :func:`load_demo_model` loads
offline with the standard ``from_pretrained`` on that local path.
"""
from __future__ import annotations

import os

import torch

from eos_kernels.demo import task

IMAGE_TOKEN = "<image>"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
PROMPT_WORDS = ["USER:", "ASSISTANT:"]
PATCH_SIZE = task.CELL  # one vision patch per grid cell
NUM_VISUAL_TOKENS = (task.IMAGE_SIZE // PATCH_SIZE) ** 2  # 64


def checkpoint_path() -> str:
    """Folder of the shipped checkpoint (inside the installed package)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint")


def vocabulary() -> list[str]:
    """Token strings, id order: specials, then the prompt words, then the task's words."""
    return SPECIAL + PROMPT_WORDS + [w for w in task.vocabulary() if w not in ("user", ":", "assistant")]


def build_processor():
    """A ``LlavaProcessor`` with a word-level tokenizer over :func:`vocabulary`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN], padding_side="left")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": task.IMAGE_SIZE}, crop_size={"height": task.IMAGE_SIZE, "width": task.IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_config():
    """The model's ``LlavaConfig`` (sizes in the module docstring)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = vocabulary()
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=task.IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=256,
                       pad_token_id=vocab.index("<pad>"), bos_token_id=vocab.index("<s>"),
                       eos_token_id=vocab.index("</s>"), tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab.index(IMAGE_TOKEN),
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       image_seq_length=NUM_VISUAL_TOKENS, projector_hidden_act="gelu")


def build_model(seed: int = 0):
    """A freshly initialised demo model (fp32, eager-free: sdpa attention)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(build_config(), attn_implementation="sdpa")


def load_demo_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, processor)`` of the shipped checkpoint, offline, model in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = checkpoint_path()
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(
            f"the demo checkpoint is missing from {path}: train it with `python scripts/train_demo.py train` "
            "and write it with `python scripts/train_demo.py export`")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
