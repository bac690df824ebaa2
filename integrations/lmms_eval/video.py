"""Video inputs of the ``eos`` plugin, built exactly as the checkpoint's own processor builds them.

Families whose stock model takes videos (its forward has ``pixel_values_videos``):
Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE, LLaVA-OneVision. The others are
refused with a clear error: LLaVA-1.5, LLaVA-NeXT and Gemma 3 have no video input,
and InternVL's model has none either (its processor turns a video into image tiles,
one per frame, which the plugin does not build).

lmms-eval hands a model a video as a file path (the simple interface's
``doc_to_visual`` returns the path; the chat interface's messages hold
``{"type": "video", "url": path}``). For each video the plugin

1. decodes the frames with ``transformers.video_utils.load_video``, the decoder
   the processor itself calls for a path, with the processor's own default backend
   ``torchcodec`` where it is usable, else PyAV (``av``, which lmms-eval 0.7.3
   declares), decord or OpenCV (``video_backend=`` picks one);
2. samples them with the checkpoint's video processor's own ``sample_frames`` (the
   function the processor runs with ``do_sample_frames=True``): ``num_frames``
   frames spread uniformly over the video (default 32, as lmms-eval's own
   llava_hf / llava_onevision / Qwen models), capped at the video's frame count
   rounded down to a multiple of the processor's ``temporal_patch_size`` (Qwen: 2;
   the cap lmms-eval's Qwen models apply), or, with ``fps=``, the processor's
   own rate-based sampling (Qwen's with its ``min_frames`` / ``max_frames``);
3. hands the frames and their ``VideoMetadata`` (fps, sampled frame indices) to the
   checkpoint's processor with the prompt text (``do_sample_frames=False``: they are
   sampled already), so the video tokens in the ids -- their count, Qwen3-VL's
   ``<t seconds>`` timestamps and per-frame vision markers, OneVision's pooled
   frames and newline -- ``pixel_values_videos``, ``video_grid_thw``,
   ``second_per_grid_ts`` (Qwen2.5-VL) and ``mm_token_type_ids`` are the processor's.
   That is what ``processor.apply_chat_template(messages, tokenize=True,
   num_frames=...)`` gives for the same video path (tested).

The prompt text is the processor's chat template on the same messages as
:class:`eos_kernels.search.data.PromptEncoder` writes for images (each human turn:
its image and video items in the order of their placeholders, then its text), so a
prompt without a video is unchanged. A batch may mix video, image and text-only
prompts: the images of the whole batch go through the image processor at once (as
for image-only batches), each sample's video inputs are concatenated in batch order.

Needs torchvision (transformers 5.x builds the families' video processors only with
it) and one video decoder; without them a video request raises ``ImportError``
naming what to install, never a silent wrong answer.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import torch

from eos_kernels.search.data import IMAGE_PLACEHOLDER, PromptEncoder

__all__ = ["VIDEO_PLACEHOLDER", "Video", "VideoEncoder", "BACKENDS", "DEFAULT_NUM_FRAMES"]

VIDEO_PLACEHOLDER = "<video>"
#: video decoders of ``transformers.video_utils.load_video`` (``auto``: the processor's torchcodec, else the others)
BACKENDS = ("auto", "torchcodec", "pyav", "decord", "opencv")
#: frames per video unless ``num_frames`` / ``fps`` say otherwise (lmms-eval's own models sample 32)
DEFAULT_NUM_FRAMES = 32
_PLACEHOLDERS = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))
#: outputs of a processor call that are the prompt's text side, not its visual inputs
_TEXT_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "text_replacement_offsets",
              "video_metadata"}
_VIDEO_FAMILIES = "Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), LLaVA-OneVision"
#: the oldest transformers whose video loading and processors the plugin was tested on (5.0-5.3 decode and
#: expand videos differently: errors and wrong counts); tested 5.4.0, 5.6.2, 5.8.1, 5.15.1, 5.24.0, 5.25.0
MIN_TRANSFORMERS = "5.4.0"


@dataclasses.dataclass(frozen=True)
class Video:
    """A video of a request: the file lmms-eval gave."""

    path: str


def _available_backends() -> list[str]:
    from transformers.utils import import_utils as iu

    usable = getattr(iu, "is_torchcodec_usable", None)
    torchcodec = usable(decode="video") if callable(usable) else iu.is_torchcodec_available()
    found = [("torchcodec", torchcodec), ("pyav", iu.is_av_available()), ("decord", iu.is_decord_available()),
             ("opencv", iu.is_cv2_available())]
    return [name for name, ok in found if ok]


class VideoEncoder:
    """Prompts with videos for one model and its processor (see the module docstring).

    Args:
        model: the (patched) model; its forward must take ``pixel_values_videos``.
        processor: the checkpoint's processor (a full one, with its ``video_processor``).
        encoder: the plugin's :class:`PromptEncoder` for the same processor (its checks and tokenizer).
        num_frames / fps: the sampling (at most one of them; neither: ``DEFAULT_NUM_FRAMES``).
        backend: one of :data:`BACKENDS`.

    Nothing is checked until the first video arrives (:meth:`check`), so an image
    or text task never needs torchvision or a video decoder.
    """

    def __init__(self, model, processor, encoder: PromptEncoder, *, num_frames: int | None = None,
                 fps: float | None = None, backend: str = "auto"):
        self.model = model
        self.processor = processor
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.num_frames = num_frames if num_frames is not None or fps is not None else DEFAULT_NUM_FRAMES
        self.fps = fps
        self.backend = backend
        self._problem_found = ...  # not looked for yet; then None (none) or (exception class, message)

    # ------------------------------------------------------------------ what a video needs
    def check(self, where: str) -> None:
        """Raise unless this model and processor can take a video here: ``ValueError`` for a family whose
        model takes none, ``ImportError`` naming what to install for a missing torchvision or decoder."""
        if self._problem_found is ...:
            self._problem_found = self._problem()
        if self._problem_found is not None:
            kind, message = self._problem_found
            raise kind(f"eos: {where}: {message}")

    def _problem(self):
        import transformers
        from transformers.utils import is_torchvision_available

        from eos_kernels.search.objective import _forward_parameters

        from packaging.version import Version

        name = type(self.model).__name__
        if "pixel_values_videos" not in _forward_parameters(self.model):
            return ValueError, (f"{name} takes no video inputs (its forward has no pixel_values_videos); the eos "
                                f"plugin reads videos for {_VIDEO_FAMILIES}")
        if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
            return ImportError, (f"video inputs need transformers >= {MIN_TRANSFORMERS} (older releases load and "
                                 f"expand videos differently; tested {MIN_TRANSFORMERS}-5.25.0), found "
                                 f"{transformers.__version__}: `pip install 'transformers>={MIN_TRANSFORMERS}'`")
        if getattr(self.processor, "video_processor", None) is None or \
                getattr(self.processor, "tokenizer", None) is None:
            if not is_torchvision_available():
                return ImportError, (f"video inputs need the checkpoint's full processor, whose video processor "
                                     f"transformers {transformers.__version__} builds only with torchvision: "
                                     "install the torchvision release that matches your torch (`pip install "
                                     "torchvision`; with a CUDA torch), and a video decoder (`pip install "
                                     "torchcodec` or `pip install av`)")
            return ValueError, (f"video inputs need the checkpoint's full processor with its video processor; "
                                f"the plugin has a {type(self.processor).__name__}")
        backends = _available_backends()
        if self.backend == "auto":
            if not backends:
                return ImportError, ("no video decoder is installed: install torchcodec (transformers' default; "
                                     "`pip install torchcodec`, needs FFmpeg) or PyAV (`pip install av`), or decord "
                                     "or opencv-python")
            self.backend = backends[0]
        elif self.backend not in backends:
            package = {"pyav": "av", "opencv": "opencv-python"}.get(self.backend, self.backend)
            return ImportError, (f"video_backend={self.backend!r} is not usable here (install it: `pip install "
                                 f"{package}`); usable: {', '.join(backends) or 'none'}")
        return None

    # ------------------------------------------------------------------ frames
    def _sample(self, metadata, **_):
        """The video processor's own frame sampling for one video (its ``sample_frames``)."""
        vp = self.processor.video_processor
        if self.fps is not None:
            return vp.sample_frames(metadata=metadata, fps=self.fps)
        n = self.num_frames
        total = int(metadata.total_num_frames)
        if n > total:  # a short video: all its frames, in whole temporal patches
            step = int(getattr(vp, "temporal_patch_size", None) or 1)
            if total < step:
                raise ValueError(f"the video has {total} frame(s), fewer than one temporal patch ({step})")
            n = total // step * step
        return vp.sample_frames(metadata=metadata, num_frames=n)

    def load(self, video: Video, where: str):
        """``(frames, VideoMetadata)`` of ``video``: decoded and sampled (see the module docstring)."""
        from transformers.video_utils import load_video

        self.check(where)
        if not os.path.isfile(video.path):
            raise ValueError(f"eos: {where}: video file not found: {video.path}")
        try:
            return load_video(video.path, backend=self.backend, sample_indices_fn=self._sample)
        except (ValueError, RuntimeError, OSError, IndexError) as exc:
            raise ValueError(f"eos: {where}: cannot read the video {video.path} with {self.backend} "
                             f"(num_frames={self.num_frames}, fps={self.fps}): {type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def split(visuals: Sequence) -> tuple[list, list]:
        """``(images, videos)`` of a request's visuals, each in its own order."""
        return [v for v in visuals if not isinstance(v, Video)], [v for v in visuals if isinstance(v, Video)]

    def _check(self, turns, visuals, where: str, last: str):
        images, videos = self.split(visuals)
        turns = PromptEncoder._check(turns, images, where, last)  # the turn structure and the image count
        for t, (who, value) in enumerate(turns):
            if who == "gpt" and VIDEO_PLACEHOLDER in value:
                raise ValueError(f"{where}: turn {t} (gpt) contains {VIDEO_PLACEHOLDER}")
        n = sum(v.count(VIDEO_PLACEHOLDER) for w, v in turns if w == "human")
        if n != len(videos):
            raise ValueError(f"{where}: {n} {VIDEO_PLACEHOLDER} placeholder(s) in the human turns for "
                             f"{len(videos)} video(s)")
        return turns, images, videos

    @staticmethod
    def _messages(turns) -> list[dict]:
        # as PromptEncoder's renderer writes an image turn: the visual items in placeholder order, then the text
        msgs = []
        for who, value in turns:
            if who == "human":
                items = [{"type": "image" if m == IMAGE_PLACEHOLDER else "video"}
                         for m in _PLACEHOLDERS.findall(value)]
                if items:
                    for ph in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                        value = value.replace(ph + "\n", "").replace("\n" + ph, "").replace(ph, "")
                    value = value.strip()
                msgs.append({"role": "user", "content": items + [{"type": "text", "text": value}]})
            else:
                msgs.append({"role": "assistant", "content": [{"type": "text", "text": value}]})
        return msgs

    def _text(self, turns, generation_prompt: bool, where: str) -> str:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise ValueError(f"eos: {where}: video prompts need the checkpoint's chat template (neither its "
                             "processor nor its tokenizer has one)")
        out = owner.apply_chat_template(self._messages(turns), tokenize=False, add_generation_prompt=generation_prompt)
        return out[0] if isinstance(out, list) else out

    def _special(self, text: str) -> bool:
        # the rule of ProcessorMixin.apply_chat_template (and of eos-search's prompts)
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def _processed(self, text: str, images, videos, where: str) -> tuple[list[int], dict]:
        """The processor on one prompt: its ids and the video inputs (images: the batch's image processor)."""
        loaded = [self.load(v, where) for v in videos]
        out = self.processor(text=[text], images=[im.convert("RGB") for im in images] or None,
                             videos=[f for f, _ in loaded],
                             video_metadata=[m for _, m in loaded], do_sample_frames=False, return_tensors="pt",
                             add_special_tokens=self._special(text))
        image_keys = set(getattr(self.processor.image_processor, "model_input_names", None) or ()) | {"pixel_values"}
        inputs = {k: v for k, v in out.items() if k not in _TEXT_KEYS and k not in image_keys}
        return out["input_ids"][0].tolist(), inputs

    def prompt(self, turns, visuals: Sequence, where: str = "prompt") -> tuple[list[int], dict]:
        """``(ids, video inputs)`` of ``turns`` (ending with a human turn) and the generation prompt: each
        ``<image>`` / ``<video>`` placeholder expanded by the processor to its tokens."""
        self.check(where)
        turns, images, videos = self._check(turns, visuals, where, last="human")
        return self._processed(self._text(turns, True, where), images, videos, where)

    def answer(self, turns, visuals: Sequence, where: str = "prompt") -> tuple[list[int], list[int], dict]:
        """``(prompt ids, answer ids, video inputs)`` of ``turns`` ending with a gpt turn, the answer's tokens
        found as :meth:`PromptEncoder.answer` finds them (the conversation up to the answer beyond the prompt)."""
        self.check(where)
        turns, images, videos = self._check(turns, visuals, where, last="gpt")
        before_text = self._text(turns[:-1], True, where)
        upto_text = self._text(turns, False, where)
        before = list(self.tokenizer(before_text, add_special_tokens=self._special(before_text))["input_ids"])
        upto = list(self.tokenizer(upto_text, add_special_tokens=self._special(upto_text))["input_ids"])
        if upto[:len(before)] != before or len(upto) <= len(before):
            raise ValueError(f"{where}: cannot locate the tokens of the answer (the tokenisation of the prompt is "
                             "not a prefix of the tokenisation of prompt + answer); check the chat template")
        ids, inputs = self._processed(before_text, images, videos, where)
        return ids, upto[len(before):], inputs

    # ------------------------------------------------------------------ batches
    def mm_token_type_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The processor's ``mm_token_type_ids`` of each row of a padded batch (0 at the padding)."""
        rows = self.processor.create_mm_token_type_ids([r[m.bool()].tolist() for r, m in zip(ids, mask)])
        out = torch.zeros_like(ids)
        for b, row in enumerate(rows):
            out[b, mask[b].bool()] = torch.tensor(row, dtype=ids.dtype)
        return out

    @staticmethod
    def collate(samples: Sequence[dict | None], where: str = "batch") -> dict:
        """One batch's video inputs from each sample's (None: a sample without video), in batch order."""
        parts = [s for s in samples if s]
        out = {}
        for key in dict.fromkeys(k for s in parts for k in s):
            values = [s[key] for s in parts if key in s]
            if len(values) != len(parts):
                raise ValueError(f"eos: {where}: the processor gave {key} for some videos only")
            if all(torch.is_tensor(v) for v in values):
                try:
                    out[key] = torch.cat(values, dim=0)
                except RuntimeError:
                    shapes = ", ".join(str(tuple(v.shape)) for v in values)
                    raise ValueError(f"eos: {where}: the videos of this batch cannot be stacked ({key}: {shapes}); "
                                     "the model takes one tensor of equal frame counts and sizes: use num_frames= "
                                     "(videos shorter than it keep fewer frames) or --batch_size 1") from None
            else:
                out[key] = [x for v in values for x in (v if isinstance(v, (list, tuple)) else [v])]
        return out
