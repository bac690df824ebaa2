"""The ``--output`` folder of ``eos-search``, ``--eval`` and ``--demo``: its file names and the checks that keep
a user's files.

One place for the rule that every command follows (issue 17, item 5): nothing already in ``--output`` is
replaced unless the user says so (``--overwrite``; ``--resume`` for a search's own checkpoint), every
check runs before a model is loaded, and a command that fails leaves no empty folder it made itself.
A module of its own so that the command line, the search driver, the evaluation and the demo share the
rule without importing each other.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterable, Iterator

__all__ = ["THETA_FILE", "STATE_FILE", "LOG_FILE", "PLOT_FILES", "EVAL_FILE", "search_files", "existing_files",
           "refuse_to_replace", "output_dir"]

THETA_FILE = "theta.json"
STATE_FILE = "search_state.pt"
LOG_FILE = "log.jsonl"
#: what :func:`eos_kernels.search.plots.plot_log` draws at the end of a search
PLOT_FILES = ("trajectories.png", "profile.png", "loss.png")
EVAL_FILE = "eval.json"


def search_files(plots: bool = True) -> tuple[str, ...]:
    """The files a search writes in its output folder (the plots only when it draws them)."""
    return (THETA_FILE, STATE_FILE, LOG_FILE) + (PLOT_FILES if plots else ())


def existing_files(folder: str, names: Iterable[str]) -> list[str]:
    """Those of ``names`` (relative to ``folder``) that exist there, in the order given."""
    return [n for n in names if os.path.lexists(os.path.join(folder, n))]


def refuse_to_replace(folder: str, names: Iterable[str], what: str = "this command") -> None:
    """``ValueError`` naming ``--overwrite`` when ``folder`` already holds any of ``names``."""
    found = existing_files(folder, names)
    if found:
        it = "it" if len(found) == 1 else "them"
        raise ValueError(f"--output {folder} already holds {', '.join(found)}, which {what} would replace; "
                         f"pass --overwrite to replace {it}, or choose another --output")


def _make_folder(path: str) -> list[str]:
    """``os.makedirs(path)``; returns the folders it made, the deepest first (empty if ``path`` existed)."""
    made = []
    head = os.path.abspath(path)
    while not os.path.lexists(head):
        made.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        _remove_if_empty(made)  # the levels made before the one that failed
        raise
    return made


def _remove_if_empty(made: list[str]) -> None:
    # rmdir removes only empty folders: whatever was written into them stays
    for folder in made:
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError:
            return


def _prepare(path: str) -> list[str]:
    if not isinstance(path, str) or not path:
        raise ValueError(f"--output must be a folder path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output {path} is an existing file, not a folder")
    try:
        made = _make_folder(path)
    except OSError as exc:
        raise ValueError(f"--output {path}: cannot create the folder: {exc.strerror or exc}") from None
    try:
        # probed by writing, not by permission bits: a read-only file system is caught even for root
        with tempfile.NamedTemporaryFile(dir=path, prefix=".eos-write-check-"):
            pass
    except OSError as exc:
        _remove_if_empty(made)
        raise ValueError(f"--output {path}: the folder is not writable: {exc.strerror or exc}") from None
    return made


@contextlib.contextmanager
def output_dir(path: str) -> Iterator[str]:
    """``path`` made usable as the output folder of a command's block; ``ValueError`` with a clear message if
    it cannot be.

    Checked before any model is loaded: an existing file (or a path through one),
    a folder that cannot be made, or one that cannot be written to (probed by
    writing and removing a small file, so a read-only file system is caught
    even for root). If the block raises, the folders made here are removed
    again while they are still empty: a failed command leaves no empty
    ``--output`` behind, and nothing written into it is ever deleted.
    """
    made = _prepare(path)
    try:
        yield path
    except BaseException:
        _remove_if_empty(made)
        raise
