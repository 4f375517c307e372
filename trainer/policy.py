"""Train a policy with DPO, rejection sampling or RL (RLOO, GRPO or PPO), evaluate it on
held-out prompts and publish it to the registry behind a win-rate promotion gate.

``train_policy`` reads pairs, prompts and supervised examples (JSONL files, or the feedback
store's consensus pairs and corrections), holds out prompts by hash (as reward training does),
loads the base causal LM (optionally with LoRA adapters), trains it with the chosen method,
then evaluates it on held-out prompts: mean reward under the reward service, win rate against
the baseline (the promoted policy, or the base model when none is) and KL to the reference. The
merged weights are saved in the run folder and, given a registry, exported with
:func:`plaudit.trainer.policy_export.export_policy`; the gate's decision and numbers go into the
manifest either way, and the version is promoted only when asked to and the gate passes.

DPO also runs under ``torchrun`` (``--strategy ddp`` or ``fsdp``, :mod:`plaudit.trainer.sharding`):
rank 0 reads the data, every rank trains its shard of each global batch, and rank 0 gathers the
weights (sharded ones into one model) to evaluate, save and publish them. Rejection sampling and
the RL methods sample as they train, and sampling is not sharded here: they run in one process.
The RL methods share the sampling and reward path (:func:`_prompt_batches`,
:func:`_sample_and_score`), the rollout metrics (:func:`_rollout_record`) and the one loop:
each yields its rollout batch's optimizer steps as the loop asks for them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from plaudit.services.common.errors import FailedPreconditionError, InvalidArgumentError
from plaudit.services.common.registry import (
    LoraAdapter,
    ModelManifest,
    ModelRegistry,
    new_version_id,
)
from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.trainer.backbones import Backbone, resolve_backbone
from plaudit.trainer.config import DEFAULT_RUNS_DIR
from plaudit.trainer.data import PreferencePair, SupervisedExample, TrainingData
from plaudit.trainer.distributed import DistEnv, all_gather, broadcast, init_distributed, shutdown
from plaudit.trainer.loop import (
    LoopResult,
    LoopSettings,
    MicroLoss,
    Step,
    disable_dropout,
    epoch_steps,
    tail_mean,
    train_loop,
)
from plaudit.trainer.objective import prompt_bucket, split_by_prompt
from plaudit.trainer.policy_config import (
    DPOConfig,
    GRPOConfig,
    PolicyConfig,
    PPOConfig,
    RejectionSamplingConfig,
    RLConfig,
)
from plaudit.trainer.policy_data import PolicyTokenizer, TokenRow, collate_rows
from plaudit.trainer.policy_objective import (
    adaptive_kl_coef,
    best_of_n,
    dpo_loss,
    dpo_metrics,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalized_rewards,
    per_token_rewards,
    policy_gradient_loss,
    ppo_loss,
    rloo_advantages,
    sft_loss,
    whiten,
)
from plaudit.trainer.policy_sampling import (
    Reference,
    RewardServiceScorer,
    Sampler,
    SamplingParams,
    Scorer,
    completion_logprobs,
    completion_mask,
    completion_token_logprobs,
    evaluate_policy,
    forward_logprobs,
    generate_rows,
    token_outputs,
    token_outputs_no_grad,
    torch_sampler,
)
from plaudit.trainer.report import RunReporter
from plaudit.trainer.reward import (
    CHECKPOINT_DIR,
    PairSource,
    load_training_data,
    save_checkpoint,
    seed_everything,
    trainable,
)
from plaudit.trainer.sharding import Checkpointer, Sharding, full_state_dict, is_sharded, prepare

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # a LoRA run's adapter, in PEFT's format, in the run folder

EVAL_SAMPLES = "eval_samples.jsonl"  # the run folder's held-out samples the gate judged

GENERATION_BATCH = 16  # prompts per generate() call


@dataclass(frozen=True)
class PolicyPublishOptions:
    promote: bool = False  # promote the new version if the win-rate gate passes
    parent: str | None = None  # the baseline and manifest parent; default: the promoted policy


@dataclass
class PolicyTrainingResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float]
    promotion: dict[str, Any]
    data_cursor: str | None
    train_items: int  # pairs (DPO) or prompts (rejection sampling, the RL methods)
    eval_prompts: int
    manifest: ModelManifest | None = None  # None when no registry was given
    model: PreTrainedModel | None = field(default=None, repr=False)  # merged, trained weights

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "version": m.version if m else None,
            "promoted": bool(self.promotion.get("promoted")),
            "promotion": self.promotion,
            "metrics": self.metrics,
            "data_cursor": self.data_cursor,
            "train_items": self.train_items,
            "eval_prompts": self.eval_prompts,
            "run_dir": str(self.run_dir),
        }


# -- data ---------------------------------------------------------------------------------------
def all_prompts(data: TrainingData) -> list[str]:
    """Every distinct prompt, in order of first appearance."""
    seen = dict.fromkeys(
        [*data.prompts, *(p.prompt for p in data.pairs), *(s.prompt for s in data.supervised)]
    )
    return list(seen)


def split_prompts(prompts: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by prompt hash, the split reward training uses."""
    train = [p for p in prompts if prompt_bucket(p) >= eval_fraction]
    return train, [p for p in prompts if prompt_bucket(p) < eval_fraction]


# -- model --------------------------------------------------------------------------------------
LIVE = "live"  # cfg.base: start from the promoted policy


@dataclass(frozen=True)
class StartingPoint:
    """Where a policy training starts: what to load, the backbone the result descends from
    (recorded in its manifest, so a later ``live`` start can fall back to it), and the model
    the KL is measured from."""

    load: str
    backbone: str | None  # None: the loaded checkpoint's own name
    reference: str
    trained_on: str | None = None  # the policy version whose trained weights are loaded


