"""How the processes of a ``torchrun`` share a model, and the checkpoints a killed run resumes from.

* ``ddp``: every process holds the whole model, its gradients and AdamW's two moments (16 bytes a
  parameter in fp32); gradients are averaged after each step's last micro-batch.
* ``fsdp``: PyTorch's FSDP2 (``fully_shard``) on each transformer block, then on the root: a
  process holds ``1/world_size`` of every parameter, gradient and optimizer state, and a block's
  parameters are all-gathered only while it runs. Optional bf16 compute (MixedPrecisionPolicy:
  fp32 sharded weights, fp32 gradient reduce-scatter) and activation checkpointing.

On CPU, gloo (torch 2.13) has what FSDP2 uses: reduce-scatter, ``ReduceOp.AVG`` and bf16
all-gathers, so the same code runs there. Forward passes without gradients on a sharded model
run under ``no_grad``, not ``inference_mode``: FSDP2 keeps the all-gathered parameter tensors,
and ones made in inference mode cannot be saved for the next training step's backward.

Sharded checkpoints (``torch.distributed.checkpoint``: each rank writes its own shard, so any
world size can read them back) go into ``<run>/sharded/step-NNNNNNNN``: model, AdamW states and
the best weights so far, with the loop's state (step, evaluations, schedule) as JSON beside them.
A checkpoint is complete once its ``.metadata`` file exists (DCP writes it last); older ones are
removed after a newer one completes.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from plaudit.services.common.errors import FailedPreconditionError
from plaudit.trainer.distributed import DistEnv, barrier, broadcast

log = logging.getLogger(__name__)

SHARDED_DIR = "sharded"  # in the run folder
LOOP_STATE = "loop.json"  # beside the DCP files of one checkpoint
DCP_METADATA = ".metadata"  # written last by torch.distributed.checkpoint


@dataclass(frozen=True)
class Sharding:
    """A run's resolved strategy settings (see :class:`plaudit.trainer.config.TrainingConfig`)."""

    strategy: str = "ddp"  # ddp | fsdp
    activation_checkpointing: bool = False
    bf16: bool = False  # fsdp: bf16 parameters for compute and all-gathers

    @classmethod
    def of(cls, cfg: Any, env: DistEnv) -> Sharding:
        """``cfg``'s strategy fields, resolved for ``env``'s device."""
        strategy = getattr(cfg, "strategy", "ddp")
        checkpointing = getattr(cfg, "activation_checkpointing", None)
        precision = getattr(cfg, "mixed_precision", "auto")
        bf16 = strategy == "fsdp" and (
            precision == "bf16"
            or (
                precision == "auto" and env.device.type == "cuda" and torch.cuda.is_bf16_supported()
            )
        )
        return cls(strategy, strategy == "fsdp" if checkpointing is None else checkpointing, bf16)

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def pretrained_model(model: torch.nn.Module) -> Any:
    """The Hugging Face model inside ``model`` (a wrapper, a LoRA model), or None."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: members of a ``ModuleList`` whose class the Hugging Face model names
    in ``_no_split_modules`` (BertLayer, LlamaDecoderLayer, ...), else every ModuleList member."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    named = [b for lst in lists for b in lst if type(b).__name__ in names]
    return named or [b for lst in lists for b in lst]


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute block activations in backward: Hugging Face's gradient checkpointing
    (non-reentrant, so it composes with DDP and FSDP), else torch's on each block."""
    hf = pretrained_model(model)
    if hf is not None and getattr(hf, "supports_gradient_checkpointing", False):
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed._composable import checkpoint

    for block in transformer_blocks(model):
        checkpoint(block)


def shard(model: torch.nn.Module, sharding: Sharding, env: DistEnv) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then ``model`` (the root: embeddings, head, tied
    weights); in place, idempotent. Gradients are reduced in fp32."""
    if is_sharded(model):
        return model
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if sharding.bf16 else None,
        reduce_dtype=torch.float32,
    )
    units = [*transformer_blocks(model), model]
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    log.info(
        "fsdp",
        extra={"units": len(units), "bf16": sharding.bf16, "rank": env.rank},
    )
    return model


def prepare(model: torch.nn.Module, sharding: Sharding, env: DistEnv) -> torch.nn.Module:
    """Activation checkpointing (when asked), then FSDP (fsdp under torchrun); idempotent.
    ``fsdp`` in one process shards nothing (there is no one to share with)."""
    if is_sharded(model):
        return model
    if sharding.activation_checkpointing:
        enable_activation_checkpointing(model)
    if sharding.fsdp and env.distributed:
        return shard(model, sharding, env)
    return model


def no_grad(model: torch.nn.Module) -> AbstractContextManager[Any]:
    """Forward passes without gradients: ``inference_mode`` for a plain model; ``no_grad`` for a
    sharded one, whose all-gathered parameters the next training step reuses (an inference
    tensor cannot be saved for backward)."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def full_state_dict(module: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """``module``'s whole weights on rank 0 (CPU, fp32 as trained), empty elsewhere; a collective
    (every rank calls it): sharded tensors are gathered one at a time."""
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if env.is_main:
            out[key] = value.detach().to("cpu", copy=True)
    return out


def unsharded_copy(model: Any, state: Mapping[str, torch.Tensor], prefix: str = "") -> Any:
    """A plain (unsharded, CPU) Hugging Face model of ``model``'s class and config holding
    ``state`` (keys under ``prefix``, as :func:`full_state_dict` of a wrapper gives them)."""
    cls: Any = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    plain = cls._from_config(model.config, dtype=torch.float32)
    weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    plain.load_state_dict(weights, strict=True)
    if getattr(plain, "is_gradient_checkpointing", False):
        plain.gradient_checkpointing_disable()
    return plain


# -- memory -------------------------------------------------------------------------------------
def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _nbytes(tensor: torch.Tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this process holds between steps: its parameters, their gradients (one per
    trainable parameter, as ``backward`` leaves them) and the optimizer's states."""
    params = list(model.parameters())
    optim = sum(
        _nbytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
    return {
        "params": sum(_nbytes(p) for p in params),
        "grads": sum(_nbytes(p) for p in params if p.requires_grad),
        "optimizer": optim,
    }


def memory_metrics(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv
) -> dict[str, float]:
    """Per-process memory, the largest over processes (a collective): model + gradient +
    optimizer-state bytes, the resident-set high-water mark and, on CUDA, the allocator's peak.
    Sharded modules are resharded first (after a forward pass without backward the root keeps
    its parameters gathered, which is not what a process holds between steps)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    held = state_bytes(model, optimizer)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss *= 1 if sys.platform == "darwin" else 1024
    values = [float(sum(held.values())), float(held["params"]), float(held["optimizer"])]
    values.append(float(rss))
    names = ["state_bytes", "param_bytes", "optimizer_bytes", "peak_rss_bytes"]
    if env.device.type == "cuda":
        values.append(float(torch.cuda.max_memory_allocated(env.device)))
        names.append("peak_cuda_bytes")
    peaks = _all_reduce_max(env, values)
    return {f"memory/{name}_per_rank": value for name, value in zip(names, peaks, strict=True)}


def _all_reduce_max(env: DistEnv, values: list[float]) -> list[float]:
    if not env.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [float(v) for v in tensor.tolist()]


# -- sharded checkpoints ------------------------------------------------------------------------
def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (``<run>/sharded``), or None."""
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / DCP_METADATA).is_file())
    return done[-1] if done else None


