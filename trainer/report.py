"""A training run's reports: per-step JSON lines, final metrics.json and a loss/accuracy plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: write null instead."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


class RunReporter:
    """Writes the run's reports into ``out_dir``; does nothing when ``enabled`` is False (the
    ranks other than 0)."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.out_dir = out_dir
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / LOG_FILE).write_text("")

    def log(self, record: dict[str, Any]) -> None:
        """Append one step's numbers (``{"step": n, "train/loss": ...}``) to the JSONL log."""
        if not self.enabled:
            return
        self.records.append(record)
        with (self.out_dir / LOG_FILE).open("a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            (self.out_dir / METRICS_FILE).write_text(json.dumps(_clean(metrics), indent=2) + "\n")

    def plot(self) -> Path | None:
        """Train and held-out loss, and held-out accuracy, over optimizer steps (PNG)."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["train/loss"]) for r in self.records if "train/loss" in r]
        evals = [r for r in self.records if "eval/accuracy" in r]
        fig, loss_ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            loss_ax.plot(*zip(*train, strict=True), label="train/loss", color="tab:blue", lw=1)
        if evals:
            steps = [r["step"] for r in evals]
            loss_ax.plot(
                steps, [r["eval/loss"] for r in evals], "o-", label="eval/loss", color="tab:orange"
            )
            acc_ax = loss_ax.twinx()
            acc_ax.plot(
                steps,
                [r["eval/accuracy"] for r in evals],
                "s--",
                label="eval/accuracy",
                color="tab:green",
            )
            acc_ax.set_ylabel("held-out accuracy")
            acc_ax.set_ylim(0, 1)
            acc_ax.legend(loc="upper right")
        loss_ax.set_xlabel("optimizer step")
        loss_ax.set_ylabel("Bradley-Terry loss")
        loss_ax.legend(loc="upper left")
        loss_ax.set_title("reward model training")
        fig.tight_layout()
        path = self.out_dir / PLOT_FILE
        fig.savefig(path)
        plt.close(fig)
        return path