def starting_point(base: str, registry: ModelRegistry | None, parent: str | None) -> StartingPoint:
    """Resolve ``cfg.base``. ``live`` is the parent (the promoted policy by default): its
    training checkpoint when it is on this disk, or its backbone when it has none (a plain
    export: the same weights). When a trained parent's checkpoint is gone, its backbone is the
    fallback, said in a warning and in the reference's name (the KL is then to the base model).
    """
    if base != LIVE:
        return StartingPoint(base, None, f"base model {base}")
    if registry is None or parent is None:
        raise FailedPreconditionError(
            "--base live starts from the promoted policy: give --registry with a promoted "
            "policy (`plaudit export policy --promote`), or --base smollm2"
        )
    manifest = registry.manifest(parent)
    checkpoint = manifest.notes.get("checkpoint")
    live = f"live policy {parent}"
    if checkpoint and (Path(checkpoint) / "config.json").is_file():
        return StartingPoint(str(checkpoint), manifest.backbone, live, trained_on=parent)
    if not checkpoint:
        return StartingPoint(manifest.backbone, manifest.backbone, live)
    log.warning(
        "the live policy's training checkpoint is not here: starting from its backbone",
        extra={"version": parent, "checkpoint": checkpoint, "backbone": manifest.backbone},
    )
    gone = f"base model {manifest.backbone} ({parent}'s checkpoint is gone)"
    return StartingPoint(manifest.backbone, manifest.backbone, gone)


def load_policy_model(base: str) -> tuple[PreTrainedModel, Any, Backbone]:
    """The base causal LM in fp32 (GGUF dequantised) with a pad token, its tokenizer and where
    it came from."""
    backbone = resolve_backbone(base)
    kwargs = {"gguf_file": backbone.gguf_file} if backbone.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
    model = trainable(
        AutoModelForCausalLM.from_pretrained(
            backbone.path, dtype=torch.float32, **backbone.weights_kwargs
        )
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, backbone


def with_lora(model: PreTrainedModel, cfg: PolicyConfig) -> Any:
    """LoRA adapters (Hu et al. 2021) on every linear layer but the output head."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@dataclass
class _Run:
    """What the methods share: the policy, its reference, tokenization, reports."""

    cfg: PolicyConfig
    model: Any  # the policy (a PeftModel with LoRA)
    reference: Reference
    tokens: PolicyTokenizer
    device: torch.device
    reporter: RunReporter
    progress: bool
    scorer: Scorer | None
    env: DistEnv = field(default_factory=DistEnv)
    sharding: Sharding = field(default_factory=Sharding)
    checkpointer: Checkpointer | None = None  # DPO and the RL methods (one fit each)
    step: int = 0  # optimizer steps so far (rejection sampling runs several fits)
    deadline: float | None = None  # time.perf_counter() of the training-time budget's end
    out_of_time: bool = False  # a fit stopped at the deadline

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def epochs(self, lengths: np.ndarray, epochs: int, max_steps: int | None) -> list[Step]:
        """Epochs of length-grouped micro-batches of item indices (drawn afresh for each fit)."""
        cfg = self.cfg
        return epoch_steps(
            lengths,
            epochs=epochs,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            seed=[cfg.seed, self.step],
            max_steps=max_steps,
            env=self.env,
        )

    def fit(
        self,
        steps: Iterable[Step],
        total: int,
        loss: MicroLoss,
        settings: LoopSettings,
        evaluate: Callable[[], dict[str, float]] | None = None,
    ) -> LoopResult:
        """The training loop with a fresh optimizer; logged steps continue from ``self.step``;
        it stops at the run's training-time deadline."""
        result = train_loop(
            self.model,
            steps,
            total,
            loss,
            replace(settings, deadline=self.deadline),
            self.reporter,
            evaluate=evaluate,
            first_step=self.step,
            progress=self.progress,
            env=self.env,
            sharding=self.sharding,
            checkpointer=self.checkpointer,
        )
        self.step += result.steps
        self.out_of_time |= result.out_of_time
        return result

    def logprobs(self, model: Any, rows: Sequence[TokenRow], batch_size: int) -> np.ndarray:
        """Completion log-prob sums of this process's ``rows``. A sharded ``model`` runs as
        many forward passes on every process (its all-gathers pair up): the processes with
        fewer rows pad with copies of their first and drop the results."""
        rows = list(rows)
        count = len(rows)
        if is_sharded(model):
            most = max(all_gather(self.env, count))
            rows += [rows[0] if rows else TokenRow((), ())] * (most - count)
        tok = self.tokens
        out = completion_logprobs(model, rows, tok.pad_id, self.device, batch_size=batch_size)
        return out[:count]


# -- DPO ----------------------------------------------------------------------------------------
def train_dpo(
    run: _Run, cfg: DPOConfig, train: Sequence[PreferencePair], held_out: Sequence[PreferencePair]
) -> dict[str, float]:
    """DPO on ``train``; held-out implicit-reward accuracy before training and after each epoch,
    on at most ``max(cfg.eval_prompts, 16)`` held-out pairs (each evaluation is a forward pass
    over all of them, which on a large store would cost more than a short training).

    The reference log-probs of the completions the steps use are computed once, up front, with
    the reference model; training then needs only the policy's forward passes.
    """
    tok, pad, device = run.tokens, run.tokens.pad_id, run.device
    held_out = held_out[: max(cfg.eval_prompts, 16)]

    def encode(pairs: Sequence[PreferencePair]) -> tuple[list[TokenRow], list[TokenRow]]:
        prompts = [p.prompt for p in pairs]
        return tok.rows(prompts, [p.chosen for p in pairs]), tok.rows(
            prompts, [p.rejected for p in pairs]
        )

    train_c, train_r = encode(train)
    held_c, held_r = encode(held_out)
    n, m = len(train), len(held_out)
    lengths = np.array([max(len(c), len(r)) for c, r in zip(train_c, train_r, strict=True)])
    steps = run.epochs(lengths, cfg.epochs, cfg.max_steps)
    # reference log-probs of the pairs the steps use (a max_steps budget uses few of many)
    used = sorted({int(i) for step in steps for micro in step.micro for i in micro})
    ref_c_np, ref_r_np = np.zeros(n), np.zeros(n)
    with run.reference.use(run.model) as ref:
        ref_used = run.logprobs(
            ref,
            [*(train_c[i] for i in used), *(train_r[i] for i in used)],
            batch_size=2 * cfg.batch_size,
        )
        # batched exactly as the evaluation batches the policy: equal models, equal numbers
        ref_held = completion_logprobs(
            ref, [*held_c, *held_r], pad, device, batch_size=2 * cfg.batch_size
        )
    ref_c_np[used], ref_r_np[used] = ref_used[: len(used)], ref_used[len(used) :]
    ref_c = torch.tensor(ref_c_np, dtype=torch.float32, device=device)
    ref_r = torch.tensor(ref_r_np, dtype=torch.float32, device=device)
    ref_held_c, ref_held_r = ref_held[:m], ref_held[m:]
    weight = torch.tensor([p.weight for p in train], dtype=torch.float32, device=device)

    def evaluate() -> dict[str, float]:
        pi = completion_logprobs(
            run.model, [*held_c, *held_r], pad, device, batch_size=2 * cfg.batch_size
        )
        with torch.no_grad():
            loss, chosen, rejected = dpo_loss(
                torch.from_numpy(pi[:m]),
                torch.from_numpy(pi[m:]),
                torch.from_numpy(ref_held_c),
                torch.from_numpy(ref_held_r),
                cfg.beta,
            )
        rewards = dpo_metrics(chosen.numpy(), rejected.numpy(), prefix="eval/rewards")
        return {
            "eval/loss": float(loss),
            "eval/accuracy": rewards["eval/rewards/accuracies"],
            **rewards,
        }

    def micro_loss(model: Any, index: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [train_c[i] for i in index] + [train_r[i] for i in index]
        logps = forward_logprobs(model, rows, pad, device)
        k = len(index)
        at = torch.from_numpy(index).to(device)
        loss, chosen, rejected = dpo_loss(
            logps[:k], logps[k:], ref_c[at], ref_r[at], cfg.beta, weight[at]
        )
        return loss, dpo_metrics(chosen.cpu().numpy(), rejected.cpu().numpy())

    fit = run.fit(steps, len(steps), micro_loss, LoopSettings.of(cfg, desc="dpo"), evaluate)
    initial = fit.evals[0]
    return {
        **fit.evals[-1],
        "eval/initial_accuracy": initial["eval/accuracy"],
        "eval/initial_loss": initial["eval/loss"],
        **{
            key: tail_mean([r[key] for r in fit.history])
            for key in (
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
            )
            if fit.history
        },
        "train/loss": fit.train_loss,
        "train/steps": float(fit.steps),
        "train/pairs": float(n),
        "train/pairs_per_s": fit.items_per_s,
        "train/resumed_from_step": float(fit.resumed_from),
        **fit.memory,
    }


# -- rejection sampling -------------------------------------------------------------------------
def train_rejection_sampling(
    run: _Run,
    cfg: RejectionSamplingConfig,
    prompts: Sequence[str],
    supervised: Sequence[SupervisedExample],
) -> dict[str, float]:
    """Best-of-n under the reward model, then supervised fine-tuning on the winners and the
    human corrections (each round samples from the policy the previous round trained)."""
    assert run.scorer is not None
    tok, device = run.tokens, run.device
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    corrections = tok.rows([s.prompt for s in supervised], [s.completion for s in supervised])
    rng = np.random.default_rng(cfg.seed)
    metrics: dict[str, float] = {}
    losses: list[float] = []
    rounds = 0
    for round_ in range(cfg.rounds):
        if rounds and run.past_deadline():  # the first round always runs
            run.out_of_time = True
            break
        rounds += 1
        chosen = list(prompts)
        if cfg.max_prompts and len(chosen) > cfg.max_prompts:
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), cfg.max_prompts, False))]
        repeated = [p for p in chosen for _ in range(cfg.num_candidates)]
        rows = generate_rows(
            run.model,
            tok,
            repeated,
            params,
            device,
            batch_size=GENERATION_BATCH,
            desc=f"candidates (round {round_ + 1})" if run.progress else None,
        )
        scores = run.scorer(repeated, [tok.decode(r.completion) for r in rows])
        groups = scores.reshape(len(chosen), cfg.num_candidates)
        best = [rows[i * cfg.num_candidates + best_of_n(g)] for i, g in enumerate(groups)]
        sampling = {
            "sampling/mean_reward": float(groups.mean()),
            "sampling/best_reward": float(groups.max(axis=1).mean()),
            "sampling/prompts": float(len(chosen)),
            "sampling/completion_tokens": float(np.mean([len(r.completion) for r in rows])),
        }
        run.reporter.log({"step": run.step, "round": round_ + 1, **sampling})
        log.info("rejection sampling round", extra={"round": round_ + 1, **sampling})
        sft_rows = [*best, *corrections]

        def micro_loss(model: Any, index: np.ndarray, rows: list[TokenRow] = sft_rows) -> Any:
            batch = collate_rows([rows[i] for i in index], tok.pad_id).to(device)
            logps, _ = completion_token_logprobs(model, batch)
            return sft_loss(logps), {}

        steps = run.epochs(np.array([len(r) for r in sft_rows]), cfg.sft_epochs, None)
        desc = f"fine-tune (round {round_ + 1})"
        settings = LoopSettings.of(cfg, learning_rate=cfg.sft_learning_rate, desc=desc)
        fit = run.fit(steps, len(steps), micro_loss, settings)
        losses += [r["train/loss"] for r in fit.history]
        metrics = {
            **sampling,
            "train/sft_examples": float(len(sft_rows)),
            "train/corrections": float(len(corrections)),
        }
    return {
        **metrics,
        "train/loss": tail_mean(losses),
        "train/steps": float(run.step),
        "train/rounds": float(rounds),
    }


