"""Turn pytest-benchmark JSON into a markdown report and PNG plots.

Usage::

    pytest bench/ --benchmark-only --benchmark-json RESULTS.json
    python -m bench.report RESULTS.json [MORE.json ...] [--out DIR]

Writes ``DIR/report.md`` (default: the first JSON's folder) and, when
matplotlib is installed, ``operator_time_vs_K.png``,
``importance_time_vs_T.png`` and ``e2e_latency_vs_budget.png`` (only those
with data). Every number comes from the JSON: times are pytest-benchmark's
medians; speed-ups are ratios of medians taken *within one JSON file* (one
run, one machine), never across files; achieved GB/s is ``extra_info["bytes"]``
(the byte-count model of ``bench/test_bench_operator.py``) over the median.

The report names the machine, the GPU and the library versions from the JSON's
``machine_info`` (``machine_info["eos_bench"]`` is written by
``bench/conftest.py``), and lists the targets of the benchmark issue as met /
missed / not measured. The targets are for an H100/H200: results without CUDA
never meet or miss them; their CPU values are shown for information only.

This module imports neither torch nor the package, only the standard library
(and matplotlib for the plots).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import textwrap
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

# --------------------------------------------------------------------------- targets of the issue
FWD_VS_EAGER = 5.0
FWD_VS_COMPILE = 1.5
FWDBWD_VS_EAGER = 3.0
BANDWIDTH_FRACTION = 0.5
BANDWIDTH_BATCH = 32
PAPER_VS_PRUNE = 1.05
FLOPS_SHARE = 0.85
TARGET_BUDGET = 64
#: the lmms-eval plugin's own work per sample, as a share of the generate time
PLUGIN_OVERHEAD = 0.05
#: the operator grid of the issue: 3 batches x 4 K x 2 dtypes
OPERATOR_GRID = 24
TARGET_GPUS = ("h100", "h200")

MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"
MET_PARTIAL = "met where measured (partial)"

IMPL_LABEL = {"triton": "fused", "torch": "eager", "compile": "compile", "eager": "eager attn"}
IMPORTANCE_LABEL = {"triton": "kernel", "torch": "reference", "eager": "eager attn"}


# --------------------------------------------------------------------------- loading
@dataclass
class Entry:
    run: int
    name: str
    group: str | None
    info: dict
    stats: dict

    @property
    def median(self) -> float:
        return float(self.stats["median"])

    def get(self, key, default=None):
        return self.info.get(key, default)


@dataclass
class Run:
    index: int
    path: str
    data: dict
    entries: list = field(default_factory=list)

    @property
    def machine(self) -> dict:
        return self.data.get("machine_info") or {}

    @property
    def env(self) -> dict:
        return self.machine.get("eos_bench") or {}

    @property
    def label(self) -> str:
        return os.path.basename(self.path)

    @property
    def gpu(self) -> str | None:
        return self.env.get("gpu_name")


def load_runs(paths) -> list:
    runs = []
    for i, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' key)")
        run = Run(i, path, data)
        for b in data["benchmarks"]:
            run.entries.append(Entry(i, b.get("name") or b.get("fullname"), b.get("group"),
                                     b.get("extra_info") or {}, b.get("stats") or {}))
        runs.append(run)
    return runs


# --------------------------------------------------------------------------- formatting
def fmt_time(seconds) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def fmt_num(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def fmt_mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def fmt_pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def ratio(num, den):
    if num is None or den is None or den == 0:
        return None
    return num / den


def table(header, rows) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return out


def drop_empty_columns(header, rows, prefixes) -> tuple:
    """Remove the columns whose name starts with one of ``prefixes`` and whose cells are all "—"."""
    keep = [i for i, h in enumerate(header)
            if not any(h.startswith(p) or h.endswith(p) for p in prefixes) or any(r[i] != "—" for r in rows)]
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows]


def dtype_short(name) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, name)


# --------------------------------------------------------------------------- machine section
def machine_section(runs) -> list:
    lines = ["## Machine and versions", ""]
    header = ["run (file)", "date", "node", "CPU", "cores (usable)", "torch threads", "load avg start → end",
              "GPU", "peak bandwidth", "python", "torch (CUDA)", "triton", "transformers",
              "eos_kernels @ commit"]
    rows = []
    for run in runs:
        m, env = run.machine, run.env
        cpu = (m.get("cpu") or {}).get("brand_raw") or m.get("processor") or m.get("machine") or "?"
        commit = run.data.get("commit_info") or {}
        sha = env.get("git_commit") or commit.get("id")
        dirty = env.get("git_dirty") if env.get("git_dirty") is not None else commit.get("dirty")
        sha_text = (sha[:10] if sha else "?") + (", dirty" if dirty else "")
        bw = env.get("peak_bandwidth_Bps")
        gpu = env.get("gpu_name") or "none (CPU only)"
        if env.get("gpu_count", 0) and env.get("gpu_count") > 1:
            gpu += f" ×{env['gpu_count']}"
        la0, la1 = env.get("loadavg_start"), env.get("loadavg_end")
        rows.append([
            run.label, run.data.get("datetime", "?"), m.get("node", "?"), cpu,
            f"{env.get('cpu_count', '?')} ({env.get('cpu_affinity', '?')})", env.get("torch_threads", "?"),
            f"{la0[0] if la0 else '?'} → {la1[0] if la1 else '?'}",
            gpu, (f"{bw / 1e12:.3g} TB/s" if bw else "—"),
            env.get("python") or m.get("python_version", "?"),
            f"{env.get('torch', '?')} ({env.get('torch_cuda') or 'no CUDA'})",
            env.get("triton") or "?", env.get("transformers") or "?",
            f"{env.get('eos_kernels') or '?'} @ {sha_text}",
        ])
    lines += table(header, rows)
    lines.append("")
    return lines


# --------------------------------------------------------------------------- operator
def _by(entries, *keys):
    out = defaultdict(list)
    for e in entries:
        out[tuple(e.get(k) for k in keys)].append(e)
    return out


def operator_rows(run):
    """{(mode, device, dtype): {(B, K): {impl: Entry}}} for one run."""
    out = defaultdict(lambda: defaultdict(dict))
    for e in run.entries:
        if e.get("subject") != "operator":
            continue
        out[(e.get("mode"), e.get("device"), e.get("dtype"))][(e.get("B"), e.get("K"))][e.get("impl")] = e
    return out


def _gbps(e):
    if e is None or not e.get("bytes"):
        return None
    return e.get("bytes") / e.median / 1e9


def _bw_fraction(e, run):
    if e is None or not e.get("bytes"):
        return None
    peak = e.get("peak_bandwidth_Bps") or (run.env.get("peak_bandwidth_Bps") if e.get("device") == "cuda" else None)
    if not peak:
        return None
    return e.get("bytes") / e.median / peak


def operator_section(runs) -> list:
    lines = []
    for run in runs:
        groups = operator_rows(run)
        if not groups:
            continue
        if not lines:
            lines += ["## Operator (`eos_reduce`)", "",
                      "Times are medians. *fused* = Triton kernels (`impl=\"triton\"`), *eager* = PyTorch "
                      "reference (`impl=\"torch\"`), *compile* = `torch.compile(eos_reduce_reference)`; "
                      "speed-up = median(baseline) / median(other). GB/s = minimal traffic / median, with "
                      "the byte-count model fwd: 2A+D+Q, fwd+bwd: 5A+3D+3Q (A = B·K·d·s, D = B·M·d·s, "
                      "Q = B·M·4 bytes; inputs read once, outputs written once). Peak memory: extra CUDA "
                      "memory of one call (output and gradients included; CUDA only, so absent from CPU tables). "
                      "*compile: first call* = seconds of the first call of `torch.compile` (compilation, "
                      "or a hit in inductor's on-disk cache), outside timing.", ""]
        for (mode, device, dtype), shapes in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
            impls = [i for i in ("triton", "torch", "compile") if any(i in v for v in shapes.values())]
            any_name = next(iter(next(iter(shapes.values())).values())).get("device_name")
            lines += [f"### {mode} · {device} ({any_name}) · {dtype} · {run.label}", ""]
            header = ["B", "K", "M"] + [f"{IMPL_LABEL[i]}" for i in impls]
            pairs = [(a, b) for a, b in (("triton", "torch"), ("triton", "compile"), ("compile", "torch"))
                     if a in impls and b in impls]
            header += [f"{IMPL_LABEL[a]} vs {IMPL_LABEL[b]}" for a, b in pairs]
            header += [f"{IMPL_LABEL[i]} GB/s (% peak)" for i in impls]
            header += [f"{IMPL_LABEL[i]} peak MiB" for i in impls]
            if "compile" in impls:
                header += ["compile: first call"]
            rows = []
            for (B, K), by_impl in sorted(shapes.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
                first = next(iter(by_impl.values()))
                row = [B, K, first.get("M")]
                row += [fmt_time(by_impl[i].median) if i in by_impl else "—" for i in impls]
                for a, b in pairs:
                    ea, eb = by_impl.get(a), by_impl.get(b)
                    row.append(fmt_ratio(ratio(eb.median, ea.median)) if ea and eb else "—")
                for i in impls:
                    e = by_impl.get(i)
                    g, f = _gbps(e), _bw_fraction(e, run)
                    row.append("—" if g is None else (f"{g:.1f}" + (f" ({fmt_pct(f)})" if f is not None else "")))
                row += [fmt_mib(by_impl[i].get("peak_extra_mem_bytes")) if i in by_impl else "—" for i in impls]
                if "compile" in impls:
                    c = by_impl.get("compile")
                    row.append(f"{c.get('compile_s'):.1f} s" if c and c.get("compile_s") is not None else "—")
                rows.append(row)
            header, rows = drop_empty_columns(header, rows, ("peak MiB",))
            lines += table(header, rows) + [""]
    return lines


# --------------------------------------------------------------------------- importance
def importance_section(runs) -> list:
    lines = []
    for run in runs:
        groups = defaultdict(lambda: defaultdict(dict))
        for e in run.entries:
            if e.get("subject") == "importance":
                groups[(e.get("device"), e.get("dtype"))][(e.get("B"), e.get("T"), e.get("L"))][e.get("impl")] = e
        if not groups:
            continue
        if not lines:
            lines += ["## Importance (`text_to_visual_importance`)", "",
                      "*kernel* = fused Triton kernel, *reference* = the package's eager reference "
                      "(text rows only), *eager attn* = full causal attention probabilities "
                      "softmax(QKᵀ) materialised as [B, H, L, L], then the same mean. Times are medians; "
                      "peak MiB = extra CUDA memory of one call (CUDA only).", ""]
        for (device, dtype), shapes in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
            impls = [i for i in ("triton", "torch", "eager") if any(i in v for v in shapes.values())]
            first = next(iter(next(iter(shapes.values())).values()))
            lines += [f"### {device} ({first.get('device_name')}) · {dtype} · {first.get('heads')} heads × "
                      f"{first.get('head_dim')} · {run.label}", ""]
            pairs = [(a, b) for a, b in (("triton", "eager"), ("triton", "torch"), ("torch", "eager"))
                     if a in impls and b in impls]
            header = ["B", "T", "L"] + [IMPORTANCE_LABEL[i] for i in impls]
            header += [f"{IMPORTANCE_LABEL[a]} vs {IMPORTANCE_LABEL[b]}" for a, b in pairs]
            header += [f"{IMPORTANCE_LABEL[i]} peak MiB" for i in impls]
            rows = []
            for (B, T, L), by_impl in sorted(shapes.items()):
                row = [B, T, L] + [fmt_time(by_impl[i].median) if i in by_impl else "—" for i in impls]
                for a, b in pairs:
                    ea, eb = by_impl.get(a), by_impl.get(b)
                    row.append(fmt_ratio(ratio(eb.median, ea.median)) if ea and eb else "—")
                row += [fmt_mib(by_impl[i].get("peak_extra_mem_bytes")) if i in by_impl else "—" for i in impls]
                rows.append(row)
            header, rows = drop_empty_columns(header, rows, ("peak MiB",))
            lines += table(header, rows) + [""]
    return lines


# --------------------------------------------------------------------------- end to end
#: the model families of the end-to-end rows besides LLaVA (``extra_info["family"]``), as the report names them
E2E_FAMILIES = {"llava": "LLaVA", "internvl": "InternVL", "gemma3": "Gemma 3", "qwen3_vl": "Qwen3-VL"}


def e2e_families(run) -> list:
    """The families of ``run``'s end-to-end entries, LLaVA (entries without a family) first."""
    found = {e.get("family", "llava") for e in run.entries if e.get("subject") == "e2e"}
    return sorted(found, key=lambda f: (f != "llava", f))


