"""docs/: the API reference matches the protos, and the guides name commands, settings, alerts
and files that exist."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from plaudit import cli
from plaudit.services.common.settings import PlauditSettings
from plaudit.services.feedback import access as feedback_access
from plaudit.services.feedback.settings import FeedbackSettings
from plaudit.services.generation import access as generation_access
from plaudit.services.generation.settings import GenerationSettings
from plaudit.services.reward import http as reward_http
from plaudit.services.reward.settings import RewardSettings

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GUIDES = ["architecture.md", "operations.md", "security.md", "http.md", "reward-models.md"]
sys.path.insert(0, str(REPO / "protos"))

from generate import describe, render_docs  # noqa: E402


def test_api_reference_is_not_stale() -> None:
    fresh = render_docs(describe())
    committed = (DOCS / "api.md").read_text()
    assert committed == fresh, (
        "docs/api.md is stale; run python protos/generate.py --docs docs/api.md"
    )


def test_api_reference_covers_every_rpc_message_and_enum() -> None:
    text = (DOCS / "api.md").read_text()
    for file in describe().file:
        if not file.name.startswith("plaudit/"):
            continue
        for service in file.service:
            assert f"</a>{service.name}\n" in text
            for method in service.method:
                assert f"| `{method.name}` |" in text
        for message in file.message_type:
            assert f"</a>{message.name}\n" in text
            for field in message.field:
                assert f"| `{field.name}` = {field.number} |" in text
        for enum in file.enum_type:
            for value in enum.value:
                assert f"| `{value.name}` | {value.number} |" in text


def http_routes() -> dict[str, set[str]]:
    """Every HTTP route in the code, ``METHOD /path``, by the section of docs/http.md naming it:
    the reward route table (the one the OpenAPI document is built from) and the role tables of
    the generation and feedback APIs, plus their public routes."""
    return {
        "Reward service": {f"{r.method} {r.path}" for r in reward_http.ROUTES},
        "Generation service": set(generation_access.ROUTE_ROLES) | {"GET /healthz"},
        "Feedback service": set(feedback_access.ROUTE_ROLES) | {"GET /", "GET /healthz"},
    }


def test_http_reference_lists_every_route_and_no_other() -> None:
    text = (DOCS / "http.md").read_text()
    sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    for service, routes in http_routes().items():
        assert service in sections, f"http.md has no '## {service}' section"
        rows = set(
            re.findall(r"^\| `((?:GET|POST|PUT|PATCH|DELETE) /[^`]*)` \|", sections[service], re.M)
        )
        assert rows == routes, (
            f"http.md, {service}: missing {sorted(routes - rows)}, unknown {sorted(rows - routes)}"
        )


def bash_lines(name: str) -> list[str]:
    """Logical lines of the guide's bash blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (DOCS / name).read_text(), re.S)
    return [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]


@pytest.mark.parametrize("name", GUIDES)
def test_documented_plaudit_commands_parse(name: str) -> None:
    """`plaudit ...` and `plaudit_job NAME ...` lines use commands and flags the CLI has."""
    parser = cli.build_parser()
    checked = 0
    for line in bash_lines(name):
        if line.split(" ", 1)[0] not in ("plaudit", "plaudit_job"):
            continue
        words = shlex.split(line, comments=True)
        if words[:1] == ["plaudit"]:
            args = words[1:]
        elif words[:1] == ["plaudit_job"]:
            args = words[2:]
        else:
            continue
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{name}: `{line}` does not parse")
        checked += 1
    assert checked or name != "operations.md"


def test_documented_settings_exist() -> None:
    classes: list[type[PlauditSettings]] = [
        RewardSettings,
        FeedbackSettings,
        GenerationSettings,
        cli.TrainRewardSettings,
        cli.RegistrySettings,
        cli.ExportSettings,
        cli.FeedbackFileSettings,
    ]
    known = {f"PLAUDIT_{f.upper()}" for c in classes for f in c.model_fields}
    for name in GUIDES:
        used = set(re.findall(r"PLAUDIT_[A-Z0-9_]*[A-Z0-9]", (DOCS / name).read_text()))
        assert used <= known, f"{name}: {sorted(used - known)}"


def test_every_alert_has_a_runbook_row() -> None:
    rule = yaml.safe_load(
        (REPO / "deploy/k8s/components/monitoring/prometheusrule.yaml").read_text()
    )
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    text = (DOCS / "operations.md").read_text()
    missing = {a for a in alerts if f"| `{a}` |" not in text}
    assert not missing, f"operations.md does not explain {sorted(missing)}"


@pytest.mark.parametrize("name", GUIDES)
def test_relative_links_resolve(name: str) -> None:
    text = (DOCS / name).read_text()
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
        assert (DOCS / target).exists(), f"{name}: broken link {target}"


def test_architecture_has_the_loop_diagram() -> None:
    text = (DOCS / "architecture.md").read_text()
    (diagram,) = re.findall(r"```mermaid\n(.*?)```", text, re.S)
    for part in ("Feedback service", "Reward service", "Generation service", "Trainer"):
        assert part in diagram and f"### {part}" in text
    assert "registry" in diagram.lower()
