"""Pairs tokenized with the serving encoder, cut into length-grouped micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Encoding

from plaudit.services.common.preference_files import PreferencePair
from plaudit.services.common.textfmt import RewardTextEncoder, length_groups


@dataclass(frozen=True)
class EncodedPairs:
    """Preference pairs tokenized exactly as serving tokenizes them (one row per completion)."""

    chosen: list[tuple[Encoding, bool]]
    rejected: list[tuple[Encoding, bool]]
    lengths: np.ndarray  # per pair: the longer of its two rows
    margin: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def truncated(self) -> int:
        """Rows cut to the encoder's max length."""
        return sum(t for _, t in self.chosen) + sum(t for _, t in self.rejected)


def encode_pairs(encoder: RewardTextEncoder, pairs: Sequence[PreferencePair]) -> EncodedPairs:
    prompts = [p.prompt for p in pairs]
    chosen = encoder.encode(prompts, [p.chosen for p in pairs])
    rejected = encoder.encode(prompts, [p.rejected for p in pairs])
    lengths = np.array(
        [max(len(c.ids), len(r.ids)) for (c, _), (r, _) in zip(chosen, rejected, strict=True)],
        dtype=np.int64,
    )
    return EncodedPairs(
        chosen=chosen,
        rejected=rejected,
        lengths=lengths,
        margin=np.array([p.margin for p in pairs], dtype=np.float32),
        weight=np.array([p.weight for p in pairs], dtype=np.float32),
    )


def length_grouped_batches(
    lengths: np.ndarray,
    *,
    batch_size: int,
    batch_tokens: int | None,
    rng: np.random.Generator,
    window: int = 64,
) -> list[np.ndarray]:
    """One epoch of micro-batches (pair indices) that each hold pairs of similar length.

    The pairs are shuffled, cut into windows of ``window * batch_size``, sorted by length inside
    each window and cut into batches of at most ``batch_size`` pairs and (when set) at most
    ``batch_tokens`` padded tokens, two rows per pair; then the batches are shuffled. Similar
    lengths waste little padding, the shuffles keep the epochs different.
    """
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    span = window * batch_size
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        if batch_tokens is None:
            by_length = chunk[np.argsort(-lengths[chunk], kind="stable")]
            groups = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
        else:
            groups = [chunk[g] for g in length_groups(lengths[chunk], batch_tokens // 2)]
        for group in groups:
            batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shard_batches(
    batches: list[np.ndarray], rank: int, world_size: int, grad_accum: int
) -> list[np.ndarray]:
    """This process's micro-batches: every ``world_size``-th, from ``rank``.

    The epoch is first cut to a whole number of global batches (``world_size * grad_accum``
    micro-batches), so all processes take the same number of steps and every step sees a full
    global batch; the few micro-batches left over differ from epoch to epoch.
    """
    usable = len(batches) - len(batches) % (world_size * grad_accum)
    return batches[rank:usable:world_size]


def collate(
    encoder: RewardTextEncoder, data: EncodedPairs, index: np.ndarray
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Model inputs with the chosen rows first, then the rejected ones; plus margins, weights."""
    rows = [data.chosen[i] for i in index] + [data.rejected[i] for i in index]
    batch = encoder.pad(rows)
    inputs = {k: torch.from_numpy(v) for k, v in batch.inputs.items()}
    return inputs, torch.from_numpy(data.margin[index]), torch.from_numpy(data.weight[index])
