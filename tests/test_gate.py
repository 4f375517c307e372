"""The reward-model promotion gate on literal numbers: beat the live model on the same held-out
pairs, and clear a one-sided binomial floor against chance (issue 15's cases among them)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from plaudit.trainer.promotion import (
    DEFAULT_SIGNIFICANCE,
    DEFAULT_TOLERANCE,
    binomial_p_value,
    exact_binomial_p_value,
    gate_decision,
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
