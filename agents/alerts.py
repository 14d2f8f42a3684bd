"""Alert sinks: log, webhook (HTTP POST of JSON), command (JSON on stdin), Telegram.

Each sink retries with exponential backoff (tenacity). The per-atom cool-down that turns one
incident into one alert is decided by the hub, shared by every scorer; this module only
delivers what the hub said to deliver.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from kiri.model.explain import worst_first

log = logging.getLogger("kiri.alerts")


class SinkError(Exception):
    """A sink could not deliver (after its retries)."""


@dataclass
class AlertConfig:
    webhooks: list[str] = field(default_factory=list)
    command: str | None = None
    telegram_token: str | None = None
    telegram_chat: str | None = None
    telegram_url: str = "https://api.telegram.org"
    cooldown: float = 600.0
    max_age: float = 900.0  # older observations (a backlog) are decided on but never alerted
    # the nerve's alarm budget (alarms a week on normal data) for its rule over all atoms;
    # None: the deciding atom's own budget
    alarms_per_week: float | None = None
    attempts: int = 3
    timeout: float = 5.0

    def check(self) -> None:
        """Refuse a half-configured sink, naming what is missing: one that cannot deliver
        must stop the agent at start, not drop every alert in silence."""
        if self.telegram_token and not self.telegram_chat:
            raise ValueError("Telegram alerts need a chat id too: --telegram-chat "
                             "(env KIRI_TELEGRAM_CHAT or KIRI_TELEGRAM_CHAT_ID)")
        if self.telegram_chat and not self.telegram_token:
            raise ValueError("Telegram alerts need a bot token too: --telegram-token (env KIRI_TELEGRAM_TOKEN)")
        for url in self.webhooks:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"alert webhook {url!r} is not an http:// or https:// URL")


def _retrying(cfg: AlertConfig) -> Retrying:
    return Retrying(retry=retry_if_exception_type((OSError, SinkError)), stop=stop_after_attempt(cfg.attempts),
                    wait=wait_exponential_jitter(multiplier=0.2, max=2.0), reraise=True)


def _post(url: str, body: dict[str, Any], timeout: float) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if resp.status >= 300:
                raise SinkError(f"{url} answered HTTP {resp.status}")
    except urllib.error.HTTPError as e:
        raise SinkError(f"{url} answered HTTP {e.code}") from None


def text_of(alert: dict[str, Any]) -> str:
    blame = ", ".join(f"{b['token']} {b['surprise']:.1f}" for b in worst_first(alert.get("blame", []))[:4])
    where = f" on {alert['host']}" if alert.get("host") else ""
    return (f"kiri alert: {alert['atom']}{where} score {alert['score']:.2f} (threshold {alert['threshold']:.2f})"
            + (f"; blame {blame}" if blame else "") + f"; decision {alert['decision_id']}")


def deliver(alert: dict[str, Any], cfg: AlertConfig) -> dict[str, str]:
    """Send one alert to every configured sink; per-sink outcome ('sent' or the error)."""
    results = {"log": "sent"}
    log.warning("%s", text_of(alert))
    for url in cfg.webhooks:
        try:
            _retrying(cfg)(_post, url, alert, cfg.timeout)
            results[f"webhook {url}"] = "sent"
        except (OSError, SinkError) as e:
            results[f"webhook {url}"] = f"failed: {e}"
    if cfg.command:
        def run() -> None:
            proc = subprocess.run(shlex.split(cfg.command or ""), input=json.dumps(alert), text=True,
                                  capture_output=True, timeout=cfg.timeout * 2, check=False)
            if proc.returncode != 0:
                raise SinkError(f"command exited {proc.returncode}: {proc.stderr.strip()[:200]}")
        try:
            _retrying(cfg)(run)
            results["command"] = "sent"
        except (OSError, SinkError, subprocess.SubprocessError) as e:
            results["command"] = f"failed: {e}"
    if cfg.telegram_token and cfg.telegram_chat:
        url = f"{cfg.telegram_url.rstrip('/')}/bot{cfg.telegram_token}/sendMessage"
        try:
            _retrying(cfg)(_post, url, {"chat_id": cfg.telegram_chat, "text": text_of(alert)}, cfg.timeout)
            results["telegram"] = "sent"
        except (OSError, SinkError) as e:
            results["telegram"] = f"failed: {e}".replace(cfg.telegram_token, "***")
    return results
