"""The ``plaudit`` command line.

Each command imports only what it needs: ``serve`` never imports torch or the trainer; ``export``
and ``train`` do. ``train reward`` also runs under ``torchrun --nproc-per-node N -m plaudit.cli``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from plaudit.services.common.logging import configure_logging
from plaudit.services.common.names import NAME_PATTERN
from plaudit.services.common.registry import (
    DEFAULT_MODEL_NAME,
    ModelManifest,
    ModelRegistry,
    RegistryLocationSettings,
)
from plaudit.services.common.security.client import ClientCredentials, ClientSecuritySettings
from plaudit.services.common.security.keys import ROLES
from plaudit.services.common.settings import (
    PlauditSettings,
    add_settings_arguments,
    settings_from_args,
)
from plaudit.trainer.config import DEFAULT_RUNS_DIR, RewardTrainingConfig  # pydantic: no torch
from plaudit.trainer.policy_config import CONFIGS as POLICY_CONFIGS
from plaudit.trainer.policy_config import (
    DPOFields,
    GRPOFields,
    PolicyConfig,
    PolicyMethod,
    PolicyQuantization,
    PPOFields,
    RejectionSamplingFields,
    RLFields,
    SharedPolicyConfig,
)

if typing.TYPE_CHECKING:
    from plaudit.trainer.reward import PairSource

_POLICY_FIELDS = {name for cls in POLICY_CONFIGS.values() for name in cls.model_fields}

log = logging.getLogger("plaudit.cli")


class RewardInt8Fields(BaseModel):
    """The reward int8 graph and its gate (export and training), declared once."""

    quantize: Literal["none", "int8"] = Field("none", description="also build an int8 graph")
    int8_min_agreement: float = Field(
        0.98,
        ge=0,
        le=1,
        description="int8 must order this share of the reference (held-out) pairs like fp32",
    )
    int8_max_accuracy_drop: float = Field(
        0.005,
        ge=-1,
        le=1,
        description="int8's accuracy on the reference (held-out) pairs may be at most this "
        "below fp32's",
    )


class ExportSettings(RegistryLocationSettings, RewardInt8Fields):
    checkpoint: str = Field("minilm", description="HF checkpoint folder, or minilm / smollm2")
    promote: bool = Field(False, description="promote the new version")
    max_length: int = Field(512, ge=8, description="max tokens per item (keeps the end)")
    reference_data: Path | None = Field(
        None, description="JSONL pairs for parity and normalisation"
    )
    reference_pairs: int = Field(
        128, ge=2, description="pairs used for the parity checks and normalisation"
    )
    seed: int = Field(0, description="seed for a freshly initialised head")
    fp16: bool = Field(
        False,
        description="also build an fp16 graph (what CUDA serves), kept when it orders the "
        "reference pairs like fp32 at least --fp16-min-agreement of the time",
    )
    fp16_min_agreement: float = Field(0.95, ge=0, le=1, description="the fp16 graph's gate")
    external_data: bool | None = Field(
        None,
        description="weights in a data file beside the graph (default: from 1 GiB of weights; "
        "needed past ONNX's 2 GB limit)",
    )


class ExportPolicySettings(RegistryLocationSettings):
    checkpoint: str = Field("smollm2", description="HF causal-LM checkpoint folder, or smollm2")
    promote: bool = Field(False, description="promote the new version")
    max_length: int = Field(2048, ge=8, description="context length (prompt + generated tokens)")
    max_new_tokens: int = Field(256, ge=1, description="the version's default completion length")
    parent: str | None = Field(None, description="parent version (default: the promoted one)")
    quantize: PolicyQuantization = Field(
        "none",
        description="also build a weight-quantised graph: int8 (dynamic), int4 / int8-block "
        "(ONNX Runtime MatMulNBits, blocks of 32; int4 keeps GGUF-born weights exact)",
    )
    int8_min_agreement: float = Field(
        0.9,
        ge=0,
        le=1,
        description="the quantised graph must pick fp32's next token this often to be kept",
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
    name: str = Field(
        DEFAULT_MODEL_NAME,
        pattern=f"^{NAME_PATTERN}$",
        description="the named model (reward: e.g. helpfulness, safety)",
    )
    notify: str = Field(
        "",
        description="comma-separated serving addresses to tell at once (promote, rollback, "
        "shadow, unshadow; the API key needs the admin role)",
    )
    fraction: float = Field(
        0.1, gt=0, le=1, description="shadow: share of live requests the candidate also scores"
    )
    min_shadow_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="promote: only when the version, shadowing at the first --notify address, "
        "orders at least this share of item pairs as the live version does",
    )
    max_ece: float | None = Field(
        None,
        ge=0,
        le=1,
        description="promote (reward): only when the version's calibrated held-out expected "
        "calibration error, as its manifest records it, is at most this",
    )
    min_shadow_pairs: int = Field(
        100, ge=1, description="promote --min-shadow-agreement: pairs it needs at least"
    )
    min_shadow_requests: int = Field(
        20,
        ge=1,
        description="promote --min-shadow-agreement: live requests it needs at least (a few "
        "large Scores give many pairs)",
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
    criteria: list[str] = Field(
        ["overall"],
        description="import: criteria the lines may judge (besides overall), as the feedback "
        "service's --criteria",
    )
    criterion: str | None = Field(
        None,
        pattern=f"^{NAME_PATTERN}$",
        description="export: the pairs judged on this criterion only (unset: every criterion)",
    )

    @field_validator("criteria")
    @classmethod
    def _criteria_are_names(cls, value: list[str]) -> list[str]:
        from plaudit.services.feedback.domain import check_criteria_names

        return list(check_criteria_names(value))


class TrainRunSettings(RegistryLocationSettings):
    """What ``plaudit train`` commands share: the training data, the run folder, publication."""

    data: list[Path] = Field(
        [], description="JSONL files: pairs (HH-RLHF/TRL); policy: also TRL prompts/completions"
    )
    database_url: str | None = Field(
        None, description="feedback database to read pairs (policy: also corrections) from"
    )
    after_cursor: int = Field(0, ge=0, description="read feedback after this cursor")
    since_cursor: bool = Field(
        False, description="read feedback after the parent version's data cursor"
    )
    exclude_outliers: bool = Field(False, description="leave out outlier annotators' votes")
    criterion: str | None = Field(
        None,
        pattern=f"^{NAME_PATTERN}$",
        description="train on the pairs judged on this criterion only (e.g. helpfulness, "
        "safety; unset: every criterion)",
    )
    output_dir: Path | None = Field(None, description="run folder (default: <runs-dir>/<run-id>)")
    runs_dir: Path = Field(DEFAULT_RUNS_DIR, description="where run folders go, one per run")
    promote: bool = Field(False, description="promote if the gate passes (accuracy / win rate)")
    parent: str | None = Field(None, description="parent and baseline (default: the promoted one)")
    progress: bool = Field(True, description="progress bars on stderr (rank 0)")

    @model_validator(mode="after")
    def _one_source(self) -> TrainRunSettings:
        if bool(self.data) == bool(self.database_url):
            raise ValueError("give either --data FILE... or --database-url URL")
        if self.since_cursor and not self.database_url:
            raise ValueError("--since-cursor reads the feedback store: give --database-url")
        return self


class TrainRewardSettings(TrainRunSettings, RewardTrainingConfig, RewardInt8Fields):
    """``plaudit train reward``: the training config's fields plus the run's and the gate's."""

    promotion_tolerance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="held-out accuracy the new version may lose against the "
        "promoted one (0: it must beat it)",
    )
    name: str = Field(
        DEFAULT_MODEL_NAME,
        pattern=f"^{NAME_PATTERN}$",
        description="the named reward model the version joins (its own versions, promotion "
        "and gate; e.g. safety)",
    )


