"""The model registry: immutable model versions and a promotion pointer, on any filesystem.

Layout (one namespace per model kind)::

    <root>/<kind>/versions/<version>/manifest.json   # plus model.onnx, tokenizer files, ...
    <root>/<kind>/promoted.json                     # {"version": ..., "at": ...}
    <root>/<kind>/promotions.jsonl                  # append-only history of promotions

``<root>`` is a local directory (the default) or an fsspec URL (``s3://bucket/prefix``,
``gs://...``, ``az://...``, with the matching fsspec package installed: ``pip install
plaudit[s3]`` for S3 and S3-compatible stores). Remote credentials and endpoints come from the
usual places (``AWS_*`` variables, ``FSSPEC_S3_ENDPOINT_URL``, fsspec's config files).

Publishing is atomic: a reader never sees half a version. In a local directory the files are
copied into a staging folder beside ``versions/`` and renamed into place. Object stores have no
rename, so there the files are uploaded first and ``manifest.json`` last, in one PUT: a version
exists only once its manifest does (listing skips a folder without one). The promotion pointer is
replaced atomically (local: write aside, fsync, rename; object store: one PUT).

Every file of a version is listed in its manifest with its sha256, and :meth:`ModelRegistry.
checkout` checks them before a server uses the version: a listed file that differs or is
missing, a file that is not listed, or one outside the version folder fails it. Servers load
remote versions from a local cache (``cache_dir``), downloaded aside, verified, then renamed into
place; a cached copy is verified again before every use.

Versions hold ONNX graphs, tokenizers and JSON: nothing is ever unpickled. Files in pickle-based
formats (:data:`PICKLE_SUFFIXES`: PyTorch ``.bin``/``.pt`` checkpoints, ``.pkl``...) are refused
both when publishing and when verifying, so a version cannot carry one for a later loader to trip
over. Version names are checked (:func:`validate_version_name`) wherever one is read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field, field_validator

from plaudit.services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from plaudit.services.common.settings import PlauditSettings

log = logging.getLogger(__name__)

ModelKind = Literal["reward", "policy"]
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
    """Outcome of the int8 parity check against the fp32 graph."""

    method: str = "dynamic-int8"
    pairwise_agreement: float
    threshold: float
    pairs: int
    passed: bool


class GenerationConfig(BaseModel):
    """How a policy version generates, and the layout of its exported KV cache."""

    eos_token_ids: list[int]
    max_new_tokens: int = 256
    num_layers: int
    num_kv_heads: int
    head_dim: int


class ModelManifest(BaseModel):
    """What a version is, where it came from and how to run it."""

    version: str
    kind: ModelKind
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
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")


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


def verify_folder(version: str, manifest: ModelManifest, root: Path) -> ModelManifest:
    """Check a local copy of ``version`` file by file against its manifest (see the module
    docstring); return the manifest."""
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    check_listing(version, manifest, present)
    for rel, expected in manifest.files.items():
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:  # a symlink pointing out
            raise FailedPreconditionError(f"version {version}: file {rel!r} escapes the version")
        if not path.is_file():
            raise FailedPreconditionError(f"version {version}: file {rel} is missing")
        check_digest(version, rel, sha256_file(path), expected)
    return manifest


def _stage(source_dir: Path, staging: Path, manifest: ModelManifest) -> ModelManifest:
    """Copy ``source_dir`` into ``staging``, refuse pickles, hash every file, write the manifest."""
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
    final = manifest.model_copy(update={"files": files})
    (staging / MANIFEST).write_text(final.model_dump_json(indent=2))
    return final


class ModelRegistry:
    """The registry of one model kind, in a local directory or at an fsspec URL.

    ``cache_dir`` holds local copies of remote versions for serving (unused for a local root);
    the ``cache_keep`` most recently used copies are kept, for fast rollbacks.
    """

    def __init__(
        self,
        root: Path | str,
        kind: ModelKind = "reward",
        *,
        cache_dir: Path | str | None = None,
        cache_keep: int = 3,
    ) -> None:
        self.root = str(root).rstrip("/") or "/"
        self.kind = kind
        self.fs, root_path = fsspec.core.url_to_fs(self.root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.base = _join(root_path, kind)
        self.versions_dir = _join(self.base, "versions")
        self.pointer = _join(self.base, "promoted.json")
        self.history = _join(self.base, "promotions.jsonl")
        slug = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE) / slug / kind
        self.cache_keep = cache_keep

    def __repr__(self) -> str:
        return f"ModelRegistry({self.root!r}, {self.kind!r})"

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

    def manifest(self, version: str) -> ModelManifest:
        path = _join(self.versions_dir, validate_version_name(version), MANIFEST)
        try:
            raw = self._read(path)
        except FileNotFoundError:
            raise NotFoundError(f"model version {version!r} not found in {self.root}") from None
        return ModelManifest.model_validate_json(raw)

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
        try:
            text = self._read(self.history).decode()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def checkout(self, version: str) -> tuple[ModelManifest, Path]:
        """A verified local folder holding ``version``, and its manifest.

        Local registry: the version's own folder. Remote: a copy in ``cache_dir`` (downloaded
        when missing or damaged). Raises if any file differs from the manifest.
        """
        manifest = self.manifest(version)
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
                return manifest, target
        self._download(version, manifest, target)
        return manifest, target

    def verify(self, version: str) -> ModelManifest:
        """Check every file's sha256 against the manifest, as :meth:`checkout` does.

        A remote version is hashed as it streams in, nothing written to disk (promoting from
        a laptop or a trainer pod does not fill a cache with what serving will download).
        """
        if self.is_local:
            return self.checkout(version)[0]
        manifest = self.manifest(version)
        remote = _join(self.versions_dir, version)
        for rel, expected in self._remote_files(version, manifest).items():
            with self.fs.open(_join(remote, rel), "rb", block_size=1 << 22) as fh:
                check_digest(version, rel, sha256_stream(fh, 1 << 22), expected)
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
        is about to add one) and drop downloads left behind by a crash (over an hour old)."""
        stale = time.time() - 3600
        mtimes: dict[Path, float] = {}
        for path in self.cache_dir.iterdir():
            try:  # another process may delete entries while we look
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if path.name.startswith(".download-") and mtime < stale:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and not path.name.startswith("."):
                mtimes[path] = mtime
        keep = max(self.cache_keep - int(room_for_one), 1 - int(room_for_one))
        for old in sorted(mtimes, key=mtimes.__getitem__, reverse=True)[keep:]:
            shutil.rmtree(old, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------
    def publish(self, source_dir: Path, manifest: ModelManifest) -> ModelManifest:
        """Copy ``source_dir`` in as a new immutable version, hashes recorded, atomically."""
        validate_version_name(manifest.version)
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
            final = _stage(source_dir, staging, manifest)
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
            final = _stage(source_dir, staging, manifest)
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

    def _write_pointer(self, text: str) -> None:
        if self.is_local:
            Path(self.base).mkdir(parents=True, exist_ok=True)
            _write_atomic(Path(self.pointer), text)
        else:
            self.fs.pipe_file(self.pointer, text.encode())

    def _append_history(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.is_local:
            with Path(self.history).open("a") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            return
        # object stores cannot append: read, extend, write back (promotions are rare, manual or
        # from one trainer; two promoting at the same instant could lose one history line)
        try:
            old = self._read(self.history)
        except FileNotFoundError:
            old = b""
        self.fs.pipe_file(self.history, old + line.encode())

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

    @field_validator("registry", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    def model_registry(self, kind: ModelKind) -> ModelRegistry:
        return ModelRegistry(
            self.registry, kind, cache_dir=self.registry_cache, cache_keep=self.registry_cache_keep
        )