# -- RL: shared sampling --------------------------------------------------------------------------
def _prompt_batches(prompts: Sequence[str], per_step: int, seed: int) -> Iterator[list[str]]:
    """Endless batches of ``per_step`` prompts (all of them when fewer), drawn without
    replacement from a reshuffled queue."""
    rng = np.random.default_rng(seed)
    queue: list[int] = []
    while True:
        batch = []
        for _ in range(min(per_step, len(prompts))):
            if not queue:
                queue = list(rng.permutation(len(prompts)))
            batch.append(prompts[queue.pop()])
        yield batch


def _sample_and_score(
    run: _Run, params: SamplingParams, prompts: Sequence[str]
) -> tuple[list[TokenRow], np.ndarray]:
    """One completion per prompt (repeat prompts for more) from the policy as it is now, and
    their rewards from the scorer (the reward service)."""
    assert run.scorer is not None
    tok = run.tokens
    rows = generate_rows(run.model, tok, prompts, params, run.device, batch_size=GENERATION_BATCH)
    return rows, run.scorer(prompts, [tok.decode(r.completion) for r in rows])


def _rollout_record(
    rows: Sequence[TokenRow], scores: np.ndarray, policy_logp: np.ndarray, ref_logp: np.ndarray
) -> dict[str, float]:
    """A rollout batch's numbers every RL method logs: the reward-model score, the KL estimate
    (mean over samples of the sequence ``logp - ref_logp``), the entropy estimate (nats per
    token: minus the mean log-prob of the sampled tokens, at the sampling temperature) and the
    completion length."""
    tokens = sum(len(r.completion) for r in rows)
    return {
        "rl/score": float(np.mean(scores)),
        "rl/kl": float(np.mean(policy_logp - ref_logp)),
        "rl/entropy": float(-np.sum(policy_logp) / max(tokens, 1)),
        "rl/completion_tokens": float(tokens / max(len(rows), 1)),
    }


