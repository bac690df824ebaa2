"""A synthetic visual question-answering task whose answers live in specific image regions.

Scenes
------
A 64x64 RGB image on a plain light-grey background, divided into an 8x8 grid of
8x8-pixel cells (rows and columns numbered 1..8 from the top left). Between
``MIN_OBJECTS`` and ``MAX_OBJECTS`` cells hold one flat-coloured,
non-antialiased shape each -- a ``circle``, ``square``, ``triangle`` (apex up)
or ``cross`` (a thin plus sign), drawn inside the cell's top-left 7x7 pixels --
in one of five colours (``red``, ``green``, ``blue``, ``yellow``, ``purple``);
the other cells are empty. One shape kind (the scene's *unique* kind) appears
exactly once; the other objects are of the three other kinds. Every shape
covers the pixel at offset (3, 3) of its cell, so the colour sampled there is
the shape's colour (or the background colour for an empty cell).

With the demo model's patch size of 8, **each cell is exactly one vision patch,
so each of the 64 visual tokens sees one whole object** (or an empty cell): a
question about one cell needs one of the 64 tokens, a count every object of a
colour (10 to 18 objects per scene, so 1/8 of the tokens cannot hold them all).

Questions (one-word answers)
----------------------------
By position:

- ``colour``: "what colour is the shape in row 2 column 7 ?" -> a colour, or
  ``none`` for an empty cell (empty cells are asked 1 time in 6);
- ``shape``: "what shape is in row 4 column 1 ?" -> a shape, or ``none``.

By content:

- ``only``: "what colour is the only triangle ?" -> a colour (the scene's
  unique kind);
- ``count``: "how many red shapes are there ?" -> a number word (``zero`` ...).

Splits
------
``train`` / ``search`` / ``eval`` are disjoint by construction: a scene belongs
to the split selected by a SHA-256 hash of its content (buckets 0-7 train, 8
search, 9 eval), and each split's generator rejects scenes of other splits. The
random streams are seeded from ``(seed, split)``, so the same arguments always
give byte-identical JSON and PNG files. Multi-turn training records never repeat
a question within one image's conversation (with 4 turns: one question of each
type), so a later turn cannot copy an earlier answer instead of looking.

:func:`generate_split` / :func:`generate_splits` write the LLaVA JSON format::

    [{"id": "eval-000000-q0", "image": "images/eval-000000.png",
      "conversations": [{"from": "human", "value": "<image>\\nwhat shape is in row 1 column 2 ?"},
                        {"from": "gpt", "value": "circle"}],
      "question_type": "shape", "question_args": {"cell": [1, 2]}, "scene": {...}}, ...]

(``image`` is relative to the JSON file's folder; ``question_type``,
``question_args`` and ``scene`` are extra keys that LLaVA loaders ignore: the
ground truth.) The train split may hold several question/answer turns per image
(``turns_per_image``); the search and eval splits hold one.
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
GRID = 8
CELL = IMAGE_SIZE // GRID  # 8 px: one vision patch of the demo model
MIN_OBJECTS, MAX_OBJECTS = 10, 18
P_EMPTY_QUESTION = 1 / 6  # position questions about an empty cell (answer "none")
BACKGROUND = (235, 235, 235)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
QUESTION_TYPES = ("colour", "shape", "only", "count")
NONE_ANSWER = "none"
SPLITS = ("train", "search", "eval")
_SPLIT_BUCKETS = {"train": range(0, 8), "search": range(8, 9), "eval": range(9, 10)}
#: the pixel (offset inside a cell) that every shape covers
PROBE = (3, 3)


@dataclass(frozen=True)
class Item:
    """One shape: kind and colour name."""
    shape: str
    colour: str

    def to_dict(self):
        return {"shape": self.shape, "colour": self.colour}


class Scene:
    """An 8x8 grid; ``cells[r][c]`` (0-indexed) is an :class:`Item` or ``None``."""

    def __init__(self, cells):
        self.cells = [list(row) for row in cells]

    def at(self, row: int, col: int):
        """The item at 1-indexed (row, col)."""
        return self.cells[row - 1][col - 1]

    def items(self):
        return [it for row in self.cells for it in row if it is not None]

    def unique_shapes(self) -> list:
        """The shape kinds that appear exactly once (one kind in the task's scenes)."""
        kinds = [it.shape for it in self.items()]
        return [s for s in SHAPES if kinds.count(s) == 1]

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


def random_scene(rng: random.Random, n_objects: tuple[int, int] | None = None, dominant: float = 0.0) -> Scene:
    """Objects in random cells, one shape kind exactly once.

    By default 10-18 objects (the task's scenes; the other kinds each appear at
    least twice, so the unique kind is the only kind that appears once).
    ``n_objects=(low, high)`` draws another range (the training curriculum's
    easier scenes, ``low >= 1``); with fewer than 7 objects other kinds may
    appear once too. ``dominant`` (training curriculum only) is the probability
    that an object takes the scene's one dominant colour instead of a random
    colour: a near-uniform average of the visual tokens then shows the answer.
    """
    low, high = n_objects or (MIN_OBJECTS, MAX_OBJECTS)
    if not 1 <= low <= high <= GRID * GRID:
        raise ValueError(f"n_objects must be 1 <= low <= high <= {GRID * GRID}, got {n_objects}")
    n = rng.randint(low, high)
    where = rng.sample(range(GRID * GRID), n)
    unique = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != unique]
    if n >= 7:
        kinds = [unique] + [others[i % 3] for i in range(6)] + [rng.choice(others) for _ in range(n - 7)]
    else:
        kinds = [unique] + [rng.choice(others) for _ in range(n - 1)]
    rng.shuffle(kinds)
    cells = [[None] * GRID for _ in range(GRID)]
    main = rng.choice(list(COLOURS)) if dominant > 0 else None
    for pos, kind in zip(where, kinds):
        colour = main if (dominant > 0 and rng.random() < dominant) else rng.choice(list(COLOURS))
        cells[pos // GRID][pos % GRID] = Item(shape=kind, colour=colour)
    return Scene(cells)


def draw_shape(draw: ImageDraw.ImageDraw, x0: int, y0: int, shape: str, fill) -> None:
    """One shape in the 7x7 pixels at (x0, y0)..(x0 + 6, y0 + 6); all cover (x0 + 3, y0 + 3)."""
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + 6, y0 + 6], fill=fill)
    elif shape == "square":
        draw.rectangle([x0 + 1, y0 + 1, x0 + 5, y0 + 5], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + 3, y0), (x0, y0 + 6), (x0 + 6, y0 + 6)], fill=fill)
    elif shape == "cross":
        draw.rectangle([x0, y0 + 3, x0 + 6, y0 + 3], fill=fill)
        draw.rectangle([x0 + 3, y0, x0 + 3, y0 + 6], fill=fill)
    else:  # pragma: no cover
        raise ValueError(shape)


