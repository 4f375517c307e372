"""ONNX Runtime sessions: execution-provider choice and session options in one place.

``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU, and asking for it
there prints warnings and falls back. We ask for CUDA only when a CUDA device can really be
initialised (driver present, ``cuInit`` succeeds, at least one device), so CPU-only machines start
silently.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Any, Literal, Self

import onnxruntime as ort

from plaudit.services.common.errors import FailedPreconditionError
from plaudit.services.common.registry import ModelManifest, ModelRegistry, VersionFolder

log = logging.getLogger(__name__)

ProviderChoice = Literal["auto", "cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
FP16 = "fp16"  # the precision key of a version's half-precision graph (onnx_files)

ort.set_default_logger_severity(3)  # errors only; we log what matters ourselves


@functools.cache
def cuda_device_count() -> int:
    """Number of CUDA devices the driver can initialise (0 without a driver or device)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def select_providers(choice: ProviderChoice = "auto") -> list[str]:
    """Providers to ask for, best first; CUDA only when it can start."""
    cuda_ok = CUDA in ort.get_available_providers() and cuda_device_count() > 0
    if choice == "cuda" and not cuda_ok:
        raise RuntimeError("execution provider 'cuda' requested but no usable CUDA device")
    if choice in ("cuda", "auto") and cuda_ok:
        return [CUDA, CPU]
    return [CPU]


def create_session(
    model_path: Path, choice: ProviderChoice = "auto", intra_op_threads: int = 0
) -> ort.InferenceSession:
    """An optimised inference session on the best available provider."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3
    providers = select_providers(choice)
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as exc:  # a CUDA library missing at session creation: fall back once
        if providers == [CPU]:
            raise
        log.warning("CUDA session failed; using CPU", extra={"error": str(exc)})
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=[CPU])
    return session


def auto_precision(manifest: ModelManifest, provider: ProviderChoice = "auto") -> str:
    """The graph a version runs by default: its fp16 graph where it has one and the session
    will run on CUDA (half the bytes to read, tensor cores); otherwise its default precision
    (fp32, or int8 where that passed its check: ONNX Runtime's CPU kernels have no fast fp16)."""
    if FP16 in manifest.onnx_files and select_providers(provider)[0] == CUDA:
        return FP16
    return manifest.default_precision


class OnnxModel:
    """One registry version in ONNX Runtime. Subclasses build from a version's files
    (:meth:`from_folder`) and check themselves (:meth:`smoke_test`); :meth:`load` is the one load
    path of every served model: verify hashes (and signature), build, smoke-test. Every file is
    opened through :meth:`VersionFolder.path`, so only files the manifest lists and verification
    hashed, inside the version, are ever read."""

    manifest: ModelManifest
    session: ort.InferenceSession
    precision: str

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    @classmethod
    def from_dir(
        cls,
        root: Path,
        manifest: ModelManifest,
        *,
        precision: str = "auto",
        provider: ProviderChoice = "auto",
        intra_op_threads: int = 0,
    ) -> Self:
        """Build an unpublished version (an export's own folder ``root``, not verified; paths
        still kept inside it): :meth:`from_folder`."""
        return cls.from_folder(
            VersionFolder(root, manifest),
            precision=precision,
            provider=provider,
            intra_op_threads=intra_op_threads,
        )

    @classmethod
    def from_folder(
        cls,
        folder: VersionFolder,
        *,
        precision: str = "auto",
        provider: ProviderChoice = "auto",
        intra_op_threads: int = 0,
    ) -> Self:
        """Build the version from ``folder`` with the graph at ``precision`` ('auto': see
        :func:`auto_precision`); its inputs must be the manifest's."""
        manifest = folder.manifest
        chosen = auto_precision(manifest, provider) if precision == "auto" else precision
        if chosen not in manifest.onnx_files:
            raise FailedPreconditionError(
                f"version {manifest.version} has no {chosen} graph "
                f"(has {sorted(manifest.onnx_files)})"
            )
        graph = folder.path(manifest.onnx_files[chosen])
        session = create_session(graph, provider, intra_op_threads)
        actual = {i.name for i in session.get_inputs()}
        if actual != set(manifest.input_names):
            raise FailedPreconditionError(
                f"graph inputs {sorted(actual)} != manifest {sorted(manifest.input_names)}"
            )
        return cls.build(folder, session, chosen)

    @classmethod
    def build(cls, folder: VersionFolder, session: ort.InferenceSession, precision: str) -> Self:
        """The model around ``session`` (tokenizer and checks of the subclass)."""
        raise NotImplementedError

    def smoke_test(self) -> None:
        """Run a tiny input through the graph; raise if it misbehaves."""
        raise NotImplementedError

    @classmethod
    def load(
        cls, registry: ModelRegistry, version: str, *, smoke: bool = False, **options: Any
    ) -> Self:
        """Verify every file's sha256 (and, with trusted keys, the manifest's signature), build
        the version (``options``: those of :meth:`from_folder`) and, with ``smoke``, warm it up
        and check it (:meth:`smoke_test`)."""
        folder = registry.open_version(version)
        manifest = folder.manifest
        model = cls.from_folder(folder, **options)
        if smoke:
            model.smoke_test()
        extra = {"version": version, "precision": model.precision, "provider": model.provider}
        log.info("loaded model", extra={"kind": manifest.kind, **extra})
        return model
