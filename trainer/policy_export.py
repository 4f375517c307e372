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

``quantize="int8"`` adds a dynamically quantised graph (int8 weights: about 4x less memory to
read per decoded token, the bound on CPU). It is kept, and made the version's default, only if
it picks the fp32 graph's next token at least ``int8_min_agreement`` of the time along the fp32
graph's greedy continuations of the reference prompts (teacher-forced, so one early difference
does not count twice); the result is recorded in the manifest either way.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from plaudit.services.common.registry import (
    GenerationConfig,
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
INT8_CHECK_TOKENS = 16
# rendered with the model's own prompt format; a dialogue, a question and a one-word prompt
REFERENCE_PROMPTS = (
    "\n\nHuman: How do I keep basil fresh?\n\nAssistant:",
    "What is the capital of France?",
    "Hi",
)


class PolicyParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


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


def int8_agreement(
    fp32: LoadedPolicy, int8: LoadedPolicy, prompts: Sequence[str], tokens: int
) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(fp32 || int8) in nats, positions) along fp32's greedy paths."""
    agree, kl, positions = 0, 0.0, 0
    for prompt in prompts:
        job = GenerateJob(prompt=prompt, params=SamplingParams(0.0, max_new_tokens=tokens))
        (result,) = generate_jobs(fp32, [job], tokens)
        assert not isinstance(result, Exception)
        ids, path = fp32.encode(job), result.completions[0].token_ids
        reference = _teacher_forced_logits(fp32, ids, path)
        candidate = _teacher_forced_logits(int8, ids, path)
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
) -> ModelManifest:
    """Export ``model`` (a causal LM) with ``tokenizer`` (a fast HF tokenizer) as a policy version.

    The graph is checked against PyTorch (:func:`check_parity`) before anything is published;
    the model is left as it was (a non-fp32 or non-CPU model is exported from an fp32 CPU copy).
    ``parent`` defaults to the registry's promoted version. The version is promoted when
    ``promote`` is set or when ``promotion`` (recorded in the manifest as it is) says
    ``"promoted": True``. ``quantize="int8"`` adds an int8 graph behind its own gate (see the
    module doc).
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
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
            )
            policy = LoadedPolicy.from_dir(out, manifest, provider="cpu")
            parity = check_parity(model, policy, reference_prompts, atol=atol)
            log.info("policy parity ok", extra=parity)
            extra: dict[str, Any] = {}
            if quantize == "int8":
                extra = _add_int8(out, manifest, policy, reference_prompts, int8_min_agreement)
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


def _add_int8(
    out: Path,
    manifest: ModelManifest,
    fp32: LoadedPolicy,
    prompts: Sequence[str],
    threshold: float,
) -> dict[str, Any]:
    """Quantise, check against fp32 and keep the int8 graph (as the default) if it passes;
    records the report in ``manifest`` and returns notes."""
    quantize_int8(out / FP32_FILE, out / INT8_FILE, per_channel=True)
    files = {**manifest.onnx_files, "int8": INT8_FILE}
    candidate = manifest.model_copy(update={"onnx_files": files, "default_precision": "int8"})
    int8 = LoadedPolicy.from_dir(out, candidate, provider="cpu")
    agreement, kl, positions = int8_agreement(fp32, int8, prompts, INT8_CHECK_TOKENS)
    del int8
    report = QuantizationReport(
        method="dynamic-int8 next-token agreement",
        pairwise_agreement=agreement,
        threshold=threshold,
        pairs=positions,
        passed=agreement >= threshold,
    )
    manifest.quantization = report
    if report.passed:
        manifest.onnx_files, manifest.default_precision = files, "int8"
        log.info("int8 policy kept", extra={**report.model_dump(), "kl": kl})
    else:
        (out / INT8_FILE).unlink()
        log.warning("int8 policy rejected", extra={**report.model_dump(), "kl": kl})
    return {"int8_mean_kl_vs_fp32": kl}


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
