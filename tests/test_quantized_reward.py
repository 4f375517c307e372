"""The reward int8 gate: per model, on the reference pairs, pair order and held-out accuracy
against fp32; what the manifest records; what the served int8 graph answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from plaudit.services.common.registry import ModelManifest, ModelRegistry, QuantizationReport
from plaudit.services.runtime.contract import REWARD_INT8_RECIPES, Int8Recipe, edge_layer_nodes
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.data import read_pairs, reference_pairs_path
from plaudit.trainer.export import (
    REFERENCE_GROUP_TOKENS,
    ExportConfig,
    export_reward,
    int8_verdict,
    pair_accuracy,
    pairwise_agreement,
)

PAIRS = 32


def test_accuracy_and_verdict_on_literal_rewards() -> None:
    # pairs (c, r): (3, 1) right, (0, 2) wrong, (5, 5) tie, (4, 0) right
    fp32 = np.array([3.0, 1.0, 0.0, 2.0, 5.0, 5.0, 4.0, 0.0])
    assert pair_accuracy(fp32) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    # int8 flips the last pair: agreement 3/4 (the tie stays a tie), accuracy 1.5/4
    int8 = np.array([3.0, 1.0, 0.0, 2.0, 5.0, 5.0, 0.0, 4.0])
    agreement, acc32, acc8, reason = int8_verdict(
        fp32, int8, min_agreement=0.75, max_accuracy_drop=0.25
    )
    assert (agreement, acc32, acc8, reason) == (0.75, 0.625, 0.375, None)
    *_, reason = int8_verdict(fp32, int8, min_agreement=0.8, max_accuracy_drop=1.0)
    assert reason is not None and reason.startswith("pair-order agreement 0.7500 < 0.8")
    *_, reason = int8_verdict(fp32, int8, min_agreement=0.5, max_accuracy_drop=0.2)
    assert reason is not None and reason.startswith("accuracy drop 0.2500")
    # a rise in accuracy is never refused, a drop of exactly the bound is kept
    *_, reason = int8_verdict(int8, fp32, min_agreement=0.0, max_accuracy_drop=0.0)
    assert reason is None


def test_edge_layers_are_the_first_and_last_layer_with_embeddings_and_head(
    tmp_path: Path,
) -> None:
    names = [
        "EmbedLayerNormalization_0",
        "Attention_0",
        "/model/bert/encoder/layer.0/output/dense/MatMul",
        "Attention_1",
        "/model/bert/encoder/layer.1/output/dense/MatMul",
        "Attention_2",
        "/model/bert/encoder/layer.2/output/dense/MatMul",
        "/model/bert/pooler/dense/Gemm",
    ]
    nodes = [
        helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"], name=name)
        for i, name in enumerate(names)
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(f"t{len(names)}", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "g.onnx")
    assert edge_layer_nodes(tmp_path / "g.onnx") == names[:3] + names[5:]
    # two layers: keeping both in fp32 would quantize nothing, so the recipe does not apply
    graph.node.pop(5)
    graph.node.pop(5)
    onnx.save(helper.make_model(graph), tmp_path / "g2.onnx")
    assert edge_layer_nodes(tmp_path / "g2.onnx") == []


@pytest.fixture(scope="module")
def exports(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One registry, three exports of the tiny model: kept, refused on accuracy (an impossible
    bound), refused on pair order."""
    root = tmp_path_factory.mktemp("int8-registry")
    reg = ModelRegistry(root, "reward")
    base = {
        "checkpoint": str(tiny_checkpoint),
        "max_length": 64,
        "reference_pairs": PAIRS,
        "quantize": "int8",
    }
    versions = {"root": str(root)}
    for key, gate in {
        "kept": {"int8_min_agreement": 0.0, "int8_max_accuracy_drop": 1.0},
        "accuracy": {"int8_min_agreement": 0.0, "int8_max_accuracy_drop": -1.0},
        "agreement": {"int8_min_agreement": 1.01, "int8_max_accuracy_drop": 1.0},
    }.items():
        versions[key] = export_reward(ExportConfig(**base, **gate), reg).version  # type: ignore[arg-type]
    return versions


def _manifest(exports: dict[str, str], key: str) -> ModelManifest:
    return ModelRegistry(Path(exports["root"]), "reward").manifest(exports[key])


def test_gate_keeps_the_first_recipe_that_passes(exports: dict[str, str]) -> None:
    m = _manifest(exports, "kept")
    q = m.quantization
    assert q is not None and q.passed and q.reason is None
    assert m.default_precision == "int8" and m.onnx_files["int8"] == "model.int8.onnx"
    assert q.method == REWARD_INT8_RECIPES[0].name and len(q.candidates) == 1
    assert q.threshold == 0.0 and q.max_accuracy_drop == 1.0 and q.pairs == PAIRS
    assert q.accuracy is not None and q.accuracy_fp32 is not None
    assert q.items_per_s is not None and q.items_per_s > 0
    assert q.fp32_items_per_s is not None and q.fp32_items_per_s > 0
    (tried,) = q.candidates
    assert tried["passed"] and tried["pairwise_agreement"] == q.pairwise_agreement


