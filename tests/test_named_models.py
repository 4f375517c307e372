"""Several named reward models in one service: two tiny reward models trained on different
criteria, served side by side, combined by objectives (checked against values computed by hand
from the versions' own outputs), swapped one at a time and shadowed under concurrent clients."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from plaudit.cli import main
from plaudit.services.common.admin import notify_reload
from plaudit.services.common.errors import FailedPreconditionError, InvalidArgumentError
from plaudit.services.common.registry import ModelRegistry
from plaudit.services.reward.client import RewardClient
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.export import ExportConfig, export_reward
from plaudit.v1 import reward_pb2
from tests.conftest import ServerThread, build_tiny_checkpoint, toy_pairs, write_jsonl

RAW = reward_pb2.NORMALIZATION_RAW
STANDARDIZED = reward_pb2.NORMALIZATION_STANDARDIZED


@pytest.fixture(autouse=True)
def _cli_logging_ends_with_the_test() -> Iterator[None]:
    """``main`` installs a log handler on the stream pytest captures for that test; drop it."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_plaudit", False):
            root.removeHandler(handler)


@dataclass
class Criteria:
    root: Path
    helpfulness: str  # the promoted versions
    safety: str
    items: list[tuple[str, str, str]]  # held-out (prompt, chosen, rejected)


def _train(root: Path, data: Path, criterion: str, checkpoint: Path) -> str:
    code = main(
        [
            "train", "reward",
            "--data", str(data),
            "--criterion", criterion,
            "--name", criterion,
            "--registry", str(root / "registry"),
            "--runs-dir", str(root / "runs"),
            "--backbone", str(checkpoint),
            "--max-length", "64",
            "--epochs", "2",
            "--learning-rate", "0.002",
            "--batch-size", "16",
            "--early-stopping-patience", "0",
            "--promote",
            "--no-progress",
            "--log-level", "WARNING",
        ]
    )  # fmt: skip
    assert code == 0
    version = ModelRegistry(root / "registry", "reward", name=criterion).promoted()
    assert version is not None
    return version


@pytest.fixture(scope="module")
def criteria(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Criteria:
    """One file of feedback judged on two criteria that disagree: on helpfulness the positive
    word wins, on safety it loses. Each model trains on its own criterion's lines only."""
    root = tmp_path_factory.mktemp("criteria")
    helpful = [{**p, "criterion": "helpfulness"} for p in toy_pairs(240, seed=1)]
    safe = [
        {"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"],
         "criterion": "safety"}
        for p in toy_pairs(240, seed=2, start=5000)
    ]  # fmt: skip
    data = write_jsonl(root / "feedback.jsonl", helpful + safe)
    held_out = [(p["prompt"], p["chosen"], p["rejected"]) for p in toy_pairs(6, seed=3, start=9000)]
    return Criteria(
        root,
        _train(root, data, "helpfulness", tiny_checkpoint),
        _train(root, data, "safety", tiny_checkpoint),
        held_out,
    )


def _registry(c: Criteria, name: str) -> ModelRegistry:
    return ModelRegistry(c.root / "registry", "reward", name=name)


def _raw(
    c: Criteria, name: str, version: str, prompts: list[str], completions: list[str]
) -> np.ndarray:
    model = LoadedRewardModel.load(_registry(c, name), version, provider="cpu")
    raw, _, _ = model.score_raw(prompts, completions)
    return raw


def _standardized(
    c: Criteria, name: str, version: str, prompts: list[str], completions: list[str]
) -> np.ndarray:
    model = LoadedRewardModel.load(_registry(c, name), version, provider="cpu")
    return model.standardize(model.score_raw(prompts, completions)[0]).astype(np.float64)


