"""Objectives: one reward from several named reward models.

A reward service that serves several named models (``helpfulness``, ``safety``) can answer
``Score``/``Compare`` with one model (``model``) or with an *objective* (``objective``) defined
in a file it reads at start (``--objectives FILE``, JSON or TOML)::

    {"objectives": [
      {"name": "helpful-and-safe", "kind": "weighted",
       "weights": {"helpfulness": 1.0, "safety": 0.5}},
      {"name": "llama2", "kind": "gated", "safety_model": "safety",
       "helpfulness_model": "helpfulness", "safety_tag": "safety", "threshold": 0.15,
       "whiten_mean": 0.0, "whiten_std": 1.0}
    ]}

Both combine each model's *standardized* reward ``z = (raw - mean) / std`` (the model's own
reference statistics from its manifest; the raw reward for a model without statistics), so
models trained apart are on one scale.

* ``weighted``: ``R = sum_m w_m * z_m``.
* ``gated`` (Llama 2, Touvron et al. 2023, section 3.2.2): with ``R_s = sigmoid(z_s)`` and
  ``R_h = sigmoid(z_h)`` the two models' scores as probabilities, ``R_c = R_s`` when the prompt
  carries ``safety_tag`` or ``R_s < threshold``, else ``R_h``; the reward is
  ``WHITEN(LOGIT(R_c)) = (LOGIT(R_c) - whiten_mean) / whiten_std``. ``LOGIT(sigmoid(z)) = z``,
  so it is computed as ``(z_c - whiten_mean) / whiten_std`` without the round trip (which loses
  precision in the tails); the threshold test is ``z_s < LOGIT(threshold)``, the same test.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from plaudit.services.common.errors import InvalidArgumentError
from plaudit.services.common.names import NAME_PATTERN, is_name

_NAME = f"^{NAME_PATTERN}$"


class _Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="what requests name in `objective`")

    @property
    def models(self) -> tuple[str, ...]:
        """The named models this objective reads, in a fixed order."""
        raise NotImplementedError

    def combine(self, z: Mapping[str, np.ndarray], tags: Sequence[frozenset[str]]) -> np.ndarray:
        """The combined reward per item from each model's standardized rewards ``z[name]``
        and each item's prompt tags."""
        raise NotImplementedError


class WeightedObjective(_Objective):
    """``R = sum_m w_m * z_m`` over the models named in ``weights``."""

    kind: Literal["weighted"]
    weights: dict[str, float] = Field(min_length=1)

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        for name, weight in weights.items():
            if not is_name(name):
                raise ValueError(f"{name!r} is not a model name")
            if not math.isfinite(weight):
                raise ValueError(f"weight of {name!r} must be finite")
        return weights

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted(self.weights))

    def combine(self, z: Mapping[str, np.ndarray], tags: Sequence[frozenset[str]]) -> np.ndarray:
        total = np.zeros(len(tags), dtype=np.float64)
        for name in self.models:
            total += self.weights[name] * z[name].astype(np.float64)
        return total.astype(np.float32)


class GatedObjective(_Objective):
    """Llama 2's safety gate (Touvron et al. 2023, section 3.2.2); see the module docstring."""

    kind: Literal["gated"]
    safety_model: str = Field(pattern=_NAME)
    helpfulness_model: str = Field(pattern=_NAME)
    safety_tag: str = Field("safety", pattern=_NAME)
    threshold: float = Field(0.15, gt=0.0, lt=1.0, description="on R_s = sigmoid(z_s)")
    whiten_mean: float = 0.0
    whiten_std: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _two_models(self) -> GatedObjective:
        if self.safety_model == self.helpfulness_model:
            raise ValueError("safety_model and helpfulness_model must be two different models")
        return self

    @property
    def models(self) -> tuple[str, ...]:
        return (self.safety_model, self.helpfulness_model)

    def combine(self, z: Mapping[str, np.ndarray], tags: Sequence[frozenset[str]]) -> np.ndarray:
        z_s = z[self.safety_model].astype(np.float64)
        z_h = z[self.helpfulness_model].astype(np.float64)
        tagged = np.fromiter((self.safety_tag in t for t in tags), dtype=bool, count=len(tags))
        logit_threshold = math.log(self.threshold / (1.0 - self.threshold))
        z_c = np.where(tagged | (z_s < logit_threshold), z_s, z_h)
        return ((z_c - self.whiten_mean) / self.whiten_std).astype(np.float32)


Objective = Annotated[WeightedObjective | GatedObjective, Field(discriminator="kind")]


class ObjectivesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    objectives: list[Objective] = Field(default_factory=list)


_FILE = TypeAdapter(ObjectivesFile)


def load_objectives(
    path: Path, served: Sequence[str]
) -> dict[str, WeightedObjective | GatedObjective]:
    """The objectives of ``path`` (``.toml``, else JSON) by name. Every model an objective reads
    must be among ``served``; names are unique. Raises :class:`InvalidArgumentError` naming the
    field (``objectives[1].weights``) otherwise."""
    field = "objectives"
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        parsed = _FILE.validate_python(data)
    except OSError as exc:
        raise InvalidArgumentError(field, f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(
                f"[{p}]" if isinstance(p, int) else str(p) for p in first["loc"] if p not in (
                    "weighted", "gated")
            ).replace(".[", "[")  # fmt: skip
            raise InvalidArgumentError(where or field, f"{path}: {first['msg']}") from None
        raise InvalidArgumentError(field, f"{path} is not valid: {exc}") from None
    out: dict[str, WeightedObjective | GatedObjective] = {}
    for i, objective in enumerate(parsed.objectives):
        where = f"objectives[{i}]"
        if objective.name in out:
            raise InvalidArgumentError(f"{where}.name", f"{objective.name!r} is defined twice")
        missing = [m for m in objective.models if m not in served]
        if missing:
            raise InvalidArgumentError(
                where,
                f"objective {objective.name!r} reads {', '.join(missing)}, which this service "
                f"does not serve (served: {', '.join(served)})",
            )
        out[objective.name] = objective
    return out
