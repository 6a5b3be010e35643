"""Ablation designs: which trick sets a sweep trains, and how its table compares them. One record per design.

Every design is generated from the one trick order, `ablation.order`. A design's rows say, in table order, the
trick set of each row, its label, and the row it is compared with. The sweep (conf/experiment/<name>.yaml hands
Hydra `${design_sweep:<name>,${ablation.order}}`) and the report's table (report.py) both read these records,
so adding a design is one record here plus one YAML file.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable

from .factorial import plan


@dataclass(frozen=True)
class RowSpec:
    label: tuple[str, ...]      # the row's cells under the design's label columns
    tricks: tuple[str, ...]     # the trick set it trains, in ablation order
    reference: int | None       # the row it is compared with (an index into the rows); None: a reference itself


@dataclass(frozen=True)
class Design:
    name: str
    label_columns: tuple[str, ...]            # the table's first column(s)
    delta_column: str                         # what the difference means
    rows: Callable[..., list[RowSpec]]        # (order, fraction=None): only the factorial reads a fraction
    reference_minus_row: bool = False         # Δ = reference − row (what keeping a trick is worth), else row − reference
    slide_column: bool = False                # show the slide's numbers beside the rows

    def configs(self, order: Any, fraction: int | None = None) -> list[list[str]]:
        """The trick sets the design sweeps, in the order its table shows them."""
        return [list(r.tricks) for r in self.rows(list(order), fraction)]

    def sweep(self, order: Any, fraction: int | None = None) -> str:
        """Hydra sweep syntax for the trick sets: '[],[noise],[noise,batchnorm],...'."""
        return ",".join("[" + ",".join(s) + "]" for s in self.configs(order, fraction))


def _ladder(order: list[str], fraction: None = None) -> list[RowSpec]:
    """The baseline, then each trick added on top of all before it; each rung against the one below."""
    return [RowSpec((str(i), order[i - 1] if i else "baseline"), tuple(order[:i]), i - 1 if i else None)
            for i in range(len(order) + 1)]


def _leave_one_out(order: list[str], fraction: None = None) -> list[RowSpec]:
    """All tricks, then all but one, for each trick; each against all tricks."""
    return [RowSpec(("all tricks",), tuple(order), None)] + \
        [RowSpec((f"without {left}",), tuple(t for t in order if t != left), 0) for left in order]


def _one_at_a_time(order: list[str], fraction: None = None) -> list[RowSpec]:
    """The baseline, then the baseline plus one trick, for each trick; each against the baseline."""
    return [RowSpec(("baseline",), (), None)] + [RowSpec((f"+ {t}",), (t,), 0) for t in order]


def _factorial(order: list[str], fraction: int | None = None) -> list[RowSpec]:
    """Every subset of the tricks (the full two-level factorial), or a regular fraction of resolution
    `fraction` (factorial.plan); each configuration against the baseline, listed first. The report adds main
    effects, interactions and Shapley values."""
    sets = plan(order, fraction).configs if order else [()]
    sets = sorted(sets, key=lambda s: s != ())  # the baseline first (a fraction may lack it: then no Δ)
    base = 0 if sets[0] == () else None
    return [RowSpec(("+ " + " + ".join(s),) if s else ("baseline",), s, None if not s else base) for s in sets]


DESIGNS: dict[str, Design] = {d.name: d for d in (
    Design("ladder", ("rung", "trick added"), "Δ vs previous rung", _ladder, slide_column=True),
    Design("leave_one_out", ("configuration",), "Δ = all − without", _leave_one_out, reference_minus_row=True),
    Design("one_at_a_time", ("configuration",), "Δ vs baseline", _one_at_a_time),
    Design("factorial", ("configuration",), "Δ vs baseline", _factorial),
)}
SINGLE = "single"  # ablation.design of a hand-made run or sweep (`-m trick=...`): inferred by infer_design


def _each_vs_baseline(order: list[str], fraction: None = None, sets: tuple = ()) -> list[RowSpec]:
    """The trick sets swept, the baseline first, each against the baseline."""
    sets = sorted(sets, key=lambda s: (len(s), [_position(order, t) for t in s]))
    base = 0 if sets and sets[0] == () else None
    return [RowSpec(("+ " + " + ".join(s),) if s else ("baseline",), s, None if not s else base) for s in sets]


EACH_VS_BASELINE = Design("each_vs_baseline", ("configuration",), "Δ vs baseline", _each_vs_baseline)


def infer_design(sets: Any, order: Any = ()) -> tuple[Design, list[str], str]:
    """The design of a hand-made sweep, from the trick sets it trained: (design, its trick order, why). Nested
    sets adding one trick each: a ladder; the baseline and single tricks: one-at-a-time; a full set and sets
    missing one trick of it: leave-one-out; every subset of some tricks: a full factorial; anything else: every
    set against the baseline. Tricks outside a ladder's own order follow `order` (ablation.order)."""
    order = list(order)
    pos = functools.partial(_position, order)
    sets = sorted({tuple(sorted(s, key=pos)) for s in sets}, key=lambda s: (len(s), [pos(t) for t in s]))
    union = sorted({t for s in sets for t in s}, key=pos)
    if len(sets) > 1 and all(len(b) == len(a) + 1 and set(a) < set(b) for a, b in zip(sets, sets[1:])):
        added = [next(t for t in b if t not in a) for a, b in zip(sets, sets[1:])]
        return DESIGNS["ladder"], list(sets[0]) + added, "nested trick sets, each adding one trick"
    if all(len(s) <= 1 for s in sets) and len(sets) > 1:
        return DESIGNS["one_at_a_time"], [s[0] for s in sets if s], "the baseline and single tricks"
    full = sets[-1] if sets else ()
    if len(sets) > 1 and all(len(s) == len(full) - 1 and set(s) < set(full) for s in sets[:-1]):
        return DESIGNS["leave_one_out"], list(full), "a full set and sets missing one trick of it"
    if len(sets) == 2 ** len(union) > 2:
        return DESIGNS["factorial"], union, "every subset of the tricks"
    rows = functools.partial(_each_vs_baseline, sets=tuple(sets))
    return replace(EACH_VS_BASELINE, rows=rows), union, "trick sets of no standard design"


def design_sweep(design: str, order: Any, fraction: int | None = None) -> str:
    """The `design_sweep` resolver of conf/experiment/*.yaml."""
    return DESIGNS[design].sweep(order, fraction)


def ordered_tricks(chosen: Any, order: Any) -> list[str]:
    """The chosen tricks in ablation order (others after, by name): a trick set's one canonical spelling."""
    return sorted(chosen, key=functools.partial(_position, list(order)))


def _position(order: list[str], trick: str) -> tuple[int, str]:
    return (order.index(trick) if trick in order else len(order), trick)


def rung(tricks: list[str], order: Any) -> int | None:
    """The ladder rung of a trick set: n when it is the first n tricks of the order, else None."""
    order = list(order)
    return len(tricks) if tricks == order[:len(tricks)] else None
