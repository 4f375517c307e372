"""Train a reward model on preference pairs and publish it to the registry.

``train_reward`` reads pairs (JSONL files or the feedback store), holds out a tenth of the prompts,
trains a one-label sequence classifier with the Bradley-Terry loss in the shared training loop
(:mod:`plaudit.trainer.loop`), saves the best checkpoint into the run folder, exports it with
:func:`plaudit.trainer.export.export_reward` (ONNX parity against PyTorch on the held-out pairs,
normalisation measured on them) and publishes it with its metrics, data cursor and resolved
training config; with ``promote`` the accuracy gate (:mod:`plaudit.trainer.promotion`) decides
whether it replaces the promoted version. After training one temperature is fitted on the
held-out pairs (:mod:`plaudit.services.common.calibration`; with a registry on the served graph's
rewards, by the export) and stored in the manifest; the run folder gets its ECE before and after
in ``metrics.json`` and a reliability plot (``reliability.png``).

Run it alone or as ``torchrun --nproc-per-node N -m plaudit.cli train reward ...``: rank 0 reads
the data and does everything after training; all ranks train (see
:mod:`plaudit.trainer.distributed`), holding whole replicas (``--strategy ddp``) or shards
(``--strategy fsdp``: :mod:`plaudit.trainer.sharding`), whose weights rank 0 gathers into one
Hugging Face checkpoint before the export. The run folder keeps sharded checkpoints every
``--checkpoint-every`` steps; the same command on the same ``--output-dir`` resumes from them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from plaudit.services.common.calibration import calibrate, calibration_metrics
from plaudit.services.common.errors import FailedPreconditionError, InvalidArgumentError
from plaudit.services.common.registry import (
    Calibration,
    ModelManifest,
    ModelRegistry,
    new_version_id,
)
from plaudit.services.common.textfmt import RewardTextEncoder, TextFormat, length_groups
from plaudit.services.runtime.contract import TOKENIZER_FILE
from plaudit.trainer.backbones import resolve_backbone
from plaudit.trainer.batches import EncodedPairs, collate, encode_pairs
from plaudit.trainer.config import DEFAULT_RUNS_DIR, RewardTrainingConfig
from plaudit.trainer.data import (
    PreferencePair,
    TrainingData,
    load_feedback_pairs,
    load_feedback_sft,
    load_file_pairs,
)
from plaudit.trainer.distributed import (
    DistEnv,
    all_gather,
    broadcast,
    init_distributed,
    shutdown,
)
from plaudit.trainer.export import (
    TRAINING_RECORD,
    ExportConfig,
    ScalarReward,
    export_reward,
    load_reward_model,
    text_format_for,
    torch_rewards,
)
from plaudit.trainer.loop import LoopResult, LoopSettings, disable_dropout, epoch_steps, train_loop
from plaudit.trainer.objective import (
    bradley_terry_loss,
    pairwise_metrics,
    reward_centering_loss,
    split_by_prompt,
)
from plaudit.trainer.promotion import DEFAULT_TOLERANCE, AccuracyGate
from plaudit.trainer.report import RunReporter
from plaudit.trainer.sharding import (
    Checkpointer,
    Sharding,
    full_state_dict,
    is_sharded,
    no_grad,
    unsharded_copy,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
EVAL_GROUP_TOKENS = 16384  # padded tokens per held-out scoring batch


@dataclass(frozen=True)
class PairSource:
    """Where the pairs come from: JSONL ``files``, or the feedback store at ``database_url``
    read after ``after_cursor`` (or, with ``since_parent_cursor``, after the parent version's
    recorded ``data_cursor``); with ``criterion``, only the pairs judged on it."""

    files: tuple[Path, ...] = ()
    database_url: str | None = None
    after_cursor: int = 0
    since_parent_cursor: bool = False
    exclude_outliers: bool = False
    criterion: str | None = None  # only pairs judged on it (None: every criterion)

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
    # the int8 gate on the held-out pairs (see plaudit.trainer.export.ExportConfig)
    int8_min_agreement: float = 0.98
    int8_max_accuracy_drop: float = 0.005
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
    calibration: Calibration | None = None  # the temperature fitted on the held-out pairs

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
            "calibration": self.calibration.model_dump(mode="json") if self.calibration else None,
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
        return RewardTextEncoder.from_files(Path(tmp) / TOKENIZER_FILE, fmt)


def load_training_data(
    source: PairSource, registry: ModelRegistry | None, parent: str | None, *, policy: bool = False
) -> tuple[TrainingData, str | None]:
    """The pairs, and the parent version they continue from (when reading after its cursor).
    With ``policy`` also prompts and supervised examples: the files' TRL prompt-only and
    prompt-completion lines, or the store's corrections."""
    after, parent = source.resolve_cursor(registry, parent)
    if source.files:
        return (
            load_file_pairs(source.files, allow_unpaired=policy, criterion=source.criterion),
            parent,
        )
    assert source.database_url is not None
    url, outliers = source.database_url, source.exclude_outliers
    data = load_feedback_pairs(url, after, exclude_outliers=outliers, criterion=source.criterion)
    if policy:
        supervised, sft_cursor = load_feedback_sft(url, after, exclude_outliers=outliers)
        source_record = {**data.source, "supervised": len(supervised)}
        cursor = max(data.cursor or after, sft_cursor)
        data = TrainingData(data.pairs, source_record, cursor, supervised=supervised)
    if not data.pairs and not data.supervised:
        raise FailedPreconditionError(f"no feedback after cursor {after}")
    return data, parent