def render(scene: Scene) -> Image.Image:
    """Draw the scene (no antialiasing: every pixel is the background or a palette colour)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for r in range(GRID):
        for c in range(GRID):
            it = scene.cells[r][c]
            if it is not None:
                draw_shape(draw, c * CELL, r * CELL, it.shape, COLOURS[it.colour])
    return img


def answer(scene: Scene, qtype: str, args: dict) -> str:
    """Ground-truth answer of a question given by type and arguments."""
    if qtype in ("colour", "shape"):
        it = scene.at(*args["cell"])
        return NONE_ANSWER if it is None else (it.colour if qtype == "colour" else it.shape)
    if qtype == "only":
        hits = [it for it in scene.items() if it.shape == args["shape"]]
        if len(hits) != 1:
            raise ValueError(f"the scene has {len(hits)} {args['shape']}s, not exactly one")
        return hits[0].colour
    if qtype == "count":
        return NUMBER_WORDS[sum(it.colour == args["colour"] for it in scene.items())]
    raise ValueError(qtype)


def question_text(qtype: str, args: dict) -> str:
    if qtype == "colour":
        return "what colour is the shape in row {} column {} ?".format(*args["cell"])
    if qtype == "shape":
        return "what shape is in row {} column {} ?".format(*args["cell"])
    if qtype == "only":
        return f"what colour is the only {args['shape']} ?"
    if qtype == "count":
        return f"how many {args['colour']} shapes are there ?"
    raise ValueError(qtype)


def random_question(scene: Scene, rng: random.Random, qtype: str | None = None, avoid=()):
    """Returns (question text, answer, question type, args); never a question text in ``avoid``."""
    if qtype is None:
        qtype = rng.choice(QUESTION_TYPES)
    cells = [(r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1)]
    occupied = [rc for rc in cells if scene.at(*rc) is not None]
    for _ in range(100):
        if qtype in ("colour", "shape"):
            pool = occupied if rng.random() >= P_EMPTY_QUESTION else cells
            args = {"cell": list(rng.choice(pool))}
        elif qtype == "only":
            args = {"shape": rng.choice(scene.unique_shapes())}
        elif qtype == "count":
            args = {"colour": rng.choice(list(COLOURS))}
        else:
            raise ValueError(qtype)
        text = question_text(qtype, args)
        if text not in avoid:
            return text, answer(scene, qtype, args), qtype, args
    raise RuntimeError(f"no new {qtype} question for this scene")  # pragma: no cover


def _split_seed(seed: int, split: str) -> int:
    return int(hashlib.sha256(f"eos-demo-v2/{seed}/{split}".encode()).hexdigest()[:16], 16)


def iter_scenes(split: str, seed: int = 0, n_objects=None) -> Iterator[tuple[Scene, random.Random]]:
    """Endless deterministic stream of (scene, rng) for one split; rng then draws the questions.

    ``n_objects``: a ``(low, high)`` range for :func:`random_scene`, or a callable
    ``rng -> (low, high)`` or ``rng -> ((low, high), dominant)`` drawn per scene
    (the training curriculum); default the task's.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(_split_seed(seed, split))
    while True:
        spec = n_objects(rng) if callable(n_objects) else n_objects
        if spec is not None and isinstance(spec[0], tuple):
            scene = random_scene(rng, spec[0], spec[1])
        else:
            scene = random_scene(rng, spec)
        if scene.split() == split:
            yield scene, rng


