"""The reward service's one core, behind both front ends (gRPC servicer and HTTP handlers):
validation of a :class:`~plaudit.v1.reward_pb2.ScoreRequest` / ``CompareRequest``, the model or
objective that scores it (:mod:`.objectives`), one submission to the dynamic batcher, the reply
messages, and the offer of the scored job to a running shadow (:mod:`.shadow`).

Validation raises :class:`InvalidArgumentError` naming the field and its limit; the front ends map
domain errors to their statuses (the gRPC interceptor, :func:`~plaudit.services.common.http.
error_response`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from plaudit.services.common.batching import Batcher
from plaudit.services.common.calibration import heldout_figures
from plaudit.services.common.errors import (
    InvalidArgumentError,
    PlauditError,
    UnavailableError,
)
from plaudit.services.common.names import check_tags
from plaudit.services.reward.engine import (
    JobScores,
    ModelScores,
    RewardEngine,
    ScoreJob,
    estimate_tokens,
    merge_truncated,
)
from plaudit.services.reward.metrics import RewardMetrics
from plaudit.services.reward.objectives import GatedObjective, WeightedObjective
from plaudit.services.reward.settings import RewardSettings
from plaudit.services.reward.shadow import ShadowScorer
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.v1 import reward_pb2

_STANDARDIZE: dict[int, bool | None] = {
    reward_pb2.NORMALIZATION_UNSPECIFIED: None,
    reward_pb2.NORMALIZATION_RAW: False,
    reward_pb2.NORMALIZATION_STANDARDIZED: True,
}


def _standardize(value: int) -> bool | None:
    if value not in _STANDARDIZE:
        raise InvalidArgumentError(
            "normalization", f"unknown value {value}; expected one of {sorted(_STANDARDIZE)}"
        )
    return _STANDARDIZE[value]


def _check_text(field: str, text: str, limit: int) -> None:
    size = len(text.encode("utf-8"))
    if size > limit:
        raise InvalidArgumentError(field, f"{size} bytes exceeds the limit of {limit} bytes")


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class ScoreResult:
    """A scored request: ``rewards`` (the one model's, or the objective's combination), the
    model's ``raw`` outputs (the combination again with an objective), truncation by any model,
    the version string, real tokens, and every contributing model's own scores."""

    rewards: np.ndarray
    raw: np.ndarray
    truncated: np.ndarray
    version: str
    tokens: int
    temperature: float  # of the one model; 1 with an objective (uncalibrated)
    models: tuple[ModelScores, ...]
    model: str = ""  # the named model that scored, empty with an objective
    objective: str = ""
    members: np.ndarray | None = None  # an ensemble's heads (items, heads), normalized as rewards


def preference_probability(result: ScoreResult) -> float:
    """``sigmoid((raw_a - raw_b) / T)`` for a two-item result, with the calibration temperature
    ``T`` of the version that scored it. From the raw rewards whatever normalization the caller
    asked for: standardizing divides the difference by the reference std, which would change the
    probability's scale, and ``T`` was fitted on raw differences. With an objective, ``raw`` is
    the combined reward and ``T`` is 1."""
    raw_a, raw_b = (float(x) for x in result.raw)
    return sigmoid((raw_a - raw_b) / result.temperature)


def member_rewards(scores: ModelScores) -> np.ndarray | None:
    """An ensemble's heads in the rewards' normalization: ``(member - mean) / std`` when the
    rewards are standardized (written as an offset from the mean reward, which is exact)."""
    if scores.members is None:
        return None
    return (scores.members - scores.raw[:, None]) / scores.scale + scores.rewards[:, None]


def ensemble_preference(result: ScoreResult) -> tuple[float, float]:
    """For a two-item ensemble result: the standard deviation over heads of each head's
    ``sigmoid((a_k - b_k) / T)``, and the share of heads preferring a (a tie counts 1/2)."""
    (one,) = result.models
    assert one.members is not None
    diff = (one.members[0] - one.members[1]).astype(np.float64)
    probs = 1.0 / (1.0 + np.exp(-diff / result.temperature))
    return float(probs.std()), float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _model_rewards(scores: ModelScores) -> reward_pb2.ModelRewards:
    return reward_pb2.ModelRewards(
        model=scores.name, model_version=scores.version, rewards=scores.rewards.tolist()
    )


