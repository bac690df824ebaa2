"""LLaVA-format data for the search, any supported family: validation, prompts, tokenisation, batches, sampling.

A data file is a JSON list of records::

    {"id": "...",                        # optional
     "image": "relative/path.png",       # required, relative to the image folder
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "..."}, ...]}

Turns alternate human / gpt, starting with a human turn and ending with a gpt
turn; the placeholder ``<image>`` appears exactly once, in a human turn (one
image per sample, LLaVA-1.5). Extra keys are ignored. Every problem is a
``ValueError`` naming the record (index and id) -- raised when the data is
loaded, before any search step.

Prompts
-------
With a chat template (the processor's, else the tokenizer's) the conversation
is rendered with ``apply_chat_template``: user turns as ``[{"type": "image"},
{"type": "text", "text": question}]`` (the image item on the turn that held
``<image>``, the placeholder removed from the text) and assistant turns as
``[{"type": "text", "text": answer}]`` for a processor template, and for a
tokenizer template that writes the model's image placeholder for such an
image item (multimodal templates: Qwen2-VL's, LLaVA-NeXT's); plain strings
(``<image>`` kept in place, as the model's placeholder token) for any other
tokenizer template. Without a template the LLaVA-1.5 format is used::

    USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question 2} ASSISTANT: {answer 2}</s>

i.e. each human turn is ``"USER: {value} ASSISTANT:"`` and each answer
``" {value}" + eos``. Special tokens are added by the tokenizer (BOS) unless the
rendered text already starts with the BOS string (the rule of
``ProcessorMixin.apply_chat_template``).

Labels: the tokens of each gpt turn, found as the tokens of the conversation
rendered up to and including that answer beyond those of the conversation
rendered up to its question with the generation prompt (a template's
end-of-turn tokens belong to the answer; in the LLaVA-1.5 format the eos
does). Every other position is -100. The *prompt length* of a sample -- the
tokens before its first answer token -- limits the text rows that rate the
visual tokens (:func:`eos_kernels.patching.prompt_lengths`), as the prompt
alone rates them in ``generate``.

The image placeholder of the rendered prompt (the token of the model's
``image_token_id``: ``<image>`` for LLaVA and LLaVA-NeXT, ``<|image_pad|>`` for
Qwen2(.5)-VL, which its chat template writes between ``<|vision_start|>`` and
``<|vision_end|>``, ``<IMG_CONTEXT>`` for InternVL; Gemma 3's template writes
``<start_of_image>``) is expanded to the sample's visual tokens in the ids (what
the families' processors do in the text; InternVL's and Gemma 3's wrap them:
``<img> ... </img>``, ``\\n\\n<start_of_image> ... <end_of_image>\\n\\n``). How many:

- a model with a fixed count (LLaVA-1.5: ``num_visual_tokens``) uses it for every image;
- otherwise each image has its own count (LLaVA-NeXT's and LLaVA-OneVision's
  any-resolution tiling, Qwen2(.5)-VL's dynamic resolution), asked of the
  processor itself (the number of placeholders it writes for the image) or,
  without a full processor (Qwen's and OneVision's need torchvision in
  transformers 5.x, for their video half), from the image processor's
  ``image_grid_thw`` and ``merge_size`` (Qwen) or, for OneVision, from its
  ``image_sizes`` and tile size with the checkpoint's config
  (:attr:`TokenizerAndImageProcessor.model_config`), by the count of
  ``LlavaOnevisionProcessor`` itself; for InternVL (whose processor needs
  torchvision too) from the image processor's ``num_patches`` (tiles) and the
  config's ``image_seq_length``. Gemma 3 has a fixed count (``mm_tokens_per_image``).

Images: :meth:`Dataset.collate` runs the image processor on the batch's images
(RGB) and keeps everything it returns: ``pixel_values`` and the family's extra
inputs (``image_sizes``, ``image_grid_thw``, ...) in :attr:`Batch.image_inputs`;
:func:`eos_kernels.search.objective.forward_inputs` passes those the model's
forward takes. Batches are ragged when the samples' counts differ.

:class:`PromptEncoder` renders and expands one conversation at a time exactly
so, or a batch of them (the lmms-eval plugin's prompts).

Processors: :func:`load_processor` loads ``AutoProcessor`` and falls back to
``AutoTokenizer`` + ``AutoImageProcessor`` (:class:`TokenizerAndImageProcessor`)
when the checkpoint has no usable processor; the tokenizer's chat template is
then used.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

import torch

__all__ = ["Example", "Batch", "Dataset", "load_dataset", "BatchSampler", "IMAGE_PLACEHOLDER",
           "TokenizerAndImageProcessor", "load_processor", "PromptEncoder", "image_inputs"]

IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass
class Example:
    """One tokenised conversation (image tokens expanded)."""

    index: int
    id: str
    image: str                 # absolute path
    input_ids: list[int]
    labels: list[int]          # -100 outside the answers
    prompt_length: int         # tokens before the first answer token
    turns: list[tuple[int, int]]  # (start, end) of each answer's tokens
    answers: list[str]         # each gpt turn's text
    num_text_tokens: int       # non-visual tokens
    num_visual_tokens: int = 0  # this sample's visual tokens


def _to(t, device, dtype=None):
    if not torch.is_tensor(t):
        return t
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device)


def _slice_images(pixel_values, image_inputs: dict, batch: int, sl: slice):
    """The image inputs of samples ``sl`` (one image per sample).

    Tensors with one row per sample are sliced; Qwen-style flat patches
    (``pixel_values`` [sum of patches, D] with ``image_grid_thw``) by each
    image's ``t * h * w`` rows, InternVL's tiles by each image's ``num_patches``."""
    grid = image_inputs.get("image_grid_thw")
    tiles = image_inputs.get("num_patches")  # InternVL: each image's tiles, one row each
    crops = image_inputs.get("num_crops")    # Gemma 3's pan and scan: each image and its crops, one row each
    rows = None
    if grid is not None and torch.is_tensor(grid):
        rows = grid.prod(dim=-1).tolist()
    elif torch.is_tensor(tiles) and tiles.dim() == 1 and tiles.shape[0] == batch:
        rows = tiles.tolist()
    elif torch.is_tensor(crops) and crops.dim() == 1 and crops.shape[0] == batch and pixel_values.shape[0] != batch:
        rows = (crops + 1).tolist()
    if rows is not None:
        start = sum(rows[:sl.start])
        px = pixel_values[start:start + sum(rows[sl])]
    else:
        px = pixel_values[sl]
    extra = {k: (v[sl] if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v)
             for k, v in image_inputs.items()}
    return px, extra


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor        # long [B, L]
    attention_mask: torch.Tensor   # long [B, L]
    labels: torch.Tensor           # long [B, L], -100 outside answers
    pixel_values: torch.Tensor     # the image processor's: [B, 3, H, W] (LLaVA), [B, tiles, 3, H, W] (NeXT), [patches, D] (Qwen)
    prompt_lengths: torch.Tensor   # long [B] (in padded coordinates)
    indices: list[int]
    #: the image processor's other outputs (``image_sizes``, ``image_grid_thw``, ...)
    image_inputs: dict = dataclasses.field(default_factory=dict)

    def to(self, device, pixel_dtype=None) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     _to(self.pixel_values, device, pixel_dtype), self.prompt_lengths.to(device), self.indices,
                     {k: _to(v, device, pixel_dtype) for k, v in self.image_inputs.items()})

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def split(self, size: int) -> list["Batch"]:
        """Micro-batches of at most ``size`` samples (each trimmed of common right padding)."""
        out = []
        for s in range(0, len(self), size):
            sl = slice(s, s + size)
            mask = self.attention_mask[sl]
            length = int(mask.sum(dim=1).max()) if mask.numel() else 0
            px, extra = _slice_images(self.pixel_values, self.image_inputs, len(self), sl)
            out.append(Batch(self.input_ids[sl, :length], mask[:, :length], self.labels[sl, :length],
                             px, self.prompt_lengths[sl], self.indices[sl], extra))
        return out


