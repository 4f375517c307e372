"""The contract between the trainer's exports and the serving runtimes.

Invariants: a registry version holds ``tokenizer.json`` and its graphs under :data:`FP32_FILE`
(and :data:`INT8_FILE` when int8 passed its parity check), exported at :data:`OPSET`. A policy
graph takes :data:`POLICY_INPUTS` plus :func:`past_names` and returns :data:`LOGITS` plus
:func:`present_names`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

OPSET = 17
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"  # reward versions exported with fp16 (for CUDA), when it passed
TOKENIZER_FILE = "tokenizer.json"
POLICY_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"


def past_names(num_layers: int) -> list[str]:
    """Graph inputs of the cache, in order: past_key_0, past_value_0, past_key_1, ..."""
    return [f"past_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Graph outputs of the cache, in the order of :func:`past_names`."""
    return [f"present_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    *,
    per_channel: bool = False,
    nodes_to_exclude: Sequence[str] = (),
) -> None:
    """Dynamic int8 weights. ``per_channel`` (one scale per output channel) is what policies use:
    on SmolLM2-135M the KL to fp32 is 0.20 nats per token against 0.27 with one per tensor.
    Nodes named in ``nodes_to_exclude`` keep their fp32 weights and arithmetic."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # the quantizer logs every tensor on the root logger
    try:
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            nodes_to_exclude=list(nodes_to_exclude),
            # fused com.microsoft ops defeat shape inference; their tensors are all fp32
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)


_LAYER = re.compile(r"layers?[./_](\d+)[./_]")


def edge_layer_nodes(fp32_path: Path) -> list[str]:
    """Names of the graph's nodes in its first and last transformer layer, plus the embeddings
    before the first and the pooler / reward head after the last.

    A node's layer is the index in its own name (``/model/bert/encoder/layer.3/...``) or, for
    nodes the fusion renamed (``Attention_3``), that of the next named node in graph order;
    nodes after the last named layer are the head. A graph with fewer than three named layers
    gives [] (nothing would be left to quantize)."""
    import onnx

    nodes = onnx.load(str(fp32_path), load_external_data=False).graph.node
    layers: list[int | None] = []
    current: int | None = None  # None: after the last layer (the head)
    for node in reversed(nodes):
        match = _LAYER.search(node.name)
        if match:
            current = int(match.group(1))
        layers.append(current)
    layers.reverse()
    named = [layer for layer in layers if layer is not None]
    if len(set(named)) < 3:
        return []
    edges = {min(named), max(named), None}
    return [node.name for node, layer in zip(nodes, layers, strict=True) if layer in edges]


@dataclass(frozen=True)
class Int8Recipe:
    """One way to build a reward model's int8 graph (see :data:`REWARD_INT8_RECIPES`)."""

    name: str
    per_channel: bool = True
    fp32_edges: bool = False  # keep the first and last layer, embeddings and head in fp32

    def build(self, fp32_path: Path, int8_path: Path) -> bool:
        """Write this recipe's int8 graph of ``fp32_path`` to ``int8_path``; False (nothing
        written) where the recipe does not apply (``fp32_edges`` on fewer than three layers)."""
        exclude = edge_layer_nodes(fp32_path) if self.fp32_edges else []
        if self.fp32_edges and not exclude:
            return False
        quantize_int8(fp32_path, int8_path, per_channel=self.per_channel, nodes_to_exclude=exclude)
        return True


# Tried in this order by the reward export, fastest first; the first whose rewards pass the
# gate (pair order and accuracy against fp32) is kept. Both quantize the fused graph (QAttention,
# MatMulInteger, QEmbedLayerNormalization: VNNI kernels on AVX-512 CPUs) with one scale per
# output channel. Measured on all-MiniLM-L6-v2 and left out: one scale per tensor (no faster,
# larger errors); static QDQ calibrated on the reference texts (slower than fp32 on ONNX Runtime
# 1.31's CPU provider, and per-tensor activation ranges fixed in advance order pairs worse);
# bf16 (the CPU provider has no bf16 MatMul or Attention kernel).
REWARD_INT8_RECIPES: tuple[Int8Recipe, ...] = (
    Int8Recipe("dynamic-int8-per-channel"),
    Int8Recipe("dynamic-int8-per-channel-fp32-edges", fp32_edges=True),
)
