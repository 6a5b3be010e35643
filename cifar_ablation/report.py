"""Read a sweep's runs back from MLflow and print the table its design calls for.

    python -m cifar_ablation.report [--tracking-uri URI] [--experiment NAME] [--sweep ID|latest|all]
                                    [--design ladder|leave_one_out|one_at_a_time] [--out DIR]

Runs are grouped by trick set; seeds aggregate to n, mean ± std and a 95% t-interval of the mean. Each row is
compared with its reference (the previous rung; the full set; the baseline) by Welch's t-test: the
difference, its 95% CI, and a verdict (gain / loss / within noise; "n=1: no verdict" without two seeds
a side). Failed and missing configurations are listed, never silently dropped. Writes <design>.md/.csv
(and figures, see figures.py) to --out and logs them as artifacts of a report run in the experiment.
"""
from __future__ import annotations

import argparse
import ast
import csv
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from scipy import stats as st

from .config import design_configs
from .tracking import JOB, REPORT, ROLE, client_for

VERDICT_TEST = "Welch's t-test, 95% two-sided"


@dataclass
class Group:
    tricks: list[str]
    val: list[float] = field(default_factory=list)     # final val accuracy (%) of each FINISHED run
    train: list[float] = field(default_factory=list)
    runs: list = field(default_factory=list)           # the FINISHED runs

    @property
    def n(self) -> int:
        return len(self.val)


def summary(xs: list[float]) -> tuple[float, float, float, float]:
    """mean, std (n-1), and the 95% t-interval of the mean (nan where n < 2)."""
    n = len(xs)
    if n == 0:
        return (math.nan,) * 4
    mean = statistics.fmean(xs)
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = statistics.stdev(xs)
    half = st.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def compare(a: list[float], b: list[float]) -> dict:
    """Difference mean(a) - mean(b) with Welch's 95% CI, p-value and verdict."""
    out = {"delta": math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan, "verdict": "missing"}
    if not a or not b:
        return out
    out["delta"] = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        out["verdict"] = "n=1: no verdict"
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        out.update(lo=out["delta"], hi=out["delta"], p=0.0 if out["delta"] else 1.0)
    else:
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
        half = st.t.ppf(0.975, df) * se
        out.update(lo=out["delta"] - half, hi=out["delta"] + half, p=2 * st.t.sf(abs(out["delta"]) / se, df))
    out["verdict"] = "gain" if out["lo"] > 0 else "loss" if out["hi"] < 0 else "within noise"
    return out


def parse_tricks(tag: str | None) -> list[str]:
    return [] if not tag or tag == "baseline" else tag.split(",")


def load_sweep(client, exp_id: str, sweep: str):
    """The job runs of one sweep ('latest': of the most recently started job; 'all': every job run)."""
    base = f"tags.`{ROLE}` = '{JOB}'"
    if sweep == "latest":
        last = client.search_runs([exp_id], base, order_by=["attributes.start_time DESC"], max_results=1)
        if not last:
            return None, []
        sweep = last[0].data.tags["sweep_id"]
    filt = base if sweep == "all" else f"{base} and tags.sweep_id = '{sweep}'"
    return sweep, client.search_runs([exp_id], filt, max_results=50000)


@dataclass
class Table:
    design: str
    order: list[str]
    rows: list[dict]
    groups: dict[tuple, Group]
    ignored: list[str]   # failed / unfinished runs
    missing: list[str]   # configurations the design needs that have no finished run
    extra: list[str]     # finished configurations outside the design

    def group_of(self, row: dict) -> Group | None:
        return self.groups.get(tuple(parse_tricks(row["tricks"])))


def _row(label: str, g: Group | None, c: dict | None = None, slide: float | None = None) -> dict:
    """One table row: the group's summary and its comparison `c` (None: this row is the reference)."""
    val = g.val if g else []
    mean, sd, lo, hi = summary(val)
    train = statistics.fmean(g.train) if g and g.train else math.nan
    c = c or {"delta": math.nan, "lo": math.nan, "hi": math.nan, "p": math.nan,
              "verdict": "reference" if val else "missing"}
    return {"row": label, "tricks": ",".join(g.tricks) if g else "", "n": len(val), "val_mean": mean, "val_std": sd,
            "val_ci_lo": lo, "val_ci_hi": hi, "delta": c["delta"], "delta_ci_lo": c["lo"], "delta_ci_hi": c["hi"],
            "p_value": c["p"], "verdict": c["verdict"], "train_mean": train, "gap": train - mean, "slide": slide}


