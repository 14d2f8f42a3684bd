"""Handlers from the user's own code: ``kiri-agent --handler resize=mypkg.jobs:resize``.

A Kirosu user's jobs are Python functions; kiri runs them as tasks of their own kinds, with
the same leases, heartbeats, checkpoints, retries and fencing as the built-in roles: a
handler is called with the task's ``TaskContext`` (``ctx.params``, ``ctx.progress(...)``,
``ctx.checkpoint(...)``, ``ctx.raise_if_stopping()``) and returns a JSON-able result;
raising ``TaskError(msg, retry=False)`` ends the task for good, any other exception is
retried with backoff. A handler that cannot be imported stops the agent at start, naming
what is wrong, rather than dying on its first task.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable

from kiri.agents.handlers import Handler

SPEC_RE = re.compile(r"^(?:(?P<kind>[A-Za-z][A-Za-z0-9_.\-]{0,63})=)?"  # a task kind, as the protocol names them
                     r"(?P<module>[A-Za-z_][\w.]*):(?P<func>[A-Za-z_]\w*)$")


class HandlerError(ValueError):
    """A ``--handler`` cannot be used; the message says why."""


def load(specs: Iterable[str]) -> dict[str, Handler]:
    """Kind -> function for each ``[KIND=]MODULE:FUNCTION`` (kind: the function's name).

    The working directory is importable, as with ``python -m``: a project's own package
    next to where the agent is started is found without installing it.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    out: dict[str, Handler] = {}
    for spec in specs:
        m = SPEC_RE.match(spec.strip())
        if m is None:
            raise HandlerError(f"--handler {spec!r}: expected [KIND=]MODULE:FUNCTION, e.g. resize=mypkg.jobs:resize")
        kind, module, func = m["kind"] or m["func"], m["module"], m["func"]
        if kind in out:
            raise HandlerError(f"--handler {spec!r}: kind {kind!r} has two handlers")
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 (whatever the user's import raises, say it and stop)
            raise HandlerError(f"--handler {spec!r}: cannot import {module}: {type(e).__name__}: {e}") from None
        fn = getattr(mod, func, None)
        if fn is None:
            raise HandlerError(f"--handler {spec!r}: {module} has no {func}")
        if not callable(fn):
            raise HandlerError(f"--handler {spec!r}: {module}.{func} is not a function")
        out[kind] = fn
    return out
