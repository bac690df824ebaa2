"""The token budget behind every score of the ``eos`` plugin: per sample, per task, and where lmms-eval writes it.

How it is counted (each number comes from the patched model's own report of
the prefill that produced the answer, :meth:`EOSReport.token_report`, i.e.
:meth:`Theta.token_report`'s accounting for that sample as it ran; nothing is
recomputed a second way):

- ``visual_tokens``: the visual tokens of the sample's prompt (N0: every
  image's placeholder tokens; 0 for a text-only prompt);
- ``final_visual_tokens``: visual tokens leaving the last decoder layer;
- ``mean_leaving_visual_tokens``: the mean over the decoder layers of the
  visual tokens leaving each layer (SparseVLM's "retain" count);
- ``mean_processed_visual_tokens``: the mean over the layers of the visual
  tokens each layer processes (what enters it);
- ``prefill_flops_ratio``: estimated prefill FLOPs of the decoder layers against
  the unreduced model on the same prompt (formula in
  :meth:`eos_kernels.theta.Theta.token_report`: projections, MLP and the
  attention square of every layer at its token count, with the sample's real
  text tokens and the model's layer sizes); per task the ratio of the sums
  over the task's samples;
- ``prefill_ms``: measured wall time of the prefill forward (the first forward
  of ``generate``, CUDA synchronised before and after; for ``loglikelihood``
  requests the teacher-forced forward), of the batch the sample ran in, divided
  by that batch's size;
- ``text_tokens``: the sample's real non-visual prompt tokens.

Per task the plugin reports the mean over the task's samples of each count,
the FLOPs ratio of the sums, and ``samples``. Where they go:

- lmms-eval's results file (``results_*.json``), section ``"throughput"``
  (lmms-eval's ``log_metrics``, the channel its own models use): one key per
  task and field, ``"avg_eos/<task>/<field>"`` (one record per task, so the
  value is the task's own; all processes' samples are gathered first);
- with ``--log_samples``, each sample's ``"token_counts"`` in the samples file
  (the fields above, and ``input_tokens`` / ``output_tokens``);
- the run's log: a table of every task's budget (INFO);
- the built-in ``eos_demo`` task reads them as metrics, so its row of
  lmms-eval's own results table carries the budget next to the accuracy.

``python -m eos_kernels.integrations.lmms_eval --table results.json`` prints
each task's scores with its budget (:func:`format_results`).
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

__all__ = ["FIELDS", "KEY_PREFIX", "sample_record", "summarize", "throughput_metrics", "budget_from_results",
           "format_budget_table", "format_results", "record_sample", "sample_budget"]

#: per-sample and per-task fields (per task: means, except the FLOPs ratio: ratio of sums)
FIELDS = ("visual_tokens", "final_visual_tokens", "mean_leaving_visual_tokens", "mean_processed_visual_tokens",
          "prefill_flops_ratio", "prefill_ms", "text_tokens")
#: the plugin's keys in lmms-eval's "throughput" section are "avg_" + KEY_PREFIX + "<task>/<field>"
KEY_PREFIX = "eos/"

_MEANS = ("visual_tokens", "final_visual_tokens", "mean_leaving_visual_tokens", "mean_processed_visual_tokens",
          "prefill_ms", "text_tokens")
#: (task, doc_id) -> the last record of that sample in this process (read by the eos_demo task's metrics)
_SAMPLES: dict = {}


def sample_record(report: Mapping[str, Any], prefill_seconds: float, *, task: str, doc_id: Any,
                  input_tokens: int, output_tokens: int | None = None) -> dict:
    """One sample's budget from its ``EOSReport.token_report(b)`` and its share of the measured prefill."""
    full = report.get("prefill_flops_full")
    reduced = report.get("prefill_flops")
    return {
        "task": task,
        "doc_id": doc_id,
        "visual_tokens": int(report["num_visual_tokens"]),
        "final_visual_tokens": int(report["final"]),
        "mean_leaving_visual_tokens": float(report["mean_leaving"]),
        "mean_processed_visual_tokens": float(report["mean_processed"]),
        "prefill_flops": None if reduced is None else int(reduced),
        "prefill_flops_full": None if full is None else int(full),
        "prefill_flops_ratio": None if reduced is None or not full else reduced / full,
        "prefill_ms": 1000.0 * float(prefill_seconds),
        "text_tokens": int(report["text_tokens"]),
        "input_tokens": int(input_tokens),
        "output_tokens": None if output_tokens is None else int(output_tokens),
    }


