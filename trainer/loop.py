"""The one training loop: a method supplies each optimizer step's micro-batches and their loss;
the loop does the rest (gradient accumulation, clipping, AdamW, warmup and decay, logging,
evaluation, early stopping with the best weights kept, the progress bar).

Methods: the Bradley-Terry reward objective (:mod:`plaudit.trainer.reward`); DPO and the
rejection-sampling
fine-tune (epochs of length-grouped batches, :func:`epoch_steps`); RLOO, GRPO and PPO, whose steps
are rollouts sampled when the loop asks for the next one (GRPO and PPO take several steps on each
rollout batch; :mod:`plaudit.trainer.policy`). Under ``torchrun`` each
process runs the loop on its shard of every global batch; DDP (or FSDP, with ``--strategy fsdp``:
:mod:`plaudit.trainer.sharding`) averages the gradients on a step's last micro-batch, and the
logged loss and throughput are reduced over processes, so all processes log the same numbers and
make the same decisions. With a :class:`~plaudit.trainer.sharding.Checkpointer` the loop saves
sharded checkpoints every N steps and, started again on a run folder holding one, resumes from it:
weights, AdamW states, schedule, evaluations, best weights and the data position (the steps
already taken are skipped; an RL method samples on from the restored policy).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from itertools import islice
from typing import Any, cast

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from plaudit.services.common.errors import FailedPreconditionError
from plaudit.trainer.batches import length_grouped_batches, shard_batches
from plaudit.trainer.distributed import DistEnv, all_reduce_sum
from plaudit.trainer.report import RunReporter
from plaudit.trainer.sharding import Checkpointer, Sharding, is_sharded, memory_metrics, prepare

log = logging.getLogger(__name__)

# one micro-batch's loss (a mean over its items) and numbers to log for it, computed with the model
# the loop runs (DDP-wrapped under torchrun)
MicroLoss = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Step:
    """One optimizer step's work, as a method supplies it."""

    micro: Sequence[Any]  # micro-batches, each handed to the method's loss
    items: int  # training items in them (pairs, sequences): for throughput
    # each micro-batch's weight in the step's loss; None: equal weights
    shares: Sequence[float] | None = None
    epoch: float | None = None  # epochs completed after this step; None: not epoch-based
    end_of_epoch: bool = False
    record: dict[str, float] = field(default_factory=dict)  # logged with the step (rollout stats)


@dataclass(frozen=True)
class LoopSettings:
    """Optimizer, schedule, evaluation cadence, early stopping and what the progress shows."""

    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    schedule: str = "linear"  # cosine | linear | constant, after the warmup
    max_grad_norm: float = 1.0  # 0 disables clipping
    fused: bool = False  # AdamW's fused kernel
    eval_every: int = 0  # steps between evaluations; 0: at each epoch's end (and the last step)
    early_stopping_patience: int = 0  # evaluations without improvement; 0: never stop early
    early_stopping_metric: str = "accuracy"  # "accuracy" (ties: lower loss) or "loss"
    keep_best: bool = False  # end with the best-evaluated weights
    desc: str = "train"  # progress-bar label
    rate_key: str = ""  # log the throughput (items per second) under this name; "": do not
    bar_keys: tuple[str, ...] = ()  # logged numbers the progress bar shows besides the loss
    # time.perf_counter() after which no new step starts (a training-time budget); None: none
    deadline: float | None = None

    @classmethod
    def of(cls, cfg: Any, **overrides: Any) -> LoopSettings:
        """The settings a training config holds (fields of the same names), with ``overrides``."""
        names = {f.name for f in fields(cls)} - overrides.keys()
        return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)}, **overrides)


@dataclass
class LoopResult:
    steps: int
    epochs: float  # epochs completed, fractional when stopped inside one
    history: list[dict[str, Any]]  # every step's logged record
    evals: list[dict[str, float]]  # held-out metrics, before training first
    best: dict[str, float]  # held-out metrics of the best weights (kept with ``keep_best``)
    best_step: int
    train_loss: float  # mean over the last tenth of the steps (NaN without steps)
    items_per_s: float  # over all processes, evaluation excluded, rollouts included
    wall_s: float
    memory: dict[str, float] = field(default_factory=dict)  # per process, the largest (sharding)
    resumed_from: int = 0  # the step a sharded checkpoint restored (0: started afresh)
    out_of_time: bool = False  # stopped at ``settings.deadline`` before ``total`` steps


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