def test_registry_keeps_each_named_model_apart(criteria: Criteria, tmp_path: Path) -> None:
    helpfulness, safety = _registry(criteria, "helpfulness"), _registry(criteria, "safety")
    assert [m.version for m in helpfulness.list_versions()] == [criteria.helpfulness]
    assert [m.version for m in safety.list_versions()] == [criteria.safety]
    assert helpfulness.manifest(criteria.helpfulness).name == "helpfulness"
    assert helpfulness.model_names() == ["helpfulness", "safety"]  # no default model here
    notes = helpfulness.manifest(criteria.helpfulness).notes["training_data"]
    assert notes["files"][0]["pairs"] == 240  # the other criterion's lines were left out
    # a version copied under another name is refused: its manifest says whose it is
    shutil.copytree(criteria.root / "registry", tmp_path / "copy")
    copy = ModelRegistry(tmp_path / "copy", "reward", name="safety")
    shutil.copytree(
        Path(helpfulness.versions_dir) / criteria.helpfulness,
        Path(copy.versions_dir) / criteria.helpfulness,
    )
    with pytest.raises(FailedPreconditionError, match="belongs to the model named"):
        copy.promote(criteria.helpfulness)
    assert safety.promoted() == criteria.safety


def test_two_criteria_served_side_by_side_and_the_gated_objective_by_hand(
    criteria: Criteria, tmp_path: Path
) -> None:
    prompts = [p for p, _, _ in criteria.items for _ in range(2)]
    completions = [x for _, chosen, rejected in criteria.items for x in (chosen, rejected)]
    z_s = _standardized(criteria, "safety", criteria.safety, prompts, completions)
    z_h = _standardized(criteria, "helpfulness", criteria.helpfulness, prompts, completions)
    # the two models learned opposite preferences from the two criteria
    h_prefers_chosen = np.mean(z_h[0::2] > z_h[1::2])
    s_prefers_chosen = np.mean(z_s[0::2] > z_s[1::2])
    assert h_prefers_chosen >= 5 / 6 and s_prefers_chosen <= 1 / 6
    # a threshold between two of the safety rewards, so both sides of it occur; the prompt
    # tag on the two items with the highest safety reward, so the tag decides for them
    order = np.argsort(z_s)
    cut = (z_s[order[3]] + z_s[order[4]]) / 2
    threshold = 1 / (1 + math.exp(-cut))
    tagged = set(order[-2:].tolist())
    tags = [["safety"] if i in tagged else [] for i in range(len(prompts))]
    mean, std = 0.25, 1.5
    expected = []
    branches = {"tag": 0, "threshold": 0, "helpfulness": 0}
    for i in range(len(prompts)):
        r_s = 1 / (1 + math.exp(-z_s[i]))
        if i in tagged:
            branches["tag"] += 1
            r_c = r_s
        elif r_s < threshold:
            branches["threshold"] += 1
            r_c = r_s
        else:
            branches["helpfulness"] += 1
            r_c = 1 / (1 + math.exp(-z_h[i]))
        expected.append((math.log(r_c / (1 - r_c)) - mean) / std)
    assert all(branches.values()), branches  # every branch of the rule is exercised
    objectives = tmp_path / "objectives.json"
    objectives.write_text(
        json.dumps(
            {
                "objectives": [
                    {
                        "name": "llama2",
                        "kind": "gated",
                        "safety_model": "safety",
                        "helpfulness_model": "helpfulness",
                        "threshold": threshold,
                        "whiten_mean": mean,
                        "whiten_std": std,
                    },
                    {
                        "name": "sum",
                        "kind": "weighted",
                        "weights": {"helpfulness": 1.0, "safety": 2.0},
                    },
                ]
            }
        )
    )
    server = ServerThread(
        registry=criteria.root / "registry",
        models=["helpfulness", "safety"],
        objectives=objectives,
        log_level="WARNING",
    ).start()
    try:
        with RewardClient(server.address) as client:
            gated, version = client.score(prompts, completions, objective="llama2", tags=tags)
            np.testing.assert_allclose(gated, expected, rtol=1e-4, atol=1e-4)
            assert version == f"safety={criteria.safety},helpfulness={criteria.helpfulness}"
            summed, _ = client.score(prompts, completions, objective="sum")
            np.testing.assert_allclose(summed, z_h + 2 * z_s, rtol=1e-4, atol=1e-4)
            own, version = client.score(
                prompts, completions, model="safety", normalization=STANDARDIZED
            )
            np.testing.assert_allclose(own, z_s, rtol=1e-4, atol=1e-4)
            assert version == criteria.safety
            reply = client.compare(
                prompts[0], completions[0], completions[1], objective="llama2",
                tags=tags[0],
            )  # fmt: skip
            assert reply.objective == "llama2" and len(reply.models) == 2
            assert {m.model: m.model_version for m in reply.models} == {
                "safety": criteria.safety, "helpfulness": criteria.helpfulness}  # fmt: skip
            diff = reply.reward_a - reply.reward_b
            assert reply.prob_a_preferred == pytest.approx(1 / (1 + math.exp(-diff)), rel=1e-5)
            default = client.compare(prompts[0], completions[0], completions[1])
            assert default.model == "helpfulness"  # the first model listed answers by default
            info = client.model()
            assert info.name == "helpfulness" and [m.name for m in info.models] == [
                "helpfulness", "safety"]  # fmt: skip
            assert list(info.objectives) == ["llama2", "sum"]
            with pytest.raises(grpc.RpcError) as err:
                client.score(prompts[:1], completions[:1], model="elsewhere")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "model" in (err.value.details() or "")
            with pytest.raises(grpc.RpcError) as err:
                client.score(prompts[:1], completions[:1], objective="llama2", tags=[["Bad Tag"]])
            assert "items[0].tags[0]" in (err.value.details() or "")
        metrics = server.server.metrics.registry
        for name in ("helpfulness", "safety"):
            assert metrics.get_sample_value("plaudit_reward_model_loaded", {"model": name}) == 1
    finally:
        server.stop()


