"""Read-only access to the feedback store: resumable exports of training examples and counts.

:class:`FeedbackReader` opens the database for reading only (no migrations, no write lock, no
writes: SQLite connections are ``query_only``, PostgreSQL transactions read-only); the trainer
and ``plaudit up`` read through it, and :class:`~plaudit.services.feedback.store.FeedbackStore`
extends it with writes.

Export cursors. Because ids commit in order, a reader that has seen id N has seen every id below
it: PostgreSQL sequences, which can commit out of order, are not used. Each export call fixes a
watermark (the largest committed id) and reads pages of ids up to it; rows committed meanwhile
are read by the next call. A cursor is ``feedback_id << 20 | index`` of an item among those one
row implies, so a reader can stop anywhere (even inside a ranking) and resume exactly after it.

Pairs. Every judgement a row implies (see
:func:`~plaudit.services.feedback.domain.derive_judgements`)
is grouped with the other votes on the same (prompt, unordered pair); the group is exported once,
at the position of its latest judgement, as the consensus of all votes up to the watermark (see
:mod:`plaudit.services.feedback.quality`). Reading from cursor 0 therefore yields every pair
exactly once
with its current weight; an incremental reader sees a pair again (same ``pair_key``) when a new
vote arrives for it, with the updated weight and direction. Agreement statistics and outlier
tests are computed over all rows up to the watermark and cached until new rows commit; with
``exclude_outliers`` each call uses the outliers of its own watermark, so an incremental reader
should re-read from 0 when the outlier set changes (``outlier_annotators()`` tells).

Any database failure is raised as :class:`~plaudit.services.common.errors.UnavailableError`.
Readers are thread-safe; their methods block.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import URL as SqlUrl
from sqlalchemy.engine import Connection

from plaudit.services.common.errors import InvalidArgumentError, NotFoundError
from plaudit.services.feedback.db import (
    DEFAULT_FEEDBACK_URL,
    POSTGRES_CONNECT_TIMEOUT_S,
    create_feedback_engine,
    database_errors,
    normalize_url,
)
from plaudit.services.feedback.domain import (
    MAX_PAIRS_PER_RATING,
    MAX_RATING_PAIRS_PER_GROUP,
    NAME_PATTERN,
    Correction,
    DerivedPair,
    Judgement,
    Rating,
    SftExample,
    StoredFeedback,
    UnpairedExample,
    decode_cursor,
    derive_judgements,
    encode_cursor,
    event_from_payload,
    is_name,
    text_hash,
)
from plaudit.services.feedback.quality import (
    AgreementReport,
    PairConsensus,
    agreement_report,
    build_consensus,
    group_key,
    pair_key,
)
from plaudit.services.feedback.tables import FeedbackRow

_FEEDBACK = cast(sa.Table, FeedbackRow.__table__)
_EVENT_COLUMNS = (
    _FEEDBACK.c.id,
    _FEEDBACK.c.kind,
    _FEEDBACK.c.prompt,
    _FEEDBACK.c.annotator_id,
    _FEEDBACK.c.idempotency_key,
    _FEEDBACK.c.payload,
    _FEEDBACK.c.metadata,
    _FEEDBACK.c.criterion,
    _FEEDBACK.c.tags,
)
KEY_CHUNK = 500  # idempotency keys / prompt hashes per IN (...) list
_PROMPT_CACHE_LIMIT = 4096  # prompts whose derived pairs one export call keeps

T = TypeVar("T")


@dataclass(frozen=True)
class CriterionStats:
    """The counts and agreement of one criterion's rows (its votes only)."""

    records: int
    judgements: int
    pairs_derived: int
    agreement: AgreementReport


@dataclass(frozen=True)
class Stats:
    """Counts and agreement over every committed row up to ``last_feedback_id``.

    ``by_criterion`` breaks the totals down per criterion (every criterion with a row); the
    totals are their sums, except the agreement report, which pools every criterion's groups
    (a group never mixes criteria) and tests outliers over all of them."""

    last_feedback_id: int
    total: int
    by_kind: dict[str, int]
    by_annotator: dict[str, int]
    judgements: int  # pair judgements the rows imply (a ranking of K gives K(K-1)/2)
    pairs_derived: int  # (prompt, pair) groups with a majority: what export_pairs yields from 0
    agreement: AgreementReport
    by_criterion: dict[str, CriterionStats] = field(default_factory=dict)


