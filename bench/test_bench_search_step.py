"""One search step (reference forward, reduced forward, backward): the paper's hard forward (``impl="triton"``
vs ``impl="torch"``), the relaxed forward (decision 7 of :mod:`eos_kernels.search`) and its sampled structures
(decision 8, the default: one structure drawn from the warm start's gates, hard top-K at its layers).

The model is the end-to-end benchmark's LLaVA (``test_bench_e2e.build_llava``:
LLaVA-1.5-7B-shaped in bf16 on CUDA, a small 32-layer model in fp32 on the
CPU), frozen, patched with the search's :class:`~eos_kernels.search.objective.SearchPlan`
over a :class:`~eos_kernels.SearchSpace` with the paper's warm start (slots at
layers 2, 6, 15, γ₀ = τ₀ = 0.5). One timed step is what ``eos-search`` does per
micro-batch: the no-grad unreduced reference forward, the reduced forward with
the answer-token cross-entropy and the hidden-state alignment at layers
4, 8, …, 28, and the backward into the search parameters (bf16 autocast on
CUDA, as the driver). The operator runs through the fused kernels
(``impl="triton"``, CUDA only) or the PyTorch reference (``impl="torch"``).

The relaxed step (``forward="relaxed"``) runs the same reference forward, the
relaxed forward at full length (every layer's soft keep decision, the soft
operator, the presence bias in every later layer's attention; no fused kernel)
and the backward, at the start of its annealing (T = 0.5, deterministic gates):
its cost per step against the hard one's is the price of a gradient that
reaches every layer.

Batch: 4 samples (table 5) of the e2e prompt (64 text + 576 visual tokens) on
CUDA, 1 on the CPU; the last 16 text tokens are the "answer" (labels).
"""
from __future__ import annotations

import pytest
import torch

from bench.common import cpu_param, device_label, gpu_param, peak_extra_memory, pedantic_rounds, sync

pytest.importorskip("transformers", reason="the search benchmark needs transformers")
from eos_kernels.integrations.llava import LlavaAdapter  # noqa: E402
from eos_kernels.patching import patch_model, unpatch_model  # noqa: E402
from eos_kernels.search.data import Batch  # noqa: E402
from eos_kernels.search.objective import LayerCapture, SearchPlan, data_terms, relaxed_data_terms  # noqa: E402
from eos_kernels.search.relaxed import RelaxedForward  # noqa: E402
from eos_kernels.search.sampled import log_budget_ratio, sample_structure  # noqa: E402
from eos_kernels.search_space import SearchSpace  # noqa: E402

from bench.test_bench_e2e import N_VISUAL, SHAPES, make_inputs, models  # noqa: E402,F401  (fixture)

ANSWER_TOKENS = 16
BUDGET = 64
CASES = [
    gpu_param("cuda", 4, "triton", "hard", id="cuda-triton-B4"),
    gpu_param("cuda", 4, "torch", "hard", id="cuda-torch-B4"),
    gpu_param("cuda", 4, "torch", "relaxed", id="cuda-relaxed-B4"),
    cpu_param("cpu", 1, "torch", "hard", id="cpu-torch-B1"),
    cpu_param("cpu", 1, "torch", "relaxed", id="cpu-relaxed-B1"),
    cpu_param("cpu", 1, "torch", "sampled", id="cpu-sampled-B1"),
]


def _batch(device: str, B: int) -> Batch:
    ids, pixels = make_inputs(device, B)
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    prompt = torch.full((B,), ids.shape[1] - ANSWER_TOKENS, device=ids.device)
    return Batch(ids, torch.ones_like(ids), labels, pixels, prompt, list(range(B)))


@pytest.mark.parametrize("device, B, impl, forward", CASES)
def test_search_step(benchmark, models, device, B, impl, forward):
    model = models(device)
    for p in model.parameters():  # frozen backbone: only Θ trains
        p.requires_grad_(False)
    layers = SHAPES[device]["layers"]
    # sampled structures (decision 8, the default): the warm start's gates and the default off_gate 3 / (L - 1)
    space = SearchSpace(layers, N_VISUAL, off_gate=3 / (layers - 1) if forward == "sampled" else 0.01).to(device)
    plan = SearchPlan(space, max_reducers=3, impl=impl)
    adapter = LlavaAdapter()
    relaxed = None
    structure = log_ratio = None
    if forward in ("relaxed", "sampled"):
        relaxed = RelaxedForward(space, adapter, temperature=0.5, sharpness=1.0).install(model)
    else:
        patch_model(model, None, adapter, plan=plan)
    if forward == "sampled":
        noise = torch.rand(layers, B, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        structure = sample_structure(space.gates(), (torch.log(noise) - torch.log1p(-noise)).to(device))
        log_ratio = log_budget_ratio(BUDGET, N_VISUAL)
    capture = LayerCapture(adapter.decoder_layers(model), list(range(4, layers, 4)))
    batch = _batch(device, B)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else None
    hidden = SHAPES[device]["hidden"]

    def step():
        space.zero_grad(set_to_none=True)
        if relaxed is not None:
            terms = relaxed_data_terms(model, batch, capture, relaxed, autocast=autocast, adapter=adapter,
                                       structure=structure, log_ratio=log_ratio)
        else:
            terms = data_terms(model, batch, capture, autocast=autocast)
        align = torch.stack(list(terms["align_sse"].values())).sum() / (
            len(capture.indices) * terms["text_tokens"] * hidden)
        loss = terms["ce_sum"] / terms["answer_tokens"] + 0.1 * align
        loss.backward()
        sync(device)
        return loss

    try:
        step()  # warm-up: kernel compilation, allocator
        peak, _ = peak_extra_memory(step, device)
        benchmark.group = f"search step {device} B{B}"
        benchmark.extra_info.update(
            subject="search", impl=impl, forward=forward, B=B, device=device_label(device), budget=BUDGET,
            align_layers=capture.indices,
            reducers=[list(s) for s in plan.last_schedule] if relaxed is None else (
                "every layer (relaxed)" if structure is None else [int(i) for i in torch.nonzero(structure[:, 0])]),
            peak_extra_memory_bytes=peak,
        )
        rounds = pedantic_rounds(*((5, 2) if device == "cuda" else (3, 1)))
        benchmark.pedantic(step, rounds=rounds[0], warmup_rounds=rounds[1], iterations=1)
        # sampled structures: the gates learn by the score function, outside the step's backward
        trained = [p for name, p in space.named_parameters() if not (forward == "sampled" and name == "w_g")]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    finally:
        capture.remove()
        if relaxed is not None:
            relaxed.remove()
        else:
            unpatch_model(model)
