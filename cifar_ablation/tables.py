"""From a sweep's MLflow runs to its design's table: one row per configuration (groups.py), seeds aggregated,
each row compared with its reference row, rendered as Markdown and CSV. Pure: no MLflow calls, only the runs.

The design (designs.py) says which trick sets the table has, how each row is labelled and which row it is
compared with; the statistics are stats.py's. Failed and missing configurations are listed, never dropped.
"""
from __future__ import annotations

import ast
import csv
import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .checks import CONF_DIR
from .designs import DESIGNS, SINGLE, Design, RowSpec, infer_design, ordered_tricks
from .groups import Group, group_runs
from .stats import MAX_SEEDS, NAN, POWER, VERDICT_TEST, Comparison, compare, holm, seeds_to_resolve, summary


@dataclass(frozen=True)
class Row:
    """One table row: a configuration's summary over seeds, and its comparison with its reference row."""
    label: tuple[str, ...]     # its cells under the design's label columns
    tricks: tuple[str, ...]
    n: int
    val_mean: float            # val accuracy %, mean over seeds, std, 95% CI of the mean
    val_std: float
    val_ci_lo: float
    val_ci_hi: float
    delta: float               # the comparison with the reference row (nan for a reference row)
    delta_ci_lo: float
    delta_ci_hi: float
    p_value: float
    verdict: str
    train_mean: float
    gap: float                 # train − val
    slide: float | None        # the slide's val accuracy for this rung (ladder only)
    reference: str = ""        # the row it was compared with ("" for a reference row)
    group: tuple = ()          # its configuration (groups.Group.key)
    p_holm: float = NAN        # p_value adjusted for the table's comparisons (stats.holm)
    seeds_to_resolve: int | None = None   # within noise: seeds a side that would resolve delta (stats.py)

    @property
    def row(self) -> str:
        return " ".join(self.label)


CSV_COLUMNS = ("design", "row", "tricks", "n", "val_mean", "val_std", "val_ci_lo", "val_ci_hi", "delta",
               "delta_ci_lo", "delta_ci_hi", "p_value", "p_holm", "verdict", "seeds_to_resolve", "train_mean", "gap",
               "slide", "reference")


@dataclass
class Table:
    design: Design
    order: list[str]
    rows: list[Row]
    groups: dict[tuple, list[Group]]   # each trick set's configurations
    ignored: list[str]   # failed / unfinished runs
    missing: list[str]   # configurations the design needs that have no finished run
    extra: list[str]     # finished configurations outside the design
    sources: list[str]   # the data the finished runs trained on (their data_source tags)
    notes: list[str] = field(default_factory=list)   # repeated seeds
    fraction: int | None = None   # a factorial's resolution (None: every subset)
    inferred: str = ""   # for a hand-made sweep: the design inferred from its trick sets, and why
    machines: list[str] = field(default_factory=list)   # what the finished runs trained on and in (machine_of)

    def group_of(self, row: Row) -> Group | None:
        return next((g for g in self.groups.get(row.tricks, []) if g.key == row.group), None)

    @property
    def varied(self) -> bool:
        """Some trick set has several configurations: every comparison then names its reference."""
        return any(len(gs) > 1 for gs in self.groups.values())


def parse_tricks(tag: str | None) -> list[str]:
    return [] if not tag or tag == "baseline" else tag.split(",")


