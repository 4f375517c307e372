"""Temperature calibration of Bradley-Terry preference probabilities, numpy only.

A reward model says ``P(a preferred over b) = sigmoid((r_a - r_b) / T)``. Training fixes the
scale of the rewards only loosely (early stopping, a best checkpoint, a small head), so the
trainer fits one temperature ``T > 0`` on held-out pairs after training (:func:`calibrate`: the
log loss minimised, with Platt's smoothed targets so a perfectly ranked set stays finite), the
manifest stores it (:class:`~plaudit.services.common.registry.Calibration`) and the reward service
divides the raw reward difference by it in ``Compare``. Dividing by ``T`` never reorders a pair:
accuracy is unchanged, only how confident the probabilities are.

Invariants: ``T = 1`` reproduces ``sigmoid(r_a - r_b)``; ECE lies in ``[0, 1]``; every function
is deterministic (no random state, no iteration-order dependence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from plaudit.services.common.registry import Calibration, ModelManifest, ReliabilityBin

ECE_BINS = 10
MIN_PAIRS = 20  # fewer held-out pairs than this: keep T = 1 (one parameter, but n too small)
T_MIN = 0.01  # the search interval; a separable held-out set drives T to T_MIN
T_MAX = 100.0
_MAX_ITER = 200
_TOL = 1e-12


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """Stable logistic function (as ``0.5 * (1 + tanh(x / 2))``)."""
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64))))


def _margins(margins: np.ndarray | list[float]) -> np.ndarray:
    m = np.asarray(margins, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(m)):
        raise ValueError("reward margins must be finite")
    return m


def negative_log_likelihood(margins: np.ndarray | list[float], temperature: float = 1.0) -> float:
    """Mean ``-log sigmoid(m / T)`` over the pairs' margins ``m = r_chosen - r_rejected``."""
    m = _margins(margins)
    if not m.size:
        return float("nan")
    return float(np.mean(np.logaddexp(0.0, -m / temperature)))


def fit_temperature(
    margins: np.ndarray | list[float],
    t_min: float = T_MIN,
    t_max: float = T_MAX,
    *,
    smoothing: bool = True,
) -> float:
    """The ``T`` in ``[t_min, t_max]`` minimising the log loss of ``sigmoid(m / T)``.

    With ``smoothing`` (the default) the target of each pair is Platt's (1999) ``(n + 1) /
    (n + 2)`` rather than 1, the posterior mean of a uniform prior: a held-out set that ranks
    every pair right then gets a finite temperature (probabilities up to about that target)
    instead of ``T -> 0``, which would serve 0 and 1; without it, the plain maximum likelihood.
    The loss is convex in ``s = 1 / T`` (a one-feature logistic regression without intercept),
    so its derivative ``g(s) = mean(m * (sigmoid(s m) - target))`` increases with ``s``:
    safeguarded Newton inside a bisection bracket finds its root, or the bound it would cross.
    No pairs, or all margins zero: 1. A model that ranks more pairs wrong than right has its
    optimum at ``t_max`` (a negative T would flip the rankings).
    """
    m = _margins(margins)
    if not m.size or not np.any(m):
        return 1.0
    target = (m.size + 1) / (m.size + 2) if smoothing else 1.0

    def grad(s: float) -> float:
        return float(np.mean(m * (sigmoid(s * m) - target)))

    def hess(s: float) -> float:
        p = sigmoid(s * m)
        return float(np.mean(m * m * p * (1.0 - p)))

    lo, hi = 1.0 / t_max, 1.0 / t_min
    if grad(lo) >= 0:
        return t_max
    if grad(hi) <= 0:
        return t_min
    s = min(max(1.0, lo), hi)
    for _ in range(_MAX_ITER):
        g = grad(s)
        if g == 0:
            break
        if g > 0:
            hi = s
        else:
            lo = s
        h = hess(s)
        step = s - g / h if h > 0 else math.nan
        s_next = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(s_next - s) <= _TOL * max(1.0, s):
            s = s_next
            break
        s = s_next
    return 1.0 / s


@dataclass(frozen=True)
class Reliability:
    """A reliability table and its ECE, from :func:`reliability`."""

    bins: list[ReliabilityBin]
    ece: float


