"""Training a tiny reward model end to end: learning, publishing, the head through export, the
promotion gate, the feedback store as data source, and the command line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from plaudit.cli import TrainRewardSettings, build_parser, main
from plaudit.services.common.calibration import calibrate
from plaudit.services.common.registry import ModelManifest, ModelRegistry
from plaudit.services.common.settings import settings_from_args
from plaudit.services.feedback.domain import Comparison
from plaudit.services.feedback.store import FeedbackStore
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.backbones import resolve_backbone
from plaudit.trainer.config import RewardTrainingConfig
from plaudit.trainer.data import load_feedback_pairs, read_pairs, reference_pairs_path
from plaudit.trainer.export import (
    TRAINING_RECORD,
    ExportConfig,
    UntrainedHeadError,
    export_reward,
    load_reward_model,
    text_format_for,
    torch_rewards,
)
from plaudit.trainer.objective import preference_accuracy, split_by_prompt
from plaudit.trainer.reward import (
    PairSource,
    PublishOptions,
    RewardTrainingResult,
    serving_encoder,
    train_reward,
)
from plaudit.v1 import reward_pb2, reward_pb2_grpc
from tests.conftest import ServerThread, minilm_dir, toy_pairs, write_jsonl


def tiny_config(checkpoint: Path, **overrides: object) -> RewardTrainingConfig:
    settings: dict[str, object] = {
        "backbone": str(checkpoint),
        "max_length": 64,
        "epochs": 2,
        "learning_rate": 2e-3,
        "batch_size": 16,
        "early_stopping_patience": 0,
    }
    return RewardTrainingConfig(**{**settings, **overrides})


@dataclass
class Trained:
    registry: ModelRegistry
    baseline: str  # the untrained tiny model, promoted before training
    data: Path
    result: RewardTrainingResult


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Trained:
    root = tmp_path_factory.mktemp("train")
    data = write_jsonl(root / "toy.jsonl", toy_pairs(300))
    registry = ModelRegistry(root / "registry", "reward")
    baseline = export_reward(
        ExportConfig(checkpoint=str(tiny_checkpoint), max_length=64, reference_pairs=8),
        registry,
        promote=True,
    )
    result = train_reward(
        tiny_config(tiny_checkpoint),
        PairSource(files=(data,)),
        registry,
        publish=PublishOptions(promote=True),
        output_dir=root / "run",
    )
    assert result is not None and result.manifest is not None
    return Trained(registry, baseline.version, data, result)


def test_training_learns_a_separable_preference(trained: Trained) -> None:
    metrics = trained.result.metrics
    assert metrics["eval/initial_accuracy"] < 0.75
    assert metrics["eval/accuracy"] >= 0.9
    assert metrics["eval/loss"] < metrics["eval/initial_loss"] - 0.05
    assert metrics["rewards/margin"] > 0
    assert metrics["train/steps"] > 0 and metrics["train/pairs_per_s"] > 0

    run = trained.result.run_dir
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert len(losses) == metrics["train/steps"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    evals = [r for r in log if "eval/accuracy" in r]
    assert evals[0]["step"] == 0 and len(evals) == 3  # start + each epoch
    written = json.loads((run / "metrics.json").read_text())
    assert written["version"] == trained.result.manifest.version  # type: ignore[union-attr]
    assert written["metrics"]["eval/accuracy"] == metrics["eval/accuracy"]
    assert (run / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_manifest_records_metrics_data_config_and_parity_on_held_out(trained: Trained) -> None:
    manifest = trained.registry.manifest(trained.result.manifest.version)  # type: ignore[union-attr]
    assert manifest.metrics == pytest.approx(trained.result.metrics)
    assert manifest.parent == trained.baseline
    assert manifest.data_cursor is None  # files have no cursor
    training = manifest.notes["training"]
    assert training["learning_rate"] == 2e-3 and training["epochs"] == 2
    files = manifest.notes["training_data"]["files"]
    assert files[0]["path"] == str(trained.data) and files[0]["pairs"] == 300
    assert len(files[0]["sha256"]) == 64
    # parity and normalisation were measured on the held-out pairs
    assert manifest.normalization.reference == f"{2 * trained.result.eval_pairs} reference texts"
    assert manifest.notes["fp32_max_abs_diff_vs_torch"] < 1e-4
    assert Path(manifest.notes["checkpoint"], TRAINING_RECORD).is_file()


def test_trained_head_survives_save_reload_and_export(
    trained: Trained, tiny_checkpoint: Path
) -> None:
    model = trained.result.model
    assert model is not None
    pairs = list(read_pairs(trained.data))
    _, held_out = split_by_prompt(pairs, 0.1)
    texts = [(p.prompt, c) for p in held_out for c in (p.chosen, p.rejected)]

    # the in-memory trained model (PyTorch) against the published ONNX graph, as served
    _, tokenizer = load_reward_model(resolve_backbone(str(tiny_checkpoint)))
    encoder = serving_encoder(tokenizer, text_format_for(tokenizer, model, 64))
    expected = torch_rewards(model, encoder, texts)
    served = LoadedRewardModel.load(trained.registry, trained.result.manifest.version)  # type: ignore[union-attr]
    got, _, _ = served.score_raw([p for p, _ in texts], [c for _, c in texts])
    np.testing.assert_allclose(got, expected, atol=1e-4)

    # the reloaded checkpoint holds exactly the trained head, not the starting or a fresh one
    reloaded, _ = load_reward_model(resolve_backbone(str(trained.result.checkpoint)), seed=123)
    start, _ = load_reward_model(resolve_backbone(str(tiny_checkpoint)))

    def head(m: torch.nn.Module) -> torch.Tensor:
        return dict(m.named_parameters())["classifier.weight"]

    assert torch.equal(head(reloaded), head(model))
    assert not torch.equal(head(start), head(model))


def test_calibration_is_fitted_on_the_served_held_out_rewards_and_reported(
    trained: Trained,
) -> None:
    """Issue 20: the temperature is fitted on the held-out pairs with the graph as served, stored
    in the manifest, and reported (metrics, metrics.json, a reliability plot, the gate record)."""
    result = trained.result
    manifest = trained.registry.manifest(result.manifest.version)  # type: ignore[union-attr]
    c = manifest.calibration
    assert c is not None and c.fitted and c.pairs == result.eval_pairs >= 20
    assert manifest.temperature == c.temperature > 0
    held_out = split_by_prompt(list(read_pairs(trained.data)), 0.1)[1]
    served = LoadedRewardModel.load(trained.registry, manifest.version, provider="cpu")
    assert served.temperature == c.temperature
    rewards, _, _ = served.score_raw(
        [p.prompt for p in held_out for _ in range(2)],
        [c for p in held_out for c in (p.chosen, p.rejected)],
    )
    again = calibrate(rewards[0::2], rewards[1::2])
    assert again.temperature == pytest.approx(c.temperature, rel=1e-5)
    assert c.accuracy == pytest.approx(preference_accuracy(rewards[0::2], rewards[1::2]))
    assert c.ece_after is not None and 0.0 <= c.ece_after <= 1.0
    metrics = result.metrics
    assert metrics["calibration/temperature"] == c.temperature
    assert metrics["eval/ece"] == c.ece_after and metrics["eval/ece_uncalibrated"] == c.ece_before
    written = json.loads((result.run_dir / "metrics.json").read_text())
    assert written["calibration"]["temperature"] == c.temperature
    assert written["metrics"]["eval/ece"] == c.ece_after
    assert (result.run_dir / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    promotion = manifest.promotion
    assert promotion is not None and promotion["candidate_temperature"] == c.temperature
    assert promotion["candidate_ece"] == pytest.approx(c.ece_after)
    assert promotion["current_temperature"] == 1.0  # the baseline export is uncalibrated
    assert promotion["current_ece"] is not None
    ece = f"(calibrated ECE {promotion['candidate_ece']:.3f} vs {promotion['current_ece']:.3f})"
    assert ece in promotion["reason"]


def test_compare_over_grpc_serves_the_stored_temperature(trained: Trained) -> None:
    """The trained, calibrated version served: Compare is sigmoid((raw_a - raw_b) / T) for the
    manifest's T, whatever the normalization; Score is unchanged; GetModel says so."""
    version = trained.result.manifest.version  # type: ignore[union-attr]
    manifest = trained.registry.manifest(version)
    assert manifest.calibration is not None
    t = manifest.temperature
    server = ServerThread(registry=trained.registry.root, log_level="WARNING").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            info = stub.GetModel(reward_pb2.GetModelRequest(), timeout=30)
            assert info.version == version and info.calibrated is True
            assert info.calibration_temperature == pytest.approx(t, rel=1e-6)
            assert info.heldout_pairs == manifest.calibration.pairs
            assert info.heldout_accuracy == pytest.approx(manifest.calibration.accuracy, rel=1e-6)
            assert info.heldout_ece == pytest.approx(manifest.calibration.ece_after, rel=1e-6)
            prompt, a, b = "question 1 about bread?", "a fine good answer", "a bad answer"
            raw = stub.Score(
                reward_pb2.ScoreRequest(
                    items=[
                        reward_pb2.ScoreItem(prompt=prompt, completion=a),
                        reward_pb2.ScoreItem(prompt=prompt, completion=b),
                    ],
                    normalization=reward_pb2.NORMALIZATION_RAW,
                ),
                timeout=30,
            ).rewards
            expected = 1 / (1 + math.exp(-(raw[0] - raw[1]) / t))
            for norm in (reward_pb2.NORMALIZATION_RAW, reward_pb2.NORMALIZATION_STANDARDIZED):
                reply = stub.Compare(
                    reward_pb2.CompareRequest(
                        prompt=prompt, completion_a=a, completion_b=b, normalization=norm
                    ),
                    timeout=30,
                )
                assert reply.prob_a_preferred == pytest.approx(expected, rel=1e-5)
            assert reply.reward_a == pytest.approx(served_standardized(manifest, raw[0]), rel=1e-4)
        gauges = server.server.metrics.registry
        labels = {"model": "default", "version": version}
        assert gauges.get_sample_value(
            "plaudit_reward_model_calibration_temperature", labels
        ) == pytest.approx(t)
        assert gauges.get_sample_value("plaudit_reward_model_heldout_ece", labels) == pytest.approx(
            manifest.calibration.ece_after
        )
        assert gauges.get_sample_value(
            "plaudit_reward_model_heldout_accuracy", labels
        ) == pytest.approx(manifest.calibration.accuracy)
    finally:
        server.stop()


