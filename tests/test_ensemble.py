"""Reward-model ensembles: bootstrapped heads on one backbone (training), their graph's members
output (export), the spread Score and Compare report (serving), and the labelling queue's
disagreement-first active learning, against literal values and values computed by hand."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from plaudit.services.common.registry import ModelRegistry
from plaudit.services.feedback.domain import LabellingTask
from plaudit.services.feedback.tasks import RewardMarginScorer, least_agreement
from plaudit.services.reward.client import RewardClient
from plaudit.services.reward.core import ScoreResult, ensemble_preference, member_rewards
from plaudit.services.reward.engine import ModelScores
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.backbones import resolve_backbone
from plaudit.trainer.config import RewardTrainingConfig
from plaudit.trainer.export import load_reward_model
from plaudit.trainer.onnx_graph import ScalarReward
from plaudit.trainer.reward import PairSource, bootstrap_weights, ensemble_loss, train_reward
from plaudit.v1 import reward_pb2
from tests.conftest import ServerThread, toy_pairs, write_jsonl

HEADS = 3


def test_bootstrap_weights_count_each_pair_poisson_one_times_per_head() -> None:
    assert np.array_equal(bootstrap_weights(4, 1, 0), np.ones((4, 1), dtype=np.float32))
    weights = bootstrap_weights(20000, 4, 7)
    assert weights.shape == (20000, 4) and np.array_equal(weights, bootstrap_weights(20000, 4, 7))
    assert abs(float(weights.mean()) - 1.0) < 0.02  # Poisson(1): mean 1
    assert abs(float((weights == 0).mean()) - math.exp(-1)) < 0.01  # P(0) = 1/e left out
    assert not np.array_equal(weights[:, 0], weights[:, 1])  # each head its own resample


def test_ensemble_loss_is_the_mean_of_each_heads_weighted_loss() -> None:
    chosen = torch.tensor([[1.0, 0.0], [2.0, -1.0]])
    rejected = torch.zeros(2, 2)
    boot = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    weight = torch.ones(2)
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid(x)
    head0 = (1 * sp(1.0) + 0 * sp(2.0)) / 2
    head1 = (2 * sp(0.0) + 1 * sp(-1.0)) / 2
    got = float(ensemble_loss(chosen, rejected, None, weight, boot))
    assert got == pytest.approx((head0 + head1) / 2, rel=1e-6)


def test_member_rewards_and_the_ensembles_preference() -> None:
    raw = np.array([1.0, 0.0], dtype=np.float32)
    members = np.array([[2.0, 0.5, 0.5], [0.0, 1.0, -1.0]], dtype=np.float32)  # means 1, 0
    scores = ModelScores(
        "default", "v1", raw, (raw - 0.5) / 2, (raw - 0.5) / 2, np.zeros(2, bool), 4,
        temperature=0.5, members=members, scale=2.0,
    )  # fmt: skip
    normalized = member_rewards(scores)
    assert normalized is not None
    np.testing.assert_allclose(normalized, (members - 0.5) / 2, rtol=1e-6)
    result = ScoreResult(raw, raw, np.zeros(2, bool), "v1", 4, 0.5, (scores,))
    spread, share = ensemble_preference(result)
    diffs = np.array([2.0, -0.5, 1.5])
    probs = 1 / (1 + np.exp(-diffs / 0.5))
    assert spread == pytest.approx(float(probs.std()), rel=1e-6)
    assert share == pytest.approx(2 / 3)


def test_least_agreement_puts_split_heads_first() -> None:
    unanimous = np.array([[1.0, 1.1, 0.9], [0.0, 0.1, -0.1]])  # d = 1 for every head
    split = np.array([[1.0, 2.0], [0.0, 0.0]])  # d = 1, 2: mean 1.5, std 0.5
    assert least_agreement(split) == pytest.approx(3.0, rel=1e-5)
    assert least_agreement(unanimous) > 1e5
    # three completions: the least sure pair decides
    three = np.array([[1.0, 2.0], [0.0, 0.0], [0.9, 2.1]])  # pair (0, 2): d = 0.1, -0.1
    assert least_agreement(three) == pytest.approx(0.0, abs=1e-5)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> ModelRegistry:
    root = tmp_path_factory.mktemp("ensemble")
    data = write_jsonl(root / "toy.jsonl", toy_pairs(160))
    registry = ModelRegistry(root / "registry", "reward")
    cfg = RewardTrainingConfig(
        backbone=str(tiny_checkpoint), max_length=64, epochs=1, learning_rate=2e-3,
        batch_size=16, early_stopping_patience=0, ensemble_heads=HEADS,
    )  # fmt: skip
    result = train_reward(cfg, PairSource(files=(data,)), registry, output_dir=root / "run")
    assert result is not None and result.manifest is not None
    registry.promote(result.manifest.version)
    return registry


def test_an_ensemble_trains_exports_and_serves_its_spread(ensemble: ModelRegistry) -> None:
    version = ensemble.promoted()
    assert version is not None
    manifest = ensemble.manifest(version)
    assert manifest.ensemble_members == HEADS and manifest.notes["training"]["ensemble_heads"] == 3
    checkpoint = Path(manifest.notes["checkpoint"])
    model, _ = load_reward_model(resolve_backbone(str(checkpoint)))
    assert model.config.num_labels == HEADS
    prompts = ["question 1 about bread?"] * 3
    completions = ["a fine good answer", "a bad answer", "an answer"]
    served = LoadedRewardModel.load(ensemble, version, provider="cpu")
    raw, members, _, _ = served.score_members(prompts, completions)
    assert members is not None and members.shape == (3, HEADS)
    np.testing.assert_allclose(raw, members.mean(axis=1), atol=1e-5)
    assert np.ptp(members, axis=1).max() > 1e-4  # the heads learned different things
    # the graph's members are PyTorch's heads, on the serving tokenization
    batch = served.encoder.pad(served.encoder.encode(prompts, completions))
    with torch.inference_mode():
        inputs = {k: torch.from_numpy(v) for k, v in batch.inputs.items()}
        expected = ScalarReward(model, members=True)(**inputs).numpy()
    np.testing.assert_allclose(members, expected, atol=1e-4)

    server = ServerThread(registry=ensemble.root, log_level="WARNING").start()
    try:
        with RewardClient(server.address) as client:
            assert client.model().ensemble_members == HEADS
            reply = client.score_response(
                prompts, completions, normalization=reward_pb2.NORMALIZATION_RAW
            )
            each = np.array(reply.member_rewards).reshape(3, HEADS)
            np.testing.assert_allclose(each, members, atol=1e-5)
            np.testing.assert_allclose(reply.spread, members.std(axis=1), atol=1e-5)
            assert reply.ensemble_members == HEADS
            standardized = client.score_response(prompts[:1], completions[:1])
            std = manifest.normalization.std
            assert standardized.spread[0] == pytest.approx(members[0].std() / std, rel=1e-4)
            compared = client.compare(prompts[0], completions[0], completions[1])
            diff = (members[0] - members[1]).astype(np.float64)
            probs = 1 / (1 + np.exp(-diff / manifest.temperature))
            assert compared.prob_a_preferred_spread == pytest.approx(probs.std(), abs=1e-5)
            assert compared.members_preferring_a == pytest.approx(
                float(np.mean((diff > 0) + 0.5 * (diff == 0)))
            )

        async def margins() -> dict[int, float]:
            scorer = RewardMarginScorer(server.address, timeout_s=30)
            try:
                task = LabellingTask(1, "k", prompts[0], tuple(completions), {}, "test", 0)
                return await scorer.margins([task])
            finally:
                await scorer.close()

        standardized_members = (members - manifest.normalization.mean) / std
        assert asyncio.run(margins())[1] == pytest.approx(
            least_agreement(standardized_members), rel=1e-3
        )
    finally:
        server.stop()
