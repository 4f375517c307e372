"""The promotion gates on literal numbers (issue 15's cases among them): a reward model must beat
the live model on the same held-out pairs and clear a one-sided binomial floor against chance; a
policy must beat the live policy in plain and length-controlled win rate within a KL bound."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from plaudit.trainer.policy_objective import length_controlled_win_rate, win_rate
from plaudit.trainer.promotion import (
    DEFAULT_SIGNIFICANCE,
    DEFAULT_TOLERANCE,
    binomial_p_value,
    exact_binomial_p_value,
    gate_decision,
    policy_gate_decision,
)

LONG_FLOAT = re.compile(r"\d\.\d{5,}")  # 0.4594594594594595 must never reach a person


def test_defaults_demand_a_strict_win_at_the_five_percent_level() -> None:
    assert DEFAULT_TOLERANCE == 0.0 and DEFAULT_SIGNIFICANCE == 0.05


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(9, 10, 11 / 1024), (10, 10, 1 / 1024), (0, 10, 1.0), (5, 10, 638 / 1024), (0, 0, 1.0)],
)
def test_exact_binomial_tail(k: int, n: int, expected: float) -> None:
    assert exact_binomial_p_value(k, n) == pytest.approx(expected, rel=1e-12)
    assert binomial_p_value(k, n) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("k", "n"), [(53, 84), (34, 74), (60, 100), (43, 75), (700, 1300)])
def test_scipy_and_the_exact_computation_agree(k: int, n: int) -> None:
    assert binomial_p_value(k, n) == pytest.approx(exact_binomial_p_value(k, n), rel=1e-9)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        exact_binomial_p_value(11, 10)
    with pytest.raises(ValueError):
        binomial_p_value(-1, 10)


def test_below_chance_is_refused_even_with_nothing_live() -> None:
    """The demo's first retraining: 34 of 74 held-out pairs (0.4594594594594595)."""
    record = gate_decision(
        candidate_accuracy=34 / 74, correct=34, n=74, live_version=None, live_accuracy=None
    )
    assert record["promoted"] is False and record["above_chance"] is False
    assert record["beats_live"] is True  # nothing to beat
    assert record["p_value"] == pytest.approx(0.792, abs=1e-3)
    assert record["eval_pairs"] == 74
    assert "candidate 0.459" in record["reason"]
    assert "not significantly above chance" in record["reason"]
    assert not LONG_FLOAT.search(record["reason"])


def test_a_loss_to_the_live_model_is_refused_and_says_what_live_scored() -> None:
    """The demo's third retraining: 0.573 refused, now with the live figure beside it."""
    record = gate_decision(
        candidate_accuracy=43 / 75, correct=43, n=75, live_version="v-live", live_accuracy=0.6
    )
    assert record["promoted"] is False and record["beats_live"] is False
    assert record["current_accuracy"] == 0.6 and record["current_version"] == "v-live"
    reason = record["reason"]
    assert "candidate 0.573 vs live 0.600 on the same 75 held-out pairs" in reason
    assert "does not beat live v-live" in reason
    assert "not significantly above chance" in reason  # p = 0.124 as well
    assert not LONG_FLOAT.search(reason)


def test_a_significant_win_is_promoted_with_both_figures() -> None:
    record = gate_decision(
        candidate_accuracy=53 / 84, correct=53, n=84, live_version="v1", live_accuracy=50 / 84
    )
    assert record["promoted"] is True and record["beats_live"] and record["above_chance"]
    assert record["p_value"] == pytest.approx(0.01069, abs=1e-5)
    assert record["candidate_correct"] == 53 and record["significance"] == 0.05
    assert record["reason"].startswith("candidate 0.631 vs live 0.595 on the same 84")
    assert record["reason"].endswith("promoted")
    assert not LONG_FLOAT.search(record["reason"])


def test_the_significance_level_is_configurable() -> None:
    kwargs: dict[str, Any] = {"candidate_accuracy": 53 / 84, "correct": 53, "n": 84}
    strict = gate_decision(**kwargs, live_version=None, live_accuracy=None, significance=0.01)
    assert strict["promoted"] is False and "not significantly above chance" in strict["reason"]
    assert "level 0.01" in strict["reason"]
    loose = gate_decision(**kwargs, live_version=None, live_accuracy=None, significance=0.02)
    assert loose["promoted"] is True


def test_a_tie_is_refused_unless_a_tolerance_allows_it() -> None:
    tie: dict[str, Any] = {"candidate_accuracy": 0.7, "correct": 70, "n": 100, "live_version": "v1"}
    assert gate_decision(**tie, live_accuracy=0.7)["promoted"] is False
    assert gate_decision(**tie, live_accuracy=0.7, tolerance=0.01)["promoted"] is True
    assert gate_decision(**tie, live_accuracy=0.705, tolerance=0.01)["promoted"] is True
    lost = gate_decision(**tie, live_accuracy=0.71, tolerance=0.01)  # a loss of exactly 0.01
    assert lost["promoted"] is False and "loses 0.01 or more" in lost["reason"]


def test_a_live_model_that_cannot_be_scored_refuses_the_candidate() -> None:
    record = gate_decision(
        candidate_accuracy=0.9,
        correct=90,
        n=100,
        live_version="v1",
        live_accuracy=None,
        live_error="hash mismatch",
    )
    assert record["promoted"] is False and record["beats_live"] is None
    assert "live v1 could not be scored: hash mismatch" in record["reason"]


