"""Training data: preference pairs from files (the parsing is shared with feedback import) or
from the feedback store's consensus export; for policy training also prompts and supervised
(prompt, completion) examples, from files or the store's corrections."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any

from plaudit.services.common.preference_files import (
    PreferencePair,
    RankedCompletions,
    messages_to_dialogue,
    parse_pair,
    parse_record,
    read_pairs,
)
from plaudit.services.common.registry import sha256_file

__all__ = [
    "PreferencePair",
    "SupervisedExample",
    "TrainingData",
    "load_feedback_pairs",
    "load_feedback_sft",
    "load_file_pairs",
    "parse_pair",
    "read_pairs",
    "reference_pairs_path",
]


def reference_pairs_path() -> Path:
    """The bundled reference pairs (see trainer/reference/README.md)."""
    return Path(str(resources.files("plaudit.trainer") / "reference" / "parity_pairs.jsonl"))


@dataclass(frozen=True)
class SupervisedExample:
    """A (prompt, completion) to imitate: a TRL prompt-completion record or a correction."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class TrainingData:
    """Pairs to train on, where they came from, and (feedback store) the cursor after them.

    ``prompts`` (prompt-only records) and ``supervised`` are read for policy training only.
    """

    pairs: list[PreferencePair]
    source: dict[str, Any]
    cursor: int | None = None
    prompts: list[str] = field(default_factory=list)
    supervised: list[SupervisedExample] = field(default_factory=list)


def _unpaired(record: Any) -> str | SupervisedExample | None:
    """A TRL prompt-only ``{"prompt"}`` or prompt-completion ``{"prompt", "completion"}``
    record (strings, or messages in TRL's conversational form); None for anything else."""
    if not isinstance(record, dict) or "prompt" not in record:
        return None
    if set(record) & {"chosen", "rejected", "completions"}:
        return None
    prompt: Any = record["prompt"]
    if isinstance(prompt, list):
        prompt = messages_to_dialogue(prompt, "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string or a list of messages")
    if "completion" not in record:
        return prompt
    completion: Any = record["completion"]
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content")
    if not isinstance(completion, str) or not completion.strip():
        raise ValueError("'completion' must be a non-empty string or a list of messages")
    return SupervisedExample(prompt, completion)


def load_file_pairs(
    paths: Sequence[Path], *, allow_unpaired: bool = False, criterion: str | None = None
) -> TrainingData:
    """Pairs from JSONL files in HH-RLHF or TRL format; a ranking gives every ordered pair.

    With ``allow_unpaired`` (policy training) TRL prompt-only and prompt-completion lines are
    read too, into ``prompts`` and ``supervised``. With ``criterion`` only the preference lines
    judged on it are kept (a line without a ``criterion`` field judges ``overall``).
    """
    pairs: list[PreferencePair] = []
    prompts: list[str] = []
    supervised: list[SupervisedExample] = []
    files = []
    for path in paths:
        before = len(pairs) + len(prompts) + len(supervised)
        with Path(path).open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                    other = _unpaired(raw) if allow_unpaired else None
                    if (
                        other is None
                        and criterion is not None
                        and isinstance(raw, dict)
                        and raw.get("criterion", "overall") != criterion
                    ):
                        continue
                    record = parse_record(raw) if other is None else other
                except ValueError as exc:  # json.JSONDecodeError is one
                    raise ValueError(f"{path}:{lineno}: {exc}") from exc
                if isinstance(record, str):
                    prompts.append(record)
                elif isinstance(record, SupervisedExample):
                    supervised.append(record)
                elif isinstance(record, RankedCompletions):
                    pairs += [
                        PreferencePair(record.prompt, better, worse)
                        for better, worse in combinations(record.completions, 2)
                    ]
                else:
                    pairs.append(record)
        count = len(pairs) + len(prompts) + len(supervised) - before
        key = "records" if allow_unpaired else "pairs"
        files.append({"path": str(path), "sha256": sha256_file(Path(path)), key: count})
    return TrainingData(
        pairs=pairs, source={"files": files}, prompts=prompts, supervised=supervised
    )


def load_feedback_pairs(
    database_url: str,
    after_cursor: int = 0,
    *,
    exclude_outliers: bool = False,
    criterion: str | None = None,
) -> TrainingData:
    """The store's consensus pairs after ``after_cursor`` (margins and weights included), of
    one ``criterion`` (None: every criterion).

    The export is read as a stream; a pair exported again with newer votes replaces its earlier
    copy. ``cursor`` is the last one read (``after_cursor`` when nothing is new): record it, and
    the next run can continue after it.
    """
    from plaudit.services.feedback.export import FeedbackReader  # sqlalchemy: only when asked for

    latest: dict[str, PreferencePair] = {}
    cursor = after_cursor
    with FeedbackReader(database_url) as store:
        for item in store.export_pairs(
            after_cursor, exclude_outliers=exclude_outliers, criterion=criterion
        ):
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
            "criterion": criterion,
        },
        cursor=cursor,
    )


def load_feedback_sft(
    database_url: str, after_cursor: int = 0, *, exclude_outliers: bool = False
) -> tuple[list[SupervisedExample], int]:
    """The store's corrections after ``after_cursor`` as supervised examples (the corrected
    text is the completion), and the last cursor read (``after_cursor`` when none)."""
    from plaudit.services.feedback.export import FeedbackReader  # sqlalchemy: only when asked for

    examples = []
    cursor = after_cursor
    with FeedbackReader(database_url) as store:
        for item in store.export_sft(after_cursor, exclude_outliers=exclude_outliers):
            examples.append(SupervisedExample(item.prompt, item.completion))
            cursor = max(cursor, item.cursor)
    return examples, cursor
