"""The reward engine: the live version of each named reward model
(:mod:`~plaudit.services.runtime.reward_model`) scoring.

Batches arrive from the dynamic batcher as whole requests (:class:`ScoreJob`), each naming the
models it needs (one, or those of an objective). For each named model, all items of a flush that
need it are tokenized together, sorted by length and cut into groups whose padded size stays
under ``group_tokens``, so short texts are never padded to long ones; each group is one ONNX
Runtime call. Each model's snapshot is taken once per flush, so every request is scored by one
version of each model. A model that is not live, or fails to score, fails only the jobs that
need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from plaudit.services.common.errors import FailedPreconditionError, PlauditError
from plaudit.services.common.model_server import LiveModel
from plaudit.services.runtime.reward_model import LoadedRewardModel


@dataclass(frozen=True)
class ScoreJob:
    """One request's items, scored as a unit by each model in ``models``."""

    prompts: Sequence[str]
    completions: Sequence[str]
    standardize: bool | None = None  # None: each version's default
    models: tuple[str, ...] = ("default",)


@dataclass(frozen=True)
class ModelScores:
    """What one named model's live version gave a job's items."""

    name: str
    version: str
    raw: np.ndarray
    standardized: np.ndarray  # (raw - mean) / std with the version's statistics
    rewards: np.ndarray  # raw or standardized, as the job asked (or the version's default)
    truncated: np.ndarray
    tokens: int
    temperature: float = 1.0  # the version's calibration (see LoadedRewardModel)
    members: np.ndarray | None = None  # an ensemble's heads, raw: (items, heads); else None
    scale: float = 1.0  # what standardizing divides by (so a standardized spread is raw / scale)


JobScores = dict[str, ModelScores]


class RewardEngine:
    """Holds the live version of every named model (one :class:`LiveModel` slot each) and scores
    flushed batches of jobs (called from a worker thread)."""

    def __init__(self, names: Sequence[str] = ("default",), group_tokens: int = 0) -> None:
        if not names:
            raise ValueError("a reward engine serves at least one named model")
        self.slots: dict[str, LiveModel[LoadedRewardModel]] = {
            name: LiveModel(f"reward model {name!r}") for name in names
        }
        self.group_tokens = group_tokens  # 0: the loaded model's provider decides

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    @property
    def default(self) -> str:
        """The model a request naming none is scored by: the first served."""
        return next(iter(self.slots))

    @property
    def model(self) -> LoadedRewardModel | None:
        """The default model's live version (None before it loads)."""
        return self.slots[self.default].model

    def set_model(self, model: LoadedRewardModel, name: str | None = None) -> None:
        self.slots[name or self.default].set_model(model)

    def require_model(self, name: str | None = None) -> LoadedRewardModel:
        return self.slots[name or self.default].require_model()

    def score_with(
        self, model: LoadedRewardModel, jobs: Sequence[ScoreJob], name: str
    ) -> list[ModelScores]:
        """Score every item of ``jobs`` with ``model`` in one pass; one result per job."""
        prompts = [p for job in jobs for p in job.prompts]
        completions = [c for job in jobs for c in job.completions]
        raw, members, truncated, lengths = model.score_members(
            prompts, completions, self.group_tokens or model.default_group_tokens
        )
        if not np.all(np.isfinite(raw)):
            raise FailedPreconditionError(f"model {model.version} produced non-finite rewards")
        standardized = model.standardize(raw)
        norm = model.manifest.normalization
        default_standardize = norm.reference != "identity"
        out = []
        start = 0
        for job in jobs:
            end = start + len(job.prompts)
            standardize = default_standardize if job.standardize is None else job.standardize
            chosen = standardized if standardize else raw
            out.append(
                ModelScores(
                    name,
                    model.version,
                    raw[start:end],
                    standardized[start:end],
                    chosen[start:end],
                    truncated[start:end],
                    int(lengths[start:end].sum()),
                    model.temperature,
                    None if members is None else members[start:end],
                    (norm.std if norm.std > 0 else 1.0) if standardize else 1.0,
                )
            )
            start = end
        return out

    def process(self, jobs: Sequence[ScoreJob]) -> list[JobScores | PlauditError]:
        """Score every job of a flush: each named model once over the items that need it, with
        one snapshot of that model."""
        results: list[JobScores | PlauditError] = [{} for _ in jobs]
        needed: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            for name in job.models:
                needed.setdefault(name, []).append(i)
        for name, indices in needed.items():
            slot = self.slots.get(name)
            try:
                if slot is None:
                    raise FailedPreconditionError(f"model {name!r} is not served here")
                model = slot.require_model()
            except PlauditError as exc:
                for i in indices:
                    results[i] = exc
                continue
            live = [i for i in indices if not isinstance(results[i], PlauditError)]
            if not live:
                continue
            try:
                scored = self.score_with(model, [jobs[i] for i in live], name)
            except Exception as exc:  # this model's failure fails only the jobs that need it
                error = exc if isinstance(exc, PlauditError) else PlauditError(
                    f"model {name!r} ({model.version}) failed to score: {exc}"
                )  # fmt: skip
                for i in live:
                    results[i] = error
                continue
            for i, scores in zip(live, scored, strict=True):
                result = results[i]
                if isinstance(result, dict):
                    result[name] = scores
        return results


def estimate_tokens(prompt: str, completion: str, max_length: int) -> int:
    """Cheap token estimate used for batch budgeting before tokenization (about 4 chars/token)."""
    return min(max_length, math.ceil((len(prompt) + len(completion)) / 4) + 3)


def merge_truncated(scores: Mapping[str, ModelScores]) -> np.ndarray:
    """Per item: truncated by any of the models."""
    flags = [s.truncated for s in scores.values()]
    return np.logical_or.reduce(flags) if len(flags) > 1 else flags[0]
