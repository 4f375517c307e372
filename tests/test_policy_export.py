"""Policy export: the ONNX graph with a KV cache against PyTorch, greedy generation through the
serving engine against ``transformers``' ``generate``, the manifest, and the sampler."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from plaudit.services.common.registry import ModelRegistry
from plaudit.services.generation.engine import GenerationEngine
from plaudit.services.runtime.policy_model import (
    FinishReason,
    GenerateJob,
    LoadedPolicy,
    SamplingParams,
    _nucleus,
    sample_tokens,
)
from plaudit.trainer import policy_export
from plaudit.trainer.policy_export import PolicyParityError, export_policy, export_policy_checkpoint
from tests.conftest import build_tiny_policy

PROMPTS = [
    "What is the capital of France?",
    "\n\nHuman: Name a fruit.\n\nAssistant: An apple.\n\nHuman: Another one?\n\nAssistant:",
    "hi",
]


@pytest.fixture(scope="module")
def hf_policy(tiny_policy_checkpoint: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_checkpoint, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_policy_checkpoint)


@pytest.fixture(scope="module")
def policy(tiny_policy_registry: Path) -> LoadedPolicy:
    registry = ModelRegistry(tiny_policy_registry, "policy")
    return LoadedPolicy.load(registry, registry.promoted() or "", provider="cpu")


def greedy(n: int = 1, max_new_tokens: int = 16) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)


def test_manifest_describes_the_policy(tiny_policy_registry: Path, hf_policy: Any) -> None:
    _, tokenizer = hf_policy
    registry = ModelRegistry(tiny_policy_registry, "policy")
    manifest = registry.verify(registry.promoted() or "")
    assert manifest.kind == "policy"
    assert manifest.onnx_files == {"fp32": "model.onnx"}
    assert {"model.onnx", "tokenizer.json"} <= set(manifest.files)
    assert manifest.text_format["kind"] == "chat_template"
    assert manifest.text_format["chat_template"] == tokenizer.chat_template
    assert manifest.text_format["max_length"] == 256
    assert manifest.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert manifest.input_names[3:] == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    gen = manifest.generation
    assert gen is not None
    assert gen.eos_token_ids == [tokenizer.eos_token_id]
    assert (gen.max_new_tokens, gen.num_layers, gen.num_kv_heads, gen.head_dim) == (16, 2, 1, 16)
    assert manifest.notes["greedy_agreement"] == 1.0
    for check in ("prefill", "decode", "batched"):
        assert manifest.notes[f"{check}_max_rel_diff"] < 1e-5


def test_cached_graph_matches_pytorch_across_chunks(policy: LoadedPolicy, hf_policy: Any) -> None:
    """A prompt fed in two chunks (the second with a past) gives PyTorch's logits at every
    position; then cached decode steps continue to match."""
    model, _ = hf_policy
    ids = policy.encode(GenerateJob(prompt=PROMPTS[1]))
    cut = len(ids) // 2
    with torch.inference_mode():
        full = model(torch.tensor([ids])).logits[0].numpy()
    one = np.ones((1, cut), dtype=np.int64)
    logits, past = policy.forward(
        np.array([ids[:cut]]), one, np.arange(cut)[None], policy.empty_cache(1)
    )
    np.testing.assert_allclose(logits[0], full[cut - 1], atol=1e-4)
    rest = len(ids) - cut
    logits, past = policy.forward(
        np.array([ids[cut:]]),
        np.ones((1, len(ids)), dtype=np.int64),
        np.arange(cut, len(ids))[None],
        past,
    )
    np.testing.assert_allclose(logits[0], full[-1], atol=1e-4)
    assert past[0].shape == (1, 1, len(ids), 16) and rest > 0
    tokens = list(ids)
    for _ in range(3):
        nxt = int(logits[0].argmax())
        tokens.append(nxt)
        logits, past = policy.forward(
            np.array([[nxt]]),
            np.ones((1, len(tokens)), dtype=np.int64),
            np.array([[len(tokens) - 1]]),
            past,
        )
        with torch.inference_mode():
            expected = model(torch.tensor([tokens])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[0], expected, atol=1e-4)


def test_engine_greedy_equals_transformers_generate(policy: LoadedPolicy, hf_policy: Any) -> None:
    """Token for token, one prompt at a time and all prompts batched together (left-padded)."""
    model, _ = hf_policy
    engine = GenerationEngine(max_new_tokens=64)
    engine.set_model(policy)
    jobs = [GenerateJob(prompt=p, n=2, params=greedy()) for p in PROMPTS]
    jobs.append(
        GenerateJob(
            messages=(
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ),
            params=greedy(),
        )
    )
    batched = engine.process(jobs)
    for job, together in zip(jobs, batched, strict=True):
        (alone,) = engine.process([job])
        ids = policy.encode(job)
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                do_sample=False,
                max_new_tokens=16,
                pad_token_id=policy.formatter.format.pad_token_id,
            )
        expected = out[0, len(ids) :].tolist()
        assert not isinstance(alone, Exception) and not isinstance(together, Exception)
        assert len(set(expected)) > 2, "the tiny model should not repeat one token"
        for result in (alone, together):
            assert result.prompt_tokens == len(ids)
            for completion in result.completions:
                assert completion.token_ids == expected
                reason = FinishReason.EOS if expected[-1] == 2 else FinishReason.LENGTH
                assert completion.finish_reason is reason


def test_stop_strings_cut_the_text(policy: LoadedPolicy) -> None:
    engine = GenerationEngine(max_new_tokens=64)
    engine.set_model(policy)
    (free,) = engine.process([GenerateJob(prompt=PROMPTS[0], params=greedy())])
    assert not isinstance(free, Exception)
    text = free.completions[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    job = GenerateJob(prompt=PROMPTS[0], params=SamplingParams(0.0, stop=(stop, "\x00never")))
    (cut,) = engine.process([job])
    assert not isinstance(cut, Exception)
    completion = cut.completions[0]
    assert completion.finish_reason is FinishReason.STOP_STRING
    assert completion.text == text[: text.index(stop)]
    assert completion.token_ids == free.completions[0].token_ids[: len(completion.token_ids)]


def test_prompt_longer_than_the_context_is_refused_alone(policy: LoadedPolicy) -> None:
    engine = GenerationEngine(max_new_tokens=64)
    engine.set_model(policy)
    long = GenerateJob(prompt="word " * 400, params=greedy())
    ok = GenerateJob(prompt="hi", params=greedy())
    refused, served = engine.process([long, ok])
    assert isinstance(refused, Exception) and "prompt:" in str(refused) and "256" in str(refused)
    assert not isinstance(served, Exception) and served.completions[0].token_ids


def test_generation_stops_at_the_context_length(policy: LoadedPolicy) -> None:
    job = GenerateJob(prompt="word " * 120, params=greedy(max_new_tokens=200))
    ids = policy.encode(job)
    assert policy.token_budget(job, len(ids), limit=1024) == 256 - len(ids)


def test_parity_failure_refuses_to_publish(
    tmp_path: Path,
    tiny_policy_checkpoint: Path,
    smollm2_tokenizer_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A graph that is not the model (here: another model's weights) is never published."""
    other = AutoModelForCausalLM.from_pretrained(
        build_tiny_policy(tmp_path / "other", smollm2_tokenizer_dir, seed=7)
    )
    real_export = policy_export.export_onnx
    monkeypatch.setattr(
        policy_export,
        "export_onnx",
        lambda model, path, layout: real_export(other.eval(), path, layout),
    )
    registry = ModelRegistry(tmp_path / "registry", "policy")
    with pytest.raises(PolicyParityError, match="prefill"):
        export_policy_checkpoint(str(tiny_policy_checkpoint), registry, max_length=64)
    assert registry.list_versions() == []


