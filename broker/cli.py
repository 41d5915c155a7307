"""The `broker` command: the service (`broker.commands.serve`) and the people commands
that talk to a running broker (`broker.commands.people`), plus `sim` and `token`."""

from __future__ import annotations

import click

from broker.auth.cli import token
from broker.commands.import_session import import_session
from broker.commands.people import dashboard, health, pair, qr, send, sessions, watch
from broker.commands.serve import serve
from broker.simulator.cli import sim


@click.group()
@click.version_option(package_name="session-broker")
def main() -> None:
    """gRPC connection broker: one owner for every upstream messaging session."""


sessions.add_command(import_session)
for command in (serve, send, watch, health, qr, pair, sessions, dashboard, sim, token):
    main.add_command(command)

__all__ = ["main", "serve"]

if __name__ == "__main__":
    main()
