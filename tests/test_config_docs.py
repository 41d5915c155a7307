"""Every `broker serve` flag is documented in the README, with its variable: literally,
as `BROKER_X_*`, or as `BROKER_X_A` / `_B` on the flag's table row."""

from __future__ import annotations

import re
from pathlib import Path

import click

from broker.cli import serve

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
WILDCARDS = re.findall(r"`(BROKER_[A-Z_]*)\*`", README)


def _env_documented(flag: str, env: str) -> bool:
    if re.search(rf"\b{env}\b", README) or any(env.startswith(p) for p in WILDCARDS):
        return True
    rows = [line for line in README.splitlines() if line.startswith("|") and f"`{flag}`" in line]
    return any(f"`_{env.rsplit('_', 1)[1]}`" in row for row in rows)


def test_every_serve_flag_and_variable_is_in_the_readme() -> None:
    missing = []
    for param in serve.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        flag = max(param.opts, key=len)
        if f"`{flag}" not in README and f"{flag} " not in README:
            missing.append(flag)
        envs = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        missing += [f"{flag} ({env})" for env in envs if not _env_documented(flag, env)]
    assert not missing, f"not documented in the README: {missing}"
