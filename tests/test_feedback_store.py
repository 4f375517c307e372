"""The feedback store: one suite, run on SQLite (a temporary file) and on PostgreSQL.

PostgreSQL: ``postgresql://postgres@127.0.0.1:5432/test`` (override with
``PLAUDIT_TEST_POSTGRES_URL``); each test gets a fresh schema, dropped afterwards, so concurrent
runs never collide. That half is skipped, saying why, when no PostgreSQL answers.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from plaudit.services.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PlauditError,
    UnavailableError,
)
from plaudit.services.feedback.db import normalize_url
from plaudit.services.feedback.domain import (
    Comparison,
    Correction,
    FeedbackEvent,
    Ranking,
    Rating,
    SubmitResult,
    decode_cursor,
)
from plaudit.services.feedback.export import FeedbackReader
from plaudit.services.feedback.migrate import VERSION_TABLE, current_revision, head_revision
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.feedback.tables import Base


@pytest.fixture
def store(database_url: str) -> Iterator[FeedbackStore]:
    with FeedbackStore(database_url) as opened:
        yield opened


def comparison(key: str, chosen: str = "good", rejected: str = "bad", **kw: Any) -> Comparison:
    fields: dict[str, Any] = {"prompt": "p", "annotator_id": "ann-1"}
    return Comparison(chosen=chosen, rejected=rejected, idempotency_key=key, **{**fields, **kw})


def rating(key: str, completion: str, score: float, **kw: Any) -> Rating:
    fields: dict[str, Any] = {
        "prompt": "p",
        "annotator_id": "ann-1",
        "scale_min": 1,
        "scale_max": 5,
    }
    return Rating(completion=completion, score=score, idempotency_key=key, **{**fields, **kw})


def ok(result: SubmitResult | PlauditError) -> SubmitResult:
    assert isinstance(result, SubmitResult), result
    return result


def row_count(store: FeedbackStore) -> int:
    return store.stats().total


# -- schema ------------------------------------------------------------------------------------
def test_migrations_build_the_schema_on_an_empty_database(database_url: str) -> None:
    with FeedbackStore(database_url) as store:
        with store._engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            assert {"feedback", "feedback_sequence", VERSION_TABLE} <= tables
            assert current_revision(conn) == head_revision()
            # the migrations and the typed models describe the same schema
            diffs = compare_metadata(
                MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}),
                Base.metadata,
            )
            assert diffs == []
        store.ping()
    with FeedbackStore(database_url) as again:  # already at head: a no-op
        assert again.stats().total == 0


def test_a_schema_newer_than_the_code_is_refused(database_url: str) -> None:
    with FeedbackStore(database_url) as store, store._engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = 'from-the-future'"))
    with pytest.raises(FailedPreconditionError, match="from-the-future"):
        FeedbackStore(database_url)


def test_concurrent_starts_migrate_once(database_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            FeedbackStore(database_url).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


def test_sqlite_is_durable_wal(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path}/nested/dir/f.db")
    with store, store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_urls_are_normalised() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    for bad in ("mysql://u@h/db", "postgresql+psycopg2://u@h/db", "not a url"):
        with pytest.raises(ValueError):
            normalize_url(bad)
    for memory in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ValueError, match="in-memory"):
            FeedbackStore(memory)


# -- writes ------------------------------------------------------------------------------------
def test_retry_returns_the_same_id_and_stores_nothing(store: FeedbackStore) -> None:
    first = store.submit(comparison("k1"))
    assert first == SubmitResult(1, duplicate=False)
    assert store.submit(comparison("k1")) == SubmitResult(1, duplicate=True)
    assert store.submit(comparison("k2")) == SubmitResult(2, duplicate=False)
    assert row_count(store) == 2
    assert store.get(1).event == comparison("k1")


def test_same_key_with_different_content_is_refused(store: FeedbackStore) -> None:
    store.submit(comparison("k1"))
    with pytest.raises(AlreadyExistsError) as info:
        store.submit(comparison("k1", chosen="something else"))
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key" in info.value.message and "feedback_id 1" in info.value.message
    assert row_count(store) == 1
    assert store.get(1).event == comparison("k1")


def test_invalid_event_is_refused_before_the_database(store: FeedbackStore) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        store.submit(comparison("k1", chosen="same", rejected="same"))
    assert info.value.field == "rejected"
    assert row_count(store) == 0
    with pytest.raises(NotFoundError):
        store.get(1)


def test_submit_many_commits_the_good_and_reports_the_bad(store: FeedbackStore) -> None:
    store.submit(comparison("old"))
    results = store.submit_many(
        [
            comparison("a"),
            comparison("b", chosen=""),  # invalid
            Ranking(
                prompt="p", completions=["x", "y", "z"], annotator_id="ann-2", idempotency_key="c"
            ),
            comparison("a"),  # repeated in the batch, same content
            comparison("a", chosen="other"),  # repeated in the batch, different content
            comparison("old"),  # already stored
            comparison("old", rejected="worse"),  # already stored, different content
            rating("d", "x", 5),
        ]
    )
    assert results[0] == SubmitResult(2, duplicate=False)
    assert isinstance(results[1], InvalidArgumentError) and results[1].field == "chosen"
    assert results[2] == SubmitResult(3, duplicate=False)
    assert results[3] == SubmitResult(2, duplicate=True)
    assert isinstance(results[4], AlreadyExistsError)
    assert results[5] == SubmitResult(1, duplicate=True)
    assert isinstance(results[6], AlreadyExistsError)
    assert results[7] == SubmitResult(4, duplicate=False)
    assert row_count(store) == 4
    assert store.submit_many([]) == []


def test_large_batches_get_consecutive_ids(store: FeedbackStore) -> None:
    for batch in range(2):
        results = store.submit_many([comparison(f"{batch}-{i}") for i in range(600)])
        assert [ok(r).feedback_id for r in results] == list(
            range(1 + 600 * batch, 601 + 600 * batch)
        )
    assert store.last_feedback_id() == 1200


def test_concurrent_writers_racing_on_the_same_keys(database_url: str) -> None:
    stores = [FeedbackStore(database_url), FeedbackStore(database_url)]  # like two processes
    shared = [comparison(f"shared-{i}") for i in range(20)]
    outcomes: dict[int, list[SubmitResult | PlauditError]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def write(worker: int) -> None:
        own = [comparison(f"own-{worker}-{i}") for i in range(5)]
        try:
            barrier.wait()
            results = []
            for i in range(0, 20, 4):  # several transactions, interleaving with the others
                results += stores[worker % 2].submit_many(
                    shared[i : i + 4] + own[i // 4 : i // 4 + 1]
                )
            outcomes[worker] = results
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        ids_by_key: dict[str, set[int]] = {}
        fresh_by_key: dict[str, int] = {}
        for worker, results in outcomes.items():
            keys = []
            for i in range(0, 20, 4):
                keys += [e.idempotency_key for e in shared[i : i + 4]] + [f"own-{worker}-{i // 4}"]
            for key, result in zip(keys, results, strict=True):
                ids_by_key.setdefault(key, set()).add(ok(result).feedback_id)
                fresh_by_key[key] = fresh_by_key.get(key, 0) + (not ok(result).duplicate)
        assert all(len(ids) == 1 for ids in ids_by_key.values())
        assert all(count == 1 for count in fresh_by_key.values())
        assert len(ids_by_key) == 20 + 8 * 5
        assert row_count(stores[0]) == 60
        assert sorted(i for ids in ids_by_key.values() for i in ids) == list(range(1, 61))
    finally:
        for opened in stores:
            opened.close()


def test_unique_violation_race_is_retried(
    store: FeedbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that missed a concurrent commit of its key hits the unique index, then retries."""
    store.submit(comparison("k1"))
    real_existing = store._existing
    calls: list[int] = []

    def stale_first_lookup(conn: Any, keys: Any) -> Any:
        calls.append(1)
        return {} if len(calls) == 1 else real_existing(conn, keys)

    monkeypatch.setattr(store, "_existing", stale_first_lookup)
    assert store.submit_many([comparison("k2"), comparison("k1")]) == [
        SubmitResult(2, duplicate=False),
        SubmitResult(1, duplicate=True),
    ]
    assert len(calls) == 2
    assert row_count(store) == 2


