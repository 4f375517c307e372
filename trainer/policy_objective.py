"""Policy objectives: sequence log-probs, DPO, RLOO, supervised fine-tuning, best-of-n.

All log-probs are sums over completion tokens only: ``completion_mask`` marks them, so prompt
and padding tokens never count. Row ``b``'s token ``t`` is predicted by the logits at ``t - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from plaudit.trainer.objective import preference_accuracy


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``log p(x_t | x_<t)`` for t = 1..T-1, shape (batch, T-1), at ``temperature``."""
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    labels = input_ids[:, 1:].unsqueeze(-1)
    return torch.gather(logits.log_softmax(-1), 2, labels).squeeze(-1)


def sequence_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row sum of completion-token log-probs (prompt and padding masked), shape (batch,)."""
    mask = completion_mask[:, 1:].to(torch.float32)
    return (token_logprobs(logits, input_ids, temperature) * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): mean of ``-log sigmoid(beta * (h_c - h_r))`` with
    ``h = log pi(y|x) - log ref(y|x)``; optionally weighted per pair (annotator agreement).

    Returns the loss and the implicit rewards ``beta * h`` of the chosen and rejected
    completions (detached), from which :func:`dpo_metrics` derives TRL's metrics.
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen - rejected)
    if weight is not None:
        losses = losses * weight
    return losses.mean(), chosen.detach(), rejected.detach()


def dpo_metrics(
    chosen: np.ndarray, rejected: np.ndarray, prefix: str = "rewards"
) -> dict[str, float]:
    """TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (share with
    chosen above rejected, a tie counting one half) and ``rewards/margins``."""
    chosen = np.asarray(chosen, dtype=np.float64)
    rejected = np.asarray(rejected, dtype=np.float64)
    return {
        f"{prefix}/chosen": float(np.mean(chosen)),
        f"{prefix}/rejected": float(np.mean(rejected)),
        f"{prefix}/accuracies": preference_accuracy(chosen, rejected),
        f"{prefix}/margins": float(np.mean(chosen - rejected)),
    }


def kl_penalized_rewards(
    scores: torch.Tensor,
    policy_logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """``score - kl_coef * (log pi(y|x) - log ref(y|x))``: the sequence-level KL penalty of
    RLHF (Ziegler et al. 2019; Ouyang et al. 2022), with sequence log-prob sums."""
    return scores - kl_coef * (policy_logprobs - reference_logprobs)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, eq. 6; Kool et al. 2019): for ``k``
    samples of one prompt (a row of ``rewards``, shape (prompts, k), k >= 2), sample i's
    advantage is ``r_i - mean_{j != i} r_j``. Each row sums to zero."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("RLOO needs at least two samples per prompt")
    others = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE: ``-mean(A * log pi(y|x))`` with the advantages held constant."""
    return -(advantages.detach() * logprobs).mean()


def sft_loss(completion_logprobs: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning: cross-entropy averaged over every completion token of the batch
    (``completion_logprobs``: the log-probs of those tokens, flattened)."""
    return -completion_logprobs.mean()


def best_of_n(scores: Sequence[float] | np.ndarray) -> int:
    """Rejection sampling (Llama 2, Touvron et al. 2023, sec. 3.2.3): the index of the
    highest-scoring candidate (the first one on a tie)."""
    if not len(scores):
        raise ValueError("no candidates")
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


def win_rate(candidate: np.ndarray, baseline: np.ndarray) -> float:
    """Share of prompts where the candidate's completion scores higher; a tie counts one half."""
    return preference_accuracy(candidate, baseline)


def length_controlled_win_rate(
    candidate: np.ndarray,
    baseline: np.ndarray,
    candidate_lengths: np.ndarray,
    baseline_lengths: np.ndarray,
    *,
    l2: float = 1e-2,
    iterations: int = 50,
) -> float:
    """The win rate at equal length (AlpacaEval 2's length control, Dubois et al. 2024, for one
    pair of models): fit ``P(candidate wins) = sigmoid(theta + phi * tanh(d / sd(d)))``, with
    ``d`` the completion length difference (candidate minus baseline), by L2-regularised
    logistic regression (Newton steps; a tie is a soft label of one half), and report
    ``sigmoid(theta)``, the predicted win rate where the lengths agree.

    A policy that wins only by writing longer answers scores near 0.5 here however high its
    plain :func:`win_rate`; with equal lengths everywhere it equals the plain win rate (up to
    the regularisation, which only keeps a clean sweep finite).
    """
    cand = np.asarray(candidate, dtype=np.float64)
    base = np.asarray(baseline, dtype=np.float64)
    if cand.shape != base.shape or not cand.size:
        raise ValueError(f"need equal, non-empty reward arrays, got {cand.shape} and {base.shape}")
    lengths = np.asarray(candidate_lengths, dtype=np.float64)
    base_lengths = np.asarray(baseline_lengths, dtype=np.float64)
    if lengths.shape != cand.shape or base_lengths.shape != cand.shape:
        raise ValueError(
            f"length differences need lengths shaped like the rewards {cand.shape}, "
            f"got {lengths.shape} and {base_lengths.shape}"
        )
    d = lengths - base_lengths
    labels = np.where(cand > base, 1.0, np.where(cand < base, 0.0, 0.5))
    scale = d.std()
    x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
    design = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (p - labels) + l2 * theta
        hessian = (design.T * (p * (1 - p))) @ design + l2 * np.eye(2)
        step = np.linalg.solve(hessian, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(1.0 / (1.0 + np.exp(-theta[0])))
