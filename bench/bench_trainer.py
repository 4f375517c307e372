"""Reward-model training: Plaudit's trainer vs TRL's ``RewardTrainer`` (issue #4), side by side.

One run trains the same backbone twice on the same pairs, on CPU, and scores both results the
same way:

* ``ours``  :func:`~plaudit.trainer.reward.train_reward` as ``plaudit train reward`` runs it (no
  registry, so no export): serving tokenization (:class:`RewardTextEncoder`: ``[CLS] prompt [SEP]
  completion [SEP]`` with segment ids, over-long pairs cut from the start so the end is kept),
  length-grouped micro-batches, best held-out weights kept.
* ``trl``   ``trl.RewardTrainer`` given the same model object type, initial weights (the same
  loader and seed: backbone plus the same fresh head), pairs, epochs, max length, batch size,
  learning rate, schedule (linear warmup over 10% of the steps, cosine decay), AdamW weight decay
  (0.01, not on biases / norms), gradient clipping (1.0), dropout off, fp32. TRL tokenizes by
  itself: ``prompt + completion + eos`` as ONE segment (MiniLM has no EOS token, so ``[SEP]`` is
  given, as for any tool that wants one; the text then ends ``[SEP] [SEP]``), no segment ids, no
  truncation: pairs whose chosen or rejected side exceeds max length are DROPPED (train and eval);
  random (not length-grouped) batches. By default TRL's CPU-hostile defaults are switched off to
  match our fp32 run (``bf16=False``, ``gradient_checkpointing=False``); ``--trl-shipped-defaults``
  keeps them (bf16 autocast and gradient checkpointing, as ``RewardConfig()`` ships).

Split: the first ``--pairs`` records of ``--data``; the held-out side is chosen by prompt hash
(:func:`plaudit.trainer.objective.split_by_prompt`, ``--eval-fraction`` of the prompts), the same
pairs for both trainers.

Metrics, per trainer:

* train s / pairs/s: the training loop only (model load, tokenization, evaluation, checkpoint
  saving left out): ours, the sum of its optimizer steps' times (``train/pairs_per_s``); TRL,
  ``Trainer.train``'s ``train_runtime`` with evaluation and saving switched off. pairs/s =
  training pairs actually trained on x epochs / train s (TRL trains on fewer: it drops the
  over-long ones). Real tok/s counts unpadded tokens; ``pad eff`` = real / padded tokens fed.
* wall s: end to end, load + tokenize + train + evaluation(s) + (ours) checkpoint save and plot.
* held-out accuracy, **our eval** (the issue's number): every held-out pair scored by each final
  model through the same code (:func:`plaudit.trainer.reward.evaluate`: ``RewardTextEncoder``
  tokenization, all held-out pairs, over-long ones truncated keeping the end). This is TRL's
  model on a tokenization it was not trained on (segment ids, one ``[SEP]`` at the end), so the
  run also reports **TRL tokenization**: both models scored on TRL's own token ids, on the
  held-out pairs TRL keeps; and each trainer's **own report** (ours: held-out accuracy of the
  weights it kept; TRL: ``trainer.evaluate()``'s ``eval_accuracy``, a mean of per-batch means
  with ties counted wrong). Paired differences on the held-out pairs: McNemar's exact test.

Ours keeps the best held-out weights it saw (before training or after an epoch); TRL keeps the
final ones. With one epoch, ours differs from its final weights only if training made held-out
accuracy worse (reported as ``best step``). Small differences left in: warmup steps (ours
``int(0.1 x steps)`` starting at lr/warmup, Transformers ``ceil`` starting at 0), AdamW kernels
(both fused on CPU), TRL's per-step metric gathering and logging (inside its ``train_runtime``).

The machine is shared: the two trainers run one after the other, so a change in other users'
load between them moves the ratio (``--order`` swaps them). The run prints padded tokens per
training pair for each (the work ratio, independent of load) and padded tokens/s (the machine
speed each one saw), with fp32 GEMM rates and load averages before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers

from plaudit.demo import HH_PAIRS
from plaudit.services.common.preference_files import PreferencePair
from plaudit.services.common.textfmt import RewardTextEncoder, length_groups
from plaudit.trainer.backbones import resolve_backbone
from plaudit.trainer.batches import encode_pairs, length_grouped_batches
from plaudit.trainer.config import RewardTrainingConfig
from plaudit.trainer.data import load_file_pairs
from plaudit.trainer.distributed import DistEnv, available_cores
from plaudit.trainer.export import ScalarReward, load_reward_model, text_format_for
from plaudit.trainer.objective import preference_accuracy, split_by_prompt
from plaudit.trainer.reward import PairSource, evaluate, serving_encoder, train_reward

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = HH_PAIRS
THROUGHPUT_TARGET = 1.5  # ours / TRL training pairs/s that the issue asks for
SCORE_GROUP_TOKENS = 16384  # padded tokens per scoring batch (no gradients)


@dataclass
class TrainerRun:
    key: str
    name: str
    model: Any  # the trained PreTrainedModel (CPU, fp32)
    train_pairs: int  # pairs trained on (TRL: after its length filter)
    epochs: float
    steps: int
    train_s: float  # training loop only
    wall_s: float  # end to end
    real_tokens: int  # unpadded tokens fed to training, all epochs
    padded_tokens: int  # padded tokens fed to training, all epochs
    reported: dict[str, float]  # the trainer's own held-out metrics
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pairs_per_s(self) -> float:
        return self.train_pairs * self.epochs / self.train_s


# -- data ----------------------------------------------------------------------------------------
def first_records(src: Path, n: int | None, dst: Path) -> int:
    """Copy the first ``n`` non-empty JSONL records of ``src`` to ``dst``; returns how many."""
    count = 0
    with src.open(encoding="utf-8") as fin, dst.open("w", encoding="utf-8") as fout:
        for line in fin:
            if not line.strip():
                continue
            if n is not None and count >= n:
                break
            fout.write(line if line.endswith("\n") else line + "\n")
            count += 1
    return count


def trl_text(prompt: str, completion: str, eos: str) -> str:
    """What TRL's ``RewardTrainer`` tokenizes for an explicit-prompt, non-chat example."""
    text = prompt + completion
    return text if text.endswith(eos) else text + eos


