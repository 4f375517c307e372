"""The closed loop, end to end on CPU: does training a policy against our reward model make it
better, as judged by a reward model it was not trained against?

One run:

1. holds out ``--eval-prompts`` prompts of the HH-RLHF harmless pairs (chosen by a salted
   prompt hash, independent of the trainer's own hash split) and trains on the rest only;
2. trains two reward models (judges) with :func:`~plaudit.trainer.reward.train_reward`'s default
   recipe, exports them to scratch registries and loads them as served
   (:class:`~plaudit.services.runtime.reward_model.LoadedRewardModel`): judge 1 on the training
   pairs with seed ``--seed``; judge 2 on a bootstrap resample of them with seed ``--seed + 1``
   (the reward config has no split salt, so its internal validation prompts are judge 1's,
   minus those the resample left out). Each is scored on the held-out prompts' pairs;
3. trains SmolLM2-135M-Instruct with each of ``--methods`` through
   :func:`~plaudit.trainer.policy.train_policy` on the first ``--policy-pairs`` training pairs
   (and their prompts), judge 1 as the in-process scorer (no gRPC), timing the call (model
   load, sampling, scoring, fine-tuning, checkpoint save);
4. samples one completion per held-out prompt from each trained policy and from the base policy
   (the same seed and sampling settings; the base samples are drawn once), and reports per
   method the win rate over the base (a tie counts one half) and the length-controlled win rate
   under both judges, KL(trained || base) estimated on the trained policy's samples (sequence
   log-prob sums at the sampling temperature, as ``evaluate_policy``), mean completion tokens,
   and win rate per minute of training (wall minutes on ``--threads`` cores).

A trained policy that beats the base under judge 1 but not under judge 2 has learned judge 1's
quirks (reward hacking), not what the preference data asks for. The target is a judge-1 win
rate of at least 0.60. ``--quick`` runs tiny budgets end to end in a few minutes (a smoke test:
its numbers mean nothing). Results go to ``bench/results/bench_loop-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: helpers as bench.*
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from tqdm import tqdm

from bench.bench_trainer import cpu_flags, cpu_name, git_commit, sgemm_gflops
from plaudit.demo import HH_PAIRS
from plaudit.services.common.preference_files import PreferencePair, parse_pair
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.config import RewardTrainingConfig
from plaudit.trainer.distributed import available_cores
from plaudit.trainer.objective import preference_accuracy
from plaudit.trainer.policy import load_policy_model, train_policy
from plaudit.trainer.policy_config import CONFIGS, PolicyConfig
from plaudit.trainer.policy_data import PolicyTokenizer, TokenRow
from plaudit.trainer.policy_objective import length_controlled_win_rate, win_rate
from plaudit.trainer.policy_sampling import (
    SamplingParams,
    completion_logprobs,
    generate_rows,
    seeded,
)
from plaudit.trainer.reward import PairSource, train_reward

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGET_WIN_RATE = 0.60
EVAL_SALT = b"plaudit-bench-loop/"  # held-out prompts: independent of the trainer's hash split
CPU = torch.device("cpu")


# -- data ----------------------------------------------------------------------------------------
@dataclass
class Split:
    """The shipped pairs split by prompt: JSONL lines to train on, held-out prompts and pairs."""

    train_lines: list[str]
    eval_prompts: list[str]
    eval_pairs: list[PreferencePair]


def eval_bucket(prompt: str) -> float:
    """A salted prompt hash in [0, 1): the held-out prompts are the lowest ones."""
    digest = hashlib.sha256(EVAL_SALT + prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_data(path: Path, eval_prompts: int, train_pairs: int | None) -> Split:
    """Hold out the ``eval_prompts`` lowest-bucket prompts (all their pairs); keep the first
    ``train_pairs`` of the other lines (default all) for training."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [parse_pair(json.loads(line)) for line in lines]
    prompts = sorted(dict.fromkeys(p.prompt for p in pairs), key=eval_bucket)
    held = set(prompts[:eval_prompts])
    train = [line for line, p in zip(lines, pairs, strict=True) if p.prompt not in held]
    return Split(
        train_lines=train[:train_pairs],
        eval_prompts=prompts[:eval_prompts],
        eval_pairs=[p for p in pairs if p.prompt in held],
    )


