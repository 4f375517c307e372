"""The reward-model objective, its held-out metrics and the held-out split."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from plaudit.services.common.calibration import expected_calibration_error


class HasPrompt(Protocol):
    @property
    def prompt(self) -> str: ...


P = TypeVar("P", bound=HasPrompt)

ECE_BINS = 10


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean over pairs of ``w * -[(1 - e) log sigmoid(d) + e log sigmoid(-d)]``, where
    ``d = r_c - r_r - m``.

    The Bradley-Terry likelihood of the human preference, as in InstructGPT (Ouyang et al. 2022,
    eq. 1); the margin ``m`` (Llama 2, Touvron et al. 2023, eq. 2) asks for a larger reward gap
    on pairs rated far apart; the weight ``w`` (e.g. annotator agreement) scales each pair's term;
    label smoothing ``e`` takes each label to be flipped with probability ``e`` (the conservative
    loss of cDPO, Mitchell 2023; for reward models, Wang et al. 2024, "Secrets of RLHF II"), so
    the loss stops pushing a gap once ``sigmoid(d) = 1 - e`` (with a margin the reward gap
    settles at ``m + logit(1 - e)``). ``e = 0``: the plain loss.
    """
    logits = chosen - rejected
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    if weight is not None:
        losses = losses * weight
    return losses.mean()


def reward_centering_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``mean((r_c + r_r)^2)``: keeps rewards near zero (Eisenstein et al. 2023)."""
    return ((chosen + rejected) ** 2).mean()


def preference_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Share of pairs whose chosen completion scores higher; a tie counts one half."""
    diff = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    return float(np.mean((diff > 0) + 0.5 * (diff == 0))) if diff.size else float("nan")


def calibration_error(chosen: np.ndarray, rejected: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of ``P(a > b) = sigmoid(r_a - r_b)`` over ``bins`` equal bins.

    Each pair is counted in both orders, (chosen, rejected) with label 1 and (rejected, chosen)
    with label 0, so the labels are balanced; ECE is ``sum_b |sum(labels_b) - sum(p_b)| / N``
    (Guo et al. 2017), i.e. the bin-size-weighted gap between accuracy and confidence. The same
    computation as serving's (:func:`plaudit.services.common.calibration.reliability`) at T = 1.
    """
    diff = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    return expected_calibration_error(diff, 1.0, bins)


def pairwise_metrics(
    chosen: np.ndarray,
    rejected: np.ndarray,
    margin: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> dict[str, float]:
    """Held-out metrics, namespaced as TRL logs them."""
    with torch.no_grad():
        loss = bradley_terry_loss(
            torch.as_tensor(chosen, dtype=torch.float64),
            torch.as_tensor(rejected, dtype=torch.float64),
            None if margin is None else torch.as_tensor(margin, dtype=torch.float64),
            None if weight is None else torch.as_tensor(weight, dtype=torch.float64),
        )
    return {
        "eval/loss": float(loss),
        "eval/accuracy": preference_accuracy(chosen, rejected),
        "eval/calibration_error": calibration_error(chosen, rejected),
        "rewards/chosen": float(np.mean(chosen)),
        "rewards/rejected": float(np.mean(rejected)),
        "rewards/margin": float(np.mean(np.asarray(chosen) - np.asarray(rejected))),
        "eval/pairs": float(len(chosen)),
    }


def prompt_bucket(prompt: str) -> float:
    """Where a prompt falls in [0, 1): the first 8 bytes of its UTF-8 sha256."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_prompt(pairs: Sequence[P], eval_fraction: float) -> tuple[list[P], list[P]]:
    """(train, held-out): an item (pair, prompt record, supervised example) is held out when its
    prompt's bucket is below the fraction.

    The side depends on the prompt alone, so every pair of a prompt lands on the same side, the
    split does not move with the seed or the rest of the data, and versions trained on growing
    data are all compared on held-out prompts none of them trained on.
    """
    train: list[P] = []
    held_out: list[P] = []
    for item in pairs:
        (held_out if prompt_bucket(item.prompt) < eval_fraction else train).append(item)
    return train, held_out
