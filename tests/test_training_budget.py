"""The training-time budget of the one training loop (``LoopSettings.deadline``) and of policy
training (``--max-train-seconds``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from plaudit.cli import main
from plaudit.trainer.loop import LoopSettings, Step, train_loop
from plaudit.trainer.report import RunReporter
from tests.conftest import ServerThread
from tests.test_policy_training import tiny_rl_command


def _fit(tmp_path: Path, deadline: float | None, total: int = 10) -> tuple[int, bool, int]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    evaluations = []

    def loss(net: torch.nn.Module, batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.nn.functional.mse_loss(net(x), y), {}

    def evaluate() -> dict[str, float]:
        evaluations.append(1)
        value = float(loss(model, 0)[0])
        return {"eval/accuracy": 1 / (1 + value), "eval/loss": value}

    settings = LoopSettings(
        learning_rate=0.1, weight_decay=0.0, warmup_ratio=0.0, deadline=deadline, eval_every=100
    )
    steps = [Step(micro=[0], items=8) for _ in range(total)]
    result = train_loop(
        model, steps, total, loss, settings, RunReporter(tmp_path), evaluate=evaluate
    )
    return result.steps, result.out_of_time, len(evaluations)


def test_a_spent_budget_stops_after_one_step_and_evaluates_there(tmp_path: Path) -> None:
    assert _fit(tmp_path, deadline=time.perf_counter()) == (1, True, 2)


def test_without_a_budget_every_step_runs(tmp_path: Path) -> None:
    assert _fit(tmp_path, deadline=None) == (10, False, 2)
    assert _fit(tmp_path, deadline=time.perf_counter() + 3600) == (10, False, 2)


def test_policy_training_stops_at_its_budget(
    tiny_policy_checkpoint: Path,
    reward_server: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = tiny_rl_command(
        tmp_path, tiny_policy_checkpoint, reward_server.address,
        "--steps", "200", "--max-train-seconds", "0.01", "--eval-prompts", "2",
        "--eval-max-new-tokens", "4",
    )  # fmt: skip
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["train/steps"] == 1 and metrics["train/out_of_time"] == 1.0
    assert metrics["train/seconds"] > 0.01
    # what the gate judged is kept in the run folder, one line per held-out prompt
    lines = (tmp_path / "run" / "eval_samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert len(samples) == metrics["eval/prompts"] == 2
    assert {"prompt", "completion", "reward", "baseline", "baseline_reward"} <= set(samples[0])
    wins = sum(
        1.0 if s["reward"] > s["baseline_reward"] else 0.5 if s["reward"] == s["baseline_reward"]
        else 0.0 for s in samples
    )  # fmt: skip
    assert wins / 2 == pytest.approx(metrics["eval/win_rate"])
