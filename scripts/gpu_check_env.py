"""Step 1 of scripts/gpu_check.sh: the environment record, as JSON.

Usage: ``python3 scripts/gpu_check_env.py OUT.json [--expect-cuda]``

Records the GPU (name, memory, capability, driver, clocks, from torch and
``nvidia-smi``), CUDA / cuDNN / torch / triton / transformers / pytest versions,
the commit (git if the checkout has it, else ``GPU_CHECK_COMMIT``) and a digest
of the source tree, where ``eos_kernels`` was imported from, whether the compile
caches were cold, and a few sanity checks that separate a broken machine from a
broken kernel: a bf16 matmul against fp32, the device-to-device copy bandwidth
and the bf16 matmul rate (the ceilings to read the benchmarks against), and a
trivial Triton kernel compiled and run. Every probe is guarded: a failing one
is recorded as ``{"error": ...}`` and the file is still written. Exit status 1
when ``--expect-cuda`` is given and CUDA is unavailable or a sanity check failed.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ("eos_kernels", "integrations", "bench", "tests", "scripts")
SOURCE_FILES = ("setup.py", "pyproject.toml")


def guarded(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a record, not a test: keep going
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}


def sh(*cmd, timeout=20):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[:300]}")
    return out.stdout.strip()


def version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def source_digest():
    """sha256 over the tree's source files (path and bytes), to match a run to a commit without git."""
    h = hashlib.sha256()
    n = 0
    paths = [os.path.join(REPO, f) for f in SOURCE_FILES]
    for d in SOURCE_DIRS:
        for root, dirs, files in os.walk(os.path.join(REPO, d)):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__" and not x.startswith("."))
            paths += [os.path.join(root, f) for f in files if f.endswith((".py", ".sh", ".toml", ".md"))]
    for p in sorted(paths):
        if os.path.isfile(p):
            h.update(os.path.relpath(p, REPO).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read())
            n += 1
    return {"sha256": h.hexdigest(), "files": n, "dirs": list(SOURCE_DIRS) + list(SOURCE_FILES)}


def git_info():
    info = {"commit_env": os.environ.get("GPU_CHECK_COMMIT") or None}
    for key, cmd in (("commit", ("git", "rev-parse", "HEAD")), ("branch", ("git", "rev-parse", "--abbrev-ref", "HEAD")),
                     ("status", ("git", "status", "--porcelain", "--untracked-files=no"))):
        try:
            info[key] = sh(*cmd)
        except Exception as exc:  # noqa: BLE001
            info[key] = None
            info.setdefault("git_error", f"{type(exc).__name__}: {exc}"[:300])
    info["dirty"] = bool(info.get("status")) if info.get("status") is not None else None
    info["source_digest"] = guarded(source_digest)
    return info


def nvidia_smi():
    if not shutil.which("nvidia-smi"):
        return {"error": "nvidia-smi not found"}
    fields = ("name", "memory.total", "memory.used", "driver_version", "pci.bus_id", "clocks.sm", "clocks.max.sm",
              "clocks.mem", "clocks.max.mem", "power.draw", "power.limit", "temperature.gpu", "utilization.gpu",
              "persistence_mode", "compute_mode", "mig.mode.current")
    rows = sh("nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader")
    gpus = [dict(zip(fields, (c.strip() for c in line.split(",")))) for line in rows.splitlines() if line.strip()]
    out = {"gpus": gpus}
    head = guarded(lambda: sh("nvidia-smi"))
    if isinstance(head, str):
        out["cuda_version_driver"] = next((line.split("CUDA Version:")[1].strip(" |") for line in head.splitlines()
                                           if "CUDA Version:" in line), None)
        print(head)
    return out


def cache_dirs():
    triton_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    out = {"triton_cache_dir": triton_dir}
    out["triton_cache_entries"] = len(os.listdir(triton_dir)) if os.path.isdir(triton_dir) else 0
    inductor = guarded(lambda: __import__("torch._inductor.runtime.cache_dir_utils",
                                          fromlist=["cache_dir"]).cache_dir())
    if isinstance(inductor, str):
        out["inductor_cache_dir"] = inductor
        out["inductor_cache_entries"] = len(os.listdir(inductor)) if os.path.isdir(inductor) else 0
    else:
        out["inductor_cache_dir"] = inductor
    out["cold"] = out["triton_cache_entries"] == 0 and not out.get("inductor_cache_entries")
    return out


def ptxas_version():
    import triton

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    path = base if os.path.isfile(base) else shutil.which("ptxas")
    if not path:
        return None
    return {"path": path, "version": sh(path, "--version").splitlines()[-1]}


def torch_info():
    import torch

    info = {
        "torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", None),
        "cuda_runtime": torch.version.cuda, "cudnn": guarded(lambda: torch.backends.cudnn.version()),
        "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
        "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "devices": [],
    }
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append({
            "index": i, "name": p.name, "total_memory_bytes": int(p.total_memory),
            "total_memory_gib": round(p.total_memory / 2 ** 30, 2), "capability": f"{p.major}.{p.minor}",
            "multi_processor_count": p.multi_processor_count,
            "free_memory_bytes": guarded(lambda: int(torch.cuda.mem_get_info(i)[0])),
        })
    return info


