"""The model registry: a directory of immutable model versions and a promotion pointer.

Layout (one namespace per model kind)::

    <root>/<kind>/versions/<version>/manifest.json   # plus model.onnx, tokenizer files, ...
    <root>/<kind>/promoted.json                     # {"version": ..., "at": ...}
    <root>/<kind>/promotions.jsonl                  # append-only history of promotions

Publishing is atomic: files are copied into a staging folder beside ``versions/`` and renamed into
place, so a reader never sees half a version. The promotion pointer is replaced atomically
(write aside, fsync, rename). Every file of a version is listed in its manifest with its sha256,
and :meth:`ModelRegistry.verify` checks them before a server uses the version: a listed file
that differs or is missing, a file that is not listed, or one outside the version folder fails it.

Versions hold ONNX graphs, tokenizers and JSON: nothing is ever unpickled. Files in pickle-based
formats (:data:`PICKLE_SUFFIXES`: PyTorch ``.bin``/``.pt`` checkpoints, ``.pkl``...) are refused
both when publishing and when verifying, so a version cannot carry one for a later loader to trip
over. Version names are checked (:func:`validate_version_name`) wherever one is read or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

log = logging.getLogger(__name__)

ModelKind = Literal["reward", "policy"]
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


class ModelRegistry:
    """A local-directory registry of one model kind."""

    def __init__(self, root: Path | str, kind: ModelKind = "reward") -> None:
        self.root = Path(root)
        self.kind = kind
        self.base = self.root / kind
        self.versions_dir = self.base / "versions"
        self.pointer = self.base / "promoted.json"
        self.history = self.base / "promotions.jsonl"

    # -- reading ---------------------------------------------------------------------------
    def version_dir(self, version: str) -> Path:
        return self.versions_dir / validate_version_name(version)

    def list_versions(self) -> list[ModelManifest]:
        """Every published version, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        out = []
        for child in sorted(self.versions_dir.iterdir()):
            if child.name.startswith(".") or not (child / MANIFEST).is_file():
                continue
            out.append(self.manifest(child.name))
        return sorted(out, key=lambda m: (m.created_at, m.version))

    def manifest(self, version: str) -> ModelManifest:
        path = self.version_dir(version) / MANIFEST
        if not path.is_file():
            raise NotFoundError(f"model version {version!r} not found in {self.base}")
        return ModelManifest.model_validate_json(path.read_text())

    def promoted(self) -> str | None:
        """The promoted version, or None when nothing has been promoted yet."""
        try:
            return str(json.loads(self.pointer.read_text())["version"])
        except FileNotFoundError:
            return None

    def promotion_history(self) -> list[dict[str, Any]]:
        if not self.history.is_file():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line.strip()]

    def verify(self, version: str) -> ModelManifest:
        """Check every file's sha256 against the manifest; raise if anything differs, is missing,
        is not listed, or is in a pickle-based format."""
        manifest = self.manifest(version)
        root = self.version_dir(version)
        if not manifest.files:
            raise FailedPreconditionError(f"version {version} lists no files")
        present = {
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()
        }
        unlisted = sorted(present - set(manifest.files) - {MANIFEST})
        if unlisted:
            raise FailedPreconditionError(
                f"version {version}: {unlisted[0]} is not listed in the manifest"
            )
        for rel, expected in manifest.files.items():
            check_file_format(version, rel)
            path = (root / rel).resolve()
            if root.resolve() not in path.parents:
                raise FailedPreconditionError(
                    f"version {version}: file {rel!r} escapes the version"
                )
            if not path.is_file():
                raise FailedPreconditionError(f"version {version}: file {rel} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise FailedPreconditionError(
                    f"version {version}: sha256 of {rel} is {actual[:12]}…, "
                    f"manifest says {expected[:12]}…"
                )
        return manifest

    # -- writing ---------------------------------------------------------------------------
    def publish(self, source_dir: Path, manifest: ModelManifest) -> ModelManifest:
        """Copy ``source_dir`` in as a new immutable version, hashes recorded, atomically."""
        validate_version_name(manifest.version)
        if manifest.kind != self.kind:
            raise InvalidArgumentError(
                "kind", f"registry holds {self.kind} models, got {manifest.kind}"
            )
        target = self.versions_dir / manifest.version
        if target.exists():
            raise FailedPreconditionError(f"version {manifest.version} already exists")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=".staging-"))
        try:
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
            for p in staging.rglob("*"):
                if p.is_file():
                    with p.open("rb") as fh:
                        os.fsync(fh.fileno())
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("published model version", extra={"version": final.version, "kind": self.kind})
        return final

    def promote(self, version: str, *, reason: str = "manual", rollback: bool = False) -> None:
        """Point serving at ``version`` (which must verify) and record it in the history."""
        self.verify(version)
        previous = self.promoted()
        now = datetime.now(UTC).isoformat()
        self.base.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.pointer, json.dumps({"version": version, "at": now}))
        with self.history.open("a") as fh:
            record = {
                "version": version,
                "previous": previous,
                "at": now,
                "reason": reason,
                "rollback": rollback,
            }
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
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
