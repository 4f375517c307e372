"""Writing reward graphs: PyTorch -> ONNX with fused transformer kernels, the weights in one
external-data file beside the graph once they near protobuf's 2 GB limit, and an fp16 copy.

Imports only torch, transformers, onnx and ONNX Runtime (nothing of the registry or of the
services' settings), so a benchmark on a bare GPU machine runs the very code the export runs
(``bench/bench_reward_cuda.py``).

Invariants: a graph written here either holds all its weights or keeps them in exactly one file,
:func:`data_file_for` of it, in the same folder, named by a bare relative ``location``; the
graph's inputs are ids and masks (int64) and its one output ``reward`` is fp32 (batch,), at every
precision.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from plaudit.services.runtime.contract import OPSET

log = logging.getLogger(__name__)

# encoders whose attention ONNX Runtime's transformer optimizer can fuse into one kernel
FUSABLE_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet"}
# fp32 weights from which a graph keeps them in an external-data file: half of protobuf's 2 GB
# limit, leaving room for the constants tracing adds
EXTERNAL_DATA_BYTES = 1 << 30
# tensors smaller than this stay inside the graph (shapes, scalars): ONNX's own default
EXTERNAL_MIN_TENSOR_BYTES = 1024


class ScalarReward(torch.nn.Module):
    """Exports the model's scalar reward with no KV cache: (batch, seq) -> (batch,).

    A model with several heads (``num_labels`` K > 1) is an ensemble of K reward heads on one
    backbone: the reward is their mean. With ``members`` the forward returns every head's reward,
    (batch, K) (training); :class:`EnsembleReward` exports both."""

    def __init__(self, model: PreTrainedModel, members: bool = False) -> None:
        super().__init__()
        self.model = model
        self.members = members
        self.pass_use_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.eval()  # torch.onnx.export restores the wrapper's mode afterwards: keep it eval

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor | bool] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.pass_use_cache:
            kwargs["use_cache"] = False
        logits = self.model(**kwargs).logits
        return logits if self.members else logits.mean(dim=-1)


class EnsembleReward(ScalarReward):
    """An ensemble's graph: (batch, seq) -> the mean reward (batch,) and the members' (batch, K)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model, members=True)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(input_ids, attention_mask, token_type_ids)
        return logits.mean(dim=-1), logits


def ensemble_members(model: PreTrainedModel) -> int:
    """How many reward heads ``model`` has (1: a single reward model)."""
    return int(model.config.num_labels or 1)


