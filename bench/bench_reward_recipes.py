"""Reward-model recipes compared on held-out HH pairs (issue 20, item 1): accuracy with confidence
intervals and CPU minutes, to choose the default ``plaudit train reward`` recipe by measurement.

Each recipe is a set of :class:`~plaudit.trainer.config.RewardTrainingConfig` overrides, trained
with :func:`~plaudit.trainer.reward.train_reward` (exactly what ``plaudit train reward`` runs) on
the shipped HH-RLHF harmless pairs, once per ``--seeds`` seed (head initialisation, shuffles,
batches). The held-out split is the trainer's: by prompt hash (``eval_fraction`` of the prompts,
the same pairs for every recipe and seed), so no held-out prompt is ever trained on. Reported per
recipe: held-out accuracy of each seed (the weights the trainer keeps), their mean with a 95%
t-interval over seeds, the 95% binomial half-width of one run on this many held-out pairs, and
CPU minutes per run (user + system time of this process, all torch threads: the cost on any
machine with these cores, however busy), with the CPU's flags.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_reward_recipes.py --recipes minilm,minilm-2ep \\
        --seeds 0,1,2

Recipes (``--recipes``, comma-separated names of :data:`RECIPES`): MiniLM (all-MiniLM-L6-v2,
22M) at the default rate, at twice it, for two and three epochs, with label smoothing 0.1, as a
5-head bootstrap ensemble (accuracy of the heads' mean); SmolLM2-135M
initialised from the policy's own language model with a regression head (the pipeline's
description). ``--mixed-precision bf16`` (default where the CPU has avx512_bf16 or AMX: measured
1.81x faster at the same held-out accuracy, docs/benchmarks.md) applies to all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: helpers as bench.*

import numpy as np

from bench.bench_trainer import cpu_flags, cpu_name
from plaudit.demo import HH_PAIRS
from plaudit.services.common.preference_files import parse_record
from plaudit.trainer.config import RewardTrainingConfig
from plaudit.trainer.objective import prompt_bucket
from plaudit.trainer.reward import PairSource, train_reward

RECIPES: dict[str, dict[str, Any]] = {
    "minilm": {"backbone": "minilm"},
    "minilm-lr1e-4": {"backbone": "minilm", "learning_rate": 1e-4},
    "minilm-2ep": {"backbone": "minilm", "epochs": 2},
    "minilm-3ep": {"backbone": "minilm", "epochs": 3},
    "minilm-ls0.1": {"backbone": "minilm", "label_smoothing": 0.1},
    "minilm-ens5": {"backbone": "minilm", "ensemble_heads": 5},
    "smollm2": {"backbone": "smollm2", "learning_rate": 1e-5, "batch_size": 8},
    "smollm2-lr3e-5": {"backbone": "smollm2", "learning_rate": 3e-5, "batch_size": 8},
}

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_recipe(name: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    overrides = {**RECIPES[name], "seed": seed, "device": "cpu", "num_threads": args.threads}
    cfg = RewardTrainingConfig(
        max_length=args.max_length, mixed_precision=args.mixed_precision, **overrides
    )
    start = cpu_seconds()
    result = train_reward(
        cfg, PairSource(files=(args.data,)), None, output_dir=work / f"{name}-{seed}"
    )
    assert result is not None
    return {
        "recipe": name,
        "seed": seed,
        "accuracy": result.metrics["eval/accuracy"],
        "eval_pairs": result.eval_pairs,
        "train_pairs": result.train_pairs,
        "cpu_min": (cpu_seconds() - start) / 60,
    }


def training_subset(data: Path, size: int, work: Path) -> Path:
    """``data`` with every held-out line (the trainer's split, by prompt) and ``size`` of the
    training lines, a random subset fixed by ``size`` alone: a learning curve's held-out pairs
    are the same at every size."""
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    cut = RewardTrainingConfig().eval_fraction
    held = [line for line in lines if prompt_bucket(parse_record(json.loads(line)).prompt) < cut]
    held_out = set(held)
    train = [line for line in lines if line not in held_out]
    if size > len(train):
        raise SystemExit(f"--train-pairs {size}: there are only {len(train)} training pairs")
    keep = np.random.default_rng(size).choice(len(train), size, replace=False)
    out = work / f"pairs-{size}.jsonl"
    out.write_text("\n".join(held + [train[i] for i in sorted(keep)]) + "\n", encoding="utf-8")
    return out


def t_interval(values: np.ndarray) -> float:
    """Half-width of the 95% t-interval of the mean of ``values`` (nan for fewer than 2)."""
    if len(values) < 2:
        return math.nan
    return T95.get(len(values) - 1, 1.96) * float(values.std(ddof=1)) / math.sqrt(len(values))


def summarise(
    runs: list[dict[str, Any]], reference: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One recipe's row (its runs share a recipe and a training-set size). With ``reference``
    runs (the default recipe, same size), also the paired difference over the seeds both ran:
    a seed fixes the head, the shuffles and the batches, so pairing removes the seed's share of
    the spread (some seeds are harder for every recipe)."""
    acc = np.array([r["accuracy"] for r in runs])
    n = runs[0]["eval_pairs"]
    spread = t_interval(acc)
    binomial = 1.96 * math.sqrt(acc.mean() * (1 - acc.mean()) / n)
    row = {
        "recipe": runs[0]["recipe"],
        "seeds": len(acc),
        "accuracy per seed": " ".join(f"{a:.3f}" for a in acc),
        "mean": round(float(acc.mean()), 3),
        "95% CI over seeds": f"±{spread:.3f}" if math.isfinite(spread) else "-",
        "95% CI one run (binomial)": f"±{binomial:.3f}",
        "vs default, paired (seeds)": "-",
        "train pairs": runs[0]["train_pairs"],
        "held-out pairs": n,
        "CPU min per run": round(float(np.mean([r["cpu_min"] for r in runs])), 1),
    }
    if reference is not None and reference is not runs:
        base = {r["seed"]: r["accuracy"] for r in reference}
        diff = np.array([r["accuracy"] - base[r["seed"]] for r in runs if r["seed"] in base])
        if len(diff):
            half = t_interval(diff)
            ci = f" ±{half:.3f}" if math.isfinite(half) else ""
            row["vs default, paired (seeds)"] = f"{diff.mean():+.3f}{ci} ({len(diff)})"
    return row


def table(runs: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """A row per (recipe, training-set size), in first-seen order, each compared with the
    ``reference`` recipe's runs at the same size."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["recipe"], run["train_pairs"]), []).append(run)
    return [summarise(mine, groups.get((reference, size))) for (_, size), mine in groups.items()]


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    flags = cpu_flags()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipes", default="minilm,minilm-2ep")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", type=Path, default=HH_PAIRS)
    parser.add_argument("--pairs", type=int, default=None, help="first N records (default all)")
    parser.add_argument(
        "--train-pairs",
        default="",
        help="comma-separated training-set sizes (a learning curve): each recipe and seed is "
        "trained on that many of the training pairs (a fixed random subset) instead of all, "
        "held out on the same pairs; '' = all",
    )
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--mixed-precision",
        choices=["auto", "bf16", "fp32"],
        default="bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "auto",
    )
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="*",
        default=None,
        help="no training: the table of the runs these --json-out files hold, together",
    )
    parser.add_argument("--reference", default="minilm", help="the recipe rows are paired with")
    args = parser.parse_args()
    if args.from_json:
        runs = [run for path in args.from_json for run in json.loads(path.read_text())["runs"]]
        print(markdown(table(runs, args.reference)))
        return 0
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"CPU {cpu_name()} ({', '.join(flags)}), {args.threads} threads, {args.mixed_precision}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="plaudit-recipes-") as tmp:
        if args.pairs is not None:
            lines = args.data.read_text(encoding="utf-8").splitlines()[: args.pairs]
            args.data = Path(tmp) / "pairs.jsonl"
            args.data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        full = args.data
        for size in [int(n) for n in args.train_pairs.split(",") if n] or [0]:
            args.data = training_subset(full, size, Path(tmp)) if size else full
            for name in args.recipes.split(","):
                for seed in seeds:
                    runs.append(run_recipe(name, seed, args, Path(tmp)))
                    print(json.dumps(runs[-1]), flush=True)
    rows = table(runs, args.reference)
    print(markdown(rows))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"flags": flags, "runs": runs, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
