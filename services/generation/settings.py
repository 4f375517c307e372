"""Settings of the generation service (flags ``--x-y`` or environment ``PLAUDIT_X_Y``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from plaudit.services.common.registry import RegistryLocationSettings
from plaudit.services.common.security.client import ClientSecuritySettings
from plaudit.services.common.security.guard import ServerSecuritySettings
from plaudit.services.common.security.limits import (
    FieldLimits,
    MessageLimits,
    field_limit,
    text_message_bytes,
)
from plaudit.services.common.settings import ModelServingSettings, port_field


class GenerationSettings(
    ModelServingSettings, ServerSecuritySettings, ClientSecuritySettings, RegistryLocationSettings
):
    port: int = port_field(50053)
    metrics_port: int = port_field(9093, "Prometheus /metrics port")
    http_port: int = port_field(
        8082, "HTTP port: the OpenAI-style API /v1/... (0 picks a free one)"
    )
    backend: Literal["onnx", "openai"] = Field(
        "onnx",
        description="who samples: onnx = Plaudit's engine on the promoted policy; openai = the "
        "OpenAI-compatible server at --backend-url (vLLM, TGI, llama.cpp's server)",
    )
    backend_url: str = Field(
        "", description="base URL of the OpenAI-compatible server (http://host:port, /v1 optional)"
    )
    backend_model: str = Field(
        "", description="model the backend is asked for ('' = the first id of its /v1/models)"
    )
    backend_text_format: Literal["chat_template", "plain"] = Field(
        "chat_template",
        description="how the backend gets a request: chat_template = /v1/chat/completions (a "
        "prompt split into turns); plain = /v1/completions (a conversation as a dialogue)",
    )
    backend_api_key: str = Field("", description="bearer key the backend wants ('' = none)")
    backend_timeout_s: float = Field(
        300.0, gt=0, description="longest wait for one backend request without a client deadline"
    )
    backend_poll_s: float = Field(
        2.0, gt=0, description="how often the backend's /v1/models is probed (health, version)"
    )
    backend_adapters: Literal["none", "vllm"] = Field(
        "none",
        description="vllm: follow the registry's promoted policy and load its LoRA adapter into "
        "the backend (/v1/load_lora_adapter; vLLM needs --enable-lora and "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), answering as that version; none: serve "
        "--backend-model as it is",
    )
    backend_adapter_root: str = Field(
        "",
        description="the folder of version folders as the backend sees it (this service logs "
        "its own at start: <registry>/policy/versions, or a remote registry's cache folder for "
        "policies); '' = this service's paths (same machine, or a volume mounted alike)",
    )
    backend_adapter_base: str = Field(
        "",
        description="the base model the backend serves, as policy manifests name it "
        "(lora_adapter.base, e.g. smollm2): adapters trained on another are refused ('' = "
        "not checked)",
    )
    backend_adapter_unload_grace_s: float = Field(
        60.0,
        ge=0,
        description="a replaced adapter stays loaded this long (and while this service still "
        "uses it), so replicas sharing the backend can switch first",
    )
    reward_addr: str = Field(
        "", description="reward service address for rerank requests ('' = rerank refused)"
    )
    reward_timeout_s: float = Field(30.0, gt=0, description="longest wait for the reward service")
    reward_model: str = Field(
        "", description="named reward model rerank scores with ('' = the service's default)"
    )
    reward_objective: str = Field(
        "", description="objective rerank scores with (e.g. a gated helpfulness/safety one)"
    )
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
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous = a request joins the running batch at the next decode step and "
        "a finished row leaves at once (--max-wait-ms does not apply); static = requests "
        "flushed together (--max-wait-ms) decode to the end",
    )
    max_prefill_tokens: int = Field(
        512,
        ge=1,
        description="continuous batching: prompt tokens prefilled between two decode steps (a "
        "longer prompt still goes alone); smaller keeps running rows decoding during bursts",
    )
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

    @field_validator("backend_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        """Without a trailing ``/`` or ``/v1``: routes are joined as ``/v1/...``."""
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/").removesuffix("/v1").rstrip("/")

    def default_in_flight(self) -> int:
        """Calls for the batch being generated and the next one (``2 * max_batch_rows``, 64 by
        default): more would only wait for the single generation worker."""
        return 2 * self.max_batch_rows

    def field_limits(self) -> FieldLimits:
        """Generate: three fields a message (the message, its role and content), the sampling
        parameters with their stop strings, and the request's own few."""
        sampling = 1 + 5 + self.max_stop_strings
        fields = 1 + 3 * self.max_messages + sampling + 2
        return {"/plaudit.v1.GenerationService/Generate": field_limit(fields)}

    @model_validator(mode="after")
    def _limits_hold_a_request(self) -> GenerationSettings:
        if self.max_batch_rows < self.max_n or self.max_queue_items < self.max_n:
            raise ValueError("max_batch_rows and max_queue_items must be at least max_n")
        if self.backend == "openai" and not self.backend_url:
            raise ValueError("backend_url: --backend openai needs the server's URL")
        if self.backend_adapters != "none" and self.backend != "openai":
            raise ValueError("backend_adapters: adapters are loaded into a --backend openai server")
        if self.reward_model and self.reward_objective:
            raise ValueError("reward_objective: give reward_model or reward_objective, not both")
        return self
