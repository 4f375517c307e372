"""Plaudit's own generation backend: the live policy (:mod:`plaudit.services.runtime.policy_model`)
generating the jobs of the service's batcher (:class:`OnnxBackend`): continuous by default
(:mod:`.continuous`: jobs join the running batch between steps), or flushed batches generated to
the end (``--batching static``: the shared dynamic batcher calls :meth:`GenerationEngine.process`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from plaudit.services.common.batching import Batcher
from plaudit.services.common.errors import PlauditError
from plaudit.services.common.model_server import LiveModel
from plaudit.services.generation.backend import LiveVersion
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


class OnnxBackend:
    """The default :class:`~plaudit.services.generation.backend.GenerationBackend`: one job = one
    submission to the service's batcher, generated on the policy live when the job starts."""

    def __init__(
        self,
        engine: GenerationEngine,
        batcher: Batcher[GenerateJob, GenerateResult | PlauditError],
    ) -> None:
        self._engine = engine
        self._batcher = batcher

    def live(self) -> LiveVersion | None:
        model = self._engine.model
        if model is None:
            return None
        return LiveVersion(model.version, int(model.manifest.created_at.timestamp()), "plaudit")

    async def generate(
        self, job: GenerateJob, size: int, timeout: float | None = None
    ) -> GenerateResult:
        """Raises UNAVAILABLE before a policy is live, and the job's own refusal."""
        self._engine.require_model()
        budget = job.params.max_new_tokens or self._engine.max_new_tokens
        outcome = await self._batcher.submit(
            job, size=job.n, cost=estimate_cost(job, size, budget), timeout=timeout
        )
        if isinstance(outcome, PlauditError):
            raise outcome
        return outcome
