"""Issue 17 item 2: ratings of one prompt cannot make pair derivation quadratic.

The attack: one key submits thousands of ratings of distinct completions of one prompt. Every
rating used to be paired with every earlier one (1,500 ratings: 1.1M judgements, +188 MB), so
``GetStats``, ``ExportPreferences`` and retraining ran out of memory. Now each rating is paired
with at most ``max_pairs_per_rating`` earlier ones and a (prompt, annotator, scale) group implies
at most ``max_rating_pairs_per_group`` judgements.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from plaudit.services.feedback.domain import (
    MAX_PAIRS_PER_RATING,
    MAX_RATING_PAIRS_PER_GROUP,
    Rating,
    StoredFeedback,
    derive_judgements,
)
from plaudit.services.feedback.store import FeedbackStore


def rating(completion: str, score: float, **overrides: Any) -> Rating:
    fields: dict[str, Any] = {
        "prompt": "p",
        "scale_min": 1,
        "scale_max": 5,
        "annotator_id": "attacker",
        "idempotency_key": f"{completion}-{score}",
    }
    return Rating(completion=completion, score=score, **{**fields, **overrides})


def flood(n: int, **overrides: Any) -> list[StoredFeedback]:
    """``n`` ratings of distinct completions of one prompt, scores cycling over the scale."""
    return [
        StoredFeedback(i + 1, rating(f"completion {i}", 1 + i % 5, **overrides)) for i in range(n)
    ]


def test_1500_ratings_of_one_prompt_imply_a_bounded_number_of_pairs() -> None:
    records = flood(1500)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        judgements = derive_judgements(records)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    assert len(judgements) <= 1500 * MAX_PAIRS_PER_RATING  # was 1500 * 1499 / 2 = 1.1M
    assert len(judgements) <= MAX_RATING_PAIRS_PER_GROUP
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # was +188 MB
    assert elapsed < 2.0  # was 3.5 s (generous: the CI machine is shared)
    # every bounded pair is between different scores and points the right way
    assert all(j.preference != 0 for j in judgements[100:])
    scores = {r.event.completion: r.event.score for r in records}  # type: ignore[union-attr]
    assert all(scores[j.chosen] > scores[j.rejected] for j in judgements if j.preference)
    # positions stay unique and in order
    positions = [j.position for j in judgements]
    assert positions == sorted(set(positions))


def test_one_group_is_capped_and_other_groups_are_unaffected() -> None:
    records = [
        *flood(2000),
        StoredFeedback(10001, rating("a", 5, annotator_id="honest")),
        StoredFeedback(10002, rating("b", 1, annotator_id="honest")),
    ]
    judgements = derive_judgements(records, max_rating_pairs_per_group=100)
    attacker = [j for j in judgements if j.annotator_id == "attacker"]
    honest = [j for j in judgements if j.annotator_id == "honest"]
    assert len(attacker) == 100
    assert [(j.chosen, j.rejected) for j in honest] == [("a", "b")]


def test_cost_grows_linearly() -> None:
    small, large = derive_judgements(flood(1000)), derive_judgements(flood(4000))
    assert len(large) <= 4 * len(small) + MAX_PAIRS_PER_RATING
    across = derive_judgements(
        flood(3000), rating_pairs_across_annotators=True, max_rating_pairs_per_group=10**9
    )
    assert len(across) <= 3000 * MAX_PAIRS_PER_RATING


def test_small_groups_keep_every_pair() -> None:
    """Up to ``max_pairs_per_rating`` + 1 completions, every pair (ties included) as before."""
    records = flood(MAX_PAIRS_PER_RATING + 1)
    n = len(records)
    assert len(derive_judgements(records)) == n * (n - 1) // 2


def test_large_groups_pair_with_the_nearest_other_scores() -> None:
    records = [
        StoredFeedback(1, rating("one", 1)),
        StoredFeedback(2, rating("two", 2)),
        StoredFeedback(3, rating("three", 3)),
        StoredFeedback(4, rating("four", 4)),
        StoredFeedback(5, rating("five", 5)),
        StoredFeedback(6, rating("also three", 3)),
    ]
    judgements = [
        j for j in derive_judgements(records, max_pairs_per_rating=2) if j.feedback_id == 6
    ]
    # one below and one above, never the equal score; in commit order of the partners
    assert [(j.chosen, j.rejected, j.index) for j in judgements] == [
        ("also three", "two", 0),
        ("four", "also three", 1),
    ]
    # a short side is filled from the other one
    top = derive_judgements([*records, StoredFeedback(7, rating("six", 5))], max_pairs_per_rating=2)
    assert [(j.chosen, j.rejected) for j in top if j.feedback_id == 7] == [
        ("six", "four"),
        ("six", "also three"),
    ]


def test_rerating_moves_a_completion_in_the_score_order() -> None:
    records = [
        StoredFeedback(1, rating("x", 1)),
        StoredFeedback(2, rating("y", 2)),
        StoredFeedback(3, rating("z", 3)),
        StoredFeedback(4, rating("x", 5)),  # re-rated: now the best
        StoredFeedback(5, rating("w", 4)),
    ]
    judgements = [
        j for j in derive_judgements(records, max_pairs_per_rating=2) if j.feedback_id == 5
    ]
    assert [(j.chosen, j.rejected) for j in judgements] == [("w", "z"), ("x", "w")]


def test_stats_and_export_over_a_flooded_prompt_stay_bounded(tmp_path: Path) -> None:
    """The attack end to end: the store's GetStats and export paths over 3,000 ratings."""
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    with FeedbackStore(url, max_rating_pairs_per_group=2_000) as store:
        results = store.submit_many([r.event for r in flood(3000)])
        assert all(not isinstance(r, Exception) for r in results)
        started = time.perf_counter()
        stats = store.stats()
        pairs = list(store.export_pairs())
        assert time.perf_counter() - started < 10
    assert stats.pairs_derived == len(pairs) <= 2_000


@pytest.mark.parametrize(("per_rating", "per_group"), [(0, 10), (1, -1)])
def test_limits_are_validated(per_rating: int, per_group: int) -> None:
    with pytest.raises(ValueError):
        derive_judgements([], max_pairs_per_rating=per_rating, max_rating_pairs_per_group=per_group)
