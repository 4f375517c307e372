"""Policy training configuration, one class per method (no torch import: the CLI builds its flags
from them). Every run records its resolved config in the manifest of the version it publishes.

* :class:`DPOConfig`: Direct Preference Optimization on preference pairs (Rafailov et al. 2023).
* :class:`RejectionSamplingConfig`: best-of-n under the reward model, then supervised fine-tuning
  on the winners and on human corrections (Llama 2, Touvron et al. 2023).
* :class:`RLConfig`: REINFORCE Leave-One-Out against the reward service with a KL penalty to the
  reference (RLOO, Ahmadian et al. 2024); see docs/policy.md for how it compares with PPO.
* :class:`GRPOConfig`: Group Relative Policy Optimization (Shao et al. 2024): group-normalized
  advantages, a clipped ratio objective and a k3 KL estimate to the reference in the loss.
* :class:`PPOConfig`: PPO with a value head and GAE (Schulman et al. 2017; as in InstructGPT,
  Ouyang et al. 2022, and Huang et al. 2024's implementation details).

A method's own fields live in a ``*Fields`` class, declared once: its config adds them to the
shared fields, and ``plaudit train policy`` mixes all of them into its settings.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from plaudit.trainer.config import Device, TrainingConfig

PolicyMethod = Literal["dpo", "rejection-sampling", "rl", "grpo", "ppo"]
LossAggregation = Literal["sequence-mean", "token-mean", "token-sum-constant"]
# the weight-quantised graphs an export can add (trainer/policy_export.py POLICY_QUANTIZATIONS)
PolicyQuantization = Literal["none", "int8", "int4", "int8-block"]

DEFAULT_MIN_WIN_RATE = 0.5
DEFAULT_MIN_LC_WIN_RATE = 0.5
DEFAULT_MAX_KL = 10.0  # nats per sequence from the starting policy


class SharedPolicyConfig(TrainingConfig):
    """Settings every method shares: model, text lengths, optimizer, LoRA, evaluation, gate.

    ``lora_r`` > 0 trains LoRA adapters (Hu et al. 2021) on the attention and MLP projections
    and merges them into the weights before export; 0 trains every weight. Held-out prompts are
    chosen by prompt hash (``eval_fraction``, as for reward models); at most ``eval_prompts`` of
    them are sampled for the win rate against the baseline and the KL to the reference.
    """

    base: str = Field(
        "smollm2",
        description="smollm2, a HF causal-LM folder (e.g. a run), or live: the promoted "
        "policy's training checkpoint (its backbone when that is gone), so the KL is to it",
    )
    max_length: int = Field(512, ge=8, description="prompt + completion tokens")
    max_prompt_length: int = Field(
        256, ge=1, description="prompt tokens, below max_length (truncation keeps the end)"
    )
    batch_size: int = Field(4, ge=1, description="sequences (DPO: pairs) per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: off)")
    quantize: PolicyQuantization = Field(
        "none",
        description="also publish a weight-quantised graph, served by default only when it "
        "picks the fp32 next token at least 0.9 of the time (int4: exact on GGUF-born weights)",
    )
    lora_r: int = Field(0, ge=0, description="LoRA rank (0: full fine-tuning)")
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling numerator")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of prompts held out (by prompt hash)"
    )
    eval_prompts: int = Field(
        32, ge=0, description="held-out prompts sampled for win rate and KL (0: none)"
    )
    eval_max_new_tokens: int = Field(64, ge=1, description="tokens per evaluation sample")
    eval_temperature: float = Field(
        1.0, gt=0, description="evaluation temperature (1.0: the KL estimate is the true KL)"
    )
    eval_top_p: float = Field(1.0, gt=0, le=1, description="evaluation top-p")
    promotion_min_win_rate: float = Field(
        DEFAULT_MIN_WIN_RATE,
        ge=0,
        le=1,
        description="promote only when the held-out win rate against the baseline exceeds this",
    )
    promotion_min_lc_win_rate: float = Field(
        DEFAULT_MIN_LC_WIN_RATE,
        ge=0,
        le=1,
        description="... and the length-controlled win rate (at equal length) exceeds this",
    )
    promotion_max_kl: float = Field(
        DEFAULT_MAX_KL,
        gt=0,
        description="... and the KL to the starting policy, nats per sequence, is at most this",
    )
    promotion_significance: float = Field(
        1.0,
        gt=0,
        le=1,
        description="... and the wins are significant at this level (one-sided binomial; "
        "1: not required)",
    )
    max_train_seconds: float = Field(
        0.0,
        ge=0,
        description="training-time budget: no step (or rejection-sampling round) starts after "
        "this many seconds from the start of training (reference passes, rollouts and updates; "
        "the held-out evaluation is outside it); 0: none. The step count still caps the run, "
        "and warm-up and decay follow it: with a budget that ends the run early, give "
        "--warmup-ratio 0 or a step count it reaches",
    )
    reward_model: str = Field(
        "",
        description="named reward model at the reward service that scores rollouts and the "
        "gate ('' = the service's default)",
    )
    objective: str = Field(
        "",
        description="objective at the reward service (e.g. Llama 2's gated helpfulness/safety) "
        "that scores rollouts and the gate instead of one model",
    )
    seed: int = Field(0, description="seed for shuffles, sampling and LoRA init")
    device: Device = Field("auto", description="training device")
    num_threads: int = Field(0, ge=0, description="torch threads (0: torch's default)")

    @model_validator(mode="after")
    def _one_reward(self) -> SharedPolicyConfig:
        if self.reward_model and self.objective:
            raise ValueError("objective: give reward_model or objective, not both")
        return self

    @model_validator(mode="after")
    def _bf16_needs_fsdp(self) -> SharedPolicyConfig:
        if self.mixed_precision == "bf16" and self.strategy != "fsdp":
            raise ValueError(
                "mixed_precision: bf16 policy training is an fsdp setting (bf16 parameters): "
                "give --strategy fsdp or leave it auto"
            )
        return self


class DPOFields(BaseModel):
    """DPO's own fields (see :class:`DPOConfig`)."""

    beta: float = Field(0.1, gt=0, description="DPO KL strength (Rafailov et al. 2023)")
    learning_rate: float = Field(
        1e-6, ge=0, description="AdamW peak rate (TRL's default for full fine-tuning; LoRA ~1e-4)"
    )
    epochs: int = Field(1, ge=1, description="passes over the pairs")
    max_steps: int | None = Field(None, ge=0, description="optimizer steps at most")
    reward_addr: str = Field(
        "", description="reward service: rewards for sampling, the win rate (DPO: to promote)"
    )


