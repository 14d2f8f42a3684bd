"""Parameter models for every protocol method: the hub's first line of defence.

Strict pydantic models turn any wrong type, missing field or out-of-range value into a
precise ``invalid params`` error before a handler runs, so handlers only ever see valid
input. Unknown fields are ignored, which lets newer clients add fields (docs/protocol.md).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from kiri.protocol import TASK_STATES

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")]
TaskId = Annotated[int, Field(ge=1, le=2**63 - 1)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=128)]
MAX_DELAY = 10 * 365 * 86400.0
Deadline = Annotated[float, Field(ge=0.1, le=7 * 86400.0)]  # seconds one attempt of a task may run


class Params(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class Hello(Params):
    token: Annotated[str, StringConstraints(max_length=1024)] | None = None
    agent: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    role: Name
    version: Annotated[str, StringConstraints(max_length=32)] | None = None
    host: Annotated[str, StringConstraints(max_length=200)] | None = None
    pid: Annotated[int, Field(ge=0, le=2**31)] | None = None
    kinds: Annotated[list[Name], Field(max_length=64)] | None = None


class Empty(Params):
    pass


class Enqueue(Params):
    kind: Name
    atom: Name | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    delay: Annotated[float, Field(ge=0, le=MAX_DELAY)] = 0.0
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    dedupe_key: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    parent_id: TaskId | None = None
    deadline: Deadline | None = None  # null: the kind's default deadline, if it has one


class Lease(Params):
    kinds: Annotated[list[Name], Field(min_length=1, max_length=64)]
    wait: Annotated[float, Field(ge=0, le=3600)] = 0.0
    ttl: Annotated[float, Field(ge=0.05, le=86400)] | None = None


class Heartbeat(Params):
    task_id: TaskId
    lease_token: Token
    progress: dict[str, Any] | None = None


class Checkpoint(Params):
    task_id: TaskId
    lease_token: Token
    step: Annotated[int, Field(ge=0, le=2**63 - 1)]
    data: str


class NextLease(Params):
    kinds: Annotated[list[Name], Field(min_length=1, max_length=64)]
    ttl: Annotated[float, Field(ge=0.05, le=86400)] | None = None


class Ack(Params):
    task_id: TaskId
    lease_token: Token
    result: dict[str, Any] | None = None
    # Ack-and-lease: a busy agent gets its next task in the same round trip (never waits).
    next: NextLease | None = None


class Fail(Params):
    task_id: TaskId
    lease_token: Token
    error: Annotated[str, StringConstraints(max_length=65536)] = "failed"
    retry: bool = True
    delay: Annotated[float, Field(ge=0, le=MAX_DELAY)] | None = None
    release: bool = False


class TaskRef(Params):
    task_id: TaskId


class KindSettings(Params):
    """A kind's settings as ``set_kind`` takes them: what is given changes, what is not stays
    (``model_fields_set``); ``concurrency`` or ``deadline`` given as null is cleared, and
    ``paused`` is true or false."""

    paused: bool = False
    concurrency: Annotated[int, Field(ge=1, le=100_000)] | None = None
    deadline: Deadline | None = None


class SetKind(KindSettings):
    kind: Name


class RetryDead(Params):
    kind: Name | None = None  # only dead tasks of this kind
    limit: Annotated[int, Field(ge=1, le=100_000)] = 10_000  # the oldest this many


class Tasks(Params):
    status: Annotated[str, StringConstraints(pattern="^(" + "|".join(TASK_STATES) + ")$")] | None = None
    kind: Name | None = None
    atom: Name | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    before_id: TaskId | None = None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_INNERMOST = re.compile(rb"\{[^{}\[\]]*\}|\[[^{}\[\]]*\]")


def bracket_depth(line: bytes, limit: int) -> int:
    """How deep brackets nest in one line of valid JSON, counted only until it passes
    ``limit``: strings dropped, then innermost pairs removed level by level, each level one
    pass of the regex engine over a shrinking line. A fast upper bound for the request's
    params (``nesting_depth`` walks the parsed value instead: a Python step per element,
    20 ms for a 2,000-row batch)."""
    s = _JSON_STRING.sub(b"", line)
    depth = 0
    while depth <= limit:
        s, n = _INNERMOST.subn(b"", s)
        if n == 0:
            break
        depth += 1
    return depth


def nesting_depth(value: Any, limit: int) -> int:
    """How deep lists and objects nest in ``value`` (1 for a flat object), counted only
    until it passes ``limit``: checked at parse time, because a store of JSON nested past
    orjson's 254 levels would fail inside a transaction and cost the whole batch a replay."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return deepest


def describe(err: ValidationError) -> str:
    """One readable line per problem: ``kinds.0: String should match pattern ...``."""
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"]) or "params"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


ImportId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$")]


class ObservationIn(Params):
    time: Annotated[float, Field(ge=0, le=1e11)] | None = None
    host: Annotated[str, StringConstraints(max_length=200)] | None = None
    values: dict[str, Any]


MAX_OBSERVATIONS = 10_000  # observations in one observe


