"""The ``plaudit`` command line.

Each command imports only what it needs: ``serve`` never imports torch or the trainer; ``export``
and ``train`` do. ``train reward`` also runs under ``torchrun --nproc-per-node N -m services.cli``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.common.logging import configure_logging
from services.common.registry import RegistryLocationSettings
from services.common.security import ROLES, ClientCredentials, ClientSecuritySettings
from services.common.settings import PlauditSettings, add_settings_arguments, settings_from_args
from trainer.config import RewardTrainingConfig  # a plain dataclass: no torch import
from trainer.policy_config import CONFIGS as POLICY_CONFIGS  # plain dataclasses too
from trainer.policy_config import DPOConfig, PolicyConfig

_TRAIN = RewardTrainingConfig()  # the training defaults, defined once
_POLICY = DPOConfig()  # the defaults every policy method shares
_POLICY_FIELDS = sorted(
    {f.name for cls in POLICY_CONFIGS.values() for f in dataclasses.fields(cls)}
)

log = logging.getLogger("plaudit.cli")


class ExportSettings(RegistryLocationSettings):
    checkpoint: str = Field("minilm", description="HF checkpoint folder, or minilm / smollm2")
    quantize: Literal["none", "int8"] = Field("none", description="also build an int8 graph")
    promote: bool = Field(False, description="promote the new version")
    max_length: int = Field(512, ge=8, description="max tokens per item (keeps the end)")
    int8_min_agreement: float = Field(
        0.95, ge=0, le=1, description="int8 must order this share of reference pairs like fp32"
    )
    reference_data: Path | None = Field(
        None, description="JSONL pairs for parity and normalisation"
    )
    reference_pairs: int = Field(
        128, ge=2, description="pairs used for the parity checks and normalisation"
    )
    seed: int = Field(0, description="seed for a freshly initialised head")


class ExportPolicySettings(RegistryLocationSettings):
    checkpoint: str = Field("smollm2", description="HF causal-LM checkpoint folder, or smollm2")
    promote: bool = Field(False, description="promote the new version")
    max_length: int = Field(2048, ge=8, description="context length (prompt + generated tokens)")
    max_new_tokens: int = Field(256, ge=1, description="the version's default completion length")
    parent: str | None = Field(None, description="parent version (default: the promoted one)")
    quantize: Literal["none", "int8"] = Field("none", description="also build an int8 graph")
    int8_min_agreement: float = Field(
        0.9, ge=0, le=1, description="int8 must pick fp32's next token this often to be kept"
    )


class GenerateClientSettings(ClientSecuritySettings):
    addr: str = Field("localhost:50053", description="generation service address")
    n: int = Field(1, ge=1, description="completions to sample")
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    max_new_tokens: int = Field(0, ge=0, description="tokens per completion (0 = the default)")
    seed: int | None = Field(None, ge=0, description="sampler seed")
    rerank: bool = Field(False, description="score with the reward service, best first")


class RegistrySettings(ClientSecuritySettings, RegistryLocationSettings):
    kind: Literal["reward", "policy"] = Field("reward", description="model kind")
    notify: str = Field(
        "",
        description="comma-separated serving addresses to tell at once (promote, rollback; "
        "the API key needs the admin role)",
    )


class FeedbackFileSettings(PlauditSettings):
    database_url: str = Field(
        "sqlite:///.plaudit/feedback.db", description="feedback database (SQLite or PostgreSQL)"
    )
    annotator_id: str = Field("import", description="annotator for lines that name none")
    format: Literal["jsonl", "parquet"] = Field("jsonl", description="export file format")
    out: str = Field("-", description="export destination file ('-' = stdout, jsonl only)")
    after_cursor: int = Field(0, ge=0, description="export pairs after this cursor")
    limit: int = Field(0, ge=0, description="export at most this many pairs (0 = all)")
    exclude_outliers: bool = Field(False, description="leave out outlier annotators' votes")


class TrainRewardSettings(RegistryLocationSettings):
    """``plaudit train reward``: the training config fields plus data, registry and promotion."""

    data: list[Path] = Field([], description="JSONL pair files (HH-RLHF or TRL format)")
    database_url: str | None = Field(None, description="feedback database to read pairs from")
    after_cursor: int = Field(0, ge=0, description="read feedback pairs after this cursor")
    since_cursor: bool = Field(
        False, description="read feedback pairs after the parent version's data cursor"
    )
    exclude_outliers: bool = Field(False, description="leave out outlier annotators' votes")
    backbone: str = Field(_TRAIN.backbone, description="minilm, smollm2 or a HF checkpoint folder")
    max_length: int = Field(_TRAIN.max_length, ge=8, description="max tokens per item (keeps end)")
    epochs: int = Field(_TRAIN.epochs, ge=1, description="passes over the training pairs")
    max_steps: int | None = Field(_TRAIN.max_steps, ge=0, description="optimizer steps at most")
    learning_rate: float = Field(_TRAIN.learning_rate, ge=0, description="AdamW peak rate")
    warmup_ratio: float = Field(_TRAIN.warmup_ratio, ge=0, lt=1, description="warmup share")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        _TRAIN.schedule, description="learning-rate decay after warmup"
    )
    batch_size: int = Field(_TRAIN.batch_size, ge=1, description="pairs per micro-batch at most")
    batch_tokens: int | None = Field(
        _TRAIN.batch_tokens, ge=16, description="padded tokens per micro-batch at most"
    )
    grad_accum: int = Field(_TRAIN.grad_accum, ge=1, description="micro-batches per step")
    weight_decay: float = Field(_TRAIN.weight_decay, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(_TRAIN.max_grad_norm, ge=0, description="clip (0: off)")
    eval_fraction: float = Field(
        _TRAIN.eval_fraction, gt=0, lt=1, description="share of prompts held out"
    )
    eval_every: int = Field(_TRAIN.eval_every, ge=0, description="steps between evals (0: epoch)")
    early_stopping_patience: int = Field(
        _TRAIN.early_stopping_patience, ge=0, description="evals without gain (0: off)"
    )
    early_stopping_metric: Literal["accuracy", "loss"] = Field(
        _TRAIN.early_stopping_metric, description="held-out metric that picks the best weights"
    )
    use_margin: bool = Field(_TRAIN.use_margin, description="use pair margins in the loss")
    center_rewards_coefficient: float = Field(
        _TRAIN.center_rewards_coefficient, ge=0, description="reward centering weight"
    )
    disable_dropout: bool = Field(_TRAIN.disable_dropout, description="train without dropout")
    group_window: int = Field(
        _TRAIN.group_window, ge=1, description="micro-batches length-grouped together"
    )
    seed: int = Field(_TRAIN.seed, description="seed for head, shuffles and batches")
    device: Literal["auto", "cpu", "cuda"] = Field(_TRAIN.device, description="training device")
    num_threads: int = Field(
        _TRAIN.num_threads, ge=0, description="torch threads per process (0: cores/processes)"
    )
    output_dir: Path | None = Field(None, description="run folder (default .plaudit/runs/<run-id>)")
    promote: bool = Field(False, description="promote if the accuracy gate passes")
    promotion_tolerance: float = Field(
        0.01, ge=0, le=1, description="accuracy the new version may lose against the promoted"
    )
    quantize: Literal["none", "int8"] = Field("none", description="also build an int8 graph")
    parent: str | None = Field(None, description="parent version (default: the promoted one)")
    progress: bool = Field(True, description="progress bar on stderr (rank 0)")

    @model_validator(mode="after")
    def _one_source(self) -> TrainRewardSettings:
        if bool(self.data) == bool(self.database_url):
            raise ValueError("give either --data FILE... or --database-url URL")
        if self.since_cursor and not self.database_url:
            raise ValueError("--since-cursor reads the feedback store: give --database-url")
        return self


def _method_defaults(name: str) -> str:
    """``dpo 1e-06, rl 1e-06``: a method-specific setting's default for each method."""
    defaults = [
        f"{method} {getattr(cls(), name)!r}"
        for method, cls in POLICY_CONFIGS.items()
        if name in {f.name for f in dataclasses.fields(cls)}
    ]
    return "default: " + ", ".join(defaults)


