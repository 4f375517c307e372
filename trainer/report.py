"""A training run's reports: per-step JSON lines, final metrics.json, a loss/metric plot and (reward
models) a reliability plot of the held-out preference probabilities before and after calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from plaudit.services.common.registry import Calibration

LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"
RELIABILITY_FILE = "reliability.png"


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

    def plot(
        self,
        *,
        title: str = "reward model training",
        loss_label: str = "Bradley-Terry loss",
        right_key: str = "eval/accuracy",
        right_label: str = "held-out accuracy",
        right_ylim: tuple[float, float] | None = (0, 1),
    ) -> Path | None:
        """Train and held-out loss over optimizer steps, and ``right_key`` (by default the
        held-out accuracy) on a second axis (PNG)."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["train/loss"]) for r in self.records if "train/loss" in r]
        evals = [(r["step"], r["eval/loss"]) for r in self.records if "eval/loss" in r]
        right = [(r["step"], r[right_key]) for r in self.records if r.get(right_key) is not None]
        fig, loss_ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            loss_ax.plot(*zip(*train, strict=True), label="train/loss", color="tab:blue", lw=1)
        if evals:
            loss_ax.plot(*zip(*evals, strict=True), "o-", label="eval/loss", color="tab:orange")
        if right:
            right_ax = loss_ax.twinx()
            right_ax.plot(*zip(*right, strict=True), "s--", label=right_key, color="tab:green")
            right_ax.set_ylabel(right_label)
            if right_ylim is not None:
                right_ax.set_ylim(*right_ylim)
            right_ax.legend(loc="upper right")
        loss_ax.set_xlabel("optimizer step")
        loss_ax.set_ylabel(loss_label)
        loss_ax.legend(loc="upper left")
        loss_ax.set_title(title)
        fig.tight_layout()
        path = self.out_dir / PLOT_FILE
        fig.savefig(path)
        plt.close(fig)
        return path

    def plot_reliability(self, calibration: Calibration) -> Path | None:
        """The reliability diagram of the held-out preference probabilities at temperature 1 and
        at the fitted one (observed frequency against mean predicted probability per bin, marker
        area by count), with the diagonal of perfect calibration (PNG)."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        c = calibration
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=1, label="perfect calibration")
        curves = [
            (c.reliability_before, c.ece_before, "T=1", "tab:orange", "o--"),
            (c.reliability_after, c.ece_after, f"T={c.temperature:.3g}", "tab:blue", "s-"),
        ]
        total = max(1, 2 * c.pairs)
        for bins, ece, name, color, style in curves:
            if not bins:
                continue
            x = [b.mean_predicted for b in bins]
            y = [b.observed for b in bins]
            ece_text = "n/a" if ece is None else f"{ece:.3f}"
            ax.plot(x, y, style, color=color, lw=1, ms=3, label=f"{name} (ECE {ece_text})")
            ax.scatter(x, y, s=[600 * b.count / total for b in bins], color=color, alpha=0.3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted P(first preferred)")
        ax.set_ylabel("observed frequency")
        ax.legend(loc="upper left")
        fitted = "fitted" if c.fitted else "not fitted: " + c.note
        ax.set_title(f"calibration on {c.pairs} held-out pairs ({fitted})", fontsize=9)
        fig.tight_layout()
        path = self.out_dir / RELIABILITY_FILE
        fig.savefig(path)
        plt.close(fig)
        return path
