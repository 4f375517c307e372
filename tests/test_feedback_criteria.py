"""Feedback criteria and prompt tags (issue 18 item 1), layer by layer: the domain's validation
against literals, the store on SQLite and PostgreSQL (round trip, per-criterion consensus, export
filter, statistics), the 0003 -> 0004 migration keeping existing rows, the servicer and HTTP
errors naming the field, and files that carry both fields through import and export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import sqlalchemy as sa
from alembic import command

from plaudit.services.common.errors import InvalidArgumentError, PlauditError
from plaudit.services.common.preference_files import parse_record
from plaudit.services.feedback.core import event_from_json, stats_json
from plaudit.services.feedback.db import create_feedback_engine, normalize_url
from plaudit.services.feedback.domain import (
    Comparison,
    Correction,
    FeedbackLimits,
    Rating,
    StoredFeedback,
    SubmitResult,
    content_hash,
    criterion_question,
    derive_judgements,
    normalize_event,
    validate_event,
)
from plaudit.services.feedback.migrate import VERSION_TABLE, alembic_config, current_revision
from plaudit.services.feedback.quality import pair_key
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.feedback.transfer import export_pairs, import_file
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import ServerThread
from tests.test_feedback_http import call

CRITERIA = ("helpfulness", "safety")
LIMITS = FeedbackLimits(criteria=CRITERIA)


def comparison(key: str, chosen: str = "good", rejected: str = "bad", **kw: Any) -> Comparison:
    fields: dict[str, Any] = {"prompt": "p", "annotator_id": "ann-1"}
    return Comparison(chosen=chosen, rejected=rejected, idempotency_key=key, **{**fields, **kw})


def refused(event: Comparison, limits: FeedbackLimits = LIMITS) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        validate_event(event, limits)
    return caught.value


def ok(result: SubmitResult | PlauditError) -> SubmitResult:
    assert isinstance(result, SubmitResult), result
    return result


# -- domain ------------------------------------------------------------------------------------
def test_an_event_without_a_criterion_judges_overall() -> None:
    event = comparison("k")
    assert (event.criterion, tuple(event.tags)) == ("overall", ())
    validate_event(event)  # the default limits accept overall only
    assert normalize_event(comparison("k", criterion="")).criterion == "overall"


def test_criteria_are_validated_against_the_configured_ones() -> None:
    for name in ("overall", "helpfulness", "safety", ""):
        validate_event(comparison("k", criterion=name), LIMITS)
    error = refused(comparison("k", criterion="honesty"))
    assert error.field == "criterion"
    assert error.message == (
        "criterion: 'honesty' is not a configured criterion; accepted: overall, helpfulness, safety"
    )
    for bad in ("Safety", "1st", "a" * 33, "sa fety", "safety\n"):
        error = refused(comparison("k", criterion=bad))
        assert error.field == "criterion" and "accepted: overall, helpfulness, safety" in str(error)
    assert refused(comparison("k", criterion="safety"), FeedbackLimits()).message.endswith(
        "accepted: overall"
    )


def test_tags_are_names_at_most_sixteen_stored_sorted_and_deduplicated() -> None:
    event = comparison("k", tags=["safety", "medical", "safety", "a-b_1"])
    validate_event(event)
    assert normalize_event(event).tags == ("a-b_1", "medical", "safety")
    error = refused(comparison("k", tags=["ok", "Not-OK"]))
    assert error.field == "tags[1]"
    assert error.message.startswith("tags[1]: 'Not-OK' is not a tag")
    assert refused(comparison("k", tags=["x" * 33])).field == "tags[0]"
    too_many = [f"t{i}" for i in range(17)]
    assert refused(comparison("k", tags=too_many)).message == "tags: has 17 tags; the limit is 16"
    validate_event(comparison("k", tags=too_many[:16] * 2))  # 16 distinct
    assert refused(comparison("k", tags="safety")).field == "tags"


def test_the_settings_validate_criteria_names_at_start() -> None:
    assert FeedbackSettings().criteria == ["overall"]
    settings = FeedbackSettings(criteria=["helpfulness", "safety", "safety"])
    assert settings.criteria == ["helpfulness", "safety"]
    assert settings.feedback_limits().accepted_criteria == ("overall", "helpfulness", "safety")
    with pytest.raises(ValueError, match="criterion 'Bad Name' must match"):
        FeedbackSettings(criteria=["Bad Name"])
    with pytest.raises(ValueError, match="at least one"):
        FeedbackSettings(criteria=[])


def test_the_criteria_setting_reads_a_json_list_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLAUDIT_CRITERIA", '["helpfulness", "safety"]')
    assert FeedbackSettings().criteria == ["helpfulness", "safety"]


def test_questions_per_criterion() -> None:
    assert criterion_question("overall") == "Which response is better?"
    assert criterion_question("helpfulness") == "Which response is more helpful?"
    assert criterion_question("safety") == "Which response is safer?"
    assert criterion_question("concision") == "Which response is better for concision?"


def test_content_hash_of_an_overall_event_without_tags_is_what_it_was() -> None:
    """An event stored before criteria existed hashes the same, so its retry is a duplicate."""
    event = comparison("k", margin=0.5)
    before = {
        "kind": "comparison",
        "prompt": "p",
        "annotator_id": "ann-1",
        "metadata": {},
        "payload": {"chosen": "good", "rejected": "bad", "margin": 0.5},
    }
    expected = hashlib.sha256(orjson.dumps(before, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert content_hash(event) == expected
    assert content_hash(comparison("k", margin=0.5, criterion="overall")) == expected
    assert content_hash(comparison("k", margin=0.5, criterion="safety")) != expected
    assert content_hash(comparison("k", margin=0.5, tags=["safety"])) != expected


def test_judgements_on_different_criteria_never_meet() -> None:
    records = [
        StoredFeedback(1, comparison("a", criterion="safety", tags=["medical"])),
        StoredFeedback(2, comparison("b", "bad", "good", criterion="helpfulness")),
        StoredFeedback(
            3,
            Rating(
                prompt="p",
                completion="x",
                score=1,
                scale_min=0,
                scale_max=1,
                annotator_id="ann-1",
                idempotency_key="r1",
                criterion="safety",
            ),
        ),
        StoredFeedback(
            4,
            Rating(
                prompt="p",
                completion="y",
                score=0,
                scale_min=0,
                scale_max=1,
                annotator_id="ann-1",
                idempotency_key="r2",
                criterion="helpfulness",
            ),
        ),
    ]
    judgements = derive_judgements(records)
    # the two ratings are on different criteria: they imply no pair
    assert [(j.criterion, j.tags, j.preference) for j in judgements] == [
        ("safety", ("medical",), -1),
        ("helpfulness", (), 1),
    ]
    assert pair_key(("p", "bad", "good", "overall")) == pair_key(("p", "bad", "good"))
    assert pair_key(("p", "bad", "good", "safety")) != pair_key(("p", "bad", "good"))


def test_json_and_files_carry_the_fields() -> None:
    event, _ = event_from_json(
        "comparison",
        {"prompt": "p", "chosen": "a", "rejected": "b", "criterion": "safety", "tags": ["x"]},
    )
    assert (event.criterion, list(event.tags)) == ("safety", ["x"])
    with pytest.raises(InvalidArgumentError) as caught:
        event_from_json("comparison", {"prompt": "p", "tags": "x"})
    assert caught.value.field == "tags"
    parsed = parse_record({"prompt": "p", "chosen": "a", "rejected": "b"})
    assert (parsed.criterion, parsed.tags) == ("overall", ())
    parsed = parse_record(
        {"prompt": "p", "completions": ["a", "b"], "criterion": "safety", "tags": ["t"]}
    )
    assert (parsed.criterion, parsed.tags) == ("safety", ("t",))
    with pytest.raises(ValueError, match=r"tags\[1\]: must be a string"):
        parse_record({"prompt": "p", "chosen": "a", "rejected": "b", "tags": ["t", 3]})
    with pytest.raises(ValueError, match="criterion: must be a string"):
        parse_record({"prompt": "p", "chosen": "a", "rejected": "b", "criterion": 7})


# -- store ---------------------------------------------------------------------------------------
@pytest.fixture
def store(database_url: str) -> Any:
    with FeedbackStore(database_url, limits=LIMITS) as opened:
        yield opened


def test_criterion_and_tags_round_trip(store: FeedbackStore) -> None:
    first = ok(store.submit_many([comparison("a", criterion="safety", tags=["z", "a", "z"])])[0])
    second = ok(store.submit_many([comparison("b", criterion="")])[0])
    stored = store.get(first.feedback_id).event
    assert (stored.criterion, tuple(stored.tags)) == ("safety", ("a", "z"))
    assert store.get(second.feedback_id).event.criterion == "overall"
    # a retry with the tags in another order is the same content
    again = ok(store.submit_many([comparison("a", criterion="safety", tags=["a", "z"])])[0])
    assert again == SubmitResult(first.feedback_id, duplicate=True)
    [error] = store.submit_many([comparison("c", criterion="honesty")])
    assert isinstance(error, InvalidArgumentError) and error.field == "criterion"
    correction = Correction(
        prompt="p",
        completion="bad",
        corrected="better",
        annotator_id="a",
        idempotency_key="fix",
        criterion="helpfulness",
        tags=["edit"],
    )
    ok(store.submit_many([correction])[0])
    [sft] = store.export_sft(criterion="helpfulness")
    assert (sft.criterion, sft.tags) == ("helpfulness", ("edit",))
    assert list(store.export_sft(criterion="safety")) == []


def test_votes_on_different_criteria_are_separate_pairs(store: FeedbackStore) -> None:
    """A safety vote and a helpfulness vote on the same pair are two judgements: never merged,
    never a contradiction; each pair is exported with its criterion and its tags' union."""
    outcomes = store.submit_many(
        [
            comparison("s1", "A", "B", criterion="safety", tags=["medical"]),
            comparison("s2", "A", "B", criterion="safety", annotator_id="ann-2", tags=["risky"]),
            comparison("h1", "B", "A", criterion="helpfulness"),
            comparison("h2", "A", "B", criterion="helpfulness", annotator_id="ann-2"),
            comparison("o1", "B", "A"),
        ]
    )
    assert all(isinstance(o, SubmitResult) for o in outcomes)
    pairs = {p.criterion: p for p in store.export_pairs()}
    assert set(pairs) == {"safety", "overall"}  # helpfulness is a tie: not exported
    safety = pairs["safety"]
    assert (safety.chosen, safety.agree, safety.disagree, safety.weight) == ("A", 2, 0, 1.0)
    assert safety.tags == ("medical", "risky")
    assert pairs["overall"].chosen == "B" and pairs["overall"].tags == ()
    assert len({p.pair_key for p in pairs.values()}) == 2

    only = list(store.export_pairs(criterion="safety"))
    assert [(p.criterion, p.chosen, p.cursor) for p in only] == [("safety", "A", safety.cursor)]
    assert list(store.export_pairs(criterion="honesty")) == []
    with pytest.raises(InvalidArgumentError, match=r"^criterion"):
        store.export_pairs(criterion="Not A Name")

    stats = store.stats()
    assert stats.judgements == 5 and stats.pairs_derived == 2
    assert stats.agreement.contradicted_groups == 1  # helpfulness only
    by = stats.by_criterion
    assert {c: (s.records, s.judgements, s.pairs_derived) for c, s in by.items()} == {
        "helpfulness": (2, 2, 0),
        "overall": (1, 1, 1),
        "safety": (2, 2, 1),
    }
    assert by["safety"].agreement.raw_agreement == 1.0
    assert by["helpfulness"].agreement.raw_agreement == 0.0
    assert by["helpfulness"].agreement.tied_groups == 1
    rendered = stats_json(stats)
    assert [c["criterion"] for c in rendered["criteria"]] == ["helpfulness", "overall", "safety"]
    assert rendered["criteria"][2]["pairs_derived"] == 1
    assert rendered["criteria"][2]["overlapping_items"] == 1


