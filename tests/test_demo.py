"""The built-in demo: the synthetic task, the shipped model, and a shortened ``eos-search --demo``."""
import json
import os

import pytest
import torch
from PIL import Image

from eos_kernels.demo import task

pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- the task
def _files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_generator_is_deterministic(tmp_path):
    for run in ("a", "b"):
        task.generate_split(str(tmp_path / run), "eval", 12, seed=3)
        task.generate_split(str(tmp_path / run), "train", 6, seed=3, turns_per_image=4)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 12 + 6 + 2
    assert all(a[k] == b[k] for k in a)  # identical JSON and PNG bytes
    other = task.generate_split(str(tmp_path / "c"), "eval", 12, seed=4)
    assert json.load(open(other)) != json.load(open(tmp_path / "a" / "eval.json"))


def _classify(img, row, col, item):
    """Read the shape back from the pixels around its (jittered) centre."""
    cx = (col - 1) * task.CELL + task.CELL // 2 + item.dx
    cy = (row - 1) * task.CELL + task.CELL // 2 + item.dy
    h = item.half
    inked = lambda x, y: img.getpixel((x, y)) != task.BACKGROUND  # noqa: E731
    if inked(cx - h + 1, cy - h + 1):
        return "square"            # only the square fills its bounding box's corner
    if inked(cx - h + 1, cy + h - 1):
        return "triangle"          # the triangle's base spans the bottom
    if inked(cx - h // 2 - 1, cy - h // 2 - 1):
        return "circle"            # the diagonal is inside the disc, outside the cross's arms
    return "cross"


def test_answers_match_the_drawn_scene(tmp_path):
    path = task.generate_split(str(tmp_path), "eval", 60, seed=0)
    records = json.load(open(path))
    checked = {qt: 0 for qt in task.QUESTION_TYPES}
    for rec in records:
        img = Image.open(tmp_path / rec["image"]).convert("RGB")
        scene = task.Scene.from_dict(rec["scene"])
        # the picture is the scene: each cell's centre colour and shape read back from the pixels
        for r in range(1, task.GRID + 1):
            for c in range(1, task.GRID + 1):
                it = scene.at(r, c)
                centre = (c * task.CELL - task.CELL // 2, r * task.CELL - task.CELL // 2)
                want = task.BACKGROUND if it is None else task.COLOURS[it.colour]
                assert img.getpixel(centre) == want, (rec["id"], r, c)
                if it is not None:
                    assert _classify(img, r, c, it) == it.shape, (rec["id"], r, c)
        # the answer follows from what is drawn
        qt, args = rec["question_type"], rec["question_args"]
        gold = rec["conversations"][1]["value"]
        if qt in ("colour", "shape"):
            it = scene.at(*args["cell"])
            assert gold == (task.NONE_ANSWER if it is None else (it.colour if qt == "colour" else it.shape))
        elif qt == "same":
            a, b = (scene.at(*c) for c in args["cells"])
            assert gold == ("yes" if a.shape == b.shape else "no")
        else:
            n = sum(1 for it in scene.items() if it.colour == args["colour"])
            assert gold == task.NUMBER_WORDS[n]
        checked[qt] += 1
    assert all(v > 0 for v in checked.values()), checked


def test_splits_are_disjoint():
    seen = {}
    for split in task.SPLITS:
        stream = task.iter_scenes(split, seed=0)
        seen[split] = {next(stream)[0].signature() for _ in range(150)}
    assert not (seen["train"] & seen["search"]) and not (seen["train"] & seen["eval"])
    assert not (seen["search"] & seen["eval"])


# ----------------------------------------------------------------------------- the model
def test_demo_model_architecture_and_processor_round_trip(tmp_path):
    """The LLaVA built for the demo: stock classes, GQA, >= 8 layers, 64 visual tokens; saves and
    loads offline with from_pretrained, and the processor expands <image> to the visual tokens."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from eos_kernels.demo import build

    model, processor = build.build_model(), build.build_processor()
    text = model.config.text_config
    assert text.num_hidden_layers >= 8 and text.num_key_value_heads < text.num_attention_heads
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    proc = AutoProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (task.IMAGE_SIZE, task.IMAGE_SIZE), task.BACKGROUND)
    inputs = proc(text="USER: <image>\nhow many red shapes are there ? ASSISTANT:", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == again.config.image_token_id).sum()) == build.NUM_VISUAL_TOKENS == 64
    assert proc.tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()
    with torch.no_grad():
        a = model(**inputs).logits
        b = again(**inputs).logits
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- eos-search --demo
def test_short_demo_run_writes_theta_log_plots_and_table(tmp_path, capsys, monkeypatch):
    """The --demo pipeline (search, baselines, evaluation, outputs) on an UNTRAINED model of the demo's
    architecture: no trained checkpoint is shipped yet (see eos_kernels/demo/__init__.py)."""
    from eos_kernels import Theta
    from eos_kernels.demo import build
    from eos_kernels.search.cli import main

    ckpt = tmp_path / "ckpt"
    build.build_model().save_pretrained(ckpt)
    build.build_processor().save_pretrained(ckpt)
    monkeypatch.setattr(build, "checkpoint_path", lambda: str(ckpt))
    out = tmp_path / "demo"
    rc = main(["--demo", "--steps", "3", "--search-images", "16", "--eval-images", "16", "--output", str(out),
               "--no-progress", "--threads", str(torch.get_num_threads())])
    assert rc == 0
    theta = Theta.from_json(str(out / "theta.json"))
    assert len(open(out / "log.jsonl").read().splitlines()) == 3
    for png in ("trajectories.png", "profile.png", "loss.png"):
        assert (out / png).stat().st_size > 0
    summary = json.load(open(out / "demo_results.json"))
    names = [r["theta"] for r in summary["results"]]
    assert names[0] == "full" and names[-1].startswith("eos-searched") and len(names) == 6
    assert all(r["answers"] == 16 for r in summary["results"])
    assert all(r["final"] <= 8 for r in summary["results"][1:])
    assert summary["results"][-1]["theta_config"]["reducers"] == theta.to_dict()["reducers"]
    assert "eos-searched" in capsys.readouterr().out
