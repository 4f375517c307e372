"""Generation speed on CPU: ``transformers`` ``generate`` (PyTorch eager) vs the Plaudit engine
(ONNX Runtime with the exported KV cache, numpy sampling), both on SmolLM2-135M-Instruct.

Modes, each on the same chat-templated prompts:

* ``greedy n=1``: one completion per prompt, temperature 0; the two must agree token for token.
* ``sample n=8``: eight completions per prompt at temperature 1 (PyTorch:
  ``num_return_sequences=8``; Plaudit: one prefill, the cache fanned out to 8 rows).

Both run with ``--threads`` threads (``torch.set_num_threads`` / ONNX Runtime intra-op threads)
and ``--max-new-tokens``; tokens/s counts generated tokens (EOS included) over the wall time of
the whole call, prefill included. Best of ``--repeats`` runs per mode (the machine is shared).

    python bench/bench_generation.py [--registry DIR]   # DIR: reuse an exported policy
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from plaudit.services.common.registry import ModelRegistry
from plaudit.services.generation.engine import GenerationEngine
from plaudit.services.runtime.policy_model import GenerateJob, LoadedPolicy, SamplingParams
from plaudit.trainer.policy_export import export_policy, load_policy_checkpoint

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works.",
]


def torch_generate(model: Any, ids: list[int], n: int, max_new: int, sample: bool) -> int:
    """Generated tokens (EOS included, padding after EOS left out)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            do_sample=sample,
            temperature=1.0 if sample else None,
            top_p=None,
            top_k=None,
            num_return_sequences=n,
            max_new_tokens=max_new,
            pad_token_id=2,
        )
    generated = out[:, len(ids) :]
    count = 0
    for row in generated.tolist():
        count += row.index(2) + 1 if 2 in row else len(row)
    return count


def greedy_reference(model: Any, ids: list[int], max_new: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=2,
        )
    return list(out[0, len(ids) :].tolist())


def best_rate(run: Any, repeats: int) -> tuple[float, float]:
    """(tokens/s, seconds) of the fastest of ``repeats`` runs."""
    best = (0.0, 0.0)
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = run()
        elapsed = time.perf_counter() - started
        if tokens / elapsed > best[0]:
            best = (tokens / elapsed, elapsed)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry", type=Path, help="policy registry holding an export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, name = load_policy_checkpoint("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(args.registry or Path(tmp), "policy")
        if registry.promoted() is None:
            export_policy(model, tokenizer, registry, promote=True, max_length=512, backbone=name)
        policy = LoadedPolicy.load(
            registry, registry.promoted() or "", provider="cpu", intra_op_threads=args.threads
        )
    engine = GenerationEngine(max_new_tokens=args.max_new_tokens)
    engine.set_model(policy)
    rows = []
    for mode, n, temperature in (("greedy n=1", 1, 0.0), ("sample n=8", 8, 1.0)):
        for prompt in PROMPTS:
            params = SamplingParams(
                temperature=temperature, max_new_tokens=args.max_new_tokens, seed=0
            )
            job = GenerateJob(prompt=prompt, n=n, params=params)
            ids = policy.encode(job)

            def ours(job: GenerateJob = job) -> int:
                (result,) = engine.process([job])
                assert not isinstance(result, Exception)
                return result.generated_tokens

            def theirs(ids: list[int] = ids, n: int = n, sample: bool = temperature > 0) -> int:
                return torch_generate(model, ids, n, args.max_new_tokens, sample)

            if n == 1:
                (check,) = engine.process([job])
                assert not isinstance(check, Exception)
                ref = greedy_reference(model, ids, args.max_new_tokens)
                assert check.completions[0].token_ids == ref, "greedy outputs differ"
            onnx_rate, onnx_s = best_rate(ours, args.repeats)
            torch_rate, torch_s = best_rate(theirs, args.repeats)
            rows.append(
                {
                    "mode": mode,
                    "prompt_tokens": len(ids),
                    "plaudit_onnx_tok_s": round(onnx_rate, 1),
                    "plaudit_onnx_s": round(onnx_s, 2),
                    "torch_generate_tok_s": round(torch_rate, 1),
                    "torch_generate_s": round(torch_s, 2),
                    "speedup": round(onnx_rate / torch_rate, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n| mode | prompt tokens | Plaudit ONNX tok/s | torch generate tok/s | speedup |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['mode']} | {r['prompt_tokens']} | {r['plaudit_onnx_tok_s']} | "
            f"{r['torch_generate_tok_s']} | {r['speedup']}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