def e2e_tables(run, family="llava"):
    """{(device, B): {"prefill": {config_id: Entry}, "decode": {...}, "vision": Entry|None}} of one family."""
    out = defaultdict(lambda: {"prefill": {}, "decode": {}, "vision": None})
    for e in run.entries:
        if e.get("subject") != "e2e" or e.get("family", "llava") != family:
            continue
        slot = out[(e.get("device"), e.get("B"))]
        if e.get("phase") == "vision":
            slot["vision"] = e
        elif e.get("phase") in ("prefill", "decode"):
            slot[e.get("phase")][e.get("config_id")] = e
    return out


def _config_order(config_id):
    if config_id == "unpatched":
        return (0, 0, 0)
    kind, _, r = config_id.partition("-r")
    return (1, -int(r) if r.isdigit() else 0, 0 if kind == "paper" else 1)


def e2e_speedups(slot, config_id):
    """(whole-prefill speed-up, decoder-only speed-up, predicted) of ``config_id`` vs unpatched."""
    pre = slot["prefill"]
    base, cfg = pre.get("unpatched"), pre.get(config_id)
    if base is None or cfg is None:
        return None, None, cfg.get("predicted_speedup") if cfg else None
    whole = ratio(base.median, cfg.median)
    vision = slot["vision"].median if slot["vision"] is not None else None
    decoder = None
    if vision is not None and cfg.median > vision:
        decoder = ratio(base.median - vision, cfg.median - vision)
    return whole, decoder, cfg.get("predicted_speedup")


