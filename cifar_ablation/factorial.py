"""Two-level factorial designs over the tricks: the full 2^k, or a regular fraction 2^(k−p) of a chosen
resolution (pyDOE3's fracfact_by_res, with its standard generators), and what a fraction confounds.

A plan holds the ±1 design matrix (one row per configuration, +1 = the trick is on), the generators of a
fraction ("crop = noise × batchnorm × dropout"), and the alias chains among the terms a report estimates (main
effects and two-trick interactions, from pyDOE3's fracfact_aliasing): in a resolution-IV fraction every main
effect stands alone and the two-trick interactions come in chains that only their sum can be estimated of.
"""
from __future__ import annotations

import itertools
import math
import string
from dataclasses import dataclass

import numpy as np

from .checks import ConfigError

MAX_FULL = 6        # tricks in a full factorial: 2**6 = 64 configurations per seed
MAX_FRACTION = 16   # tricks in a fraction (pyDOE3 names factors by letter; 16 stays far below its limits)
RESOLUTIONS = (3, 4, 5)
ROMAN = {3: "III", 4: "IV", 5: "V"}


def check_factorial(order: list[str], fraction: int | None) -> None:
    """A factorial within reach: at most MAX_FULL tricks in full, MAX_FRACTION in a fraction that pyDOE3 can
    build. Checked by config.validate and by the sweep's callback, so Hydra does not compose 2**k jobs first."""
    if fraction is None and len(order) > MAX_FULL:
        raise ConfigError("ablation.order", order, f"at most {MAX_FULL} tricks for the full factorial (2**k "
                          "configurations per seed), e.g. 'ablation.order=[batchnorm,dropout,flip]'; or a "
                          "fraction: ablation.fraction=4")
    if fraction is not None:
        if len(order) > MAX_FRACTION:
            raise ConfigError("ablation.order", order, f"at most {MAX_FRACTION} tricks for a fraction")
        try:
            plan(order, fraction)
        except ValueError as e:
            raise ConfigError("ablation.fraction", fraction, f"a resolution that {len(order)} tricks allow as a "
                              f"regular fraction (pyDOE3: {e}); or null for the full factorial") from e


@dataclass(frozen=True)
class Plan:
    tricks: list[str]
    matrix: np.ndarray              # configurations x tricks, ±1
    resolution: int | None          # None: the full factorial
    generators: list[str]           # how each added trick's level is made from the base tricks' levels
    chains: list[list[tuple[str, ...]]]   # aliased terms of order 1 and 2, each chain's first term estimated

    @property
    def configs(self) -> list[tuple[str, ...]]:
        return [tuple(t for t, level in zip(self.tricks, row) if level > 0) for row in self.matrix]

    def describe(self) -> str:
        p = len(self.tricks) - int(math.log2(len(self.matrix)))
        kind = "full factorial" if self.resolution is None else \
            f"regular fraction 2^({len(self.tricks)}-{p}) of resolution {ROMAN[self.resolution]}"
        lines = [f"{kind} over {len(self.tricks)} tricks: {len(self.matrix)} configurations per seed"]
        lines += [f"  generator: {g}" for g in self.generators]
        aliased = [c for c in self.chains if len(c) > 1]
        lines += ["  aliased (only their sum is estimable): " + " = ".join(term_name(t) for t in c) for c in aliased]
        if not aliased:
            lines.append("  no main effect or two-trick interaction is aliased with another")
        return "\n".join(lines)


def term_name(term: tuple[str, ...]) -> str:
    return " × ".join(term)


def plan(order: list[str], resolution: int | None = None) -> Plan:
    """The full factorial over `order`, or its regular fraction of `resolution` (ValueError where none exists)."""
    from pyDOE3 import ff2n, fracfact_aliasing, fracfact_by_res  # numpy and scipy: only for a factorial

    k = len(order)
    matrix = ff2n(k) if resolution is None else fracfact_by_res(k, resolution)
    # one row order whatever pyDOE3's release (1.0.3 lists the rows the other way round): the lowest levels first,
    # so the baseline leads, and the last trick's level changes fastest. The jobs run, and the tables list them, so.
    matrix = matrix[np.lexsort(matrix.T[::-1])]
    letters = dict(zip(string.ascii_lowercase, order))
    words = [[tuple(letters[c] for c in word) for word in chain.split(" = ")]
             for chain in fracfact_aliasing(matrix)[0]]
    low = [[w for w in chain if len(w) <= 2] for chain in words]
    chains = sorted((c for c in low if c), key=lambda c: (len(c[0]), [order.index(t) for t in c[0]]))
    return Plan(list(order), matrix, resolution, _generators(matrix, order), chains)


def _generators(matrix: np.ndarray, order: list[str]) -> list[str]:
    """Each trick whose column is the product of base tricks' columns: 'crop = noise × batchnorm × dropout'."""
    base = int(math.log2(len(matrix)))
    out = []
    for j in range(base, matrix.shape[1]):
        for size in range(2, base + 1):
            for combo in itertools.combinations(range(base), size):
                product = np.prod(matrix[:, combo], axis=1)
                if np.array_equal(product, matrix[:, j]) or np.array_equal(-product, matrix[:, j]):
                    sign = "" if np.array_equal(product, matrix[:, j]) else "−"
                    out.append(f"{order[j]} = {sign}{term_name(tuple(order[i] for i in combo))}")
                    break
            else:
                continue
            break
    return out
