"""Issue 17 item 6: a loader opens only files its manifest lists, hashed, inside the version; and
optional Ed25519-signed manifests (trainers sign, serving and promotion verify).

The attacks edit a published version's ``manifest.json`` behind the registry's back (someone
with write access to the registry's storage, or a bug) so that it keeps every listed hash right
but sends the loader elsewhere: to a real ONNX graph outside the version (``/tmp/evil.onnx``), to
another version's graph (``../v0/model.onnx``), or to a file inside the version it does not list.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from plaudit.cli import main
from plaudit.services.common.errors import FailedPreconditionError, InvalidArgumentError
from plaudit.services.common.hotswap import ModelWatcher
from plaudit.services.common.onnx_runtime import create_session
from plaudit.services.common.registry import (
    MANIFEST,
    ManifestSigner,
    ModelManifest,
    ModelRegistry,
    RegistryLocationSettings,
    TrustedKeys,
    VersionFolder,
)
from plaudit.services.runtime.reward_model import LoadedRewardModel


def tiny_onnx(path: Path, external: str | None = None) -> Path:
    """A real ONNX graph (y = x + w); with ``external``, ``w`` lives in that external-data file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    if external is not None:
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "16")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def manifest(version: str, **extra: object) -> ModelManifest:
    return ModelManifest.model_validate(
        {"version": version, "kind": "reward", "created_at": datetime.now(UTC),
         "backbone": "test", "onnx_files": {"fp32": "model.onnx"}, "text_format": {},
         "input_names": ["x"], **extra}
    )  # fmt: skip


def publish(reg: ModelRegistry, tmp: Path, version: str, **extra: object) -> ModelManifest:
    src = tmp / f"src-{version}"
    src.mkdir()
    tiny_onnx(src / "model.onnx")
    (src / "tokenizer.json").write_text("{}")
    return reg.publish(src, manifest(version, **extra))


def edit_manifest(reg: ModelRegistry, name: str, **changes: object) -> None:
    """Rewrite a published manifest's fields as they are stored (its signature left as is)."""
    path = f"{reg.versions_dir}/{name}/{MANIFEST}"
    data = json.loads(reg.fs.cat_file(path))
    data.update(changes)
    reg.fs.pipe_file(path, json.dumps(data).encode())


@pytest.fixture(params=["local", "memory"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> ModelRegistry:
    """An empty reward registry: a local folder, or fsspec's in-memory store (the remote path:
    a cached download)."""
    if request.param == "local":
        return ModelRegistry(tmp_path / "reg")
    return ModelRegistry(f"memory://plaudit-sec-{tmp_path.name}", cache_dir=tmp_path / "cache")


# -- every path a loader opens is listed, hashed and inside the version --------------------------
def test_the_attacks_would_load_another_graph_without_the_check(tmp_path: Path) -> None:
    """The premise: ``root / "/tmp/evil.onnx"`` is ``/tmp/evil.onnx`` in Python."""
    evil = tiny_onnx(tmp_path / "evil.onnx")
    assert tmp_path / "reg" / "v1" / str(evil) == evil


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("{evil}", "escapes the version"),  # a real ONNX file outside the registry
        ("../v0/model.onnx", "escapes the version"),  # another version's (hashed there) graph
        ("sub/../../v0/model.onnx", "escapes the version"),
        ("extra.onnx", "is not listed"),  # inside the version, not in ``files``
        ("manifest.json", "is not listed"),
    ],
)
def test_a_manifest_pointing_a_loader_at_an_unverified_file_is_refused(
    reg: ModelRegistry, tmp_path: Path, target: str, reason: str
) -> None:
    evil = tiny_onnx(tmp_path / "evil.onnx")
    target = target.format(evil=evil)
    publish(reg, tmp_path, "v0")
    publish(reg, tmp_path, "v1")
    edit_manifest(reg, "v1", onnx_files={"fp32": "model.onnx", "int8": target})
    for check in (reg.verify, reg.checkout, reg.promote, reg.open_version):
        with pytest.raises(FailedPreconditionError, match=rf"onnx_files\[int8\].*{reason}"):
            check("v1")
    with pytest.raises(FailedPreconditionError, match=reason):
        LoadedRewardModel.load(reg, "v1", precision="int8", provider="cpu")
    assert reg.promoted() is None
    edit_manifest(reg, "v1", onnx_files={"fp32": "model.onnx"})  # the honest manifest verifies
    assert reg.verify("v1").onnx_files == {"fp32": "model.onnx"}