class TrainPolicySettings(
    ClientSecuritySettings,
    TrainRunSettings,
    SharedPolicyConfig,
    DPOFields,
    RejectionSamplingFields,
    RLFields,
    GRPOFields,
    PPOFields,
):
    """``plaudit train policy``: every method's config fields plus the run's.

    A method-specific setting left unset takes the chosen method's default; one that the chosen
    method does not use is an error. Read the config through :meth:`policy_config`: an unset
    method-specific attribute holds the first declaring method's default, not the chosen one's.
    """

    method: PolicyMethod = Field(
        "dpo",
        description="dpo (pairs), rejection-sampling, rl (RLOO), grpo or ppo (the last four: "
        "prompts + reward service)",
    )
    only_after_new_reward: bool = Field(
        False,
        description="exit 0 without training when the newest policy was already judged by the "
        "reward model serving at --reward-addr (scheduled jobs: train after a new one)",
    )

    @classmethod
    def default_help(cls, name: str) -> str:
        """Method-specific settings show each method's default."""
        if name in SharedPolicyConfig.model_fields or name not in _POLICY_FIELDS:
            return super().default_help(name)
        defaults = [
            f"{method} {config.model_fields[name].default!r}"
            for method, config in POLICY_CONFIGS.items()
            if name in config.model_fields
        ]
        return "default: " + ", ".join(defaults)

    def policy_config(self) -> PolicyConfig:
        """The chosen method's config: the settings given, the method's defaults for the rest."""
        cls = POLICY_CONFIGS[self.method]
        given = {
            name: value
            for name in self.model_fields_set & _POLICY_FIELDS
            if (value := getattr(self, name)) is not None
        }
        foreign = sorted(set(given) - set(cls.model_fields))
        if foreign:
            flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
            raise ValueError(f"{flags}: not a setting of --method {self.method}")
        return cls(**given)

    @model_validator(mode="after")
    def _check(self) -> TrainPolicySettings:
        self.policy_config()  # the method's own checks, reported as settings errors
        return self


