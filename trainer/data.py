"""Training data: preference pairs from files (the parsing is shared with feedback import) or
from the feedback store's consensus export."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any

from services.common.preference_files import (
    PreferencePair,
    RankedCompletions,
    parse_pair,
    parse_record,
    read_pairs,
)
from services.common.registry import sha256_file

__all__ = [
    "PreferencePair",
    "TrainingData",
    "load_feedback_pairs",
    "load_file_pairs",
    "parse_pair",
    "read_pairs",
    "reference_pairs_path",
]


def reference_pairs_path() -> Path:
    """The bundled reference pairs (see trainer/data/README.md)."""
    return Path(str(resources.files("trainer") / "data" / "parity_pairs.jsonl"))


@dataclass(frozen=True)
class TrainingData:
    """Pairs to train on, where they came from, and (feedback store) the cursor after them."""

    pairs: list[PreferencePair]
    source: dict[str, Any]
    cursor: int | None = None


def load_file_pairs(paths: Sequence[Path]) -> TrainingData:
    """Pairs from JSONL files in HH-RLHF or TRL format; a ranking gives every ordered pair."""
    pairs: list[PreferencePair] = []
    files = []
    for path in paths:
        before = len(pairs)
        with Path(path).open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = parse_record(json.loads(line))
                except ValueError as exc:  # json.JSONDecodeError is one
                    raise ValueError(f"{path}:{lineno}: {exc}") from exc
                if isinstance(record, RankedCompletions):
                    pairs += [
                        PreferencePair(record.prompt, better, worse)
                        for better, worse in combinations(record.completions, 2)
                    ]
                else:
                    pairs.append(record)
        count = len(pairs) - before
        files.append({"path": str(path), "sha256": sha256_file(Path(path)), "pairs": count})
    return TrainingData(pairs=pairs, source={"files": files})


def load_feedback_pairs(
    database_url: str, after_cursor: int = 0, *, exclude_outliers: bool = False
) -> TrainingData:
    """The store's consensus pairs after ``after_cursor`` (margins and weights included).

    The export is read as a stream; a pair exported again with newer votes replaces its earlier
    copy. ``cursor`` is the last one read (``after_cursor`` when nothing is new): record it, and
    the next run can continue after it.
    """
    from services.feedback.store import FeedbackStore  # sqlalchemy: only when asked for

    latest: dict[str, PreferencePair] = {}
    cursor = after_cursor
    with FeedbackStore(database_url, migrate=False) as store:
        for item in store.export_pairs(after_cursor, exclude_outliers=exclude_outliers):
            latest.pop(item.pair_key, None)  # keep cursor order: a re-export moves to the end
            latest[item.pair_key] = PreferencePair(
                item.prompt,
                item.chosen,
                item.rejected,
                item.margin if item.margin is not None else 0.0,
                item.weight,
            )
            cursor = max(cursor, item.cursor)
        database = store.url.render_as_string(hide_password=True)
    return TrainingData(
        pairs=list(latest.values()),
        source={
            "database": database,
            "after_cursor": after_cursor,
            "cursor": cursor,
            "pairs": len(latest),
            "exclude_outliers": exclude_outliers,
        },
        cursor=cursor,
    )
