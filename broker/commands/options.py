"""Click options made from the settings' own fields (`broker.flags`), and the
settings made back from the parsed options: `broker serve` has no second list."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from broker.config import Settings
from broker.flags import Flag, flag_of
from broker.lifecycle.policy import LifecyclePolicy

F = TypeVar("F", bound=Callable[..., Any])
_SCALARS: dict[Any, type] = {int: int, float: float, str: str}


def _fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Flag, type]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = flag_of(f)
        hint = hints[f.name]
        scalar = next((t for t in typing.get_args(hint) or (hint,) if t in _SCALARS), None)
        if flag is not None and scalar is not None:
            yield f, flag, scalar


def _click_type(flag: Flag, scalar: type) -> Any:
    if flag.choices is not None:
        return click.Choice(flag.choices)
    if flag.path == "dir":
        return click.Path(file_okay=False)
    if flag.path == "existing-file":
        return click.Path(exists=True, dir_okay=False)
    if flag.minimum is not None or flag.maximum is not None:
        if scalar is int:
            return click.IntRange(_int(flag.minimum), _int(flag.maximum))
        return click.FloatRange(flag.minimum, flag.maximum)
    return scalar


def _int(bound: float | None) -> int | None:
    return None if bound is None else int(bound)


def _default(f: dataclasses.Field[Any], flag: Flag) -> Any:
    if flag.cli_default is not None:
        return flag.cli_default()
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _option(f: dataclasses.Field[Any], flag: Flag, scalar: type) -> Callable[[F], F]:
    return click.option(
        flag.flag_name(f.name), f.name, envvar=flag.envvar(f.name), type=_click_type(flag, scalar),
        default=_default(f, flag), show_default=flag.show_default, hidden=flag.hidden,
        help=flag.help)


def settings_options(func: F) -> F:
    """Decorate a click command with one option per flagged field of `Settings` and
    of its `LifecyclePolicy`, in the order the fields are declared."""
    specs = [*_fields(Settings), *_fields(LifecyclePolicy)]
    for f, flag, scalar in reversed(specs):
        func = _option(f, flag, scalar)(func)
    return func


def _values(cls: type, opts: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f, flag, _ in _fields(cls):
        value = opts.pop(f.name)
        values[f.name] = None if flag.zero_is_none and not value else value
    return values


def settings_from(opts: dict[str, Any], **overrides: Any) -> Settings:
    """The settings the parsed options say; consumes their keys from `opts`."""
    policy = LifecyclePolicy(**_values(LifecyclePolicy, opts))
    values = _values(Settings, opts) | overrides
    return Settings(lifecycle=policy, **values)