def _rl_metrics(fit: LoopResult, keys: Sequence[str]) -> dict[str, float]:
    """The RL methods' summary: the tail means of ``keys`` and the first batch's score."""
    return {
        **{key: tail_mean([r[key] for r in fit.history if key in r]) for key in keys},
        "rl/initial_score": fit.history[0]["rl/score"] if fit.history else float("nan"),
        "train/steps": float(fit.steps),
        "train/samples_per_s": fit.items_per_s,
    }


RL_KEYS = ("train/loss", "rl/score", "rl/kl", "rl/reward", "rl/entropy", "rl/completion_tokens")


# -- RL (RLOO) ----------------------------------------------------------------------------------
def _reference_token_logprobs(
    run: _Run, rows: Sequence[TokenRow], pad: int, temperature: float, batch_size: int
) -> torch.Tensor:
    """Per-token log-probs of ``rows`` under the frozen reference, padded and batched as the
    policy's own (:func:`token_outputs_no_grad`), so equal models give equal numbers."""
    with run.reference.use(run.model) as ref_model:
        ref, _ = token_outputs_no_grad(
            ref_model, rows, pad, run.device, temperature=temperature, batch_size=batch_size
        )
    return ref


def train_rl(run: _Run, cfg: RLConfig, prompts: Sequence[str]) -> dict[str, float]:
    """RLOO: each step samples ``rloo_k`` completions for ``prompts_per_step`` prompts, scores
    them (reward model minus the KL penalty), and takes one policy-gradient step with the
    leave-one-out baseline. Log-probs are taken at the sampling temperature."""
    pad, device = run.tokens.pad_id, run.device
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)

    def rollouts() -> Iterator[Step]:
        """Each step's batch, sampled from the policy as it is when the loop asks for it:
        micro-batches of (rows, advantages), weighted by their share of the samples."""
        for batch_prompts in _prompt_batches(prompts, cfg.prompts_per_step, cfg.seed):
            repeated = [p for p in batch_prompts for _ in range(cfg.rloo_k)]
            rows, scores = _sample_and_score(run, params, repeated)
            policy_logp = completion_logprobs(
                run.model, rows, pad, device, temperature=cfg.temperature, batch_size=cfg.batch_size
            )
            with run.reference.use(run.model) as ref:
                ref_logp = completion_logprobs(
                    ref, rows, pad, device, temperature=cfg.temperature, batch_size=cfg.batch_size
                )
            rewards = kl_penalized_rewards(
                torch.from_numpy(scores), torch.from_numpy(policy_logp),
                torch.from_numpy(ref_logp), cfg.kl_coef,
            )  # fmt: skip
            advantages = rloo_advantages(rewards.view(len(batch_prompts), cfg.rloo_k)).flatten()
            advantages = advantages.to(device=device, dtype=torch.float32)
            chunks = [slice(s, s + cfg.batch_size) for s in range(0, len(rows), cfg.batch_size)]
            micro = [(rows[c], advantages[c]) for c in chunks]
            yield Step(
                micro,
                len(rows),
                shares=[len(r) / len(rows) for r, _ in micro],  # the loss: a mean over samples
                record={
                    **_rollout_record(rows, scores, policy_logp, ref_logp),
                    "rl/reward": float(rewards.mean()),
                },
            )

    def loss(model: Any, batch: tuple[list[TokenRow], torch.Tensor]) -> tuple[torch.Tensor, Any]:
        rows, advantages = batch
        logp = forward_logprobs(model, rows, pad, device, cfg.temperature)
        return policy_gradient_loss(logp, advantages), {}

    settings = LoopSettings.of(
        cfg, schedule="constant", desc="rloo", bar_keys=("rl/score", "rl/kl")
    )
    fit = run.fit(rollouts(), cfg.steps, loss, settings)
    return _rl_metrics(fit, RL_KEYS)


