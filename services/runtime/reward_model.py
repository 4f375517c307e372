"""A reward-model version in ONNX Runtime: tokenize pairs, score them in length groups.

Used by the reward service and by the trainer's promotion gate (the promoted version's accuracy
as it is served). Invariant: rewards come back in input order, one per (prompt, completion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import onnxruntime as ort

from plaudit.services.common.errors import FailedPreconditionError
from plaudit.services.common.onnx_runtime import CPU, OnnxModel
from plaudit.services.common.registry import ModelManifest, VersionFolder
from plaudit.services.common.textfmt import RewardTextEncoder, TextFormat, length_groups
from plaudit.services.runtime.contract import TOKENIZER_FILE

# Padded tokens per ONNX Runtime call. On CPU small calls stay cache-resident: on the shared HH
# pairs 256 scores 66 items/s vs 54 at 1024 and 39 at 2048 (bench/bench_reward.py, 2 cores).
CPU_GROUP_TOKENS = 256
GPU_GROUP_TOKENS = 16384
SMOKE_BATCH = (["What is the capital of France?"] * 2, ["Paris.", "I would rather not say."])


@dataclass
class LoadedRewardModel(OnnxModel):
    """One model version, ready to score."""

    manifest: ModelManifest
    session: ort.InferenceSession
    encoder: RewardTextEncoder
    precision: str
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def default_group_tokens(self) -> int:
        """Padded tokens per call: small on CPU (cache-resident, measured in bench/), big on GPU."""
        return CPU_GROUP_TOKENS if self.provider == CPU else GPU_GROUP_TOKENS

    @property
    def max_length(self) -> int:
        return self.encoder.format.max_length

    @classmethod
    def build(
        cls, folder: VersionFolder, session: ort.InferenceSession, precision: str
    ) -> LoadedRewardModel:
        manifest = folder.manifest
        encoder = RewardTextEncoder.from_files(
            folder.path(TOKENIZER_FILE), TextFormat.from_dict(manifest.text_format)
        )
        outputs = len(session.get_outputs())
        if manifest.ensemble_members > 1 and outputs < 2:
            raise FailedPreconditionError(
                f"version {manifest.version} is an ensemble of {manifest.ensemble_members} heads "
                f"but its graph has {outputs} output (reward and members expected)"
            )
        return cls(manifest=manifest, session=session, encoder=encoder, precision=precision)

    def smoke_test(self) -> None:
        """Score the smoke batch (which also warms the session up); raise unless finite."""
        raw, _, _ = self.score_raw(*SMOKE_BATCH)
        if not np.all(np.isfinite(raw)):
            raise ValueError(f"version {self.version} scores the smoke batch as {raw.tolist()}")

    @property
    def ensemble_members(self) -> int:
        """Reward heads of an ensemble version (1: a single reward model)."""
        return self.manifest.ensemble_members

    def score_raw(
        self, prompts: Sequence[str], completions: Sequence[str], group_tokens: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw rewards, truncation flags and real (unpadded) token counts, one per item."""
        raw, _, truncated, lengths = self.score_members(prompts, completions, group_tokens)
        return raw, truncated, lengths

    def score_members(
        self, prompts: Sequence[str], completions: Sequence[str], group_tokens: int = 0
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """Raw rewards (an ensemble's: the mean of its heads), each head's raw reward
        ``(items, heads)`` (None for a single model), truncation flags and real token counts."""
        encoded = self.encoder.encode(prompts, completions)
        lengths = np.fromiter((len(e.ids) for e, _ in encoded), dtype=np.int64, count=len(encoded))
        rewards = np.empty(len(encoded), dtype=np.float32)
        heads = self.ensemble_members
        members = np.empty((len(encoded), heads), dtype=np.float32) if heads > 1 else None
        truncated = np.fromiter((t for _, t in encoded), dtype=bool, count=len(encoded))
        for group in length_groups(lengths, group_tokens or self.default_group_tokens):
            batch = self.encoder.pad([encoded[i] for i in group])
            outputs = self.session.run(None, batch.inputs)
            rewards[group] = np.asarray(outputs[0], dtype=np.float32).reshape(len(group), -1)[:, 0]
            if members is not None:
                members[group] = np.asarray(outputs[1], dtype=np.float32).reshape(len(group), heads)
        return rewards, members, truncated, lengths

    @property
    def temperature(self) -> float:
        """The calibration temperature of ``P(a preferred) = sigmoid((raw_a - raw_b) / T)``
        (1 for a version without calibration, e.g. published before it existed)."""
        return self.manifest.temperature

    def standardize(self, raw: np.ndarray) -> np.ndarray:
        norm = self.manifest.normalization
        return ((raw - norm.mean) / (norm.std if norm.std > 0 else 1.0)).astype(np.float32)
