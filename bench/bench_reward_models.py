"""Two named reward models in one service: what the second model, an objective over both, and a
shadow candidate cost in throughput, latency and memory (issue 18).

One run, on the MiniLM reward model of ``bench_reward`` (``all-MiniLM-L6-v2`` with a fresh,
seeded head), exported into the named models of one registry (``--registry``, default
``bench/results/registry-models``; reused on reruns):

* ``helpfulness``: export seed 0, promoted; ``safety``: export seed 1, promoted;
* a third export (seed 2) published into ``helpfulness`` unpromoted: the shadow candidate.

Items are the shipped HH pairs' (prompt, chosen) and (prompt, rejected), ``--pairs`` pairs (2
items each), sent as ``Score`` requests of ``--request-items`` items by ``--clients`` concurrent
client threads, one channel each (``bench_reward.run_grpc``, raw rewards). Every service is a
fresh ``plaudit serve reward`` child process (fp32, CPU, ``--intra-op-threads`` = cores) and
nothing else runs beside it; client and server share this machine's cores.

Rows:

* ``one``: a service with ``--models helpfulness``; ``Score(model=helpfulness)``.
* ``two/h``: a service with ``--models helpfulness safety`` and ``--objectives`` (a gated
  ``llama2`` objective, safety gating helpfulness, and a weighted ``sum``);
  ``Score(model=helpfulness)``: the same load as ``one``, with a second model loaded beside.
* ``two/llama2``: the same process; ``Score(objective=llama2)``: every item is scored by both
  models, so about twice ``one``'s per-item cost is what to expect.
* ``two/h+shadow F``: the same process, with the candidate shadowing ``helpfulness`` on a
  fraction F of its requests (``ModelRegistry.start_shadow`` + ``notify_reload``);
  ``Score(model=helpfulness)``. The shadow scores off the request path but on the same cores,
  so the gap to ``two/h`` is what a shadow costs live traffic on a machine where it shares them.
  The row carries the shadow's status (``GetModel(helpfulness).shadow``) once its queue has
  drained: requests it scored, item pairs it compared, its pair-order agreement with the live
  version, and samples dropped because its queue was full (the live call never waits). These
  counts include the row's untimed warm-up requests (one per client).

Per row: items/s over the timed wall clock; ms/item = 1 / items/s (wall time per item under this
concurrency, not the latency of one item); p50/p99 latency of one request; the server process's
CPU time per item (/proc, warm-up included); the server's resident memory after the row (VmRSS)
and its peak so far (VmHWM, over the process's life: the ``two`` rows accumulate). ``max|Δ|`` is
the largest raw-reward difference from ``one`` (the same helpfulness version: ~0 expected; the
objective row's rewards are a different quantity, so none).

Memory: each service is warmed up first (every item once through each model it serves); the
RSS of ``two`` minus that of ``one`` after warm-up is the cost of the second loaded model
(weights, ONNX Runtime session and its arena). The shadow rows also show the RSS with the
candidate loaded (a third session) and after it is unloaded again (the allocator may keep it).

The header gives the CPU (model, AVX-512 / VNNI / BF16 / AMX flags, cores) and the fp32 sgemm
rate (``bench_reward.sgemm_gflops``) at the start and the end: a big drop between them means
the machine was busy. Results JSON goes to ``bench/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: helpers as bench.*
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np
import onnxruntime as ort
import torch

from bench.bench_reward import (
    RESULTS,
    Items,
    ModeResult,
    cpu_name,
    ensure_model,
    git_commit,
    load_items,
    run_grpc,
    server_cpu_s,
    sgemm_gflops,
)
from bench.bench_trainer import cpu_flags
from plaudit.demo import HH_PAIRS
from plaudit.services.common.admin import notify_reload
from plaudit.services.common.process import ServiceProcess, start_service
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.common.textfmt import RewardTextEncoder, TextFormat
from plaudit.services.reward.client import RewardClient, wait_until_serving
from plaudit.services.runtime.contract import TOKENIZER_FILE
from plaudit.trainer.export import ExportConfig, export_reward
from plaudit.v1 import reward_pb2

HELPFULNESS, SAFETY = "helpfulness", "safety"
SEEDS = {HELPFULNESS: 0, SAFETY: 1}
CANDIDATE_SEED = 2
CANDIDATE_NOTE = "bench_reward_models shadow candidate"
OBJECTIVES = {
    "objectives": [
        {
            "name": "llama2",
            "kind": "gated",
            "safety_model": SAFETY,
            "helpfulness_model": HELPFULNESS,
        },
        {"name": "sum", "kind": "weighted", "weights": {HELPFULNESS: 1.0, SAFETY: 1.0}},
    ]
}


# -- setup -------------------------------------------------------------------------------------
def ensure_candidate(registry: ModelRegistry, checkpoint: str) -> str:
    """An unpromoted version of ``registry`` exported with seed 2 (exported when missing)."""
    promoted = registry.promoted()
    for manifest in registry.list_versions():
        if manifest.version != promoted and manifest.notes.get("bench") == CANDIDATE_NOTE:
            return manifest.version
    print(f"no shadow candidate in {registry.label}: exporting {checkpoint} seed {CANDIDATE_SEED}")
    cfg = ExportConfig(
        checkpoint=checkpoint,
        quantize="int8",
        seed=CANDIDATE_SEED,
        notes={"bench": CANDIDATE_NOTE, "seed": CANDIDATE_SEED},
    )
    return export_reward(cfg, registry).version


def serving_encoder(registry: ModelRegistry, version: str) -> RewardTextEncoder:
    """The version's serving tokenization, without an ONNX Runtime session."""
    folder = registry.open_version(version)
    return RewardTextEncoder.from_files(
        folder.path(TOKENIZER_FILE), TextFormat.from_dict(folder.manifest.text_format)
    )


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in MiB (empty where /proc is missing)."""
    out: dict[str, float] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB
    return out


# -- one service -------------------------------------------------------------------------------
@dataclass
class Service:
    server: ServiceProcess
    models: list[str]

    @property
    def pid(self) -> int:
        return self.server.pid

    def memory(self) -> dict[str, float]:
        return proc_memory(self.pid)


def start(args: argparse.Namespace, models: list[str], objectives: Path | None) -> Service:
    server = start_service(
        "reward",
        "--registry",
        str(args.registry),
        "--models",
        *models,
        *(["--objectives", str(objectives)] if objectives is not None else []),
        "--precision",
        "fp32",
        "--execution-provider",
        "cpu",
        "--intra-op-threads",
        str(args.threads),
    )
    try:
        wait_until_serving(server.address, timeout=300)
    except BaseException:
        server.stop()
        raise
    return Service(server, models)


def check_versions(service: Service, versions: dict[str, str]) -> None:
    with RewardClient(service.server.address) as probe:
        info = probe.model()
    served = {m.name: m.version for m in info.models} or {info.name: info.version}
    for name in service.models:
        if served.get(name) != versions[name]:
            raise RuntimeError(
                f"server serves {name}={served.get(name)}, expected {versions[name]}"
            )


def warm_up(service: Service, items: Items) -> dict[str, float]:
    """Every item once through each served model (untimed); the server's memory after."""
    with RewardClient(service.server.address) as client:
        for name in service.models:
            client.score(
                items.prompts,
                items.completions,
                timeout=600,
                normalization=reward_pb2.NORMALIZATION_RAW,
                model=name,
            )
    return service.memory()


