"""The reward-model training loop: one readable loop, one process or many (``torchrun``).

Every process holds the whole model (DDP) and takes its share of each global batch; gradients
are averaged across processes on the last micro-batch of each optimizer step. Held-out scoring
is split across processes too and gathered, so every process computes the same metrics and
makes the same early-stopping decision.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import PreTrainedModel

from services.common.textfmt import RewardTextEncoder
from trainer.batches import (
    EncodedPairs,
    collate,
    eval_groups,
    length_grouped_batches,
    shard_batches,
)
from trainer.config import RewardTrainingConfig
from trainer.distributed import DistEnv, all_gather, all_reduce_sum
from trainer.export import ScalarReward
from trainer.objective import bradley_terry_loss, pairwise_metrics, reward_centering_loss
from trainer.report import RunReporter

log = logging.getLogger(__name__)

EVAL_GROUP_TOKENS = 16384  # padded tokens per held-out scoring batch


@dataclass
class LoopResult:
    steps: int
    epochs: float  # epochs completed, fractional when stopped inside one
    best_step: int
    best: dict[str, float]  # held-out metrics of the kept (best) weights
    initial: dict[str, float]  # held-out metrics before training
    train_loss: float  # mean over the last tenth of the steps (NaN without steps)
    pairs_per_s: float  # training pairs per second over all processes, evaluation excluded
    wall_s: float
    stopped_early: bool


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup to 1, then
    cosine or linear decay towards 0 at ``total`` (no step runs at a zero rate)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def adamw(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, *, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on matrices only (not on biases
    and norm weights). ``fused``: torch's fused kernel (one pass over all tensors) when every
    parameter is a float tensor on CPU or CUDA; otherwise the default implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=learning_rate, fused=(fused and fusable) or None)


def _optimizer(model: torch.nn.Module, cfg: RewardTrainingConfig) -> torch.optim.AdamW:
    # fused: on a 2-core CPU the per-tensor AdamW step of MiniLM (22.7M parameters) takes about
    # 0.5 s, the fused one about 0.1 s (about a tenth of a 16-pair training step)
    return adamw(model, cfg.learning_rate, cfg.weight_decay, fused=True)


def _is_better(new: dict[str, float], old: dict[str, float], metric: str) -> bool:
    """Higher accuracy (ties broken by lower loss), or lower loss."""
    if metric == "loss":
        return new["eval/loss"] < old["eval/loss"]
    return (new["eval/accuracy"], -new["eval/loss"]) > (old["eval/accuracy"], -old["eval/loss"])


def evaluate(
    scorer: torch.nn.Module,
    encoder: RewardTextEncoder,
    data: EncodedPairs,
    env: DistEnv,
    autocast: Callable[[], AbstractContextManager[object]],
    use_margin: bool,
) -> dict[str, float]:
    """Held-out metrics; each process scores every world_size-th group, all get all rewards."""
    was_training = scorer.training
    scorer.eval()
    parts = []
    with torch.inference_mode():
        for index in eval_groups(data, EVAL_GROUP_TOKENS)[env.rank :: env.world_size]:
            inputs, _, _ = collate(encoder, data, index)
            with autocast():
                rewards = scorer(**{k: v.to(env.device) for k, v in inputs.items()})
            rewards = rewards.float().cpu().numpy()
            parts.append((index, rewards[: len(index)], rewards[len(index) :]))
    scorer.train(was_training)
    chosen = np.empty(len(data), dtype=np.float64)
    rejected = np.empty(len(data), dtype=np.float64)
    for rank_parts in all_gather(env, parts):
        for index, c, r in rank_parts:
            chosen[index], rejected[index] = c, r
    return pairwise_metrics(chosen, rejected, data.margin if use_margin else None, data.weight)


def train_loop(
    cfg: RewardTrainingConfig,
    model: PreTrainedModel,
    encoder: RewardTextEncoder,
    train: EncodedPairs,
    held_out: EncodedPairs,
    env: DistEnv,
    reporter: RunReporter,
    *,
    progress: bool = False,
) -> LoopResult:
    """Train ``model`` in place; on return it holds the best weights seen on the held-out set."""
    started = time.perf_counter()
    torch.nn.Module.to(model, env.device)
    if cfg.disable_dropout:
        disable_dropout(model)
    scorer = ScalarReward(model).train()  # (batch, seq) -> (batch,) rewards, as exported
    ddp = None
    if env.distributed:
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        ddp = DistributedDataParallel(scorer, device_ids=device_ids)
    net: torch.nn.Module = ddp if ddp is not None else scorer
    optimizer = _optimizer(model, cfg)

    def autocast() -> AbstractContextManager[object]:
        # bf16 mixed precision where it pays (CUDA); the weights and the loss stay fp32
        if env.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # the whole run's micro-batches, the same on every process (seed, epoch), then sharded
    plans = [
        shard_batches(
            length_grouped_batches(
                train.lengths,
                batch_size=cfg.batch_size,
                batch_tokens=cfg.batch_tokens,
                rng=np.random.default_rng([cfg.seed, epoch]),
                window=cfg.group_window,
            ),
            env.rank,
            env.world_size,
            cfg.grad_accum,
        )
        for epoch in range(cfg.epochs)
    ]
    steps_per_epoch = [len(plan) // cfg.grad_accum for plan in plans]
    if steps_per_epoch[0] == 0:
        raise ValueError(
            f"{len(train)} training pairs make no full global batch of {env.world_size} x "
            f"{cfg.grad_accum} micro-batches of {cfg.batch_size} pairs"
        )
    total = sum(steps_per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    schedule = partial(
        lr_factor, total=total, warmup=int(cfg.warmup_ratio * total), schedule=cfg.schedule
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def run_eval(step: int, epoch: float) -> dict[str, float]:
        metrics = evaluate(scorer, encoder, held_out, env, autocast, cfg.use_margin)
        reporter.log({"step": step, "epoch": epoch, **metrics})
        log.info("held-out evaluation", extra={"step": step, **metrics})
        return metrics

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    initial = best = run_eval(0, 0.0)
    best_step, best_state = 0, snapshot()
    evals_without_gain = 0
    losses: list[float] = []
    pairs_seen, train_s = 0.0, 0.0
    step, epochs_done, stopped_early = 0, 0.0, False
    show = progress and env.is_main
    bar = tqdm(total=total, desc="reward model", unit="step", disable=not show)
    for epoch, plan in enumerate(plans):
        if step >= total or stopped_early:
            break
        for first in range(0, steps_per_epoch[epoch] * cfg.grad_accum, cfg.grad_accum):
            window = plan[first : first + cfg.grad_accum]
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss_sum, pairs = 0.0, 0
            for i, index in enumerate(window):
                inputs, margin, weight = collate(encoder, train, index)
                inputs = {k: v.to(env.device) for k, v in inputs.items()}
                margin, weight = margin.to(env.device), weight.to(env.device)
                last = i == len(window) - 1  # gradients are averaged across processes here
                sync = ddp.no_sync() if ddp is not None and not last else nullcontext()
                with sync:
                    with autocast():
                        rewards = net(**inputs)
                    rewards = rewards.float()
                    chosen, rejected = rewards[: len(index)], rewards[len(index) :]
                    loss = bradley_terry_loss(
                        chosen, rejected, margin if cfg.use_margin else None, weight
                    )
                    if cfg.center_rewards_coefficient:
                        loss = loss + cfg.center_rewards_coefficient * reward_centering_loss(
                            chosen, rejected
                        )
                    (loss / len(window)).backward()
                loss_sum += float(loss.detach())
                pairs += len(index)
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                if cfg.max_grad_norm > 0
                else float("nan")
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_s += time.perf_counter() - t0
            step += 1
            epochs_done = epoch + (first // cfg.grad_accum + 1) / steps_per_epoch[epoch]
            loss_total, pairs_total = all_reduce_sum(env, [loss_sum / len(window), pairs])
            losses.append(loss_total / env.world_size)
            pairs_seen += pairs_total
            reporter.log(
                {
                    "step": step,
                    "epoch": epochs_done,
                    "train/loss": losses[-1],
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/pairs_per_s": pairs_seen / train_s,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", acc=f"{best['eval/accuracy']:.3f}")
            end_of_epoch = first + cfg.grad_accum >= steps_per_epoch[epoch] * cfg.grad_accum
            due = step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
            if due or step >= total:
                metrics = run_eval(step, epochs_done)
                if _is_better(metrics, best, cfg.early_stopping_metric):
                    best, best_step, best_state = metrics, step, snapshot()
                    evals_without_gain = 0
                else:
                    evals_without_gain += 1
                patience = cfg.early_stopping_patience
                stopped_early = bool(patience) and evals_without_gain >= patience
            if step >= total or stopped_early:
                break
    bar.close()
    if best_step != step:
        model.load_state_dict(best_state)
    tail = losses[-max(1, len(losses) // 10) :]
    return LoopResult(
        steps=step,
        epochs=epochs_done,
        best_step=best_step,
        best=best,
        initial=initial,
        train_loss=float(np.mean(tail)) if losses else float("nan"),
        pairs_per_s=pairs_seen / train_s if train_s else float("nan"),
        wall_s=time.perf_counter() - started,
        stopped_early=stopped_early,
    )
