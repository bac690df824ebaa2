"""Triton kernels and their autograd glue.

Nothing here is imported by ``import eos_kernels``: Triton decides at
decoration time whether kernels run through its CPU interpreter
(``TRITON_INTERPRET=1``), so the kernel modules are imported on first use.
"""
