"""The published results come from their files (issue #10): the slide ladder's table is what the report makes of
the published store, the READMEs quote that table, and every number of a speed table is its bench JSON's. A
session that publishes a new run updates them together, or this fails."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from cifar_ablation.report import main as report_main

from .conftest import ROOT

LADDER, SPEED = ROOT / "experiments" / "slide_ladder", ROOT / "experiments" / "speed"
CPU_EXAMPLE = ROOT / "experiments" / "cpu_example"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def md_rows(text: str) -> list[list[str]]:
    """The body rows of every Markdown table in text, as lists of stripped cells."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not set(line) <= set("|-: ")]


def ladder_rows() -> dict[int, list[str]]:
    """ladder.md's rows by rung: rung, trick, n, val mean ± std, CI, Δ [CI], verdict, p (Holm), train, gap, slide."""
    return {int(r[0]): r for r in md_rows((LADDER / "ladder.md").read_text()) if r[0].isdigit()}


def named_store(folder: Path) -> Path:
    """The store a results folder's README names ("its store is `X.db`"), beside it."""
    return folder / re.search(r"[Ii]ts store is `([^`]+\.db)`", (folder / "README.md").read_text())[1]


def report_of(store: Path, out: Path, *args: str) -> Path:
    """The report of a published store, made from a copy (the report logs a run into the store it reads): the
    folder it wrote its tables into."""
    copy = out.parent / f"{out.name}.db"
    shutil.copy(store, copy)
    assert report_main(["--tracking-uri", f"sqlite:///{copy}", *args, "--out", str(out), "--no-figures"]) == 0
    return out


FLOAT = re.compile(r"[-+]?\d+(?:\.(\d+))?(?:[eE]([-+]?\d+))?")


def same_table(made: Path, published: Path) -> None:
    """A report's file against its published copy: the same text, and the same numbers up to their last printed
    digit or 1e-9 relative, whichever is looser. Numerics move in the last digits with the library release (a CSV's
    full t-interval bounds in the 11th digit with SciPy 1.15 under Python 3.10 against 1.17; the ANOVA sum of
    squares statsmodels prints, 1519.245937 against ...938, with NumPy 2.5 under Python 3.12 against 2.4)."""
    a, b = made.read_text(), published.read_text()
    assert FLOAT.split(a)[::3] == FLOAT.split(b)[::3], published.name  # the text between the numbers
    for x, y in zip(FLOAT.finditer(a), FLOAT.finditer(b)):
        decimals, exponent = len(y[1] or ""), int(y[2] or 0)
        tolerance = max(10.0 ** (exponent - decimals), 1e-9 * abs(float(y[0])))
        assert abs(float(x[0]) - float(y[0])) <= tolerance * 1.01, (published.name, x[0], y[0])


def test_the_published_ladder_is_the_report_of_its_store(tmp_path):
    report = report_of(named_store(LADDER), tmp_path / "report", "--experiment", "slide-ladder", "--sweep", "all")
    for name in ("ladder.md", "ladder.csv"):
        same_table(report / name, LADDER / name)


def test_the_cpu_example_is_the_report_of_its_store(tmp_path):
    """Each table of experiments/cpu_example is the report of the store beside it: the one-at-a-time and the
    factorial sweep (each named in its table's heading), and the attribution across the experiment's designs."""
    store = named_store(CPU_EXAMPLE)
    for design in ("one_at_a_time", "factorial"):
        sweep = re.search(r"sweep ([0-9a-f]{32})", (CPU_EXAMPLE / f"{design}.md").read_text())[1]
        report = report_of(store, tmp_path / design, "--experiment", "cpu-example", "--sweep", sweep)
        for name in (f"{design}.md", f"{design}.csv"):
            same_table(report / name, CPU_EXAMPLE / name)
    report = report_of(store, tmp_path / "attribution", "--experiment", "cpu-example", "--attribution")
    assert (report / "attribution.md").read_text() == (CPU_EXAMPLE / "attribution.md").read_text()


def test_the_readmes_quote_the_published_ladder():
    rows = ladder_rows()
    quoted = [r for r in md_rows((LADDER / "README.md").read_text()) if re.match(r"\d \w", r[0])]
    assert [int(r[0].split()[0]) for r in quoted] == sorted(rows)  # every rung, in order
    for r in quoted:  # rung | val % | Δ [95% CI] | verdict | slide
        mine = rows[int(r[0].split()[0])]
        assert [r[1].strip("*"), r[2], r[3], r[4]] == [mine[3], mine[5], mine[6], mine[10]], (r, mine)
    results = (ROOT / "README.md").read_text().split("## Results")[1]
    top, base = rows[max(rows)][3], rows[0][3].split(" ± ")[0]
    assert f"**{top} % at the capacity rung**" in results and f"{base} % baseline" in results, (top, base)


def json_numbers(path: Path) -> set[str]:
    """Every number in a JSON file, as a table would print it: with thousands separators, or to 2 decimals."""
    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from walk(v)
        elif isinstance(o, list):
            for v in o:
                yield from walk(v)
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            yield o
    return {s for v in walk(json.loads(path.read_text())) for s in (f"{v:,.0f}", f"{v:.2f}")}


def test_every_speed_table_quotes_its_bench_json():
    """A table whose section heading, the paragraph just above it or its header row name bench JSON files: each
    number in its cells (past the first column) is one of theirs."""
    lines, checked = (SPEED / "README.md").read_text().splitlines(), 0
    for i, line in enumerate(lines):
        if not line.startswith("| ") or (i and lines[i - 1].startswith("|")):
            continue  # not a table's first line
        end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
        paragraph = max((j for j in range(i - 1) if not lines[j].strip()), default=0)
        heading = max((j for j in range(i) if lines[j].startswith("#")), default=0)
        files = re.findall(r"[\w-]+\.json", "\n".join([lines[heading], *lines[paragraph:i + 1]]))
        if not files:
            continue  # no JSON behind it (e.g. the accuracy table, measured by another command)
        known = set().union(*(json_numbers(SPEED / f) for f in files))
        for row in md_rows("\n".join(lines[i + 2:end])):
            for cell in row[1:]:
                for n in NUMBER.findall(cell):
                    assert n in known, (files, row, n)
                    checked += 1
    assert checked >= 15  # the CPU table, the first GPU runs' and the second run's
