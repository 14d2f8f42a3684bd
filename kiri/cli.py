"""``kiri``: the owner's command line. Everything goes through the hub's protocol."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import orjson

from kiri import config
from kiri.agents.client import HubClient, HubUnreachable
from kiri.model.explain import worst_first
from kiri.model.schema import NERVE_INPUTS
from kiri.options import finite, seconds
from kiri.protocol import TASK_STATES, ErrorCode, RpcError
from kiri.render import ago, clip, table


class Ctx:
    def __init__(self, hub: str | None, token: str | None, as_json: bool) -> None:
        self.hub = hub
        self.token = token
        self.as_json = as_json
        self._client: HubClient | None = None

    def client(self) -> HubClient:
        if self._client is None:
            try:
                address = config.parse_addresses(self.hub) if self.hub else config.hub_addresses()
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--hub") from None
            self._client = HubClient(address, token=self.token, role="cli", reconnect_for=3.0)
        return self._client

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            return self.client().call(method, params)
        except HubUnreachable as e:
            raise click.ClickException(str(e)) from None
        except RpcError as e:
            raise click.ClickException(f"{e.message} (code {int(e.code)})") from None

    def out(self, obj: Any, text: str) -> None:
        if self.as_json:
            click.echo(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())
        else:
            click.echo(text)


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hub", envvar="KIRI_HUB", metavar="HOST:PORT[,HOST:PORT]",
              help="Hub address (env KIRI_HUB); several hubs sharing one PostgreSQL as a list, tried in turn.")
@click.option("--token", envvar="KIRI_TOKEN", help="Hub token (env KIRI_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.version_option(package_name="kiri")
@click.pass_context
def main(ctx: click.Context, hub: str | None, token: str | None, as_json: bool) -> None:
    """kiri: watch a machine with tiny transformers. Talks to `kiri-hub serve`."""
    ctx.obj = Ctx(hub, token, as_json)


def _param(ctx: click.Context, _p: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="-p/--param")
        try:
            out[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out[key] = raw
    return out


@main.command()
@click.argument("kind")
@click.argument("atom", required=False)
@click.option("-p", "--param", "params", multiple=True, callback=_param, metavar="KEY=VALUE",
              help="A task parameter (value parsed as JSON when it can be). Repeatable.")
@click.option("--steps", type=click.IntRange(1, 10**9), help="Training steps (sets param steps).")
@click.option("--alarms-per-week", type=click.FloatRange(0, 10_000, min_open=True), callback=finite,
              help="A train task's alarm budget: how often normal data may alarm (sets param alarms_per_week; "
                   "default 2).")
@click.option("--priority", default=0, show_default=True, type=click.IntRange(-1000, 1000))
@click.option("--delay", default=0.0, show_default=True, type=click.FloatRange(0), help="Seconds to wait first.")
@click.option("--max-attempts", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--dedupe-key", help="Skip if an unfinished task with this key exists.")
@click.option("--deadline", metavar="DURATION", callback=lambda _c, _p, v: None if v is None else _deadline(v),
              help="How long one attempt may run (30s, 5m, 2h) before its agent stops it and it fails "
                   "[default: the kind's deadline, if it has one].")
@pass_ctx
def enqueue(c: Ctx, kind: str, atom: str | None, params: dict[str, Any], steps: int | None,
            alarms_per_week: float | None, priority: int, delay: float, max_attempts: int,
            dedupe_key: str | None, deadline: float | None) -> None:
    """Queue a task of KIND (train, collect, score, ...) for ATOM; prints its id."""
    if steps is not None:
        params["steps"] = steps
    if alarms_per_week is not None:
        params["alarms_per_week"] = alarms_per_week
    body: dict[str, Any] = {"kind": kind, "params": params, "priority": priority, "delay": delay,
                            "max_attempts": max_attempts}
    if atom:
        body["atom"] = atom
    if dedupe_key:
        body["dedupe_key"] = dedupe_key
    if deadline is not None:
        body["deadline"] = deadline
    res = c.call("enqueue", body)
    note = " (already queued: deduplicated)" if res["deduplicated"] else ""
    c.out(res, f"{res['task_id']}{note}")


@main.command()
@click.option("--status", type=click.Choice(TASK_STATES), help="Only tasks in this state.")
@click.option("--kind", help="Only tasks of this kind.")
@click.option("--atom", help="Only tasks for this atom.")
@click.option("-n", "--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@pass_ctx
def tasks(c: Ctx, status: str | None, kind: str | None, atom: str | None, limit: int) -> None:
    """List tasks, newest first."""
    body = {k: v for k, v in {"status": status, "kind": kind, "atom": atom}.items() if v}
    res = c.call("tasks", {**body, "limit": limit})
    now = time.time()
    rows = [
        (t["id"], t["kind"], t["atom"], t["status"], f"{t['attempts']}/{t['max_attempts']}",
         _progress(t.get("progress")), t["lease_owner"] if t["status"] == "leased" else None,
         ago(t["updated_at"], now), clip(t["error"], 40))
        for t in res["tasks"]
    ]
    c.out(res, table(["ID", "KIND", "ATOM", "STATUS", "TRIES", "PROGRESS", "AGENT", "UPDATED", "ERROR"],
                     rows) if rows else "no tasks")


def _progress(p: Any) -> str:
    if not isinstance(p, dict) or not p:
        return "-"
    if "step" in p and ("of" in p or "steps" in p):
        total = p.get("of") or p.get("steps")
        return f"{p['step']}/{total}"
    return ",".join(f"{k}={v}" for k, v in list(p.items())[:2])


@main.command()
@click.argument("task_id", type=click.IntRange(1))
@pass_ctx
def task(c: Ctx, task_id: int) -> None:
    """Show one task: attempts, progress, last error, checkpoint."""
    t = c.call("task", {"task_id": task_id})["task"]
    now = time.time()
    ck = t.get("checkpoint")
    lines = [
        f"task {t['id']}: {t['kind']}" + (f" {t['atom']}" if t["atom"] else "") + f"  [{t['status']}]"
        + ("  (cancel requested)" if t["cancel_requested"] else ""),
        f"  params       {orjson.dumps(t['params']).decode()}",
        f"  priority     {t['priority']}    dedupe key: {t['dedupe_key'] or '-'}    parent: {t['parent_id'] or '-'}",
        f"  attempts     {t['attempts']}/{t['max_attempts']}"
        f" (failures {t['failures']}, lease expiries {t['expiries']})",
        f"  created      {ago(t['created_at'], now)}    updated {ago(t['updated_at'], now)}"
        f"    finished {ago(t['finished_at'], now)}",
    ]
    if t["status"] == "queued":
        lines.append(f"  runs         {ago(t['run_after'], now)}")
    if t["status"] == "leased":
        lines.append(f"  leased to    {t['lease_owner']} (expires {ago(t['lease_expires_at'], now)})")
    lines.append(f"  progress     {orjson.dumps(t['progress']).decode() if t['progress'] else '-'}")
    lines.append(f"  checkpoint   step {ck['step']}, {ck['size']} bytes, attempt {ck['attempt']}, "
                 f"{ago(ck['created_at'], now)}" if ck else "  checkpoint   -")
    if t["result"] is not None:
        lines.append(f"  result       {orjson.dumps(t['result']).decode()}")
    if t["error"]:
        lines.append("  last error   " + t["error"].strip().replace("\n", "\n               "))
    c.out({"task": t}, "\n".join(lines))


@main.command()
@click.argument("task_id", type=click.IntRange(1))
@pass_ctx
def cancel(c: Ctx, task_id: int) -> None:
    """Cancel a queued task, or ask a running one to stop."""
    res = c.call("cancel", {"task_id": task_id})
    c.out(res, f"task {task_id}: {res['status']}")


@main.command()
@click.argument("task_id", type=click.IntRange(1), required=False)
@click.option("--dead", is_flag=True, help="Every dead task (the oldest --limit), not one.")
@click.option("--kind", help="With --dead: only dead tasks of this kind.")
@click.option("--limit", default=10_000, show_default=True, type=click.IntRange(1, 100_000),
              help="With --dead: at most this many.")
@pass_ctx
def retry(c: Ctx, task_id: int | None, dead: bool, kind: str | None, limit: int) -> None:
    """Put a dead (or cancelled) task back in the queue with fresh attempts; --dead: all dead ones."""
    if dead == (task_id is not None):
        raise click.UsageError("give a TASK_ID or --dead, not both")
    if kind is not None and not dead:
        raise click.UsageError("--kind goes with --dead")
    if task_id is not None:
        res = c.call("retry", {"task_id": task_id})
        c.out(res, f"task {task_id}: {res['status']}")
        return
    res = c.call("retry_dead", {**({"kind": kind} if kind else {}), "limit": limit})
    what = f"dead {kind} task(s)" if kind else "dead task(s)"
    text = f"queued {len(res['retried'])} {what} again"
    if res["skipped"]:
        text += (f"; {len(res['skipped'])} stay dead, their work already pending under the same dedupe key "
                 f"({', '.join(map(str, res['skipped'][:10]))}{' ...' if len(res['skipped']) > 10 else ''})")
    c.out(res, text)


def _deadline(value: str) -> float:
    return seconds(value, 0.1, 7 * 86400)


def _kind_line(k: dict[str, Any]) -> str:
    limit = "no limit" if k["concurrency"] is None else f"at most {k['concurrency']} at once"
    deadline = "no deadline" if k["deadline"] is None else f"deadline {k['deadline']:g} s"
    state = "PAUSED" if k["paused"] else "running"
    return f"{k['kind']}: {state}, {limit}, {deadline}; {k['queued']} queued, {k['leased']} leased"


@main.command()
@pass_ctx
def kinds(c: Ctx) -> None:
    """Every kind of task with settings or unfinished work: paused, limit, deadline, counts."""
    res = c.call("kinds")
    rows = [(k["kind"], "paused" if k["paused"] else "running", k["concurrency"] or "-",
             "-" if k["deadline"] is None else f"{k['deadline']:g} s", k["queued"], k["leased"])
            for k in res["kinds"]]
    c.out(res, table(["KIND", "STATE", "CONCURRENCY", "DEADLINE", "QUEUED", "LEASED"], rows) if rows
          else "no kinds with settings or unfinished tasks")


def _set_kind(c: Ctx, body: dict[str, Any]) -> None:
    res = c.call("set_kind", body)
    c.out(res, _kind_line(res["kind"]) + ("" if res["changed"] else " (unchanged)"))


@main.command()
@click.argument("kind")
@pass_ctx
def pause(c: Ctx, kind: str) -> None:
    """Stop leasing tasks of KIND (tasks already running go on); ``kiri resume`` undoes it."""
    _set_kind(c, {"kind": kind, "paused": True})


@main.command()
@click.argument("kind")
@pass_ctx
def resume(c: Ctx, kind: str) -> None:
    """Lease tasks of KIND again; waiting agents take them at once."""
    _set_kind(c, {"kind": kind, "paused": False})


def _or_none(convert: Any) -> Any:
    def callback(_c: click.Context, _p: click.Parameter, value: str | None) -> Any:
        if value is None:
            return ...  # not given: left as it is
        return None if value.strip().lower() == "none" else convert(value)
    return callback


def _concurrency(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a whole number of tasks, or none") from None
    if not 1 <= n <= 100_000:
        raise click.BadParameter(f"{value!r}: must be between 1 and 100000, or none")
    return n


@main.command()
@click.argument("kind")
@click.option("--concurrency", metavar="N|none", callback=_or_none(_concurrency),
              help="At most N tasks of KIND leased at once, across all agents; none: no limit.")
@click.option("--deadline", metavar="DURATION|none", callback=_or_none(_deadline),
              help="How long an attempt may run when its task names no deadline (30s, 5m, 2h); none: no limit.")
@pass_ctx
def kind(c: Ctx, kind: str, concurrency: Any, deadline: Any) -> None:
    """Show KIND's settings, or change its concurrency limit or default deadline."""
    body: dict[str, Any] = {"kind": kind}
    if concurrency is not ...:
        body["concurrency"] = concurrency
    if deadline is not ...:
        body["deadline"] = deadline
    _set_kind(c, body)


