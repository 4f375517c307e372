"""Feedback domain: validation, canonical hashing and the judgements each kind implies."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plaudit.services.common.errors import InvalidArgumentError
from plaudit.services.feedback.domain import (
    Comparison,
    Correction,
    FeedbackEvent,
    FeedbackLimits,
    Ranking,
    Rating,
    StoredFeedback,
    content_hash,
    decode_cursor,
    derive_judgements,
    encode_cursor,
    event_from_payload,
    event_payload,
    make_judgement,
    ranking_pairs,
    validate_event,
)


def comparison(**overrides: Any) -> Comparison:
    fields: dict[str, Any] = {
        "prompt": "What is 2+2?",
        "chosen": "4",
        "rejected": "5",
        "annotator_id": "ann-1",
        "idempotency_key": "key-1",
    }
    return Comparison(**{**fields, **overrides})


def ranking(completions: list[str], **overrides: Any) -> Ranking:
    fields: dict[str, Any] = {"prompt": "p", "annotator_id": "ann-1", "idempotency_key": "k"}
    return Ranking(completions=completions, **{**fields, **overrides})


def rating(completion: str = "c", score: float = 4, **overrides: Any) -> Rating:
    fields: dict[str, Any] = {
        "prompt": "p",
        "scale_min": 1,
        "scale_max": 5,
        "annotator_id": "ann-1",
        "idempotency_key": "k",
    }
    return Rating(completion=completion, score=score, **{**fields, **overrides})


def correction(**overrides: Any) -> Correction:
    fields: dict[str, Any] = {
        "prompt": "p",
        "completion": "teh answer",
        "corrected": "the answer",
        "annotator_id": "ann-1",
        "idempotency_key": "k",
    }
    return Correction(**{**fields, **overrides})


def refused(event: FeedbackEvent, limits: FeedbackLimits | None = None) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        validate_event(event, limits or FeedbackLimits())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith(f"{info.value.field}: ")
    return info.value


# -- validation --------------------------------------------------------------------------------
def test_valid_events_pass() -> None:
    for event in (
        comparison(margin=0.0, metadata={"source": "ui"}),
        ranking(["a", "b", "c"]),
        rating(score=1),
        rating(score=5),
        Rating.thumbs(prompt="p", completion="c", up=False, annotator_id="a", idempotency_key="k"),
        correction(),
    ):
        validate_event(event)


@pytest.mark.parametrize(
    ("event", "field", "words"),
    [
        (comparison(prompt=""), "prompt", "empty"),
        (comparison(prompt=" \n\t"), "prompt", "empty"),
        (comparison(chosen="  "), "chosen", "empty"),
        (comparison(rejected=""), "rejected", "empty"),
        (comparison(rejected="4"), "rejected", "differ from chosen"),
        (comparison(rejected=" 4 "), "rejected", "differ from chosen"),
        (comparison(margin=-0.5), "margin", ">= 0"),
        (comparison(margin=math.nan), "margin", "finite"),
        (comparison(margin=math.inf), "margin", "finite"),
        (comparison(chosen="a\x00b"), "chosen", "NUL"),
        (comparison(chosen="\ud800"), "chosen", "UTF-8"),
        (comparison(annotator_id=""), "annotator_id", "empty"),
        (comparison(annotator_id="x" * 129), "annotator_id", "129 characters; the limit is 128"),
        (comparison(idempotency_key=" "), "idempotency_key", "empty"),
        (comparison(idempotency_key="k" * 129), "idempotency_key", "the limit is 128"),
        (ranking(["only one"]), "completions", "has 1 entries; a ranking needs 2 to 16"),
        (ranking([f"c{i}" for i in range(17)]), "completions", "has 17 entries"),
        (ranking(["a", "b", ""]), "completions[2]", "empty"),
        (ranking(["a", "b", "c", "b"]), "completions[3]", "duplicates completions[1]"),
        (rating(score=6), "score", "within the scale [1.0, 5.0]"),
        (rating(score=0.5), "score", "within the scale"),
        (rating(score=math.nan), "score", "finite"),
        (rating(score=-math.inf), "score", "finite"),
        (rating(scale_min=5, scale_max=5, score=5), "scale_min", "less than scale_max"),
        (rating(scale_min=math.nan), "scale_min", "finite"),
        (rating(scale_max=math.inf), "scale_max", "finite"),
        (rating(completion=""), "completion", "empty"),
        (correction(corrected=""), "corrected", "empty"),
        (correction(corrected="teh answer"), "corrected", "differ from completion"),
        (correction(completion=" "), "completion", "empty"),
        (comparison(metadata={f"k{i}": "v" for i in range(33)}), "metadata", "limit is 32"),
        (comparison(metadata={"k" * 65: "v"}), "metadata", "65 characters; the limit is 64"),
        (comparison(metadata={"k": "v" * 1025}), "metadata", "1025 characters; the limit is 1024"),
        (comparison(metadata={"": "v"}), "metadata", "empty"),
    ],
)
def test_invalid_events_name_the_field_and_the_limit(
    event: FeedbackEvent, field: str, words: str
) -> None:
    error = refused(event)
    assert error.field == field
    assert words in error.message


def test_text_limit_counts_utf8_bytes() -> None:
    limits = FeedbackLimits(max_text_bytes=12)
    validate_event(comparison(chosen="a" * 12), limits)
    error = refused(comparison(chosen="é" * 7), limits)  # 7 characters, 14 bytes
    assert error.field == "chosen"
    assert "14 UTF-8 bytes; the limit is 12" in error.message
    default = refused(comparison(prompt="€" * 21846))  # 65538 bytes
    assert "the limit is 65536" in default.message


def test_limits_are_configurable() -> None:
    limits = FeedbackLimits(max_completions=3, max_id_chars=5, max_metadata_entries=1)
    assert refused(ranking(["a", "b", "c", "d"]), limits).field == "completions"
    assert refused(comparison(annotator_id="abcdef"), limits).field == "annotator_id"
    assert refused(comparison(metadata={"a": "1", "b": "2"}), limits).field == "metadata"
    with pytest.raises(ValueError):
        FeedbackLimits(max_completions=1)


# -- canonical form ----------------------------------------------------------------------------
def test_content_hash_ignores_the_key_and_number_types_only() -> None:
    base = comparison(margin=1, metadata={"a": "1", "b": "2"})
    assert content_hash(base) == content_hash(replace(base, idempotency_key="other"))
    assert content_hash(base) == content_hash(replace(base, margin=1.0))
    assert content_hash(base) == content_hash(replace(base, metadata={"b": "2", "a": "1"}))
    for changed in (
        replace(base, chosen="four"),
        replace(base, margin=None),
        replace(base, annotator_id="ann-2"),
        replace(base, metadata={"a": "1"}),
    ):
        assert content_hash(changed) != content_hash(base)
    assert content_hash(rating(score=4)) == content_hash(rating(score=4.0))
    assert content_hash(ranking(["a", "b"])) != content_hash(ranking(["b", "a"]))


@pytest.mark.parametrize(
    "event",
    [
        comparison(margin=0.25, metadata={"x": "y"}),
        ranking(["a", "b", "c"]),
        rating(),
        correction(),
    ],
)
def test_payload_round_trip(event: FeedbackEvent) -> None:
    rebuilt = event_from_payload(
        event.kind,
        prompt=event.prompt,
        annotator_id=event.annotator_id,
        idempotency_key=event.idempotency_key,
        payload=event_payload(event),
        metadata=event.metadata,
    )
    assert content_hash(rebuilt) == content_hash(event)
    assert type(rebuilt) is type(event)


def test_cursor_round_trip() -> None:
    assert decode_cursor(0) == (0, 0)
    assert decode_cursor(encode_cursor(12345, 119)) == (12345, 119)
    assert encode_cursor(2, 0) > encode_cursor(1, 1000)


# -- derived judgements ------------------------------------------------------------------------
def stored(*events: FeedbackEvent) -> list[StoredFeedback]:
    return [StoredFeedback(i + 1, e) for i, e in enumerate(events)]


@pytest.mark.parametrize("k", [2, 3, 4, 7, 16])
def test_ranking_yields_every_implied_pair(k: int) -> None:
    completions = [f"completion {i}" for i in range(k)]
    judgements = derive_judgements(stored(ranking(completions)))
    assert len(judgements) == k * (k - 1) // 2
    assert [j.index for j in judgements] == list(range(len(judgements)))
    for j in judgements:  # the better-ranked completion always wins
        assert completions.index(j.chosen) < completions.index(j.rejected)
    assert ranking_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_comparison_and_correction_yield_one_pair() -> None:
    comp, corr = derive_judgements(stored(comparison(margin=0.5), correction()))
    assert (comp.chosen, comp.rejected, comp.margin, comp.source_kind) == (
        "4",
        "5",
        0.5,
        "comparison",
    )
    assert (corr.chosen, corr.rejected, corr.source_kind) == (
        "the answer",
        "teh answer",
        "correction",
    )
    assert corr.feedback_id == 2


def test_judgements_are_canonically_oriented() -> None:
    a = make_judgement(
        "p",
        "zebra",
        "apple",
        margin=None,
        annotator_id="x",
        source_kind="comparison",
        feedback_id=1,
        index=0,
    )
    b = make_judgement(
        "p",
        "apple",
        "zebra",
        margin=None,
        annotator_id="y",
        source_kind="comparison",
        feedback_id=2,
        index=0,
    )
    assert (a.first, a.second, a.preference) == ("apple", "zebra", -1)
    assert (b.first, b.second, b.preference) == ("apple", "zebra", 1)
    assert (a.chosen, a.rejected) == ("zebra", "apple")


def test_rating_margin_is_the_score_gap_over_the_scale_width() -> None:
    judgements = derive_judgements(
        stored(
            rating("a", 5),
            rating("b", 2),
            rating("c", 4),
            rating("d", 4),
        )
    )
    pairs = {(j.chosen, j.rejected): j.margin for j in judgements if j.preference}
    assert pairs == {
        ("a", "b"): pytest.approx(0.75),
        ("a", "c"): pytest.approx(0.25),
        ("c", "b"): pytest.approx(0.5),
        ("a", "d"): pytest.approx(0.25),
        ("d", "b"): pytest.approx(0.5),
    }
    ties = [j for j in judgements if j.preference == 0]
    assert [(j.first, j.second) for j in ties] == [("c", "d")]  # equal scores: no pair
    assert all(j.source_kind == "rating" for j in judgements)
    # the later rating owns the judgement; its indexes count the earlier ratings it pairs with
    assert [(j.feedback_id, j.index) for j in judgements] == [
        (2, 0),
        (3, 0),
        (3, 1),
        (4, 0),
        (4, 1),
        (4, 2),
    ]


def test_thumbs_ratings_pair_with_full_margin() -> None:
    up = Rating.thumbs(
        prompt="p", completion="good", up=True, annotator_id="u", idempotency_key="1"
    )
    down = Rating.thumbs(
        prompt="p", completion="bad", up=False, annotator_id="u", idempotency_key="2"
    )
    (judgement,) = derive_judgements(stored(down, up))
    assert (judgement.chosen, judgement.rejected, judgement.margin) == ("good", "bad", 1.0)
    assert up.is_positive and not down.is_positive
    assert not rating(score=3).is_positive  # the midpoint of 1..5 is not "above the midpoint"


def test_ratings_pair_only_on_the_same_prompt_scale_and_annotator() -> None:
    assert derive_judgements(stored(rating("a", 5), rating("b", 1, prompt="other"))) == []
    assert derive_judgements(stored(rating("a", 5), rating("b", 1, scale_max=10))) == []
    assert derive_judgements(stored(rating("a", 5), rating("b", 1, annotator_id="ann-2"))) == []
    (across,) = derive_judgements(
        stored(rating("a", 5), rating("b", 1, annotator_id="ann-2")),
        rating_pairs_across_annotators=True,
    )
    assert (across.chosen, across.annotator_id) == ("a", "ann-2")


def test_rerating_pairs_with_the_latest_earlier_ratings() -> None:
    judgements = derive_judgements(stored(rating("a", 5), rating("a", 1), rating("b", 3)))
    assert [(j.chosen, j.rejected, j.feedback_id) for j in judgements] == [("b", "a", 3)]


def test_derivation_is_deterministic_whatever_the_input_order() -> None:
    records = stored(rating("a", 5), ranking(["x", "y", "z"]), rating("b", 1), comparison())
    assert derive_judgements(records) == derive_judgements(list(reversed(records)))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.text(
            st.characters(codec="utf-8", exclude_characters="\x00"),
            min_size=1,
            max_size=5,
        ).filter(str.strip),
        min_size=2,
        max_size=16,
        unique_by=str.strip,
    )
)
def test_ranking_property(completions: list[str]) -> None:
    event = ranking(completions)
    validate_event(event)
    judgements = derive_judgements(stored(event))
    k = len(completions)
    assert len(judgements) == k * (k - 1) // 2
    assert len({(j.first, j.second) for j in judgements}) == len(judgements)
    wins = {c: 0 for c in completions}
    for j in judgements:
        wins[j.chosen] += 1
    assert [wins[c] for c in completions] == list(range(k - 1, -1, -1))