def tail_mean(values: Sequence[float]) -> float:
    """Mean over the last tenth (at least one) of the values; NaN when there are none."""
    return float(np.mean(values[-max(1, len(values) // 10) :])) if values else float("nan")


def epoch_steps(
    lengths: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    grad_accum: int,
    seed: Sequence[int],
    max_steps: int | None = None,
    batch_tokens: int | None = None,
    window: int = 64,
    env: DistEnv | None = None,
) -> list[Step]:
    """The steps of an epoch-based run, cut at ``max_steps``: each epoch's length-grouped
    micro-batches of item indices (the same on every process, drawn from ``[*seed, epoch]``),
    this process's shard of them, ``grad_accum`` per step."""
    env = env or DistEnv()
    steps: list[Step] = []
    for epoch in range(epochs):
        batches = length_grouped_batches(
            lengths,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            rng=np.random.default_rng([*seed, epoch]),
            window=window,
        )
        plan = shard_batches(batches, env.rank, env.world_size, grad_accum)
        count = len(plan) // grad_accum
        if count == 0:
            raise FailedPreconditionError(
                f"{len(lengths)} training items make no full step of {env.world_size} x "
                f"{grad_accum} micro-batches of {batch_size}"
            )
        for k in range(count):
            micro = plan[k * grad_accum : (k + 1) * grad_accum]
            items = sum(len(index) for index in micro)
            steps.append(
                Step(micro, items, epoch=epoch + (k + 1) / count, end_of_epoch=k + 1 == count)
            )
        if max_steps is not None and len(steps) >= max_steps:
            break
    return steps if max_steps is None else steps[:max_steps]


def _is_better(new: dict[str, float], old: dict[str, float], metric: str) -> bool:
    """Higher accuracy (ties broken by lower loss), or lower loss."""
    if metric == "loss":
        return new["eval/loss"] < old["eval/loss"]
    return (new["eval/accuracy"], -new["eval/loss"]) > (old["eval/accuracy"], -old["eval/loss"])


def train_loop(
    model: torch.nn.Module,
    steps: Iterable[Step],
    total: int,
    loss_fn: MicroLoss,
    settings: LoopSettings,
    reporter: RunReporter,
    *,
    env: DistEnv | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    first_step: int = 0,
    progress: bool = False,
    sharding: Sharding | None = None,
    checkpointer: Checkpointer | None = None,
) -> LoopResult:
    """Train ``model`` in place for ``total`` steps taken from ``steps`` (fewer when stopped
    early); ``evaluate`` gives held-out metrics, taken before training and at the cadence;
    logged step numbers continue from ``first_step``. Under ``torchrun`` ``model`` is wrapped
    in DDP or sharded with FSDP (``sharding``; a model sharded already stays as it is). With
    ``settings.deadline`` the loop stops after the step that ends past it (every process stops
    at the same step), evaluating there as at the last step."""
    started = time.perf_counter()
    env = env or DistEnv()
    model = prepare(model, sharding or Sharding(), env)
    net, ddp, fsdp = model, None, is_sharded(model)
    if env.distributed and not fsdp:
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        net = ddp = DistributedDataParallel(model, device_ids=device_ids)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model, settings.learning_rate, settings.weight_decay, fused=settings.fused)
    warmup = int(settings.warmup_ratio * total)
    schedule = partial(lr_factor, total=total, warmup=warmup, schedule=settings.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    logged: list[dict[str, Any]] = []  # what went to the reporter, replayed on resumption

    def report(record: dict[str, Any]) -> None:
        logged.append(record)
        reporter.log(record)

    def run_eval(step: int, epoch: float) -> dict[str, float]:
        assert evaluate is not None
        metrics = evaluate()
        report({"step": first_step + step, "epoch": epoch, **metrics})
        log.info("held-out evaluation", extra={"step": first_step + step, **metrics})
        evals.append(metrics)
        return metrics

    def snapshot() -> dict[str, torch.Tensor]:
        """The weights (this process's shards under FSDP), copied."""
        if not settings.keep_best:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    evals: list[dict[str, float]] = []
    history: list[dict[str, Any]] = []
    step, epoch, evals_without_gain = 0, 0.0, 0
    out_of_time = False
    items_seen, train_s = 0.0, 0.0
    best: dict[str, float] = {}
    best_step, best_state = 0, dict[str, torch.Tensor]()
    restored = checkpointer.restore(model, optimizer, snapshot) if checkpointer else None
    if restored is not None:
        state, best_state = restored
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, evals_without_gain = state["step"], state["epoch"], state["evals_without_gain"]
        items_seen, train_s = state["items_seen"], state["train_s"]
        evals, history, best, best_step = (
            state["evals"],
            state["history"],
            state["best"],
            state["best_step"],
        )
        best_state = best_state or snapshot()  # the best weights are the current ones
        for logged_record in state["logged"]:
            report(logged_record)
    else:
        best = run_eval(0, 0.0) if evaluate is not None else {}
        best_step, best_state = 0, snapshot()
    resumed_from = step
    work_iter: Iterator[Step] = iter(steps)
    if resumed_from and isinstance(steps, Sequence):  # the data position: skip the steps done
        work_iter = iter(steps[resumed_from:])
    bar = tqdm(total=total, desc=settings.desc, unit="step", disable=not (progress and env.is_main))
    bar.update(step)
    t0 = time.perf_counter()
    for work in islice(work_iter, total - step):  # an RL method samples its rollout here
        lr = scheduler.get_last_lr()[0]
        loss_sum, extras = 0.0, dict[str, float]()
        for i, batch in enumerate(work.micro):
            last = i == len(work.micro) - 1  # gradients are averaged across processes here
            if fsdp:
                cast(FSDPModule, model).set_requires_gradient_sync(last)
            with ddp.no_sync() if ddp is not None and not last else nullcontext():
                loss, numbers = loss_fn(net, batch)
                share = 1 / len(work.micro) if work.shares is None else work.shares[i]
                scaled = loss / len(work.micro) if work.shares is None else loss * share
                scaled.backward()
            loss_sum += float(scaled.detach())
            for key, value in numbers.items():
                extras[key] = extras.get(key, 0.0) + value * share
        grad_norm = (
            _norm(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
            if settings.max_grad_norm > 0
            else float("nan")
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
        step += 1
        epoch = work.epoch if work.epoch is not None else epoch
        late = settings.deadline is not None and time.perf_counter() >= settings.deadline
        loss_total, items_total, late_anywhere = all_reduce_sum(
            env, [loss_sum, work.items, float(late)]
        )
        out_of_time = late_anywhere > 0 and step < total
        items_seen += items_total
        record: dict[str, Any] = {"step": first_step + step, "epoch": work.epoch}
        record |= {"train/loss": loss_total / env.world_size, "train/lr": lr}
        record |= {"train/grad_norm": grad_norm, settings.rate_key: items_seen / train_s}
        record |= extras | work.record
        record = {k: v for k, v in record.items() if k and v is not None}  # no epoch, no rate key
        history.append(record)
        report(record)
        bar.update(1)
        postfix = {"loss": f"{record['train/loss']:.4f}"}
        postfix |= {"acc": f"{best['eval/accuracy']:.3f}"} if best else {}
        postfix |= {key.rsplit("/", 1)[-1]: f"{record[key]:.3f}" for key in settings.bar_keys}
        bar.set_postfix(postfix)
        due = step % settings.eval_every == 0 if settings.eval_every else work.end_of_epoch
        if evaluate is not None and (due or step >= total or out_of_time):
            metrics = run_eval(step, epoch)
            if _is_better(metrics, best, settings.early_stopping_metric):
                best, best_step, best_state = metrics, step, snapshot()
                evals_without_gain = 0
            else:
                evals_without_gain += 1
            patience = settings.early_stopping_patience
            if patience and evals_without_gain >= patience:
                break
        if out_of_time:
            log.info("training-time budget spent", extra={"step": first_step + step})
            break
        if checkpointer is not None and checkpointer.due(step) and step < total:
            loop_state = {
                "step": step,
                "epoch": epoch,
                "evals_without_gain": evals_without_gain,
                "items_seen": items_seen,
                "train_s": train_s,
                "evals": evals,
                "history": history,
                "best": best,
                "best_step": best_step,
                "scheduler": scheduler.state_dict(),
                "logged": logged,
                "has_best": bool(best_state) and best_step != step,
            }
            best_saved = best_state if loop_state["has_best"] else None
            checkpointer.save(step, model, optimizer, loop_state, best_saved)
        t0 = time.perf_counter()
    bar.close()
    memory = memory_metrics(model, optimizer, env)
    if settings.keep_best and best_step != step:
        model.load_state_dict(best_state)
    return LoopResult(
        steps=step,
        epochs=epoch,
        history=history,
        evals=evals,
        best=best,
        best_step=best_step,
        train_loss=tail_mean([r["train/loss"] for r in history]),
        items_per_s=items_seen / train_s if train_s else float("nan"),
        wall_s=time.perf_counter() - started,
        memory=memory,
        resumed_from=resumed_from,
        out_of_time=out_of_time,
    )


def _norm(value: torch.Tensor) -> float:
    """A gradient norm as a number (under FSDP a DTensor, reduced over the shards)."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)
