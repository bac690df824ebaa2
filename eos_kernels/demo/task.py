"""A synthetic visual question-answering task whose answers live in specific image regions.

Scenes
------
A 64x64 RGB image on a plain light-grey background, divided into a 4x4 grid of
16x16-pixel cells (rows and columns numbered 1..4 from the top left). Each cell
is empty (probability ``P_EMPTY``) or holds one flat-coloured, non-antialiased
shape: a ``circle``, ``square``, ``triangle`` (apex up) or ``cross`` (a plus
sign), in one of five colours (``red``, ``green``, ``blue``, ``yellow``,
``purple``), with a small random size and a one-pixel centre jitter. Every shape
covers the centre pixel of its cell, so the colour sampled there is the shape's
colour (or the background colour for an empty cell).

With a patch size of 8 each cell is 2x2 vision patches, so the 64 visual tokens
of the demo model map onto the grid one-to-one: a question about one cell needs
4 of the 64 tokens, a comparison 8, a count every occupied cell.

Questions (one-word answers)
----------------------------
- ``colour``: "what colour is the shape in row 2 column 3 ?" -> a colour, or
  ``none`` for an empty cell (corners are sometimes named: "... in the top left
  cell ?").
- ``shape``: "what shape is in row 4 column 1 ?" -> a shape, or ``none``.
- ``same``: "are the shapes in row 1 column 1 and row 3 column 4 the same shape ?"
  -> ``yes`` / ``no`` (both cells occupied; balanced 50/50).
- ``count``: "how many red shapes are there ?" -> a number word (``zero`` ...).

Splits
------
``train`` / ``search`` / ``eval`` are disjoint by construction: a scene belongs
to the split selected by a SHA-256 hash of its content (buckets 0-7 train, 8
search, 9 eval), and each split's generator rejects scenes of other splits. The
random streams are seeded from ``(seed, split)``, so the same arguments always
give byte-identical JSON and PNG files.

:func:`generate_split` / :func:`generate_splits` write the LLaVA JSON format::

    [{"id": "eval-000000-q0", "image": "images/eval-000000.png",
      "conversations": [{"from": "human", "value": "<image>\\nwhat shape is in row 1 column 2 ?"},
                        {"from": "gpt", "value": "circle"}],
      "question_type": "shape", "scene": {...}}, ...]

(``image`` is relative to the JSON file's folder; ``question_type`` and
``scene`` are extra keys that LLaVA loaders ignore: the ground truth.) The train
split may hold several question/answer turns per image (``turns_per_image``);
the search and eval splits hold one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
GRID = 4
CELL = IMAGE_SIZE // GRID  # 16 px
P_EMPTY = 0.4
BACKGROUND = (235, 235, 235)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen")
QUESTION_TYPES = ("colour", "shape", "same", "count")
CORNERS = {"top left": (1, 1), "top right": (1, GRID), "bottom left": (GRID, 1),
           "bottom right": (GRID, GRID)}
NONE_ANSWER = "none"
SPLITS = ("train", "search", "eval")
_SPLIT_BUCKETS = {"train": range(0, 8), "search": range(8, 9), "eval": range(9, 10)}


@dataclass(frozen=True)
class Item:
    """One shape: kind, colour name, half-size in pixels, centre offset (dx, dy)."""
    shape: str
    colour: str
    half: int
    dx: int
    dy: int

    def to_dict(self):
        return {"shape": self.shape, "colour": self.colour, "half": self.half,
                "dx": self.dx, "dy": self.dy}


class Scene:
    """A 4x4 grid; ``cells[r][c]`` (0-indexed) is an :class:`Item` or ``None``."""

    def __init__(self, cells):
        self.cells = [list(row) for row in cells]

    def at(self, row: int, col: int):
        """The item at 1-indexed (row, col)."""
        return self.cells[row - 1][col - 1]

    def items(self):
        return [it for row in self.cells for it in row if it is not None]

    def to_dict(self):
        return {"grid": GRID, "cells": [[None if it is None else it.to_dict() for it in row]
                                        for row in self.cells]}

    @classmethod
    def from_dict(cls, d):
        return cls([[None if it is None else Item(**it) for it in row] for row in d["cells"]])

    def signature(self) -> str:
        """Content hash (ignores nothing that is drawn)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def split(self) -> str:
        bucket = int(self.signature()[:8], 16) % 10
        return next(s for s, b in _SPLIT_BUCKETS.items() if bucket in b)