# -- exports -----------------------------------------------------------------------------------
def seed_mixed(store: FeedbackStore) -> None:
    store.submit_many(
        [
            comparison("c1", margin=0.5),
            Ranking(
                prompt="r",
                completions=["a", "b", "c", "d", "e"],
                annotator_id="ann-1",
                idempotency_key="r1",
            ),
            Correction(
                prompt="fix",
                completion="teh",
                corrected="the",
                annotator_id="ann-2",
                idempotency_key="x1",
            ),
            rating("t1", "one", 5),
            rating("t2", "two", 2),
            rating("t3", "three", 2),
            Ranking(
                prompt="r2", completions=["a", "b", "c"], annotator_id="ann-3", idempotency_key="r2"
            ),
        ]
    )


def read_in_pages(export: Callable[..., Iterator[Any]], page: int, **kwargs: Any) -> list[Any]:
    items: list[Any] = []
    cursor = 0
    while True:
        chunk = list(export(after_cursor=cursor, limit=page, **kwargs))
        if not chunk:
            return items
        assert len(chunk) <= page
        items += chunk
        cursor = chunk[-1].cursor


def test_export_pairs_covers_every_kind(store: FeedbackStore) -> None:
    seed_mixed(store)
    pairs = list(store.export_pairs())
    by_kind: dict[str, int] = {}
    for pair in pairs:
        by_kind[pair.source_kind] = by_kind.get(pair.source_kind, 0) + 1
    # ranking of 5 -> 10 pairs, of 3 -> 3; ratings 5,2,2 -> (one>two), (one>three), tie dropped
    assert by_kind == {"comparison": 1, "ranking": 13, "correction": 1, "rating": 2}
    rated = {(p.chosen, p.rejected): p.margin for p in pairs if p.source_kind == "rating"}
    assert rated == {("one", "two"): pytest.approx(0.75), ("one", "three"): pytest.approx(0.75)}
    (fixed,) = [p for p in pairs if p.source_kind == "correction"]
    assert (fixed.chosen, fixed.rejected, fixed.annotator_id) == ("the", "teh", "ann-2")
    assert all(p.weight == 1.0 for p in pairs)
    assert [p.cursor for p in pairs] == sorted({p.cursor for p in pairs})
    assert store.stats().pairs_derived == len(pairs)