def sanity_matmul(device):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    n = 2048 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    ref = (a.double() @ b.double())
    got = (a.bfloat16() @ b.bfloat16()).double()
    rel = ((got - ref).norm() / ref.norm()).item()
    return {"n": n, "bf16_vs_fp64_rel_err": rel, "ok": rel < 2e-2}


def copy_bandwidth():
    import torch

    n = 2 ** 28  # 1 GiB of fp32
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / reps
    del x, y
    torch.cuda.empty_cache()
    return {"bytes_moved_per_copy": 2 * n * 4, "seconds": sec, "GBps_read_plus_write": 2 * n * 4 / sec / 1e9}


def matmul_rate():
    import torch

    n = 8192
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / reps
    return {"n": n, "seconds": sec, "bf16_TFLOPs": 2 * n ** 3 / sec / 1e12}


def triton_smoke(device):
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)

    n = 1000
    x = torch.randn(n, device=device)
    y = torch.randn(n, device=device)
    out = torch.full_like(x, float("nan"))
    t0 = time.perf_counter()
    add_kernel[(triton.cdiv(n, 256),)](x, y, out, n, BLOCK=256)
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ok = bool(torch.equal(out, x + y))
    return {"ok": ok, "first_call_s": first, "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}


def main(argv):
    if not argv or argv[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    path, expect_cuda = argv[0], "--expect-cuda" in argv[1:]
    t0 = time.time()
    rec = {
        "schema": "eos_kernels gpu_check env 1",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "gpu" if expect_cuda else "cpu",
        "host": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
        "python": sys.version.split()[0], "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "loadavg": guarded(lambda: list(os.getloadavg())),
        "mem_total_kib": guarded(lambda: int(next(line.split()[1] for line in open("/proc/meminfo")
                                                  if line.startswith("MemTotal")))),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("CUDA_", "TRITON_", "TORCH", "EOS_", "GPU_CHECK_", "OMP_", "PYTHON", "NVIDIA_"))},
        "git": git_info(),
        "packages": {d: version(d) for d in ("torch", "triton", "transformers", "accelerate", "numpy", "pytest",
                                             "pytest-benchmark", "hypothesis", "matplotlib", "tokenizers",
                                             "safetensors", "pillow", "pyyaml", "tqdm", "flash-attn")},
    }
    rec["nvidia_smi"] = guarded(nvidia_smi)
    rec["torch"] = guarded(torch_info)
    rec["caches"] = guarded(cache_dirs)
    rec["ptxas"] = guarded(ptxas_version)

    def where():
        sys.path.insert(0, REPO)
        import eos_kernels
        import eos_kernels.integrations as integ

        return {"eos_kernels": eos_kernels.__file__, "integrations": integ.__file__,
                "version": eos_kernels.__version__,
                "from_this_tree": os.path.realpath(eos_kernels.__file__).startswith(os.path.realpath(REPO) + os.sep)}

    rec["import"] = guarded(where)
    cuda = isinstance(rec["torch"], dict) and rec["torch"].get("cuda_available")
    device = "cuda" if cuda else "cpu"
    checks = {"matmul": guarded(lambda: sanity_matmul(device)), "triton_add": guarded(lambda: triton_smoke(device))}
    if cuda:
        checks["copy_bandwidth"] = guarded(copy_bandwidth)
        checks["matmul_rate"] = guarded(matmul_rate)
    rec["checks"] = checks
    gpu = {}
    if cuda:
        d = rec["torch"]["devices"][0]
        smi = (rec["nvidia_smi"].get("gpus") or [{}])[0] if isinstance(rec["nvidia_smi"], dict) else {}
        gpu = {"name": d["name"], "memory_gib": d["total_memory_gib"], "capability": d["capability"],
               "driver": smi.get("driver_version"), "cuda_runtime": rec["torch"]["cuda_runtime"]}
    rec["summary"] = {
        "gpu": gpu or None,
        "torch": rec["packages"]["torch"], "triton": rec["packages"]["triton"],
        "transformers": rec["packages"]["transformers"],
        "commit": rec["git"].get("commit") or rec["git"].get("commit_env"),
        "source_sha256": (rec["git"].get("source_digest") or {}).get("sha256"),
        "compile_cache_cold": (rec["caches"] or {}).get("cold") if isinstance(rec["caches"], dict) else None,
    }
    problems = []
    if expect_cuda and not cuda:
        problems.append("CUDA is not available")
    for name, c in checks.items():
        if isinstance(c, dict) and (c.get("error") or c.get("ok") is False):
            problems.append(f"sanity check {name} failed: {c.get('error') or c}")
    imp = rec["import"]
    if isinstance(imp, dict) and (imp.get("error") or not imp.get("from_this_tree")):
        problems.append(f"eos_kernels not imported from this tree: {imp}")
    rec["problems"] = problems
    rec["seconds"] = round(time.time() - t0, 2)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1, default=str)
    print(json.dumps(rec["summary"], indent=1, default=str))
    print(json.dumps(checks, indent=1, default=str))
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems and expect_cuda else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
