"""Print the pip requirements of one Plaudit image: pyproject.toml's dependencies plus its extras.

Which packages serving leaves out is decided by the extras themselves (``serve`` pulls in no
torch; ``train`` is what training adds), not by a list kept here. Computed from pyproject.toml
alone, so the Dockerfile's dependency layers change only when it does.

    python deploy/requirements.py serving --onnxruntime cpu > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# The extras each image installs; ``--onnxruntime cpu`` swaps ``serve`` for ``serve-cpu``.
IMAGE_EXTRAS = {"serving": ("serve", "s3"), "trainer": ("serve", "train", "s3")}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(1))


def extra(pyproject: Path, name: str) -> list[str]:
    """The requirements of one extra of ``pyproject``."""
    return list(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"][name])


def requirements(pyproject: Path, image: str, onnxruntime: str) -> list[str]:
    """The project's dependencies for ``image`` (serving, trainer), ONNX Runtime ``cpu``/``gpu``."""
    deps = list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    for name in IMAGE_EXTRAS[image]:
        deps += extra(pyproject, "serve-cpu" if name == "serve" and onnxruntime == "cpu" else name)
    return deps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", choices=sorted(IMAGE_EXTRAS))
    parser.add_argument("--onnxruntime", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    lines = requirements(args.pyproject, args.image, args.onnxruntime)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
