"""Test configuration.

Without a GPU the Triton kernels run through Triton's interpreter; it has to be
switched on before ``triton.jit`` decorates anything, hence at import time here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (`-n N`): N workers share the cores, so each takes its share of torch's threads (the tiny
# models gain nothing from more; oversubscribed threads spin), unless the caller set OMP_NUM_THREADS
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and two spinning threads crawl on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- the CUDA patched-model tests'
@pytest.fixture
def use_impl(monkeypatch):
    """``use_impl("triton" | "torch")``: the implementation the patched model's reductions run (triton
    from the start, so that the kernels are what is tested, also in the interpreter subset).

    Rebinds ``eos_reduce`` / ``text_to_visual_importance`` with a fixed ``impl=`` in every
    ``eos_kernels`` module that imported them (the patching code), whatever its layout."""
    import functools
    import sys

    import eos_kernels.integrations.llava  # noqa: F401  (import the patching code and every adapter)
    import eos_kernels.integrations.llava_next  # noqa: F401
    import eos_kernels.integrations.qwen2_vl  # noqa: F401
    from eos_kernels.importance import text_to_visual_importance
    from eos_kernels.operator import eos_reduce

    originals = {"eos_reduce": eos_reduce, "text_to_visual_importance": text_to_visual_importance}

    def use(impl):
        done = set()
        for modname, mod in list(sys.modules.items()):
            if mod is None or not modname.startswith("eos_kernels."):
                continue
            for attr, fn in originals.items():
                bound = getattr(mod, attr, None)
                if modname == fn.__module__ or modname == "eos_kernels":
                    continue  # where it is defined / the package's lazy export
                if bound is fn or (isinstance(bound, functools.partial) and bound.func is fn):
                    monkeypatch.setattr(mod, attr, functools.partial(fn, impl=impl))
                    done.add(attr)
        assert done == set(originals), f"no eos_kernels module calls {set(originals) - done}: the test must be updated"

    use("triton")
    return use


@pytest.fixture
def exact_fp32():
    """No TF32 in the vision towers' convolutions and matmuls (cuDNN allows it by default): fp32 means fp32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def demo_search(tmp_path_factory):
    """The built-in demo model, its processor and a 64-question search split (the searches on the built-in
    model: tests/test_search_relaxed.py, tests/test_search_sampled.py)."""
    from eos_kernels.demo import build, task

    root = tmp_path_factory.mktemp("demo-search")
    data = task.generate_split(str(root), "search", 64, seed=0)
    model, processor = build.load_demo_model()
    return model, processor, data
