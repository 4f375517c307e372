"""``plaudit demo``: what a user would do on a fresh machine, end to end.

Bootstraps a reward model into an empty registry (``plaudit export reward``), starts
``plaudit serve reward`` as a separate process, scores real HH-RLHF preference pairs through gRPC
from concurrent clients, prints what happened, and stops the server with SIGTERM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import Field
from tqdm import tqdm

from services.common.process import CLI, metric_value, start_service
from services.common.registry import ModelRegistry
from services.common.settings import PlauditSettings
from services.common.textfmt import split_hh_dialogue
from services.reward.client import RewardClient, wait_until_serving

DEFAULT_DATA = Path("../shared/data/hh-harmless/pairs.jsonl")


class DemoSettings(PlauditSettings):
    registry: Path = Field(Path(".plaudit/registry"), description="model registry directory")
    data: Path = Field(DEFAULT_DATA, description="HH-RLHF or prompt/chosen/rejected JSONL")
    pairs: int = Field(300, ge=1, description="preference pairs to score")
    concurrency: int = Field(8, ge=1, description="concurrent clients")
    checkpoint: str = Field("minilm", description="backbone to bootstrap an empty registry with")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _load_pairs(path: Path, limit: int) -> list[tuple[str, str, str]]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if "prompt" in row:
                out.append((row["prompt"], row["chosen"], row["rejected"]))
            else:
                out.append(split_hh_dialogue(row["chosen"], row["rejected"]))
            if len(out) >= limit:
                break
    return out


def run_demo(settings: DemoSettings) -> int:
    if not settings.data.is_file():
        _say(f"data file {settings.data} not found; pass --data FILE")
        return 2
    registry = ModelRegistry(settings.registry, "reward")
    if registry.promoted() is None:
        _say(
            f"[1/4] empty registry at {settings.registry}: exporting {settings.checkpoint} "
            "to ONNX (fp32 + int8 parity check; about a minute on 2 cores)..."
        )
        start = time.monotonic()
        subprocess.run(
            [
                *CLI,
                "export",
                "reward",
                "--checkpoint",
                settings.checkpoint,
                "--registry",
                str(settings.registry),
                "--quantize",
                "int8",
                "--promote",
                "--log-format",
                "text",
            ],
            check=True,
        )
        _say(f"      done in {time.monotonic() - start:.0f}s")
    else:
        _say(
            f"[1/4] registry {settings.registry} already has promoted version {registry.promoted()}"
        )

    server = start_service("reward", "--registry", str(settings.registry))
    address = server.address
    _say(f"[2/4] starting `plaudit serve reward` on {address} (metrics on :{server.metrics_port})")
    try:
        wait_until_serving(address, timeout=300)
        with RewardClient(address) as client:
            info = client.model()
            _say(
                f"      serving {info.version}: backbone {info.backbone}, {info.precision} on "
                f"{info.execution_provider}, max {info.max_length} tokens ({info.text_format})"
            )
            pairs = _load_pairs(settings.data, settings.pairs)
            _say(
                f"[3/4] scoring {len(pairs)} real preference pairs from {settings.data} "
                f"with {settings.concurrency} concurrent clients"
            )

            def one(pair: tuple[str, str, str]) -> tuple[float, float, float, str]:
                t0 = time.perf_counter()
                rewards, version = client.score([pair[0], pair[0]], [pair[1], pair[2]])
                return rewards[0], rewards[1], time.perf_counter() - t0, version

            start = time.perf_counter()
            with ThreadPoolExecutor(settings.concurrency) as pool:
                results = list(tqdm(pool.map(one, pairs), total=len(pairs), unit="pair"))
            wall = time.perf_counter() - start
            margins = np.array([c - r for c, r, _, _ in results])
            latency = np.array([t for _, _, t, _ in results]) * 1000
            versions = sorted({v for *_, v in results})
            _say(
                f"      {2 * len(pairs) / wall:.1f} items/s, latency "
                f"p50 {np.percentile(latency, 50):.0f} ms p99 {np.percentile(latency, 99):.0f} ms,"
                f" versions {versions}"
            )
            _say(
                f"      chosen scored above rejected in {np.mean(margins > 0):.1%} of pairs "
                f"(mean margin {margins.mean():+.3f}); an untrained head sits near 50% until "
                "`plaudit train reward` replaces it"
            )
            prompt, chosen, rejected = pairs[0]
            cmp = client.compare(prompt, chosen, rejected)
            _say(
                f"      Compare on pair 0: reward_a {cmp.reward_a:+.3f} "
                f"reward_b {cmp.reward_b:+.3f} P(a preferred) {cmp.prob_a_preferred:.3f}"
            )
        text = server.metrics_text()
        count = metric_value(text, "plaudit_reward_batch_size_count")
        total = metric_value(text, "plaudit_reward_batch_size_sum")
        if count:
            _say(
                f"      dynamic batching: {count:.0f} batches, {total / count:.1f} items per batch"
            )
    finally:
        _say("[4/4] stopping the server with SIGTERM (drains in-flight requests)")
        code = server.stop()
    _say(f"      server exited with code {code}")
    return 0 if code == 0 else 1
