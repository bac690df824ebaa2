"""Test configuration.

Without a GPU the Triton kernels run through Triton's interpreter; it has to be
switched on before ``triton.jit`` decorates anything, hence at import time here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