# -- scoring -------------------------------------------------------------------------------------
def our_eval(model: Any, encoder: RewardTextEncoder, held_out: Sequence[PreferencePair]) -> Any:
    """Held-out metrics and per-pair reward gaps through the trainer's own evaluation code."""
    data = encode_pairs(encoder, held_out)
    metrics = evaluate(ScalarReward(model), encoder, data, DistEnv(), nullcontext, True)
    # the same rewards again, per pair, for the paired test (evaluate returns only aggregates)
    gaps = np.empty(len(data), dtype=np.float64)
    scorer = ScalarReward(model)
    with torch.inference_mode():
        for index in length_groups(data.lengths, SCORE_GROUP_TOKENS // 2):
            rows = [data.chosen[i] for i in index] + [data.rejected[i] for i in index]
            batch = encoder.pad(rows)
            rewards = scorer(**{k: torch.from_numpy(v) for k, v in batch.inputs.items()}).numpy()
            gaps[index] = rewards[: len(index)] - rewards[len(index) :]
    return metrics, gaps


def hf_rewards(model: Any, ids: list[list[int]], pad_id: int) -> np.ndarray:
    """Rewards for pre-tokenized rows fed as TRL's collator feeds them (ids + mask only)."""
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    out = np.empty(len(ids), dtype=np.float64)
    model.eval()
    with torch.inference_mode():
        for group in length_groups(lengths, SCORE_GROUP_TOKENS):
            width = int(lengths[group].max())
            input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                input_ids[row, : lengths[i]] = torch.tensor(ids[i])
                mask[row, : lengths[i]] = 1
            out[group] = model(input_ids=input_ids, attention_mask=mask).logits[:, 0].double()
    return out


@dataclass
class TrlTokens:
    """Held-out pairs in TRL's tokenization, restricted to those TRL keeps (<= max length)."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    kept: np.ndarray  # indices into the held-out pairs


def trl_tokens(tokenizer: Any, pairs: Sequence[PreferencePair], eos: str, max_length: int) -> Any:
    chosen = tokenizer([trl_text(p.prompt, p.chosen, eos) for p in pairs])["input_ids"]
    rejected = tokenizer([trl_text(p.prompt, p.rejected, eos) for p in pairs])["input_ids"]
    kept = np.array(
        [
            i
            for i, (c, r) in enumerate(zip(chosen, rejected, strict=True))
            if len(c) <= max_length and len(r) <= max_length
        ],
        dtype=np.int64,
    )
    return TrlTokens([chosen[i] for i in kept], [rejected[i] for i in kept], kept)


def trl_eval(model: Any, tokens: TrlTokens, pad_id: int) -> tuple[float, np.ndarray]:
    chosen = hf_rewards(model, tokens.chosen, pad_id)
    rejected = hf_rewards(model, tokens.rejected, pad_id)
    return preference_accuracy(chosen, rejected), chosen - rejected


def mcnemar(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Paired comparison on the same pairs: ours right & TRL wrong (b), the reverse (c), and the
    exact two-sided binomial p-value of b vs c (McNemar). A tie (gap 0) counts as wrong."""
    a, t = ours > 0, theirs > 0
    b, c = int(np.sum(a & ~t)), int(np.sum(~a & t))
    n = b + c
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n) if n else 1.0
    return {"ours_only_right": b, "trl_only_right": c, "p_value": p}


