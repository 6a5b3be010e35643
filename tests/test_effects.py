"""Factorial effects and Shapley values on constructed responses with known effects and interactions."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cifar_ablation.designs import DESIGNS
from cifar_ablation.effects import effects, shapley
from cifar_ablation.factorial import plan

def shapley_from_means(tricks: list[str], mean: dict[frozenset, float]) -> dict[str, float]:
    """The textbook definition, the oracle for effects.shapley: each trick's marginal gain averaged
    over all orders of adding the tricks (computed over subsets, with the usual |S|!(k-|S|-1)!/k! weights)."""
    k = len(tricks)
    out = {}
    for t in tricks:
        others = [o for o in tricks if o != t]
        total = 0.0
        for size in range(k):
            w = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for s in itertools.combinations(others, size):
                total += w * (mean[frozenset(s) | {t}] - mean[frozenset(s)])
        out[t] = total
    return out


TRICKS = ["a", "b", "c"]
# y = 50 + 3a + 1b - 2c + 0.5ab on ±1 codes: main effects 6, 2, -4 points, interaction a × b 1 point
TRUE = {"a": 6.0, "b": 2.0, "c": -4.0, "a × b": 1.0, "a × c": 0.0, "b × c": 0.0}
# Shapley values of that response: the additive parts give their main effects; the a × b term, +0.5 when a and b
# agree and -0.5 when not, adds nothing on average over the orders of adding a and b
SHAPLEY = {"a": 6.0, "b": 2.0, "c": -4.0}


def response(subset: tuple) -> float:
    x = {t: 1.0 if t in subset else -1.0 for t in TRICKS}
    return 50 + 3 * x["a"] + 1 * x["b"] - 2 * x["c"] + 0.5 * x["a"] * x["b"]


def samples(noise: float = 0.0, seeds: int = 3, rng_seed: int = 0) -> dict[tuple, list[float]]:
    rng = np.random.default_rng(rng_seed)
    return {tuple(s): [response(tuple(s)) + noise * rng.standard_normal() for _ in range(seeds)]
            for s in DESIGNS["factorial"].configs(TRICKS)}


def test_the_factorial_design_is_every_subset_baseline_first():
    sets = DESIGNS["factorial"].configs(TRICKS)
    assert len(sets) == 8 and sets[0] == [] and sorted(map(tuple, sets)) == sorted(
        s for n in range(4) for s in itertools.combinations(TRICKS, n))


@pytest.mark.parametrize("fraction", [None, 4])
def test_a_designs_order_is_ours_whatever_order_pydoe3_gives(monkeypatch, fraction):
    """The jobs and the tables' rows follow the plan's order: pyDOE3 1.0.3 listed a design's rows in the reverse
    of the order later releases give. Ours: baseline first, the last trick's level changing fastest."""
    import pyDOE3

    order = ["noise", "batchnorm", "dropout", "flip", "crop", "capacity"]
    ours = plan(order, fraction).configs
    if fraction is None:
        assert ours[:4] == [(), ("capacity",), ("crop",), ("crop", "capacity")] and len(ours) == 64
    for made_by in ("ff2n", "fracfact_by_res"):
        real = getattr(pyDOE3, made_by)
        monkeypatch.setattr(pyDOE3, made_by, lambda *a, real=real: real(*a)[::-1])  # the rows the other way round
    assert plan(order, fraction).configs == ours


def test_effects_are_recovered_exactly_without_noise():
    fit = effects(TRICKS, samples(noise=0.0))
    assert {e.term: e.effect for e in fit.effects} == pytest.approx(TRUE, abs=1e-9)
    assert fit.df_resid == 24 - 7


def test_with_noise_the_intervals_cover_the_true_effects_95_times_in_100():
    """200 noisy replications of the design (3 seeds, noise sd 0.5): each 95% interval holds the true value
    in about 95% of them, main effects, interactions and Shapley values alike."""
    hits, shapley_hits, n = {t: 0 for t in TRUE}, {t: 0 for t in TRICKS}, 200
    for r in range(n):
        data = samples(noise=0.5, rng_seed=r)
        for e in effects(TRICKS, data).effects:
            hits[e.term] += e.lo <= TRUE[e.term] <= e.hi
        sh = shapley(TRICKS, data)
        for t, want in SHAPLEY.items():
            shapley_hits[t] += sh.lo[t] <= want <= sh.hi[t]
    coverage = {k: v / n for k, v in {**hits, **{f"shapley {t}": v for t, v in shapley_hits.items()}}.items()}
    print("coverage of the 95% intervals:", coverage)
    assert all(0.90 <= c <= 0.99 for c in coverage.values()), coverage


