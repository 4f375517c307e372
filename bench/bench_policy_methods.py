"""The race between the policy methods (issue 19): DPO, rejection sampling, RLOO, GRPO and PPO
from SmolLM2-135M-Instruct, each given the same training time on this machine's cores, judged on
the same held-out prompts by the reward model they trained against and by a second one trained
apart.

This is :mod:`bench.bench_loop` (read its docstring: the held-out split, the two judges, the
numbers) run with every method and one training-time budget: ``--budget-s`` seconds of
``--max-train-seconds`` each (reference passes, rollouts, scoring and updates count; model
loading, the checkpoint save and the evaluation do not), step counts set so that the budget is
what stops every method, and each method's short-budget learning rate (``RACE_LR``: the demo's
measured DPO rate; one rate for the others, which use a constant schedule). Every other
``bench_loop`` flag can be given after these and overrides them.

The rates are each method's recipe, not a sweep: a method with a better rate for this budget may
rank differently. The table's "steps" column says how much work each method fit into the budget.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: helpers as bench.*

from bench import bench_loop

METHODS = "dpo,rejection-sampling,rl,grpo,ppo"
RACE_LR = "dpo=5e-5,rejection-sampling=2e-5,rl=2e-5,grpo=2e-5,ppo=2e-5"
RACE = [
    "--methods", METHODS, "--budget-s", "240", "--method-lr", RACE_LR,
    "--eval-prompts", "100",
    "--max-length", "192", "--max-prompt-length", "128", "--max-new-tokens", "64",
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return bench_loop.main([*RACE, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
