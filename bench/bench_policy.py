"""Policy training on the real SmolLM2-135M-Instruct, on CPU: DPO on shipped HH-RLHF pairs, judged
by a served reward model (issue #6 part B).

One run:

1. exports a reward model into a scratch registry (``--reward-checkpoint``, default all-MiniLM-L6-v2
   with a fresh scalar head, as ``plaudit export reward`` does; give a trained reward checkpoint
   for meaningful win rates) and serves it with ``plaudit serve reward`` in a child process;
2. trains SmolLM2 with :func:`~plaudit.trainer.policy.train_policy` (``--method dpo``, LoRA by
   default)
   on the first ``--pairs`` pairs of ``--data``, holding out ``--eval-fraction`` of the prompts by
   hash (no registry: nothing is exported);
3. reports, before and after training: held-out implicit-reward accuracy and DPO loss (before:
   measured on the untrained policy, which is its own reference), the mean reward of one sample
   per held-out prompt under the served reward model, the win rate of the trained policy over the
   base (both sampled with the same seed; before training the two are the same model, so the
   samples are identical and the win rate is exactly 1/2), and KL(policy || base) estimated on
   the policy's samples (0 before training).

Results go to ``bench/results/bench_policy-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from plaudit.demo import HH_PAIRS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = HH_PAIRS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH or TRL pairs JSONL")
    parser.add_argument("--pairs", type=int, default=64, help="first N pairs of --data")
    parser.add_argument("--base", default="smollm2", help="policy backbone")
    parser.add_argument("--reward-checkpoint", default="minilm", help="reward model to serve")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lora-r", type=int, default=16, help="0: full fine-tuning")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--eval-max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    import torch

    from plaudit.services.common.process import start_service
    from plaudit.services.common.registry import ModelRegistry
    from plaudit.services.reward.client import wait_until_serving
    from plaudit.trainer.export import ExportConfig, export_reward
    from plaudit.trainer.policy import train_policy
    from plaudit.trainer.policy_config import DPOConfig
    from plaudit.trainer.reward import PairSource

    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        scratch = Path(tmp)
        lines = [line for line in args.data.read_text().splitlines() if line.strip()]
        data = scratch / "pairs.jsonl"
        data.write_text("\n".join(lines[: args.pairs]) + "\n")
        t0 = time.perf_counter()
        reward = export_reward(
            ExportConfig(checkpoint=args.reward_checkpoint, max_length=512),
            ModelRegistry(scratch / "registry", "reward"),
            promote=True,
        )
        export_s = time.perf_counter() - t0
        service = start_service("reward", "--registry", str(scratch / "registry"))
        try:
            wait_until_serving(service.address, 120)
            cfg = DPOConfig(
                base=args.base,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                beta=args.beta,
                epochs=args.epochs,
                lora_r=args.lora_r,
                lora_alpha=2 * args.lora_r if args.lora_r else 16,
                eval_fraction=args.eval_fraction,
                eval_prompts=args.eval_prompts,
                eval_max_new_tokens=args.eval_max_new_tokens,
                reward_addr=service.address,
                seed=args.seed,
            )
            result = train_policy(
                cfg, PairSource(files=(data,)), output_dir=scratch / "run", progress=True
            )
        finally:
            service.stop()
    m = result.metrics
    record = {
        "bench": "bench_policy",
        "at": datetime.now(UTC).isoformat(),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "config": cfg.to_dict(),
        "data": {"file": str(args.data), "pairs": args.pairs, "train_pairs": result.train_items},
        "reward_model": {"checkpoint": args.reward_checkpoint, "version": reward.version},
        "before": {
            "heldout_implicit_accuracy": m.get("eval/initial_accuracy"),
            "heldout_dpo_loss": m.get("eval/initial_loss"),
            "mean_reward": m.get("eval/baseline_reward"),  # the base model's samples
            "win_rate_vs_base": 0.5,  # the same model and seed: identical samples
            "kl_to_base": 0.0,
        },
        "after": {
            "heldout_implicit_accuracy": m.get("eval/accuracy"),
            "heldout_dpo_loss": m.get("eval/loss"),
            "heldout_reward_margin": m.get("eval/rewards/margins"),
            "mean_reward": m.get("eval/reward"),
            "win_rate_vs_base": m.get("eval/win_rate"),
            "kl_to_base": m.get("eval/kl"),
        },
        "eval_prompts": result.eval_prompts,
        "train": {
            "steps": m.get("train/steps"),
            "loss": m.get("train/loss"),
            "pairs_per_s": m.get("train/pairs_per_s"),
            "train_policy_wall_s": m.get("train/wall_s"),  # load, train, evaluate, save
        },
        "reward_export_s": export_s,
        "wall_s": time.perf_counter() - started,
    }
    out = args.out or RESULTS / f"bench_policy-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("before", "after", "train", "wall_s")}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
