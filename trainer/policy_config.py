"""Policy training configuration, one dataclass per method (no torch import: the CLI reads the
defaults). Every run records its resolved config in the manifest of the version it publishes.

* :class:`DPOConfig`: Direct Preference Optimization on preference pairs (Rafailov et al. 2023).
* :class:`RejectionSamplingConfig`: best-of-n under the reward model, then supervised fine-tuning
  on the winners and on human corrections (Llama 2, Touvron et al. 2023).
* :class:`RLConfig`: REINFORCE Leave-One-Out against the reward service with a KL penalty to the
  reference (RLOO, Ahmadian et al. 2024); see docs/policy.md for why RLOO rather than PPO.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

PolicyMethod = Literal["dpo", "rejection-sampling", "rl"]
Device = Literal["auto", "cpu", "cuda"]

DEFAULT_MIN_WIN_RATE = 0.5


@dataclass
class PolicyTrainingConfig:
    """Settings every method shares: model, text lengths, optimizer, LoRA, evaluation, gate.

    ``lora_r`` > 0 trains LoRA adapters (Hu et al. 2021) on the attention and MLP projections
    and merges them into the weights before export; 0 trains every weight. Held-out prompts are
    chosen by prompt hash (``eval_fraction``, as for reward models); at most ``eval_prompts`` of
    them are sampled for the win rate against the baseline and the KL to the reference.
    """

    method: ClassVar[PolicyMethod]

    base: str = "smollm2"  # smollm2 or a Hugging Face causal-LM folder (e.g. a previous run)
    max_length: int = 512  # prompt + completion tokens
    max_prompt_length: int = 256  # prompt tokens; truncation keeps the prompt's end
    batch_size: int = 4  # sequences (DPO: pairs) per micro-batch
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    eval_fraction: float = 0.1  # share of prompts held out (by prompt hash)
    eval_prompts: int = 32  # held-out prompts sampled for win rate and KL (0: none)
    eval_max_new_tokens: int = 64
    eval_temperature: float = 1.0  # 1.0: the KL estimate is the policies' true KL
    eval_top_p: float = 1.0
    promotion_min_win_rate: float = DEFAULT_MIN_WIN_RATE  # promote only above this win rate
    seed: int = 0
    device: Device = "auto"
    num_threads: int = 0  # torch threads; 0: torch's default

    def __post_init__(self) -> None:
        checks = {
            "max_length": self.max_length >= 8,
            "max_prompt_length": 1 <= self.max_prompt_length < self.max_length,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm >= 0,
            "lora_r": self.lora_r >= 0,
            "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0 <= self.lora_dropout < 1,
            "eval_fraction": 0 < self.eval_fraction < 1,
            "eval_prompts": self.eval_prompts >= 0,
            "eval_max_new_tokens": self.eval_max_new_tokens >= 1,
            "eval_temperature": self.eval_temperature > 0,
            "eval_top_p": 0 < self.eval_top_p <= 1,
            "promotion_min_win_rate": 0 <= self.promotion_min_win_rate <= 1,
            "num_threads": self.num_threads >= 0,
            **self._checks(),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {self.method} settings: {', '.join(bad)}")

    def _checks(self) -> dict[str, bool]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}


@dataclass
class DPOConfig(PolicyTrainingConfig):
    """DPO: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` on sequence log-probs of
    the completions; the reference log-probs are computed once, before the first step."""

    method: ClassVar[PolicyMethod] = "dpo"

    beta: float = 0.1  # strength of the implicit KL constraint (Rafailov et al. 2023)
    learning_rate: float = 1e-6  # TRL's default for full fine-tuning; LoRA wants ~1e-4
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps at most
    reward_addr: str = ""  # reward service for the win rate (needed to promote)

    def _checks(self) -> dict[str, bool]:
        return {
            "beta": self.beta > 0,
            "learning_rate": self.learning_rate >= 0,
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps is None or self.max_steps >= 0,
        }


@dataclass
class RejectionSamplingConfig(PolicyTrainingConfig):
    """Sample ``num_candidates`` completions per training prompt, keep the one the reward model
    scores highest, fine-tune on the kept ones (and the feedback store's corrections) with
    cross-entropy on completion tokens; ``rounds`` repeats it with the improved policy."""

    method: ClassVar[PolicyMethod] = "rejection-sampling"

    num_candidates: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128
    reward_addr: str = "localhost:50051"
    rounds: int = 1
    max_prompts: int = 0  # training prompts sampled per round at most (0: all)
    sft_epochs: int = 1
    sft_learning_rate: float = 1e-5

    def _checks(self) -> dict[str, bool]:
        return {
            "num_candidates": self.num_candidates >= 1,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "reward_addr": bool(self.reward_addr),
            "rounds": self.rounds >= 1,
            "max_prompts": self.max_prompts >= 0,
            "sft_epochs": self.sft_epochs >= 1,
            "sft_learning_rate": self.sft_learning_rate >= 0,
        }


@dataclass
class RLConfig(PolicyTrainingConfig):
    """RLOO: per step, ``rloo_k`` samples for each of ``prompts_per_step`` prompts; the reward is
    the reward model's score minus ``kl_coef * (logp_pi - logp_ref)`` summed over the sequence;
    each sample's baseline is the mean reward of the other k-1 samples of its prompt."""

    method: ClassVar[PolicyMethod] = "rl"

    rloo_k: int = 4  # samples per prompt (>= 2: the leave-one-out baseline needs another)
    prompts_per_step: int = 2
    steps: int = 50  # optimizer steps (one per batch of samples: on-policy)
    kl_coef: float = 0.05
    learning_rate: float = 1e-6
    temperature: float = 1.0  # log-probs are taken at the same temperature
    top_p: float = 1.0
    max_new_tokens: int = 64
    reward_addr: str = "localhost:50051"

    def _checks(self) -> dict[str, bool]:
        return {
            "rloo_k": self.rloo_k >= 2,
            "prompts_per_step": self.prompts_per_step >= 1,
            "steps": self.steps >= 1,
            "kl_coef": self.kl_coef >= 0,
            "learning_rate": self.learning_rate >= 0,
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "reward_addr": bool(self.reward_addr),
        }


PolicyConfig = DPOConfig | RejectionSamplingConfig | RLConfig

CONFIGS: dict[str, type[DPOConfig] | type[RejectionSamplingConfig] | type[RLConfig]] = {
    "dpo": DPOConfig,
    "rejection-sampling": RejectionSamplingConfig,
    "rl": RLConfig,
}