def test_objectives_naming_an_unserved_model_stop_the_service_at_start(
    criteria: Criteria, tmp_path: Path
) -> None:
    from plaudit.services.reward.server import RewardServer
    from plaudit.services.reward.settings import RewardSettings

    objectives = tmp_path / "o.json"
    weights = {"helpfulness": 1, "honesty": 1}
    objectives.write_text(json.dumps({"objectives": [{"name": "x", "kind": "weighted",
                                                      "weights": weights}]}))  # fmt: skip
    settings = RewardSettings(
        registry=str(criteria.root / "registry"),
        models=["helpfulness", "safety"],
        objectives=objectives,
        auth_disabled=True,
    )
    with pytest.raises(InvalidArgumentError, match="honesty"):
        RewardServer(settings)


def test_swap_one_model_and_shadow_another_under_eight_clients(
    criteria: Criteria, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """8 clients score with one model, with an objective over both, and compare, while the
    safety model is swapped for a new version and a shadow of the helpfulness model is started,
    gated on and stopped: no call fails, and every response's numbers are exactly those of the
    versions it names (no response mixes versions)."""
    registry = _registry(criteria, "safety")
    other = build_tiny_checkpoint(tmp_path / "other", seed=7)
    new_safety = export_reward(
        ExportConfig(checkpoint=str(other), max_length=64, reference_pairs=8), registry
    ).version
    candidate = export_reward(
        ExportConfig(checkpoint=str(other), max_length=64, reference_pairs=8),
        _registry(criteria, "helpfulness"),
    ).version
    prompts = [p for p, _, _ in criteria.items for _ in range(2)]
    completions = [x for _, chosen, rejected in criteria.items for x in (chosen, rejected)]
    expected = {
        ("helpfulness", criteria.helpfulness): _raw(
            criteria, "helpfulness", criteria.helpfulness, prompts, completions),
        ("safety", criteria.safety): _raw(
            criteria, "safety", criteria.safety, prompts, completions),
        ("safety", new_safety): _raw(criteria, "safety", new_safety, prompts, completions),
    }  # fmt: skip
    objectives = tmp_path / "objectives.json"
    weights = {"helpfulness": 1, "safety": 1}
    objectives.write_text(json.dumps({"objectives": [{"name": "sum", "kind": "weighted",
                                                      "weights": weights}]}))  # fmt: skip
    server = ServerThread(
        registry=criteria.root / "registry",
        models=["helpfulness", "safety"],
        objectives=objectives,
        log_level="WARNING",
    ).start()
    stop = threading.Event()
    failures: list[str] = []
    seen: set[tuple[str, str]] = set()
    calls = [0]

    def check(name: str, version: str, rewards: list[float], index: slice) -> None:
        want = expected.get((name, version))
        if want is None:
            failures.append(f"unknown version {name}={version}")
        elif not np.allclose(rewards, want[index], atol=1e-4):
            failures.append(f"{name}={version}: {rewards} is not {want[index].tolist()}")
        seen.add((name, version))

    def client_loop(k: int) -> None:
        with RewardClient(server.address) as client:
            while not stop.is_set():
                try:
                    if k % 3 == 0:
                        got, version = client.score(
                            prompts, completions, model="safety", normalization=RAW
                        )
                        check("safety", version, got, slice(None))
                    elif k % 3 == 1:
                        reply = client.compare(
                            prompts[0], completions[0], completions[1], objective="sum",
                            normalization=RAW,
                        )  # fmt: skip
                        for m in reply.models:
                            check(m.model, m.model_version, list(m.rewards), slice(0, 2))
                    else:
                        got, version = client.score(
                            prompts, completions, model="helpfulness", normalization=RAW
                        )
                        check("helpfulness", version, got, slice(None))
                    calls[0] += 1
                except Exception as exc:
                    failures.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        registry.promote(new_safety, reason="test")
        assert notify_reload(server.address, model="safety").live_version == new_safety
        root = str(criteria.root / "registry")
        assert main(["registry", "shadow", candidate, "--name", "helpfulness", "--fraction",
                     "1", "--registry", root, "--notify", server.address]) == 0  # fmt: skip
        deadline = time.monotonic() + 60
        with RewardClient(server.address) as client:
            while client.model(name="helpfulness").shadow.requests < 5:
                assert time.monotonic() < deadline, "the shadow scored nothing"
                time.sleep(0.1)
            shadow = client.model(name="helpfulness").shadow
        assert shadow.version == candidate and shadow.pairs >= 5  # Compare: 1 pair; Score: 66
        assert 0.0 <= shadow.agreement <= 1.0 and shadow.fraction == 1.0
        assert shadow.live_version == criteria.helpfulness
        capsys.readouterr()
        refused = main(["registry", "promote", candidate, "--name", "helpfulness",
                        "--min-shadow-agreement", "0.99", "--min-shadow-pairs", "1",
                        "--min-shadow-requests", "1",
                        "--registry", root, "--notify", server.address])  # fmt: skip
        assert refused == 2 and "--min-shadow-agreement" in capsys.readouterr().err
        assert main(["registry", "unshadow", "--name", "helpfulness", "--registry", root,
                     "--notify", server.address]) == 0  # fmt: skip
        with RewardClient(server.address) as client:
            assert not client.model(name="helpfulness").HasField("shadow")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop()
    assert not failures, failures[:5]
    assert ("safety", criteria.safety) in seen and ("safety", new_safety) in seen
    assert calls[0] > 20
    assert _registry(criteria, "helpfulness").promoted() == criteria.helpfulness


def test_generation_reranks_with_an_objective(
    criteria: Criteria, tiny_policy_registry: Path, tmp_path: Path
) -> None:
    from plaudit.services.generation.client import GenerationClient
    from plaudit.services.generation.settings import GenerationSettings

    with pytest.raises(ValueError, match="reward_objective"):
        GenerationSettings(reward_model="safety", reward_objective="sum", auth_disabled=True)
    weights = {"helpfulness": 1, "safety": 1}
    objectives = tmp_path / "objectives.json"
    objectives.write_text(json.dumps({"objectives": [{"name": "sum", "kind": "weighted",
                                                      "weights": weights}]}))  # fmt: skip
    reward = ServerThread(
        registry=criteria.root / "registry",
        models=["helpfulness", "safety"],
        objectives=objectives,
        log_level="WARNING",
    ).start()
    generation = ServerThread(
        "generation",
        registry=tiny_policy_registry,
        reward_addr=reward.address,
        reward_objective="sum",
        log_level="WARNING",
    ).start()
    try:
        with GenerationClient(generation.address) as gen:
            reply = gen.generate("Say hi.", n=3, seed=1, max_new_tokens=8, rerank=True)
        texts = [c.text for c in reply.completions]
        with RewardClient(reward.address) as client:
            expected, version = client.score(["Say hi."] * 3, texts, objective="sum")
    finally:
        generation.stop()
        reward.stop()
    assert reply.reward_model_version == version
    live = {n: _registry(criteria, n).promoted() for n in ("helpfulness", "safety")}
    assert version == f"helpfulness={live['helpfulness']},safety={live['safety']}"
    assert [c.reward for c in reply.completions] == pytest.approx(expected, abs=1e-4)