def build_table(runs, design: str | None = None) -> Table:
    groups: dict[tuple, Group] = {}
    ignored: list[str] = []
    order: list[str] = []
    slide: dict[str, float] = {}
    designs: list[str] = []
    tried: set[tuple] = set()  # every trick set with a run, finished or not
    for r in runs:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        if not order and "ablation.order" in params:
            order = list(ast.literal_eval(params["ablation.order"]))
            slide = {k.split(".")[-1]: float(v) for k, v in params.items() if k.startswith("ablation.slide.")}
        designs.append(tags.get("design", "single"))
        tricks = parse_tricks(tags.get("tricks"))
        tried.add(tuple(tricks))
        if r.info.status != "FINISHED" or "val_acc" not in metrics:
            ignored.append(f"{r.info.run_id} [{tags.get('tricks')} seed {tags.get('seed')}] {r.info.status}: "
                           f"{tags.get('failure_reason', 'no val_acc logged')}")
            continue
        g = groups.setdefault(tuple(tricks), Group(tricks))
        g.val.append(100 * metrics["val_acc"])
        g.train.append(100 * metrics.get("train_acc", math.nan))
        g.runs.append(r)
    if design is None:
        design = max(set(designs), key=designs.count) if designs else "ladder"
    if design == "single":  # a hand-made sweep: show it as the ladder as far as it goes
        design = "ladder"
    wanted = [tuple(t) for t in design_configs(design, order)] if order else []
    if design == "ladder" and designs and "ladder" not in designs:
        top = max((len(k) for k in tried if list(k) == order[:len(k)]), default=-1)
        wanted = wanted[:top + 1]

    def val(key: tuple) -> list[float]:
        return groups[key].val if key in groups else []

    rows: list[dict] = []
    for i, key in enumerate(wanted):
        if design == "ladder":  # each rung against the rung below it
            c = compare(val(key), val(wanted[i - 1])) if i else None
            name = key[-1] if key else "baseline"
            rows.append(_row(f"{i} {name}", groups.get(key), c, slide.get(name)))
        elif design == "leave_one_out":  # delta = full - without: what keeping the trick is worth
            c = compare(val(wanted[0]), val(key)) if i else None
            rows.append(_row(f"without {order[i - 1]}" if i else "all tricks", groups.get(key), c))
        else:
            c = compare(val(key), val(wanted[0])) if i else None
            rows.append(_row(f"+ {key[0]}" if key else "baseline", groups.get(key), c))
    missing = [",".join(k) or "baseline" for k in wanted if k not in groups]
    extra = [",".join(k) or "baseline" for k in groups if k not in wanted]
    return Table(design, order, rows, groups, ignored, missing, extra)


def fmt(x: float, spec: str = ".2f", plus: bool = False) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, ("+" if plus else "") + spec)


HEADERS = {"ladder": ("rung | trick added", "Δ vs previous rung"), "leave_one_out": ("configuration", "Δ = all − without"),
           "one_at_a_time": ("configuration", "Δ vs baseline")}


def markdown(t: Table, title: str) -> str:
    first, delta = HEADERS[t.design]
    lines = [f"## {title}", "",
             f"| {first} | n | val acc % (mean ± std) | 95% CI | {delta} [95% CI] | verdict | train acc % | "
             f"train−val gap | slide val % |", "|---" * (9 + first.count("|")) + "|"]
    for r in t.rows:
        ci = f"[{fmt(r['val_ci_lo'])}, {fmt(r['val_ci_hi'])}]" if r["n"] > 1 else "–"
        d = fmt(r["delta"], plus=True) + (f" [{fmt(r['delta_ci_lo'], plus=True)}, {fmt(r['delta_ci_hi'], plus=True)}]"
                                          if not math.isnan(r["delta_ci_lo"]) else "")
        val = f"{fmt(r['val_mean'])} ± {fmt(r['val_std'])}" if r["n"] > 1 else fmt(r["val_mean"])
        label = r["row"].replace(" ", " | ", 1) if t.design == "ladder" else r["row"]  # "0 | baseline"
        lines.append(f"| {label} | {r['n']} | {val if r['n'] else 'missing'} | {ci} | {d} | {r['verdict']} | "
                     f"{fmt(r['train_mean'])} | {fmt(r['gap'], plus=True)} | {fmt(r['slide'], '.1f')} |")
    lines += ["", f"Verdicts: {VERDICT_TEST} on the final-epoch val accuracy of each seed; 'gain'/'loss' when the "
              "95% CI of the difference excludes 0."]
    if t.missing:
        lines.append(f"Missing (no FINISHED run): {'; '.join(f'[{m}]' for m in t.missing)}.")
    if t.extra:
        lines.append(f"Also in this sweep, outside the {t.design} design (not in the table): "
                     f"{'; '.join(f'[{m}]' for m in t.extra)}.")
    if t.ignored:
        lines.append(f"Ignored {len(t.ignored)} run(s) that did not finish:")
        lines += [f"- {x}" for x in t.ignored]
    return "\n".join(lines) + "\n"


