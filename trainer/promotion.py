"""The promotion gates, one decision function per kind of model, on literal numbers.

* Reward model (:func:`gate_decision`): it must beat the promoted one on the same held-out pairs,
  both scored by the ONNX graphs they are (or would be) served with, and its held-out accuracy
  must be significantly above chance. The record shows both models' expected calibration error
  at their own temperatures (the candidate's fitted on these pairs) beside the accuracies.
* Policy (:func:`policy_gate_decision`): on the same held-out prompts, judged by the live reward
  model, it must beat the live policy in plain and in length-controlled win rate, and stay within
  a KL bound of the policy it started from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from plaudit.services.common.calibration import expected_calibration_error
from plaudit.services.common.registry import ModelRegistry
from plaudit.trainer.objective import preference_accuracy
from plaudit.trainer.policy_config import (
    DEFAULT_MAX_KL,
    DEFAULT_MIN_LC_WIN_RATE,
    DEFAULT_MIN_WIN_RATE,
)

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.0
DEFAULT_SIGNIFICANCE = 0.05
_EPS = 1e-12  # accuracies are ratios of counts: compare them without float noise


def exact_binomial_p_value(successes: int, trials: int) -> float:
    """One-sided p-value ``P(X >= successes)`` for ``X ~ Binomial(trials, 1/2)``, exactly:
    integer binomial coefficients, one division at the end (1.0 for no trials)."""
    if trials <= 0:
        return 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    return float(sum(math.comb(trials, i) for i in range(successes, trials + 1)) / 2**trials)


def binomial_p_value(successes: int, trials: int) -> float:
    """:func:`exact_binomial_p_value`, by scipy's ``binomtest`` when scipy is installed: how
    likely a coin-flipping model is to get at least this many pairs right."""
    try:
        from scipy.stats import binomtest
    except ImportError:
        return exact_binomial_p_value(successes, trials)
    if trials <= 0:
        return 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    return float(binomtest(successes, trials, 0.5, alternative="greater").pvalue)


def gate_decision(
    *,
    candidate_accuracy: float,
    correct: int,
    n: int,
    live_version: str | None,
    live_accuracy: float | None,
    tolerance: float = DEFAULT_TOLERANCE,
    significance: float = DEFAULT_SIGNIFICANCE,
    live_error: str = "",
    candidate_ece: float | None = None,
    live_ece: float | None = None,
    max_ece: float | None = None,
) -> dict[str, Any]:
    """The decision on literal numbers; ``correct`` of ``n`` held-out pairs ranked right by the
    candidate (a tie counts as wrong here, so the test never overstates the evidence).
    ``candidate_ece`` / ``live_ece``: expected calibration error of each model's calibrated
    probabilities on the same pairs, shown side by side; they decide only with ``max_ece``.

    Promoted iff all hold:
    - it beats the live model: ``candidate_accuracy > live_accuracy - tolerance`` (tolerance 0:
      strictly better; a tie is refused, the candidate brings no evidence it is better), or
      nothing is live;
    - it clears the floor: one-sided binomial ``p <= significance`` against accuracy 0.5;
    - with ``max_ece``: its calibrated ECE was measured and is at most ``max_ece`` (a model whose
      probabilities cannot be trusted is refused however well it ranks).
    ``live_version`` set with ``live_accuracy`` None means the live model could not be scored:
    refused (a person should look).
    """
    p_value = binomial_p_value(correct, n)
    above_chance = n > 0 and p_value <= significance
    cand = f"{candidate_accuracy:.3f}"
    if live_version is None:
        beats: bool | None = True
        versus = f"candidate {cand}, nothing live, on {n} held-out pairs"
    elif live_accuracy is None:
        beats = None
        versus = f"candidate {cand} vs live {live_version} (could not be scored), n={n}"
    else:
        beats = candidate_accuracy - live_accuracy + tolerance > _EPS
        versus = f"candidate {cand} vs live {live_accuracy:.3f} on the same {n} held-out pairs"
    if candidate_ece is not None:
        shown = "n/a" if live_ece is None or live_version is None else f"{live_ece:.3f}"
        versus += f" (calibrated ECE {candidate_ece:.3f}" + (
            f" vs {shown})" if live_version is not None else ")"
        )
    chance = f"p={p_value:.3g} against chance (level {significance:g})"
    why = []
    if beats is False:
        loses = f" (loses {tolerance:g} or more)" if tolerance else ""
        why.append(f"does not beat live {live_version}{loses}")
    if beats is None:
        why.append(
            f"live {live_version} could not be scored" + (f": {live_error}" * bool(live_error))
        )
    if not above_chance:
        why.append("not significantly above chance")
    if max_ece is not None:
        if candidate_ece is None:
            why.append("its calibration error could not be measured")
        elif candidate_ece - max_ece > _EPS:
            why.append(f"calibrated ECE {candidate_ece:.3f} is above the limit {max_ece:g}")
    promoted = not why
    reason = f"{versus}; {chance}: " + ("promoted" if promoted else "refused, " + "; ".join(why))
    return {
        "promoted": promoted,
        "candidate_accuracy": candidate_accuracy,
        "candidate_correct": correct,
        "current_version": live_version,
        "current_accuracy": live_accuracy,
        "candidate_ece": candidate_ece,
        "current_ece": live_ece,
        "max_ece": max_ece,
        "eval_pairs": n,
        "beats_live": beats,
        "p_value": p_value,
        "above_chance": above_chance,
        "significance": significance,
        "tolerance": tolerance,
        "reason": reason,
    }


@dataclass
class AccuracyGate:
    """Promote when the candidate beats the promoted version on the same held-out pairs (losing
    less than ``tolerance`` is allowed; default 0: it must be strictly better) and its held-out
    accuracy is significantly above 0.5 (one-sided binomial test at ``significance``), and, with
    ``max_ece``, its calibrated expected calibration error is at most that.

    Without a promoted version only the floor applies; when the promoted version cannot be
    loaded or scored the candidate is not promoted (a person should look). Called by
    :func:`plaudit.trainer.export.export_reward` with the candidate's rewards, before publishing,
    so the record (see :func:`gate_decision`) lands in the new version's manifest.
    """

    registry: ModelRegistry
    tolerance: float = DEFAULT_TOLERANCE
    significance: float = DEFAULT_SIGNIFICANCE
    max_ece: float | None = None

    def __call__(
        self, texts: list[tuple[str, str]], candidate: np.ndarray, *, temperature: float = 1.0
    ) -> dict[str, Any]:
        """The record for ``candidate``'s rewards on ``texts``; ``temperature`` is its fitted
        calibration (the live version's comes from its manifest)."""
        chosen, rejected = candidate[0::2], candidate[1::2]
        candidate_acc = preference_accuracy(chosen, rejected)
        correct = int(np.sum(np.asarray(chosen, np.float64) > np.asarray(rejected, np.float64)))
        margins = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
        candidate_ece = _finite(expected_calibration_error(margins, temperature))
        current = self.registry.promoted()
        current_acc, current_ece, current_t, error = None, None, None, ""
        if current is not None:
            try:
                current_acc, current_ece, current_t = self.current_figures(current, texts)
            except Exception as exc:
                log.exception("could not score the promoted version", extra={"version": current})
                error = str(exc)
        record = gate_decision(
            candidate_accuracy=candidate_acc,
            correct=correct,
            n=len(texts) // 2,
            live_version=current,
            live_accuracy=current_acc,
            tolerance=self.tolerance,
            significance=self.significance,
            live_error=error,
            candidate_ece=candidate_ece,
            live_ece=current_ece,
            max_ece=self.max_ece,
        )
        record["candidate_temperature"] = temperature
        record["current_temperature"] = current_t
        record["decided_at"] = datetime.now(UTC).isoformat()
        log.info("promotion decision: %s", record["reason"], extra=record)
        return record

    def current_figures(
        self, version: str, texts: list[tuple[str, str]]
    ) -> tuple[float, float | None, float]:
        """The promoted version's accuracy and calibrated ECE on ``texts`` as it is served
        (hash-verified graph, its own tokenization, default precision and temperature), and
        that temperature."""
        from plaudit.services.runtime.reward_model import LoadedRewardModel  # onnxruntime, no torch

        loaded = LoadedRewardModel.load(self.registry, version, provider="cpu")
        rewards, _, _ = loaded.score_raw([p for p, _ in texts], [c for _, c in texts])
        chosen = np.asarray(rewards[0::2], np.float64)
        rejected = np.asarray(rewards[1::2], np.float64)
        t = loaded.temperature
        ece = _finite(expected_calibration_error(chosen - rejected, t))
        return preference_accuracy(chosen, rejected), ece, t

    def current_accuracy(self, version: str, texts: list[tuple[str, str]]) -> float:
        """The promoted version's accuracy on ``texts`` as it is served."""
        return self.current_figures(version, texts)[0]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def policy_gate_decision(
    *,
    win_rate: float | None,
    lc_win_rate: float | None,
    kl: float | None,
    wins: int,
    n: int,
    baseline: str,
    min_win_rate: float = DEFAULT_MIN_WIN_RATE,
    min_lc_win_rate: float = DEFAULT_MIN_LC_WIN_RATE,
    max_kl: float = DEFAULT_MAX_KL,
    significance: float = 1.0,
) -> dict[str, Any]:
    """The policy gate on literal numbers: the candidate against ``baseline`` (the live policy,
    or the base model when none is) on the same ``n`` held-out prompts, one sample each, judged
    by the live reward model; ``wins`` of them won outright (ties not counted).

    Passes iff all hold:
    - ``win_rate > min_win_rate`` (a tie counts one half in the rate);
    - ``lc_win_rate > min_lc_win_rate``: the win rate at equal length, so a policy that only
      writes longer answers does not pass;
    - ``kl <= max_kl``: nats per sequence from the policy it started from;
    - one-sided binomial ``p <= significance`` for ``wins`` of ``n`` against 1/2 (1.0: not
      required; the p-value is in the record either way).
    A figure that could not be measured (None) refuses.
    """
    p_value = binomial_p_value(wins, n)
    why = []
    if win_rate is None:
        why.append("win rate not measured (no reward model or baseline)")
    elif not win_rate - min_win_rate > _EPS:
        why.append(f"win rate {win_rate:.3f} <= {min_win_rate:g}")
    if lc_win_rate is None:
        why.append("length-controlled win rate not measured")
    elif not lc_win_rate - min_lc_win_rate > _EPS:
        why.append(f"length-controlled win rate {lc_win_rate:.3f} <= {min_lc_win_rate:g}")
    if kl is None:
        why.append("KL not measured")
    elif kl > max_kl:
        why.append(f"KL {kl:.2f} > {max_kl:g} nats")
    if significance < 1.0 and not (n > 0 and p_value <= significance):
        why.append(f"not significant (p={p_value:.2g} > {significance:g})")

    def fmt(value: float | None, spec: str = ".3f") -> str:
        return "n/a" if value is None else format(value, spec)

    figures = (
        f"win rate {fmt(win_rate)} (length-controlled {fmt(lc_win_rate)}) vs {baseline} "
        f"on the same {n} held-out prompts, KL {fmt(kl, '.2f')} nats; p={p_value:.2g}"
    )
    passed = not why
    return {
        "passed": passed,
        "win_rate": win_rate,
        "lc_win_rate": lc_win_rate,
        "kl": kl,
        "wins": wins,
        "eval_prompts": n,
        "baseline": baseline,
        "p_value": p_value,
        "min_win_rate": min_win_rate,
        "min_lc_win_rate": min_lc_win_rate,
        "max_kl": max_kl,
        "significance": significance,
        "reason": f"{figures}: " + ("passed" if passed else "refused, " + "; ".join(why)),
    }
