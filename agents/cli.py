"""``kiri-agent``: run one agent process for a role."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from kiri import config, config_file
from kiri.agents import custom, roles
from kiri.agents.alerts import AlertConfig
from kiri.agents.client import HubClient
from kiri.agents.roles import ROLE_KINDS
from kiri.agents.runner import Agent
from kiri.options import finite


def _kinds(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    if not kinds:
        raise click.BadParameter("give at least one task kind, e.g. --kinds echo,sleep")
    return kinds


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_file.option("agent", "alerts")
@click.option("--role", required=True, type=click.Choice(sorted(ROLE_KINDS)),
              help="What this agent does; picks the task kinds it serves.")
@click.option("--kinds", callback=_kinds, help="Comma-separated task kinds to serve instead of the role's.")
@click.option("--handler", "handler_specs", multiple=True, metavar="[KIND=]MODULE:FUNCTION",
              help="Serve tasks of KIND (default: the function's name) with your own Python function "
                   "(repeatable; the working directory is importable).")
@click.option("--hub", "hub", envvar="KIRI_HUB", default=None, metavar="HOST:PORT[,HOST:PORT]",
              help=f"Hub address (env KIRI_HUB) [default: 127.0.0.1:{config.DEFAULT_PORT}]; several hubs "
                   "sharing one PostgreSQL as a list: the agent moves to the next when one goes away.")
@click.option("--token", envvar="KIRI_TOKEN", help="Hub token (env KIRI_TOKEN).")
@click.option("--name", help="Agent name shown in stats [default: ROLE-HOST-PID].")
@click.option("--wait", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds one long-poll lease waits for work.")
@click.option("--lease-ttl", type=click.FloatRange(0.1, 86400),
              help="Lease length to ask for [default: the hub's].")
@click.option("--max-tasks", type=click.IntRange(1), help="Exit after this many tasks (tests, batch jobs).")
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path),
              help="Append one JSON line per finished task (ack/fail and the hub's answer) to this file.")
@click.option("--alert-webhook", "webhooks", multiple=True, envvar="KIRI_ALERT_WEBHOOK", metavar="URL",
              help="POST alerts as JSON here (repeatable; env KIRI_ALERT_WEBHOOK).")
@click.option("--alert-command", envvar="KIRI_ALERT_COMMAND", help="Run this with the alert JSON on stdin.")
@click.option("--telegram-token", envvar="KIRI_TELEGRAM_TOKEN", help="Telegram bot token for alerts.")
@click.option("--telegram-chat", envvar=["KIRI_TELEGRAM_CHAT", "KIRI_TELEGRAM_CHAT_ID"],
              help="Telegram chat id for alerts (env KIRI_TELEGRAM_CHAT, or KIRI's KIRI_TELEGRAM_CHAT_ID).")
@click.option("--telegram-url", envvar="KIRI_TELEGRAM_URL", default="https://api.telegram.org", show_default=True)
@click.option("--alert-cooldown", default=600.0, show_default=True, type=click.FloatRange(0, 30 * 86400),
              help="Seconds after an alert for an atom during which its alerts are held back.")
@click.option("--alert-max-age", default=900.0, show_default=True, type=click.FloatRange(0, 365 * 86400),
              help="Observations older than this many seconds (a backlog) are decided on but not alerted.")
@click.option("--alarms-per-week", type=click.FloatRange(0, 10_000, min_open=True), callback=finite,
              help="Scorer: the nerve's alarm budget, how often its rule over all atoms may alert on normal "
                   "data [default: the deciding atom's own budget].")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 256),
              help="torch intra-op threads; parallelism comes from more agents.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(role: str, kinds: list[str] | None, handler_specs: tuple[str, ...], hub: str | None, token: str | None,
         name: str | None,
         wait: float, lease_ttl: float | None, max_tasks: int | None, journal: Path | None,
         webhooks: tuple[str, ...], alert_command: str | None, telegram_token: str | None,
         telegram_chat: str | None, telegram_url: str, alert_cooldown: float, alert_max_age: float,
         alarms_per_week: float | None, threads: int, log_level: str) -> None:
    """Connect to the hub and work tasks for ROLE until SIGTERM/SIGINT."""
    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        address = config.parse_addresses(hub) if hub else config.hub_addresses()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--hub") from None
    sinks = AlertConfig(
        webhooks=[w for item in webhooks for w in item.split() if w], command=alert_command,
        telegram_token=telegram_token, telegram_chat=telegram_chat, telegram_url=telegram_url,
        cooldown=alert_cooldown, max_age=alert_max_age, alarms_per_week=alarms_per_week)
    try:
        sinks.check()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        own = custom.load(handler_specs)
    except custom.HandlerError as e:
        raise click.UsageError(str(e)) from None
    serve = kinds or [*ROLE_KINDS[role], *(k for k in own if k not in ROLE_KINDS[role])]
    client = HubClient(address, token=token, agent=name, role=role, kinds=serve, reconnect_for=None)
    try:
        agent = Agent(client, {**roles.handlers(sinks), **own}, serve, wait=wait, ttl=lease_ttl,
                      max_tasks=max_tasks, journal=journal)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    agent.install_signal_handlers()
    client.stopping = agent.stopping  # a stop is not held up by a hub that is gone
    roles.warm_up(serve)
    logging.getLogger("kiri.agent").info(
        "agent %s (%s) serving %s via %s", client.agent, role, ",".join(serve),
        ",".join(f"{h}:{p}" for h, p in address))
    agent.run()


if __name__ == "__main__":  # pragma: no cover
    main()
