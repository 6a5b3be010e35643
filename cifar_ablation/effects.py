"""What each trick bought independently of order: factorial effects and Shapley values, with their uncertainty.

From the runs of a two-level factorial design over k tricks (every subset; seeds replicate each):
  effects()   an OLS fit (statsmodels) of each seed's final val accuracy on the ±1-coded tricks and their
              two-trick interactions: a main effect is the average gain, in points, of turning a trick on over
              all settings of the others (2 × its coefficient), an interaction how much one trick's effect
              changes with another's; each with its 95% CI, p-value and verdict; the residual degrees of freedom
              and the ANOVA table;
  shapley()   each trick's Shapley value of the final accuracy, exact from the subset means (its marginal gain
              averaged over every order of adding the tricks), with a 95% t-interval; the values add up to
              all-tricks minus baseline.
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

from scipy import stats as st

from .stats import NAN


@dataclass(frozen=True)
class Effect:
    term: str          # "noise", or "noise:flip" for an interaction
    effect: float      # points of val accuracy
    lo: float
    hi: float
    p: float
    verdict: str


@dataclass(frozen=True)
class Fit:
    effects: list[Effect]
    df_resid: float
    anova: str          # the ANOVA table, as statsmodels prints it


def _verdict(lo: float, hi: float) -> str:
    return "no verdict (no residual df)" if math.isnan(lo) else "gain" if lo > 0 else "loss" if hi < 0 \
        else "within noise"


def effects(tricks: list[str], samples: dict[tuple, list[float]]) -> Fit:
    """samples: each trick subset (a tuple of trick names) -> its seeds' final val accuracies (%)."""
    import pandas as pd  # statsmodels' formula interface takes a DataFrame
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    rows = [{**{t: (1.0 if t in subset else -1.0) for t in tricks}, "y": y}
            for subset, ys in samples.items() for y in ys]
    formula = "y ~ " + (f"({' + '.join(tricks)})**2" if len(tricks) > 1 else tricks[0])
    model = smf.ols(formula, data=pd.DataFrame(rows)).fit()
    ci = model.conf_int(0.05)
    out = []
    for term in model.params.index.drop("Intercept"):
        lo, hi = (2 * ci.loc[term, 0], 2 * ci.loc[term, 1]) if model.df_resid > 0 else (NAN, NAN)
        out.append(Effect(term, 2 * model.params[term], lo, hi, float(model.pvalues[term]), _verdict(lo, hi)))
    anova = sm.stats.anova_lm(model, typ=2).to_string() if model.df_resid > 0 else "(no residual degrees of freedom)"
    return Fit(out, float(model.df_resid), anova)


def shapley_from_means(tricks: list[str], mean: dict[frozenset, float]) -> dict[str, float]:
    """Exact Shapley values of the game v(S) = mean accuracy of subset S: each trick's marginal gain averaged
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


@dataclass(frozen=True)
class Shapley:
    value: dict[str, float]
    lo: dict[str, float]
    hi: dict[str, float]
    total: float         # all tricks − baseline: what the values add up to
    df: float            # degrees of freedom of the intervals (seeds beyond one per subset)


def shapley_weights(tricks: list[str], t: str) -> dict[frozenset, float]:
    """A Shapley value is a fixed linear combination of the subset means: these are its coefficients."""
    k, c = len(tricks), {}
    for size in range(k + 1):
        for s in map(frozenset, itertools.combinations(tricks, size)):
            n = len(s) - 1 if t in s else len(s)   # the size of the coalition t joins (or does not)
            w = math.factorial(n) * math.factorial(k - n - 1) / math.factorial(k)
            c[s] = w if t in s else -w
    return c


def shapley(tricks: list[str], samples: dict[tuple, list[float]]) -> Shapley:
    """Shapley values from the subset means, each with a 95% t-interval: a Shapley value is a linear combination
    Σ c_S·mean_S, so its standard error is s·sqrt(Σ c_S²/n_S) with s the seeds' pooled standard deviation (as in
    the OLS fit). Resampling 2–3 seeds would understate the spread (a bootstrap of n values has (n−1)/n of
    their variance and no t tail), so the interval is computed, not resampled."""
    keys = {frozenset(s): ys for s, ys in samples.items()}
    mean = {s: statistics.fmean(ys) for s, ys in keys.items()}
    df = sum(len(ys) for ys in keys.values()) - len(keys)
    pooled = math.sqrt(sum((y - mean[s]) ** 2 for s, ys in keys.items() for y in ys) / df) if df > 0 else NAN
    half = st.t.ppf(0.975, df) if df > 0 else NAN
    value, lo, hi = {}, {}, {}
    for t in tricks:
        c = shapley_weights(tricks, t)
        value[t] = sum(c[s] * mean[s] for s in keys)
        se = pooled * math.sqrt(sum(c[s] ** 2 / len(ys) for s, ys in keys.items()))
        lo[t], hi[t] = value[t] - half * se, value[t] + half * se
    return Shapley(value, lo, hi, mean[frozenset(tricks)] - mean[frozenset()], df)


def factorial_section(t) -> str:
    """The factorial table's second half (tables.Table of design factorial): effects, ANOVA, Shapley values."""
    from .tables import fmt

    tricks = list(t.order)
    subsets = [tuple(s) for s in t.design.configs(tricks)]
    if any(len(t.groups.get(s, [])) > 1 for s in subsets):
        return "\nFactorial analysis skipped: some subsets were run in several configurations (see the rows).\n"
    samples = {s: t.groups[s][0].val for s in subsets if s in t.groups}
    if len(samples) < len(subsets):
        return "\nFactorial analysis skipped: it needs a finished run of every subset (see Missing).\n"
    fit, sh = effects(tricks, samples), shapley(tricks, samples)
    lines = ["", f"### Effects (OLS on ±1-coded tricks with two-trick interactions; residual df {fit.df_resid:g})", "",
             "| term | effect, points [95% CI] | p | verdict |", "|---|---|---|---|"]
    lines += [f"| {e.term.replace(':', ' × ')} | {fmt(e.effect, plus=True)} [{fmt(e.lo, plus=True)}, "
              f"{fmt(e.hi, plus=True)}] | {fmt(e.p, '.3g')} | {e.verdict} |" for e in fit.effects]
    lines += ["", "A main effect is the average gain of turning the trick on, over all settings of the others; an "
              "interaction a × b is half the difference between a's effect with b on and with b off (both are "
              "2 × the OLS coefficient).", "",
              "```", fit.anova, "```", "",
              f"### Shapley values (exact from the subset means; 95% t-interval, pooled over seeds, df {sh.df:g})", "",
              "| trick | Shapley value, points [95% CI] | verdict |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v, plus=True)} [{fmt(sh.lo[k], plus=True)}, {fmt(sh.hi[k], plus=True)}] | "
              f"{_verdict(sh.lo[k], sh.hi[k])} |" for k, v in sh.value.items()]
    check = sum(sh.value.values())
    lines += ["", f"The Shapley values add up to {fmt(check, plus=True)}, all tricks − baseline = "
              f"{fmt(sh.total, plus=True)}{'' if abs(check - sh.total) < 1e-9 else ' (MISMATCH)'}."]
    return "\n".join(lines) + "\n"
