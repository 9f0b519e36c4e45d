"""Pictures of a run: every trial by FLOPs and accuracy, coloured by pos_embed, the front as a step line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from kdsearch.atomic import atomic_path
from kdsearch.specs import POS_EMBEDS
from kdsearch.status import Objectives, accuracy_and_cost, front_rows

MARKERS = {"completed": "o", "stopped_early": "v"}  # failed and infeasible trials have no accuracy to plot


def cost_axis(cost: str) -> tuple[float, str]:
    """Divisor and axis label for a cost objective (the x-axis of every picture says its unit)."""
    return {
        "flops": (1e6, "MFLOPs per image (inference, 2 FLOPs per multiply-add, attention included)"),
        "macs": (1e6, "million MACs per image (inference, attention included)"),
        "params": (1e3, "thousand parameters"),
    }.get(cost, (1.0, cost))


PNG_SIZE = (800, 560)  # pixels of every picture: 8 x 5.6 inches at 100 dpi


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(PNG_SIZE[0] / 100, PNG_SIZE[1] / 100), dpi=100)
    return plt, fig, ax


def _save(plt, fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)


def plot_front(trials: Sequence[dict[str, Any]], objectives: Objectives, path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG (800x560 px) of the trials and the front; returns its path."""
    acc, cost = accuracy_and_cost(objectives)
    scale, label = cost_axis(cost)
    plt, fig, ax = _figure()
    colors = dict(zip(POS_EMBEDS, plt.get_cmap("tab10").colors))
    for status, marker in MARKERS.items():
        for pe in POS_EMBEDS:
            pts = [r for r in trials if r["status"] == status and r.get("student.pos_embed") == pe and r.get(acc) is not None]
            if pts:
                ax.scatter(
                    [r[cost] / scale for r in pts], [r[acc] * 100 for r in pts], marker=marker,
                    color=colors[pe], alpha=0.85 if status == "completed" else 0.45, s=36,
                    label=f"{pe}" if status == "completed" else None,
                )
    front = front_rows(trials, objectives)
    if front:
        xs = [r[cost] / scale for r in front]
        ys = [r[acc] * 100 for r in front]
        ax.step(xs, ys, where="post", color="black", lw=1.2, label="front")
    for status, marker in MARKERS.items():
        if status != "completed" and any(r["status"] == status for r in trials):
            ax.scatter([], [], marker=marker, color="grey", label=status.replace("_", " "))
    ax.set_xlabel(label)
    ax.set_ylabel(f"{acc} (%)")
    ax.set_title(title or f"{acc} against {cost}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(plt, fig, path)


def plot_pe_fronts(fronts: dict[str, list[dict[str, Any]]], objectives: Objectives, path: str | os.PathLike) -> Path:
    """The front of each positional encoding, drawn together: which encoding wins at which cost."""
    acc, cost = accuracy_and_cost(objectives)
    scale, label = cost_axis(cost)
    plt, fig, ax = _figure()
    colors = dict(zip(POS_EMBEDS, plt.get_cmap("tab10").colors))
    for pe, front in fronts.items():
        ax.step([r[cost] / scale for r in front], [r[acc] * 100 for r in front], where="post", marker="o", color=colors[pe], label=pe)
    ax.set_xlabel(label)
    ax.set_ylabel(f"{acc} (%)")
    ax.set_title("the front of each positional encoding")
    ax.grid(alpha=0.3)
    if fronts:
        ax.legend(fontsize=8, loc="best")
    return _save(plt, fig, path)


def plot_hypervolume(by_trial: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Normalized hypervolume after each completed trial, against minutes since the start."""
    plt, fig, ax = _figure()
    ax.step([h["seconds"] / 60 for h in by_trial], [h["hypervolume"] for h in by_trial], where="post", marker="o")
    ax.set_xlabel("minutes since the start of the run")
    ax.set_ylabel("normalized hypervolume (accuracy x FLOPs)")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)