@dataclass(frozen=True)
class _QualitySnapshot:
    watermark: int
    judgements: int
    pairs: int
    report: AgreementReport
    by_criterion: dict[str, tuple[int, int, AgreementReport]]  # judgements, pairs, report


def _criterion_filter(criterion: str | None) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE clause that keeps one criterion's rows (none: every row)."""
    return () if criterion is None else (_FEEDBACK.c.criterion == criterion,)


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _record(row: Any) -> StoredFeedback:
    """An event from a row of ``_EVENT_COLUMNS``."""
    return StoredFeedback(
        row.id,
        event_from_payload(
            row.kind,
            prompt=row.prompt,
            annotator_id=row.annotator_id,
            idempotency_key=row.idempotency_key,
            payload=row.payload,
            metadata=row.metadata,
            criterion=row.criterion,
            tags=row.tags,
        ),
    )


def _unpaired_example(record: StoredFeedback, cursor: int) -> UnpairedExample:
    rating = record.event
    assert isinstance(rating, Rating)
    return UnpairedExample(
        prompt=rating.prompt,
        completion=rating.completion,
        label=rating.is_positive,
        score=rating.score,
        normalized_score=rating.normalized_score,
        annotator_id=rating.annotator_id,
        feedback_id=record.feedback_id,
        cursor=cursor,
        criterion=rating.criterion,
        tags=tuple(rating.tags),
    )


def _sft_example(record: StoredFeedback, cursor: int) -> SftExample:
    correction = record.event
    assert isinstance(correction, Correction)
    return SftExample(
        prompt=correction.prompt,
        completion=correction.corrected,
        annotator_id=correction.annotator_id,
        feedback_id=record.feedback_id,
        cursor=cursor,
        criterion=correction.criterion,
        tags=tuple(correction.tags),
    )