def e2e_section(runs) -> list:
    lines = []
    for run, family in [(run, f) for run in runs for f in e2e_families(run)]:
        tables = e2e_tables(run, family)
        if not tables:
            continue
        if not lines:
            lines += ["## End to end (LLaVA, random weights, sdpa)", "",
                      "Prefill = vision tower + projector + decoder + KV cache write, `logits_to_keep=1`; "
                      "decode = one decoding step (one new token for each of the B samples) after the 640-token prompt. *speed-up* = median(unpatched) / "
                      "median(config); *decoder-only* subtracts the median vision-tower time from both "
                      "(the FLOPs prediction of `Theta.token_report` counts decoder layers only); "
                      "*measured / predicted* = decoder-only speed-up / FLOPs-predicted speed-up. "
                      "*paper / prune* = median(paper Θ) / median(pure prune with the same schedule). "
                      "Token columns are the configuration's token report (`final`, `mean_leaving`, "
                      "`mean_processed` visual tokens, and which count met the budget r). Rows of other "
                      "families (InternVL, Gemma 3: the same decoder sizes and 576 visual tokens) are named in "
                      "their heading.", ""]
        for (device, B), slot in sorted(tables.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
            any_entry = next(iter(slot["prefill"].values()), None) or next(iter(slot["decode"].values()), None)
            model = (any_entry.get("model") if any_entry else None) or {}
            name = any_entry.get("device_name") if any_entry else "?"
            shape = (f"d={model.get('hidden')}, {model.get('layers')} layers, {model.get('heads')} heads, "
                     f"ffn {model.get('ffn')}, {any_entry.get('dtype') if any_entry else '?'}") if model else ""
            other = f" · {E2E_FAMILIES.get(family, family)}" if family != "llava" else ""
            lines += [f"### {device} ({name}) · B={B} · {shape} · {run.label}{other}", ""]
            if slot["vision"] is not None:
                lines += [f"Vision tower + projector alone: {fmt_time(slot['vision'].median)} (median).", ""]
            header = ["config", "r", "count", "final", "mean leaving", "mean processed", "prefill",
                      "speed-up", "decoder-only speed-up", "FLOPs-predicted", "measured / predicted",
                      "paper / prune", "decode / token", "decode speed-up", "KV cache MiB", "prefill peak MiB"]
            rows = []
            ids = sorted(set(slot["prefill"]) | set(slot["decode"]), key=_config_order)
            for cid in ids:
                pre, dec = slot["prefill"].get(cid), slot["decode"].get(cid)
                e = pre or dec
                whole, decoder, predicted = e2e_speedups(slot, cid)
                paper_prune = None
                if e.get("config") == "paper" and pre is not None:
                    prune = slot["prefill"].get(cid.replace("paper-", "prune-"))
                    paper_prune = ratio(pre.median, prune.median) if prune else None
                base_dec = slot["decode"].get("unpatched")
                rows.append([
                    cid, e.get("budget") if e.get("budget") is not None else "—", e.get("count") or "—",
                    fmt_num(e.get("final")), fmt_num(e.get("mean_leaving"), 5), fmt_num(e.get("mean_processed"), 5),
                    fmt_time(pre.median) if pre else "—", fmt_ratio(whole), fmt_ratio(decoder),
                    fmt_ratio(predicted), fmt_ratio(ratio(decoder, predicted)),
                    fmt_ratio(paper_prune), fmt_time(dec.median) if dec else "—",
                    fmt_ratio(ratio(base_dec.median, dec.median)) if (dec and base_dec) else "—",
                    fmt_mib(e.get("kv_cache_bytes")), fmt_mib(pre.get("peak_extra_mem_bytes")) if pre else "—",
                ])
            header, rows = drop_empty_columns(header, rows, ("peak MiB",))
            lines += table(header, rows) + [""]
    return lines


# --------------------------------------------------------------------------- search step
def search_section(runs) -> list:
    lines = []
    for run in runs:
        groups = defaultdict(dict)
        for e in run.entries:
            if e.get("subject") == "search":
                # entries from before the relaxed forward have no "forward": they are hard steps
                key = "relaxed" if e.get("forward") == "relaxed" else e.get("impl")
                groups[(e.get("device"), e.get("B"))][key] = e
        if not groups:
            continue
        if not lines:
            lines += ["## Search step", "",
                      "The hard (paper's) forward with the fused operator (`impl=triton`) or the reference "
                      "(`impl=torch`), and the relaxed forward of the default search (decision 7; full length, "
                      "no fused kernel). Peak: extra memory of one step.", ""]
        rows = []
        for (device, B), by in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
            t, r, x = by.get("triton"), by.get("torch"), by.get("relaxed")
            rows.append([device, B, fmt_time(t.median) if t else "—", fmt_time(r.median) if r else "—",
                         fmt_ratio(ratio(r.median, t.median)) if (t and r) else "—",
                         fmt_time(x.median) if x else "—",
                         fmt_ratio(ratio(x.median, r.median)) if (x and r) else "—",
                         fmt_mib(r.get("peak_extra_memory_bytes")) if r else "—",
                         fmt_mib(x.get("peak_extra_memory_bytes")) if x else "—"])
        lines += table(["device", "B", "hard, impl=triton", "hard, impl=torch", "triton vs torch", "relaxed",
                        "relaxed vs hard (torch)", "hard peak MiB", "relaxed peak MiB"], rows) + [""]
    return lines


# --------------------------------------------------------------------------- lmms-eval plugin
def lmms_eval_rows(run):
    """{device: {B: entry}} of the plugin's throughput cases (``bench/test_bench_lmms_eval.py``)."""
    out = defaultdict(dict)
    for e in run.entries:
        if e.get("subject") == "lmms_eval":
            out[e.get("device")][e.get("B")] = e
    return out


def _samples_per_s(e):
    return e.get("docs") / e.median if e.get("docs") and e.median > 0 else None


def lmms_eval_section(runs) -> list:
    lines = []
    for run in runs:
        rows_by_device = lmms_eval_rows(run)
        if not rows_by_device:
            continue
        if not lines:
            lines += ["## lmms-eval plugin (`--model eos`, demo model, eos_demo docs)", ""]
        rows = []
        for device, by_b in sorted(rows_by_device.items(), key=lambda kv: str(kv[0])):
            base = by_b.get(1)
            for B, e in sorted(by_b.items()):
                per = e.median / e.get("docs") if e.get("docs") else None
                gen = e.get("generate_s") / e.get("timed_samples") if e.get("timed_samples") else None
                rows.append([device, B, e.get("theta"), fmt_num(_samples_per_s(e)), fmt_time(per), fmt_time(gen),
                             fmt_pct(e.get("overhead_fraction")),
                             fmt_pct(e.get("overhead_fraction_without_image_processor")),
                             fmt_ratio(ratio(base.median, e.median)) if base is not None else "—"])
        lines += table(["device", "B", "theta", "samples/s", "per sample", "generate per sample", "overhead",
                        "overhead w/o image processor", "speed-up vs B1"], rows)
        lines += ["", "Overhead: the request loop's time outside `model.generate` (prompt building, padding, budget "
                  "accounting, decoding, and the image processor where the loop runs it or waits for the background "
                  "thread that prepares the next batch's images; not the task's `doc_to_visual` on the loop's "
                  "thread) as a share of the generate time; \"w/o image processor\" leaves out that processor "
                  "time and that wait.", ""]
    return lines


def _lmms_eval_targets(runs) -> list:
    speed, overhead = [], []
    for run in runs:
        for device, by_b in lmms_eval_rows(run).items():
            where = f"{device}{' ' + run.gpu if device == 'cuda' and run.gpu else ''}"
            if 1 in by_b and len(by_b) > 1:
                B = max(by_b)
                speed.append((by_b[1].median / by_b[B].median, f"{where} B{B} vs B1"))
            for B, e in by_b.items():
                if e.get("overhead_fraction") is not None:
                    overhead.append((e.get("overhead_fraction"), f"{where} B{B}"))
    out = []
    for name, values, threshold, higher, fmt in (
            ("lmms-eval plugin: a batch is faster per sample than batch 1", speed, 1.0, True, fmt_ratio),
            (f"lmms-eval plugin: overhead < {PLUGIN_OVERHEAD:.0%} of the generate time", overhead,
             PLUGIN_OVERHEAD, False, fmt_pct)):
        if not values:
            out.append((name, NOT_MEASURED, "no lmms-eval plugin results in these files"))
            continue
        ok = [v for v in values if (v[0] > threshold if higher else v[0] < threshold)]
        verdict = MET if len(ok) == len(values) else MISSED
        out.append((name, verdict, f"{len(ok)}/{len(values)} cases meet it: "
                    + ", ".join(f"{w} {fmt(v)}" for v, w in values) + " (demo model; CPU and GPU both count)"))
    return out


# --------------------------------------------------------------------------- targets
def _is_target_gpu(name) -> bool:
    return bool(name) and any(g in name.lower() for g in TARGET_GPUS)


def _shape_id(e):
    return f"B{e.get('B')}-K{e.get('K')}-{e.get('dtype')}"


def _ratio_target(runs, mode, baseline, threshold, what):
    """Fused vs ``baseline`` over the CUDA operator grid: (verdict, detail)."""
    values, gpus = [], set()
    for run in runs:
        for (m, device, _dtype), shapes in operator_rows(run).items():
            if m != mode or device != "cuda":
                continue
            for by_impl in shapes.values():
                if "triton" in by_impl and baseline in by_impl:
                    fused = by_impl["triton"]
                    values.append((by_impl[baseline].median / fused.median, _shape_id(fused)))
                    gpus.add(run.gpu)
    if not values:
        return NOT_MEASURED, f"no CUDA {what} pairs in these results"
    return _verdict(values, threshold, gpus, OPERATOR_GRID, "shapes")


def _verdict(values, threshold, gpus, expected, unit, higher_is_better=True, fmt=lambda x: f"{x:.2f}"):
    """Verdict over ``values`` = [(value, where)]: met only if every value meets ``threshold``."""
    ok = [v for v in values if (v[0] >= threshold if higher_is_better else v[0] <= threshold)]
    worst = min(values) if higher_is_better else max(values)
    verdict = MET if len(ok) == len(values) else MISSED
    detail = (f"{len(ok)}/{len(values)} {unit} meet it; worst {fmt(worst[0])} ({worst[1]}), "
              f"median {fmt(statistics.median(v[0] for v in values))}")
    if expected and len(values) < expected:
        detail += f"; partial: {len(values)} of the {expected} {unit} of the issue measured"
        if verdict == MET:
            verdict = MET_PARTIAL
    off = sorted(g or "?" for g in gpus if not _is_target_gpu(g))
    if off:
        detail += f"; measured on {', '.join(off)}, the targets are for an H100/H200"
    else:
        detail += f"; on {', '.join(sorted(g or '?' for g in gpus))}"
    return verdict, detail


def _bandwidth_target(runs, mode):
    values, gpus, unknown = [], set(), 0
    for run in runs:
        for (m, device, _dtype), shapes in operator_rows(run).items():
            if m != mode or device != "cuda":
                continue
            for (B, _K), by_impl in shapes.items():
                fused = by_impl.get("triton")
                if fused is None or B != BANDWIDTH_BATCH:
                    continue
                frac = _bw_fraction(fused, run)
                if frac is None:
                    unknown += 1
                    continue
                values.append((frac, _shape_id(fused)))
                gpus.add(run.gpu)
    if not values:
        why = (f"{unknown} fused B={BANDWIDTH_BATCH} cases on a GPU of unknown peak bandwidth" if unknown
               else f"no CUDA fused {mode} results at B={BANDWIDTH_BATCH}")
        return NOT_MEASURED, why
    return _verdict(values, BANDWIDTH_FRACTION, gpus, 8, "shapes", fmt=fmt_pct)


def _e2e_values(runs, device_filter):
    """Per (run, device, B) at r = TARGET_BUDGET: (paper/prune, decoder-only / predicted, notes)."""
    out = []
    for run in runs:
        for (device, B), slot in e2e_tables(run).items():
            if not device_filter(device):
                continue
            cid = f"paper-r{TARGET_BUDGET}"
            pre = slot["prefill"]
            paper, prune = pre.get(cid), pre.get(f"prune-r{TARGET_BUDGET}")
            pp = ratio(paper.median, prune.median) if (paper and prune) else None
            whole, decoder, predicted = e2e_speedups(slot, cid)
            measured = decoder if decoder is not None else whole
            share = ratio(measured, predicted)
            note = "decoder-only" if decoder is not None else "whole prefill (no vision-tower timing)"
            out.append((run, device, B, pp, share, measured, predicted, note))
    return out


def evaluate_targets(runs) -> list:
    """[(target, verdict, detail)] for the targets of the issue."""
    targets = []
    targets.append((f"operator forward ≥ {FWD_VS_EAGER:g}× eager", *_ratio_target(
        runs, "fwd", "torch", FWD_VS_EAGER, "forward fused/eager")))
    targets.append((f"operator forward ≥ {FWD_VS_COMPILE:g}× torch.compile", *_ratio_target(
        runs, "fwd", "compile", FWD_VS_COMPILE, "forward fused/compile")))
    targets.append((f"operator forward+backward ≥ {FWDBWD_VS_EAGER:g}× eager", *_ratio_target(
        runs, "fwdbwd", "torch", FWDBWD_VS_EAGER, "forward+backward fused/eager")))
    targets.append((f"operator ≥ {BANDWIDTH_FRACTION:.0%} of memory bandwidth at B = {BANDWIDTH_BATCH} (forward)",
                    *_bandwidth_target(runs, "fwd")))
    targets.append((f"operator ≥ {BANDWIDTH_FRACTION:.0%} of memory bandwidth at B = {BANDWIDTH_BATCH} "
                    "(forward+backward, same threshold)", *_bandwidth_target(runs, "fwdbwd")))

    gpu = _e2e_values(runs, lambda d: d == "cuda")
    cpu = _e2e_values(runs, lambda d: d != "cuda")

    def cpu_info(index):
        vals = [(v[2], v[index]) for v in cpu if v[index] is not None]
        if not vals:
            return ""
        return "; for information, CPU (not the target machine): " + ", ".join(
            f"B{B} {x:.2f}" for B, x in vals)

    t5 = f"prefill with the paper's Θ at r = {TARGET_BUDGET} within {PAPER_VS_PRUNE - 1:.0%} of pure prune"
    vals = [(v[3], f"B{v[2]}") for v in gpu if v[3] is not None]
    if vals:
        verdict, detail = _verdict(vals, PAPER_VS_PRUNE, {v[0].gpu for v in gpu}, None, "batch sizes",
                                   higher_is_better=False)
        targets.append((t5, verdict, "paper/prune time " + detail))
    else:
        targets.append((t5, NOT_MEASURED, "no CUDA end-to-end results" + cpu_info(3)))

    t6 = (f"prefill speed-up at r = {TARGET_BUDGET} ≥ {FLOPS_SHARE:.0%} of the FLOPs-predicted speed-up")
    vals = [(v[4], f"B{v[2]}, {v[7]}, measured {v[5]:.2f}× vs predicted {v[6]:.2f}×") for v in gpu
            if v[4] is not None]
    if vals:
        verdict, detail = _verdict(vals, FLOPS_SHARE, {v[0].gpu for v in gpu}, None, "batch sizes")
        targets.append((t6, verdict, "measured/predicted " + detail))
    else:
        targets.append((t6, NOT_MEASURED, "no CUDA end-to-end results" + cpu_info(4)))
    targets += _lmms_eval_targets(runs)
    return targets


def targets_section(runs) -> list:
    rows = [[t, f"**{v}**", d] for t, v, d in evaluate_targets(runs)]
    return (["## Targets of the issue (H100/H200)", ""] + table(["target", "verdict", "measured"], rows)
            + ["", "A verdict is computed over every matching result in these files (ratios within each "
               "file), and is *met* only if every one meets the target; *met where measured (partial)* means "
               "part of the issue's grid is missing from these files.", ""])


# --------------------------------------------------------------------------- all results
def all_section(runs) -> list:
    lines = ["## All results", ""]
    for run in runs:
        groups = OrderedDict()
        for e in sorted(run.entries, key=lambda e: (str(e.group), e.name)):
            groups.setdefault(e.group, []).append(e)
        for group, entries in groups.items():
            lines += [f"### {group} · {run.label}", ""]
            rows = [[f"`{e.name}`", fmt_time(e.median), fmt_time(e.stats.get("mean")),
                     fmt_time(e.stats.get("stddev")), fmt_time(e.stats.get("min")),
                     fmt_time(e.stats.get("max")), e.stats.get("rounds", "?"), e.stats.get("iterations", "?")]
                    for e in entries]
            lines += table(["benchmark", "median", "mean", "stddev", "min", "max", "rounds", "iterations"], rows)
            lines.append("")
    return lines


# --------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _grid(plt, n, title):
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(9.0, 6.5 * cols), 4.2 * rows + 0.4), squeeze=False)
    fig.suptitle(textwrap.fill(title, 120 if cols > 1 else 90), fontsize=10)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _machine_title(runs, what):
    parts = []
    for run in runs:
        env = run.env
        dev = env.get("gpu_name") or ((run.machine.get("cpu") or {}).get("brand_raw") or "CPU") + \
            f" ({env.get('cpu_count', '?')} cores)"
        parts.append(f"{dev}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}")
    return f"{what} — " + "; ".join(OrderedDict.fromkeys(parts))