def test_export_records_lineage_and_promotes_through_the_gate(
    tmp_path: Path, hf_policy: Any
) -> None:
    model, tokenizer = hf_policy
    registry = ModelRegistry(tmp_path / "registry", "policy")
    first = export_policy(model, tokenizer, registry, max_length=64, promote=True)
    assert first.parent is None and registry.promoted() == first.version
    record = {"promoted": True, "reason": "win rate 0.61 > 0.5", "win_rate": 0.61}
    second = export_policy(
        model,
        tokenizer,
        registry,
        metrics={"win_rate": 0.61},
        notes={"method": "dpo"},
        data_cursor="42",
        promotion=record,
        max_length=64,
        backbone="tiny",
    )
    assert second.parent == first.version  # the promoted version by default
    assert second.metrics == {"win_rate": 0.61} and second.data_cursor == "42"
    assert second.notes["method"] == "dpo" and second.promotion == record
    assert second.backbone == "tiny"
    assert registry.promoted() == second.version
    assert registry.promotion_history()[-1]["reason"] == "win rate 0.61 > 0.5"
    assert model.training is False
    with pytest.raises(ValueError, match="policy registry"):
        export_policy(model, tokenizer, ModelRegistry(tmp_path / "r", "reward"))


def test_int8_graph_is_kept_only_behind_its_gate(tmp_path: Path, hf_policy: Any) -> None:
    model, tokenizer = hf_policy
    registry = ModelRegistry(tmp_path / "registry", "policy")
    kept = export_policy(
        model, tokenizer, registry, max_length=64, quantize="int8", int8_min_agreement=0.0
    )
    assert kept.onnx_files == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert kept.default_precision == "int8"
    report = kept.quantization
    assert report is not None and report.passed and report.pairs == 3 * 16
    assert 0 <= report.pairwise_agreement <= 1 and kept.notes["int8_mean_kl_vs_fp32"] >= 0
    served = LoadedPolicy.load(registry, kept.version, provider="cpu")
    assert served.precision == "int8"
    served.smoke_test()
    assert LoadedPolicy.load(registry, kept.version, precision="fp32").precision == "fp32"
    refused = export_policy(
        model, tokenizer, registry, max_length=64, quantize="int8", int8_min_agreement=1.01
    )
    assert refused.onnx_files == {"fp32": "model.onnx"} and refused.default_precision == "fp32"
    assert refused.quantization is not None and not refused.quantization.passed
    assert "model.int8.onnx" not in refused.files