class TokenizerAndImageProcessor:
    """A tokenizer and an image processor standing in for a checkpoint's processor.

    For checkpoints whose ``AutoProcessor`` cannot be built here (Qwen2(.5)-VL's
    and LLaVA-OneVision's processors need torchvision in transformers 5.x for
    their video half): prompts are rendered with the tokenizer's chat template
    and the image placeholder is expanded by :func:`load_dataset` (counts from
    ``image_grid_thw``; for OneVision from ``image_sizes`` and ``model_config``,
    the checkpoint's config, which :func:`load_processor` sets)."""

    chat_template = None

    def __init__(self, tokenizer, image_processor, model_config=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config

    def __repr__(self):
        return (f"TokenizerAndImageProcessor({type(self.tokenizer).__name__}, "
                f"{type(self.image_processor).__name__})")


def load_image_processor(path: str):
    """The image processor of the checkpoint ``path``, also where ``AutoImageProcessor`` cannot be used.

    transformers 5.4-5.17 mark ``AutoImageProcessor`` itself as needing
    torchvision (a placeholder that raises ImportError), although the saved
    processor class may have a PIL implementation: then the class named in
    ``preprocessor_config.json`` (or in the ``image_processor`` entry of
    ``processor_config.json``, where a whole processor was saved) is loaded
    directly, its ``...Pil`` variant first, ``Fast`` dropped. Raises the
    ImportError when there is none.
    """
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(path)
    except ImportError:
        name = ""
        for file, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            config = os.path.join(path, file)
            if not name and os.path.isfile(config):
                with open(config, encoding="utf-8") as f:
                    entry = json.load(f)
                entry = entry.get(key) if key and isinstance(entry, dict) else entry
                name = (entry.get("image_processor_type") if isinstance(entry, dict) else None) or ""
        name = name[:-len("Fast")] if name.endswith("Fast") else name
        for candidate in (name + "Pil", name):
            cls = getattr(transformers, candidate, None) if name else None
            if isinstance(cls, type) and not hasattr(cls, "_backends"):  # not a dummy placeholder
                return cls.from_pretrained(path)
        raise


#: what a checkpoint folder holds for a tokenizer / an image processor (``*`` a glob), any one suffices
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                    "vocab.txt", "*.tiktoken")
_IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _missing_processor_files(path: str) -> list[str]:
    """For a folder, what it lacks: "no tokenizer files (looked for ...)" and the like; [] for anything else."""
    if not os.path.isdir(path):
        return []
    missing = []
    for what, names in (("tokenizer", _TOKENIZER_FILES), ("image-processor", _IMAGE_PROCESSOR_FILES)):
        if not any(glob.glob(os.path.join(glob.escape(path), name)) for name in names):
            missing.append(f"no {what} files (looked for {', '.join(names)})")
    return missing