@pytest.mark.parametrize("page", [1, 3, 7])
def test_export_resumes_exactly_after_the_cursor(store: FeedbackStore, page: int) -> None:
    seed_mixed(store)
    everything = list(store.export_pairs())
    assert read_in_pages(store.export_pairs, page) == everything
    # a ranking's pairs can be split across pages: the cursor addresses each of them
    mid_ranking = everything[3]
    assert decode_cursor(mid_ranking.cursor)[1] > 0
    assert list(store.export_pairs(after_cursor=mid_ranking.cursor)) == everything[4:]
    # rows committed later are read by the next call from the last cursor
    store.submit(comparison("late", chosen="new", rejected="old", prompt="later"))
    (late,) = store.export_pairs(after_cursor=everything[-1].cursor)
    assert (late.prompt, late.chosen) == ("later", "new")


def test_small_pages_of_rows_give_the_same_export(database_url: str) -> None:
    with FeedbackStore(database_url, page_rows=2) as store:
        seed_mixed(store)
        with FeedbackStore(database_url, migrate=False) as other:
            assert list(store.export_pairs()) == list(other.export_pairs())


def test_export_stops_at_its_watermark(store: FeedbackStore) -> None:
    store.submit_many([comparison(f"k{i}", prompt=f"p{i}") for i in range(3)])
    iterator = store.export_pairs()
    first = next(iterator)
    store.submit(comparison("after", prompt="p-after"))
    rest = list(iterator)
    assert [p.prompt for p in [first, *rest]] == ["p0", "p1", "p2"]
    (after,) = store.export_pairs(after_cursor=rest[-1].cursor)
    assert after.prompt == "p-after"


