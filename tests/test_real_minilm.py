"""The real all-MiniLM-L6-v2 backbone, exported and served, against PyTorch on real HH pairs."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from plaudit.services.common.registry import ModelRegistry
from plaudit.trainer.data import read_pairs, reference_pairs_path
from plaudit.trainer.export import ExportConfig, export_reward
from plaudit.v1 import reward_pb2, reward_pb2_grpc
from tests.conftest import ServerThread, minilm_dir

pytestmark = pytest.mark.real_model


def test_real_minilm_export_serves_the_same_rewards_as_pytorch(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    registry = ModelRegistry(tmp_path, "reward")
    manifest = export_reward(
        ExportConfig(checkpoint="minilm", max_length=256, reference_pairs=16, seed=0),
        registry,
        promote=True,
    )
    assert manifest.backbone.endswith("all-MiniLM-L6-v2")
    assert manifest.notes["fp32_max_abs_diff_vs_torch"] < 1e-4

    pairs = list(read_pairs(reference_pairs_path(), 12))
    prompts = [p.prompt for p in pairs] * 2
    completions = [p.chosen for p in pairs] + [p.rejected for p in pairs]

    # PyTorch as a user would run it: same checkpoint, same seeded head, HF tokenizer.
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=1).eval()
    with torch.inference_mode():
        # keep the end of long prompts, as serving does: the tokenizer's own left truncation
        tok.truncation_side = "left"
        batch = tok(
            prompts,
            completions,
            padding=True,
            truncation="only_first",
            max_length=256,
            return_tensors="pt",
        )
        expected = model(**batch).logits[:, 0].numpy()

    server = ServerThread(registry=tmp_path, log_level="WARNING").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            reply = stub.Score(
                reward_pb2.ScoreRequest(
                    items=[
                        reward_pb2.ScoreItem(prompt=p, completion=c)
                        for p, c in zip(prompts, completions, strict=True)
                    ],
                    normalization=reward_pb2.NORMALIZATION_RAW,
                ),
                timeout=120,
            )
            info = stub.GetModel(reward_pb2.GetModelRequest())
    finally:
        server.stop()
    assert reply.model_version == manifest.version
    assert info.backbone == manifest.backbone and info.max_length == 256
    np.testing.assert_allclose(np.array(reply.rewards), expected, atol=1e-4)
