"""The lmms-eval plugin's throughput: samples/s of ``eos`` on the demo model at batch 1 and 4 (CPU), 1 and 8 (GPU).

The plugin (:class:`eos_kernels.integrations.lmms_eval.model.EOS`, built around the loaded demo model
with ``from_model``) answers the first :data:`N_DOCS` docs of the demo's held-out split as lmms-eval's
evaluator hands them over: ``generate_until`` on lmms-eval ``Instance`` requests, the eos_demo task's
generation settings (3 new tokens, greedy), Θ = ``fastv-1-8`` (8 of 64 visual tokens after layer 1). One
timed round is all :data:`N_DOCS` requests; samples/s = N_DOCS / median.

``extra_info`` carries the plugin's own split of the rounds' time (``EOS.timing``): ``generate_s`` (inside
``model.generate``), ``visuals_s`` (the task's ``doc_to_visual`` on the request loop's thread: lmms-eval's side)
and the rest of the loop's time, the plugin's overhead (prompt building, padding, budget accounting, decoding,
and the wait for the next batch's conversations and image inputs, which the plugin prepares on a background
thread while a batch generates: ``prefetch_wait_s``; the first batch's are all wait): ``overhead_fraction`` =
overhead / generate time, the issue's target being < 5 % (``overhead_fraction_without_image_processor``: the
same without the image processor's inline time and the prefetch wait). ``prefetch_s`` is the background
thread's whole time, overlapped with generate (the generate time measured includes whatever it costs the model
to share the CPU with it: on this 2-core CPU torch runs one thread). bench.report prints them and the batching
speed-up (per-sample time at batch 1 over the largest batch).

Runs where lmms-eval is importable (the plugin subclasses its model class); the CPU cases on machines
without CUDA (or with ``EOS_BENCH_CPU=1``), the CUDA cases (fp32, the demo model) with CUDA.
"""
from __future__ import annotations

import pytest
import torch

from bench.common import cpu_param, device_label, gpu_param, pedantic_rounds, sync

pytest.importorskip("transformers", reason="the plugin benchmark needs transformers")
pytest.importorskip("lmms_eval", reason="the plugin benchmark needs lmms-eval (README: Benchmarks with lmms-eval)")
from lmms_eval.api.instance import Instance  # noqa: E402

from eos_kernels.integrations.lmms_eval.model import EOS  # noqa: E402

N_DOCS = 32
THETA = "fastv-1-8"
GEN = {"max_new_tokens": 3, "temperature": 0, "do_sample": False}
CASES = [cpu_param("cpu", 1, id="cpu-B1"), cpu_param("cpu", 4, id="cpu-B4"),
         gpu_param("cuda", 1, id="cuda-B1"), gpu_param("cuda", 8, id="cuda-B8")]


@pytest.fixture(scope="module")
def docs():
    from eos_kernels.demo import task

    stream = task.iter_examples("eval", 0, 1)
    out = []
    for _ in range(N_DOCS):
        ex = next(stream)
        out.append({"image": ex["image"], "question": ex["qa"][0][0]})
    return out


def _requests(docs):
    visual = lambda doc: [doc["image"]]  # noqa: E731
    return [Instance("generate_until", (d["question"], dict(GEN), visual, i, "eos_demo", "test"), 0,
                     {"task": "eos_demo", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


@pytest.mark.parametrize("device, B", CASES)
def test_plugin_throughput(benchmark, docs, device, B):
    from eos_kernels.demo.build import load_demo_model

    model, processor = load_demo_model()
    model = model.to(device)
    lm = EOS.from_model(model, processor, THETA, batch_size=B, name="eos-demo")
    lm.task_dict = {"eos_demo": {"test": docs}}

    def run():
        out = lm.generate_until(_requests(docs))
        sync(device)
        return out

    first = [r.text for r in run()]  # warm-up (allocator, kernels), then the timing split from zero
    for k in lm.timing:
        lm.timing[k] = 0 if isinstance(lm.timing[k], int) else 0.0
    rounds, _ = pedantic_rounds(*((10, 0) if device == "cuda" else (5, 0)))
    benchmark.group = f"lmms-eval plugin {device}"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)
    t = dict(lm.timing)
    overhead = t["total_s"] - t["generate_s"] - t["visuals_s"]
    benchmark.extra_info.update(
        subject="lmms_eval", device=device_label(device), B=B, docs=N_DOCS, theta=THETA,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), timed_samples=t["samples"],
        generate_s=t["generate_s"], visuals_s=t["visuals_s"], preprocess_s=t["preprocess_s"], overhead_s=overhead,
        prefetch_s=t["prefetch_s"], prefetch_wait_s=t["prefetch_wait_s"],
        prefetch_preprocess_s=t["prefetch_preprocess_s"], prefetch_visuals_s=t["prefetch_visuals_s"],
        overhead_fraction=overhead / t["generate_s"] if t["generate_s"] > 0 else None,
        overhead_fraction_without_image_processor=(overhead - t["preprocess_s"] - t["prefetch_wait_s"])
        / t["generate_s"] if t["generate_s"] > 0 else None,
        final_visual_tokens=lm.budget_summary()["eos_demo"]["final_visual_tokens"],
        threads=torch.get_num_threads())
    assert [r.text for r in run()] == first  # same greedy answers every round
