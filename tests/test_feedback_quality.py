"""Data quality: consensus weights, kappa on textbook examples, binomial outlier test."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plaudit.services.feedback.domain import Judgement, make_judgement
from plaudit.services.feedback.quality import (
    agreement_report,
    annotator_outlier_tests,
    binomial_sf,
    build_consensus,
    cohen_kappa,
    fleiss_kappa,
    pair_key,
    raw_agreement,
)


def vote(
    annotator: str,
    preferred: str,
    other: str,
    feedback_id: int,
    *,
    prompt: str = "p",
    margin: float | None = None,
    tie: bool = False,
) -> Judgement:
    return make_judgement(
        prompt,
        preferred,
        other,
        margin=margin,
        annotator_id=annotator,
        source_kind="comparison",
        feedback_id=feedback_id,
        index=0,
        tie=tie,
    )


# -- kappa and raw agreement -------------------------------------------------------------------
def test_cohen_kappa_textbook_example() -> None:
    # Wikipedia "Cohen's kappa": 50 proposals; yes/yes 20, yes/no 5, no/yes 10, no/no 15.
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_edge_cases() -> None:
    assert cohen_kappa([1, 2, 1, 2], [1, 2, 1, 2]) == pytest.approx(1.0)
    assert cohen_kappa([1, 2, 1, 2], [2, 1, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))  # chance agreement is 1: undefined
    assert math.isnan(cohen_kappa([], []))
    with pytest.raises(ValueError):
        cohen_kappa([1], [1, 2])


# Wikipedia "Fleiss' kappa": 10 subjects, 14 raters, 5 categories.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_textbook_example() -> None:
    assert raw_agreement(FLEISS_TABLE) == pytest.approx(0.378, abs=5e-4)
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_with_two_raters_per_item_matches_its_definition() -> None:
    table = [[2, 0], [0, 2], [1, 1], [2, 0]]
    # P_bar = (1 + 1 + 0 + 1) / 4 = 0.75; p = (5/8, 3/8); P_e = 34/64
    expected = (0.75 - 34 / 64) / (1 - 34 / 64)
    assert fleiss_kappa(table) == pytest.approx(expected)
    assert raw_agreement(table) == pytest.approx(0.75)
    assert math.isnan(fleiss_kappa([[3, 0], [2, 0]]))
    with pytest.raises(ValueError):
        raw_agreement([[1, 0]])


# -- binomial test -----------------------------------------------------------------------------
def test_binomial_sf_literal_values() -> None:
    assert binomial_sf(8, 10, 0.5) == pytest.approx(56 / 1024)
    assert binomial_sf(0, 10, 0.3) == 1.0
    assert binomial_sf(11, 10, 0.3) == 0.0
    assert binomial_sf(1, 10, 0.0) == 0.0
    assert binomial_sf(10, 10, 1.0) == 1.0
    assert binomial_sf(3, 3, 0.1) == pytest.approx(0.001)
    assert binomial_sf(1, 2, 0.5) == pytest.approx(0.75)
    assert binomial_sf(900, 10_000, 0.1) == pytest.approx(0.99964, abs=1e-4)
    assert binomial_sf(1300, 10_000, 0.1) < 1e-20


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 60), st.integers(0, 60), st.floats(0.01, 0.99))
def test_binomial_sf_matches_the_direct_sum(k: int, n: int, p: float) -> None:
    direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1))
    assert binomial_sf(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-12)


# -- consensus ---------------------------------------------------------------------------------
def test_unanimous_duplicates_from_different_annotators_are_one_pair() -> None:
    groups = build_consensus(
        [vote("a", "x", "y", 1), vote("b", "x", "y", 2), vote("c", "x", "y", 3)]
    )
    (consensus,) = groups.values()
    assert (consensus.chosen, consensus.rejected) == ("x", "y")
    assert (consensus.agree, consensus.disagree, consensus.weight) == (3, 0, 1.0)
    assert not consensus.contradicted
    assert consensus.last_position == (3, 0)
    assert consensus.representative is not None and consensus.representative.annotator_id == "c"


def test_contradicted_pair_keeps_the_majority_with_reduced_weight() -> None:
    (consensus,) = build_consensus(
        [
            vote("a", "x", "y", 1, margin=1.0),
            vote("b", "y", "x", 2, margin=5.0),
            vote("c", "x", "y", 3, margin=3.0),
        ]
    ).values()
    assert (consensus.chosen, consensus.rejected) == ("x", "y")
    assert consensus.weight == pytest.approx(2 / 3)
    assert consensus.contradicted
    assert consensus.margin == pytest.approx(2.0)  # mean of the majority's margins


def test_ties_are_dropped_and_exclusion_can_break_them() -> None:
    judgements = [vote("a", "x", "y", 1), vote("b", "y", "x", 2)]
    (tied,) = build_consensus(judgements).values()
    assert tied.preference == 0 and tied.weight == 0.0 and tied.representative is None
    (resolved,) = build_consensus(judgements, frozenset({"b"})).values()
    assert (resolved.chosen, resolved.weight) == ("x", 1.0)
    assert build_consensus(judgements, frozenset({"a", "b"})) == {}


def test_each_annotator_votes_once_with_their_latest_view() -> None:
    (consensus,) = build_consensus(
        [
            vote("a", "x", "y", 1),
            vote("a", "x", "y", 2),
            vote("a", "y", "x", 3),
            vote("b", "y", "x", 4),
        ]
    ).values()
    assert (consensus.chosen, consensus.agree, consensus.disagree) == ("y", 2, 0)
    (abstained,) = build_consensus(
        [vote("a", "x", "y", 1), vote("a", "x", "y", 2, tie=True)]
    ).values()
    assert abstained.preference == 0
    assert abstained.last_position == (2, 0)


def test_groups_are_per_prompt_and_unordered_pair() -> None:
    groups = build_consensus(
        [
            vote("a", "x", "y", 1),
            vote("a", "y", "x", 2, prompt="q"),
            vote("a", "x", "z", 3),
        ]
    )
    assert len(groups) == 3
    assert len({pair_key(k) for k in groups}) == 3
    assert pair_key(("p", "x", "y")) != pair_key(("p", "xy", ""))


# -- agreement report and outliers -------------------------------------------------------------
def test_agreement_uses_cohen_for_two_annotators() -> None:
    votes = {
        1: {"a": 1, "b": 1},
        2: {"a": 1, "b": -1},
        3: {"a": -1, "b": -1},
        4: {"a": 1, "b": 1},
        5: {"a": 1},
    }
    report = agreement_report(votes)
    assert report.kappa_method == "cohen"
    assert report.kappa == pytest.approx(cohen_kappa([1, 1, -1, 1], [1, -1, -1, 1]))
    assert report.raw_agreement == pytest.approx(0.75)
    assert (report.groups, report.multi_annotated_groups, report.contradicted_groups) == (5, 4, 1)
    assert report.tied_groups == 1


def test_agreement_uses_fleiss_for_more_annotators() -> None:
    votes = {1: {"a": 1, "b": 1, "c": 1}, 2: {"a": -1, "b": -1, "c": 1}, 3: {"a": 1, "c": -1}}
    report = agreement_report(votes)
    assert report.kappa_method == "fleiss"
    assert report.kappa == pytest.approx(fleiss_kappa([[3, 0], [1, 2], [1, 1]]))
    assert report.contradicted_groups == 2


def test_agreement_without_overlap() -> None:
    report = agreement_report({1: {"a": 1}, 2: {"b": -1}, 3: {"c": 0}})
    assert (report.groups, report.raw_agreement, report.kappa, report.kappa_method) == (
        2,
        None,
        None,
        None,
    )
    assert report.outliers == ()


def test_outlier_annotator_is_flagged_and_honest_ones_are_not() -> None:
    rng = random.Random(7)
    honest = ["h1", "h2", "h3", "h4"]
    votes: dict[int, dict[str, int]] = {}
    for item in range(60):
        truth = rng.choice([1, -1])
        group = {a: truth if rng.random() > 0.1 else -truth for a in rng.sample(honest, 2)}
        group["spammer"] = -truth if rng.random() > 0.2 else truth
        votes[item] = group
    tests = {t.annotator_id: t for t in annotator_outlier_tests(votes)}
    assert tests["spammer"].outlier
    assert tests["spammer"].p_value < 0.05 / len(tests)
    assert not any(tests[a].outlier for a in honest)
    assert agreement_report(votes).outlier_annotators == frozenset({"spammer"})


def test_outlier_counts_against_the_leave_one_out_majority() -> None:
    votes = {
        1: {"a": 1, "b": 1, "c": -1},
        2: {"a": 1, "b": -1},
        3: {"a": 1, "b": 1, "c": 1, "d": -1},
    }
    tests = {t.annotator_id: (t.votes, t.disagreements) for t in annotator_outlier_tests(votes)}
    # group 1: a vs {b,c} split -> skipped; b vs {a,c} split -> skipped; c vs {a,b} -> disagrees
    # group 2: a vs b, b vs a -> both disagree; group 3: d disagrees, a, b, c agree
    assert tests == {"a": (2, 1), "b": (2, 1), "c": (2, 1), "d": (1, 1)}
    assert not any(t.outlier for t in annotator_outlier_tests(votes))  # too little evidence
