"""``plaudit demo``: its data ships with the project (a fresh clone in an empty directory has it,
no ``../shared``), and its table shows candidate and live figures side by side with n."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from plaudit.demo import (
    HH_PAIRS,
    PROBES,
    PolicyRow,
    WaveRow,
    load_pairs,
    policy_summary_lines,
    summary_lines,
)
from plaudit.services.common.process import free_port
from plaudit.services.common.registry import ModelManifest
from plaudit.trainer.promotion import gate_decision, policy_gate_decision
from tests.conftest import REPO

LONG_FLOAT = re.compile(r"\d\.\d{5,}")


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``git clone`` of the repository the tests run from, alone in an empty directory."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    if subprocess.run([git, "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip(f"{REPO} is not a git checkout with a commit")
    empty = tmp_path_factory.mktemp("empty")
    target = empty / "plaudit"
    subprocess.run([git, "clone", "--quiet", str(REPO), str(target)], check=True, timeout=300)
    assert sorted(p.name for p in empty.iterdir()) == ["plaudit"]  # no ../shared beside it
    return target


def _in_clone(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python in the clone, importing the clone's ``plaudit`` (not the installed one)."""
    env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_clone_ships_the_hh_pairs_with_licence_and_attribution(clone: Path) -> None:
    data = clone / HH_PAIRS.relative_to(REPO)
    for name in ("pairs.jsonl", "LICENSE", "README.md"):
        assert (data.parent / name).is_file(), f"{name} is not in a fresh clone"
    assert "MIT" in (data.parent / "LICENSE").read_text()
    assert "Anthropic" in (data.parent / "README.md").read_text()


def test_the_demo_data_path_works_from_the_clone(clone: Path) -> None:
    code = (
        "import json, plaudit.demo as d\n"
        "from plaudit.services.common.preference_files import read_pairs\n"
        "data = d.DemoSettings().data\n"
        "print(json.dumps({'module': d.__file__, 'data': str(data.resolve()),\n"
        "                  'pairs': len(list(read_pairs(data)))}))\n"
    )
    proc = _in_clone(clone, "-c", code)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    assert Path(found["module"]).resolve().is_relative_to(clone.resolve())
    assert Path(found["data"]).is_relative_to(clone.resolve())
    assert found["pairs"] >= 1_000 + PROBES  # the shipped HH pairs, spread over the waves


