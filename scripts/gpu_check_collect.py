"""Bookkeeping of scripts/gpu_check.sh (standard library only: works even if torch does not import).

``python3 scripts/gpu_check_collect.py update WORK OUT`` (after every step):
rewrites ``OUT/steps.json`` from ``WORK/steps.tsv`` (status, duration, limit,
log tail, test counts and the first failures read from each step's junit XML),
``OUT/bench.json`` (the pytest-benchmark JSON of every benchmark step merged into
one file, raw per-round samples dropped to keep it small) and
``OUT/logs.tar.gz`` (every step's full log and junit XML, and the script's own
log). Rewritten after each step, so that a run cut off from outside still leaves
what it had measured.

``python3 scripts/gpu_check_collect.py final WORK OUT`` (at the end): the same,
plus the benchmark targets (met / missed / not measured, from
``bench.report.evaluate_targets``), the file inventory and its limits (at most
8 files of at most 16 MB), and a summary printed on stdout.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tarfile
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TSV_FIELDS = ("index", "name", "kind", "status", "rc", "seconds", "timeout_s", "log", "junit", "bench", "note",
              "command")
MAX_FILES, MAX_BYTES = 8, 16 * 2 ** 20
TAIL_LINES = 40


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_meta(work):
    meta = {}
    path = os.path.join(work, "meta.env")
    if os.path.isfile(path):
        for line in open(path, encoding="utf-8"):
            key, _, value = line.rstrip("\n").partition("=")
            if key:
                meta[key] = value
    return meta


def read_steps(work):
    steps = []
    path = os.path.join(work, "steps.tsv")
    if not os.path.isfile(path):
        return steps
    for line in open(path, encoding="utf-8", errors="replace"):
        cells = line.rstrip("\n").split("\t")
        if len(cells) < len(TSV_FIELDS):
            continue
        step = dict(zip(TSV_FIELDS, cells[:len(TSV_FIELDS) - 1] + ["\t".join(cells[len(TSV_FIELDS) - 1:])]))
        for key in ("index", "rc", "timeout_s"):
            try:
                step[key] = int(step[key])
            except ValueError:
                step[key] = None
        try:
            step["seconds"] = float(step["seconds"])
        except ValueError:
            step["seconds"] = None
        steps.append(step)
    return steps


def tail(path, n=TAIL_LINES):
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-n:])


def junit_summary(path, limit=12, chars=1500):
    """Counts and the first failures of a pytest junit XML (partial files of interrupted runs included)."""
    if not path or not os.path.isfile(path):
        return None, []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable junit XML: {exc}"}, []
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                counts["failures" if kind == "failure" else "errors"] += 1
                if len(failures) < limit:
                    text = (node.get("message") or "") + "\n" + (node.text or "")
                    failures.append({"test": name, "kind": kind, "message": text.strip()[:chars]})
        if case.find("skipped") is not None:
            counts["skipped"] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts, failures


def merge_bench(paths, out_path):
    """Concatenate pytest-benchmark JSON files (the first one's machine and commit info), samples dropped."""
    merged, seen, sources = None, set(), []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        sources.append(os.path.basename(path))
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "benchmarks"}
            merged["benchmarks"] = []
        for b in data.get("benchmarks", []):
            key = b.get("fullname") or b.get("name")
            if key in seen:
                continue
            seen.add(key)
            stats = b.get("stats")
            if isinstance(stats, dict):
                stats.pop("data", None)
            merged["benchmarks"].append(b)
    if merged is None:
        return 0
    merged["gpu_check"] = {"merged_from": sources, "samples_dropped": True,
                           "note": "written by scripts/gpu_check.sh; stats are pytest-benchmark's, unedited"}
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1)
    os.replace(tmp, out_path)
    return len(merged["benchmarks"])


def pack_logs(work, out_path):
    tmp = out_path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for sub in ("logs", "junit"):
            folder = os.path.join(work, sub)
            if os.path.isdir(folder):
                for name in sorted(os.listdir(folder)):
                    tar.add(os.path.join(folder, name), arcname=f"gpu_check/{sub}/{name}")
        for name in ("run.log", "steps.tsv"):
            p = os.path.join(work, name)
            if os.path.isfile(p):
                tar.add(p, arcname=f"gpu_check/{name}")
    os.replace(tmp, out_path)


def inventory(out):
    files = []
    for root, _, names in os.walk(out):
        for name in names:
            if name.endswith(".tmp"):
                continue
            p = os.path.join(root, name)
            files.append({"file": os.path.relpath(p, out), "bytes": os.path.getsize(p)})
    files.sort(key=lambda f: f["file"])
    problems = []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in the output folder (limit {MAX_FILES})")
    problems += [f"{f['file']} is {f['bytes']} bytes (limit {MAX_BYTES})" for f in files if f["bytes"] > MAX_BYTES]
    return files, problems