def _rows(spec: RowSpec, specs: list[RowSpec], groups: dict[tuple, list[Group]], design: Design,
          slide: dict[str, float]) -> list[Row]:
    """The rows of one design row: one per configuration of its trick set (one 'missing' row without any),
    each compared with the configuration of its reference trick set that agrees with it on the rest."""
    # the slide's number only where this rung is the slide's rung: the same tricks, added in the slide's order
    same_rung = list(spec.tricks) == slide_order()[:len(spec.tricks)]
    slide_val = slide.get(spec.label[-1]) if design.slide_column and same_rung else None
    rows = []
    for g in groups.get(spec.tricks) or [None]:
        val, train = (g.val, g.train_mean) if g else ([], NAN)
        s = summary(val)
        label = spec.label[:-1] + (spec.label[-1] + (f" ({g.label})" if g and g.label else ""),)
        if spec.reference is None:
            pairs = [(None, Comparison(NAN, NAN, NAN, NAN, "reference" if g else "missing"))]
        else:
            candidates = groups.get(specs[spec.reference].tricks, [])
            pairs = [(r, compare(r.val, val) if design.reference_minus_row else compare(val, r.val))
                     for r in candidates if g is None or g.agrees_with(r)]
            if not pairs:  # no reference at all, or none with these settings
                why = "no reference with the same settings" if candidates else "missing"
                pairs = [(None, Comparison(NAN, NAN, NAN, NAN, why))]
        for ref, c in pairs:
            name = "" if spec.reference is None else " ".join(specs[spec.reference].label) + \
                (f" ({ref.label})" if ref is not None and ref.label else "")
            seeds = seeds_to_resolve(val, ref.val) if c.verdict == "within noise" else None
            rows.append(Row(label, spec.tricks, s.n, s.mean, s.std, s.lo, s.hi, c.delta, c.lo, c.hi, c.p, c.verdict,
                            train, train - s.mean, slide_val, name, g.key if g else (), seeds_to_resolve=seeds))
    return rows


@functools.cache
def slide_order() -> list[str]:
    """The order the slide adds its tricks in: the keys of ablation.slide in conf/config.yaml."""
    return [k for k in OmegaConf.load(CONF_DIR / "config.yaml").ablation.slide if k != "baseline"]


def counts(run: Any) -> bool:
    """A run a table counts: FINISHED, with its val accuracy."""
    return run.info.status == "FINISHED" and "val_acc" in run.data.metrics


def configurations(runs, order: Any = ()) -> tuple[dict[tuple, list[Group]], list[str]]:
    """The configurations of the runs a table counts, by trick set (spelled in `order`, however each run spells
    it), and notes on repeated seeds (groups.group_runs)."""
    finished = [r for r in runs if counts(r)]
    return group_runs(finished, [trick_set(r, order) for r in finished])


def trick_set(run: Any, order: Any = ()) -> tuple[str, ...]:
    """The tricks a run trained, in `order` (a run's tag spells them in the order of the sweep that trained it)."""
    return tuple(ordered_tricks(parse_tricks(run.data.tags.get("tricks")), order))


def settings(runs, sweep: Any = None) -> tuple[list[str], int | None, dict[str, float]]:
    """(trick order, a factorial's fraction, the slide's numbers) a table is built with: the sweep run's own
    (identity.table_params), else those of the first run that logged them (a single run's; with --sweep all,
    the newest run's)."""
    params = next((p for p in [sweep and sweep.data.params, *(r.data.params for r in runs)]
                   if p and "ablation.order" in p), {})
    if not params:
        return [], None, {}
    slide = {k.split(".")[-1]: float(v) for k, v in params.items() if k.startswith("ablation.slide.")}
    fraction = ast.literal_eval(params.get("ablation.fraction", "None"))
    return list(ast.literal_eval(params["ablation.order"])), fraction, slide


def build_table(runs, design: str | None = None, sweep: Any = None) -> Table:
    """The table of these job runs: the design given, else the sweep run's (`sweep`, whose params give the trick
    order: settings), else the runs' commonest; a hand-made sweep's inferred from its trick sets."""
    order, fraction, slide = settings(runs, sweep)
    tried = {frozenset(trick_set(r)) for r in runs}  # every trick set with a run, finished or not
    ignored = [f"{r.info.run_id} [{r.data.tags.get('tricks')} seed {r.data.tags.get('seed')}] {r.info.status}: "
               f"{r.data.tags.get('failure_reason', 'no val_acc logged')}" for r in runs if not counts(r)]
    designs = [r.data.tags.get("design", SINGLE) for r in runs]
    design = design or (sweep.data.tags.get("design") if sweep is not None else None) or \
        (max(set(designs), key=designs.count) if designs else "ladder")
    inferred = ""
    if design == SINGLE:  # a hand-made sweep: the design its trick sets form
        d, order, why = infer_design(tried, order)
        fraction, inferred = None, f"{d.name} ({why})"
    else:
        d = DESIGNS[design]
    groups, notes = configurations(runs, order)
    specs = d.rows(order, fraction) if order or inferred else []
    rows = [row for spec in specs for row in _rows(spec, specs, groups, d, slide)]
    rows = [replace(r, p_holm=q) for r, q in zip(rows, holm([r.p_value for r in rows]))]
    sources = sorted({data_of(r) for r in runs if counts(r)})
    wanted = [spec.tricks for spec in specs]
    missing = [",".join(k) or "baseline" for k in wanted if k not in groups]
    extra = [",".join(k) or "baseline" for k in groups if k not in wanted]
    machines = sorted({m for r in runs if counts(r) and (m := machine_of(r))})
    return Table(d, order, rows, groups, ignored, missing, extra, sources, notes, fraction, inferred, machines)