def load_processor(path: str):
    """The processor of the checkpoint ``path``: ``AutoProcessor``, else tokenizer + image processor.

    Raises:
        ValueError: neither loads: the message says which files a checkpoint
            folder lacks (no tokenizer or no image-processor files, e.g. one
            that holds only ``config.json`` and the weights), else gives both
            loaders' reasons.
    """
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(path)
        if getattr(processor, "image_processor", None) is not None:
            return processor
        first = f"AutoProcessor gave a {type(processor).__name__} without an image processor"
    except (OSError, ValueError, TypeError, ImportError, KeyError, AttributeError) as exc:
        first = f"AutoProcessor: {type(exc).__name__}: {exc}"
    try:
        fallback = TokenizerAndImageProcessor(AutoTokenizer.from_pretrained(path), load_image_processor(path))
    except (OSError, ValueError, TypeError, ImportError, KeyError, AttributeError) as exc:
        missing = _missing_processor_files(path)
        if missing:  # the loaders' own messages then blame a missing sentencepiece or tiktoken
            raise ValueError(f"cannot load a processor from {path}: the folder holds {' and '.join(missing)}; "
                             "copy the tokenizer and processor files of the checkpoint it comes from "
                             "(its processor's save_pretrained writes them)") from None
        raise ValueError(f"cannot load a processor from {path}: {first}; the fallback AutoTokenizer + "
                         f"AutoImageProcessor failed too: {type(exc).__name__}: {exc}") from None
    try:  # what the image counts of any-resolution models (OneVision) need besides the image processor
        from transformers import AutoConfig

        fallback.model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, ImportError, KeyError, AttributeError):
        pass
    return fallback


def _where(i: int, rec: Any) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"data[{i}]" + (f" (id {rid!r})" if rid is not None else "")


def _check_record(i: int, rec: Any) -> tuple[str, list[tuple[str, str]]]:
    where = _where(i, rec)
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: malformed record: expected an object, got {type(rec).__name__}")
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: malformed record: needs an \"image\" path (a non-empty string); "
                         "text-only samples are not supported by the search (one image per sample)")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: malformed conversation: \"conversations\" must be a non-empty list")
    turns = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or \
                not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: malformed conversation: turn {t} must be an object with string "
                             "\"from\" and \"value\"")
        want = "human" if t % 2 == 0 else "gpt"
        if turn["from"] != want:
            raise ValueError(f"{where}: malformed conversation: turn {t} is from {turn['from']!r}, expected "
                             f"{want!r} (turns alternate human/gpt, starting with human)")
        turns.append((turn["from"], turn["value"]))
    if len(turns) % 2:
        raise ValueError(f"{where}: malformed conversation: it ends with a human turn (no answer to learn)")
    for t, (who, value) in enumerate(turns):
        if who == "gpt":
            if IMAGE_PLACEHOLDER in value:
                raise ValueError(f"{where}: malformed conversation: turn {t} (gpt) contains {IMAGE_PLACEHOLDER}")
            if not value.strip():
                raise ValueError(f"{where}: malformed conversation: turn {t} (gpt) has an empty answer")
    n_img = sum(v.count(IMAGE_PLACEHOLDER) for w, v in turns if w == "human")
    if n_img != 1:
        raise ValueError(f"{where}: malformed conversation: expected exactly one {IMAGE_PLACEHOLDER} in the "
                         f"human turns, found {n_img}")
    return image, turns