def _prepare(
    source: PairSource,
    registry: ModelRegistry | None,
    publish: PublishOptions,
    out: Path | None,
    runs_dir: Path,
) -> dict[str, Any]:
    """Rank 0's reading of the data, sent to every rank (so all train on the same snapshot)."""
    data, parent = load_training_data(source, registry, publish.parent)
    run_id = new_version_id("run")
    return {
        "data": data,
        "parent": parent,
        "run_id": run_id,
        "run_dir": out or runs_dir / run_id,
    }


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager[object]:
    """bf16 autocast for the forward passes: asked for (``mixed_precision`` bf16, any device) or
    by default on CUDA; weights, gradients, AdamW states and the loss stay fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def evaluate(
    scorer: torch.nn.Module,
    encoder: RewardTextEncoder,
    data: EncodedPairs,
    env: DistEnv,
    autocast: Callable[[], AbstractContextManager[object]],
    use_margin: bool,
) -> dict[str, float]:
    """Held-out metrics; each process scores every world_size-th group, all get all rewards.
    A sharded scorer runs as many forward passes on every process (its all-gathers pair up):
    a process short of one repeats its first group and drops the result."""
    was_training = scorer.training
    scorer.eval()
    parts = []
    with no_grad(scorer):
        groups = length_groups(data.lengths, EVAL_GROUP_TOKENS // 2)  # no gradients: bigger
        mine = groups[env.rank :: env.world_size]
        rounds = -(-len(groups) // env.world_size) if is_sharded(scorer) else len(mine)
        for r in range(rounds):
            index = mine[r] if r < len(mine) else groups[0]
            inputs, _, _ = collate(encoder, data, index)
            with autocast():
                rewards = scorer(**{k: v.to(env.device) for k, v in inputs.items()})
            if r < len(mine):
                rewards = rewards.float().reshape(2 * len(index), -1).mean(dim=-1).cpu().numpy()
                parts.append((index, rewards[: len(index)], rewards[len(index) :]))
    scorer.train(was_training)
    chosen = np.empty(len(data), dtype=np.float64)
    rejected = np.empty(len(data), dtype=np.float64)
    for rank_parts in all_gather(env, parts):
        for index, c, r in rank_parts:
            chosen[index], rejected[index] = c, r
    return pairwise_metrics(chosen, rejected, data.margin if use_margin else None, data.weight)


def bootstrap_weights(pairs: int, heads: int, seed: int) -> np.ndarray:
    """(pairs, heads) weights: each head of an ensemble fits its own bootstrap resample of the
    training pairs, a pair counted Poisson(1) times (Osband et al. 2016's bootstrapped heads, the
    online form of resampling with replacement); a single head counts every pair once. Fixed for
    the run, so a pair weighs the same in every epoch."""
    if heads == 1:
        return np.ones((pairs, 1), dtype=np.float32)
    rng = np.random.default_rng([seed, 0xB007])
    return rng.poisson(1.0, size=(pairs, heads)).astype(np.float32)


def ensemble_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None,
    weight: torch.Tensor,
    boot: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The mean over heads of each head's Bradley-Terry loss on its bootstrap weights
    (``chosen``, ``rejected``, ``boot``: (pairs, heads)); one head: the plain loss."""
    losses = [
        bradley_terry_loss(
            chosen[:, k], rejected[:, k], margin, weight * boot[:, k], label_smoothing
        )
        for k in range(chosen.shape[-1])
    ]
    return torch.stack(losses).mean()


