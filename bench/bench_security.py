"""What the defences of issue 17 cost per request: the reward service with them off and on.

One run starts two ``plaudit serve reward`` processes on the same promoted model (the real
MiniLM reward model of ``bench_reward``; exported into ``--registry`` when nothing is promoted):

* ``off``  no API keys (``--auth-disabled``), plaintext, no rate limit, no in-flight limit
  (``--max-in-flight 0``).
* ``on``   API keys (one key with the ``score`` role, sent by every client), TLS (a CA and a
  server certificate made at start-up by ``tests/certs.py``), a rate limit and an in-flight
  limit set high enough never to refuse these clients (``--rate-limit-rps``,
  ``--max-in-flight``). A call without the key is checked to be refused first.

Both arms pay what is always on: each method's byte limit and the wire-format field count
(:func:`~plaudit.services.common.security.limits.count_fields`); its cost per request is timed
apart, in process, on the same requests.

``--clients`` threads (one channel each, opened before the clock starts: the TLS handshake is
not timed) send the same ``Score`` requests of ``--request-items`` items to each arm, for
``--rounds`` rounds in alternating order (off on, on off, ...) so drift on a shared machine falls
on both. Reported per arm: items/s (mean over rounds), p50/p99 latency of a request (all rounds),
wall time per request and the server process's CPU time per request (``/proc``); the cost of
the defences is on minus off. Both arms must return the same rewards. Then ``--rpc-calls``
``GetModel`` calls per arm and round (no model work: what is left is the transport, the key
check, the limits and the interceptor), alternating the same way: the per-call cost of the
defences where model work does not hide it.

    HF_HUB_OFFLINE=1 python bench/bench_security.py --pairs 300 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: helpers as bench.*
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import grpc
import numpy as np

from bench.bench_reward import RESULTS, chunks, cpu_name, ensure_model, git_commit, server_cpu_s
from plaudit.demo import HH_PAIRS
from plaudit.services.common.preference_files import read_pairs
from plaudit.services.common.process import ServiceProcess, start_service
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.common.security.client import ClientCredentials
from plaudit.services.common.security.keys import hash_key, new_api_key
from plaudit.services.common.security.limits import count_fields
from plaudit.services.reward.client import RewardClient, score_request, wait_until_serving
from plaudit.v1 import reward_pb2
from tests.certs import make_tls_files

Batch = tuple[list[str], list[str]]  # the prompts and completions of one request


@dataclass
class Arm:
    """One reward service process and how its clients reach it."""

    name: str
    server: ServiceProcess
    credentials: ClientCredentials
    flags: list[str]
    walls: list[float] = field(default_factory=list)  # per round
    cpus: list[float] = field(default_factory=list)  # server CPU seconds per round
    latencies: list[float] = field(default_factory=list)  # every request of every round
    rewards: np.ndarray | None = None


def start_arm(
    name: str,
    registry: Path,
    threads: int,
    flags: list[str],
    credentials: ClientCredentials,
    env: dict[str, str] | None = None,
) -> Arm:
    """``plaudit serve reward`` with ``flags`` (and ``env`` set for the child only)."""
    common = [
        "--registry",
        str(registry),
        "--execution-provider",
        "cpu",
        "--intra-op-threads",
        str(threads),
    ]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        server = start_service("reward", *common, *flags, auth_disabled="--auth-disabled" in flags)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Arm(name, server, credentials, flags)


def load(arm: Arm, batches: list[Batch], clients: int) -> tuple[float, list[float], np.ndarray]:
    """Every batch once over ``clients`` threads: (wall seconds, latencies, rewards)."""
    local = threading.local()
    opened: list[RewardClient] = []
    lock = threading.Lock()

    def client() -> RewardClient:
        if not hasattr(local, "client"):
            local.client = RewardClient(arm.server.address, credentials=arm.credentials)
            with lock:
                opened.append(local.client)
        return local.client

    def one(batch: Batch) -> tuple[float, list[float]]:
        c = client()
        started = time.perf_counter()
        rewards, _ = c.score(*batch, normalization=reward_pb2.NORMALIZATION_RAW)
        return time.perf_counter() - started, rewards

    try:
        with ThreadPoolExecutor(clients, thread_name_prefix=arm.name) as pool:
            # warm-up: every thread opens its channel (TLS handshake) before the clock starts
            barrier = threading.Barrier(clients)

            def warm(batch: Batch) -> None:
                barrier.wait()
                one(batch)

            list(pool.map(warm, [batches[i % len(batches)] for i in range(clients)]))
            started = time.perf_counter()
            results = list(pool.map(one, batches))
            wall = time.perf_counter() - started
    finally:
        for c in opened:
            c.close()
    rewards = np.array([r for _, rs in results for r in rs], dtype=np.float64)
    return wall, [t for t, _ in results], rewards


def rpc_overhead(arm: Arm, calls: int, clients: int) -> tuple[float, list[float]]:
    """``calls`` GetModel calls (no model work: the transport, the key check, the limits and
    the interceptor are most of it) over ``clients`` threads: (wall seconds, latencies)."""
    local = threading.local()
    opened: list[RewardClient] = []
    lock = threading.Lock()

    def one(_: int) -> float:
        if not hasattr(local, "client"):
            local.client = RewardClient(arm.server.address, credentials=arm.credentials)
            with lock:
                opened.append(local.client)
        started = time.perf_counter()
        local.client.model()
        return time.perf_counter() - started

    try:
        with ThreadPoolExecutor(clients, thread_name_prefix=f"{arm.name}-rpc") as pool:
            list(pool.map(one, range(4 * clients)))  # warm-up: channels and handshakes
            started = time.perf_counter()
            latencies = list(pool.map(one, range(calls)))
            wall = time.perf_counter() - started
    finally:
        for c in opened:
            c.close()
    return wall, latencies


def check_refusals(on: Arm) -> str:
    """The ``on`` arm refuses a call without the key (over TLS) and a plaintext channel."""
    request = score_request(["p"], ["c"], reward_pb2.NORMALIZATION_RAW)
    keyless = ClientCredentials(ca_file=on.credentials.ca_file)
    outcomes = []
    for what, credentials in (("no key", keyless), ("plaintext", ClientCredentials())):
        with credentials.channel(on.server.address) as channel:
            call = channel.unary_unary(
                "/plaudit.v1.RewardService/Score",
                request_serializer=reward_pb2.ScoreRequest.SerializeToString,
                response_deserializer=reward_pb2.ScoreResponse.FromString,
            )
            try:
                call(request, timeout=10)
            except grpc.RpcError as exc:
                outcomes.append(f"{what}: {exc.code().name}")
                continue
        raise RuntimeError(f"the defended server answered a call with {what}")
    return ", ".join(outcomes)


def field_count_us(batches: list[Batch]) -> float:
    """Microseconds per request of the wire field count both arms do before parsing."""
    data = [score_request(p, c).SerializeToString() for p, c in batches]
    message = reward_pb2.ScoreRequest.DESCRIPTOR
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for d in data:
            count_fields(d, message, 1 << 20)
        best = min(best, time.perf_counter() - started)
    return 1e6 * best / len(data)


def summary(arm: Arm, items: int, requests: int) -> dict[str, Any]:
    wall = float(np.mean(arm.walls))
    return {
        "arm": arm.name,
        "flags": " ".join(arm.flags),
        "rounds": len(arm.walls),
        "items_per_s": items / wall,
        "round_items_per_s": [items / w for w in arm.walls],
        "p50_ms": 1000 * float(np.percentile(arm.latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(arm.latencies, 99)),
        "wall_ms_per_request": 1000 * wall / requests,
        "server_cpu_ms_per_request": (
            1000 * float(np.mean(arm.cpus)) / requests if len(arm.cpus) == len(arm.walls) else None
        ),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--registry", type=Path, default=RESULTS / "registry")
    parser.add_argument("--checkpoint", default="minilm", help="exported when nothing is promoted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=HH_PAIRS)
    parser.add_argument("--pairs", type=int, default=300, help="pairs (2 items each) per round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--request-items", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each arm, alternating")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--rpc-calls", type=int, default=2000, help="GetModel calls per arm and round (0: none)"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if min(args.pairs, args.clients, args.request_items, args.rounds, args.threads) < 1:
        parser.error("--pairs, --clients, --request-items, --rounds and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    registry = ModelRegistry(args.registry, "reward")
    version = ensure_model(registry, args.checkpoint, args.seed)
    prompts: list[str] = []
    completions: list[str] = []
    for pair in read_pairs(args.data, args.pairs):
        prompts += [pair.prompt, pair.prompt]
        completions += [pair.chosen, pair.rejected]
    batches = [
        ([prompts[i] for i in idx], [completions[i] for i in idx])
        for idx in chunks(range(len(prompts)), args.request_items)
    ]
    key = new_api_key()
    with tempfile.TemporaryDirectory(prefix="bench-security-") as folder:
        tls = make_tls_files(Path(folder))
        in_flight = 4 * args.clients
        on_flags = [
            "--tls-cert-file",
            str(tls.server_cert),
            "--tls-key-file",
            str(tls.server_key),
            "--rate-limit-rps",
            "100000",
            "--rate-limit-burst",
            "100000",
            "--max-in-flight",
            str(in_flight),
        ]
        keys = [{"name": "bench", "sha256": hash_key(key), "roles": ["score"]}]
        arms = [
            start_arm(
                "off",
                args.registry,
                args.threads,
                ["--auth-disabled", "--max-in-flight", "0"],
                ClientCredentials(),
            ),
            start_arm(
                "on",
                args.registry,
                args.threads,
                on_flags,
                ClientCredentials(api_key=key, ca_file=tls.ca),
                env={"PLAUDIT_API_KEYS": json.dumps(keys), "PLAUDIT_AUTH_DISABLED": "false"},
            ),
        ]
        try:
            for arm in arms:
                wait_until_serving(arm.server.address, timeout=300, credentials=arm.credentials)
            refusals = check_refusals(arms[1])
            print(
                f"model {version}; {len(prompts)} items, {len(batches)} requests of "
                f"{args.request_items}; {args.clients} clients; on refuses {refusals}"
            )
            for r in range(args.rounds):
                for arm in arms if r % 2 == 0 else arms[::-1]:
                    cpu0 = server_cpu_s(arm.server)
                    wall, latencies, rewards = load(arm, batches, args.clients)
                    cpu1 = server_cpu_s(arm.server)
                    arm.walls.append(wall)
                    arm.latencies += latencies
                    if cpu0 is not None and cpu1 is not None:
                        arm.cpus.append(cpu1 - cpu0)
                    if arm.rewards is None:
                        arm.rewards = rewards
                    print(f"round {r + 1} {arm.name:>3}: {len(prompts) / wall:7.1f} items/s")
            rpc: dict[str, list[float]] = {"off": [], "on": []}
            rpc_walls: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(args.rounds if args.rpc_calls else 0):
                for arm in arms if r % 2 == 0 else arms[::-1]:
                    wall, latencies = rpc_overhead(arm, args.rpc_calls, args.clients)
                    rpc[arm.name] += latencies
                    rpc_walls[arm.name].append(wall)
        finally:
            exits = [arm.server.stop() for arm in arms]
    off, on = arms
    assert off.rewards is not None and on.rewards is not None
    agreement = float(np.max(np.abs(off.rewards - on.rewards)))
    if agreement > 1e-5:
        raise RuntimeError(f"the arms disagree by {agreement:.2e}")
    rows = [summary(arm, len(prompts), len(batches)) for arm in arms]
    cost = {
        "wall_ms_per_request": rows[1]["wall_ms_per_request"] - rows[0]["wall_ms_per_request"],
        "p50_ms": rows[1]["p50_ms"] - rows[0]["p50_ms"],
        "throughput_pct": 100 * (rows[1]["items_per_s"] / rows[0]["items_per_s"] - 1),
        "server_cpu_ms_per_request": (
            rows[1]["server_cpu_ms_per_request"] - rows[0]["server_cpu_ms_per_request"]
            if rows[0]["server_cpu_ms_per_request"] is not None
            and rows[1]["server_cpu_ms_per_request"] is not None
            else None
        ),
        "field_count_us_per_request": field_count_us(batches),
    }
    if args.rpc_calls:
        for name in ("off", "on"):
            cost[f"getmodel_{name}_ms_per_call"] = (
                1000 * float(np.mean(rpc_walls[name])) / args.rpc_calls
            )
            cost[f"getmodel_{name}_p50_ms"] = 1000 * float(np.percentile(rpc[name], 50))
        cost["getmodel_ms_per_call"] = (
            cost["getmodel_on_ms_per_call"] - cost["getmodel_off_ms_per_call"]
        )
    print()
    print("| arm | items/s | p50 ms | p99 ms | wall ms/request | server CPU ms/request |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        cpu = row["server_cpu_ms_per_request"]
        print(
            f"| {row['arm']} | {row['items_per_s']:.1f} | {row['p50_ms']:.1f} | "
            f"{row['p99_ms']:.1f} | {row['wall_ms_per_request']:.2f} | "
            f"{'n/a' if cpu is None else f'{cpu:.2f}'} |"
        )
    cpu_cost = cost["server_cpu_ms_per_request"]
    print(
        f"\ndefences on - off: {cost['wall_ms_per_request']:+.2f} ms wall per request, "
        f"{'n/a' if cpu_cost is None else f'{cpu_cost:+.2f}'} ms server CPU per request, "
        f"throughput {cost['throughput_pct']:+.1f}%; wire field count (both arms) "
        f"{cost['field_count_us_per_request']:.1f} us per request; rewards agree to "
        f"{agreement:.1e}"
    )
    if args.rpc_calls:
        print(
            f"GetModel x {args.rpc_calls} x {args.rounds} rounds, {args.clients} clients: off "
            f"{cost['getmodel_off_ms_per_call']:.3f} ms per call (p50 "
            f"{cost['getmodel_off_p50_ms']:.2f}), on {cost['getmodel_on_ms_per_call']:.3f} ms "
            f"(p50 {cost['getmodel_on_p50_ms']:.2f}): {cost['getmodel_ms_per_call']:+.3f} ms"
        )
    out = args.json_out or RESULTS / f"bench_security-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "commit": git_commit(),
                "cpu": cpu_name(),
                "model": version,
                "args": {k: str(v) for k, v in vars(args).items()},
                "items": len(prompts),
                "requests": len(batches),
                "refusals": refusals,
                "rows": rows,
                "cost": cost,
                "server_exit_codes": exits,
            },
            indent=2,
        )
    )
    print(f"results: {out}")
    return 0 if all(code == 0 for code in exits) else 1


if __name__ == "__main__":
    raise SystemExit(main())
