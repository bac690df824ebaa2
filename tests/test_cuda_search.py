"""CUDA-only: a few steps of the EOS search (``eos_kernels.search.run``) on the GPU.

The tiny LLaVA of ``tests/_tiny_models.py`` saved to disk and the small
LLaVA-format data set of the search tests, loaded by the driver itself onto the
device: bf16 weights with bf16 autocast (the driver's CUDA default) and the
fused kernels (``impl="triton"``). Checked: every step's loss is finite, the
active layers' search parameters move, ``theta.json`` is a valid Θ for the
model; the fused kernels and the PyTorch reference give close first-step losses
in bf16, and the same parameters after two steps in fp32.

Without CUDA the file skips; ``EOS_CUDA_TESTS_ON_CPU=1`` runs it on the CPU
through Triton's interpreter (``scripts/gpu_check.sh --cpu``; bf16 weights
without autocast there, as the driver does on a CPU).
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _cuda_subset import DEVICE, HAS_CUDA, requires_device  # noqa: E402

pytestmark = [requires_device, pytest.mark.usefixtures("one_torch_thread")]

pytest.importorskip("transformers")

from eos_kernels.search import SearchConfig, run  # noqa: E402
from eos_kernels.search_space import SearchSpace  # noqa: E402
from eos_kernels.theta import Theta  # noqa: E402

from _tiny_models import save_tiny_llava, write_llava_dataset  # noqa: E402

N_VIS, LAYERS = 16, 6
PARAMS = ("w_g", "w_c", "w_gamma", "w_tau", "w_theta", "w_rho", "w_nu")
STEPS = 3 if HAS_CUDA else 1


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_search")
    return dict(model=save_tiny_llava(root / "model"), data=write_llava_dataset(str(root / "data"), n=8, seed=0))


def search(env, out, **kw):
    cfg = dict(model=env["model"], data=env["data"], budget=6, steps=STEPS, batch_size=4, output=str(out),
               progress=False, device=DEVICE, dtype="bfloat16", impl="triton")
    cfg.update(kw)
    result = run(SearchConfig(**cfg))
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    state = torch.load(os.path.join(out, "search_state.pt"), map_location="cpu", weights_only=False)
    return result, log, state


def test_search_steps_bf16_fused_kernels(env, tmp_path):
    result, log, state = search(env, tmp_path / "bf16")
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for r in log:
        assert math.isfinite(r["total"]) and r["ce"] > 0, r
    init = SearchSpace(**state["space_kwargs"]).state_dict()
    active = log[0]["active_layers"]
    assert active, log[0]
    for k in ("w_gamma", "w_tau"):
        moved = (state["space"][k] != init[k]).tolist()
        assert any(moved[layer] for layer in active), (k, moved, active)
        assert torch.isfinite(state["space"][k]).all(), (k, state["space"][k])
    theta = Theta.from_json(str(tmp_path / "bf16" / "theta.json"))
    assert theta == result.theta and len(theta) >= 1
    theta.validate(LAYERS, N_VIS)


def test_fused_and_reference_agree_on_the_device(env, tmp_path, monkeypatch):
    """bf16 + autocast: first-step losses close; fp32 without autocast: same parameters after two steps.

    (The fp32 half runs on the GPU only: on the CPU, tests/test_search.py already compares them.)"""
    import eos_kernels.search.plots as plots

    monkeypatch.setattr(plots, "plot_log", lambda *args, **kwargs: [])  # not what is compared here
    losses = {}
    for impl in ("triton", "torch"):
        _, log, _ = search(env, tmp_path / f"bf16-{impl}", steps=1, impl=impl)
        losses[impl] = log[0]
    t, r = losses["triton"], losses["torch"]
    for key in ("ce", "align"):
        assert math.isclose(t[key], r[key], rel_tol=3e-2), (key, t[key], r[key], "bf16: fused vs reference")

    if not HAS_CUDA:
        return
    states, logs = {}, {}
    for impl in ("triton", "torch"):
        _, logs[impl], states[impl] = search(env, tmp_path / f"fp32-{impl}", steps=2, impl=impl, dtype="float32",
                                             autocast=False)
    for k in PARAMS:
        a, b = states["triton"]["space"][k], states["torch"]["space"][k]
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (k, (a - b).abs().max().item(), a.tolist(), b.tolist())
    for ra, rb in zip(logs["triton"], logs["torch"]):
        for key in ("ce", "align", "total"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-4), (key, ra[key], rb[key], "fp32")