def targets(out):
    sys.path.insert(0, REPO)
    from bench.report import evaluate_targets, load_runs

    path = os.path.join(out, "bench.json")
    runs = load_runs([path]) if os.path.isfile(path) else []
    return [{"target": t, "verdict": v, "detail": d} for t, v, d in evaluate_targets(runs)]


def update(work, out, final=False):
    meta = read_meta(work)
    steps = read_steps(work)
    for step in steps:
        log = os.path.join(work, step["log"]) if step.get("log") else None
        step["tail"] = tail(log)
        junit = os.path.join(work, step["junit"]) if step.get("junit") else None
        counts, failures = junit_summary(junit)
        if counts is not None:
            step["tests"] = counts
            step["failures"] = failures
            if counts.get("tests") and counts.get("skipped") == counts["tests"]:
                step["note"] = "; ".join(x for x in (step.get("note"), "every test skipped (no CUDA?)") if x)
    bench_paths = [os.path.join(work, s["bench"]) for s in steps if s.get("bench")]
    n_bench = merge_bench([p for p in bench_paths if os.path.isfile(p)], os.path.join(out, "bench.json"))
    pack_logs(work, os.path.join(out, "logs.tar.gz"))
    started = float(meta.get("start_epoch", "0") or 0)
    record = {
        "schema": "eos_kernels gpu_check steps 1",
        "mode": meta.get("mode"),
        "started_utc": meta.get("start_utc"),
        "updated_utc": now(),
        "elapsed_s": round(datetime.datetime.now().timestamp() - started, 1) if started else None,
        "budget_s": int(meta["budget_s"]) if meta.get("budget_s") else None,
        "finished": final,
        "inject": meta.get("inject") or None,
        "benchmarks_merged": n_bench,
        "steps": steps,
    }
    env_path = os.path.join(out, "env.json")
    if os.path.isfile(env_path):
        try:
            with open(env_path, encoding="utf-8") as f:
                env = json.load(f)
            record["env_summary"] = env.get("summary")
            record["env_problems"] = env.get("problems")
        except (OSError, ValueError) as exc:
            record["env_summary"] = {"error": str(exc)}
    if final:
        try:
            record["targets"] = targets(out)
        except Exception as exc:  # noqa: BLE001 - the record must still be written
            record["targets"] = [{"target": "all", "verdict": "not evaluated",
                                  "detail": f"{type(exc).__name__}: {exc}"}]
    path = os.path.join(out, "steps.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    if final:
        files, problems = inventory(out)
        record["files"], record["file_problems"] = files, problems
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
        print_summary(record)
    return record


def print_summary(rec):
    print("")
    print(f"== gpu_check summary ({rec['mode']} mode, {rec['elapsed_s']} s of a {rec['budget_s']} s budget) ==")
    env = rec.get("env_summary") or {}
    if env:
        gpu = env.get("gpu") or {}
        print(f"GPU: {gpu.get('name', 'none')} ({gpu.get('memory_gib', '?')} GiB, cc {gpu.get('capability', '?')}, "
              f"driver {gpu.get('driver', '?')}, CUDA {gpu.get('cuda_runtime', '?')}); torch {env.get('torch')}, "
              f"triton {env.get('triton')}, transformers {env.get('transformers')}; commit {env.get('commit')}; "
              f"compile cache cold: {env.get('compile_cache_cold')}")
    for p in rec.get("env_problems") or []:
        print(f"ENV PROBLEM: {p}")
    print(f"{'step':34} {'status':8} {'time':>13}  tests (pass/fail/err/skip)  note")
    for s in rec["steps"]:
        t = s.get("tests")
        counts = f"{t['passed']}/{t['failures']}/{t['errors']}/{t['skipped']}" if t and "passed" in t else "-"
        secs = f"{s['seconds']:.0f}/{s['timeout_s']} s" if s.get("seconds") is not None else "-"
        print(f"{s['name']:34} {s['status']:8} {secs:>13}  {counts:26}  {s.get('note') or ''}")
    fails = [(s["name"], f) for s in rec["steps"] for f in s.get("failures") or []]
    if fails:
        print("first failures:")
        for name, f in fails[:15]:
            first = f["message"].splitlines()[0] if f["message"] else ""
            print(f"  [{name}] {f['test']}: {first[:200]}")
    print(f"benchmarks in bench.json: {rec['benchmarks_merged']}")
    for t in rec.get("targets") or []:
        print(f"target: {t['target']}: {t['verdict'].upper()} ({t['detail']})")
    for f in rec.get("files") or []:
        print(f"file: {f['file']} {f['bytes']} bytes")
    for p in rec.get("file_problems") or []:
        print(f"FILE PROBLEM: {p}")


def main(argv):
    if len(argv) != 3 or argv[0] not in ("update", "final"):
        print("usage: gpu_check_collect.py update|final WORK OUT", file=sys.stderr)
        return 2
    update(argv[1], argv[2], final=argv[0] == "final")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