# -- ours ----------------------------------------------------------------------------------------
def run_ours(
    args: argparse.Namespace,
    data_file: Path,
    work: Path,
    train_pairs: Sequence[PreferencePair],
    encoder: RewardTextEncoder,
) -> TrainerRun:
    cfg = RewardTrainingConfig(
        backbone=args.backbone,
        max_length=args.max_length,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        device="cpu",
        num_threads=args.threads,
        mixed_precision="bf16" if args.bf16 else "auto",
    )
    start = time.perf_counter()
    result = train_reward(
        cfg, PairSource(files=(data_file,)), None, output_dir=work / "ours", progress=args.progress
    )
    wall = time.perf_counter() - start
    assert result is not None and result.model is not None
    m = result.metrics
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("eval/accuracy") is not None]
    # the micro-batches the loop ran (the same plan, rebuilt), for real and padded token counts
    data = encode_pairs(encoder, train_pairs)
    rows = np.array([len(e.ids) for e, _ in data.chosen]) + np.array(
        [len(e.ids) for e, _ in data.rejected]
    )
    real = padded = 0
    for epoch in range(math.ceil(m["train/epochs"])):
        plan = length_grouped_batches(
            data.lengths,
            batch_size=cfg.batch_size,
            batch_tokens=cfg.batch_tokens,
            rng=np.random.default_rng([cfg.seed, epoch]),
            window=cfg.group_window,
        )
        real += sum(int(rows[b].sum()) for b in plan)
        padded += sum(2 * len(b) * int(data.lengths[b].max()) for b in plan)
    epochs = m["train/epochs"]
    return TrainerRun(
        key="ours",
        name="plaudit train_reward",
        model=result.model,
        train_pairs=result.train_pairs,
        epochs=epochs,
        steps=int(m["train/steps"]),
        train_s=result.train_pairs * epochs / m["train/pairs_per_s"],
        wall_s=wall,
        real_tokens=real,
        padded_tokens=padded,
        reported={"accuracy": m["eval/accuracy"], "loss": m["eval/loss"]},
        extra={
            "best_step": int(m["train/best_step"]),
            "initial_accuracy": m["eval/initial_accuracy"],
            "final_step_accuracy": evals[-1]["eval/accuracy"] if evals else float("nan"),
            "eval_pairs": result.eval_pairs,
            "truncated_train_rows": data.truncated,
            "train_loss": m.get("train/loss"),
            "loop_wall_s": m["train/wall_s"],
        },
    )