def compare_markdown(a: Table, b: Table, name_a: str, name_b: str) -> str:
    """Two experiments side by side, row by row (e.g. original CIFAR-10 vs the JPEG mirror)."""
    lines = [f"## {a.design}: {name_a} vs {name_b}", "",
             f"| row | {name_a} val % (n) | {name_b} val % (n) | {name_b} − {name_a} [95% CI] | verdict |",
             "|---|---|---|---|---|"]
    b_rows = {r["row"]: r for r in b.rows}
    for ra in a.rows:
        rb = b_rows.get(ra["row"])
        ga, gb = a.group_of(ra), b.group_of(rb) if rb else None
        c = compare(gb.val if gb else [], ga.val if ga else [])
        ci = f" [{fmt(c['lo'], plus=True)}, {fmt(c['hi'], plus=True)}]" if not math.isnan(c["lo"]) else ""
        lines.append(f"| {ra['row']} | {fmt(ra['val_mean'])} ({ra['n']}) | "
                     f"{fmt(rb['val_mean']) if rb else '–'} ({rb['n'] if rb else 0}) | "
                     f"{fmt(c['delta'], plus=True)}{ci} | {c['verdict']} |")
    lines += ["", f"Verdicts: {VERDICT_TEST}."]
    return "\n".join(lines) + "\n"


def write_csv(t: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["design", *t.rows[0].keys()] if t.rows else ["design"])
        w.writeheader()
        for r in t.rows:
            w.writerow({"design": t.design, **{k: ("" if isinstance(v, float) and math.isnan(v) else v)
                                                for k, v in r.items()}})


def is_sweep_run(client, run_id: str) -> bool:
    try:
        return client.get_run(run_id).data.tags.get(ROLE) == "sweep"
    except MlflowException:
        return False


def sweep_table(client, experiment: str, sweep: str, design: str | None) -> tuple[str, list, Table]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise LookupError(f"no experiment {experiment!r} in this store; it has: {', '.join(names) or 'none'}")
    sweep_id, runs = load_sweep(client, exp.experiment_id, sweep)
    if not runs:
        raise LookupError(f"no job runs for sweep {sweep!r} in experiment {experiment!r}")
    return sweep_id, runs, build_table(runs, design)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cifar_ablation.report", description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="cifar-ablation")
    ap.add_argument("--sweep", default="latest", help="a sweep id (the parent run id), 'latest' or 'all'")
    ap.add_argument("--design", choices=list(HEADERS), help="table to build (default: the sweep's own design)")
    ap.add_argument("--out", default="reports", help="folder for the .md/.csv/.png files")
    ap.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    ap.add_argument("--compare", nargs=2, metavar=("EXP_A", "EXP_B"),
                    help="put two experiments' tables side by side (each its --sweep) instead")
    args = ap.parse_args(argv)

    client = client_for(args.tracking_uri)
    try:
        if args.compare:
            (_, _, ta), (_, _, tb) = (sweep_table(client, name, args.sweep, args.design) for name in args.compare)
            text = compare_markdown(ta, tb, *args.compare)
            print(text)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"compare_{args.compare[0]}_{args.compare[1]}.md").write_text(text)
            return 0
        exp, (sweep, runs, table) = client.get_experiment_by_name(args.experiment), \
            sweep_table(client, args.experiment, args.sweep, args.design)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(table, f"{table.design} — experiment {args.experiment}, sweep {sweep} ({len(runs)} runs)")
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{table.design}.md", out / f"{table.design}.csv"]
    files[0].write_text(text)
    write_csv(table, files[1])
    if not args.no_figures:
        from .figures import draw_all
        files += draw_all(table, client, out)
    tags = {ROLE: REPORT, "sweep_id": sweep, "design": table.design}
    if sweep != "all" and is_sweep_run(client, sweep):
        tags["mlflow.parentRunId"] = sweep  # the report shows under its sweep in the UI
    run = client.create_run(exp.experiment_id, run_name=f"report {table.design}", tags=tags)
    for f in files:
        client.log_artifact(run.info.run_id, str(f), "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    print(f"wrote {', '.join(str(f) for f in files)}; logged to MLflow run {run.info.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
