"""Sharded training (``--strategy fsdp``, FSDP2) under ``torchrun --nproc-per-node 2`` on CPU
(gloo): a reward model trains to the accuracy one process reaches, with half the state per
process, and exports through the same parity gate; a killed rank's run resumes from its sharded
checkpoint and ends where an uninterrupted run does; DPO trains a tiny policy the same way."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from plaudit.services.common.errors import FailedPreconditionError
from plaudit.services.common.registry import ModelRegistry
from plaudit.trainer.config import RewardTrainingConfig
from plaudit.trainer.policy_config import DPOConfig
from plaudit.trainer.reward import PairSource, train_reward
from plaudit.trainer.sharding import DCP_METADATA, SHARDED_DIR
from tests.conftest import REPO, toy_pairs, write_jsonl

STEPS = 12  # two epochs of 11 steps (180 training pairs, 2 ranks x 8 pairs), cut at 12
COMMON: dict[str, Any] = {
    "max_length": 64,
    "epochs": 2,
    "max_steps": STEPS,
    "learning_rate": 2e-3,
    "batch_size": 8,
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAUDIT_")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "plaudit.cli", "train", *args, "--log-format", "json", "--no-progress",
        "--num-threads", "1",
    ]  # fmt: skip


def _reward_args(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]
    return _torchrun(
        "reward", *flags, "--backbone", str(checkpoint), "--data", str(data),
        "--output-dir", str(out), "--strategy", "fsdp", *extra,
    )  # fmt: skip


def _summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(summaries) == 1  # rank 0 alone reports
    return summaries[0]


def _logs(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def start_params(folder: Path) -> int:
    return sum(t.numel() for t in load_file(folder / "model.safetensors").values())


def _flat(folder: Path) -> torch.Tensor:
    weights = load_file(folder / "model.safetensors")
    return torch.cat([weights[k].flatten() for k in sorted(weights)])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("fsdp-data") / "toy.jsonl", toy_pairs(200))


def _rank_process(torchrun: subprocess.Popen[str], local_rank: int) -> psutil.Process | None:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@dataclass
class KilledAndResumed:
    root: Path  # run/ (the run folder) and registry/
    args: list[str]
    killed_stderr: str
    kept: Path | None  # a copy of the newest complete checkpoint after the kill
    resumed: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def killed_and_resumed(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, data: Path
) -> KilledAndResumed:
    """A two-rank FSDP run whose rank 1 is killed (SIGKILL) once the first sharded checkpoint
    is complete, then the same command again, which resumes, finishes and publishes."""
    root = tmp_path_factory.mktemp("fsdp")
    out = root / "run"
    args = _reward_args(
        tiny_checkpoint, data, out, "--checkpoint-every", "2", "--registry", str(root / "registry")
    )
    first = subprocess.Popen(
        args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed = None
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if any((p / DCP_METADATA).is_file() for p in (out / SHARDED_DIR).glob("step-*")):
            killed = _rank_process(first, 1)
            if killed is not None:
                killed.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    _, stderr = first.communicate(timeout=240)
    assert killed is not None, "no checkpoint before the run ended: " + stderr[-2000:]
    assert first.returncode != 0, "torchrun fails when a rank dies"
    saved = [p for p in sorted((out / SHARDED_DIR).glob("step-*")) if (p / DCP_METADATA).is_file()]
    kept = shutil.copytree(saved[-1], root / "kept" / saved[-1].name) if saved else None
    resumed = subprocess.run(
        args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    return KilledAndResumed(root, args, stderr, kept, resumed)


def test_a_killed_rank_resumes_from_the_sharded_checkpoint(
    killed_and_resumed: KilledAndResumed,
) -> None:
    run = killed_and_resumed
    assert run.kept is not None and (run.kept / "loop.json").is_file()
    summary = _summary(run.resumed)
    metrics = summary["metrics"]
    assert 2 <= metrics["train/resumed_from_step"] < STEPS
    assert metrics["train/steps"] == STEPS
    out = run.root / "run"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in records if "train/loss" in r]
    assert trained == list(range(1, STEPS + 1)), "each step logged once, in order"
    assert not (out / SHARDED_DIR).exists(), "a finished run drops its sharded checkpoints"
    logs = _logs(run.resumed.stderr)
    resumed = [r for r in logs if r.get("msg") == "resumed from a sharded checkpoint"]
    assert {r["rank"] for r in resumed} == {0, 1}  # every rank restored its shards


def test_fsdp_reward_matches_one_process_with_less_state_per_rank_and_exports(
    killed_and_resumed: KilledAndResumed, tiny_checkpoint: Path, data: Path, tmp_path: Path
) -> None:
    """The resumed run ends with the weights, held-out accuracy and loss of one process with
    the same global batch (model, AdamW, schedule and data position were all restored), holds
    half of that process's state on each rank, and publishes through the parity gate."""
    run = killed_and_resumed
    summary = _summary(run.resumed)
    logs = _logs(run.resumed.stderr)
    assert {r["rank"] for r in logs if r.get("msg") == "training process"} == {0, 1}
    shards = [r for r in logs if r.get("msg") == "fsdp"]  # two BertLayers and the root
    assert len(shards) == 2 and all(r["units"] == 3 for r in shards)
    # the export ran the parity gate (ONNX against the gathered PyTorch weights) and published
    manifest = ModelRegistry(run.root / "registry", "reward").verify(summary["version"])
    assert manifest.notes["world_size"] == 2 and manifest.notes["training"]["strategy"] == "fsdp"

    single = train_reward(
        RewardTrainingConfig(backbone=str(tiny_checkpoint), **COMMON, grad_accum=2),
        PairSource(files=(data,)),
        output_dir=tmp_path / "single",
    )
    assert single is not None
    metrics = summary["metrics"]
    assert metrics["train/steps"] == single.metrics["train/steps"] == STEPS
    assert metrics["eval/accuracy"] > metrics["eval/initial_accuracy"]
    assert metrics["eval/accuracy"] == pytest.approx(single.metrics["eval/accuracy"], abs=0.02)
    assert metrics["eval/loss"] == pytest.approx(single.metrics["eval/loss"], rel=0.01)
    start, fsdp, one = (
        _flat(tiny_checkpoint), _flat(run.root / "run" / "checkpoint"), _flat(single.checkpoint)
    )  # fmt: skip
    # the same updates up to float summation order (Adam magnifies it on near-zero gradients)
    assert float((fsdp - one).norm()) < 1e-2 * float((one - start).norm())
    # DDP keeps what one process holds on every rank; FSDP half of it (plus padding)
    held = metrics["memory/state_bytes_per_rank"]
    replica = single.metrics["memory/state_bytes_per_rank"]
    assert held < 0.55 * replica, (held, replica)
    assert metrics["memory/peak_rss_bytes_per_rank"] > 0
    written = json.loads((run.root / "run" / "metrics.json").read_text())
    assert written["metrics"]["memory/state_bytes_per_rank"] == held


