"""Reward-model training configuration (no torch import: the CLI builds its flags from it).

Each field, with its default, bound and help text, is declared once, here: ``plaudit train
reward`` mixes the class into its settings, so every field is also a flag and a ``PLAUDIT_``
environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

DEFAULT_RUNS_DIR = Path(".plaudit/runs")  # one folder per run: checkpoint, metrics, plots

Schedule = Literal["cosine", "linear", "constant"]
StoppingMetric = Literal["accuracy", "loss"]
Device = Literal["auto", "cpu", "cuda"]
Strategy = Literal["ddp", "fsdp"]
MixedPrecision = Literal["auto", "bf16", "fp32"]


class TrainingConfig(BaseModel):
    """Base of the training configs: validated on construction, unknown fields rejected.

    The config dict has the settings' type so that settings classes can mix configs in. The
    fields declared here are every trainer's (``train reward`` and ``train policy``): how the
    processes of a ``torchrun`` share the model (:mod:`plaudit.trainer.sharding`), and the
    sharded checkpoints a killed run resumes from.
    """

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    strategy: Strategy = Field(
        "ddp",
        description="under torchrun: ddp (a full replica per process) or fsdp (FSDP2: "
        "parameters, gradients and optimizer states sharded over the processes)",
    )
    activation_checkpointing: bool | None = Field(
        None, description="recompute each block's activations in backward (default: fsdp only)"
    )
    mixed_precision: MixedPrecision = Field(
        "auto",
        description="fsdp: compute and all-gather dtype (gradients reduce, weights and AdamW "
        "stay fp32); reward training also runs its forward passes under bf16 autocast with "
        "bf16 (on CPU: worth it with avx512_bf16 or AMX, docs/benchmarks.md); auto: bf16 on a "
        "GPU that has it, else fp32",
    )
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="optimizer steps between sharded checkpoints in the run folder (0: off)",
    )
    resume: bool = Field(
        True, description="continue from the run folder's last sharded checkpoint when it has one"
    )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, as recorded in runs and versions."""
        return self.model_dump()


class RewardTrainingConfig(TrainingConfig):
    """How a reward model is trained; recorded, resolved, in every version it produces.

    Batches: a micro-batch holds at most ``batch_size`` pairs and, when ``batch_tokens`` is set,
    at most that many padded tokens (chosen and rejected rows together). An optimizer step
    accumulates ``grad_accum`` micro-batches on each of the ``world_size`` processes, so the
    global batch is ``world_size * grad_accum`` micro-batches.
    """

    backbone: str = Field("minilm", description="minilm, smollm2 or a HF checkpoint folder")
    max_length: int = Field(512, ge=8, description="max tokens per item (truncation keeps end)")
    epochs: int = Field(1, ge=1, description="passes over the training pairs")
    max_steps: int | None = Field(None, ge=0, description="optimizer steps at most (None: epochs)")
    learning_rate: float = Field(5e-5, ge=0, description="AdamW peak rate")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with linear warmup")
    schedule: Schedule = Field("cosine", description="learning-rate decay after warmup, to 0")
    batch_size: int = Field(16, ge=1, description="pairs per micro-batch at most")
    batch_tokens: int | None = Field(
        None, ge=16, description="padded tokens per micro-batch at most (2 rows per pair)"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not biases, norms)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: off)")
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of prompts held out (by prompt hash)"
    )
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0: each epoch)")
    early_stopping_patience: int = Field(
        2, ge=0, description="evaluations without improvement (0: off)"
    )
    early_stopping_metric: StoppingMetric = Field(
        "accuracy", description="held-out metric that picks the best weights"
    )
    use_margin: bool = Field(True, description="subtract pair margins inside the loss (Llama 2)")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="take each preference label as flipped with this probability (conservative "
        "Bradley-Terry loss, as cDPO); 0: the plain loss",
    )
    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="reward centering weight (Eisenstein et al. 2023)"
    )
    disable_dropout: bool = Field(True, description="train without dropout, as TRL does")
    group_window: int = Field(64, ge=1, description="micro-batches length-grouped together")
    ensemble_heads: int = Field(
        1,
        ge=1,
        le=32,
        description="reward heads on one backbone, each fitted on its own bootstrap of the pairs "
        "(> 1: an ensemble whose spread Score and Compare report; 1: one reward model)",
    )
    seed: int = Field(0, description="seed for head, shuffles and batches")
    device: Device = Field("auto", description="training device")
    num_threads: int = Field(
        0, ge=0, description="torch threads per process (0: cores / local processes)"
    )
    promotion_significance: float = Field(
        0.05,
        gt=0,
        le=1,
        description="gate floor: held-out accuracy must beat 0.5 at this level (one-sided "
        "binomial test)",
    )
    promotion_max_ece: float | None = Field(
        None,
        ge=0,
        le=1,
        description="gate: refuse a candidate whose calibrated expected calibration error on "
        "the held-out pairs is above this (unset: ECE is shown, not gated)",
    )