def reliability(
    margins: np.ndarray | list[float], temperature: float = 1.0, bins: int = ECE_BINS
) -> Reliability:
    """Reliability table and expected calibration error of ``sigmoid(m / T)``.

    Symmetric: each pair counts in both orders, (chosen, rejected) with outcome 1 at ``p`` and
    (rejected, chosen) with outcome 0 at ``1 - p``, so which completion is "first" does not
    matter and the table is mirror-symmetric about 0.5. ``bins`` equal-width bins on [0, 1]
    (``p = 1`` falls in the last); ECE is ``sum_b n_b / N * |observed_b - mean_predicted_b|``
    (Guo et al. 2017), in [0, 1]. Bins without items are left out of the table.
    """
    m = _margins(margins)
    if not m.size:
        return Reliability([], float("nan"))
    p = sigmoid(m / temperature)
    probs = np.concatenate([p, 1.0 - p])
    outcomes = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    index = np.minimum((probs * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, probs, bins)
    observed = np.bincount(index, outcomes, bins)
    ece = float(np.abs(observed - predicted).sum() / probs.size)
    table = [
        ReliabilityBin(
            center=(b + 0.5) / bins,
            count=int(counts[b]),
            mean_predicted=float(predicted[b] / counts[b]),
            observed=float(observed[b] / counts[b]),
        )
        for b in range(bins)
        if counts[b]
    ]
    return Reliability(table, min(max(ece, 0.0), 1.0))


def expected_calibration_error(
    margins: np.ndarray | list[float], temperature: float = 1.0, bins: int = ECE_BINS
) -> float:
    """ECE of ``sigmoid(m / T)`` as :func:`reliability` computes it (NaN for no pairs)."""
    return reliability(margins, temperature, bins).ece


def calibrate(
    chosen: np.ndarray,
    rejected: np.ndarray,
    *,
    min_pairs: int = MIN_PAIRS,
    bins: int = ECE_BINS,
    smoothing: bool = True,
) -> Calibration:
    """Fit the temperature on held-out rewards (:func:`fit_temperature`) and describe it
    before and after: accuracy, ECE, log loss (unsmoothed) and the reliability tables.

    With fewer than ``min_pairs`` pairs the temperature stays 1 (``fitted`` False, ``note``
    says why); the figures before and after are then the same.
    """
    m = _margins(np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64))
    n = int(m.size)
    fitted = n >= min_pairs and bool(np.any(m))
    temperature = fit_temperature(m, smoothing=smoothing) if fitted else 1.0
    if fitted:
        note = f"temperature fitted on {n} held-out pairs"
        if temperature in (T_MIN, T_MAX):
            note += f" (at the bound of [{T_MIN:g}, {T_MAX:g}])"
    elif n < min_pairs:
        note = f"only {n} held-out pairs (fewer than {min_pairs}): temperature kept at 1"
    else:
        note = "every held-out margin is 0: temperature kept at 1"
    before = reliability(m, 1.0, bins)
    after = reliability(m, temperature, bins)
    accuracy = float(np.mean((m > 0) + 0.5 * (m == 0))) if n else None
    return Calibration(
        temperature=temperature,
        fitted=fitted,
        smoothing=smoothing,
        pairs=n,
        accuracy=accuracy,
        ece_before=_finite(before.ece),
        ece_after=_finite(after.ece),
        nll_before=_finite(negative_log_likelihood(m, 1.0)),
        nll_after=_finite(negative_log_likelihood(m, temperature)),
        bins=bins,
        reliability_before=before.bins,
        reliability_after=after.bins,
        note=note,
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class HeldOutFigures:
    """A version's held-out accuracy and calibrated ECE, and how many pairs they rest on."""

    accuracy: float | None
    ece: float | None
    pairs: int


def heldout_figures(manifest: ModelManifest) -> HeldOutFigures:
    """What GetModel and the metrics report for ``manifest``: its calibration's figures (the
    served graph at its temperature); for a version without calibration the trainer's held-out
    ``eval/accuracy`` and ``eval/calibration_error`` (ECE at T = 1, which is then how it serves);
    None where neither recorded the figure."""
    c = manifest.calibration
    if c is not None and c.pairs:
        return HeldOutFigures(c.accuracy, c.ece_after, c.pairs)
    metrics = manifest.metrics
    return HeldOutFigures(
        metrics.get("eval/accuracy"),
        metrics.get("eval/calibration_error"),
        int(metrics.get("eval/pairs", 0)),
    )


def calibration_metrics(c: Calibration) -> dict[str, float]:
    """The run's and the manifest's metrics for a calibration (finite figures only)."""
    figures = {
        "calibration/temperature": c.temperature,
        "calibration/fitted": float(c.fitted),
        "calibration/pairs": float(c.pairs),
        "eval/ece": c.ece_after,
        "eval/ece_uncalibrated": c.ece_before,
        "eval/nll_calibrated": c.nll_after,
        "eval/nll_uncalibrated": c.nll_before,
    }
    return {k: float(v) for k, v in figures.items() if v is not None and math.isfinite(v)}
