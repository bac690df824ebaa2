"""Every Triton kernel compiles for CUDA (Hopper sm_90 and Ampere sm_80), no GPU needed.

The interpreter runs the kernels' maths but not Triton's compiler; this runs
the compiler ahead of time on the exact argument types and constexprs the
launchers use (see tests/_compile_for_cuda.py), in a process without
TRITON_INTERPRET. It does not replace running on a GPU (bench/ and the
CUDA-only tests do that), but a kernel that cannot compile fails here.
"""
import os
import subprocess
import sys
from pathlib import Path


def test_all_kernel_variants_compile_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # import eos_kernels as this process does
    script = Path(__file__).with_name("_compile_for_cuda.py")
    proc = subprocess.run([sys.executable, "-W", "ignore", str(script), "90", "80"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.endswith("0 failed") and int(summary.split()[0]) >= 30, summary
