"""One attribution table across designs: per trick, what each design run in an experiment says it bought.

    ladder gain          its rung minus the rung below, in the ladder's order (order-bound)
    one-at-a-time gain   baseline + trick minus baseline (the trick alone)
    leave-one-out loss   all tricks minus all but the trick (the trick among all others)
    main effect          the factorial's average gain of turning it on over all settings of the others
    Shapley value        its marginal gain averaged over every order of adding the tricks

Each with its 95% CI where seeds allow. Where they disagree, the tricks interact: the order-bound story of the
ladder holds only where they agree. Built from the latest sweep of each design (report.attribution_tables).
"""
from __future__ import annotations

import math

from .effects import analyse
from .tables import Row, Table, fmt

COLUMNS = (("ladder", "ladder gain"), ("one_at_a_time", "one-at-a-time gain"),
           ("leave_one_out", "leave-one-out loss"), ("factorial", "main effect"), ("factorial", "Shapley value"))


def cell(value: float, lo: float, hi: float, n: int | None = None) -> str:
    if value is None or math.isnan(value):
        return "–"
    ci = f" [{fmt(lo, plus=True)}, {fmt(hi, plus=True)}]" if not math.isnan(lo) else (f" (n={n})" if n else "")
    return fmt(value, plus=True) + ci


def _row_cell(t: Table, label) -> str:
    row: Row | None = next((r for r in t.rows if label(r)), None)
    return "–" if row is None else cell(row.delta, row.delta_ci_lo, row.delta_ci_hi, row.n)


def markdown(tables: dict[str, tuple[str, Table]], experiment: str) -> str:
    """tables: design name -> (its sweep id, its table)."""
    tricks: list[str] = []
    for _, t in tables.values():
        tricks += [x for x in t.order if x not in tricks]
    cols: dict[str, dict[str, str]] = {}
    if "ladder" in tables:
        t = tables["ladder"][1]
        cols["ladder gain"] = {x: _row_cell(t, lambda r, x=x: r.tricks and r.tricks[-1] == x) for x in tricks}
    if "one_at_a_time" in tables:
        t = tables["one_at_a_time"][1]
        cols["one-at-a-time gain"] = {x: _row_cell(t, lambda r, x=x: r.tricks == (x,)) for x in tricks}
    if "leave_one_out" in tables:
        t = tables["leave_one_out"][1]
        cols["leave-one-out loss"] = {x: _row_cell(t, lambda r, x=x: r.label[0] == f"without {x}") for x in tricks}
    notes = []
    if "factorial" in tables:
        a = analyse(tables["factorial"][1])
        if isinstance(a, str):
            notes.append(a)
        else:
            main = a.fit.by_first_term()
            cols["main effect"] = {x: cell(main[x].effect, main[x].lo, main[x].hi) if x in main else "–"
                                   for x in tricks}
            cols["Shapley value"] = {k.split(" = ")[0]: cell(v, lo, hi) for k, v, lo, hi in a.shapley}
    names = [name for _, name in COLUMNS]  # every column, "–" where its design was not run
    lines = [f"## Attribution — experiment {experiment}", "",
             "| trick | " + " | ".join(f"{n}, points [95% CI]" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {x} | " + " | ".join(cols.get(n, {}).get(x, "–") for n in names) + " |" for x in tricks]
    lines += ["", "From the latest sweep of each design: " +
              "; ".join(f"{d} {sweep} (order {', '.join(t.order)})" for d, (sweep, t) in tables.items()) + "."]
    absent = sorted({d for d, _ in COLUMNS} - set(tables))
    if absent:
        lines.append(f"Not run in this experiment: {', '.join(absent)}.")
    lines += ["Where the columns disagree, the tricks interact: a ladder's gain holds for its order only."]
    return "\n".join(lines + notes) + "\n"
