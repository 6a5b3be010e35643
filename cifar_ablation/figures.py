"""PNG figures for a report table: accuracy bars with 95% CI whiskers and the slide's numbers as markers;
train vs val accuracy per row (the generalization gap); val accuracy per epoch for each configuration."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def main_effects(a, path: Path) -> Path:
    """Each term's effect (main effects and interactions or their alias chains) with its 95% CI whisker."""
    es = a.fit.effects
    fig, ax = plt.subplots(figsize=(7, max(3, 0.4 * len(es) + 1)))
    y = list(range(len(es)))[::-1]
    err = [[e.effect - e.lo if not math.isnan(e.lo) else 0 for e in es],
           [e.hi - e.effect if not math.isnan(e.hi) else 0 for e in es]]
    ax.barh(y, [e.effect for e in es], xerr=err, capsize=3,
            color=["#4c72b0" if " " not in e.term else "#8c8c8c" for e in es])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [e.term if len(e.term) < 40 else e.term[:37] + "…" for e in es], fontsize="small")
    ax.set_xlabel("effect on val accuracy (points), 95% CI")
    ax.set_title("factorial: main effects (blue) and two-trick interactions")
    return _save(fig, path)


def interaction_map(a, path: Path) -> Path:
    """The two-trick interactions as a matrix; blank where the design aliases the pair with others."""
    tricks = a.plan.tricks
    m = np.full((len(tricks), len(tricks)), np.nan)
    for e in a.fit.effects:
        pair = e.term.split(" × ")
        if len(pair) == 2 and "=" not in e.term:
            i, j = tricks.index(pair[0]), tricks.index(pair[1])
            m[i, j] = m[j, i] = e.effect
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(tricks), 0.6 + 0.7 * len(tricks)))
    lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
    im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(tricks)), tricks, rotation=45, ha="right")
    ax.set_yticks(range(len(tricks)), tricks)
    fig.colorbar(im, label="interaction (points)")
    ax.set_title("two-trick interactions (blank: aliased or none)")
    return _save(fig, path)


def shapley_waterfall(a, path: Path) -> Path:
    """From the baseline's accuracy to all tricks', one Shapley value at a time."""
    base = statistics.fmean(a.samples[()]) if () in a.samples else 0.0
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(a.shapley) + 2), 4.2))
    level, levels = base, [base]
    for i, (name, v, lo, hi) in enumerate(a.shapley):
        ax.bar(i, v, bottom=level, color="#55a868" if v >= 0 else "#c44e52",
               yerr=[[v - lo if not math.isnan(lo) else 0], [hi - v if not math.isnan(hi) else 0]], capsize=3)
        level += v
        levels += [level, level - v + (lo if not math.isnan(lo) else v), level - v + (hi if not math.isnan(hi) else v)]
    ax.set_ylim(min(levels) - 2, max(levels) + 2)
    ax.axhline(base, color="gray", lw=0.8, ls="--", label=f"baseline {base:.2f}")
    ax.axhline(level, color="black", lw=0.8, ls=":", label=f"all tricks {level:.2f}")
    ax.set_xticks(range(len(a.shapley)), [n.split(" = ")[0] for n, *_ in a.shapley], rotation=30, ha="right")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Shapley waterfall: what each trick bought, independently of order")
    ax.legend(fontsize="small")
    return _save(fig, path)


def draw_all(table, client, out: Path) -> list[Path]:
    if not table.rows:
        return []
    name = table.design.name
    paths = [accuracy_bars(table, out / f"{name}_accuracy.png"),
             train_vs_val(table, out / f"{name}_train_vs_val.png"),
             val_curves(table, client, out / f"{name}_val_curves.png")]
    if name == "factorial":
        from .effects import analyse  # statsmodels: only for a factorial

        a = analyse(table)
        if not isinstance(a, str):
            paths += [main_effects(a, out / "factorial_effects.png"), interaction_map(a, out / "factorial_interactions.png"),
                      shapley_waterfall(a, out / "factorial_shapley.png")]
    return paths
