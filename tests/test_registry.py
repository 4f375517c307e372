"""The model registry: atomic publish, hash verification, promotion history, safe names, and
no pickle anywhere (refused in versions; the trainer loads checkpoints as safetensors only).

The behaviour tests run on every backend: a local directory, fsspec's in-memory filesystem, and
S3 (s3fs against moto's S3 server). Tampering goes through the registry's own filesystem.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from plaudit.services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from plaudit.services.common.hotswap import ModelWatcher
from plaudit.services.common.registry import (
    PICKLE_SUFFIXES,
    ModelManifest,
    ModelRegistry,
    validate_version_name,
)


@pytest.fixture(params=["local", "memory", "s3"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> ModelRegistry:
    """An empty reward registry on each backend (remote ones cache under ``tmp_path``)."""
    if request.param == "local":
        return ModelRegistry(tmp_path / "reg")
    return ModelRegistry(remote_root(request), cache_dir=tmp_path / "cache")


def remote_root(request: pytest.FixtureRequest) -> str:
    """A fresh root on the ``memory`` or ``s3`` backend that ``request.param`` names."""
    if request.param == "memory":
        return f"memory://plaudit-{uuid.uuid4().hex}"
    return f"{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex}/reg"


def put(reg: ModelRegistry, version: str, rel: str, data: bytes) -> None:
    """Write (or overwrite) one file of a published version behind the registry's back."""
    reg.fs.pipe_file(f"{reg.versions_dir}/{version}/{rel}", data)


def get(reg: ModelRegistry, version: str, rel: str) -> bytes:
    return bytes(reg.fs.cat_file(f"{reg.versions_dir}/{version}/{rel}"))


def children(reg: ModelRegistry) -> list[str]:
    try:
        return sorted(Path(p).name for p in reg.fs.ls(reg.versions_dir, detail=False))
    except FileNotFoundError:
        return []


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


def test_publish_records_hashes_and_leaves_no_staging(reg: ModelRegistry, tmp_path: Path) -> None:
    publish(reg, tmp_path, "v1")
    m = reg.verify("v1")
    assert set(m.files) == {"model.onnx", "sub/tokenizer.json"}
    assert m.files["model.onnx"] == hashlib.sha256(b"weights").hexdigest()
    assert children(reg) == ["v1"]  # no .staging-* left over
    assert [v.version for v in reg.list_versions()] == ["v1"]
    _, folder = reg.checkout("v1")
    assert (folder / "model.onnx").read_bytes() == b"weights"
    assert (folder / "sub" / "tokenizer.json").read_text() == "{}"


def test_publishing_an_existing_version_fails(reg: ModelRegistry, tmp_path: Path) -> None:
    publish(reg, tmp_path, "v1")
    with pytest.raises(FailedPreconditionError, match="already exists"):
        publish(reg, tmp_path, "v1", b"other")


def test_tampered_files_fail_verification_and_promotion(reg: ModelRegistry, tmp_path: Path) -> None:
    publish(reg, tmp_path, "v1")
    put(reg, "v1", "model.onnx", b"evil")
    with pytest.raises(FailedPreconditionError, match=r"sha256 of model\.onnx"):
        reg.verify("v1")
    with pytest.raises(FailedPreconditionError, match=r"sha256 of model\.onnx"):
        reg.checkout("v1")  # what serving calls (remote: download, then the same check)
    with pytest.raises(FailedPreconditionError):
        reg.promote("v1")
    assert reg.promoted() is None
    reg.fs.rm_file(f"{reg.versions_dir}/v1/model.onnx")
    with pytest.raises(FailedPreconditionError, match="missing"):
        reg.verify("v1")


def test_promote_and_rollback_follow_the_history(reg: ModelRegistry, tmp_path: Path) -> None:
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


def test_rollback_without_a_previous_version_fails(reg: ModelRegistry, tmp_path: Path) -> None:
    publish(reg, tmp_path, "v1")
    reg.promote("v1")
    with pytest.raises(FailedPreconditionError):
        reg.rollback()


def test_unknown_version_is_not_found(reg: ModelRegistry) -> None:
    with pytest.raises(NotFoundError):
        reg.manifest("nope")
    assert reg.list_versions() == [] and reg.promotion_history() == []


@pytest.mark.parametrize(
    "name", ["../etc", "a/b", "", ".hidden", "v1/../../x", "x" * 200, "a\\b", "v..1"]
)
def test_unsafe_version_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="version"):
        validate_version_name(name)


def test_manifest_listing_a_file_outside_the_version_is_refused(
    reg: ModelRegistry, tmp_path: Path
) -> None:
    publish(reg, tmp_path, "v1")
    m = ModelManifest.model_validate_json(get(reg, "v1", "manifest.json"))
    m.files["../../../outside"] = "0" * 64
    put(reg, "v1", "manifest.json", m.model_dump_json().encode())
    with pytest.raises(FailedPreconditionError, match="escapes"):
        reg.verify("v1")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "state.pkl", "sub/x.PTH"])
