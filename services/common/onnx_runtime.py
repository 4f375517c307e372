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
from typing import Literal

import onnxruntime as ort

log = logging.getLogger(__name__)

ProviderChoice = Literal["auto", "cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

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
