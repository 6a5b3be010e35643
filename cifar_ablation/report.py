"""Read a sweep's runs back from MLflow and print the table its design calls for.

    python -m cifar_ablation.report [--tracking-uri URI] [--experiment NAME] [--sweep ID|latest|all]
                                    [--design ladder|leave_one_out|one_at_a_time|factorial] [--out DIR]
                                    [--compare EXP_A EXP_B]

Runs are grouped into configurations (groups.py: everything but the seed); seeds aggregate to n, mean ± std
and a 95% t-interval of the mean. Each row is compared with its reference (the previous rung; the full set;
the baseline) by Welch's t-test: the difference, its 95% CI, and a verdict (gain / loss / within noise;
"n=1: no verdict" without two seeds a side), its p-value adjusted for the table's comparisons (Holm), and for a
row within noise the seeds that would resolve it. Failed and missing configurations are listed, never silently
dropped. Writes <design>.md/.csv (and figures, see figures.py) to --out and logs them as artifacts of a
report run in the experiment.
The table itself is tables.py's, its statistics stats.py's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from . import attribution
from .designs import DESIGNS
from .tables import Table, build_table, compare_markdown, configurations, markdown, write_csv
from .checks import UserError
from .tracking import JOB, REPORT, ROLE, SWEEP, default_uri, experiment_id, reader, sweep_jobs


def load_sweep(client, exp_id: str, sweep: str):
    """The job runs of one sweep, those it reused included ('latest': the most recently launched sweep or
    single run; 'all': every job run of the experiment)."""
    if sweep == "all":
        return sweep, client.search_runs([exp_id], f"tags.`{ROLE}` = '{JOB}'", max_results=50000)
    if sweep == "latest":
        last = [r for role in (JOB, SWEEP) for r in client.search_runs(
            [exp_id], f"tags.`{ROLE}` = '{role}'", order_by=["attributes.start_time DESC"], max_results=1)]
        if not last:
            return None, []
        sweep = max(last, key=lambda r: r.info.start_time).data.tags["sweep_id"]
    else:
        sweep = full_sweep_id(client, exp_id, sweep)
    return sweep, sweep_jobs(client, exp_id, sweep)


def full_sweep_id(client, exp_id: str, given: str) -> str:
    """The sweep id that a prefix of it names, as the progress lines print one (`sweep 1f3c2a…`); an id no sweep
    starts with, as given. LookupError where several sweeps of the experiment start with it, naming them."""
    if len(given) >= 32:  # a whole MLflow run id
        return given
    ids = {r.data.tags.get("sweep_id", "") for role in (SWEEP, JOB)
           for r in client.search_runs([exp_id], f"tags.`{ROLE}` = '{role}'", max_results=50000)}
    if given in ids:
        return given
    matches = sorted(i for i in ids if i.startswith(given))
    if len(matches) > 1:
        raise LookupError(f"--sweep {given} names {len(matches)} sweeps: {', '.join(matches)}; give more of the id")
    return matches[0] if matches else given


def sweep_run(client, run_id: str):
    """The sweep's parent run (None for 'all', a single run's own id, or an unknown id)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.data.tags.get(ROLE) == SWEEP else None


def sweep_table(client, experiment: str, sweep: str, design: str | None) -> tuple[str, str, list, Table]:
    """(experiment id, sweep id, its job runs, its table); LookupError naming what the store has instead."""
    exp_id = experiment_id(client, experiment)
    sweep_id, runs = load_sweep(client, exp_id, sweep)
    if not runs:
        raise LookupError(f"no job runs for sweep {sweep!r} in experiment {experiment!r}")
    # the sweep's own design and trick order, not those of the runs it reused
    table = build_table(runs, design, sweep_run(client, sweep_id))
    if sweep != "all":
        table.notes += more_seeds_elsewhere(client, exp_id, table)
    return exp_id, sweep_id, runs, table


def more_seeds_elsewhere(client, exp_id: str, table: Table) -> list[str]:
    """A note when other sweeps of the experiment ran more seeds of this table's configurations (seeds added
    later, `seed=3,4`): `--sweep all` pools them."""
    n_all = {g.key: len(g.runs) for gs in configurations(load_sweep(client, exp_id, "all")[1])[0].values() for g in gs}
    here = [g for gs in table.groups.values() for g in gs]
    more = [n_all[g.key] for g in here if n_all.get(g.key, 0) > len(g.runs)]
    if not more:
        return []
    return [f"the experiment's other sweeps hold more seeds of {len(more)} of these {len(here)} configurations "
            f"(up to {max(more)} in all): `--sweep all` pools every sweep's runs"]


