"""The same training command under ``torchrun --nproc-per-node 2`` (gloo on CPU): both ranks
train, rank 0 publishes, and the weights equal a one-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plaudit.services.common.registry import ModelRegistry
from plaudit.trainer.config import RewardTrainingConfig
from plaudit.trainer.reward import PairSource, train_reward
from tests.conftest import REPO, toy_pairs, write_jsonl


def test_torchrun_two_ranks_match_one_process_with_the_same_global_batch(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    data = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(200))
    common = {
        "backbone": str(tiny_checkpoint),
        "max_length": 64,
        "epochs": 1,
        "max_steps": 6,
        "learning_rate": 2e-3,
        "batch_size": 8,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("PLAUDIT_LEARNING_RATE", None)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "plaudit.cli", "train", "reward", *flags,
            "--grad-accum", "1",  # 2 ranks x 1 micro-batch per step
            "--data", str(data),
            "--registry", str(tmp_path / "registry"),
            "--output-dir", str(tmp_path / "ddp"),
            "--log-format", "json",
            "--no-progress",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    ranks = {r["rank"]: r for r in logs if r.get("msg") == "training process"}
    assert set(ranks) == {0, 1} and all(r["world_size"] == 2 for r in ranks.values())
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(summaries) == 1  # rank 0 alone reports and publishes
    registry = ModelRegistry(tmp_path / "registry", "reward")
    assert [m.version for m in registry.list_versions()] == [summaries[0]["version"]]
    assert registry.manifest(summaries[0]["version"]).notes["world_size"] == 2

    single = train_reward(
        RewardTrainingConfig(**common, grad_accum=2),
        PairSource(files=(data,)),
        output_dir=tmp_path / "single",
    )
    assert single is not None
    assert summaries[0]["metrics"]["train/steps"] == single.metrics["train/steps"] == 6

    def flat(path: Path) -> torch.Tensor:
        weights = load_file(path / "model.safetensors")
        return torch.cat([weights[k].flatten() for k in sorted(weights)])

    start, ddp, one = (
        flat(tiny_checkpoint),
        flat(tmp_path / "ddp" / "checkpoint"),
        flat(single.checkpoint),
    )
    # the same updates up to float summation order (Adam magnifies it on near-zero gradients)
    assert float((ddp - one).norm()) < 1e-2 * float((one - start).norm())
    assert float((ddp - one).abs().max()) < 5e-4
    for key in ("eval/accuracy", "eval/loss"):
        assert summaries[0]["metrics"][key] == pytest.approx(single.metrics[key], abs=1e-4)
