"""The demo's tables, plot and files: every reported Θ in its own JSON, named as in the tables."""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from eos_kernels.demo.baselines import FAMILIES, Candidate
from eos_kernels.demo.frontier import pareto_front

__all__ = ["verdict", "markdown", "parameter_table", "format_parameters", "row", "format_table", "markdown_table", "dominance_markdown", "plot_frontiers", "write_thetas",
           "theta_file"]

_OPS = ("gamma", "tau", "theta", "rho", "nu")


def parameter_table(log_path: str, space, theta: Theta) -> list[dict]:
    """Per layer: every searched value at the first step's forward (the init) and at the end."""
    with open(log_path, encoding="utf-8") as f:
        first = json.loads(f.readline())
    with torch.no_grad():
        end = {k: v.double().tolist() for k, v in space.constrained_values().items()}
    keep = {r.layer: r.keep for r in theta.reducers}
    rows = []
    for layer in range(len(end["g"])):
        row = {"layer": layer, "reducer": layer in keep, "keep": keep.get(layer)}
        moved = False
        for k in ("g", "c") + _OPS:
            row[k] = [first[k][layer], end[k][layer]]
            moved |= abs(end[k][layer] - first[k][layer]) > 1e-3
        row["moved"] = moved
        rows.append(row)
    return rows


def format_parameters(rows, markdown: bool = False) -> str:
    def pair(v, digits=3):
        return f"{v[0]:.{digits}f} -> {v[1]:.{digits}f}"

    header = ("layer", "reducer (keep)", "g", "c", "gamma", "tau", "theta", "rho", "nu", "moved")
    body = [header]
    for r in rows:
        keep = r["keep"]
        keep = f"{keep:.3g}" if isinstance(keep, float) else str(keep)
        body.append((str(r["layer"]), f"yes ({keep})" if r["reducer"] else "no", pair(r["g"]), pair(r["c"]),
                     pair(r["gamma"]), pair(r["tau"]), pair(r["theta"]), pair(r["rho"]), pair(r["nu"]),
                     "yes" if r["moved"] else "no"))
    if markdown:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(b) + " |" for b in body[1:]])
    widths = [max(len(b[i]) for b in body) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body)


_HEADER = ("configuration", "family", "held-out acc", "tuning acc", "final", "mean leaving", "mean processed",
           "FLOPs ratio", "prefill ms/prompt", "schedule (layer:in->kept)")


def row(c: Candidate, prefill_ms: float | None = None) -> dict:
    """A table row of a configuration with its held-out result."""
    t = c.heldout["tokens"]
    return {"config": c.name, "family": c.family, "budget": c.budget, "accuracy": c.heldout["accuracy"],
            "tuning_accuracy": c.tuning, "correct": c.heldout["correct"], "answers": c.heldout["answers"],
            "answer_ce": c.heldout["answer_ce"], "tokens": t, "flops": c.flops,
            "measured_final": c.heldout["measured_final"], "prefill_ms": prefill_ms,
            "theta_file": theta_file(c.name), "theta_config": c.theta.to_dict()}


def _cells(r: dict) -> tuple:
    t = r["tokens"]
    tune = r["tuning_accuracy"]
    ms = r["prefill_ms"]
    return (r["config"], r["family"], f"{r['accuracy']:.3f}", "-" if tune is None else f"{tune:.3f}",
            str(t["final"]), f"{t['mean_leaving']:.2f}", f"{t['mean_processed']:.2f}",
            f"{t['prefill_flops_ratio']:.3f}", "-" if ms is None else f"{ms:.2f}",
            " ".join(f"L{s[0]}:{s[1]}->{s[2]}" for s in t["schedule"]) or "-")


def format_table(rows: Sequence[dict]) -> str:
    body = [_HEADER] + [_cells(r) for r in rows]
    widths = [max(len(b[i]) for b in body) for i in range(len(_HEADER))]
    return "\n".join("  ".join(c.ljust(w) if j in (0, 1, 9) else c.rjust(w) for j, (c, w) in enumerate(zip(b, widths)))
                     for b in body)


def markdown_table(rows: Sequence[dict]) -> str:
    out = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    return "\n".join(out + ["| " + " | ".join(_cells(r)) + " |" for r in rows])