def shadow_status(service: Service, settle_s: float = 60.0) -> tuple[dict[str, Any], int]:
    """The helpfulness shadow's status once its queue has drained (requests + dropped unchanged
    for a second, at most ``settle_s``), and its scored requests when first asked."""

    def read(client: RewardClient) -> reward_pb2.ShadowStatus:
        return client.model(name=HELPFULNESS).shadow

    with RewardClient(service.server.address) as client:
        status = read(client)
        at_end = int(status.requests)
        deadline = time.monotonic() + settle_s
        seen, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = int(status.requests + status.dropped)
            if count != seen:
                seen, since = count, time.monotonic()
            elif time.monotonic() - since >= 1.0:
                break
            time.sleep(0.2)
            status = read(client)
    return {
        "version": status.version,
        "fraction": float(status.fraction),
        "requests": int(status.requests),
        "pairs": int(status.pairs),
        "agreement": float(status.agreement) if status.pairs else None,
        "rank_correlation": float(status.rank_correlation) if status.rankings else None,
        "dropped": int(status.dropped),
        "error": status.error,
    }, at_end


def set_shadow(
    service: Service, registry: ModelRegistry, candidate: str | None, fraction: float = 0.0
) -> None:
    """Start (``candidate``) or stop (None) the helpfulness shadow, and have the service load it
    now."""
    if candidate is None:
        registry.stop_shadow()
    else:
        registry.start_shadow(candidate, fraction)
    reply = notify_reload(service.server.address, model=HELPFULNESS)
    if reply.shadow_version != (candidate or ""):
        raise RuntimeError(
            f"the service's shadow is {reply.shadow_version!r}, expected {candidate or 'none'}"
        )


