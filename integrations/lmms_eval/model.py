"""The ``eos`` model of lmms-eval: :class:`EOS` (simple) and :class:`EOSChat` (chat).

One ``generate`` per batch of ``--batch_size`` requests (left padding, each
sample with its own visual count, image and text-only prompts mixed), greedy
unless the task asks for sampling; the next batch's visuals (the task's
``doc_to_visual``) and image-processor inputs are prepared on one background
thread while a batch generates (the same inputs, :meth:`EOS._prepare`); prompts built by
:class:`eos_kernels.search.data.PromptEncoder`, i.e. exactly as ``eos-search``
builds them. The simple class receives the task's context and its visuals: a
context without ``<image>`` gets one ``<image>\\n`` per image in front (the
LLaVA layout of eos-search's records); one with them keeps them where they are
(their number must equal the images'). The chat class receives the task's
messages: each user message becomes a human turn (its images and videos first,
in their order, then its text), each assistant message a gpt turn; a system
message is put in front of the first user text (eos-search's prompts have no
system turn). Answers are
cut at the tokenizer's eos, decoded without special tokens, then cut at the
task's ``until`` strings. ``loglikelihood`` scores the continuation as the gpt
turn's tokens the way eos-search labels an answer (the prompt alone rates the
visual tokens, as in ``generate``).

Videos (a file path in the task's visuals, or ``{"type": "video", "url": path}``
in its messages) are read for the families whose stock model takes them
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), LLaVA-OneVision) exactly as the
checkpoint's processor builds them, :mod:`.video`: ``num_frames`` frames per
video (default 32) sampled uniformly by the video processor's own
``sample_frames``, or ``fps`` frames per second; a context without ``<video>``
gets one ``<video>\\n`` per video in front, as for images. Video tokens are
visual tokens: the Θ reduces them with the images' and the budget counts them.
They need torchvision and a video decoder (torchcodec or PyAV); without them a
video request raises ``ImportError`` naming what to install.

Every answer's token budget is recorded (:mod:`.budget`) and written into
lmms-eval's results at the end of the run (:meth:`EOS.clean`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import warnings
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from eos_kernels.integrations.lmms_eval import budget as _budget
from eos_kernels.integrations.lmms_eval.video import BACKENDS, VIDEO_PLACEHOLDER, Video, VideoEncoder
from eos_kernels.search.data import IMAGE_PLACEHOLDER

__all__ = ["EOS", "EOSChat", "EOSTokenCounts"]

#: the model arguments (``--model_args k=v,...``); lmms-eval adds batch_size, max_batch_size and device
MODEL_ARGS = ("pretrained", "theta", "device", "dtype", "attn_implementation", "max_new_tokens", "revision",
              "num_frames", "fps", "video_backend", "batch_size", "max_batch_size")
#: generation keywords of lmms-eval tasks that the plugin follows; others are reported once and ignored
_GEN_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample")
_DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava_hf default, for a task that gives none
#: files of a Hub checkpoint the plugin needs (no duplicate weight formats)
_HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
#: images per image-processor call in ``generate_until``: the images of the next batches join the current batch's
#: in one call (at least one batch's, whole batches), where the processor's pixel rows of an image do not depend on
#: the other images of the call (checked bit for bit once per run; otherwise one call per batch). The same work in
#: fewer calls: the processor's fixed cost per call (its keyword validation) dominates small images
IMAGE_CHUNK = 16


@dataclasses.dataclass
class EOSTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the sample's visual-token budget (:mod:`.budget`)."""

    visual_tokens: Optional[int] = None
    final_visual_tokens: Optional[int] = None
    mean_leaving_visual_tokens: Optional[float] = None
    mean_processed_visual_tokens: Optional[float] = None
    prefill_flops_ratio: Optional[float] = None
    prefill_ms: Optional[float] = None
    text_tokens: Optional[int] = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update({f: getattr(self, f) for f in _budget.FIELDS if getattr(self, f) is not None})
        return out


@dataclasses.dataclass
class _Item:
    """One generation request: where its result goes, its doc, and how to get its conversation."""

    index: int
    task: str
    split: str
    doc_id: Any
    gen_kwargs: dict
    sort_text: str
    conversation: Callable[[], Tuple[list, list]]  # -> (turns, visuals: PIL images and Video files)


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"eos: {name}={value!r} is not one of {', '.join(choices)}")
    return value


def _positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number != float(value) or number < 1:
        raise ValueError(f"eos: {name} must be an integer >= 1, got {value!r}")
    return number