def test_effects_verdicts_and_anova():
    fit = effects(TRICKS, samples(noise=0.5))
    verdicts = {e.term: e.verdict for e in fit.effects}
    assert (verdicts["a"], verdicts["b"], verdicts["c"]) == ("gain", "gain", "loss")
    assert "Residual" in fit.anova and fit.df_resid == 17


def test_shapley_efficiency_symmetry_and_null_trick():
    # v: a and b are symmetric and interact; c does nothing
    v = {s: 10.0 + 2 * ("a" in s) + 2 * ("b" in s) + 3 * ("a" in s and "b" in s)
         for n in range(4) for s in itertools.combinations(TRICKS, n)}
    for phi in (shapley(TRICKS, {s: [x, x] for s, x in v.items()}).value,   # the report's, and the definition's
                shapley_from_means(TRICKS, {frozenset(s): x for s, x in v.items()})):
        check_properties(phi, v)


def check_properties(phi: dict[str, float], v: dict[tuple, float]) -> None:
    assert sum(phi.values()) == pytest.approx(v[tuple(TRICKS)] - v[()])                # efficiency
    assert phi["a"] == pytest.approx(phi["b"]) == pytest.approx(2 + 1.5)               # symmetry, shared synergy
    assert phi["c"] == pytest.approx(0.0)                                              # null trick


def test_shapley_values_are_the_average_over_orders_and_add_up():
    data = samples(noise=0.5)
    sh = shapley(TRICKS, data)
    means = {frozenset(k): float(np.mean(v)) for k, v in data.items()}
    assert sh.value == pytest.approx(shapley_from_means(TRICKS, means))   # the weights are the definition
    assert sum(sh.value.values()) == pytest.approx(sh.total)
    assert sh.df == 24 - 8


EIGHT = ["noise", "batchnorm", "dropout", "l1l2", "flip", "crop", "instancenorm", "capacity"]


def test_a_resolution_iv_fraction_of_eight_tricks_names_its_aliases():
    p = plan(EIGHT, 4)
    assert len(p.configs) == 16 and () in p.configs and tuple(EIGHT) in p.configs
    assert len(p.generators) == 4 and p.generators[0] == "flip = noise × batchnorm × dropout"
    aliased = [c for c in p.chains if len(c) > 1]
    assert all(len(t) == 1 for c in p.chains if len(c) == 1 for t in c)    # every main effect stands alone
    assert len(aliased) == 7 and all(len(c) == 4 and all(len(t) == 2 for t in c) for c in aliased)
    assert sorted(t for c in aliased for t in c) == sorted(itertools.combinations(EIGHT, 2))  # all 28 pairs, once
    assert "resolution IV" in p.describe() and "noise × batchnorm = dropout × flip" in p.describe()


def test_a_resolution_iii_fraction_aliases_main_effects_with_interactions():
    p = plan(["a", "b", "c", "d"], 3)
    chain = next(c for c in p.chains if c[0] == ("a",))
    assert len(p.configs) == 8 and len(chain) > 1 and all(len(t) == 2 for t in chain[1:])


def test_main_effects_are_recovered_from_a_fraction():
    """y = 50 + 3·noise + 1·flip − 2·capacity on ±1 codes, no noise, on the 16-configuration fraction."""
    p = plan(EIGHT, 4)
    coef = {"noise": 3.0, "flip": 1.0, "capacity": -2.0}
    data = {s: [50 + sum(c * (1 if t in s else -1) for t, c in coef.items())] * 2 for s in p.configs}
    fit = effects(EIGHT, data, p.chains)
    got = {e.term: e.effect for e in fit.effects}
    assert {t: got[t] for t in EIGHT} == pytest.approx({t: 2 * coef.get(t, 0.0) for t in EIGHT}, abs=1e-9)
    assert all(abs(e.effect) < 1e-9 for e in fit.effects if "aliased" in e.term)
    assert fit.df_resid == 32 - 1 - 8 - 7
