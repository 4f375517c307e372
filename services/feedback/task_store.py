"""The labelling-task queue in the feedback database: tasks, leases, labels and skips.

A task (a prompt with 2..16 candidate completions) waits until ``labels``, the number of
annotators who have labelled it, reaches the target (the caller passes it, so changing the
setting applies to queued tasks too). Per task and annotator, ``labelling_assignment`` holds:

* ``assigned`` - a lease: the task was handed to this annotator at ``assigned_at_ms``. While
  the lease is live it counts against the target, so concurrent annotators are not all handed
  the same task; an expired lease counts for nothing and the task can be handed out again.
* ``labelled`` - the annotator submitted feedback for the task (``feedback_id``); recorded
  idempotently, so a retried submission counts once.
* ``skipped`` - the annotator passed on it; it is not offered to them again.

Claims and labels lock the task row (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN
IMMEDIATE`` on SQLite) so the count of leases and labels is checked and changed atomically.
A lease records the API key (``principal``) that took it; a claim for a key with a lease limit
first locks that key (a transaction-scoped advisory lock on PostgreSQL; SQLite's writers are
serialized already) and counts the key's live leases in the same transaction that grants one,
so the limit holds across every process sharing the database.
Every database failure is raised as :class:`~plaudit.services.common.errors.UnavailableError`.
Methods block; the async callers run them in worker threads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from plaudit.services.common.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from plaudit.services.feedback.db import database_errors, write_with_retry
from plaudit.services.feedback.domain import FeedbackLimits, LabellingTask, NewTask, validate_task
from plaudit.services.feedback.export import KEY_CHUNK, chunks
from plaudit.services.feedback.tables import LabellingTaskRow, TaskAssignmentRow

_TASK = cast(sa.Table, LabellingTaskRow.__table__)
_ASSIGN = cast(sa.Table, TaskAssignmentRow.__table__)
_TASK_COLUMNS = (
    _TASK.c.id,
    _TASK.c.task_key,
    _TASK.c.prompt,
    _TASK.c.completions,
    _TASK.c.metadata,
    _TASK.c.source,
    _TASK.c.labels,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ImportedTask:
    """One imported task: ``created`` is False when its key was already queued."""

    task_id: int
    key: str
    created: bool


@dataclass(frozen=True)
class TaskStats:
    """Queue counts; the ``annotator_*`` counts are for the annotator asked about (else 0)."""

    total: int
    pending: int
    done: int
    labels_per_task: int
    annotator_labelled: int = 0
    annotator_skipped: int = 0


def _task(row: Any) -> LabellingTask:
    return LabellingTask(
        task_id=int(row.id),
        key=row.task_key,
        prompt=row.prompt,
        completions=tuple(row.completions),
        metadata=dict(row.metadata),
        source=row.source,
        labels=int(row.labels),
    )


def _nested(exc: InvalidArgumentError, prefix: str) -> InvalidArgumentError:
    """``exc`` re-raised for a field inside a list, e.g. ``tasks[3].completions[1]``."""
    return InvalidArgumentError(f"{prefix}.{exc.field}", exc.message.removeprefix(f"{exc.field}: "))


class TaskStore:
    """Task-queue operations on the feedback store's engine (see module doc)."""

    def __init__(
        self, engine: Engine, write_lock: AbstractContextManager[Any], limits: FeedbackLimits
    ) -> None:
        self._engine = engine
        self._write_lock = write_lock
        self.limits = limits

    def _write(self, action: str, work: Callable[[Connection], T]) -> T:
        """``work`` in one write transaction; a unique-key race with another writer is retried."""
        return write_with_retry(self._engine, self._write_lock, action, work)

    # -- import ----------------------------------------------------------------------------
    def import_tasks(self, tasks: Sequence[NewTask]) -> list[ImportedTask]:
        """Validate every task, then queue the new ones in one transaction (all or nothing).

        A key already queued with the same prompt and completions is not queued again; with
        different content it is :class:`AlreadyExistsError`. Invalid tasks raise
        :class:`InvalidArgumentError` naming ``tasks[i].field``.
        """
        first: dict[str, int] = {}
        for index, task in enumerate(tasks):
            try:
                validate_task(task, self.limits)
            except InvalidArgumentError as exc:
                raise _nested(exc, f"tasks[{index}]") from exc
            key = task.resolved_key
            if key in first:
                earlier = tasks[first[key]]
                if (earlier.prompt, list(earlier.completions)) != (
                    task.prompt,
                    list(task.completions),
                ):
                    raise InvalidArgumentError(
                        f"tasks[{index}].key",
                        f"{key!r} is also the key of tasks[{first[key]}], whose content differs",
                    )
            else:
                first[key] = index

        def work(conn: Connection) -> dict[str, tuple[int, bool]]:
            keys = list(first)
            found: dict[str, tuple[int, bool]] = {}
            for chunk in chunks(keys, KEY_CHUNK):
                query = sa.select(
                    _TASK.c.id, _TASK.c.task_key, _TASK.c.prompt, _TASK.c.completions
                ).where(_TASK.c.task_key.in_(chunk))
                for row in conn.execute(query):
                    index = first[row.task_key]
                    task = tasks[index]
                    if (row.prompt, list(row.completions)) != (task.prompt, list(task.completions)):
                        raise AlreadyExistsError(
                            f"tasks[{index}].key: {row.task_key!r} is already queued with "
                            f"different content (task_id {row.id})"
                        )
                    found[row.task_key] = (int(row.id), False)
            rows = [
                {
                    "task_key": key,
                    "source": tasks[index].source,
                    "prompt": tasks[index].prompt,
                    "completions": list(tasks[index].completions),
                    "metadata": dict(tasks[index].metadata),
                }
                for key, index in first.items()
                if key not in found
            ]
            if rows:
                conn.execute(sa.insert(_TASK), rows)
                created = [str(r["task_key"]) for r in rows]
                for chunk in chunks(created, KEY_CHUNK):
                    query = sa.select(_TASK.c.id, _TASK.c.task_key).where(
                        _TASK.c.task_key.in_(chunk)
                    )
                    for new in conn.execute(query):
                        found[new.task_key] = (int(new.id), True)
            return found

        stored = self._write("importing tasks", work) if first else {}
        out = []
        for index, task in enumerate(tasks):
            key = task.resolved_key
            task_id, created = stored[key]
            out.append(ImportedTask(task_id, key, created and first[key] == index))
        return out

    # -- reads -----------------------------------------------------------------------------
    def get(self, task_id: int) -> LabellingTask:
        """One task; :class:`NotFoundError` if there is none with that id."""
        with database_errors("reading a task"), self._engine.connect() as conn:
            row = conn.execute(sa.select(*_TASK_COLUMNS).where(_TASK.c.id == task_id)).one_or_none()
        if row is None:
            raise NotFoundError(f"task_id: no task with id {task_id}")
        return _task(row)

    def leased(
        self, annotator_id: str, *, now_ms: int, lease_ms: int, labels_needed: int
    ) -> LabellingTask | None:
        """The unfinished task this annotator holds a live lease on, if any (newest first)."""
        query = (
            sa.select(*_TASK_COLUMNS)
            .join(_ASSIGN, _ASSIGN.c.task_id == _TASK.c.id)
            .where(
                _ASSIGN.c.annotator_id == annotator_id,
                _ASSIGN.c.state == "assigned",
                _ASSIGN.c.assigned_at_ms > now_ms - lease_ms,
                _TASK.c.labels < labels_needed,
            )
            .order_by(_ASSIGN.c.assigned_at_ms.desc(), _TASK.c.id)
            .limit(1)
        )
        with database_errors("reading leases"), self._engine.connect() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else _task(row)

    def candidates(
        self,
        annotator_id: str,
        *,
        now_ms: int,
        lease_ms: int,
        labels_needed: int,
        limit: int,
        shuffle: bool,
    ) -> list[LabellingTask]:
        """Up to ``limit`` tasks this annotator may be handed now.

        Unfinished tasks that the annotator has not labelled, skipped or leased, and whose labels
        plus other annotators' live leases are below the target; oldest first, or a uniform
        random sample with ``shuffle``.
        """
        cutoff = now_ms - lease_ms
        held = (
            sa.select(sa.func.count())
            .select_from(_ASSIGN)
            .where(
                _ASSIGN.c.task_id == _TASK.c.id,
                _ASSIGN.c.state == "assigned",
                _ASSIGN.c.assigned_at_ms > cutoff,
            )
            .correlate(_TASK)
            .scalar_subquery()
        )
        mine = (
            sa.select(_ASSIGN.c.task_id)
            .where(
                _ASSIGN.c.task_id == _TASK.c.id,
                _ASSIGN.c.annotator_id == annotator_id,
                sa.or_(_ASSIGN.c.state != "assigned", _ASSIGN.c.assigned_at_ms > cutoff),
            )
            .correlate(_TASK)
        )
        query = (
            sa.select(*_TASK_COLUMNS)
            .where(
                _TASK.c.labels < labels_needed,
                ~sa.exists(mine),
                _TASK.c.labels + held < labels_needed,
            )
            .order_by(sa.func.random() if shuffle else _TASK.c.id)
            .limit(limit)
        )
        with database_errors("choosing tasks"), self._engine.connect() as conn:
            return [_task(row) for row in conn.execute(query)]

    def stats(self, labels_needed: int, annotator_id: str | None = None) -> TaskStats:
        """How many tasks are queued, still need labels, and are done."""
        with database_errors("counting tasks"), self._engine.connect() as conn:
            total, done = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(
                        sa.func.sum(sa.case((_TASK.c.labels >= labels_needed, 1), else_=0)), 0
                    ),
                ).select_from(_TASK)
            ).one()
            by_state: dict[str, int] = {}
            if annotator_id is not None:
                by_state = {
                    state: int(n)
                    for state, n in conn.execute(
                        sa.select(_ASSIGN.c.state, sa.func.count())
                        .where(_ASSIGN.c.annotator_id == annotator_id)
                        .group_by(_ASSIGN.c.state)
                    )
                }
        return TaskStats(
            total=int(total),
            pending=int(total) - int(done),
            done=int(done),
            labels_per_task=labels_needed,
            annotator_labelled=by_state.get("labelled", 0),
            annotator_skipped=by_state.get("skipped", 0),
        )

    # -- writes ----------------------------------------------------------------------------
    @staticmethod
    def _lock_task(conn: Connection, task_id: int) -> int:
        """Lock the task row until commit; its label count (NotFoundError if there is none)."""
        labels = conn.execute(
            sa.select(_TASK.c.labels).where(_TASK.c.id == task_id).with_for_update()
        ).scalar_one_or_none()
        if labels is None:
            raise NotFoundError(f"task_id: no task with id {task_id}")
        return int(labels)

    @staticmethod
    def _mine(conn: Connection, task_id: int, annotator_id: str) -> str | None:
        return conn.execute(
            sa.select(_ASSIGN.c.state).where(
                _ASSIGN.c.task_id == task_id, _ASSIGN.c.annotator_id == annotator_id
            )
        ).scalar_one_or_none()

    @staticmethod
    def _set_mine(
        conn: Connection, task_id: int, annotator_id: str, exists: bool, **values: Any
    ) -> None:
        if exists:
            conn.execute(
                sa.update(_ASSIGN)
                .where(_ASSIGN.c.task_id == task_id, _ASSIGN.c.annotator_id == annotator_id)
                .values(**values)
            )
        else:
            conn.execute(
                sa.insert(_ASSIGN).values(task_id=task_id, annotator_id=annotator_id, **values)
            )

    @staticmethod
    def _check_principal_leases(
        conn: Connection,
        principal: str,
        annotator_id: str,
        max_leases: int,
        *,
        now_ms: int,
        lease_ms: int,
        labels_needed: int,
    ) -> None:
        """RESOURCE_EXHAUSTED if ``principal`` already holds live leases on unfinished tasks
        for ``max_leases`` annotators other than ``annotator_id``. Locks the principal until
        commit first, so two claims for it (from any process) are counted one after the other."""
        if conn.dialect.name == "postgresql":
            digest = hashlib.sha256(f"plaudit-lease:{principal}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
        held = conn.execute(
            sa.select(sa.func.count(sa.distinct(_ASSIGN.c.annotator_id)))
            .select_from(_ASSIGN.join(_TASK, _TASK.c.id == _ASSIGN.c.task_id))
            .where(
                _ASSIGN.c.principal == principal,
                _ASSIGN.c.annotator_id != annotator_id,
                _ASSIGN.c.state == "assigned",
                _ASSIGN.c.assigned_at_ms > now_ms - lease_ms,
                _TASK.c.labels < labels_needed,
            )
        ).scalar_one()
        if int(held) >= max_leases:
            raise ResourceExhaustedError(
                f"the API key {principal!r} already holds task leases for {int(held)} "
                "annotators, the most one key may (max_leases_per_principal); label or skip "
                "those tasks first"
            )

    def claim(
        self,
        task_id: int,
        annotator_id: str,
        *,
        now_ms: int,
        lease_ms: int,
        labels_needed: int,
        principal: str | None = None,
        max_leases: int = 0,
    ) -> bool:
        """Lease the task to the annotator if it still has room; False if it has none now.

        The lease is recorded as taken by ``principal`` (the API key's name; None while
        authentication is off). With ``max_leases``, RESOURCE_EXHAUSTED if that key already
        holds live leases for ``max_leases`` other annotators (see the module doc)."""

        def work(conn: Connection) -> bool:
            if principal is not None and max_leases:
                self._check_principal_leases(
                    conn,
                    principal,
                    annotator_id,
                    max_leases,
                    now_ms=now_ms,
                    lease_ms=lease_ms,
                    labels_needed=labels_needed,
                )
            labels = self._lock_task(conn, task_id)
            state = self._mine(conn, task_id, annotator_id)
            if labels >= labels_needed or state in ("labelled", "skipped"):
                return False
            held = conn.execute(
                sa.select(sa.func.count()).where(
                    _ASSIGN.c.task_id == task_id,
                    _ASSIGN.c.annotator_id != annotator_id,
                    _ASSIGN.c.state == "assigned",
                    _ASSIGN.c.assigned_at_ms > now_ms - lease_ms,
                )
            ).scalar_one()
            if labels + int(held) >= labels_needed:
                return False
            self._set_mine(
                conn,
                task_id,
                annotator_id,
                state is not None,
                state="assigned",
                assigned_at_ms=now_ms,
                principal=principal,
            )
            return True

        return self._write("leasing a task", work)

    def record_label(
        self, task_id: int, annotator_id: str, feedback_id: int, *, now_ms: int
    ) -> int:
        """Mark the task labelled by the annotator (idempotent); the task's label count."""

        def work(conn: Connection) -> int:
            labels = self._lock_task(conn, task_id)
            state = self._mine(conn, task_id, annotator_id)
            if state == "labelled":
                return labels
            self._set_mine(
                conn,
                task_id,
                annotator_id,
                state is not None,
                state="labelled",
                assigned_at_ms=now_ms,
                feedback_id=feedback_id,
            )
            labels = int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        _ASSIGN.c.task_id == task_id, _ASSIGN.c.state == "labelled"
                    )
                ).scalar_one()
            )
            conn.execute(sa.update(_TASK).where(_TASK.c.id == task_id).values(labels=labels))
            return labels

        return self._write("recording a label", work)

    def skip(self, task_id: int, annotator_id: str, *, now_ms: int) -> None:
        """The annotator passes on the task: it is not offered to them again (idempotent)."""

        def work(conn: Connection) -> None:
            self._lock_task(conn, task_id)
            state = self._mine(conn, task_id, annotator_id)
            if state not in ("labelled", "skipped"):
                self._set_mine(
                    conn,
                    task_id,
                    annotator_id,
                    state is not None,
                    state="skipped",
                    assigned_at_ms=now_ms,
                )

        self._write("skipping a task", work)
