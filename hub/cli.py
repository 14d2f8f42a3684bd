"""``kiri-hub``: run the hub and manage its schema."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from kiri import config, config_file
from kiri.config import TRAIN_WINDOW
from kiri.hub.core.queue import QueueSettings
from kiri.hub.core.retention import Retention
from kiri.hub.core.transport import Limits
from kiri.hub.server import Hub, HubSettings
from kiri.hub.store import migrate as mig
from kiri.hub.store.db import backend, driver_url, ensure_incremental_vacuum, make_engine, redact
from kiri.hub.store.lock import StoreLock, StoreLocked
from kiri.options import seconds

log = logging.getLogger("kiri.hub")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level.lower() != "debug":
        # Alembic narrates every start at INFO; the hub's own line says where it is.
        logging.getLogger("alembic").setLevel(logging.WARNING)


def resolve_db(db: str | None, data_dir: Path | None) -> str:
    """The database URL: ``--db`` as a SQLAlchemy URL (``dialect://…``) or a plain path to a
    SQLite file (created if missing, in a folder that exists); the data dir's default without it."""
    if not db:
        return config.default_db_url(data_dir)
    if "://" not in db:
        path = Path(db).expanduser().absolute()
        if path.is_dir():
            raise click.BadParameter(f"{db} is a folder; give the database file's path", param_hint="--db")
        if not path.parent.is_dir():
            raise click.BadParameter(f"{db}: folder {path.parent} does not exist", param_hint="--db")
        return f"sqlite:///{path}"
    try:
        url = make_url(db)
    except (ArgumentError, ValueError):
        raise click.BadParameter("not a database URL (dialect://user@host/name) or a file path",
                                 param_hint="--db") from None
    try:
        url = make_url(driver_url(db))
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise click.BadParameter(f"no database driver for {url.drivername!r} (sqlite:///PATH, or "
                                 "postgresql://user@host/name)", param_hint="--db") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        raise click.BadParameter(f"{url.drivername}: the driver is not installed ({e.name}); for PostgreSQL: "
                                 "pip install 'kiri[postgresql]'", param_hint="--db") from None
    return url.render_as_string(hide_password=False)


def _keep(_ctx: click.Context, _p: click.Parameter, value: str) -> float | None:
    """A retention window: a duration of at least a minute, or ``forever`` (None)."""
    return None if value.strip().lower() == "forever" else seconds(value, 60.0, 100 * 366 * 86400)


def _versions(_ctx: click.Context, _p: click.Parameter, value: str) -> int | None:
    """How many weights versions to keep: a count of at least 1, or ``all`` (None)."""
    if value.strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a count of versions or 'all'") from None
    if not 1 <= n <= 1_000_000:
        raise click.BadParameter(f"{n} is out of range: keep between 1 and 1000000 versions, or 'all'")
    return n


db_option = click.option(
    "--db", envvar="KIRI_DB", metavar="URL|PATH",
    help="Database: a SQLAlchemy URL, or the path of a SQLite file [default: kiri.db in the data dir].",
)
data_dir_option = click.option(
    "--data-dir", envvar="KIRI_DATA_DIR", type=click.Path(file_okay=False, path_type=Path),
    help="Where the default SQLite database lives [default: $XDG_DATA_HOME/kiri].",
)
log_option = click.option(
    "--log-level", default="info", show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kiri")
def main() -> None:
    """The kiri hub: owns the database and serves agents over JSON-RPC/TCP."""


@main.command()
@config_file.option("hub")
@db_option
@data_dir_option
@click.option("--host", envvar="KIRI_LISTEN", default=config.DEFAULT_HOST, show_default=True,
              help="Address to listen on (env KIRI_LISTEN); beyond loopback it needs a token.")
@click.option("--port", default=config.DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", envvar="KIRI_TOKEN", help="Shared secret agents must present (env KIRI_TOKEN).")
@click.option("--http-port", default=config.DEFAULT_HTTP_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="Port of the dashboard, JSON API and /metrics (same address as --host; same token).")
@click.option("--no-http", is_flag=True, help="Serve no HTTP at all (TCP protocol only).")
@click.option("--synchronous", default="NORMAL", show_default=True,
              type=click.Choice(["NORMAL", "FULL"], case_sensitive=False),
              help="SQLite durability: NORMAL survives process crashes; FULL also power loss.")
@click.option("--lease-ttl", default=30.0, show_default=True, type=click.FloatRange(0.1, 86400),
              help="Seconds a lease lasts without a heartbeat.")
@click.option("--backoff-base", default=1.0, show_default=True, type=click.FloatRange(0, 86400),
              help="First retry delay after a failure, doubling per failure (jittered).")
@click.option("--backoff-cap", default=300.0, show_default=True, type=click.FloatRange(0, 864000))
@click.option("--max-line", default=16 << 20, show_default=True, type=click.IntRange(1024, 1 << 30),
              help="Longest protocol line accepted, in bytes.")
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Connections the hub holds at once (agents, CLI, and those not yet past hello).")
@click.option("--max-per-address", default=256, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Connections from one peer address at once.")
@click.option("--hello-timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a new connection has to say hello before it is closed.")
@click.option("--wal-limit", default=8.0, show_default=True, type=click.FloatRange(0.1, 1 << 20),
              help="MiB of WAL after which the hub forces a truncating checkpoint.")
@click.option("--tick", default=0.5, show_default=True, type=click.FloatRange(0.01, 60),
              help="Seconds between reaper runs.")
@click.option("--keep-finished-tasks", "keep_tasks", default="7d", show_default=True, callback=_keep,
              help="How long finished tasks (done, dead, cancelled) are kept before retention deletes them "
                   "(their counts are kept); a duration like 12h or 30d, or 'forever'.")
@click.option("--keep-raw", "keep_raw", default="30d", show_default=True, callback=_keep,
              help="How much raw history each stream keeps, back from its newest reading; older readings are "
                   "folded into 5-minute, hourly and daily rollups (kept forever) and deleted. Trainers read "
                   "the last 14 days. A duration, or 'forever'.")
@click.option("--keep-weights", "keep_weights", default="5", show_default=True, callback=_versions,
              help="Newest weights versions kept per atom, besides the active one and its ancestors; 'all' "
                   "keeps every version.")
@click.option("--read-processes", default=None, type=click.IntRange(0, 64),
              show_default="2 on more than two cores, else 0",
              help="Worker processes that serve the dashboard's charts and status pages, so heavy reads never "
                   "hold the hub's loop; 0 serves them from threads of the hub itself (on two cores or fewer "
                   "the queue answers faster that way: a worker is one more process wanting a core).")
@click.option("--vacuum-tasks-after", default=5000, show_default=True, type=click.IntRange(0, 10**9),
              help="PostgreSQL: the hub doing the upkeep vacuums the tasks table once this many of its rows are "
                   "dead (each lease and ack leaves one; autovacuum comes at most once a minute, and leases slow "
                   "down as dead rows pile up); 0 leaves it to autovacuum. Ignored on SQLite.")
@log_option
def serve(db: str | None, data_dir: Path | None, host: str, port: int, token: str | None,
          http_port: int, no_http: bool, synchronous: str, lease_ttl: float, backoff_base: float, backoff_cap: float,
          max_line: int, max_connections: int, max_per_address: int, hello_timeout: float,
          wal_limit: float, tick: float, keep_tasks: float | None, keep_raw: float | None,
          keep_weights: int | None, read_processes: int | None, vacuum_tasks_after: int, log_level: str) -> None:
    """Run the hub until SIGTERM/SIGINT."""
    setup_logging(log_level)
    if not config.is_loopback(host) and not token:
        raise click.UsageError(
            f"refusing to listen on {host} without a token: anyone who can reach it could "
            "run tasks. Pass --token (or set KIRI_TOKEN), or listen on 127.0.0.1."
        )
    url = resolve_db(db, data_dir)
    if keep_raw is not None and keep_raw < TRAIN_WINDOW:
        log.warning("--keep-raw %s is shorter than the trainers' default window (%g days): they will train on "
                    "what is kept", keep_raw, TRAIN_WINDOW / 86400)
    settings = HubSettings(
        db_url=url, host=host, port=port, token=token or None, tick=tick,
        limits=Limits(max_line=max_line, max_connections=max_connections, max_per_address=max_per_address,
                      hello_timeout=hello_timeout),
        wal_max_bytes=int(wal_limit * (1 << 20)), http_port=None if no_http else http_port,
        queue=QueueSettings(lease_ttl=lease_ttl, backoff_base=backoff_base, backoff_cap=backoff_cap),
        retention=Retention(finished_tasks=keep_tasks, raw=keep_raw, weights=keep_weights),
        read_processes=read_processes, vacuum_tasks_after=vacuum_tasks_after,
    )
    lock = _lock(url)
    try:
        engine = make_engine(url, synchronous=synchronous.upper())  # type: ignore[arg-type]
        mig.upgrade(engine)
        ensure_incremental_vacuum(engine)
    except Exception as e:
        raise click.ClickException(f"cannot open database {redact(url)}: {e}") from e
    try:
        _run(settings, engine, lock)
    finally:
        lock.release()


def _lock(url: str) -> StoreLock:
    """This process's claim on a SQLite database, or a clear refusal naming the holder."""
    lock = StoreLock.for_url(url)
    try:
        lock.acquire()
    except StoreLocked as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot lock database {redact(url)}: {e}") from e
    return lock


def _run(settings: HubSettings, engine, lock: StoreLock) -> None:  # type: ignore[no-untyped-def]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - non-POSIX platforms
        runner = asyncio.run

    async def amain() -> None:
        # SIGTERM and SIGINT mean "stop cleanly" from the first moment: the hub accepts
        # connections before its start-up has finished (the read workers warm up, the
        # PostgreSQL listener connects), and a stop sent meanwhile must not kill it outright
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        hub = Hub(settings, engine)
        try:
            await hub.start()
        except OSError as e:
            await hub.stop()
            where = f"{settings.host}:{settings.port}"
            if settings.http_port is not None:
                where += f" (TCP) or port {settings.http_port} (HTTP; --http-port, --no-http)"
            raise click.ClickException(f"cannot listen on {where}: {e.strerror or e}") from e
        log.info("kiri hub listening on %s:%d (db %s)", settings.host, hub.bound_port,
                 redact(settings.db_url))
        lock.describe(f"{settings.host}:{hub.bound_port}")
        # What start-up built (modules, the method table, caches) lives as long as the hub:
        # freezing it keeps every later garbage collection from walking it again, which a
        # bulk import's thousands of short-lived rows would otherwise make it do over and over.
        gc.freeze()
        await stop.wait()
        log.info("shutting down")
        await hub.stop()

    runner(amain())


@main.command()
@db_option
@data_dir_option
@click.option("--revision", default="head", show_default=True, help="Target revision ('base' to empty).")
@log_option
def migrate(db: str | None, data_dir: Path | None, revision: str, log_level: str) -> None:
    """Upgrade (or downgrade) the database schema."""
    setup_logging(log_level)
    url = resolve_db(db, data_dir)
    lock = _lock(url)  # never change the schema under a running hub
    engine = make_engine(url)
    current = mig.current_revision(engine)
    try:
        if revision == "base" or (current and revision != "head" and revision < current):
            mig.downgrade(engine, revision)
        else:
            mig.upgrade(engine, revision)
    except Exception as e:
        raise click.ClickException(f"migration to {revision} failed: {e}") from e
    finally:
        lock.release()
    click.echo(f"{redact(url)}: {current or 'empty'} -> {mig.current_revision(engine) or 'empty'}")


@main.command("migrate-store")
@click.option("--from", "source", required=True, metavar="DB",
              help="The store to copy: a SQLite file's path or a database URL (at the schema's head).")
@click.option("--to", "target", required=True, metavar="DB",
              help="An empty database to copy it into, e.g. postgresql://user@host/kiri.")
@log_option
def migrate_store(source: str, target: str, log_level: str) -> None:
    """Copy a whole store into another database (SQLite to PostgreSQL), ids and blobs kept, then
    verify every table by row count and digest. The source is only read; no hub may run on it."""
    from kiri.hub.store.move import MoveError, move

    setup_logging(log_level)
    src, dst = resolve_db(source, None), resolve_db(target, None)
    if make_url(src) == make_url(dst):
        raise click.BadParameter("--from and --to are the same database", param_hint="--to")
    lock = _lock(src)  # a SQLite source: no hub writes to it while it is copied
    try:
        shown: dict[str, int] = {}

        def progress(table: str, rows: int) -> None:
            if rows - shown.get(table, 0) >= 100_000:
                shown[table] = rows
                click.echo(f"  {table}: {rows:,} rows so far", err=True)

        try:
            reports = move(make_engine(src), make_engine(dst), progress)
        except MoveError as e:
            raise click.ClickException(str(e)) from None
    finally:
        lock.release()
    for r in reports:
        click.echo(f"{r.table:20s} {r.rows:>12,} rows  sha256 {r.digest[:16]}")
    click.echo(f"{redact(src)} -> {redact(dst)}: {sum(r.rows for r in reports):,} rows in {len(reports)} tables, "
               "every table verified; point the hubs at the new store with --db")


@main.command()
@db_option
@data_dir_option
def check(db: str | None, data_dir: Path | None) -> None:
    """Exit 0 when the schema is at head and matches the code; 1 otherwise."""
    url = resolve_db(db, data_dir)
    engine = make_engine(url)
    current, head = mig.current_revision(engine), mig.head_revision()
    if current != head:
        click.echo(f"{redact(url)} ({backend(engine)}): at {current or 'empty'}, head is {head}; "
                   "run `kiri-hub migrate`")
        sys.exit(1)
    diffs = mig.drift(engine)
    if diffs:
        click.echo(f"{redact(url)}: schema differs from the code:")
        for d in diffs:
            click.echo(f"  {d}")
        sys.exit(1)
    click.echo(f"{redact(url)} ({backend(engine)}): at head {head}, no drift")


if __name__ == "__main__":  # pragma: no cover
    main()
