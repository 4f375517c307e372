"""Issue 22 item 3: reward models past 2 GB.

A graph whose weights near protobuf's 2 GB limit keeps them in one external-data file beside it
(``model.onnx.data``), listed and hashed in the manifest like every file; an fp16 graph (what
CUDA serves) passes the same pair-order gate as int8. Verification reads each graph's external
``location``s and refuses any outside the version or unlisted, whatever ONNX Runtime would do.
Such versions publish, verify, check out (local and remote cache), load, hot-swap and roll back
like any other.

The fast tests force external data on the tiny model; ``test_a_reward_model_past_2gb_...``
exports a random BERT whose fp32 weights pass 2 GiB (a huge vocabulary, one layer).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from plaudit.services.common.errors import FailedPreconditionError
from plaudit.services.common.hotswap import ModelWatcher
from plaudit.services.common.onnx_runtime import auto_precision
from plaudit.services.common.registry import (
    MANIFEST,
    ModelManifest,
    ModelRegistry,
    NotProtobufError,
    graph_external_locations,
    onnx_external_locations,
)
from plaudit.services.runtime.reward_model import LoadedRewardModel
from plaudit.trainer.data import read_pairs, reference_pairs_path
from plaudit.trainer.export import ExportConfig, export_reward
from plaudit.trainer.onnx_graph import save_graph
from tests.conftest import minilm_dir

TEXTS = (
    ["What is the capital of France?"] * 3 + ["Name a colour."] * 3,
    ["Paris.", "Lyon, probably.", "I would rather not say.", "Blue.", "Seven.", "Green."],
)


# -- the tiny model, exported with external data forced ------------------------------------------
@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path
) -> tuple[Path, ModelManifest, ModelManifest]:
    """A local registry holding the tiny model twice: weights inside the graph (promoted), and
    in external data with an fp16 graph beside the fp32 one."""
    root = tmp_path_factory.mktemp("large-export")
    reg = ModelRegistry(root)
    checkpoint = str(tiny_checkpoint)
    inline = export_reward(
        ExportConfig(checkpoint=checkpoint, max_length=64, reference_pairs=32), reg, promote=True
    )
    external = export_reward(
        ExportConfig(
            checkpoint=checkpoint,
            max_length=64,
            reference_pairs=32,
            external_data=True,
            fuse=True,  # what the GPU benchmark runs; by default external graphs are not fused
            fp16=True,
            fp16_check_provider="cpu",
        ),
        reg,
    )
    return root, inline, external


def test_external_data_files_are_listed_and_hashed(
    exported: tuple[Path, ModelManifest, ModelManifest],
) -> None:
    root, inline, ext = exported
    folder = Path(ModelRegistry(root).versions_dir) / ext.version
    assert ext.onnx_files == {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}
    assert ext.default_precision == "fp32" and ext.notes["external_data"] is True
    assert ext.notes["fused_attention"] is True
    assert ext.notes["fp16"]["passed"] and ext.notes["fp16"]["method"] == "fp16"
    graphs_and_data = {"model.onnx", "model.onnx.data", "model.fp16.onnx", "model.fp16.onnx.data"}
    assert graphs_and_data <= set(ext.files)
    assert {p.name for p in folder.iterdir()} == {*ext.files, MANIFEST}  # nothing else
    for rel, digest in ext.files.items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest
    for graph in ("model.onnx", "model.fp16.onnx"):  # the weights are in the data file
        data = folder / f"{graph}.data"
        assert (folder / graph).stat().st_size < data.stat().st_size / 20
        assert set(graph_external_locations(folder / graph)) == {data.name}
    assert "model.onnx.data" not in inline.files and inline.notes["external_data"] is False
    assert (
        graph_external_locations(
            Path(ModelRegistry(root).versions_dir) / inline.version / "model.onnx"
        )
        == []
    )
    # fp16 halves the bytes of the weights
    fp32_bytes = (folder / "model.onnx.data").stat().st_size
    assert 0.4 < (folder / "model.fp16.onnx.data").stat().st_size / fp32_bytes < 0.6


def test_an_external_data_version_scores_as_the_inline_one(
    exported: tuple[Path, ModelManifest, ModelManifest],
) -> None:
    root, inline, ext = exported
    reg = ModelRegistry(root)
    expected, _, _ = LoadedRewardModel.load(reg, inline.version, provider="cpu").score_raw(*TEXTS)
    model = LoadedRewardModel.load(reg, ext.version, smoke=True, provider="cpu")
    assert model.precision == "fp32" == auto_precision(ext, "cpu")  # CPU serves fp32 by default
    got, _, _ = model.score_raw(*TEXTS)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    half = LoadedRewardModel.load(reg, ext.version, precision="fp16", provider="cpu")
    fp16, _, _ = half.score_raw(*TEXTS)
    assert half.precision == "fp16" and fp16.dtype == np.float32
    # really half precision (not the fp32 graph again), and close to it
    assert 0 < np.max(np.abs(fp16 - expected)) < 1e-2
    assert ext.notes["fp16"]["pairwise_agreement"] >= ext.notes["fp16"]["threshold"]


def test_a_remote_registry_caches_the_external_data_and_loads_it(
    exported: tuple[Path, ModelManifest, ModelManifest], tmp_path: Path
) -> None:
    root, _, ext = exported
    source = tmp_path / "source"
    shutil.copytree(Path(ModelRegistry(root).versions_dir) / ext.version, source)
    remote = ModelRegistry(f"memory://large-{tmp_path.name}", cache_dir=tmp_path / "cache")
    remote.publish(source, ext.model_copy(update={"files": {}}))
    assert remote.verify(ext.version).files == ext.files  # streamed, graphs read, nothing cached
    assert not (tmp_path / "cache").exists()
    model = LoadedRewardModel.load(remote, ext.version, smoke=True, provider="cpu")
    cached = remote.cache_dir / ext.version
    assert (cached / "model.onnx.data").stat().st_size == (
        source / "model.onnx.data"
    ).stat().st_size
    local = LoadedRewardModel.load(ModelRegistry(root), ext.version, provider="cpu")
    np.testing.assert_array_equal(model.score_raw(*TEXTS)[0], local.score_raw(*TEXTS)[0])
    # a damaged cached data file is noticed and downloaded again
    with (cached / "model.onnx.data").open("r+b") as fh:
        fh.write(b"\0" * 64)
    again = LoadedRewardModel.load(remote, ext.version, provider="cpu")
    np.testing.assert_array_equal(again.score_raw(*TEXTS)[0], local.score_raw(*TEXTS)[0])


def test_external_data_versions_hot_swap_and_roll_back(
    exported: tuple[Path, ModelManifest, ModelManifest], tmp_path: Path
) -> None:
    root, inline, ext = exported
    shutil.copytree(root, tmp_path / "reg")
    reg = ModelRegistry(tmp_path / "reg")
    assert reg.promoted() == inline.version
    live: list[str] = []

    async def activate(model: LoadedRewardModel) -> None:
        live.append(model.version)

    def load(version: str) -> LoadedRewardModel:
        return LoadedRewardModel.load(reg, version, smoke=True, provider="cpu")

    async def scenario() -> None:
        watcher = ModelWatcher(reg, load, activate, poll_interval_s=60)
        assert (await watcher.check()).live_version == inline.version
        reg.promote(ext.version)
        outcome = await watcher.check()
        assert outcome.swapped and outcome.live_version == ext.version, watcher.last_error
        assert reg.rollback() == inline.version
        outcome = await watcher.check()
        assert outcome.swapped and outcome.live_version == inline.version

    asyncio.run(scenario())
    assert live == [inline.version, ext.version, inline.version]


# -- verification reads the graph's external locations -------------------------------------------
def small_graph(folder: Path, *, external: bool = True) -> Path:
    """A real ONNX graph (y = x + w, w 1,024 floats) with ``w`` in ``model.onnx.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    save_graph(model, folder / "model.onnx", external)
    (folder / "tokenizer.json").write_text("{}")
    return folder / "model.onnx"


