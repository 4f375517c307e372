"""The promotion gate: a new reward model replaces the promoted one only if it is not worse on
the same held-out pairs, both scored by the ONNX graphs they are (or would be) served with."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from plaudit.services.common.registry import ModelRegistry
from plaudit.trainer.objective import preference_accuracy

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.01


@dataclass
class AccuracyGate:
    """Promote when ``candidate_accuracy >= current_accuracy - tolerance``.

    The tolerance (default 0.01, one point of held-out accuracy) absorbs the noise of a small
    held-out set, so a retrain on more data is not refused for a one-pair difference; set it to
    0 to demand no loss at all. Without a promoted version the candidate is promoted; when the
    promoted version cannot be loaded or scored it is not (a person should look). Called by
    :func:`plaudit.trainer.export.export_reward` with the candidate's rewards, before publishing,
    so the record lands in the new version's manifest.
    """

    registry: ModelRegistry
    tolerance: float = DEFAULT_TOLERANCE

    def __call__(self, texts: list[tuple[str, str]], candidate: np.ndarray) -> dict[str, Any]:
        candidate_acc = preference_accuracy(candidate[0::2], candidate[1::2])
        current = self.registry.promoted()
        record: dict[str, Any] = {
            "promoted": False,
            "candidate_accuracy": candidate_acc,
            "current_version": current,
            "current_accuracy": None,
            "tolerance": self.tolerance,
            "eval_pairs": len(texts) // 2,
            "decided_at": datetime.now(UTC).isoformat(),
        }
        if current is None:
            record.update(promoted=True, reason="no version was promoted")
            return record
        try:
            current_acc = self.current_accuracy(current, texts)
        except Exception as exc:
            log.exception("could not score the promoted version", extra={"version": current})
            record["reason"] = f"could not score the promoted version {current}: {exc}"
            return record
        promoted = candidate_acc >= current_acc - self.tolerance
        record.update(
            promoted=promoted,
            current_accuracy=current_acc,
            reason=(
                f"held-out accuracy {candidate_acc:.4f} {'>=' if promoted else '<'} "
                f"{current_acc:.4f} ({current}) - tolerance {self.tolerance}"
            ),
        )
        log.info("promotion decision", extra=record)
        return record

    def current_accuracy(self, version: str, texts: list[tuple[str, str]]) -> float:
        """The promoted version's accuracy on ``texts`` as it is served (hash-verified graph,
        its own tokenization and default precision)."""
        from plaudit.services.runtime.reward_model import LoadedRewardModel  # onnxruntime, no torch

        loaded = LoadedRewardModel.load(self.registry, version, provider="cpu")
        rewards, _, _ = loaded.score_raw([p for p, _ in texts], [c for _, c in texts])
        return preference_accuracy(rewards[0::2], rewards[1::2])
