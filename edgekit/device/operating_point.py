"""Choosing an early-exit operating point whose accuracy promise holds on data it never saw.

The promise is "at most ``max_drop`` below the full network, with confidence ``confidence``". On n
labelled validation samples, at one operating point, what matters is where the early answer and the full
network's answer disagree (a paired comparison: the errors both make cancel out):

- ``worse``: the answer is wrong where the full network is right,
- ``better``: the answer is right where the full network is wrong.

The accuracy drop is p(worse) - p(better), estimated by (worse - better) / n. Its one-sided upper bound is
the exact (Clopper-Pearson) upper bound on p(worse): the drop can never exceed p(worse), and the bound never
covers less than ``confidence``, however few disagreements there are. Crediting ``better`` would need a
second bound (a lower one on p(better)) and a split of the error rate between them; early exits almost never
fix the full network's mistakes (0 or 1 of a few hundred samples in the benchmarks), so that split would only
loosen the bound. A bootstrap is no alternative here: with 0, 1 or 2 disagreements among hundreds of samples
its resamples see nothing else, and it promises a drop of 0 with near certainty.

The promise on a finite test sample. A user checks the promise on a test set of M samples, and M samples
scatter around the population rate: with M = 360 one sample is 0.28 pp, and a point whose population drop
is safely under 1 pp still shows more than 1 pp on some test sets. Given ``test_samples`` M, the bound is
instead an exact prediction bound on what the test set will show: the largest K (early answers wrong where
the full network is right, among the M) that the validation count k does not rule out. Conditioned on the
total T = k + K over the n + M samples, which of them landed in validation is a random draw (any
exchangeable data, no population model), so k is hypergeometric (N = n + M, T, n draws); K is ruled out
when P(X <= k) <= 1 - ``confidence``. The bound is K / M, and the test set's drop exceeds it with
probability at most 1 - ``confidence`` (the test's right-where-the-full-network-is-wrong answers only lower
the drop). As M grows, K / M tends to the population bound above.

Many operating points are looked at, so the choice goes through fixed-sequence testing: points are tested in
an order fixed before the validation labels are seen (the single threshold from high to low; per-exit
thresholds along a path searched on other data), and the test stops at the first point whose bound exceeds
``max_drop``; the chosen point is the least work among those that passed. The chance that any passed point
breaks the promise is then at most 1 - ``confidence`` (no correction for the number of points is needed).
Each point's count is "worse so far": the largest count of the points tested before it and its own, so the
bounds never fall along the sequence (a lower threshold cannot be credited with fewer wrong early answers than
a safer one, which on nested thresholds it never truly has: a dip is sampling luck).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..errors import EdgekitError


def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """log P(Binomial(n, p) <= k)."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 0.0 if k >= n else -math.inf
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