def _resolve_checkpoint(pretrained, revision, config_only: bool = False) -> str:
    """A local folder for ``pretrained``: itself, or the Hub snapshot of that repository id (with
    ``config_only``, of its JSON files alone: configs, tokenizer and processor settings)."""
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"eos: pretrained must be a checkpoint folder or a Hugging Face Hub id, got {pretrained!r}")
    if os.path.isdir(pretrained):
        return pretrained
    if os.path.exists(pretrained) or pretrained.count("/") != 1:
        raise ValueError(f"eos: pretrained={pretrained!r} is neither a checkpoint folder nor a Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=pretrained, revision=revision,
                                 allow_patterns=["*.json"] if config_only else list(_HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository, ...: one clear message
        raise ValueError(f"eos: pretrained={pretrained!r} is not a local folder and cannot be fetched from the "
                         f"Hugging Face Hub: {type(exc).__name__}: {exc}") from None


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _visual(v, where: str):
    """One visual of a request: a PIL image (an image file is opened), or a :class:`Video` (any other file:
    lmms-eval hands videos to models as paths)."""
    from PIL import Image

    if isinstance(v, Image.Image):
        return v
    if isinstance(v, Video):
        return v
    if isinstance(v, (str, os.PathLike)):
        path = os.fspath(v)
        if not os.path.isfile(path):
            raise ValueError(f"eos: {where}: the visual {path!r} is not a file (images and video files are supported)")
        if os.path.splitext(path)[1].lower() in _IMAGE_EXTENSIONS:
            with Image.open(path) as im:
                return im.convert("RGB")
        return Video(path)
    raise ValueError(f"eos: {where}: only image and video inputs are supported (got a {type(v).__name__}); audio "
                     "inputs are not")


def _visuals(visuals, where: str) -> list:
    """A request's visuals: PIL images and :class:`Video` files, in order."""
    return [_visual(v, where) for v in _flatten(visuals)]


def _with_placeholders(text: str, visuals: list, where: str) -> str:
    """``text`` with one ``<image>`` per image and one ``<video>`` per video: as given, or one
    ``<image>\\n`` / ``<video>\\n`` each in front (in the order of the visuals) where the text holds none."""
    kinds = [VIDEO_PLACEHOLDER if isinstance(v, Video) else IMAGE_PLACEHOLDER for v in visuals]
    front = []
    for ph in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        have, want = text.count(ph), kinds.count(ph)
        if have == 0:
            front.append(ph)
        elif have != want:
            what = "image" if ph == IMAGE_PLACEHOLDER else "video"
            raise ValueError(f"eos: {where}: the context holds {have} {ph} for {want} {what}(s)")
    return "".join(k + "\n" for k in kinds if k in front) + text


def _positive_float(name: str, value):
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or not number > 0 or number == float("inf"):
        raise ValueError(f"eos: {name} must be a number > 0, got {value!r}")
    return number


def _video_settings(num_frames, fps, video_backend) -> dict:
    num_frames = _positive_int("num_frames", num_frames, allow_none=True)
    fps = _positive_float("fps", fps)
    if num_frames is not None and fps is not None:
        raise ValueError(f"eos: num_frames={num_frames} and fps={fps} are mutually exclusive (the video processor "
                         "samples either a number of frames or a rate)")
    return {"num_frames": num_frames, "fps": fps, "backend": _check_choice("video_backend", video_backend, BACKENDS)}


class EOS(lmms):
    """lmms-eval's ``eos`` model (simple interface): a supported Hugging Face model patched with a Θ.

    Args (``--model_args``):
        pretrained: local checkpoint folder or Hub id of a supported family.
        theta: ``none``, a preset name ``eos-search --eval`` accepts, or a Θ JSON path.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``; under
            ``accelerate launch`` each process takes its local GPU (or the CPU).
        dtype: ``auto`` (float16 on CUDA, float32 on the CPU), ``float32``, ``bfloat16``, ``float16``.
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2`` (default: the checkpoint's).
        max_new_tokens: generation length for every task (default: each task's own).
        revision: Hub revision of ``pretrained``.
        num_frames: frames sampled uniformly from each video by the checkpoint's video processor
            (default 32; a shorter video keeps all its frames, in whole temporal patches).
        fps: instead of ``num_frames``, frames per second, sampled by the video processor.
        video_backend: the video decoder, ``auto`` (torchcodec, else PyAV, decord, OpenCV), ``torchcodec``,
            ``pyav``, ``decord``, ``opencv``.
        batch_size: requests per ``generate`` (lmms-eval's ``--batch_size``).

    Raises (all before any sample runs):
        ValueError: an unknown model argument, an unknown ``theta``, a Θ that does
            not fit the model (a layer beyond its depth, ...), a checkpoint of an
            unsupported class, a bad value of any argument.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, theta: str = "none", device: str | None = "auto",
                 dtype: str = "auto", attn_implementation: str | None = None, max_new_tokens: int | None = None,
                 revision: str | None = None, num_frames: int | None = None, fps: float | None = None,
                 video_backend: str = "auto", batch_size: int | str = 1, max_batch_size: int | None = None,
                 **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"eos: unknown model argument(s) {', '.join(sorted(kwargs))}; the eos model takes "
                             f"{', '.join(MODEL_ARGS)}")
        if pretrained is None:
            raise ValueError("eos: pretrained= is required (a checkpoint folder or a Hugging Face Hub id)")
        from eos_kernels.search.config import DTYPES
        from eos_kernels.search.model_loading import load_model, load_model_config, resolve_device, resolve_dtype
        from eos_kernels.search.evaluate import resolve_theta

        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens, allow_none=True)
        self._video_settings = _video_settings(num_frames, fps, video_backend)
        _check_choice("dtype", dtype, DTYPES)
        if not isinstance(theta, str) or not theta:
            raise ValueError(f"eos: theta must be 'none', a preset name or a Θ JSON path, got {theta!r}")

        from accelerate import Accelerator

        accelerator = Accelerator()
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        device = "auto" if device is None else device
        # each process its own GPU: accelerate's index, or torchrun's LOCAL_RANK (lmms-eval's torchrun path)
        local_rank = accelerator.local_process_index if accelerator.num_processes > 1 else \
            int(os.environ.get("LOCAL_RANK", "0"))
        try:
            self._device = resolve_device(str(device), local_rank)
        except ValueError as exc:
            raise ValueError(f"eos: device={device!r}: {exc}") from None

        # the Θ spec, then the checkpoint's class and adapter and the Θ's depth, before any weight is fetched
        self.theta_spec = theta
        try:  # the spec itself (any preset resolves at LLaVA-1.5's shape); the model's own shape after loading
            early = resolve_theta(theta, 32, 576)
        except ValueError as exc:
            raise ValueError(f"eos: theta={theta!r}: {exc}") from None
        path = _resolve_checkpoint(pretrained, revision, config_only=True)
        try:
            config, _, _ = load_model_config(path)
        except ValueError as exc:
            raise ValueError(f"eos: pretrained={pretrained!r}: {exc}") from None
        depth = getattr(getattr(config, "text_config", config), "num_hidden_layers", None)
        for i, r in enumerate(early.reducers):
            if depth and r.layer >= int(depth):
                raise ValueError(f"eos: theta={theta!r}: reducers[{i}].layer: layer {r.layer} does not exist in a "
                                 f"model with {depth} layers (valid: 0..{int(depth) - 1})")

        path = _resolve_checkpoint(pretrained, revision)
        try:
            model, processor = load_model(path, self._device, resolve_dtype(dtype, self._device, torch.float16),
                                          attn_implementation)
        except ValueError as exc:
            raise ValueError(f"eos: pretrained={pretrained!r}: {exc}") from None
        self._setup(model.eval(), processor, pretrained)

    # ------------------------------------------------------------------ set-up shared with tests
    def _setup(self, model, processor, name: str) -> None:
        """Resolve ``self.theta_spec`` for ``model`` (its depth, its fixed visual count if it has one, as
        ``eos-search --eval`` does), patch it, and build the prompt encoder."""
        import eos_kernels
        from eos_kernels.integrations.auto import adapter_for
        from eos_kernels.search.data import PromptEncoder
        from eos_kernels.search.evaluate import resolve_theta

        adapter = adapter_for(model)
        fixed = adapter.visual_tokens_per_image(model)
        try:
            self.theta = resolve_theta(self.theta_spec, adapter.num_layers(model), fixed)
            eos_kernels.patch(model, self.theta)
        except ValueError as exc:
            raise ValueError(f"eos: theta={self.theta_spec!r}: {exc}") from None
        self._model = model
        self.pretrained = name
        self.processor = processor
        self.encoder = PromptEncoder(processor, image_token_id=model.config.image_token_id, num_visual_tokens=fixed)
        self.video = VideoEncoder(model, processor, self.encoder, **self._video_settings)
        self._tokenizer = self.encoder.tokenizer
        self.num_layers = adapter.num_layers(model)
        self._dtype = next(model.parameters()).dtype
        self.records: list[dict] = []
        #: seconds inside model.generate (or the log-likelihood forward), in the whole request loop, in the
        #: tasks' doc_to_visual (lmms-eval's side) and in the image processor (part of the plugin's overhead)
        #: (``prefetch_*``: the same work done on the prefetch thread while a batch generates, the jobs' whole time
        #: and the request loop's wait for them, part of ``total_s``)
        self.timing = {"generate_s": 0.0, "total_s": 0.0, "visuals_s": 0.0, "preprocess_s": 0.0,
                       "prefetch_visuals_s": 0.0, "prefetch_preprocess_s": 0.0, "prefetch_s": 0.0,
                       "prefetch_wait_s": 0.0, "samples": 0, "batches": 0}
        self._local = threading.local()  # .prefetch: the current thread runs a prefetch job (_prepare)
        self._ignored_keys: set = set()
        self._prefill = {"start": None, "seconds": None}
        #: whether a chunk's pixel rows equal each batch's own call (None: not checked yet; see IMAGE_CHUNK)
        self._chunk_images: bool | None = None if fixed is not None else False

    @classmethod
    def from_model(cls, model, processor, theta: str = "none", *, batch_size: int = 1,
                   max_new_tokens: int | None = None, name: str = "model", num_frames: int | None = None,
                   fps: float | None = None, video_backend: str = "auto"):
        """The plugin around an already loaded model (tests, benchmarks): same behaviour, no loading."""
        self = cls.__new__(cls)
        lmms.__init__(self)
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens, allow_none=True)
        self._video_settings = _video_settings(num_frames, fps, video_backend)
        self._device = next(model.parameters()).device
        if not isinstance(theta, str) or not theta:
            raise ValueError(f"eos: theta must be 'none', a preset name or a Θ JSON path, got {theta!r}")
        self.theta_spec = theta
        self._setup(model.eval(), processor, name)
        return self

    # ------------------------------------------------------------------ lmms-eval's properties
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self._tokenizer.eos_token_id

    # ------------------------------------------------------------------ prefill timing
    def _sync(self):
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _prefill_start(self, module, args):
        p = self._prefill
        if p["start"] is None:
            self._sync()
            p["start"] = time.perf_counter()

    def _prefill_end(self, module, args, output):
        p = self._prefill
        if p["start"] is not None and p["seconds"] is None:
            self._sync()
            p["seconds"] = time.perf_counter() - p["start"]

    def _timed(self, fn):
        """``fn()`` with the first forward of the model inside it (the prefill) timed: ``(result, seconds)``.
        The two timing hooks live only as long as the call; ``timing["generate_s"]`` gets the call's own time
        (the hooks' setting up and removal are the plugin's accounting, outside it)."""
        self._prefill.update(start=None, seconds=None)
        handles = [self._model.register_forward_pre_hook(self._prefill_start),
                   self._model.register_forward_hook(self._prefill_end)]
        try:
            tg = time.perf_counter()
            out = fn()
            self.timing["generate_s"] += time.perf_counter() - tg
        finally:
            for h in handles:
                h.remove()
        return out, self._prefill["seconds"] or 0.0

    def _clock(self, key: str, t0: float) -> None:
        """The time since ``t0`` into ``timing[key]``, or ``timing["prefetch_" + key]`` on the prefetch thread."""
        prefix = "prefetch_" if getattr(self._local, "prefetch", False) else ""
        self.timing[prefix + key] += time.perf_counter() - t0

    # ------------------------------------------------------------------ requests -> conversations
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _simple_conversation(self, context: str, doc_to_visual, task, split, doc_id):
        where = f"{task} doc {doc_id}"
        t0 = time.perf_counter()
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        visuals = _visuals(visuals, where)
        self._clock("visuals_s", t0)
        return [("human", _with_placeholders(context, visuals, where))], visuals

    def _simple_items(self, requests, start: int = 0) -> list[_Item]:
        items = []
        for i, req in enumerate(requests, start):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            items.append(_Item(i, task, split, doc_id, dict(gen_kwargs or {}), context,
                               lambda c=context, v=doc_to_visual, t=task, s=split, d=doc_id:
                               self._simple_conversation(c, v, t, s, d)))
        return items

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        return self._generate(self._simple_items(requests))

    def _gen_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        ignored = set(gen_kwargs) - set(_GEN_KEYS) - self._ignored_keys
        if ignored:
            self._ignored_keys |= ignored
            warnings.warn(f"eos: generation keyword(s) {sorted(ignored)} of the task are ignored "
                          f"(the plugin follows {', '.join(_GEN_KEYS)})", stacklevel=3)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if self.max_new_tokens is not None:
            max_new = self.max_new_tokens
        else:
            max_new = int(gen_kwargs.get("max_new_tokens") or _DEFAULT_MAX_NEW_TOKENS)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = temperature > 0
        settings = {"max_new_tokens": max_new, "do_sample": sample, "num_beams": int(gen_kwargs.get("num_beams") or 1)}
        if sample:
            settings["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                settings["top_p"] = float(gen_kwargs["top_p"])
        return settings, [u for u in until if isinstance(u, str) and u]

    def _batches(self, items: list[_Item]):
        """Batches of at most ``batch_size`` items with equal generation settings, longest contexts first."""
        groups: dict[str, list[_Item]] = {}
        for it in items:
            groups.setdefault(json.dumps(it.gen_kwargs, sort_keys=True, default=str), []).append(it)
        n = self.batch_size_per_gpu
        for group in groups.values():
            group = sorted(group, key=lambda it: -len(it.sort_text))
            for s in range(0, len(group), n):
                yield group[s:s + n]

    def _prompt(self, turns, visuals, where: str) -> tuple[list[int], dict | None]:
        """A generation prompt's ids, and its video inputs (None without a video)."""
        if not any(isinstance(v, Video) for v in visuals):
            return self.encoder.prompt(turns, visuals, where=where), None
        return self._video_encoded(self.video.prompt, turns, visuals, where)

    def _video_encoded(self, encode, turns, visuals, where: str):
        """``encode(turns, visuals, where=...)`` of a conversation with a video (its time: preprocess_s)."""
        t0 = time.perf_counter()
        out = encode(turns, visuals, where=where)
        self._clock("preprocess_s", t0)
        return out

    def _encoded(self, wheres: list[str], convs: list, plain_many, video_one) -> list:
        """Each conversation of a batch encoded: those without a video together by ``plain_many(convs, wheres)``
        (the encoder's batch call, the same ids as one at a time), the others by :meth:`_video_encoded` with
        ``video_one``."""
        plain = [b for b, (_, visuals) in enumerate(convs) if not any(isinstance(v, Video) for v in visuals)]
        out: list = [None] * len(convs)
        if plain:
            for b, encoded in zip(plain, plain_many([convs[b] for b in plain], [wheres[b] for b in plain])):
                out[b] = encoded
        for b, (turns, visuals) in enumerate(convs):
            if out[b] is None:
                out[b] = self._video_encoded(video_one, turns, visuals, wheres[b])
        return out

    def _prompts(self, batch: list[_Item], convs: list) -> list[tuple[list[int], dict | None]]:
        """:meth:`_prompt` of each item of a batch (``convs``: their conversations), those without a video
        tokenised together (:meth:`PromptEncoder.prompts`)."""
        return self._encoded([f"{it.task} doc {it.doc_id}" for it in batch], convs,
                             lambda cs, ws: [(ids, None) for ids in self.encoder.prompts(cs, ws)], self.video.prompt)

    def _answers(self, wheres: list[str], convs: list) -> list[tuple[list[int], list[int], dict | None]]:
        """A scored conversation's prompt ids, answer ids and video inputs (None without a video), for each
        conversation of a batch; those without a video tokenised together (:meth:`PromptEncoder.answers`)."""
        return self._encoded(wheres, convs, lambda cs, ws: [(*pa, None) for pa in self.encoder.answers(cs, ws)],
                             self.video.answer)

    def _inputs(self, prompts: list[list[int]], image_inputs: dict | None, side: str = "left",
                videos: list | None = None) -> dict:
        """The model's inputs of one batch: the padded ids, the image processor's outputs for the batch's images
        (``image_inputs``, :meth:`_image_inputs`; None without an image) and, where a sample has videos, each
        sample's video inputs (``videos[b]``: its :meth:`VideoEncoder.prompt` inputs or None) concatenated in
        batch order."""
        from eos_kernels.search.objective import _forward_parameters, forward_inputs

        L = max(len(p) for p in prompts)
        # the padded rows as one flat list through numpy (row-by-row tensor assignment, or torch.tensor of nested
        # lists, is several times slower)
        flat, bits, pad = [], [], [self.encoder.pad_token_id]
        for p in prompts:
            n = L - len(p)
            flat += (pad * n + list(p)) if side == "left" else (list(p) + pad * n)
            bits += ([0] * n + [1] * len(p)) if side == "left" else ([1] * len(p) + [0] * n)
        ids = torch.from_numpy(np.array(flat, dtype=np.int64).reshape(len(prompts), L))
        mask = torch.from_numpy(np.array(bits, dtype=np.int64).reshape(len(prompts), L))
        extra, px = {}, None
        if image_inputs is not None:
            extra = dict(image_inputs)
            px = extra.pop("pixel_values")
            px = px.to(self._device, self._dtype) if px.is_floating_point() else px.to(self._device)
            extra = {k: (v.to(self._device, self._dtype) if v.is_floating_point() else v.to(self._device))
                     for k, v in extra.items()}
        if videos and any(v is not None for v in videos):
            # pixels in the model's dtype; other floats (Qwen2.5-VL's second_per_grid_ts) as the processor gave them
            for k, v in VideoEncoder.collate(videos, where="this batch").items():
                if torch.is_tensor(v):
                    v = v.to(self._device, self._dtype) if k.startswith("pixel_values") and v.is_floating_point() \
                        else v.to(self._device)
                extra[k] = v
            if "mm_token_type_ids" in _forward_parameters(self._model) and \
                    callable(getattr(self.processor, "create_mm_token_type_ids", None)):
                extra["mm_token_type_ids"] = self.video.mm_token_type_ids(ids, mask).to(self._device)
        inputs = forward_inputs(self._model, None, input_ids=ids.to(self._device),
                                attention_mask=mask.to(self._device),
                                pixel_values=torch.empty(0) if px is None else px, image_inputs=extra)
        if px is None:  # a batch of text-only prompts
            inputs.pop("pixel_values")
        return inputs

    def _image_inputs(self, images: list) -> dict:
        """The image processor's outputs for ``images`` (its time: ``timing["preprocess_s"]``)."""
        t0 = time.perf_counter()
        out = self.encoder.image_inputs(images)
        self._clock("preprocess_s", t0)
        return out

    @staticmethod
    def _images(conversations) -> list:
        return [v for _, visuals in conversations for v in visuals if not isinstance(v, Video)]

    def _chunked_image_inputs(self, batches: list, conversations: list, k: int, ahead: dict, images: list) -> dict:
        """Batch ``k``'s image inputs, computed in one call with the images of the batches after it (up to
        :data:`IMAGE_CHUNK` images, whole batches) where the processor's rows of an image do not depend on the
        other images; the later batches' rows go to ``ahead`` (and their conversations, built for it, to
        ``conversations``; batch ``k``'s own images are ``images``). The first chunk of a run is checked against batch
        ``k``'s own call, bit for bit: a processor whose rows differ, or that gives more than ``pixel_values`` one
        row per image, gets one call per batch from then on."""
        if self._chunk_images is False:
            return self._image_inputs(images)
        group, j = [(k, images)], k + 1  # (batch, its images)
        while sum(len(ims) for _, ims in group) < IMAGE_CHUNK and j < len(batches):
            if conversations[j] is None:
                conversations[j] = [it.conversation() for it in batches[j]]
            group.append((j, self._images(conversations[j])))
            j += 1
        if len([b for b, ims in group if ims]) < 2:  # nothing to share the call with
            return self._image_inputs(images)
        every = [im for _, ims in group for im in ims]
        out = self._image_inputs(every)
        px = out.get("pixel_values")
        rows = set(out) == {"pixel_values"} and torch.is_tensor(px) and px.shape[0] == len(every)
        if rows and self._chunk_images is None:
            alone = self._image_inputs(images)
            rows = set(alone) == {"pixel_values"} and torch.equal(alone["pixel_values"], px[:len(images)])
        self._chunk_images = bool(rows)
        if not rows:
            return self._image_inputs(images)
        start = len(images)
        for b, ims in group[1:]:
            if ims:
                ahead[b] = {"pixel_values": px[start:start + len(ims)]}
                start += len(ims)
        return {"pixel_values": px[:len(images)]}

    def _reports(self, before, batch: int) -> list[dict]:
        from eos_kernels.patching import get_report

        report = get_report(self._model)
        if report is None or report is before or report.batch_size != batch:
            raise RuntimeError("eos: the patched model wrote no report of this batch's prefill; its token budget "
                               "cannot be given (please report this with the transformers version)")
        return [report.token_report(b) for b in range(batch)]

    def _prepare(self, batches: list, conversations: list, ahead: dict, k: int) -> tuple[list, dict | None]:
        """Batch ``k``'s conversations and image inputs (None without an image); run on the prefetch thread while
        the batch before it generates (:meth:`_generate`). Only that thread touches ``conversations`` and
        ``ahead`` while a run lasts, one job at a time."""
        self._local.prefetch = True
        t0 = time.perf_counter()
        try:
            if conversations[k] is None:
                conversations[k] = [it.conversation() for it in batches[k]]
            convs, conversations[k] = conversations[k], None  # its images are no longer needed here
            images = self._images(convs)
            image_inputs = None
            if images:
                image_inputs = ahead.pop(k, None) or self._chunked_image_inputs(batches, conversations, k, ahead,
                                                                                images)
            return convs, image_inputs
        finally:
            self.timing["prefetch_s"] += time.perf_counter() - t0
            self._local.prefetch = False

    @torch.no_grad()
    def _generate(self, items: list[_Item]) -> list[GenerationResult]:
        from concurrent.futures import ThreadPoolExecutor

        from eos_kernels.patching import get_report

        results: list = [None] * len(items)
        tok = self._tokenizer
        eos = tok.eos_token_id
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="eos: generating")
        batches = list(self._batches(items))
        conversations: list = [None] * len(batches)  # built ahead where the images of later batches are
        ahead: dict = {}                              # their image inputs, computed ahead (_chunked_image_inputs)
        # the next batch's conversations (the task's doc_to_visual) and image processing on one background thread
        # while this batch generates: CPU work that would otherwise sit between two generate calls (PIL and
        # numpy release the GIL for their heavy parts; the GPU, or torch's own threads, run the model meanwhile)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eos-prefetch")
        prepare = lambda k: pool.submit(self._prepare, batches, conversations, ahead, k)  # noqa: E731
        try:
            pending = prepare(0) if batches else None
            for k, batch in enumerate(batches):
                t0 = time.perf_counter()
                convs, image_inputs = pending.result()
                self.timing["prefetch_wait_s"] += time.perf_counter() - t0
                pending = prepare(k + 1) if k + 1 < len(batches) else None
                encoded = self._prompts(batch, convs)
                prompts = [ids for ids, _ in encoded]
                inputs = self._inputs(prompts, image_inputs, videos=[video for _, video in encoded])
                settings, until = self._gen_settings(batch[0].gen_kwargs)
                before = get_report(self._model)
                out, prefill = self._timed(lambda: self._model.generate(
                    **inputs, **settings, eos_token_id=eos, pad_token_id=self.encoder.pad_token_id))
                reports = self._reports(before, len(batch))
                new = out[:, inputs["input_ids"].shape[1]:].tolist()
                for it, prompt, gen, rep in zip(batch, prompts, new, reports):
                    if eos is not None and eos in gen:
                        gen = gen[:gen.index(eos)]
                    text = tok.decode(gen, skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0]
                    record = _budget.sample_record(rep, prefill / len(batch), task=it.task, doc_id=it.doc_id,
                                                   input_tokens=len(prompt), output_tokens=len(gen))
                    self._keep(record)
                    counts = EOSTokenCounts(input_tokens=len(prompt), output_tokens=len(gen),
                                            **{f: record[f] for f in _budget.FIELDS})
                    results[it.index] = GenerationResult(text=text, token_counts=counts)
                self.timing["total_s"] += time.perf_counter() - t0
                self.timing["samples"] += len(batch)
                self.timing["batches"] += 1
                bar.update(len(batch))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return results

    def _keep(self, record: dict) -> None:
        self.records.append(record)
        _budget.record_sample(record)

    # ------------------------------------------------------------------ log-likelihood
    @torch.no_grad()
    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        from eos_kernels.patching import get_report, prompt_lengths

        items = []
        for i, req in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = req.args
            cont = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            items.append((i, task, doc_id, str(cont).strip(),
                          lambda c=context, v=doc_to_visual, t=task, s=split, d=doc_id:
                          self._simple_conversation(c, v, t, s, d)))
        results: list = [None] * len(items)
        n = self.batch_size_per_gpu
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="eos: log-likelihood")
        for s in range(0, len(items), n):
            batch = items[s:s + n]
            t0 = time.perf_counter()
            seqs, prompt_lens, answers, images, videos = [], [], [], [], []
            convs = []
            for i, task, doc_id, cont, conv in batch:
                turns, visuals = conv()
                convs.append((turns + [("gpt", cont)], visuals))
            scored = self._answers([f"{task} doc {doc_id}" for _, task, doc_id, _, _ in batch], convs)
            for (prompt, answer, video), (_, visuals) in zip(scored, convs):
                seqs.append(prompt + answer)
                prompt_lens.append(len(prompt))
                answers.append(answer)
                images.extend(v for v in visuals if not isinstance(v, Video))
                videos.append(video)
            inputs = self._inputs(seqs, self._image_inputs(images) if images else None, side="right", videos=videos)
            before = get_report(self._model)
            with prompt_lengths(self._model, prompt_lens):
                out, prefill = self._timed(lambda: self._model(**inputs, use_cache=False))
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            reports = self._reports(before, len(batch))
            for b, ((i, task, doc_id, _, _), p, answer, rep) in enumerate(zip(batch, prompt_lens, answers, reports)):
                target = torch.tensor(answer, device=logp.device)
                rows = logp[b, p - 1:p - 1 + len(answer)]
                ll = float(rows.gather(-1, target[:, None]).sum())
                greedy = bool((rows.argmax(-1) == target).all())
                results[i] = (ll, greedy)
                self._keep(_budget.sample_record(rep, prefill / len(batch), task=task, doc_id=doc_id,
                                                 input_tokens=p))
            self.timing["total_s"] += time.perf_counter() - t0
            self.timing["samples"] += len(batch)
            self.timing["batches"] += 1
            bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("eos: multi-round generation (generate_until_multi_round) is not supported")

    # ------------------------------------------------------------------ the budget in the results
    def budget_summary(self, records: list[dict] | None = None) -> dict:
        """``{task: {field: value}}`` of this process's records (or of ``records``), see :mod:`.budget`."""
        return _budget.summarize(self.records if records is None else records)

    def _gathered(self) -> tuple[list[dict], float]:
        """Every process's records and generate seconds (gathered when lmms-eval runs several processes)."""
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.records, self.timing["generate_s"]))
            return [r for part, _ in gathered for r in part], sum(sec for _, sec in gathered)
        return list(self.records), self.timing["generate_s"]

    def clean(self):
        """End of lmms-eval's requests: every task's budget into lmms-eval's results (``"throughput"``) and the
        log, then lmms-eval's own clean-up (the model is released)."""
        from loguru import logger
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        records, seconds = self._gathered()
        if records and self.rank == 0:
            summary = _budget.summarize(records)
            generated = sum(r["output_tokens"] or 0 for r in records)
            metrics = {"total_requests": len(records), **_budget.throughput_metrics(summary)}
            log_metrics(total_elapsed_time=seconds, total_gen_tokens=generated,
                        avg_speed=generated / seconds if seconds > 0 else 0.0, additional_metrics=metrics)
            logger.info(f"eos: token budget of theta={self.theta_spec} on {self.pretrained} "
                        f"(counted as in eos_kernels.integrations.lmms_eval.budget)\n"
                        + _budget.format_budget_table(summary, theta=self.theta_spec))
            self.last_summary = summary
        super().clean()