def row(
    key: str,
    service: Service,
    items: Items,
    args: argparse.Namespace,
    *,
    model: str = "",
    objective: str = "",
) -> tuple[dict[str, Any], ModeResult]:
    print(f"-- {key}", flush=True)  # the progress bar below says c<clients>
    cpu0 = server_cpu_s(service.server)
    result = run_grpc(
        service.server, items, args.clients, args.request_items, model=model, objective=objective
    )
    cpu1 = server_cpu_s(service.server)
    memory = service.memory()
    lat = np.array(result.latencies_s) * 1000
    items_s = len(items) / result.wall_s
    target = f"objective={objective}" if objective else f"model={model}"
    return {
        "key": key,
        "name": f"Score {target}, {args.clients} clients x {args.request_items} items",
        "models_loaded": service.models,
        "model": model,
        "objective": objective,
        "items": len(items),
        "wall_s": result.wall_s,
        "requests": len(result.latencies_s),
        "items_per_s": items_s,
        "ms_per_item": 1000 / items_s,
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "server_cpu_ms_per_item": (
            1000 * (cpu1 - cpu0) / len(items) if cpu0 is not None and cpu1 is not None else None
        ),
        "rss_mib": memory.get("VmRSS"),
        "hwm_mib": memory.get("VmHWM"),
        "max_abs_diff_vs_one": None,
        **result.extra,
    }, result