def _per_method(
    description: str,
    name: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> typing.Any:
    """A method-specific setting: unset (None) means the chosen method's default."""
    text = f"{description} ({_method_defaults(name)})"
    return Field(None, description=text, ge=ge, gt=gt, le=le)


class TrainPolicySettings(ClientSecuritySettings, RegistryLocationSettings):
    """``plaudit train policy``: the method's config fields plus data, registry and promotion.

    Method-specific settings left unset take the method's default; one that the chosen method
    does not use is an error.
    """

    method: Literal["dpo", "rejection-sampling", "rl"] = Field(
        "dpo", description="dpo (pairs), rejection-sampling or rl (RLOO; prompts + reward service)"
    )
    data: list[Path] = Field(
        [], description="JSONL files: pairs (HH-RLHF/TRL), TRL prompt-only or prompt-completion"
    )
    database_url: str | None = Field(None, description="feedback database: pairs + corrections")
    after_cursor: int = Field(0, ge=0, description="read feedback after this cursor")
    since_cursor: bool = Field(
        False, description="read feedback after the parent version's data cursor"
    )
    exclude_outliers: bool = Field(False, description="leave out outlier annotators' votes")
    reward_addr: str | None = _per_method(
        "reward service for sampling rewards and the win rate", "reward_addr"
    )
    promote: bool = Field(False, description="promote if the win-rate gate passes")
    parent: str | None = Field(None, description="baseline policy (default: the promoted one)")
    output_dir: Path | None = Field(None, description="run folder (default .plaudit/runs/<run-id>)")
    progress: bool = Field(True, description="progress bars on stderr")
    # shared by every method
    base: str = Field(_POLICY.base, description="smollm2 or a HF causal-LM folder")
    max_length: int = Field(_POLICY.max_length, ge=8, description="prompt + completion tokens")
    max_prompt_length: int = Field(
        _POLICY.max_prompt_length, ge=1, description="prompt tokens (truncation keeps the end)"
    )
    batch_size: int = Field(
        _POLICY.batch_size, ge=1, description="sequences (DPO: pairs) per batch"
    )
    grad_accum: int = Field(_POLICY.grad_accum, ge=1, description="micro-batches per step")
    warmup_ratio: float = Field(_POLICY.warmup_ratio, ge=0, lt=1, description="warmup share")
    weight_decay: float = Field(_POLICY.weight_decay, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(_POLICY.max_grad_norm, ge=0, description="clip (0: off)")
    lora_r: int = Field(_POLICY.lora_r, ge=0, description="LoRA rank (0: full fine-tuning)")
    lora_alpha: int = Field(_POLICY.lora_alpha, ge=1, description="LoRA scaling numerator")
    lora_dropout: float = Field(_POLICY.lora_dropout, ge=0, lt=1, description="LoRA dropout")
    eval_fraction: float = Field(
        _POLICY.eval_fraction, gt=0, lt=1, description="share of prompts held out (by hash)"
    )
    eval_prompts: int = Field(
        _POLICY.eval_prompts, ge=0, description="held-out prompts sampled for win rate and KL"
    )
    eval_max_new_tokens: int = Field(
        _POLICY.eval_max_new_tokens, ge=1, description="tokens per evaluation sample"
    )
    eval_temperature: float = Field(
        _POLICY.eval_temperature, gt=0, description="evaluation sampling temperature"
    )
    eval_top_p: float = Field(_POLICY.eval_top_p, gt=0, le=1, description="evaluation top-p")
    promotion_min_win_rate: float = Field(
        _POLICY.promotion_min_win_rate,
        ge=0,
        le=1,
        description="promote only when the held-out win rate against the baseline exceeds this",
    )
    seed: int = Field(_POLICY.seed, description="seed for shuffles, sampling and LoRA init")
    device: Literal["auto", "cpu", "cuda"] = Field(_POLICY.device, description="training device")
    num_threads: int = Field(_POLICY.num_threads, ge=0, description="torch threads (0: default)")
    # method-specific
    learning_rate: float | None = _per_method("AdamW peak rate", "learning_rate", ge=0)
    epochs: int | None = _per_method("passes over the pairs", "epochs", ge=1)
    max_steps: int | None = _per_method("optimizer steps at most", "max_steps", ge=0)
    beta: float | None = _per_method("DPO KL strength", "beta", gt=0)
    num_candidates: int | None = _per_method("samples per prompt", "num_candidates", ge=1)
    temperature: float | None = _per_method("sampling temperature", "temperature", gt=0)
    top_p: float | None = _per_method("sampling top-p", "top_p", gt=0, le=1)
    max_new_tokens: int | None = _per_method("tokens per sample", "max_new_tokens", ge=1)
    rounds: int | None = _per_method("sample-then-fine-tune rounds", "rounds", ge=1)
    max_prompts: int | None = _per_method("prompts sampled per round (0: all)", "max_prompts", ge=0)
    sft_epochs: int | None = _per_method("fine-tuning passes per round", "sft_epochs", ge=1)
    sft_learning_rate: float | None = _per_method(
        "fine-tuning peak rate", "sft_learning_rate", ge=0
    )
    rloo_k: int | None = _per_method("samples per prompt (>= 2)", "rloo_k", ge=2)
    prompts_per_step: int | None = _per_method("prompts per step", "prompts_per_step", ge=1)
    steps: int | None = _per_method("optimizer steps", "steps", ge=1)
    kl_coef: float | None = _per_method("KL penalty coefficient", "kl_coef", ge=0)

    def policy_config(self) -> PolicyConfig:
        """The chosen method's config: the settings it has, its defaults for those left unset."""
        cls = POLICY_CONFIGS[self.method]
        own = {f.name for f in dataclasses.fields(cls)}
        given = {
            name: getattr(self, name) for name in _POLICY_FIELDS if getattr(self, name) is not None
        }
        foreign = sorted(set(given) - own)
        if foreign:
            flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
            raise ValueError(f"{flags}: not a setting of --method {self.method}")
        return cls(**given)

    @model_validator(mode="after")
    def _check(self) -> TrainPolicySettings:
        if bool(self.data) == bool(self.database_url):
            raise ValueError("give either --data FILE... or --database-url URL")
        if self.since_cursor and not self.database_url:
            raise ValueError("--since-cursor reads the feedback store: give --database-url")
        self.policy_config()  # the method's own checks, reported as settings errors
        return self


class ClientSettings(ClientSecuritySettings):
    addr: str = Field("localhost:50051", description="reward service address")


def _cmd_serve(args: argparse.Namespace) -> int:
    """``plaudit serve <service>``: settings from flags/env, then the service's ``serve``."""
    settings = settings_from_args(args.settings_cls, args)
    configure_logging(settings.log_level, settings.log_format)
    serve = importlib.import_module(f"services.{args.service}.server").serve
    asyncio.run(serve(settings))
    return 0


def _cmd_feedback(args: argparse.Namespace) -> int:
    from services.feedback.store import FeedbackStore
    from services.feedback.transfer import export_pairs, import_file

    settings = settings_from_args(FeedbackFileSettings, args)
    configure_logging(settings.log_level, "text")
    with FeedbackStore(settings.database_url) as store:
        if args.action == "import":
            if not args.file:
                raise FileNotFoundError("feedback import needs a FILE")
            summary = import_file(store, Path(args.file), annotator_id=settings.annotator_id)
            for error in summary.errors:
                sys.stderr.write(f"rejected {error}\n")
            report = {k: v for k, v in vars(summary).items() if k != "errors"}
            sys.stdout.write(json.dumps(report) + "\n")
            return 0
        if args.action == "export":
            out = sys.stdout if settings.out == "-" else Path(settings.out)
            count, last = export_pairs(
                store,
                out,
                fmt=settings.format,
                after_cursor=settings.after_cursor,
                limit=settings.limit or None,
                exclude_outliers=settings.exclude_outliers,
            )
            sys.stderr.write(f"exported {count} pairs; resume with --after-cursor {last}\n")
            return 0
        stats = store.stats()
        agreement = stats.agreement
        sys.stdout.write(
            json.dumps(
                {
                    "records": stats.total,
                    "by_kind": stats.by_kind,
                    "annotators": len(stats.by_annotator),
                    "judgements": stats.judgements,
                    "pairs_derived": stats.pairs_derived,
                    "raw_agreement": agreement.raw_agreement,
                    "kappa": agreement.kappa,
                    "kappa_method": agreement.kappa_method,
                    "contradictions": agreement.contradicted_groups,
                    "outliers": sorted(agreement.outlier_annotators),
                },
                indent=2,
            )
            + "\n"
        )
        return 0


def _cmd_export_reward(args: argparse.Namespace) -> int:
    settings = settings_from_args(ExportSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainer.export import ExportConfig, export_reward

    cfg = ExportConfig(
        checkpoint=settings.checkpoint,
        max_length=settings.max_length,
        quantize=None if settings.quantize == "none" else settings.quantize,
        int8_min_agreement=settings.int8_min_agreement,
        reference_data=settings.reference_data,
        reference_pairs=settings.reference_pairs,
        seed=settings.seed,
    )
    manifest = export_reward(cfg, settings.model_registry("reward"), promote=settings.promote)
    sys.stdout.write(
        json.dumps(
            {
                "version": manifest.version,
                "promoted": settings.promote,
                "precision": manifest.default_precision,
                "quantization": manifest.quantization.model_dump()
                if manifest.quantization
                else None,
            }
        )
        + "\n"
    )
    return 0


def _cmd_export_policy(args: argparse.Namespace) -> int:
    settings = settings_from_args(ExportPolicySettings, args)
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainer.policy_export import export_policy_checkpoint

    manifest = export_policy_checkpoint(
        settings.checkpoint,
        settings.model_registry("policy"),
        promote=settings.promote,
        max_length=settings.max_length,
        max_new_tokens=settings.max_new_tokens,
        parent=settings.parent,
        quantize=None if settings.quantize == "none" else settings.quantize,
        int8_min_agreement=settings.int8_min_agreement,
    )
    parity = {k: v for k, v in manifest.notes.items() if "diff" in k or "agreement" in k}
    report = {
        "version": manifest.version,
        "promoted": settings.promote,
        "precision": manifest.default_precision,
        "quantization": manifest.quantization.model_dump() if manifest.quantization else None,
        **parity,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from plaudit.v1 import generation_pb2

    from services.generation.client import GenerationClient

    settings = settings_from_args(GenerateClientSettings, args)
    fields = settings.model_dump(
        include={"n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "rerank"}
    )
    with GenerationClient(settings.addr, settings.credentials) as client:
        reply = client.generate(args.prompt, **fields)
    completions = [
        {
            "text": c.text,
            "tokens": c.token_count,
            "finish_reason": generation_pb2.FinishReason.Name(c.finish_reason),
            **({"reward": c.reward} if c.HasField("reward") else {}),
        }
        for c in reply.completions
    ]
    out = {"model_version": reply.model_version, "completions": completions}
    if reply.reward_model_version:
        out["reward_model_version"] = reply.reward_model_version
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def _cmd_train_reward(args: argparse.Namespace) -> int:
    settings = settings_from_args(TrainRewardSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dataclasses import fields

    from trainer.reward import PairSource, PublishOptions, train_reward

    cfg = RewardTrainingConfig(**{f.name: getattr(settings, f.name) for f in fields(_TRAIN)})
    result = train_reward(
        cfg,
        PairSource(
            files=tuple(settings.data),
            database_url=settings.database_url,
            after_cursor=settings.after_cursor,
            since_parent_cursor=settings.since_cursor,
            exclude_outliers=settings.exclude_outliers,
        ),
        settings.model_registry("reward"),
        publish=PublishOptions(
            promote=settings.promote,
            promotion_tolerance=settings.promotion_tolerance,
            quantize=None if settings.quantize == "none" else settings.quantize,
            parent=settings.parent,
        ),
        output_dir=settings.output_dir,
        progress=settings.progress,
    )
    if result is not None:  # rank 0 (the only process, or under torchrun)
        sys.stdout.write(json.dumps(result.summary()) + "\n")
    return 0


def _cmd_train_policy(args: argparse.Namespace) -> int:
    settings = settings_from_args(TrainPolicySettings, args)
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainer.policy import PolicyPublishOptions, train_policy
    from trainer.reward import PairSource

    result = train_policy(
        settings.policy_config(),
        PairSource(
            files=tuple(settings.data),
            database_url=settings.database_url,
            after_cursor=settings.after_cursor,
            since_parent_cursor=settings.since_cursor,
            exclude_outliers=settings.exclude_outliers,
        ),
        settings.model_registry("policy"),
        publish=PolicyPublishOptions(promote=settings.promote, parent=settings.parent),
        output_dir=settings.output_dir,
        progress=settings.progress,
        credentials=settings.credentials,
    )
    sys.stdout.write(json.dumps(result.summary()) + "\n")
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:

    settings = settings_from_args(RegistrySettings, args)
    configure_logging(settings.log_level, settings.log_format)
    registry = settings.model_registry(settings.kind)
    out = sys.stdout
    if args.action == "list":
        promoted = registry.promoted()
        for m in registry.list_versions():
            mark = "*" if m.version == promoted else " "
            out.write(
                f"{mark} {m.version}  {m.created_at:%Y-%m-%d %H:%M:%S}  {m.backbone}  "
                f"{m.default_precision}  {json.dumps(m.metrics)}\n"
            )
    elif args.action == "show":
        out.write(registry.manifest(args.version).model_dump_json(indent=2) + "\n")
    elif args.action == "promote":
        registry.promote(args.version, reason="cli")
        out.write(f"promoted {args.version}\n")
    elif args.action == "rollback":
        out.write(f"promoted {registry.rollback()}\n")
    if args.action in ("promote", "rollback") and settings.notify:
        return _notify(settings.notify, out, settings.credentials)
    return 0


def _notify(addresses: str, out: typing.TextIO, credentials: ClientCredentials) -> int:
    """Tell serving processes to pick up the promotion now; 1 if any could not make it live."""
    import grpc

    from services.common.admin import notify_reload

    failed = 0
    for address in filter(None, (a.strip() for a in addresses.split(","))):
        try:
            reply = notify_reload(address, credentials=credentials)
        except grpc.RpcError as exc:
            out.write(f"{address}: not notified ({exc.code().name}: {exc.details()})\n")
            failed += 1
            continue
        status = f"live {reply.live_version}"
        if reply.last_swap_error:
            status += f"; swap failed: {reply.last_swap_error}"
            failed += 1
        out.write(f"{address}: {status}\n")
    return 1 if failed else 0


def _cmd_score(args: argparse.Namespace) -> int:
    from services.reward.client import RewardClient

    settings = settings_from_args(ClientSettings, args)
    with RewardClient(settings.addr, settings.credentials) as client:
        rewards, version = client.score([args.prompt], [args.completion])
    sys.stdout.write(json.dumps({"reward": rewards[0], "model_version": version}) + "\n")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    """``plaudit keys new``: a random API key and the entry a server's configuration needs."""
    from services.common.security import ApiKeyEntry, hash_key, new_api_key

    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    key = new_api_key()
    entry = ApiKeyEntry.model_validate({"name": args.name, "sha256": hash_key(key), "roles": roles})
    sys.stdout.write(json.dumps({"api_key": key, "entry": entry.model_dump(mode="json")}) + "\n")
    sys.stderr.write(
        "The key is shown only now: give it to the client (PLAUDIT_API_KEY). Add the entry to "
        "the servers' PLAUDIT_API_KEYS list or --api-keys-file; they keep only its hash.\n"
    )
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from services.up import UpSettings, main

    settings = settings_from_args(UpSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    return main(settings)


def _cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import DemoSettings, run_demo

    settings = settings_from_args(DemoSettings, args)
    configure_logging(settings.log_level, "text")
    return run_demo(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plaudit", description="Plaudit: reward models as a service"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a service").add_subparsers(
        dest="service", required=True
    )
    from services.feedback.settings import FeedbackSettings
    from services.generation.settings import GenerationSettings
    from services.reward.settings import RewardSettings

    services: list[tuple[str, type[PlauditSettings], str]] = [
        ("reward", RewardSettings, "serve the promoted reward model over gRPC"),
        ("generation", GenerationSettings, "serve the promoted policy over gRPC"),
        ("feedback", FeedbackSettings, "serve the feedback API (gRPC) and labelling page (HTTP)"),
    ]
    for name, settings_cls, help_text in services:
        p = serve.add_parser(name, help=help_text)
        add_settings_arguments(p, settings_cls)
        p.set_defaults(func=_cmd_serve, settings_cls=settings_cls)

    p = commands.add_parser("feedback", help="import, export and inspect stored feedback")
    p.add_argument("action", choices=["import", "export", "stats"])
    p.add_argument("file", nargs="?", help="JSONL file to import (HH, TRL or rankings)")
    add_settings_arguments(p, FeedbackFileSettings)
    p.set_defaults(func=_cmd_feedback)

    export = commands.add_parser("export", help="export a checkpoint to the registry")
    export_kinds = export.add_subparsers(dest="kind", required=True)
    p = export_kinds.add_parser(
        "reward", help="export a HF reward checkpoint (num_labels=1) to ONNX"
    )
    add_settings_arguments(p, ExportSettings)
    p.set_defaults(func=_cmd_export_reward)
    p = export_kinds.add_parser(
        "policy", help="export a HF causal LM to ONNX with a KV cache (parity-checked)"
    )
    add_settings_arguments(p, ExportPolicySettings)
    p.set_defaults(func=_cmd_export_policy)

    train = commands.add_parser("train", help="train a model and publish it to the registry")
    train_kinds = train.add_subparsers(dest="kind", required=True)
    p = train_kinds.add_parser(
        "reward", help="train a reward model on preference pairs (files or feedback store)"
    )
    add_settings_arguments(p, TrainRewardSettings)
    p.set_defaults(func=_cmd_train_reward)
    p = train_kinds.add_parser(
        "policy",
        help="train a policy (DPO, rejection sampling or RLOO) behind a win-rate promotion gate",
    )
    add_settings_arguments(p, TrainPolicySettings)
    p.set_defaults(func=_cmd_train_policy)

    p = commands.add_parser("registry", help="inspect and steer the model registry")
    p.add_argument("action", choices=["list", "show", "promote", "rollback"])
    p.add_argument("version", nargs="?", help="version id (show, promote)")
    add_settings_arguments(p, RegistrySettings)
    p.set_defaults(func=_cmd_registry)

    p = commands.add_parser("score", help="score one (prompt, completion) with a running service")
    p.add_argument("--prompt", required=True)
    p.add_argument("--completion", required=True)
    add_settings_arguments(p, ClientSettings)
    p.set_defaults(func=_cmd_score)

    p = commands.add_parser("generate", help="sample completions from a running service")
    p.add_argument("--prompt", required=True)
    add_settings_arguments(p, GenerateClientSettings)
    p.set_defaults(func=_cmd_generate)

    p = commands.add_parser("keys", help="make API keys for the services")
    p.add_argument("action", choices=["new"])
    p.add_argument("--name", required=True, help="who the key is for (logs, rate limits)")
    p.add_argument("--roles", required=True, help=f"comma-separated roles: {', '.join(ROLES)}")
    p.set_defaults(func=_cmd_keys)

    from services.up import UpSettings

    p = commands.add_parser("up", help="run the whole loop on this machine (embedded defaults)")
    add_settings_arguments(p, UpSettings)
    p.set_defaults(func=_cmd_up)

    from services.demo import DemoSettings

    p = commands.add_parser(
        "demo", help="feed the HH pairs through a running `plaudit up` and watch it retrain"
    )
    add_settings_arguments(p, DemoSettings)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "registry" and args.action in ("show", "promote") and not args.version:
        parser.error(f"registry {args.action} needs a version")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from pydantic import ValidationError

        from services.common.errors import PlauditError

        if isinstance(exc, PlauditError | ValidationError | FileNotFoundError):
            sys.stderr.write(f"plaudit: error: {exc}\n")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
