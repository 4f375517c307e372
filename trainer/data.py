"""Reading preference pairs from files: HH-RLHF dialogues or TRL prompt/chosen/rejected JSONL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from services.common.textfmt import split_hh_dialogue


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    weight: float = 1.0


def parse_pair(record: dict[str, object]) -> PreferencePair:
    """One JSON record in either supported format."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("record needs string fields 'chosen' and 'rejected'")
    prompt = record.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = split_hh_dialogue(chosen, rejected)
    elif not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    margin = record.get("margin", 0.0)
    weight = record.get("weight", 1.0)
    return PreferencePair(prompt, chosen, rejected, float(margin or 0.0), float(weight or 1.0))  # type: ignore[arg-type]


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


def reference_pairs_path() -> Path:
    """The bundled reference pairs (see trainer/data/README.md)."""
    return Path(str(resources.files("trainer") / "data" / "parity_pairs.jsonl"))