@main.command()
@pass_ctx
def stats(c: Ctx) -> None:
    """Task counts by kind and status, throughput over the last hour, and the connected agents."""
    res = c.call("stats")
    by_kind: dict[str, dict[str, int]] = {}
    for row in res["tasks"]:
        by_kind.setdefault(row["kind"], {})[row["status"]] = row["count"]
    rows = [(k, *(v.get(s, 0) for s in TASK_STATES)) for k, v in sorted(by_kind.items())]
    hub = res["hub"]
    now = time.time()
    parts = [
        f"hub {hub['version']} pid {hub['pid']} up {ago(now - hub['uptime'], now).removesuffix(' ago')}"
        f"  db {hub['db']}" + (f" ({hub.get('db_bytes', 0) >> 10} KiB, wal {hub.get('wal_bytes', 0) >> 10} KiB)"
                                if "db_bytes" in hub else ""),
        "",
        table(["KIND", *(s.upper() for s in TASK_STATES)], rows) if rows else "no tasks",
        "",
    ]
    recent = res.get("throughput") or []
    if recent:
        def secs(x: float | None) -> str:
            return "-" if x is None else f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s"

        parts += ["last hour:", table(
            ["KIND", "DONE", "PER MIN", "MEAN", "P95", "DEAD", "ERROR RATE"],
            [(r["kind"], r["done"], f"{r['per_minute']:.1f}", secs(r["mean_s"]), secs(r["p95_s"]), r["dead"],
              "-" if r["error_rate"] is None else f"{100 * r['error_rate']:.1f}%") for r in recent]), ""]
    agents = res["agents"]
    if agents:
        parts.append(table(["AGENT", "ROLE", "PEER", "LAST SEEN"],
                           [(a["name"], a["role"], a["peer"], ago(a["last_seen"], now)) for a in agents]))
    else:
        parts.append("no agents connected")
    c.out(res, "\n".join(parts))



