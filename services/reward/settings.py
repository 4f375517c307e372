"""Settings of the reward service (flags ``--x-y`` or environment ``PLAUDIT_X_Y``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from plaudit.services.common.registry import RegistryLocationSettings
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