def plot_operator(runs, out_dir, plt):
    panels = OrderedDict()
    for run in runs:
        for (mode, device, dtype), shapes in sorted(operator_rows(run).items(), key=lambda kv: tuple(map(str, kv[0]))):
            key = (run.label if len(runs) > 1 else "", device, dtype, mode)
            panels[key] = shapes
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels), _machine_title(runs, "eos_reduce median time vs K (M = 576 − K, d = 4096)"))
    styles = {"triton": "C0", "torch": "C3", "compile": "C2"}
    markers = ["o", "s", "^", "D", "v"]
    for ax, ((label, device, dtype, mode), shapes) in zip(axes, panels.items()):
        batches = sorted({B for B, _ in shapes})
        for impl in ("triton", "torch", "compile"):
            for bi, B in enumerate(batches):
                pts = sorted((K, by[impl].median * 1e3) for (b, K), by in shapes.items() if b == B and impl in by)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=styles[impl],
                            marker=markers[bi % len(markers)], label=f"{IMPL_LABEL[impl]} B={B}")
        ax.set_xticks(sorted({K for _, K in shapes}))
        ax.set_yscale("log")
        ax.set_xlabel("K (anchors kept)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{mode} · {device} · {dtype}" + (f" · {label}" if label else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(out_dir, "operator_time_vs_K.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_importance(runs, out_dir, plt):
    panels = OrderedDict()
    for run in runs:
        for e in run.entries:
            if e.get("subject") == "importance":
                key = (run.label if len(runs) > 1 else "", e.get("device"), e.get("dtype"))
                panels.setdefault(key, []).append(e)
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels), _machine_title(runs, "text→visual importance, median time vs text rows T"))
    colors = {"triton": "C0", "torch": "C1", "eager": "C3"}
    for ax, ((label, device, dtype), entries) in zip(axes, panels.items()):
        for impl in ("triton", "torch", "eager"):
            for bi, B in enumerate(sorted({e.get("B") for e in entries})):
                pts = sorted((e.get("T"), e.median * 1e3) for e in entries if e.get("impl") == impl and e.get("B") == B)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[impl],
                            marker="os^"[bi % 3], label=f"{IMPORTANCE_LABEL[impl]} B={B}")
        ax.set_yscale("log")
        ax.set_xlabel("text rows T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{device} · {dtype}" + (f" · {label}" if label else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "importance_time_vs_T.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_e2e(runs, out_dir, plt):
    panels = OrderedDict()
    for run in runs:
        for (device, B), slot in sorted(e2e_tables(run).items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
            for phase in ("prefill", "decode"):
                if slot[phase]:
                    panels[(run.label if len(runs) > 1 else "", device, B, phase)] = slot[phase]
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels), _machine_title(runs, "LLaVA latency vs retain budget r"))
    for ax, ((label, device, B, phase), configs) in zip(axes, panels.items()):
        for kind, color in (("paper", "C0"), ("prune", "C1")):
            pts = sorted((e.get("budget"), e.median * 1e3, e.get("count")) for cid, e in configs.items()
                         if e.get("config") == kind and e.get("budget") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker="o",
                        label="paper Θ" if kind == "paper" else "pure prune (same schedule)")
                for r, t, count in pts:
                    if count == "final" and kind == "paper":
                        ax.annotate("count=final", (r, t), textcoords="offset points", xytext=(4, 4), fontsize=7)
        base = configs.get("unpatched")
        if base is not None:
            ax.axhline(base.median * 1e3, color="k", linestyle="--", label="unpatched")
        ax.set_xlabel("retain budget r (visual tokens)")
        ax.set_ylabel("median time (ms)" + (" per token" if phase == "decode" else ""))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
        ax.set_title(f"{phase} · {device} · B={B}" + (f" · {label}" if label else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "e2e_latency_vs_budget.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main
def build_report(paths, out_dir) -> tuple:
    """Write ``out_dir/report.md`` and the plots; return (markdown text, [plot paths])."""
    runs = load_runs(paths)
    os.makedirs(out_dir, exist_ok=True)
    plt = _pyplot()
    plots = []
    if plt is not None:
        for fn in (plot_operator, plot_importance, plot_e2e):
            p = fn(runs, out_dir, plt)
            if p:
                plots.append(p)
    sources = ", ".join(f"`{os.path.relpath(p, out_dir)}`" for p in paths)
    lines = ["# eos_kernels benchmark report", "",
             f"Generated by `python -m bench.report` from {sources} (pytest-benchmark "
             f"{runs[0].data.get('version', '?')}). Every number below is computed from those files; none is "
             "edited by hand.", ""]
    lines += machine_section(runs)
    lines += targets_section(runs)
    lines += operator_section(runs)
    lines += importance_section(runs)
    lines += e2e_section(runs)
    lines += search_section(runs)
    lines += lmms_eval_section(runs)
    lines += ["## Plots", ""]
    if plt is None:
        lines += ["matplotlib is not installed: no plots were written.", ""]
    elif not plots:
        lines += ["No data to plot.", ""]
    else:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    lines += all_section(runs)
    text = "\n".join(lines).rstrip() + "\n"
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text, plots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    parser.add_argument("--out", help="output folder (default: the first JSON's folder)")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    _, plots = build_report(args.results, out_dir)
    print(f"wrote {os.path.join(out_dir, 'report.md')}")
    for p in plots:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
