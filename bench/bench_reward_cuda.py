"""A reward model of about 1B parameters on CUDA: ONNX Runtime fp16 vs fp32, beside PyTorch.

Builds a randomly initialised BERT-like reward model (``transformers``, nothing downloaded; the
head drawn with unit spread, as ``tests/conftest.py`` does, so rewards differ between texts),
exports it through the export's own graph writer (:mod:`plaudit.trainer.onnx_graph`: weights
in one external-data file past 1 GiB, kernels fused with ``fuse=True``, which at this size needs
about 8x the weights in RAM) in fp32 and fp16, and scores one fixed
batch of synthetic token sequences (lengths uniform in ``--min-len..--max-len``, sorted by length
into batches of ``--batch``, as serving groups them) with:

* ``ort-fp32``: ONNX Runtime, the fp32 graph (CUDA provider with TF32 off: true fp32);
* ``ort-fp16``: ONNX Runtime, the fp16 graph (what ``precision=auto`` serves on CUDA);
* ``torch-fp32`` / ``torch-bf16`` / ``torch-fp16``: PyTorch as a careful user runs it (the model
  cast to the dtype, SDPA attention, ``inference_mode``, length-sorted batches); the half
  precision peers on CUDA only.

Pair-order agreement: items (0, 1), (2, 3), ... form pairs; each mode's order of every pair is
compared with ``torch-fp32`` and, for ``ort-fp16``, with ``ort-fp32`` (the export's fp16 parity
gate). Throughput: items/s over ``--repeats`` passes after one warm-up pass. Latency: one item of
``--latency-len`` tokens, p50/p95 over ``--latency-runs`` calls.

Imports nothing of Plaudit but the graph writer (torch, transformers, onnx, onnxruntime, numpy),
so it runs on a bare GPU machine::

    cd <repo root> && PYTHONPATH=. python3 bench/bench_reward_cuda.py --out $OUT

Dry run on a CPU (tiny model): ``--params-b 0.01 --device cpu``. Writes
``bench_reward_cuda.md`` (the table) and ``bench_reward_cuda.json`` to ``--out`` after every
stage, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification

from plaudit.trainer.onnx_graph import (
    data_file_for,
    pairwise_agreement,
    weight_bytes,
    write_fp16_graph,
    write_reward_graph,
)

HIDDEN_SIZES = (128, 256, 512, 768, 1024, 1536, 2048)
VOCAB = 30522
POSITIONS = 512
FP16_MIN_AGREEMENT = 0.95  # ExportConfig.fp16_min_agreement's default
Batch = dict[str, np.ndarray]


def config_for(params_b: float) -> BertConfig:
    """A BERT config of about ``params_b`` billion parameters: the widest hidden size (64 per
    head, FFN 4x) that leaves room for two layers, then as many layers as fit."""
    target = params_b * 1e9
    for hidden in reversed(HIDDEN_SIZES):
        per_layer = 12 * hidden * hidden + 13 * hidden
        embeddings = (VOCAB + POSITIONS + 2) * hidden
        if embeddings + 2 * per_layer <= target or hidden == HIDDEN_SIZES[0]:
            break
    layers = max(1, round((target - embeddings) / per_layer))
    return BertConfig(  # type: ignore[call-arg]
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        max_position_embeddings=POSITIONS,
        num_labels=1,
        pad_token_id=0,
    )


def synthetic_batches(
    items: int, batch: int, min_len: int, max_len: int, seed: int
) -> tuple[list[Batch], list[np.ndarray]]:
    """Length-sorted padded batches of random ids, and each batch's item indices."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=items)
    order = np.argsort(lengths, kind="stable")
    batches, indices = [], []
    for start in range(0, items, batch):
        group = order[start : start + batch]
        width = int(lengths[group].max())
        ids = np.zeros((len(group), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, i in enumerate(group):
            ids[row, : lengths[i]] = rng.integers(1000, VOCAB, size=lengths[i])
            mask[row, : lengths[i]] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids})
        indices.append(group)
    return batches, indices


