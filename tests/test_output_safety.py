"""``eos-search``, ``--eval`` and ``--demo`` never lose a user's files (issue 17, item 5).

Each command refuses, with exit code 2 and a message naming ``--overwrite``, an ``--output`` that already
holds a file it would write, before any model loads, and leaves that file byte for byte as it was;
``--overwrite`` replaces, ``--resume`` continues. A command that fails leaves no empty ``--output`` folder
that it made itself. The search runs on the tiny random LLaVA of ``tests/test_search.py`` (CPU).
"""
import json
import os
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

from eos_kernels.search import SearchConfig, run  # noqa: E402
from eos_kernels.search.cli import main  # noqa: E402

from _tiny_models import save_tiny_llava, write_llava_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

USER_BYTES = b'{"mine": "a result I wrote by hand"}\n'


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return SimpleNamespace(model=save_tiny_llava(root / "model"),
                           data=write_llava_dataset(str(root / "data"), n=4, seed=0),
                           heldout=write_llava_dataset(str(root / "heldout"), n=2, seed=3))


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the refusals must come before it."""
    def refuse(*a, **k):  # pragma: no cover - reached only if a check came too late
        raise AssertionError("a model was loaded before --output was checked")

    for target in ("eos_kernels.search.driver.load_model", "eos_kernels.search.model_loading.load_model",
                   "eos_kernels.demo.build.load_demo_model"):
        monkeypatch.setattr(target, refuse)


def search_args(env, out, *extra, budget="6", steps="1", plots=False):
    return ["--model", env.model, "--data", env.data, "--budget", budget, "--steps", steps, "--batch-size", "2",
            "--output", str(out), "--no-progress", "--plots" if plots else "--no-plots", *extra]


def eval_args(env, out, *specs_and_extra):
    return ["--eval", *specs_and_extra, "--model", env.model, "--data", env.heldout, "--output", str(out),
            "--batch-size", "2", "--max-new-tokens", "2"]


def refused(rc, capsys):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--overwrite" in err and "Traceback" not in err, err
    return err


def plant(folder, name, content=USER_BYTES):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# ----------------------------------------------------------------------------- the search
@pytest.mark.parametrize("name", ["theta.json", "search_state.pt", "log.jsonl", "loss.png", "trajectories.png"])
def test_search_refuses_an_output_holding_a_file_it_would_write(env, tmp_path, capsys, no_loading, name):
    out = tmp_path / "out"
    user = plant(out, name)
    err = refused(main(search_args(env, out, plots=True)), capsys)  # with plots: every file the search writes
    assert name in err
    assert user.read_bytes() == USER_BYTES
    assert sorted(os.listdir(out)) == [name]


def test_search_without_plots_leaves_plot_files_alone(env, tmp_path, capsys):
    out = tmp_path / "out"
    user = plant(out, "loss.png")
    assert main(search_args(env, out)) == 0, capsys.readouterr().err
    assert user.read_bytes() == USER_BYTES  # --no-plots writes no plot: nothing to refuse, nothing replaced
    assert (out / "theta.json").is_file()


def test_search_overwrite_replaces_and_resume_continues(env, tmp_path, capsys):
    out = tmp_path / "out"
    user = plant(out, "theta.json")
    assert main(search_args(env, out, "--overwrite", "--stop-after", "1", steps="2")) == 0
    assert user.read_bytes() != USER_BYTES and json.loads(user.read_text())["schema"] == "eos_kernels.theta"
    capsys.readouterr()
    # a second plain search into the same folder is refused; --resume continues it
    refused(main(search_args(env, out, steps="2")), capsys)
    assert main(search_args(env, out, "--resume", steps="2")) == 0, capsys.readouterr().err
    with open(out / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_python_api_refuses_too(env, tmp_path):
    out = tmp_path / "out"
    user = plant(out, "theta.json")
    config = SearchConfig(model=env.model, data=env.data, budget=6, steps=1, batch_size=2, output=str(out),
                          progress=False, plots=False)
    with pytest.raises(ValueError, match="already holds theta.json.*--overwrite"):
        run(config)
    assert user.read_bytes() == USER_BYTES


# ----------------------------------------------------------------------------- --eval
def test_a_second_eval_is_refused_and_overwrite_replaces(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(eval_args(env, out, "none")) == 0
    first = (out / "eval.json").read_bytes()
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:  # refused before any model loads
        mp.setattr("eos_kernels.search.model_loading.load_model",
                   lambda *a, **k: pytest.fail("the model was loaded before eval.json was checked"))
        err = refused(main(eval_args(env, out, "fastv-1-4")), capsys)
    assert "eval.json" in err
    assert (out / "eval.json").read_bytes() == first
    assert main(eval_args(env, out, "fastv-1-4") + ["--overwrite"]) == 0
    assert [r["spec"] for r in json.loads((out / "eval.json").read_text())["results"]] == ["fastv-1-4"]


def test_eval_beside_a_search_is_allowed(env, tmp_path, capsys):
    """eval.json is not a search file, and a search writes no eval.json: the two share a folder."""
    out = tmp_path / "out"
    user = plant(out, "theta.json")
    assert main(eval_args(env, out, "none")) == 0, capsys.readouterr().err
    assert user.read_bytes() == USER_BYTES and (out / "eval.json").is_file()


# ----------------------------------------------------------------------------- --demo
@pytest.mark.parametrize("name", ["demo_results.json", "demo_results.md", "accuracy_vs_flops.png", "searches",
                                  "thetas", "data"])
def test_demo_refuses_an_output_holding_a_file_it_would_write(tmp_path, capsys, no_loading, name):
    out = tmp_path / "demo"
    user = plant(out, name)
    err = refused(main(["--demo", "--output", str(out), "--no-progress"]), capsys)
    assert name in err
    assert user.read_bytes() == USER_BYTES
    assert sorted(os.listdir(out)) == [name]  # not even the synthetic splits were written


def test_demo_writes_beside_a_finished_search_and_refuses_a_second_demo(env, tmp_path, capsys):
    """The demo keeps its searches in searches/<name>/ and its Θ in thetas/: a search already in the folder
    stays as it was; a second demo is refused, and --overwrite replaces the first demo's results."""
    out = tmp_path / "demo"
    assert main(search_args(env, out)) == 0
    before = {p: (out / p).read_bytes() for p in ("theta.json", "search_state.pt", "log.jsonl")}
    capsys.readouterr()
    short = ["--demo", "--output", str(out), "--budgets", "4", "--steps", "2", "--search-images", "8",
             "--eval-images", "4", "--tune-questions", "4", "--workers", "1", "--no-progress", "--threads", "1"]
    assert main(short) == 0, capsys.readouterr().err
    assert {p: (out / p).read_bytes() for p in before} == before
    first = (out / "demo_results.json").read_bytes()
    refused(main(short), capsys)
    assert (out / "demo_results.json").read_bytes() == first
    assert main(short + ["--overwrite"]) == 0, capsys.readouterr().err
    assert {p: (out / p).read_bytes() for p in before} == before
    assert (out / "searches" / "eos-searched-B4" / "log.jsonl").is_file()


