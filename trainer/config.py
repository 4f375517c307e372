"""Reward-model training configuration (no torch import: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Schedule = Literal["cosine", "linear", "constant"]
StoppingMetric = Literal["accuracy", "loss"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass
class RewardTrainingConfig:
    """How a reward model is trained; recorded, resolved, in every version it produces.

    Batches: a micro-batch holds at most ``batch_size`` pairs and, when ``batch_tokens`` is set,
    at most that many padded tokens (chosen and rejected rows together). An optimizer step
    accumulates ``grad_accum`` micro-batches on each of the ``world_size`` processes, so the
    global batch is ``world_size * grad_accum`` micro-batches.
    """

    backbone: str = "minilm"  # minilm | smollm2 | a Hugging Face checkpoint folder
    max_length: int = 512  # tokens per (prompt, completion); truncation keeps the end
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps at most (None: run all epochs)
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1  # share of the steps with linear warmup from 0
    schedule: Schedule = "cosine"  # decay after warmup, to 0 at the last step
    batch_size: int = 16  # pairs per micro-batch at most
    batch_tokens: int | None = None  # padded tokens per micro-batch at most (2 rows per pair)
    grad_accum: int = 1
    weight_decay: float = 0.01  # AdamW; never on biases and norms
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_fraction: float = 0.1  # share of prompts held out (by prompt hash, see objective)
    eval_every: int = 0  # optimizer steps between evaluations; 0: after each epoch
    early_stopping_patience: int = 2  # evaluations without improvement; 0 disables
    early_stopping_metric: StoppingMetric = "accuracy"
    use_margin: bool = True  # subtract the pair's margin inside the loss (Llama 2)
    center_rewards_coefficient: float = 0.0  # lambda * mean((r_c + r_r)^2), Eisenstein 2023
    disable_dropout: bool = True  # deterministic rewards during training, as TRL does
    group_window: int = 64  # micro-batches whose pairs are length-grouped together
    seed: int = 0
    device: Device = "auto"
    num_threads: int = 0  # torch threads per process; 0: cores / local processes

    def __post_init__(self) -> None:
        checks = {
            "max_length": self.max_length >= 8,
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 0,
            "learning_rate": self.learning_rate >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "batch_size": self.batch_size >= 1,
            "batch_tokens": self.batch_tokens is None or self.batch_tokens >= 16,
            "grad_accum": self.grad_accum >= 1,
            "eval_fraction": 0 < self.eval_fraction < 1,
            "eval_every": self.eval_every >= 0,
            "early_stopping_patience": self.early_stopping_patience >= 0,
            "group_window": self.group_window >= 1,
            "num_threads": self.num_threads >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(bad)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