def data_of(run: Any) -> str:
    """What a run trained on: its source (a path, or cifar10:<root>) and the start of its sha256, which tells the
    same file on two machines from two files at one path (a re-downloaded or re-encoded copy)."""
    source, checksum = run.data.tags.get("data_source", "unknown"), run.data.tags.get("data_checksum")
    return f"{source} (sha256 {checksum[:12]})" if checksum else source


def machine_of(run: Any) -> str | None:
    """What a run trained on and in: its GPU (name and compute capability) and precision, where its tags say so,
    else its device (runs logged before those tags were); None where nothing says."""
    tags = run.data.tags
    where = tags.get("gpu") or tags.get("device")
    return f"{where}, {tags['precision']}" if where and "precision" in tags else where


def fmt(x: float | None, spec: str = ".2f", plus: bool = False) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, ("+" if plus else "") + spec)


def with_ci(x: float, lo: float, hi: float) -> str:
    """'+1.23 [+0.10, +2.36]', or '+1.23' where there is no interval."""
    return fmt(x, plus=True) + ("" if math.isnan(lo) else f" [{fmt(lo, plus=True)}, {fmt(hi, plus=True)}]")


def listing(names: list[str], where: str = "", most: int = 12) -> str:
    """Trick sets as [a,b]; [c]: of a longer list the first `most`, with how many more (and where they are)."""
    shown = "; ".join(f"[{m}]" for m in names[:most])
    if len(names) <= most:
        return shown
    return f"{len(names)} configurations: {shown}; … and {len(names) - most} more{f' ({where})' if where else ''}"


def markdown(t: Table, title: str) -> str:
    labels = " | ".join(t.design.label_columns)
    lines = [f"## {title}", "",
             f"| {labels} | n | val acc % (mean ± std) | 95% CI | {t.design.delta_column} [95% CI] | verdict | "
             "p (Holm) | train acc % | train−val gap | slide val % |", "|---" * (9 + len(t.design.label_columns)) + "|"]
    for r in t.rows:
        ci = f"[{fmt(r.val_ci_lo)}, {fmt(r.val_ci_hi)}]" if r.n > 1 else "–"
        d = with_ci(r.delta, r.delta_ci_lo, r.delta_ci_hi)
        if t.varied and r.reference:
            d += f" vs {r.reference}"
        val = f"{fmt(r.val_mean)} ± {fmt(r.val_std)}" if r.n > 1 else fmt(r.val_mean)
        lines.append(f"| {' | '.join(r.label)} | {r.n} | {val if r.n else 'missing'} | {ci} | {d} | {r.verdict} | "
                     f"{fmt(r.p_holm, '.2g')} | {fmt(r.train_mean)} | {fmt(r.gap, plus=True)} | {fmt(r.slide, '.1f')} |")
    lines += ["", f"Verdicts: {VERDICT_TEST} on the final-epoch val accuracy of each seed; 'gain'/'loss' when the "
              "95% CI of the difference excludes 0.", *uncertainty_notes(t.rows)]
    if t.inferred:
        lines.append(f"Design: inferred from the trick sets swept: {t.inferred}.")
    if t.sources:
        lines.append(f"Data: {'; '.join(t.sources)}.")
    if t.machines:
        lines.append(f"Trained on: {'; '.join(t.machines)}.")
    if t.missing:
        lines.append(f"Missing (no FINISHED run): {listing(t.missing, 'each a row marked missing')}.")
    if t.extra:
        lines.append(f"Also in this sweep, outside the {t.design.name} design (not in the table): "
                     f"{listing(t.extra)}.")
    if t.varied:
        lines.append("Runs of one trick set that differ in other settings are separate rows, labelled by what "
                     "differs; each is compared with the reference configuration that agrees with it on the rest.")
    lines += [f"Note: {n}." for n in t.notes]
    if t.ignored:
        lines.append(f"Ignored {len(t.ignored)} run(s) that did not finish:")
        lines += [f"- {x}" for x in t.ignored]
    return "\n".join(lines) + "\n"