def random_scene(rng: random.Random) -> Scene:
    cells = []
    for _ in range(GRID):
        row = []
        for _ in range(GRID):
            if rng.random() < P_EMPTY:
                row.append(None)
            else:
                row.append(Item(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)),
                                half=rng.choice((5, 6)), dx=rng.randint(-1, 1),
                                dy=rng.randint(-1, 1)))
        cells.append(row)
    return Scene(cells)


def render(scene: Scene) -> Image.Image:
    """Draw the scene (no antialiasing: every pixel is the background or a palette colour)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for r in range(GRID):
        for c in range(GRID):
            it = scene.cells[r][c]
            if it is None:
                continue
            cx = c * CELL + CELL // 2 + it.dx  # cell centre pixel is (c*16+8, r*16+8)
            cy = r * CELL + CELL // 2 + it.dy
            h, fill = it.half, COLOURS[it.colour]
            if it.shape == "circle":
                draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
            elif it.shape == "square":
                draw.rectangle([cx - h + 1, cy - h + 1, cx + h - 1, cy + h - 1], fill=fill)
            elif it.shape == "triangle":
                draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
            elif it.shape == "cross":
                w = 2
                draw.rectangle([cx - h, cy - w, cx + h, cy + w], fill=fill)
                draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
            else:  # pragma: no cover
                raise ValueError(it.shape)
    return img


def _where(row: int, col: int, rng: random.Random, allow_corner_names: bool) -> str:
    if allow_corner_names and rng.random() < 0.5:
        for name, rc in CORNERS.items():
            if rc == (row, col):
                return f"the {name} cell"
    return f"row {row} column {col}"


def answer(scene: Scene, qtype: str, args: dict) -> str:
    """Ground-truth answer of a question given by type and arguments."""
    if qtype in ("colour", "shape"):
        it = scene.at(*args["cell"])
        return NONE_ANSWER if it is None else (it.colour if qtype == "colour" else it.shape)
    if qtype == "same":
        a, b = scene.at(*args["cells"][0]), scene.at(*args["cells"][1])
        return "yes" if a.shape == b.shape else "no"
    if qtype == "count":
        return NUMBER_WORDS[sum(it.colour == args["colour"] for it in scene.items())]
    raise ValueError(qtype)


def random_question(scene: Scene, rng: random.Random, qtype: str | None = None):
    """Returns (question text, answer, question type, args)."""
    if qtype is None:
        qtype = rng.choice(QUESTION_TYPES)
    cells = [(r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1)]
    occupied = [rc for rc in cells if scene.at(*rc) is not None]
    if qtype == "same" and len(occupied) < 2:
        qtype = "colour"
    if qtype in ("colour", "shape"):
        # ask mostly about occupied cells; empty cells (answer "none") 1 time in 6
        pool = occupied if (occupied and rng.random() >= 1 / 6) else cells
        rc = rng.choice(pool)
        where = _where(*rc, rng, allow_corner_names=True)
        text = (f"what colour is the shape in {where} ?" if qtype == "colour"
                else f"what shape is in {where} ?")
        args = {"cell": list(rc)}
    elif qtype == "same":
        want_same = rng.random() < 0.5
        pairs = [(a, b) for i, a in enumerate(occupied) for b in occupied[i + 1:]
                 if (scene.at(*a).shape == scene.at(*b).shape) == want_same]
        if not pairs:
            pairs = [(a, b) for i, a in enumerate(occupied) for b in occupied[i + 1:]]
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        text = f"are the shapes in row {a[0]} column {a[1]} and row {b[0]} column {b[1]} the same shape ?"
        args = {"cells": [list(a), list(b)]}
    elif qtype == "count":
        colour = rng.choice(list(COLOURS))
        text = f"how many {colour} shapes are there ?"
        args = {"colour": colour}
    else:
        raise ValueError(qtype)
    return text, answer(scene, qtype, args), qtype, args


def _split_seed(seed: int, split: str) -> int:
    return int(hashlib.sha256(f"eos-demo/{seed}/{split}".encode()).hexdigest()[:16], 16)


def iter_scenes(split: str, seed: int = 0) -> Iterator[tuple[Scene, random.Random]]:
    """Endless deterministic stream of (scene, rng) for one split; rng then draws the questions."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(_split_seed(seed, split))
    while True:
        scene = random_scene(rng)
        if scene.split() == split:
            yield scene, rng