# -- RL (GRPO) ----------------------------------------------------------------------------------
def train_grpo(run: _Run, cfg: GRPOConfig, prompts: Sequence[str]) -> dict[str, float]:
    """GRPO (Shao et al. 2024): each rollout batch samples ``group_size`` completions for
    ``prompts_per_step`` prompts; a completion's advantage is its score normalized within its
    group (:func:`group_advantages`); then ``grpo_epochs`` optimizer steps on
    :func:`grpo_loss` (clipped ratio to the sampling policy, k3 KL to the reference). Log-probs
    at the sampling temperature; no value model."""
    pad, device, k = run.tokens.pad_id, run.device, cfg.group_size
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    by_tokens = cfg.loss_aggregation == "token-mean"

    def rollouts() -> Iterator[Step]:
        for batch_prompts in _prompt_batches(prompts, cfg.prompts_per_step, cfg.seed):
            repeated = [p for p in batch_prompts for _ in range(k)]
            rows, scores = _sample_and_score(run, params, repeated)
            old, _ = token_outputs_no_grad(
                run.model, rows, pad, device, temperature=cfg.temperature, batch_size=cfg.batch_size
            )
            ref = _reference_token_logprobs(run, rows, pad, cfg.temperature, cfg.batch_size)
            mask = completion_mask(rows, device)
            grouped = torch.from_numpy(scores).view(len(batch_prompts), k)
            advantages = group_advantages(grouped, cfg.scale_rewards).flatten()
            advantages = advantages.to(device=device, dtype=torch.float32)
            micro, shares = _micro_batches(
                rows, mask, cfg.batch_size, by_tokens, old, ref, advantages
            )
            record = {
                **_rollout_record(
                    rows, scores, (old * mask).sum(-1).cpu().double().numpy(),
                    (ref * mask).sum(-1).cpu().double().numpy(),
                ),
                "rl/reward": float(np.mean(scores)),  # GRPO's KL is in the loss, not the reward
            }  # fmt: skip
            for epoch in range(cfg.grpo_epochs):  # the samples count once, for throughput
                yield Step(micro, len(rows) if epoch == 0 else 0, shares=shares, record=record)

    def loss(model: Any, micro: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        rows, mask, old, ref, advantages = micro
        logp, _ = token_outputs(model, rows, pad, device, cfg.temperature)
        return grpo_loss(
            logp, old, ref, advantages, mask, clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef,
            aggregation=cfg.loss_aggregation, constant=float(cfg.max_new_tokens),
        )  # fmt: skip

    settings = LoopSettings.of(
        cfg, schedule="constant", desc="grpo", bar_keys=("rl/score", "rl/kl")
    )
    fit = run.fit(rollouts(), cfg.steps * cfg.grpo_epochs, loss, settings)
    return {
        **_rl_metrics(fit, (*RL_KEYS, "rl/clip_fraction", "rl/k3_kl")),
        "train/rollout_batches": float(-(-fit.steps // cfg.grpo_epochs)),  # begun (a budget)
    }


def _micro_batches(
    rows: Sequence[TokenRow],
    mask: torch.Tensor,
    batch_size: int,
    by_tokens: bool,
    *per_row: torch.Tensor,
) -> tuple[list[tuple[Any, ...]], list[float]]:
    """``rows`` in micro-batches of ``batch_size``: (rows, mask, *per_row), the per-token
    tensors cut to the micro-batch's longest completion, and each micro-batch's share of the
    step's loss (of its samples, or of its tokens when the loss is a token mean)."""
    micro: list[tuple[Any, ...]] = []
    weights: list[float] = []
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        width = max(len(r.completion) for r in rows[part])
        cut = [t[part, :width] if t.dim() == 2 else t[part] for t in per_row]
        micro.append((list(rows[part]), mask[part, :width], *cut))
        weights.append(float(mask[part].sum()) if by_tokens else float(len(rows[part])))
    total = sum(weights) or 1.0
    return micro, [w / total for w in weights]


# -- RL (PPO) -----------------------------------------------------------------------------------
VALUE_HEAD = "plaudit_value_head"  # the value head's name on the policy while PPO trains
VALUE_MODEL = "plaudit_value_model"  # and the separate value model's


def value_head(model: Any) -> torch.nn.Linear:
    """A scalar value head on the policy's last hidden state, registered on ``model`` (so the
    loop's optimizer trains it with the policy), its weights N(0, 1/sqrt(d + 1)) and bias 0
    (Huang et al. 2024's initialisation of a scalar head)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    size = int(lm.config.hidden_size)
    head = torch.nn.Linear(size, 1)
    torch.nn.init.normal_(head.weight, std=1 / math.sqrt(size + 1))
    torch.nn.init.zeros_(head.bias)
    head.to(next(model.parameters()).device)
    model.add_module(VALUE_HEAD, head)
    return head


def train_ppo(run: _Run, cfg: PPOConfig, prompts: Sequence[str]) -> dict[str, float]:
    """PPO (Schulman et al. 2017) for RLHF as in InstructGPT (Ouyang et al. 2022) and Huang et
    al. 2024: each rollout batch samples one completion for each of ``prompts_per_step``
    prompts; per-token rewards are the KL penalty with the score at the last token
    (:func:`per_token_rewards`); advantages by GAE (:func:`gae`) from the value head's values
    at sampling time, whitened over the batch; then ``ppo_epochs`` passes over the batch in
    ``num_minibatches`` shuffled minibatches, one optimizer step each, on :func:`ppo_loss`.

    The value head shares the policy's trunk (the value loss, scaled by ``vf_coef``, reaches
    the policy weights or LoRA adapters too), or with ``value_model="separate"`` sits on a
    trainable copy of the starting policy (with LoRA: its own adapters). Either is registered
    on the policy while it trains, so the loop's one optimizer trains it, and removed before
    the policy is saved. With ``kl_target`` the KL coefficient adapts after each batch
    (:func:`adaptive_kl_coef`)."""
    pad, device = run.tokens.pad_id, run.device
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    per_batch = min(cfg.prompts_per_step, len(prompts))
    minibatches = min(cfg.num_minibatches, per_batch)
    critic = None
    if cfg.value_model == "separate":
        critic = copy.deepcopy(run.model)  # the starting weights: nothing has trained yet
        run.model.add_module(VALUE_MODEL, critic)
    head = value_head(run.model)
    kl_coef = cfg.kl_coef

    def rollouts() -> Iterator[Step]:
        nonlocal kl_coef
        rng = np.random.default_rng([cfg.seed, 1])
        for batch_prompts in _prompt_batches(prompts, cfg.prompts_per_step, cfg.seed):
            rows, scores = _sample_and_score(run, params, batch_prompts)
            old, old_values = token_outputs_no_grad(
                run.model, rows, pad, device, temperature=cfg.temperature,
                batch_size=cfg.batch_size, value_head=head, value_model=critic,
            )  # fmt: skip
            assert old_values is not None
            ref = _reference_token_logprobs(run, rows, pad, cfg.temperature, cfg.batch_size)
            mask = completion_mask(rows, device)
            score_t = torch.tensor(scores, dtype=torch.float32, device=device)
            rewards = per_token_rewards(score_t, old, ref, mask, kl_coef)
            record = {
                **_rollout_record(
                    rows, scores, (old * mask).sum(-1).cpu().double().numpy(),
                    (ref * mask).sum(-1).cpu().double().numpy(),
                ),
                "rl/reward": float(rewards.sum(-1).mean()),
                "rl/kl_coef": kl_coef,
            }  # fmt: skip
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)
            first = True
            for _ in range(cfg.ppo_epochs):
                for part in np.array_split(rng.permutation(len(rows)), minibatches):
                    index = torch.from_numpy(part).to(device)
                    micro, shares = _micro_batches(
                        [rows[i] for i in part], mask[index], cfg.batch_size, True,
                        old[index], advantages[index], old_values[index], returns[index],
                    )  # fmt: skip
                    yield Step(micro, len(rows) if first else 0, shares=shares, record=record)
                    first = False
            if cfg.kl_target:
                kl_coef = adaptive_kl_coef(
                    kl_coef, record["rl/kl"], cfg.kl_target, cfg.kl_horizon, len(rows)
                )

    def loss(model: Any, micro: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        rows, mask, old, advantages, old_values, returns = micro
        logp, values = token_outputs(model, rows, pad, device, cfg.temperature, head, critic)
        assert values is not None
        return ppo_loss(
            logp, old, advantages, values, old_values, returns, mask, clip_eps=cfg.clip_eps,
            cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
        )  # fmt: skip

    settings = LoopSettings.of(cfg, schedule="constant", desc="ppo", bar_keys=("rl/score", "rl/kl"))
    total = cfg.steps * cfg.ppo_epochs * minibatches
    try:
        fit = run.fit(rollouts(), total, loss, settings)
    finally:
        delattr(run.model, VALUE_HEAD)  # the policy is saved and exported without them
        if critic is not None:
            delattr(run.model, VALUE_MODEL)
    keys = (*RL_KEYS, "rl/clip_fraction", "rl/policy_loss", "rl/value_loss")
    return {
        **_rl_metrics(fit, (*keys, "rl/value_clip_fraction", "rl/kl_coef")),
        "train/rollout_batches": float(-(-fit.steps // (cfg.ppo_epochs * minibatches))),
    }


# -- evaluation and the gate --------------------------------------------------------------------
def baseline_sampler(
    run: _Run, registry: ModelRegistry | None, parent: str | None, params: SamplingParams
) -> tuple[Sampler | None, str]:
    """What the candidate is compared with, and its description: the parent policy as it is
    served (its verified ONNX graph through the serving runtime), or the base model (the
    reference) when there is no parent."""
    seed = run.cfg.seed
    if parent is None or registry is None:

        def base(prompts: Sequence[str]) -> list[str]:
            with run.reference.use(run.model) as ref:
                sampler = torch_sampler(ref, run.tokens, params, run.device, seed, run.progress)
                return sampler(prompts)

        return base, f"base model {run.cfg.base}"
    from plaudit.services.runtime.policy_model import GenerateJob, LoadedPolicy, generate_jobs
    from plaudit.services.runtime.policy_model import SamplingParams as ServedParams

    try:
        policy = LoadedPolicy.load(registry, parent, provider="cpu")
    except Exception as exc:
        log.exception("could not load the parent policy", extra={"version": parent})
        return None, f"parent {parent} (could not be loaded: {exc})"

    def served(prompts: Sequence[str]) -> list[str]:
        texts: list[str] = []
        for start in range(0, len(prompts), GENERATION_BATCH):
            jobs = [
                GenerateJob(
                    prompt=prompt,
                    params=ServedParams(
                        temperature=params.temperature,
                        top_p=params.top_p,
                        max_new_tokens=params.max_new_tokens,
                        seed=seed + start + i,
                    ),
                )
                for i, prompt in enumerate(prompts[start : start + GENERATION_BATCH])
            ]
            for result in generate_jobs(policy, jobs, params.max_new_tokens):
                if isinstance(result, Exception):
                    raise result
                texts.append(result.completions[0].text.strip())
        return texts

    return served, f"parent {parent}"


def promotion_record(
    metrics: dict[str, float],
    cfg: PolicyConfig,
    baseline: str,
    *,
    requested: bool,
    reward_versions: Sequence[str] = (),
    kl_reference: str = "",
) -> dict[str, Any]:
    """The gate (:func:`plaudit.trainer.promotion.policy_gate_decision` on the held-out
    metrics and ``cfg``'s thresholds); promote when it passes and promotion was asked for."""
    from plaudit.trainer.promotion import policy_gate_decision

    decision = policy_gate_decision(
        win_rate=metrics.get("eval/win_rate"),
        lc_win_rate=metrics.get("eval/lc_win_rate"),
        kl=metrics.get("eval/kl"),
        wins=int(metrics.get("eval/wins", 0)),
        n=int(metrics.get("eval/prompts", 0)),
        baseline=baseline,
        min_win_rate=cfg.promotion_min_win_rate,
        min_lc_win_rate=cfg.promotion_min_lc_win_rate,
        max_kl=cfg.promotion_max_kl,
        significance=cfg.promotion_significance,
    )
    passed = decision["passed"]
    reason = decision["reason"]
    if passed and not requested:
        reason += "; not promoted: promotion was not asked for"
    record = {
        **decision,
        "promoted": passed and requested,
        "requested": requested,
        "candidate_reward": metrics.get("eval/reward"),
        "baseline_reward": metrics.get("eval/baseline_reward"),
        "kl_reference": kl_reference or baseline,
        "reward_model": sorted(reward_versions),
        "reason": reason,
        "decided_at": datetime.now(UTC).isoformat(),
    }
    log.info("promotion decision: %s", reason, extra=record)
    return record


def already_trained_under(
    registry: ModelRegistry,
    reward_addr: str,
    credentials: ClientCredentials = INSECURE,
    *,
    reward_model: str = "",
    objective: str = "",
) -> str | None:
    """Why a policy training now would repeat the last one: the newest policy version (promoted
    or refused) was judged by the reward model (``reward_model``; with an ``objective``: every
    model) serving at ``reward_addr``. None when it was not, or when there is no trained policy
    yet."""
    from plaudit.services.reward.client import RewardClient

    versions = registry.list_versions()
    gate = (versions[-1].promotion or {}) if versions else {}
    if not gate.get("reward_model"):
        return None
    with RewardClient(reward_addr, credentials) as client:
        reply = client.model(name=reward_model)
    judged = set(gate["reward_model"])  # versions; with an objective "name=version,..." each
    if objective:
        tokens = {t for entry in judged for t in str(entry).split(",")}
        names = {t.partition("=")[0] for t in tokens}
        live = {f"{m.name}={m.version}" for m in reply.models if m.name in names}
        fresh = not live or not live <= tokens
    else:
        live = {reply.version}
        fresh = reply.version not in judged
    if fresh:
        return None
    return (
        f"policy {versions[-1].version} was already trained against reward model "
        f"{', '.join(sorted(live))}"
    )


# -- the whole run ------------------------------------------------------------------------------
def train_policy(
    cfg: PolicyConfig,
    source: PairSource,
    registry: ModelRegistry | None = None,
    *,
    publish: PolicyPublishOptions | None = None,
    output_dir: Path | None = None,
    progress: bool = False,
    scorer: Scorer | None = None,
    credentials: ClientCredentials = INSECURE,
    runs_dir: Path = DEFAULT_RUNS_DIR,
) -> PolicyTrainingResult:
    """Train, evaluate, save and (given a ``policy`` registry) publish behind the gate; the run
    folder is ``output_dir``, or a new one under ``runs_dir``.

    ``scorer`` replaces the reward service at ``cfg.reward_addr`` (tests, benchmarks);
    ``credentials`` (API key, TLS) are used to call that reward service. Under ``torchrun``
    call :func:`run_policy_training`, which the ranks other than 0 return None from.
    """
    result = run_policy_training(
        cfg,
        source,
        registry,
        publish=publish,
        output_dir=output_dir,
        progress=progress,
        scorer=scorer,
        credentials=credentials,
        runs_dir=runs_dir,
    )
    if result is None:
        raise FailedPreconditionError(
            "train_policy returns rank 0's result: under torchrun call run_policy_training"
        )
    return result


def run_policy_training(
    cfg: PolicyConfig,
    source: PairSource,
    registry: ModelRegistry | None = None,
    *,
    publish: PolicyPublishOptions | None = None,
    output_dir: Path | None = None,
    progress: bool = False,
    scorer: Scorer | None = None,
    credentials: ClientCredentials = INSECURE,
    runs_dir: Path = DEFAULT_RUNS_DIR,
) -> PolicyTrainingResult | None:
    """:func:`train_policy` in one process or under ``torchrun`` (DPO only): rank 0 returns
    the result, the other ranks None."""
    if registry is not None and registry.kind != "policy":
        raise InvalidArgumentError(
            "registry", f"policies go to a policy registry, not {registry.kind}"
        )
    env = init_distributed(cfg.device, cfg.num_threads)
    try:
        if env.distributed and not isinstance(cfg, DPOConfig):
            raise FailedPreconditionError(
                f"{cfg.method} samples as it trains and runs in one process: drop torchrun "
                "(DPO runs under torchrun)"
            )
        return _train(
            env,
            cfg,
            source,
            registry,
            publish or PolicyPublishOptions(),
            output_dir,
            runs_dir,
            progress,
            scorer,
            credentials,
        )
    finally:
        shutdown(env)


def _train(
    env: DistEnv,
    cfg: PolicyConfig,
    source: PairSource,
    registry: ModelRegistry | None,
    publish: PolicyPublishOptions,
    output_dir: Path | None,
    runs_dir: Path,
    progress: bool,
    scorer: Scorer | None,
    credentials: ClientCredentials,
) -> PolicyTrainingResult | None:
    started = time.perf_counter()
    prepared: tuple[TrainingData, str | None, str] | Exception | None = None
    if env.is_main:  # rank 0 reads the data; every rank trains on that snapshot
        try:
            data, parent = load_training_data(source, registry, publish.parent, policy=True)
            if parent is None and registry is not None:
                parent = registry.promoted()
            prepared = (data, parent, new_version_id("run"))
        except Exception as exc:  # every rank raises it, rather than waiting for rank 0
            prepared = exc
    prepared = broadcast(env, prepared)
    if isinstance(prepared, Exception):
        raise prepared
    assert prepared is not None
    data, parent, run_id = prepared
    run_dir = output_dir or runs_dir / run_id
    if isinstance(cfg, RejectionSamplingConfig) and cfg.checkpoint_every:
        raise InvalidArgumentError(
            "checkpoint_every", "rejection sampling has no sharded checkpoints (DPO and RL do)"
        )
    prompts_train, prompts_held = split_prompts(all_prompts(data), cfg.eval_fraction)
    pairs_train, pairs_held = split_by_prompt(data.pairs, cfg.eval_fraction)
    supervised_train, _ = split_by_prompt(data.supervised, cfg.eval_fraction)
    if isinstance(cfg, DPOConfig) and (not pairs_train or not pairs_held):
        raise FailedPreconditionError(
            f"{len(data.pairs)} pairs split into {len(pairs_train)} for training and "
            f"{len(pairs_held)} held out (eval_fraction {cfg.eval_fraction}): DPO needs both"
        )
    if not isinstance(cfg, DPOConfig) and not prompts_train:
        raise FailedPreconditionError(f"no training prompts (eval_fraction {cfg.eval_fraction})")
    reward_addr = cfg.reward_addr
    if scorer is None and not reward_addr and publish.promote:
        raise InvalidArgumentError(
            "reward_addr", "promotion needs a reward service for the win rate"
        )

    start = starting_point(cfg.base, registry, parent)
    seed_everything(cfg.seed)
    model, tokenizer, backbone = load_policy_model(start.load)
    root = start.backbone or backbone.name
    disable_dropout(model)  # deterministic log-probs (LoRA's own dropout is kept)
    tokens = PolicyTokenizer(tokenizer, model, cfg.max_length, cfg.max_prompt_length)
    torch.nn.Module.to(model, env.device)
    policy: Any = with_lora(model, cfg) if cfg.lora_r else model
    reference = Reference(policy)
    sharding = Sharding.of(cfg, env)
    if reference.copy is not None and sharding.fsdp and env.distributed:  # frozen, sharded too
        prepare(reference.copy, replace(sharding, activation_checkpointing=False), env)
    policy = prepare(policy, sharding, env)
    own_scorer = None
    if scorer is None and reward_addr and env.is_main:
        scorer = own_scorer = RewardServiceScorer(
            reward_addr, credentials=credentials, model=cfg.reward_model, objective=cfg.objective
        )
    reporter = RunReporter(run_dir, enabled=env.is_main)
    cursor = None if data.cursor is None else str(data.cursor)
    identity = {"source": data.source, "cursor": cursor, "pairs": len(data.pairs)}
    checkpointer = (
        None
        if isinstance(cfg, RejectionSamplingConfig)
        else Checkpointer.for_run(cfg, run_dir, env, identity)
    )
    start_training = time.perf_counter()
    deadline = start_training + cfg.max_train_seconds if cfg.max_train_seconds else None
    run = _Run(
        cfg, policy, reference, tokens, env.device, reporter, progress, scorer,
        env=env, sharding=sharding, checkpointer=checkpointer, deadline=deadline,
    )  # fmt: skip
    log.info(
        "policy training",
        extra={
            "method": cfg.method,
            "base": root,
            "train_pairs": len(pairs_train),
            "train_prompts": len(prompts_train),
            "held_out_prompts": len(prompts_held),
            "run_dir": str(run_dir),
        },
    )
    try:
        if isinstance(cfg, DPOConfig):
            metrics = train_dpo(run, cfg, pairs_train, pairs_held)
            train_items = len(pairs_train)
            if env.distributed and not _gather_on_rank_0(run, start):
                assert checkpointer is not None
                checkpointer.finish()  # wait for rank 0's evaluation, save and publish
                return None
            policy = run.model
        elif isinstance(cfg, RejectionSamplingConfig):
            metrics = train_rejection_sampling(run, cfg, prompts_train, supervised_train)
            train_items = len(prompts_train)
        else:
            if isinstance(cfg, GRPOConfig):
                metrics = train_grpo(run, cfg, prompts_train)
            elif isinstance(cfg, PPOConfig):
                metrics = train_ppo(run, cfg, prompts_train)
            else:
                metrics = train_rl(run, cfg, prompts_train)
            train_items = len(prompts_train)
        metrics["train/seconds"] = time.perf_counter() - start_training
        metrics["train/out_of_time"] = float(run.out_of_time)
        params = SamplingParams(cfg.eval_temperature, cfg.eval_top_p, cfg.eval_max_new_tokens)
        eval_prompts = prompts_held[: cfg.eval_prompts]
        baseline, baseline_name = baseline_sampler(run, registry, parent, params)
        metrics.update(
            evaluate_policy(
                run.model,
                run.reference,
                tokens,
                eval_prompts,
                params,
                env.device,
                scorer=scorer,
                baseline=baseline,
                seed=cfg.seed,
                progress=progress,
                samples_path=run_dir / EVAL_SAMPLES if env.is_main else None,
            )
        )
    finally:
        if own_scorer is not None:
            own_scorer.close()
    metrics["train/wall_s"] = time.perf_counter() - started
    metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    reporter.log({"step": run.step, **{k: v for k, v in metrics.items() if k.startswith("eval/")}})
    promotion = promotion_record(
        metrics,
        cfg,
        baseline_name,
        requested=publish.promote,
        reward_versions=sorted(getattr(scorer, "versions", ())),
        kl_reference=start.reference,
    )

    adapter = None
    if cfg.lora_r and registry is not None:  # PEFT's own format, for engines that load adapters
        policy.save_pretrained(run_dir / ADAPTER_DIR, safe_serialization=True)
        adapter = (
            run_dir / ADAPTER_DIR,
            LoraAdapter(base=root, rank=cfg.lora_r, stacked_on=start.trained_on),
        )
    merged: PreTrainedModel = policy.merge_and_unload() if cfg.lora_r else policy
    torch.nn.Module.to(merged, "cpu")
    merged.eval()
    checkpoint = run_dir / CHECKPOINT_DIR
    record = {
        "run_id": run_id,
        "config": cfg.to_dict(),
        "base": root,
        "data": data.source,
        "data_cursor": cursor,
        "metrics": metrics,
        "promotion": promotion,
    }
    save_checkpoint(merged, tokenizer, checkpoint, record)
    manifest = None
    if registry is not None:
        from plaudit.trainer.policy_export import export_policy

        manifest = export_policy(
            merged,
            tokenizer,
            registry,
            parent=parent,
            metrics=metrics,
            notes={
                "training": cfg.to_dict(),
                "training_data": data.source,
                "run_id": run_id,
                "checkpoint": str(checkpoint.resolve()),
                "base": root,
            },
            data_cursor=cursor,
            promotion=promotion,
            promote=bool(promotion["promoted"]),
            max_length=cfg.max_length,
            backbone=root,
            quantize=None if cfg.quantize == "none" else cfg.quantize,
            adapter=adapter,
        )
    result = PolicyTrainingResult(
        run_dir=run_dir,
        checkpoint=checkpoint,
        metrics=metrics,
        promotion=promotion,
        data_cursor=cursor,
        train_items=train_items,
        eval_prompts=int(metrics.get("eval/prompts", 0)),
        manifest=manifest,
        model=merged,
    )
    reporter.write_metrics({**result.summary(), "config": cfg.to_dict()})
    _plot(reporter, cfg)
    if checkpointer is not None:
        checkpointer.finish()
    return result


def _gather_on_rank_0(run: _Run, start: StartingPoint) -> bool:
    """After training under ``torchrun``: rank 0 holds the trained policy as a plain model (a
    sharded one gathered and loaded into a fresh copy of the starting model, whose own weights
    become the reference again) and goes on to evaluate and publish; True on rank 0 only."""
    if not is_sharded(run.model):
        return run.env.is_main  # a DDP replica: rank 0's is the trained policy
    weights = full_state_dict(run.model, run.env)
    if not run.env.is_main:
        return False
    model, _, _ = load_policy_model(start.load)
    disable_dropout(model)
    torch.nn.Module.to(model, run.env.device)
    policy: Any = with_lora(model, run.cfg) if run.cfg.lora_r else model
    run.reference = Reference(policy)  # the starting weights (LoRA: the adapters switched off)
    policy.load_state_dict(weights)
    run.model = policy
    return True


def _plot(reporter: RunReporter, cfg: PolicyConfig) -> None:
    if isinstance(cfg, DPOConfig):
        reporter.plot(title="policy training (DPO)", loss_label="DPO loss")
    elif isinstance(cfg, RejectionSamplingConfig):
        reporter.plot(
            title="policy training (rejection sampling)",
            loss_label="SFT cross-entropy",
            right_key="sampling/best_reward",
            right_label="best-of-n reward",
            right_ylim=None,
        )
    else:
        name, loss = {
            "rl": ("RLOO", "policy-gradient loss"),
            "grpo": ("GRPO", "clipped surrogate + KL loss"),
            "ppo": ("PPO", "clipped policy + value loss"),
        }[cfg.method]
        reporter.plot(
            title=f"policy training ({name})",
            loss_label=loss,
            right_key="rl/score",
            right_label="reward-model score",
            right_ylim=None,
        )