def test_agreeing_annotators_make_one_weighted_pair(store: FeedbackStore) -> None:
    store.submit_many(
        [
            comparison("a", annotator_id="u1", margin=1.0),
            comparison("b", annotator_id="u2", margin=3.0),
            comparison("c", annotator_id="u3", chosen="bad", rejected="good"),
            comparison("d", annotator_id="u4", margin=2.0),
            comparison("e", annotator_id="u4", margin=2.0),  # same annotator again: one vote
        ]
    )
    (pair,) = store.export_pairs()
    assert (pair.chosen, pair.rejected) == ("good", "bad")
    assert (pair.agree, pair.disagree) == (3, 1)
    assert pair.weight == pytest.approx(0.75)
    assert pair.margin == pytest.approx(2.0)
    assert (pair.annotator_id, pair.feedback_id) == ("u4", 5)
    stats = store.stats()
    assert stats.agreement.contradicted_groups == 1
    assert stats.agreement.kappa_method == "fleiss"
    assert stats.judgements == 5 and stats.pairs_derived == 1


def test_a_new_vote_reexports_its_pair_with_the_new_consensus(store: FeedbackStore) -> None:
    store.submit(comparison("a", annotator_id="u1"))
    (first,) = store.export_pairs()
    store.submit(comparison("b", annotator_id="u2", chosen="bad", rejected="good"))
    assert list(store.export_pairs(after_cursor=first.cursor)) == []  # a tie: nothing to train
    store.submit(comparison("c", annotator_id="u3"))
    (updated,) = store.export_pairs(after_cursor=first.cursor)
    assert updated.pair_key == first.pair_key
    assert (updated.chosen, updated.weight) == ("good", pytest.approx(2 / 3))
    assert list(store.export_pairs()) == [updated]  # from the start: once, current weight


def test_export_unpaired_gives_kto_labels(store: FeedbackStore) -> None:
    seed_mixed(store)
    store.submit(
        Rating.thumbs(
            prompt="q", completion="meh", up=False, annotator_id="u", idempotency_key="thumb"
        )
    )
    store.submit(rating("mid", "middle", 3))
    examples = list(store.export_unpaired())
    assert [(e.completion, e.label) for e in examples] == [
        ("one", True),
        ("two", False),
        ("three", False),
        ("meh", False),
        ("middle", False),
    ]
    assert examples[0].normalized_score == 1.0 and examples[1].score == 2.0
    assert read_in_pages(store.export_unpaired, 2) == examples
    assert list(store.export_unpaired(after_cursor=examples[2].cursor)) == examples[3:]


def test_export_sft_gives_corrections(store: FeedbackStore) -> None:
    seed_mixed(store)
    store.submit(
        Correction(
            prompt="q", completion="bad", corrected="good", annotator_id="u", idempotency_key="x2"
        )
    )
    examples = list(store.export_sft())
    assert [(e.prompt, e.completion) for e in examples] == [("fix", "the"), ("q", "good")]
    assert list(store.export_sft(after_cursor=examples[0].cursor)) == examples[1:]
    assert list(store.export_sft(limit=0)) == []


def test_export_arguments_are_checked(store: FeedbackStore) -> None:
    with pytest.raises(InvalidArgumentError, match="after_cursor"):
        store.export_pairs(after_cursor=-1)
    with pytest.raises(InvalidArgumentError, match="limit"):
        store.export_sft(limit=-1)