class RejectionSamplingFields(BaseModel):
    """Rejection sampling's own fields (see :class:`RejectionSamplingConfig`)."""

    num_candidates: int = Field(4, ge=1, description="samples per prompt")
    temperature: float = Field(0.7, gt=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="sampling top-p")
    max_new_tokens: int = Field(128, ge=1, description="tokens per sample")
    reward_addr: str = Field(
        "localhost:50051", min_length=1, description="reward service for rewards and win rate"
    )
    rounds: int = Field(1, ge=1, description="sample-then-fine-tune rounds")
    max_prompts: int = Field(0, ge=0, description="prompts sampled per round (0: all)")
    sft_epochs: int = Field(1, ge=1, description="fine-tuning passes per round")
    sft_learning_rate: float = Field(1e-5, ge=0, description="fine-tuning peak rate")


class OnPolicyFields(BaseModel):
    """What the methods that sample as they train (RLOO, GRPO, PPO) share: the optimizer rate,
    sampling and the reward service that scores the samples."""

    learning_rate: float = Field(1e-6, ge=0, description="AdamW peak rate")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (also of log-probs)")
    top_p: float = Field(1.0, gt=0, le=1, description="sampling top-p")
    max_new_tokens: int = Field(64, ge=1, description="tokens per sample")
    reward_addr: str = Field(
        "localhost:50051", min_length=1, description="reward service for rewards and win rate"
    )


class RLFields(OnPolicyFields):
    """RLOO's own fields (see :class:`RLConfig`)."""

    rloo_k: int = Field(4, ge=2, description="samples per prompt (>= 2: leave-one-out)")
    prompts_per_step: int = Field(2, ge=1, description="prompts per step")
    steps: int = Field(50, ge=1, description="optimizer steps (one per batch: on-policy)")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient")


class GRPOFields(OnPolicyFields):
    """GRPO's own fields (see :class:`GRPOConfig`)."""

    group_size: int = Field(4, ge=2, description="samples per prompt, a group (>= 2)")
    prompts_per_step: int = Field(2, ge=1, description="prompts per rollout batch")
    steps: int = Field(50, ge=1, description="rollout batches (each trains grpo_epochs steps)")
    grpo_epochs: int = Field(
        1, ge=1, description="optimizer steps over each rollout batch (mu; 1: on-policy)"
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="ratio clip range (epsilon)")
    kl_coef: float = Field(
        0.04, ge=0, description="KL penalty coefficient (GRPO: beta of the k3 term; 0: none)"
    )
    scale_rewards: bool = Field(
        True, description="divide group advantages by the group's std (off: Dr. GRPO)"
    )
    loss_aggregation: LossAggregation = Field(
        "sequence-mean",
        description="token losses to a loss: sequence-mean (GRPO), token-mean (DAPO) or "
        "token-sum-constant (Dr. GRPO; divides by max_new_tokens)",
    )


