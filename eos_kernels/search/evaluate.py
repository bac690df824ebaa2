"""Evaluate Θ configurations on a held-out LLaVA-format split: answer accuracy and token accounting.

Any supported family (the adapter from the model's class, the data pipeline of
:mod:`eos_kernels.search.data`). Where images give different visual counts
(LLaVA-NeXT, Qwen2(.5)-VL) the token report is at the data's mean count,
``measured_final`` is the first sample's, and a Θ is validated against the
largest count (an integer keep above a smaller sample's count is clipped).

``eos-search --eval THETA [THETA ...] --model DIR --data HELDOUT.json`` (or
:func:`evaluate`) patches the model with each Θ in turn (``eos_kernels.patch``,
the deployment path) and reports, on the same examples:

- ``accuracy``: greedy ``generate`` answers (each gpt turn, given the gold
  conversation before it) that equal the gold answer after normalisation
  (lower case, whitespace collapsed, trailing ``.`` removed);
- ``answer_ce``: the teacher-forced cross-entropy per answer token (the
  search's CE; the prompt alone rates the visual tokens, as in ``generate``);
- ``tokens``: :meth:`Theta.token_report` at the model's visual tokens, depth
  and sizes (``text_tokens`` = the mean number of non-visual prompt tokens),
  and ``measured_final``, the visual tokens the patched model actually kept
  after its last reducer on the first batch.

A Θ is a JSON file, ``none`` (the unreduced model) or a preset name:
``sparsevlm-v1-<B>`` / ``sparsevlm-v2-<B>`` (B in 192, 128, 96, 64),
``paper-<B>``, ``tome-<B>``, ``pool-<B>`` (these four are defined for
LLaVA-1.5's 32 layers and 576 visual tokens; another model needs a Θ JSON), or
``fastv-<layer>-<keep>`` (keep an int count or a fraction).
Precision: the model's weights in float16 on CUDA (table 5's eval precision)
unless ``--dtype`` says otherwise, float32 on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import torch

from eos_kernels.search.config import SearchConfig
from eos_kernels.search.output import EVAL_FILE, refuse_to_replace
from eos_kernels.theta import Theta

__all__ = ["evaluate", "resolve_theta", "normalize_answer", "format_table"]


def normalize_answer(text: str) -> str:
    text = " ".join(text.strip().lower().split())
    while text.endswith("."):
        text = text[:-1].rstrip()
    return text


def resolve_theta(spec: str, num_layers: int, num_visual_tokens: int) -> Theta:
    """A Θ from a JSON path, ``none`` or a preset name (see the module docstring)."""
    if os.path.isfile(spec):
        return Theta.from_json(spec)
    if spec == "none":
        return Theta(name="none")
    paper_shape = (num_layers, num_visual_tokens) == (32, 576)
    m = re.fullmatch(r"sparsevlm-v([12])-(\d+)", spec)
    if m:
        return Theta.sparsevlm(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"(paper|tome|pool)-(\d+(?:\.\d+)?)", spec)
    if m:
        kind, budget = m.group(1), float(m.group(2))
        if paper_shape:
            return getattr(Theta, kind)(budget)
        raise ValueError(f"preset {spec!r} is defined for LLaVA-1.5 (32 layers, 576 visual tokens); this model "
                         f"has {num_layers} layers and {num_visual_tokens} visual tokens: write a Θ JSON instead")
    m = re.fullmatch(r"fastv-(\d+)-(\d+(?:\.\d+)?)", spec)
    if m:
        keep = float(m.group(2)) if "." in m.group(2) else int(m.group(2))
        return Theta.fastv(int(m.group(1)), keep)
    raise ValueError(f"eval: {spec!r} is neither a Θ JSON file nor a known preset (none, sparsevlm-v1-<B>, "
                     "sparsevlm-v2-<B>, paper-<B>, tome-<B>, pool-<B>, fastv-<layer>-<keep>)")


def _reference_count(data) -> int:
    """N_0 of the token report: the model's fixed count, else the data's mean count (rounded)."""
    if data.num_visual_tokens is not None:
        return data.num_visual_tokens
    return max(1, round(data.mean_visual_tokens))


def model_sizes(model, adapter) -> dict:
    """The decoder's sizes for the prefill-FLOPs estimate (``Theta.token_report``'s keywords): the adapter's
    (a mixture-of-experts decoder counts its active experts' width, as the search and the lmms-eval plugin
    do), else the text config's."""
    sizes = adapter.text_sizes(model)
    if sizes is not None:
        return {"hidden_size": sizes[0], "intermediate_size": sizes[1]}
    text = model.config.text_config
    return {"hidden_size": int(text.hidden_size), "intermediate_size": int(text.intermediate_size)}