def test_without_a_registry_or_enough_held_out_pairs_the_temperature_stays_one(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "few.jsonl", toy_pairs(80, seed=3))
    result = train_reward(
        tiny_config(tiny_checkpoint, max_steps=1),
        PairSource(files=(data,)),
        output_dir=tmp_path / "run",
    )
    assert result is not None and result.manifest is None
    c = result.calibration
    assert c is not None and c.pairs == result.eval_pairs < 20
    assert c.temperature == 1.0 and not c.fitted
    assert f"only {c.pairs} held-out pairs" in c.note
    assert result.metrics["calibration/temperature"] == 1.0
    assert result.metrics["eval/ece"] == result.metrics["eval/ece_uncalibrated"]
    assert (tmp_path / "run" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["calibration"]["fitted"] is False


def served_standardized(manifest: ModelManifest, raw: float) -> float:
    norm = manifest.normalization
    return (raw - norm.mean) / norm.std


def test_a_checkpoint_marked_trained_refuses_a_fresh_head(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=16,
    )  # fmt: skip
    BertModel(config).save_pretrained(tmp_path)  # an encoder without the reward head
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path)
    load_reward_model(resolve_backbone(str(tmp_path)))  # a base model: a fresh head is expected
    (tmp_path / TRAINING_RECORD).write_text("{}")
    with pytest.raises(UntrainedHeadError, match="classifier"):
        load_reward_model(resolve_backbone(str(tmp_path)))