@lru_cache(maxsize=4096)
def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """The exact one-sided (Clopper-Pearson) upper bound on a rate seen ``k`` times in ``n`` trials: the p
    with P(Binomial(n, p) <= k) = 1 - confidence."""
    if not 0.0 < confidence < 1.0:
        raise EdgekitError(f"the confidence must be between 0 and 1, got {confidence!r}")
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    target = math.log(1.0 - confidence)
    lo, hi = k / n, 1.0
    for _ in range(64):  # the CDF falls as p grows: bisect
        mid = 0.5 * (lo + hi)
        if _log_binom_cdf(k, n, mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


@lru_cache(maxsize=4096)
def prediction_bound(k: int, n: int, m: int, confidence: float = 0.95) -> float:
    """The exact one-sided prediction bound on a rate over ``m`` unseen samples, seen ``k`` times in ``n``:
    K / m for the largest count K on the unseen samples with P(X <= k) > 1 - confidence, X hypergeometric
    (the n + m samples hold k + K events; n of them drawn for validation)."""
    from scipy.stats import hypergeom  # scipy comes with scikit-learn

    if not 0.0 < confidence < 1.0:
        raise EdgekitError(f"the confidence must be between 0 and 1, got {confidence!r}")
    if m <= 0:
        raise EdgekitError(f"the number of test samples must be positive, got {m!r}")
    if n <= 0 or k >= n:
        return 1.0
    counts = np.arange(m + 1)
    # P(X <= k) falls as the total grows: the counts not ruled out are 0 .. K
    kept = hypergeom.cdf(k, n + m, k + counts, n) > 1.0 - confidence
    return float(counts[kept].max()) / m


def drop_bound(k: int, n: int, confidence: float = 0.95, test_samples: int | None = None) -> float:
    """The bound on the accuracy drop from ``k`` early answers wrong where the full network is right, of
    ``n``: on the population (``test_samples`` None), or on a test set of ``test_samples``."""
    if test_samples is None:
        return upper_bound(k, n, confidence)
    return prediction_bound(k, n, test_samples, confidence)


@lru_cache(maxsize=256)
def samples_needed(max_drop: float, confidence: float = 0.95, rate: float = 0.0,
                   test_samples: int | None = None) -> int | None:
    """The fewest validation samples for which the bound can be at most ``max_drop`` when the early
    answers are wrong where the full network is right at ``rate`` (0: never), on the population or on
    ``test_samples`` unseen ones. None: no sample size can."""
    if rate >= max_drop:
        return None

    def ok(n: int) -> bool:
        return drop_bound(int(math.ceil(rate * n - 1e-9)), n, confidence, test_samples) <= max_drop

    limit = 1 << 22 if test_samples is not None else 1 << 26
    hi = max(1, int(math.ceil(math.log(1.0 - confidence) / math.log1p(-max_drop))))
    if test_samples is not None and rate > 0.0:
        from scipy.stats import binom
        if binom.ppf(confidence, test_samples, rate) / test_samples > max_drop:
            return None  # the test set's own scatter is wider than the promise, however much validation data
    while not ok(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2 if hi > 1 else 0
    while hi - lo > 1:  # the bound is not quite monotone in n (whole counts): the first n found, close enough
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def paired_counts(answers: np.ndarray, full_answers: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """(worse, better): answers wrong where the full network is right, and right where it is wrong."""
    right, full_right = answers == labels, full_answers == labels
    return int(np.sum(~right & full_right)), int(np.sum(right & ~full_right))


def choose(points: list[dict], full: dict, samples: int, max_drop: float = 0.01, confidence: float = 0.95,
           test_samples: int | None = None) -> dict:
    """The operating point: the least work among the ``points`` (in their test order, most conservative
    first, each with ``worse``, ``better`` and ``work``) that pass the fixed-sequence test, else ``full``.
    The bound is on the population (``test_samples`` None) or on the drop a test set of ``test_samples``
    will show. Every point gets its ``drop`` estimate and ``drop_bound`` (from ``worse_so_far``); the
    returned point also says what the sample size supports (``promise``)."""
    if not 0.0 < max_drop < 1.0:
        raise EdgekitError(f"the accuracy drop to promise must be between 0 and 1, got {max_drop!r}")
    if test_samples is not None and (int(test_samples) != test_samples or test_samples <= 0):
        raise EdgekitError(f"the number of test samples must be a positive whole number, got {test_samples!r}")
    test_samples = None if test_samples is None else int(test_samples)
    if "worse" not in full:
        raise EdgekitError("choosing an operating point needs labels")
    n = samples
    passed, testing, so_far = [], True, 0
    for p in points:
        so_far = max(so_far, p["worse"])  # nested: never fewer wrong early answers than a safer point
        p["drop"] = (p["worse"] - p["better"]) / n
        p["worse_so_far"] = so_far
        p["drop_bound"] = drop_bound(so_far, n, confidence, test_samples)
        p["tested"] = testing
        if testing and p["drop_bound"] > max_drop:
            testing = False  # the sequence stops here: later points are not eligible
        p["passed"] = testing and p["tested"]
        if p["passed"]:
            passed.append(p)
    full.update(drop=0.0, drop_bound=0.0, passed=True, tested=True)
    cheaper = [p for p in passed if p["work"] < full["work"]]
    chosen = min(cheaper, key=lambda p: p["work"]) if cheaper else full
    minimum = samples_needed(max_drop, confidence, test_samples=test_samples)
    promise = {"max_drop": max_drop, "confidence": confidence, "samples": n, "minimum_samples": minimum,
               "supported": minimum is not None and n >= minimum, "exits_off": chosen is full,
               "test_samples": test_samples}
    if chosen is full:
        # what it would take: the most cautious point that does less work than the full network
        early = next((p for p in points if p["work"] < full["work"]), None)
        if early is not None:
            promise["needed_samples"] = samples_needed(max_drop, confidence, early["worse"] / n, test_samples)
            promise["needed_for"] = {k: early.get(k) for k in ("threshold", "worse", "better", "work_fraction")}
    chosen["promise"] = promise
    return chosen


def describe_promise(chosen: dict) -> list[str]:
    """The lines `edgekit thresholds` prints under the operating point."""
    pr = chosen["promise"]
    pct = f"{pr['max_drop'] * 100:g} pp"
    conf = f"{pr['confidence'] * 100:g} %"
    m = pr.get("test_samples")
    where = f" on {m:,} test samples" if m is not None else ""
    lines = []
    if pr["exits_off"]:
        if not pr["supported"]:
            lines.append(f"no promise: {pr['samples']} validation samples cannot support a drop of at most {pct}"
                         f"{where} at {conf} confidence; that needs at least {pr['minimum_samples']:,} samples even "
                         "if no early answer were wrong where the full network is right")
        else:
            lines.append(f"no operating point with early exits passes: none keeps the bound within {pct}{where} at "
                         f"{conf} confidence on these {pr['samples']} samples")
        needed = pr.get("needed_samples")
        if needed is not None and needed > pr["samples"]:
            p = pr["needed_for"]
            lines.append(f"  the most cautious early-exit point seen ({p['worse']} early answers wrong where the "
                         f"full network is right, {p['worse'] / pr['samples'] * 100:.2f} %) would need about "
                         f"{needed:,} validation samples at that rate")
        elif "needed_for" in pr and needed is None:
            lines.append("  the early answers are wrong where the full network is right too often for any "
                         "sample size" + (f" (the {m:,} test samples alone scatter more than {pct})" if m else ""))
        lines.append("  running the full network (exits off)")
        return lines
    kind = "exact one-sided bound" if m is None else "exact prediction bound for a test set of that size"
    lines.append(f"accuracy drop: estimate {chosen['drop'] * 100:+.2f} pp ({chosen['worse']} early answers wrong "
                 f"where the full network is right, {chosen['better']} right where it is wrong, of "
                 f"{pr['samples']}); at most {chosen['drop_bound'] * 100:.2f} pp{where} at {conf} confidence "
                 f"({kind}), within the {pct} asked")
    return lines
