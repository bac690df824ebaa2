"""lmms-eval model plugin ``eos``: score any model ``eos_kernels.patch`` supports, at any Θ, with its token budget.

Registered with lmms-eval (>= 0.7) through the entry-point group
``lmms_eval.models`` (:func:`manifests`), so that after ``pip install`` ::

    lmms-eval --model eos --model_args pretrained=llava-hf/llava-1.5-7b-hf,theta=sparsevlm-v2-64 \\
        --tasks pope,gqa,mme --batch_size 8 --output_path out/

runs the stock Hugging Face model of the checkpoint, patched with the Θ. Model
arguments (``--model_args k=v,...``):

- ``pretrained``: a local checkpoint folder or a Hugging Face Hub id of a
  supported family (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
  Qwen2.5-VL and whatever :data:`eos_kernels.integrations.auto.SUPPORTED_MODELS`
  lists): the class comes from the checkpoint's config, the adapter from
  ``eos_kernels``' own lookup;
- ``theta``: ``none`` (the unreduced model), a preset name ``eos-search
  --eval`` accepts (``sparsevlm-v2-64``, ``fastv-2-0.5``, ``paper-128``, ...)
  or a Θ JSON path;
- ``device`` (``auto``: ``cuda`` when there is one, else ``cpu``), ``dtype``
  (``auto``: float16 on CUDA, float32 on the CPU, as ``eos-search --eval``;
  ``float32``, ``bfloat16``, ``float16``), ``attn_implementation`` (default: the
  checkpoint's), ``max_new_tokens`` (default: each task's), ``revision`` (Hub
  checkpoints). The operator runs the fused kernels on CUDA and the PyTorch
  reference on the CPU, as everywhere in the package;
- videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision; :mod:`.video`):
  ``num_frames`` (default 32, sampled uniformly by the checkpoint's video
  processor) or ``fps``, and ``video_backend`` (``auto``: torchcodec, else PyAV,
  decord, OpenCV). Videos need torchvision and a video decoder.

Prompts are built exactly as ``eos-search`` builds them
(:class:`eos_kernels.search.data.PromptEncoder`). Budget fields: see
:mod:`eos_kernels.integrations.lmms_eval.budget`. The built-in demo task
``eos_demo`` lives in :data:`TASKS_DIR` (``--include_path``); ``python -m
eos_kernels.integrations.lmms_eval --tasks-dir`` prints it and ``--demo-checkpoint``
the shipped demo model's folder.
"""
from __future__ import annotations

import os

__all__ = ["MODEL_ID", "TASKS_DIR", "manifests", "demo_checkpoint"]

#: the name lmms-eval knows the plugin by (``--model eos``)
MODEL_ID = "eos"
#: folder of the tasks shipped with the package, for lmms-eval's ``--include_path``
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def manifests():
    """The ``lmms_eval.models`` entry point: the plugin's ``ModelManifest`` (a simple and a chat class)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID,
                          simple_class_path="eos_kernels.integrations.lmms_eval.model.EOS",
                          chat_class_path="eos_kernels.integrations.lmms_eval.model.EOSChat")]


def demo_checkpoint() -> str:
    """Folder of the demo model shipped in the package (``pretrained=`` for the ``eos_demo`` task)."""
    from eos_kernels.demo.build import checkpoint_path

    return checkpoint_path()
