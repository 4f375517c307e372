"""Export a causal language model (a policy) to an ONNX registry version with a KV cache.

The graph wraps the model as ``(input_ids, attention_mask, position_ids, past_key_0,
past_value_0, ..., past_key_{L-1}, past_value_{L-1}) -> (logits, present_key_0, ...)``:

* ``logits`` are the last position's only, (batch, vocab): all a sampler needs, and the
  prefill never materialises (batch, sequence, vocab).
* ``attention_mask`` covers past and new tokens, (batch, past + sequence); left padding is masked
  and ``position_ids`` count from each row's first real token, so prompts of different lengths
  share one batch.
* The prefill feeds an empty past (length 0); every axis that varies is dynamic (batch,
  sequence, past length).

Inside the wrapper the legacy (key, value) tuples become a transformers ``DynamicCache`` and
back. Before publishing, ONNX Runtime is checked against PyTorch through the serving code
(:mod:`plaudit.services.runtime.policy_model`): the prefill logits, a few teacher-forced decode
steps on the
exported cache, and a left-padded batch of prompts of different lengths; any difference over
``atol`` x max(1, max |logit|) refuses the export.

``quantize`` adds a weight-quantised graph (fewer bytes to read per decoded token, the bound on
CPU), one of :data:`POLICY_QUANTIZATIONS`: ``"int8"`` (dynamic int8, per output channel),
``"int4"`` / ``"int8-block"`` (ONNX Runtime's block-quantised ``MatMulNBits`` contrib op, weights
only; the serving session loads it as any graph). ``"int4"`` stores weights that are already on
a GGUF block grid exactly (SmolLM2 comes from a Q4_1 file: rounding its weights to nearest on
another 4-bit grid costs 0.37 nats of KL per token and a quarter to a third of the next tokens;
see :class:`WeightQuant`) and rounds the others to nearest. It is kept, and made the version's
default, only if it picks the fp32 graph's next token at least ``int8_min_agreement`` of the
time along the fp32 graph's greedy continuations of the reference prompts (teacher-forced, so
one early difference does not count twice, :func:`next_token_agreement`); the result (method,
bits, block size, agreement, positions, KL) is recorded in the manifest either way.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from plaudit.services.common.registry import (
    ADAPTER_FILES,
    GenerationConfig,
    LoraAdapter,
    ModelManifest,
    ModelRegistry,
    QuantizationReport,
    new_version_id,
)
from plaudit.services.common.textfmt import TextFormat
from plaudit.services.runtime.contract import (
    FP32_FILE,
    INT8_FILE,
    LOGITS,
    OPSET,
    POLICY_INPUTS,
    TOKENIZER_FILE,
    past_names,
    present_names,
    quantize_int8,
)
from plaudit.services.runtime.policy_model import (
    GenerateJob,
    LoadedPolicy,
    SamplingParams,
    generate_jobs,
)
from plaudit.trainer.backbones import resolve_backbone
from plaudit.trainer.export import special_tokens

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
DECODE_STEPS = 4
QUANT_CHECK_TOKENS = 16
# rendered with the model's own prompt format; a dialogue, a question and a one-word prompt
REFERENCE_PROMPTS = (
    "\n\nHuman: How do I keep basil fresh?\n\nAssistant:",
    "What is the capital of France?",
    "Hi",
)


class PolicyParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class WeightQuant:
    """A weight quantisation of the policy graph, written to ``file`` under the precision key
    ``precision`` (a version's ``onnx_files``).

    ``method="dynamic"``: :func:`quantize_int8` (int8 weights, one scale per output channel;
    activations quantised per call). ``method="blockwise"``: ONNX Runtime's ``MatMulNBits``:
    every MatMul with a constant weight holds ``bits``-bit weights in blocks of ``block_size``
    along the input axis, one fp32 scale per block (``symmetric``: no zero point); activations
    stay fp32 and ``accuracy_level`` 4 computes the products in int8 (AVX512-VNNI / AVX-VNNI).
    ``head`` False leaves the LM head's MatMul (SmolLM2: the tied 576x49152 embedding, a fifth
    of the weights) in fp32; ``head_bits`` (0: ``bits``) quantises it with other bits than the
    rest. The token embedding's Gather is never quantised. ``grid``: a weight that already
    lies on a ``bits``-bit block grid (a model converted from a GGUF file: SmolLM2's Q4_1
    blocks of 32, its Q8_0 embedding) is stored exactly, its block minimum (Q4_1) as a small
    fp32 term on the input's block sums (:func:`_snap_to_grid`); the others are rounded to
    nearest. MatMuls whose node name contains one of ``fp32_compute`` compute in fp32
    (accuracy level 0: their activations are not rounded to int8).
    """

    precision: str
    file: str
    method: Literal["dynamic", "blockwise"]
    bits: int = 8
    block_size: int = 0
    symmetric: bool = True
    accuracy_level: int = 4
    head: bool = True
    head_bits: int = 0
    grid: bool = False
    fp32_compute: tuple[str, ...] = ()

    def describe(self) -> str:
        """The method as the manifest's quantization report records it."""
        if self.method == "dynamic":
            return "dynamic-int8 per-channel; next-token agreement"
        head = f"{self.head_bits or self.bits}-bit" if self.head else "fp32"
        return (
            f"MatMulNBits {self.bits}-bit block {self.block_size} "
            f"{'grid-exact where on grid, else ' if self.grid else ''}"
            f"{'symmetric' if self.symmetric else 'asymmetric'} "
            f"accuracy_level {self.accuracy_level}"
            f"{' (0 for ' + '/'.join(self.fp32_compute) + ')' if self.fp32_compute else ''}"
            f", LM head {head}; next-token agreement"
        )