def relocate(graph: Path, location: str | None) -> None:
    """Point the graph's external tensor at ``location`` (None: no location at all)."""
    model = onnx.load(str(graph), load_external_data=False)
    tensor = model.graph.initializer[0]
    entries = [(e.key, e.value) for e in tensor.external_data if e.key != "location"]
    del tensor.external_data[:]
    for key, value in ([("location", location)] if location is not None else []) + entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(graph))


def small_manifest(version: str) -> ModelManifest:
    return ModelManifest.model_validate(
        {"version": version, "kind": "reward", "created_at": datetime.now(UTC),
         "backbone": "test", "onnx_files": {"fp32": "model.onnx"}, "text_format": {},
         "input_names": ["x"]}
    )  # fmt: skip


@pytest.fixture(params=["local", "memory"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> ModelRegistry:
    if request.param == "local":
        return ModelRegistry(tmp_path / "reg")
    return ModelRegistry(f"memory://plaudit-ext-{tmp_path.name}", cache_dir=tmp_path / "cache")


def tamper(reg: ModelRegistry, tmp_path: Path, version: str, location: str | None) -> None:
    """Rewrite a published graph's external location and its hash in the manifest (someone
    with write access to an unsigned registry: every listed hash stays right)."""
    edited = tmp_path / "edited"
    shutil.rmtree(edited, ignore_errors=True)
    edited.mkdir()
    remote = f"{reg.versions_dir}/{version}/model.onnx"
    reg.fs.get_file(remote, str(edited / "model.onnx"))
    relocate(edited / "model.onnx", location)
    data = (edited / "model.onnx").read_bytes()
    reg.fs.pipe_file(remote, data)
    path = f"{reg.versions_dir}/{version}/{MANIFEST}"
    manifest = json.loads(reg.fs.cat_file(path))
    manifest["files"]["model.onnx"] = hashlib.sha256(data).hexdigest()
    reg.fs.pipe_file(path, json.dumps(manifest).encode())


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("{outside}", "escapes the version"),  # the same bytes, outside the registry
        ("../v0/model.onnx.data", "escapes the version"),  # another version's (hashed) data
        ("sub/../../v0/model.onnx.data", "escapes the version"),
        ("./model.onnx.data", "escapes the version"),
        ("other.data", "is not listed"),
        ("manifest.json", "is not listed"),
        ("", "names no file"),
        (None, "names no file"),
    ],
)
def test_a_graph_reading_external_data_from_outside_or_unlisted_is_refused(
    reg: ModelRegistry, tmp_path: Path, location: str | None, reason: str
) -> None:
    for name in ("v0", "v1"):
        reg.publish(small_graph(tmp_path / f"src-{name}").parent, small_manifest(name))
    assert reg.verify("v1").files["model.onnx.data"]  # the honest version verifies
    outside = tmp_path / "outside.data"
    shutil.copy(tmp_path / "src-v1" / "model.onnx.data", outside)
    if location is not None:
        location = location.format(outside=outside)
    tamper(reg, tmp_path, "v1", location)
    for check in (reg.verify, reg.checkout, reg.promote, reg.open_version):
        with pytest.raises(FailedPreconditionError, match=f"model.onnx .*{reason}"):
            check("v1")
    with pytest.raises(FailedPreconditionError, match=reason):
        LoadedRewardModel.load(reg, "v1", provider="cpu")
    assert reg.promoted() is None
    tamper(reg, tmp_path, "v1", "model.onnx.data")  # put back: verifies again
    assert reg.verify("v1").version == "v1"