class RewardCore:
    """Scores requests through the shared batcher with the live snapshot of each named model."""

    def __init__(
        self,
        engine: RewardEngine,
        batcher: Batcher[ScoreJob, JobScores | PlauditError],
        settings: RewardSettings,
        metrics: RewardMetrics,
        last_swap_error: Callable[[str], str],
        objectives: Mapping[str, WeightedObjective | GatedObjective] | None = None,
        shadow: ShadowScorer | None = None,
    ) -> None:
        self._engine = engine
        self._last_swap_error = last_swap_error
        self._batcher = batcher
        self._settings = settings
        self._metrics = metrics
        self.objectives = dict(objectives or {})
        self._shadow = shadow

    @property
    def max_items(self) -> int:
        return self._settings.max_items_per_request

    def _target(
        self, model: str, objective: str
    ) -> tuple[str, WeightedObjective | GatedObjective | None]:
        """The named model (or objective) a request asks for; the default model when neither."""
        if model and objective:
            raise InvalidArgumentError("objective", "give model or objective, not both")
        if objective:
            found = self.objectives.get(objective)
            if found is None:
                known = ", ".join(self.objectives) or "none configured"
                raise InvalidArgumentError(
                    "objective", f"{objective!r} is not defined here (defined: {known})"
                )
            return "", found
        name = model or self._engine.default
        if name not in self._engine.slots:
            raise InvalidArgumentError(
                "model", f"{name!r} is not served here (served: {', '.join(self._engine.names)})"
            )
        return name, None

    async def _submit(
        self,
        job: ScoreJob,
        timeout: float | None,
        model: str,
        objective: WeightedObjective | GatedObjective | None,
        tags: Sequence[frozenset[str]],
    ) -> ScoreResult:
        max_length = max(self._engine.require_model(name).max_length for name in job.models)
        cost = sum(
            estimate_tokens(p, c, max_length)
            for p, c in zip(job.prompts, job.completions, strict=True)
        ) * len(job.models)
        outcome = await self._batcher.submit(job, size=len(job.prompts), cost=cost, timeout=timeout)
        if isinstance(outcome, PlauditError):
            raise outcome
        tokens = sum(s.tokens for s in outcome.values())
        self._metrics.items_scored.inc(len(job.prompts))
        self._metrics.tokens_scored.inc(tokens)
        if self._shadow is not None:
            for scores in outcome.values():
                self._shadow.offer(scores, job)
        models = tuple(outcome[name] for name in job.models)
        if objective is None:
            (one,) = models
            return ScoreResult(one.rewards, one.raw, one.truncated, one.version, tokens,
                               one.temperature, models, model=model,
                               members=member_rewards(one))  # fmt: skip
        combined = objective.combine({s.name: s.standardized for s in models}, tags)
        version = ",".join(f"{s.name}={s.version}" for s in models)
        return ScoreResult(combined, combined, merge_truncated(outcome), version, tokens, 1.0,
                           models, objective=objective.name)  # fmt: skip

    async def run_score(
        self, request: reward_pb2.ScoreRequest, timeout: float | None
    ) -> ScoreResult:
        """Validate ``request`` and score its items as one job (rewards, raw outputs, tokens)."""
        n = len(request.items)
        if n == 0:
            raise InvalidArgumentError("items", "at least one item is required")
        limit = self._settings.max_items_per_request
        if n > limit:
            raise InvalidArgumentError(
                "items", f"{n} items exceeds the limit of {limit} per request"
            )
        standardize = _standardize(request.normalization)
        model, objective = self._target(request.model, request.objective)
        text_limit = self._settings.max_text_bytes
        tags = []
        for i, item in enumerate(request.items):
            if not item.prompt and not item.completion:
                raise InvalidArgumentError(f"items[{i}]", "prompt and completion are both empty")
            _check_text(f"items[{i}].prompt", item.prompt, text_limit)
            _check_text(f"items[{i}].completion", item.completion, text_limit)
            tags.append(check_tags(f"items[{i}].tags", item.tags))
        job = ScoreJob(
            [item.prompt for item in request.items],
            [item.completion for item in request.items],
            standardize,
            objective.models if objective is not None else (model,),
        )
        return await self._submit(job, timeout, model, objective, tags)

    async def score(
        self, request: reward_pb2.ScoreRequest, timeout: float | None
    ) -> reward_pb2.ScoreResponse:
        result = await self.run_score(request, timeout)
        reply = reward_pb2.ScoreResponse(
            rewards=result.rewards.tolist(),
            model_version=result.version,
            truncated=result.truncated.tolist(),
            model=result.model,
            objective=result.objective,
            models=[_model_rewards(s) for s in result.models],
        )
        if result.members is not None:
            reply.spread.extend(result.members.std(axis=1).tolist())
            reply.ensemble_members = result.members.shape[1]
            reply.member_rewards.extend(result.members.reshape(-1).tolist())
        return reply

    async def compare(
        self, request: reward_pb2.CompareRequest, timeout: float | None
    ) -> reward_pb2.CompareResponse:
        standardize = _standardize(request.normalization)
        limit = self._settings.max_text_bytes
        for field in ("prompt", "completion_a", "completion_b"):
            _check_text(field, getattr(request, field), limit)
        for field in ("completion_a", "completion_b"):
            if not getattr(request, field):
                raise InvalidArgumentError(field, "must not be empty")
        tags = check_tags("tags", request.tags)
        model, objective = self._target(request.model, request.objective)
        job = ScoreJob(
            [request.prompt, request.prompt],
            [request.completion_a, request.completion_b],
            standardize,
            objective.models if objective is not None else (model,),
        )
        result = await self._submit(job, timeout, model, objective, [tags, tags])
        reward_a, reward_b = (float(x) for x in result.rewards)
        reply = reward_pb2.CompareResponse(
            reward_a=reward_a,
            reward_b=reward_b,
            prob_a_preferred=preference_probability(result),
            model_version=result.version,
            model=result.model,
            objective=result.objective,
            models=[_model_rewards(s) for s in result.models],
        )
        if result.members is not None:
            spread, share = ensemble_preference(result)
            reply.prob_a_preferred_spread = spread
            reply.members_preferring_a = share
            reply.ensemble_members = result.members.shape[1]
        return reply

    def _describe(self, name: str) -> reward_pb2.GetModelResponse:
        model: LoadedRewardModel | None = self._engine.slots[name].model
        if model is None:
            error = self._last_swap_error(name)
            raise UnavailableError(
                f"no reward model {name!r} loaded yet"
                + (f"; last load failure: {error}" if error else "")
            )
        loaded_at = Timestamp()
        loaded_at.FromDatetime(model.loaded_at)
        manifest = model.manifest
        calibration = manifest.calibration
        heldout = heldout_figures(manifest)
        reply = reward_pb2.GetModelResponse(
            version=model.version,
            backbone=manifest.backbone,
            execution_provider=model.provider,
            precision=model.precision,
            max_length=model.max_length,
            text_format=model.encoder.format.kind,
            normalization_mean=manifest.normalization.mean,
            normalization_std=manifest.normalization.std,
            loaded_at=loaded_at,
            last_swap_error=self._last_swap_error(name),
            calibration_temperature=model.temperature,
            calibrated=bool(calibration and calibration.fitted),
            heldout_accuracy=heldout.accuracy or 0.0,
            heldout_ece=heldout.ece or 0.0,
            heldout_pairs=heldout.pairs,
            data_cursor=manifest.data_cursor or "",
            name=name,
            ensemble_members=manifest.ensemble_members,
        )
        stats = self._shadow.stats.get(name) if self._shadow is not None else None
        if stats is not None:
            reply.shadow.CopyFrom(stats.message())
        return reply

    def get_model(self, name: str = "") -> reward_pb2.GetModelResponse:
        """The named model (default: the first served), with every served model in ``models``
        (those not loaded yet are left out) and the objectives."""
        target, _ = self._target(name, "")
        reply = self._describe(target)
        for served in self._engine.names:
            if self._engine.slots[served].model is not None:
                reply.models.append(self._describe(served))
        reply.objectives.extend(self.objectives)
        return reply

    @property
    def serving(self) -> bool:
        return all(slot.model is not None for slot in self._engine.slots.values())