def test_publishing_a_pickle_based_file_is_refused(
    reg: ModelRegistry, tmp_path: Path, name: str
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"weights")
    (src / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(FailedPreconditionError, match="pickle"):
        reg.publish(src, manifest("v1"))
    assert children(reg) == [] and reg.list_versions() == []  # no version, no staging left


def test_a_pickle_file_smuggled_into_a_version_fails_verification(
    reg: ModelRegistry, tmp_path: Path
) -> None:
    """Even listed with its correct hash (a tampered manifest), a pickle file is refused."""
    publish(reg, tmp_path, "v1")
    payload = b"\x80\x04pickle"
    put(reg, "v1", "extra.pt", payload)
    m = ModelManifest.model_validate_json(get(reg, "v1", "manifest.json"))
    m.files["extra.pt"] = hashlib.sha256(payload).hexdigest()
    put(reg, "v1", "manifest.json", m.model_dump_json().encode())
    with pytest.raises(FailedPreconditionError, match="pickle"):
        reg.verify("v1")
    assert {".bin", ".pt", ".pkl"} <= PICKLE_SUFFIXES


def test_a_file_added_to_a_published_version_fails_verification(
    reg: ModelRegistry, tmp_path: Path
) -> None:
    publish(reg, tmp_path, "v1")
    put(reg, "v1", "sub/added.json", b"{}")
    with pytest.raises(FailedPreconditionError, match=r"sub/added\.json is not listed"):
        reg.verify("v1")


def test_a_tampered_promotion_pointer_cannot_leave_the_registry(
    reg: ModelRegistry, tmp_path: Path
) -> None:
    """A pointer naming ``../../x`` is refused before any path is built; serving keeps going."""
    publish(reg, tmp_path, "v1")
    reg.fs.pipe_file(reg.pointer, json.dumps({"version": "../../x", "at": "now"}).encode())
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


# -- remote registries: manifest-last publishing and the local cache ----------------------------
@pytest.fixture(params=["memory", "s3"])
def remote_reg(request: pytest.FixtureRequest, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(remote_root(request), cache_dir=tmp_path / "cache", cache_keep=2)


def test_a_version_without_its_manifest_does_not_exist(
    remote_reg: ModelRegistry, tmp_path: Path
) -> None:
    """An upload cut off before its last PUT (the manifest) leaves files nobody can see."""
    publish(remote_reg, tmp_path, "v1")
    put(remote_reg, "v2", "model.onnx", b"half of a version")
    assert [m.version for m in remote_reg.list_versions()] == ["v1"]
    with pytest.raises(NotFoundError):
        remote_reg.manifest("v2")
    with pytest.raises(NotFoundError):
        remote_reg.promote("v2")


def test_serving_reads_a_verified_local_copy(remote_reg: ModelRegistry, tmp_path: Path) -> None:
    publish(remote_reg, tmp_path, "v1")
    _, folder = remote_reg.checkout("v1")
    assert folder.is_relative_to(tmp_path / "cache")
    assert (folder / "model.onnx").read_bytes() == b"weights"
    (folder / "model.onnx").write_bytes(b"rotten")  # a damaged cache is fetched again
    _, again = remote_reg.checkout("v1")
    assert again == folder and (folder / "model.onnx").read_bytes() == b"weights"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_the_cache_keeps_the_most_recent_versions(
    remote_reg: ModelRegistry, tmp_path: Path
) -> None:
    for v in ("v1", "v2", "v3"):
        publish(remote_reg, tmp_path, v, v.encode())
        remote_reg.promote(v)  # verifies by streaming: nothing cached
        assert not remote_reg.cache_dir.exists()
    for v in ("v1", "v2", "v3"):
        remote_reg.checkout(v)  # what serving does
    cached = sorted(p.name for p in remote_reg.cache_dir.iterdir())
    assert cached == ["v2", "v3"]  # cache_keep=2
    assert remote_reg.rollback() == "v2"
    remote_reg.checkout("v2")  # a cache hit: nothing downloaded, nothing pruned
    assert sorted(p.name for p in remote_reg.cache_dir.iterdir()) == ["v2", "v3"]


def test_registries_at_different_urls_do_not_share_a_cache(tmp_path: Path) -> None:
    a = ModelRegistry("memory://plaudit-a", cache_dir=tmp_path)
    b = ModelRegistry("memory://plaudit-b", cache_dir=tmp_path)
    assert a.cache_dir != b.cache_dir and a.cache_dir.parent.parent == tmp_path
    assert ModelRegistry("memory://plaudit-a/", cache_dir=tmp_path).cache_dir == a.cache_dir


def test_folder_placeholder_keys_on_s3_are_not_files(s3_bucket: str, tmp_path: Path) -> None:
    """Consoles and sync tools create ``v1/`` and ``v1/sub/`` keys: they are not unlisted files."""
    import boto3

    reg = ModelRegistry(f"{s3_bucket}/{uuid.uuid4().hex}/reg", cache_dir=tmp_path / "cache")
    publish(reg, tmp_path, "v1")
    bucket, _, prefix = reg.versions_dir.partition("/")
    s3 = boto3.client("s3")
    for key in (f"{prefix}/v1/", f"{prefix}/v1/sub/"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"")
    reg.fs.invalidate_cache()
    _, folder = reg.checkout("v1")
    assert (folder / "sub" / "tokenizer.json").read_text() == "{}"


def test_a_crashed_download_is_cleaned_up(remote_reg: ModelRegistry, tmp_path: Path) -> None:
    import os
    import time

    publish(remote_reg, tmp_path, "v1")
    left = remote_reg.cache_dir / ".download-crashed"
    (left / "sub").mkdir(parents=True)
    hour_ago = time.time() - 7200
    os.utime(left, (hour_ago, hour_ago))
    remote_reg.checkout("v1")
    assert not left.exists()


def test_settings_take_a_path_or_a_url(tmp_path: Path) -> None:
    from plaudit.services.reward.settings import RewardSettings

    local = RewardSettings(registry=tmp_path / "reg", auth_disabled=True)
    assert local.model_registry("reward").is_local
    url = RewardSettings(registry="memory://plaudit-x", auth_disabled=True)
    assert url.registry == "memory://plaudit-x"
    assert not url.model_registry("policy").is_local


def test_trainer_loads_checkpoints_as_safetensors_only(tmp_path: Path) -> None:
    """A checkpoint folder holding only pickled weights (pytorch_model.bin) is not loaded."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from plaudit.trainer.backbones import resolve_backbone
    from plaudit.trainer.export import load_reward_model

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


# -- issue 17 item 8: concurrent promotions, and pruning that spares the live version -----------
def test_concurrent_promotions_on_an_object_store_lose_no_history(
    remote_reg: ModelRegistry, tmp_path: Path
) -> None:
    """The remote ``promotions.jsonl`` was read, extended and written back: two promotions at
    once could lose a line. Each promotion is now an object of its own."""
    import threading

    versions = [f"v{i}" for i in range(8)]
    for v in versions:
        publish(remote_reg, tmp_path, v, v.encode())
    # an older release's history file is still read, first
    legacy = {"version": "v0", "previous": None, "at": "2020-01-01T00:00:00+00:00",
              "reason": "legacy", "rollback": False}  # fmt: skip
    remote_reg.fs.pipe_file(remote_reg.history, (json.dumps(legacy) + "\n").encode())
    barrier = threading.Barrier(len(versions))
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        registry = ModelRegistry(remote_reg.root, cache_dir=tmp_path / "cache")  # another writer
        barrier.wait()
        try:
            registry.promote(version, reason=f"thread {version}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    history = remote_reg.promotion_history()
    assert history[0] == legacy
    assert sorted(r["reason"] for r in history[1:]) == sorted(f"thread {v}" for v in versions)
    assert [r["at"] for r in history[1:]] == sorted(r["at"] for r in history[1:])
    remote_reg.promote("v3")
    assert remote_reg.promotion_history()[-1]["version"] == "v3"  # the newest comes last


def test_cache_pruning_never_deletes_the_promoted_version(
    remote_reg: ModelRegistry, tmp_path: Path
) -> None:
    """Pruning by mtime deleted the live version's cached copy once it was the oldest (a model
    that serves for weeks is never touched again). The promoted version is kept, however old."""
    import os

    for v in ("v1", "v2", "v3", "v4"):
        publish(remote_reg, tmp_path, v, v.encode())
    remote_reg.promote("v1")
    remote_reg.checkout("v1")
    live = remote_reg.cache_dir / "v1"
    os.utime(live, (1_000_000, 1_000_000))  # served for ages: the oldest mtime by far
    # another process (e.g. a trainer verifying candidates) fills the cache past cache_keep=2
    other = ModelRegistry(remote_reg.root, cache_dir=tmp_path / "cache", cache_keep=2)
    for v in ("v2", "v3", "v4"):
        other.checkout(v)
    cached = sorted(p.name for p in remote_reg.cache_dir.iterdir())
    assert "v1" in cached, cached
    assert cached == ["v1", "v3", "v4"]  # the live one, and the two ``other`` just used
    _, folder = remote_reg.checkout("v1")  # a cache hit that still verifies
    assert (folder / "model.onnx").read_bytes() == b"v1"


def test_cache_pruning_spares_what_this_process_checked_out(
    remote_reg: ModelRegistry, tmp_path: Path
) -> None:
    """A version this process loaded (e.g. before a promotion moved the pointer elsewhere, or
    one being hot-swapped in) is not pruned by its own next download."""
    import os

    for v in ("v1", "v2", "v3"):
        publish(remote_reg, tmp_path, v, v.encode())
    remote_reg.checkout("v1")
    os.utime(remote_reg.cache_dir / "v1", (1_000_000, 1_000_000))
    remote_reg.checkout("v2")
    os.utime(remote_reg.cache_dir / "v2", (2_000_000, 2_000_000))
    remote_reg.checkout("v3")  # cache_keep=2: one of the two older copies goes, not v2
    assert sorted(p.name for p in remote_reg.cache_dir.iterdir()) == ["v2", "v3"]
