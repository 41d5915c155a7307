"""`broker serve`'s options are made from the settings' fields: every field has a
flag and a variable, the defaults are the fields' own, and parsed options come
back as the same settings."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from broker.commands.options import settings_from
from broker.commands.serve import serve
from broker.config import Settings
from broker.flags import flag_of
from broker.lifecycle.policy import LifecyclePolicy


def _parse(*args: str) -> dict[str, Any]:
    """The options `broker serve` would run with, less its own logging ones."""
    params = dict(serve.make_context("serve", list(args)).params)
    for key in ("log_level", "log_format", "stable_after"):
        params.pop(key)
    return params


def test_every_field_has_a_flag() -> None:
    names = {p.name for p in serve.params}
    for cls in (Settings, LifecyclePolicy):
        for field in dataclasses.fields(cls):
            if field.name == "lifecycle":
                continue
            assert flag_of(field) is not None, f"{cls.__name__}.{field.name} has no flag"
            assert field.name in names, field.name


def test_defaults_are_the_fields_own() -> None:
    opts = _parse("--store", "memory://", "--data-dir", "/tmp/x")
    settings = settings_from(opts)
    assert dataclasses.replace(settings, store_url="memory://", data_dir=None) == Settings()


def test_flags_and_variables_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_ATTEMPT_RATE", "12.5")
    monkeypatch.setenv("BROKER_SUBSCRIBER_BUFFER", "7")
    opts = _parse("--send-window", "3", "--conflict-retry", "0", "--keepalive-interval", "0",
                  "--dashboard-listen", "", "--lease-ttl", "4")
    settings = settings_from(opts)
    assert settings.send_window == 3 and settings.lease_ttl_s == 4.0
    assert settings.subscriber_buffer == 7
    assert settings.lifecycle.attempt_rate_per_min == 12.5
    assert settings.lifecycle.conflict_retry_s is None  # 0 on the command line: never
    assert settings.lifecycle.keepalive_interval_s is None
    assert settings.dashboard_listen is None


def test_ranges_are_enforced() -> None:
    with pytest.raises(Exception, match="0<=x<=1"):
        _parse("--write-linger", "2")