@pytest.mark.parametrize(
    ("key", "why"), [("accuracy", "accuracy drop"), ("agreement", "pair-order")]
)
def test_gate_refuses_int8_and_says_why(exports: dict[str, str], key: str, why: str) -> None:
    m = _manifest(exports, key)
    q = m.quantization
    assert q is not None and not q.passed and q.reason is not None and why in q.reason
    assert m.default_precision == "fp32" and m.onnx_files == {"fp32": "model.onnx"}
    assert not any(name.startswith("model.int8") for name in m.files)
    # every recipe that applies to a 2-layer graph was tried (fp32-edges needs 3 layers)
    assert [c["method"] for c in q.candidates] == [REWARD_INT8_RECIPES[0].name]
    assert all(not c["passed"] and why in c["reason"] for c in q.candidates)
    if key == "accuracy":
        assert q.max_accuracy_drop == -1.0 and q.accuracy_fp32 is not None


def test_served_int8_rewards_match_the_manifests_gate_figures(exports: dict[str, str]) -> None:
    reg = ModelRegistry(Path(exports["root"]), "reward")
    version = exports["kept"]
    int8 = LoadedRewardModel.load(reg, version, provider="cpu")
    fp32 = LoadedRewardModel.load(reg, version, precision="fp32", provider="cpu")
    assert int8.precision == "int8" and fp32.precision == "fp32"
    prompts: list[str] = []
    completions: list[str] = []
    for pair in read_pairs(reference_pairs_path(), PAIRS):
        prompts += [pair.prompt, pair.prompt]
        completions += [pair.chosen, pair.rejected]
    # the export's grouping: int8 activations are quantized per batch, so batches must match
    served, _, _ = int8.score_raw(prompts, completions, group_tokens=REFERENCE_GROUP_TOKENS)
    reference, _, _ = fp32.score_raw(prompts, completions, group_tokens=REFERENCE_GROUP_TOKENS)
    q = reg.manifest(version).quantization
    assert q is not None
    assert pairwise_agreement(reference, served) == q.pairwise_agreement
    assert pair_accuracy(served) == q.accuracy
    assert pair_accuracy(reference) == q.accuracy_fp32
    assert not np.allclose(served, reference, atol=1e-7)  # it is another graph


def test_manifests_without_the_new_fields_still_load(exports: dict[str, str]) -> None:
    old = {"method": "dynamic-int8", "pairwise_agreement": 0.97, "threshold": 0.95}
    report = QuantizationReport.model_validate({**old, "pairs": 128, "passed": True})
    assert report.accuracy is None and report.candidates == [] and report.reason is None
    reg = ModelRegistry(Path(exports["root"]), "reward")
    path = Path(reg.versions_dir) / exports["kept"] / "manifest.json"
    data = json.loads(path.read_text())
    data["quantization"] = {k: data["quantization"][k] for k in (*old, "pairs", "passed")}
    path.write_text(json.dumps(data))
    q = reg.manifest(exports["kept"]).quantization
    assert q is not None and q.passed and q.accuracy is None and q.max_accuracy_drop is None
    assert LoadedRewardModel.load(reg, exports["kept"], provider="cpu").precision == "int8"


class _Negated(Int8Recipe):
    """A recipe whose graph turns every reward around: it must be refused."""

    def build(self, fp32_path: Path, int8_path: Path) -> bool:
        model = onnx.load(str(fp32_path))
        name = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [f"{o}_before_neg" if o == name else o for o in node.output]
        model.graph.node.append(helper.make_node("Neg", [f"{name}_before_neg"], [name]))
        onnx.save(model, str(int8_path))
        return True


class _Same(Int8Recipe):
    """A recipe whose graph is the fp32 graph: it passes any gate."""

    def build(self, fp32_path: Path, int8_path: Path) -> bool:
        shutil.copyfile(fp32_path, int8_path)
        return True


def test_a_refused_recipe_is_removed_and_the_next_one_is_tried(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    reg = ModelRegistry(tmp_path, "reward")
    cfg = ExportConfig(
        checkpoint=str(tiny_checkpoint),
        max_length=64,
        reference_pairs=PAIRS,
        quantize="int8",
        int8_recipes=(_Negated("negated"), _Same("same")),
    )
    m = reg.manifest(export_reward(cfg, reg).version)
    q = m.quantization
    assert q is not None and q.passed and q.method == "same"
    assert [(c["method"], c["passed"]) for c in q.candidates] == [
        ("negated", False),
        ("same", True),
    ]
    assert q.candidates[0]["pairwise_agreement"] == 0.0
    assert q.candidates[0]["reason"].startswith("pair-order agreement 0.0000 < 0.98")
    assert q.pairwise_agreement == 1.0 and q.accuracy == q.accuracy_fp32
    assert m.default_precision == "int8" and m.onnx_files["int8"] == "model.int8.onnx"
    served = (Path(reg.versions_dir) / m.version / "model.int8.onnx").read_bytes()
    assert served == (Path(reg.versions_dir) / m.version / "model.onnx").read_bytes()
