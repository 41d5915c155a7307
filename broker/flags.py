"""How a setting is spelled on the command line: the metadata `config.py` attaches to
each field, so the flag, its variable, its default and its help have one source.

`broker.commands.options` turns these into click options; nothing else reads them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

FLAG = "flag"
"""The metadata key a field's `Flag` is stored under."""


@dataclass(frozen=True)
class Flag:
    """One setting's command-line face.

    `name` defaults to the field name without its unit suffix (`_s`, `_file`),
    dashed; the variable is `BROKER_` + the flag's name. `zero_is_none`: the
    flag takes 0 (or an empty string) for the field's None, since a flag
    cannot be unset.
    """

    help: str
    name: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    path: Literal["dir", "existing-file"] | None = None
    """The value is a directory path, or the path of a file that must exist."""
    zero_is_none: bool = False
    choices: tuple[str, ...] | None = None
    """The only values the flag takes."""
    hidden: bool = False
    show_default: bool | str = True
    cli_default: Callable[[], Any] | None = None
    """The flag's default when it differs from the field's (computed at import)."""

    def flag_name(self, field_name: str) -> str:
        if self.name is not None:
            return self.name
        for suffix in ("_s", "_file"):
            if field_name.endswith(suffix):
                field_name = field_name[: -len(suffix)]
                break
        return "--" + field_name.replace("_", "-")

    def envvar(self, field_name: str) -> str:
        return "BROKER_" + self.flag_name(field_name)[2:].replace("-", "_").upper()


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A settings field with its flag; `flag` takes `Flag`'s other fields."""
    return dataclasses.field(default=default, metadata={FLAG: Flag(help=help, **flag)})


def flag_of(field: dataclasses.Field[Any]) -> Flag | None:
    value = field.metadata.get(FLAG)
    return value if isinstance(value, Flag) else None
