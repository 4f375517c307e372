"""Settings of the reward service (flags ``--x-y`` or environment ``PLAUDIT_X_Y``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from plaudit.services.common.registry import (
    DEFAULT_MODEL_NAME,
    RegistryLocationSettings,
    validate_model_name,
)
from plaudit.services.common.security.guard import ServerSecuritySettings
from plaudit.services.common.security.limits import (
    FieldLimits,
    MessageLimits,
    field_limit,
    text_message_bytes,
)
from plaudit.services.common.settings import ModelServingSettings, port_field


class RewardSettings(ModelServingSettings, ServerSecuritySettings, RegistryLocationSettings):
    port: int = port_field(50051)
    metrics_port: int = port_field(9091, "Prometheus /metrics port")
    http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="HTTP JSON port: native, OpenRLHF, vLLM and TEI routes (0 picks a free one; "
        "unset: no HTTP)",
    )
    max_batch_size: int = Field(64, ge=1, description="items per batch")
    max_batch_tokens: int = Field(16384, ge=1, description="estimated tokens per batch")
    max_queue_items: int = Field(4096, ge=1, description="items queued before RESOURCE_EXHAUSTED")
    group_tokens: int = Field(
        0,
        ge=0,
        description="padded tokens per ONNX Runtime call; 0 = auto (256 on CPU, where small "
        "calls run fastest, 16384 on CUDA)",
    )
    max_items_per_request: int = Field(256, ge=1, description="items in one Score request")
    max_text_bytes: int = Field(65536, ge=1, description="UTF-8 bytes of one prompt or completion")
    models: list[str] = Field(
        [DEFAULT_MODEL_NAME],
        description="named reward models to serve, each hot-swapped from its own promotion "
        "pointer (the first answers requests that name none); `all`: every named model with a "
        "promoted version at start",
    )
    objectives: Path | None = Field(
        None,
        description="JSON or TOML file of objectives combining the named models (weighted, "
        "gated); see docs/reward-models.md",
    )
    shadow: bool = Field(
        True, description="follow each model's shadow pointer (`plaudit registry shadow`)"
    )
    shadow_queue: int = Field(
        64, ge=1, description="sampled requests waiting for the shadow; more are dropped"
    )
    shadow_queue_items: int = Field(
        1024, ge=1, description="items of the sampled requests waiting for the shadow, at most"
    )

    @field_validator("models")
    @classmethod
    def _model_names(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("at least one model")
        if names != ["all"]:
            for name in names:
                validate_model_name(name, "models")
            if len(set(names)) != len(names):
                raise ValueError(f"a model is listed twice: {names}")
        return names

    def served_models(self) -> list[str]:
        """The named models to serve; ``all`` is resolved against the registry now."""
        if self.models != ["all"]:
            return list(self.models)
        names = self.model_registry("reward").model_names()
        return names or [DEFAULT_MODEL_NAME]

    def message_limits(self) -> MessageLimits:
        """Score: ``max_items_per_request`` items of two texts; Compare: three texts."""
        items = self.max_items_per_request
        return {
            "/plaudit.v1.RewardService/Score": text_message_bytes(2 * items, self.max_text_bytes),
            "/plaudit.v1.RewardService/Compare": text_message_bytes(3, self.max_text_bytes),
        }

    def default_in_flight(self) -> int:
        """Enough maximal requests to fill the queue twice (``2 * max_queue_items //
        max_items_per_request``, 32 by default), at least 32: more calls would only wait,
        parsed, while their texts (up to ``message_limits`` each) sit in memory."""
        return max(32, 2 * self.max_queue_items // self.max_items_per_request)

    def field_limits(self) -> FieldLimits:
        """Score: three fields an item (the item, its prompt and completion); Compare: four."""
        return {
            "/plaudit.v1.RewardService/Score": field_limit(3 * self.max_items_per_request + 1),
            "/plaudit.v1.RewardService/Compare": field_limit(4),
        }

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> RewardSettings:
        if self.max_queue_items < self.max_items_per_request:
            raise ValueError("max_queue_items must be at least max_items_per_request")
        return self
