"""The contract between the trainer's exports and the serving runtimes.

Invariants: a registry version holds ``tokenizer.json`` and its graphs under :data:`FP32_FILE`
(and :data:`INT8_FILE` when int8 passed its parity check), exported at :data:`OPSET`. A policy
graph takes :data:`POLICY_INPUTS` plus :func:`past_names` and returns :data:`LOGITS` plus
:func:`present_names`.
"""

from __future__ import annotations

import logging
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


def quantize_int8(fp32_path: Path, int8_path: Path, *, per_channel: bool = False) -> None:
    """Dynamic int8 weights. ``per_channel`` (one scale per output channel) is what policies use:
    on SmolLM2-135M the KL to fp32 is 0.20 nats per token against 0.27 with one per tensor."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # the quantizer logs every tensor on the root logger
    try:
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            # fused com.microsoft ops defeat shape inference; their tensors are all fp32
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)
