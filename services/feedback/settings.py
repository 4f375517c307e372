"""Settings of the feedback service (flags ``--x-y`` or environment ``PLAUDIT_X_Y``)."""

from __future__ import annotations

from pydantic import Field

from services.common.security import ClientSecuritySettings, ServerSecuritySettings
from services.feedback.db import DEFAULT_FEEDBACK_URL


class FeedbackSettings(ServerSecuritySettings, ClientSecuritySettings):
    """The server's settings; the client ones (``api_key``, ``tls_ca_file``...) are for its calls
    to the reward service (``reward_addr``)."""

    database_url: str = Field(
        DEFAULT_FEEDBACK_URL,
        description="sqlite:///path.db (embedded) or postgresql://user@host/db (psycopg 3)",
    )
    database_connect_timeout_s: int = Field(
        2, ge=1, description="PostgreSQL connect timeout: how fast calls fail while it is down"
    )
    host: str = Field("0.0.0.0", description="gRPC bind address")
    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(9092, ge=0, le=65535, description="Prometheus /metrics port")
    max_text_bytes: int = Field(65536, ge=1, description="UTF-8 bytes of one prompt or completion")
    max_events_per_batch: int = Field(10_000, ge=1, description="events in one SubmitBatch stream")
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
    outlier_alpha: float = Field(
        0.05, gt=0, lt=1, description="significance of the annotator outlier test"
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
