"""Ablation designs: which trick sets a sweep trains, and how its table compares them. One record per design.

Every design is generated from the one trick order, `ablation.order`. A design's rows say, in table order, the
trick set of each row, its label, and the row it is compared with. The sweep (conf/experiment/<name>.yaml hands
Hydra `${design_sweep:<name>,${ablation.order}}`) and the report's table (report.py) both read these records,
so adding a design is one record here plus one YAML file.
"""
from __future__ import annotations

from dataclasses import dataclass
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
SINGLE = "single"  # ablation.design of a hand-made run or sweep (`-m trick=...`): no design


def design_sweep(design: str, order: Any, fraction: int | None = None) -> str:
    """The `design_sweep` resolver of conf/experiment/*.yaml."""
    return DESIGNS[design].sweep(order, fraction)


def ordered_tricks(chosen: Any, order: Any) -> list[str]:
    """The chosen tricks in ablation order (others after, by name): a trick set's one canonical spelling."""
    order = list(order)
    return sorted(chosen, key=lambda t: (order.index(t) if t in order else len(order), t))


def rung(tricks: list[str], order: Any) -> int | None:
    """The ladder rung of a trick set: n when it is the first n tricks of the order, else None."""
    order = list(order)
    return len(tricks) if tricks == order[:len(tricks)] else None