def test_ties_count_against_the_candidate_in_the_floor() -> None:
    """A model that scores every pair a tie has accuracy 0.5 and zero pairs right: refused."""
    record = gate_decision(
        candidate_accuracy=0.5, correct=0, n=200, live_version=None, live_accuracy=None
    )
    assert record["p_value"] == 1.0 and record["promoted"] is False


def test_a_ceiling_on_calibration_error_refuses_a_badly_calibrated_winner() -> None:
    win: dict[str, Any] = {
        "candidate_accuracy": 0.8, "correct": 80, "n": 100, "live_version": "v1",
        "live_accuracy": 0.7, "live_ece": 0.04,
    }  # fmt: skip
    shown = gate_decision(**win, candidate_ece=0.12)  # no ceiling: shown, not gated
    assert shown["promoted"] is True and shown["max_ece"] is None
    assert "(calibrated ECE 0.120 vs 0.040)" in shown["reason"]
    refused = gate_decision(**win, candidate_ece=0.12, max_ece=0.1)
    assert refused["promoted"] is False
    assert "calibrated ECE 0.120 is above the limit 0.1" in refused["reason"]
    assert gate_decision(**win, candidate_ece=0.1, max_ece=0.1)["promoted"] is True  # at the limit
    unknown = gate_decision(**win, candidate_ece=None, max_ece=0.1)
    assert unknown["promoted"] is False
    assert "calibration error could not be measured" in unknown["reason"]


# -- the policy gate ------------------------------------------------------------------------------
def _policy(**figures: Any) -> dict[str, Any]:
    given: dict[str, Any] = {
        "win_rate": 0.7, "lc_win_rate": 0.65, "kl": 2.0, "wins": 40, "n": 60,
        "baseline": "live policy p-1",
    }  # fmt: skip
    return policy_gate_decision(**{**given, **figures})


def test_a_policy_that_wins_at_equal_length_within_the_kl_bound_passes() -> None:
    record = _policy()
    assert record["passed"] and record["eval_prompts"] == 60
    assert record["reason"].startswith(
        "win rate 0.700 (length-controlled 0.650) vs live policy p-1 on the same 60 held-out "
        "prompts, KL 2.00 nats; p="
    )
    assert record["reason"].endswith("; p=0.0067: passed")


@pytest.mark.parametrize(
    ("figures", "why"),
    [
        ({"win_rate": 0.5}, "win rate 0.500 <= 0.5"),  # a tie is no evidence
        ({"lc_win_rate": 0.48}, "length-controlled win rate 0.480 <= 0.5"),  # longer, not better
        ({"kl": 10.5}, "KL 10.50 > 10 nats"),
        ({"win_rate": None}, "win rate not measured"),
        ({"lc_win_rate": None}, "length-controlled win rate not measured"),
        ({"kl": None}, "KL not measured"),
        ({"significance": 0.05, "wins": 33}, "not significant (p=0.26 > 0.05)"),
    ],
)
def test_the_policy_gate_refuses_and_says_why(figures: dict[str, Any], why: str) -> None:
    record = _policy(**figures)
    assert not record["passed"]
    assert why in record["reason"] and "refused" in record["reason"]


def test_policy_gate_thresholds_are_settings() -> None:
    assert _policy(win_rate=0.6, min_win_rate=0.55)["passed"]
    assert not _policy(win_rate=0.6, min_win_rate=0.6)["passed"]
    assert _policy(kl=10.5, max_kl=11)["passed"]
    assert _policy(significance=0.05, wins=45)["passed"]  # 45 of 60: p = 5e-5


# -- length-controlled win rate --------------------------------------------------------------------
def test_with_equal_lengths_the_length_controlled_win_rate_is_the_win_rate() -> None:
    cand, base = np.array([1.0, 1.0, 1.0, 0.0, -1.0]), np.zeros(5)
    same = np.full(5, 40.0)
    assert win_rate(cand, base) == 0.7  # 3 wins, a tie (one half), a loss: 3.5 / 5
    assert length_controlled_win_rate(cand, base, same, same) == pytest.approx(0.7, abs=0.01)


def test_winning_only_by_length_is_not_a_win_at_equal_length() -> None:
    """Wins that follow the length difference (longer wins) raise the plain win rate, not the
    length-controlled one."""
    rng = np.random.default_rng(0)
    d = rng.normal(20, 30, 400)  # the candidate is usually longer
    wins = rng.random(400) < 1 / (1 + np.exp(-3 * np.tanh(d / d.std())))
    cand = wins.astype(np.float64)
    base = np.full(400, 0.5)
    lengths = 100 + d
    assert win_rate(cand, base) > 0.65
    assert length_controlled_win_rate(cand, base, lengths, np.full(400, 100.0)) == pytest.approx(
        0.5, abs=0.05
    )


def test_a_clean_sweep_stays_finite_and_bad_shapes_are_refused() -> None:
    ones = np.ones(5)
    assert 0.95 < length_controlled_win_rate(ones, 0 * ones, ones, ones) < 1.0
    with pytest.raises(ValueError, match="equal, non-empty"):
        length_controlled_win_rate(ones, np.ones(4), ones, ones)
    with pytest.raises(ValueError, match="length differences"):
        length_controlled_win_rate(ones, ones, np.ones(4), ones)