# -- report ------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'row':<17} {'items/s':>8} {'ms/item':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'cpu ms/it':>9} {'RSS MiB':>8} {'HWM MiB':>8} {'max|Δ|':>8}  shadow"
    )
    print(header)
    print("-" * (len(header) + 40))
    for r in rows:
        shadow = r.get("shadow")
        text = ""
        if shadow is not None:
            agree = f"{shadow['agreement']:.1%}" if shadow["agreement"] is not None else "-"
            text = (
                f"{shadow['requests']} req, {shadow['pairs']} pairs, agree {agree}, "
                f"dropped {shadow['dropped']}"
            )
        print(
            f"{r['key']:<17} {r['items_per_s']:>8.1f} {r['ms_per_item']:>8.2f} "
            f"{r['latency_ms_p50']:>8.1f} {r['latency_ms_p99']:>8.1f} "
            f"{fmt(r['server_cpu_ms_per_item'], '.2f', 9)} {fmt(r['rss_mib'], '.0f', 8)} "
            f"{fmt(r['hwm_mib'], '.0f', 8)} {fmt(r['max_abs_diff_vs_one'], '.1e', 8)}  {text}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--pairs", type=int, default=200, help="HH pairs to use, 2 items each (default 200)"
    )
    parser.add_argument(
        "--data", type=Path, default=HH_PAIRS, help="preference pairs (default: shipped HH pairs)"
    )
    parser.add_argument(
        "--registry",
        type=Path,
        default=RESULTS / "registry-models",
        help="reward registry with the named models (exported into when missing)",
    )
    parser.add_argument("--checkpoint", default="minilm", help="checkpoint of the exports")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="ONNX Runtime intra-op threads of the services (default: all cores)",
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--request-items", type=int, default=4, help="items per Score request")
    parser.add_argument(
        "--shadow-fractions",
        default="0.1,1.0",
        help="shadow fractions of the two/h+shadow rows, comma-separated",
    )
    parser.add_argument(
        "--json-out",
        type=Path,
        default=None,
        help="results JSON (default bench/results/bench_reward_models-<UTC time>.json)",
    )
    args = parser.parse_args(argv)
    args.shadow_fractions = [float(f) for f in str(args.shadow_fractions).split(",") if f.strip()]
    if min(args.pairs, args.threads, args.clients, args.request_items) < 1:
        parser.error("--pairs, --threads, --clients and --request-items must be positive")
    if any(not 0.0 < f <= 1.0 for f in args.shadow_fractions):
        parser.error("--shadow-fractions must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = ModelRegistry(args.registry, "reward")
    registries = {name: root.named(name) for name in (HELPFULNESS, SAFETY)}
    versions: dict[str, str] = {}
    for name, registry in registries.items():
        versions[name] = ensure_model(registry, args.checkpoint, SEEDS[name])
    helpfulness = registries[HELPFULNESS]
    candidate = ensure_candidate(helpfulness, args.checkpoint)
    helpfulness.stop_shadow()  # a shadow left behind by an interrupted run
    items = load_items(args.data, args.pairs, serving_encoder(helpfulness, versions[HELPFULNESS]))

    flags = cpu_flags()
    print(
        f"CPU {cpu_name()}, {os.cpu_count()} cores, flags: {' '.join(flags) or '-'}; "
        f"ONNX Runtime {ort.__version__}, torch "
        f"{torch.__version__}"
    )
    peaks = [sgemm_gflops(args.threads)]
    print(f"fp32 sgemm 2048^3 on {args.threads} threads: {peaks[0]:.1f} GFLOP/s")
    print(
        f"models: {HELPFULNESS}={versions[HELPFULNESS]}, {SAFETY}={versions[SAFETY]}, shadow "
        f"candidate {candidate}; {len(items)} items ({int(items.tokens.sum())} tokens, mean "
        f"{items.tokens.mean():.0f}); {args.clients} clients x {args.request_items} items; "
        f"services: fp32 CPU, {args.threads} intra-op threads"
    )

    rows: list[dict[str, Any]] = []
    warm: dict[str, dict[str, float]] = {}
    exits: dict[str, int] = {}

    # -- one ----------------------------------------------------------------------------------
    one = start(args, [HELPFULNESS], None)
    try:
        check_versions(one, versions)
        warm["one"] = warm_up(one, items)
        r, base = row("one", one, items, args, model=HELPFULNESS)
        r["max_abs_diff_vs_one"] = 0.0
        rows.append(r)
    finally:
        exits["one"] = one.server.stop()

    # -- two ----------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="bench-objectives-") as tmp:
        objectives = Path(tmp) / "objectives.json"
        objectives.write_text(json.dumps(OBJECTIVES))
        two = start(args, [HELPFULNESS, SAFETY], objectives)
        try:
            check_versions(two, versions)
            warm["two"] = warm_up(two, items)
            r, result = row("two/h", two, items, args, model=HELPFULNESS)
            r["max_abs_diff_vs_one"] = float(np.max(np.abs(result.scores - base.scores)))
            rows.append(r)
            r, _ = row("two/llama2", two, items, args, objective="llama2")
            rows.append(r)
            for fraction in args.shadow_fractions:
                set_shadow(two, helpfulness, candidate, fraction)
                loaded = two.memory()
                r, result = row(f"two/h+shadow {fraction:g}", two, items, args, model=HELPFULNESS)
                r["max_abs_diff_vs_one"] = float(np.max(np.abs(result.scores - base.scores)))
                r["shadow"], r["shadow_requests_at_row_end"] = shadow_status(two)
                set_shadow(two, helpfulness, None)
                r["rss_mib_shadow_loaded"] = loaded.get("VmRSS")
                r["rss_mib_after_unload"] = two.memory().get("VmRSS")
                rows.append(r)
        finally:
            helpfulness.stop_shadow()
            exits["two"] = two.server.stop()
    peaks.append(sgemm_gflops(args.threads))

    print()
    print_table(rows)
    print()
    by_key = {r["key"]: r for r in rows}
    one_rss, two_rss = warm["one"].get("VmRSS"), warm["two"].get("VmRSS")
    if one_rss is not None and two_rss is not None:
        print(
            f"memory after warm-up: one {one_rss:.0f} MiB, two {two_rss:.0f} MiB: the second "
            f"model costs {two_rss - one_rss:+.0f} MiB RSS (after their first rows: "
            f"{by_key['two/h']['rss_mib'] - by_key['one']['rss_mib']:+.0f} MiB)"
        )
    base_ms = by_key["one"]["ms_per_item"]
    for r in rows[1:]:
        extra = ""
        if "rss_mib_shadow_loaded" in r:
            extra = (
                f"; RSS with the candidate loaded {r['rss_mib_shadow_loaded']:.0f} MiB, after "
                f"unloading it {r['rss_mib_after_unload']:.0f} MiB"
            )
        print(f"  {r['key']:<17} {r['ms_per_item'] / base_ms:.2f}x one's ms/item{extra}")
    print(
        f"fp32 sgemm 2048^3 on {args.threads} threads: start {peaks[0]:.1f}, end "
        f"{peaks[1]:.1f} GFLOP/s"
    )
    bad_exits = {k: v for k, v in exits.items() if v != 0}
    if bad_exits:
        print(f"server exit codes: {bad_exits}")

    out = args.json_out or RESULTS / f"bench_reward_models-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "created_at": datetime.now(UTC).isoformat(),
        "git": git_commit(),
        "argv": sys.argv[1:],
        "config": {
            "pairs": args.pairs,
            "items": len(items),
            "tokens": int(items.tokens.sum()),
            "threads": args.threads,
            "clients": args.clients,
            "request_items": args.request_items,
            "shadow_fractions": args.shadow_fractions,
            "data": str(args.data),
            "registry": str(args.registry),
            "versions": versions,
            "shadow_candidate": candidate,
            "objectives": OBJECTIVES,
        },
        "machine": {
            "cpu": cpu_name(),
            "cpu_flags": flags,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "peak_gflops": {"start": peaks[0], "end": peaks[1]},
        "memory_after_warmup_mib": warm,
        "second_model_rss_mib": (
            two_rss - one_rss if one_rss is not None and two_rss is not None else None
        ),
        "server_exit_codes": exits,
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {out}")
    return 1 if bad_exits else 0


if __name__ == "__main__":
    sys.exit(main())