def question_types(rng: random.Random, turns: int) -> list:
    """Types of one image's turns: each type once per 4 turns (shuffled); one turn: uniform at random."""
    if turns == 1:
        return [rng.choice(QUESTION_TYPES)]
    types = []
    while len(types) < turns:
        block = list(QUESTION_TYPES)
        rng.shuffle(block)
        types += block
    types = types[:turns]
    # "only" has one question per scene (the task's scenes): never twice in one conversation
    seen, out = False, []
    for t in types:
        if t == "only":
            if seen:
                t = rng.choice(("colour", "shape"))
            seen = True
        out.append(t)
    return out


def iter_examples(split: str, seed: int = 0, turns_per_image: int = 1, n_objects=None):
    """Endless stream of dicts {scene, image (PIL), qa: [(question, answer, qtype, args), ...]}.

    The questions of one image are all different (see :func:`question_types`);
    ``n_objects`` as in :func:`iter_scenes`.
    """
    for scene, rng in iter_scenes(split, seed, n_objects):
        qa = []
        for t in question_types(rng, turns_per_image):
            qa.append(random_question(scene, rng, t, avoid={q for q, _, _, _ in qa}))
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
    """Every word that can appear in a question or answer (lower case)."""
    words = set()
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(NUMBER_WORDS)
    words.add(NONE_ANSWER)
    for phrase in ("what colour is the shape in row column ?", "what shape is in", "what colour is the only",
                   "how many shapes are there"):
        words.update(phrase.split())
    words.update(str(i) for i in range(1, GRID + 1))
    return sorted(words)
