"""The feedback store: durable, idempotent writes on top of :class:`FeedbackReader`'s exports.

Writes. Every acknowledgement means committed. A write transaction first locks the single
``feedback_sequence`` row (``SELECT ... FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` already holds
the database write lock), then looks up the batch's idempotency keys, inserts the new events with
consecutive ids taken from the sequence row, advances it and commits. Writers are serialised
from the lock to the commit, so:

* ids are assigned and become visible in the same order (no gaps: a rolled-back writer rolls
  back its ids too), which is what export cursors rely on (see
  :mod:`plaudit.services.feedback.export`);
* a key seen again (a retry, a repeat within one batch, or a concurrent writer racing with it)
  resolves to the first event's id, and stores nothing new. Should a unique violation still
  happen (a writer that bypasses the lock), the transaction is retried and the key resolves then;
* the same key with different content (its sha256 ``content_hash`` differs) is refused with
  ALREADY_EXISTS naming ``idempotency_key``.

Any database failure is raised as :class:`~plaudit.services.common.errors.UnavailableError`. The
store is
thread-safe; its methods block (the async servicer calls them in a worker thread). The queue of
labelling tasks lives in the same database: :attr:`FeedbackStore.tasks`
(:mod:`plaudit.services.feedback.task_store`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL as SqlUrl
from sqlalchemy.engine import Connection

from plaudit.services.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    PlauditError,
)
from plaudit.services.feedback.db import (
    DEFAULT_FEEDBACK_URL,
    POSTGRES_CONNECT_TIMEOUT_S,
    database_errors,
    is_sqlite,
    write_with_retry,
)
from plaudit.services.feedback.domain import (
    DEFAULT_LIMITS,
    MAX_PAIRS_PER_RATING,
    MAX_RATING_PAIRS_PER_GROUP,
    FeedbackEvent,
    FeedbackLimits,
    SubmitResult,
    content_hash,
    event_payload,
    normalize_event,
    text_hash,
    validate_event,
)
from plaudit.services.feedback.export import KEY_CHUNK, FeedbackReader, chunks
from plaudit.services.feedback.migrate import upgrade_to_head
from plaudit.services.feedback.tables import SEQUENCE_NAME, FeedbackRow, FeedbackSequence
from plaudit.services.feedback.task_store import TaskStore

_FEEDBACK = cast(sa.Table, FeedbackRow.__table__)
_SEQUENCE = cast(sa.Table, FeedbackSequence.__table__)


@dataclass(frozen=True)
class _Prepared:
    index: int
    event: FeedbackEvent
    content_hash: str


@dataclass(frozen=True)
class _Stored:
    feedback_id: int
    content_hash: str
    inserted: bool


class FeedbackStore(FeedbackReader):
    """Stores feedback events; reads and exports as :class:`FeedbackReader` (see module doc).

    ``url``: ``sqlite:///path.db`` (default ``sqlite:///.plaudit/feedback.db``) or
    ``postgresql://user@host/db`` (psycopg 3). The schema is migrated to head at construction
    unless ``migrate`` is False. Raises :class:`UnavailableError` if the database cannot be
    reached, :class:`FailedPreconditionError` if its schema is newer than this code knows.
    """

    def __init__(
        self,
        url: str | SqlUrl = DEFAULT_FEEDBACK_URL,
        *,
        limits: FeedbackLimits = DEFAULT_LIMITS,
        migrate: bool = True,
        rating_pairs_across_annotators: bool = False,
        max_pairs_per_rating: int = MAX_PAIRS_PER_RATING,
        max_rating_pairs_per_group: int = MAX_RATING_PAIRS_PER_GROUP,
        outlier_alpha: float = 0.05,
        page_rows: int = 500,
        pool_size: int = 5,
        connect_timeout_s: int = POSTGRES_CONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__(
            url,
            rating_pairs_across_annotators=rating_pairs_across_annotators,
            max_pairs_per_rating=max_pairs_per_rating,
            max_rating_pairs_per_group=max_rating_pairs_per_group,
            outlier_alpha=outlier_alpha,
            page_rows=page_rows,
            pool_size=pool_size,
            connect_timeout_s=connect_timeout_s,
            read_only=False,
        )
        self.limits = limits
        # SQLite has one writer at a time anyway; queueing in-process avoids busy-wait polling.
        self._write_lock: AbstractContextManager[Any] = (
            threading.Lock() if is_sqlite(self._engine) else nullcontext()
        )
        self.tasks = TaskStore(self._engine, self._write_lock, limits)
        if migrate:
            try:
                with database_errors("migrating the schema"):
                    upgrade_to_head(self._engine)
            except CommandError as exc:
                self._engine.dispose()
                raise FailedPreconditionError(f"feedback schema: {exc}") from exc
            except BaseException:
                self._engine.dispose()
                raise

    # -- writes ----------------------------------------------------------------------------
    def submit(self, event: FeedbackEvent) -> SubmitResult:
        """Validate and commit one event; raises its :class:`PlauditError` if refused."""
        result = self.submit_many([event])[0]
        if isinstance(result, PlauditError):
            raise result
        return result

    def submit_many(self, events: Sequence[FeedbackEvent]) -> list[SubmitResult | PlauditError]:
        """Validate every event and commit all valid ones in one transaction.

        Returns one entry per event, in order: its :class:`SubmitResult`, or the error that
        refused it (:class:`InvalidArgumentError`, or :class:`AlreadyExistsError` when its key was
        used for different content). Raises :class:`UnavailableError` (nothing committed) when the
        database fails. Events are stored normalised (:func:`normalize_event`: an empty criterion
        is ``overall``, tags sorted and deduplicated).
        """
        results: list[SubmitResult | PlauditError | None] = [None] * len(events)
        first_by_key: dict[str, _Prepared] = {}
        repeats: list[_Prepared] = []
        for index, event in enumerate(events):
            try:
                validate_event(event, self.limits)
            except InvalidArgumentError as exc:
                results[index] = exc
                continue
            event = normalize_event(event)
            prepared = _Prepared(index, event, content_hash(event))
            if event.idempotency_key in first_by_key:
                repeats.append(prepared)
            else:
                first_by_key[event.idempotency_key] = prepared
        stored = self._store(list(first_by_key.values())) if first_by_key else {}
        for prepared in first_by_key.values():
            results[prepared.index] = self._outcome(prepared, stored, first=True)
        for prepared in repeats:
            results[prepared.index] = self._outcome(prepared, stored, first=False)
        return [r for r in results if r is not None]

    @staticmethod
    def _outcome(
        prepared: _Prepared, stored: dict[str, _Stored], *, first: bool
    ) -> SubmitResult | PlauditError:
        key = prepared.event.idempotency_key
        row = stored[key]
        if row.content_hash != prepared.content_hash:
            return AlreadyExistsError(
                f"idempotency_key: {key!r} was already used for different feedback "
                f"(feedback_id {row.feedback_id}); use a new key for new feedback"
            )
        return SubmitResult(row.feedback_id, duplicate=not (first and row.inserted))

    def _store(self, batch: list[_Prepared]) -> dict[str, _Stored]:
        return write_with_retry(
            self._engine, self._write_lock, "storing feedback", lambda c: self._store_once(c, batch)
        )

    def _store_once(self, conn: Connection, batch: list[_Prepared]) -> dict[str, _Stored]:
        last_id = conn.execute(
            sa.select(_SEQUENCE.c.last_id)
            .where(_SEQUENCE.c.name == SEQUENCE_NAME)
            .with_for_update()
        ).scalar_one()
        stored = self._existing(conn, [p.event.idempotency_key for p in batch])
        rows = []
        for prepared in batch:
            event = prepared.event
            if event.idempotency_key in stored:
                continue
            last_id += 1
            stored[event.idempotency_key] = _Stored(last_id, prepared.content_hash, True)
            rows.append(
                {
                    "id": last_id,
                    "kind": event.kind,
                    "idempotency_key": event.idempotency_key,
                    "content_hash": prepared.content_hash,
                    "annotator_id": event.annotator_id,
                    "prompt_hash": text_hash(event.prompt),
                    "prompt": event.prompt,
                    "payload": event_payload(event),
                    "metadata": dict(event.metadata),
                    "criterion": event.criterion,
                    "tags": list(event.tags) or None,
                }
            )
        if rows:
            conn.execute(sa.insert(_FEEDBACK), rows)
            conn.execute(
                sa.update(_SEQUENCE)
                .where(_SEQUENCE.c.name == SEQUENCE_NAME)
                .values(last_id=last_id)
            )
        return stored

    def _existing(self, conn: Connection, keys: Sequence[str]) -> dict[str, _Stored]:
        """The stored rows of those ``keys`` that exist."""
        found: dict[str, _Stored] = {}
        for chunk in chunks(keys, KEY_CHUNK):
            query = sa.select(
                _FEEDBACK.c.idempotency_key, _FEEDBACK.c.id, _FEEDBACK.c.content_hash
            ).where(_FEEDBACK.c.idempotency_key.in_(chunk))
            for key, feedback_id, digest in conn.execute(query):
                found[key] = _Stored(feedback_id, digest, False)
        return found
