"""Does an ensemble's disagreement say where it is wrong? (issue 20, item 3)

One run:

1. trains an ensemble reward model (``--heads`` bootstrapped heads on one MiniLM backbone,
   ``plaudit train reward --ensemble-heads``'s path, :func:`~plaudit.trainer.reward.train_reward`)
   on the shipped HH-RLHF harmless pairs, holding out ``--eval-fraction`` of the prompts by hash,
   and publishes it to a scratch registry;
2. loads the published version as serving does and scores every held-out pair with every head;
3. ranks the held-out pairs by how unsure the ensemble is, with two signals, and reports the
   error rate of each fifth (quintile), most unsure first:

   * ``margin``: ``|mean_k d_k|``, the mean reward gap alone (what a single model has);
   * ``agreement``: ``|mean_k d_k| / std_k d_k`` (``d_k`` head k's gap), the signal the
     labelling queue sorts by (:func:`plaudit.services.feedback.tasks.least_agreement`).

If the ensemble's uncertainty means anything, the first quintile's error rate is far above the
last's. Also reported: held-out accuracy of the ensemble's mean against each head's own, the
Spearman correlation between each signal and being wrong, and training time. Results JSON goes
to ``bench/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: helpers as bench.*
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from bench.bench_trainer import cpu_flags, cpu_name, sgemm_gflops
from plaudit.demo import HH_PAIRS
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.shadow import spearman
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.config import RewardTrainingConfig
from plaudit.trainer.data import read_pairs
from plaudit.trainer.distributed import available_cores
from plaudit.trainer.objective import split_by_prompt
from plaudit.trainer.reward import PairSource, train_reward

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def quintiles(signal: np.ndarray, wrong: np.ndarray) -> list[dict[str, float]]:
    """Error rate per fifth of the pairs, ordered by ``signal`` ascending (most unsure first)."""
    order = np.argsort(signal, kind="stable")
    rows = []
    for i, part in enumerate(np.array_split(order, 5)):
        rows.append(
            {
                "quintile": i + 1,
                "pairs": len(part),
                "error_rate": float(wrong[part].mean()),
                "signal_max": float(signal[part].max()),
            }
        )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=HH_PAIRS)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    peaks = [sgemm_gflops(args.threads)]
    print(f"CPU {cpu_name()} ({' '.join(cpu_flags())}), {args.threads} threads; fp32 sgemm "
          f"{peaks[0]:.1f} GFLOP/s")  # fmt: skip
    cfg = RewardTrainingConfig(
        ensemble_heads=args.heads,
        epochs=args.epochs,
        max_length=args.max_length,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        num_threads=args.threads,
    )
    pairs = list(read_pairs(args.data))
    _, held_out = split_by_prompt(pairs, args.eval_fraction)
    with tempfile.TemporaryDirectory(prefix="plaudit-bench-ensemble-") as tmp:
        registry = ModelRegistry(Path(tmp) / "registry", "reward")
        start, cpu0 = time.perf_counter(), time.process_time()
        result = train_reward(
            cfg, PairSource(files=(args.data,)), registry, output_dir=Path(tmp) / "run",
            progress=True,
        )  # fmt: skip
        train_s, train_cpu_min = time.perf_counter() - start, (time.process_time() - cpu0) / 60
        assert result is not None and result.manifest is not None
        model = LoadedRewardModel.load(registry, result.manifest.version, provider="cpu")
        prompts = [p.prompt for p in held_out]
        _, chosen, _, _ = model.score_members(prompts, [p.chosen for p in held_out])
        _, rejected, _, _ = model.score_members(prompts, [p.rejected for p in held_out])
    assert chosen is not None and rejected is not None
    d = (chosen - rejected).astype(np.float64)  # (pairs, heads)
    mean, std = d.mean(axis=1), d.std(axis=1)
    wrong = (mean <= 0).astype(np.float64)  # a tie counts as wrong
    margin = np.abs(mean)
    agreement = margin / (std + 1e-6)
    head_accuracy = [float(np.mean(d[:, k] > 0)) for k in range(args.heads)]
    peaks.append(sgemm_gflops(args.threads))
    by_margin, by_agreement = quintiles(margin, wrong), quintiles(agreement, wrong)
    record = {
        "created_at": datetime.now(UTC).isoformat(),
        "cpu": cpu_name(),
        "flags": cpu_flags(),
        "sgemm_gflops": peaks,
        "args": {k: str(v) for k, v in vars(args).items()},
        "held_out_pairs": len(held_out),
        "ensemble_accuracy": float(1 - wrong.mean()),
        "head_accuracy": head_accuracy,
        "train_s": train_s,
        "train_cpu_min": train_cpu_min,
        "margin_quintiles": by_margin,
        "agreement_quintiles": by_agreement,
        "spearman_margin_vs_wrong": spearman(margin, wrong),
        "spearman_agreement_vs_wrong": spearman(agreement, wrong),
    }
    print(
        f"\n{len(held_out)} held-out pairs; ensemble of {args.heads} heads: accuracy "
        f"{record['ensemble_accuracy']:.3f}; heads alone {min(head_accuracy):.3f}-"
        f"{max(head_accuracy):.3f}; trained in {train_s:.0f} s ({train_cpu_min:.1f} CPU min)"
    )
    print("\nerror rate by quintile, most unsure first:")
    print("| quintile | pairs | error (by margin) | error (by agreement) |")
    print("|---|---|---|---|")
    for m, a in zip(by_margin, by_agreement, strict=True):
        print(f"| {m['quintile']} | {m['pairs']} | {m['error_rate']:.3f} | {a['error_rate']:.3f} |")
    print(
        f"\nSpearman with being wrong: margin {record['spearman_margin_vs_wrong']:+.3f}, "
        f"agreement {record['spearman_agreement_vs_wrong']:+.3f}; fp32 sgemm start/end "
        f"{peaks[0]:.1f}/{peaks[1]:.1f} GFLOP/s"
    )
    out = args.out or RESULTS / f"bench_ensemble-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
