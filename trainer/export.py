"""Export a Hugging Face reward model (sequence classification, one label) to an ONNX registry
version: fp32 graph checked against PyTorch, optional int8 graph checked against fp32, tokenizer
files, text format and reward normalisation, all recorded in the manifest.
"""

from __future__ import annotations

import inspect
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from plaudit.services.common.onnx_runtime import create_session
from plaudit.services.common.registry import (
    ModelManifest,
    ModelRegistry,
    Normalization,
    QuantizationReport,
    new_version_id,
)
from plaudit.services.common.textfmt import (
    EncodedBatch,
    RewardTextEncoder,
    TextFormat,
    length_groups,
)
from plaudit.services.runtime.contract import (
    FP32_FILE,
    INT8_FILE,
    OPSET,
    TOKENIZER_FILE,
    quantize_int8,
)
from plaudit.trainer.backbones import Backbone, resolve_backbone
from plaudit.trainer.data import PreferencePair, read_pairs, reference_pairs_path

log = logging.getLogger(__name__)

REFERENCE_GROUP_TOKENS = 1024
# encoders whose attention ONNX Runtime's transformer optimizer can fuse into one kernel
FUSABLE_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet"}


# written by the trainer beside a trained checkpoint; its presence means "the head is trained"
TRAINING_RECORD = "plaudit_training.json"


class ParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class UntrainedHeadError(RuntimeError):
    """A checkpoint that should carry a trained reward head loaded with fresh weights instead."""


# Decides promotion from the reference texts (prompt, completion), interleaved c0, r0, c1, ...,
# and the candidate's rewards on them from the graph it will be served with; returns the
# manifest's promotion record, whose "promoted" says whether to promote.
PromotionGate = Callable[[list[tuple[str, str]], np.ndarray], dict[str, Any]]


@dataclass
class ExportConfig:
    checkpoint: str
    max_length: int = 512
    quantize: str | None = None  # None or "int8"
    int8_min_agreement: float = 0.95
    fp32_atol: float = 1e-3
    reference_data: Path | None = None
    reference_pairs: int = 128
    seed: int = 0
    parent: str | None = None
    # in-memory reference pairs (e.g. a trainer's held-out set); replaces reference_data
    reference: Sequence[PreferencePair] | None = None
    # recorded in the manifest as they are (notes are merged into the export's own notes)
    metrics: dict[str, float] = field(default_factory=dict)
    data_cursor: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    # None: required when the checkpoint has a TRAINING_RECORD; see load_reward_model
    require_trained_head: bool | None = None
    backbone_name: str | None = None  # the manifest's backbone (default: the checkpoint's)
    # the text format the model was trained with: publishing refuses a checkpoint that differs
    text_format: dict[str, Any] | None = None


def load_reward_model(
    backbone: Backbone, seed: int = 0, *, require_trained_head: bool | None = None
) -> tuple[PreTrainedModel, object]:
    """The checkpoint as a one-label sequence classifier in fp32 eval mode, plus its tokenizer.

    A checkpoint without a trained head gets a fresh one; the seed makes it reproducible. With
    ``require_trained_head`` (by default: when the folder holds the trainer's
    :data:`TRAINING_RECORD`) any weight the checkpoint lacks raises :class:`UntrainedHeadError`
    instead, so a trained model can never be exported with a silently re-initialised head.
    """
    torch.manual_seed(seed)
    kwargs = {"gguf_file": backbone.gguf_file} if backbone.gguf_file else {}
    if require_trained_head is None:
        require_trained_head = (backbone.path / TRAINING_RECORD).is_file()
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        backbone.path,
        num_labels=1,
        dtype=torch.float32,
        output_loading_info=True,
        **backbone.weights_kwargs,
    )
    fresh = sorted(
        set(loading.get("missing_keys", ())) | {k[0] for k in loading.get("mismatched_keys", ())}
    )
    if fresh and require_trained_head:
        raise UntrainedHeadError(
            f"{backbone.path} should hold a trained reward model, but these weights were newly "
            f"initialised: {', '.join(fresh)}"
        )
    if fresh:
        log.info("initialised a fresh reward head", extra={"weights": fresh, "seed": seed})
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model needs num_labels=1, checkpoint has {model.config.num_labels}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def special_tokens(tokenizer: object) -> dict[str, str]:
    """The tokenizer's named special tokens, as chat templates refer to them."""
    return {
        key: str(getattr(tokenizer, key))
        for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        if getattr(tokenizer, key, None) is not None
    }


