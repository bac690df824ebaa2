"""The built-in demo: the synthetic task, the shipped model, a shortened ``eos-search --demo``, the CLI's --output."""
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


def _read_cell(img, row, col):
    """(colour name or None, shape or None) read back from the pixels of one 8x8 cell."""
    x0, y0 = (col - 1) * task.CELL, (row - 1) * task.CELL
    inked = [(x, y) for y in range(task.CELL) for x in range(task.CELL)
             if img.getpixel((x0 + x, y0 + y)) != task.BACKGROUND]
    if not inked:
        return None, None
    colours = {img.getpixel((x0 + x, y0 + y)) for x, y in inked}
    assert len(colours) == 1  # flat colour, no antialiasing
    name = next(n for n, rgb in task.COLOURS.items() if rgb in colours)
    assert all(x <= 6 and y <= 6 for x, y in inked)  # inside the cell: one object per vision patch
    ink = set(inked)
    if (0, 3) in ink:   # circle and cross reach the left edge at mid-height; square and triangle do not
        shape = "circle" if (1, 1) in ink else "cross"
    else:
        shape = "triangle" if (0, 6) in ink else "square"
    return name, shape


def test_answers_match_the_drawn_scene(tmp_path):
    path = task.generate_split(str(tmp_path), "eval", 60, seed=0)
    path4 = task.generate_split(str(tmp_path), "train", 15, seed=0, turns_per_image=4)
    checked = {qt: 0 for qt in task.QUESTION_TYPES}
    for rec in json.load(open(path)) + json.load(open(path4)):
        img = Image.open(tmp_path / rec["image"]).convert("RGB")
        assert img.size == (task.IMAGE_SIZE, task.IMAGE_SIZE)
        # everything below reads the PIXELS, not the scene record
        drawn = {(r, c): _read_cell(img, r, c) for r in range(1, task.GRID + 1) for c in range(1, task.GRID + 1)}
        objects = [v for v in drawn.values() if v[0] is not None]
        assert task.MIN_OBJECTS <= len(objects) <= task.MAX_OBJECTS
        scene = task.Scene.from_dict(rec["scene"])
        for (r, c), (colour, shape) in drawn.items():
            it = scene.at(r, c)
            assert (colour, shape) == ((None, None) if it is None else (it.colour, it.shape)), (rec["id"], r, c)
        conv = rec["conversations"]
        types = rec["question_type"] if isinstance(rec["question_type"], list) else [rec["question_type"]]
        args = rec["question_args"] if isinstance(rec["question_args"], list) else [rec["question_args"]]
        questions = [conv[2 * t]["value"] for t in range(len(types))]
        assert len(set(questions)) == len(questions)  # no repeated question in one conversation
        for t, (qt, ar) in enumerate(zip(types, args)):
            gold = conv[2 * t + 1]["value"]
            if qt in ("colour", "shape"):
                colour, shape = drawn[tuple(ar["cell"])]
                want = colour if qt == "colour" else shape
                assert gold == (want or task.NONE_ANSWER)
                assert "row {} column {}".format(*ar["cell"]) in questions[t]
            elif qt == "only":
                hits = [col for col, sh in objects if sh == ar["shape"]]
                assert len(hits) == 1 and gold == hits[0] and ar["shape"] in questions[t]
            else:
                assert gold == task.NUMBER_WORDS[sum(col == ar["colour"] for col, _ in objects)]
            checked[qt] += 1
    assert all(v > 5 for v in checked.values()), checked


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


# ----------------------------------------------------------------------------- the shipped model
def _shipped_report():
    from eos_kernels.demo import build

    path = os.path.join(build.checkpoint_path(), "training_report.json")
    if not os.path.isfile(path):
        pytest.fail(f"the demo checkpoint is not shipped ({path} missing)")
    return json.load(open(path))


def test_shipped_checkpoint_is_small_and_complete():
    from eos_kernels.demo import build

    folder = build.checkpoint_path()
    names = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "training_report.json"} <= names
    assert any(n.startswith("tokenizer") for n in names) and any("processor" in n for n in names)
    assert sum(os.path.getsize(os.path.join(folder, n)) for n in names) <= 10 * 1024 * 1024
    report = _shipped_report()
    runs = report["training_runs"]
    assert runs and all({"command", "seed", "started", "seconds"} <= set(r) for r in runs)


