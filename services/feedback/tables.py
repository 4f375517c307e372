"""The feedback schema (SQLAlchemy 2 typed declarative). Changed only through Alembic migrations.

``feedback`` holds each event once: the common columns plus its kind-specific fields as JSON
(``payload``); ``criterion`` (what it judges, ``overall`` for rows from before criteria) and
``tags`` (the prompt's tags, a sorted JSON list; NULL reads as none). Ids are not drawn from a
database sequence: a writer takes the next ids from the single-row ``feedback_sequence`` table,
whose row lock it holds until commit, so ids are assigned and committed in the same order. That
makes ``id`` a safe export cursor: once a reader sees id N, no row with a smaller id can appear
later (see :mod:`plaudit.services.feedback.store`).

``labelling_task`` is the queue of prompts with candidate completions that the labelling page
serves; ``labelling_assignment`` records, per task and annotator, a lease (``assigned``), a label
(``labelled``, with the feedback id) or a skip (see :mod:`plaudit.services.feedback.task_store`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from plaudit.services.feedback.domain import DEFAULT_CRITERION, FEEDBACK_KINDS

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SEQUENCE_NAME = "feedback"
"""The ``feedback_sequence`` row that numbers feedback."""

# SQLite only treats INTEGER PRIMARY KEY as a rowid alias; BIGINT elsewhere.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class FeedbackRow(Base):
    """One feedback event, stored once; ``id`` follows commit order."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str] = mapped_column(Text, unique=True)
    content_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex, see domain.content_hash
    annotator_id: Mapped[str] = mapped_column(Text)
    prompt_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of prompt, for lookups
    prompt: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.current_timestamp()
    )
    criterion: Mapped[str] = mapped_column(String(32), server_default=DEFAULT_CRITERION)
    tags: Mapped[list[str] | None] = mapped_column(JSON)

    __table_args__ = (
        CheckConstraint(
            "kind IN (" + ", ".join(f"'{k}'" for k in FEEDBACK_KINDS) + ")", name="kind"
        ),
        Index("ix_feedback_prompt_hash_id", "prompt_hash", "id"),
    )


class FeedbackSequence(Base):
    """Last id handed out, per sequence name; its row lock serialises writers until commit."""

    __tablename__ = "feedback_sequence"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)


ASSIGNMENT_STATES = ("assigned", "labelled", "skipped")


class LabellingTaskRow(Base):
    """A prompt and its candidate completions, waiting for ``labels`` to reach the target."""

    __tablename__ = "labelling_task"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    task_key: Mapped[str] = mapped_column(Text, unique=True)
    source: Mapped[str] = mapped_column(String(32))
    prompt: Mapped[str] = mapped_column(Text)
    completions: Mapped[list[str]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON)
    labels: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.current_timestamp()
    )

    __table_args__ = (Index("ix_labelling_task_labels_id", "labels", "id"),)


class TaskAssignmentRow(Base):
    """One annotator's relation to one task: a lease, a label or a skip."""

    __tablename__ = "labelling_assignment"

    task_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("labelling_task.id", ondelete="CASCADE"), primary_key=True
    )
    annotator_id: Mapped[str] = mapped_column(Text, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    assigned_at_ms: Mapped[int] = mapped_column(BigInteger)  # Unix epoch milliseconds
    feedback_id: Mapped[int | None] = mapped_column(BigInteger)
    # the API key that took the lease (None: authentication off); its live leases are counted
    principal: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(
            "state IN (" + ", ".join(f"'{s}'" for s in ASSIGNMENT_STATES) + ")", name="state"
        ),
        Index("ix_labelling_assignment_annotator_id_state", "annotator_id", "state"),
        Index("ix_labelling_assignment_principal_state", "principal", "state"),
    )