def test_onnx_runtime_alone_would_load_the_outside_bytes_we_refuse(tmp_path: Path) -> None:
    """Why the registry reads locations itself: ONNX Runtime loads external data from any
    file inside the graph's folder, listed or not (its own rule covers only paths out of it)."""
    from plaudit.services.common.onnx_runtime import create_session

    graph = small_graph(tmp_path / "v1")
    shutil.copy(tmp_path / "v1" / "model.onnx.data", tmp_path / "v1" / "unlisted.data")
    relocate(graph, "unlisted.data")
    session = create_session(graph, "cpu")
    out = session.run(None, {"x": np.zeros(1024, np.float32)})[0]
    np.testing.assert_array_equal(out, np.arange(1024, dtype=np.float32))


def test_a_data_file_symlinked_out_of_the_version_is_refused(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    reg.publish(small_graph(tmp_path / "src").parent, small_manifest("v1"))
    data = Path(reg.versions_dir) / "v1" / "model.onnx.data"
    outside = tmp_path / "outside.data"
    shutil.copy(data, outside)  # the same bytes: the hash would match
    data.unlink()
    data.symlink_to(outside)
    with pytest.raises(FailedPreconditionError, match=r"model\.onnx\.data' escapes the version"):
        reg.checkout("v1")


@pytest.mark.parametrize("location", ["../outside.data", "/tmp/outside.data", "unlisted.data"])
def test_publishing_a_graph_that_reads_outside_its_version_is_refused(
    reg: ModelRegistry, tmp_path: Path, location: str
) -> None:
    graph = small_graph(tmp_path / "src")
    relocate(graph, location)
    with pytest.raises(FailedPreconditionError, match="reads external data from"):
        reg.publish(graph.parent, small_manifest("v1"))
    assert reg.list_versions() == []


def test_the_location_reader_agrees_with_onnx(tmp_path: Path) -> None:
    """Initializers, a Constant's tensor attribute, a subgraph's initializer, a sparse
    initializer: the registry's protobuf reader finds every location onnx's own helper does."""
    from onnx.external_data_helper import _get_all_tensors, convert_model_to_external_data

    def tensor(name: str) -> TensorProto:
        return numpy_helper.from_array(np.ones((64,), np.float32), name)

    branch = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["z"])], "branch", [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [64])], [tensor("b")],
    )  # fmt: skip
    sparse = helper.make_sparse_tensor(
        tensor("sv"), numpy_helper.from_array(np.arange(64, dtype=np.int64), "si"), [128]
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=tensor("c")),
            helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [64])],
        [tensor("w")],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    convert_model_to_external_data(
        model, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True
    )
    expected = sorted(
        entry.value
        for t in _get_all_tensors(model)
        for entry in t.external_data
        if entry.key == "location"
    )
    assert len(expected) >= 4
    onnx.save(model, str(tmp_path / "g.onnx"))  # writes the data files too
    from_file = graph_external_locations(tmp_path / "g.onnx")
    from_bytes = onnx_external_locations(model.SerializeToString())
    assert sorted(str(loc) for loc in from_file) == expected
    assert sorted(str(loc) for loc in from_bytes) == expected