def write_jsonl(lines: Sequence[str], path: Path) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- judges --------------------------------------------------------------------------------------
@dataclass
class Judge:
    """A trained reward model as served; called as a :class:`Scorer` (standardised rewards)."""

    name: str
    model: LoadedRewardModel
    seed: int
    train_pairs: int
    unique_pairs: int
    train_s: float
    accuracy: float = float("nan")  # on the held-out prompts' pairs

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        raw, _, _ = self.model.score_raw(prompts, completions)
        return self.model.standardize(raw).astype(np.float64)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.model.version,
            "seed": self.seed,
            "train_pairs": self.train_pairs,
            "distinct_pairs": self.unique_pairs,
            "train_s": self.train_s,
            "heldout_accuracy": self.accuracy,
        }

    def score_pairs(self, pairs: Sequence[PreferencePair]) -> float:
        """Held-out pair accuracy: chosen scored above rejected (a tie counts one half)."""
        prompts = [p.prompt for p in pairs]
        chosen = self(prompts, [p.chosen for p in pairs])
        rejected = self(prompts, [p.rejected for p in pairs])
        return preference_accuracy(chosen, rejected)


def train_judge(
    name: str, lines: Sequence[str], seed: int, cfg: RewardTrainingConfig, work: Path
) -> Judge:
    """Train a reward model on ``lines``, export it to a scratch registry and load it as served."""
    data = write_jsonl(lines, work / f"{name}-pairs.jsonl")
    registry = ModelRegistry(work / f"{name}-registry", "reward")
    start = time.perf_counter()
    result = train_reward(
        cfg, PairSource(files=(data,)), registry, output_dir=work / f"{name}-run", progress=True
    )
    train_s = time.perf_counter() - start
    assert result is not None and result.manifest is not None  # one process, a registry given
    model = LoadedRewardModel.load(registry, result.manifest.version, provider="cpu")
    return Judge(name, model, seed, len(lines), len(set(lines)), train_s)


# -- policies ------------------------------------------------------------------------------------
def policy_config(method: str, args: argparse.Namespace) -> PolicyConfig:
    """The method's config: its defaults, the budget flags, no held-out sampling of its own."""
    shared: dict[str, Any] = {
        "base": args.base,
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "lora_r": args.lora_r,
        "lora_alpha": 2 * args.lora_r if args.lora_r else 16,
        "eval_prompts": 0,  # this benchmark evaluates, on its own held-out prompts
        "seed": args.seed,
        "device": "cpu",
        "num_threads": args.threads,
    }
    own: dict[str, Any] = {
        "dpo": {"max_steps": args.steps},
        "rejection-sampling": {
            "num_candidates": args.num_candidates,
            "max_new_tokens": args.max_new_tokens,
            "max_prompts": args.max_prompts,
            "rounds": args.rounds,
        },
        "rl": {
            "steps": args.steps,
            "max_new_tokens": args.max_new_tokens,
            "rloo_k": max(2, args.num_candidates),
        },
        "grpo": {
            "steps": args.steps,
            "max_new_tokens": args.max_new_tokens,
            "group_size": max(2, args.num_candidates),
        },
        "ppo": {"steps": args.steps, "max_new_tokens": args.max_new_tokens},
    }[method]
    if args.budget_s:  # the same training time for every method: it, not a count, stops them
        shared["max_train_seconds"] = args.budget_s
        # warm-up and decay follow the step count, which the budget never reaches: no warm-up
        # (10% of 100,000 steps would keep the rate near 0 for the whole budget)
        shared["warmup_ratio"] = 0.0
        own |= {"dpo": {"max_steps": None, "epochs": 1000}, "rejection-sampling": {
            "rounds": 100_000, "max_prompts": min(args.max_prompts, 8)}}.get(
                method, {"steps": 100_000})  # fmt: skip
    rate = args.method_lr.get(method, args.learning_rate)
    if rate is not None:
        key = "sft_learning_rate" if method == "rejection-sampling" else "learning_rate"
        own[key] = rate
    return CONFIGS[method](**shared, **own)


@dataclass
class Samples:
    """One completion per held-out prompt: token rows, texts, and each judge's rewards."""

    rows: list[TokenRow]
    texts: list[str]
    rewards: dict[str, np.ndarray]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(r.completion) for r in self.rows], dtype=np.float64)

    def numbers(self) -> dict[str, list[float]]:
        """Per prompt: completion tokens and each judge's reward (for the JSON)."""
        return {"tokens": self.lengths.tolist(), **{k: v.tolist() for k, v in self.rewards.items()}}


def sample(
    model: Any,
    tokens: PolicyTokenizer,
    prompts: Sequence[str],
    params: SamplingParams,
    judges: Sequence[Judge],
    seed: int,
    desc: str,
) -> Samples:
    """Seeded samples of ``model`` on ``prompts``, scored by every judge."""
    with seeded(seed, CPU):
        rows = generate_rows(model, tokens, prompts, params, CPU, desc=desc)
    texts = [tokens.decode(r.completion) for r in rows]
    return Samples(rows, texts, {j.name: j(prompts, texts) for j in judges})


