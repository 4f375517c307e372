"""Weight-only quantised policy graphs (ONNX Runtime's ``MatMulNBits``): the export's gate keeps
or refuses them, the serving runtime loads and generates with them, and the quantised graph
computes exactly what its dequantised weights say."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer

from plaudit.services.common.registry import ModelRegistry, VersionFolder
from plaudit.services.runtime.contract import FP32_FILE, TOKENIZER_FILE
from plaudit.services.runtime.policy_model import (
    GenerateJob,
    LoadedPolicy,
    SamplingParams,
    generate_jobs,
)
from plaudit.trainer.policy_export import (
    POLICY_QUANTIZATIONS,
    WeightQuant,
    export_policy,
    quantize_policy_graph,
)

PROMPTS = [
    "What is the capital of France?",
    "\n\nHuman: Name a fruit.\n\nAssistant: An apple.\n\nHuman: Another one?\n\nAssistant:",
    "hi",
]
# the tiny policy: 2 layers of q, k, v, o, gate, up, down projections, and the LM head
LINEAR_LAYERS = 2 * 7 + 1


@pytest.fixture(scope="module")
def hf_policy(tiny_policy_checkpoint: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_checkpoint, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_policy_checkpoint)


@pytest.fixture(scope="module")
def fp32_folder(tiny_policy_registry: Path) -> VersionFolder:
    registry = ModelRegistry(tiny_policy_registry, "policy")
    return registry.open_version(registry.promoted() or "")


def nbits_nodes(path: Path) -> list[dict[str, Any]]:
    """The attributes of every MatMulNBits node of the graph at ``path``."""
    graph = onnx.load(str(path)).graph
    return [
        {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for node in graph.node
        if node.op_type == "MatMulNBits"
    ]


def dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every MatMulNBits node replaced by a float MatMul on its dequantised
    weights: ``(q - 2**(bits-1)) * scale`` per block (symmetric: no zero point input), 4-bit
    values packed two to a byte, low nibble first."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        assert len(node.input) < 4 or not node.input[3], "symmetric: no zero points"
        packed = numpy_helper.to_array(inits[node.input[1]])
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
        if bits == 4:
            q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
        else:
            q = packed.reshape(n, -1)
        blocks = scales.shape[1]
        w = (q.astype(np.float32) - 2 ** (bits - 1)).reshape(n, blocks, block)
        weight = (w * scales[:, :, None]).reshape(n, blocks * block)[:, :k].T.copy()
        name = f"{node.input[1]}_dequantized"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        nodes.append(
            helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)
        )
    graph.ClearField("node")
    graph.node.extend(nodes)
    return model


def graph_policy(fp32: VersionFolder, graph: onnx.ModelProto | Path, root: Path) -> LoadedPolicy:
    """A policy serving ``graph`` (the fp32 version's tokenizer and manifest otherwise)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(fp32.path(TOKENIZER_FILE), root / TOKENIZER_FILE)
    if isinstance(graph, Path):
        shutil.copy(graph, root / FP32_FILE)
    else:
        onnx.save(graph, str(root / FP32_FILE))
    return LoadedPolicy.from_dir(root, fp32.manifest, precision="fp32", provider="cpu")


def prefill_logits(policy: LoadedPolicy, prompt: str) -> np.ndarray:
    ids = policy.encode(GenerateJob(prompt=prompt))
    n = len(ids)
    logits, _ = policy.forward(
        np.array([ids]), np.ones((1, n), dtype=np.int64), np.arange(n)[None], policy.empty_cache(1)
    )
    return logits


def greedy_tokens(policy: LoadedPolicy, prompt: str) -> list[int]:
    job = GenerateJob(prompt=prompt, params=SamplingParams(0.0, max_new_tokens=16))
    (result,) = generate_jobs(policy, [job], 16)
    assert not isinstance(result, Exception)
    return result.completions[0].token_ids


def test_int4_graph_is_kept_only_behind_its_gate(tmp_path: Path, hf_policy: Any) -> None:
    model, tokenizer = hf_policy
    registry = ModelRegistry(tmp_path / "registry", "policy")
    kept = export_policy(
        model, tokenizer, registry, max_length=64, quantize="int4", int8_min_agreement=0.0
    )
    assert kept.onnx_files == {"fp32": "model.onnx", "int4": "model.int4.onnx"}
    assert kept.default_precision == "int4"
    report = kept.quantization
    assert report is not None and report.passed and report.reason is None
    assert report.pairs == 3 * 16 and 0 <= report.pairwise_agreement <= 1
    assert "MatMulNBits 4-bit block 32" in report.method and "LM head 8-bit" in report.method
    (candidate,) = report.candidates
    assert (candidate["bits"], candidate["block_size"], candidate["accuracy_level"]) == (4, 32, 4)
    kl = kept.notes["int4_mean_kl_vs_fp32"]
    assert kl > 0 and candidate["mean_kl_vs_fp32"] == kl
    assert (kept.notes["quantization_bits"], kept.notes["quantization_block_size"]) == (4, 32)

    folder = registry.open_version(kept.version)
    nodes = nbits_nodes(folder.path("model.int4.onnx"))
    assert len(nodes) == LINEAR_LAYERS  # the LM head too, in 8 bits
    assert Counter(n["bits"] for n in nodes) == {4: LINEAR_LAYERS - 1, 8: 1}
    # int8 arithmetic, but fp32 for the MLP's down projection (activations with outliers)
    levels = {(n["block_size"], n["accuracy_level"]) for n in nodes}
    assert levels == {(32, 4), (32, 0)}
    served = LoadedPolicy.load(registry, kept.version, provider="cpu")
    assert served.precision == "int4"
    served.smoke_test()
    for prompt in PROMPTS:
        assert 0 < len(greedy_tokens(served, prompt)) <= 16

    # a threshold above what it measured refuses it, and the report says why
    strict = report.pairwise_agreement + 0.01
    refused = export_policy(
        model, tokenizer, registry, max_length=64, quantize="int4", int8_min_agreement=strict
    )
    assert refused.onnx_files == {"fp32": "model.onnx"} and refused.default_precision == "fp32"
    assert refused.quantization is not None and not refused.quantization.passed
    assert refused.quantization.pairwise_agreement == report.pairwise_agreement  # deterministic
    assert refused.quantization.reason is not None
    assert "next-token agreement" in refused.quantization.reason
    assert "model.int4.onnx" not in refused.files


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_graph_computes_its_dequantized_weights(
    tmp_path: Path, fp32_folder: VersionFolder, bits: int
) -> None:
    """With fp32 arithmetic (accuracy level 0) the MatMulNBits graph gives the logits and greedy
    tokens of the fp32 graph holding its dequantised weights; with the shipped int8 arithmetic
    (level 4, activations rounded to int8 per block) the logits stay close to them, much closer
    than the 4-bit weights are to fp32's."""
    shipped = POLICY_QUANTIZATIONS["int4" if bits == 4 else "int8-block"]
    exact = dataclasses.replace(shipped, accuracy_level=0)
    fp32 = graph_policy(fp32_folder, fp32_folder.path(FP32_FILE), tmp_path / "fp32")
    worst_weights = 0.0
    for spec in (exact, shipped):
        out = tmp_path / f"level{spec.accuracy_level}"
        out.mkdir()
        quantize_policy_graph(fp32_folder.path(FP32_FILE), out / spec.file, spec)
        assert len(nbits_nodes(out / spec.file)) == LINEAR_LAYERS
        quantized = graph_policy(fp32_folder, out / spec.file, out / "served")
        reference = graph_policy(
            fp32_folder, dequantized(onnx.load(str(out / spec.file))), out / "dequantized"
        )
        for prompt in PROMPTS:
            expected = prefill_logits(reference, prompt)
            scale = max(1.0, float(np.abs(expected).max()))
            error = float(np.abs(prefill_logits(quantized, prompt) - expected).max()) / scale
            weights = float(np.abs(prefill_logits(fp32, prompt) - expected).max()) / scale
            worst_weights = max(worst_weights, weights)
            if spec.accuracy_level == 0:
                assert error < 1e-5
                assert greedy_tokens(quantized, prompt) == greedy_tokens(reference, prompt)
            else:
                assert error < 0.1
    assert worst_weights > 1e-3  # the weights really were rounded


def test_the_lm_head_can_stay_fp32_or_take_other_bits(
    tmp_path: Path, fp32_folder: VersionFolder
) -> None:
    spec = WeightQuant("int4-fp32head", "model.int4h.onnx", "blockwise", 4, 32, head=False)
    quantize_policy_graph(fp32_folder.path(FP32_FILE), tmp_path / spec.file, spec)
    assert len(nbits_nodes(tmp_path / spec.file)) == LINEAR_LAYERS - 1
    graph = onnx.load(str(tmp_path / spec.file)).graph
    head = [n for n in graph.node if n.name == "/model/lm_head/MatMul"]
    assert len(head) == 1 and head[0].op_type == "MatMul"

    spec = dataclasses.replace(spec, file="model.int4h8.onnx", head=True, head_bits=8)
    quantize_policy_graph(fp32_folder.path(FP32_FILE), tmp_path / spec.file, spec)
    bits = Counter(n["bits"] for n in nbits_nodes(tmp_path / spec.file))
    assert bits == {4: LINEAR_LAYERS - 1, 8: 1}
    graph = onnx.load(str(tmp_path / spec.file)).graph
    assert not [
        n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("lm_head/MatMul")
    ]


def test_unknown_quantization_is_refused(tmp_path: Path, hf_policy: Any) -> None:
    model, tokenizer = hf_policy
    with pytest.raises(ValueError, match="int8-block"):
        export_policy(
            model, tokenizer, ModelRegistry(tmp_path, "policy"), max_length=64, quantize="int3"
        )


def test_the_cli_exports_an_int8_block_graph(
    tmp_path: Path, tiny_policy_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plaudit.cli import main

    argv = ["export", "policy", "--checkpoint", str(tiny_policy_checkpoint), "--max-length", "64"]
    root = tmp_path / "registry"
    flags = ["--quantize", "int8-block", "--int8-min-agreement", "0"]
    assert main([*argv, "--registry", str(root), *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "int8-block"
    assert report["quantization"]["passed"] and "8-bit block 32" in report["quantization"]["method"]
    assert report["int8-block_mean_kl_vs_fp32"] >= 0
    manifest = ModelRegistry(root, "policy").manifest(report["version"])
    assert manifest.onnx_files["int8-block"] == "model.int8b.onnx"


def snapped_to_gguf_grids(model: Any) -> Any:
    """``model`` with its weights rounded as a GGUF file stores them, blocks of 32 along the
    input: the linear layers as Q4_1 (w = minimum + step * q, q in 0..15), the tied embedding
    and LM head as Q8_0 (w = step * q, |q| <= 127)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight.reshape(module.weight.shape[0], -1, 32)
                low = w.min(-1, keepdim=True).values
                step = ((w.max(-1, keepdim=True).values - low) / 15).clamp(min=1e-12)
                module.weight.copy_((low + torch.round((w - low) / step) * step).flatten(1))
        embedding = model.get_input_embeddings().weight
        w = embedding.reshape(embedding.shape[0], -1, 32)
        step = (w.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)  # the padding row is 0
        embedding.copy_((torch.round(w / step) * step).flatten(1))
    return model


def test_int4_stores_gguf_grids_exactly(tmp_path: Path, hf_policy: Any) -> None:
    """A model whose weights are on GGUF's grids (as SmolLM2, converted from its Q4_1 file) is
    stored exactly: 4-bit blocks with the minimum as a term of its own, the 8-bit head as it
    is. With fp32 arithmetic the graph gives fp32's logits and greedy tokens; as exported
    (int8 arithmetic) only the activations' rounding is left: the KL to fp32 is a hundredth
    of what 4-bit rounding to nearest costs this model (0.35 nats; the tiny model's logits are
    nearly flat, so its top-1 agreement is no steadier a measure than that)."""
    model, tokenizer = hf_policy
    snapped = snapped_to_gguf_grids(copy.deepcopy(model))
    registry = ModelRegistry(tmp_path / "registry", "policy")
    kept = export_policy(
        snapped, tokenizer, registry, max_length=64, quantize="int4", int8_min_agreement=0.0
    )
    assert kept.default_precision == "int4" and kept.quantization is not None
    assert kept.quantization.passed and "grid-exact" in kept.quantization.method
    assert kept.notes["int4_mean_kl_vs_fp32"] < 0.01
    folder = registry.open_version(kept.version)
    bits = Counter(n["bits"] for n in nbits_nodes(folder.path("model.int4.onnx")))
    assert bits == {4: LINEAR_LAYERS - 1, 8: 1}

    spec = dataclasses.replace(POLICY_QUANTIZATIONS["int4"], accuracy_level=0)
    quantize_policy_graph(folder.path(FP32_FILE), tmp_path / spec.file, spec)
    exact = graph_policy(folder, tmp_path / spec.file, tmp_path / "exact")
    fp32 = LoadedPolicy.load(registry, kept.version, precision="fp32", provider="cpu")
    for prompt in PROMPTS:
        expected = prefill_logits(fp32, prompt)
        scale = max(1.0, float(np.abs(expected).max()))
        assert float(np.abs(prefill_logits(exact, prompt) - expected).max()) / scale < 1e-5
        assert greedy_tokens(exact, prompt) == greedy_tokens(fp32, prompt)
