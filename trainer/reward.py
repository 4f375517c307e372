"""Train a reward model on preference pairs and publish it to the registry.

``train_reward`` reads pairs (JSONL files or the feedback store), holds out a tenth of the prompts,
trains a one-label sequence classifier with the Bradley-Terry loss (:mod:`trainer.loop`), saves
the best checkpoint into the run folder, exports it with :func:`trainer.export.export_reward`
(ONNX parity against PyTorch on the held-out pairs, normalisation measured on them) and
publishes it with its metrics, data cursor and resolved training config; with ``promote`` the
accuracy gate (:mod:`trainer.promotion`) decides whether it replaces the promoted version.

Run it alone or as ``torchrun --nproc-per-node N -m services.cli train reward ...``: rank 0 reads
the data and does everything after training; all ranks train (see :mod:`trainer.distributed`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.registry import ModelManifest, ModelRegistry, new_version_id
from services.common.textfmt import RewardTextEncoder, TextFormat
from trainer.backbones import resolve_backbone
from trainer.batches import encode_pairs
from trainer.config import RewardTrainingConfig
from trainer.data import TrainingData, load_feedback_pairs, load_file_pairs
from trainer.distributed import DistEnv, barrier, broadcast, init_distributed, shutdown
from trainer.export import (
    TRAINING_RECORD,
    ExportConfig,
    export_reward,
    load_reward_model,
    text_format_for,
)
from trainer.loop import LoopResult, train_loop
from trainer.objective import split_by_prompt
from trainer.promotion import DEFAULT_TOLERANCE, AccuracyGate
from trainer.report import RunReporter

log = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path(".plaudit/runs")
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class PairSource:
    """Where the pairs come from: JSONL ``files``, or the feedback store at ``database_url``
    read after ``after_cursor`` (or, with ``since_parent_cursor``, after the parent version's
    recorded ``data_cursor``)."""

    files: tuple[Path, ...] = ()
    database_url: str | None = None
    after_cursor: int = 0
    since_parent_cursor: bool = False
    exclude_outliers: bool = False

    def resolve_cursor(
        self, registry: ModelRegistry | None, parent: str | None
    ) -> tuple[int, str | None]:
        """The store cursor to read after, and the parent version it continues from; refuses
        anything but exactly one of files and a database."""
        if bool(self.files) == bool(self.database_url):
            raise InvalidArgumentError("data", "give either data files or a feedback database URL")
        if self.files or not self.since_parent_cursor:  # a parent's cursor is a store position
            return self.after_cursor, parent
        parent = parent or (registry.promoted() if registry else None)
        if registry is None or parent is None:
            raise FailedPreconditionError("--since-cursor needs a registry with a parent version")
        cursor = registry.manifest(parent).data_cursor
        if cursor is None:
            raise FailedPreconditionError(f"parent version {parent} records no data cursor")
        return int(cursor), parent


@dataclass(frozen=True)
class PublishOptions:
    promote: bool = False  # let the accuracy gate promote the new version
    promotion_tolerance: float = DEFAULT_TOLERANCE
    quantize: str | None = None  # None or "int8"
    parent: str | None = None  # default: the promoted version


@dataclass
class RewardTrainingResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float]
    data_cursor: str | None
    train_pairs: int
    eval_pairs: int
    manifest: ModelManifest | None = None  # None when no registry was given
    model: PreTrainedModel | None = field(default=None, repr=False)  # the trained model

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "version": m.version if m else None,
            "promoted": bool(m and m.promotion and m.promotion.get("promoted")),
            "promotion": m.promotion if m else None,
            "metrics": self.metrics,
            "data_cursor": self.data_cursor,
            "train_pairs": self.train_pairs,
            "eval_pairs": self.eval_pairs,
            "run_dir": str(self.run_dir),
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainable(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` as plain fp32 weights that train and save like any checkpoint's.

    A GGUF backbone (smollm2) loads fully dequantized but keeps its GGUF quantizer attached,
    which makes ``save_pretrained`` refuse; with no packed GGUF layers left, drop it. Weights
    that are still quantized cannot be fully fine-tuned: refuse them.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    method = getattr(quantizer.quantization_config, "quant_method", None)
    if getattr(method, "value", method) != "gguf" or getattr(quantizer, "packed_modules", None):
        raise InvalidArgumentError("backbone", "quantized weights cannot be fully fine-tuned")
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model


def serving_encoder(tokenizer: Any, fmt: TextFormat) -> RewardTextEncoder:
    """The encoder serving will build: from the tokenizer.json the registry version will hold."""
    with tempfile.TemporaryDirectory(prefix="plaudit-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return RewardTextEncoder.from_files(Path(tmp) / "tokenizer.json", fmt)


def load_training_data(
    source: PairSource, registry: ModelRegistry | None, parent: str | None
) -> tuple[TrainingData, str | None]:
    """The pairs, and the parent version they continue from (when reading after its cursor)."""
    after, parent = source.resolve_cursor(registry, parent)
    if source.files:
        return load_file_pairs(source.files), parent
    assert source.database_url is not None
    data = load_feedback_pairs(source.database_url, after, exclude_outliers=source.exclude_outliers)
    if not data.pairs:
        raise FailedPreconditionError(f"no feedback pairs after cursor {after}")
    return data, parent


def _prepare(
    source: PairSource, registry: ModelRegistry | None, publish: PublishOptions, out: Path | None
) -> dict[str, Any]:
    """Rank 0's reading of the data, sent to every rank (so all train on the same snapshot)."""
    data, parent = load_training_data(source, registry, publish.parent)
    run_id = new_version_id("run")
    return {
        "data": data,
        "parent": parent,
        "run_id": run_id,
        "run_dir": out or DEFAULT_RUNS_DIR / run_id,
    }