def test_outlier_annotators_can_be_left_out(store: FeedbackStore) -> None:
    events: list[FeedbackEvent] = []
    for item in range(30):
        for annotator in ("h1", "h2", "h3"):
            events.append(
                comparison(f"{item}-{annotator}", prompt=f"p{item}", annotator_id=annotator)
            )
        events.append(
            comparison(
                f"{item}-spam",
                prompt=f"p{item}",
                annotator_id="spammer",
                chosen="bad",
                rejected="good",
            )
        )
    for item in range(3):  # pairs only the spammer judged
        events.append(comparison(f"solo-{item}", prompt=f"solo{item}", annotator_id="spammer"))
    events.append(rating("spam-rating", "x", 5, annotator_id="spammer"))
    events.append(
        Correction(
            prompt="q",
            completion="a",
            corrected="b",
            annotator_id="spammer",
            idempotency_key="spam-fix",
        )
    )
    assert all(isinstance(r, SubmitResult) for r in store.submit_many(events))

    stats = store.stats()
    assert stats.agreement.outlier_annotators == frozenset({"spammer"})
    assert store.outlier_annotators() == frozenset({"spammer"})
    (spam_test, *_) = stats.agreement.outliers
    assert (spam_test.annotator_id, spam_test.votes, spam_test.disagreements) == ("spammer", 30, 30)

    everything = list(store.export_pairs())
    assert len(everything) == 30 + 3 + 1
    assert {p.weight for p in everything if p.prompt.startswith("p")} == {0.75}
    kept = list(store.export_pairs(exclude_outliers=True))
    assert len(kept) == 30
    assert all(p.weight == 1.0 and p.agree == 3 and p.annotator_id != "spammer" for p in kept)
    assert list(store.export_unpaired(exclude_outliers=True)) == []
    assert list(store.export_sft(exclude_outliers=True)) == []
    assert len(list(store.export_sft())) == 1


def test_stats_counts(store: FeedbackStore) -> None:
    seed_mixed(store)
    stats = store.stats()
    assert stats.total == 7 and stats.last_feedback_id == 7
    assert stats.by_kind == {"comparison": 1, "ranking": 2, "correction": 1, "rating": 3}
    assert stats.by_annotator == {"ann-1": 5, "ann-2": 1, "ann-3": 1}
    assert stats.judgements == 1 + 10 + 1 + 3 + 3  # ratings: 2 pairs and 1 tie
    assert stats.pairs_derived == 17
    assert stats.agreement.multi_annotated_groups == 0 and stats.agreement.kappa is None
    assert store.stats() == stats  # cached until something new commits


# -- failures ----------------------------------------------------------------------------------
def test_unreachable_postgres_is_unavailable() -> None:
    url = "postgresql://postgres@127.0.0.1:1/test"
    with pytest.raises(UnavailableError) as info:
        FeedbackStore(url)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with FeedbackStore(url, migrate=False) as store:
        with pytest.raises(UnavailableError):
            store.ping()
        with pytest.raises(UnavailableError):
            store.submit(comparison("k"))
        with pytest.raises(UnavailableError):
            list(store.export_pairs())
        with pytest.raises(UnavailableError):
            store.stats()


def test_unusable_sqlite_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UnavailableError):
        FeedbackStore(f"sqlite:///{blocker}/feedback.db")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UnavailableError):
        FeedbackStore(f"sqlite:///{corrupt}")


# -- the read-only export API --------------------------------------------------------------------
def test_the_reader_exports_and_counts_but_cannot_write(
    store: FeedbackStore, database_url: str
) -> None:
    ok(store.submit_many([comparison("r1")])[0])
    with FeedbackReader(database_url) as reader:
        assert reader.stats().total == 1
        [pair] = reader.export_pairs()
        assert (pair.chosen, pair.rejected) == ("good", "bad")
        with pytest.raises(sa.exc.DBAPIError), reader._engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM feedback"))
    assert row_count(store) == 1


def test_the_trainer_reads_feedback_without_the_store(database_url: str) -> None:
    """plaudit.trainer.data goes through the read-only export API, never the store's write side."""
    code = (
        "import sys; from plaudit.trainer.data import load_feedback_pairs; "
        f"data = load_feedback_pairs({database_url!r}); assert data.pairs == [], data; "
        "assert 'plaudit.services.feedback.store' not in sys.modules, 'store imported'"
    )
    with FeedbackStore(database_url):
        pass
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
