"""Defaults every process agrees on, so that zero configuration just works."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7746
DEFAULT_HTTP_PORT = 7745
TRAIN_WINDOW = 14 * 86400.0  # seconds of recent readings a train task reads by default (inside the raw window)


def data_dir() -> Path:
    """Where the hub keeps its database: ``$KIRI_DATA_DIR`` or the XDG data home."""
    env = os.environ.get("KIRI_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "kiri"


def default_db_url(directory: Path | None = None) -> str:
    path = (directory or data_dir()) / "kiri.db"
    return f"sqlite:///{path}"


def hub_address() -> tuple[str, int]:
    """The hub agents and the CLI talk to: ``$KIRI_HUB`` as host:port, else loopback."""
    return hub_addresses()[0]


def hub_addresses() -> list[tuple[str, int]]:
    """Every hub ``$KIRI_HUB`` names (``a:7746,b:7746``: hubs sharing one PostgreSQL), else loopback."""
    return parse_addresses(os.environ.get("KIRI_HUB", f"{DEFAULT_HOST}:{DEFAULT_PORT}"))


def parse_addresses(text: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]``: the hubs to try, in order; each checked as ``parse_address``."""
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise ValueError(f"bad hub address list {text!r}: an empty entry (expected host:port,host:port)")
    return [parse_address(p) for p in parts]


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` for IPv6) with an error a user can act on."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise ValueError(f"bad hub address {text!r}: missing ']' after IPv6 host")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, str(DEFAULT_PORT)
    if not host:
        raise ValueError(f"bad hub address {text!r}: expected host:port, e.g. 127.0.0.1:7746")
    try:
        port = int(port_text or DEFAULT_PORT)
    except ValueError:
        raise ValueError(f"bad hub address {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad hub address {text!r}: port must be 1-65535")
    return host, port


def is_loopback(host: str) -> bool:
    """True when binding ``host`` exposes nothing beyond this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in infos
        )
