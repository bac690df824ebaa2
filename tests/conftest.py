"""Test configuration.

Without a GPU the Triton kernels run through Triton's interpreter; it has to be
switched on before ``triton.jit`` decorates anything, hence at import time here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and two spinning threads crawl on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