def test_gate_promoted_the_better_model_with_its_numbers(trained: Trained) -> None:
    promotion = trained.result.manifest.promotion  # type: ignore[union-attr]
    assert promotion is not None and promotion["promoted"] is True
    assert promotion["current_version"] == trained.baseline
    assert promotion["tolerance"] == 0.0  # issue 15: the default demands a strict win
    assert promotion["eval_pairs"] == trained.result.eval_pairs
    assert promotion["candidate_accuracy"] == pytest.approx(trained.result.metrics["eval/accuracy"])
    assert promotion["candidate_accuracy"] > promotion["current_accuracy"] + 0.2
    assert promotion["beats_live"] is True and promotion["above_chance"] is True
    assert promotion["p_value"] <= promotion["significance"] == 0.05
    n, correct = promotion["eval_pairs"], promotion["candidate_correct"]
    assert correct <= round(promotion["candidate_accuracy"] * n)  # ties count against it
    candidate, live = promotion["candidate_accuracy"], promotion["current_accuracy"]
    assert promotion["reason"].startswith(
        f"candidate {candidate:.3f} vs live {live:.3f} on the same {n} held-out pairs"
    )
    history = trained.registry.promotion_history()
    assert history[-1]["version"] == trained.result.manifest.version  # type: ignore[union-attr]
    assert history[-1]["reason"] == promotion["reason"]


