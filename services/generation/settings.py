"""Settings of the generation service (flags ``--x-y`` or environment ``PLAUDIT_X_Y``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from plaudit.services.common.registry import RegistryLocationSettings
from plaudit.services.common.security.client import ClientSecuritySettings
from plaudit.services.common.security.guard import ServerSecuritySettings
from plaudit.services.common.security.limits import MessageLimits, text_message_bytes
from plaudit.services.common.settings import ModelServingSettings, port_field


class GenerationSettings(
    ModelServingSettings, ServerSecuritySettings, ClientSecuritySettings, RegistryLocationSettings
):
    port: int = port_field(50053)
    metrics_port: int = port_field(9093, "Prometheus /metrics port")
    http_port: int = port_field(
        8082, "HTTP port: the OpenAI-style API /v1/... (0 picks a free one)"
    )
    reward_addr: str = Field(
        "", description="reward service address for rerank requests ('' = rerank refused)"
    )
    reward_timeout_s: float = Field(30.0, gt=0, description="longest wait for the reward service")
    max_new_tokens: int = Field(
        1024, ge=1, description="most tokens one completion may ask for (caps version defaults)"
    )
    max_n: int = Field(16, ge=1, description="most completions per request")
    max_prompt_bytes: int = Field(
        65536, ge=1, description="UTF-8 bytes of a prompt/conversation (+16 per message)"
    )
    max_messages: int = Field(256, ge=1, description="messages in one conversation")
    max_stop_strings: int = Field(8, ge=0, description="stop strings per request")
    max_stop_bytes: int = Field(256, ge=1, description="UTF-8 bytes of one stop string")
    max_batch_rows: int = Field(
        32, ge=1, description="completions generated together (requests batch up to this)"
    )
    max_batch_tokens: int = Field(
        65536, ge=1, description="estimated prompt + generated tokens of one batch"
    )
    max_queue_items: int = Field(
        512, ge=1, description="completions queued before RESOURCE_EXHAUSTED"
    )

    def message_limits(self) -> MessageLimits:
        """Generate: a prompt or conversation (its texts together at most ``max_prompt_bytes``,
        twice that for the messages' roles and framing) and the stop strings."""
        stops = self.max_stop_strings * (self.max_stop_bytes + 16)
        return {
            "/plaudit.v1.GenerationService/Generate": text_message_bytes(
                2, self.max_prompt_bytes, extra=stops
            )
        }

    @model_validator(mode="after")
    def _limits_hold_a_request(self) -> GenerationSettings:
        if self.max_batch_rows < self.max_n or self.max_queue_items < self.max_n:
            raise ValueError("max_batch_rows and max_queue_items must be at least max_n")
        return self