def _backend_encoder(tok):
    """The tokenizers-library tokenizer whose ``encode(text, add_special_tokens=s).ids`` is what
    ``tok(text, add_special_tokens=s)["input_ids"]`` returns, or None. That holds for a transformers 5
    ``TokenizersBackend`` whose class keeps the base ``__call__``, ``_get_padding_truncation_strategies``,
    ``_encode_plus`` and ``set_truncation_and_padding`` (no input/target modes): the call checks the text,
    clears the backend's padding and truncation, sets its ``encode_special_tokens`` to ``split_special_tokens``
    and takes ``encode_batch([text])[0].ids``, the same encoding as ``encode`` (:func:`_backend_ready` checks the
    settings at each use). Any other tokenizer (a slow one, a class of its own, transformers 4): None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase as Base
        from transformers.tokenization_utils_tokenizers import TokenizersBackend as Fast
    except ImportError:
        return None
    cls = type(tok)
    if not isinstance(tok, Fast) or hasattr(tok, "_switch_to_input_mode") or hasattr(tok, "_switch_to_target_mode"):
        return None
    for name, owner in (("__call__", Base), ("_get_padding_truncation_strategies", Base), ("_encode_plus", Fast),
                        ("set_truncation_and_padding", Fast)):
        if getattr(cls, name, None) is not getattr(owner, name, object()):
            return None
    backend = getattr(tok, "backend_tokenizer", None)
    return backend if callable(getattr(backend, "encode", None)) else None


def _backend_ready(tok, backend) -> bool:
    """Whether the backend is as ``tok``'s call would leave it: no padding, no truncation, special tokens split
    as ``tok.split_special_tokens`` says (else :meth:`_Renderer.ids_many` calls ``tok``, which sets them)."""
    return backend.padding is None and backend.truncation is None and \
        backend.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False)) and \
        not getattr(tok, "_in_target_context_manager", False)


class _Renderer:
    """Conversation prefixes as token ids, through a chat template or the LLaVA-1.5 format."""

    def __init__(self, processor, placeholder: str = IMAGE_PLACEHOLDER):
        tok = getattr(processor, "tokenizer", processor)
        self.processor = processor
        self.tokenizer = tok
        self.placeholder = placeholder  # the model's image token as text
        self.structured = False  # content lists ({"type": "image"} items) rather than strings
        if getattr(processor, "chat_template", None) and processor is not tok:
            self.mode = "processor"
            self.structured = True
        elif getattr(tok, "chat_template", None):
            self.mode = "tokenizer"
            # multimodal tokenizer templates (Qwen's, LLaVA-NeXT's) take content lists and write the
            # placeholder for an image item; a text-only template gets strings with the placeholder
            try:
                probe = tok.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                    tokenize=False, add_generation_prompt=True)
                self.structured = isinstance(probe, str) and placeholder in probe
            except Exception:  # noqa: BLE001 - any template error: strings then
                self.structured = False
        else:
            self.mode = "llava15"
        if tok.eos_token is None and self.mode == "llava15":
            raise ValueError("the tokenizer has no eos_token (needed by the LLaVA-1.5 prompt format)")
        self._backend = _backend_encoder(tok)  # ids_many's direct path (None: the transformers call)
        self._backend_checked = False

    def _messages(self, turns):
        msgs = []
        for who, value in turns:
            if who == "human":
                if self.structured:
                    content = []
                    if IMAGE_PLACEHOLDER in value:  # one image item per placeholder (eos-search: exactly one)
                        content.extend({"type": "image"} for _ in range(value.count(IMAGE_PLACEHOLDER)))
                        value = value.replace(IMAGE_PLACEHOLDER + "\n", "").replace(
                            "\n" + IMAGE_PLACEHOLDER, "").replace(IMAGE_PLACEHOLDER, "").strip()
                    content.append({"type": "text", "text": value})
                    msgs.append({"role": "user", "content": content})
                else:
                    msgs.append({"role": "user", "content": value.replace(IMAGE_PLACEHOLDER, self.placeholder)})
            else:
                if self.structured:
                    msgs.append({"role": "assistant", "content": [{"type": "text", "text": value}]})
                else:
                    msgs.append({"role": "assistant", "content": value})
        return msgs

    def text(self, turns, generation_prompt: bool) -> str:
        """The conversation ``turns`` rendered; ``generation_prompt`` after a final human turn."""
        if self.mode == "llava15":
            parts = []
            for who, value in turns:
                if who == "human":
                    value = value.replace(IMAGE_PLACEHOLDER, self.placeholder)
                    parts.append(f"USER: {value} ASSISTANT:")
                else:
                    parts.append(f" {value}{self.tokenizer.eos_token}")
            return "".join(parts)
        owner = self.processor if self.mode == "processor" else self.tokenizer
        out = owner.apply_chat_template(self._messages(turns), tokenize=False,
                                        add_generation_prompt=generation_prompt)
        if isinstance(out, list):
            out = out[0]
        return out

    def ids(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        special = not (bos is not None and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def ids_many(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`ids` of each text (the same ids), for callers with several texts at once (the lmms-eval plugin's
        batches): through the tokenizers-library tokenizer itself where the transformers tokenizer is a plain
        ``TokenizersBackend`` (:func:`_backend_encoder`: its call is that tokenizer's ``encode`` of the text
        once the settings :func:`_backend_ready` looks at are as the call leaves them), else one :meth:`ids`
        each. The direct path skips transformers' Python layers and the hand-off to the tokenizers library's
        thread pool that each of its ``encode_batch`` calls makes (measured in the plugin's loop on the loaded
        2-core machine: ~0.15 ms of wall time a prompt, against ~0.26 ms for one transformers call each and
        ~0.38 ms for one call of the batch's texts, whose pool hand-off waits longer); its first use is checked
        against the transformers call, text by text, and a difference turns it off for good. It gives no
        "longer than model_max_length" warning (transformers logs one without truncating)."""
        if self._backend is None or not _backend_ready(self.tokenizer, self._backend):
            return [self.ids(t) for t in texts]
        bos = self.tokenizer.bos_token
        encode = self._backend.encode
        fast = [encode(t, add_special_tokens=not (bos is not None and t.startswith(bos))).ids for t in texts]
        if not self._backend_checked:
            slow = [self.ids(t) for t in texts]
            self._backend_checked = True
            if fast != slow:
                self._backend = None
                return slow
        return fast


def _open_rgb(path: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def image_inputs(processor, images: Sequence) -> dict:
    """The image processor's outputs for ``images`` (PIL images, converted to RGB) as a dict of tensors:
    ``pixel_values`` and the family's extras (``image_sizes``, ``image_grid_thw``, ...). An RGB image is passed
    as it is (``convert("RGB")`` would give its copy: same pixels, same ``info``)."""
    out = _image_processor(processor)([im if im.mode == "RGB" else im.convert("RGB") for im in images],
                                      return_tensors="pt")
    return {k: v for k, v in dict(out).items() if torch.is_tensor(v)}


def _image_processor(processor):
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        if callable(processor) and not hasattr(processor, "tokenizer") and hasattr(processor, "preprocess"):
            return processor
        raise ValueError(f"the processor {type(processor).__name__} has no image processor")
    return ip


class Dataset:
    """Tokenised, validated examples and the pixels of their images.

    ``num_visual_tokens`` is the model's fixed count per image, or None when
    each image has its own (:attr:`visual_counts`, :attr:`mean_visual_tokens`)."""

    def __init__(self, examples: list[Example], processor, num_visual_tokens: int | None, image_token_id: int,
                 pad_token_id: int, path: str):
        self.examples = examples
        self.processor = processor
        self.num_visual_tokens = num_visual_tokens
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.path = path

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def visual_counts(self) -> list[int]:
        """Visual tokens of each example."""
        return [e.num_visual_tokens for e in self.examples]

    @property
    def mean_visual_tokens(self) -> float:
        counts = self.visual_counts
        return sum(counts) / len(counts) if counts else 0.0

    def image_inputs(self, paths: Sequence[str]) -> dict:
        """The image processor's outputs for ``paths`` (RGB), one image per sample: a dict of tensors
        (``pixel_values`` and the family's extras: ``image_sizes``, ``image_grid_thw``, ...)."""
        return image_inputs(self.processor, [_open_rgb(p) for p in paths])

    def pixels(self, paths: Sequence[str]) -> torch.Tensor:
        return self.image_inputs(paths)["pixel_values"]

    def _images(self, paths):
        inputs = self.image_inputs(paths)
        return inputs.pop("pixel_values"), inputs

    def collate(self, indices: Sequence[int]) -> Batch:
        """Right-padded training batch of ``indices``."""
        exs = [self.examples[i] for i in indices]
        L = max(len(e.input_ids) for e in exs)
        B = len(exs)
        ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, e in enumerate(exs):
            n = len(e.input_ids)
            ids[b, :n] = torch.tensor(e.input_ids)
            mask[b, :n] = 1
            labels[b, :n] = torch.tensor(e.labels)
        prompt = torch.tensor([e.prompt_length for e in exs], dtype=torch.long)
        px, extra = self._images([e.image for e in exs])
        return Batch(ids, mask, labels, px, prompt, list(indices), extra)

    def prompt_batch(self, items: Sequence[tuple[int, int]], *, with_image_inputs: bool = False):
        """Left-padded generation prompts for ``(example index, turn)`` pairs: ids, mask, pixels
        (and, with ``with_image_inputs``, the dict of the other image inputs)."""
        prompts = [self.examples[i].input_ids[:self.examples[i].turns[t][0]] for i, t in items]
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), L), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p)
            mask[b, L - len(p):] = 1
        px, extra = self._images([self.examples[i].image for i, _ in items])
        return (ids, mask, px, extra) if with_image_inputs else (ids, mask, px)


