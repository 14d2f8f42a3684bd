"""Which function answers each protocol method: the hub's side of ``kiri.protocol.methods``.

The contract table says what each method takes, returns and promises; this module says
which domain function does it, and holds the few rules that span domains (new data or new
weights mean scoring to do). ``bind`` refuses to start a hub whose handlers and the
contract disagree, so a method cannot be added to one and forgotten in the other.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from kiri import PROTOCOL_VERSION, __version__
from kiri.hub.core import queue as Q
from kiri.hub.core.commit import Handler
from kiri.hub.store import db as dbmod
from kiri.hub.watch import decisions as D
from kiri.hub.watch import observations as O
from kiri.hub.watch import retrain as RT
from kiri.hub.watch import schedules as SCH
from kiri.hub.watch import scoring as SC
from kiri.hub.watch import views as V
from kiri.hub.watch import weights as W
from kiri.protocol import methods as M
from kiri.protocol import params as P

if TYPE_CHECKING:
    from kiri.hub.server import Hub


THROUGHPUT_EVERY = 5.0  # seconds a `stats` reply may reuse the last hour's figures
BULK_SCORES = 1000  # scores recorded in one call that make it a backfill's (server.BULK_QUIET)


def pong(_c: sa.Connection, _p: Any, env: Q.Env) -> dict[str, Any]:
    return {"pong": True, "time": env.now}


def bind(hub: Hub) -> dict[str, Handler]:
    """Every contract method's handler, bound to this hub's state."""
    atoms = hub.atoms

    def checkpoint(c: sa.Connection, p: P.Checkpoint, env: Q.Env) -> dict[str, Any]:
        return Q.checkpoint(c, p, env, hub.settings.max_checkpoint)

    def observe(c: sa.Connection, p: P.Observe, env: Q.Env) -> dict[str, Any]:
        res = O.observe(atoms, c, p, env)
        if p.import_id is None:
            SC.ensure_score_task(c, p.atom, env)
        else:
            hub.last_bulk = time.monotonic()  # retention waits for the import (server.BULK_QUIET)
        return res

    def commit_import(c: sa.Connection, p: P.CommitImport, env: Q.Env) -> dict[str, Any]:
        res = O.commit_import(c, p, env)
        hub.last_bulk = time.monotonic()
        for atom in res["atoms"]:
            SC.ensure_score_task(c, atom, env)
        if res["remaining"]:
            hub.loop.call_soon(hub.move_imports)  # the rest moves in steps between requests
        return res

    def record_scores(c: sa.Connection, p: P.RecordScores, env: Q.Env) -> dict[str, Any]:
        res = SC.record(c, p, env, hub.handed)
        if res["stored"] >= BULK_SCORES:
            hub.last_bulk = time.monotonic()  # a backfill: retention waits for it (server.BULK_QUIET)
        return res

    def publish_weights(c: sa.Connection, p: P.PublishWeights, env: Q.Env) -> dict[str, Any]:
        res = W.publish(c, p, env)
        if res["weights"]["status"] == "active" and not res["already"]:
            SC.ensure_score_task(c, p.atom, env)
        return res

    def activate_weights(c: sa.Connection, p: P.ActivateWeights, env: Q.Env) -> dict[str, Any]:
        res = W.activate(c, p, env)
        SC.ensure_score_task(c, p.atom, env)
        return res

    def import_weights(c: sa.Connection, p: P.ImportWeights, env: Q.Env) -> dict[str, Any]:
        res = W.import_(c, atoms.get(p.atom), p, env)
        if p.activate and not res["already"]:
            SC.ensure_score_task(c, p.atom, env)
        return res

    def retrain(c: sa.Connection, p: P.Retrain, env: Q.Env) -> dict[str, Any]:
        atoms.get(p.atom)  # an unknown atom is invalid params
        return RT.retrain(c, p, env)

    seen: list[Any] = [None, []]  # when the last hour's throughput was read, and what it was

    def last_hour(c: sa.Connection, now: float) -> list[dict[str, Any]]:
        """The last hour's throughput, read at most every THROUGHPUT_EVERY seconds: ``stats``
        runs on the loop and clients poll it, and a busy hour is tens of ms to read."""
        if seen[0] is None or not 0 <= now - seen[0] < THROUGHPUT_EVERY:
            seen[:] = [now, Q.throughput(c, now)]
        return list(seen[1])

    def stats(c: sa.Connection, _p: P.Empty, env: Q.Env) -> dict[str, Any]:
        agents = [
            {"agent_id": x.agent_id, "name": x.agent, "role": x.role, "peer": x.peer, "last_seen": x.last_seen}
            for x in hub.connections if x.authenticated and x.role != "cli"
        ]
        return {
            "hub": {"version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                    "uptime": env.now - hub.started_at, "db": dbmod.redact(hub.settings.db_url),
                    **dbmod.file_sizes(hub.settings.db_url), **hub.counters(),
                    "connections": len(hub.connections), "waiting_leases": len(hub.longpoll),
                    "upkeep": hub.upkeeps},
            "tasks": Q.counts(c),
            "throughput": last_hour(c, env.now),
            "agents": sorted(agents, key=lambda a: a["name"] or ""),
        }

    def status(c: sa.Connection, _p: P.Empty, env: Q.Env) -> dict[str, Any]:
        return V.status(c, atoms, env.now, hub.settings.retention)

    handlers: dict[str, Handler] = {  # hello is the connection's own (see Hub._hello)
        "ping": pong,
        "stats": stats,
        "status": status,
        "enqueue": Q.enqueue,
        "lease": Q.lease,
        "heartbeat": Q.heartbeat,
        "checkpoint": checkpoint,
        "ack": Q.ack,
        "fail": Q.fail,
        "cancel": Q.cancel,
        "retry": Q.retry,
        "retry_dead": Q.retry_dead,
        "kinds": Q.list_kinds,
        "set_kind": Q.set_kind,
        "task": Q.get_task,
        "tasks": Q.list_tasks,
        "atoms": atoms.list,
        "define_atom": atoms.define,
        "observe": observe,
        "commit_import": commit_import,
        "abort_import": O.abort_import,
        "observations": lambda c, p, env: O.list_observations(atoms, c, p, env),
        "weights": W.query,
        "publish_weights": publish_weights,
        "import_weights": import_weights,
        "activate_weights": activate_weights,
        "retrain": retrain,
        "scoring_work": lambda c, p, env: SC.work(atoms, c, p, env, hub.handed),
        "record_scores": record_scores,
        "history": lambda c, p, env: SC.history(atoms, c, p, env),
        "scores": SC.list_scores,
        "schedule_add": SCH.add,
        "schedule_rm": SCH.remove,
        "schedules": SCH.list_all,
        "nerve_inputs": D.nerve_inputs,
        "record_decision": D.record,
        "alert_result": D.alert_result,
        "decisions": D.list_decisions,
        "feedback": D.feedback,
        "labels": D.list_labels,
        "pending_alerts": D.pending_alerts,
    }
    missing, extra = set(M.NAMES) - set(handlers) - {"hello"}, set(handlers) - set(M.NAMES)
    if missing or extra:
        raise RuntimeError(f"the hub's handlers and the protocol contract disagree: "
                           f"no handler for {sorted(missing)}, not in the contract: {sorted(extra)}")
    return handlers