def test_shipped_model_loads_offline_and_needs_its_visual_tokens(tmp_path, monkeypatch):
    """The held-out sample the report names (its first questions): full-token accuracy as stated (within a
    small tolerance: other torch builds may flip a near-tie), pruned to 1/8 after an early layer clearly lower."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from eos_kernels import Theta
    from eos_kernels.demo import build
    from eos_kernels.search import SearchConfig, evaluate

    report = _shipped_report()
    sample = report["test_sample"]
    model, processor = build.load_demo_model()
    data = task.generate_split(str(tmp_path), "eval", sample["questions"], seed=sample["seed"])
    thetas = [Theta.from_dict(sample["pruned_theta"]) if name != "full" else Theta(name="full")
              for name in ("full", "pruned")]
    res = evaluate(SearchConfig(data=data, output=str(tmp_path), batch_size=100, max_new_tokens=3), thetas,
                   model=model, processor=processor, write=False)["results"]
    full, pruned = res[0]["accuracy"], res[1]["accuracy"]
    # a held-out split loaded once (as the demo driver does) gives the same results
    from eos_kernels.search.data import load_dataset

    held = load_dataset(data, processor, num_visual_tokens=build.NUM_VISUAL_TOKENS,
                        image_token_id=model.config.image_token_id)
    again = evaluate(SearchConfig(data=data, output=str(tmp_path), batch_size=100, max_new_tokens=3), thetas[1:],
                     model=model, processor=processor, dataset=held, write=False)["results"]
    assert (again[0]["correct"], again[0]["answer_ce"]) == (res[1]["correct"], res[1]["answer_ce"])
    held.num_visual_tokens = None  # as if loaded for a model without a fixed count
    with pytest.raises(ValueError, match="dataset= was loaded for another model"):
        evaluate(SearchConfig(data=data, output=str(tmp_path)), thetas[1:], model=model, processor=processor,
                 dataset=held, write=False)
    with pytest.raises(ValueError, match="eval_limit applies when evaluate"):
        evaluate(SearchConfig(data=data, output=str(tmp_path), eval_limit=3), thetas[1:], model=model,
                 processor=processor, dataset=held, write=False)
    with pytest.raises(TypeError, match="dataset= must be"):
        evaluate(SearchConfig(data=data, output=str(tmp_path)), thetas[1:], model=model, processor=processor,
                 dataset=held.examples, write=False)
    assert abs(full - sample["accuracy_full"]) <= 0.02, (full, sample)
    assert abs(pruned - sample["accuracy_pruned"]) <= 0.03, (pruned, sample)
    assert full >= pruned + 0.10, (full, pruned)


# ----------------------------------------------------------------------------- eos-search --demo
def test_short_demo_run_writes_theta_log_plots_and_table(tmp_path, capsys):
    """The --demo pipeline (search with a round of local moves, baselines at two budgets, held-out evaluation,
    outputs) on the shipped model, shortened: 3 search steps, 12 held-out questions."""
    from eos_kernels import Theta
    from eos_kernels.search.cli import main

    out = tmp_path / "demo"
    rc = main(["--demo", "--steps", "3", "--search-images", "16", "--eval-images", "12", "--output", str(out),
               "--no-progress", "--threads", "1", "--local-moves-every", "2"])
    assert rc == 0
    theta = Theta.from_json(str(out / "theta.json"))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 3
    assert log[0]["local_moves"] is None and log[2]["local_moves"]["tried"]  # a round before step 3
    moves = {(c["kind"], c.get("from"), c.get("to")) for c in log[2]["local_moves"]["tried"]}
    assert ("move", 1, 0) in moves and ("move", 4, 5) in moves  # warm-start slots 1, 2, 4 may move to free layers
    for png in ("trajectories.png", "profile.png", "loss.png", "accuracy_vs_tokens.png"):
        assert (out / png).stat().st_size > 0
    summary = json.load(open(out / "demo_results.json"))
    rows = summary["results"]
    assert [r["family"] for r in rows[:11]] == ["full"] + 2 * ["fastv", "sparsevlm-style", "merge", "pool",
                                                               "eos-searched"]
    assert [r["family"] for r in rows[11:]] in ([], ["eos-searched"])  # the search's own schedule, if different
    assert all(r["answers"] == 12 and r["prefill_ms"] > 0 for r in rows)
    assert all(r["tokens"]["final"] <= r["budget"] for r in rows[1:])
    def ops(reducers):  # layers and operators; the retain schedule may be rescaled to the budget
        return [{k: v for k, v in r.items() if k != "keep"} for r in reducers]
    want = ops(theta.to_dict()["reducers"])
    assert ops(rows[5]["theta_config"]["reducers"]) == want and ops(rows[10]["theta_config"]["reducers"]) == want
    assert len(summary["search_parameters"]) == 8 and "g" in summary["search_parameters"][0]
    md = open(out / "demo_results.md").read()
    assert "| configuration |" in md and "Where the search ended" in md
    assert "eos-searched@8" in capsys.readouterr().out


# ----------------------------------------------------------------------------- eos-search --output
@pytest.mark.parametrize("demo", [False, True])
def test_output_that_is_a_file_is_a_clear_error_before_loading(tmp_path, capsys, monkeypatch, demo):
    from eos_kernels.search import cli

    def no_loading(*a, **k):  # pragma: no cover - reached only if the check came too late
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr("eos_kernels.search.driver.load_model", no_loading)
    monkeypatch.setattr("eos_kernels.search.model_loading.load_model", no_loading)
    monkeypatch.setattr("eos_kernels.demo.build.load_demo_model", no_loading)
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    for bad in (afile, afile / "sub"):
        args = (["--demo"] if demo else ["--model", str(tmp_path), "--data", str(afile), "--budget", "8"])
        rc = cli.main(args + ["--output", str(bad)])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "--output" in err and "Traceback" not in err
    assert afile.read_text() == "not a folder"


def test_output_that_is_not_writable_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from eos_kernels.search import cli

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.NamedTemporaryFile", refuse)  # root may write anywhere: simulate the refusal
    rc = cli.main(["--model", str(tmp_path), "--data", "x.json", "--budget", "8", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err and "Traceback" not in err