def _onevision_count(config, image_processor, out) -> int:
    """LLaVA-OneVision's image tokens for one image (``out``: the image processor's outputs for it), counted
    as ``LlavaOnevisionProcessor`` counts the placeholders it writes (base tile + unpadded, ``anyres_max``
    capped grid + one newline per row), from the model's config instead of the processor's, which cannot be
    built without torchvision in transformers 5.x (its video processor)."""
    import transformers
    from transformers import LlavaOnevisionProcessor as P

    if not all(callable(getattr(P, name, None)) for name in ("_get_number_of_features", "_get_unpadded_features")):
        # private methods of transformers (5.0-5.24): fail loudly where they moved, never guess a count
        raise ValueError(f"transformers {transformers.__version__}: LlavaOnevisionProcessor no longer has the "
                         "feature-count methods eos_kernels counts OneVision images with (tested 5.0.0-5.24.0); "
                         "install torchvision so that the checkpoint's full processor can be loaded")

    class Count:  # the processor's own count, on the attributes it reads
        _get_number_of_features = P._get_number_of_features
        _get_unpadded_features = P._get_unpadded_features

    count = Count()
    count.image_processor = image_processor
    vision = config.vision_config
    # a base tile gives patches² features (the model reshapes them to a square grid); the processor's
    # num_image_tokens counts the vision tower's sequence, one more (CLS) where "default" then drops it
    default = getattr(config, "vision_feature_select_strategy", None) == "default"
    count.num_image_tokens = (int(vision.image_size) // int(vision.patch_size)) ** 2 + int(default)
    count.vision_aspect_ratio = getattr(config, "vision_aspect_ratio", None) or "anyres_max_9"
    height, width = (int(x) for x in out["image_sizes"][0])
    tile_h, tile_w = (int(x) for x in out["pixel_values"].shape[-2:])
    n = count._get_number_of_features(height, width, tile_h, tile_w)
    if default:
        n -= 1  # as LlavaOnevisionProcessor.replace_image_token
    return int(n)


def _text_placeholder(processor, tokenizer, image_token_id: int) -> str:
    """The token a rendered prompt holds for an image, which the image's own tokens replace: the model's
    image token, except where the processor expands another one (Gemma 3: ``<start_of_image>``, which its
    chat template writes and its processor turns into ``\\n\\n<start_of_image> <image_soft_token> * 256
    <end_of_image>\\n\\n``)."""
    boi = getattr(processor, "boi_token", None)
    if isinstance(boi, str) and hasattr(processor, "full_image_sequence"):
        return boi
    config = getattr(processor, "model_config", None)
    if getattr(config, "model_type", None) == "gemma3" and isinstance(getattr(tokenizer, "boi_token", None), str):
        return tokenizer.boi_token
    return tokenizer.convert_ids_to_tokens(int(image_token_id))


class _VisualCounter:
    """The tokens an image becomes in the ids, ``(count, ids)`` (see the module docstring)."""

    def __init__(self, processor, tokenizer, image_token_id: int, placeholder: str, fixed: int | None):
        self.processor = processor
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.placeholder = placeholder
        self.fixed = fixed
        # a full multimodal processor expands the placeholder itself: ask it (also for a fixed count, when the
        # placeholder is not the image token: Gemma 3 wraps the image tokens)
        image_text = tokenizer.convert_ids_to_tokens(int(image_token_id))
        self.ask_processor = ((fixed is None or placeholder != image_text) and processor is not tokenizer
                              and not isinstance(processor, TokenizerAndImageProcessor)
                              and getattr(processor, "image_processor", None) is not None
                              and getattr(processor, "tokenizer", None) is not None)
        # a fixed count written as the image token itself (LLaVA-1.5): every image the same ids, no image read
        self._fixed_block = [image_token_id] * fixed if fixed is not None and not self.ask_processor and \
            placeholder == image_text else None

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, path, where: str) -> tuple[int, list[int]]:
        """``(count, ids)`` of the image at ``path`` (a file, or an image already open: a PIL image)."""
        if self._fixed_block is not None:  # decided once (it was decided again at each image)
            return self.fixed, list(self._fixed_block)
        image = _open_rgb(path) if isinstance(path, (str, os.PathLike)) else path.convert("RGB")
        config = getattr(self.processor, "model_config", None)
        if self.ask_processor:
            out = self.processor(text=[self.placeholder], images=[image], return_tensors="pt",
                                 add_special_tokens=False)
            block = out["input_ids"][0].tolist()
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is not None and block and block[0] == bos and bos != self.image_token_id:
                block = block[1:]  # a processor that adds special tokens anyway
            n = block.count(self.image_token_id)
        else:
            ip = _image_processor(self.processor)
            out = ip([image], return_tensors="pt")
            grid = out.get("image_grid_thw")
            merge = getattr(ip, "merge_size", None)
            kind = getattr(config, "model_type", None)
            if grid is not None and merge:
                n = int(grid[0].prod()) // int(merge) ** 2
                block = [self.image_token_id] * n
            elif kind == "llava_onevision" and out.get("image_sizes") is not None:
                n = _onevision_count(config, ip, out)
                block = [self.image_token_id] * n
            elif kind == "internvl" and out.get("num_patches") is not None:
                # as InternVLProcessor writes it: <img> <IMG_CONTEXT> * (tiles * image_seq_length) </img>
                n = int(out["num_patches"][0]) * int(config.image_seq_length)
                tok = self.tokenizer
                start = getattr(tok, "start_image_token", None) or "<img>"
                end = getattr(tok, "end_image_token", None) or "</img>"
                block = self._ids(start) + [self.image_token_id] * n + self._ids(end)
            elif kind == "gemma3" and self.fixed is not None:
                # as Gemma3Processor writes it: \n\n<start_of_image> <image_soft_token> * n <end_of_image>\n\n
                tok = self.tokenizer
                n = self.fixed
                block = (self._ids("\n\n" + self.placeholder) + [self.image_token_id] * n
                         + self._ids(str(getattr(tok, "eoi_token", "<end_of_image>")) + "\n\n"))
            else:
                raise ValueError(
                    f"{where}: cannot tell how many visual tokens the image becomes: the model has no fixed "
                    f"count, {type(self.processor).__name__} does not expand the image placeholder, and the "
                    "image processor gives no image_grid_thw / merge_size (LLaVA-OneVision: no model_config to count "
                    "with); load the checkpoint's full processor")
        if n < 1:
            raise ValueError(f"{where}: the image {_name(path)} gives no visual token")
        if self.fixed is not None and n != self.fixed:
            raise ValueError(f"{where}: the processor writes {n} image tokens for {_name(path)}, the model takes "
                             f"{self.fixed} per image")
        return n, block