class FeedbackReader:
    """Reads the feedback store (see module doc); never migrates or writes.

    ``url``: ``sqlite:///path.db`` (default ``sqlite:///.plaudit/feedback.db``) or
    ``postgresql://user@host/db`` (psycopg 3). The schema must already be there (the feedback
    service migrates it); a missing table is raised as :class:`UnavailableError`.
    """

    def __init__(
        self,
        url: str | SqlUrl = DEFAULT_FEEDBACK_URL,
        *,
        rating_pairs_across_annotators: bool = False,
        max_pairs_per_rating: int = MAX_PAIRS_PER_RATING,
        max_rating_pairs_per_group: int = MAX_RATING_PAIRS_PER_GROUP,
        outlier_alpha: float = 0.05,
        page_rows: int = 500,
        pool_size: int = 5,
        connect_timeout_s: int = POSTGRES_CONNECT_TIMEOUT_S,
        read_only: bool = True,
    ) -> None:
        self.url = normalize_url(url)
        self.rating_pairs_across_annotators = rating_pairs_across_annotators
        self.max_pairs_per_rating = max_pairs_per_rating
        self.max_rating_pairs_per_group = max_rating_pairs_per_group
        self.outlier_alpha = outlier_alpha
        self.page_rows = page_rows
        self._engine = create_feedback_engine(
            self.url, pool_size=pool_size, connect_timeout_s=connect_timeout_s, read_only=read_only
        )
        self._quality_lock = threading.Lock()
        self._quality: _QualitySnapshot | None = None

    def _derive(self, records: Sequence[StoredFeedback]) -> list[Judgement]:
        return derive_judgements(
            records,
            rating_pairs_across_annotators=self.rating_pairs_across_annotators,
            max_pairs_per_rating=self.max_pairs_per_rating,
            max_rating_pairs_per_group=self.max_rating_pairs_per_group,
        )

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.render_as_string(hide_password=True)!r})"

    # -- health ----------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise :class:`UnavailableError` unless the database answers a trivial query."""
        with database_errors("checking the database"), self._engine.connect() as conn:
            conn.execute(sa.select(1)).scalar_one()

    # -- reads -----------------------------------------------------------------------------
    def get(self, feedback_id: int) -> StoredFeedback:
        """One stored event; :class:`NotFoundError` if there is none with that id."""
        with database_errors("reading feedback"), self._engine.connect() as conn:
            row = conn.execute(
                sa.select(*_EVENT_COLUMNS).where(_FEEDBACK.c.id == feedback_id)
            ).one_or_none()
        if row is None:
            raise NotFoundError(f"feedback_id: no feedback with id {feedback_id}")
        return _record(row)

    def last_feedback_id(self) -> int:
        """The largest committed id (0 when empty): every smaller id is committed too."""
        with database_errors("reading the watermark"), self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(_FEEDBACK.c.id))).scalar() or 0)

    @staticmethod
    def _check_page_args(after_cursor: int, limit: int | None) -> None:
        if after_cursor < 0:
            raise InvalidArgumentError("after_cursor", f"must be >= 0, got {after_cursor}")
        if limit is not None and limit < 0:
            raise InvalidArgumentError("limit", f"must be >= 0, got {limit}")

    @staticmethod
    def _check_criterion(criterion: str | None) -> None:
        if criterion is not None and not is_name(criterion):
            raise InvalidArgumentError(
                "criterion", f"{criterion[:40]!r} is not a criterion name ({NAME_PATTERN.pattern})"
            )

    def export_pairs(
        self,
        after_cursor: int = 0,
        limit: int | None = None,
        *,
        exclude_outliers: bool = False,
        criterion: str | None = None,
    ) -> Iterator[DerivedPair]:
        """Consensus preference pairs after ``after_cursor``, in cursor order (see module doc).

        At most ``limit`` pairs (all if None). With ``exclude_outliers`` the votes of annotators
        flagged by the outlier test are left out before the consensus is formed (the test is
        over every criterion). ``criterion`` keeps the pairs judged on that criterion only (None:
        every criterion; each pair carries its ``criterion``); cursors stay comparable across
        filters, since they are positions in the one commit order.
        """
        self._check_page_args(after_cursor, limit)
        self._check_criterion(criterion)
        return self._export_pairs(after_cursor, limit, exclude_outliers, criterion)

    def _export_pairs(
        self,
        after_cursor: int,
        limit: int | None,
        exclude_outliers: bool,
        criterion: str | None = None,
    ) -> Iterator[DerivedPair]:
        if limit == 0:
            return
        watermark = self.last_feedback_id()
        excluded = self._outlier_annotators(watermark) if exclude_outliers else frozenset()
        after = decode_cursor(after_cursor)
        emissions_by_prompt: dict[str, list[PairConsensus]] = {}
        emitted = 0
        next_id = after[0]
        while next_id <= watermark:
            with database_errors("exporting pairs"), self._engine.connect() as conn:
                page = conn.execute(
                    sa.select(_FEEDBACK.c.id, _FEEDBACK.c.prompt_hash)
                    .where(
                        _FEEDBACK.c.id >= next_id,
                        _FEEDBACK.c.id <= watermark,
                        *_criterion_filter(criterion),
                    )
                    .order_by(_FEEDBACK.c.id)
                    .limit(self.page_rows)
                ).all()
                if not page:
                    return
                page_prompts = list(dict.fromkeys(row.prompt_hash for row in page))
                missing = [h for h in page_prompts if h not in emissions_by_prompt]
                if len(emissions_by_prompt) + len(missing) > _PROMPT_CACHE_LIMIT:
                    emissions_by_prompt = {
                        h: emissions_by_prompt[h] for h in page_prompts if h in emissions_by_prompt
                    }
                emissions_by_prompt.update(
                    self._consensus_by_prompt(conn, missing, watermark, excluded, criterion)
                )
            first_id, last_id = page[0].id, page[-1].id
            due = sorted(
                (
                    c
                    for h in page_prompts
                    for c in emissions_by_prompt[h]
                    if first_id <= c.last_position[0] <= last_id and c.last_position > after
                ),
                key=lambda c: c.last_position,
            )
            for consensus in due:
                yield self._derived_pair(consensus)
                emitted += 1
                if limit is not None and emitted >= limit:
                    return
            next_id = last_id + 1

    def _load_prompts(
        self,
        conn: Connection,
        prompt_hashes: Sequence[str],
        watermark: int,
        criterion: str | None = None,
    ) -> list[StoredFeedback]:
        records: list[StoredFeedback] = []
        for chunk in chunks(prompt_hashes, KEY_CHUNK):
            rows = conn.execute(
                sa.select(*_EVENT_COLUMNS)
                .where(
                    _FEEDBACK.c.prompt_hash.in_(chunk),
                    _FEEDBACK.c.id <= watermark,
                    *_criterion_filter(criterion),
                )
                .order_by(_FEEDBACK.c.id)
            )
            records.extend(_record(row) for row in rows)
        return records

    def _consensus_by_prompt(
        self,
        conn: Connection,
        prompt_hashes: Sequence[str],
        watermark: int,
        excluded: frozenset[str],
        criterion: str | None = None,
    ) -> dict[str, list[PairConsensus]]:
        """Exportable consensus of every group of those prompts (of one criterion, if given:
        judgements of different criteria never meet, so leaving the others out changes
        nothing else), keyed by prompt hash."""
        out: dict[str, list[PairConsensus]] = {h: [] for h in prompt_hashes}
        if not prompt_hashes:
            return out
        records = self._load_prompts(conn, prompt_hashes, watermark, criterion)
        judgements = self._derive(records)
        for consensus in build_consensus(judgements, excluded).values():
            if consensus.preference != 0:
                out[text_hash(consensus.prompt)].append(consensus)
        return out

    @staticmethod
    def _derived_pair(consensus: PairConsensus) -> DerivedPair:
        representative = consensus.representative
        assert representative is not None
        return DerivedPair(
            prompt=consensus.prompt,
            chosen=consensus.chosen,
            rejected=consensus.rejected,
            margin=consensus.margin,
            weight=consensus.weight,
            annotator_id=representative.annotator_id,
            source_kind=representative.source_kind,
            feedback_id=representative.feedback_id,
            cursor=encode_cursor(*consensus.last_position),
            agree=consensus.agree,
            disagree=consensus.disagree,
            pair_key=pair_key(consensus.key),
            criterion=consensus.criterion,
            tags=consensus.tags,
        )

    def export_unpaired(
        self,
        after_cursor: int = 0,
        limit: int | None = None,
        *,
        exclude_outliers: bool = False,
        criterion: str | None = None,
    ) -> Iterator[UnpairedExample]:
        """Every rating after ``after_cursor`` as a KTO example (label: above the midpoint);
        of one ``criterion`` only when given."""
        self._check_page_args(after_cursor, limit)
        self._check_criterion(criterion)
        rows = self._export_rows("rating", after_cursor, limit, exclude_outliers, criterion)
        return (_unpaired_example(record, cursor) for record, cursor in rows)

    def export_sft(
        self,
        after_cursor: int = 0,
        limit: int | None = None,
        *,
        exclude_outliers: bool = False,
        criterion: str | None = None,
    ) -> Iterator[SftExample]:
        """Every correction after ``after_cursor`` as a supervised (prompt, corrected) example;
        of one ``criterion`` only when given."""
        self._check_page_args(after_cursor, limit)
        self._check_criterion(criterion)
        rows = self._export_rows("correction", after_cursor, limit, exclude_outliers, criterion)
        return (_sft_example(record, cursor) for record, cursor in rows)

    def _export_rows(
        self,
        kind: str,
        after_cursor: int,
        limit: int | None,
        exclude_outliers: bool,
        criterion: str | None = None,
    ) -> Iterator[tuple[StoredFeedback, int]]:
        """Rows of one kind after the cursor (one item per row, index 0), up to the watermark."""
        if limit == 0:
            return
        watermark = self.last_feedback_id()
        excluded = self._outlier_annotators(watermark) if exclude_outliers else frozenset()
        next_id = decode_cursor(after_cursor)[0] + 1  # each row is one item, at index 0
        emitted = 0
        while next_id <= watermark:
            with database_errors(f"exporting {kind} examples"), self._engine.connect() as conn:
                rows = conn.execute(
                    sa.select(*_EVENT_COLUMNS)
                    .where(
                        _FEEDBACK.c.kind == kind,
                        _FEEDBACK.c.id >= next_id,
                        _FEEDBACK.c.id <= watermark,
                        *_criterion_filter(criterion),
                    )
                    .order_by(_FEEDBACK.c.id)
                    .limit(self.page_rows)
                ).all()
            if not rows:
                return
            for row in rows:
                if row.annotator_id in excluded:
                    continue
                yield _record(row), encode_cursor(row.id)
                emitted += 1
                if limit is not None and emitted >= limit:
                    return
            next_id = rows[-1].id + 1

    # -- quality ---------------------------------------------------------------------------
    def stats(self) -> Stats:
        """Counts by kind and annotator, derived pairs and agreement, up to the watermark."""
        watermark = self.last_feedback_id()
        with database_errors("computing statistics"), self._engine.connect() as conn:
            upto = _FEEDBACK.c.id <= watermark
            by_kind = {
                kind: int(n)
                for kind, n in conn.execute(
                    sa.select(_FEEDBACK.c.kind, sa.func.count())
                    .where(upto)
                    .group_by(_FEEDBACK.c.kind)
                )
            }
            by_annotator = {
                annotator: int(n)
                for annotator, n in conn.execute(
                    sa.select(_FEEDBACK.c.annotator_id, sa.func.count())
                    .where(upto)
                    .group_by(_FEEDBACK.c.annotator_id)
                )
            }
            records_by_criterion = {
                criterion: int(n)
                for criterion, n in conn.execute(
                    sa.select(_FEEDBACK.c.criterion, sa.func.count())
                    .where(upto)
                    .group_by(_FEEDBACK.c.criterion)
                )
            }
        quality = self._quality_snapshot(watermark)
        empty = agreement_report({})
        by_criterion = {
            criterion: CriterionStats(
                records_by_criterion.get(criterion, 0),
                *quality.by_criterion.get(criterion, (0, 0, empty)),
            )
            for criterion in sorted(set(records_by_criterion) | set(quality.by_criterion))
        }
        return Stats(
            last_feedback_id=watermark,
            total=sum(by_kind.values()),
            by_kind=by_kind,
            by_annotator=by_annotator,
            judgements=quality.judgements,
            pairs_derived=quality.pairs,
            agreement=quality.report,
            by_criterion=by_criterion,
        )

    def outlier_annotators(self) -> frozenset[str]:
        """Annotators whose disagreement with the consensus fails the outlier test."""
        return self._outlier_annotators(self.last_feedback_id())

    def _outlier_annotators(self, watermark: int) -> frozenset[str]:
        return self._quality_snapshot(watermark).report.outlier_annotators

    def _quality_snapshot(self, watermark: int) -> _QualitySnapshot:
        with self._quality_lock:
            cached = self._quality
            if cached is not None and cached.watermark == watermark:
                return cached
            with database_errors("computing agreement"):
                snapshot = self._compute_quality(watermark)
            self._quality = snapshot
            return snapshot

    def _compute_quality(self, watermark: int) -> _QualitySnapshot:
        """Stream every row up to the watermark, prompt by prompt, keeping only compact votes."""
        votes_by_group: dict[str, dict[str, int]] = {}
        criterion_of_group: dict[str, str] = {}
        judgements_by_criterion: dict[str, int] = {}

        def absorb(records: list[StoredFeedback]) -> None:
            judgements = self._derive(records)
            for judgement in judgements:  # in position order, so the last vote wins
                key = pair_key(group_key(judgement))
                votes_by_group.setdefault(key, {})[judgement.annotator_id] = judgement.preference
                criterion_of_group[key] = judgement.criterion
                judgements_by_criterion[judgement.criterion] = (
                    judgements_by_criterion.get(judgement.criterion, 0) + 1
                )

        with self._engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(
                sa.select(_FEEDBACK.c.prompt_hash, *_EVENT_COLUMNS)
                .where(_FEEDBACK.c.id <= watermark)
                .order_by(_FEEDBACK.c.prompt_hash, _FEEDBACK.c.id)
            )
            current_hash: str | None = None
            batch: list[StoredFeedback] = []
            for row in result:
                if row.prompt_hash != current_hash and batch:
                    absorb(batch)
                    batch = []
                current_hash = row.prompt_hash
                batch.append(_record(row))
            if batch:
                absorb(batch)
        pairs_by_criterion: dict[str, int] = {}
        groups_by_criterion: dict[str, dict[str, dict[str, int]]] = {}
        for key, votes in votes_by_group.items():
            positive = sum(1 for v in votes.values() if v > 0)
            negative = sum(1 for v in votes.values() if v < 0)
            criterion = criterion_of_group[key]
            pairs_by_criterion[criterion] = pairs_by_criterion.get(criterion, 0) + (
                positive != negative
            )
            groups_by_criterion.setdefault(criterion, {})[key] = votes
        report = agreement_report(votes_by_group, alpha=self.outlier_alpha)
        by_criterion = {
            criterion: (
                judgements_by_criterion.get(criterion, 0),
                pairs_by_criterion.get(criterion, 0),
                agreement_report(groups, alpha=self.outlier_alpha),
            )
            for criterion, groups in groups_by_criterion.items()
        }
        return _QualitySnapshot(
            watermark,
            sum(judgements_by_criterion.values()),
            sum(pairs_by_criterion.values()),
            report,
            by_criterion,
        )
