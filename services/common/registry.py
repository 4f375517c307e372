"""The model registry: immutable model versions and a promotion pointer, on any filesystem.

Layout (one namespace per model kind and name)::

    <root>/<kind>/versions/<version>/manifest.json   # plus model.onnx, tokenizer files, ...
    <root>/<kind>/promoted.json                     # {"version": ..., "at": ...}
    <root>/<kind>/promotions.jsonl                  # append-only history of promotions (local)
    <root>/<kind>/promotions/<at>-<random>.json     # one object per promotion (object stores)
    <root>/<kind>/shadow.json                       # {"version", "fraction", "at"}: optional
    <root>/<kind>/named/<name>/...                  # the same layout for each named model

A registry holds several *named* models of a kind (``helpfulness``, ``safety``), each with its
own versions, promotion pointer, history, rollback and shadow. The name ``default`` lives at the
kind's top level, where registries without names always kept it, so older registries read as
holding one model called ``default``. A manifest records its name and is refused under another.

``<root>`` is a local directory (the default) or an fsspec URL (``s3://bucket/prefix``,
``gs://...``, ``az://...``, with the matching fsspec package installed: ``pip install
plaudit[s3]`` for S3 and S3-compatible stores). Remote credentials and endpoints come from the
usual places (``AWS_*`` variables, ``FSSPEC_S3_ENDPOINT_URL``, fsspec's config files).

Publishing is atomic: a reader never sees half a version. In a local directory the files are
copied into a staging folder beside ``versions/`` and renamed into place. Object stores have no
rename, so there the files are uploaded first and ``manifest.json`` last, in one PUT: a version
exists only once its manifest does (listing skips a folder without one). The promotion pointer is
replaced atomically (local: write aside, fsync, rename; object store: one PUT). The promotion
history is appended to ``promotions.jsonl`` locally (``O_APPEND``); object stores cannot append,
so there each promotion is its own object under ``promotions/``, named by its time and a random
suffix: two promotions at once both land, none overwrites the other (a ``promotions.jsonl`` left
by an older release is still read, before them).

Every file of a version is listed in its manifest with its sha256, and :meth:`ModelRegistry.
checkout` checks them before a server uses the version: a listed file that differs or is
missing, a file that is not listed, or one outside the version folder fails it. Every path the
manifest names for a loader (``onnx_files``) must be one of those listed files (relative, inside
the version, hashed): :func:`check_manifest_paths` refuses anything else, and loaders turn
manifest entries into paths only through :meth:`VersionFolder.path`. A graph too big for one
protobuf keeps its weights in external-data files beside it: those are listed and hashed like
any file, and the graph itself is read (:func:`onnx_external_locations`) when a version is
published, verified or checked out: every ``location`` it names must be a listed file inside
the version (:func:`check_external_data`), whatever the runtime would allow. Servers load remote
versions from a local cache (``cache_dir``), downloaded aside, verified, then renamed into place;
a cached copy is verified again before every use.

Signed manifests (optional): a registry given a :class:`ManifestSigner` (an Ed25519 private key)
signs each manifest it publishes, in its ``signature`` field, over :func:`canonical_manifest_bytes`
(the manifest's JSON without that field, keys sorted, compact). A registry given
:class:`TrustedKeys` (Ed25519 public keys) verifies, checks out and promotes only versions signed
by one of them; without trusted keys nothing changes. Settings: ``PLAUDIT_SIGNING_KEY_FILE`` and
``PLAUDIT_TRUSTED_KEYS_FILE`` (:class:`RegistryLocationSettings`).

Versions hold ONNX graphs, tokenizers and JSON: nothing is ever unpickled. Files in pickle-based
formats (:data:`PICKLE_SUFFIXES`: PyTorch ``.bin``/``.pt`` checkpoints, ``.pkl``...) are refused
both when publishing and when verifying, so a version cannot carry one for a later loader to trip
over. Version names are checked (:func:`validate_version_name`) wherever one is read or written.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field, ValidationError, field_validator

from plaudit.services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from plaudit.services.common.names import NAME_RE
from plaudit.services.common.settings import PlauditSettings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

log = logging.getLogger(__name__)

ModelKind = Literal["reward", "policy"]
DEFAULT_MODEL_NAME = "default"
MODEL_NAME_RE = NAME_RE  # use fullmatch
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_CACHE = Path(".plaudit/registry-cache")
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})


class Normalization(BaseModel):
    """Reward standardization statistics, measured on a reference set of texts."""

    mean: float = 0.0
    std: float = 1.0
    reference: str = "identity"


class QuantizationReport(BaseModel):
    """Outcome of the int8 parity check against the fp32 graph.

    For the kept graph (or, when none passed, the last one tried): its pair-order agreement with
    fp32 on the reference pairs against ``threshold``; for reward models also the held-out
    accuracy (share of pairs with reward(chosen) > reward(rejected)) of fp32 and of this graph,
    which may drop by at most ``max_accuracy_drop``. ``candidates`` lists every graph tried, in
    order, with the same figures (``method``, ``pairwise_agreement``, ``accuracy``,
    ``items_per_s``, ``passed``, ``reason``). Fields after ``passed`` are optional: manifests
    written before them still load."""

    method: str = "dynamic-int8"
    pairwise_agreement: float
    threshold: float
    pairs: int
    passed: bool
    accuracy_fp32: float | None = None
    accuracy: float | None = None
    max_accuracy_drop: float | None = None
    reason: str | None = None  # why the graph was refused (None when it passed)
    # one pass over the reference texts at export, ONNX Runtime CPU, after one warm-up group
    fp32_items_per_s: float | None = None
    items_per_s: float | None = None
    candidates: list[dict[str, Any]] = Field(default_factory=list)


class GenerationConfig(BaseModel):
    """How a policy version generates, and the layout of its exported KV cache."""

    eos_token_ids: list[int]
    max_new_tokens: int = 256
    num_layers: int
    num_kv_heads: int
    head_dim: int


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class LoraAdapter(BaseModel):
    """A policy version's LoRA adapter in PEFT's format (what vLLM's ``/v1/load_lora_adapter``
    loads), beside its merged graph: ``path`` is the version's folder holding
    :data:`ADAPTER_FILES`; ``base`` the model it applies to; ``stacked_on`` the policy version it
    was trained on when that was not the base model (then the adapter alone is not this policy)."""

    path: str = "adapter"
    base: str
    rank: int = Field(ge=1)
    stacked_on: str | None = None


class ReliabilityBin(BaseModel):
    """One bin of a reliability table: pairs counted in both orders (see
    :func:`plaudit.services.common.calibration.reliability`)."""

    center: float
    count: int
    mean_predicted: float
    observed: float


class Calibration(BaseModel):
    """The reward model's preference-probability calibration, fitted on held-out pairs after
    training: ``Compare`` reports ``sigmoid((raw_a - raw_b) / temperature)``.

    ``accuracy``, ``pairs`` and the ECE figures are measured on the same held-out pairs with the
    graph the version is served with; ``fitted`` False means the temperature was kept at 1
    (``note`` says why)."""

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(1.0, gt=0)
    fitted: bool = False
    smoothing: bool = Field(True, description="Platt's (n + 1) / (n + 2) targets in the fit")
    pairs: int = 0
    accuracy: float | None = None
    ece_before: float | None = Field(None, description="ECE at temperature 1")
    ece_after: float | None = Field(None, description="ECE at the fitted temperature")
    nll_before: float | None = None
    nll_after: float | None = None
    bins: int = 10
    reliability_before: list[ReliabilityBin] = []
    reliability_after: list[ReliabilityBin] = []
    note: str = ""


class ManifestSignature(BaseModel):
    """An Ed25519 signature of :func:`canonical_manifest_bytes` by the key ``key_id`` names."""

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(description="the signing key's fingerprint (see key_fingerprint)")
    value: str = Field(description="the signature, base64")


class ModelManifest(BaseModel):
    """What a version is, where it came from and how to run it."""

    version: str
    kind: ModelKind
    name: str = Field(
        DEFAULT_MODEL_NAME, description="the named model this version belongs to (registry)"
    )
    created_at: datetime
    parent: str | None = None
    backbone: str
    onnx_files: dict[str, str] = Field(
        description="precision -> file name, e.g. fp32 -> model.onnx"
    )
    default_precision: str = "fp32"
    text_format: dict[str, Any]
    input_names: list[str]
    normalization: Normalization = Normalization()
    quantization: QuantizationReport | None = None
    metrics: dict[str, float] = {}
    data_cursor: str | None = None
    promotion: dict[str, Any] | None = None
    notes: dict[str, Any] = {}
    generation: GenerationConfig | None = Field(None, description="policies only")
    calibration: Calibration | None = Field(
        None, description="reward models only; None (as in older versions): temperature 1"
    )
    ensemble_members: int = Field(
        1,
        ge=1,
        description="reward models only: heads of an ensemble (> 1: the graph's second output, "
        "'members', holds each head's reward; the first is their mean)",
    )
    lora_adapter: LoraAdapter | None = Field(
        None, description="policies trained with LoRA: the adapter, for engines that load one"
    )
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")
    signature: ManifestSignature | None = Field(
        None, description="over every other field (see canonical_manifest_bytes); optional"
    )

    @property
    def temperature(self) -> float:
        """The preference-probability temperature ``Compare`` divides by (1: uncalibrated)."""
        return self.calibration.temperature if self.calibration is not None else 1.0


def validate_model_name(name: str, field: str = "name") -> str:
    """``name`` if it is a valid model name (lower case, digits, ``_``/``-``, 1-32 chars)."""
    if not MODEL_NAME_RE.fullmatch(name):
        raise InvalidArgumentError(
            field, f"{name!r} is not a model name (a lower-case letter, then up to 31 of "
            "a-z, 0-9, _ and -)"
        )  # fmt: skip
    return name


def validate_version_name(version: str) -> str:
    """Reject names that could escape the registry (path traversal, separators, hidden files)."""
    if not _VERSION_RE.fullmatch(version) or ".." in version:
        raise InvalidArgumentError("version", f"invalid version name {version!r}")
    return version


def check_file_format(version: str, rel: str) -> None:
    """Refuse pickle-based files (see :data:`PICKLE_SUFFIXES`) in a version."""
    if Path(rel).suffix.lower() in PICKLE_SUFFIXES:
        raise FailedPreconditionError(
            f"version {version}: {rel} is a pickle-based file; versions hold ONNX, safetensors, "
            "tokenizer and JSON files only"
        )


def sha256_stream(fh: IO[bytes], chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(chunk_bytes), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return sha256_stream(fh)


def new_version_id(kind: str) -> str:
    """Sortable, unique: ``reward-20261123-120102-3fa9c1``."""
    return f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _safe_relative(version: str, rel: str) -> str:
    """A manifest path must stay inside its version: relative, no ``..``, no empty parts."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FailedPreconditionError(f"version {version}: file {rel!r} escapes the version")
    return rel


