"""The ``--output`` folder of ``eos-search``, ``--eval`` and ``--demo``: its file names and its checks.

A module of its own so that the command line, the search driver, the evaluation and the demo share one
rule without importing each other (the demo used to import it from the command line that dispatches to it).
"""
from __future__ import annotations

import os
import tempfile

__all__ = ["THETA_FILE", "STATE_FILE", "LOG_FILE", "check_output_dir"]

THETA_FILE = "theta.json"
STATE_FILE = "search_state.pt"
LOG_FILE = "log.jsonl"


def check_output_dir(path: str) -> str:
    """``path`` as a usable output folder, made if missing; ``ValueError`` with a clear message otherwise.

    Checked before any model is loaded: an existing file (or a path through one),
    a folder that cannot be made, or one that cannot be written to (probed by
    writing and removing a small file, so a read-only file system is caught
    even for root).
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"--output must be a folder path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output {path} is an existing file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--output {path}: cannot create the folder: {exc.strerror or exc}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".eos-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"--output {path}: the folder is not writable: {exc.strerror or exc}") from None
    return path
