"""``python -m bench.report`` on a tiny synthetic pytest-benchmark JSON (fast, no torch work)."""
import copy
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import report  # noqa: E402

H100_BW = 3.35e12
OP_BYTES = int(0.6 * H100_BW * 1e-4)  # 60% of peak at the fused median below


def _bench(name, group, median, info):
    return {"group": group, "name": name, "fullname": f"bench/x.py::{name}", "params": {}, "param": None,
            "extra_info": info, "options": {},
            "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median * 1.01, "stddev": median * 0.05,
                      "rounds": 10, "median": median, "iqr": 0.0, "q1": median, "q3": median,
                      "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": median,
                      "hd15iqr": median, "ops": 1 / median, "total": median * 10, "iterations": 1}}


def _op(impl, mode, median, B=32, K=64, dtype="bf16", device="cuda"):
    return _bench(f"test_operator_{mode}[{device}-{impl}-B{B}-K{K}-{dtype}]", f"operator {mode} {device} {dtype} B{B}",
                  median, {"subject": "operator", "mode": mode, "impl": impl, "device": device,
                           "device_name": "NVIDIA H100 80GB HBM3", "B": B, "K": K, "M": 576 - K, "d": 4096,
                           "dtype": dtype, "bytes": OP_BYTES, "peak_bandwidth_Bps": H100_BW,
                           "peak_extra_mem_bytes": 3 * 2**20, "compile_s": 12.0 if impl == "compile" else None})


def _e2e(phase, config_id, median, B=1, device="cuda"):
    config = config_id.split("-r")[0]
    budget = int(config_id.split("-r")[1]) if "-r" in config_id else None
    info = {"subject": "e2e", "phase": phase, "config": config, "config_id": config_id, "device": device,
            "device_name": "NVIDIA H100 80GB HBM3", "B": B, "dtype": "bfloat16", "budget": budget,
            "count": "mean_leaving" if budget else None, "final": 7 if budget else 576,
            "mean_leaving": 64.0 if budget else 576.0, "mean_processed": 81.78 if budget else 576.0,
            "predicted_speedup": 3.6 if budget else 1.0, "kv_cache_bytes": 2**20,
            "model": {"hidden": 4096, "layers": 32, "heads": 32, "ffn": 11008}}
    return _bench(f"test_e2e_{phase}[{device}-B{B}-{config_id}]", f"e2e {phase} {device} B{B}", median, info)


def synthetic(gpu=True):
    benchmarks = [
        _op("triton", "fwd", 1.0e-4), _op("torch", "fwd", 6.0e-4), _op("compile", "fwd", 1.2e-4),
        _op("triton", "fwdbwd", 3.0e-4), _op("torch", "fwdbwd", 6.0e-4),
        _e2e("prefill", "unpatched", 0.100), _e2e("prefill", "paper-r64", 0.030),
        _e2e("prefill", "prune-r64", 0.029), _e2e("decode", "unpatched", 0.020),
        _e2e("decode", "paper-r64", 0.019),
        _bench("test_e2e_vision[cuda-B1]", "e2e vision cuda B1", 0.010,
               {"subject": "e2e", "phase": "vision", "config": "vision", "device": "cuda", "B": 1}),
        _bench("test_importance[cuda-triton-B1-T64-bf16]", "importance cuda bf16 B1", 1e-4,
               {"subject": "importance", "impl": "triton", "device": "cuda", "B": 1, "T": 64, "L": 648,
                "dtype": "bf16", "heads": 32, "head_dim": 128, "peak_extra_mem_bytes": 2**20}),
        _bench("test_importance[cuda-eager-B1-T64-bf16]", "importance cuda bf16 B1", 1e-3,
               {"subject": "importance", "impl": "eager", "device": "cuda", "B": 1, "T": 64, "L": 648,
                "dtype": "bf16", "heads": 32, "head_dim": 128, "peak_extra_mem_bytes": 60 * 2**20}),
    ]
    env = {"torch": "2.11.0+cu130", "torch_cuda": "13.0", "triton": "3.6.0", "transformers": "5.17.0",
           "eos_kernels": "0.1.0", "git_commit": "0123456789abcdef", "git_dirty": False, "cpu_count": 16,
           "cpu_affinity": 16, "torch_threads": 16, "gpu_count": 1, "gpu_name": "NVIDIA H100 80GB HBM3",
           "peak_bandwidth_Bps": H100_BW, "loadavg_start": [0.1, 0.1, 0.1], "loadavg_end": [1.0, 1.0, 1.0]}
    data = {"machine_info": {"node": "gpu-box", "python_version": "3.12.3", "cpu": {"brand_raw": "Xeon"},
                             "eos_bench": env},
            "commit_info": {"id": "0123456789abcdef", "dirty": False}, "benchmarks": benchmarks,
            "datetime": "2026-11-21T00:00:00", "version": "5.2.3"}
    if not gpu:
        data = copy.deepcopy(data)
        env = data["machine_info"]["eos_bench"]
        env.update(gpu_name=None, gpu_count=0, peak_bandwidth_Bps=None, torch_cuda=None)
        for b in data["benchmarks"]:
            b["extra_info"]["device"] = "cpu"
            b["extra_info"].pop("peak_bandwidth_Bps", None)
    return data


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(synthetic()))
    return path