class ClientSettings(ClientSecuritySettings):
    addr: str = Field("localhost:50051", description="reward service address")


def _cmd_serve(args: argparse.Namespace) -> int:
    """``plaudit serve <service>``: settings from flags/env, then the service's ``serve``."""
    settings = settings_from_args(args.settings_cls, args)
    configure_logging(settings.log_level, settings.log_format)
    serve = importlib.import_module(f"plaudit.services.{args.service}.server").serve
    asyncio.run(serve(settings))
    return 0


def _cmd_feedback(args: argparse.Namespace) -> int:
    from plaudit.services.feedback.domain import FeedbackLimits
    from plaudit.services.feedback.store import FeedbackStore
    from plaudit.services.feedback.transfer import export_pairs, import_file

    settings = settings_from_args(FeedbackFileSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    if args.action == "stats":
        return _feedback_stats(settings.database_url, as_json=args.json)
    limits = FeedbackLimits(criteria=tuple(settings.criteria))
    with FeedbackStore(settings.database_url, limits=limits) as store:
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
                criterion=settings.criterion,
            )
            sys.stderr.write(f"exported {count} pairs; resume with --after-cursor {last}\n")
    return 0


def _feedback_stats(database_url: str, *, as_json: bool) -> int:
    """``plaudit feedback stats``: tables for people, the JSON of before with ``--json``.

    Reads through the read-only reader: a missing SQLite file is an error that says what to
    run, never a new empty database."""
    from plaudit.services.feedback.core import stats_json
    from plaudit.services.feedback.export import FeedbackReader
    from plaudit.tables import feedback_tables, render

    with FeedbackReader(database_url) as reader:
        stats = reader.stats()
    report = stats_json(stats)
    if not as_json:
        render(sys.stdout, *feedback_tables(report))
        return 0
    agreement = stats.agreement
    report = {  # GetStats' fields, then this command's own names as they were
        **report,
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
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def _cmd_export_reward(args: argparse.Namespace) -> int:
    settings = settings_from_args(ExportSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from plaudit.trainer.export import ExportConfig, export_reward

    cfg = ExportConfig(
        checkpoint=settings.checkpoint,
        max_length=settings.max_length,
        quantize=None if settings.quantize == "none" else settings.quantize,
        int8_min_agreement=settings.int8_min_agreement,
        int8_max_accuracy_drop=settings.int8_max_accuracy_drop,
        reference_data=settings.reference_data,
        reference_pairs=settings.reference_pairs,
        seed=settings.seed,
        fp16=settings.fp16,
        fp16_min_agreement=settings.fp16_min_agreement,
        external_data=settings.external_data,
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
    from plaudit.trainer.policy_export import export_policy_checkpoint

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
    parity = {
        k: v for k, v in manifest.notes.items() if "diff" in k or "agreement" in k or "_kl_" in k
    }
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
    from plaudit.services.generation.client import GenerationClient
    from plaudit.v1 import generation_pb2

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


def _pair_source(settings: TrainRunSettings) -> PairSource:
    from plaudit.trainer.reward import PairSource

    return PairSource(
        files=tuple(settings.data),
        database_url=settings.database_url,
        after_cursor=settings.after_cursor,
        since_parent_cursor=settings.since_cursor,
        exclude_outliers=settings.exclude_outliers,
        criterion=settings.criterion,
    )


def _cmd_train_reward(args: argparse.Namespace) -> int:
    settings = settings_from_args(TrainRewardSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from plaudit.trainer.reward import PublishOptions, train_reward

    fields = set(RewardTrainingConfig.model_fields)
    result = train_reward(
        RewardTrainingConfig(**settings.model_dump(include=fields)),
        _pair_source(settings),
        settings.model_registry("reward", settings.name),
        publish=PublishOptions(
            promote=settings.promote,
            promotion_tolerance=settings.promotion_tolerance,
            quantize=None if settings.quantize == "none" else settings.quantize,
            int8_min_agreement=settings.int8_min_agreement,
            int8_max_accuracy_drop=settings.int8_max_accuracy_drop,
            parent=settings.parent,
        ),
        output_dir=settings.output_dir,
        runs_dir=settings.runs_dir,
        progress=settings.progress,
    )
    if result is not None:  # rank 0 (the only process, or under torchrun)
        sys.stdout.write(json.dumps(result.summary()) + "\n")
    return 0


def _cmd_train_policy(args: argparse.Namespace) -> int:
    settings = settings_from_args(TrainPolicySettings, args)
    configure_logging(settings.log_level, settings.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from plaudit.trainer.policy import (
        PolicyPublishOptions,
        already_trained_under,
        run_policy_training,
    )

    cfg = settings.policy_config()
    registry = settings.model_registry("policy")
    if settings.only_after_new_reward and cfg.reward_addr:
        skip = already_trained_under(
            registry,
            cfg.reward_addr,
            settings.credentials,
            reward_model=cfg.reward_model,
            objective=cfg.objective,
        )
        if skip:
            log.info("nothing to do: %s", skip)
            sys.stdout.write(json.dumps({"skipped": True, "reason": skip}) + "\n")
            return 0
    result = run_policy_training(
        cfg,
        _pair_source(settings),
        registry,
        publish=PolicyPublishOptions(promote=settings.promote, parent=settings.parent),
        output_dir=settings.output_dir,
        runs_dir=settings.runs_dir,
        progress=settings.progress,
        credentials=settings.credentials,
    )
    if result is not None:  # rank 0 (the only process, or under torchrun: DPO)
        sys.stdout.write(json.dumps(result.summary()) + "\n")
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:
    if args.action == "keygen":
        return _registry_keygen(args.out)
    settings = settings_from_args(RegistrySettings, args)
    configure_logging(settings.log_level, settings.log_format)
    registry = settings.model_registry(settings.kind, settings.name)
    out = sys.stdout
    if args.action in ("list", "show"):
        return _registry_read(registry, args.action, args.version, as_json=args.json)
    if args.action == "names":
        out.write("\n".join(registry.model_names()) + "\n")
        return 0
    if args.action == "promote":
        reason = "cli"
        if settings.max_ece is not None:
            reason += "; " + _calibration_gate(registry.manifest(args.version), settings.max_ece)
        if settings.min_shadow_agreement is not None:
            reason += "; " + _shadow_gate(settings, args.version).removeprefix("cli; ")
        registry.promote(args.version, reason=reason)
        out.write(f"promoted {args.version}\n")
    elif args.action == "rollback":
        out.write(f"promoted {registry.rollback()}\n")
    elif args.action == "shadow":
        registry.start_shadow(args.version, settings.fraction)
        out.write(f"shadowing {registry.label} with {args.version} on {settings.fraction:.0%}\n")
        if settings.notify:
            return _notify(settings.notify, out, settings.credentials, registry.name,
                           expect_shadow=args.version)  # fmt: skip
    elif args.action == "unshadow":
        stopped = registry.stop_shadow()
        out.write(f"shadow of {registry.label} stopped\n" if stopped else "no shadow running\n")
    if settings.notify:
        return _notify(settings.notify, out, settings.credentials, registry.name)
    return 0


def _calibration_gate(manifest: ModelManifest, max_ece: float) -> str:
    """``promote --max-ece``: the version's manifest must record a calibrated held-out ECE (the
    trainer measures it on its held-out pairs with the served graph) of at most ``max_ece``."""
    from plaudit.services.common.errors import FailedPreconditionError

    calibration = manifest.calibration
    if calibration is None or calibration.ece_after is None:
        raise FailedPreconditionError(
            f"not promoted: {manifest.version} records no held-out calibration error "
            "(--max-ece needs a version trained with a held-out split)"
        )
    figures = f"calibrated ECE {calibration.ece_after:.3f} on {calibration.pairs} held-out pairs"
    if calibration.ece_after > max_ece:
        raise FailedPreconditionError(f"not promoted: {figures} is above --max-ece {max_ece:g}")
    return figures


def _shadow_gate(settings: RegistrySettings, version: str) -> str:
    """``promote --min-shadow-agreement``: the version must be the shadow of the named model at
    the first ``--notify`` address and agree with the live version on enough pairs."""
    from plaudit.services.common.errors import FailedPreconditionError, InvalidArgumentError
    from plaudit.services.reward.client import RewardClient

    address = next((a.strip() for a in settings.notify.split(",") if a.strip()), "")
    if settings.kind != "reward" or not address:
        raise InvalidArgumentError(
            "min_shadow_agreement", "needs --kind reward and the reward service in --notify"
        )
    with RewardClient(address, settings.credentials) as client:
        shadow = client.model(name=settings.name).shadow
    if shadow.version != version:
        running = f"the shadow is {shadow.version}" if shadow.version else "no shadow runs"
        raise FailedPreconditionError(
            f"{version} is not shadowing {settings.name!r} at {address} ({running}): "
            f"`plaudit registry shadow {version} --name {settings.name}` first"
        )
    figures = (
        f"agreement {shadow.agreement:.3f} on {shadow.pairs} pairs "
        f"({shadow.requests} requests), rank correlation {shadow.rank_correlation:.3f}"
    )
    if shadow.pairs < settings.min_shadow_pairs or shadow.requests < settings.min_shadow_requests:
        raise FailedPreconditionError(
            f"not promoted: the shadow has {shadow.pairs} pairs from {shadow.requests} requests, "
            f"--min-shadow-pairs is {settings.min_shadow_pairs} and --min-shadow-requests "
            f"{settings.min_shadow_requests} ({figures})"
        )
    live = settings.model_registry("reward", settings.name).promoted()
    if shadow.live_version != live:
        raise FailedPreconditionError(
            f"not promoted: the shadow was compared with {shadow.live_version or 'nothing'}, "
            f"but {live} is live now; let it see traffic against {live} first"
        )
    threshold = settings.min_shadow_agreement or 0.0
    if shadow.agreement < threshold:
        raise FailedPreconditionError(
            f"not promoted: {figures} is below --min-shadow-agreement {threshold}"
        )
    return f"cli; shadow {figures}"


def _registry_keygen(out: Path | None) -> int:
    """``registry keygen --out DIR``: an Ed25519 key pair for signed manifests."""
    from plaudit.services.common.errors import FailedPreconditionError, InvalidArgumentError
    from plaudit.services.common.registry import ManifestSigner

    if out is None:
        raise InvalidArgumentError("--out", "registry keygen needs a folder for the key pair")
    private, public = out / "plaudit-signing.pem", out / "plaudit-signing.pub.pem"
    for path in (private, public):
        if path.exists():
            raise FailedPreconditionError(f"{path} exists: keygen never overwrites a key")
    out.mkdir(parents=True, exist_ok=True)
    signer = ManifestSigner.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(signer.private_pem())
    public.write_bytes(signer.public_pem())
    sys.stdout.write(json.dumps({"private": str(private), "public": str(public),
                                 "key_id": signer.key_id}) + "\n")  # fmt: skip
    sys.stderr.write(
        "Trainers and exports sign with the private key (PLAUDIT_SIGNING_KEY_FILE); serving "
        "and promotion accept only signed versions once given the public one "
        "(PLAUDIT_TRUSTED_KEYS_FILE).\n"
    )
    return 0


def _registry_read(
    registry: ModelRegistry, action: str, version: str | None, *, as_json: bool
) -> int:
    """``registry list`` and ``registry show``: tables for people, JSON with ``--json``."""
    from plaudit.services.common.errors import NotFoundError
    from plaudit.tables import manifest_table, registry_table, render, version_row

    promoted = registry.promoted()
    if action == "show":
        assert version is not None
        try:
            manifest = registry.manifest(version)
        except NotFoundError as exc:
            raise NotFoundError(f"{exc}: `plaudit registry list` shows the versions") from None
        if as_json:
            sys.stdout.write(manifest.model_dump_json(indent=2) + "\n")
        else:
            render(sys.stdout, manifest_table(manifest, promoted))
        return 0
    manifests = registry.list_versions()
    if not manifests and registry.is_local and not Path(registry.root).is_dir():
        raise FileNotFoundError(
            f"no registry at {registry.root}: `plaudit up` creates one and bootstraps a reward "
            "model; `plaudit export reward --promote --registry DIR` publishes one"
        )
    if as_json:
        rows = [version_row(m, promoted) for m in manifests]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    render(sys.stdout, registry_table(manifests, promoted, kind=registry.kind))
    if not manifests:
        hint = (
            "`plaudit export reward --promote` publishes one (`plaudit up` bootstraps one)"
            if registry.kind == "reward"
            else "`plaudit export policy --promote` publishes one (`plaudit up` bootstraps one)"
        )
        sys.stderr.write(f"no {registry.kind} models in {registry.root}: {hint}\n")
    return 0


def _notify(
    addresses: str,
    out: typing.TextIO,
    credentials: ClientCredentials,
    model: str = "",
    *,
    expect_shadow: str = "",
) -> int:
    """Tell serving processes to pick up the promotion (and shadow) now; 1 if any could not
    make it live (or, with ``expect_shadow``, does not run that shadow)."""
    import grpc

    from plaudit.services.common.admin import notify_reload

    failed = 0
    for address in filter(None, (a.strip() for a in addresses.split(","))):
        try:
            reply = notify_reload(address, credentials=credentials, model=model)
        except grpc.RpcError as exc:
            out.write(f"{address}: not notified ({exc.code().name}: {exc.details()})\n")
            failed += 1
            continue
        status = f"live {reply.live_version}"
        if reply.shadow_version:
            status += f", shadow {reply.shadow_version}"
        if reply.last_swap_error:
            status += f"; swap failed: {reply.last_swap_error}"
            failed += 1
        if expect_shadow and reply.shadow_version != expect_shadow:
            why = reply.shadow_error or "the service does not follow shadows (--no-shadow?)"
            status += f"; shadow {expect_shadow} not running: {why}"
            failed += 1
        out.write(f"{address}: {status}\n")
    return 1 if failed else 0


def _cmd_score(args: argparse.Namespace) -> int:
    from plaudit.services.reward.client import RewardClient

    settings = settings_from_args(ClientSettings, args)
    with RewardClient(settings.addr, settings.credentials) as client:
        rewards, version = client.score([args.prompt], [args.completion])
    sys.stdout.write(json.dumps({"reward": rewards[0], "model_version": version}) + "\n")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    """``plaudit keys new``: a random API key and the entry a server's configuration needs."""
    from plaudit.services.common.security.keys import ApiKeyEntry, hash_key, new_api_key

    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    key = new_api_key()
    entry = ApiKeyEntry.model_validate({"name": args.name, "sha256": hash_key(key), "roles": roles})
    sys.stdout.write(json.dumps({"api_key": key, "entry": entry.model_dump(mode="json")}) + "\n")
    sys.stderr.write(
        "The key is shown only now: give it to the client (PLAUDIT_API_KEY). Add the entry to "
        "the servers' PLAUDIT_API_KEYS list or --api-keys-file; they keep only its hash.\n"
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """``plaudit status``: the running system on one screen (``--json`` for scripts); exit 1
    when the reward or feedback service does not answer."""
    from plaudit.status import StatusSettings, collect, is_down, status_tables
    from plaudit.tables import render

    settings = settings_from_args(StatusSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    report = collect(settings)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render(sys.stdout, *status_tables(report))
    if is_down(report):
        sys.stderr.write(
            f"plaudit: nothing answers at {settings.address('reward')} or "
            f"{settings.address('feedback')}: start the system with `plaudit up` (or give "
            "--addr and the ports it runs on)\n"
            if all(s["health"] == "not running" for s in report["services"].values())
            else "plaudit: a service is not running (see above)\n"
        )
        return 1
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from plaudit.up import UpSettings, main

    settings = settings_from_args(UpSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    return main(settings)


def _cmd_demo(args: argparse.Namespace) -> int:
    from plaudit.demo import DemoSettings, run_demo

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
    from plaudit.services.feedback.settings import FeedbackSettings
    from plaudit.services.generation.settings import GenerationSettings
    from plaudit.services.reward.settings import RewardSettings

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
    p.add_argument("--json", action="store_true", help="stats: JSON for scripts, not tables")
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
        help="train a policy (DPO, rejection sampling, RLOO, GRPO or PPO) behind a win-rate "
        "promotion gate",
    )
    add_settings_arguments(p, TrainPolicySettings)
    p.set_defaults(func=_cmd_train_policy)

    p = commands.add_parser("registry", help="inspect and steer the model registry")
    p.add_argument(
        "action",
        choices=["list", "show", "promote", "rollback", "shadow", "unshadow", "names", "keygen"],
    )
    p.add_argument("version", nargs="?", help="version id (show, promote, shadow)")
    p.add_argument("--json", action="store_true", help="list, show: JSON for scripts")
    p.add_argument("--out", type=Path, help="keygen: folder for a new Ed25519 signing key pair")
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

    from plaudit.up import UpSettings

    p = commands.add_parser("up", help="run the whole loop on this machine (embedded defaults)")
    add_settings_arguments(p, UpSettings)
    p.set_defaults(func=_cmd_up)

    from plaudit.status import StatusSettings

    p = commands.add_parser(
        "status", help="the running system on one screen (what `plaudit up` started by default)"
    )
    p.add_argument("--json", action="store_true", help="JSON for scripts, not tables")
    add_settings_arguments(p, StatusSettings)
    p.set_defaults(func=_cmd_status)

    from plaudit.demo import DemoSettings

    p = commands.add_parser(
        "demo", help="feed the HH pairs through a running `plaudit up` and watch it retrain"
    )
    add_settings_arguments(p, DemoSettings)
    p.set_defaults(func=_cmd_demo)
    return parser


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM to a training or export (``plaudit up`` stopping, a pod evicted) unwinds it like
    Ctrl-C: ``finally`` blocks run, so a publish under way removes its staging folder."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    needs_version = ("show", "promote", "shadow")
    if args.command == "registry" and args.action in needs_version and not args.version:
        parser.error(f"registry {args.action} needs a version")
    interruptible = args.command in ("train", "export")  # see _interrupt_on_sigterm
    interruptible &= threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm) if interruptible else None
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from pydantic import ValidationError

        from plaudit.services.common.errors import PlauditError

        if isinstance(exc, PlauditError | ValidationError | FileNotFoundError):
            sys.stderr.write(f"plaudit: error: {exc}\n")
            return 2
        import grpc

        if isinstance(exc, grpc.RpcError):  # a client command: say what the service answered
            code = exc.code()
            hint = ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                hint = " (is it running? `plaudit up` starts the services, `plaudit status`"
                hint += " shows them)"
            sys.stderr.write(f"plaudit: error: {code.name}: {exc.details()}{hint}\n")
            return 2
        raise
    finally:
        if previous is not None:  # a caller in this process gets its own handler back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