class EOSChat(EOS):
    """lmms-eval's ``eos`` model (chat interface: the task's messages); see :class:`EOS`."""

    is_simple = False

    def _chat_conversation(self, doc_to_messages, task, split, doc_id):
        where = f"{task} doc {doc_id}"
        t0 = time.perf_counter()
        messages = doc_to_messages(self._doc(task, split, doc_id)) if callable(doc_to_messages) else doc_to_messages
        turns, all_visuals, system = [], [], []
        for m in messages or []:
            role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
            content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            parts = [content] if isinstance(content, str) else list(content or [])
            texts, visuals = [], []
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else ("text" if isinstance(part, str) else None)
                if kind == "text":
                    texts.append(part if isinstance(part, str) else part.get("text", ""))
                elif kind == "image":
                    visuals.append(part.get("url", part.get("image")))
                elif kind == "video":
                    if part.get("start_time") is not None or part.get("end_time") is not None:
                        raise ValueError(f"eos: {where}: video clips (start_time / end_time) are not supported; "
                                         "the plugin samples the whole video")
                    path = part.get("url", part.get("video", part.get("path")))
                    if not isinstance(path, (str, os.PathLike)):
                        raise ValueError(f"eos: {where}: a video must be given as a file path, got a "
                                         f"{type(path).__name__}")
                    visuals.append(Video(os.fspath(path)))
                else:
                    raise ValueError(f"eos: {where}: only image, video and text message contents are supported "
                                     f"(got {kind!r})")
            visuals = _visuals(visuals, where)
            text = "\n".join(t for t in texts if t)
            if role == "system":
                if visuals:
                    raise ValueError(f"eos: {where}: images or videos in a system message are not supported")
                system.append(text)
                continue
            who = {"user": "human", "assistant": "gpt"}.get(role)
            if who is None:
                raise ValueError(f"eos: {where}: unknown message role {role!r}")
            if who == "gpt" and visuals:
                raise ValueError(f"eos: {where}: images or videos in an assistant message are not supported")
            if who == "human" and system and not any(w == "human" for w, _ in turns):
                text = "\n".join(system + [text])
            value = "".join((VIDEO_PLACEHOLDER if isinstance(v, Video) else IMAGE_PLACEHOLDER) + "\n"
                            for v in visuals) + text
            if turns and turns[-1][0] == who:  # consecutive messages of one role: one turn
                turns[-1] = (who, turns[-1][1] + "\n" + value)
            else:
                turns.append((who, value))
            all_visuals.extend(visuals)
        self._clock("visuals_s", t0)
        return turns, all_visuals

    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        items = []
        for i, req in enumerate(requests):
            if isinstance(req.args[1], dict):
                # a task class of its own (lmms-eval builds those whatever the model's type) sends the simple
                # interface's arguments: (context, gen_kwargs, doc_to_visual, doc_id, task, split)
                items.extend(self._simple_items([req], start=i))
                continue
            context, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            items.append(_Item(i, task, split, doc_id, dict(gen_kwargs or {}), str(context or ""),
                               lambda m=doc_to_messages, t=task, s=split, d=doc_id: self._chat_conversation(m, t, s, d)))
        return self._generate(items)
