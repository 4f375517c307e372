"""Hot swap under load: time from promotion to the first response from the new version, and
request latency during a swap against steady state, measured in one run.

The reward service (``plaudit serve reward``, its own process) serves a real all-MiniLM-L6-v2
reward model while ``--clients`` threads score real HH-RLHF items continuously. The run then:

1. measures steady-state latency for ``--steady-s`` seconds;
2. promotes a second version and lets the poll find it (``--poll-interval-s``);
3. promotes the first version again with ``plaudit registry promote --notify`` (the admin RPC);

and reports, for each swap, the time from the promotion to the first response that names the new
version, and p50/p99 latency of requests sent from the promotion until 2 s after that first
response, beside the steady-state numbers. Any failed request fails the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
import numpy as np

from plaudit.cli import main as plaudit
from plaudit.demo import HH_PAIRS
from plaudit.services.common.preference_files import read_pairs
from plaudit.services.common.process import start_service
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.client import wait_until_serving
from plaudit.trainer.export import ExportConfig, export_reward
from plaudit.v1 import reward_pb2, reward_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = HH_PAIRS


def ensure_two_versions(registry_dir: Path) -> tuple[str, str]:
    """Two MiniLM reward versions (different head seeds); the first one promoted."""
    registry = ModelRegistry(registry_dir)
    versions = [m.version for m in registry.list_versions()]
    while len(versions) < 2:
        print(f"exporting MiniLM version {len(versions) + 1} into {registry_dir} ...", flush=True)
        manifest = export_reward(ExportConfig(checkpoint="minilm", seed=len(versions)), registry)
        versions.append(manifest.version)
    first, second = versions[-2], versions[-1]
    registry.promote(first, reason="bench_hotswap: start")
    return first, second


class Load:
    """Client threads scoring continuously; every response is recorded with its timestamps."""

    def __init__(self, address: str, clients: int, items: list[reward_pb2.ScoreItem]) -> None:
        self.address = address
        self.items = items
        self.records: list[tuple[float, float, str]] = []  # (sent, received, version)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def _run(self, index: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            n = index
            while not self._stop.is_set():
                request = reward_pb2.ScoreRequest(
                    items=[self.items[(n + k) % len(self.items)] for k in range(4)]
                )
                n += 4
                sent = time.monotonic()
                try:
                    reply = stub.Score(request, timeout=60)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                with self._lock:
                    self.records.append((sent, time.monotonic(), reply.model_version))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def first_response_of(self, version: str, after: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                hits = [r for s, r, v in self.records if v == version and s >= after]
            if hits:
                return min(hits)
            time.sleep(0.01)
        raise SystemExit(f"no response from {version} within {timeout:.0f}s of its promotion")

    def latencies(self, start: float, end: float) -> np.ndarray:
        with self._lock:
            return np.array([(r - s) * 1000 for s, r, _ in self.records if start <= s < end])


def stats(ms: np.ndarray) -> dict[str, float]:
    return {
        "requests": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", type=Path, default=REPO / "bench" / "results" / "swap-reg")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--poll-interval-s", type=float, default=1.0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    first, second = ensure_two_versions(args.registry)
    pairs = list(read_pairs(args.data, 200))
    items = [reward_pb2.ScoreItem(prompt=p.prompt, completion=p.chosen) for p in pairs]
    server = start_service(
        "reward", "--registry", str(args.registry), "--poll-interval-s", str(args.poll_interval_s)
    )
    results: dict[str, Any] = {"clients": args.clients, "poll_interval_s": args.poll_interval_s}
    try:
        wait_until_serving(server.address, timeout=300)
        with Load(server.address, args.clients, items) as load:
            time.sleep(2.0)  # warm-up
            steady_start = time.monotonic()
            time.sleep(args.steady_s)
            results["steady"] = stats(load.latencies(steady_start, time.monotonic()))
            swaps = [
                ("poll", second, ["registry", "promote", second]),
                ("notify", first, ["registry", "promote", first, "--notify", server.address]),
            ]
            for how, version, command in swaps:
                promoted_at = time.monotonic()
                quiet = ["--registry", str(args.registry), "--log-level", "WARNING"]
                assert plaudit([*command, *quiet]) == 0
                first_seen = load.first_response_of(version, promoted_at, timeout=300)
                time.sleep(2.0)
                window = load.latencies(promoted_at, first_seen + 2.0)
                results[f"swap_{how}"] = {
                    "version": version,
                    "promote_to_first_response_s": round(first_seen - promoted_at, 3),
                    **stats(window),
                }
                time.sleep(2.0)
            if load.errors:
                raise SystemExit(f"{len(load.errors)} failed requests, e.g. {load.errors[:3]}")
            results["requests_total"] = len(load.records)
    finally:
        server.stop()

    steady = results["steady"]
    print(f"\n{args.clients} clients x 4 real HH items per request, MiniLM fp32 on CPU")
    print(f"{'phase':<34}{'promote->first s':>17}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'steady state':<34}{'-':>17}{steady['requests']:>10}"
          f"{steady['p50_ms']:>9.1f}{steady['p99_ms']:>9.1f}")  # fmt: skip
    for how, label in (("poll", f"swap by poll ({args.poll_interval_s:g} s)"),
                       ("notify", "swap by promote --notify")):  # fmt: skip
        r = results[f"swap_{how}"]
        print(f"{label:<34}{r['promote_to_first_response_s']:>17.2f}{r['requests']:>10}"
              f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}")  # fmt: skip
    print(f"failed requests: 0 of {results['requests_total']}")
    out = args.json_out or REPO / "bench" / "results" / (
        f"bench_hotswap-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