def test_a_changed_setting_is_not_resumed(
    killed_and_resumed: KilledAndResumed, tiny_checkpoint: Path, data: Path, tmp_path: Path
) -> None:
    """A checkpoint from other settings is refused, naming what changed (here in one process,
    so the world size too)."""
    run = killed_and_resumed
    folder = tmp_path / "run"
    assert run.kept is not None
    shutil.copytree(run.kept, folder / SHARDED_DIR / run.kept.name)
    with pytest.raises(FailedPreconditionError, match="world_size, learning_rate changed"):
        train_reward(
            RewardTrainingConfig(
                backbone=str(tiny_checkpoint), **{**COMMON, "learning_rate": 1e-3}
            ),
            PairSource(files=(data,)),
            output_dir=folder,
        )


def test_settings_that_need_fsdp_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="mixed_precision"):
        DPOConfig(mixed_precision="bf16")
    DPOConfig(strategy="fsdp", mixed_precision="bf16")
    RewardTrainingConfig(mixed_precision="bf16")  # reward training: bf16 autocast under ddp
    cfg = RewardTrainingConfig(strategy="fsdp", mixed_precision="bf16")
    assert cfg.activation_checkpointing is None  # resolved when training: on for fsdp


def test_dpo_trains_a_tiny_policy_with_fsdp(tiny_policy_checkpoint: Path, tmp_path: Path) -> None:
    """DPO with the policy and its frozen reference both sharded (test_policy_losses.py's toy
    run, the global batch split over two ranks), gathered on rank 0 and published."""
    pairs = write_jsonl(tmp_path / "toy.jsonl", toy_pairs(64))
    registry = tmp_path / "registry"
    args = _torchrun(
        "policy", "--method", "dpo", "--strategy", "fsdp", "--base", str(tiny_policy_checkpoint),
        "--data", str(pairs), "--output-dir", str(tmp_path / "run"), "--registry", str(registry),
        "--max-length", "40", "--max-prompt-length", "24", "--batch-size", "4", "--epochs", "2",
        "--learning-rate", "5e-3", "--beta", "0.5", "--eval-fraction", "0.2",
        "--eval-prompts", "2", "--eval-max-new-tokens", "2",
    )  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    summary = _summary(proc)
    metrics = summary["metrics"]
    assert metrics["train/steps"] > 0 and math.isfinite(metrics["train/loss"])
    assert metrics["eval/initial_loss"] == pytest.approx(math.log(2), abs=1e-4)  # == reference
    assert metrics["eval/loss"] < metrics["eval/initial_loss"] - 0.1
    assert metrics["eval/accuracy"] >= 0.75
    assert metrics["eval/kl"] > 0  # rank 0's reference is the starting model again
    replica = 16 * start_params(tiny_policy_checkpoint)  # fp32 weights, gradients, AdamW m, v
    assert 0 < metrics["memory/state_bytes_per_rank"] < 0.55 * replica
    trained, start = _flat(tmp_path / "run" / "checkpoint"), _flat(tiny_policy_checkpoint)
    assert trained.shape == start.shape and not torch.equal(trained, start)
    manifest = ModelRegistry(registry, "policy").verify(summary["version"])
    assert manifest.notes["training"]["strategy"] == "fsdp"