def check_manifest_paths(version: str, manifest: ModelManifest) -> None:
    """Every path the manifest names for a loader (its ``onnx_files``, its LoRA adapter's files)
    is relative, inside the version and listed in ``files`` with its sha256: a manifest cannot
    send a loader to a file that verification did not hash (``/tmp/evil.onnx``,
    ``../other/model.onnx``, an unlisted file)."""
    for precision, rel in manifest.onnx_files.items():
        try:
            _safe_relative(version, rel)
        except FailedPreconditionError:
            raise FailedPreconditionError(
                f"version {version}: onnx_files[{precision}] = {rel!r} escapes the version"
            ) from None
        if rel not in manifest.files:
            raise FailedPreconditionError(
                f"version {version}: onnx_files[{precision}] = {rel!r} is not listed (with its "
                "sha256) in the manifest's files"
            )
    if manifest.lora_adapter is not None:
        for name in ADAPTER_FILES:
            rel = f"{manifest.lora_adapter.path}/{name}"
            _safe_relative(version, rel)
            if rel not in manifest.files:
                raise FailedPreconditionError(
                    f"version {version}: lora_adapter file {rel!r} is not listed (with its "
                    "sha256) in the manifest's files"
                )


def check_listing(version: str, manifest: ModelManifest, present: set[str]) -> None:
    """The files a version folder holds (``present``, relative paths) are exactly those of its
    manifest: none unlisted, none missing, none pickle-based, none outside the version."""
    if not manifest.files:
        raise FailedPreconditionError(f"version {version} lists no files")
    unlisted = sorted(present - set(manifest.files) - {MANIFEST})
    if unlisted:
        raise FailedPreconditionError(
            f"version {version}: {unlisted[0]} is not listed in the manifest"
        )
    for rel in manifest.files:
        check_file_format(version, _safe_relative(version, rel))
        if rel not in present:
            raise FailedPreconditionError(f"version {version}: file {rel} is missing")