def test_gate_refuses_a_worse_model_and_records_why(
    trained: Trained, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    live = trained.registry.promoted()
    assert live == trained.result.manifest.version  # type: ignore[union-attr]
    worse = train_reward(
        tiny_config(tiny_checkpoint, max_steps=0),  # not trained at all
        PairSource(files=(trained.data,)),
        trained.registry,
        publish=PublishOptions(promote=True),
        output_dir=tmp_path / "run",
    )
    assert worse is not None and worse.manifest is not None
    promotion = worse.manifest.promotion
    assert promotion is not None and promotion["promoted"] is False
    assert promotion["current_version"] == live
    assert promotion["current_accuracy"] == pytest.approx(trained.result.metrics["eval/accuracy"])
    assert promotion["candidate_accuracy"] < promotion["current_accuracy"] - 0.01
    assert promotion["beats_live"] is False
    assert f"does not beat live {live}" in promotion["reason"]  # issue 15: says why, with figures
    assert f"vs live {promotion['current_accuracy']:.3f} on the same" in promotion["reason"]
    assert trained.registry.promoted() == live  # unchanged
    stored = trained.registry.manifest(worse.manifest.version).promotion
    assert stored == promotion  # the refusal is on record in the published version


def _submit(store: FeedbackStore, start: int, n: int) -> None:
    events = [
        Comparison(
            prompt=p["prompt"],
            chosen=p["chosen"],
            rejected=p["rejected"],
            annotator_id=f"annotator-{i % 3}",
            idempotency_key=f"pair-{start + i}",
            margin=1.0 if i % 2 else None,
        )
        for i, p in enumerate(toy_pairs(n, seed=start, start=start))
    ]
    results = store.submit_many(events)
    assert not [r for r in results if isinstance(r, Exception)]


def retrain_refused(
    trained: Trained, tiny_checkpoint: Path, run: Path, **gate: object
) -> dict[str, Any]:
    """Train the promoted model's recipe again with the ``gate`` settings and a tolerance that
    lets it beat the live model whatever it scores; returns the gate record of a refusal (the
    live version stays)."""
    live = trained.registry.promoted()
    result = train_reward(
        tiny_config(tiny_checkpoint, **gate),
        PairSource(files=(trained.data,)),
        trained.registry,
        publish=PublishOptions(promote=True, promotion_tolerance=1.0),
        output_dir=run,
    )
    assert result is not None and result.manifest is not None
    promotion = result.manifest.promotion
    assert promotion is not None and promotion["promoted"] is False
    assert promotion["beats_live"] is True  # tolerance 1: any accuracy beats the live one
    assert trained.registry.promoted() == live
    return promotion


def test_gate_floor_refuses_a_better_model_that_is_not_significant_enough(
    trained: Trained, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A significance level no held-out set this small can reach: the floor alone refuses."""
    promotion = retrain_refused(trained, tiny_checkpoint, tmp_path, promotion_significance=1e-30)
    assert promotion["above_chance"] is False and promotion["significance"] == 1e-30
    assert promotion["p_value"] > 1e-30
    assert "not significantly above chance" in promotion["reason"]


def test_gate_ece_ceiling_refuses_a_model_whose_probabilities_miss(
    trained: Trained, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A ceiling of 0 on the calibrated held-out ECE, which no finite held-out set reaches,
    refuses a candidate the other conditions let through; the record says why."""
    promotion = retrain_refused(
        trained, tiny_checkpoint, tmp_path, promotion_significance=1.0, promotion_max_ece=0.0
    )
    assert promotion["above_chance"] is True and promotion["max_ece"] == 0.0
    assert promotion["candidate_ece"] > 0
    assert "is above the limit 0" in promotion["reason"]


def test_registry_promote_max_ece_reads_the_manifests_held_out_calibration(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    """``registry promote --max-ece``: the trained version's manifest records its calibrated
    held-out ECE; a ceiling below it refuses, one above promotes; the uncalibrated baseline is
    refused for recording none."""
    reg = trained.registry
    assert trained.result.manifest is not None
    version = trained.result.manifest.version
    calibration = reg.manifest(version).calibration
    assert calibration is not None and calibration.ece_after is not None
    ece = calibration.ece_after
    common = ["--registry", str(reg.root), "--log-level", "WARNING"]
    live = reg.promoted()
    try:
        assert main(["registry", "promote", version, "--max-ece", f"{ece / 2:.6f}", *common]) == 2
        assert "is above --max-ece" in capsys.readouterr().err
        assert main(["registry", "promote", trained.baseline, "--max-ece", "1", *common]) == 2
        assert "records no held-out calibration error" in capsys.readouterr().err
        assert reg.promoted() == live
        assert (
            main(["registry", "promote", version, "--max-ece", f"{ece + 0.01:.6f}", *common]) == 0
        )
        assert reg.promoted() == version
        assert "calibrated ECE" in reg.promotion_history()[-1]["reason"]
    finally:
        if live is not None:
            reg.promote(live, reason="test restores the live version")


def test_bf16_autocast_on_cpu_trains_as_well_and_is_recorded(
    trained: Trained, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """``mixed_precision bf16`` runs the forward passes in bf16 on the CPU (weights and loss stay
    fp32): the toy preference is learnt as by the fp32 run, and the run records its precision."""
    from plaudit.trainer.reward import autocast

    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    result = train_reward(
        tiny_config(tiny_checkpoint, mixed_precision="bf16"),
        PairSource(files=(trained.data,)),
        output_dir=tmp_path / "run",
    )
    assert result is not None
    assert result.metrics["eval/accuracy"] >= 0.9
    assert abs(result.metrics["eval/accuracy"] - trained.result.metrics["eval/accuracy"]) <= 0.05
    recorded = json.loads((result.run_dir / "metrics.json").read_text())
    assert recorded["config"]["mixed_precision"] == "bf16"


def test_training_from_the_feedback_store_records_and_continues_from_the_cursor(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    registry = ModelRegistry(tmp_path / "registry", "reward")
    cfg = tiny_config(tiny_checkpoint, epochs=1, max_steps=2)
    with FeedbackStore(url) as store:
        _submit(store, 0, 120)
        exported = list(store.export_pairs())
        loaded = load_feedback_pairs(url)  # margins and weights come from the store's consensus
        assert [(p.margin, p.weight) for p in loaded.pairs] == [
            (d.margin or 0.0, d.weight) for d in exported
        ]
        assert {p.margin for p in loaded.pairs} == {0.0, 1.0}

        first = train_reward(cfg, PairSource(database_url=url), registry, output_dir=tmp_path / "a")
        assert first is not None and first.manifest is not None
        assert first.manifest.data_cursor == str(exported[-1].cursor)
        assert first.train_pairs + first.eval_pairs == 120

        _submit(store, 120, 60)
        second = train_reward(
            cfg,
            PairSource(database_url=url, since_parent_cursor=True),
            registry,
            publish=PublishOptions(parent=first.manifest.version),
            output_dir=tmp_path / "b",
        )
        assert second is not None and second.manifest is not None
        source = second.manifest.notes["training_data"]
        assert source["after_cursor"] == exported[-1].cursor
        assert source["pairs"] == 60  # only what came after the parent's cursor
        assert second.manifest.parent == first.manifest.version
        assert int(second.manifest.data_cursor or 0) == list(store.export_pairs())[-1].cursor


def test_cli_trains_publishes_and_promotes(
    trained: Trained,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    second = write_jsonl(tmp_path / "more.jsonl", toy_pairs(40, seed=9, start=1000))
    monkeypatch.setenv("PLAUDIT_LEARNING_RATE", "0.003")  # every flag is also an env variable
    code = main(
        [
            "train", "reward",
            "--data", str(trained.data), str(second),
            "--registry", str(tmp_path / "registry"),
            "--backbone", str(tiny_checkpoint),
            "--max-length", "64",
            "--epochs", "1",
            "--max-steps", "3",
            "--output-dir", str(tmp_path / "run"),
            "--promote",
            "--no-progress",
            "--log-level", "WARNING",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    registry = ModelRegistry(tmp_path / "registry", "reward")
    assert summary["promoted"] is True and registry.promoted() == summary["version"]
    assert summary["train_pairs"] + summary["eval_pairs"] == 340
    assert summary["metrics"]["train/steps"] == 3
    manifest = registry.manifest(summary["version"])
    assert manifest.notes["training"]["learning_rate"] == 0.003
    assert len(manifest.notes["training_data"]["files"]) == 2
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_cli_settings_need_exactly_one_data_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    both = ["train", "reward", "--data", "a.jsonl", "--database-url", "sqlite:///x.db"]
    assert main(both) == 2
    assert "either --data" in capsys.readouterr().err
    assert main(["train", "reward"]) == 2
    monkeypatch.setenv("PLAUDIT_DATA", json.dumps(["a.jsonl", "b.jsonl"]))  # a list: JSON
    args = build_parser().parse_args(["train", "reward"])
    settings = settings_from_args(TrainRewardSettings, args)
    assert settings.data == [Path("a.jsonl"), Path("b.jsonl")]
    assert settings.promotion_tolerance == 0.0  # issue 15: a candidate must beat the live model
    assert settings.promotion_significance == 0.05
    defaults = RewardTrainingConfig()
    assert settings.learning_rate == defaults.learning_rate and settings.epochs == defaults.epochs


@pytest.mark.real_model
def test_real_minilm_trains_exports_and_serves_its_trained_head(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 on 64 real HH pairs for a few steps: parity on the held-out pairs, and
    the served graph reproduces the in-memory trained model."""
    data = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            for p in read_pairs(reference_pairs_path(), 64)
        ],
    )
    registry = ModelRegistry(tmp_path / "registry", "reward")
    cfg = RewardTrainingConfig(
        backbone="minilm", max_length=128, max_steps=3, batch_size=8, learning_rate=5e-5
    )
    result = train_reward(cfg, PairSource(files=(data,)), registry, output_dir=tmp_path / "run")
    assert result is not None and result.manifest is not None and result.model is not None
    manifest = result.manifest
    assert manifest.backbone == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest.metrics["train/steps"] == 3 and result.eval_pairs > 0
    assert manifest.notes["fp32_max_abs_diff_vs_torch"] < 1e-4

    _, held_out = split_by_prompt(list(read_pairs(data)), cfg.eval_fraction)
    texts = [(p.prompt, c) for p in held_out for c in (p.chosen, p.rejected)]
    _, tokenizer = load_reward_model(resolve_backbone(str(result.checkpoint)))
    encoder = serving_encoder(tokenizer, text_format_for(tokenizer, result.model, 128))
    served = LoadedRewardModel.load(registry, manifest.version)
    got, _, _ = served.score_raw([p for p, _ in texts], [c for _, c in texts])
    np.testing.assert_allclose(got, torch_rewards(result.model, encoder, texts), atol=1e-4)
