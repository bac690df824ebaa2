"""The search's checkpoint (``search_state.pt``): what it holds, how it is written atomically and read back.

``--resume`` continues bit for bit on the CPU because the checkpoint holds everything a step depends on:
the search parameters, AdamW and the schedule, the data position and every RNG (torch, CUDA, Python,
NumPy). Files are written to ``<name>.tmp`` and renamed, so an interrupted write never leaves half a
checkpoint in place of a good one.
"""
from __future__ import annotations

import os
import random

import torch

from eos_kernels.search.config import RUN_CONTROL_FIELDS, SearchConfig

__all__ = ["STATE_FORMAT", "STATE_VERSION", "make_state", "read_state", "restore_state", "rng_state",
           "set_rng_state", "atomic_save", "atomic_text"]

STATE_FORMAT = "eos_kernels.search_state"
STATE_VERSION = 1


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_text(text: str, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def make_state(*, step: int, space, space_kwargs: dict, optimizer, scheduler, data_state, device: torch.device,
               config: SearchConfig, world_size: int) -> dict:
    """The checkpoint of a search after ``step`` steps (the RNG states read now)."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": step,
        "space": {k: v.detach().cpu() for k, v in space.state_dict().items()},
        "space_kwargs": space_kwargs,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data_state": dict(data_state),
        "rng": rng_state(device),
        "config": config.to_dict(),
        "world_size": world_size,
    }


def read_state(path: str, config: SearchConfig, space_kwargs: dict) -> dict:
    """The checkpoint at ``path``, checked against the run that resumes it (``ValueError`` naming ``--resume``):
    its format and version, the options that change the maths, the search space."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise ValueError(f"--resume: cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"--resume: {path} is not an eos-search checkpoint")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"--resume: unsupported checkpoint version {state.get('version')!r}")
    old = state["config"]
    new = config.to_dict()
    differ = sorted(k for k in new if k not in RUN_CONTROL_FIELDS and old.get(k) != new[k])
    if differ:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differ)
        raise ValueError(f"--resume: these options differ from the checkpoint's run: {detail}")
    if state["space_kwargs"] != space_kwargs:
        raise ValueError("--resume: the checkpoint's search space does not match this model/config")
    return state


def restore_state(state: dict, space, optimizer, scheduler, device: torch.device) -> tuple[int, dict]:
    """Load a checkpoint read by :func:`read_state` into the search's objects and the RNGs;
    returns ``(step, data_state)``."""
    space.load_state_dict({k: v.to(device) for k, v in state["space"].items()})
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    data_state = dict(state["data_state"])
    set_rng_state(state["rng"], device)
    return step, data_state