@torch.no_grad()
def _evaluate_one(model, processor, data, theta: Theta, batch_size: int, max_new_tokens: int, device,
                  answer_ce: bool = True) -> dict:
    from eos_kernels.integrations.auto import adapter_for
    from eos_kernels.patching import get_report, patch_model, unpatch_model
    from eos_kernels.search.objective import data_terms, forward_inputs

    tok = getattr(processor, "tokenizer", processor)
    adapter = adapter_for(model)
    L = adapter.num_layers(model)
    n0 = _reference_count(data)
    theta.validate(L, data.num_visual_tokens or max(data.visual_counts))
    dtype = next(model.parameters()).dtype
    patch_model(model, theta, adapter)
    try:
        # teacher-forced answer CE
        ce_sum, n_tok = 0.0, 0
        for s in range(0, len(data), batch_size) if answer_ce else ():
            batch = data.collate(range(s, min(len(data), s + batch_size))).to(device, dtype)
            terms = data_terms(model, batch, None, align=False, adapter=adapter)
            ce_sum += float(terms["ce_sum"])
            n_tok += terms["answer_tokens"]
        # greedy answers
        items = [(i, t) for i, ex in enumerate(data.examples) for t in range(len(ex.turns))]
        correct, measured, samples = 0, None, []
        eos = tok.eos_token_id
        pad = data.pad_token_id
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            ids, mask, px, extra = data.prompt_batch(chunk, with_image_inputs=True)
            ids, mask, px = ids.to(device), mask.to(device), px.to(device, dtype)
            extra = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in extra.items()}
            inputs = forward_inputs(model, None, input_ids=ids, attention_mask=mask, pixel_values=px,
                                    image_inputs=extra)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
            if measured is None:
                report = get_report(model)
                measured = (report.stages[-1].visual_out[0] if report is not None and report.stages else n0)
            new = out[:, ids.shape[1]:].tolist()
            for (i, t), gen in zip(chunk, new):
                if eos is not None and eos in gen:
                    gen = gen[:gen.index(eos)]
                text = tok.decode(gen, skip_special_tokens=True)
                gold = data.examples[i].answers[t]
                ok = normalize_answer(text) == normalize_answer(gold)
                correct += ok
                if len(samples) < 5:
                    samples.append({"id": data.examples[i].id, "turn": t, "answer": gold, "generated": text,
                                    "correct": bool(ok)})
    finally:
        unpatch_model(model)
    prompt_text = [len(ex.input_ids[:ex.prompt_length]) - ex.num_visual_tokens for ex in data.examples]
    text_tokens = int(round(sum(prompt_text) / len(prompt_text)))
    tokens = theta.token_report(n0, L, text_tokens, **model_sizes(model, adapter))
    tokens["schedule"] = [list(s) for s in tokens["schedule"]]
    return {
        "theta": theta.name,
        "theta_config": theta.to_dict(),
        "examples": len(data),
        "answers": len(items),
        "accuracy": correct / len(items) if items else math.nan,
        "correct": correct,
        "answer_ce": ce_sum / max(n_tok, 1) if answer_ce else None,
        "answer_tokens": n_tok,
        "tokens": tokens,
        "measured_final": measured,
        "samples": samples,
    }


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    header = ("theta", "accuracy", "answer CE", "final", "mean leaving", "mean processed", "FLOPs ratio")
    rows = [header]
    for r in results:
        t = r["tokens"]
        rows.append((str(r["spec"]), f"{r['accuracy']:.4f} ({r['correct']}/{r['answers']})", f"{r['answer_ce']:.4f}",
                     str(t["final"]), f"{t['mean_leaving']:.2f}", f"{t['mean_processed']:.2f}",
                     f"{t['prefill_flops_ratio']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def evaluate(config: SearchConfig | Mapping[str, Any] | None = None, thetas: Sequence[str | Theta] | None = None,
             *, model=None, processor=None, dataset=None, write: bool = True, answer_ce: bool = True,
             **overrides) -> dict:
    """Accuracy and token report of each Θ on ``config.data`` (the held-out split).

    Args:
        config: :class:`SearchConfig` (uses model, data, image_folder,
            batch_size, eval_limit, max_new_tokens, device, dtype, output).
        thetas: Θ objects or specs (paths, ``none``, presets); default ``config.eval``.
        model, processor: an already loaded model/processor instead of ``config.model``.
        dataset: the held-out split already loaded with :func:`~eos_kernels.search.data.load_dataset`
            for this model and processor (``config.data`` is then only recorded; with
            ``eval_limit`` it is an error), to evaluate
            several calls on one load.
        write: write ``<output>/eval.json`` (an existing one is replaced only with
            ``config.overwrite``, checked before the model loads).

    Returns:
        ``{"results": [...], "path": eval.json or None}``; each result holds
        ``spec``, ``accuracy``, ``answer_ce``, ``tokens`` (token report),
        ``measured_final`` and a few sample generations.
    """
    from eos_kernels.integrations.auto import adapter_for
    from eos_kernels.search.data import load_dataset, load_processor
    from eos_kernels.search.model_loading import load_model, resolve_device, resolve_dtype

    config = SearchConfig.coerce(config, **overrides)
    config.require("data")
    thetas = list(thetas) if thetas is not None else list(config.eval or [])
    if not thetas:
        raise ValueError("eval: no Θ to evaluate (give --eval THETA.json [...] or a preset name)")
    for spec in thetas:  # a misspelt spec fails before anything loads; its fit to the model is checked below
        if isinstance(spec, str):
            resolve_theta(spec, 32, 576)  # LLaVA-1.5's shape, at which every preset is defined
    rank = int(os.environ.get("RANK", "0"))
    if write and rank == 0 and not config.overwrite:  # an earlier evaluation's results stay unless told
        refuse_to_replace(os.path.abspath(config.output), [EVAL_FILE], "this evaluation")
    if model is None:
        config.require("model")
        device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        model, loaded = load_model(config.model, device, resolve_dtype(config.dtype, device, torch.float16),
                                   config.attn_implementation)
        processor = processor or loaded
    else:
        device = next(model.parameters()).device
        if processor is None:
            config.require("model")
            processor = load_processor(config.model)
    adapter = adapter_for(model)
    adapter.check_model(model)
    L = adapter.num_layers(model)
    fixed = adapter.visual_tokens_per_image(model)  # None: each image its own count
    if dataset is None:
        data = load_dataset(config.data, processor, num_visual_tokens=fixed,
                            image_token_id=model.config.image_token_id, image_folder=config.image_folder,
                            limit=config.eval_limit)
    else:
        from eos_kernels.search.data import Dataset

        if not isinstance(dataset, Dataset):
            raise TypeError(f"eval: dataset= must be an eos_kernels.search.data.Dataset (load_dataset), "
                            f"got {type(dataset).__name__}")
        if config.eval_limit is not None:
            raise ValueError("eval: eval_limit applies when evaluate() loads the data; with dataset= load it "
                             "with load_dataset(..., limit=N)")
        if dataset.num_visual_tokens != fixed or dataset.image_token_id != model.config.image_token_id:
            raise ValueError(f"eval: dataset= was loaded for another model (num_visual_tokens "
                             f"{dataset.num_visual_tokens}, image_token_id {dataset.image_token_id}; this model: "
                             f"{fixed}, {model.config.image_token_id})")
        data = dataset
    n0 = _reference_count(data)
    resolved = [(spec if isinstance(spec, str) else (spec.name or "theta"),
                 spec if isinstance(spec, Theta) else resolve_theta(spec, L, n0)) for spec in thetas]
    for spec, theta in resolved:
        try:
            theta.validate(L, fixed if fixed is not None else max(data.visual_counts))
        except ValueError as exc:
            raise ValueError(f"eval: {spec}: {exc}") from None
    was_training = model.training
    model.eval()
    results = []
    try:
        for spec, theta in resolved:
            r = _evaluate_one(model, processor, data, theta, config.batch_size, config.max_new_tokens, device,
                              answer_ce)
            r["spec"] = spec
            results.append(r)
    finally:
        model.train(was_training)
    path = None
    if write and rank == 0:
        os.makedirs(config.output, exist_ok=True)
        path = os.path.join(os.path.abspath(config.output), EVAL_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"data": os.path.abspath(config.data), "results": results}, f, indent=1)
    return {"results": results, "path": path}
