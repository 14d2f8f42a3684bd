"""The protocol's one method table: every method kiri's hub answers, and its promises.

Each entry names the method, its parameter and result models, whether it is fenced (needs
the task's lease token), whether a client may safely send it again after a dropped
connection, and which parts of the picture it changes (the events it publishes). Everything
else is derived from this table: the hub's dispatch and validation (``kiri.hub.methods``),
the client's retry rule (``kiri.agents.client``), the event topics (``kiri.hub.core.events``)
and ``docs/protocol.md`` (``python -m kiri.protocol.docs``); a test fails when any of them
and the table disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from kiri.protocol import params as P
from kiri.protocol import results as R


@dataclass(frozen=True)
class Method:
    name: str
    params: type[BaseModel]
    result: type[BaseModel]
    summary: str
    group: str
    fenced: bool = False  # needs task_id and the lease token of a task this client holds
    # safe to resend after a dropped connection: a repeat changes nothing the first did not
    # (its reply may say it was a repeat); the client retries only these on its own
    idempotent: bool = False
    events: tuple[str, ...] = ()  # topics of the picture a success can change
    errors: tuple[str, ...] = ()  # method-specific errors beyond invalid params / unauthorized
    guarantees: str = ""
    example: tuple[dict[str, Any], dict[str, Any]] | None = field(default=None, compare=False)
    # its params may carry free-form JSON that gets stored (task params, schemas, results):
    # their nesting is checked against the hub's limit as the line is parsed. False where
    # every value is typed or checked to a fixed shape before anything is stored, so a big
    # batch (observe: numbers only) skips a pass over every element.
    free_form: bool = True


GROUPS = {
    "connection": "Connection",
    "queue": "The queue",
    "observations": "Atoms and observations",
    "weights": "Weights",
    "scoring": "Scoring",
    "schedules": "Schedules",
    "decisions": "Decisions, alerts and feedback",
}

_TASK = {"id": 7, "kind": "train", "atom": "pulse", "params": {"epochs": 1}, "attempt": 1, "max_attempts": 5,
         "priority": 0, "parent_id": None, "ready_at": 1764400000.0, "checkpoint": None,
         "deadline": None}
_LEASE = {"token": "9f0c3d2a41b7e8c6d5f4a3b2c1d0e9f8", "expires_at": 1764400030.0, "ttl": 30.0}
_OBS = {"id": 41, "time": 1764400000.0, "host": "web-1", "values": {"cpu": 52.0, "mem": 61.0}}

TABLE: tuple[Method, ...] = (
    # --- connection ---------------------------------------------------------------------
    Method("hello", P.Hello, R.HelloResult, group="connection", idempotent=True, events=("agents",),
           summary="Introduce the client; must be the first request on a connection.",
           errors=("unauthorized: wrong or missing token (the third wrong try closes the connection)",),
           guarantees="Until hello succeeds every other request is refused (three refusals close the "
                      "connection). The agent row is keyed by name: a reconnecting agent keeps its id.",
           example=({"agent": "trainer-1", "role": "trainer", "token": "s3cret", "kinds": ["train"]},
                    {"hub": "0.1.0", "protocol": 1, "agent_id": 3})),
    Method("ping", P.Empty, R.Pong, group="connection", idempotent=True,
           summary="A round trip through the hub's batch loop and a database transaction.",
           example=({}, {"pong": True, "time": 1764400000.0})),
    Method("stats", P.Empty, R.Stats, group="connection", idempotent=True,
           summary="The hub's version, database sizes and counters, task counts by kind and state, "
                   "throughput per kind over the last hour (read at most every 5 s; `GET /api/v1/tasks/stats` "
                   "reads it fresh), and the connected agents.",
           example=({}, {"hub": {"version": "0.1.0", "protocol": 1, "pid": 812, "uptime": 3600.0},
                         "tasks": [{"kind": "train", "status": "done", "count": 12}],
                         "throughput": [{"kind": "train", "done": 3, "dead": 0, "cancelled": 0, "window": 3600.0,
                                         "per_minute": 0.05, "mean_s": 41.2, "p95_s": 63.0, "error_rate": 0.0}],
                         "agents": [{"agent_id": 3, "name": "trainer-1", "role": "trainer"}]})),
    Method("status", P.Empty, R.Status, group="connection", idempotent=True,
           summary="The whole front page in one read: every atom's latest reading (overall and per host), score "
                   "and weights, the nerve's latest decision, the agents, the queue and the retention policy "
                   "(what `kiri status` prints).",
           example=({}, {"time": 1764400000.0, "atoms": [{"name": "pulse", "latest": None, "weights": None,
                                                         "hosts": []}],
                         "nerve": {"weights": None, "latest": None}, "agents": [],
                         "queue": {"by_state": {"done": 3}, "by_kind": {"train": {"done": 3}}},
                         "retention": {"finished_tasks_seconds": 604800.0, "raw_seconds": 2592000.0,
                                       "weights_versions": 5, "train_window_seconds": 1209600.0,
                                       "rollup_tiers_seconds": [300, 3600, 86400]}})),
    # --- the queue ----------------------------------------------------------------------
    Method("enqueue", P.Enqueue, R.Enqueued, group="queue", events=("tasks",),
           summary="Add a task. With `dedupe_key`, while an unfinished task has the key the same task is "
                   "returned with `deduplicated: true`.",
           errors=("not found: `parent_id` names no task",),
           guarantees="Not idempotent: a resend after a lost reply adds a second task unless it carries a "
                      "`dedupe_key`. The task is durable when the reply arrives.",
           example=({"kind": "train", "atom": "pulse", "params": {"epochs": 1}, "priority": 5},
                    {"task_id": 7, "deduplicated": False})),
    Method("lease", P.Lease, R.Leased, group="queue", events=("tasks",),
           summary="Take the best ready task of the given kinds (priority, then age), waiting up to `wait` "
                   "seconds for one; `task: null` when none came.",
           guarantees="A leased task is held by one client until the lease expires (no heartbeat within its "
                      "`ttl`), the client acks or fails it, or its connection drops while the reply was "
                      "in flight (handed straight back). Not retried automatically: a lost reply leaves "
                      "a lease that expires.",
           example=({"kinds": ["train"], "wait": 30}, {"task": _TASK, "lease": _LEASE})),
    Method("heartbeat", P.Heartbeat, R.Beat, group="queue", fenced=True, idempotent=True,
           summary="Extend a lease by its ttl and report progress; `cancel: true` asks the worker to stop. "
                   "A progress `trail` (a trainer's latest steps, `{step, loss, lr}` lists) reaches the "
                   "task's followers but is not stored.",
           errors=("lease lost: the task is not leased to this token (expired and re-leased, or finished)",),
           example=({"task_id": 7, "lease_token": _LEASE["token"], "progress": {"step": 120, "of": 500}},
                    {"expires_at": 1764400060.0, "cancel": False})),
    Method("checkpoint", P.Checkpoint, R.Stored, group="queue", fenced=True, idempotent=True,
           summary="Store the task's resumable state (base64); the next lease of the task carries it.",
           errors=("lease lost", "payload too large: over the hub's checkpoint limit (64 MiB)"),
           example=({"task_id": 7, "lease_token": _LEASE["token"], "step": 120, "data": "AAEC"},
                    {"stored": True, "step": 120, "bytes": 3})),
    Method("ack", P.Ack, R.Acked, group="queue", fenced=True, idempotent=True, events=("tasks",),
           summary="Finish a task with its result. With `next`, lease the next task in the same round "
                   "trip (ack-and-lease; it never waits).",
           errors=("lease lost: the lease expired and the task was leased again or failed",),
           guarantees="A task is acked at most once: a repeat of the same ack answers `already_done`.",
           example=({"task_id": 7, "lease_token": _LEASE["token"], "result": {"loss": 0.41}},
                    {"status": "done"})),
    Method("fail", P.Fail, R.Failed, group="queue", fenced=True, idempotent=True, events=("tasks",),
           summary="Give a task up: retried after a jittered exponential backoff (or `delay`) until "
                   "`max_attempts`, then dead; `retry: false` makes it dead now; `release: true` hands "
                   "it back without counting an attempt.",
           errors=("lease lost",),
           example=({"task_id": 7, "lease_token": _LEASE["token"], "error": "CUDA out of memory"},
                    {"status": "queued", "run_after": 1764400002.0})),
    Method("cancel", P.TaskRef, R.Cancelled, group="queue", idempotent=True, events=("tasks",),
           summary="Cancel a queued task at once, or ask the agent holding it to stop (its next "
                   "heartbeat says `cancel: true`).",
           errors=("not found", "conflict: the task already finished"),
           example=({"task_id": 7}, {"status": "cancelling"})),
    Method("retry", P.TaskRef, R.Requeued, group="queue", events=("tasks",),
           summary="Queue a dead or cancelled task again, with fresh attempts.",
           errors=("not found", "conflict: the task is not dead or cancelled"),
           example=({"task_id": 7}, {"status": "queued"})),
    Method("retry_dead", P.RetryDead, R.RequeuedDead, group="queue", events=("tasks",),
           summary="Queue every dead task again (of one kind, the oldest `limit`), with fresh attempts, "
                   "in one transaction; those whose dedupe key a pending task holds stay dead.",
           example=({"kind": "resize"}, {"retried": [7, 9], "skipped": []})),
    Method("kinds", P.Empty, R.Kinds, group="queue", idempotent=True,
           summary="Every kind with settings or unfinished tasks: paused, concurrency limit, default "
                   "deadline, and how many of it are queued and leased.",
           example=({}, {"kinds": [{"kind": "resize", "paused": False, "concurrency": 2, "deadline": 60.0,
                                    "queued": 14, "leased": 2, "updated_at": 1764400000.0}]})),
    Method("set_kind", P.SetKind, R.KindSet, group="queue", idempotent=True, events=("tasks",),
           summary="Pause or resume a kind, cap how many of it are leased at once (across all agents), "
                   "or set the deadline its tasks get when they carry none. Settings not given stay; "
                   "`concurrency` or `deadline` given as null is cleared.",
           guarantees="A paused kind is leased by no one, and a kind at its limit by no one until one of "
                      "its leased tasks ends; tasks already leased run on. Resuming or raising the limit "
                      "wakes waiting agents at once. A deadline applies to attempts leased after it is set.",
           example=({"kind": "resize", "concurrency": 2, "paused": False},
                    {"kind": {"kind": "resize", "paused": False, "concurrency": 2, "deadline": None,
                              "queued": 14, "leased": 2, "updated_at": 1764400000.0}, "changed": True})),
    Method("task", P.TaskRef, R.TaskDetail, group="queue", idempotent=True,
           summary="One task, every field but its lease token, and its checkpoint's metadata.",
           errors=("not found",),
           example=({"task_id": 7}, {"task": {"id": 7, "kind": "train", "status": "done", "checkpoint": None}})),
    Method("tasks", P.Tasks, R.TaskPage, group="queue", idempotent=True,
           summary="Tasks newest first, filtered by state, kind or atom; page with `before_id`.",
           example=({"status": "dead", "limit": 2}, {"tasks": [{"id": 9, "kind": "score", "status": "dead"}],
                                                      "next_before_id": None})),
    # --- atoms and observations ---------------------------------------------------------
    Method("atoms", P.Empty, R.Atoms, group="observations", idempotent=True,
           summary="Every atom the hub knows: the presets and the user's own, with their fields.",
           example=({}, {"atoms": [{"name": "pulse", "fields": [], "preset": True}]})),
    Method("define_atom", P.DefineAtom, R.Defined, group="observations", idempotent=True, events=("atoms",),
           summary="Define (or, while it has no observations, redefine) a custom atom.",
           errors=("conflict: a preset's name, or the atom has observations under another layout",),
           guarantees="The atom exists for later requests (in this batch too) and survives a restart once "
                      "the reply arrives; a definition whose transaction rolled back leaves no trace.",
           example=({"schema": {"name": "tank", "fields": [{"letter": "L", "name": "level", "low": 0,
                                                              "high": 10, "buckets": 4}]}},
                    {"atom": "tank", "created": True})),
    Method("observe", P.Observe, R.Observed, group="observations", events=("observations", "tasks"),
           summary="Store observations of one atom (up to 10,000 a request), or stage them under "
                   "`import_id` for an all-or-nothing import. New data schedules scoring.",
           errors=("invalid params: names every bad row and field; nothing is stored",),
           guarantees="All rows of a request or none. Not idempotent: resend staged chunks and commit "
                      "once to import without duplicates. Rows come as `observations` (one object each) or "
                      "as `columns` (`fields` by name or letter, `values` one row per observation in that "
                      "order, optional `time` and `host` lists): a bulk import's chunk is checked as a few "
                      "typed lists. A staged import is dropped when it has sent nothing for an hour.",
           example=({"atom": "pulse", "observations": [{"time": 1764400000.0, "host": "web-1",
                                                        "values": {"cpu": 52, "mem": 61}}]},
                    {"stored": 1, "first_id": 41, "last_id": 41}), free_form=False),
    Method("commit_import", P.CommitImport, R.ImportCommitted, group="observations",
           events=("observations", "tasks"),
           summary="Commit an import: every row staged under `import_id` moves into the observations. Up "
                   "to 5,000 rows in this call's transaction; a bigger import moves on in steps of 5,000 "
                   "between other requests (`remaining` says how many rows are still to move: ask again "
                   "to follow it). With `wait` (seconds, up to 60) the answer comes when the last row has "
                   "moved, or when `wait` runs out, whichever is first; meanwhile the connection's later "
                   "requests are answered first.",
           errors=("not found: nothing staged under that id (aborted, or expired after an hour)",),
           guarantees="A committed import applies entirely: the commit is recorded with its first step, and "
                      "a hub stopped midway finishes it when it starts again. A big import's rows become "
                      "visible a step at a time. Asking again is safe: it answers with the progress, and "
                      "for an hour after the last step with the same totals (`first_id`..`last_id` span "
                      "the import's ids; other observations may interleave between steps).",
           example=({"import_id": "imp-3f9a1c2b", "wait": 1.0},
                    {"stored": 2016, "first_id": 42, "last_id": 2057, "atoms": ["pulse"], "remaining": 0})),
    Method("abort_import", P.ImportRef, R.ImportAborted, group="observations", idempotent=True,
           summary="Discard rows staged under `import_id`.",
           errors=("conflict: the import is committed (it will apply entirely)",),
           example=({"import_id": "imp-3f9a1c2b"}, {"discarded": 2016})),
    Method("observations", P.Observations, R.ObservationPage, group="observations", idempotent=True,
           summary="Raw observations of an atom in id order; page with `after_id`, window with `since`/`until`, "
                   "or `recent` seconds back from the atom's newest reading.",
           example=({"atom": "pulse", "limit": 1}, {"atom": "pulse", "observations": [_OBS],
                                                     "next_after_id": 41, "since": None})),
    # --- weights ------------------------------------------------------------------------
    Method("weights", P.WeightsQuery, R.WeightsList, group="weights", idempotent=True,
           summary="Weights versions, newest first; `active` for an atom's active one, `blob` for the bytes.",
           errors=("not found: the asked-for version (or active version) does not exist",),
           example=({"atom": "pulse", "active": True},
                    {"weights": [{"id": 4, "atom": "pulse", "version": 2, "status": "active"}]})),
    Method("publish_weights", P.PublishWeights, R.Published, group="weights", fenced=True, idempotent=True,
           events=("weights", "tasks"),
           summary="Store a trained version (safetensors, base64) from the training task that made it; "
                   "active at once unless `activate: false` (the quality gate's rejection).",
           errors=("lease lost", "invalid params: not kiri weights, or info a scorer could not use (its codec, "
                   "calibration, routine, threshold, alarm rate or context)"),
           example=({"task_id": 7, "lease_token": _LEASE["token"], "atom": "pulse", "blob": "…", "loss": 0.4},
                    {"weights": {"id": 5, "atom": "pulse", "version": 3, "status": "active"}, "already": False})),
    Method("import_weights", P.ImportWeights, R.Published, group="weights", idempotent=True,
           events=("weights", "tasks"),
           summary="Store weights made outside kiri's training (e.g. a KIRI weight file converted by "
                   "`kiri weights import`) as a new version with no task; inactive unless `activate`.",
           errors=("invalid params: an unknown atom, not kiri weights, not for this atom's model, or info a "
                   "scorer could not use",),
           guarantees="Importing the same blob again answers the version it already is (`already: true`).",
           example=({"atom": "pulse", "blob": "…", "activate": True},
                    {"weights": {"id": 6, "atom": "pulse", "version": 4, "status": "active"}, "already": False})),
    Method("activate_weights", P.ActivateWeights, R.Activated, group="weights", idempotent=True,
           events=("weights", "tasks"),
           summary="Make a version the atom's active one (a rollback); the atom is scored with it from now.",
           errors=("not found",),
           example=({"atom": "pulse", "version": 2}, {"atom": "pulse", "version": 2, "status": "active"})),
    Method("retrain", P.Retrain, R.RetrainQueued, group="weights", idempotent=True, events=("tasks",),
           summary="Ask for an atom to be trained again: joins the atom's unfinished training task if "
                   "there is one (`deduplicated: true`), at the priority every retrain request shares.",
           errors=("invalid params: unknown atom",),
           example=({"atom": "pulse", "reason": "drift after the upgrade", "params": {"steps": 300}},
                    {"atom": "pulse", "task_id": 9, "deduplicated": False})),
    # --- scoring ------------------------------------------------------------------------
    Method("scoring_work", P.ScoringWork, R.ScoringWork, group="scoring", idempotent=True,
           summary="The active weights and the next unscored observations of an atom, with the readings "
                   "to score them against: per host, its `context` readings before them in time and its "
                   "readings between them that are not new.",
           guarantees="A stream is (atom, host): each host is scored against its own readings in time order "
                      "(then id), never another host's, so late and out-of-order imports get the readings "
                      "around them in time. A scorer sorts each host's rows by (time, id). With `columns: true` "
                      "`context` and `observations` are objects of columns (`id`, `time`, `host`, `values`), "
                      "cheaper to send and read for big batches. `after_id` skips observations up to that id: "
                      "a scorer asks for its next batch while the hub stores the last one's scores.",
           example=({"atom": "pulse", "limit": 1, "context": 0},
                    {"weights": {"id": 4, "version": 2, "hash": "5e1f…", "threshold": 3.2},
                     "context": [], "observations": [_OBS]})),
    Method("record_scores", P.RecordScores, R.ScoresRecorded, group="scoring", fenced=True, idempotent=True,
           events=("scores", "decisions", "tasks"),
           summary="Store scores (and the nerve's decision on them) from the scoring task that made them.",
           errors=("lease lost", "not found: the weights", "invalid params: observations of another atom"),
           guarantees="Scores and decision are stored together or not at all; a repeat stores nothing twice. "
                      "Scores come as `scores` (one object each) or as `columns`: `observation_id`, `score` and "
                      "optional `tail_p` lists of one entry per observation, and `surprise` flat, `width` "
                      "values per observation (a backfill's thousands per call are checked as a few lists).",
           example=({"task_id": 8, "lease_token": _LEASE["token"], "atom": "pulse", "weights_id": 4,
                     "threshold": 3.2, "alarm_rate": 0.0002,
                     "scores": [{"observation_id": 41, "score": 1.1, "surprise": [0.4, 0.7], "tail_p": 0.38}]},
                    {"stored": 1, "already": 0, "anomalous": 0})),
    Method("history", P.History, R.History, group="scoring", idempotent=True,
           summary="An atom's latest observations with their tokens, newest score, verdict and blame.",
           example=({"atom": "pulse", "n": 1},
                    {"atom": "pulse", "observations": [{**_OBS, "tokens": ["C5", "M6"], "score": None}]})),
    Method("scores", P.Scores, R.ScorePage, group="scoring", idempotent=True,
           summary="An atom's scores in the order they were recorded; page with `after_id`.",
           example=({"atom": "pulse", "limit": 1},
                    {"scores": [{"id": 3, "observation_id": 41, "weights_id": 4, "score": 1.1}],
                     "next_after_id": 3})),
    # --- schedules ----------------------------------------------------------------------
    Method("schedule_add", P.ScheduleAdd, R.ScheduleAdded, group="schedules", events=("tasks",),
           summary="Enqueue a task of this kind every `every` seconds, the first after `first_in` (at most one "
                   "unfinished at a time).",
           example=({"kind": "collect", "atom": "pulse", "every": 30}, {"schedule_id": 2})),
    Method("schedule_rm", P.ScheduleRef, R.ScheduleRemoved, group="schedules",
           summary="Remove a schedule.", errors=("not found",),
           example=({"schedule_id": 2}, {"removed": 2})),
    Method("schedules", P.Empty, R.Schedules, group="schedules", idempotent=True,
           summary="Every schedule and when it runs next.",
           example=({}, {"schedules": [{"id": 2, "kind": "collect", "atom": "pulse", "every": 30.0}]})),
    # --- decisions ----------------------------------------------------------------------
    Method("nerve_inputs", P.Empty, R.NerveInputs, group="decisions", idempotent=True,
           summary="Every input atom's latest score and tail probability, and the nerve's active weights.",
           example=({}, {"scores": {"pulse": {"score": 1.1, "threshold": 3.2, "tail_p": 0.38,
                                              "observation_id": 41, "time": 1764400000.0}},
                         "labels": 0, "nerve": None})),
    Method("record_decision", P.RecordDecision, R.DecisionRecorded, group="decisions", fenced=True,
           idempotent=True, events=("decisions", "tasks"),
           summary="Store the nerve's decision and act on it: an alert (under the per-atom cool-down) or "
                   "a deduplicated retrain task.",
           errors=("lease lost",),
           example=({"task_id": 8, "lease_token": _LEASE["token"], "atom": "pulse", "observation_id": 41,
                     "inputs": {"pulse": 0.0001}, "action": "alert", "probs": {"alert": 1.0},
                     "policy": "rule:combined_tail_p<rate"},
                    {"decision_id": 12, "already": False, "alert": {"id": 3, "deliver": True}})),
    Method("alert_result", P.AlertResult, R.AlertRecorded, group="decisions", idempotent=True,
           events=("decisions",),
           summary="Report whether an alert reached its sinks: sent (all), partial (some) or failed (none).",
           errors=("not found",),
           example=({"alert_id": 3, "status": "sent"}, {"alert_id": 3, "status": "sent"})),
    Method("pending_alerts", P.PendingAlerts, R.PendingAlerts, group="decisions", idempotent=True,
           summary="Alerts recorded but never reported delivered (their scorer died): deliver them.",
           example=({"older_than": 30}, {"alerts": []})),
    Method("decisions", P.Decisions, R.DecisionPage, group="decisions", idempotent=True,
           summary="Decisions newest first, with their alert's state and newest label.",
           example=({"limit": 1}, {"decisions": [{"id": 12, "atom": "pulse", "action": "alert"}]})),
    Method("feedback", P.Feedback, R.Labelled, group="decisions", events=("decisions", "tasks"),
           summary="The owner's verdict on a decision (approve, dismiss, or the right action); enough "
                   "new labels enqueue the nerve's retraining.",
           errors=("not found",),
           example=({"decision_id": 12, "verdict": "dismiss"}, {"label_id": 1, "action": "ok"})),
    Method("labels", P.Labels, R.Labels, group="decisions", idempotent=True,
           summary="The owner's labels, for training the nerve.",
           example=({"limit": 10}, {"labels": []})),
)

BY_NAME: dict[str, Method] = {m.name: m for m in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)
IDEMPOTENT: frozenset[str] = frozenset(m.name for m in TABLE if m.idempotent)
# Internal operations of the hub publish too (the reaper, schedules firing, a disconnect).
TOPICS: dict[str, tuple[str, ...]] = {
    **{m.name: m.events for m in TABLE if m.events},
    "reap": ("tasks",), "fire_schedules": ("tasks",), "disconnect": ("agents",), "prune": ("tasks",),
}
