"""report.json and the held-out loss plot of a run."""

from __future__ import annotations

import json
from pathlib import Path

from shared.files import atomic_write_text


def write_report(path: Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=2))


def plot_losses(rounds: list[dict], base_eval_loss: float | None, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = [0] + [r["round"] for r in rounds]
    evals = [base_eval_loss] + [r.get("eval_loss") for r in rounds]
    points = [(x, y) for x, y in zip(xs, evals) if y is not None]
    if points:
        ax.plot(*zip(*points), marker="o", label="held-out loss (coordinator)")
    trains = [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None]
    if trains:
        ax.plot(*zip(*trains), marker="x", linestyle="--", label="train loss (nodes, weighted)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