def data_file_for(graph: Path) -> Path:
    """The one external-data file of ``graph``: ``model.onnx`` -> ``model.onnx.data``."""
    return graph.with_name(graph.name + ".data")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are now (fp32 in an export)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def pairwise_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of (chosen, rejected) pairs ordered the same way; arrays interleave c0, r0, c1, r1…"""
    ref = np.sign(reference[0::2] - reference[1::2])
    cand = np.sign(candidate[0::2] - candidate[1::2])
    return float(np.mean(ref == cand))


def export_onnx(
    model: PreTrainedModel, path: Path, *, pad_token_id: int, token_type_ids: bool
) -> list[str]:
    """Trace ``model`` into ``path`` with dynamic batch and sequence axes; returns its inputs.

    Past 2 GB of weights PyTorch itself writes one file per tensor beside ``path``: write into a
    scratch folder (:func:`write_reward_graph` does) and re-save from there.
    """
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_type_ids else [])
    # the example must contain padding: an all-ones mask lets the model trace away its masking
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.long)
    ids = torch.full((2, 8), pad_token_id, dtype=torch.long).masked_fill(mask.bool(), 5)
    example = (ids, mask, torch.zeros_like(ids))[: len(names)]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["reward"] = {0: "batch"}
    ensemble = ensemble_members(model) > 1
    outputs = ["reward", "members"] if ensemble else ["reward"]
    if ensemble:
        axes["members"] = {0: "batch"}
    # the TorchScript exporter warns about tracing and its own deprecation on every export; the
    # parity check against PyTorch afterwards is what guards correctness: keep the output clean
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            EnsembleReward(model) if ensemble else ScalarReward(model),
            example,
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return names


def save_graph(model: Any, path: Path, external: bool) -> None:
    """Write an ``onnx.ModelProto`` to ``path``; with ``external`` its weights go to
    :func:`data_file_for` (replaced, never appended to). The proto's tensors no longer hold
    their data afterwards."""
    import onnx

    path.unlink(missing_ok=True)
    data_file_for(path).unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file_for(path).name,
            size_threshold=EXTERNAL_MIN_TENSOR_BYTES,
        )
    else:
        onnx.save_model(model, str(path))


def consolidate_graph(source: Path, path: Path, external: bool) -> None:
    """Re-save the graph at ``source`` (weights inside it, or in any external files beside it)
    as ``path``, with ``external`` its weights in :func:`data_file_for` (each tensor at a
    4 KiB-aligned offset, for mapping). External tensors are copied file to file, never held in
    memory: this is how a graph past 2 GB is written without the transformer optimizer."""
    import onnx
    from onnx.external_data_helper import (
        ExternalDataInfo,
        _get_initializer_tensors,
        uses_external_data,
    )

    model = onnx.load(str(source), load_external_data=not external)
    if not external:
        save_graph(model, path, external=False)
        return
    path.unlink(missing_ok=True)
    data = data_file_for(path)
    with data.open("wb") as out:
        for tensor in _get_initializer_tensors(model):  # where PyTorch puts weights
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                with (source.parent / info.location).open("rb") as fh:
                    fh.seek(info.offset or 0)
                    chunk = fh.read(info.length) if info.length else fh.read()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_TENSOR_BYTES:
                chunk = tensor.raw_data
            else:
                continue
            offset = out.tell() + (-out.tell()) % 4096
            out.seek(offset)
            out.write(chunk)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", len(chunk))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(path))


def fuse_and_save(config: PretrainedConfig, source: Path, path: Path, external: bool) -> int:
    """Re-save the graph at ``source`` as ``path`` (weights as :func:`save_graph` writes them)
    with fused Attention / LayerNorm / GELU kernels from ONNX Runtime's transformer optimizer;
    returns the number of fused attention nodes.

    ONNX Runtime's own session optimisations leave attention as separate MatMul/Softmax nodes
    over a (batch, heads, L, L) tensor; the optimizer fuses them into one
    ``com.microsoft.Attention`` node (it needs the eager attention pattern in the export). It
    holds the whole graph in memory several times over (17 GiB at the peak for 2.25 GB of
    weights): :func:`write_reward_graph` uses it past :data:`EXTERNAL_DATA_BYTES` only when asked.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    logging.disable(logging.WARNING)  # the optimizer logs its progress on the root logger
    try:
        optimized = optimize_model(
            str(source),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            # past 2 GB skip ONNX Runtime's basic pass (it loads and writes the whole graph once
            # more); on BERT the fusions found are the same without it
            opt_level=0 if external else None,
        )
        fused = int(optimized.get_fused_operator_statistics().get("Attention", 0))
        # its own save: declares the com.microsoft domain, replaces (never appends to) the data
        # file, which it names as data_file_for does
        optimized.save_model_to_file(str(path), use_external_data_format=external)
    finally:
        logging.disable(logging.NOTSET)
    log.info("fused transformer kernels", extra={"attention_nodes": fused})
    return fused


def write_reward_graph(
    model: PreTrainedModel,
    path: Path,
    *,
    pad_token_id: int,
    token_type_ids: bool,
    external: bool | None = None,
    fuse: bool | None = None,
) -> tuple[list[str], bool, bool]:
    """Export ``model`` (fp32, eval) as a reward graph at ``path``: returns its input names,
    whether attention was fused and whether the weights went to :func:`data_file_for`.

    ``external`` None: when the weights reach :data:`EXTERNAL_DATA_BYTES`. ``fuse`` None: fuse
    the encoders the optimizer covers (:data:`FUSABLE_ENCODERS`) unless the weights are
    external (see :func:`fuse_and_save` for its memory); ``True`` fuses them at any size.
    Fusable encoders are switched to eager attention (the pattern the fusion recognises):
    score the PyTorch reference with ``model`` afterwards, as it was exported.
    """
    if external is None:
        external = weight_bytes(model) >= EXTERNAL_DATA_BYTES
    fusable = model.config.model_type in FUSABLE_ENCODERS
    fuse = fusable and (not external if fuse is None else fuse)
    if fusable:
        model.set_attn_implementation("eager")
    with tempfile.TemporaryDirectory(prefix="plaudit-graph-") as tmp:
        raw = Path(tmp) / "model.onnx"  # a folder of its own: the exporter's per-tensor files
        names = export_onnx(model, raw, pad_token_id=pad_token_id, token_type_ids=token_type_ids)
        if fuse:
            fused = fuse_and_save(model.config, raw, path, external) > 0
        else:
            consolidate_graph(raw, path, external)
            fused = False
    return names, fused, external


def write_fp16_graph(fp32_graph: Path, path: Path, external: bool) -> None:
    """An fp16 copy of the fp32 graph at ``fp32_graph`` (its weights and arithmetic in half
    precision; inputs and the fp32 ``reward`` output as they are), its weights in
    :func:`data_file_for` with ``external``. Types come from ONNX Runtime's symbolic shape
    inference, which knows the fused ``com.microsoft`` kernels and has no 2 GB limit."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    logging.disable(logging.WARNING)
    try:
        model = OnnxModel(onnx.load(str(fp32_graph)))  # external data loaded with it
        model.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=True)
        model.save_model_to_file(str(path), use_external_data_format=external)
    finally:
        logging.disable(logging.NOTSET)
