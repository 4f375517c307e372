"""Reading preference records from JSON lines, shared by feedback import and the trainer.

Supported per-line formats (detected per line):

* HH-RLHF dialogues: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``;
  the prompt is the shared dialogue up to the last ``Assistant:`` turn.
* TRL preference format: ``{"prompt", "chosen", "rejected"}`` as strings, or in TRL's
  conversational form (lists of ``{"role", "content"}`` messages).
* Rankings: ``{"prompt", "completions": [best, ..., worst]}``.

Optional fields: ``margin``, ``weight``, ``annotator_id``, ``criterion`` (what was judged; absent,
null or empty: ``overall``) and ``tags`` (the prompt's tags, a list of strings; absent: none). Their
names are checked where they are stored (the feedback service's validation).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plaudit.services.common.textfmt import split_hh_dialogue

DEFAULT_CRITERION = "overall"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    weight: float = 1.0
    criterion: str = DEFAULT_CRITERION
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RankedCompletions:
    prompt: str
    completions: list[str]
    criterion: str = DEFAULT_CRITERION
    tags: tuple[str, ...] = ()


def messages_to_dialogue(messages: list[Any], field: str) -> str:
    """TRL conversational messages as an HH-style dialogue ending with an open assistant turn."""
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise ValueError(f"{field}[{i}] must be an object with a string 'content'")
        speaker = "Assistant" if message.get("role") == "assistant" else "Human"
        parts.append(f"\n\n{speaker}: {message['content']}")
    return "".join(parts) + "\n\nAssistant:"


def _completion_text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:  # conversational: the last (assistant) message
        last = value[-1]
        if isinstance(last, Mapping) and isinstance(last.get("content"), str):
            return str(last["content"])
    raise ValueError(f"'{field}' must be a string or a list of messages")


def _number(record: Mapping[str, Any], key: str, default: float) -> float:
    value = record.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"'{key}' must be a number")
    return float(value)


def _criterion(record: Mapping[str, Any]) -> str:
    value = record.get("criterion")
    if value is None or value == "":
        return DEFAULT_CRITERION
    if not isinstance(value, str):
        raise ValueError("criterion: must be a string")
    return value


def _tags(record: Mapping[str, Any]) -> tuple[str, ...]:
    value = record.get("tags")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("tags: must be a list of strings")
    for index, tag in enumerate(value):
        if not isinstance(tag, str):
            raise ValueError(f"tags[{index}]: must be a string, got {type(tag).__name__}")
    return tuple(value)


def parse_record(record: Any) -> PreferencePair | RankedCompletions:
    """One JSON record in any supported format; ValueError names what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError("each line must be a JSON object")
    prompt: Any = record.get("prompt")
    if isinstance(prompt, list):
        prompt = messages_to_dialogue(prompt, "prompt")
    if "completions" in record:
        completions = record["completions"]
        if not isinstance(prompt, str):
            raise ValueError("a ranking needs a string 'prompt'")
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            raise ValueError("'completions' must be a list of strings, best first")
        return RankedCompletions(prompt, list(completions), _criterion(record), _tags(record))
    if "chosen" not in record or "rejected" not in record:
        raise ValueError("record needs 'chosen' and 'rejected' (or 'prompt' and 'completions')")
    chosen = _completion_text(record["chosen"], "chosen")
    rejected = _completion_text(record["rejected"], "rejected")
    if prompt is None:
        prompt, chosen, rejected = split_hh_dialogue(chosen, rejected)
    elif not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string or a list of messages")
    return PreferencePair(
        prompt,
        chosen,
        rejected,
        _number(record, "margin", 0.0),
        _number(record, "weight", 1.0),
        _criterion(record),
        _tags(record),
    )


def parse_pair(record: Any) -> PreferencePair:
    """One record that must be a pair (HH or TRL format)."""
    parsed = parse_record(record)
    if not isinstance(parsed, PreferencePair):
        raise ValueError("expected a pair, got a ranking")
    return parsed


def read_pairs(path: Path, limit: int | None = None) -> Iterator[PreferencePair]:
    """Pairs from a JSONL file, in file order."""
    with path.open(encoding="utf-8") as fh:
        n = 0
        for line in fh:
            if not line.strip():
                continue
            yield parse_pair(json.loads(line))
            n += 1
            if limit is not None and n >= limit:
                return


def read_prompts(path: Path) -> list[str]:
    """Distinct prompts of a JSONL file, in file order: lines with only a ``prompt`` (a string or
    TRL messages) or any record :func:`parse_record` reads (its prompt). Errors name the line."""
    prompts: dict[str, None] = {}
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if isinstance(record, Mapping) and set(record) <= {"prompt", "metadata"}:
                    prompt = record.get("prompt")
                    if isinstance(prompt, list):
                        prompt = messages_to_dialogue(prompt, "prompt")
                    if not isinstance(prompt, str):
                        raise ValueError("'prompt' must be a string or a list of messages")
                else:
                    prompt = parse_record(record).prompt
            except ValueError as exc:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{number}: {exc}") from None
            if not prompt.strip():
                raise ValueError(f"{path}:{number}: empty prompt")
            prompts.setdefault(prompt)
    return list(prompts)
