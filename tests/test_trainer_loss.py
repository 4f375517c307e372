"""The reward-model objective, metrics, held-out split, batching and schedule on literal values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from plaudit.services.common.preference_files import PreferencePair
from plaudit.trainer.batches import length_grouped_batches, shard_batches
from plaudit.trainer.loop import lr_factor
from plaudit.trainer.objective import (
    bradley_terry_loss,
    calibration_error,
    pairwise_metrics,
    preference_accuracy,
    prompt_bucket,
    split_by_prompt,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_equal_rewards_without_margin_cost_log_2() -> None:
    loss = bradley_terry_loss(t(0.3, -1.0, 5.0), t(0.3, -1.0, 5.0))
    assert float(loss) == pytest.approx(math.log(2))


def test_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen, rejected = t(0.5, -2.0).requires_grad_(), t(1.0, 3.0).requires_grad_()
    bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad < 0).all() and (
        rejected.grad > 0
    ).all()  # descent: chosen up, rejected down
    # d/dr_c of -log sigmoid(r_c - r_r) is -(1 - sigmoid(r_c - r_r)), averaged over 2 pairs
    expected = -(1 - torch.sigmoid(t(-0.5, -5.0))) / 2
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_margin_shifts_the_required_gap() -> None:
    gap = t(2.0)
    zero = t(0.0)
    # with margin m the loss at gap m equals the no-margin loss at gap 0 (Llama 2, eq. 2)
    assert float(bradley_terry_loss(gap, zero, margin=t(2.0))) == pytest.approx(math.log(2))
    plain = float(bradley_terry_loss(gap, zero))
    assert float(bradley_terry_loss(gap, zero, margin=t(1.0))) > plain
    assert float(bradley_terry_loss(gap, zero, margin=t(-1.0))) < plain


def test_weights_scale_each_pair() -> None:
    chosen, rejected = t(1.0, 0.0), t(0.0, 1.0)
    per_pair = -torch.nn.functional.logsigmoid(chosen - rejected)
    weighted = bradley_terry_loss(chosen, rejected, weight=t(2.0, 0.5))
    assert float(weighted) == pytest.approx(float((2.0 * per_pair[0] + 0.5 * per_pair[1]) / 2))
    assert float(bradley_terry_loss(chosen, rejected, weight=t(0.0, 0.0))) == 0.0
    doubled = bradley_terry_loss(chosen, rejected, weight=t(2.0, 2.0))
    assert float(doubled) == pytest.approx(2 * float(bradley_terry_loss(chosen, rejected)))


def test_accuracy_counts_ties_as_half() -> None:
    assert preference_accuracy(np.array([2.0, 1.0, 0.0, 3.0]), np.array([1.0, 2.0, 0.0, 0.0])) == (
        pytest.approx(2.5 / 4)
    )


def test_calibration_error_on_literal_values() -> None:
    # p = sigmoid(0) = 0.5 for every pair: both orders land in bin [0.5, 0.6) with labels 1 and 0,
    # mean label 0.5 = mean confidence 0.5: perfectly calibrated
    assert calibration_error(np.zeros(4), np.zeros(4)) == pytest.approx(0.0)
    # p = 0.7 on two pairs, both right: bin 7 holds (0.7, 1) x2, bin 3 holds (0.3, 0) x2
    # ECE = (|2 - 1.4| + |0 - 0.6|) / 4 = 0.3, the under-confidence 1 - 0.7
    gap = math.log(0.7 / 0.3)
    assert calibration_error(np.array([gap, gap]), np.zeros(2)) == pytest.approx(0.3)
    # p = 0.7 on two pairs, one right one wrong (chosen/rejected swapped for the second):
    # bin 7: (0.7, 1), (0.7, 0); bin 3: (0.3, 0), (0.3, 1) -> |1 - 1.4| + |1 - 0.6| = 0.8 / 4
    assert calibration_error(np.array([gap, 0.0]), np.array([0.0, gap])) == pytest.approx(0.2)
    # confident and right: p -> 1, nearly no error
    assert calibration_error(np.array([50.0]), np.array([0.0])) == pytest.approx(0.0, abs=1e-9)


def test_pairwise_metrics_are_namespaced() -> None:
    m = pairwise_metrics(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert m["eval/accuracy"] == 0.5
    assert m["rewards/margin"] == pytest.approx(0.0)
    assert m["eval/loss"] == pytest.approx(
        (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    )
    assert {"eval/calibration_error", "rewards/chosen", "rewards/rejected", "eval/pairs"} <= set(m)


def _pairs(n: int, per_prompt: int = 3) -> list[PreferencePair]:
    return [PreferencePair(f"prompt {i // per_prompt}", f"good {i}", f"bad {i}") for i in range(n)]


def test_prompt_split_is_deterministic_disjoint_and_stable_as_data_grows() -> None:
    pairs = _pairs(900)
    train, held_out = split_by_prompt(pairs, 0.1)
    assert len(train) + len(held_out) == len(pairs)
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert 0.05 < len(held_out) / len(pairs) < 0.15
    assert split_by_prompt(list(reversed(pairs)), 0.1)[1] == list(reversed(held_out))
    # a prompt's side depends on the prompt only: the first half of the data splits the same way
    _, first_held = split_by_prompt(pairs[:450], 0.1)
    assert set(first_held) == {p for p in held_out if p in set(pairs[:450])}
    assert all(prompt_bucket(p.prompt) < 0.1 for p in held_out)


def test_length_grouped_batches_cover_every_pair_once_with_similar_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    batches = length_grouped_batches(
        lengths, batch_size=16, batch_tokens=None, rng=np.random.default_rng(1), window=8
    )
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert max(len(b) for b in batches) == 16
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_batches = np.array_split(rng.permutation(1000), len(batches))
    random_padded = sum(len(b) * lengths[b].max() for b in random_batches)
    assert padded < 0.7 * random_padded  # grouping removes most padding
    again = length_grouped_batches(
        lengths, batch_size=16, batch_tokens=None, rng=np.random.default_rng(1), window=8
    )
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))  # seeded
    other = length_grouped_batches(
        lengths, batch_size=16, batch_tokens=None, rng=np.random.default_rng(2), window=8
    )
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other, strict=False))

    by_tokens = length_grouped_batches(
        lengths, batch_size=64, batch_tokens=4096, rng=np.random.default_rng(1)
    )
    assert sorted(np.concatenate(by_tokens).tolist()) == list(range(1000))
    assert all(2 * len(b) * lengths[b].max() <= 4096 for b in by_tokens)  # 2 rows per pair


def test_shards_take_whole_global_batches() -> None:
    batches = [np.array([i]) for i in range(11)]
    shards = [shard_batches(batches, rank, 2, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [4, 4]  # 11 -> 8 micro-batches: 2 ranks x 2 accumulated
    assert {int(b[0]) for s in shards for b in s} == set(range(8))
    assert [int(b[0]) for b in shards[1]] == [1, 3, 5, 7]
    assert len(shard_batches(batches, 0, 1, 1)) == 11


def test_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(s, total=10, warmup=2, schedule="cosine") for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and all(a > b for a, b in itertools.pairwise(factors[2:]))
    assert 0 < factors[-1] < 0.05
    assert lr_factor(6, total=10, warmup=2, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(9, total=10, warmup=0, schedule="constant") == 1.0


def test_label_smoothing_stops_at_one_minus_epsilon() -> None:
    # e = 0.1 at gap log 9 (sigmoid = 0.9): -(0.9 log 0.9 + 0.1 log 0.1) = 0.325083..., gradient 0
    gap = t(math.log(9.0)).requires_grad_()
    loss = bradley_terry_loss(gap, t(0.0), label_smoothing=0.1)
    assert float(loss.detach()) == pytest.approx(0.3250829734, abs=1e-9)
    loss.backward()
    assert gap.grad is not None and abs(float(gap.grad)) < 1e-12
    # at gap 0 smoothing changes nothing (log 2), and e = 0 is the plain loss
    assert float(bradley_terry_loss(t(0.0), t(0.0), label_smoothing=0.3)) == pytest.approx(
        math.log(2)
    )
    assert float(bradley_terry_loss(t(2.0), t(0.0), label_smoothing=0.0)) == pytest.approx(
        math.log(1 + math.exp(-2.0))
    )
