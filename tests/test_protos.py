"""The committed gRPC stubs match the .proto sources, and the protos pass buf lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "protos"))

from generate import generate  # noqa: E402


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc wrote nothing"
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = REPO / "protos" / rel
        assert committed.is_file(), f"{rel} is not committed; run python protos/generate.py"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{rel} is stale; run python protos/generate.py"
        )
    committed_all = {p.relative_to(REPO / "protos") for p in (REPO / "protos").rglob("*_pb2*.py*")}
    assert committed_all == {p.relative_to(tmp_path) for p in fresh}, "orphaned stubs"


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.fail("buf (PyPI buf-bin) is not installed; pip install -e '.[dev]'")
    result = subprocess.run(
        [buf, "lint"], cwd=REPO / "protos", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
