"""Settings of the reward service (flags ``--x-y`` or environment ``PLAUDIT_X_Y``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.common.registry import RegistryLocationSettings
from services.common.security import ServerSecuritySettings


class RewardSettings(ServerSecuritySettings, RegistryLocationSettings):
    host: str = Field("0.0.0.0", description="gRPC bind address")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(9091, ge=0, le=65535, description="Prometheus /metrics port")
    execution_provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime provider; auto = CUDA only when a device can start"
    )
    precision: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="graph to serve; auto = the version's default (int8 only if it passed parity)",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads (0 = one per core)")
    max_batch_size: int = Field(64, ge=1, description="items per batch")
    max_batch_tokens: int = Field(16384, ge=1, description="estimated tokens per batch")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a request waits for a batch to fill")
    max_queue_items: int = Field(4096, ge=1, description="items queued before RESOURCE_EXHAUSTED")
    group_tokens: int = Field(
        0,
        ge=0,
        description="padded tokens per ONNX Runtime call; 0 = auto (256 on CPU, where small "
        "calls run fastest, 16384 on CUDA)",
    )
    max_items_per_request: int = Field(256, ge=1, description="items in one Score request")
    max_text_bytes: int = Field(65536, ge=1, description="UTF-8 bytes of one prompt or completion")
    poll_interval_s: float = Field(5.0, gt=0, description="registry poll while nothing is promoted")
    grace_period_s: float = Field(30.0, ge=0, description="drain time on SIGTERM")

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> RewardSettings:
        if self.max_queue_items < self.max_items_per_request:
            raise ValueError("max_queue_items must be at least max_items_per_request")
        return self
