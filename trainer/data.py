"""Training data: preference pairs from files (the parsing is shared with feedback import)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from services.common.preference_files import PreferencePair, parse_pair, read_pairs

__all__ = ["PreferencePair", "parse_pair", "read_pairs", "reference_pairs_path"]


def reference_pairs_path() -> Path:
    """The bundled reference pairs (see trainer/data/README.md)."""
    return Path(str(resources.files("trainer") / "data" / "parity_pairs.jsonl"))
