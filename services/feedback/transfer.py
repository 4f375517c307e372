"""Bulk import of feedback files and export of derived pairs (the ``plaudit feedback`` CLI).

Import goes through the store's own validation and idempotency: each line's key is derived from
its content, so importing the same file twice stores nothing new, and every refused line is
reported with its line number and the field at fault. A line's ``criterion`` and ``tags`` travel
with it (a line without them is ``overall``, no tags); the criterion must be one the store
accepts (its ``limits.criteria``). Exported pairs carry both, so an export imports back as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from tqdm import tqdm

from plaudit.services.common.errors import PlauditError
from plaudit.services.common.preference_files import RankedCompletions, parse_record
from plaudit.services.feedback.core import event_from_json
from plaudit.services.feedback.domain import DerivedPair, FeedbackEvent
from plaudit.services.feedback.store import FeedbackStore

IMPORT_CHUNK = 500


@dataclass
class ImportSummary:
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)  # "line N: field: message", first 50


def line_to_event(record: Any, default_annotator: str) -> FeedbackEvent:
    """One parsed JSON line as a feedback event with a content-derived idempotency key, built
    like an HTTP submission (:func:`~plaudit.services.feedback.core.event_from_json`)."""
    parsed = parse_record(record)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:40]
    fields: dict[str, Any] = {
        "prompt": parsed.prompt,
        "annotator_id": str(record.get("annotator_id") or default_annotator),
        "idempotency_key": f"import:{digest}",
        "criterion": parsed.criterion,
        "tags": list(parsed.tags),
    }
    if isinstance(parsed, RankedCompletions):
        return event_from_json("ranking", {**fields, "completions": list(parsed.completions)})[0]
    fields.update(chosen=parsed.chosen, rejected=parsed.rejected, metadata={"source": "import"})
    return event_from_json("comparison", {**fields, "margin": parsed.margin or None})[0]


def _parsed_lines(
    lines: Iterable[str], default_annotator: str, summary: ImportSummary
) -> Iterator[tuple[int, FeedbackEvent]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        summary.lines += 1
        try:
            yield number, line_to_event(json.loads(line), default_annotator)
        except (ValueError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            _reject(summary, number, str(exc))
        except PlauditError as exc:
            _reject(summary, number, exc.message)


def _reject(summary: ImportSummary, number: int, message: str) -> None:
    summary.rejected += 1
    if len(summary.errors) < 50:
        summary.errors.append(f"line {number}: {message}")


def import_file(
    store: FeedbackStore, path: Path, *, annotator_id: str = "import", progress: bool = True
) -> ImportSummary:
    """Validate and store every line of ``path``; commits in chunks of IMPORT_CHUNK lines."""
    summary = ImportSummary()
    with path.open(encoding="utf-8") as fh:
        lines = tqdm(fh, desc=f"import {path.name}", unit="line", disable=not progress)
        chunk: list[tuple[int, FeedbackEvent]] = []
        for item in _parsed_lines(lines, annotator_id, summary):
            chunk.append(item)
            if len(chunk) >= IMPORT_CHUNK:
                _commit(store, chunk, summary)
                chunk = []
        if chunk:
            _commit(store, chunk, summary)
    return summary


def _commit(
    store: FeedbackStore, chunk: list[tuple[int, FeedbackEvent]], summary: ImportSummary
) -> None:
    outcomes = store.submit_many([event for _, event in chunk])
    for (number, _), outcome in zip(chunk, outcomes, strict=True):
        if isinstance(outcome, PlauditError):
            _reject(summary, number, outcome.message)
        elif outcome.duplicate:
            summary.duplicates += 1
        else:
            summary.accepted += 1


def pair_record(pair: DerivedPair) -> dict[str, Any]:
    """A derived pair in TRL's preference format, with its provenance (every field; ``tags`` a
    list)."""
    return {**asdict(pair), "tags": list(pair.tags)}


def export_pairs(
    store: FeedbackStore,
    out: IO[str] | Path,
    *,
    fmt: Literal["jsonl", "parquet"] = "jsonl",
    after_cursor: int = 0,
    limit: int | None = None,
    exclude_outliers: bool = False,
    criterion: str | None = None,
) -> tuple[int, int]:
    """Write derived pairs after ``after_cursor`` (of one ``criterion`` if given); returns
    (pairs written, last cursor). Every record carries its ``criterion`` and ``tags``."""
    pairs = store.export_pairs(
        after_cursor, limit, exclude_outliers=exclude_outliers, criterion=criterion
    )
    last = after_cursor
    count = 0
    if fmt == "jsonl":
        fh = out.open("w", encoding="utf-8") if isinstance(out, Path) else out
        try:
            for pair in pairs:
                fh.write(json.dumps(pair_record(pair), ensure_ascii=False) + "\n")
                count, last = count + 1, pair.cursor
        finally:
            if isinstance(out, Path):
                fh.close()
        return count, last
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(out, Path):
        raise ValueError("parquet export needs a file path")
    records = [pair_record(p) for p in pairs]
    if records:
        last = records[-1]["cursor"]
    pq.write_table(pa.Table.from_pylist(records), out)
    return len(records), last
