"""Settings of the feedback service (flags ``--x-y`` or environment ``PLAUDIT_X_Y``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from plaudit.services.common.security.client import ClientSecuritySettings
from plaudit.services.common.security.guard import ServerSecuritySettings
from plaudit.services.common.security.limits import (
    FieldLimits,
    MessageLimits,
    field_limit,
    text_message_bytes,
)
from plaudit.services.common.settings import ListenSettings, port_field
from plaudit.services.feedback.db import DEFAULT_FEEDBACK_URL
from plaudit.services.feedback.domain import (
    DEFAULT_CRITERION,
    MAX_PAIRS_PER_RATING,
    MAX_RATING_PAIRS_PER_GROUP,
    MAX_TAGS,
    FeedbackKind,
    FeedbackLimits,
    check_criteria_names,
)

NAME_FIELDS = 1 + MAX_TAGS
"""Short name fields of one event: its criterion and up to ``MAX_TAGS`` tags."""
NAME_BYTES = NAME_FIELDS * (32 + 8)  # 32 ASCII characters and the field's overhead each

TEXTS_OF_KIND: dict[FeedbackKind, int] = {
    "comparison": 3,  # prompt, chosen, rejected
    "ranking": 1 + FeedbackLimits.max_completions,
    "rating": 2,
    "correction": 3,  # prompt, completion, corrected
}


class FeedbackSettings(ListenSettings, ServerSecuritySettings, ClientSecuritySettings):
    """The server's settings; the client ones (``api_key``, ``tls_ca_file``...) are for its calls
    to the reward service (``reward_addr``)."""

    database_url: str = Field(
        DEFAULT_FEEDBACK_URL,
        description="sqlite:///path.db (embedded) or postgresql://user@host/db (psycopg 3)",
    )
    database_connect_timeout_s: int = Field(
        2, ge=1, description="PostgreSQL connect timeout: how fast calls fail while it is down"
    )
    port: int = port_field(50052)
    metrics_port: int = port_field(9092, "Prometheus /metrics port")
    max_text_bytes: int = Field(65536, ge=1, description="UTF-8 bytes of one prompt or completion")
    max_events_per_batch: int = Field(10_000, ge=1, description="events in one SubmitBatch stream")
    max_task_import_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest HTTP task import body (split bigger ones)"
    )
    stream_commit_events: int = Field(
        256, ge=1, description="SubmitBatch events per transaction (committed while streaming)"
    )
    commit_batch_size: int = Field(
        512, ge=1, description="unary submissions committed together in one transaction"
    )
    commit_wait_ms: float = Field(
        2.0, ge=0, description="longest a unary submission waits for others to share its commit"
    )
    max_queue_items: int = Field(
        20_000, ge=1, description="unary submissions queued before RESOURCE_EXHAUSTED"
    )
    export_page_size: int = Field(256, ge=1, le=10_000, description="pairs per export message")
    rating_pairs_across_annotators: bool = Field(
        False, description="pair ratings of different annotators (default: within one annotator)"
    )
    max_pairs_per_rating: int = Field(
        MAX_PAIRS_PER_RATING,
        ge=1,
        le=1024,
        description="earlier ratings one rating is paired with (nearest other scores beyond it)",
    )
    max_rating_pairs_per_group: int = Field(
        MAX_RATING_PAIRS_PER_GROUP,
        ge=0,
        description="pairs the ratings of one (prompt, annotator, scale) imply at most",
    )
    outlier_alpha: float = Field(
        0.05, gt=0, lt=1, description="significance of the annotator outlier test"
    )
    criteria: list[str] = Field(
        [DEFAULT_CRITERION],
        description="criteria feedback may judge (besides overall, always accepted); the "
        "labelling page asks one question per criterion, in this order",
    )
    health_interval_s: float = Field(
        2.0, gt=0, description="how often the database is probed for the health status"
    )
    grace_period_s: float = Field(30.0, ge=0, description="drain time on SIGTERM")
    # labelling page, JSON API and task queue (see docs/labelling.md)
    http_port: int = Field(
        8080, ge=0, le=65535, description="HTTP port: labelling page and JSON API (0 picks one)"
    )
    labels_per_task: int = Field(
        3, ge=1, description="annotators who label a task before it leaves the queue"
    )
    task_lease_s: float = Field(
        600.0, gt=0, description="how long a task handed to an annotator is held for them"
    )
    any_annotator_keys: list[str] = Field(
        [],
        description="names of API keys that may label as any annotator_id (imports, trusted "
        "front ends); every other key labels only as the annotator of its own name",
    )
    max_leases_per_principal: int = Field(
        4, ge=0, description="annotators one API key may hold task leases for at once (0 = any)"
    )
    reward_addr: str = Field(
        "", description="reward service host:port for active learning (empty: off)"
    )
    explore_fraction: float = Field(
        0.2, ge=0, le=1, description="share of tasks picked at random instead of least certain"
    )
    task_candidates: int = Field(
        32, ge=1, le=1024, description="pending tasks sampled and scored per next-task request"
    )
    reward_timeout_s: float = Field(
        2.0, gt=0, description="deadline of one reward-service call (then tasks go at random)"
    )
    # new tasks from the generation service when the queue runs dry (see docs/labelling.md)
    generation_addr: str = Field(
        "", description="generation service host:port that makes tasks when the queue is empty"
    )
    task_prompts_file: Path | None = Field(
        None, description="JSONL prompts (or preference records) the generated tasks are made of"
    )
    generated_completions: int = Field(
        2, ge=2, le=16, description="completions sampled per generated task"
    )
    generated_tasks_per_fetch: int = Field(
        4, ge=1, le=64, description="prompts sent to the generation service per empty queue"
    )
    generation_temperature: float = Field(
        1.0, gt=0, description="sampling temperature of generated tasks"
    )
    generation_max_new_tokens: int = Field(
        0, ge=0, description="tokens per generated completion (0 = the policy's default)"
    )
    task_refill_below: int = Field(
        4, ge=0, description="fetch generated tasks in the background while fewer need labels"
    )
    generation_timeout_s: float = Field(120.0, gt=0, description="deadline of one generation call")

    def event_message_bytes(self, kind: FeedbackKind) -> int:
        """The largest protobuf request submitting one event of ``kind``: its texts, ids and
        metadata at their limits."""
        limits = FeedbackLimits(max_text_bytes=self.max_text_bytes)
        chars = limits.max_metadata_key_chars + limits.max_metadata_value_chars
        metadata = limits.max_metadata_entries * (4 * chars + 32)  # 4 UTF-8 bytes a character
        ids = 2 * 4 * limits.max_id_chars
        return text_message_bytes(
            TEXTS_OF_KIND[kind], self.max_text_bytes, metadata + ids + NAME_BYTES
        )

    def message_limits(self) -> MessageLimits:
        """One event per Submit call and per SubmitBatch message; the rest carry no texts."""
        service = "/plaudit.v1.FeedbackService/"
        limits = {
            f"{service}Submit{kind.capitalize()}": self.event_message_bytes(kind)
            for kind in TEXTS_OF_KIND
        }
        limits[f"{service}SubmitBatch"] = max(limits.values())
        return limits

    def default_in_flight(self) -> int:
        """An eighth of a unary commit batch (``commit_batch_size // 8``), at least 64 (the
        default): enough concurrent submissions to share each commit, while the largest HTTP
        bodies (task imports, ``max_task_import_bytes``) held at once stay bounded."""
        return max(64, self.commit_batch_size // 8)

    def field_limits(self) -> FieldLimits:
        """One event per Submit call and per SubmitBatch message: its texts, two ids, up to
        three numbers, three fields a metadata entry (the entry, its key and value), its
        criterion and tags."""
        entries = FeedbackLimits().max_metadata_entries
        service = "/plaudit.v1.FeedbackService/"
        fields = {
            kind: TEXTS_OF_KIND[kind] + 2 + 3 + 3 * entries + NAME_FIELDS for kind in TEXTS_OF_KIND
        }
        limits = {
            f"{service}Submit{kind.capitalize()}": field_limit(n) for kind, n in fields.items()
        }
        limits[f"{service}SubmitBatch"] = field_limit(1 + max(fields.values()))
        return limits

    @field_validator("criteria")
    @classmethod
    def _criteria_are_names(cls, value: list[str]) -> list[str]:
        return list(check_criteria_names(value))

    def feedback_limits(self) -> FeedbackLimits:
        """The validation limits of events: text size and the accepted criteria."""
        return FeedbackLimits(max_text_bytes=self.max_text_bytes, criteria=tuple(self.criteria))

    @model_validator(mode="after")
    def _generation_needs_prompts(self) -> FeedbackSettings:
        if self.generation_addr and self.task_prompts_file is None:
            raise ValueError("generation_addr needs task_prompts_file (the prompts to sample for)")
        return self