def text_format_for(tokenizer: object, model: PreTrainedModel, max_length: int) -> TextFormat:
    """How this checkpoint joins prompt and completion, and how long its input may be."""
    limits = [max_length]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    template = getattr(tokenizer, "chat_template", None)
    special = special_tokens(tokenizer)
    return TextFormat(
        kind="chat_template" if template else "pair",
        max_length=min(limits),
        pad_token_id=int(tokenizer.pad_token_id),  # type: ignore[attr-defined]
        chat_template=template if isinstance(template, str) else None,
        special_tokens=special,
        uses_token_type_ids="token_type_ids" in tokenizer.model_input_names,  # type: ignore[attr-defined]
    )


class ScalarReward(torch.nn.Module):
    """Exports the model's scalar head output with no KV cache: (batch, seq) -> (batch,)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
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
        return self.model(**kwargs).logits[:, 0]


def fuse_transformer_ops(model: PreTrainedModel, path: Path) -> bool:
    """Rewrite an exported encoder graph with fused Attention / LayerNorm / GELU kernels.

    ONNX Runtime's own session optimisations leave attention as separate MatMul/Softmax nodes
    over a (batch, heads, L, L) tensor; its transformer optimizer fuses them into one
    ``com.microsoft.Attention`` node (needs the eager attention pattern in the export). Returns
    False, leaving the file as it is, for architectures it does not cover.
    """
    config = model.config
    if config.model_type not in FUSABLE_ENCODERS:
        return False
    from onnxruntime.transformers.optimizer import optimize_model

    logging.disable(logging.WARNING)  # the optimizer logs its progress on the root logger
    try:
        optimized = optimize_model(
            str(path),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
        )
        fused = optimized.get_fused_operator_statistics().get("Attention", 0)
        optimized.save_model_to_file(str(path))
    finally:
        logging.disable(logging.NOTSET)
    log.info("fused transformer kernels", extra={"attention_nodes": fused})
    return bool(fused)


def export_onnx(model: PreTrainedModel, fmt: TextFormat, path: Path) -> list[str]:
    """Write the ONNX graph with dynamic batch and sequence axes; returns its input names."""
    names = ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if fmt.uses_token_type_ids else []
    )
    # the example must contain padding: an all-ones mask lets the model trace away its masking
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.long)
    ids = torch.full((2, 8), fmt.pad_token_id, dtype=torch.long).masked_fill(mask.bool(), 5)
    example = (ids, mask, torch.zeros_like(ids))[: len(names)]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["reward"] = {0: "batch"}
    # the TorchScript exporter warns about tracing and its own deprecation on every export; the
    # parity check against PyTorch below is what guards correctness, so keep the output clean
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ScalarReward(model),
            example,
            str(path),
            input_names=names,
            output_names=["reward"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return names


def _grouped(
    encoder: RewardTextEncoder,
    pairs: list[tuple[str, str]],
    run: Callable[[EncodedBatch], np.ndarray],
) -> np.ndarray:
    """Score ``pairs`` in length-sorted groups (as serving does) and return rewards in order."""
    encoded = encoder.encode([p for p, _ in pairs], [c for _, c in pairs])
    lengths = np.array([len(e.ids) for e, _ in encoded])
    rewards = np.empty(len(pairs), dtype=np.float32)
    for group in length_groups(lengths, REFERENCE_GROUP_TOKENS):
        rewards[group] = run(encoder.pad([encoded[i] for i in group])).reshape(-1)
    return rewards


def torch_rewards(
    model: PreTrainedModel, encoder: RewardTextEncoder, pairs: list[tuple[str, str]]
) -> np.ndarray:
    """Reference rewards from PyTorch with the serving tokenization."""
    wrapper = ScalarReward(model)

    def run(batch: EncodedBatch) -> np.ndarray:
        with torch.inference_mode():
            inputs = {k: torch.from_numpy(v) for k, v in batch.inputs.items()}
            return wrapper(**inputs).float().numpy()

    return _grouped(encoder, pairs, run)


def onnx_rewards(
    path: Path, encoder: RewardTextEncoder, pairs: list[tuple[str, str]]
) -> np.ndarray:
    """Rewards from an ONNX graph on CPU with the serving tokenization."""
    session = create_session(path, "cpu")
    return _grouped(encoder, pairs, lambda batch: np.asarray(session.run(None, batch.inputs)[0]))


def pairwise_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of (chosen, rejected) pairs ordered the same way; arrays interleave c0, r0, c1, r1…"""
    ref = np.sign(reference[0::2] - reference[1::2])
    cand = np.sign(candidate[0::2] - candidate[1::2])
    return float(np.mean(ref == cand))


def _reference_texts(cfg: ExportConfig) -> list[tuple[str, str]]:
    pairs: list[PreferencePair]
    if cfg.reference is not None:
        pairs = list(cfg.reference)[: cfg.reference_pairs]
    else:
        pairs = list(read_pairs(cfg.reference_data or reference_pairs_path(), cfg.reference_pairs))
    if not pairs:
        raise ValueError("export needs at least one reference pair")
    texts: list[tuple[str, str]] = []
    for pair in pairs:
        texts += [(pair.prompt, pair.chosen), (pair.prompt, pair.rejected)]
    return texts


