"""The reward engine: the live version (:mod:`~plaudit.services.runtime.reward_model`) scoring.

Batches arrive from the dynamic batcher as whole requests (:class:`ScoreJob`). All items of a
flush are tokenized together, sorted by length and cut into groups whose padded size stays under
``group_tokens``, so short texts are never padded to long ones. Each group is one ONNX Runtime
call. The model snapshot is taken once per flush, so every request is scored by one version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plaudit.services.common.errors import FailedPreconditionError
from plaudit.services.common.model_server import LiveModel
from plaudit.services.runtime.reward_model import LoadedRewardModel


@dataclass(frozen=True)
class ScoreJob:
    """One request's items; scored as a unit."""

    prompts: Sequence[str]
    completions: Sequence[str]
    standardize: bool | None = None  # None: the version's default


@dataclass(frozen=True)
class ScoreResult:
    rewards: np.ndarray
    raw: np.ndarray
    truncated: np.ndarray
    version: str
    tokens: int
    temperature: float = 1.0  # the scoring version's calibration (see LoadedRewardModel)


class RewardEngine(LiveModel[LoadedRewardModel]):
    """Holds the live model and scores flushed batches of jobs (called from a worker thread)."""

    def __init__(self, group_tokens: int = 0) -> None:
        super().__init__("reward model")
        self.group_tokens = group_tokens  # 0: the loaded model's provider decides

    def process(self, jobs: Sequence[ScoreJob]) -> list[ScoreResult]:
        """Score every job of a flush with one model snapshot."""
        model = self.require_model()
        prompts = [p for job in jobs for p in job.prompts]
        completions = [c for job in jobs for c in job.completions]
        raw, truncated, lengths = model.score_raw(
            prompts, completions, self.group_tokens or model.default_group_tokens
        )
        if not np.all(np.isfinite(raw)):
            raise FailedPreconditionError(f"model {model.version} produced non-finite rewards")
        results = []
        start = 0
        for job in jobs:
            end = start + len(job.prompts)
            job_raw = raw[start:end]
            standardize = job.standardize
            if standardize is None:
                standardize = model.manifest.normalization.reference != "identity"
            rewards = model.standardize(job_raw) if standardize else job_raw
            tokens = int(lengths[start:end].sum())
            results.append(
                ScoreResult(
                    rewards,
                    job_raw,
                    truncated[start:end],
                    model.version,
                    tokens,
                    model.temperature,
                )
            )
            start = end
        return results


def estimate_tokens(prompt: str, completion: str, max_length: int) -> int:
    """Cheap token estimate used for batch budgeting before tokenization (about 4 chars/token)."""
    return min(max_length, math.ceil((len(prompt) + len(completion)) / 4) + 3)