@pytest.mark.parametrize("data", [b"weights", b"\x0a\xff\xff\xff\xff\x0f", b"\x0b\x10\x01"])
def test_bytes_that_are_no_protobuf_are_told_apart(data: bytes) -> None:
    with pytest.raises(NotProtobufError):
        onnx_external_locations(data)


# -- past 2 GB -------------------------------------------------------------------------------
def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_a_reward_model_past_2gb_exports_publishes_verifies_and_scores(tmp_path: Path) -> None:
    """A random BERT reward model whose fp32 weights pass 2 GiB (2.2M-token vocabulary, one
    layer 256 wide: cheap to run) goes through the whole export: one graph, one data file, the
    parity gate against PyTorch, publish, verify, load in the reward engine, score."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if available_memory() < 8 * 2**30:
        pytest.skip("needs about 6 GiB of free memory")
    start = time.perf_counter()
    torch.manual_seed(0)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=2_200_000,
        hidden_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights > 2**31  # past protobuf's limit
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    del model
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(checkpoint)
    built = time.perf_counter()

    reg = ModelRegistry(tmp_path / "reg")
    manifest = export_reward(
        ExportConfig(checkpoint=str(checkpoint), max_length=64, reference_pairs=16), reg
    )
    exported_at = time.perf_counter()
    shutil.rmtree(checkpoint)
    folder = Path(reg.versions_dir) / manifest.version
    # external by size; not fused by default at this size (the optimizer's memory)
    assert manifest.notes["external_data"] is True and manifest.notes["fused_attention"] is False
    assert manifest.notes["fp32_max_abs_diff_vs_torch"] < 1e-3
    data = folder / "model.onnx.data"
    assert data.stat().st_size > 2**31 and (folder / "model.onnx").stat().st_size < 2**20
    assert set(manifest.files) >= {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert set(graph_external_locations(folder / "model.onnx")) == {"model.onnx.data"}

    reg.promote(manifest.version)  # verifies every hash, reads the graph's locations
    model_ = LoadedRewardModel.load(reg, manifest.version, smoke=True, provider="cpu")
    pairs = list(read_pairs(reference_pairs_path(), 16))
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    completions = [c for p in pairs for c in (p.chosen, p.rejected)]
    raw, _, _ = model_.score_raw(prompts, completions)
    # the served graph reproduces the export's rewards on its reference texts (their mean)
    assert abs(float(np.mean(raw)) - manifest.normalization.mean) < 1e-4
    assert np.std(raw) > 1e-3
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(  # the figures for docs/benchmarks.md (pytest -s shows them)
        f"\n2GB+ export: build {built - start:.0f}s, export+publish {exported_at - built:.0f}s, "
        f"verify+load+score {done - exported_at:.0f}s, data {data.stat().st_size / 2**30:.2f} GiB, "
        f"graph {(folder / 'model.onnx').stat().st_size / 2**10:.0f} KiB, fp32 max abs diff vs "
        f"torch {manifest.notes['fp32_max_abs_diff_vs_torch']:.1e}, peak RSS {peak:.1f} GiB"
    )
    shutil.rmtree(tmp_path / "reg")  # 2 GB that pytest would otherwise keep for a while
