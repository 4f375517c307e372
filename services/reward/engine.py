"""The reward engine: a registry version loaded into ONNX Runtime, scoring batches of pairs.

Batches arrive from the dynamic batcher as whole requests (:class:`ScoreJob`). All items of a
flush are tokenized together, sorted by length and cut into groups whose padded size stays under
``group_tokens``, so short texts are never padded to long ones. Each group is one ONNX Runtime
call. The model snapshot is taken once per flush, so every request is scored by one version.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import onnxruntime as ort

from services.common.errors import FailedPreconditionError
from services.common.hotswap import LiveModel
from services.common.onnx_runtime import CPU, ProviderChoice, create_session
from services.common.registry import ModelManifest, ModelRegistry
from services.common.textfmt import RewardTextEncoder, TextFormat, length_groups

log = logging.getLogger(__name__)

# Padded tokens per ONNX Runtime call. On CPU small calls stay cache-resident: on the shared HH
# pairs 256 scores 66 items/s vs 54 at 1024 and 39 at 2048 (bench/bench_reward.py, 2 cores).
CPU_GROUP_TOKENS = 256
GPU_GROUP_TOKENS = 16384


@dataclass(frozen=True)
class ScoreJob:
    """One request's items; scored as a unit."""

    prompts: Sequence[str]
    completions: Sequence[str]
    standardize: bool | None = None  # None: the version's default


@dataclass(frozen=True)
class ScoreResult:
    rewards: np.ndarray
    raw: np.ndarray
    truncated: np.ndarray
    version: str
    tokens: int


@dataclass
class LoadedRewardModel:
    """One model version, ready to score."""

    manifest: ModelManifest
    session: ort.InferenceSession
    encoder: RewardTextEncoder
    precision: str
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    @property
    def default_group_tokens(self) -> int:
        """Padded tokens per call: small on CPU (cache-resident, measured in bench/), big on GPU."""
        return CPU_GROUP_TOKENS if self.provider == CPU else GPU_GROUP_TOKENS

    @property
    def max_length(self) -> int:
        return self.encoder.format.max_length

    @classmethod
    def load(
        cls,
        registry: ModelRegistry,
        version: str,
        *,
        precision: str = "auto",
        provider: ProviderChoice = "auto",
        intra_op_threads: int = 0,
    ) -> LoadedRewardModel:
        """Verify hashes, build the session and the tokenizer for ``version``."""
        manifest, root = registry.checkout(version)
        chosen = manifest.default_precision if precision == "auto" else precision
        if chosen not in manifest.onnx_files:
            raise FailedPreconditionError(
                f"version {version} has no {chosen} graph (has {sorted(manifest.onnx_files)})"
            )
        session = create_session(root / manifest.onnx_files[chosen], provider, intra_op_threads)
        expected = set(manifest.input_names)
        actual = {i.name for i in session.get_inputs()}
        if expected != actual:
            raise FailedPreconditionError(
                f"graph inputs {sorted(actual)} != manifest {sorted(expected)}"
            )
        encoder = RewardTextEncoder.from_files(
            root / "tokenizer.json", TextFormat.from_dict(manifest.text_format)
        )
        model = cls(manifest=manifest, session=session, encoder=encoder, precision=chosen)
        log.info(
            "loaded reward model",
            extra={"version": version, "precision": chosen, "provider": model.provider},
        )
        return model

    def score_raw(
        self, prompts: Sequence[str], completions: Sequence[str], group_tokens: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw rewards, truncation flags and real (unpadded) token counts, one per item."""
        encoded = self.encoder.encode(prompts, completions)
        lengths = np.fromiter((len(e.ids) for e, _ in encoded), dtype=np.int64, count=len(encoded))
        rewards = np.empty(len(encoded), dtype=np.float32)
        truncated = np.fromiter((t for _, t in encoded), dtype=bool, count=len(encoded))
        for group in length_groups(lengths, group_tokens or self.default_group_tokens):
            batch = self.encoder.pad([encoded[i] for i in group])
            out = self.session.run(None, batch.inputs)[0]
            rewards[group] = np.asarray(out, dtype=np.float32).reshape(len(group), -1)[:, 0]
        return rewards, truncated, lengths

    def standardize(self, raw: np.ndarray) -> np.ndarray:
        norm = self.manifest.normalization
        return ((raw - norm.mean) / (norm.std if norm.std > 0 else 1.0)).astype(np.float32)


class RewardEngine(LiveModel[LoadedRewardModel]):
    """Holds the live model and scores flushed batches of jobs (called from a worker thread)."""

    def __init__(self, group_tokens: int = 0) -> None:
        super().__init__("reward model")
        self.group_tokens = group_tokens  # 0: the loaded model's provider decides

    def process(self, jobs: Sequence[ScoreJob]) -> list[ScoreResult]:
        """Score every job of a flush with one model snapshot."""
        model = self.require_model()
        prompts = [p for job in jobs for p in job.prompts]
        completions = [c for job in jobs for c in job.completions]
        raw, truncated, lengths = model.score_raw(
            prompts, completions, self.group_tokens or model.default_group_tokens
        )
        if not np.all(np.isfinite(raw)):
            raise FailedPreconditionError(f"model {model.version} produced non-finite rewards")
        results = []
        start = 0
        for job in jobs:
            end = start + len(job.prompts)
            job_raw = raw[start:end]
            standardize = job.standardize
            if standardize is None:
                standardize = model.manifest.normalization.reference != "identity"
            rewards = model.standardize(job_raw) if standardize else job_raw
            tokens = int(lengths[start:end].sum())
            results.append(
                ScoreResult(rewards, job_raw, truncated[start:end], model.version, tokens)
            )
            start = end
        return results


def estimate_tokens(prompt: str, completion: str, max_length: int) -> int:
    """Cheap token estimate used for batch budgeting before tokenization (about 4 chars/token)."""
    return min(max_length, math.ceil((len(prompt) + len(completion)) / 4) + 3)
