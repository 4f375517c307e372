"""Export a Hugging Face reward model (sequence classification, one label) to an ONNX registry
version: fp32 graph checked against PyTorch, optional int8 and fp16 graphs checked against fp32,
tokenizer files, text format and reward normalisation, all recorded in the manifest.

The int8 gate decides per model on the reference pairs (held out, from the trainer): the recipes
of :data:`ExportConfig.int8_recipes` are tried fastest first and the first whose pair order
agrees with fp32's at least ``int8_min_agreement`` of the time, with a held-out accuracy at most
``int8_max_accuracy_drop`` below fp32's, is served by default; the manifest's
:class:`QuantizationReport` records every recipe tried, its figures and why it was refused.

Graphs are written by :mod:`plaudit.trainer.onnx_graph`: past :data:`EXTERNAL_DATA_BYTES` of
weights (protobuf caps one file at 2 GB) each graph keeps them in one external-data file beside
it (``model.onnx.data``), which the manifest lists and hashes like every file.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from plaudit.services.common.calibration import MIN_PAIRS, calibrate, calibration_metrics
from plaudit.services.common.onnx_runtime import FP16, ProviderChoice, create_session
from plaudit.services.common.registry import (
    ModelManifest,
    ModelRegistry,
    Normalization,
    QuantizationReport,
    graph_external_locations,
    new_version_id,
)
from plaudit.services.common.textfmt import (
    EncodedBatch,
    RewardTextEncoder,
    TextFormat,
    length_groups,
)
from plaudit.services.runtime.contract import (
    FP16_FILE,
    FP32_FILE,
    INT8_FILE,
    OPSET,
    REWARD_INT8_RECIPES,
    TOKENIZER_FILE,
    Int8Recipe,
)
from plaudit.trainer.backbones import Backbone, resolve_backbone
from plaudit.trainer.data import PreferencePair, read_pairs, reference_pairs_path
from plaudit.trainer.objective import preference_accuracy
from plaudit.trainer.onnx_graph import EXTERNAL_DATA_BYTES as EXTERNAL_DATA_BYTES
from plaudit.trainer.onnx_graph import FUSABLE_ENCODERS as FUSABLE_ENCODERS
from plaudit.trainer.onnx_graph import ScalarReward as ScalarReward
from plaudit.trainer.onnx_graph import (
    data_file_for,
    ensemble_members,
    write_fp16_graph,
    write_reward_graph,
)
from plaudit.trainer.onnx_graph import pairwise_agreement as pairwise_agreement

log = logging.getLogger(__name__)

REFERENCE_GROUP_TOKENS = 1024


# written by the trainer beside a trained checkpoint; its presence means "the head is trained"
TRAINING_RECORD = "plaudit_training.json"


class ParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class UntrainedHeadError(RuntimeError):
    """A checkpoint that should carry a trained reward head loaded with fresh weights instead."""


class PromotionGate(Protocol):
    """Decides promotion from the reference texts (prompt, completion), interleaved c0, r0, c1,
    ..., the candidate's rewards on them from the graph it will be served with, and the
    candidate's calibration temperature; returns the manifest's promotion record, whose
    "promoted" says whether to promote."""

    def __call__(
        self, texts: list[tuple[str, str]], candidate: np.ndarray, *, temperature: float = 1.0
    ) -> dict[str, Any]: ...


@dataclass
class ExportConfig:
    checkpoint: str
    max_length: int = 512
    quantize: str | None = None  # None or "int8"
    # int8 gate, per model, on the reference pairs: pair order as fp32's at least this often ...
    int8_min_agreement: float = 0.98
    # ... and held-out accuracy (chosen > rejected) at most this far below fp32's
    int8_max_accuracy_drop: float = 0.005
    # int8 graphs tried in order, the first that passes is kept (see REWARD_INT8_RECIPES)
    int8_recipes: Sequence[Int8Recipe] = REWARD_INT8_RECIPES
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
    # also an fp16 graph (what CUDA serves by default), kept when its pair order agrees with the
    # fp32 graph's on the reference pairs at least fp16_min_agreement of the time, measured on
    # fp16_check_provider ("auto": CUDA where this machine has it, as it will be served)
    fp16: bool = False
    fp16_min_agreement: float = 0.95
    fp16_check_provider: ProviderChoice = "auto"
    # weights in external-data files; None: when they reach EXTERNAL_DATA_BYTES (fp32)
    external_data: bool | None = None
    # fused attention kernels; None: unless the weights are external (the optimizer holds about
    # 8x the weights in memory), see plaudit.trainer.onnx_graph.write_reward_graph
    fuse: bool | None = None
    # fit the preference-probability temperature on the reference pairs (they must be held out:
    # the trainer passes its held-out split) with the served graph's rewards, and record it in
    # the manifest; fewer than calibration_min_pairs pairs keep temperature 1
    calibrate: bool = False
    calibration_min_pairs: int = MIN_PAIRS


def load_reward_model(
    backbone: Backbone,
    seed: int = 0,
    *,
    require_trained_head: bool | None = None,
    heads: int | None = None,
) -> tuple[PreTrainedModel, object]:
    """The checkpoint as a sequence classifier with ``heads`` reward heads (an ensemble when more
    than one; default: a trained checkpoint's own count, else 1) in fp32 eval mode, plus its
    tokenizer.

    A checkpoint without a trained head gets a fresh one; the seed makes it reproducible. With
    ``require_trained_head`` (by default: when the folder holds the trainer's
    :data:`TRAINING_RECORD`) any weight the checkpoint lacks raises :class:`UntrainedHeadError`
    instead, so a trained model can never be exported with a silently re-initialised head.
    """
    torch.manual_seed(seed)
    kwargs = {"gguf_file": backbone.gguf_file} if backbone.gguf_file else {}
    if require_trained_head is None:
        require_trained_head = (backbone.path / TRAINING_RECORD).is_file()
    trained_heads = trained_head_count(backbone.path) if require_trained_head else None
    if heads is not None and trained_heads is not None and heads != trained_heads:
        raise ValueError(
            f"ensemble_heads: {backbone.path} was trained with {trained_heads} reward heads, "
            f"not {heads}"
        )
    heads = heads or trained_heads or 1
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        backbone.path,
        num_labels=heads,
        dtype=torch.float32,
        output_loading_info=True,
        # a fresh head of another size (an ensemble from a one-head checkpoint) is initialised
        # anew; a trained model must match (and is refused below if it does not)
        ignore_mismatched_sizes=not require_trained_head,
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
    if model.config.num_labels != heads:
        raise ValueError(
            f"reward model needs num_labels={heads}, checkpoint has {model.config.num_labels}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def trained_head_count(path: Path) -> int:
    """The reward heads of a checkpoint the trainer saved (its config's ``num_labels``)."""
    config = json.loads((path / "config.json").read_text())
    return int(config.get("num_labels", len(config.get("id2label", {})) or 1))


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


def _length_groups(
    encoder: RewardTextEncoder, pairs: list[tuple[str, str]]
) -> list[tuple[np.ndarray, EncodedBatch]]:
    """``pairs`` tokenized as serving does, in length-sorted padded groups (with their indices)."""
    encoded = encoder.encode([p for p, _ in pairs], [c for _, c in pairs])
    lengths = np.array([len(e.ids) for e, _ in encoded])
    return [
        (group, encoder.pad([encoded[i] for i in group]))
        for group in length_groups(lengths, REFERENCE_GROUP_TOKENS)
    ]


def _grouped(
    encoder: RewardTextEncoder,
    pairs: list[tuple[str, str]],
    run: Callable[[EncodedBatch], np.ndarray],
) -> np.ndarray:
    """Score ``pairs`` in length-sorted groups (as serving does) and return rewards in order."""
    rewards = np.empty(len(pairs), dtype=np.float32)
    for group, batch in _length_groups(encoder, pairs):
        rewards[group] = run(batch).reshape(-1)
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
    path: Path,
    encoder: RewardTextEncoder,
    pairs: list[tuple[str, str]],
    provider: ProviderChoice = "cpu",
) -> np.ndarray:
    """Rewards from an ONNX graph (on CPU by default) with the serving tokenization."""
    session = create_session(path, provider)
    run = session.run
    return _grouped(encoder, pairs, lambda batch: np.asarray(run(None, batch.inputs)[0]))


def timed_onnx_rewards(
    path: Path, encoder: RewardTextEncoder, pairs: list[tuple[str, str]]
) -> tuple[np.ndarray, float]:
    """:func:`onnx_rewards` on CPU and its items/s: one pass over ``pairs`` after a warm-up on
    the first of them (session creation and tokenization not timed)."""
    session = create_session(path, "cpu")
    run = session.run
    _grouped(encoder, pairs[:1], lambda batch: np.asarray(run(None, batch.inputs)[0]))
    batches = _length_groups(encoder, pairs)
    rewards = np.empty(len(pairs), dtype=np.float32)
    start = time.perf_counter()
    for group, batch in batches:
        rewards[group] = np.asarray(run(None, batch.inputs)[0]).reshape(-1)
    return rewards, len(pairs) / max(time.perf_counter() - start, 1e-9)


def pair_accuracy(rewards: np.ndarray) -> float:
    """Held-out accuracy as the trainer measures it (:func:`preference_accuracy`: chosen above
    rejected, a tie counts one half); ``rewards`` interleave chosen and rejected: c0, r0, c1, ..."""
    return preference_accuracy(rewards[0::2], rewards[1::2])


def int8_verdict(
    fp32: np.ndarray, int8: np.ndarray, *, min_agreement: float, max_accuracy_drop: float
) -> tuple[float, float, float, str | None]:
    """The int8 gate on one model's reference rewards (interleaved c0, r0, ...): returns the
    pair-order agreement with fp32, fp32's and int8's accuracy, and why int8 is refused (None:
    kept). Kept iff agreement >= ``min_agreement`` and fp32 accuracy - int8 accuracy <=
    ``max_accuracy_drop`` (both with 1e-9 of slack for float rounding)."""
    agreement = pairwise_agreement(fp32, int8)
    acc32, acc8 = pair_accuracy(fp32), pair_accuracy(int8)
    reason = None
    if agreement < min_agreement - 1e-9:
        reason = f"pair-order agreement {agreement:.4f} < {min_agreement}"
    elif acc32 - acc8 > max_accuracy_drop + 1e-9:
        reason = (
            f"accuracy drop {acc32 - acc8:.4f} ({acc32:.4f} -> {acc8:.4f}) > {max_accuracy_drop}"
        )
    return agreement, acc32, acc8, reason


def _choose_int8(
    cfg: ExportConfig,
    out: Path,
    encoder: RewardTextEncoder,
    texts: list[tuple[str, str]],
    fp32: np.ndarray,
    fp32_speed: float,
) -> tuple[QuantizationReport, np.ndarray | None]:
    """Build the int8 recipes in order into ``out`` / INT8_FILE and keep the first that passes
    :func:`int8_verdict`; returns the report and the kept graph's rewards (None: none passed,
    and no int8 graph is left in ``out``). ``fp32_speed``: the fp32 graph's items/s on ``texts``
    (:func:`timed_onnx_rewards`), recorded beside each recipe's."""
    candidates: list[dict[str, Any]] = []
    report: QuantizationReport | None = None
    for recipe in cfg.int8_recipes:
        if not recipe.build(out / FP32_FILE, out / INT8_FILE):
            log.info("int8 recipe does not apply to this graph", extra={"method": recipe.name})
            continue
        int8, speed = timed_onnx_rewards(out / INT8_FILE, encoder, texts)
        agreement, acc32, acc8, reason = int8_verdict(
            fp32,
            int8,
            min_agreement=cfg.int8_min_agreement,
            max_accuracy_drop=cfg.int8_max_accuracy_drop,
        )
        candidates.append(
            {
                "method": recipe.name,
                "pairwise_agreement": agreement,
                "accuracy": acc8,
                "items_per_s": speed,
                "max_abs_diff_vs_fp32": float(np.max(np.abs(fp32 - int8))),
                "passed": reason is None,
                "reason": reason,
            }
        )
        report = QuantizationReport(
            method=recipe.name,
            pairwise_agreement=agreement,
            threshold=cfg.int8_min_agreement,
            pairs=len(texts) // 2,
            passed=reason is None,
            accuracy_fp32=acc32,
            accuracy=acc8,
            max_accuracy_drop=cfg.int8_max_accuracy_drop,
            reason=reason,
            fp32_items_per_s=fp32_speed,
            items_per_s=speed,
            candidates=list(candidates),
        )
        if reason is None:
            log.info("int8 parity ok", extra=report.model_dump(exclude={"candidates"}))
            return report, int8
        log.info("int8 recipe refused", extra=candidates[-1])
        (out / INT8_FILE).unlink()
    if report is None:
        raise ValueError("quantize='int8': no int8 recipe applies to this graph")
    log.warning(
        "int8 graph rejected: no recipe keeps fp32's judgements",
        extra=report.model_dump(exclude={"candidates"}),
    )
    return report, None


def _drop_unread_data(out: Path, graphs: Iterable[str]) -> None:
    """Delete external-data files in ``out`` that none of ``graphs`` reads (a refused graph's,
    or side files a tool left): publishing lists every file of the folder."""
    read = {loc for graph in graphs for loc in graph_external_locations(out / graph) if loc}
    for extra in out.glob("*.data"):
        if extra.name not in read:
            extra.unlink()


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
        input_names, fused, external = write_reward_graph(
            model,
            out / FP32_FILE,
            pad_token_id=fmt.pad_token_id,
            token_type_ids=fmt.uses_token_type_ids,
            external=cfg.external_data,
            fuse=cfg.fuse,
        )
        expected = torch_rewards(model, encoder, texts)
        members = ensemble_members(model)
        del model  # the graph and the reference rewards are all that is needed from here on
        gc.collect()
        got, fp32_speed = timed_onnx_rewards(out / FP32_FILE, encoder, texts)
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
            report, int8 = _choose_int8(cfg, out, encoder, texts, got, fp32_speed)
            if int8 is not None:
                onnx_files["int8"] = INT8_FILE
                default_precision = "int8"
                served = int8
        fp16_notes: dict[str, Any] = {}
        if cfg.fp16:
            fp16_notes = _check_fp16(cfg, out, encoder, texts, got, external)
            if fp16_notes["fp16"]["passed"]:
                onnx_files[FP16] = FP16_FILE
        _drop_unread_data(out, onnx_files.values())
        std = float(np.std(got))
        calibration = (
            calibrate(served[0::2], served[1::2], min_pairs=cfg.calibration_min_pairs)
            if cfg.calibrate
            else None
        )
        temperature = calibration.temperature if calibration is not None else 1.0
        promotion = gate(texts, served, temperature=temperature) if gate is not None else None
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
            metrics={
                **cfg.metrics,
                **(calibration_metrics(calibration) if calibration is not None else {}),
            },
            data_cursor=cfg.data_cursor,
            promotion=promotion,
            calibration=calibration,
            ensemble_members=members,
            notes={
                **cfg.notes,
                "fp32_max_abs_diff_vs_torch": err,
                "fused_attention": fused,
                "external_data": external,
                **fp16_notes,
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


def _check_fp16(
    cfg: ExportConfig,
    out: Path,
    encoder: RewardTextEncoder,
    texts: list[tuple[str, str]],
    fp32: np.ndarray,
    external: bool,
) -> dict[str, Any]:
    """Write the fp16 graph beside the fp32 one and run the parity gate on it (pair order vs
    fp32 on the reference texts); a graph that fails is deleted. Returns the manifest notes."""
    write_fp16_graph(out / FP32_FILE, out / FP16_FILE, external)
    half = onnx_rewards(out / FP16_FILE, encoder, texts, cfg.fp16_check_provider)
    agreement = pairwise_agreement(fp32, half)
    report = QuantizationReport(
        method="fp16",
        pairwise_agreement=agreement,
        threshold=cfg.fp16_min_agreement,
        pairs=len(texts) // 2,
        passed=agreement >= cfg.fp16_min_agreement,
    )
    if report.passed:
        log.info("fp16 parity ok", extra=report.model_dump())
    else:
        (out / FP16_FILE).unlink()
        data_file_for(out / FP16_FILE).unlink(missing_ok=True)
        log.warning("fp16 graph rejected: pair order differs from fp32", extra=report.model_dump())
    return {
        "fp16": report.model_dump(),
        "fp16_max_abs_diff_vs_fp32": float(np.max(np.abs(fp32 - half))),
    }


def describe(manifest: ModelManifest) -> str:
    return json.dumps(manifest.model_dump(mode="json", exclude={"files"}), indent=2)