def test_the_cli_exports_and_promotes(
    tmp_path: Path, tiny_policy_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plaudit.cli import main

    root = tmp_path / "registry"
    argv = ["export", "policy", "--checkpoint", str(tiny_policy_checkpoint)]
    assert main([*argv, "--registry", str(root), "--max-length", "64", "--promote"]) == 0
    report = json.loads(capsys.readouterr().out)
    registry = ModelRegistry(root, "policy")
    assert report["version"] == registry.promoted() and report["precision"] == "fp32"
    assert report["prefill_max_rel_diff"] < 1e-5
    assert registry.manifest(report["version"]).generation is not None


# -- the sampler -------------------------------------------------------------------------------
def test_sampler_limits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 1000)).astype(np.float32)
    best = logits.argmax(-1)
    assert (sample_tokens(logits, SamplingParams(temperature=0), rng) == best).all()
    assert (sample_tokens(logits, SamplingParams(top_k=1), rng) == best).all()
    assert (sample_tokens(logits, SamplingParams(top_p=1e-6), rng) == best).all()
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    for _ in range(20):
        picked = sample_tokens(logits, SamplingParams(top_k=5, temperature=2.0), rng)
        assert all(p in row for p, row in zip(picked, top5, strict=True))
    a = sample_tokens(logits, SamplingParams(seed=3), np.random.default_rng(3))
    b = sample_tokens(logits, SamplingParams(seed=3), np.random.default_rng(3))
    assert (a == b).all()


def test_sampler_follows_the_distribution() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    rng = np.random.default_rng(1)
    draws = np.array(
        [sample_tokens(logits, SamplingParams(), rng)[0] for _ in range(4000)], dtype=np.int64
    )
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    nucleus = [sample_tokens(logits, SamplingParams(top_p=0.7), rng)[0] for _ in range(2000)]
    freq = np.bincount(nucleus, minlength=4) / len(nucleus)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.04)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])  # nearly flat (full sort) to peaked
def test_nucleus_equals_a_full_sort(top_p: float, scale: float) -> None:
    rng = np.random.default_rng(int(scale * 100) + int(top_p * 1000))
    x = rng.normal(size=5000) * scale
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    ids, kept = _nucleus(probs, top_p)
    order = np.argsort(-probs, kind="stable")
    size = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    assert set(ids.tolist()) == set(order[:size].tolist())
    np.testing.assert_array_equal(kept, probs[ids])


# -- the real model ----------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_smollm2_exports_and_answers(tmp_path: Path) -> None:
    started = time.perf_counter()
    registry = ModelRegistry(tmp_path / "registry", "policy")
    manifest = export_policy_checkpoint("smollm2", registry, max_length=128, max_new_tokens=24)
    assert manifest.backbone == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert manifest.notes["prefill_max_rel_diff"] < 1e-4
    policy = LoadedPolicy.load(registry, manifest.version, provider="cpu")
    engine = GenerationEngine(max_new_tokens=64)
    engine.set_model(policy)
    (result,) = engine.process(
        [GenerateJob(prompt="What is the capital of France?", params=greedy(max_new_tokens=24))]
    )
    assert not isinstance(result, Exception)
    completion = result.completions[0]
    assert "Paris" in completion.text, completion.text
    assert completion.finish_reason is FinishReason.EOS
    assert time.perf_counter() - started < 120