class Report:
    """Results so far, written to ``out`` after every stage (markdown table and JSON)."""

    def __init__(self, out: Path, setup: dict[str, Any]) -> None:
        self.out, self.setup = out, setup
        self.stages: dict[str, float] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = round(seconds, 2)
        print(f"[{sum(self.stages.values()):7.1f}s] {name}: {seconds:.1f}s", flush=True)
        self.write()

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.notes.append(text)
        self.write()

    def markdown(self) -> str:
        s = self.setup
        lines = [
            f"# Reward model on {s['device_name']}: ONNX Runtime fp16 vs fp32, PyTorch peers",
            "",
            f"Model: random BERT-like reward model, {s['params'] / 1e9:.2f} B parameters "
            f"({s['layers']} layers x {s['hidden']} wide, vocab {VOCAB}); "
            f"{s['items']} items of {s['min_len']}-{s['max_len']} tokens "
            f"({s['real_tokens']} real tokens), length-sorted batches of {s['batch']}.",
            f"Versions: torch {s['torch']}, transformers {s['transformers']}, onnxruntime "
            f"{s['onnxruntime']} (providers {', '.join(s['providers'])}), python {s['python']}.",
            "",
            "| mode | provider | items/s | tokens/s | latency p50 / p95 (1 x "
            f"{s['latency_len']} tok) | pair order vs torch-fp32 | max abs diff vs torch-fp32 |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, row in self.rows.items():
            if "items_s" not in row:
                continue
            lines.append(
                f"| {name} | {row['provider']} | {row['items_s']:.1f} | {row['tokens_s']:.0f} | "
                f"{row['p50_ms']:.1f} / {row['p95_ms']:.1f} ms | "
                f"{row.get('agreement_vs_torch_fp32', float('nan')):.3f} | "
                f"{row.get('max_abs_diff_vs_torch_fp32', float('nan')):.2e} |"
            )
        gate = self.rows.get("ort-fp16", {}).get("agreement_vs_ort_fp32")
        if gate is not None:
            verdict = "passes" if gate >= FP16_MIN_AGREEMENT else "fails"
            lines += [
                "",
                f"fp16 parity gate (pair order, ort-fp16 vs ort-fp32): {gate:.3f}, {verdict} "
                f"the export's threshold {FP16_MIN_AGREEMENT}.",
            ]
        if "sizes" in s:
            lines += [
                "",
                "Files: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in s["sizes"].items()),
            ]
        lines += ["", "Stages (s): " + ", ".join(f"{k} {v}" for k, v in self.stages.items())]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "bench_reward_cuda.md").write_text(self.markdown())
        payload = {
            "setup": self.setup,
            "stages": self.stages,
            "rows": self.rows,
            "notes": self.notes,
        }
        (self.out / "bench_reward_cuda.json").write_text(json.dumps(payload, indent=2, default=str))


def timed(
    run: Callable[[Batch], np.ndarray],
    batches: list[Batch],
    indices: list[np.ndarray],
    items: int,
    repeats: int,
    sync: Callable[[], None],
) -> tuple[np.ndarray, float]:
    """Rewards in item order (from the warm-up pass) and the seconds of ``repeats`` passes."""
    rewards = np.empty(items, dtype=np.float32)
    for batch, group in zip(batches, indices, strict=True):
        rewards[group] = run(batch).reshape(-1)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            run(batch)
    sync()
    return rewards, time.perf_counter() - start