def iter_examples(split: str, seed: int = 0, turns_per_image: int = 1):
    """Endless stream of dicts {scene, image (PIL), qa: [(question, answer, qtype, args), ...]}.

    Question types cycle through :data:`QUESTION_TYPES` within each image's turns
    when ``turns_per_image`` >= 4, otherwise are drawn at random.
    """
    for scene, rng in iter_scenes(split, seed):
        if turns_per_image >= len(QUESTION_TYPES):
            types = list(QUESTION_TYPES) * (turns_per_image // len(QUESTION_TYPES))
            types += [rng.choice(QUESTION_TYPES) for _ in range(turns_per_image - len(types))]
            rng.shuffle(types)
        else:
            types = [None] * turns_per_image
        qa = [random_question(scene, rng, t) for t in types]
        yield {"scene": scene, "image": render(scene), "qa": qa}


def generate_split(out_dir: str, split: str, n_images: int, seed: int = 0,
                   turns_per_image: int = 1, json_name: str | None = None) -> str:
    """Write ``n_images`` PNGs under ``out_dir/images/`` and the LLaVA JSON ``out_dir/<split>.json``.

    With ``turns_per_image == 1`` each record is one question (ids ``<split>-<i>-q0``);
    with more, a record holds ``turns_per_image`` human/gpt turns about the same image,
    ``<image>`` only in the first human turn (LLaVA's own multi-turn layout), and
    ``question_type`` / ``question_args`` are lists. Returns the JSON path.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    stream = iter_examples(split, seed, turns_per_image)
    for i in range(n_images):
        ex = next(stream)
        rel = f"images/{split}-{i:06d}.png"
        # PNG bytes are deterministic for identical pixels and options
        ex["image"].save(os.path.join(out_dir, rel), format="PNG", optimize=False, compress_level=6)
        conv = []
        for t, (q, a, _, _) in enumerate(ex["qa"]):
            conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + q})
            conv.append({"from": "gpt", "value": a})
        types = [qt for _, _, qt, _ in ex["qa"]]
        args = [ar for _, _, _, ar in ex["qa"]]
        records.append({
            "id": f"{split}-{i:06d}-q0" if turns_per_image == 1 else f"{split}-{i:06d}",
            "image": rel,
            "conversations": conv,
            "question_type": types[0] if turns_per_image == 1 else types,
            "question_args": args[0] if turns_per_image == 1 else args,
            "scene": ex["scene"].to_dict(),
        })
    path = os.path.join(out_dir, json_name or f"{split}.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def generate_splits(out_dir: str, n_train: int = 2000, n_search: int = 500, n_eval: int = 500,
                    seed: int = 0, train_turns_per_image: int = 4) -> dict:
    """Write the three splits into one folder; returns {split: json path}."""
    return {
        "train": generate_split(out_dir, "train", n_train, seed, train_turns_per_image),
        "search": generate_split(out_dir, "search", n_search, seed, 1),
        "eval": generate_split(out_dir, "eval", n_eval, seed, 1),
    }


def load_split(json_path: str) -> list[dict]:
    """Read a split written by :func:`generate_split` as single-question samples.

    Returns a list of dicts {id, image_path (absolute), question, answer, question_type};
    multi-turn records are flattened to one sample per turn.
    """
    with open(json_path) as f:
        records = json.load(f)
    root = os.path.dirname(os.path.abspath(json_path))
    out = []
    for rec in records:
        conv = rec["conversations"]
        types = rec.get("question_type")
        types = types if isinstance(types, list) else [types]
        for t in range(len(conv) // 2):
            q = conv[2 * t]["value"].replace("<image>\n", "").replace("<image>", "").strip()
            out.append({"id": rec["id"] if len(conv) == 2 else f"{rec['id']}-q{t}",
                        "image_path": os.path.join(root, rec["image"]),
                        "question": q, "answer": conv[2 * t + 1]["value"],
                        "question_type": types[t] if t < len(types) else None})
    return out


def vocabulary() -> list[str]:
    """Every word that can appear in a prompt, question or answer (lower case)."""
    words = set()
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(NUMBER_WORDS)
    words.update([NONE_ANSWER, "yes", "no"])
    for phrase in ("what colour is the shape in row column ?", "what shape is in the cell",
                   "are the shapes in and the same shape", "how many shapes are there",
                   "top left right bottom", "user : assistant"):
        words.update(phrase.split())
    words.update(str(i) for i in range(1, GRID + 1))
    return sorted(words)