# -- migration -----------------------------------------------------------------------------------
def test_upgrading_from_0003_keeps_rows_as_overall(database_url: str) -> None:
    engine = create_feedback_engine(normalize_url(database_url), pool_size=1, read_only=False)
    try:
        with engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "0003")
            assert current_revision(conn) == "0003"
            old = comparison("old-key", margin=0.5)
            payload = {"chosen": "good", "rejected": "bad", "margin": 0.5}
            conn.execute(
                sa.text(
                    "INSERT INTO feedback (id, kind, idempotency_key, content_hash, "
                    "annotator_id, prompt_hash, prompt, payload, metadata) VALUES (1, "
                    "'comparison', 'old-key', :hash, 'ann-1', :prompt_hash, 'p', :payload, '{}')"
                ),
                {
                    "hash": content_hash(old),
                    "prompt_hash": hashlib.sha256(b"p").hexdigest(),
                    "payload": json.dumps(payload),
                },
            )
            conn.execute(sa.text("UPDATE feedback_sequence SET last_id = 1"))
    finally:
        engine.dispose()
    with FeedbackStore(database_url, limits=LIMITS) as store:
        with store._engine.connect() as conn:
            assert current_revision(conn) == "0004"
            assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        kept = store.get(1).event
        assert kept == old  # criterion overall, no tags
        [pair] = store.export_pairs()
        assert (pair.criterion, pair.tags, pair.chosen) == ("overall", (), "good")
        # the old event's retry is still a duplicate: its content hash did not change
        assert ok(store.submit_many([old])[0]) == SubmitResult(1, duplicate=True)
        ok(store.submit_many([comparison("new", criterion="safety")])[0])
        assert set(store.stats().by_criterion) == {"overall", "safety"}


