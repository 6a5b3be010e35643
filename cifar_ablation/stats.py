"""The statistics every table uses, defined once: a sample's summary and a two-sample comparison with a verdict.

Seeds are the replicates: each configuration's final val accuracies are a sample. summary() gives n, mean, std
and the 95% t-interval of the mean; compare() gives the difference of two means with Welch's 95% interval
(scipy's ttest_ind(equal_var=False)), its p-value and a verdict: gain or loss when the interval excludes 0,
within noise when it does not, "n=1: no verdict" without two values a side (never a false gain), missing when
a side has no value.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as st

VERDICT_TEST = "Welch's t-test, 95% two-sided"
NAN = math.nan


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
        test = st.ttest_ind(a, b, equal_var=False)
        (lo, hi), p = test.confidence_interval(0.95), float(test.pvalue)
        lo, hi = float(lo), float(hi)
    return Comparison(delta, lo, hi, p, verdict(lo, hi))


def verdict(lo: float, hi: float) -> str:
    """gain or loss when the 95% interval of a difference excludes 0, else within noise."""
    return "gain" if lo > 0 else "loss" if hi < 0 else "within noise"