def export_reward(
    cfg: ExportConfig,
    registry: ModelRegistry,
    *,
    promote: bool = False,
    gate: PromotionGate | None = None,
) -> ModelManifest:
    """Export, verify and publish a reward checkpoint; optionally promote it.

    ``promote`` promotes unconditionally; ``gate`` instead decides, before publishing, from the
    served graph's rewards on the reference pairs, and its record goes into the manifest.
    """
    if promote and gate is not None:
        raise ValueError("pass either promote or a promotion gate, not both")
    backbone = resolve_backbone(cfg.checkpoint)
    model, tokenizer = load_reward_model(
        backbone, cfg.seed, require_trained_head=cfg.require_trained_head
    )
    fmt = text_format_for(tokenizer, model, cfg.max_length)
    if cfg.text_format is not None and cfg.text_format != fmt.to_dict():
        raise ParityError(f"{cfg.checkpoint} formats text differently from how it was trained")
    texts = _reference_texts(cfg)
    with tempfile.TemporaryDirectory(prefix="plaudit-export-") as tmp:
        out = Path(tmp)
        tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
        encoder = RewardTextEncoder.from_files(out / TOKENIZER_FILE, fmt)
        if model.config.model_type in FUSABLE_ENCODERS:
            model.set_attn_implementation("eager")  # the pattern the fusion recognises
        input_names = export_onnx(model, fmt, out / FP32_FILE)
        fused = fuse_transformer_ops(model, out / FP32_FILE)
        expected = torch_rewards(model, encoder, texts)
        got = onnx_rewards(out / FP32_FILE, encoder, texts)
        err = float(np.max(np.abs(expected - got)))
        scale = max(1.0, float(np.max(np.abs(expected))))
        if err > cfg.fp32_atol * scale:
            raise ParityError(
                f"ONNX fp32 differs from PyTorch by {err:.2e} (> {cfg.fp32_atol} x {scale:.2f})"
            )
        log.info("fp32 parity ok", extra={"max_abs_diff": err, "texts": len(texts)})

        onnx_files = {"fp32": FP32_FILE}
        default_precision = "fp32"
        served = got
        report = None
        if cfg.quantize == "int8":
            quantize_int8(out / FP32_FILE, out / INT8_FILE)
            int8 = onnx_rewards(out / INT8_FILE, encoder, texts)
            agreement = pairwise_agreement(got, int8)
            passed = agreement >= cfg.int8_min_agreement
            report = QuantizationReport(
                pairwise_agreement=agreement,
                threshold=cfg.int8_min_agreement,
                pairs=len(texts) // 2,
                passed=passed,
            )
            if passed:
                onnx_files["int8"] = INT8_FILE
                default_precision = "int8"
                served = int8
                log.info("int8 parity ok", extra=report.model_dump())
            else:
                (out / INT8_FILE).unlink()
                log.warning(
                    "int8 graph rejected: pair order differs from fp32", extra=report.model_dump()
                )
        for extra in out.glob("*.data"):  # external-data side files never used here
            extra.unlink()
        std = float(np.std(got))
        promotion = gate(texts, served) if gate is not None else None
        manifest = ModelManifest(
            version=new_version_id("reward"),
            kind="reward",
            created_at=datetime.now(UTC),
            parent=cfg.parent or registry.promoted(),
            backbone=cfg.backbone_name or backbone.name,
            onnx_files=onnx_files,
            default_precision=default_precision,
            text_format=fmt.to_dict(),
            input_names=input_names,
            normalization=Normalization(
                mean=float(np.mean(got)),
                std=std if std > 1e-6 else 1.0,
                reference=f"{len(texts)} reference texts",
            ),
            quantization=report,
            metrics=dict(cfg.metrics),
            data_cursor=cfg.data_cursor,
            promotion=promotion,
            notes={
                **cfg.notes,
                "fp32_max_abs_diff_vs_torch": err,
                "fused_attention": fused,
                "opset": OPSET,
                "torch": torch.__version__,
                "source": str(backbone.path)
                + (f"::{backbone.gguf_file}" if backbone.gguf_file else ""),
            },
        )
        published = registry.publish(out, manifest)
    if promote:
        registry.promote(published.version, reason="export --promote")
    elif promotion is not None and promotion.get("promoted"):
        registry.promote(published.version, reason=str(promotion.get("reason", "gate")))
    return published


def describe(manifest: ModelManifest) -> str:
    return json.dumps(manifest.model_dump(mode="json", exclude={"files"}), indent=2)