# -- files ---------------------------------------------------------------------------------------
def test_files_round_trip_criterion_and_tags(tmp_path: Path) -> None:
    lines = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "criterion": "safety", "tags": ["x"]},
        {"prompt": "p", "chosen": "b", "rejected": "a", "criterion": "helpfulness"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},  # no fields: overall, no tags
        {"prompt": "q", "chosen": "a", "rejected": "b", "criterion": "honesty"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "tags": ["ok", "BAD"]},
        {"prompt": "q", "chosen": "a", "rejected": "b", "tags": "x"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with FeedbackStore(f"sqlite:///{tmp_path}/a.db", limits=LIMITS) as store:
        summary = import_file(store, source, progress=False)
        assert (summary.accepted, summary.rejected) == (3, 3)
        errors = sorted(summary.errors)  # parse errors are reported before refused commits
        assert errors[0].startswith("line 4: criterion: 'honesty' is not a configured criterion")
        assert errors[1].startswith("line 5: tags[1]: 'BAD' is not a tag")
        assert errors[2] == "line 6: tags: must be a list of strings"
        exported = tmp_path / "out.jsonl"
        count, _ = export_pairs(store, exported)
        assert count == 3
        safety_only = tmp_path / "safety.jsonl"
        assert export_pairs(store, safety_only, criterion="safety")[0] == 1
    records = [json.loads(line) for line in exported.read_text().splitlines()]
    assert sorted((r["prompt"], r["criterion"], r["tags"]) for r in records) == [
        ("p", "helpfulness", []),
        ("p", "safety", ["x"]),
        ("q", "overall", []),
    ]
    with FeedbackStore(f"sqlite:///{tmp_path}/b.db", limits=LIMITS) as again:
        assert import_file(again, exported, progress=False).accepted == 3
        back = sorted((p.prompt, p.chosen, p.criterion, p.tags) for p in again.export_pairs())
    assert back == [
        ("p", "a", "safety", ("x",)),
        ("p", "b", "helpfulness", ()),
        ("q", "a", "overall", ()),
    ]


# -- services --------------------------------------------------------------------------------------
def test_grpc_and_http_name_the_field_and_list_the_criteria(tmp_path: Path) -> None:
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path / 'f.db'}",
        http_port=0,
        criteria=list(CRITERIA),
        log_level="WARNING",
    ).start()
    try:
        base = server.http_url
        body = {"prompt": "Q?", "chosen": "good", "rejected": "bad", "annotator_id": "ann-1"}
        status, reply, _ = call(
            base,
            "POST",
            "/api/v1/comparisons",
            {**body, "idempotency_key": "h1", "criterion": "honesty"},
        )
        assert status == 400
        assert reply["error"]["field"] == "criterion"
        assert reply["error"]["message"] == (
            "criterion: 'honesty' is not a configured criterion; "
            "accepted: overall, helpfulness, safety"
        )
        status, reply, _ = call(
            base,
            "POST",
            "/api/v1/comparisons",
            {**body, "idempotency_key": "h2", "tags": ["fine", "No"]},
        )
        assert (status, reply["error"]["field"]) == (400, "tags[1]")
        status, reply, _ = call(
            base,
            "POST",
            "/api/v1/comparisons",
            {**body, "idempotency_key": "h3", "criterion": "safety", "tags": ["b", "a"]},
        )
        assert status == 201, reply
        status, reply, _ = call(base, "GET", "/api/v1/tasks/next?annotator_id=ann-1")
        assert reply["criteria"] == [
            {"criterion": "helpfulness", "question": "Which response is more helpful?"},
            {"criterion": "safety", "question": "Which response is safer?"},
        ]
        status, stats, _ = call(base, "GET", "/api/v1/stats")
        assert [(c["criterion"], c["records"]) for c in stats["criteria"]] == [("safety", 1)]

        with grpc.insecure_channel(server.address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.SubmitRating(
                    pb.SubmitRatingRequest(
                        prompt="Q?",
                        completion="good",
                        score=1,
                        annotator_id="ann-1",
                        idempotency_key="g1",
                        criterion="honesty",
                    ),
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("criterion: 'honesty' is not a configured")
            reply = stub.SubmitComparison(
                pb.SubmitComparisonRequest(
                    prompt="Q?",
                    chosen="bad",
                    rejected="good",
                    annotator_id="ann-2",
                    idempotency_key="g2",
                    criterion="helpfulness",
                    tags=["x"],
                ),
                timeout=10,
            )
            assert not reply.duplicate
            pages = stub.ExportPreferences(pb.ExportPreferencesRequest(), timeout=10)
            pairs = sorted((p.criterion, list(p.tags), p.chosen) for pg in pages for p in pg.pairs)
            assert pairs == [("helpfulness", ["x"], "bad"), ("safety", ["a", "b"], "good")]
            pages = stub.ExportPreferences(
                pb.ExportPreferencesRequest(criterion="helpfulness"), timeout=10
            )
            assert [p.criterion for pg in pages for p in pg.pairs] == ["helpfulness"]
            stats_reply = stub.GetStats(pb.GetStatsRequest(), timeout=10)
            assert {c.criterion: c.pairs_derived for c in stats_reply.criteria} == {
                "helpfulness": 1,
                "safety": 1,
            }
    finally:
        server.stop()