def _name(path) -> str:
    return str(path) if isinstance(path, (str, os.PathLike)) else "(an image in memory)"


def _tokens(processor, image_token_id: int, pad_token_id: int | None):
    """``(tokenizer, placeholder string, placeholder id, pad id)`` of ``processor``: the placeholder is
    the token a rendered prompt holds for an image (:func:`_text_placeholder`). ValueError where the
    tokenizer has no token of its own for ``image_token_id`` or the placeholder, or nothing to pad with."""
    tok = getattr(processor, "tokenizer", processor)
    image_text = tok.convert_ids_to_tokens(int(image_token_id))
    if not isinstance(image_text, str) or \
            list(tok(image_text, add_special_tokens=False)["input_ids"]) != [image_token_id]:
        raise ValueError(f"the tokenizer has no token of its own for the model's image token id {image_token_id} "
                         f"(it maps {image_text!r} to "
                         f"{list(tok(str(image_text), add_special_tokens=False)['input_ids'])})")
    placeholder = _text_placeholder(processor, tok, image_token_id)
    placeholder_ids = list(tok(placeholder, add_special_tokens=False)["input_ids"])
    if len(placeholder_ids) != 1:
        raise ValueError(f"the tokenizer has no token of its own for the image placeholder {placeholder!r}")
    if pad_token_id is None:
        pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return tok, placeholder, placeholder_ids[0], pad_token_id