def test_publishing_a_manifest_whose_graph_is_not_in_the_version_is_refused(
    reg: ModelRegistry, tmp_path: Path
) -> None:
    evil = tiny_onnx(tmp_path / "evil.onnx")
    with pytest.raises(FailedPreconditionError, match="escapes the version"):
        publish(reg, tmp_path, "v1", onnx_files={"fp32": str(evil)})
    assert reg.list_versions() == []


def test_a_manifest_describing_another_version_is_refused(
    reg: ModelRegistry, tmp_path: Path
) -> None:
    """A (signed) manifest copied under another name is not that version."""
    publish(reg, tmp_path, "v1")
    edit_manifest(reg, "v1", version="v9")
    with pytest.raises(FailedPreconditionError, match="describes reward version 'v9'"):
        reg.verify("v1")


def test_a_verified_folder_opens_only_listed_files_inside_it(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    folder = reg.open_version("v1")
    assert folder.path("model.onnx") == (folder.root / "model.onnx").resolve()
    for rel, reason in [
        ("/etc/passwd", "escapes"),
        ("../v1/model.onnx", "escapes"),
        ("", "escapes"),
        ("other.json", "not listed"),
    ]:
        with pytest.raises(FailedPreconditionError, match=reason):
            folder.path(rel)
    # an export's own folder (unpublished: nothing listed yet) still stays inside itself
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link.onnx").symlink_to(tiny_onnx(tmp_path / "evil.onnx"))
    unpublished = VersionFolder(tmp_path / "out", manifest("v2"))
    with pytest.raises(FailedPreconditionError, match="escapes"):
        unpublished.path("link.onnx")


def test_a_symlink_out_of_the_version_is_refused(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    publish(reg, tmp_path, "v1")
    graph = Path(reg.versions_dir) / "v1" / "model.onnx"
    outside = tmp_path / "outside.onnx"
    shutil.copy(graph, outside)  # the same bytes, so the hash would match
    graph.unlink()
    graph.symlink_to(outside)
    with pytest.raises(FailedPreconditionError, match="escapes the version"):
        reg.checkout("v1")


def test_onnx_runtime_keeps_external_data_inside_the_version(tmp_path: Path) -> None:
    """A graph's external-data files are opened by ONNX Runtime, not by us: it refuses absolute
    paths and paths out of the graph's folder (symlinks included), and inside the version every
    file is listed and hashed, so a graph can only pull in verified bytes."""
    np.ones((4,), np.float32).tofile(tmp_path / "evil.data")
    version = tmp_path / "version"
    version.mkdir()
    (version / "link.data").symlink_to(tmp_path / "evil.data")
    for location in (str(tmp_path / "evil.data"), "../evil.data", "link.data"):
        graph = tiny_onnx(version / "model.onnx", external=location)
        with pytest.raises(Exception, match="External data path"):
            create_session(graph, "cpu")


# -- hot swap keeps the live model -------------------------------------------------------------
def _copy_version(reg: ModelRegistry, source: str, name: str, **changes: object) -> None:
    """A new version folder holding ``source``'s files, its manifest renamed and edited."""
    versions = Path(reg.versions_dir)
    shutil.copytree(versions / source, versions / name)
    data = json.loads((versions / name / MANIFEST).read_text())
    data.update(version=name, **changes)
    (versions / name / MANIFEST).write_text(json.dumps(data))


def _watch(reg: ModelRegistry, live: str, candidate: str) -> ModelWatcher[LoadedRewardModel]:
    """A watcher that made ``live`` live, then saw ``candidate`` promoted (pointer written
    directly: the registry's own promote refuses it)."""

    async def activate(model: LoadedRewardModel) -> None:
        pass

    def load(version: str) -> LoadedRewardModel:
        return LoadedRewardModel.load(reg, version, smoke=True, provider="cpu")

    async def scenario() -> ModelWatcher[LoadedRewardModel]:
        watcher = ModelWatcher(reg, load, activate, poll_interval_s=60)
        reg._write_pointer(json.dumps({"version": live, "at": datetime.now(UTC).isoformat()}))
        assert (await watcher.check()).live_version == live
        with pytest.raises(FailedPreconditionError):
            reg.promote(candidate)
        reg._write_pointer(json.dumps({"version": candidate, "at": datetime.now(UTC).isoformat()}))
        outcome = await watcher.check()
        assert not outcome.swapped and outcome.live_version == live
        return watcher

    return asyncio.run(scenario())


def test_hot_swap_keeps_the_live_model_when_the_candidate_points_outside(
    tiny_registry: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_registry, tmp_path / "reg")
    reg = ModelRegistry(tmp_path / "reg")
    live = reg.promoted()
    assert live is not None
    evil = tmp_path / "evil.onnx"  # a real, loadable graph: the live model's own, outside
    shutil.copy(Path(reg.versions_dir) / live / "model.onnx", evil)
    _copy_version(reg, live, "evil", onnx_files={"fp32": str(evil)})
    watcher = _watch(reg, live, "evil")
    assert "evil" in watcher.last_error and "escapes the version" in watcher.last_error


def test_hot_swap_keeps_the_live_model_when_the_candidate_is_unsigned(
    tiny_registry: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_registry, tmp_path / "reg")
    signer = ManifestSigner.generate()
    reg = ModelRegistry(tmp_path / "reg", trusted_keys=TrustedKeys.from_pem(signer.public_pem()))
    live = reg.promoted()
    assert live is not None
    path = Path(reg.versions_dir) / live / MANIFEST  # sign the live version (a trainer would)
    path.write_text(
        signer.sign(ModelManifest.model_validate_json(path.read_text())).model_dump_json()
    )
    _copy_version(reg, live, "unsigned", signature=None)
    watcher = _watch(reg, live, "unsigned")
    assert "unsigned is not signed" in watcher.last_error


# -- signed manifests ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key_a() -> ManifestSigner:
    return ManifestSigner.generate()


@pytest.fixture(scope="module")
def key_b() -> ManifestSigner:
    return ManifestSigner.generate()


def trusting(reg: ModelRegistry, *signers: ManifestSigner) -> ModelRegistry:
    """The same registry as serving sees it with ``signers``' public keys configured."""
    keys = TrustedKeys.from_pem(b"".join(s.public_pem() for s in signers))
    return ModelRegistry(reg.root, reg.kind, cache_dir=reg.cache_dir.parents[1], trusted_keys=keys)


def test_a_version_signed_with_a_trusted_key_verifies(
    reg: ModelRegistry, tmp_path: Path, key_a: ManifestSigner, key_b: ManifestSigner
) -> None:
    reg.signer = key_a
    published = publish(reg, tmp_path, "v1", metrics={"eval/accuracy": 0.75})
    assert published.signature is not None and published.signature.key_id == key_a.key_id
    assert reg.manifest("v1").signature == published.signature
    serving = trusting(reg, key_a)
    assert serving.verify("v1").version == "v1"
    assert serving.open_version("v1").manifest.metrics == {"eval/accuracy": 0.75}
    serving.promote("v1")
    assert trusting(reg, key_b, key_a).verify("v1").version == "v1"  # key rotation: either


def test_a_version_signed_with_another_key_is_refused(
    reg: ModelRegistry, tmp_path: Path, key_a: ManifestSigner, key_b: ManifestSigner
) -> None:
    reg.signer = key_a
    publish(reg, tmp_path, "v1")
    serving = trusting(reg, key_b)
    for check in (serving.verify, serving.checkout, serving.promote):
        with pytest.raises(FailedPreconditionError, match=f"signed by key {key_a.key_id}, which"):
            check("v1")
    assert serving.promoted() is None


def test_a_tampered_signed_manifest_is_refused(
    reg: ModelRegistry, tmp_path: Path, key_a: ManifestSigner, key_b: ManifestSigner
) -> None:
    reg.signer = key_a
    publish(reg, tmp_path, "v1", metrics={"eval/accuracy": 0.5})
    publish(reg, tmp_path, "v2")
    serving = trusting(reg, key_a)
    edit_manifest(reg, "v1", metrics={"eval/accuracy": 0.99})  # a better-looking candidate
    with pytest.raises(FailedPreconditionError, match="bad manifest signature"):
        serving.verify("v1")
    with pytest.raises(FailedPreconditionError, match="bad manifest signature"):
        LoadedRewardModel.load(serving, "v1")
    # a signature claiming a trusted key it was not made with
    signature = reg.manifest("v2").model_dump(mode="json")["signature"]
    edit_manifest(reg, "v2", signature={**signature, "key_id": key_b.key_id})
    with pytest.raises(FailedPreconditionError, match="bad manifest signature"):
        trusting(reg, key_a, key_b).verify("v2")
    edit_manifest(reg, "v2", signature={**signature, "value": "not base64!"})
    with pytest.raises(FailedPreconditionError, match="bad manifest signature"):
        serving.verify("v2")


def test_unsigned_versions_are_refused_only_when_keys_are_configured(
    reg: ModelRegistry, tmp_path: Path, key_a: ManifestSigner
) -> None:
    publish(reg, tmp_path, "v1")
    assert reg.manifest("v1").signature is None
    assert reg.verify("v1").version == "v1"  # no keys configured: behaviour unchanged
    with pytest.raises(FailedPreconditionError, match="v1 is not signed"):
        trusting(reg, key_a).verify("v1")
    reg.signer = key_a
    publish(reg, tmp_path, "v2")
    assert reg.verify("v2").version == "v2"  # a signature without keys: ignored


def test_settings_wire_the_signing_and_trusted_keys(
    tmp_path: Path, key_a: ManifestSigner, key_b: ManifestSigner
) -> None:
    (tmp_path / "a.pem").write_bytes(key_a.private_pem())
    (tmp_path / "trusted.pem").write_bytes(key_b.public_pem() + key_a.public_pem())
    trainer = RegistryLocationSettings(
        registry=str(tmp_path / "reg"), signing_key_file=tmp_path / "a.pem"
    ).model_registry("reward")
    serving = RegistryLocationSettings(
        registry=str(tmp_path / "reg"), trusted_keys_file=tmp_path / "trusted.pem"
    ).model_registry("reward")
    assert trainer.signer is not None and trainer.signer.key_id == key_a.key_id
    assert serving.trusted_keys is not None
    assert set(serving.trusted_keys.keys) == {key_a.key_id, key_b.key_id}
    publish(trainer, tmp_path, "v1")
    assert serving.verify("v1").signature is not None


def test_keys_that_are_not_ed25519_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    with pytest.raises(InvalidArgumentError, match="not an Ed25519 key"):
        TrustedKeys.from_pem(public)
    with pytest.raises(InvalidArgumentError, match="not an Ed25519 key"):
        ManifestSigner.from_pem(private)
    with pytest.raises(InvalidArgumentError, match="no PEM public key"):
        TrustedKeys.from_pem(b"")


def test_cli_keygen_then_signed_export_and_verified_promotion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["registry", "keygen", "--out", str(keys)]) == 0
    private, public = keys / "plaudit-signing.pem", keys / "plaudit-signing.pub.pem"
    assert os.stat(private).st_mode & 0o777 == 0o600
    key_id = json.loads(capsys.readouterr().out)["key_id"]
    assert main(["registry", "keygen", "--out", str(keys)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    signer = ManifestSigner.from_file(private)
    assert signer.key_id == key_id == next(iter(TrustedKeys.from_file(public).keys))

    root = tmp_path / "reg"
    publish(ModelRegistry(root), tmp_path, "unsigned")
    publish(ModelRegistry(root, signer=signer), tmp_path, "signed")
    trusted = ["--registry", str(root), "--trusted-keys-file", str(public)]
    assert main(["registry", "promote", "unsigned", *trusted]) == 2
    assert "unsigned is not signed" in capsys.readouterr().err
    assert main(["registry", "promote", "signed", *trusted]) == 0
    assert ModelRegistry(root).promoted() == "signed"
