"""pytest-benchmark suites of eos_kernels, and the report tool (``python -m bench.report``).

Run ``pytest bench/ --benchmark-only`` (see ``bench/results/README.md``). One
file per subject: the operator, the importance kernel, end to end in a LLaVA
model, one search step. GPU cases skip with a reason on a machine without
CUDA; a small CPU subset runs the PyTorch reference paths there.
"""
