"""The layers of the house, enforced: who may import whom.

- ``plaudit`` (the command: cli, up, demo) sits on top and may import anything.
- ``plaudit.services.common`` and ``plaudit.services.runtime`` (shared plumbing, the ONNX model
  runtimes and their contracts) import no service.
- A service imports another service only through that service's ``client`` module.
- ``plaudit.services`` never imports the trainer or the command.
- ``plaudit.trainer`` reaches the services only through the shared layer, their clients and the
  feedback store's read-only export API (``plaudit.services.feedback.export``).
- Nobody imports the old top-level names ``services`` / ``trainer``.

Every import counts, function-local ones included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> installed package name.
ROOTS = {"plaudit": "plaudit", "services": "plaudit.services", "trainer": "plaudit.trainer"}
SHARED = ("common", "runtime")
TRAINER_MAY_USE = ("plaudit.services.feedback.export",)
COMMAND = ("plaudit.cli", "plaudit.up", "plaudit.demo")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([ROOTS[parts[0]], *parts[1:]])


def imports_of(source: str, module: str, is_package: bool = False) -> Iterator[str]:
    """Absolute names every ``import`` / ``from ... import`` in ``source`` refers to."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None when the layers allow it."""
    for old in ("services", "trainer"):
        if _under(imported, old):
            return f"imports the old top-level name {old!r}; use plaudit.{old}"
    below_command = _under(importer, "plaudit.services") or _under(importer, "plaudit.trainer")
    if below_command and any(_under(imported, c) for c in COMMAND):
        return "imports the plaudit command, which sits on top"
    if not _under(imported, "plaudit.services"):
        if _under(importer, "plaudit.services") and _under(imported, "plaudit.trainer"):
            return "serving imports the trainer"
        return None
    target = imported.split(".")
    if len(target) < 3:
        return None
    target_pkg = target[2]
    if _under(importer, "plaudit.trainer"):
        if target_pkg in SHARED or (len(target) >= 4 and target[3] == "client"):
            return None
        if any(_under(imported, allowed) for allowed in TRAINER_MAY_USE):
            return None
        return f"the trainer reaches into {'.'.join(target[:4])}: use its client or export API"
    if not _under(importer, "plaudit.services"):
        return None
    importer_pkg = importer.split(".")[2] if importer.count(".") >= 2 else ""
    if importer_pkg in SHARED:
        if target_pkg not in SHARED:
            return f"shared plumbing imports the {target_pkg} service"
        return None
    if target_pkg in SHARED or target_pkg == importer_pkg:
        return None
    if len(target) >= 4 and target[3] == "client":
        return None
    return f"the {importer_pkg} service reaches into {'.'.join(target[:4])}: use its client"


def test_rules_on_literal_imports() -> None:
    """The checker itself, on imports it must refuse and allow."""
    assert violation("plaudit.services.reward.engine", "plaudit.trainer.loop")
    assert violation("plaudit.services.common.hotswap", "plaudit.services.reward.engine")
    assert violation("plaudit.services.feedback.tasks", "plaudit.services.reward.engine")
    assert violation("plaudit.trainer.data", "plaudit.services.feedback.store")
    assert violation("plaudit.trainer.loop", "plaudit.cli")
    assert violation("plaudit.services.reward.server", "plaudit.up")
    assert violation("plaudit.services.reward.server", "services.common.errors")
    assert violation("plaudit.cli", "trainer.reward")
    assert violation("plaudit.services.feedback.tasks", "plaudit.services.reward.client") is None
    assert violation("plaudit.trainer.policy", "plaudit.services.reward.client") is None
    assert violation("plaudit.trainer.data", "plaudit.services.feedback.export") is None
    assert violation("plaudit.trainer.export", "plaudit.services.runtime.contract") is None
    assert violation("plaudit.services.reward.engine", "plaudit.services.common.registry") is None
    assert violation("plaudit.cli", "plaudit.trainer.reward") is None
    assert violation("plaudit.cli", "plaudit.services.feedback.store") is None
    assert list(imports_of("from .engine import X", "plaudit.services.reward.server")) == [
        "plaudit.services.reward.engine",
        "plaudit.services.reward.engine.X",
    ]


def _sources() -> list[Path]:
    """Every module once, by its real path (``plaudit/services`` is a link to ``services``)."""
    files = (p for root in ROOTS for p in (REPO / root).rglob("*.py"))
    return sorted(p for p in files if p.resolve() == p.absolute())


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_layers(path: Path) -> None:
    module = module_name(path)
    found = {
        f"{name}: {why}"
        for name in imports_of(path.read_text(), module, path.name == "__init__.py")
        if (why := violation(module, name))
    }
    assert not found, f"{module}: " + "; ".join(sorted(found))