class ObservationColumns(Params):
    """A chunk of observations as columns (a bulk import's): ``values`` one row per
    observation in the order of ``fields`` (names or letters), ``time`` and ``host`` one
    entry each or absent (now; no host). Checked as a few typed lists, not a model each."""

    fields: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=64)]],
                      Field(min_length=1, max_length=64)]
    values: Annotated[list[Annotated[list[float], Field(max_length=64)]],
                      Field(min_length=1, max_length=MAX_OBSERVATIONS)]
    time: Annotated[list[Annotated[float, Field(ge=0, le=1e11)] | None],
                    Field(max_length=MAX_OBSERVATIONS)] | None = None
    host: Annotated[list[Annotated[str, StringConstraints(max_length=200)] | None],
                    Field(max_length=MAX_OBSERVATIONS)] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> ObservationColumns:
        n, width = len(self.values), len(self.fields)
        for name, col in (("time", self.time), ("host", self.host)):
            if col is not None and len(col) != n:
                raise ValueError(f"{name} must have one entry per row of values ({n}); got {len(col)}")
        for i, row in enumerate(self.values):
            if len(row) != width:
                raise ValueError(f"values[{i}] has {len(row)} values for {width} fields")
        return self


class Observe(Params):
    atom: Name
    # one object each, or (faster, for bulk imports) as columns; exactly one of them
    observations: Annotated[list[ObservationIn], Field(min_length=1, max_length=MAX_OBSERVATIONS)] | None = None
    columns: ObservationColumns | None = None
    import_id: ImportId | None = None  # stage for an all-or-nothing bulk import

    @model_validator(mode="after")
    def _one_form(self) -> Observe:
        if (self.observations is None) == (self.columns is None):
            raise ValueError("give the observations either as observations (a list of objects) or as columns, "
                             "not both and not neither")
        return self


class ImportRef(Params):
    import_id: ImportId


MAX_COMMIT_WAIT = 60.0


class CommitImport(ImportRef):
    # seconds a big import's commit may wait for its last step before answering (0: at once)
    wait: Annotated[float, Field(ge=0, le=MAX_COMMIT_WAIT)] = 0.0


class Observations(Params):
    atom: Name
    host: Annotated[str, StringConstraints(max_length=200)] | None = None  # only this host's
    after_id: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    limit: Annotated[int, Field(ge=1, le=5000)] = 1000
    since: float | None = None
    until: float | None = None
    # only readings within this many seconds of the atom's newest one (a trainer's window);
    # the reply's ``since`` says where that starts, to pass on with the next page
    recent: Annotated[float, Field(gt=0, le=1e11)] | None = None


class DefineAtom(Params):
    schema_: dict[str, Any] = Field(alias="schema")


class WeightsQuery(Params):
    atom: Name | None = None
    version: Annotated[int, Field(ge=1, le=2**31)] | None = None
    weights_id: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    active: bool = False  # the atom's active version
    blob: bool = False  # include the weights bytes (base64)
    limit: Annotated[int, Field(ge=1, le=1000)] = 50


class PublishWeights(Params):
    task_id: TaskId
    lease_token: Token
    atom: Name
    blob: str  # base64 safetensors
    parent_id: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    obs_from: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    obs_to: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    loss: float | None = None
    info: dict[str, Any] = Field(default_factory=dict)
    activate: bool = True
    reason: Annotated[str, StringConstraints(max_length=4000)] | None = None


class ImportWeights(Params):
    atom: Name
    blob: str  # base64 safetensors, kiri weights for the atom's schema
    activate: bool = False
    reason: Annotated[str, StringConstraints(max_length=4000)] | None = None


class ActivateWeights(Params):
    atom: Name
    version: Annotated[int, Field(ge=1, le=2**31)]


class ScoringWork(Params):
    atom: Name
    limit: Annotated[int, Field(ge=1, le=5000)] = 2000
    context: Annotated[int, Field(ge=0, le=64)] = 3
    # only observations with a higher id: a scorer asks for its next batch before the hub
    # has stored this one's scores
    after_id: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    # context and observations as columns (id, time, host, values), not one object each
    columns: bool = False


# A score is a surprise in nats, or (``excess/1`` weights and later) how far it exceeds the surprise the
# model expected, which is below zero for an observation less surprising than expected.
Score = Annotated[float, Field(ge=-1e6, le=1e6)]


class ScoreIn(Params):
    observation_id: Annotated[int, Field(ge=1, le=2**63 - 1)]
    score: Score
    surprise: Annotated[list[Annotated[float, Field(ge=0, le=1e6)]], Field(max_length=64)]
    # calibrated tail probability; with the batch's alarm_rate it is the verdict
    tail_p: Annotated[float, Field(ge=0, le=1)] | None = None


Action = Annotated[str, StringConstraints(pattern="^(ok|alert|suppress|retrain)$")]