def dominance_markdown(summaries: Sequence[dict], accuracy: dict[str, float]) -> str:
    """One line per budget: the searched Θ against its matched baselines, and who dominates whom."""
    head = ("| budget | searched Θ (acc) | best matched baseline (acc) | lead | prune at the searched schedule | "
            "the searched Θ dominates | dominate the searched Θ |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for s in summaries:
        best = s["best_matched"]
        lead = s["lead_over_best_matched"]
        prune = s["prune_at_searched"]
        lines.append(
            f"| {s['budget']} | {s['searched']} ({accuracy[s['searched']]:.3f}) | "
            + (f"{best} ({accuracy[best]:.3f})" if best else "none at no more FLOPs") + " | "
            + ("-" if lead is None else f"{lead:+.3f}") + " | "
            + (f"{prune} ({accuracy[prune]:.3f})" if prune else "-") + " | "
            + (", ".join(s["dominates"]) or "none") + " | " + (", ".join(s["dominated_by"]) or "none") + " |")
    return "\n".join(lines)


def plot_frontiers(baselines: Sequence[Candidate], searched: Sequence[Candidate], full_accuracy: float,
                   path: str, extra: Sequence[Candidate] = ()) -> str:
    """Held-out accuracy against estimated prefill FLOPs: each family's held-out frontier and its points, the
    searched Θ of each budget (labelled), the unreduced model at 1.0."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    for fam in FAMILIES:
        pts = [c for c in baselines if c.family == fam and c.heldout is not None]
        if not pts:
            continue
        front = pareto_front(pts, accuracy=lambda c: c.heldout["accuracy"], flops=lambda c: c.flops)
        line, = ax.plot([c.flops for c in front], [c.heldout["accuracy"] for c in front], "-", lw=1.5,
                        label=f"{fam} frontier")
        ax.scatter([c.flops for c in pts], [c.heldout["accuracy"] for c in pts], s=14, color=line.get_color(),
                   alpha=0.6)
    for group, style in ((searched, dict(marker="*", s=220, color="black", zorder=5, label="searched Θ")),
                         (extra, dict(marker="P", s=90, color="grey", zorder=4, label="other searches"))):
        if not group:
            continue
        ax.scatter([c.flops for c in group], [c.heldout["accuracy"] for c in group], **style)
        for c in group:
            ax.annotate(c.name, (c.flops, c.heldout["accuracy"]), textcoords="offset points", xytext=(6, -10),
                        fontsize=7)
    ax.scatter([1.0], [full_accuracy], marker="D", color="black", label="full model", zorder=5)
    ax.set(title="held-out accuracy vs estimated prefill FLOPs (matched-cost comparison)",
           xlabel="prefill FLOPs / full model (Theta.token_report)", ylabel="held-out accuracy (greedy, exact match)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def theta_file(name: str) -> str:
    """The file of a reported Θ, relative to the output folder."""
    return os.path.join("thetas", f"{name}.json")


def write_thetas(out: str, candidates: Sequence[Candidate]) -> list[str]:
    """Write every reported Θ to ``out/thetas/<name>.json`` (the name the tables show)."""
    os.makedirs(os.path.join(out, "thetas"), exist_ok=True)
    paths = []
    for c in candidates:
        path = os.path.join(out, theta_file(c.name))
        c.theta.to_json(path)
        paths.append(path)
    return paths


def verdict(s: dict, accuracy: dict) -> str:
    """One line per budget: the searched Θ against its best matched baseline and its prune twin."""
    best, lead = s["best_matched"], s["lead_over_best_matched"]
    line = f"budget {s['budget']}: {s['searched']} {accuracy[s['searched']]:.3f}"
    if best is None:
        line += "; no tuned baseline is as cheap"
    else:
        line += f" vs the best matched baseline {best} {accuracy[best]:.3f} ({lead:+.3f})"
    if s["prune_at_searched"]:
        line += f"; prune at its schedule {accuracy[s['prune_at_searched']]:.3f} ({s['lead_over_prune']:+.3f})"
    return line + f"; dominated by {len(s['dominated_by'])}, dominates {len(s['dominates'])} evaluated baselines"


def markdown(summary, rows, summaries, accuracy, varying, synthetic, eval_json) -> str:
    """``demo_results.md``: the run, how tokens and FLOPs are counted, the per-budget tables, every configuration."""
    n, L = summary["num_visual_tokens"], summary["num_layers"]
    counts = (f"{n} visual tokens per image (the held-out images' mean; Θ deployed as fractions of the schedule "
              f"at {n})" if varying else f"{n} visual tokens")
    split = "the synthetic eval split" if synthetic else os.path.basename(eval_json)
    out = [f"# `{summary['command']}`", "",
           f"{summary['model_class']} ({summary['model']}); {summary['eval_questions']} held-out questions ({split}); "
           f"{counts}, {L} decoder layers; {summary['baselines_tuned']} baseline placements tuned on the search "
           f"split by successive halving (all on its first {summary['tuning_first_round']} questions, the "
           f"{summary['baselines_second_round']} promising ones on all {summary['tuning_questions']}); searches: "
           f"{summary['search']['steps']} steps each "
           f"({summary['search']['forward']} forward); {summary['seconds']} s in all "
           f"({summary['stage_seconds']}) with {summary['workers']} worker process(es).", "",
           "How tokens and FLOPs are counted: *final* visual tokens leave the last layer, *mean leaving* / *mean "
           "processed* average the visual tokens leaving / entering each layer, *FLOPs ratio* is "
           "`Theta.token_report`'s estimated decoder prefill FLOPs against the unreduced model (at the held-out "
           f"prompts' mean {summary['text_tokens']} text tokens). A baseline is *matched* when it keeps at most the "
           "budget and costs at most the searched Θ's FLOPs; *dominates* means more accurate at no more FLOPs, on "
           "the held-out split.", "",
           "## Per budget", "", dominance_markdown(summaries, accuracy), ""]
    for s in summaries:
        names = [s["searched"]] + s["extra"] + ([s["prune_at_searched"]] if s["prune_at_searched"] else [])
        names += [m for m in s["matched"].values() if m is not None]
        names = list(dict.fromkeys(names))
        out += [f"### budget {s['budget']}", "", markdown_table([r for r in rows if r["config"] in names]), ""]
    out += ["## Every configuration scored on the held-out split", "",
            markdown_table(sorted(rows, key=lambda r: (r["tokens"]["prefill_flops_ratio"], r["config"]))), ""]
    for name, info in summary["searches"].items():
        out += [f"## Where the search for {name} ended (value at the first step -> at the end; median step "
                f"{info['median_step_s']:.2f} s)", "", format_parameters(info["parameters"], markdown=True), ""]
    return "\n".join(out)