def test_markdown_rows_ratios_and_machine(results, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(results), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    # machine, GPU and versions are named
    for needle in ("gpu-box", "NVIDIA H100 80GB HBM3", "3.35 TB/s", "2.11.0+cu130", "3.6.0", "5.17.0", "0123456789"):
        assert needle in text
    # operator forward row: fused 100 µs, eager 600 µs, compile 120 µs -> 6.00x, 1.20x, 5.00x; 60% of peak
    row = next(line for line in text.splitlines() if line.startswith("| 32 | 64 | 512 | 100 µs"))
    assert "| 600 µs | 120 µs | 6.00× | 1.20× | 5.00× |" in row
    assert "(60.0%)" in row
    # importance: kernel vs eager attention 10x
    assert any(line.startswith("| 1 | 64 | 648 | 100 µs | 1 ms | 10.00× |") for line in text.splitlines())
    # e2e: paper-r64 3.33x whole, decoder-only (0.09/0.02) 4.5x, predicted 3.6x -> 1.25, paper/prune 30/29
    row = next(line for line in text.splitlines() if line.startswith("| paper-r64 |"))
    assert "| 30 ms | 3.33× | 4.50× | 3.60× | 1.25× | 1.03× | 19 ms | 1.05× |" in row
    # every benchmark is listed in the raw section
    for b in synthetic()["benchmarks"]:
        assert f"`{b['name']}`" in text


def test_target_verdicts():
    verdicts = {t: v for t, v, _ in report.evaluate_targets(_runs(synthetic()))}
    assert verdicts["operator forward ≥ 5× eager"] == report.MET_PARTIAL  # 1 of the 24 shapes
    assert verdicts["operator forward ≥ 1.5× torch.compile"] == report.MISSED
    assert verdicts["operator forward+backward ≥ 3× eager"] == report.MISSED
    bw = [v for t, v in verdicts.items() if "bandwidth" in t]
    assert bw == [report.MET_PARTIAL, report.MISSED]  # forward: 60% of peak at B=32; forward+backward: 20%
    e2e = [v for t, v in verdicts.items() if "prefill" in t]
    assert e2e == [report.MET, report.MET]
    details = {t: d for t, _, d in report.evaluate_targets(_runs(synthetic()))}
    assert "partial: 1 of the 24 shapes" in details["operator forward ≥ 5× eager"]


def test_cpu_only_results_measure_no_target(tmp_path):
    verdicts = report.evaluate_targets(_runs(synthetic(gpu=False)))
    assert {v for _, v, _ in verdicts} == {report.NOT_MEASURED}
    assert any("CPU (not the target machine)" in d for _, _, d in verdicts)


def test_plots_are_written(results, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    _, plots = report.build_report([str(results)], str(out))
    names = sorted(os.path.basename(p) for p in plots)
    assert names == ["e2e_latency_vs_budget.png", "importance_time_vs_T.png", "operator_time_vs_K.png"]
    for p in plots:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "![operator_time_vs_K.png](operator_time_vs_K.png)" in (out / "report.md").read_text()


def _runs(data):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.json")
        with open(path, "w") as f:
            json.dump(data, f)
        return report.load_runs([path])


def _plugin(B, median, overhead, device="cpu"):
    return _bench(f"test_plugin_throughput[{device}-B{B}]", f"lmms-eval plugin {device}", median,
                  {"subject": "lmms_eval", "device": device, "B": B, "docs": 32, "theta": "fastv-1-8",
                   "timed_samples": 160, "generate_s": 5 * median * 0.9, "visuals_s": 0.0, "preprocess_s": 0.01,
                   "overhead_fraction": overhead, "overhead_fraction_without_image_processor": overhead / 2})


def test_lmms_eval_plugin_section_and_targets(tmp_path):
    data = synthetic(gpu=False)
    data["benchmarks"] += [_plugin(1, 2.0, 0.04), _plugin(4, 0.5, 0.07)]
    path = tmp_path / "plugin.json"
    path.write_text(json.dumps(data))
    text, _ = report.build_report([str(path)], str(tmp_path / "out"))
    row = next(line for line in text.splitlines() if line.startswith("| cpu | 4 |"))
    # 32 docs in 0.5 s: 64 samples/s, 15.6 ms each, 4x batch 1; overhead 7.0% (3.5% without the image processor)
    assert "| fastv-1-8 | 64 | 15.6 ms |" in row and "| 7.0% | 3.5% | 4.00× |" in row
    verdicts = {t: (v, d) for t, v, d in report.evaluate_targets(_runs(data))}
    speed = verdicts["lmms-eval plugin: a batch is faster per sample than batch 1"]
    assert speed[0] == report.MET and "cpu B4 vs B1 4.00×" in speed[1]
    over = verdicts["lmms-eval plugin: overhead < 5% of the generate time"]
    assert over[0] == report.MISSED and "1/2 cases" in over[1]