def _metrics(loop: LoopResult, train_pairs: int) -> dict[str, float]:
    """The manifest's metrics; undefined ones (no steps taken: no train loss) are left out."""
    metrics = {
        **loop.best,
        "eval/initial_accuracy": loop.initial["eval/accuracy"],
        "eval/initial_loss": loop.initial["eval/loss"],
        "train/loss": loop.train_loss,
        "train/pairs_per_s": loop.pairs_per_s,
        "train/wall_s": loop.wall_s,
        "train/steps": float(loop.steps),
        "train/best_step": float(loop.best_step),
        "train/epochs": loop.epochs,
        "train/pairs": float(train_pairs),
    }
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def save_checkpoint(
    model: PreTrainedModel, tokenizer: Any, path: Path, record: dict[str, Any]
) -> None:
    """Weights, tokenizer and the training record (which marks the head as trained)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / TRAINING_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")


def train_reward(
    cfg: RewardTrainingConfig,
    source: PairSource,
    registry: ModelRegistry | None = None,
    *,
    publish: PublishOptions | None = None,
    output_dir: Path | None = None,
    progress: bool = False,
) -> RewardTrainingResult | None:
    """Train, save, and (given a registry) export and publish; None on ranks other than 0."""
    env = init_distributed(cfg.device, cfg.num_threads)
    try:
        return _train(env, cfg, source, registry, publish or PublishOptions(), output_dir, progress)
    finally:
        shutdown(env)


def _train(
    env: DistEnv,
    cfg: RewardTrainingConfig,
    source: PairSource,
    registry: ModelRegistry | None,
    publish: PublishOptions,
    output_dir: Path | None,
    progress: bool,
) -> RewardTrainingResult | None:
    outcome: dict[str, Any] | Exception | None = None
    if env.is_main:
        try:
            outcome = _prepare(source, registry, publish, output_dir)
        except Exception as exc:  # every rank raises it, rather than waiting for rank 0
            outcome = exc
    outcome = broadcast(env, outcome)
    if isinstance(outcome, Exception):
        raise outcome
    assert outcome is not None
    prepared = outcome
    data: TrainingData = prepared["data"]
    run_dir: Path = prepared["run_dir"]

    train_pairs, held_out_pairs = split_by_prompt(data.pairs, cfg.eval_fraction)
    if not train_pairs or not held_out_pairs:
        raise FailedPreconditionError(
            f"{len(data.pairs)} pairs split into {len(train_pairs)} for training and "
            f"{len(held_out_pairs)} held out (eval_fraction {cfg.eval_fraction}): need both"
        )

    seed_everything(cfg.seed)
    backbone = resolve_backbone(cfg.backbone)
    model, tokenizer = load_reward_model(backbone, cfg.seed)
    model = trainable(model)
    fmt = text_format_for(tokenizer, model, cfg.max_length)
    encoder = serving_encoder(tokenizer, fmt)
    train_set = encode_pairs(encoder, train_pairs)
    held_out = encode_pairs(encoder, held_out_pairs)
    log.info(
        "training data",
        extra={
            "train_pairs": len(train_set),
            "eval_pairs": len(held_out),
            "truncated_rows": train_set.truncated + held_out.truncated,
            "max_length": fmt.max_length,
            "run_dir": str(run_dir),
        },
    )
    reporter = RunReporter(run_dir, enabled=env.is_main)
    loop = train_loop(cfg, model, encoder, train_set, held_out, env, reporter, progress=progress)
    metrics = _metrics(loop, len(train_set))
    cursor = None if data.cursor is None else str(data.cursor)
    checkpoint = run_dir / CHECKPOINT_DIR
    result = None
    if env.is_main:
        torch.nn.Module.to(model, "cpu")
        record = {
            "run_id": prepared["run_id"],
            "config": cfg.to_dict(),
            "backbone": backbone.name,
            "data": data.source,
            "data_cursor": cursor,
            "metrics": metrics,
            "world_size": env.world_size,
        }
        save_checkpoint(model, tokenizer, checkpoint, record)
        manifest = None
        if registry is not None:
            manifest = export_reward(
                ExportConfig(
                    checkpoint=str(checkpoint),
                    max_length=cfg.max_length,
                    quantize=publish.quantize,
                    reference=held_out_pairs,  # parity and normalisation on held-out pairs
                    reference_pairs=len(held_out_pairs),
                    seed=cfg.seed,
                    parent=prepared["parent"],
                    metrics=metrics,
                    data_cursor=cursor,
                    notes={
                        "training": cfg.to_dict(),
                        "training_data": data.source,
                        "run_id": prepared["run_id"],
                        "checkpoint": str(checkpoint.resolve()),
                        "world_size": env.world_size,
                    },
                    require_trained_head=True,
                    backbone_name=backbone.name,
                    text_format=fmt.to_dict(),
                ),
                registry,
                gate=AccuracyGate(registry, publish.promotion_tolerance)
                if publish.promote
                else None,
            )
        result = RewardTrainingResult(
            run_dir=run_dir,
            checkpoint=checkpoint,
            metrics=metrics,
            data_cursor=cursor,
            train_pairs=len(train_set),
            eval_pairs=len(held_out),
            manifest=manifest,
            model=model,
        )
        reporter.write_metrics({**result.summary(), "config": cfg.to_dict()})
        reporter.plot()
    barrier(env)  # the other ranks wait for rank 0's export and publish
    return result
