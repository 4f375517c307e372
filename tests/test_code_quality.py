"""ruff and mypy are part of the test suite, so CI fails on lint or type errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_lint_and_format() -> None:
    lint = run(str(BIN / "ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(str(BIN / "ruff"), "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy() -> None:
    # plaudit/ links services/, trainer/ and the stubs, so mypy sees every module by its import name
    paths = [p for p in ("plaudit", "tests", "bench", "protos/generate.py") if (REPO / p).exists()]
    result = run(str(BIN / "mypy"), *paths)
    assert result.returncode == 0, result.stdout + result.stderr
