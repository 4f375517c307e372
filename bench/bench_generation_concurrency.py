"""Concurrent generation: continuous batching vs static (flushed) batching, over the real service.

The generation service runs SmolLM2-135M-Instruct in its own process, once with
``--batching static`` (requests flushed together decode to the end; what arrives meanwhile waits)
and once with ``--batching continuous`` (a request joins the running batch at the next step, a
finished row leaves at once). ``--clients`` clients (the ``openai`` package's ``AsyncOpenAI``,
streaming ``/v1/completions``) each send ``--requests`` requests back to back: HH-RLHF prompts
of mixed lengths (shipped in ``plaudit/data/hh-harmless``), ``max_tokens`` mixed between
``--min-new`` and ``--max-new``, sampled at temperature 0.7 with a seed per request. Both modes
get the same requests in the same order per client.

Reported per mode: aggregate tokens/s (completion tokens over the wall time of the whole run),
time to first token (request sent -> first streamed text, client side) p50/p90/p99, and each
request's decode rate (tokens after the first over the time after the first).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_generation_concurrency.py [--registry DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: helpers as bench.*

import numpy as np
from openai import AsyncOpenAI

from bench.bench_trainer import cpu_flags
from plaudit.services.common.process import free_port, start_service
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.client import wait_until_serving
from plaudit.trainer.data import read_pairs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "plaudit" / "data" / "hh-harmless" / "pairs.jsonl"


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int
    seed: int


@dataclass
class Outcome:
    sent: float
    first: float | None
    done: float
    tokens: int


def workload(
    clients: int, requests: int, min_new: int, max_new: int, seed: int
) -> list[list[Request]]:
    """Per client, its requests: HH prompts drawn from the shortest 90% (mixed lengths), and
    mixed completion budgets."""
    rng = random.Random(seed)
    prompts = sorted({p.prompt for p in read_pairs(DATA)}, key=len)
    chosen = [prompts[rng.randrange(len(prompts) * 9 // 10)] for _ in range(clients * requests)]
    return [
        [
            Request(chosen[c * requests + r], rng.randint(min_new, max_new), rng.randrange(2**31))
            for r in range(requests)
        ]
        for c in range(clients)
    ]


async def one(client: AsyncOpenAI, model: str, request: Request) -> Outcome:
    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    stream = await client.completions.create(
        model=model,
        prompt=request.prompt,
        max_tokens=request.max_tokens,
        temperature=0.7,
        seed=request.seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Outcome(sent, first, time.perf_counter(), tokens)


async def drive(url: str, model: str, plan: list[list[Request]]) -> tuple[list[Outcome], float]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def user(requests: list[Request]) -> list[Outcome]:
        return [await one(client, model, r) for r in requests]

    started = time.perf_counter()
    per_user = await asyncio.gather(*(user(r) for r in plan))
    wall = time.perf_counter() - started
    await client.close()
    return [o for outcomes in per_user for o in outcomes], wall


def summarise(mode: str, outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    ttft = np.array([o.first - o.sent for o in outcomes if o.first is not None])
    rates = [
        (o.tokens - 1) / (o.done - o.first)
        for o in outcomes
        if o.first is not None and o.tokens > 1 and o.done > o.first
    ]
    tokens = sum(o.tokens for o in outcomes)
    return {
        "mode": mode,
        "requests": len(outcomes),
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "aggregate_tok_s": round(tokens / wall, 1),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "ttft_p90_s": round(float(np.percentile(ttft, 90)), 3),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
        "request_decode_tok_s_p50": round(float(np.median(rates)), 1),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def serve_and_measure(
    mode: str, registry: Path, args: argparse.Namespace, plan: list[list[Request]]
) -> dict[str, Any]:
    http_port = free_port()
    service = start_service(
        "generation",
        "--registry", str(registry), "--batching", mode, "--http-port", str(http_port),
        "--intra-op-threads", str(args.threads), "--precision", args.precision,
        "--max-batch-rows", str(args.max_batch_rows),
    )  # fmt: skip
    try:
        wait_until_serving(service.address, timeout=300)
        version = ModelRegistry(registry, "policy").promoted() or ""
        url = f"http://127.0.0.1:{http_port}"
        warm = [[Request("Hello!", 4, 0)]]
        asyncio.run(drive(url, version, warm))
        outcomes, wall = asyncio.run(drive(url, version, plan))
    finally:
        service.stop()
    row = summarise(mode, outcomes, wall)
    print(json.dumps(row), flush=True)
    return row


def export_smollm2(root: Path) -> None:
    from plaudit.trainer.policy_export import export_policy, load_policy_checkpoint

    model, tokenizer, name = load_policy_checkpoint("smollm2")
    export_policy(
        model,
        tokenizer,
        ModelRegistry(root, "policy"),
        promote=True,
        max_length=1024,
        backbone=name,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry", type=Path, help="policy registry holding an export")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client, back to back")
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="graph to serve (fp32, int8, ...)")
    parser.add_argument("--max-batch-rows", type=int, default=32)
    parser.add_argument("--modes", default="static,continuous")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    plan = workload(args.clients, args.requests, args.min_new, args.max_new, args.seed)
    print(json.dumps({"cpu_flags": cpu_flags(), "threads": args.threads}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        registry = args.registry or Path(tmp)
        if ModelRegistry(registry, "policy").promoted() is None:
            export_smollm2(registry)
        rows = [serve_and_measure(m, registry, args, plan) for m in args.modes.split(",")]
    if len(rows) == 2:
        static, continuous = rows
        for key in ("aggregate_tok_s", "request_decode_tok_s_p50"):
            continuous[f"{key}_vs_static"] = round(continuous[key] / static[key], 2)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
