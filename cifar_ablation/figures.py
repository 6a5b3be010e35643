"""PNG figures for a report table: accuracy bars with 95% CI whiskers and the slide's numbers as markers;
train vs val accuracy per row (the generalization gap); val accuracy per epoch for each configuration."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def accuracy_bars(table, path: Path) -> Path:
    rows = table.rows
    x = range(len(rows))
    means = [r.val_mean for r in rows]
    err = [[m - r.val_ci_lo if r.n > 1 else 0 for m, r in zip(means, rows)],
           [r.val_ci_hi - m if r.n > 1 else 0 for m, r in zip(means, rows)]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.2))
    ax.bar(x, [0 if math.isnan(m) else m for m in means], yerr=err, capsize=4, color="#4c72b0", label="val acc (95% CI)")
    slide = [_nan(r.slide) for r in rows]
    if any(not math.isnan(s) for s in slide):
        ax.plot(x, slide, "D", color="#dd8452", label="slide")
    finite = [v for v in means + slide if not math.isnan(v)]
    if finite:
        ax.set_ylim(max(0, min(finite) - 5), min(100, max(finite) + 3))
    ax.set_xticks(list(x), [r.row for r in rows], rotation=30, ha="right")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{table.design.name}: mean final val accuracy, 95% CI over seeds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train_vs_val(table, path: Path) -> Path:
    rows = table.rows
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.2))
    ax.plot(x, [r.train_mean for r in rows], "o-", label="train acc (augmented, running)")
    ax.plot(x, [r.val_mean for r in rows], "s-", label="val acc")
    ax.set_xticks(x, [r.row for r in rows], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("generalization gap: train vs validation accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def val_curves(table, client, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in table.rows:
        g = table.group_of(r)
        if g is None:
            continue
        per_epoch: dict[int, list[float]] = {}
        for run in g.runs:
            for m in client.get_metric_history(run.info.run_id, "val_acc"):
                per_epoch.setdefault(m.step, []).append(100 * m.value)
        steps = sorted(per_epoch)
        ax.plot(steps, [statistics.fmean(per_epoch[s]) for s in steps], marker="." if len(steps) < 30 else None,
                label=r.row)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (%), mean over seeds")
    ax.set_title("validation accuracy per epoch")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(table, client, out: Path) -> list[Path]:
    if not table.rows:
        return []
    return [accuracy_bars(table, out / f"{table.design.name}_accuracy.png"),
            train_vs_val(table, out / f"{table.design.name}_train_vs_val.png"),
            val_curves(table, client, out / f"{table.design.name}_val_curves.png")]