def check_digest(version: str, rel: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise FailedPreconditionError(
            f"version {version}: sha256 of {rel} is {actual[:12]}…, manifest says {expected[:12]}…"
        )


# -- ONNX external data ---------------------------------------------------------------------------
# A graph may keep tensors in other files ("external data"), which ONNX Runtime opens by the
# ``location`` stored in the graph, relative to the graph's folder. The graph is read here as raw
# protobuf (the wire format; serving has no ``onnx`` package): the messages that can hold tensors,
# by their field numbers in onnx.proto, and nothing is copied but the locations.
_TENSOR, _SPARSE = "tensor", "sparse"
_ONNX_TENSOR_FIELDS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},  # ModelProto
    "training": {1: "graph", 2: "graph"},  # TrainingInfoProto: initialization, algorithm
    "graph": {1: "node", 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    "function": {7: "node", 11: "attribute"},  # FunctionProto: node, attribute_proto
    "node": {5: "attribute"},
    "attribute": {5: _TENSOR, 6: "graph", 10: _TENSOR, 11: "graph", 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_DEPTH_LIMIT = 64  # nested subgraphs; protobuf's own default recursion limit is 100


class NotProtobufError(ValueError):
    """The bytes are not a protobuf message (so no ONNX runtime can load them as a graph)."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise NotProtobufError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of each field of one message; a length-delimited value
    is a view of its bytes (nothing copied), groups are skipped as protobuf parsers do."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: memoryview | int = 0
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 3:  # a (deprecated) group: skip to its end-group tag
            depth = 1
            while depth:
                inner, pos = _varint(buf, pos)
                inner_wire = inner & 7
                if inner_wire == 0:
                    _, pos = _varint(buf, pos)
                elif inner_wire == 1:
                    pos += 8
                elif inner_wire == 5:
                    pos += 4
                elif inner_wire == 2:
                    size, pos = _varint(buf, pos)
                    pos += size
                elif inner_wire in (3, 4):
                    depth += 1 if inner_wire == 3 else -1
                else:
                    raise NotProtobufError(f"wire type {inner_wire}")
                if pos > end:
                    raise NotProtobufError("truncated group")
        else:
            raise NotProtobufError(f"wire type {wire}")
        if pos > end or number == 0:
            raise NotProtobufError("truncated message")
        yield number, wire, value


def _tensor_locations(tensor: memoryview) -> list[str | None]:
    """The external ``location``s one TensorProto names (None: external, but names none)."""
    locations: list[str | None] = []
    external = False
    for number, wire, value in _proto_fields(tensor):
        if number == _TENSOR_DATA_LOCATION and wire == 0:
            external = value == 1  # DataLocation.EXTERNAL; the last one counts, as in protobuf
        elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, memoryview):
            entry = {  # StringStringEntryProto: key = 1, value = 2
                n: bytes(v).decode("utf-8", "replace")
                for n, _, v in _proto_fields(value)
                if isinstance(v, memoryview)
            }
            if entry.get(1) == "location":
                locations.append(entry.get(2, ""))
    if external and not locations:
        locations.append(None)
    return locations


def onnx_external_locations(data: bytes | memoryview) -> list[str | None]:
    """Every external-data ``location`` an ONNX graph's tensors name, in any subgraph, function
    or attribute (None for an external tensor that names none). Raises
    :class:`NotProtobufError` for bytes no protobuf parser reads as a message."""
    found: list[str | None] = []
    stack: list[tuple[str, memoryview, int]] = [("model", memoryview(data), 0)]
    while stack:
        kind, buf, depth = stack.pop()
        if depth > _DEPTH_LIMIT:
            raise NotProtobufError("graphs nested too deep")
        if kind == _TENSOR:
            found += _tensor_locations(buf)
            continue
        children = _ONNX_TENSOR_FIELDS[kind]
        for number, _wire, value in _proto_fields(buf):
            child = children.get(number)
            if child is not None and isinstance(value, memoryview):
                stack.append((child, value, depth + 1))
    return found


def graph_external_locations(path: Path) -> list[str | None]:
    """:func:`onnx_external_locations` of the graph file at ``path`` (mapped, not read)."""
    with path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise NotProtobufError("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            try:
                return onnx_external_locations(memoryview(mapped))
            except NotProtobufError as exc:  # re-raised once the map is closed: the traceback's
                error = str(exc)  # frames hold views of it, and a map with views cannot close
        raise NotProtobufError(error)


def check_external_data(
    version: str, manifest: ModelManifest, graph: str, locations: Iterable[str | None]
) -> None:
    """Every external-data file the graph ``graph`` (a path in the version) names is a file the
    manifest lists with its sha256, inside the version: relative to the graph's folder, no
    absolute path, no ``..``, nothing unlisted. ONNX Runtime refuses absolute paths and ``..``
    itself; this does not rely on it (nor on any runtime's rules)."""
    folder = PurePosixPath(graph).parent
    for location in locations:
        if location is None or not location:
            raise FailedPreconditionError(
                f"version {version}: {graph} keeps a tensor in external data but names no file"
            )
        rel = str(folder / location) if str(folder) != "." else location
        parts = location.split("/")  # as written: "./x" or "a//b" are not normalised away
        if (
            location.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or "\\" in location
            or "\x00" in location
        ):
            raise FailedPreconditionError(
                f"version {version}: {graph} reads external data from {location!r}, which "
                "escapes the version"
            )
        if rel not in manifest.files:
            raise FailedPreconditionError(
                f"version {version}: {graph} reads external data from {location!r}, which is not "
                "listed (with its sha256) in the manifest's files"
            )


def check_graph_file(
    version: str, manifest: ModelManifest, graph: str, source: Path | bytes
) -> None:
    """:func:`check_external_data` of the graph ``graph``, read from the file ``source`` (or
    given as bytes). A file that is not protobuf at all is left to the runtime, which cannot
    load it either."""
    try:
        if isinstance(source, Path):
            locations = graph_external_locations(source)
        else:
            locations = onnx_external_locations(source)
    except NotProtobufError as exc:
        log.debug("not an ONNX graph", extra={"version": version, "file": graph, "why": str(exc)})
        return
    check_external_data(version, manifest, graph, locations)


def verify_folder(version: str, manifest: ModelManifest, root: Path) -> ModelManifest:
    """Check a local copy of ``version`` file by file against its manifest (see the module
    docstring); return the manifest."""
    check_manifest_paths(version, manifest)
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    check_listing(version, manifest, present)
    for rel, expected in manifest.files.items():
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:  # a symlink pointing out
            raise FailedPreconditionError(f"version {version}: file {rel!r} escapes the version")
        if not path.is_file():
            raise FailedPreconditionError(f"version {version}: file {rel} is missing")
        check_digest(version, rel, sha256_file(path), expected)
    for graph in sorted(set(manifest.onnx_files.values())):  # hashed above: parse what it holds
        check_graph_file(version, manifest, graph, root / graph)
    return manifest


@dataclass(frozen=True)
class VersionFolder:
    """A version's files in a local folder: the one way a loader turns a manifest entry (an
    ``onnx_files`` value, the tokenizer's name) into a path.

    ``verified``: the folder came out of :meth:`ModelRegistry.checkout`, every listed file's
    sha256 checked; then only listed files can be opened. An export's own unpublished folder
    (``verified=False``, no ``files`` yet) still keeps every path inside the folder.
    """

    root: Path
    manifest: ModelManifest
    verified: bool = False

    def path(self, rel: str) -> Path:
        version = self.manifest.version
        _safe_relative(version, rel)
        if self.verified and rel not in self.manifest.files:
            raise FailedPreconditionError(
                f"version {version}: {rel} is not listed (with its sha256) in the manifest"
            )
        path = (self.root / rel).resolve()
        if self.root.resolve() not in path.parents:  # a symlink pointing out
            raise FailedPreconditionError(f"version {version}: file {rel!r} escapes the version")
        return path


# -- signed manifests ---------------------------------------------------------------------------
def canonical_manifest_bytes(data: dict[str, Any]) -> bytes:
    """What a signature covers: the manifest's JSON object without ``signature``, keys sorted,
    no whitespace, ASCII. Computed from the stored JSON (not the parsed model), so fields a later
    Plaudit adds or drops cannot change the bytes of an old version."""
    body = {k: v for k, v in data.items() if k != "signature"}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """``sha256:`` and the first 32 hex digits of the SHA-256 of the raw 32-byte public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


class ManifestSigner:
    """Signs the manifests a registry publishes with an Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_fingerprint(private_key.public_key())

    @classmethod
    def generate(cls) -> ManifestSigner:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, source: str = "signing key") -> ManifestSigner:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(
                "signing_key_file", f"{source}: not an unencrypted PEM private key ({exc})"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidArgumentError("signing_key_file", f"{source}: not an Ed25519 key")
        return cls(key)

    @classmethod
    def from_file(cls, path: Path) -> ManifestSigner:
        return cls.from_pem(Path(path).read_bytes(), str(path))

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization as ser

        return self._key.private_bytes(
            ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()
        )

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization as ser

        return self._key.public_key().public_bytes(
            ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, manifest: ModelManifest) -> ModelManifest:
        """``manifest`` with its ``signature`` set (any previous one replaced)."""
        data = json.loads(manifest.model_dump_json())
        value = self._key.sign(canonical_manifest_bytes(data))
        signature = ManifestSignature(key_id=self.key_id, value=base64.b64encode(value).decode())
        return manifest.model_copy(update={"signature": signature})


_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----\s.*?-----END PUBLIC KEY-----", re.DOTALL)


class TrustedKeys:
    """The Ed25519 public keys whose signatures a registry accepts (one or more, for rotation)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self.keys = {key_fingerprint(k): k for k in keys}
        if not self.keys:
            raise InvalidArgumentError("trusted_keys_file", "no public keys given")

    @classmethod
    def from_pem(cls, pem: bytes, source: str = "trusted keys") -> TrustedKeys:
        """Every ``PUBLIC KEY`` block of ``pem`` (concatenated PEM files); each must be Ed25519."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        keys = []
        for block in _PEM_PUBLIC.findall(pem):
            try:
                key = load_pem_public_key(block)
            except ValueError as exc:
                raise InvalidArgumentError("trusted_keys_file", f"{source}: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise InvalidArgumentError("trusted_keys_file", f"{source}: not an Ed25519 key")
            keys.append(key)
        if not keys:
            raise InvalidArgumentError(
                "trusted_keys_file", f"{source}: no PEM public key (BEGIN PUBLIC KEY) found"
            )
        return cls(keys)

    @classmethod
    def from_file(cls, path: Path) -> TrustedKeys:
        return cls.from_pem(Path(path).read_bytes(), str(path))

    def check(self, version: str, raw_manifest: bytes) -> None:
        """Refuse (FailedPreconditionError) a manifest that is unsigned, signed by a key not
        trusted here, or whose signature does not match its bytes."""
        from cryptography.exceptions import InvalidSignature

        data = json.loads(raw_manifest)
        if not isinstance(data, dict) or data.get("signature") is None:
            raise FailedPreconditionError(
                f"version {version} is not signed; this registry accepts only versions signed "
                f"by a trusted key ({', '.join(sorted(self.keys))})"
            )
        try:
            signature = ManifestSignature.model_validate(data["signature"])
            key = self.keys.get(signature.key_id)
            if key is None:
                raise FailedPreconditionError(
                    f"version {version} is signed by key {signature.key_id}, which is not trusted"
                )
            key.verify(
                base64.b64decode(signature.value, validate=True), canonical_manifest_bytes(data)
            )
        except (ValidationError, InvalidSignature, binascii.Error, ValueError):
            raise FailedPreconditionError(
                f"version {version}: bad manifest signature (the manifest was changed after "
                "signing, or the signature is malformed)"
            ) from None


def _stage(
    source_dir: Path, staging: Path, manifest: ModelManifest, signer: ManifestSigner | None = None
) -> ModelManifest:
    """Copy ``source_dir`` into ``staging``, refuse pickles, hash every file, sign (with a
    ``signer``) and write the manifest."""
    shutil.copytree(source_dir, staging, dirs_exist_ok=True)
    (staging / MANIFEST).unlink(missing_ok=True)
    for p in staging.rglob("*"):
        if p.is_file():
            check_file_format(manifest.version, str(p.relative_to(staging)))
    files = {
        str(p.relative_to(staging)): sha256_file(p)
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    }
    final = manifest.model_copy(update={"files": files, "signature": None})
    check_manifest_paths(manifest.version, final)
    for graph in sorted(set(final.onnx_files.values())):
        check_graph_file(final.version, final, graph, staging / graph)
    if signer is not None:
        final = signer.sign(final)
    (staging / MANIFEST).write_text(final.model_dump_json(indent=2))
    return final


class ModelRegistry:
    """The registry of one named model of a kind, in a local directory or at an fsspec URL.

    ``cache_dir`` holds local copies of remote versions for serving (unused for a local root);
    the ``cache_keep`` most recently used copies are kept, for fast rollbacks. ``signer`` signs
    every version this registry publishes; with ``trusted_keys`` only versions signed by one of
    them verify, check out or get promoted (see the module docstring).
    """

    def __init__(
        self,
        root: Path | str,
        kind: ModelKind = "reward",
        *,
        name: str = DEFAULT_MODEL_NAME,
        cache_dir: Path | str | None = None,
        cache_keep: int = 3,
        signer: ManifestSigner | None = None,
        trusted_keys: TrustedKeys | None = None,
    ) -> None:
        self.signer = signer
        self.trusted_keys = trusted_keys
        self.root = str(root).rstrip("/") or "/"
        self.kind = kind
        self.name = validate_model_name(name)
        self.fs, root_path = fsspec.core.url_to_fs(self.root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.kind_base = _join(root_path, kind)
        named = name != DEFAULT_MODEL_NAME
        self.base = _join(self.kind_base, "named", name) if named else self.kind_base
        self.versions_dir = _join(self.base, "versions")
        self.pointer = _join(self.base, "promoted.json")
        self.history = _join(self.base, "promotions.jsonl")
        self.history_dir = _join(self.base, "promotions")
        self.shadow_pointer = _join(self.base, "shadow.json")
        slug = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self._cache_root = Path(cache_dir or DEFAULT_CACHE)
        # a named model's copies sit beside the default's folder, never inside it (pruning)
        self.cache_dir = self._cache_root / slug / (f"{kind}.{name}" if named else kind)
        self.cache_keep = cache_keep
        self._checked_out: list[str] = []  # the last versions this process checked out

    def __repr__(self) -> str:
        return f"ModelRegistry({self.root!r}, {self.kind!r}, name={self.name!r})"

    @property
    def label(self) -> str:
        """``kind`` for the default model, ``kind/name`` for a named one (logs, messages)."""
        return self.kind if self.name == DEFAULT_MODEL_NAME else f"{self.kind}/{self.name}"

    def named(self, name: str) -> ModelRegistry:
        """The registry of another named model of the same kind, root, cache and keys."""
        return ModelRegistry(
            self.root,
            self.kind,
            name=name,
            cache_dir=self._cache_root,
            cache_keep=self.cache_keep,
            signer=self.signer,
            trusted_keys=self.trusted_keys,
        )  # fmt: skip

    def model_names(self) -> list[str]:
        """The named models of this kind that have a promoted version (``default`` first)."""
        names = [DEFAULT_MODEL_NAME] if self.named(DEFAULT_MODEL_NAME).promoted() else []
        folder = _join(self.kind_base, "named")
        self.fs.invalidate_cache(folder)
        try:
            children = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            children = []
        for child in sorted(PurePosixPath(str(c)).name for c in children):
            if MODEL_NAME_RE.fullmatch(child) and self.named(child).promoted():
                names.append(child)
        return names

    # -- reading ---------------------------------------------------------------------------
    def _read(self, path: str) -> bytes:
        """One object's bytes (raises FileNotFoundError); never served from a listing cache."""
        return bytes(self.fs.cat_file(path))

    def list_versions(self) -> list[ModelManifest]:
        """Every published version (one with a manifest), oldest first."""
        self.fs.invalidate_cache(self.versions_dir)
        try:
            children = self.fs.ls(self.versions_dir, detail=False)
        except FileNotFoundError:
            return []
        names = sorted(
            name
            for name in (PurePosixPath(str(c)).name for c in children)
            if not name.startswith(".") and _VERSION_RE.fullmatch(name)
        )
        paths = [_join(self.versions_dir, name, MANIFEST) for name in names]
        found = self.fs.cat(paths, on_error="return") if paths else {}
        out = []
        for raw in found.values():
            if isinstance(raw, FileNotFoundError):
                continue  # a folder without its manifest: an upload not finished (or abandoned)
            if isinstance(raw, BaseException):  # permissions, network: say so, hide nothing
                raise raw
            out.append(ModelManifest.model_validate_json(raw))
        return sorted(out, key=lambda m: (m.created_at, m.version))

    def _raw_manifest(self, version: str) -> bytes:
        path = _join(self.versions_dir, validate_version_name(version), MANIFEST)
        try:
            return self._read(path)
        except FileNotFoundError:
            raise NotFoundError(f"model version {version!r} not found in {self.root}") from None

    def manifest(self, version: str) -> ModelManifest:
        """The version's manifest as stored (not verified: for listing and inspection)."""
        return ModelManifest.model_validate_json(self._raw_manifest(version))

    def checked_manifest(self, version: str) -> ModelManifest:
        """The version's manifest once it names itself (version, kind), its loader paths pass
        :func:`check_manifest_paths` and, with trusted keys, its signature verifies."""
        raw = self._raw_manifest(version)
        manifest = ModelManifest.model_validate_json(raw)
        if manifest.version != version or manifest.kind != self.kind:
            raise FailedPreconditionError(
                f"version {version}: its manifest describes {manifest.kind} version "
                f"{manifest.version!r}"
            )
        if manifest.name != self.name:
            raise FailedPreconditionError(
                f"version {version} belongs to the model named {manifest.name!r}, not {self.name!r}"
            )
        check_manifest_paths(version, manifest)
        if self.trusted_keys is not None:
            self.trusted_keys.check(version, raw)
        return manifest

    def pointer_record(self) -> dict[str, Any] | None:
        """The promotion pointer ``{"version", "at"}``, or None when nothing is promoted."""
        try:
            data = json.loads(self._read(self.pointer))
        except FileNotFoundError:
            return None
        if not isinstance(data, dict) or "version" not in data:
            raise ValueError(f"malformed promotion pointer {self.pointer}")
        return data

    def promoted(self) -> str | None:
        """The promoted version, or None when nothing has been promoted yet."""
        record = self.pointer_record()
        return None if record is None else str(record["version"])

    def promotion_history(self) -> list[dict[str, Any]]:
        """Every promotion, oldest first: ``promotions.jsonl``, then (object stores) the
        one-object-per-promotion records under ``promotions/`` in name (time) order."""
        try:
            text = self._read(self.history).decode()
        except FileNotFoundError:
            text = ""
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if self.is_local:
            return records
        self.fs.invalidate_cache(self.history_dir)
        try:
            names = sorted(
                n for n in self.fs.ls(self.history_dir, detail=False) if n.endswith(".json")
            )
        except FileNotFoundError:
            return records
        if names:
            found = self.fs.cat(names)  # one request per object, concurrent where supported
            records += [json.loads(found[name]) for name in names if name in found]
        return records

    def checkout(self, version: str) -> tuple[ModelManifest, Path]:
        """A verified local folder holding ``version``, and its manifest.

        Local registry: the version's own folder. Remote: a copy in ``cache_dir`` (downloaded
        when missing or damaged). Raises if any file differs from the manifest, if the manifest
        names a loader path it does not hash, or (with trusted keys) if it is not signed by one.
        """
        manifest = self.checked_manifest(version)
        if self.is_local:
            root = Path(self.versions_dir) / version
            return verify_folder(version, manifest, root), root
        target = self.cache_dir / version
        if target.is_dir():
            try:
                verify_folder(version, manifest, target)
            except FailedPreconditionError as exc:
                log.warning("cached copy damaged; downloading again",
                            extra={"version": version, "error": str(exc)})  # fmt: skip
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.utime(target)  # most recently used
                self._used(version)
                return manifest, target
        self._used(version)  # before the download prunes: never prune what is being fetched
        self._download(version, manifest, target)
        return manifest, target

    def _used(self, version: str) -> None:
        """Remember ``version`` among the two last checked out here (the live one, and the one
        a hot swap is loading): the cache never prunes them."""
        others = [v for v in self._checked_out if v != version]
        self._checked_out = [*others[-1:], version]

    def open_version(self, version: str) -> VersionFolder:
        """:meth:`checkout` as a :class:`VersionFolder` a loader opens files through."""
        manifest, root = self.checkout(version)
        return VersionFolder(root, manifest, verified=True)

    def verify(self, version: str) -> ModelManifest:
        """Check every file's sha256 against the manifest, as :meth:`checkout` does.

        A remote version is hashed as it streams in, nothing written to disk (promoting from
        a laptop or a trainer pod does not fill a cache with what serving will download).
        """
        if self.is_local:
            return self.checkout(version)[0]
        manifest = self.checked_manifest(version)
        remote = _join(self.versions_dir, version)
        graphs = set(manifest.onnx_files.values())
        for rel, expected in self._remote_files(version, manifest).items():
            with self.fs.open(_join(remote, rel), "rb", block_size=1 << 22) as fh:
                if rel not in graphs:
                    check_digest(version, rel, sha256_stream(fh, 1 << 22), expected)
                    continue
                graph = fh.read()  # small once its weights are external data (< 2 GB anyway)
            check_digest(version, rel, hashlib.sha256(graph).hexdigest(), expected)
            check_graph_file(version, manifest, rel, graph)
        return manifest

    def _remote_files(self, version: str, manifest: ModelManifest) -> dict[str, str]:
        """The manifest's files (relative path -> sha256) once :func:`check_listing` accepts
        what the remote folder holds."""
        remote = _join(self.versions_dir, version)
        self.fs.invalidate_cache(remote)
        prefix = remote.rstrip("/") + "/"
        present = {  # files only: "folder" placeholder keys (``v1/``, ``v1/sub/``) are no files
            name[len(prefix) :]
            for name, info in self.fs.find(remote, detail=True).items()
            if info.get("type") == "file" and name.startswith(prefix) and not name.endswith("/")
        }
        check_listing(version, manifest, present)
        return manifest.files

    def _download(self, version: str, manifest: ModelManifest, target: Path) -> None:
        remote = _join(self.versions_dir, version)
        files = self._remote_files(version, manifest)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._prune_cache(room_for_one=True)
        staging = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".download-"))
        try:
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(_join(remote, rel), str(staging / rel))
            (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            verify_folder(version, manifest, staging)
            try:
                os.rename(staging, target)
            except OSError:  # another process cached it meanwhile: use theirs once it verifies
                shutil.rmtree(staging, ignore_errors=True)
                verify_folder(version, manifest, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("downloaded model version", extra={"version": version, "registry": self.root})

    def _prune_cache(self, *, room_for_one: bool = False) -> None:
        """Keep the ``cache_keep`` most recently used cached versions (one fewer when a download
        is about to add one) and drop downloads left behind by a crash (over an hour old).

        Never pruned, whatever their age: the promoted version and the last ones this process
        checked out (a version serving for weeks keeps an old mtime; deleting its copy would
        leave the live model without files to reload or verify)."""
        stale = time.time() - 3600
        protected = set(self._checked_out)
        try:
            promoted = self.promoted()
        except Exception as exc:  # the store is unreachable or the pointer malformed
            log.warning("cache pruning could not read the promoted version: %s", exc)
            promoted = None
        if promoted is not None:
            protected.add(promoted)
        mtimes: dict[Path, float] = {}
        kept = 0  # protected copies present: they take their places among the ``keep``
        for path in self.cache_dir.iterdir():
            try:  # another process may delete entries while we look
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if path.name.startswith(".download-") and mtime < stale:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and not path.name.startswith("."):
                if path.name in protected:
                    kept += 1
                else:
                    mtimes[path] = mtime
        keep = max(self.cache_keep - int(room_for_one), 1 - int(room_for_one)) - kept
        for old in sorted(mtimes, key=mtimes.__getitem__, reverse=True)[max(keep, 0) :]:
            shutil.rmtree(old, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------
    def publish(self, source_dir: Path, manifest: ModelManifest) -> ModelManifest:
        """Copy ``source_dir`` in as a new immutable version, hashes recorded, atomically."""
        validate_version_name(manifest.version)
        if manifest.name == DEFAULT_MODEL_NAME and self.name != DEFAULT_MODEL_NAME:
            manifest = manifest.model_copy(update={"name": self.name})  # built without a name
        if manifest.name != self.name:
            raise InvalidArgumentError(
                "name", f"registry of the model {self.name!r} got a version of {manifest.name!r}"
            )
        if manifest.kind != self.kind:
            raise InvalidArgumentError(
                "kind", f"registry holds {self.kind} models, got {manifest.kind}"
            )
        target = _join(self.versions_dir, manifest.version)
        self.fs.invalidate_cache(self.versions_dir)
        if self.fs.exists(target):
            raise FailedPreconditionError(f"version {manifest.version} already exists")
        final = (
            self._publish_local(source_dir, manifest)
            if self.is_local
            else (self._publish_remote(source_dir, manifest))
        )
        log.info("published model version", extra={"version": final.version, "kind": self.kind})
        return final

    def _publish_local(self, source_dir: Path, manifest: ModelManifest) -> ModelManifest:
        versions = Path(self.versions_dir)
        versions.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=versions, prefix=".staging-"))
        try:
            final = _stage(source_dir, staging, manifest, self.signer)
            for p in staging.rglob("*"):
                if p.is_file():
                    with p.open("rb") as fh:
                        os.fsync(fh.fileno())
            os.rename(staging, versions / manifest.version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def _publish_remote(self, source_dir: Path, manifest: ModelManifest) -> ModelManifest:
        target = _join(self.versions_dir, manifest.version)
        with tempfile.TemporaryDirectory(prefix="plaudit-publish-") as tmp:
            staging = Path(tmp) / "version"
            final = _stage(source_dir, staging, manifest, self.signer)
            try:
                for rel in final.files:  # everything but the manifest ...
                    self.fs.put_file(str(staging / rel), _join(target, rel))
                # ... which goes last, in one PUT: from now on the version exists
                self.fs.pipe_file(_join(target, MANIFEST), (staging / MANIFEST).read_bytes())
            except BaseException:
                with contextlib.suppress(Exception):  # leave no half version (it is invisible)
                    self.fs.rm(target, recursive=True)
                raise
        return final

    def _write_pointer(self, text: str, path: str | None = None) -> None:
        """Replace the promotion pointer (or the pointer at ``path``) atomically."""
        path = path or self.pointer
        if self.is_local:
            Path(self.base).mkdir(parents=True, exist_ok=True)
            _write_atomic(Path(path), text)
        else:
            self.fs.pipe_file(path, text.encode())

    def _append_history(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.is_local:
            with Path(self.history).open("a") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            return
        # object stores cannot append, and read-extend-write loses a line to a concurrent
        # promotion: each promotion is a new object of its own (no two share a name)
        at = datetime.fromisoformat(str(record["at"])).astimezone(UTC)  # names sort as times
        stamp = at.strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{secrets.token_hex(8)}.json"
        self.fs.pipe_file(_join(self.history_dir, name), line.encode())

    def promote(self, version: str, *, reason: str = "manual", rollback: bool = False) -> None:
        """Point serving at ``version`` (which must verify) and record it in the history."""
        self.verify(version)
        previous = self.promoted()
        now = datetime.now(UTC).isoformat()
        self._write_pointer(json.dumps({"version": version, "at": now}))
        self._append_history(
            {"version": version, "previous": previous, "at": now, "reason": reason,
             "rollback": rollback}
        )  # fmt: skip
        log.info("promoted model version", extra={"version": version, "previous": previous})
        try:  # the promotion stands whatever happens here
            shadow = self.shadow_record()
            if shadow is not None and shadow["version"] == version:
                self.stop_shadow()  # the candidate is live now: nothing left to shadow
        except Exception as exc:
            log.warning("could not end the shadow of the promoted version: %s", exc)

    # -- shadow ----------------------------------------------------------------------------------
    def shadow_record(self) -> dict[str, Any] | None:
        """The shadow pointer ``{"version", "fraction", "at"}``, or None when no shadow runs."""
        try:
            data = json.loads(self._read(self.shadow_pointer))
        except FileNotFoundError:
            return None
        if not isinstance(data, dict) or "version" not in data or "fraction" not in data:
            raise ValueError(f"malformed shadow pointer {self.shadow_pointer}")
        return data

    def start_shadow(self, version: str, fraction: float) -> None:
        """Have serving score a ``fraction`` of live requests with ``version`` too (off the
        request path); the version must verify. Replaces any shadow already running."""
        if not 0.0 < fraction <= 1.0:
            raise InvalidArgumentError("fraction", f"must be in (0, 1], got {fraction}")
        self.verify(version)
        if version == self.promoted():
            raise FailedPreconditionError(f"{version} is the live version: nothing to shadow")
        now = datetime.now(UTC).isoformat()
        text = json.dumps({"version": version, "fraction": fraction, "at": now})
        self._write_pointer(text, self.shadow_pointer)
        log.info("shadow started", extra={"version": version, "fraction": fraction})

    def stop_shadow(self) -> bool:
        """Remove the shadow pointer (serving unloads the shadow); False if none was set."""
        try:
            if self.shadow_record() is None:
                return False
        except ValueError:
            pass  # a malformed pointer: remove it all the same
        try:
            self.fs.rm_file(self.shadow_pointer)
        except FileNotFoundError:
            return False
        log.info("shadow stopped", extra={"model": self.label})
        return True

    def live_stack(self) -> list[str]:
        """Promoted versions still "on the stack": each rollback pops the one it replaced."""
        stack: list[str] = []
        for record in self.promotion_history():
            if record.get("rollback") and stack:
                stack.pop()
                if not stack or stack[-1] != record["version"]:
                    stack.append(record["version"])
            elif not stack or stack[-1] != record["version"]:  # a re-promotion is not a new step
                stack.append(record["version"])
        return stack

    def rollback(self) -> str:
        """Promote the version that was live before the current one; returns it.

        Repeated rollbacks walk further back (v3 -> v2 -> v1), they do not toggle.
        """
        current = self.promoted()
        stack = self.live_stack()
        if len(stack) < 2 or stack[-1] != current:
            raise FailedPreconditionError("nothing to roll back to: no earlier promoted version")
        target = stack[-2]
        self.promote(target, reason=f"rollback from {current}", rollback=True)
        return target


class RegistryLocationSettings(PlauditSettings):
    """Where a command or service finds the model registry (shared by every settings class)."""

    registry: str = Field(
        ".plaudit/registry",
        description="model registry: a directory or an fsspec URL (s3://bucket/prefix, gs://...)",
    )
    registry_cache: Path = Field(
        DEFAULT_CACHE, description="local copies of versions from a remote registry"
    )
    registry_cache_keep: int = Field(
        3, ge=1, description="versions kept in the registry cache (fast rollbacks)"
    )
    signing_key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) that signs every version published "
        "(`plaudit registry keygen` makes one)",
    )
    trusted_keys_file: Path | None = Field(
        None,
        description="Ed25519 public keys (PEM, one or more): when set, only versions signed by "
        "one of them verify, load or get promoted",
    )

    @field_validator("registry", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    def model_registry(self, kind: ModelKind, name: str = DEFAULT_MODEL_NAME) -> ModelRegistry:
        return ModelRegistry(
            self.registry,
            kind,
            name=name,
            cache_dir=self.registry_cache,
            cache_keep=self.registry_cache_keep,
            signer=ManifestSigner.from_file(self.signing_key_file)
            if self.signing_key_file
            else None,
            trusted_keys=TrustedKeys.from_file(self.trusted_keys_file)
            if self.trusted_keys_file
            else None,
        )
