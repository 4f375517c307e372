"""Settings: every field is a flag and a PLAUDIT_ environment variable; flags win."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from plaudit.services.common.settings import add_settings_arguments, settings_from_args
from plaudit.services.reward.settings import RewardSettings


def parse(argv: list[str]) -> RewardSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, RewardSettings)
    return settings_from_args(RewardSettings, parser.parse_args(argv))


def test_every_field_has_a_flag_naming_its_environment_variable() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, RewardSettings)
    text = parser.format_help()
    for name in RewardSettings.model_fields:
        assert "--" + name.replace("_", "-") in text
        assert "PLAUDIT_" + name.upper() in text


def test_precedence_flag_over_environment_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse([]).port == 50051
    monkeypatch.setenv("PLAUDIT_PORT", "6000")
    monkeypatch.setenv("PLAUDIT_MAX_WAIT_MS", "2.5")
    assert parse([]).port == 6000
    assert parse([]).max_wait_ms == 2.5
    assert parse(["--port", "7000"]).port == 7000


def test_invalid_values_fail_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="port"):
        parse(["--port", "70000"])
    monkeypatch.setenv("PLAUDIT_EXECUTION_PROVIDER", "tpu")
    with pytest.raises(ValidationError, match="execution_provider"):
        RewardSettings()


def test_cross_field_validation() -> None:
    with pytest.raises(ValidationError, match="max_queue_items"):
        RewardSettings(max_queue_items=10, max_items_per_request=20)


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(ValidationError):
        RewardSettings(bogus=1)  # type: ignore[call-arg]