def load_dataset(path: str, processor, *, num_visual_tokens: int | None, image_token_id: int,
                 image_folder: str | None = None, pad_token_id: int | None = None,
                 limit: int | None = None, check_image_size: int | None = None) -> Dataset:
    """Read, validate and tokenise a LLaVA-format JSON file (see the module docstring).

    Args:
        path: the JSON file.
        processor: the checkpoint's processor (or a :class:`TokenizerAndImageProcessor`).
        num_visual_tokens: N, visual tokens per image when the model has a fixed count
            (LLaVA-1.5); None: each image its own count (LLaVA-NeXT, Qwen2(.5)-VL).
        image_token_id: the model's image placeholder id (``model.config.image_token_id``).
        image_folder: folder of the image paths; default: the JSON file's folder.
        pad_token_id: padding id (default: the tokenizer's pad, else its eos).
        limit: keep the first ``limit`` records.
        check_image_size: if given, the first image is processed and its pixel
            size checked against it (the vision tower's ``image_size``).

    Raises:
        ValueError: a missing file or image, a file that is not UTF-8 JSON,
            malformed records, a tokenizer that has no single token for
            ``image_token_id``, ... (each naming the file or the record)
    """
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data file {path}: invalid JSON: {exc}") from None
        except UnicodeDecodeError as exc:  # its own message names no file
            raise ValueError(f"data file {path} is not UTF-8 JSON: byte 0x{exc.object[exc.start]:02x} at offset "
                             f"{exc.start} cannot be decoded ({exc.reason}); save the file as UTF-8") from None
    if not isinstance(records, list):
        raise ValueError(f"data file {path}: expected a JSON list of records, got {type(records).__name__}")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"data file {path} holds no records")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"image folder not found: {folder}")
    tok, placeholder, placeholder_id, pad_token_id = _tokens(processor, image_token_id, pad_token_id)
    renderer = _Renderer(processor, placeholder)

    parsed = [_check_record(i, rec) for i, rec in enumerate(records)]
    missing = []
    for i, (image, _) in enumerate(parsed):
        full = os.path.join(folder, image)
        if not os.path.isfile(full):
            missing.append(f"{_where(i, records[i])}: {full}")
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"image file(s) not found ({len(missing)} of {len(parsed)}): "
                         + "; ".join(missing[:5]) + more)

    counter = _VisualCounter(processor, tok, image_token_id, placeholder, num_visual_tokens)
    examples = []
    for i, (image, turns) in enumerate(parsed):
        where = _where(i, records[i])
        full_ids = renderer.ids(renderer.text(turns, False))
        spans = []
        for t in range(1, len(turns), 2):
            before = renderer.ids(renderer.text(turns[:t], True))
            upto = renderer.ids(renderer.text(turns[:t + 1], False))
            if upto[:len(before)] != before or full_ids[:len(upto)] != upto or len(upto) <= len(before):
                raise ValueError(
                    f"{where}: cannot locate the tokens of answer {t // 2} (the tokenisation of the prompt "
                    "is not a prefix of the tokenisation of prompt + answer); check the chat template")
            spans.append((len(before), len(upto)))
        pos = [p for p, x in enumerate(full_ids) if x == placeholder_id]
        if len(pos) != 1:
            raise ValueError(f"{where}: malformed conversation: the rendered prompt holds {len(pos)} image "
                             f"placeholders ({placeholder}), expected 1")
        at = pos[0]
        if any(s <= at for s, _ in spans):
            raise ValueError(f"{where}: malformed conversation: {IMAGE_PLACEHOLDER} must come before the "
                             "first answer")
        full_image = os.path.join(folder, image)
        n, block = counter(full_image, where)
        ids = full_ids[:at] + block + full_ids[at + 1:]
        shift = len(block) - 1
        spans = [(s + shift, e + shift) for s, e in spans]
        labels = [-100] * len(ids)
        for s, e in spans:
            labels[s:e] = ids[s:e]
        answers = [v for w, v in turns if w == "gpt"]
        rid = records[i].get("id")
        examples.append(Example(index=i, id=str(rid) if rid is not None else str(i),
                                image=full_image, input_ids=ids, labels=labels,
                                prompt_length=spans[0][0], turns=spans, answers=answers,
                                num_text_tokens=len(ids) - n, num_visual_tokens=n))
    ds = Dataset(examples, processor, num_visual_tokens, image_token_id, pad_token_id, path)
    if check_image_size is not None:
        px = ds.pixels([examples[0].image])
        if tuple(px.shape[-2:]) != (check_image_size, check_image_size):
            raise ValueError(f"the processor gives {tuple(px.shape[-2:])} pixels per image, but the model's "
                             f"vision tower expects {check_image_size}x{check_image_size}")
    return ds


