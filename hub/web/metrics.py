"""``/metrics`` in Prometheus text format, built with prometheus_client.

Two sources: what the hub counts as it runs (leases and how long tasks waited for one) and
what the database says at scrape time (queue depth, outcomes, agents, every atom's latest
score and verdict, training progress, file sizes). Counts that live in the database survive
hub restarts, so ``kiri_task_outcomes_total`` is a true counter across them.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiri import __version__

VERDICTS = ("normal", "anomaly", "unscored")
ACTIONS = ("ok", "alert", "suppress", "retrain")
LEASE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)


class _Snapshot(Collector):
    """Yields the metrics of the last database snapshot handed to it."""

    def __init__(self) -> None:
        self.snap: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        if s is None:
            return
        depth = GaugeMetricFamily("kiri_tasks", "Tasks by kind and state (queued and leased are the queue depth)",
                                  labels=["kind", "state"])
        seen = {(row["kind"], row["status"]) for row in s["tasks"]}
        for row in s["tasks"]:
            depth.add_metric([row["kind"], row["status"]], row["count"])
        for kind in sorted({k for k, _ in seen}):  # an empty queue reads 0, not "no data"
            for state in ("queued", "leased"):
                if (kind, state) not in seen:
                    depth.add_metric([kind, state], 0)
        yield depth
        outcomes = CounterMetricFamily("kiri_task_outcomes", "How tasks ended or stumbled, since the database began",
                                       labels=["kind", "outcome"])
        # live rows plus what retention pruned (task_totals): a counter never goes backwards
        ended: collections.Counter[tuple[str, str]] = collections.Counter()
        for row in s["tasks"]:
            if row["status"] in ("done", "dead", "cancelled"):
                ended[(row["kind"], row["status"])] += row["count"]
        for kind in {k for k, _ in seen}:  # a kind that never stumbled reads 0
            ended[(kind, "failed_attempt")] += 0
            ended[(kind, "lease_expired")] += 0
        for row in [*s["outcomes"], *s.get("pruned", [])]:
            ended[(row["kind"], "failed_attempt")] += row["failures"]
            ended[(row["kind"], "lease_expired")] += row["expiries"]
        for row in s.get("pruned", []):
            ended[(row["kind"], row["status"])] += row["n"]
        for (kind, outcome), n in sorted(ended.items()):
            outcomes.add_metric([kind, outcome], n)
        yield outcomes
        done = GaugeMetricFamily("kiri_tasks_completed_last_hour", "Tasks completed in the last hour, by kind",
                                 labels=["kind"])
        mean = GaugeMetricFamily("kiri_task_duration_mean_seconds",
                                 "Mean duration of the tasks completed in the last hour (first lease to end)",
                                 labels=["kind"])
        p95 = GaugeMetricFamily("kiri_task_duration_p95_seconds",
                                "95th-percentile duration of the tasks completed in the last hour", labels=["kind"])
        errors = GaugeMetricFamily("kiri_task_error_ratio",
                                   "Dead among the tasks that ended in the last hour (done or dead), by kind",
                                   labels=["kind"])
        for row in s.get("throughput", []):
            done.add_metric([row["kind"]], row["done"])
            if row["mean_s"] is not None:
                mean.add_metric([row["kind"]], row["mean_s"])
                p95.add_metric([row["kind"]], row["p95_s"])
            if row["error_rate"] is not None:
                errors.add_metric([row["kind"]], row["error_rate"])
        yield from (done, mean, p95, errors)
        paused = GaugeMetricFamily("kiri_kind_paused", "1 while the owner has paused a kind (nothing of it is leased)",
                                   labels=["kind"])
        limit = GaugeMetricFamily("kiri_kind_concurrency_limit",
                                  "At most this many tasks of a kind leased at once (kinds with a limit)",
                                  labels=["kind"])
        for row in s.get("kinds", []):
            paused.add_metric([row["kind"]], 1 if row["paused"] else 0)
            if row["concurrency"] is not None:
                limit.add_metric([row["kind"]], row["concurrency"])
        yield from (paused, limit)
        agents = GaugeMetricFamily("kiri_agents_connected", "Agents connected now, by role", labels=["role"])
        for role, n in s["agents"]:
            agents.add_metric([role], n)
        yield agents
        # one series per stream: an atom's readings from one host (host "" for readings without one)
        per = ["atom", "host"]
        score = GaugeMetricFamily("kiri_atom_score", "The latest observation's anomaly score (mean surprise, nats)",
                                  labels=per)
        thr = GaugeMetricFamily("kiri_atom_threshold", "The score above which the atom's observation is an anomaly",
                                labels=per)
        anomalous = GaugeMetricFamily("kiri_atom_anomalous", "1 when the latest observation is an anomaly",
                                      labels=per)
        verdict = GaugeMetricFamily("kiri_atom_verdict", "The latest observation's verdict (1 for the current one)",
                                    labels=[*per, "verdict"])
        tail = GaugeMetricFamily("kiri_atom_tail_probability",
                                 "P(normal data looks at least as unusual as the latest observation); "
                                 "absent for weights from before calibration", labels=per)
        seen = GaugeMetricFamily("kiri_atom_last_observation_timestamp_seconds",
                                 "When the atom's latest observation was taken", labels=per)
        readings = GaugeMetricFamily("kiri_stream_observations", "Observations stored for the stream", labels=per)
        for a in s["atoms"]:
            key = [a["atom"], a["host"] or ""]
            seen.add_metric(key, a["time"])
            readings.add_metric(key, a["readings"])
            for v in VERDICTS:
                verdict.add_metric([*key, v], 1.0 if a["verdict"] == v else 0.0)
            if a["score"] is not None:
                score.add_metric(key, a["score"])
                thr.add_metric(key, a["threshold"])
                anomalous.add_metric(key, 1.0 if a["anomalous"] else 0.0)
                if a.get("tail_p") is not None:
                    tail.add_metric(key, a["tail_p"])
        yield from (score, thr, anomalous, tail, verdict, seen, readings)
        nerve = GaugeMetricFamily("kiri_nerve_decision", "The nerve's latest action (1 for the current one)",
                                  labels=["action"])
        if s["nerve"] is not None:
            for act in ACTIONS:
                nerve.add_metric([act], 1.0 if s["nerve"]["action"] == act else 0.0)
        yield nerve
        step = GaugeMetricFamily("kiri_train_step", "Training step reached by a running train task",
                                 labels=["task_id", "atom"])
        steps = GaugeMetricFamily("kiri_train_steps", "Steps a running train task will take",
                                  labels=["task_id", "atom"])
        loss = GaugeMetricFamily("kiri_train_loss", "Latest training loss of a running train task",
                                 labels=["task_id", "atom"])
        ratio = GaugeMetricFamily("kiri_train_progress_ratio", "Fraction of a running train task done (0..1)",
                                  labels=["task_id", "atom"])
        for t in s["training"]:
            labels = [str(t["task_id"]), t["atom"]]
            p = t["progress"]
            if isinstance(p.get("step"), int | float):
                step.add_metric(labels, p["step"])
                if isinstance(p.get("steps"), int | float) and p["steps"] > 0:
                    steps.add_metric(labels, p["steps"])
                    ratio.add_metric(labels, min(1.0, p["step"] / p["steps"]))
            if isinstance(p.get("loss"), int | float):
                loss.add_metric(labels, p["loss"])
        yield from (step, steps, loss, ratio)
        files = s["files"]
        if files:
            yield GaugeMetricFamily("kiri_db_bytes", "Size of the SQLite database file",
                                    value=files.get("db_bytes", 0))
            yield GaugeMetricFamily("kiri_wal_bytes", "Size of the SQLite write-ahead log",
                                    value=files.get("wal_bytes", 0))


class HubMetrics:
    """The hub's own registry (not the global one, so several hubs in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.leases = Counter("kiri_leases", "Tasks handed to agents", ["kind"], registry=self.registry)
        self.lease_wait = Histogram("kiri_lease_wait_seconds",
                                    "How long a task was ready before an agent leased it", ["kind"],
                                    buckets=LEASE_BUCKETS, registry=self.registry)
        Info("kiri_build", "The hub's version", registry=self.registry).info({"version": __version__})
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)

    def leased(self, task: dict[str, Any], now: float) -> None:
        kind = task.get("kind") or ""
        self.leases.labels(kind).inc()
        ready = task.get("ready_at")
        if isinstance(ready, int | float):
            self.lease_wait.labels(kind).observe(max(0.0, now - ready))

    def render(self, snapshot: dict[str, Any]) -> bytes:
        """The exposition text for one scrape, from a database snapshot taken just before."""
        self._snapshot.snap = snapshot
        try:
            return generate_latest(self.registry)
        finally:
            self._snapshot.snap = None
