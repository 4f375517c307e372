"""The generation engine: the live policy (:mod:`plaudit.services.runtime.policy_model`) generating
flushed batches."""

from __future__ import annotations

import math
from collections.abc import Sequence

from plaudit.services.common.errors import PlauditError
from plaudit.services.common.model_server import LiveModel
from plaudit.services.runtime.policy_model import (
    GenerateJob,
    GenerateResult,
    LoadedPolicy,
    generate_jobs,
)


class GenerationEngine(LiveModel[LoadedPolicy]):
    """Holds the live policy and generates flushed batches of jobs (called from a worker thread).

    ``max_new_tokens`` is the server's limit: a version's default is capped at it.
    """

    def __init__(self, max_new_tokens: int) -> None:
        super().__init__("policy")
        self.max_new_tokens = max_new_tokens

    def process(self, jobs: Sequence[GenerateJob]) -> list[GenerateResult | PlauditError]:
        """Generate every job of a flush with one model snapshot (see
        :func:`plaudit.services.runtime.policy_model.generate_jobs`)."""
        return generate_jobs(self.require_model(), jobs, self.max_new_tokens)


def estimate_cost(job: GenerateJob, prompt_bytes: int, max_new_tokens: int) -> int:
    """Rough tokens a job occupies (about 4 bytes per prompt token), for batch budgeting."""
    return job.n * (math.ceil(prompt_bytes / 4) + 16 + max_new_tokens)