def uncertainty_notes(rows: list[Row]) -> list[str]:
    """What the verdicts do not say: which gains and losses could be chance among the table's comparisons, and what
    more seeds would resolve where the verdict is within noise."""
    k, lines = sum(not math.isnan(r.p_value) for r in rows), []
    if k > 1:
        doubtful = [r.row for r in rows if r.verdict in ("gain", "loss") and r.p_holm >= 0.05]
        lines.append(f"p (Holm): each p-value adjusted for the table's {k} comparisons (Holm's step-down); " + (
            f"a gain or loss with an adjusted p of 0.05 or more may be one of the chance results that {k} tests at "
            f"5% make: {'; '.join(doubtful)}." if doubtful else
            "every gain and loss here holds after it (adjusted p < 0.05)."))
    unresolved = [r for r in rows if r.verdict == "within noise"]
    if unresolved:
        seeds = "; ".join(f"{r.row}: " + (str(r.seeds_to_resolve) if r.seeds_to_resolve else
                                            f"more than {MAX_SEEDS}" if r.delta else "none (Δ = 0)")
                          for r in unresolved)
        lines.append(f"Within noise is not no effect: seeds a side that would resolve the measured Δ at "
                     f"{POWER:.0%} power, were it and the seeds' spread the truth (a planning guide): {seeds}.")
    return lines


def compare_markdown(a: Table, b: Table, name_a: str, name_b: str) -> str:
    """Two experiments side by side, row by row (e.g. original CIFAR-10 vs the JPEG mirror)."""
    lines = [f"## {a.design.name}: {name_a} vs {name_b}", "",
             f"| row | {name_a} val % (n) | {name_b} val % (n) | {name_b} − {name_a} [95% CI] | verdict | p (Holm) |",
             "|---|---|---|---|---|---|"]
    b_rows = {r.row: r for r in b.rows}
    pairs = [(ra, b_rows.get(ra.row)) for ra in a.rows]
    groups = [(a.group_of(ra), b.group_of(rb) if rb else None) for ra, rb in pairs]
    cs = [compare(gb.val if gb else [], ga.val if ga else []) for ga, gb in groups]
    for (ra, rb), c, q in zip(pairs, cs, holm([c.p for c in cs])):
        lines.append(f"| {ra.row} | {fmt(ra.val_mean)} ({ra.n}) | {fmt(rb.val_mean) if rb else '–'} "
                     f"({rb.n if rb else 0}) | {with_ci(c.delta, c.lo, c.hi)} | {c.verdict} | {fmt(q, '.2g')} |")
    lines += ["", f"Verdicts: {VERDICT_TEST}; p (Holm): adjusted for the {sum(not math.isnan(c.p) for c in cs)} "
              "comparisons."]
    return "\n".join(lines) + "\n"


def write_csv(t: Table, path: Path) -> None:
    def cell(v):
        return "" if isinstance(v, float) and math.isnan(v) else v
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS if t.rows else ["design"])
        w.writeheader()
        for r in t.rows:
            values = {c: cell(getattr(r, c)) for c in CSV_COLUMNS[3:]}
            w.writerow({"design": t.design.name, "row": r.row, "tricks": ",".join(r.tricks), **values})