def compare(
    trained: Any, base: Any, candidate: Samples, baseline: Samples, pad_id: int, t: float
) -> dict[str, float]:
    """Win rates (plain and length-controlled) per judge, KL(trained || base), mean tokens."""
    out: dict[str, float] = {}
    for name, rewards in candidate.rewards.items():
        out[f"win_rate_{name}"] = win_rate(rewards, baseline.rewards[name])
        out[f"lc_win_rate_{name}"] = length_controlled_win_rate(
            rewards, baseline.rewards[name], candidate.lengths, baseline.lengths
        )
    logp = completion_logprobs(trained, candidate.rows, pad_id, CPU, temperature=t)
    base_logp = completion_logprobs(base, candidate.rows, pad_id, CPU, temperature=t)
    out["kl_to_base"] = float(np.mean(logp - base_logp))
    out["tokens_candidate"] = float(candidate.lengths.mean())
    out["tokens_base"] = float(baseline.lengths.mean())
    return out


# -- report --------------------------------------------------------------------------------------
def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per method, ready for docs/benchmarks.md."""
    header = (
        "| method | train s | training s | train CPU min | steps | win J1 | LC win J1 | win J2 "
        "| LC win J2 | KL "
        f"| tokens cand/base | (win - 0.5) per CPU min | J1 win >= {TARGET_WIN_RATE:.2f} |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['train_s']:.0f} | {r['training_s']:.0f} "
            f"| {r['train_cpu_min']:.1f} | {r['steps']:.0f} "
            f"| {r['win_rate_judge1']:.3f} "
            f"| {r['lc_win_rate_judge1']:.3f} | {r['win_rate_judge2']:.3f} "
            f"| {r['lc_win_rate_judge2']:.3f} | {r['kl_to_base']:.3f} "
            f"| {r['tokens_candidate']:.1f} / {r['tokens_base']:.1f} "
            f"| {r['win_gain_per_cpu_min']:+.4f} | {'yes' if r['target_met'] else 'no'} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=HH_PAIRS, help="HH or TRL pairs JSONL")
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts")
    parser.add_argument("--train-pairs", type=int, default=None, help="first N others (all)")
    parser.add_argument("--methods", default="rejection-sampling", help="comma list of methods")
    parser.add_argument("--base", default="smollm2", help="policy backbone")
    parser.add_argument("--policy-pairs", type=int, default=240, help="pairs the policy sees")
    parser.add_argument("--max-prompts", type=int, default=200, help="rejection-sampling prompts")
    parser.add_argument("--num-candidates", type=int, default=4, help="best-of-n / RLOO k")
    parser.add_argument("--rounds", type=int, default=1, help="rejection-sampling rounds")
    parser.add_argument("--steps", type=int, default=50, help="DPO max steps / RL steps")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="training samples")
    parser.add_argument("--learning-rate", type=float, default=None, help="(method default)")
    parser.add_argument(
        "--method-lr",
        default="",
        help="per-method rates over --learning-rate, e.g. dpo=5e-5,rl=2e-5 (rejection "
        "sampling: its fine-tuning rate)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="training seconds per method (--max-train-seconds): every method gets the same "
        "time and runs until it is spent (rejection sampling: rounds of 8 prompts); 0: counts",
    )
    parser.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--rm-max-steps", type=int, default=None, help="(reward default: epochs)")
    parser.add_argument("--eval-max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch threads")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_pairs, args.eval_prompts, args.rm_max_steps, args.policy_pairs = 40, 8, 2, 40
        args.max_prompts, args.num_candidates, args.steps = 4, 2, 2
        args.max_new_tokens = args.eval_max_new_tokens = 8
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.method_lr = {
            name.strip(): float(rate)
            for name, _, rate in (item.partition("=") for item in args.method_lr.split(","))
            if name.strip()
        }
    except ValueError:
        parser.error(f"--method-lr: expected method=rate,..., got {args.method_lr!r}")
    unknown = [m for m in args.methods if m not in CONFIGS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(CONFIGS)}")
    return args


def train_judges(split: Split, args: argparse.Namespace, work: Path) -> list[Judge]:
    """Judge 1 on the training pairs (seed ``--seed``); judge 2 on a bootstrap resample of them
    (seed ``--seed + 1``); both with the reward config's defaults, scored on held-out pairs."""
    rng = np.random.default_rng(args.seed + 1)
    n = len(split.train_lines)
    resample = [split.train_lines[i] for i in rng.integers(0, n, n)]
    judges = []
    for name, seed, lines in (
        ("judge1", args.seed, split.train_lines),
        ("judge2", args.seed + 1, resample),
    ):
        print(f"training {name} (seed {seed}, {len(set(lines))} distinct pairs) ...", flush=True)
        cfg = RewardTrainingConfig(seed=seed, max_steps=args.rm_max_steps)
        judges.append(train_judge(name, lines, seed, cfg, work))
        judges[-1].accuracy = judges[-1].score_pairs(split.eval_pairs)
        print(f"  {name}: held-out accuracy {judges[-1].accuracy:.3f}", flush=True)
    return judges


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    peaks, flags = [sgemm_gflops(args.threads)], cpu_flags()
    print(f"CPU {cpu_name()} ({' '.join(flags)}), {args.threads} threads", flush=True)
    split = split_data(args.data, args.eval_prompts, args.train_pairs)
    print(
        f"{len(split.train_lines)} training pairs; {len(split.eval_prompts)} held-out prompts "
        f"({len(split.eval_pairs)} pairs)",
        flush=True,
    )
    params = SamplingParams(args.eval_temperature, 1.0, args.eval_max_new_tokens)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="plaudit-bench-loop-") as tmp:
        work = Path(tmp)
        judges = train_judges(split, args, work)
        base, tokenizer, _ = load_policy_model(args.base)
        tokens = PolicyTokenizer(tokenizer, base, args.max_length, args.max_prompt_length)
        baseline = sample(base, tokens, split.eval_prompts, params, judges, args.seed, "base")
        # the policy methods see the first --policy-pairs training pairs (DPO computes reference
        # log-probs for every pair it is given, however few --steps it takes)
        source = PairSource(
            files=(write_jsonl(split.train_lines[: args.policy_pairs], work / "policy.jsonl"),)
        )
        for method in tqdm(args.methods, desc="methods", unit="method"):
            cfg = policy_config(method, args)
            start, cpu_start = time.perf_counter(), time.process_time()
            result = train_policy(
                cfg, source, None, output_dir=work / method, progress=True, scorer=judges[0]
            )
            train_s = time.perf_counter() - start
            train_cpu_min = (time.process_time() - cpu_start) / 60  # all threads: CPU minutes
            assert result.model is not None
            samples = sample(
                result.model, tokens, split.eval_prompts, params, judges, args.seed, method
            )
            numbers = compare(
                result.model, base, samples, baseline, tokens.pad_id, params.temperature
            )
            win = numbers["win_rate_judge1"]
            rows.append(
                {
                    "method": method,
                    "train_s": train_s,
                    **numbers,
                    "train_cpu_min": train_cpu_min,
                    "training_s": result.metrics.get("train/seconds", float("nan")),
                    "steps": result.metrics.get("train/steps", float("nan")),
                    "win_rate_per_train_min": win / (train_s / 60),
                    "win_gain_per_train_min": (win - 0.5) / (train_s / 60),
                    "win_gain_per_cpu_min": (win - 0.5) / train_cpu_min,
                    "target_met": win >= TARGET_WIN_RATE,
                    "train_items": result.train_items,
                    "train_metrics": result.metrics,
                    "config": cfg.to_dict(),
                    "samples": samples.numbers(),
                }
            )
            del result, samples
    peaks.append(sgemm_gflops(args.threads))

    table = markdown_table(rows)
    j1, j2 = judges
    print(
        f"\nCPU {cpu_name()}; flags {' '.join(flags) or '-'}; {args.threads} threads; fp32 sgemm "
        f"start/end {peaks[0]:.1f}/{peaks[1]:.1f} GFLOP/s\nheld out: {len(split.eval_prompts)} "
        f"prompts ({len(split.eval_pairs)} pairs); judge accuracy on them: judge 1 "
        f"{j1.accuracy:.3f} ({j1.train_pairs} pairs, seed {j1.seed}), judge 2 {j2.accuracy:.3f} "
        f"(bootstrap: {j2.unique_pairs} distinct pairs, seed {j2.seed})\n\n{table}"
    )
    record = {
        "bench": "bench_loop",
        "created_at": datetime.now(UTC).isoformat(),
        "git": git_commit(),
        "argv": sys.argv[1:],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpu": cpu_name(),
            "flags": flags,
            "threads": args.threads,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "peak_gflops": {"start": peaks[0], "end": peaks[1]},
        "data": {
            "file": str(args.data),
            "train_pairs": len(split.train_lines),
            "policy_pairs": min(args.policy_pairs, len(split.train_lines)),
            "eval_prompts": len(split.eval_prompts),
            "eval_pairs": len(split.eval_pairs),
        },
        "judges": [j.summary() for j in judges],
        "eval_sampling": {**vars(params), "seed": args.seed},
        "base_samples": baseline.numbers(),
        "methods": rows,
        "table_markdown": table,
        "wall_s": time.perf_counter() - started,
    }
    out = args.out or RESULTS / f"bench_loop-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
