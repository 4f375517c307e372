"""The ``plaudit`` command line.

Each command imports only what it needs: ``serve`` never imports torch or the trainer; ``export``
(and later ``train``) does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from services.common.logging import configure_logging
from services.common.settings import PlauditSettings, add_settings_arguments, settings_from_args

log = logging.getLogger("plaudit.cli")


class ExportSettings(PlauditSettings):
    checkpoint: str = Field("minilm", description="HF checkpoint folder, or minilm / smollm2")
    registry: Path = Field(Path(".plaudit/registry"), description="model registry directory")
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


class RegistrySettings(PlauditSettings):
    registry: Path = Field(Path(".plaudit/registry"), description="model registry directory")
    kind: Literal["reward", "policy"] = Field("reward", description="model kind")


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


class ClientSettings(PlauditSettings):
    addr: str = Field("localhost:50051", description="reward service address")


def _cmd_serve_reward(args: argparse.Namespace) -> int:
    from services.reward.server import serve
    from services.reward.settings import RewardSettings

    settings = settings_from_args(RewardSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
    return 0


def _cmd_serve_feedback(args: argparse.Namespace) -> int:
    from services.feedback.server import serve
    from services.feedback.settings import FeedbackSettings

    settings = settings_from_args(FeedbackSettings, args)
    configure_logging(settings.log_level, settings.log_format)
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
    from services.common.registry import ModelRegistry
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
    manifest = export_reward(
        cfg, ModelRegistry(settings.registry, "reward"), promote=settings.promote
    )
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


def _cmd_registry(args: argparse.Namespace) -> int:
    from services.common.registry import ModelRegistry

    settings = settings_from_args(RegistrySettings, args)
    configure_logging(settings.log_level, settings.log_format)
    registry = ModelRegistry(settings.registry, settings.kind)
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
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from services.reward.client import RewardClient

    settings = settings_from_args(ClientSettings, args)
    with RewardClient(settings.addr) as client:
        rewards, version = client.score([args.prompt], [args.completion])
    sys.stdout.write(json.dumps({"reward": rewards[0], "model_version": version}) + "\n")
    return 0


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
    from services.reward.settings import RewardSettings

    p = serve.add_parser("reward", help="serve the promoted reward model over gRPC")
    add_settings_arguments(p, RewardSettings)
    p.set_defaults(func=_cmd_serve_reward)

    from services.feedback.settings import FeedbackSettings

    p = serve.add_parser("feedback", help="serve the feedback API over gRPC")
    add_settings_arguments(p, FeedbackSettings)
    p.set_defaults(func=_cmd_serve_feedback)

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

    from services.demo import DemoSettings

    p = commands.add_parser("demo", help="bootstrap a model, serve it and score the HH pairs")
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