# -- TRL -----------------------------------------------------------------------------------------
def run_trl(
    args: argparse.Namespace,
    work: Path,
    train_pairs: Sequence[PreferencePair],
    held_out: Sequence[PreferencePair],
    head_reference: dict[str, torch.Tensor],
) -> tuple[TrainerRun, Any]:
    try:
        import datasets
        from transformers import PrinterCallback
        from trl import RewardConfig, RewardTrainer
        from trl.trainer.reward_trainer import DataCollatorForPreference
    except ImportError as exc:  # a benchmark-only dependency
        raise SystemExit(f"{exc}: install the bench extra: pip install -e '.[bench]'") from exc

    @dataclass
    class CountingCollator(DataCollatorForPreference):
        """TRL's own collator, counting the padded and real tokens it hands to the model."""

        padded: int = 0
        real: int = 0

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            out = super().torch_call(examples)
            self.padded += int(out["input_ids"].numel())
            self.real += int(out["attention_mask"].sum())
            return out

    datasets.disable_progress_bars()
    start = time.perf_counter()
    model, loaded_tokenizer = load_reward_model(resolve_backbone(args.backbone), args.seed)
    tokenizer: Any = loaded_tokenizer
    same_head = all(
        torch.equal(t, model.state_dict()[k]) for k, t in head_reference.items()
    )  # the fresh head our trainer starts from (same loader, same seed)
    eos = tokenizer.eos_token or tokenizer.sep_token
    shipped = args.trl_shipped_defaults

    with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing: not ours
        warnings.simplefilter("ignore", FutureWarning)
        config = RewardConfig(
            output_dir=str(work / "trl"),
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,  # a fraction: 10% of the steps, as warmup_ratio=0.1 in ours
            weight_decay=0.01,
            max_grad_norm=1.0,
            max_length=args.max_length,
            eos_token=eos,
            disable_dropout=True,
            bf16=True if args.bf16 else (None if shipped else False),  # None: TRL's default
            gradient_checkpointing=bool(shipped),
            use_cpu=True,
            seed=args.seed,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            disable_tqdm=not args.progress,
            dataloader_num_workers=0,
        )

    def dataset(pairs: Sequence[PreferencePair]) -> datasets.Dataset:
        return datasets.Dataset.from_list(
            [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
        )

    collator = CountingCollator(pad_token_id=int(tokenizer.pad_token_id))
    trainer = RewardTrainer(
        model=model,
        args=config,
        data_collator=collator,
        train_dataset=dataset(train_pairs),
        eval_dataset=dataset(held_out),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    train_ds: Any = trainer.train_dataset
    eval_ds: Any = trainer.eval_dataset
    trl_pairs = len(train_ds)
    # our reproduction of TRL's tokenization (used to score held-out pairs) must be exact
    check = trl_tokens(tokenizer, train_pairs[:32], eos, args.max_length)
    reproduced = [list(x) for x in train_ds[: len(check.kept)]["chosen_ids"]] == check.chosen
    output = trainer.train()
    train_runtime = float(output.metrics["train_runtime"])
    real, padded = collator.real, collator.padded
    reported = trainer.evaluate()
    wall = time.perf_counter() - start
    steps = int(trainer.state.global_step)
    run = TrainerRun(
        key="trl",
        name=f"trl {_version('trl')} RewardTrainer",
        model=trainer.model,
        train_pairs=trl_pairs,
        epochs=float(args.epochs),
        steps=steps,
        train_s=train_runtime,
        wall_s=wall,
        real_tokens=real,
        padded_tokens=padded,
        reported={
            "accuracy": float(reported["eval_accuracy"]),
            "loss": float(reported["eval_loss"]),
        },
        extra={
            "same_initial_head": same_head,
            "tokenization_reproduced": reproduced,
            "dropped_train_pairs": len(train_pairs) - trl_pairs,
            "eval_pairs": len(eval_ds),
            "train_loss": float(output.metrics.get("train_loss", float("nan"))),
            "eos_token": eos,
            "bf16": bool(config.bf16),
            "gradient_checkpointing": bool(config.gradient_checkpointing),
        },
    )
    return run, eos


# -- report --------------------------------------------------------------------------------------
def sgemm_gflops(threads: int, n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` fp32 GEMM rate on ``threads`` threads, in GFLOP/s (as bench_reward)."""
    torch.set_num_threads(threads)
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    """The vector/matrix ISA flags of /proc/cpuinfo that CPU matmul kernels pick from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in ISA_FLAGS if f in present]
    except OSError:
        pass
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "not installed"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'trainer':<30} {'pairs':>5} {'steps':>5} {'train s':>8} {'pairs/s':>7} "
        f"{'tok/s':>6} {'pad eff':>7} {'wall s':>7} {'acc ours-eval':>13} "
        f"{'acc TRL-tok':>11} {'acc reported':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name'][:30]:<30} {r['train_pairs']:>5} {r['steps']:>5} {r['train_s']:>8.1f} "
            f"{r['pairs_per_s']:>7.2f} {r['real_tokens_per_s']:>6.0f} "
            f"{r['padding_efficiency']:>7.0%} {r['wall_s']:>7.1f} "
            f"{r['accuracy_our_eval']:>13.3f} {r['accuracy_trl_tokenization']:>11.3f} "
            f"{r['accuracy_reported']:>12.3f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL pairs")
    parser.add_argument("--pairs", type=int, default=None, help="first N records (default all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="share of prompts held out"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=available_cores(), help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--order", choices=["ours-first", "trl-first"], default="ours-first", help="run order"
    )
    parser.add_argument(
        "--trl-shipped-defaults",
        action="store_true",
        help="keep TRL's bf16 autocast and gradient checkpointing (default: off, fp32 like ours)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast for both (ours: --mixed-precision bf16, TRL: bf16=True), and ours in "
        "fp32 first as the baseline (today's default on CPU)",
    )
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument(
        "--json-out",
        type=Path,
        default=None,
        help="results JSON (default bench/results/bench_trainer-<UTC time>.json)",
    )
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 2:
        parser.error("--pairs must be at least 2")
    if args.epochs < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--epochs, --threads and --batch-size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    peaks = [sgemm_gflops(args.threads)]
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{_version('trl')}, {args.threads} threads, CPU {cpu_name()}; fp32 sgemm "
        f"{peaks[0]:.1f} GFLOP/s; load average {os.getloadavg()[0]:.2f}"
    )

    with tempfile.TemporaryDirectory(prefix="plaudit-bench-trainer-") as tmp:
        work = Path(tmp)
        data_file = work / "pairs.jsonl"
        records = first_records(args.data, args.pairs, data_file)
        pairs = load_file_pairs([data_file]).pairs
        train_pairs, held_out = split_by_prompt(pairs, args.eval_fraction)
        print(
            f"{records} records from {args.data}: {len(train_pairs)} training pairs, "
            f"{len(held_out)} held out by prompt hash ({args.eval_fraction:.0%} of prompts); "
            f"{args.epochs} epoch(s), batch {args.batch_size}, lr {args.learning_rate:g}, "
            f"max length {args.max_length}"
        )
        backbone = resolve_backbone(args.backbone)
        reference_model, loaded_tokenizer = load_reward_model(backbone, args.seed)
        tokenizer: Any = loaded_tokenizer
        fresh = {k: v.clone() for k, v in reference_model.state_dict().items() if "classifier" in k}
        encoder = serving_encoder(
            tokenizer, text_format_for(tokenizer, reference_model, args.max_length)
        )
        del reference_model

        baseline: dict[str, float] = {}
        if args.bf16:  # today's CPU default, on the same pairs, for the bf16 comparison
            print("training: ours in fp32 (the baseline) ...", flush=True)
            fp32 = run_ours(argparse.Namespace(**{**vars(args), "bf16": False}), data_file,
                            work / "fp32", train_pairs, encoder)  # fmt: skip
            baseline = {
                "pairs_per_s": fp32.pairs_per_s,
                "train_s": fp32.train_s,
                "accuracy_our_eval": our_eval(fp32.model, encoder, held_out)[0]["eval/accuracy"],
            }
            del fp32
            print(f"  ours fp32: {baseline}", flush=True)
        runs: dict[str, TrainerRun] = {}
        load: dict[str, list[float]] = {}
        eos = ""
        for key in ["ours", "trl"] if args.order == "ours-first" else ["trl", "ours"]:
            before = os.getloadavg()[0]
            print(f"training: {key} ...", flush=True)
            if key == "ours":
                runs[key] = run_ours(args, data_file, work, train_pairs, encoder)
            else:
                runs[key], eos = run_trl(args, work, train_pairs, held_out, fresh)
            load[key] = [before, os.getloadavg()[0]]
            r = runs[key]
            print(
                f"  {key}: {r.train_pairs} pairs x {r.epochs:g} epoch(s) in {r.train_s:.1f} s "
                f"({r.pairs_per_s:.2f} pairs/s), wall {r.wall_s:.1f} s",
                flush=True,
            )

        print("scoring held-out pairs with both models ...", flush=True)
        pad_id = int(tokenizer.pad_token_id)
        tokens = trl_tokens(tokenizer, held_out, eos, args.max_length)
        ours_metrics, ours_gap = our_eval(runs["ours"].model, encoder, held_out)
        trl_metrics, trl_gap = our_eval(runs["trl"].model, encoder, held_out)
        ours_trl_acc, ours_trl_gap = trl_eval(runs["ours"].model, tokens, pad_id)
        trl_trl_acc, trl_trl_gap = trl_eval(runs["trl"].model, tokens, pad_id)
    peaks.append(sgemm_gflops(args.threads))

    evals = {
        "ours": (ours_metrics, ours_trl_acc),
        "trl": (trl_metrics, trl_trl_acc),
    }
    rows = []
    for key, r in runs.items():
        metrics, trl_tok_acc = evals[key]
        rows.append(
            {
                "key": key,
                "name": r.name,
                "train_pairs": r.train_pairs,
                "epochs": r.epochs,
                "steps": r.steps,
                "train_s": r.train_s,
                "pairs_per_s": r.pairs_per_s,
                "real_tokens": r.real_tokens,
                "padded_tokens": r.padded_tokens,
                "real_tokens_per_s": r.real_tokens / r.train_s,
                "padded_tokens_per_s": r.padded_tokens / r.train_s,
                "padding_efficiency": r.real_tokens / r.padded_tokens,
                "wall_s": r.wall_s,
                "accuracy_our_eval": metrics["eval/accuracy"],
                "loss_our_eval": metrics["eval/loss"],
                "calibration_error_our_eval": metrics["eval/calibration_error"],
                "accuracy_trl_tokenization": trl_tok_acc,
                "accuracy_reported": r.reported["accuracy"],
                "loss_reported": r.reported["loss"],
                "load_average_before_after": load[key],
                **r.extra,
            }
        )
    rows.sort(key=lambda row: row["key"] != "ours")
    ours, trl = rows
    speedup = ours["pairs_per_s"] / trl["pairs_per_s"]
    acc_ok = ours["accuracy_our_eval"] >= trl["accuracy_our_eval"]
    speed_ok = speedup >= THROUGHPUT_TARGET
    paired_our_eval = mcnemar(ours_gap, trl_gap)
    paired_trl_tok = mcnemar(ours_trl_gap, trl_trl_gap)

    print()
    print_table(rows)
    print()
    print(
        f"held out: {len(held_out)} pairs (our eval: all; TRL tokenization and TRL's report: the "
        f"{len(tokens.kept)} within {args.max_length} tokens). Ours kept step "
        f"{ours['best_step']} of {ours['steps']} (held-out acc before training "
        f"{ours['initial_accuracy']:.3f}, at the last step {ours['final_step_accuracy']:.3f})."
    )
    print(
        f"TRL trained on {trl['train_pairs']} of {len(train_pairs)} pairs "
        f"({trl['dropped_train_pairs']} dropped as over {args.max_length} tokens); ours on all "
        f"({ours['truncated_train_rows']} rows truncated, end kept). Same initial head: "
        f"{trl['same_initial_head']}; TRL tokenization reproduced for scoring: "
        f"{trl['tokenization_reproduced']}; TRL bf16 {trl['bf16']}, gradient checkpointing "
        f"{trl['gradient_checkpointing']}."
    )
    print(
        f"paired on held-out pairs (McNemar exact): our eval {paired_our_eval['ours_only_right']} "
        f"ours-only vs {paired_our_eval['trl_only_right']} TRL-only right, p = "
        f"{paired_our_eval['p_value']:.2f}; TRL tokenization {paired_trl_tok['ours_only_right']} "
        f"vs {paired_trl_tok['trl_only_right']}, p = {paired_trl_tok['p_value']:.2f}"
    )
    work_ratio = (trl["padded_tokens"] / trl["train_pairs"]) / (
        ours["padded_tokens"] / ours["train_pairs"]
    )
    print(
        f"work per training pair: ours {ours['padded_tokens'] / ours['train_pairs']:.0f} padded "
        f"tokens, TRL {trl['padded_tokens'] / trl['train_pairs']:.0f} ({work_ratio:.2f}x): the "
        "throughput ratio a quiet machine gives before attention's L^2 and per-step overheads. "
        f"Padded tokens/s (machine speed as each saw it): ours {ours['padded_tokens_per_s']:.0f},"
        f" TRL {trl['padded_tokens_per_s']:.0f}."
    )
    print(
        f"fp32 sgemm start {peaks[0]:.1f} / end {peaks[1]:.1f} GFLOP/s; load average before/after: "
        + ", ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in load.items())
    )
    print(
        f"targets: held-out accuracy (our eval) ours {ours['accuracy_our_eval']:.3f} >= TRL "
        f"{trl['accuracy_our_eval']:.3f}: {'met' if acc_ok else 'NOT met'}; training throughput "
        f"ours/TRL {speedup:.2f}x >= {THROUGHPUT_TARGET}x: {'met' if speed_ok else 'NOT met'}"
    )

    if baseline:
        gain = ours["pairs_per_s"] / baseline["pairs_per_s"]
        print(
            f"bf16 autocast vs fp32 (ours): {ours['pairs_per_s']:.2f} vs "
            f"{baseline['pairs_per_s']:.2f} pairs/s ({gain:.2f}x), "
            f"held-out accuracy {ours['accuracy_our_eval']:.3f} vs "
            f"{baseline['accuracy_our_eval']:.3f}; CPU flags {', '.join(cpu_flags())}"
        )
    out = args.json_out or RESULTS / f"bench_trainer-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "created_at": datetime.now(UTC).isoformat(),
        "git": git_commit(),
        "argv": sys.argv[1:],
        "fp32_baseline": baseline or None,
        "config": {
            "data": str(args.data),
            "records": records,
            "train_pairs": len(train_pairs),
            "held_out_pairs": len(held_out),
            "held_out_pairs_within_max_length_trl": len(tokens.kept),
            "eval_fraction": args.eval_fraction,
            "backbone": backbone.name,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_length": args.max_length,
            "seed": args.seed,
            "threads": args.threads,
            "order": args.order,
            "trl_shipped_defaults": args.trl_shipped_defaults,
        },
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": _version("trl"),
            "datasets": _version("datasets"),
        },
        "peak_gflops": {"start": peaks[0], "end": peaks[1]},
        "trainers": rows,
        "paired": {"our_eval": paired_our_eval, "trl_tokenization": paired_trl_tok},
        "targets": {
            "accuracy_at_least_trl": acc_ok,
            "throughput_ratio": speedup,
            "throughput_target": THROUGHPUT_TARGET,
            "throughput_met": speed_ok,
            "padded_tokens_per_pair_ratio_trl_over_ours": work_ratio,
        },
    }
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
