"""The model registry: atomic publish, hash verification, promotion history, safe names, and
no pickle anywhere (refused in versions; the trainer loads checkpoints as safetensors only)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.hotswap import ModelWatcher
from services.common.registry import (
    PICKLE_SUFFIXES,
    ModelManifest,
    ModelRegistry,
    sha256_file,
    validate_version_name,
)


def manifest(version: str) -> ModelManifest:
    return ModelManifest(
        version=version,
        kind="reward",
        created_at=datetime.now(UTC),
        backbone="test",
        onnx_files={"fp32": "model.onnx"},
        text_format={},
        input_names=["input_ids"],
    )


def publish(reg: ModelRegistry, tmp: Path, version: str, payload: bytes = b"weights") -> None:
    src = tmp / f"src-{version}"
    (src / "sub").mkdir(parents=True, exist_ok=True)
    (src / "model.onnx").write_bytes(payload)
    (src / "sub" / "tokenizer.json").write_text("{}")
    reg.publish(src, manifest(version))


def test_publish_records_hashes_and_leaves_no_staging(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    m = reg.verify("v1")
    assert set(m.files) == {"model.onnx", "sub/tokenizer.json"}
    assert m.files["model.onnx"] == hashlib.sha256(b"weights").hexdigest()
    assert [p.name for p in reg.versions_dir.iterdir()] == ["v1"]  # no .staging-* left over
    assert [v.version for v in reg.list_versions()] == ["v1"]


def test_publishing_an_existing_version_fails(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    with pytest.raises(FailedPreconditionError, match="already exists"):
        publish(reg, tmp_path, "v1", b"other")


def test_tampered_files_fail_verification_and_promotion(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    (reg.version_dir("v1") / "model.onnx").write_bytes(b"evil")
    with pytest.raises(FailedPreconditionError, match=r"sha256 of model\.onnx"):
        reg.verify("v1")
    with pytest.raises(FailedPreconditionError):
        reg.promote("v1")
    assert reg.promoted() is None
    (reg.version_dir("v1") / "model.onnx").unlink()
    with pytest.raises(FailedPreconditionError, match="missing"):
        reg.verify("v1")


def test_promote_and_rollback_follow_the_history(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    assert reg.promoted() is None
    for v in ("v1", "v2", "v3"):
        publish(reg, tmp_path, v, v.encode())
        reg.promote(v)
    assert reg.promoted() == "v3"
    assert reg.rollback() == "v2"
    assert reg.promoted() == "v2"
    assert reg.rollback() == "v1"  # walks back, does not toggle to v3
    history = reg.promotion_history()
    assert [h["version"] for h in history] == ["v1", "v2", "v3", "v2", "v1"]
    assert history[-1]["previous"] == "v2"
    with pytest.raises(FailedPreconditionError):
        reg.rollback()
    reg.promote("v3")
    assert reg.rollback() == "v1"


def test_rollback_without_a_previous_version_fails(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    reg.promote("v1")
    with pytest.raises(FailedPreconditionError):
        reg.rollback()


def test_unknown_version_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        ModelRegistry(tmp_path).manifest("nope")


@pytest.mark.parametrize(
    "name", ["../etc", "a/b", "", ".hidden", "v1/../../x", "x" * 200, "a\\b", "v..1"]
)
def test_unsafe_version_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="version"):
        validate_version_name(name)


def test_manifest_listing_a_file_outside_the_version_is_refused(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    path = reg.version_dir("v1") / "manifest.json"
    m = ModelManifest.model_validate_json(path.read_text())
    m.files["../../../outside"] = "0" * 64
    path.write_text(m.model_dump_json())
    with pytest.raises(FailedPreconditionError, match="escapes"):
        reg.verify("v1")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "state.pkl", "sub/x.PTH"])
def test_publishing_a_pickle_based_file_is_refused(tmp_path: Path, name: str) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"weights")
    (src / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(FailedPreconditionError, match="pickle"):
        reg.publish(src, manifest("v1"))
    assert [p.name for p in reg.versions_dir.iterdir()] == []  # no version, no staging left


def test_a_pickle_file_smuggled_into_a_version_fails_verification(tmp_path: Path) -> None:
    """Even listed with its correct hash (a tampered manifest), a pickle file is refused."""
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    folder = reg.version_dir("v1")
    (folder / "extra.pt").write_bytes(b"\x80\x04pickle")
    path = folder / "manifest.json"
    m = ModelManifest.model_validate_json(path.read_text())
    m.files["extra.pt"] = sha256_file(folder / "extra.pt")
    path.write_text(m.model_dump_json())
    with pytest.raises(FailedPreconditionError, match="pickle"):
        reg.verify("v1")
    assert {".bin", ".pt", ".pkl"} <= PICKLE_SUFFIXES


def test_a_file_added_to_a_published_version_fails_verification(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    (reg.version_dir("v1") / "sub" / "added.json").write_text("{}")
    with pytest.raises(FailedPreconditionError, match=r"sub/added\.json is not listed"):
        reg.verify("v1")


def test_a_tampered_promotion_pointer_cannot_leave_the_registry(tmp_path: Path) -> None:
    """A pointer naming ``../../x`` is refused before any path is built; serving keeps going."""
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    (tmp_path / "x").mkdir()
    reg.base.mkdir(parents=True, exist_ok=True)
    reg.pointer.write_text(json.dumps({"version": "../../x", "at": "now"}))
    with pytest.raises(InvalidArgumentError, match="version"):
        reg.verify(str(reg.promoted()))
    loaded: list[str] = []

    def load(version: str) -> str:
        reg.verify(version)
        loaded.append(version)
        return version

    async def activate(model: str) -> None:
        raise AssertionError("nothing may be activated")

    watcher: ModelWatcher[str] = ModelWatcher(reg, load, activate, poll_interval_s=60)
    outcome = asyncio.run(watcher.check())
    assert not outcome.swapped and "invalid version name" in outcome.error
    assert loaded == []


def test_trainer_loads_checkpoints_as_safetensors_only(tmp_path: Path) -> None:
    """A checkpoint folder holding only pickled weights (pytorch_model.bin) is not loaded."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from trainer.backbones import resolve_backbone
    from trainer.export import load_reward_model

    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=64,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
        num_labels=1,
    )
    model = BertForSequenceClassification(config)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    assert resolve_backbone(str(folder)).weights_kwargs == {"use_safetensors": True}
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_reward_model(resolve_backbone(str(folder)))
