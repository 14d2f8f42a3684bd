"""The ``collect`` task: read this machine's state and push it to the hub as observations.

pulse comes from the OS through psutil: CPU %, memory %, disk % of the data directory's
filesystem, swap %, 1-minute load, and network up/down by a TCP connect to a configurable
address with a short timeout. rhythm needs the owner's keyboard/mouse idle time, which only
some platforms expose (X11's screensaver extension, logind's IdleSinceHint, macOS ioreg);
where none answers, the task says "unavailable on this host" and pushes nothing: kiri never
fabricates a reading.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kiri import config
from kiri.agents.handlers import TaskContext, TaskError

log = logging.getLogger("kiri.collector")


def net_up(probe: str, timeout: float = 1.0) -> float:
    """1.0 if a TCP connection to ``probe`` (host:port) opens within ``timeout``, else 0.0."""
    host, port = config.parse_address(probe)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return 1.0
    except OSError:
        return 0.0


def read_pulse(disk_path: Path, probe: str | None) -> dict[str, float]:
    import psutil

    path = disk_path if disk_path.exists() else Path(os.path.abspath(os.sep))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        load = psutil.getloadavg()[0]
    return {
        "cpu": psutil.cpu_percent(interval=0.5),
        "mem": psutil.virtual_memory().percent,
        "disk": psutil.disk_usage(str(path)).percent,
        "swap": psutil.swap_memory().percent,
        "load": load,
        "net": net_up(probe) if probe else 1.0,
    }


def idle_seconds() -> float | None:
    """Seconds since the owner last touched keyboard or mouse, or None where unknowable."""
    for source in (_x11_idle, _logind_idle, _macos_idle):
        try:
            value = source()
        except (OSError, ValueError, subprocess.SubprocessError):
            value = None
        if value is not None:
            return value
    return None


def _x11_idle() -> float | None:
    if not os.environ.get("DISPLAY"):
        return None
    xlib, xss = ctypes.util.find_library("X11"), ctypes.util.find_library("Xss")
    if not xlib or not xss:
        return None

    class Info(ctypes.Structure):
        _fields_ = [("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
                    ("til_or_since", ctypes.c_ulong), ("idle", ctypes.c_ulong), ("eventMask", ctypes.c_ulong)]

    x, s = ctypes.cdll.LoadLibrary(xlib), ctypes.cdll.LoadLibrary(xss)
    x.XOpenDisplay.restype = ctypes.c_void_p
    display = x.XOpenDisplay(None)
    if not display:
        return None
    try:
        s.XScreenSaverAllocInfo.restype = ctypes.POINTER(Info)
        info = s.XScreenSaverAllocInfo()
        x.XDefaultRootWindow.restype = ctypes.c_ulong
        s.XScreenSaverQueryInfo(ctypes.c_void_p(display), x.XDefaultRootWindow(ctypes.c_void_p(display)), info)
        return info.contents.idle / 1000.0
    finally:
        x.XCloseDisplay(ctypes.c_void_p(display))


def _logind_idle() -> float | None:
    if not shutil.which("loginctl"):
        return None
    session = os.environ.get("XDG_SESSION_ID")
    if not session:
        return None
    out = subprocess.run(["loginctl", "show-session", session, "-p", "IdleHint", "-p", "IdleSinceHint"],
                         capture_output=True, text=True, timeout=2, check=False).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if props.get("IdleHint") != "yes":
        return 0.0 if "IdleHint" in props else None
    since = int(props.get("IdleSinceHint", "0")) / 1e6
    return max(0.0, time.time() - since) if since else None


def _macos_idle() -> float | None:
    if sys.platform != "darwin":
        return None
    out = subprocess.run(["ioreg", "-c", "IOHIDSystem"], capture_output=True, text=True, timeout=2, check=False).stdout
    m = re.search(r'"HIDIdleTime" = (\d+)', out)
    return int(m.group(1)) / 1e9 if m else None


def collect(ctx: TaskContext) -> dict[str, Any]:
    atom = ctx.atom or "pulse"
    now = time.time()
    if atom == "pulse":
        values = read_pulse(Path(ctx.params.get("disk_path") or config.data_dir()),
                            ctx.params.get("probe") or os.environ.get("KIRI_NET_PROBE"))
    elif atom == "rhythm":
        idle = idle_seconds()
        if idle is None:
            return {"atom": atom, "status": "unavailable on this host",
                    "why": "no X11 screensaver extension, logind idle hint or macOS ioreg answered"}
        lt = time.localtime(now)
        values = {"idle": idle, "activity": 60.0 if idle < 60 else max(0.0, 60 - idle / 60),
                  "hour": lt.tm_hour + lt.tm_min / 60, "weekday": lt.tm_wday}
    else:
        raise TaskError(f"no collector for atom {atom!r}: push its observations with `kiri observe`", retry=False)
    res = ctx.hub.call("observe", {"atom": atom, "observations": [
        {"time": now, "host": socket.gethostname(), "values": values}]})
    return {"atom": atom, "observation_id": res["first_id"], "values": values}