class DecisionIn(Params):
    """The nerve's decision on one observation (inside ``record_scores``, or its own call)."""

    observation_id: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    inputs: dict[str, Any]
    action: Action
    probs: dict[str, float]
    policy: Annotated[str, StringConstraints(max_length=64)]
    cooldown: Annotated[float, Field(ge=0, le=30 * 86400)] = 600.0
    stale: bool = False  # the observation is old (a backlog): record, but do not alert
    retrain_atom: Name | None = None


MAX_SCORES = 5000  # scores in one record_scores


class ScoreColumns(Params):
    """A batch's scores as columns, one entry per observation, the per-token surprises flat
    (``width`` per observation): checked as a few typed lists instead of a model per score,
    which a backfill of thousands per call would spend most of its time on."""

    observation_id: Annotated[list[Annotated[int, Field(ge=1, le=2**63 - 1)]],
                              Field(min_length=1, max_length=MAX_SCORES)]
    score: Annotated[list[Score], Field(min_length=1, max_length=MAX_SCORES)]
    width: Annotated[int, Field(ge=0, le=64)]
    surprise: Annotated[list[Annotated[float, Field(ge=0, le=1e6)]], Field(max_length=MAX_SCORES * 64)]
    # calibrated tail probabilities (null: uncalibrated weights), one per observation
    tail_p: Annotated[list[Annotated[float, Field(ge=0, le=1)] | None], Field(max_length=MAX_SCORES)] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> ScoreColumns:
        n = len(self.observation_id)
        if len(self.score) != n or (self.tail_p is not None and len(self.tail_p) != n):
            raise ValueError("observation_id, score and tail_p must have one entry per observation")
        if len(self.surprise) != n * self.width:
            raise ValueError(f"surprise must hold width ({self.width}) values per observation, "
                             f"{n * self.width} in all; got {len(self.surprise)}")
        return self


class RecordScores(Params):
    task_id: TaskId
    lease_token: Token
    atom: Name
    weights_id: Annotated[int, Field(ge=1, le=2**63 - 1)]
    threshold: Annotated[float, Field(ge=0, le=1e6)]
    # alarms per observation the atom's budget allows: a score with tail_p below it is anomalous
    alarm_rate: Annotated[float, Field(gt=0, le=0.5)] | None = None
    # the scores: one object each, or (faster, for big batches) as columns; exactly one of them
    scores: Annotated[list[ScoreIn], Field(min_length=1, max_length=MAX_SCORES)] | None = None
    columns: ScoreColumns | None = None
    # the nerve's decision on this batch, stored in the same transaction as the scores
    decision: DecisionIn | None = None

    @model_validator(mode="after")
    def _one_form(self) -> RecordScores:
        if (self.scores is None) == (self.columns is None):
            raise ValueError("give the scores either as scores (a list of objects) or as columns, not both "
                             "and not neither")
        if self.scores is not None and len({len(s.surprise) for s in self.scores}) > 1:
            raise ValueError("every score's surprise must have the same length (one value per token of the atom)")
        return self

    def as_columns(self) -> ScoreColumns:
        """The scores as columns, whichever form they came in (one object each must share a width)."""
        if self.columns is not None:
            return self.columns
        assert self.scores is not None
        return ScoreColumns.model_construct(
            observation_id=[s.observation_id for s in self.scores], score=[s.score for s in self.scores],
            width=len(self.scores[0].surprise), surprise=[x for s in self.scores for x in s.surprise],
            tail_p=[s.tail_p for s in self.scores])


class PendingAlerts(Params):
    older_than: Annotated[float, Field(ge=0, le=86400)] = 30.0


class History(Params):
    atom: Name
    n: Annotated[int, Field(ge=1, le=1000)] = 20
    since: float | None = None


class ScheduleAdd(Params):
    kind: Name
    atom: Name | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    every: Annotated[float, Field(ge=1, le=366 * 86400)]
    first_in: Annotated[float, Field(ge=0, le=366 * 86400)] = 0.0  # seconds until the first run


class ScheduleRef(Params):
    schedule_id: Annotated[int, Field(ge=1, le=2**63 - 1)]


class RecordDecision(DecisionIn):
    task_id: TaskId
    lease_token: Token
    atom: Name


class AlertResult(Params):
    alert_id: Annotated[int, Field(ge=1, le=2**63 - 1)]
    status: Annotated[str, StringConstraints(pattern="^(sent|partial|failed)$")]
    detail: Annotated[str, StringConstraints(max_length=8000)] | None = None


class Decisions(Params):
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    before_id: TaskId | None = None


class Feedback(Params):
    decision_id: TaskId
    verdict: Annotated[str, StringConstraints(pattern="^(approve|dismiss|ok|alert|suppress|retrain)$")]


class Labels(Params):
    limit: Annotated[int, Field(ge=1, le=100_000)] = 10_000


class Scores(Params):
    atom: Name
    after_id: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0  # a scores.id cursor
    limit: Annotated[int, Field(ge=1, le=5000)] = 1000
    observations_from: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0  # only scores of observations from this id


class Retrain(Params):
    atom: Name
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)] = "retrain requested"
    params: dict[str, Any] = Field(default_factory=dict)  # the trainer's parameters (steps, ...)
