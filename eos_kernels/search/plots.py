"""PNG plots of a search log (matplotlib's Agg renderer through a bare ``Figure``: no display, no pyplot).

:func:`plot_log` reads ``log.jsonl`` and writes:

- ``trajectories.png``: γ and τ of every layer that was an active reducer at
  some step, against the step, and the same run as a path in the (γ, τ) plane
  (the paper's appendix A.4 view); below, the gate g and the discard c of
  every layer and θ of the active layers against the step (accepted local
  moves marked with vertical lines);
- ``profile.png``: the final per-layer g, c, γ and τ (the last logged step's
  values), active layers marked;
- ``loss.png``: the loss terms (ce, align, budget, layers, total) and the
  expected final token count N̄_L against the step.
"""
from __future__ import annotations

import json
import os

__all__ = ["plot_log", "read_log"]


def read_log(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_log(log_path: str, out_dir: str | None = None) -> list[str]:
    """Write the three PNGs next to ``log_path`` (or into ``out_dir``); returns their paths."""
    # a bare Figure renders through Agg without pyplot: no global backend switch, no display
    from matplotlib.figure import Figure

    records = read_log(log_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(log_path))
    os.makedirs(out_dir, exist_ok=True)
    if not records:
        return []
    steps = [r["step"] for r in records]
    paths = []

    # ---- gamma / tau trajectories of the active layers; g, c, theta below
    layers = sorted({l for r in records for l in r.get("active_layers", [])})
    fig = Figure(figsize=(15, 8.4))
    axes = fig.subplots(2, 3)
    top, bottom = axes[0], axes[1]
    for l in layers:
        top[0].plot(steps, [r["gamma"][l] for r in records], label=f"layer {l}")
        top[1].plot(steps, [r["tau"][l] for r in records], label=f"layer {l}")
        top[2].plot([r["gamma"][l] for r in records], [r["tau"][l] for r in records], marker=".",
                    markersize=2, label=f"layer {l}")
        top[2].scatter([records[-1]["gamma"][l]], [records[-1]["tau"][l]], marker="*", s=80)
        bottom[2].plot(steps, [r["theta"][l] for r in records], label=f"layer {l}")
    for l in range(len(records[-1]["g"])):
        style = {} if l in layers else {"ls": ":", "alpha": 0.6}
        bottom[0].plot(steps, [r["g"][l] for r in records], label=f"layer {l}", **style)
        bottom[1].plot(steps, [r["c"][l] for r in records], label=f"layer {l}", **style)
    bottom[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    moves = [r["step"] for r in records if (r.get("local_moves") or {}).get("accepted")]
    for ax in bottom:
        for x in moves:
            ax.axvline(x, color="tab:red", lw=0.6, alpha=0.5)
    top[0].set(title="γ of the active layers", xlabel="step", ylabel="γ")
    top[1].set(title="τ of the active layers", xlabel="step", ylabel="τ")
    top[2].set(title="(γ, τ) path (★ = last step)", xlabel="γ", ylabel="τ")
    bottom[0].set(title="gate g of every layer (dotted: never active)" + (" | red: local moves" if moves else ""),
                  xlabel="step", ylabel="g")
    bottom[1].set(title="discard c of every layer", xlabel="step", ylabel="c")
    bottom[2].set(title="θ of the active layers", xlabel="step", ylabel="θ")
    for ax in list(top) + list(bottom):
        if layers or ax in (bottom[0], bottom[1]):
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if not layers:
        top[0].text(0.5, 0.5, "no layer was active", ha="center", transform=top[0].transAxes)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "trajectories.png"))
    fig.savefig(paths[-1], dpi=100)

    # ---- final per-layer profile
    last = records[-1]
    L = len(last["g"])
    xs = list(range(L))
    fig = Figure(figsize=(max(6, 0.35 * L + 2), 9))
    axes = fig.subplots(4, 1, sharex=True)
    for ax, key, label in zip(axes, ("g", "c", "gamma", "tau"), ("g (gate)", "c (discard)", "γ", "τ")):
        colours = ["tab:red" if l in last.get("active_layers", []) else "tab:blue" for l in xs]
        ax.bar(xs, last[key], color=colours)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_title(f"per-layer profile at step {last['step']} (red: active reducers)")
    axes[-1].set_xlabel("decoder layer")
    axes[-1].set_xticks(xs)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "profile.png"))
    fig.savefig(paths[-1], dpi=100)

    # ---- losses
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    for key in ("total", "ce", "align", "budget", "layers"):
        axes[0].plot(steps, [r[key] for r in records], label=key)
    axes[0].set(title="loss terms (unweighted; total is weighted)", xlabel="step")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].plot(steps, [r["expected_tokens"] for r in records], label="expected N̄_L")
    axes[1].plot(steps, [r["deployed_tokens"] for r in records], label="deployed final count")
    axes[1].set(title="visual tokens leaving the last layer", xlabel="step")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=100)
    return paths