@main.command()
@pass_ctx
def mcp(c: Ctx) -> None:
    """Serve the Model Context Protocol on stdin/stdout: status, history, decisions, feedback,
    enqueue, tasks and task as tools for an assistant (add `kiri mcp` to its MCP servers)."""
    from kiri import mcp_server  # here, not at the top: the SDK takes a while to import

    mcp_server.serve(c.client())


# --- atoms and synthetic data (local: no hub needed) ---------------------------------------


def _anomaly_counts(_ctx: click.Context, _p: click.Parameter, values: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values:
        name, sep, n = item.partition("=")
        try:
            out[name] = int(n) if sep else 1
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected CLASS or CLASS=COUNT", param_hint="--anomaly") from None
        if out[name] < 0:
            raise click.BadParameter(f"{item!r}: count must be >= 0", param_hint="--anomaly")
    return out


@main.command()
@click.option("--file", "path", type=click.Path(dir_okay=False), help="Validate and show the atoms in this TOML file.")
@pass_ctx
def atoms(c: Ctx, path: str | None) -> None:
    """List the preset atoms (or the atoms defined in a TOML file) with their fields."""
    from kiri.model import schema as S

    try:
        found = S.load_toml(path) if path else list(S.PRESETS.values())
    except S.SchemaError as e:
        raise click.ClickException(str(e)) from None
    if c.as_json:
        c.out([a.to_dict() for a in found], "")
        return
    parts = []
    for a in found:
        z = a.size
        parts.append(f"{a.name}: vocab {a.vocab_size}, {a.max_context()} previous observation(s) of context, "
                     f"model {z.n_embd}d x {z.n_layer} layers, {z.n_head} heads, block {z.block_size}"
                     + (f"\n  {a.description}" if a.description else ""))
        parts.append(table(["LETTER", "FIELD", "LOW", "HIGH", "BUCKETS"],
                           [(f.letter, f.name, f.low, f.high, f.buckets) for f in a.fields]))
        if a.actions:
            parts.append("  actions: " + ", ".join(a.actions))
        parts.append("")
    click.echo("\n".join(parts).rstrip())


@main.command()
@click.argument("atom", type=click.Choice(list(NERVE_INPUTS)))
@click.option("--days", default=7.0, show_default=True, type=click.FloatRange(0.01, 3650))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--start", type=float, help="Start time, epoch seconds [default: Monday 2024-01-01 00:00 UTC].")
@click.option("--anomaly", "anomalies", multiple=True, callback=_anomaly_counts, metavar="CLASS[=N]",
              help="Inject labelled anomalies: spike, night_activity, overload, busy_idle_owner. Repeatable.")
def synth(atom: str, days: float, seed: int, start: float | None, anomalies: dict[str, int]) -> None:
    """Print seeded synthetic observations for ATOM as JSON lines (the same seed, the same bytes)."""
    from kiri.model import synth as gen

    try:
        series = gen.generate(atom, days, seed, start if start is not None else gen.EPOCH, anomalies)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    out = sys.stdout.buffer
    for t, row, label in zip(series.times, series.rows, series.labels, strict=True):
        rec = {"time": t, **{k: round(v, 4) for k, v in row.items()}}
        if label:
            rec["label"] = label
        out.write(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
    out.flush()



# --- observations --------------------------------------------------------------------------

CHUNK = 2000


def _hub_schema(c: Ctx, atom: str):  # type: ignore[no-untyped-def]
    from kiri.agents.client import schema_from_atoms
    from kiri.model.schema import SchemaError

    try:
        return schema_from_atoms(c.call("atoms")["atoms"], atom)
    except SchemaError as e:
        raise click.ClickException(str(e)) from None


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("atom")
@click.argument("fields", nargs=-1, type=click.UNPROCESSED)
@click.option("--file", "path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Bulk import: JSON lines or CSV, one observation per line; - reads standard input. "
                   "Read as it is sent: memory stays flat whatever the size.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]),
              help="The file's format [default: by extension, .csv or JSON lines; JSON lines for -].")
@click.option("--skip-bad", is_flag=True, help="With --file: import the good lines and report the bad ones.")
@click.option("--time", "when", type=float, help="Observation time, epoch seconds [default: now].")
@click.option("--host", help="Where it was observed [default: none].")
@pass_ctx
def observe(c: Ctx, atom: str, fields: tuple[str, ...], path: str | None, fmt: str | None, skip_bad: bool,
            when: float | None, host: str | None) -> None:
    """Push observations for ATOM: `kiri observe drift --added 3 --completed 1 --switched 2`,
    `kiri observe pulse cpu=52 mem=40 ...`, or `--file data.jsonl` / `data.csv`.

    Hour and weekday fields, when an atom has them and they are not given, come from the
    observation's local time. A file is all or nothing unless --skip-bad.
    """
    from kiri import importing
    from kiri.model.schema import ObservationError

    schema = _hub_schema(c, atom)
    now = time.time() if when is None else when
    if path is None:
        if not fields:
            raise click.UsageError("give field values (--added 3, cpu=52 ...) or --file")
        try:
            rec: dict[str, Any] = dict(importing.parse_pairs(fields))
            if host:
                rec["host"] = host
            obs = importing.to_observation(schema, {**rec, "time": now}, now)
        except (ObservationError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        res = c.call("observe", {"atom": atom, "observations": [obs]})
        c.out(res, f"stored observation {res['first_id']} for {atom}: "
              + " ".join(schema.tokens(schema.encode(obs["values"]))))
        return
    if fields:
        raise click.UsageError("give either field values or --file, not both")
    if path == "-":
        res = _import(c, atom, schema, sys.stdin.buffer, "standard input", fmt or "jsonl", now, skip_bad)
    else:
        try:
            stream = open(path, "rb")  # noqa: SIM115 (closed below; stdin must not be)
        except FileNotFoundError:
            raise click.ClickException(f"{path}: no such file") from None
        except OSError as e:
            raise click.ClickException(f"{path}: {e.strerror}") from None
        with stream:
            res = _import(c, atom, schema, stream, path, fmt or importing.format_of(path), now, skip_bad)
    skipped = res.pop("skipped_lines")
    for b in skipped:
        click.echo(f"skipped line {b['line']}: {b['error']}", err=True)
    more = res["skipped_count"] - len(skipped)
    if more:
        click.echo(f"... and {more} more bad line(s)", err=True)
    c.out({**res, "skipped": skipped}, f"imported {res['stored']} observation(s) into {atom}"
          + (f", skipped {res['skipped_count']} bad line(s)" if res["skipped_count"] else ""))


MAX_REPORTED = 1000  # bad lines listed one by one (the rest are counted)


def _import(c: Ctx, atom: str, schema: Any, stream: Any, name: str, fmt: str, now: float,
            skip_bad: bool) -> dict[str, Any]:
    """Read, check and stage a file chunk by chunk, then commit once: the import applies
    entirely or not at all, and only one chunk is ever held in memory.

    Without ``--skip-bad`` a bad line dooms the import: nothing more is sent, but the rest
    is still read, so the owner sees every bad line at once.
    """
    import uuid

    import_id = uuid.uuid4().hex
    try:
        staged = _stage(c, import_id, atom, schema, stream, name, fmt, now, skip_bad)
    except BaseException:
        _abort(c, import_id)
        raise
    staged.pop("sent")
    return {**_commit(c, import_id, name), **staged}


def _stage(c: Ctx, import_id: str, atom: str, schema: Any, stream: Any, name: str, fmt: str, now: float,
           skip_bad: bool) -> dict[str, Any]:
    """Stage one file's observations under ``import_id`` (nothing is stored until the commit);
    returns its counts. Raises (with every bad line named) when a bad line dooms it."""
    from kiri import importing

    show = sys.stderr.isatty() and not c.as_json and stream is not sys.stdin.buffer
    size = os.fstat(stream.fileno()).st_size if show else 0
    bad: list[importing.Bad] = []
    n_bad = sent = 0
    uploader = importing.Pipelined(
        lambda columns: c.call("observe", {"atom": atom, "columns": columns, "import_id": import_id}))
    try:
        with click.progressbar(length=max(size, 1), label="importing", file=sys.stderr, hidden=not show) as bar:
            for chunk in importing.chunks(schema, stream, name, fmt, now, CHUNK):
                n_bad += len(chunk.bad)
                bad.extend(chunk.bad[:MAX_REPORTED - len(bad)])
                if chunk.columns is not None and (skip_bad or not n_bad):
                    uploader.put(chunk.columns)
                    sent += chunk.n
                if show:
                    bar.update(stream.tell() - bar.pos)
            if n_bad and not skip_bad:
                shown = "\n".join(f"  line {b.line}: {b.message}" for b in bad[:20])
                more = f"\n  ... and {n_bad - 20} more" if n_bad > 20 else ""
                raise click.ClickException(
                    f"{name}: {n_bad} bad line(s); nothing was imported (use --skip-bad to import the rest)\n"
                    f"{shown}{more}")
            uploader.close()
            if not sent:
                raise click.ClickException(f"{name}: no valid observations to import")
    except BaseException as e:
        with contextlib.suppress(BaseException):
            uploader.close()  # let a chunk in flight land before the import is dropped
        if isinstance(e, importing.ImportFileError):
            raise click.ClickException(str(e)) from None
        raise
    return {"sent": sent, "skipped_count": n_bad, "skipped_lines": [{"line": b.line, "error": b.message} for b in bad]}


COMMIT_WAIT = 1.0  # seconds the hub may hold a commit's answer until its import's last step


def _commit(c: Ctx, import_id: str, name: str) -> dict[str, Any]:
    """Commit a staged import and follow it to the end: a big one moves in steps, and the hub
    answers when the last has moved (``wait``), or after COMMIT_WAIT with the progress so far."""
    ask = {"import_id": import_id, "wait": COMMIT_WAIT}
    try:
        try:
            res = c.client().call("commit_import", ask)
        except RpcError as e:
            if e.code != ErrorCode.INVALID_PARAMS or "wait" not in e.message:
                raise
            ask = {"import_id": import_id}  # a hub from before ``wait``: asked again every 0.2 s
            res = c.client().call("commit_import", ask)
    except BaseException as e:
        _abort(c, import_id)
        if isinstance(e, RpcError):
            raise click.ClickException(f"{name}: not imported: {e.message} (code {int(e.code)})") from None
        if isinstance(e, HubUnreachable):
            raise click.ClickException(f"{name}: not imported: {e}") from None
        raise
    # committed: it applies entirely; a big one moves in steps, followed here to the end
    while res.get("remaining"):
        if "wait" not in ask:
            time.sleep(0.2)
        try:
            res = c.client().call("commit_import", ask)
        except HubUnreachable:
            raise click.ClickException(
                f"{name}: committed, {res['remaining']:,} row(s) still to move when the hub went away; "
                "the hub finishes the import when it runs again") from None
        except RpcError as e:
            raise click.ClickException(f"{name}: committed; following it: {e.message} (code {int(e.code)})") from None
    return res


@main.group("import")
def import_group() -> None:
    """Bring another tool's data in."""


@import_group.command("kiri")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--skip-bad", is_flag=True, help="Import the good lines and report the bad ones.")
@pass_ctx
def import_kiri(c: Ctx, directory: Path, skip_bad: bool) -> None:
    """A KIRI data directory: every atom's JSON lines (pulse.jsonl, rhythm.jsonl, ...), in one
    import that applies entirely or not at all, with a summary per file.

    A file belongs to the atom its name starts with (``pulse.jsonl``, ``pulse-2026-02.jsonl``);
    KIRI's lines are read as KIRI wrote them (letter keys, ISO ``ts``).
    """
    import uuid

    from kiri.agents.client import schema_from_atoms

    listed = c.call("atoms")["atoms"]
    atoms = {a["name"]: schema_from_atoms(listed, a["name"]) for a in listed if a["name"] != "nerve"}
    files: list[tuple[Path, str]] = []
    ignored: list[str] = []
    for f in sorted(directory.glob("*.jsonl")):
        atom = next((a for a in sorted(atoms, key=len, reverse=True)
                     if f.stem == a or f.stem.startswith((f"{a}-", f"{a}_", f"{a}."))), None)
        if atom is None:
            ignored.append(f.name)
        else:
            files.append((f, atom))
    if not files:
        raise click.ClickException(f"{directory}: no KIRI history here (expected ATOM.jsonl for one of "
                                   f"{', '.join(sorted(atoms))})")
    import_id = uuid.uuid4().hex
    now = time.time()
    per_file = []
    try:
        for f, atom in files:
            with f.open("rb") as stream:
                got = _stage(c, import_id, atom, atoms[atom], stream, str(f), "jsonl", now, skip_bad)
            per_file.append({"file": f.name, "atom": atom, "staged": got["sent"], "skipped": got["skipped_count"],
                             "skipped_lines": got["skipped_lines"][:20]})
    except BaseException:
        _abort(c, import_id)
        raise
    res = _commit(c, import_id, str(directory))
    lines = [f"{p['file']}: {p['staged']} observation(s) into {p['atom']}"
             + (f", skipped {p['skipped']} bad line(s)" if p["skipped"] else "") for p in per_file]
    lines += [f"{name}: not an atom's history, left alone" for name in ignored]
    lines.append(f"imported {res['stored']} observation(s) from {len(per_file)} file(s) in one commit")
    c.out({**res, "files": per_file, "ignored": ignored}, "\n".join(lines))


def _abort(c: Ctx, import_id: str) -> None:
    """Drop a staged import now (else the hub expires it by itself within the hour)."""
    with contextlib.suppress(RpcError, HubUnreachable):
        c.client().call("abort_import", {"import_id": import_id})


# --- weights -------------------------------------------------------------------------------


@main.group()
def weights() -> None:
    """Weights versions: lineage, quality, activation and rollback."""


def _resolve(c: Ctx, ref: str) -> dict[str, Any]:
    """A weights version by id (`12`) or by atom and version (`pulse:3`)."""
    atom, sep, version = ref.partition(":")
    try:
        query = {"atom": atom, "version": int(version)} if sep else {"weights_id": int(ref)}
    except ValueError:
        raise click.BadParameter(f"{ref!r}: expected a weights id (12) or ATOM:VERSION (pulse:3)") from None
    return c.call("weights", query)["weights"][0]


@weights.command("list")
@click.argument("atom")
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@pass_ctx
def weights_list(c: Ctx, atom: str, limit: int) -> None:
    """Versions of ATOM, newest first."""
    res = c.call("weights", {"atom": atom, "limit": limit})
    now = time.time()
    rows = [(w["id"], f"{w['atom']}:{w['version']}", w["status"], f"{w['loss']:.3f}" if w["loss"] is not None else None,
             w["task_id"], w["parent_id"], f"{w['obs_from']}..{w['obs_to']}", w["hash"][:12], ago(w["created_at"], now))
            for w in res["weights"]]
    c.out(res, table(["ID", "VERSION", "STATUS", "LOSS", "TASK", "PARENT", "OBSERVATIONS", "HASH", "CREATED"], rows)
          if rows else f"no weights for {atom}")


@weights.command("show")
@click.argument("ref")
@pass_ctx
def weights_show(c: Ctx, ref: str) -> None:
    """One version (id or ATOM:VERSION): lineage, training facts, quality gate."""
    w = _resolve(c, ref)
    info = w["info"]
    q = info.get("quality") or {}
    origin = (f"warm start from version id {w['parent_id']}" if w["parent_id"] is not None
              else "trained from scratch")
    if w["obs_from"] is not None:
        data = (f"  data         observations {w['obs_from']}..{w['obs_to']} ({info.get('observations', '?')} used"
                + (f", left out {info['left_out']} that scored as unusual)" if info.get("left_out") else ")"))
    elif "labels" in info:  # the nerve learns from the owner's labels, not from observations
        data = f"  data         {info['labels']} labels from the owner"
    else:
        data = "  data         -"
    lines = [
        f"weights {w['id']}: {w['atom']} version {w['version']}  [{w['status']}]",
        f"  hash         {w['hash']}",
        f"  made by      task {w['task_id'] if w['task_id'] is not None else '-'}, {origin}",
        data,
        f"  training     {info.get('steps')} steps, final loss {w['loss']:.4f}, context {info.get('context')}"
        if w["loss"] is not None else "  training     -",
    ]
    if "threshold" in info:
        on = {"recent": "recent normal", "all": "training"}.get(info.get("calibrated_on", ""), "held-out")
        lines.append(f"  threshold    {info['threshold']:.3f} nats (p99 of the {on} scores it was calibrated on "
                     f"{info.get('score_p99', 0):.3f})")
    if "calibration" in info:  # weights made since calibrated scoring
        lines.append(f"  calibrated   on {info.get('calibrated_on')} scores; alarm rate "
                     f"{info.get('alarm_rate', 0):.2e} per observation; "
                     f"{100 * info.get('judged_anomalous', 0):.1f}% of the training data judged anomalous")
    if info.get("routine"):  # weights that learned their stream's routine (model/routine.py)
        slots = info["routine"].get("slots") or []
        workdays = sum(1 for k, _, _ in slots if k == 0)
        lines.append(f"  routine      {len(slots)} slots of {info['routine'].get('slot_minutes', 0):g} min "
                     f"({workdays} on workdays, {len(slots) - workdays} at weekends) where a reading is judged "
                     "beyond its usual surprise at that time")
    if info.get("best_step") is not None:
        lines.append(f"  stopped      early: best held-out loss {info.get('held_out_loss', 0):.4f} at step "
                     f"{info['best_step']}")
    if q:
        lines.append(f"  separation   {q['new']['separation']:.3f} nats on {q['new']['n']} held-out observations")
    if w["reason"]:
        lines.append(f"  gate         {w['reason']}")
    c.out({"weights": w}, "\n".join(lines))


@weights.command("activate")
@click.argument("ref")
@pass_ctx
def weights_activate(c: Ctx, ref: str) -> None:
    """Make a version (id or ATOM:VERSION) the active one: rollback, or overrule the gate."""
    w = _resolve(c, ref)
    res = c.call("activate_weights", {"atom": w["atom"], "version": w["version"]})
    c.out(res, f"{w['atom']}:{w['version']} is now active")




@weights.command("import")
@click.argument("atom")
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--activate", is_flag=True, help="Score with them from now on (default: stored inactive; "
                                                "`kiri weights activate` later).")
@pass_ctx
def weights_import(c: Ctx, atom: str, path: str, activate: bool) -> None:
    """Bring KIRI's trained weights for ATOM in (its JSON weight file; - for stdin) as a new version."""
    import base64
    import json

    from kiri.model.header import WeightsError
    from kiri.model.kiri_weights import MAX_FILE_BYTES, blob_from_kiri

    try:
        with click.open_file(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise click.ClickException(f"{path}: over {MAX_FILE_BYTES >> 20} MiB; a KIRI weight file is a few hundred KiB")
    try:  # Python's own json, as KIRI wrote it: a diverged run's NaN is read, then named by matrix and cell
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.ClickException(f"{path}: not JSON ({e})") from None
    schema = _hub_schema(c, atom)
    try:
        blob = blob_from_kiri(schema, doc, source=os.path.basename(path) if path != "-" else "stdin")
    except WeightsError as e:
        raise click.ClickException(f"{path}: {e}") from None
    res = c.call("import_weights", {"atom": atom, "blob": base64.b64encode(blob).decode(), "activate": activate,
                                    "reason": f"imported from KIRI weight file {path}"})
    w = res["weights"]
    state = "already imported as" if res["already"] else "imported as"
    c.out(res, f"{path}: {state} {w['atom']}:{w['version']} ({w['status']}, {schema.n_params} parameters)")


@main.command()
@click.argument("atom")
@click.option("-n", "count", default=20, show_default=True, type=click.IntRange(1, 1000))
@pass_ctx
def history(c: Ctx, atom: str, count: int) -> None:
    """Recent observations of ATOM: tokens, score, verdict, and per-token blame for anomalies."""
    res = c.call("history", {"atom": atom, "n": count})
    lines = []
    for o in res["observations"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["time"]))
        if o["score"] is None:
            lines.append(f"{o['id']:>8}  {when}  {' '.join(o['tokens'])}   (not scored yet)")
            continue
        word = "ANOMALY" if o["anomalous"] else "ok"
        lines.append(f"{o['id']:>8}  {when}  {' '.join(o['tokens'])}  {o['score']:6.2f}  {word}")
        if o["anomalous"]:
            blame = worst_first(o["blame"])
            lines.append("            blame: " + ", ".join(f"{b['token']} {b['surprise']:.1f}" for b in blame[:4]))
    c.out(res, "\n".join(lines) if lines else f"no observations for {atom}")



# --- schedules -----------------------------------------------------------------------------

def _duration(_ctx: click.Context, _p: click.Parameter, value: str) -> float:
    """An interval: at least a second."""
    return seconds(value, 1.0)


def _delay(_ctx: click.Context, _p: click.Parameter, value: str) -> float:
    """A delay: zero (or ``now``) allowed."""
    return seconds(value, 0.0)


@main.group()
def schedule() -> None:
    """Periodic tasks fired by the hub (e.g. collect pulse every 30 s)."""


@schedule.command("add")
@click.argument("kind")
@click.argument("atom", required=False)
@click.option("--every", required=True, callback=_duration, help="Interval: 30s, 5m, 1h, 1d.")
@click.option("--first-in", default="0s", callback=_delay, help="Delay before the first run [default: now].")
@click.option("-p", "--param", "params", multiple=True, callback=_param, metavar="KEY=VALUE")
@pass_ctx
def schedule_add(c: Ctx, kind: str, atom: str | None, every: float, first_in: float,
                 params: dict[str, Any]) -> None:
    """Run a KIND task (for ATOM) every interval, starting now (or after --first-in)."""
    body: dict[str, Any] = {"kind": kind, "every": every, "params": params, "first_in": first_in}
    if atom:
        body["atom"] = atom
    res = c.call("schedule_add", body)
    c.out(res, f"schedule {res['schedule_id']}: {kind} {atom or ''} every {every:g} s")


@schedule.command("list")
@pass_ctx
def schedule_list(c: Ctx) -> None:
    """Every schedule with its next run."""
    res = c.call("schedules")
    now = time.time()
    rows = [(s["id"], s["kind"], s["atom"], f"{s['every']:g}s", ago(s["next_run"], now), ago(s["last_run"], now),
             s["fired"], s["last_task_id"]) for s in res["schedules"]]
    c.out(res, table(["ID", "KIND", "ATOM", "EVERY", "NEXT", "LAST", "FIRED", "LAST TASK"], rows)
          if rows else "no schedules")


@schedule.command("rm")
@click.argument("schedule_id", type=click.IntRange(1))
@pass_ctx
def schedule_rm(c: Ctx, schedule_id: int) -> None:
    """Remove a schedule."""
    c.out(c.call("schedule_rm", {"schedule_id": schedule_id}), f"schedule {schedule_id} removed")



# --- decisions and feedback ----------------------------------------------------------------


@main.command()
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@pass_ctx
def decisions(c: Ctx, limit: int) -> None:
    """Recent decisions of the nerve, with their inputs, alert outcome and your label."""
    res = c.call("decisions", {"limit": limit})
    now = time.time()
    rows = []
    for d in res["decisions"]:
        inputs = d["inputs"]
        scores = " ".join(f"{a[0].upper()}={inputs[a]:.2f}" for a in NERVE_INPUTS if a in inputs)
        label = f"{d['label']['verdict']}->{d['label']['action']}" if d["label"] else None
        rows.append((d["id"], ago(d["created_at"], now), d["atom"], d["action"], f"{d['probs'][d['action']]:.2f}",
                     scores, d["policy"], d["alert"], label))
    c.out(res, table(["ID", "WHEN", "ATOM", "ACTION", "P", "SCORES", "POLICY", "ALERT", "LABEL"], rows)
          if rows else "no decisions yet")


@main.command()
@click.argument("decision_id", type=click.IntRange(1))
@click.argument("verdict", type=click.Choice(["approve", "dismiss", "ok", "alert", "suppress", "retrain"]))
@pass_ctx
def feedback(c: Ctx, decision_id: int, verdict: str) -> None:
    """Teach the nerve: approve or dismiss a decision, or say which action was right."""
    res = c.call("feedback", {"decision_id": decision_id, "verdict": verdict})
    extra = f"; nerve retraining as task {res['nerve_retrain_task_id']}" if "nerve_retrain_task_id" in res else ""
    c.out(res, f"decision {decision_id}: labelled {res['action']}{extra}")



# --- the whole system ------------------------------------------------------------------------


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the database and logs live [default: $KIRI_DATA_DIR or ~/.local/share/kiri].")
@click.option("--port", default=7746, show_default=True, type=click.IntRange(1, 65535))
@click.option("--http-port", default=7745, show_default=True, type=click.IntRange(1, 65535),
              help="Port of the dashboard and JSON API.")
@click.option("--days", default=7.0, show_default=True, type=click.FloatRange(1, 90),
              help="Days of synthetic history to seed on the first run.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31))
@click.option("--no-collect", is_flag=True, help="Do not schedule collection of this machine.")
@click.option("--once", is_flag=True, help="Set everything up, print one status line, stop (for scripts).")
def demo(data_dir: Path | None, port: int, http_port: int, days: float, seed: int, no_collect: bool,
         once: bool) -> None:
    """Run the whole watch loop here: hub, trainer, collector and scorer, with data."""
    from kiri import demo as runner

    try:
        code = runner.run(data_dir or runner.default_dir(), port, days, seed, not no_collect, once, click.echo,
                          http_port=http_port)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)


def _learning(s: dict[str, Any]) -> str:
    """How far a learning stream is: its readings so far against what ends the period."""
    return "learning (training)" if s["training"] else f"learning {s['have']}/{s['need']}"


@main.command()
@pass_ctx
def status(c: Ctx) -> None:
    """Every atom's latest observation, score and verdict, its weights, and every agent."""
    pic = c.call("status")  # the hub builds the whole picture in one read
    now = pic["time"]
    rows = []
    for atom in pic["atoms"]:
        w = atom["weights"]
        version = f"v{w['version']}" if w else "-"
        # one row per stream (the atom's latest reading from each host)
        streams = atom.get("hosts") or ([atom["latest"] | {"learning": atom.get("learning")}]
                                        if atom["latest"] is not None else [])
        if not streams:
            rows.append((atom["name"], "-", "-", "no observations", "-", "-", version))
        for h in streams:
            score = f"{h['score']:.2f}" if h["score"] is not None else "-"
            learning = h.get("learning")
            word = (_learning(learning) if learning
                    else "-" if h["score"] is None else "ANOMALY" if h["anomalous"] else "ok")
            rows.append((atom["name"], h["host"] or "-", ago(h["time"], now), " ".join(h["tokens"]), score, word,
                         version))
    agents = [(a["name"], a["role"], a["health"], ago(a["last_seen"], now)) for a in pic["agents"]]
    text = table(["ATOM", "HOST", "SEEN", "TOKENS", "SCORE", "VERDICT", "WEIGHTS"], rows)
    text += "\n\n" + retention_line(pic.get("retention") or {})
    text += "\n\n" + (table(["AGENT", "ROLE", "HEALTH", "LAST SEEN"], agents) if agents else "no agents yet")
    c.out(pic, text)


def _span(keep: float | None) -> str:
    if keep is None:
        return "forever"
    n, unit = (keep / 86400, "day") if keep >= 86400 else (keep / 3600, "hour")
    return f"{n:g} {unit}{'' if n == 1 else 's'}"


def retention_line(r: dict[str, Any]) -> str:
    """The retention policy in one line, as ``kiri status`` shows it."""
    out = f"retention: finished tasks kept {_span(r.get('finished_tasks_seconds'))}"
    if "raw_seconds" in r:
        versions = r.get("weights_versions")
        out += (f"; raw readings {_span(r['raw_seconds'])} per stream, then 5 min/hourly/daily rollups (forever); "
                f"weights: active lineage + {'all' if versions is None else f'newest {versions}'}")
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
