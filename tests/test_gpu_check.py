"""scripts/gpu_check.sh: the CPU dry run (``--cpu``) and the GPU plan (``--plan``).

The dry run walks every step of the GPU check with the CPU subset and Triton's
interpreter, with one step replaced by a deliberate failure and one by a hang
(``GPU_CHECK_INJECT``): the expected files are written, the failing and the
hanging steps are recorded and the run goes on to the report, within its time
budget. The plan test checks, without a GPU, that the GPU run's benchmark
selections measure every CUDA benchmark case exactly once, the headline cases
in the early steps.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
BUDGET = 420                    # GPU_CHECK_BUDGET of the dry run (the script keeps the whole run inside it)
INJECT = {"bench-operator-grid": "fail", "bench-e2e-rest": "hang"}
MAX_FILES, MAX_BYTES = 8, 16 * 2 ** 20


def _env(**extra):
    # not this test process's own pytest state either (under pytest-xdist its workers' variables would make
    # the script's pytest runs take themselves for xdist workers, which pytest-benchmark refuses)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPU_CHECK_", "PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def plan(*args):
    out = subprocess.run(["bash", SCRIPT, "--plan", *args], capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr
    steps = []
    for line in out.stdout.splitlines():
        idx, name, kind, limit, skip, cmd = line.split("\t")
        steps.append(dict(index=int(idx), name=name, kind=kind, limit=int(limit), skip=skip,
                          argv=shlex.split(cmd)))
    return steps


# --------------------------------------------------------------------------- cheap checks
def test_usage_and_refuses_a_non_empty_output_folder(tmp_path):
    out = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=30, env=_env())
    assert out.returncode == 2 and "OUT_DIR" in out.stderr
    (tmp_path / "old.json").write_text("{}")
    out = subprocess.run(["bash", SCRIPT, "--cpu", str(tmp_path)], capture_output=True, text=True, timeout=30,
                         env=_env())
    assert out.returncode == 2 and "not empty" in out.stderr


def test_plans_walk_the_same_steps_and_fit_the_budget():
    gpu, cpu = plan(), plan("--cpu")
    assert [s["name"] for s in gpu] == [s["name"] for s in cpu]
    names = [s["name"] for s in gpu]
    assert names[0] == "env" and names[1:3] == ["tests-kernels", "tests-model"] and names[-1] == "report"
    assert names[3:5] == ["bench-operator-headline", "bench-operator-headline-compile"]
    assert not any(s["skip"] for s in gpu)
    # steps 1-10 and the report: limits within 8 min; the last three only fill what is left
    as_time_allows = ("bench-e2e-families", "bench-lmms-eval", "bench-operator-compile-grid", "tests-full-suites")
    assert sum(s["limit"] for s in gpu if s["name"] not in as_time_allows) <= 480
    for s in gpu:
        if s["kind"] in ("test", "bench"):
            assert "--tb=long" in s["argv"] and any(a.startswith("--junitxml=") for a in s["argv"]), s["name"]
        if s["kind"] == "bench":
            assert any(a.startswith("--benchmark-json=") for a in s["argv"]), s["name"]
    # the test steps' node ids exist
    for s in gpu:
        for arg in s["argv"]:
            if arg.startswith("tests/") and "::" in arg:
                path, func = arg.split("::")
                assert re.search(rf"^def {func}\(", open(os.path.join(REPO, path)).read(), re.M), arg
            elif arg.startswith(("tests/", "bench/")) and arg.endswith(".py"):
                assert os.path.isfile(os.path.join(REPO, arg)), arg


def test_gpu_plan_measures_each_cuda_benchmark_case_once():
    """The GPU steps' ``-k`` selections, evaluated by pytest's own expression parser on the collected ids."""
    from _pytest.mark.expression import Expression

    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "no:hypothesispytest", "bench"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=_env(CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line and "[" in line]
    cuda = [i for i in ids if "[cuda-" in i]
    assert len(cuda) > 150, len(cuda)

    def selected(step):
        argv = step["argv"]
        files = [a for a in argv if a.startswith("bench/") and a.endswith(".py")]
        expr = Expression.compile(argv[argv.index("-k") + 1])
        picked = []
        for node in ids:
            path, _, rest = node.partition("::")
            if path not in files:
                continue
            func, _, param = rest.partition("[")
            names = [func + "[" + param, func, param.rstrip("]"), os.path.basename(path)]
            if expr.evaluate(lambda s, **kw: any(s.lower() in n.lower() for n in names)):
                picked.append(node)
        return picked

    steps = {s["name"]: selected(s) for s in plan() if s["kind"] == "bench"}
    counts = {i: 0 for i in cuda}
    for name, picked in steps.items():
        if name == "bench-lmms-eval" and importlib.util.find_spec("lmms_eval") is None:
            assert not picked  # the module skips without lmms-eval: nothing to select here
            continue
        assert picked, f"{name} selects nothing"
        assert all("[cuda-" in i for i in picked), (name, [i for i in picked if "[cuda-" not in i])
        for i in picked:
            counts[i] += 1
    assert [i for i, n in counts.items() if n != 1] == [], "CUDA cases measured by no step or by several"
    headline = steps["bench-operator-headline"]
    assert len(headline) == 8 and all(("-B1-K64-bf16]" in i or "-B32-K64-bf16]" in i) for i in headline)
    assert {re.search(r"\[cuda-(\w+)-", i).group(1) for i in headline} == {"triton", "torch"}
    assert len(steps["bench-operator-headline-compile"]) == 4
    e2e = steps["bench-e2e-r64"]
    # LLaVA at B 1 and 8; the other families (7-8 B-shaped models to build) in a step of their own, later
    assert sorted(re.search(r"\[(.*)\]", i).group(1) for i in e2e if "prefill" in i) == sorted(
        f"cuda-B{b}-{c}" for b in (1, 8) for c in ("unpatched", "paper-r64", "prune-r64"))
    assert sum("vision" in i for i in e2e) == 2
    families = steps["bench-e2e-families"]
    assert sorted(re.search(r"\[(.*)\]", i).group(1) for i in families) == sorted(
        [f"cuda-B1-{f}-{c}" for f in ("internvl", "gemma3", "qwen3_vl") for c in ("unpatched", "paper-r64")]
        + [f"cuda-B1-{f}" for f in ("internvl", "gemma3", "qwen3_vl")])


# --------------------------------------------------------------------------- the dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    inject = ",".join(f"{k}:{v}" for k, v in INJECT.items())
    t0 = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, "--cpu", str(out)], capture_output=True, text=True, timeout=BUDGET + 120,
                          env=_env(GPU_CHECK_INJECT=inject, GPU_CHECK_BUDGET=str(BUDGET)))
    elapsed = time.monotonic() - t0
    steps = json.load(open(out / "steps.json")) if (out / "steps.json").is_file() else None
    return dict(out=out, proc=proc, elapsed=elapsed, steps=steps)


def test_dry_run_writes_the_expected_files(dry_run):
    proc, out = dry_run["proc"], dry_run["out"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert {"env.json", "steps.json", "bench.json", "report.md", "logs.tar.gz"} <= set(files), files
    assert len(files) <= MAX_FILES, files
    for name in files:
        assert os.path.isfile(out / name) and os.path.getsize(out / name) <= MAX_BYTES, name
    env = json.load(open(out / "env.json"))
    assert env["mode"] == "cpu" and env["import"]["from_this_tree"], env["import"]
    assert env["checks"]["triton_add"]["ok"] and env["summary"]["torch"]
    bench = json.load(open(out / "bench.json"))
    assert bench["benchmarks"] and all("data" not in b["stats"] for b in bench["benchmarks"])
    report = open(out / "report.md").read()
    assert "## Targets of the issue" in report and "not measured" in report
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    for s in dry_run["steps"]["steps"]:
        assert f"gpu_check/{s['log']}" in names, s["log"]
        if s["status"] == "ok" and s["kind"] in ("test", "bench"):
            assert f"gpu_check/{s['junit']}" in names, s["junit"]


def test_dry_run_records_the_failing_and_hanging_steps_and_goes_on(dry_run):
    rec = dry_run["steps"]
    assert rec["finished"] and rec["mode"] == "cpu"
    steps = {s["name"]: s for s in rec["steps"]}
    assert [s["name"] for s in rec["steps"]] == [s["name"] for s in plan("--cpu")]
    failed, hung = steps["bench-operator-grid"], steps["bench-e2e-rest"]
    assert failed["status"] == "failed" and failed["rc"] == 3 and "injected failure" in failed["note"]
    assert "failed on purpose" in failed["tail"]
    assert hung["status"] == "timeout" and hung["rc"] == 124 and hung["seconds"] < 10
    # everything else ran, before and after them
    for name, s in steps.items():
        if name in INJECT:
            continue
        if s["note"].startswith("GPU only"):
            assert s["status"] == "skipped", (name, s["status"])
            continue
        assert s["status"] == "ok", (name, s["status"], s["note"], s["tail"])
    for name in ("tests-kernels", "tests-model"):
        t = steps[name]["tests"]
        assert t["passed"] > 0 and t["failures"] == 0 and t["errors"] == 0, (name, t, steps[name]["failures"])
    assert steps["bench-search-step"]["tests"]["passed"] == 1  # a step after the failures
    assert steps["report"]["status"] == "ok"
    targets = rec["targets"]
    sys.path.insert(0, REPO)
    from bench.report import evaluate_targets

    assert len(targets) == len(evaluate_targets([])) and len(targets) >= 7, targets
    assert all(t["verdict"] == "not measured" for t in targets), targets
    assert rec["file_problems"] == []


def test_dry_run_stays_within_its_time_budget(dry_run):
    # the script bounds the whole run by GPU_CHECK_BUDGET (+ the grace of a step stopped at the deadline)
    assert dry_run["elapsed"] < BUDGET + 15, dry_run["elapsed"]
    rec = dry_run["steps"]
    assert not [s["name"] for s in rec["steps"] if "out of time budget" in s["note"]]
    print(f"gpu_check --cpu took {dry_run['elapsed']:.0f} s")