def fit_reward_model(
    cfg: RewardTrainingConfig,
    model: PreTrainedModel,
    encoder: RewardTextEncoder,
    train: EncodedPairs,
    held_out: EncodedPairs,
    env: DistEnv,
    reporter: RunReporter,
    *,
    progress: bool = False,
    checkpointer: Checkpointer | None = None,
) -> LoopResult:
    """The Bradley-Terry objective in the training loop (DDP or FSDP under ``torchrun``);
    ``model`` is trained in place and ends holding the weights with the best held-out metrics
    (under FSDP: this process's shards of them)."""
    torch.nn.Module.to(model, env.device)
    if cfg.disable_dropout:
        disable_dropout(model)
    scorer = ScalarReward(model, members=True).train()  # (batch, seq) -> (batch, heads)
    amp = partial(autocast, env.device, cfg.mixed_precision)
    boot = torch.from_numpy(bootstrap_weights(len(train), cfg.ensemble_heads, cfg.seed))

    def loss(net: torch.nn.Module, index: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, margin, weight = collate(encoder, train, index)
        with amp():
            rewards = net(**{k: v.to(env.device) for k, v in inputs.items()})
        rewards = rewards.float()
        chosen, rejected = rewards[: len(index)], rewards[len(index) :]
        margin, weight = margin.to(env.device), weight.to(env.device)
        value = ensemble_loss(
            chosen, rejected, margin if cfg.use_margin else None, weight,
            boot[torch.from_numpy(index)].to(env.device), cfg.label_smoothing,
        )  # fmt: skip
        if cfg.center_rewards_coefficient:
            mean_c, mean_r = chosen.mean(dim=-1), rejected.mean(dim=-1)
            value = value + cfg.center_rewards_coefficient * reward_centering_loss(mean_c, mean_r)
        return value, {}

    # the whole run's micro-batches, the same on every process (seed, epoch), then sharded
    steps = epoch_steps(
        train.lengths,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=[cfg.seed],
        max_steps=cfg.max_steps,
        batch_tokens=cfg.batch_tokens,
        window=cfg.group_window,
        env=env,
    )
    # fused AdamW: on a 2-core CPU the per-tensor step of MiniLM (22.7M parameters) takes about
    # 0.5 s, the fused one about 0.1 s (about a tenth of a 16-pair training step)
    settings = LoopSettings.of(
        cfg, fused=True, keep_best=True, desc="reward model", rate_key="train/pairs_per_s"
    )
    held_out_metrics = partial(evaluate, scorer, encoder, held_out, env, amp, cfg.use_margin)
    return train_loop(
        scorer,
        steps,
        len(steps),
        loss,
        settings,
        reporter,
        env=env,
        evaluate=held_out_metrics,
        progress=progress,
        sharding=Sharding.of(cfg, env),
        checkpointer=checkpointer,
    )


def _metrics(loop: LoopResult, train_pairs: int) -> dict[str, float]:
    """The manifest's metrics; undefined ones (no steps taken: no train loss) are left out."""
    metrics = {
        **loop.best,
        "eval/initial_accuracy": loop.evals[0]["eval/accuracy"],
        "eval/initial_loss": loop.evals[0]["eval/loss"],
        "train/loss": loop.train_loss,
        "train/pairs_per_s": loop.items_per_s,
        "train/wall_s": loop.wall_s,
        "train/steps": float(loop.steps),
        "train/best_step": float(loop.best_step),
        "train/epochs": loop.epochs,
        "train/pairs": float(train_pairs),
        "train/resumed_from_step": float(loop.resumed_from),
        **loop.memory,
    }
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def held_out_calibration(
    model: PreTrainedModel, encoder: RewardTextEncoder, pairs: list[PreferencePair]
) -> Calibration:
    """The temperature fitted on ``pairs`` with the PyTorch model's rewards (runs without a
    registry; with one, the export fits it on the served graph's rewards instead)."""
    model.eval()
    texts = [(p.prompt, c) for p in pairs for c in (p.chosen, p.rejected)]
    rewards = torch_rewards(model, encoder, texts).astype(np.float64)
    return calibrate(rewards[0::2], rewards[1::2])


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
    runs_dir: Path = DEFAULT_RUNS_DIR,
) -> RewardTrainingResult | None:
    """Train, save, and (given a registry) export and publish; None on ranks other than 0.
    The run folder is ``output_dir``, or a new one under ``runs_dir``."""
    env = init_distributed(cfg.device, cfg.num_threads)
    try:
        return _train(
            env, cfg, source, registry, publish or PublishOptions(), output_dir, progress, runs_dir
        )
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
    runs_dir: Path,
) -> RewardTrainingResult | None:
    outcome: dict[str, Any] | Exception | None = None
    if env.is_main:
        try:
            outcome = _prepare(source, registry, publish, output_dir, runs_dir)
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
    model, tokenizer = load_reward_model(backbone, cfg.seed, heads=cfg.ensemble_heads)
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
    cursor = None if data.cursor is None else str(data.cursor)
    identity = {"source": data.source, "cursor": cursor, "pairs": len(data.pairs)}
    checkpointer = Checkpointer.for_run(cfg, run_dir, env, identity)
    loop = fit_reward_model(
        cfg, model, encoder, train_set, held_out, env, reporter, progress=progress,
        checkpointer=checkpointer,
    )  # fmt: skip
    metrics = _metrics(loop, len(train_set))
    if any(is_sharded(m) for m in model.modules()):  # rank 0 gathers the whole model
        weights = full_state_dict(model, env)
        model = unsharded_copy(model, weights) if env.is_main else model
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
                    int8_min_agreement=publish.int8_min_agreement,
                    int8_max_accuracy_drop=publish.int8_max_accuracy_drop,
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
                    calibrate=True,  # on the held-out pairs, with the served graph's rewards
                ),
                registry,
                gate=AccuracyGate(
                    registry,
                    publish.promotion_tolerance,
                    cfg.promotion_significance,
                    cfg.promotion_max_ece,
                )
                if publish.promote
                else None,
            )
        calibration = manifest.calibration if manifest is not None else None
        if calibration is None:  # no registry: the PyTorch model's rewards on the same pairs
            calibration = held_out_calibration(model, encoder, held_out_pairs)
        metrics.update(calibration_metrics(calibration))
        log.info(
            "calibration",
            extra={
                "temperature": calibration.temperature,
                "ece_before": calibration.ece_before,
                "ece_after": calibration.ece_after,
                "pairs": calibration.pairs,
                "note": calibration.note,
            },
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
            calibration=calibration,
        )
        reporter.write_metrics({**result.summary(), "config": cfg.to_dict()})
        reporter.plot()
        reporter.plot_reliability(calibration)
    checkpointer.finish()  # the other ranks wait for rank 0's export and publish
    return result
