"""The ``plaudit`` command line: export, registry commands, score, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from plaudit.cli import main
from plaudit.services.common.registry import ModelRegistry
from tests.conftest import ServerThread


def test_export_registry_promote_and_rollback(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = tmp_path / "reg"
    common = ["--registry", str(reg), "--log-level", "WARNING"]
    export = [
        "export",
        "reward",
        "--checkpoint",
        str(tiny_checkpoint),
        "--max-length",
        "64",
        "--reference-pairs",
        "8",
        *common,
    ]
    assert main([*export, "--promote"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["promoted"] is True and first["precision"] == "fp32"
    assert main(export) == 0
    second = json.loads(capsys.readouterr().out)
    assert ModelRegistry(reg).promoted() == first["version"]

    assert main(["registry", "list", "--json", *common]) == 0  # tables: tests/test_terminal.py
    listing = json.loads(capsys.readouterr().out)
    assert [(row["version"], row["promoted"]) for row in listing] == [
        (first["version"], True),
        (second["version"], False),
    ]

    assert main(["registry", "show", second["version"], "--json", *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == second["version"] and shown["parent"] == first["version"]

    assert main(["registry", "promote", second["version"], *common]) == 0
    assert ModelRegistry(reg).promoted() == second["version"]
    assert main(["registry", "rollback", *common]) == 0
    assert ModelRegistry(reg).promoted() == first["version"]


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "promote", "nope", "--registry", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["registry", "promote", "../x", "--registry", str(tmp_path)]) == 2
    assert "invalid version name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "reward", "--port", "not-a-number"])


def test_score_command_talks_to_a_running_server(
    tiny_registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(tiny_registry, tmp_path / "reg")
    server = ServerThread(registry=tmp_path / "reg", log_level="WARNING").start()
    try:
        code = main(["score", "--addr", server.address, "--prompt", "hi", "--completion", "yo"])
        assert code == 0
        reply = json.loads(capsys.readouterr().out)
        assert reply["model_version"] == ModelRegistry(tmp_path / "reg").promoted()
        assert isinstance(reply["reward"], float)
    finally:
        server.stop()
