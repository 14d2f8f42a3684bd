"""Result models: the shape of every method's successful reply.

They are the contract's other half. The hub does not build its replies through them (the
hot path writes dicts straight to orjson); instead the contract test drives a real hub
through every method and validates each reply against its model, which forbids keys it
does not name, so a reply and its documentation cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Loose(BaseModel):
    """A nested object whose full field list lives with the data it mirrors (a table row)."""

    model_config = ConfigDict(extra="allow")


class HelloResult(Result):
    hub: str
    protocol: int
    agent_id: int


class Pong(Result):
    pong: bool
    time: float


class Enqueued(Result):
    task_id: int
    deduplicated: bool


class RetrainQueued(Result):
    atom: str
    task_id: int
    deduplicated: bool


class CheckpointRef(Result):
    step: int
    data: str  # base64


class LeasedTask(Result):
    id: int
    kind: str
    atom: str | None
    params: dict[str, Any]
    attempt: int
    max_attempts: int
    priority: int
    parent_id: int | None
    ready_at: float
    checkpoint: CheckpointRef | None
    deadline: float | None  # seconds this attempt may run (its own, else its kind's); null: no limit


class LeaseInfo(Result):
    token: str
    expires_at: float
    ttl: float


class Leased(Result):
    task: LeasedTask | None
    lease: LeaseInfo | None = None


class Beat(Result):
    expires_at: float
    cancel: bool


class Stored(Result):
    stored: bool
    step: int
    bytes: int


class Acked(Result):
    status: Literal["done", "already_done"]
    next: Leased | None = None


class Failed(Result):
    status: Literal["queued", "dead", "cancelled", "done", "leased"]
    run_after: float | None = None
    already: bool | None = None


class Cancelled(Result):
    status: Literal["cancelled", "cancelling"]


class Requeued(Result):
    status: Literal["queued"]


class KindSettings(Result):
    kind: str
    paused: bool
    concurrency: int | None  # at most this many leased at once, across all agents; null: no limit
    deadline: float | None  # seconds an attempt may run when its task names none; null: no limit
    queued: int
    leased: int
    updated_at: float | None  # null: never set (the kind only has tasks)


class Kinds(Result):
    kinds: list[KindSettings]


class KindSet(Result):
    kind: KindSettings
    changed: bool


class RequeuedDead(Result):
    retried: list[int]  # task ids queued again
    skipped: list[int]  # dead tasks left dead: a pending task holds their dedupe key


class TaskDetail(Result):
    task: Loose  # every column of the task but its lease token, and its checkpoint's metadata


class TaskPage(Result):
    tasks: list[Loose]
    next_before_id: int | None


class KindCount(Result):
    kind: str
    status: str
    count: int


class Stats(Result):
    hub: Loose
    tasks: list[KindCount]
    throughput: list[Loose]  # per kind over the last hour: done, dead, cancelled, per_minute, mean_s, p95_s, error_rate
    agents: list[Loose]


class Atoms(Result):
    atoms: list[Loose]  # schema (name, fields, ...) and ``preset``


class Defined(Result):
    atom: str
    created: bool


class Observed(Result):
    stored: int | None = None
    first_id: int | None = None
    last_id: int | None = None
    staged: int | None = None
    import_id: str | None = None


class ImportCommitted(Result):
    stored: int
    first_id: int
    last_id: int
    atoms: list[str]
    remaining: int = 0  # rows still to move (a big import moves in steps); 0: all stored


class ImportAborted(Result):
    discarded: int


class ObservationOut(Result):
    id: int
    time: float
    host: str | None
    values: dict[str, Any]


class ObservationPage(Result):
    atom: str
    observations: list[ObservationOut]
    next_after_id: int | None
    since: float | None  # where the page's time window starts (from `since` or `recent`)


class WeightsList(Result):
    weights: list[Loose]


class Published(Result):
    weights: Loose
    already: bool


class Activated(Result):
    atom: str
    version: int
    status: Literal["active"]


class ScoringWeights(Result):
    id: int
    version: int
    hash: str
    threshold: float | None


class ObservationColumns(Result):
    """Readings as columns (``scoring_work`` with ``columns: true``): entry i of each is reading i."""

    id: list[int]
    time: list[float]
    host: list[str | None]
    values: list[dict[str, Any]]


class ScoringWork(Result):
    weights: ScoringWeights | None
    context: list[ObservationOut] | ObservationColumns
    observations: list[ObservationOut] | ObservationColumns


class DecisionRecorded(Result):
    decision_id: int
    already: bool
    alert: Loose | None = None
    retrain_task_id: int | None = None


class ScoresRecorded(Result):
    stored: int
    already: int
    anomalous: int
    decision: DecisionRecorded | None = None


class HistoryItem(Result):
    id: int
    time: float
    host: str | None
    values: dict[str, Any]
    tokens: list[str]
    score: float | None
    threshold: float | None = None
    anomalous: bool | None = None
    weights_id: int | None = None
    tail_p: float | None = None
    blame: list[Loose] | None = None


class History(Result):
    atom: str
    observations: list[HistoryItem]


class ScorePage(Result):
    scores: list[Loose]
    next_after_id: int | None


class ScheduleAdded(Result):
    schedule_id: int


class ScheduleRemoved(Result):
    removed: int


class Schedules(Result):
    schedules: list[Loose]


class NerveInputs(Result):
    scores: dict[str, Loose]
    labels: int
    nerve: Loose | None


class AlertRecorded(Result):
    alert_id: int
    status: Literal["sent", "partial", "failed"]


class DecisionPage(Result):
    decisions: list[Loose]


class Labelled(Result):
    label_id: int
    action: str
    nerve_retrain_task_id: int | None = None


class Labels(Result):
    labels: list[Loose]


class PendingAlerts(Result):
    alerts: list[Loose]


class Retention(Result):
    finished_tasks_seconds: float | None  # how long finished tasks are kept (None: forever)
    raw_seconds: float | None  # raw readings kept per stream, back from its newest (None: forever)
    weights_versions: int | None  # newest weights versions kept per atom besides the active lineage
    train_window_seconds: float  # what trainers read by default
    rollup_tiers_seconds: list[int]  # kept forever


class Status(Result):
    time: float
    atoms: list[Loose]  # each with `hosts`: one entry per stream (the atom's latest reading per host)
    nerve: Loose | None
    agents: list[Loose]
    queue: Loose
    retention: Retention
