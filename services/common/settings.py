"""pydantic-settings base class and its bridge to argparse.

Every field of a settings class is both a command-line flag (``--field-name``) and an environment
variable (``PLAUDIT_FIELD_NAME``). Precedence: flag > environment > default. The object is
validated once, at start-up, and passed down; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="PlauditSettings")


class PlauditSettings(BaseSettings):
    """Base for per-service settings: ``PLAUDIT_`` environment prefix, unknown keys rejected."""

    model_config = SettingsConfigDict(env_prefix="PLAUDIT_", extra="forbid", validate_default=True)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="auto: text on a terminal, JSON lines otherwise"
    )

    @classmethod
    def default_help(cls, name: str) -> str:
        """How ``--help`` states the default of field ``name``."""
        return f"default {cls.model_fields[name].default!r}"


def port_field(default: int, description: str = "gRPC port (0 picks a free one)") -> Any:
    """A TCP port setting (0 picks a free one); each service gives its own default."""
    return Field(default, ge=0, le=65535, description=description)


class ListenSettings(PlauditSettings):
    """Where a service listens; each service redeclares ``port`` and ``metrics_port`` with
    :func:`port_field` and its own defaults."""

    host: str = Field("0.0.0.0", description="gRPC bind address")
    port: int = port_field(0)
    metrics_port: int = port_field(0, "Prometheus /metrics port")


class ModelServingSettings(ListenSettings):
    """Where a model server (reward, generation) listens and how it runs its ONNX graphs."""

    execution_provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime provider; auto = CUDA only when a device can start"
    )
    precision: Literal["auto", "fp32", "fp16", "int8", "int4", "int8-block"] = Field(
        "auto",
        description="graph to serve; auto = fp16 on CUDA when the version has one, else the "
        "version's default (a quantized graph only if it passed its gate; int4 and int8-block: "
        "policies' block-quantized weights)",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads (0 = one per core)")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a request waits for a batch to fill")
    poll_interval_s: float = Field(5.0, gt=0, description="registry poll while nothing is promoted")
    grace_period_s: float = Field(30.0, ge=0, description="drain time on SIGTERM")


def _scalar_type(annotation: Any) -> Any:
    """Strip Optional[...] and return the underlying type (or the Literal itself)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else str
    return annotation


def add_settings_arguments(
    parser: argparse.ArgumentParser, settings_cls: type[PlauditSettings]
) -> None:
    """Add one ``--flag`` per settings field; unset flags stay absent so env/defaults apply."""
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "PLAUDIT_" + name.upper()
        help_text = f"{field.description or name} (env {env}; {settings_cls.default_help(name)})"
        annotation = _scalar_type(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(annotation) is Literal:
            parser.add_argument(
                flag, choices=[str(c) for c in typing.get_args(annotation)], **kwargs
            )
        elif annotation in (int, float, Path):
            parser.add_argument(flag, type=annotation, **kwargs)
        elif typing.get_origin(annotation) is list:  # --flag A B ...; env: a JSON list
            (item,) = typing.get_args(annotation)
            item_type = item if item in (int, float, Path) else str
            parser.add_argument(flag, nargs="+", type=item_type, **kwargs)
        else:
            parser.add_argument(flag, type=str, **kwargs)


def settings_from_args(settings_cls: type[S], args: argparse.Namespace) -> S:
    """Build and validate settings: flags given on the command line override the environment."""
    given = {k: v for k, v in vars(args).items() if k in settings_cls.model_fields}
    return settings_cls(**given)
