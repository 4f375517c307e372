"""The reward service's one core, behind both front ends (gRPC servicer and HTTP handlers):
validation of a :class:`~plaudit.v1.reward_pb2.ScoreRequest` / ``CompareRequest``, one submission
to the dynamic batcher, the reply messages.

Validation raises :class:`InvalidArgumentError` naming the field and its limit; the front ends map
domain errors to their statuses (the gRPC interceptor, :func:`~plaudit.services.common.http.
error_response`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from google.protobuf.timestamp_pb2 import Timestamp

from plaudit.services.common.batching import DynamicBatcher
from plaudit.services.common.calibration import heldout_figures
from plaudit.services.common.errors import InvalidArgumentError, UnavailableError
from plaudit.services.reward.engine import RewardEngine, ScoreJob, ScoreResult, estimate_tokens
from plaudit.services.reward.metrics import RewardMetrics
from plaudit.services.reward.settings import RewardSettings
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


def preference_probability(result: ScoreResult) -> float:
    """``sigmoid((raw_a - raw_b) / T)`` for a two-item result, with the calibration temperature
    ``T`` of the version that scored it. From the raw rewards whatever normalization the caller
    asked for: standardizing divides the difference by the reference std, which would change the
    probability's scale, and ``T`` was fitted on raw differences."""
    raw_a, raw_b = (float(x) for x in result.raw)
    return sigmoid((raw_a - raw_b) / result.temperature)


class RewardCore:
    """Scores requests through the shared batcher with the live model snapshot."""

    def __init__(
        self,
        engine: RewardEngine,
        batcher: DynamicBatcher[ScoreJob, ScoreResult],
        settings: RewardSettings,
        metrics: RewardMetrics,
        last_swap_error: Callable[[], str],
    ) -> None:
        self._engine = engine
        self._last_swap_error = last_swap_error
        self._batcher = batcher
        self._settings = settings
        self._metrics = metrics

    @property
    def max_items(self) -> int:
        return self._settings.max_items_per_request

    async def _submit(self, job: ScoreJob, timeout: float | None) -> ScoreResult:
        max_length = self._engine.require_model().max_length
        cost = sum(
            estimate_tokens(p, c, max_length)
            for p, c in zip(job.prompts, job.completions, strict=True)
        )
        result = await self._batcher.submit(job, size=len(job.prompts), cost=cost, timeout=timeout)
        self._metrics.items_scored.inc(len(job.prompts))
        self._metrics.tokens_scored.inc(result.tokens)
        return result

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
        text_limit = self._settings.max_text_bytes
        for i, item in enumerate(request.items):
            if not item.prompt and not item.completion:
                raise InvalidArgumentError(f"items[{i}]", "prompt and completion are both empty")
            _check_text(f"items[{i}].prompt", item.prompt, text_limit)
            _check_text(f"items[{i}].completion", item.completion, text_limit)
        job = ScoreJob(
            [item.prompt for item in request.items],
            [item.completion for item in request.items],
            standardize,
        )
        return await self._submit(job, timeout)

    async def score(
        self, request: reward_pb2.ScoreRequest, timeout: float | None
    ) -> reward_pb2.ScoreResponse:
        result = await self.run_score(request, timeout)
        return reward_pb2.ScoreResponse(
            rewards=result.rewards.tolist(),
            model_version=result.version,
            truncated=result.truncated.tolist(),
        )

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
        job = ScoreJob(
            [request.prompt, request.prompt],
            [request.completion_a, request.completion_b],
            standardize,
        )
        result = await self._submit(job, timeout)
        reward_a, reward_b = (float(x) for x in result.rewards)
        return reward_pb2.CompareResponse(
            reward_a=reward_a,
            reward_b=reward_b,
            prob_a_preferred=preference_probability(result),
            model_version=result.version,
        )

    def get_model(self) -> reward_pb2.GetModelResponse:
        model = self._engine.model
        if model is None:
            error = self._last_swap_error()
            raise UnavailableError(
                "no reward model loaded yet" + (f"; last load failure: {error}" if error else "")
            )
        loaded_at = Timestamp()
        loaded_at.FromDatetime(model.loaded_at)
        manifest = model.manifest
        calibration = manifest.calibration
        heldout = heldout_figures(manifest)
        return reward_pb2.GetModelResponse(
            version=model.version,
            backbone=manifest.backbone,
            execution_provider=model.provider,
            precision=model.precision,
            max_length=model.max_length,
            text_format=model.encoder.format.kind,
            normalization_mean=manifest.normalization.mean,
            normalization_std=manifest.normalization.std,
            loaded_at=loaded_at,
            last_swap_error=self._last_swap_error(),
            calibration_temperature=model.temperature,
            calibrated=bool(calibration and calibration.fitted),
            heldout_accuracy=heldout.accuracy or 0.0,
            heldout_ece=heldout.ece or 0.0,
            heldout_pairs=heldout.pairs,
            data_cursor=manifest.data_cursor or "",
        )

    @property
    def serving(self) -> bool:
        return self._engine.model is not None