def test_the_demo_command_reads_its_data_in_the_clone_before_looking_for_services(
    clone: Path,
) -> None:
    """``plaudit demo`` from the clone gets past its data (the reported failure) and stops only
    because nothing serves (``--no-start``)."""
    feedback, reward = free_port(), free_port()
    proc = _in_clone(
        clone, "-m", "plaudit.cli", "demo", "--no-start",
        "--feedback-addr", f"127.0.0.1:{feedback}", "--reward-addr", f"127.0.0.1:{reward}",
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "nothing serves at" in output
    assert "No such file" not in output and "shared" not in output


def test_load_pairs_splits_probes_from_the_pool() -> None:
    probes, pool = load_pairs(HH_PAIRS)
    assert len(probes) == PROBES and len(pool) >= 1200
    assert all(p.chosen.strip() and p.rejected.strip() for p in [*probes, *pool])


def _manifest(version: str, promotion: dict[str, object] | None) -> ModelManifest:
    return ModelManifest(
        version=version, kind="reward", created_at=datetime.now(UTC), backbone="tiny",
        onnx_files={"fp32": "model.onnx"}, text_format={}, input_names=["input_ids"],
        metrics={"eval/accuracy": 0.4594594594594595, "eval/pairs": 74.0}, promotion=promotion,
    )  # fmt: skip


def test_the_summary_table_shows_candidate_and_live_side_by_side() -> None:
    first = gate_decision(
        candidate_accuracy=34 / 74, correct=34, n=74, live_version="v-boot", live_accuracy=0.5
    )
    second = gate_decision(
        candidate_accuracy=53 / 84, correct=53, n=84, live_version="v-boot", live_accuracy=0.5,
        candidate_ece=0.0412, live_ece=0.12345,
    )  # fmt: skip
    third = gate_decision(
        candidate_accuracy=43 / 75, correct=43, n=75, live_version="v-2", live_accuracy=0.6
    )
    rows = [
        WaveRow.from_manifest(i + 1, 400 * (i + 1), _manifest(f"v-{i + 1}", gate), 0.5, 60.0)
        for i, gate in enumerate([first, second, third])
    ]
    assert [r.promoted for r in rows] == [False, True, False]
    assert (rows[0].accuracy, rows[0].live_accuracy, rows[0].n) == (34 / 74, 0.5, 74)
    lines = summary_lines(rows)
    text = "\n".join(lines)
    assert not LONG_FLOAT.search(text)
    header = lines[0].split()
    assert header[:6] == ["wave", "pairs", "version", "candidate", "live", "n"]
    assert lines[1].split()[:7] == ["1", "400", "v-1", "0.459", "0.500", "74", "refused"]
    assert lines[2].split()[:9] == [
        "2", "800", "v-2", "0.631", "0.500", "84", "promoted", "0.041", "0.123"
    ]  # fmt: skip
    assert lines[1].split()[7:9] == ["n/a", "n/a"]  # no ECE recorded
    assert lines[3].split()[:7] == ["3", "1200", "v-3", "0.573", "0.600", "75", "refused"]
    assert lines[4].startswith("wave 1 refused: candidate 0.459 vs live 0.500 on the same 74")
    assert "not significantly above chance" in lines[4]
    assert lines[5].startswith("wave 3 refused: candidate 0.573 vs live 0.600 on the same 75")
    assert "does not beat live v-2" in lines[5] and len(lines) == 6


def test_a_version_without_a_gate_record_falls_back_to_its_metrics() -> None:
    row = WaveRow.from_manifest(1, 10, _manifest("v-old", None), 0.5, 1.0)
    assert (row.accuracy, row.live_accuracy, row.n, row.promoted) == (
        0.4594594594594595, None, 74, False,
    )  # fmt: skip
    assert summary_lines([row])[1].split()[3:6] == ["0.459", "n/a", "74"]


def test_the_policy_table_shows_candidate_and_live_policy_side_by_side() -> None:
    passed = policy_gate_decision(
        win_rate=0.625, lc_win_rate=0.6012345, kl=1.23456, wins=28, n=48, baseline="parent p-0"
    )
    longer = policy_gate_decision(
        win_rate=0.7, lc_win_rate=0.49, kl=0.5, wins=33, n=48, baseline="parent p-1"
    )
    manifests = [
        _manifest(f"p-{i + 1}", {**gate, "promoted": gate["passed"], "candidate_reward": 0.25,
                                 "baseline_reward": -0.125})
        for i, gate in enumerate([passed, longer])
    ]  # fmt: skip
    rows = [PolicyRow.from_manifest(i + 1, m, 90.0) for i, m in enumerate(manifests)]
    lines = policy_summary_lines(rows)
    assert not LONG_FLOAT.search("\n".join(lines))
    assert lines[0].split() == [
        "wave", "version", "win", "LC", "win", "KL", "reward", "live", "n", "gate", "time", "s"
    ]  # fmt: skip
    assert lines[1].split() == [
        "1", "p-1", "0.625", "0.601", "1.23", "+0.250", "-0.125", "48", "promoted", "90"
    ]  # fmt: skip
    assert lines[2].split()[:4] == ["2", "p-2", "0.700", "0.490"] and "refused" in lines[2]
    assert lines[3].startswith("policy p-2 refused: win rate 0.700 (length-controlled 0.490)")
    assert "length-controlled win rate 0.490 <= 0.5" in lines[3] and len(lines) == 4
