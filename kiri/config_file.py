"""``kiri.toml``: one file for the hub, the agents and their alert sinks.

    [hub]
    port = 7746
    keep-raw = "60d"

    [agent]
    hub = "10.0.0.5:7746"
    lease-ttl = 20

    [alerts]              # the agents' alert sinks (the same keys as kiri-agent's flags)
    alert-webhook = ["https://hooks.example.com/kiri"]
    telegram-token = "123:abc"
    telegram-chat-id = "-1001"

Keys are the commands' long flags (``keep-raw`` or ``keep_raw``); a flag on the command
line or its environment variable overrides the file (click's ``default_map``). The file
is ``--config PATH``, else ``kiri.toml`` in the data dir (``$KIRI_DATA_DIR`` or the XDG
default) when there is one. An unknown key or a value of the wrong type is refused at
start, naming the file, the table and the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click

from kiri import config

NAME = "kiri.toml"
TABLES = ("hub", "agent", "alerts")
ALIASES = {"telegram-chat-id": "telegram-chat"}  # KIRI's name for the chat


def find(path: str | None) -> Path | None:
    """The config file to read: the one given, else the data dir's, else none."""
    if path is not None:
        return Path(path).expanduser()
    default = config.data_dir() / NAME
    return default if default.is_file() else None


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise click.UsageError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.UsageError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise click.UsageError(f"{path}: {e.strerror}") from None


def _options(command: click.Command) -> dict[str, click.Option]:
    out = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name not in ("config", "help"):
            for opt in p.opts:
                if opt.startswith("--"):
                    out[opt[2:]] = p
    return out


def defaults(ctx: click.Context, path: Path, sections: tuple[str, ...]) -> dict[str, Any]:
    """The ``default_map`` for ``ctx``'s command from these tables of the file, each value
    checked as its flag would be."""
    data = _read(path)
    unknown_tables = sorted(set(data) - set(TABLES))
    if unknown_tables:
        raise click.UsageError(f"{path}: unknown table [{unknown_tables[0]}]; tables are "
                               + ", ".join(f"[{t}]" for t in TABLES))
    assert ctx.command is not None
    opts = _options(ctx.command)
    out: dict[str, Any] = {}
    for section in sections:
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise click.UsageError(f"{path}: [{section}] must be a table")
        for raw_key, value in table.items():
            key = ALIASES.get(raw_key.replace("_", "-"), raw_key.replace("_", "-"))
            param = opts.get(key)
            if param is None:
                raise click.UsageError(f"{path}: [{section}] unknown key {raw_key!r}; keys are "
                                       + ", ".join(sorted(opts)))
            values = value if param.multiple else [value]
            if param.multiple and not isinstance(value, list):
                raise click.UsageError(f"{path}: [{section}] {raw_key}: expected a list")
            for v in values:
                if isinstance(v, dict | list):
                    raise click.UsageError(f"{path}: [{section}] {raw_key}: expected a single value, got {v!r}")
                try:
                    param.type.convert(v, param, ctx)
                except click.BadParameter as e:
                    raise click.UsageError(f"{path}: [{section}] {raw_key}: {e.message}") from None
            assert param.name is not None
            out[param.name] = value
    return out


def option(*sections: str) -> Any:
    """A ``--config`` option that loads these tables into the command's defaults."""

    def load(ctx: click.Context, _p: click.Parameter, value: str | None) -> str | None:
        path = find(value)
        if path is not None:
            ctx.default_map = {**(ctx.default_map or {}), **defaults(ctx, path, sections)}
        return value

    return click.option("--config", "config", is_eager=True, expose_value=False, callback=load,
                        metavar="PATH", envvar="KIRI_CONFIG",
                        help=f"Settings file [default: {NAME} in the data dir, if there is one]; "
                             "flags and environment override it.")