# what ``export_policy(quantize=...)`` and ``plaudit export policy --quantize`` accept. int4 on
# SmolLM2-135M: exact weights; int8 arithmetic but for the MLP's down projection, whose inputs
# have outliers (all int8: 0.89 agreement along 48-token paths, KL 0.018; this: 0.955, 0.011)
POLICY_QUANTIZATIONS: dict[str, WeightQuant] = {
    "int8": WeightQuant("int8", INT8_FILE, "dynamic"),
    "int4": WeightQuant(
        "int4",
        "model.int4.onnx",
        "blockwise",
        bits=4,
        block_size=32,
        head_bits=8,
        grid=True,
        fp32_compute=("down_proj",),
    ),
    "int8-block": WeightQuant("int8-block", "model.int8b.onnx", "blockwise", bits=8, block_size=32),
}


class CachedCausalLM(torch.nn.Module):
    """The exported signature: last-position logits and the present cache as flat tensors."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(list(zip(past[0::2], past[1::2], strict=True)))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits[:, -1, :], *present)


def cache_layout(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim), read from the cache one forward pass returns."""
    with torch.inference_mode():
        out = model(input_ids=torch.ones((1, 2), dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    keys = layers[0].keys
    for layer in layers:
        if layer.keys.shape != keys.shape or layer.values.shape != keys.shape:
            raise ValueError("layers with different cache shapes are not supported")
    return len(layers), int(keys.shape[1]), int(keys.shape[3])


def export_onnx(model: PreTrainedModel, path: Path, layout: tuple[int, int, int]) -> list[str]:
    """Write the cached graph with dynamic batch, sequence and past axes; returns input names."""
    num_layers, heads, head_dim = layout
    # the example has padding and a past, so neither is traced away
    batch, seq, past_len = 2, 3, 4
    mask = torch.ones((batch, past_len + seq), dtype=torch.long)
    mask[1, :2] = 0
    ids = torch.full((batch, seq), 5, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    past = [torch.zeros((batch, heads, past_len, head_dim)) for _ in range(2 * num_layers)]
    inputs = [*POLICY_INPUTS, *past_names(num_layers)]
    outputs = [LOGITS, *present_names(num_layers)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        LOGITS: {0: "batch"},
    }
    axes.update({name: {0: "batch", 2: "past"} for name in past_names(num_layers)})
    axes.update({name: {0: "batch", 2: "total"} for name in present_names(num_layers)})
    # the TorchScript exporter warns about tracing on every export; the parity check guards it
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            CachedCausalLM(model),
            (ids, mask, positions, *past),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return inputs


def prompt_format_for(tokenizer: Any, model: PreTrainedModel, max_length: int) -> TextFormat:
    """How prompts are rendered (chat template when there is one) and the context length."""
    limits = [max_length]
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    template = getattr(tokenizer, "chat_template", None)
    special = special_tokens(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TextFormat(
        kind="chat_template" if isinstance(template, str) else "plain",
        max_length=min(limits),
        pad_token_id=int(pad if pad is not None else 0),
        chat_template=template if isinstance(template, str) else None,
        special_tokens=special,
    )


def eos_token_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    """Every id that ends generation: the generation config's, and the tokenizer's EOS."""
    found: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        values = source if isinstance(source, list | tuple) else [source]
        found += [int(v) for v in values if v is not None and int(v) not in found]
    if not found:
        raise ValueError("the model has no end-of-sequence token")
    return found


def _cpu_fp32(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` itself when it is already fp32 on the CPU, otherwise an fp32 CPU copy."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    params = list(model.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return model
    copied: PreTrainedModel = copy.deepcopy(model)
    return copied.to(device="cpu", dtype=torch.float32)  # type: ignore[call-arg]


def _relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    """Max absolute difference over max(1, max |expected|)."""
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(expected - got))) / scale


def check_parity(
    model: PreTrainedModel,
    policy: LoadedPolicy,
    prompts: Sequence[str],
    *,
    steps: int = DECODE_STEPS,
    atol: float = 1e-3,
) -> dict[str, float]:
    """ONNX (through the serving engine) vs PyTorch; raises :class:`PolicyParityError`.

    Per prompt: the prefill logits, then ``steps`` decode steps on the exported cache, fed the
    tokens PyTorch chooses greedily (so a near tie cannot derail the comparison). Then all
    prompts at once, left-padded, prefill plus two steps. Returns the worst relative errors and
    the share of greedy tokens ONNX Runtime would have chosen the same.
    """
    encoded = [policy.encode(GenerateJob(prompt=p)) for p in prompts]
    worst = {"prefill": 0.0, "decode": 0.0, "batched": 0.0}
    agree = total = 0
    references: list[list[np.ndarray]] = []
    for ids in encoded:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            expected = [out.logits[:, -1].float().numpy()]
            cache = out.past_key_values
            chosen = [int(expected[0].argmax())]
            for _ in range(steps):
                out = model(
                    input_ids=torch.tensor([[chosen[-1]]]), past_key_values=cache, use_cache=True
                )
                cache = out.past_key_values
                expected.append(out.logits[:, -1].float().numpy())
                chosen.append(int(expected[-1].argmax()))
        references.append(expected)
        n = len(ids)
        mask = np.ones((1, n), dtype=np.int64)
        logits, past = policy.forward(
            np.array([ids]), mask, np.arange(n)[None], policy.empty_cache(1)
        )
        got = [logits]
        for step in range(steps):
            mask = np.ones((1, n + step + 1), dtype=np.int64)
            logits, past = policy.forward(
                np.array([[chosen[step]]]), mask, np.array([[n + step]]), past
            )
            got.append(logits)
        worst["prefill"] = max(worst["prefill"], _relative_error(expected[0], got[0]))
        for e, g in zip(expected[1:], got[1:], strict=True):
            worst["decode"] = max(worst["decode"], _relative_error(e, g))
        agree += sum(int(e.argmax() == g.argmax()) for e, g in zip(expected, got, strict=True))
        total += len(expected)

    # all prompts in one left-padded batch, as serving runs them
    lengths = [len(ids) for ids in encoded]
    width = max(lengths)
    ids_b = np.full((len(encoded), width), policy.formatter.format.pad_token_id, dtype=np.int64)
    mask_b = np.zeros_like(ids_b)
    for row, ids in enumerate(encoded):
        ids_b[row, width - len(ids) :] = ids
        mask_b[row, width - len(ids) :] = 1
    positions = np.maximum(np.cumsum(mask_b, axis=1) - 1, 0)
    logits, past = policy.forward(ids_b, mask_b, positions, policy.empty_cache(len(encoded)))
    for step in range(min(steps, 2) + 1):
        for row, expected in enumerate(references):
            err = _relative_error(expected[step], logits[row : row + 1])
            worst["batched"] = max(worst["batched"], err)
        if step == min(steps, 2):
            break
        nxt = np.array([[int(ref[step].argmax())] for ref in references])
        mask_b = np.concatenate([mask_b, np.ones((len(encoded), 1), dtype=np.int64)], axis=1)
        pos = np.array([[n + step] for n in lengths])
        logits, past = policy.forward(nxt, mask_b, pos, past)

    report = {f"{k}_max_rel_diff": v for k, v in worst.items()}
    report["greedy_agreement"] = agree / total
    failed = {k: v for k, v in worst.items() if not v <= atol}
    if failed:
        raise PolicyParityError(
            "ONNX policy differs from PyTorch: "
            + ", ".join(f"{k} {v:.2e}" for k, v in failed.items())
            + f" (relative tolerance {atol})"
        )
    return report


def _teacher_forced_logits(
    policy: LoadedPolicy, ids: list[int], continuation: list[int]
) -> np.ndarray:
    """Next-token logits after the prompt and after each continuation token but the last."""
    n = len(ids)
    logits, past = policy.forward(
        np.array([ids]), np.ones((1, n), dtype=np.int64), np.arange(n)[None], policy.empty_cache(1)
    )
    rows = [logits[0]]
    for step, token in enumerate(continuation[:-1]):
        logits, past = policy.forward(
            np.array([[token]]),
            np.ones((1, n + step + 1), dtype=np.int64),
            np.array([[n + step]]),
            past,
        )
        rows.append(logits[0])
    return np.stack(rows)


def next_token_agreement(
    fp32: LoadedPolicy, candidate_policy: LoadedPolicy, prompts: Sequence[str], tokens: int
) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(fp32 || candidate) in nats, positions) along fp32's greedy
    paths of up to ``tokens`` tokens per prompt, both teacher-forced on the same path."""
    agree, kl, positions = 0, 0.0, 0
    for prompt in prompts:
        job = GenerateJob(prompt=prompt, params=SamplingParams(0.0, max_new_tokens=tokens))
        (result,) = generate_jobs(fp32, [job], tokens)
        assert not isinstance(result, Exception)
        ids, path = fp32.encode(job), result.completions[0].token_ids
        reference = _teacher_forced_logits(fp32, ids, path)
        candidate = _teacher_forced_logits(candidate_policy, ids, path)
        agree += int(np.sum(candidate.argmax(-1) == np.asarray(path)))
        log_p = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
        log_q = candidate - np.logaddexp.reduce(candidate, axis=-1, keepdims=True)
        kl += float(np.sum(np.exp(log_p) * (log_p - log_q)))
        positions += len(path)
    return agree / positions, kl / positions, positions


def export_policy(
    model: PreTrainedModel,
    tokenizer: Any,
    registry: ModelRegistry,
    *,
    parent: str | None = None,
    metrics: dict[str, float] | None = None,
    notes: dict[str, Any] | None = None,
    data_cursor: str | None = None,
    promotion: dict[str, Any] | None = None,
    promote: bool = False,
    max_length: int = 2048,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    backbone: str | None = None,
    reference_prompts: Sequence[str] = REFERENCE_PROMPTS,
    atol: float = 1e-3,
    quantize: str | None = None,
    int8_min_agreement: float = 0.9,
    adapter: tuple[Path, LoraAdapter] | None = None,
) -> ModelManifest:
    """Export ``model`` (a causal LM) with ``tokenizer`` (a fast HF tokenizer) as a policy version.

    The graph is checked against PyTorch (:func:`check_parity`) before anything is published;
    the model is left as it was (a non-fp32 or non-CPU model is exported from an fp32 CPU copy).
    ``parent`` defaults to the registry's promoted version. The version is promoted when
    ``promote`` is set or when ``promotion`` (recorded in the manifest as it is) says
    ``"promoted": True``. ``quantize`` (a key of :data:`POLICY_QUANTIZATIONS`) adds a quantised
    graph behind its own gate, ``int8_min_agreement`` whatever the method (see the module doc).
    ``adapter`` (a folder PEFT saved, and what it is): a LoRA-trained ``model``'s adapter, shipped
    beside the merged graph (:data:`~plaudit.services.common.registry.ADAPTER_FILES`) for serving
    engines that load adapters (vLLM); the graph stays the merged model.
    """
    if quantize is not None and quantize not in POLICY_QUANTIZATIONS:
        raise ValueError(
            f"quantize must be None or one of {sorted(POLICY_QUANTIZATIONS)}, not {quantize!r}"
        )
    if registry.kind != "policy":
        raise ValueError(f"policies go to a policy registry, not {registry.kind!r}")
    source = model
    model = _cpu_fp32(model)
    was_training = model.training
    model.eval()
    try:
        layout = cache_layout(model)
        fmt = prompt_format_for(tokenizer, model, max_length)
        generation = GenerationConfig(
            eos_token_ids=eos_token_ids(model, tokenizer),
            max_new_tokens=max(1, min(max_new_tokens, fmt.max_length - 1)),
            num_layers=layout[0],
            num_kv_heads=layout[1],
            head_dim=layout[2],
        )
        with tempfile.TemporaryDirectory(prefix="plaudit-policy-") as tmp:
            out = Path(tmp)
            tokenizer.save_pretrained(out)
            if not (out / TOKENIZER_FILE).is_file():
                raise ValueError("the tokenizer must be a fast tokenizer (tokenizer.json)")
            input_names = export_onnx(model, out / FP32_FILE, layout)
            if adapter is not None:
                copy_adapter(adapter[0], out / adapter[1].path)
            manifest = ModelManifest(
                version=new_version_id("policy"),
                kind="policy",
                created_at=datetime.now(UTC),
                parent=parent or registry.promoted(),
                backbone=backbone or str(getattr(model.config, "name_or_path", "") or "unknown"),
                onnx_files={"fp32": FP32_FILE},
                default_precision="fp32",
                text_format=fmt.to_dict(),
                input_names=input_names,
                metrics=dict(metrics or {}),
                data_cursor=data_cursor,
                promotion=promotion,
                generation=generation,
                lora_adapter=None if adapter is None else adapter[1],
            )
            policy = LoadedPolicy.from_dir(out, manifest, provider="cpu")
            parity = check_parity(model, policy, reference_prompts, atol=atol)
            log.info("policy parity ok", extra=parity)
            extra: dict[str, Any] = {}
            if quantize is not None:
                extra = _add_quantized(
                    out,
                    manifest,
                    policy,
                    POLICY_QUANTIZATIONS[quantize],
                    reference_prompts,
                    int8_min_agreement,
                )
            del policy
            manifest.notes = {
                **(notes or {}),
                **parity,
                **extra,
                "parity_atol": atol,
                "opset": OPSET,
                "torch": torch.__version__,
                "architecture": type(model).__name__,
            }
            published = registry.publish(out, manifest)
    finally:
        if model is source:
            model.train(was_training)
    if promote or (promotion is not None and promotion.get("promoted")):
        reason = "export --promote" if promote else str(promotion.get("reason", "gate"))  # type: ignore[union-attr]
        registry.promote(published.version, reason=reason)
    return published


def copy_adapter(source: Path, target: Path) -> None:
    """Copy a PEFT adapter's two files (config, safetensors weights) into ``target``; raise
    ``ValueError`` naming the file when one is missing (a pickled ``adapter_model.bin`` is not
    shipped: registries hold no pickles)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if not (source / name).is_file():
            raise ValueError(f"the LoRA adapter in {source} has no {name}")
        shutil.copy2(source / name, target / name)


def _head_matmul(model: Any) -> str | None:
    """Name of the MatMul nearest the logits output (walking producers back from it): the LM
    head. Unnamed nodes get names (the quantizer excludes nodes by name)."""
    graph = model.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    producer = {out: node for node in graph.node for out in node.output}
    frontier, seen = [LOGITS], set()
    while frontier:
        name = frontier.pop(0)
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            return str(node.name)
        frontier += list(node.input)
    return None


def quantize_policy_graph(fp32_path: Path, out_path: Path, spec: WeightQuant) -> None:
    """Write ``spec``'s quantisation of the fp32 policy graph at ``fp32_path`` to ``out_path``
    (one file, no external data; the fp32 graph is left as it is)."""
    if spec.method == "dynamic":
        quantize_int8(fp32_path, out_path, per_channel=True)
        return
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32_path))
    head_bits = spec.head_bits or spec.bits
    head = _head_matmul(model) if not spec.head or head_bits != spec.bits or spec.grid else None
    # float MatMuls of the grid's minimum terms stay as they are
    added = _snap_to_grid(model, spec, head, head_bits) if spec.grid else []
    # the body (and the head when it shares its bits), then the head with its own bits
    passes = [(spec.bits, [*added, head] if head else added)]
    if spec.head and head is not None:
        passes.append((head_bits, added))  # only the head is left a MatMul with a weight
    logging.disable(logging.WARNING)  # the quantizer logs every node on the root logger
    try:
        for bits, exclude in passes:
            quantizer = MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=spec.block_size,
                is_symmetric=spec.symmetric,
                accuracy_level=spec.accuracy_level,
                nodes_to_exclude=exclude,
            )
            quantizer.process()
            model = quantizer.model.model
    finally:
        logging.disable(logging.NOTSET)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and any(part in node.name for part in spec.fp32_compute):
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 0
    onnx.save(model, str(out_path))


def _grid_blocks(weight: np.ndarray, bits: int, block: int) -> tuple[Any, ...] | None:
    """``weight`` (K, N) as exact ``bits``-bit blocks of ``block`` along K, or None when it is
    not on such a grid: (q (N, K/block, block) uint8, scale (N, K/block), offset or None).
    Tried in order: symmetric, w = scale * (q - 2**(bits-1)) with scale = max|w| / (2**(bits-1)
    - 1) (GGUF Q8_0); then min-offset, w = offset + scale * q with offset the block minimum and
    scale its range / (2**bits - 1) (GGUF Q4_1). Exact: within 1e-3 of a step everywhere."""
    k, n = weight.shape
    if k % block or weight.dtype != np.float32:
        return None
    w = weight.T.reshape(n, k // block, block).astype(np.float64)
    half = 2 ** (bits - 1)
    amax = np.abs(w).max(axis=-1)
    step = np.where(amax > 0, amax / (half - 1), 1.0)
    q = np.rint(w / step[..., None])
    if np.all(np.abs(q * step[..., None] - w) <= 1e-3 * step[..., None]):
        return (q + half).astype(np.uint8), step.astype(np.float32), None
    low, high = w.min(axis=-1), w.max(axis=-1)
    step = np.where(high > low, (high - low) / (2**bits - 1), 1.0)
    q = np.rint((w - low[..., None]) / step[..., None])
    if np.all(np.abs(low[..., None] + q * step[..., None] - w) <= 1e-3 * step[..., None]):
        return q.astype(np.uint8), step.astype(np.float32), low.astype(np.float32)
    return None


def _snap_to_grid(model: Any, spec: WeightQuant, head: str | None, head_bits: int) -> list[str]:
    """Rewrite in place every MatMul of ``model`` whose constant weight is on a block grid
    (:func:`_grid_blocks`) as an exact MatMulNBits; a min-offset grid adds
    ``(x summed per block) @ offsets`` (one block sum per distinct input, shared). Returns the
    names of the float MatMuls it added (not to be quantised)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[Any] = []
    block_sums: dict[tuple[str, int], str] = {}
    added: list[str] = []
    for node in graph.node:
        bits = head_bits if node.name == head else spec.bits
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        found = None
        if weight is not None and (spec.head or node.name != head):
            array = numpy_helper.to_array(weight)
            found = _grid_blocks(array, bits, spec.block_size) if array.ndim == 2 else None
        if found is None:
            nodes.append(node)
            continue
        q, scale, offset = found
        k, n = array.shape
        blocks = k // spec.block_size
        packed = q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        base = f"{node.input[1]}_grid{bits}"
        inputs = [node.input[0], f"{base}_q", f"{base}_scale"]
        graph.initializer.append(numpy_helper.from_array(packed, inputs[1]))
        graph.initializer.append(numpy_helper.from_array(scale.reshape(-1), inputs[2]))
        if offset is not None:  # zero point 0: w = scale * q, the minimum comes apart
            zp_cols = blocks if bits == 8 else (blocks + 1) // 2
            inputs.append(f"{base}_zero")
            zeros = np.zeros((n, zp_cols), dtype=np.uint8).reshape(-1)
            graph.initializer.append(numpy_helper.from_array(zeros, inputs[3]))
        out = node.output[0] if offset is None else f"{base}_scaled"
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [out],
                name=f"{node.name}_Q{bits}grid",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=spec.block_size,
                accuracy_level=spec.accuracy_level,
            )
        )
        if offset is None:
            continue
        key = (node.input[0], k)
        if key not in block_sums:  # x @ S, S (K, blocks) one 1 per row: the sums per block
            indicator = np.zeros((k, blocks), dtype=np.float32)
            indicator[np.arange(k), np.arange(k) // spec.block_size] = 1.0
            name = f"{base}_blocksum"
            graph.initializer.append(numpy_helper.from_array(indicator, f"{name}_indicator"))
            nodes.append(
                helper.make_node("MatMul", [node.input[0], f"{name}_indicator"], [name], name=name)
            )
            block_sums[key] = name
            added.append(name)
        graph.initializer.append(numpy_helper.from_array(offset.T.copy(), f"{base}_offset"))
        added.append(f"{base}_shift")
        nodes += [
            helper.make_node(
                "MatMul",
                [block_sums[key], f"{base}_offset"],
                [f"{base}_shift"],
                name=f"{base}_shift",
            ),
            helper.make_node("Add", [out, f"{base}_shift"], [node.output[0]], name=f"{base}_add"),
        ]
    used = {name for node in nodes for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return added


def _add_quantized(
    out: Path,
    manifest: ModelManifest,
    fp32: LoadedPolicy,
    spec: WeightQuant,
    prompts: Sequence[str],
    threshold: float,
) -> dict[str, Any]:
    """Quantise, check against fp32 and keep the graph (as the default) if it passes; records
    the report in ``manifest`` and returns notes (KL, bits, block size)."""
    quantize_policy_graph(out / FP32_FILE, out / spec.file, spec)
    files = {**manifest.onnx_files, spec.precision: spec.file}
    candidate = manifest.model_copy(
        update={"onnx_files": files, "default_precision": spec.precision}
    )
    quantized = LoadedPolicy.from_dir(out, candidate, provider="cpu")
    agreement, kl, positions = next_token_agreement(fp32, quantized, prompts, QUANT_CHECK_TOKENS)
    del quantized
    passed = agreement >= threshold
    reason = None if passed else f"next-token agreement {agreement:.3f} < {threshold}"
    notes: dict[str, Any] = {
        f"{spec.precision}_mean_kl_vs_fp32": kl,
        "quantization_bits": spec.bits,
        "quantization_block_size": spec.block_size,
        "quantization_head_bits": (spec.head_bits or spec.bits) if spec.head else None,
    }
    report = QuantizationReport(
        method=spec.describe(),
        pairwise_agreement=agreement,
        threshold=threshold,
        pairs=positions,
        passed=passed,
        reason=reason,
        candidates=[
            {
                "precision": spec.precision,
                "method": spec.describe(),
                "bits": spec.bits,
                "block_size": spec.block_size,
                "accuracy_level": spec.accuracy_level if spec.method == "blockwise" else None,
                "lm_head_bits": (spec.head_bits or spec.bits) if spec.head else None,
                "pairwise_agreement": agreement,
                "mean_kl_vs_fp32": kl,
                "positions": positions,
                "passed": passed,
                "reason": reason,
            }
        ],
    )
    manifest.quantization = report
    if report.passed:
        manifest.onnx_files, manifest.default_precision = files, spec.precision
        log.info("quantized policy kept", extra={**report.model_dump(), "kl": kl})
    else:
        (out / spec.file).unlink()
        log.warning("quantized policy rejected", extra={**report.model_dump(), "kl": kl})
    return notes


def load_policy_checkpoint(checkpoint: str) -> tuple[PreTrainedModel, Any, str]:
    """A causal LM checkpoint (``smollm2`` or a HF folder) in fp32 eval mode, its tokenizer and
    its backbone name."""
    backbone = resolve_backbone(checkpoint)
    kwargs = {"gguf_file": backbone.gguf_file} if backbone.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        backbone.path, dtype=torch.float32, **backbone.weights_kwargs
    )
    model.eval()
    return model, tokenizer, backbone.name


def export_policy_checkpoint(
    checkpoint: str,
    registry: ModelRegistry,
    *,
    promote: bool = False,
    max_length: int = 2048,
    **kwargs: Any,
) -> ModelManifest:
    """``plaudit export policy``: load ``checkpoint`` and :func:`export_policy` it."""
    model, tokenizer, name = load_policy_checkpoint(checkpoint)
    kwargs.setdefault("backbone", name)
    return export_policy(
        model, tokenizer, registry, promote=promote, max_length=max_length, **kwargs
    )