def attribution_tables(client, experiment: str) -> tuple[str, dict[str, tuple[str, Table]]]:
    """The table of the latest sweep of each design in the experiment: design -> (sweep id, table)."""
    exp_id = experiment_id(client, experiment)
    out: dict[str, tuple[str, Table]] = {}
    for parent in client.search_runs([exp_id], f"tags.`{ROLE}` = '{SWEEP}'",
                                     order_by=["attributes.start_time DESC"], max_results=50000):
        design = parent.data.tags.get("design")
        if design in DESIGNS and design not in out:
            runs = sweep_jobs(client, exp_id, parent.info.run_id)
            if runs:
                out[design] = (parent.info.run_id, build_table(runs, design, parent))
    if not out:
        raise LookupError(f"no design sweep (ladder, one-at-a-time, leave-one-out, factorial) in {experiment!r}")
    return exp_id, out


def render(table: Table, title: str) -> str:
    """The report's Markdown: the design's table (and a factorial's effects, Shapley values and aliases)."""
    text = markdown(table, title)
    if table.design.name == "factorial":
        from .effects import factorial_section  # statsmodels: only for a factorial
        text += factorial_section(table)
    return text


def write_files(client, table: Table, text: str, out: Path, figures: bool) -> list[Path]:
    """<design>.md/.csv (and the figures) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    name = table.design.name
    files = [out / f"{name}.md", out / f"{name}.csv"]
    files[0].write_text(text)
    write_csv(table, files[1])
    if figures:
        from .figures import draw_all  # matplotlib: only when drawing
        files += draw_all(table, client, out)
    return files


def write_report(client, exp_id: str, sweep: str, table: Table, text: str, out: Path, figures: bool) -> list[Path]:
    """The report's files under `out`, logged as artifacts of a report run nested under the sweep's parent run
    when there is one. (The sweep's own parent run holds the report written when the sweep ended: sweep.py.)"""
    files = write_files(client, table, text, out, figures)
    name = table.design.name
    tags = {ROLE: REPORT, "sweep_id": sweep, "design": name}
    if sweep != "all" and sweep_run(client, sweep) is not None:
        tags["mlflow.parentRunId"] = sweep  # the report shows under its sweep in the UI
    run = client.create_run(exp_id, run_name=f"report {name}", tags=tags)
    for f in files:
        client.log_artifact(run.info.run_id, str(f), "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    print(f"wrote {', '.join(str(f) for f in files)}; logged to MLflow run {run.info.run_id}")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cifar_ablation.report", description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default=default_uri(),
                    help="default: MLFLOW_TRACKING_URI where set, else sqlite:///mlflow.db")
    ap.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME", "cifar-ablation"))
    ap.add_argument("--sweep", default="latest",
                    help="a sweep id (the parent run id, or its start, as progress lines print it), 'latest' or 'all'")
    ap.add_argument("--design", choices=list(DESIGNS), help="table to build (default: the sweep's own design)")
    ap.add_argument("--out", default="reports", help="folder for the .md/.csv/.png files")
    ap.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    ap.add_argument("--compare", nargs=2, metavar=("EXP_A", "EXP_B"),
                    help="put two experiments' tables side by side (each its --sweep) instead")
    ap.add_argument("--attribution", action="store_true",
                    help="per trick, what every design in the experiment says it bought (latest sweep of each)")
    args = ap.parse_args(argv)

    try:
        client = reader(args.tracking_uri)
        if args.attribution:
            text = attribution.markdown(attribution_tables(client, args.experiment)[1], args.experiment)
            print(text)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "attribution.md").write_text(text)
            return 0
        if args.compare:
            (*_, ta), (*_, tb) = (sweep_table(client, name, args.sweep, args.design) for name in args.compare)
            text = compare_markdown(ta, tb, *args.compare)
            print(text)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"compare_{args.compare[0]}_{args.compare[1]}.md").write_text(text)
            return 0
        exp_id, sweep, runs, table = sweep_table(client, args.experiment, args.sweep, args.design)
    except (LookupError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = render(table, f"{table.design.name} — experiment {args.experiment}, sweep {sweep} ({len(runs)} runs)")
    print(text)
    write_report(client, exp_id, sweep, table, text, Path(args.out), figures=not args.no_figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
