"""What a person at the terminal sees: registry and feedback tables (and their ``--json``),
``plaudit status`` against running services, log formats and warnings said once."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from plaudit.cli import main
from plaudit.services.common.logging import SAID_ONCE_ENV, configure_logging, resolve_format
from plaudit.services.common.process import free_port
from plaudit.services.common.registry import ModelManifest, ModelRegistry
from plaudit.status import (
    StatusSettings,
    collect,
    print_status,
    registry_report,
    status_tables,
)
from plaudit.tables import fraction, number, render
from plaudit.up import UpSettings
from tests.conftest import ServerThread, write_jsonl

BASE = {
    "kind": "reward",
    "backbone": "sentence-transformers/all-MiniLM-L6-v2",
    "onnx_files": {"fp32": "model.onnx"},
    "text_format": {},
    "input_names": ["input_ids"],
}


def small_registry(root: Path) -> Path:
    """Three versions: a bootstrap, one the gate promoted, one it refused."""
    registry = ModelRegistry(root, "reward")
    source = root.parent / "source"
    source.mkdir(exist_ok=True)
    (source / "model.onnx").write_bytes(b"not a graph: never loaded here")
    at = datetime(2026, 11, 30, 5, 0, tzinfo=UTC)
    registry.publish(source, ModelManifest(version="reward-1", created_at=at, **BASE))
    registry.publish(
        source,
        ModelManifest(
            version="reward-2",
            parent="reward-1",
            created_at=at.replace(minute=10),
            metrics={"eval/accuracy": 0.6306306306306306, "eval/pairs": 111.0, "train/steps": 23.0},
            data_cursor="4",
            promotion={  # a record from before the significance floor
                "promoted": True,
                "candidate_accuracy": 0.6306306306306306,
                "current_version": "reward-1",
                "current_accuracy": 0.4594594594594595,
                "tolerance": 0.01,
                "eval_pairs": 111,
            },
            **BASE,
        ),
    )
    registry.publish(
        source,
        ModelManifest(
            version="reward-3",
            parent="reward-2",
            created_at=at.replace(minute=20),
            metrics={"eval/accuracy": 0.6, "eval/pairs": 120.0},
            data_cursor="8",
            promotion={
                "promoted": False,  # the gate's record with its significance floor
                "candidate_accuracy": 0.6,
                "candidate_correct": 72,
                "current_version": "reward-2",
                "current_accuracy": 0.65,
                "eval_pairs": 120,
                "beats_live": False,
                "p_value": 0.016458,
                "above_chance": True,
                "significance": 0.05,
                "tolerance": 0.0,
            },
            **BASE,
        ),
    )
    registry.promote("reward-1")
    registry.promote("reward-2")
    return root


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_numbers_are_rounded_for_people() -> None:
    assert fraction(0.6306306306306306) == "0.631" and fraction(None) == "-"
    assert number(23.0) == "23" and number(12345) == "12,345" and number(0.25) == "0.250"
    assert number(float("nan")) == "-" and number(3.14159) == "3.14" and number(1234.5) == "1,234"


def test_registry_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = ["--registry", str(small_registry(tmp_path / "reg")), "--log-level", "WARNING"]
    assert main(["registry", "list", *reg]) == 0
    listing = lines(capsys.readouterr().out)
    assert listing[2] == " " + "─" * (max(map(len, listing)) - 1)  # as wide as the widest row
    assert listing == [
        "reward models (3; * promoted)",
        "     version    created            backbone           precision   held-out acc (n)   gate      why",  # noqa: E501
        listing[2],
        "     reward-1   2026-11-30 05:00   all-MiniLM-L6-v2   fp32        -                  -         no gate (exported or promoted by hand)",  # noqa: E501
        " *   reward-2   2026-11-30 05:10   all-MiniLM-L6-v2   fp32        0.631 (111)        passed    0.631 >= live 0.459 - tolerance 0.01",  # noqa: E501
        "     reward-3   2026-11-30 05:20   all-MiniLM-L6-v2   fp32        0.600 (120)        refused   0.600 <= live 0.650; above chance (p=0.016)",  # noqa: E501
    ]
    assert main(["registry", "list", "--json", *reg]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["promoted"], r["gate"]) for r in rows] == [
        ("reward-1", False, "-"),
        ("reward-2", True, "passed"),
        ("reward-3", False, "refused"),
    ]
    assert rows[1]["held_out"] == 0.6306306306306306 and rows[1]["held_out_n"] == 111

    assert main(["registry", "show", "reward-3", *reg]) == 0
    shown = lines(capsys.readouterr().out)
    assert shown[0] == "reward model reward-3"
    assert " promoted            no" in shown
    assert " held-out accuracy   0.600 (n 120)" in shown
    assert " gate                refused: 0.600 <= live 0.650; above chance (p=0.016)" in shown
    assert " eval/accuracy       0.600" in shown and " eval/pairs          120" in shown
    assert main(["registry", "show", "reward-3", "--json", *reg]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["version"] == "reward-3" and manifest["parent"] == "reward-2"


STATUS_SHELL = {  # a report with nothing running: only its registry part is looked at
    "services": {},
    "feedback": {"error": "not running"},
    "labelling_page": {"url": None},
}


def test_status_lists_named_models_beside_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = small_registry(tmp_path / "reg")
    safety = ModelRegistry(root, "reward", name="safety")
    at = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
    safety.publish(tmp_path / "source", ModelManifest(version="reward-s1", created_at=at, **BASE))
    safety.promote("reward-s1")
    report = registry_report(str(root))
    assert report["reward"]["promoted"] == "reward-2" and report["policy"]["promoted"] is None
    assert report["named"] == {
        "reward/safety": {
            "promoted": "reward-s1",
            "versions": 1,
            "data_cursor": None,
            "last_training": None,
        }
    }
    render(sys.stdout, *status_tables({**STATUS_SHELL, "registry": report}))
    screen = capsys.readouterr().out
    assert re.search(r"reward/safety\s+reward-s1\s+none yet", screen)
    assert re.search(r"reward\s+reward-2\s+reward-3\s+0\.600 \(120\)\s+refused", screen)


def test_registry_errors_say_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["registry", "list", "--registry", str(tmp_path / "none")]) == 2
    assert "`plaudit up` creates one" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["registry", "list", "--registry", str(tmp_path / "empty")]) == 0
    assert "`plaudit export reward --promote` publishes one" in capsys.readouterr().err
    reg = small_registry(tmp_path / "reg")
    assert main(["registry", "show", "reward-9", "--registry", str(reg)]) == 2
    assert "`plaudit registry list` shows the versions" in capsys.readouterr().err


def _votes(path: Path, second_annotator: bool) -> Path:
    rows = [
        {"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "annotator_id": "alice"}
        for i in range(6)
    ]
    if second_annotator:  # bob agrees on three of alice's items and contradicts her on one
        rows += [
            {"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "annotator_id": "bob"}
            for i in range(3)
        ]
        rows.append({"prompt": "q3", "chosen": "bad3", "rejected": "good3", "annotator_id": "bob"})
    return write_jsonl(path, rows)


def test_feedback_stats_tables_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--database-url", f"sqlite:///{tmp_path / 'fb.db'}", "--log-level", "WARNING"]
    assert main(["feedback", "import", str(_votes(tmp_path / "one.jsonl", False)), *db]) == 0
    capsys.readouterr()
    assert main(["feedback", "stats", *db]) == 0
    why = "- (needs two annotators on the same items; 1 annotator so far)"
    assert lines(capsys.readouterr().out) == [
        "feedback",
        " records              6 (comparison 6)",
        " annotators           1",
        " judgements           6",
        " pairs derived        6",
        f" raw agreement        {why}",
        f" kappa                {why}",
        " contradicted items   0",
        " tied items           0",
        " annotator   records   compared votes   disagreement   p   outlier",
        " " + "─" * 65,
        " alice       6         0                -              -",
    ]
    assert main(["feedback", "stats", "--json", *db]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kappa"] is None and report["records"] == 6 and report["annotators"] == 1
    assert report["by_kind"] == {"comparison": 6} and report["outliers"] == []

    assert main(["feedback", "import", str(_votes(tmp_path / "two.jsonl", True)), *db]) == 0
    capsys.readouterr()
    assert main(["feedback", "stats", *db]) == 0
    out = lines(capsys.readouterr().out)
    assert " raw agreement        0.750 over 4 items" in out
    assert " kappa                0.000 (Cohen's)" in out
    assert " contradicted items   1" in out
    assert " bob         4         4                0.250          0.684" in out


def test_feedback_stats_on_a_missing_database_says_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    assert main(["feedback", "stats", "--database-url", url]) == 2
    assert "`plaudit feedback import`" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()  # never an empty new database


def test_status_of_running_services(
    tiny_registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = tmp_path / "home" / "registry"  # where `plaudit up --home HOME` keeps it
    shutil.copytree(tiny_registry, registry)
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    assert (
        main(["feedback", "import", str(_votes(tmp_path / "v.jsonl", True)), "--database-url", db])
        == 0
    )
    capsys.readouterr()
    feedback = ServerThread("feedback", database_url=db, log_level="WARNING").start()
    reward = ServerThread(registry=registry, log_level="WARNING").start()
    try:
        settings = StatusSettings(
            registry=str(registry),
            reward_port=reward.server.port,
            reward_metrics_port=reward.server.metrics_port,
            feedback_port=feedback.server.port,
            feedback_metrics_port=feedback.server.metrics_port,
            feedback_http_port=feedback.server.http_port,
            generation_port=free_port(),
            generation_metrics_port=free_port(),
            retrain_min_pairs=30,
            sample_s=0.2,
        )
        report = collect(settings)
        services = report["services"]
        promoted = ModelRegistry(registry).promoted()
        assert services["reward"]["health"] == "SERVING"
        assert services["reward"]["model_version"] == promoted
        assert services["reward"]["calibration_temperature"] == 1.0  # an uncalibrated export
        assert (
            services["reward"]["heldout_pairs"] == 0 and services["reward"]["heldout_ece"] is None
        )
        assert services["reward"]["queue_depth"] == 0
        assert services["reward"]["requests_per_s"] == 0
        assert services["feedback"]["health"] == "SERVING"
        assert services["generation"]["health"] == "not running"
        assert report["feedback"]["records"] == 10
        assert report["feedback"]["pairs_waiting"] == 5  # the tiny version has no data cursor
        assert report["registry"]["reward"]["promoted"] == promoted
        assert report["labelling_page"]["reachable"] is True

        render(sys.stdout, *status_tables(report))
        screen = capsys.readouterr().out
        assert f"reward       127.0.0.1:{reward.server.port}   serving" in screen
        assert "generation" in screen and "not running" in screen
        assert "waiting for retraining   5 new pairs; retraining starts at 30" in screen
        assert "raw agreement            0.750 over 4 items" in screen
        assert f"labelling page: http://127.0.0.1:{feedback.server.http_port}/" in screen

        flags = [
            "--registry", str(registry), "--sample-s", "0",
            "--reward-port", str(reward.server.port),
            "--reward-metrics-port", str(reward.server.metrics_port),
            "--feedback-port", str(feedback.server.port),
            "--feedback-metrics-port", str(feedback.server.metrics_port),
            "--generation-port", str(free_port()), "--generation-metrics-port", "0",
        ]  # fmt: skip
        assert main(["status", "--json", *flags]) == 0  # generation is optional
        assert (
            json.loads(capsys.readouterr().out)["services"]["reward"]["model_version"] == promoted
        )

        up = UpSettings(  # what `plaudit up` prints when it is ready and after each retraining
            home=tmp_path / "home",
            **{
                name: getattr(settings, name)
                for name in StatusSettings.model_fields
                if "port" in name
            },
            retrain_min_pairs=30,
        )
        print_status(up)
        screen = capsys.readouterr().out
        assert f"reward       127.0.0.1:{reward.server.port}   serving" in screen
        assert "waiting for retraining   5 new pairs; retraining starts at 30" in screen
    finally:
        reward.stop()
        feedback.stop()
    flags = ["--reward-port", str(free_port()), "--feedback-port", str(free_port())]
    assert main(["status", "--sample-s", "0", "--registry", str(registry), *flags]) == 1
    assert "start the system with `plaudit up`" in capsys.readouterr().err


def test_a_client_command_without_its_service_says_what_to_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    addr = f"127.0.0.1:{free_port()}"
    assert main(["score", "--addr", addr, "--prompt", "p", "--completion", "c"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plaudit: error: UNAVAILABLE") and "`plaudit up` starts" in err


def test_log_format_follows_the_terminal_unless_told(tmp_path: Path) -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert resolve_format("auto", terminal) == "text"
        assert resolve_format("json", terminal) == "json"
    os.close(leader)
    with (tmp_path / "log").open("w") as file:
        assert resolve_format("auto", file) == "json"
        assert resolve_format("text", file) == "text"


ONCE = (
    "import logging; from plaudit.services.common.logging import configure_logging; "
    "configure_logging('INFO', 'json'); log = logging.getLogger('x'); "
    "[log.warning('auth off', extra={'once': 'auth-disabled'}) for _ in range(3)]; "
    "log.warning('other')"
)


def test_a_warning_is_said_once_per_process_tree() -> None:
    env = {k: v for k, v in os.environ.items() if k != SAID_ONCE_ENV}
    first = subprocess.run([sys.executable, "-c", ONCE], env=env, capture_output=True, text=True)
    said = [json.loads(line)["msg"] for line in first.stderr.splitlines()]
    assert said == ["auth off", "other"]
    child = subprocess.run(  # a child of a process that said it already stays quiet
        [sys.executable, "-c", ONCE],
        env={**env, SAID_ONCE_ENV: "auth-disabled"},
        capture_output=True,
        text=True,
    )
    assert [json.loads(line)["msg"] for line in child.stderr.splitlines()] == ["other"]


def test_the_parent_marks_a_said_warning_for_its_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SAID_ONCE_ENV, raising=False)
    configure_logging("INFO", "json")
    try:
        logging.getLogger("x").warning("auth off", extra={"once": "auth-disabled"})
        assert "auth-disabled" in os.environ[SAID_ONCE_ENV].split(",")
    finally:
        for handler in list(logging.getLogger().handlers):
            if getattr(handler, "_plaudit", False):
                logging.getLogger().removeHandler(handler)


def test_status_screen_says_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    report = {
        "services": {
            "feedback": {"address": "h:1", "health": "not running", "metrics": "not reachable"},
            "reward": {
                "address": "h:2",
                "health": "SERVING",
                "model_version": "reward-2",
                "last_swap_error": "version reward-3: sha256 of model.onnx is 0a1b…",
                "queue_depth": 3,
                "requests_per_s": 12.25,
            },
        },
        "feedback": {"error": "not running", "retrain_min_pairs": 200},
        "registry": {"reward": {"error": "permission denied"}, "policy": {"promoted": None}},
        "labelling_page": {"url": None, "reachable": False},
    }
    render(sys.stdout, *status_tables(report))
    screen = capsys.readouterr().out
    assert "(swap failed: version reward-3: sha256 of model.onnx is 0a1b…)" in screen
    assert re.search(r" reward\s+h:2\s+serving\s+reward-2 .*\s3\s+12\.2\n", screen)
    assert re.search(r" feedback\s+h:1\s+not running\s+-\n", screen)
    assert "feedback service   not running" in screen
    assert re.search(r" reward\s+permission denied\n", screen)
    assert re.search(r" policy\s+-\s+none yet\n", screen)
    assert "labelling page: on a free port (see the feedback service's log)" in screen

    stats = {"records": 500, "records_by_kind": {}, "annotators": [{"annotator_id": "a"}]}
    waiting = {**stats, "pairs_derived": 500, "pairs_waiting": 450, "retrain_min_pairs": 200}
    report["feedback"] = {**waiting, "overlapping_items": 0}
    render(sys.stdout, *status_tables(report))
    assert "450 new pairs; a retraining is due (or running)" in capsys.readouterr().out


def test_a_server_without_a_model_says_what_to_run_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != SAID_ONCE_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "plaudit.cli", "serve", "reward", "--registry", str(tmp_path),
         "--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", "0",
         "--poll-interval-s", "0.1", "--log-format", "json", "--auth-disabled"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen: list[dict[str, object]] = []
        for line in proc.stderr:
            seen.append(json.loads(line))
            if "no promoted reward model" in str(seen[-1]["msg"]):
                break
        time.sleep(1.0)  # ten more polls
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=60)
    seen += [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    waiting = [r for r in seen if "no promoted reward model" in str(r["msg"])]
    assert len(waiting) == 1 and waiting[0]["level"] == "WARNING"
    assert "`plaudit export reward --promote" in str(waiting[0]["msg"])
    assert sum("authentication is DISABLED" in str(r["msg"]) for r in seen) == 1
