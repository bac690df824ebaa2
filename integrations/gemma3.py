"""EOS inside a stock Hugging Face Gemma 3 (``transformers.Gemma3ForConditionalGeneration``).

Usage::

    import eos_kernels
    from eos_kernels.integrations.gemma3 import patch_gemma3, unpatch_gemma3
    model = Gemma3ForConditionalGeneration.from_pretrained("google/gemma-3-4b-it", attn_implementation="sdpa")
    patch_gemma3(model, eos_kernels.Theta.paper(64))   # 256 visual tokens per image
    out = model.generate(**processor(...), max_new_tokens=32)   # with the processor's token_type_ids
    print(model.eos_report)
    unpatch_gemma3(model)

Supported classes: ``Gemma3ForConditionalGeneration`` / ``Gemma3Model``
(SigLIP + average-pooled projector + the Gemma 3 text model).

What is model-specific here (everything else is :mod:`eos_kernels.patching`):

- **Visual tokens**: the ``<image_soft_token>`` positions (``config.image_token_id``),
  ``config.mm_tokens_per_image`` (256) per image, each image written by the
  processor as ``\\n\\n<start_of_image> <image_soft_token> * 256 <end_of_image>\\n\\n``;
  ``<start_of_image>`` / ``<end_of_image>`` are text (never reduced). A fixed
  count per image: a Theta is validated against one image at patch time
  (``num_visual_tokens`` for prompts with more: several images, pan-and-scan
  crops); at every prefill each sample follows the schedule of its own count.
- **Bidirectional image blocks**: with ``token_type_ids`` (1 at the image
  tokens, as the processor returns them) the tokens of one image attend to each
  other in both directions, an overlay on the causal mask that transformers
  builds before the decoder stack (an ``or_mask_function`` /
  ``block_sequence_ids`` in ``create_causal_mask``). The masks are built for
  the whole input in original positions and every layer behind a reducer gets
  them gathered at the kept tokens' positions, so the kept tokens of an image
  still see each other (and nothing else changes). Decoding has no overlay
  (the stock model passes no ``token_type_ids`` then); the image tokens' keys
  in the KV cache are those of the bidirectional prefill, in the stock model as
  here.
- **Sliding-window layers**: five of every six layers attend within a window
  of ``config.sliding_window`` tokens (``layer_types``), so each forward builds
  two masks (``full_attention``, ``sliding_attention``) and two rotary tables
  (local and global RoPE bases); each layer gets its own, sliced at the kept
  tokens. The window is measured in original positions, as the RoPE positions
  are: the sliding mask transformers builds is gathered, never rebuilt in
  slots, and a sliding layer's cache (``DynamicSlidingWindowLayer``: its last
  ``sliding_window - 1`` slots; ``StaticSlidingWindowLayer``: a rolling buffer)
  is mapped slot by slot, so that a decode step sees the kept tokens whose
  original position lies in the window -- a reduced layer's last ``W - 1``
  slots reach further back than ``W - 1`` positions, and those beyond the window
  are masked. transformers sizes every full-attention mask by the first
  full-attention layer's cache (layer 5), which lies behind a reducer at any of
  layers 0-4: at decode steps such a mask is rebuilt from what it means
  (causal, padding) at the layer's own slots (:mod:`eos_kernels.patching.hooks`).
- **Importance**: the text rows rate the visual tokens with the causal
  attention of the reducer layer (query / key after ``q_norm`` / ``k_norm``
  and the layer's own RoPE, ``query_pre_attn_scalar ** -0.5`` scale); on a
  sliding-window reducer layer the window is not applied to the rating (a
  question further than ``sliding_window`` tokens from the image would
  otherwise rate every image token 0). ``attn_logit_softcapping`` (not used by
  Gemma 3 checkpoints) is refused: the rating would not be the layer's
  attention. Flash attention is not supported by the stock model either
  (it drops the bidirectional image mask).
- **Embeddings**: Gemma scales its input embeddings by ``sqrt(hidden_size)``;
  a placeholder without an image feature is recognised by the scaled row.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from eos_kernels.patching import get_report, patch_model, unpatch_model
from eos_kernels.patching.adapter import VisionLanguageAdapter
from eos_kernels.patching.compat import _drift

__all__ = ["Gemma3Adapter", "get_report", "patch_gemma3", "unpatch_gemma3"]


class Gemma3Adapter(VisionLanguageAdapter):
    """Gemma 3: SigLIP + pooled projector + Gemma 3 text model (q/k norms, sliding-window and global layers)."""

    name = "gemma3"
    classes = (("Gemma3ForConditionalGeneration", "Gemma3Model"),)
    entry = "patch_gemma3"

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        config = self.text_model(model).config
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{self.entry}: the text model attends bidirectionally (use_bidirectional_attention); "
                             "the importance of the visual tokens is their causal attention")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"{self.entry}: attn_logit_softcapping={config.attn_logit_softcapping} is set; the "
                             "importance kernel rates with the plain softmax attention, which would not be the "
                             "layer's")

    def visual_tokens_per_image(self, model: nn.Module) -> int | None:
        n = getattr(model.config, "mm_tokens_per_image", None)
        return int(n) if n else None

    def placeholder_rows(self, model: nn.Module) -> torch.Tensor:
        # the stock model embeds with Gemma's scaled embedding (and maps an out-of-vocabulary image id to 0)
        table = self._base(model).get_input_embeddings()
        vocab = table.weight.shape[0]
        ids = [i if i < vocab else 0 for i in self.placeholder_ids(model)]
        with torch.no_grad():
            return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))

    def query_key(self, layer: nn.Module, q_out: torch.Tensor, k_out: torch.Tensor,
                  position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        # Gemma 3 normalises the heads after the view and transpose: q_norm / k_norm give [B, H, L, head_dim]
        attn = self.attention(layer)
        if position_embeddings is None:
            raise _drift(f"decoder layer {type(layer).__name__} was called without position_embeddings")
        cos, sin = position_embeddings
        length = cos.shape[-2]
        heads = (attn.config.num_attention_heads, attn.config.num_key_value_heads)
        for t, h, name in ((q_out, heads[0], "q_norm"), (k_out, heads[1], "k_norm")):
            if t.dim() != 4 or tuple(t.shape[1:]) != (h, length, attn.head_dim):
                raise _drift(f"{type(attn).__name__}.{name} returned shape {tuple(t.shape)}; expected "
                             f"[B, {h}, {length}, {attn.head_dim}] (heads normalised after the transpose)")
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return rope(q_out, k_out, cos, sin)


_ADAPTER = Gemma3Adapter()


def patch_gemma3(model: nn.Module, theta: Any, *, num_visual_tokens: int | None = None) -> nn.Module:
    """Run the EOS configuration ``theta`` inside this Gemma 3 model instance.

    Args:
        model: a ``transformers.Gemma3ForConditionalGeneration`` (or ``Gemma3Model``).
        theta: a :class:`~eos_kernels.theta.Theta`, a dict in the Theta JSON
            schema, or a path to a Theta JSON file.
        num_visual_tokens: visual tokens per prompt to validate ``theta``
            against at patch time (default: one image, ``config.mm_tokens_per_image``).
            At every prefill each sample follows the schedule for its own
            count; a reducer's count above what a sample holds is clipped to it.

    Returns:
        ``model``, patched in place (see :func:`eos_kernels.patch_llava` for the report and the guarantees).

    Raises:
        ValueError: unsupported model class or configuration, or ``theta`` invalid
            for this model (a layer beyond its layers, a keep above ``num_visual_tokens``).
    """
    return patch_model(model, theta, _ADAPTER, num_visual_tokens=num_visual_tokens)


def unpatch_gemma3(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_gemma3`: the model is the stock instance again (bit-identical outputs)."""
    return unpatch_model(model)
