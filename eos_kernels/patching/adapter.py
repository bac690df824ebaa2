"""What the generic patcher needs to know about one model family: :class:`DecoderAdapter`."""
from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import nn


class DecoderAdapter:
    """What the generic patcher needs to know about one model family.

    The defaults fit Llama-style decoder layers of transformers 5.x (Llama,
    Mistral, Qwen2, ...): ``layer.self_attn`` with ``q_proj``/``k_proj`` (or
    ``q_norm``/``k_norm`` applied after them), ``head_dim``, ``scaling``, and a
    module-level ``apply_rotary_pos_emb(q, k, cos, sin)`` in the attention
    module's own modeling file. A subclass provides the model-specific parts
    marked below; :mod:`eos_kernels.integrations.llava` is the example.
    """

    #: Human-readable family name used in messages.
    name = "decoder"

    # ---- model-specific (override)
    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the problem if ``model`` is not supported."""
        raise NotImplementedError

    def input_module(self, model: nn.Module) -> nn.Module:
        """The module called with ``input_ids`` before the decoder stack runs."""
        raise NotImplementedError

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack: its ``forward`` runs the decoder-layer loop."""
        raise NotImplementedError

    def visual_mask(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """bool [B, L] of visual-token positions, from the input module's call arguments."""
        raise NotImplementedError

    def visual_tokens_per_image(self, model: nn.Module) -> int | None:
        """Visual tokens per image from the config (for patch-time validation), or None."""
        return None

    def placeholder_rows(self, model: nn.Module) -> torch.Tensor:
        """[P, d] input-embedding rows of the visual placeholder token ids.

        A visual position whose embedding still equals one of them when the
        decoder stack starts holds no image feature (a forward without
        ``pixel_values``): it is text and is never reduced."""
        raise NotImplementedError

    # ---- Llama-style defaults
    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        text = self.text_model(model)
        layers = getattr(text, "layers", None)
        if not isinstance(layers, (nn.ModuleList, list, tuple)):
            raise ValueError(f"{type(text).__name__} has no `layers` list of decoder layers")
        n = self.num_layers(model)
        return list(layers)[:n]

    def num_layers(self, model: nn.Module) -> int:
        text = self.text_model(model)
        n = getattr(getattr(text, "config", None), "num_hidden_layers", None)
        return int(n) if n is not None else len(text.layers)

    def text_sizes(self, model: nn.Module) -> tuple[int, int] | None:
        """``(hidden_size, intermediate_size)`` of the decoder layers, for the FLOPs estimate, or None."""
        cfg = getattr(self.text_model(model), "config", None)
        d, ffn = getattr(cfg, "hidden_size", None), getattr(cfg, "intermediate_size", None)
        return (int(d), int(ffn)) if isinstance(d, int) and isinstance(ffn, int) else None

    def attention(self, layer: nn.Module) -> nn.Module:
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise ValueError(f"decoder layer {type(layer).__name__} has no `self_attn`")
        return attn

    def check_layer(self, layer: nn.Module) -> None:
        attn = self.attention(layer)
        for name in ("q_proj", "k_proj"):
            if not isinstance(getattr(attn, name, None), nn.Module):
                raise ValueError(
                    f"attention module {type(attn).__name__} has no `{name}`; this adapter expects "
                    "Llama-style attention (separate q_proj / k_proj)"
                )
        if getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None) is None:
            raise ValueError(
                f"no apply_rotary_pos_emb in {type(attn).__module__}; this adapter expects Llama-style RoPE"
            )

    def qk_modules(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Modules whose outputs are the query / key before RoPE (hooked on reducer layers)."""
        attn = self.attention(layer)
        q = getattr(attn, "q_norm", None)
        k = getattr(attn, "k_norm", None)
        if isinstance(q, nn.Module) and isinstance(k, nn.Module):
            return q, k
        return attn.q_proj, attn.k_proj

    def query_key(self, layer: nn.Module, q_out: torch.Tensor, k_out: torch.Tensor,
                  position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Query [B, Hq, L, dh] and key [B, Hkv, L, dh] after RoPE, as the attention saw them."""
        attn = self.attention(layer)
        head_dim = attn.head_dim
        B, L = q_out.shape[0], q_out.shape[1]
        q = q_out.reshape(B, L, -1, head_dim).transpose(1, 2)
        k = k_out.reshape(B, L, -1, head_dim).transpose(1, 2)
        if position_embeddings is None:
            raise RuntimeError(
                f"decoder layer {type(layer).__name__} was called without position_embeddings; "
                "this adapter expects transformers 5.x Llama-style layers"
            )
        cos, sin = position_embeddings
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return rope(q, k, cos, sin)

    def attention_scale(self, layer: nn.Module) -> float:
        attn = self.attention(layer)
        scale = getattr(attn, "scaling", None)
        return float(scale) if scale is not None else float(attn.head_dim) ** -0.5

    def attn_implementation(self, model: nn.Module) -> str:
        config = getattr(self.text_model(model), "config", None)
        impl = getattr(config, "_attn_implementation", None) or "eager"
        return str(impl)

    def install_hooks(self, model: nn.Module, state) -> list:
        """Family-specific additions to a patch, installed after the generic hooks; default none.

        Returns removable handles (objects with ``remove()``), which :func:`unpatch_model`
        removes with the generic ones (and ``copy.deepcopy`` reinstalls on the copy). ``state``
        is the patch's per-instance state: ``state.ctx`` is the context of the decoder-stack
        forward in progress (None outside one); a family reads its ``mode`` ("prefill" while
        reducing), ``batch``, ``length``, ``cur_idx`` (long [B, L'], the original positions
        of the tokens the layers currently hold, None before the first reduction) and
        ``valid`` (bool [B, L'], False at a ragged reduction's padding slots, or None).
        Qwen3-VL uses it for DeepStack (:mod:`eos_kernels.integrations.qwen3_vl`)."""
        return []




class VisionLanguageAdapter(DecoderAdapter):
    """A Hugging Face vision-language model whose visual tokens are placeholder ids in ``input_ids``.

    The shape of LLaVA, LLaVA-NeXT, LLaVA-OneVision and Qwen2(.5)-VL in
    transformers 5.x: a ``...ForConditionalGeneration`` wrapping a base
    ``...Model`` (the input module: it takes ``input_ids`` and the images)
    whose ``language_model`` is the decoder stack; visual positions are the
    positions of the placeholder token ids named by ``placeholder_attrs`` in
    the config. A family sets the class attributes below and overrides only
    what differs (RoPE, counts).
    """

    #: (generation class, base class) names in ``transformers``, one pair per supported model
    classes: tuple[tuple[str, str], ...] = ()
    #: config attributes holding the visual placeholder token ids (images, videos)
    placeholder_attrs: tuple[str, ...] = ("image_token_id",)
    #: the family's entry point, for messages
    entry = "patch"

    def _classes(self) -> tuple[tuple[type, ...], tuple[type, ...]]:
        import transformers

        gens = tuple(c for c in (getattr(transformers, g, None) for g, _ in self.classes) if c is not None)
        bases = tuple(c for c in (getattr(transformers, b, None) for _, b in self.classes) if c is not None)
        return gens, bases

    def _base(self, model: nn.Module) -> nn.Module:
        gens, _ = self._classes()
        return model.model if isinstance(model, gens) else model

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        ids = [getattr(model.config, a, None) for a in self.placeholder_attrs]
        return [int(i) for i in ids if i is not None]

    def check_model(self, model: nn.Module) -> None:
        gens, bases = self._classes()
        if not isinstance(model, gens + bases):
            names = ", ".join(f"{g} / {b}" for g, b in self.classes)
            raise ValueError(f"{self.entry} supports transformers {names}; "
                             f"got {type(model).__module__}.{type(model).__name__}")
        text = getattr(self._base(model), "language_model", None)
        if not isinstance(getattr(text, "layers", None), nn.ModuleList):
            raise ValueError(f"{self.entry}: the language model {type(text).__name__} has no `layers` "
                             "ModuleList of decoder layers")
        if getattr(model.config, "image_token_id", None) is None:
            raise ValueError(f"{self.entry}: model.config.image_token_id is not set")

    def input_module(self, model: nn.Module) -> nn.Module:
        return self._base(model)

    def text_model(self, model: nn.Module) -> nn.Module:
        return self._base(model).language_model

    def visual_mask(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        # every family's base forward takes `input_ids` first and `inputs_embeds` by keyword
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for i in self.placeholder_ids(model):
                mask |= input_ids == i
            return mask
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        # the placeholder test the models themselves use when only embeddings are given
        rows = self.placeholder_rows(model).to(device=embeds.device, dtype=embeds.dtype)
        return (embeds.unsqueeze(-2) == rows).all(dim=-1).any(dim=-1)

    def placeholder_rows(self, model: nn.Module) -> torch.Tensor:
        table = self._base(model).get_input_embeddings()
        return table.weight[self.placeholder_ids(model)]
