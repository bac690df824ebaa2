"""The built-in demo: the synthetic task, the shipped model, a shortened ``eos-search --demo``, the CLI's --output."""
import json
import os

import pytest
import torch
from PIL import Image

from eos_kernels.demo import task
from eos_kernels.demo.baselines import FAMILIES

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
def test_short_demo_run_matched_cost_protocol(tmp_path, capsys, monkeypatch):
    """The --demo pipeline on the shipped model, shortened (one budget, 3 search steps, 16 tuning and 12 held-out
    questions, in this process): tuning reads only the search split, the held-out split is read once per
    configuration, FLOPs ratios are Theta.token_report's, every reported Θ is its own file, prefill times warm up."""
    from eos_kernels import Theta
    from eos_kernels.demo import workers
    from eos_kernels.search.cli import main

    tuned, evaluated = [], []
    real_tune, real_eval = workers._tune, workers._evaluate

    def spy_tune(thetas, indices, batch_size):
        tuned.append((len(thetas), list(indices)))
        return real_tune(thetas, indices, batch_size)

    def spy_eval(theta, batch_size, max_new_tokens):
        evaluated.append(theta["name"])
        return real_eval(theta, batch_size, max_new_tokens)

    monkeypatch.setattr(workers, "_tune", spy_tune)
    monkeypatch.setattr(workers, "_evaluate", spy_eval)
    search_ds = {}
    from eos_kernels.search import scoring

    real_batches = scoring.ScoringBatches

    class SpyBatches(real_batches):
        def __init__(self, data, indices, batch_size, device, dtype):
            search_ds.setdefault("paths", set()).add(data.path)
            super().__init__(data, indices, batch_size, device, dtype)

    monkeypatch.setattr(scoring, "ScoringBatches", SpyBatches)
    out = tmp_path / "demo"
    rc = main(["--demo", "--budgets", "8", "--steps", "3", "--search-images", "16", "--eval-images", "12",
               "--tune-questions", "16", "--output", str(out), "--no-progress", "--threads", "1", "--workers", "1",
               "--eval-batch-size", "8"])
    assert rc == 0, capsys.readouterr().err
    summary = json.load(open(out / "demo_results.json"))
    # tuning: the search split only, its first 16 questions
    assert search_ds["paths"] == {str(out / "data" / "search.json")}
    assert all(ix == list(range(16)) for _, ix in tuned)
    assert summary["baselines_tuned"] + 2 == sum(n for n, _ in tuned)  # and the searched Θ and its prune twin
    # the held-out split: once per configuration, every configuration reported
    assert len(evaluated) == len(set(evaluated)) == len(summary["results"])
    assert {r["config"] for r in summary["results"]} == set(evaluated)
    L, n, text = summary["num_layers"], summary["num_visual_tokens"], summary["text_tokens"]
    for r in summary["results"]:
        theta = Theta.from_json(str(out / r["theta_file"]))  # every reported Θ in its own file, named as in the table
        assert theta.to_dict() == r["theta_config"] and theta.name == r["config"]
        rep = theta.token_report(n, L, text, hidden_size=128, intermediate_size=256)
        assert r["tokens"]["prefill_flops_ratio"] == pytest.approx(rep["prefill_flops_ratio"], rel=1e-12)
        assert r["flops"] == pytest.approx(rep["prefill_flops_ratio"], rel=1e-12)
        assert r["answers"] == 12 and 0 <= r["accuracy"] <= 1
        if r["family"] not in ("full", "eos-searched", "prune-at-searched"):
            assert r["tuning_accuracy"] is not None and r["tokens"]["final"] <= 8
    (cmp,) = summary["comparison"]
    assert cmp["budget"] == 8 and cmp["searched"] == "eos-searched@8" and set(cmp["matched"]) == set(FAMILIES)
    timed = [r for r in summary["results"] if r["prefill_ms"] is not None]
    assert {r["config"] for r in timed} >= {"full", "eos-searched@8"} and all(r["prefill_ms"] > 0 for r in timed)
    log = [json.loads(line) for line in open(out / "searches" / "eos-searched-B8" / "log.jsonl")]
    assert [rec.get("forward") for rec in log] == ["relaxed", "relaxed", "hard-finish"]  # hard_finish: 0.25 of 3 steps
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    md = open(out / "demo_results.md").read()
    assert "| budget | searched Θ" in md and "Where the search for eos-searched@8 ended" in md
    assert "eos-searched@8" in capsys.readouterr().out
    # a second run into the same folder is refused, naming --overwrite; the results are left as they were
    before = (out / "demo_results.json").read_bytes()
    assert main(["--demo", "--budgets", "8", "--steps", "1", "--output", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "demo_results.json").read_bytes() == before


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


def test_worker_processes_give_the_results_of_this_process(tmp_path):
    """The demo's jobs in two spawned single-threaded processes equal the same jobs run here (one thread):
    tuning scores and a held-out evaluation of a few configurations."""
    from eos_kernels import Theta
    from eos_kernels.demo.workers import Jobs, Setup

    search = task.generate_split(str(tmp_path), "search", 12, seed=1)
    held = task.generate_split(str(tmp_path), "eval", 8, seed=1)
    setup = Setup(model=None, device="cpu", dtype="auto", search_json=search, eval_json=held, image_folder=None,
                  impl="torch")
    thetas = [Theta(name="none").to_dict(), Theta.fastv(2, 8, name="f").to_dict(),
              Theta.pool(None, (2, 4), schedule=(20, 6), num_visual_tokens=64, num_layers=8, name="p").to_dict()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Jobs(setup, 1) as here:
            local = (here.tune(thetas, range(12), 6, chunk=2), here.evaluate(thetas[1:2], 4, 3))
        with Jobs(setup, 2) as pool:
            remote = (pool.tune(thetas, range(12), 6, chunk=2), pool.evaluate(thetas[1:2], 4, 3))
    finally:
        torch.set_num_threads(threads)
    assert local[0] == remote[0]
    assert local[1][0]["accuracy"] == remote[1][0]["accuracy"] and local[1][0]["tokens"] == remote[1][0]["tokens"]