def record_sample(record: Mapping[str, Any]) -> None:
    """Remember ``record`` as the budget of its (task, doc_id) in this process."""
    _SAMPLES[(record["task"], record["doc_id"])] = dict(record)


def sample_budget(task: str, doc_id: Any) -> dict | None:
    """The budget the plugin recorded for ``doc_id`` of ``task`` in this process (None: not run by it)."""
    return _SAMPLES.get((task, doc_id))


def summarize(records: Iterable[Mapping[str, Any]]) -> dict:
    """``{task: {"samples": n, field: value, ...}}`` over ``records`` (means; FLOPs ratio of the sums)."""
    by_task: dict[str, list] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out = {}
    for task, rs in by_task.items():
        s = {"samples": len(rs)}
        for f in _MEANS:
            s[f] = sum(r[f] for r in rs) / len(rs)
        if all(r.get("prefill_flops") is not None and r.get("prefill_flops_full") for r in rs):
            s["prefill_flops_ratio"] = sum(r["prefill_flops"] for r in rs) / sum(r["prefill_flops_full"] for r in rs)
        else:
            s["prefill_flops_ratio"] = math.nan
        out[task] = s
    return out


def throughput_metrics(summary: Mapping[str, Mapping[str, Any]]) -> dict:
    """Flat numeric keys ``eos/<task>/<field>`` of :func:`summarize`'s result, for lmms-eval's ``log_metrics``."""
    return {f"{KEY_PREFIX}{task}/{field}": float(value)
            for task, fields in summary.items() for field, value in fields.items()}


def budget_from_results(results: Mapping[str, Any] | str) -> dict:
    """``{task: {field: value}}`` read back from an lmms-eval results dict or results JSON file."""
    if isinstance(results, str):
        with open(results, encoding="utf-8") as f:
            results = json.load(f)
    out: dict[str, dict] = {}
    head = "avg_" + KEY_PREFIX
    for key, value in (results.get("throughput") or {}).items():
        if key.startswith(head):
            task, _, field = key[len(head):].rpartition("/")
            if task:
                out.setdefault(task, {})[field] = int(value) if field == "samples" else value
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


_SHORT = {"final_visual_tokens": "final", "mean_leaving_visual_tokens": "mean leaving",
          "mean_processed_visual_tokens": "mean processed", "prefill_flops_ratio": "FLOPs ratio",
          "prefill_ms": "prefill ms", "visual_tokens": "visual in", "text_tokens": "text", "samples": "samples"}
_ORDER = ("samples", "visual_tokens", "final_visual_tokens", "mean_leaving_visual_tokens",
          "mean_processed_visual_tokens", "prefill_flops_ratio", "prefill_ms")


def format_budget_table(summary: Mapping[str, Mapping[str, Any]], theta: str | None = None) -> str:
    """A markdown table of :func:`summarize`'s result (one row per task)."""
    header = ["task"] + (["theta"] if theta is not None else []) + [_SHORT[f] for f in _ORDER]
    rows = [[task] + ([theta] if theta is not None else []) + [_fmt(s.get(f, "")) for f in _ORDER]
            for task, s in summary.items()]
    return _table(header, rows)


def format_results(results: Mapping[str, Any] | str) -> str:
    """Each task's scores from an lmms-eval results dict / file, with the budget that produced them.

    A task without a budget (not run by the ``eos`` plugin) is marked ``no budget recorded``."""
    if isinstance(results, str):
        with open(results, encoding="utf-8") as f:
            results = json.load(f)
    budget = budget_from_results(results)
    model_args = (results.get("config") or {}).get("model_args", "")
    header = ["task", "metric", "value"] + [_SHORT[f] for f in _ORDER]
    rows = []
    for task, metrics in (results.get("results") or {}).items():
        b = budget.get(task)
        cells = [_fmt(b.get(f, "")) for f in _ORDER] if b else ["no budget recorded"] + [""] * (len(_ORDER) - 1)
        for name, value in metrics.items():
            if name == "alias" or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            if name.split(",")[0] in FIELDS:  # the eos_demo task's own budget metrics: already in the columns
                continue
            rows.append([task, name.split(",")[0], _fmt(float(value))] + cells)
    return (f"model_args: {model_args}\n" if model_args else "") + _table(header, rows)