class PPOFields(OnPolicyFields):
    """PPO's own fields (see :class:`PPOConfig`)."""

    prompts_per_step: int = Field(8, ge=1, description="prompts per rollout batch")
    steps: int = Field(50, ge=1, description="rollout batches (each trains epochs x minibatches)")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    num_minibatches: int = Field(
        1, ge=1, description="optimizer steps per pass over a rollout batch (PPO)"
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="ratio clip range (epsilon)")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient")
    kl_target: float = Field(
        0.0,
        ge=0,
        description="adaptive KL: target nats per sequence for kl_coef (Ziegler et al. 2019; "
        "0: fixed kl_coef)",
    )
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL horizon, in samples")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    value_model: Literal["shared", "separate"] = Field(
        "shared",
        description="value head on the policy's trunk (shared), or on a trainable copy of the "
        "starting policy (separate, as InstructGPT's value model: twice the trained weights)",
    )
    vf_coef: float = Field(0.1, ge=0, description="value loss weight")
    cliprange_value: float = Field(0.2, gt=0, description="value clip range")
    whiten_rewards: bool = Field(
        False, description="whiten the per-token rewards of each rollout batch (scale only)"
    )


class PolicyTrainingConfig(SharedPolicyConfig):
    """A method's resolved config: the shared fields, then the method's own."""

    method: ClassVar[PolicyMethod]
    budget_field: ClassVar[str]  # the one field that sizes a run (plaudit up's policy_budget)

    @model_validator(mode="after")
    def _prompt_fits(self) -> PolicyTrainingConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"invalid {self.method} settings: max_prompt_length")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.model_dump()}


class DPOConfig(DPOFields, PolicyTrainingConfig):
    """DPO: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` on sequence log-probs of
    the completions; the reference log-probs are computed once, before the first step."""

    method: ClassVar[PolicyMethod] = "dpo"
    budget_field: ClassVar[str] = "max_steps"


class RejectionSamplingConfig(RejectionSamplingFields, PolicyTrainingConfig):
    """Sample ``num_candidates`` completions per training prompt, keep the one the reward model
    scores highest, fine-tune on the kept ones (and the feedback store's corrections) with
    cross-entropy on completion tokens; ``rounds`` repeats it with the improved policy."""

    method: ClassVar[PolicyMethod] = "rejection-sampling"
    budget_field: ClassVar[str] = "max_prompts"


class RLConfig(RLFields, PolicyTrainingConfig):
    """RLOO: per step, ``rloo_k`` samples for each of ``prompts_per_step`` prompts; the reward is
    the reward model's score minus ``kl_coef * (logp_pi - logp_ref)`` summed over the sequence;
    each sample's baseline is the mean reward of the other k-1 samples of its prompt."""

    method: ClassVar[PolicyMethod] = "rl"
    budget_field: ClassVar[str] = "steps"


class GRPOConfig(GRPOFields, PolicyTrainingConfig):
    """GRPO: per rollout batch, ``group_size`` samples for each of ``prompts_per_step``
    prompts; a sample's advantage is its reward-model score normalized within its group; then
    ``grpo_epochs`` optimizer steps on the clipped ratio objective plus ``kl_coef`` times the k3
    estimate of the per-token KL to the reference."""

    method: ClassVar[PolicyMethod] = "grpo"
    budget_field: ClassVar[str] = "steps"


class PPOConfig(PPOFields, PolicyTrainingConfig):
    """PPO: per rollout batch, one sample for each of ``prompts_per_step`` prompts; per-token
    rewards ``-kl_coef * (logp - ref_logp)`` with the score added at the last token, GAE
    advantages from a value head on the policy, then ``ppo_epochs`` passes of
    ``num_minibatches`` optimizer steps on the clipped policy and value losses."""

    method: ClassVar[PolicyMethod] = "ppo"
    budget_field: ClassVar[str] = "steps"


PolicyConfig = DPOConfig | RejectionSamplingConfig | RLConfig | GRPOConfig | PPOConfig

CONFIGS: dict[str, type[PolicyConfig]] = {
    "dpo": DPOConfig,
    "rejection-sampling": RejectionSamplingConfig,
    "rl": RLConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
}