class PromptEncoder:
    """Prompts (and answers) of one conversation at a time, rendered and expanded as :func:`load_dataset` does.

    For callers that receive conversations one by one instead of a LLaVA-format
    file (the lmms-eval plugin, :mod:`eos_kernels.integrations.lmms_eval`): the
    same renderer (the processor's chat template, else the tokenizer's, else
    LLaVA-1.5's format), the same image placeholder and the same visual counts
    as :func:`load_dataset`, so :meth:`prompt` gives the ids ``eos-search
    --eval`` generates from for the same record. A conversation is
    ``[(who, value), ...]``, ``who`` alternating ``"human"`` / ``"gpt"`` from a
    human turn, with ``<image>`` in the human turns where each image goes (one
    per image, in the order of ``images``; eos-search's records hold exactly
    one). Several images are expanded each to its own count and reduced as one
    visual set by the patched model.

    Args:
        processor: the checkpoint's processor (or a :class:`TokenizerAndImageProcessor`).
        image_token_id: the model's image placeholder id (``model.config.image_token_id``).
        num_visual_tokens: the model's fixed count per image (LLaVA-1.5), or None (each image its own).
        pad_token_id: padding id (default: the tokenizer's pad, else its eos).
    """

    def __init__(self, processor, *, image_token_id: int, num_visual_tokens: int | None = None,
                 pad_token_id: int | None = None):
        tok, placeholder, placeholder_id, pad = _tokens(processor, image_token_id, pad_token_id)
        self.processor = processor
        self.tokenizer = tok
        self.image_token_id = int(image_token_id)
        self.placeholder_id = placeholder_id
        self.pad_token_id = pad
        self.num_visual_tokens = num_visual_tokens
        self._renderer = _Renderer(processor, placeholder)
        self._counter = _VisualCounter(processor, tok, image_token_id, placeholder, num_visual_tokens)

    def counts(self, images: Sequence, where: str = "prompt") -> list[int]:
        """Visual tokens of each image (PIL images or paths)."""
        return [self._counter(im, where)[0] for im in images]

    def image_inputs(self, images: Sequence) -> dict:
        """:func:`image_inputs` of this processor."""
        return image_inputs(self.processor, images)

    @staticmethod
    def _check(turns, images, where: str, last: str) -> list[tuple[str, str]]:
        turns = [(str(w), v) for w, v in turns]
        if not turns:
            raise ValueError(f"{where}: empty conversation")
        for t, (who, value) in enumerate(turns):
            want = "human" if t % 2 == 0 else "gpt"
            if who != want or not isinstance(value, str):
                raise ValueError(f"{where}: turn {t} must be a {want!r} turn with a string value, got "
                                 f"({who!r}, {type(value).__name__})")
            if who == "gpt" and IMAGE_PLACEHOLDER in value:
                raise ValueError(f"{where}: turn {t} (gpt) contains {IMAGE_PLACEHOLDER}")
        if turns[-1][0] != last:
            raise ValueError(f"{where}: the conversation must end with a {last!r} turn")
        n = sum(v.count(IMAGE_PLACEHOLDER) for w, v in turns if w == "human")
        if n != len(images):
            raise ValueError(f"{where}: {n} {IMAGE_PLACEHOLDER} placeholder(s) in the human turns for "
                             f"{len(images)} image(s)")
        return turns

    def _expand(self, ids: list[int], images: Sequence, where: str) -> list[int]:
        # each placeholder replaced by its image's ids (the image tokens, and the block around them where the
        # family writes one), as load_dataset does
        pos = [p for p, x in enumerate(ids) if x == self.placeholder_id]
        if len(pos) != len(images):
            raise ValueError(f"{where}: the rendered prompt holds {len(pos)} image placeholders for "
                             f"{len(images)} image(s)")
        out, start = [], 0
        for p, image in zip(pos, images):
            out += ids[start:p] + self._counter(image, where)[1]
            start = p + 1
        return out + ids[start:]

    def prompt(self, turns, images: Sequence = (), where: str = "prompt") -> list[int]:
        """Token ids of ``turns`` (ending with a human turn) and the generation prompt, each image's
        placeholder expanded to its visual tokens."""
        turns = self._check(turns, images, where, last="human")
        ids = self._renderer.ids(self._renderer.text(turns, True))
        return self._expand(ids, images, where)

    def prompts(self, conversations: Sequence, wheres: Sequence[str] | None = None) -> list[list[int]]:
        """:meth:`prompt` of each ``(turns, images)`` of ``conversations`` (``wheres``: each one's name in
        errors), the rendered texts tokenised together (:meth:`_Renderer.ids_many`): the same ids as one
        :meth:`prompt` each."""
        wheres = ["prompt"] * len(conversations) if wheres is None else list(wheres)
        checked = [self._check(turns, images, where, last="human")
                   for (turns, images), where in zip(conversations, wheres)]
        ids = self._renderer.ids_many([self._renderer.text(turns, True) for turns in checked])
        return [self._expand(i, images, where) for i, (_, images), where in zip(ids, conversations, wheres)]

    def answer(self, turns, images: Sequence = (), where: str = "prompt") -> tuple[list[int], list[int]]:
        """``(prompt ids, answer ids)`` of ``turns`` ending with a gpt turn: the prompt as :meth:`prompt`
        gives it for the turns before the answer, and the answer's tokens as :func:`load_dataset` labels
        them (a template's end-of-turn tokens, LLaVA-1.5's eos, belong to the answer)."""
        turns = self._check(turns, images, where, last="gpt")
        before = self._renderer.ids(self._renderer.text(turns[:-1], True))
        upto = self._renderer.ids(self._renderer.text(turns, False))
        return self._split_answer(before, upto, images, where)

    def answers(self, conversations: Sequence,
                wheres: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
        """:meth:`answer` of each ``(turns, images)`` of ``conversations``, the texts tokenised together
        (:meth:`_Renderer.ids_many`): the same ids as one :meth:`answer` each."""
        wheres = ["prompt"] * len(conversations) if wheres is None else list(wheres)
        checked = [self._check(turns, images, where, last="gpt")
                   for (turns, images), where in zip(conversations, wheres)]
        texts = [self._renderer.text(turns[:-1], True) for turns in checked] + \
            [self._renderer.text(turns, False) for turns in checked]
        ids = self._renderer.ids_many(texts)
        return [self._split_answer(before, upto, images, where)
                for before, upto, (_, images), where in zip(ids, ids[len(checked):], conversations, wheres)]

    def _split_answer(self, before: list[int], upto: list[int], images, where: str) -> tuple[list[int], list[int]]:
        if upto[:len(before)] != before or len(upto) <= len(before):
            raise ValueError(f"{where}: cannot locate the tokens of the answer (the tokenisation of the prompt is "
                             "not a prefix of the tokenisation of prompt + answer); check the chat template")
        return self._expand(before, images, where), upto[len(before):]


class BatchSampler:
    """Deterministic global batches: one seeded permutation per epoch, batches never short.

    The state is ``(epoch, offset)``; ``batch(state)`` returns the global batch's
    example indices and the state after it (a pure function, so a checkpoint
    needs only the state). A batch that reaches the end of an epoch continues
    with the next epoch's permutation.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self._cache: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.size, generator=gen).tolist()}
        return self._cache[epoch]

    @staticmethod
    def initial_state() -> dict:
        return {"epoch": 0, "offset": 0}

    def batch(self, state: dict) -> tuple[list[int], dict]:
        epoch, offset = int(state["epoch"]), int(state["offset"])
        out = []
        while len(out) < self.batch_size:
            perm = self.permutation(epoch)
            take = perm[offset:offset + self.batch_size - len(out)]
            out.extend(take)
            offset += len(take)
            if offset >= self.size:
                epoch, offset = epoch + 1, 0
        return out, {"epoch": epoch, "offset": offset}
