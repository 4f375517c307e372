"""Export and the engine without gRPC: parity with PyTorch, grouping, normalisation, int8 gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from plaudit.services.common.errors import FailedPreconditionError, UnavailableError
from plaudit.services.common.onnx_runtime import CPU, select_providers
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.engine import RewardEngine, ScoreJob
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.data import read_pairs, reference_pairs_path
from plaudit.trainer.export import ExportConfig, export_reward, pairwise_agreement

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "hi", "Explain gravity briefly."]
COMPLETIONS = ["Paris.", "Why did the chicken cross the road?", "hello there", "Mass attracts."]


@pytest.fixture(scope="module")
def loaded(tiny_registry: Path) -> LoadedRewardModel:
    reg = ModelRegistry(tiny_registry, "reward")
    version = reg.promoted()
    assert version is not None
    return LoadedRewardModel.load(reg, version, provider="cpu")


def test_manifest_describes_the_version(loaded: LoadedRewardModel) -> None:
    m = loaded.manifest
    assert m.kind == "reward"
    assert m.onnx_files == {"fp32": "model.onnx"}
    assert m.text_format["kind"] == "pair" and m.text_format["max_length"] == 64
    assert m.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert m.normalization.reference == "64 reference texts" and m.normalization.std > 0
    assert {"model.onnx", "tokenizer.json"} <= set(m.files)
    assert m.notes["fp32_max_abs_diff_vs_torch"] < 1e-4


def test_engine_matches_pytorch_scoring_the_same_pairs(
    loaded: LoadedRewardModel, tiny_checkpoint: Path
) -> None:
    """An independent path: the HF tokenizer's own pair encoding and the PyTorch model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    with torch.inference_mode():
        batch = tok(PROMPTS, COMPLETIONS, padding=True, return_tensors="pt")
        expected = model(**batch).logits[:, 0].numpy()
    raw, truncated, lengths = loaded.score_raw(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(raw, expected, atol=1e-4)
    assert not truncated.any()
    assert lengths.tolist() == batch["attention_mask"].sum(1).tolist()


def test_length_grouping_does_not_change_scores(loaded: LoadedRewardModel) -> None:
    pairs = list(read_pairs(reference_pairs_path(), 16))
    prompts = [p.prompt for p in pairs]
    completions = [p.chosen for p in pairs]
    one_per_call, _, _ = loaded.score_raw(prompts, completions, group_tokens=1)
    all_in_one, _, _ = loaded.score_raw(prompts, completions, group_tokens=1 << 20)
    grouped, truncated, lengths = loaded.score_raw(prompts, completions, group_tokens=256)
    np.testing.assert_allclose(one_per_call, all_in_one, atol=1e-5)
    np.testing.assert_allclose(grouped, all_in_one, atol=1e-5)
    assert lengths.max() <= 64 and truncated.any()  # HH dialogues overflow 64 tokens


def test_engine_keeps_request_order_and_standardizes(loaded: LoadedRewardModel) -> None:
    engine = RewardEngine(group_tokens=128)
    (missing,) = engine.process([ScoreJob(["a"], ["b"])])
    assert isinstance(missing, UnavailableError)  # only the jobs needing the model fail
    engine.set_model(loaded)
    jobs = [
        ScoreJob(PROMPTS[:2], COMPLETIONS[:2], standardize=False),
        ScoreJob(PROMPTS[2:], COMPLETIONS[2:], standardize=True),
        ScoreJob(PROMPTS[::-1], COMPLETIONS[::-1]),  # default: the version's normalisation
    ]
    raw_all, _, _ = loaded.score_raw(PROMPTS, COMPLETIONS)
    outcomes = engine.process(jobs)
    assert all(isinstance(o, dict) and list(o) == ["default"] for o in outcomes)
    first, second, third = (o["default"] for o in outcomes if isinstance(o, dict))
    np.testing.assert_allclose(first.rewards, raw_all[:2], atol=1e-5)
    norm = loaded.manifest.normalization
    np.testing.assert_allclose(second.rewards, (raw_all[2:] - norm.mean) / norm.std, atol=1e-4)
    np.testing.assert_allclose(third.raw, raw_all[::-1], atol=1e-5)
    np.testing.assert_allclose(third.rewards, (raw_all[::-1] - norm.mean) / norm.std, atol=1e-4)
    assert {first.version, second.version, third.version} == {loaded.version}
    assert first.tokens > 0


def test_engine_scores_each_named_model_once_and_fails_only_jobs_needing_a_missing_one(
    loaded: LoadedRewardModel,
) -> None:
    engine = RewardEngine(["helpfulness", "safety"], group_tokens=128)
    engine.set_model(loaded, "helpfulness")
    jobs = [
        ScoreJob(PROMPTS[:2], COMPLETIONS[:2], models=("helpfulness",)),
        ScoreJob(PROMPTS[2:], COMPLETIONS[2:], models=("helpfulness", "safety")),
        ScoreJob(PROMPTS[:1], COMPLETIONS[:1], models=("elsewhere",)),
    ]
    one, both, unknown = engine.process(jobs)
    assert isinstance(one, dict) and list(one) == ["helpfulness"]
    assert isinstance(both, UnavailableError) and "safety" in str(both)
    assert isinstance(unknown, FailedPreconditionError) and "elsewhere" in str(unknown)
    engine.set_model(loaded, "safety")
    (both,) = engine.process(jobs[1:2])
    assert isinstance(both, dict) and set(both) == {"helpfulness", "safety"}
    np.testing.assert_allclose(both["safety"].raw, both["helpfulness"].raw, atol=1e-6)


def test_provider_selection_is_cpu_without_a_gpu() -> None:
    assert select_providers("auto")[-1] == CPU
    assert select_providers("cpu") == [CPU]


def test_pairwise_agreement_counts_matching_orders() -> None:
    ref = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 1.0, 5.0, 6.0])
    cand = np.array([3.0, 1.0, 0.5, 0.2, 1.0, 2.0, 4.0, 9.0])
    assert pairwise_agreement(ref, cand) == 0.5