def latency(
    run: Callable[[Batch], np.ndarray], one: Batch, runs: int, sync: Callable[[], None]
) -> tuple[float, float]:
    """p50 and p95 milliseconds of one call on ``one`` (after three warm-up calls)."""
    for _ in range(3):
        run(one)
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(one)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--params-b", type=float, default=1.0, help="model size, billions")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-len", type=int, default=128)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--external", action="store_true", help="external data at any size (for a dry run)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="for the graphs (default: a temp dir)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} providers: {providers}", flush=True)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("torch sees no CUDA device; running on CPU", flush=True)
        cuda = False
    ort_cuda = cuda and "CUDAExecutionProvider" in providers
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and not ort_cuda:
        print("CUDAExecutionProvider is missing: ONNX Runtime rows run on CPU", flush=True)
    if ort_cuda and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia wheels torch brought, where they are
            ort.preload_dlls()
        except Exception as exc:  # a bench reports and goes on
            print(f"onnxruntime.preload_dlls failed: {exc}", flush=True)

    torch.manual_seed(args.seed)
    config = config_for(args.params_b)
    start = time.perf_counter()
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)
    params = sum(p.numel() for p in model.parameters())
    batches, indices = synthetic_batches(
        args.items, args.batch, args.min_len, args.max_len, args.seed
    )
    one = synthetic_batches(1, 1, args.latency_len, args.latency_len, args.seed + 1)[0][0]
    real_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    report = Report(
        args.out,
        {
            "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "CPU",
            "params": params,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "fp32_weight_bytes": weight_bytes(model),
            "items": args.items,
            "batch": args.batch,
            "min_len": args.min_len,
            "max_len": args.max_len,
            "real_tokens": real_tokens,
            "latency_len": args.latency_len,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": ort.__version__,
            "providers": providers,
            "python": sys.version.split()[0],
            "cpu_threads": torch.get_num_threads(),
        },
    )
    report.stage("build model", time.perf_counter() - start)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-reward-cuda-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32_graph, fp16_graph = work / "model.onnx", work / "model.fp16.onnx"
    start = time.perf_counter()
    _, fused, external = write_reward_graph(
        model,
        fp32_graph,
        pad_token_id=0,
        token_type_ids=True,
        external=True if args.external else None,
        fuse=True,
    )
    report.stage("export fp32 (trace, fuse, save)", time.perf_counter() - start)
    start = time.perf_counter()
    write_fp16_graph(fp32_graph, fp16_graph, external)
    report.stage("convert fp16", time.perf_counter() - start)
    sizes = {}
    for graph in (fp32_graph, fp16_graph):
        sizes[graph.name] = graph.stat().st_size
        if data_file_for(graph).exists():
            sizes[data_file_for(graph).name] = data_file_for(graph).stat().st_size
    report.setup.update(sizes=sizes, fused_attention=fused, external_data=external)
    report.write()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def record(
        name: str, provider: str, rewards: np.ndarray, seconds: float, lat: tuple[float, float]
    ) -> None:
        passes = args.repeats * args.items
        report.rows[name] = {
            "provider": provider,
            "items_s": passes / seconds,
            "tokens_s": args.repeats * real_tokens / seconds,
            "p50_ms": lat[0],
            "p95_ms": lat[1],
            "reward_std": float(np.std(rewards)),
        }
        results[name] = rewards

    results: dict[str, np.ndarray] = {}
    # -- PyTorch peers (SDPA attention, as a user would run it) -----------------------------
    model.set_attn_implementation("sdpa")
    dtypes = [("torch-fp32", torch.float32)]
    if cuda:  # the half-precision peers (on a CPU they only measure its bf16 emulation)
        dtypes += [("torch-bf16", torch.bfloat16), ("torch-fp16", torch.float16)]
    for name, dtype in dtypes:
        start = time.perf_counter()
        peer = copy.deepcopy(model).to(device=device, dtype=dtype)  # each cast from fp32

        def run_torch(batch: Batch, peer: torch.nn.Module = peer) -> np.ndarray:
            with torch.inference_mode():
                inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
                return peer(**inputs).logits[:, 0].float().cpu().numpy()

        rewards, seconds = timed(run_torch, batches, indices, args.items, args.repeats, sync)
        record(
            name, str(device), rewards, seconds, latency(run_torch, one, args.latency_runs, sync)
        )
        report.stage(name, time.perf_counter() - start)
        del peer, run_torch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # -- ONNX Runtime --------------------------------------------------------------------------
    options = ort.SessionOptions()  # as plaudit's create_session sets them
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for name, graph in (("ort-fp32", fp32_graph), ("ort-fp16", fp16_graph)):
        start = time.perf_counter()
        tries: list[list[Any]] = [["CPUExecutionProvider"]]
        if ort_cuda:  # TF32 off: fp32 means fp32 (the option's name, then without it)
            cuda_ep = "CUDAExecutionProvider"
            tries = [[(cuda_ep, {"device_id": 0, "use_tf32": 0})], [cuda_ep]]
        session = None
        for provider_list in tries:
            try:
                session = ort.InferenceSession(
                    str(graph), sess_options=options, providers=provider_list
                )
                break
            except Exception as exc:  # a bench reports and goes on
                report.note(f"{name}: session on {provider_list} failed: {exc}")
        if session is None:
            continue
        provider = session.get_providers()[0]
        report.stage(f"{name} session ({provider})", time.perf_counter() - start)
        if ort_cuda and provider != "CUDAExecutionProvider" and params > 2e8:
            report.note(f"{name}: not on CUDA ({session.get_providers()}); skipped, too slow")
            continue
        start = time.perf_counter()

        def run_ort(batch: Batch, session: ort.InferenceSession = session) -> np.ndarray:
            return np.asarray(session.run(None, batch)[0])

        rewards, seconds = timed(run_ort, batches, indices, args.items, args.repeats, sync)
        record(name, provider, rewards, seconds, latency(run_ort, one, args.latency_runs, sync))
        report.stage(name, time.perf_counter() - start)
        del session
        gc.collect()

    reference = results["torch-fp32"]
    for name, rewards in results.items():
        report.rows[name]["agreement_vs_torch_fp32"] = pairwise_agreement(reference, rewards)
        report.rows[name]["max_abs_diff_vs_torch_fp32"] = float(np.max(np.abs(reference - rewards)))
    if "ort-fp16" in results and "ort-fp32" in results:
        report.rows["ort-fp16"]["agreement_vs_ort_fp32"] = pairwise_agreement(
            results["ort-fp32"], results["ort-fp16"]
        )
    report.note(f"reward spread (std, torch-fp32): {float(np.std(reference)):.3f}")
    report.write()
    print(report.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
