"""Table definitions: the single source of truth that the migrations must reproduce.

Times are float epoch seconds (REAL): cheap to compare in the lease hot path and the
same on SQLite and PostgreSQL. JSON documents are stored as text the hub encodes itself,
so the driver never guesses a type.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("atom", sa.String(64), nullable=True),
    sa.Column("params", sa.Text, nullable=False, server_default="{}"),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("run_after", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="5"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("expiries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_token", sa.String(64), nullable=True),
    sa.Column("lease_ttl", sa.Float, nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("progress", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("dedupe_key", sa.String(200), nullable=True),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("tasks.id", ondelete="SET NULL"), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("deadline", sa.Float, nullable=True),  # seconds one attempt may run; null: the kind's default
    sa.CheckConstraint(
        "status IN ('queued', 'leased', 'done', 'dead', 'cancelled')", name="status"
    ),
    # The lease hot path probes, per kind, the best queued task in priority/FIFO order: one
    # index seek whatever the queue depth. Partial, so finished tasks never weigh on it.
    sa.Index(
        "ix_tasks_ready",
        "kind",
        sa.column("priority").desc(),
        "run_after",
        "id",
        sqlite_where=sa.text("status = 'queued'"),
        postgresql_where=sa.text("status = 'queued'"),
    ),
    sa.Index(
        "ix_tasks_leased",
        "lease_expires_at",
        sqlite_where=sa.text("status = 'leased'"),
        postgresql_where=sa.text("status = 'leased'"),
    ),
    # A dedupe key is unique among unfinished tasks only: once a task ends, the same
    # key may be enqueued again (a nightly retrain keyed by atom, say).
    sa.Index(
        "ix_tasks_dedupe_active",
        "dedupe_key",
        unique=True,
        sqlite_where=sa.text("status IN ('queued', 'leased') AND dedupe_key IS NOT NULL"),
        postgresql_where=sa.text("status IN ('queued', 'leased') AND dedupe_key IS NOT NULL"),
    ),
    sa.Index("ix_tasks_status_kind", "status", "kind"),
    sa.Index("ix_tasks_troubled", "kind", "failures", "expiries",  # /metrics: the tasks that stumbled
             sqlite_where=sa.text("failures > 0 OR expiries > 0"),
             postgresql_where=sa.text("failures > 0 OR expiries > 0")),
    # retention walks finished tasks oldest first: a range of this index, whatever the table's size
    # and the last hour's throughput reads the newest range of it; it covers kind, status and
    # started_at so that read never visits the table's rows (15,000 tasks: 48 ms, not 195)
    sa.Index("ix_tasks_finished_at", "finished_at", "kind", "status", "started_at",
             sqlite_where=sa.text("finished_at IS NOT NULL"), postgresql_where=sa.text("finished_at IS NOT NULL")),
    # only tasks that have a parent (rare): the others' NULLs were an entry per write for nothing
    sa.Index("ix_tasks_parent_id", "parent_id", sqlite_where=sa.text("parent_id IS NOT NULL"),
             postgresql_where=sa.text("parent_id IS NOT NULL")),
)

# What the owner set for a kind of task: paused (nothing of it is leased), at most
# `concurrency` of it leased at once across all agents, and the execution deadline its tasks
# get when they carry none. A kind without a row has none of these.
kinds = sa.Table(
    "kinds",
    metadata,
    sa.Column("kind", sa.String(64), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("concurrency", sa.Integer, nullable=True),
    sa.Column("deadline", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column(
        "task_id", sa.Integer, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("host", sa.String(200), nullable=True),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("version", sa.String(32), nullable=True),
    sa.Column("kinds", sa.Text, nullable=True),
    sa.Column("connected", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("hub", sa.String(64), nullable=True),  # the hub its connection is on (hubs sharing PostgreSQL)
)

# User-defined atoms (presets live in code); the schema is the validated TOML as JSON.
atoms = sa.Table(
    "atoms",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("schema", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

observations = sa.Table(
    "observations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("atom", sa.String(32), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("host", sa.String(200), nullable=True),
    sa.Column("data", sa.Text, nullable=False),  # {"field name": value} as JSON
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_observations_atom_id", "atom", "id"),
    sa.Index("ix_observations_atom_ts", "atom", "ts"),
    sa.Index("ix_observations_atom_host_ts", "atom", "host", "ts"),  # a stream, in time order
)

# What retention pruned from ``tasks``, so that counts of finished tasks (and Prometheus's
# counters made from them) never go backwards when old rows are deleted.
task_totals = sa.Table(
    "task_totals",
    metadata,
    sa.Column("kind", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), primary_key=True),  # done, dead or cancelled
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("expiries", sa.Integer, nullable=False),
)

# A stream is an atom's readings from one host. Kept up to date in the transaction that
# stores readings, so "every host of every atom, with its latest reading" is one small table
# read, however long the history (metrics, status and the learning period ask it).
streams = sa.Table(
    "streams",
    metadata,
    sa.Column("atom", sa.String(32), primary_key=True),
    sa.Column("host", sa.String(200), primary_key=True),  # "" for readings without a host
    sa.Column("n", sa.Integer, nullable=False),  # readings stored
    sa.Column("first_ts", sa.Float, nullable=False),
    sa.Column("last_ts", sa.Float, nullable=False),
    sa.Column("last_id", sa.Integer, nullable=False),  # the reading latest in time (then id)
)

# Aggregates per stream and time bucket (5 minutes, an hour, a day): what charts read zoomed
# out, and what is left of raw readings after retention. See ``hub/watch/rollups.py``.
rollups = sa.Table(
    "rollups",
    metadata,
    sa.Column("atom", sa.String(32), primary_key=True),
    sa.Column("host", sa.String(200), primary_key=True),  # "" for readings without a host
    sa.Column("tier", sa.Integer, primary_key=True),  # bucket width in seconds
    sa.Column("bucket", sa.BigInteger, primary_key=True),  # floor(time / tier)
    sa.Column("n", sa.Integer, nullable=False),  # readings in the bucket
    sa.Column("stats", sa.LargeBinary, nullable=False),  # float64 aggregates, layout in rollups.py
    sa.Column("folded", sa.LargeBinary, nullable=True),  # the part whose raw rows retention deleted
)

# 5-minute buckets whose readings or scores changed since their rollups were computed.
rollup_dirty = sa.Table(
    "rollup_dirty",
    metadata,
    sa.Column("atom", sa.String(32), primary_key=True),
    sa.Column("host", sa.String(200), primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),
)

# Bulk imports land here chunk by chunk and nothing of them is seen until they are committed,
# so an import applies entirely or not at all even if the importer dies midway. A chunk is one
# row: its checked readings as columns in one JSON payload ({"ts": [...], "host": [...] or
# null, "data": [JSON text, ...]}), so a reading is written once more (into `observations`)
# when the import commits, not staged, copied and deleted row by row.
staged_chunks = sa.Table(
    "staged_chunks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("import_id", sa.String(64), nullable=False),
    sa.Column("atom", sa.String(32), nullable=False),
    sa.Column("n", sa.Integer, nullable=False),  # readings in the payload
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_staged_chunks_import_id", "import_id", "id"),
)

# Every bulk import, from its first staged chunk: how much it staged, when it last sent, and
# once its commit is asked for, how far the move into `observations` has come. A commit moves
# in bounded steps (a year of ten hosts is millions of rows: one transaction stalled the queue
# for a minute); `committed_at` is its durable intent, so a hub killed midway finishes the move
# when it starts again and a committed import still applies entirely. A finished import is
# kept an hour, so a resent commit_import gets the same answer.
imports = sa.Table(
    "imports",
    metadata,
    sa.Column("import_id", sa.String(64), primary_key=True),
    sa.Column("staged", sa.Integer, nullable=False),  # rows staged in all
    sa.Column("last_at", sa.Float, nullable=False),  # its newest chunk (an import idle an hour is dropped)
    sa.Column("committed_at", sa.Float, nullable=True),  # commit asked for
    sa.Column("stored", sa.Integer, nullable=False),  # rows moved into observations so far
    sa.Column("first_id", sa.Integer, nullable=True),  # lowest and highest observation id given to them
    sa.Column("last_id", sa.Integer, nullable=True),
    sa.Column("atoms", sa.Text, nullable=False),  # JSON list of the atoms moved so far
    sa.Column("done_at", sa.Float, nullable=True),  # every staged row moved
)

# Every weights version names the task and data that made it and the version it started from.
weights = sa.Table(
    "weights",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("atom", sa.String(32), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
    sa.Column("info", sa.Text, nullable=False),  # training facts, quality figures, gate verdict
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id", ondelete="SET NULL"), nullable=True),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("weights.id", ondelete="SET NULL"), nullable=True),
    sa.Column("obs_from", sa.Integer, nullable=True),
    sa.Column("obs_to", sa.Integer, nullable=True),
    sa.Column("loss", sa.Float, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("activated_at", sa.Float, nullable=True),
    sa.CheckConstraint("status IN ('active', 'inactive', 'rejected')", name="status"),
    sa.UniqueConstraint("atom", "version"),
    sa.UniqueConstraint("task_id"),
    # at most one active version per atom
    sa.Index("ix_weights_active", "atom", unique=True,
             sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'")),
)

# Every score names the weights that produced it; one score per observation and version.
scores = sa.Table(
    "scores",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("observation_id", sa.Integer, sa.ForeignKey("observations.id", ondelete="CASCADE"), nullable=False),
    sa.Column("atom", sa.String(32), nullable=False),
    sa.Column("weights_id", sa.Integer, sa.ForeignKey("weights.id"), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("anomalous", sa.Boolean, nullable=False),
    sa.Column("surprise", sa.Text, nullable=False),  # [[token, surprise nats], ...]
    sa.Column("tail_p", sa.Float, nullable=True),  # calibrated tail probability (NULL: uncalibrated weights)
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("observation_id", "weights_id"),
    sa.Index("ix_scores_atom_observation_id", "atom", "observation_id"),
    sa.Index("ix_scores_weights_id", "weights_id"),  # which weights versions still have scores
)

# Periodic work lives in the database, not in timers in agents: the hub fires each schedule
# in the same transaction that moves its next_run, so it fires once per interval, across
# restarts, never twice.
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("atom", sa.String(64), nullable=True),
    sa.Column("params", sa.Text, nullable=False, server_default="{}"),
    sa.Column("every", sa.Float, nullable=False),
    sa.Column("next_run", sa.Float, nullable=False),
    sa.Column("last_run", sa.Float, nullable=True),
    sa.Column("last_task_id", sa.Integer, nullable=True),
    sa.Column("fired", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("kind", "atom"),
    sa.Index("ix_schedules_next_run", "next_run"),
)

# What the nerve decided, from which inputs, under which policy. Human labels live apart.
decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("atom", sa.String(32), nullable=False),  # the atom whose new scores triggered it
    sa.Column("observation_id", sa.Integer, sa.ForeignKey("observations.id", ondelete="SET NULL"), nullable=True),
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id", ondelete="SET NULL"), nullable=True),
    sa.Column("inputs", sa.Text, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("probs", sa.Text, nullable=False),
    sa.Column("policy", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("task_id", "observation_id"),
    sa.Index("ix_decisions_created_at", "created_at"),
    sa.Index("ix_decisions_observation_id", "observation_id"),  # retention: is a reading referred to?
)

labels = sa.Table(
    "labels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.Integer, sa.ForeignKey("decisions.id", ondelete="CASCADE"), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),  # approve, dismiss, or an action set by hand
    sa.Column("action", sa.String(16), nullable=False),  # the action the owner says was right
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_labels_decision_id", "decision_id"),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.Integer, sa.ForeignKey("decisions.id", ondelete="CASCADE"), nullable=False,
              unique=True),
    sa.Column("atom", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending, sent, failed, cooled, stale
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.Index("ix_alerts_atom_created_at", "atom", "created_at"),
)
