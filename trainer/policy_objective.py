"""Policy objectives: sequence log-probs, DPO, RLOO, GRPO, PPO, supervised fine-tuning,
best-of-n.

All log-probs are sums over completion tokens only: ``completion_mask`` marks them, so prompt
and padding tokens never count. Row ``b``'s token ``t`` is predicted by the logits at ``t - 1``.
The per-token objectives (GRPO, PPO) take (batch, T) tensors of completion tokens, right-padded,
with a ``mask`` of the real ones; padded positions never count.
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


# -- per-token objectives (GRPO, PPO) ------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set (0 when nothing is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def aggregate_token_losses(
    losses: torch.Tensor, mask: torch.Tensor, how: str, constant: float = 1.0
) -> torch.Tensor:
    """A batch's loss from its per-token losses (batch, T):

    * ``sequence-mean``: each sequence's mean over its tokens, then the mean over sequences
      (GRPO, Shao et al. 2024, eq. 3; favours short sequences per token);
    * ``token-mean``: the mean over every token of the batch (DAPO's token-level loss, Yu et al.
      2025, arXiv:2503.14476; PPO as TRL implements it);
    * ``token-sum-constant``: each sequence's token sum divided by ``constant`` (the generation
      budget), then the mean over sequences (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783, which
      removes GRPO's length bias).
    """
    m = mask.to(losses.dtype)
    if how == "sequence-mean":
        return ((losses * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if how == "token-mean":
        return masked_mean(losses, mask)
    if how == "token-sum-constant":
        return ((losses * m).sum(-1) / constant).mean()
    raise ValueError(f"unknown loss aggregation {how!r}")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, sec. 4.1.2): for ``k`` samples of a prompt
    (a row of ``rewards``, shape (prompts, k), k >= 2), ``(r_i - mean(r)) / (std(r) + eps)``
    with the sample (Bessel-corrected) std as TRL computes it; ``scale=False`` keeps
    ``r_i - mean(r)`` (Dr. GRPO, Liu et al. 2025, sec. 3.2: the std favours easy and hard
    prompts). Each row sums to zero."""
    if rewards.shape[-1] < 2:
        raise ValueError("group advantages need at least two samples per prompt")
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, keepdim=True) + eps) if scale else centred


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 (Schulman 2020, "Approximating KL divergence"), the
    one GRPO uses (eq. 4): ``exp(ref - logp) - (ref - logp) - 1``, unbiased under samples from
    pi and never negative."""
    d = reference_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective (Schulman et al. 2017, eq. 7) as a per-token loss:
    ``-min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`` with ``rho = exp(logp - logp_old)``
    (advantages and old log-probs held constant); and where the clipped term is the one taken
    (the clip fraction's numerator, as TRL counts it)."""
    advantages, old_logprobs = advantages.detach(), old_logprobs.detach()
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    kl_coef: float,
    aggregation: str = "sequence-mean",
    constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO (Shao et al. 2024, eq. 3): per token the clipped surrogate with the sequence's
    advantage (shape (batch,), broadcast over its tokens) plus ``kl_coef`` times the k3 KL to
    the reference, aggregated by :func:`aggregate_token_losses`. Also the clip fraction and the
    mean k3 per token."""
    surrogate, clipped = clipped_surrogate(
        logprobs, old_logprobs, advantages.unsqueeze(-1), clip_eps
    )
    kl = k3_kl(logprobs, reference_logprobs.detach())
    loss = aggregate_token_losses(surrogate + kl_coef * kl, mask, aggregation, constant)
    return loss, {
        "rl/clip_fraction": float(masked_mean(clipped.float(), mask)),
        "rl/k3_kl": float(masked_mean(kl.detach(), mask)),
    }


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """RLHF's per-token reward (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024):
    ``-kl_coef * (logp - ref_logp)`` at every completion token, plus the sequence's score at its
    last one; 0 on padding."""
    m = mask.to(logprobs.dtype)
    rewards = -kl_coef * (logprobs - reference_logprobs) * m
    last = (m.sum(-1).long() - 1).clamp(min=0)
    rows = torch.arange(len(scores), device=rewards.device)
    return rewards.index_put((rows, last), rewards[rows, last] + scores.to(rewards.dtype))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), right to left:
    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` and ``A`` zero after a sequence's last token. Returns the advantages and the value
    targets ``A + V`` (0 on padding)."""
    m = mask.to(values.dtype)
    after = torch.zeros_like(m[:, :1])
    next_mask = torch.cat([m[:, 1:], after], dim=1)  # 0 after the last token
    deltas = rewards + gamma * torch.cat([values[:, 1:], after], dim=1) * next_mask - values
    carry, columns = torch.zeros_like(values[:, 0]), []
    for t in reversed(range(values.shape[1])):
        carry = deltas[:, t] + gamma * lam * next_mask[:, t] * carry
        columns.append(carry)
    advantages = torch.stack(columns[::-1], dim=1) * m
    return advantages, (advantages + values) * m


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked entries (population variance); with
    ``shift_mean=False`` the mean is added back (rewards: only their scale changes). Padding
    stays 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss (as in OpenAI's baselines and InstructGPT; Huang et al. 2024,
    detail 9): ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``, the mean over
    tokens; also the share of tokens where the clipped term is taken."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    plain_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain_sq, clipped_sq), mask)
    return loss, {
        "rl/value_clip_fraction": float(masked_mean((clipped_sq > plain_sq).float(), mask))
    }


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    cliprange_value: float,
    vf_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip (Schulman et al. 2017, eq. 9 without the entropy bonus): the token-mean clipped
    surrogate with per-token advantages plus ``vf_coef`` times :func:`clipped_value_loss`."""
    surrogate, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps)
    policy = masked_mean(surrogate, mask)
    value, value_numbers = clipped_value_loss(values, old_values, returns, mask, cliprange_value)
    return policy + vf_coef * value, {
        "rl/policy_loss": float(policy.detach()),
        "rl/value_loss": float(value.detach()),
        "rl/clip_fraction": float(masked_mean(clipped.float(), mask)),
        **value_numbers,
    }


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, samples: int) -> float:
    """Ziegler et al. 2019's adaptive KL controller (sec. 2.2): ``coef * (1 + e * samples /
    horizon)`` with ``e = clip(kl / target - 1, -0.2, 0.2)``, after a batch of ``samples``
    whose mean KL was ``kl``."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * samples / horizon)


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