# ----------------------------------------------------------------------------- no empty folder after a failure
def test_failed_commands_leave_no_empty_output_folder(env, tmp_path, capsys):
    cases = {
        "search, missing data": search_args(env, tmp_path / "a" / "b" / "c", "--data", str(tmp_path / "nope.json")),
        "eval, unknown preset": eval_args(env, tmp_path / "a" / "e", "no-such-preset"),
        "demo, missing split": ["--demo", "--output", str(tmp_path / "a" / "d"), "--data", env.data,
                                "--eval-data", str(tmp_path / "nope.json")],
    }
    for what, args in cases.items():
        assert main(args) == 2, what
        assert "Traceback" not in capsys.readouterr().err
        assert not (tmp_path / "a").exists(), what  # every level the command made is gone
    # a folder that was there before stays, empty or not
    (tmp_path / "mine").mkdir()
    assert main(search_args(env, tmp_path / "mine", "--data", str(tmp_path / "nope.json"))) == 2
    assert (tmp_path / "mine").is_dir()


def test_unwritable_output_leaves_no_folder(env, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.NamedTemporaryFile", refuse)  # root may write anywhere: simulate the refusal
    rc = main(["--model", env.model, "--data", env.data, "--budget", "6", "--output", str(tmp_path / "o" / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err
    assert not (tmp_path / "o").exists()


def test_a_folder_chain_made_halfway_is_removed(tmp_path, monkeypatch):
    from eos_kernels.search.output import output_dir

    def halfway(path, exist_ok=False):  # makes two of the three levels, then fails
        os.mkdir(tmp_path / "a")
        os.mkdir(tmp_path / "a" / "b")
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("os.makedirs", halfway)
    with pytest.raises(ValueError, match="cannot create the folder"):
        with output_dir(str(tmp_path / "a" / "b" / "c")):
            pass  # pragma: no cover
    assert os.listdir(tmp_path) == []


def test_a_misspelt_eval_spec_fails_before_the_model_loads(env, tmp_path, capsys, no_loading):
    rc = main(eval_args(env, tmp_path / "o", "none", "fastv"))
    err = capsys.readouterr().err
    assert rc == 2 and "neither a Θ JSON file nor a known preset" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
