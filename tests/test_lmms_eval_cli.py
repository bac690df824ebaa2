"""lmms-eval end to end through its command line on the demo checkpoint (issue 18).

One ``lmms-eval --config`` process runs the ``eos_demo`` task (``--limit 24``) four times --
``theta=none`` and a pruning Θ (a Θ JSON file: FastV-style, 8 of 64 visual tokens after layer 1), each
at ``--batch_size 1`` and ``4``, with ``--log_samples`` -- and a fifth time with an unknown ``theta``.
lmms-eval's CLI exits 0 on errors unless ``--verbosity DEBUG``, so the runs use DEBUG and the tests
read the results files: scores equal to ``eos-search --eval`` on the same split and Θ, batch 4 answers
equal batch 1's, and the budget fields equal to ``Theta.token_report`` for that Θ. A second process
runs the same task data-parallel in 2 CPU processes through lmms-eval's ``torchrun`` path (lmms-eval's
``accelerate launch`` needs GPUs, or MPI, for more than one process).
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from eos_kernels.demo import task as demo_task  # noqa: E402
from eos_kernels.demo.build import checkpoint_path  # noqa: E402
from eos_kernels.integrations.lmms_eval import TASKS_DIR  # noqa: E402
from eos_kernels.integrations.lmms_eval.budget import budget_from_results  # noqa: E402
from eos_kernels.theta import Theta  # noqa: E402

LIMIT = 24
RUNS = [("none", 1), ("none", 4), ("prune", 1), ("prune", 4)]
#: the demo model's sizes (8 layers, d 128, ffn 256) and fixed visual count
N0, L, D, FFN = 64, 8, 128, 256


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)  # CPU: the reference operator, no kernel runs
    return env


def _cli(name):
    exe = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed")
    return exe


def _results(folder):
    files = glob.glob(os.path.join(str(folder), "*", "*_results.json"))
    assert len(files) == 1, f"expected one results file under {folder}, found {files}"
    samples = glob.glob(os.path.join(str(folder), "*", "*_samples_eos_demo.jsonl"))
    assert len(samples) == 1, samples
    with open(files[0]) as f:
        results = json.load(f)
    with open(samples[0]) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
    return results, rows


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("lmms_cli")
    prune = Theta.fastv(1, 8, name="prune-8")
    prune.to_json(str(root / "prune.json"))
    specs = {"none": "none", "prune": str(root / "prune.json")}
    configs = [{"model": "eos", "model_args": f"pretrained={checkpoint_path()},theta={specs[t]}", "tasks": "eos_demo",
                "include_path": TASKS_DIR, "limit": LIMIT, "batch_size": bs, "log_samples": True,
                "output_path": str(root / f"{t}-b{bs}")} for t, bs in RUNS]
    configs.append(dict(configs[0], model_args=f"pretrained={checkpoint_path()},theta=bogus-8",
                        output_path=str(root / "bad")))
    with open(root / "runs.yaml", "w") as f:
        yaml.safe_dump(configs, f)
    proc = subprocess.run([_cli("lmms-eval"), "--config", str(root / "runs.yaml"), "--verbosity", "DEBUG"],
                          cwd=str(root), env=_env(), capture_output=True, text=True, timeout=900)
    # eos-search --eval on the same held-out records (the split's first LIMIT records, as --limit takes them)
    from eos_kernels.search.cli import main as eos_search

    split = demo_task.generate_split(str(root / "split"), "eval", LIMIT, 0)
    assert eos_search(["--eval", "none", specs["prune"], "--model", checkpoint_path(), "--data", split,
                       "--max-new-tokens", "3", "--batch-size", "8", "--output", str(root / "eval"),
                       "--no-progress"]) == 0
    with open(root / "eval" / "eval.json") as f:
        reference = {("none" if r["spec"] == "none" else "prune"): r for r in json.load(f)["results"]}
    return root, proc, reference, prune


def test_unknown_theta_fails_loudly_and_the_good_runs_wrote_their_results(env):
    root, proc, _, _ = env
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "eos: theta='bogus-8'" in out and "neither a Θ JSON file nor a known preset" in out, out[-3000:]
    assert not os.path.exists(root / "bad")
    for t, bs in RUNS:
        _results(root / f"{t}-b{bs}")


def test_scores_equal_eos_search_eval_and_batch_four_equals_batch_one(env):
    root, _, reference, _ = env
    for t in ("none", "prune"):
        answers = {}
        for bs in (1, 4):
            results, rows = _results(root / f"{t}-b{bs}")
            assert results["n-samples"]["eos_demo"]["effective"] == LIMIT
            assert [r["doc_id"] for r in rows] == list(range(LIMIT))
            acc = results["results"]["eos_demo"]["exact_match,none"]
            assert acc == pytest.approx(reference[t]["correct"] / LIMIT, abs=1e-12), (t, bs)
            assert reference[t]["answers"] == LIMIT
            answers[bs] = [r["filtered_resps"] for r in rows]
        assert answers[4] == answers[1], t
    # the pruning Θ really prunes this model's answers (a test that cannot fail would be no test)
    assert reference["none"]["accuracy"] - reference["prune"]["accuracy"] > 0.3, reference


def test_budget_fields_are_theta_token_report(env):
    from eos_kernels.search.data import load_dataset
    from eos_kernels.search.model_loading import load_model

    root, _, reference, prune = env
    import torch

    _, processor = load_model(checkpoint_path(), torch.device("cpu"), torch.float32)
    ds = load_dataset(os.path.join(root, "split", "eval.json"), processor, num_visual_tokens=N0, image_token_id=4)
    text = [ex.prompt_length - N0 for ex in ds.examples]
    for t, theta in (("none", Theta(name="none")), ("prune", prune)):
        reports = [theta.token_report(N0, L, n, hidden_size=D, intermediate_size=FFN) for n in text]
        ratio = sum(r["prefill_flops"] for r in reports) / sum(r["prefill_flops_full"] for r in reports)
        want = {"samples": LIMIT, "visual_tokens": N0, "final_visual_tokens": reports[0]["final"],
                "mean_leaving_visual_tokens": reports[0]["mean_leaving"],
                "mean_processed_visual_tokens": reports[0]["mean_processed"], "prefill_flops_ratio": ratio,
                "text_tokens": sum(text) / LIMIT}
        assert want["final_visual_tokens"] == reference[t]["tokens"]["final"]
        for bs in (1, 4):
            results, rows = _results(root / f"{t}-b{bs}")
            got = budget_from_results(results)["eos_demo"]
            assert got.pop("prefill_ms") > 0
            assert got == pytest.approx(want, rel=1e-12), (t, bs, got, want)
            # next to the score in lmms-eval's own results table (the eos_demo task's budget metrics)
            row = results["results"]["eos_demo"]
            for f in ("final_visual_tokens", "mean_leaving_visual_tokens", "mean_processed_visual_tokens",
                      "prefill_flops_ratio"):
                assert row[f"{f},none"] == pytest.approx(want[f], rel=1e-12), (t, bs, f)
            # per sample with --log_samples
            for r, rep, n in zip(rows, reports, text):
                tc = r["token_counts"][0]
                assert (tc["visual_tokens"], tc["final_visual_tokens"], tc["text_tokens"], tc["input_tokens"]) == \
                    (N0, rep["final"], n, N0 + n)
                assert tc["mean_leaving_visual_tokens"] == rep["mean_leaving"]
                assert tc["prefill_flops_ratio"] == pytest.approx(rep["prefill_flops_ratio"], rel=1e-12)
                assert tc["prefill_ms"] > 0


def test_two_cpu_processes_give_the_single_process_results(env, tmp_path):
    """Data-parallel lmms-eval (torchrun path, gloo): every process evaluates its shard and the budget of
    all shards reaches the results file."""
    root, _, _, _ = env
    out = tmp_path / "dp"
    proc = subprocess.run([_cli("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lmms_eval",
                           "--model", "eos", "--model_args", f"pretrained={checkpoint_path()},theta={root}/prune.json",
                           "--tasks", "eos_demo", "--include_path", TASKS_DIR, "--limit", str(LIMIT),
                           "--batch_size", "4", "--log_samples", "--output_path", str(out), "--verbosity", "DEBUG"],
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "number of requests on this rank: 12" in proc.stdout + proc.stderr
    got, rows = _results(out)
    want, want_rows = _results(root / "prune-b4")
    assert got["results"]["eos_demo"]["exact_match,none"] == want["results"]["eos_demo"]["exact_match,none"]
    assert [r["filtered_resps"] for r in rows] == [r["filtered_resps"] for r in want_rows]
    b, w = budget_from_results(got)["eos_demo"], budget_from_results(want)["eos_demo"]
    b.pop("prefill_ms"), w.pop("prefill_ms")
    assert b == w and b["samples"] == LIMIT