# settings that may change between a run and its resumption (how, not what, it trains)
RESUMABLE_CHANGES = frozenset(
    {"resume", "checkpoint_every", "device", "num_threads", "strategy",
     "activation_checkpointing", "mixed_precision"}
)  # fmt: skip


@dataclass
class Checkpointer:
    """Saves the loop's state every ``every`` steps into ``folder`` and restores the newest.

    ``fingerprint``: what must not change between a run and its resumption (config, data,
    world size); a mismatch is refused, naming what changed.
    """

    folder: Path
    every: int
    fingerprint: dict[str, Any]
    env: DistEnv
    resume: bool = True

    @classmethod
    def for_run(cls, cfg: Any, run_dir: Path, env: DistEnv, data: dict[str, Any]) -> Checkpointer:
        """The run folder's checkpoints, for ``cfg`` (a training config) on ``data`` (what
        identifies the training data: source, cursor, counts)."""
        config = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
        fingerprint = {"config": config, "data": data, "world_size": env.world_size}
        return cls(
            run_dir / SHARDED_DIR,
            cfg.checkpoint_every,
            _jsonable(fingerprint),
            env,
            resume=cfg.resume,
        )

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loop_state: dict[str, Any],
        best_state: dict[str, torch.Tensor] | None,
    ) -> Path:
        """One checkpoint (a collective): every rank writes its shard, rank 0 the loop's state
        (first, so a complete ``.metadata`` always has it), then older checkpoints go."""
        path = self.folder / f"step-{step:08d}"
        if self.env.is_main:
            path.mkdir(parents=True, exist_ok=True)
            record = {"fingerprint": self.fingerprint, "loop": loop_state}
            (path / LOOP_STATE).write_text(json.dumps(record, default=str) + "\n")
        barrier(self.env)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
        if best_state:
            state["best"] = best_state
        dcp.save(state, checkpoint_id=path)
        barrier(self.env)
        if self.env.is_main:
            for old in self.folder.glob("step-*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        log.info("sharded checkpoint saved", extra={"step": step, "path": str(path)})
        return path

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        best_template: Callable[[], dict[str, torch.Tensor]],
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The newest checkpoint's loop state and best weights, with ``model`` and
        ``optimizer`` restored from it; None when there is none (or resuming is off)."""
        if not self.resume:
            return None
        found = broadcast(self.env, latest_checkpoint(self.folder) if self.env.is_main else None)
        if found is None:
            return None
        record = json.loads((found / LOOP_STATE).read_text())
        self._check(record["fingerprint"], found)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
        loop_state = record["loop"]
        if loop_state.get("has_best"):
            state["best"] = best_template()
        dcp.load(state, checkpoint_id=found)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        log.info(
            "resumed from a sharded checkpoint",
            extra={"step": loop_state["step"], "path": str(found), "rank": self.env.rank},
        )
        return loop_state, state.get("best", {})

    def _check(self, saved: dict[str, Any], path: Path) -> None:
        now = self.fingerprint
        changed = [
            k for k in sorted({*saved, *now}) if k != "config" and saved.get(k) != now.get(k)
        ]
        old_cfg, new_cfg = saved.get("config", {}), now.get("config", {})
        changed += [k for k in sorted({*old_cfg, *new_cfg}) if old_cfg.get(k) != new_cfg.get(k)]
        if changed:
            raise FailedPreconditionError(
                f"cannot resume from {path}: {', '.join(changed)} changed since it was saved "
                "(give the same settings and data, or --no-resume, or a new --output-dir)"
            )

    def finish(self) -> None:
        """The run completed: its sharded checkpoints are no longer needed (rank 0 removes)."""
        barrier(self.env)
        if self.env.is_main and self.folder.is_dir():
            shutil.rmtree(self.folder, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))