def test_int8_is_kept_only_when_its_agreement_passes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path, "reward")
    base = ExportConfig(
        checkpoint=str(tiny_checkpoint), max_length=64, reference_pairs=32, quantize="int8"
    )
    lenient = export_reward(
        ExportConfig(**{**base.__dict__, "int8_min_agreement": 0.0, "int8_max_accuracy_drop": 1.0}),
        reg,
        promote=False,
    )
    assert lenient.quantization is not None and lenient.quantization.passed
    assert lenient.onnx_files == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert lenient.default_precision == "int8"
    strict = export_reward(
        ExportConfig(**{**base.__dict__, "int8_min_agreement": 1.01}), reg, promote=False
    )
    assert strict.quantization is not None and not strict.quantization.passed
    assert strict.quantization.threshold == 1.01 and strict.quantization.pairs == 32
    assert strict.onnx_files == {"fp32": "model.onnx"} and strict.default_precision == "fp32"
    model = LoadedRewardModel.load(reg, lenient.version, provider="cpu")
    assert model.precision == "int8"
    with pytest.raises(FailedPreconditionError, match="no int8 graph"):
        LoadedRewardModel.load(reg, strict.version, precision="int8")


def test_a_graph_whose_inputs_differ_from_the_manifest_is_refused(
    tiny_registry: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_registry, tmp_path / "reg")
    reg = ModelRegistry(tmp_path / "reg", "reward")
    version = reg.promoted()
    assert version is not None
    path = Path(reg.versions_dir) / version / "manifest.json"
    data = json.loads(path.read_text())
    data["input_names"] = ["input_ids", "attention_mask"]
    path.write_text(json.dumps(data))
    with pytest.raises(FailedPreconditionError, match="graph inputs"):
        LoadedRewardModel.load(reg, version)
