"""The statistics every table uses, defined once: a sample's summary and a two-sample comparison with a verdict.

Seeds are the replicates: each configuration's final val accuracies are a sample. summary() gives n, mean, std
and the 95% t-interval of the mean; compare() gives the difference of two means with Welch's 95% interval
(scipy's ttest_ind(equal_var=False)), its p-value and a verdict: gain or loss when the interval excludes 0,
within noise when it does not, "n=1: no verdict" without two values a side (never a false gain), missing when
a side has no value.

A table makes several comparisons at once (a ladder's 8 steps): holm() adjusts their p-values for that (Holm's
step-down, statsmodels), so that a reader can tell a gain from one of the chance results k tests at 5% make.
seeds_to_resolve() is a planning number for a comparison within noise: how many seeds a side would resolve its
measured difference at 80% power, at its seeds' spreads (the power of the verdict's own test, Welch's).
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass

from scipy import stats as st

VERDICT_TEST = "Welch's t-test, 95% two-sided"
NAN = math.nan
ALPHA, POWER, MAX_SEEDS = 0.05, 0.8, 100


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float     # n - 1 in the denominator; nan where n < 2
    lo: float      # the 95% t-interval of the mean; nan where n < 2
    hi: float


@dataclass(frozen=True)
class Comparison:
    delta: float   # mean(a) - mean(b)
    lo: float      # Welch's 95% interval of the difference
    hi: float
    p: float
    verdict: str   # gain | loss | within noise | n=1: no verdict | missing


def summary(xs: list[float]) -> Summary:
    n = len(xs)
    if n == 0:
        return Summary(0, NAN, NAN, NAN, NAN)
    mean = statistics.fmean(xs)
    if n < 2:
        return Summary(1, mean, NAN, NAN, NAN)
    sd = statistics.stdev(xs)
    half = st.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def compare(a: list[float], b: list[float]) -> Comparison:
    """mean(a) - mean(b), Welch's 95% CI and p-value, and the verdict."""
    if not a or not b:
        return Comparison(NAN, NAN, NAN, NAN, "missing")
    delta = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison(delta, NAN, NAN, NAN, "n=1: no verdict")
    if statistics.variance(a) == statistics.variance(b) == 0:  # no spread at all: the difference is exact
        lo, hi, p = delta, delta, (0.0 if delta else 1.0)
    else:
        with warnings.catch_warnings():  # one side's seeds all equal (a 2-seed run that agrees to the image):
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)  # exact, not imprecise
            test = st.ttest_ind(a, b, equal_var=False)
        (lo, hi), p = test.confidence_interval(0.95), float(test.pvalue)
        lo, hi = float(lo), float(hi)
    return Comparison(delta, lo, hi, p, verdict(lo, hi))


def verdict(lo: float, hi: float) -> str:
    """gain or loss when the 95% interval of a difference excludes 0, else within noise."""
    return "gain" if lo > 0 else "loss" if hi < 0 else "within noise"


def holm(ps: list[float]) -> list[float]:
    """Holm's adjustment of a family of p-values (nan where a comparison has none, and left out of the family)."""
    from statsmodels.stats.multitest import multipletests

    family = [i for i, p in enumerate(ps) if not math.isnan(p)]
    out = [NAN] * len(ps)
    if family:
        for i, q in zip(family, multipletests([ps[i] for i in family], alpha=ALPHA, method="holm")[1]):
            out[i] = float(q)
    return out


def welch_power(delta: float, var_a: float, var_b: float, n: int) -> float:
    """The probability that Welch's two-sided test at ALPHA finds a true difference `delta` between two samples of
    n values each, of variances var_a and var_b: the noncentral t at the Welch-Satterthwaite degrees of freedom
    (statsmodels' ttest_power, given those df and delta / sqrt(var_a + var_b) as its effect size)."""
    from statsmodels.stats.power import ttest_power

    df = (var_a + var_b) ** 2 / ((var_a ** 2 + var_b ** 2) / (n - 1))
    d = abs(delta) / math.sqrt(var_a + var_b)
    upper, lower = (float(ttest_power(d, n, ALPHA / 2, df=df, alternative=side)) for side in ("larger", "smaller"))
    return upper + (0.0 if math.isnan(lower) else lower)  # the far tail: nan where scipy's nct underflows (~0)


def seeds_to_resolve(a: list[float], b: list[float]) -> int | None:
    """The fewest seeds a side (2..MAX_SEEDS) with which the verdict's test (Welch's, at ALPHA) would find the
    difference of the means of a and b with probability POWER, were that difference and their spreads the truth;
    None past MAX_SEEDS, or without two values a side. A difference the test missed at its n gets more than n."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a), statistics.variance(b)
    delta = abs(statistics.fmean(a) - statistics.fmean(b))
    if va == vb == 0:
        return 2 if delta else None
    return next((n for n in range(2, MAX_SEEDS + 1) if welch_power(delta, va, vb, n) >= POWER), None)
