"""LLaVA-format data for the search: validation, prompts, tokenisation, batches, sampling.

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
``[{"type": "text", "text": answer}]`` for a processor template; plain strings
(``<image>`` kept in place) for a tokenizer template. Without a template the
LLaVA-1.5 format is used::

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

The single ``<image>`` token is expanded to the model's N visual tokens in the
ids (what ``LlavaProcessor`` does in the text); pixels come from the
processor's image processor (RGB).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import torch

__all__ = ["Example", "Batch", "Dataset", "load_dataset", "BatchSampler", "IMAGE_PLACEHOLDER"]

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


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor        # long [B, L]
    attention_mask: torch.Tensor   # long [B, L]
    labels: torch.Tensor           # long [B, L], -100 outside answers
    pixel_values: torch.Tensor     # [B, 3, H, W]
    prompt_lengths: torch.Tensor   # long [B] (in padded coordinates)
    indices: list[int]

    def to(self, device, pixel_dtype=None) -> "Batch":
        px = self.pixel_values.to(device)
        if pixel_dtype is not None:
            px = px.to(pixel_dtype)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), px,
                     self.prompt_lengths.to(device), self.indices)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def split(self, size: int) -> list["Batch"]:
        """Micro-batches of at most ``size`` samples (each trimmed of common right padding)."""
        out = []
        for s in range(0, len(self), size):
            sl = slice(s, s + size)
            mask = self.attention_mask[sl]
            length = int(mask.sum(dim=1).max()) if mask.numel() else 0
            out.append(Batch(self.input_ids[sl, :length], mask[:, :length], self.labels[sl, :length],
                             self.pixel_values[sl], self.prompt_lengths[sl], self.indices[sl]))
        return out


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


class _Renderer:
    """Conversation prefixes as token ids, through a chat template or the LLaVA-1.5 format."""

    def __init__(self, processor):
        tok = getattr(processor, "tokenizer", processor)
        self.processor = processor
        self.tokenizer = tok
        if getattr(processor, "chat_template", None) and processor is not tok:
            self.mode = "processor"
        elif getattr(tok, "chat_template", None):
            self.mode = "tokenizer"
        else:
            self.mode = "llava15"
        if tok.eos_token is None and self.mode == "llava15":
            raise ValueError("the tokenizer has no eos_token (needed by the LLaVA-1.5 prompt format)")

    def _messages(self, turns):
        msgs = []
        for who, value in turns:
            if who == "human":
                if self.mode == "processor":
                    content = []
                    if IMAGE_PLACEHOLDER in value:
                        content.append({"type": "image"})
                        value = value.replace(IMAGE_PLACEHOLDER + "\n", "").replace(
                            "\n" + IMAGE_PLACEHOLDER, "").replace(IMAGE_PLACEHOLDER, "").strip()
                    content.append({"type": "text", "text": value})
                    msgs.append({"role": "user", "content": content})
                else:
                    msgs.append({"role": "user", "content": value})
            else:
                if self.mode == "processor":
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


class Dataset:
    """Tokenised, validated examples and the pixels of their images."""

    def __init__(self, examples: list[Example], processor, num_visual_tokens: int, image_token_id: int,
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

    def pixels(self, paths: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        images = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            except OSError as exc:
                raise ValueError(f"cannot read image {p}: {exc}") from None
        image_processor = getattr(self.processor, "image_processor", self.processor)
        return image_processor(images, return_tensors="pt")["pixel_values"]

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
        return Batch(ids, mask, labels, self.pixels([e.image for e in exs]), prompt, list(indices))

    def prompt_batch(self, items: Sequence[tuple[int, int]]):
        """Left-padded generation prompts for ``(example index, turn)`` pairs: ids, mask, pixels."""
        prompts = [self.examples[i].input_ids[:self.examples[i].turns[t][0]] for i, t in items]
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), L), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p)
            mask[b, L - len(p):] = 1
        return ids, mask, self.pixels([self.examples[i].image for i, _ in items])


def load_dataset(path: str, processor, *, num_visual_tokens: int, image_token_id: int,
                 image_folder: str | None = None, pad_token_id: int | None = None,
                 limit: int | None = None, check_image_size: int | None = None) -> Dataset:
    """Read, validate and tokenise a LLaVA-format JSON file (see the module docstring).

    Args:
        path: the JSON file.
        processor: the checkpoint's processor (or a tokenizer with an image processor).
        num_visual_tokens: N, visual tokens per image (the model's).
        image_token_id: the id of ``<image>`` (``model.config.image_token_id``).
        image_folder: folder of the image paths; default: the JSON file's folder.
        pad_token_id: padding id (default: the tokenizer's pad, else its eos).
        limit: keep the first ``limit`` records.
        check_image_size: if given, the first image is processed and its pixel
            size checked against it (the vision tower's ``image_size``).

    Raises:
        ValueError: a missing file or image, malformed records, a tokenizer
            that does not map ``<image>`` to ``image_token_id``, ...
    """
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data file {path}: invalid JSON: {exc}") from None
    if not isinstance(records, list):
        raise ValueError(f"data file {path}: expected a JSON list of records, got {type(records).__name__}")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"data file {path} holds no records")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"image folder not found: {folder}")
    renderer = _Renderer(processor)
    tok = renderer.tokenizer
    placeholder_ids = tok(IMAGE_PLACEHOLDER, add_special_tokens=False)["input_ids"]
    if list(placeholder_ids) != [image_token_id]:
        raise ValueError(f"the tokenizer maps {IMAGE_PLACEHOLDER!r} to {list(placeholder_ids)}, not to the "
                         f"model's image token id {image_token_id}")
    if pad_token_id is None:
        pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")

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

    examples = []
    n = num_visual_tokens
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
        pos = [p for p, x in enumerate(full_ids) if x == image_token_id]
        if len(pos) != 1:
            raise ValueError(f"{where}: malformed conversation: the rendered prompt holds {len(pos)} image "
                             f"tokens, expected 1")
        at = pos[0]
        if any(s <= at for s, _ in spans):
            raise ValueError(f"{where}: malformed conversation: {IMAGE_PLACEHOLDER} must come before the "
                             "first answer")
        ids = full_ids[:at] + [image_token_id] * n + full_ids[at + 1:]
        shift = n - 1
        spans = [(s + shift, e + shift) for s, e in spans]
        labels = [-100] * len(ids)
        for s, e in spans:
            labels[s:e] = ids[s:e]
        answers = [v for w, v in turns if w == "gpt"]
        rid = records[i].get("id")
        examples.append(Example(index=i, id=str(rid) if rid is not None else str(i),
                                image=os.path.join(folder, image), input_ids=ids, labels=labels,
                                prompt_length=spans[0][0], turns=spans, answers=answers,
                                num_text_tokens=len(ids) - n))
    ds = Dataset(examples, processor, n, image_token_id, pad_token_id, path)
    if check_image_size is not None:
        px = ds.pixels([examples[0].image])
        if tuple(px.shape[-2:]) != (check_image_size, check_image_size):
            raise ValueError(f"the processor gives {tuple(px.shape[-2:])} pixels per image, but the model's "
                             f"vision tower expects {check_image_size}x{check_image_size}")
    return ds


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
