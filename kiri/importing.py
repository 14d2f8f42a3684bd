"""Reading observations from the command line and from JSONL/CSV files, with line-exact errors.

Validation happens here, before anything is sent, with the same schema code the hub uses;
the hub validates again (it never trusts a client), but this way a user sees every bad line
of a file at once instead of one refusal per upload.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from kiri.model.schema import AtomSchema, ObservationError

SPECIAL = ("time", "host", "label")


class ImportFileError(ValueError):
    """The file as a whole cannot be read (missing, not UTF-8, not JSONL/CSV)."""


@dataclass
class Bad:
    line: int
    message: str


def clock_fields(schema: AtomSchema, values: dict[str, Any], t: float) -> dict[str, Any]:
    """Fill an atom's ``hour``/``weekday`` fields from the observation's local time when absent."""
    lt = time.localtime(t)
    out = dict(values)
    for f in schema.fields:
        if f.name in out or f.letter in out:
            continue
        if f.name == "hour":
            out["hour"] = lt.tm_hour + lt.tm_min / 60
        elif f.name == "weekday":
            out["weekday"] = lt.tm_wday
    return out


def parse_pairs(items: Sequence[str]) -> dict[str, str]:
    """``--added 3 --completed=1 switched=2`` -> {"added": "3", ...}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            key, sep, value = item[2:].partition("=")
            if not sep:
                if i + 1 >= len(items):
                    raise ValueError(f"{item}: missing a value")
                value = items[i + 1]
                i += 1
        else:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: expected FIELD=VALUE or --FIELD VALUE")
        if not key:
            raise ValueError(f"{item!r}: empty field name")
        if key in out:
            raise ValueError(f"field {key!r} given twice")
        out[key] = value
        i += 1
    return out


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImportFileError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ImportFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise ImportFileError(f"{path}: empty CSV (the first line must name the fields)")
        for row in reader:
            if None in row:
                yield reader.line_num, ValueError("more values than header fields")
            else:
                yield reader.line_num, {k: v for k, v in row.items() if v is not None and v != ""}
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield n, ValueError(f"not valid JSON ({e})")


def read_file(schema: AtomSchema, path: Path, default_time: float) -> tuple[list[dict[str, Any]], list[Bad]]:
    """Observations ready for the protocol, and every bad line with its reason."""
    good: list[dict[str, Any]] = []
    bad: list[Bad] = []
    for n, rec in _records(path):
        if isinstance(rec, Exception):
            bad.append(Bad(n, str(rec)))
            continue
        if not isinstance(rec, dict):
            bad.append(Bad(n, "expected a JSON object of field: value"))
            continue
        try:
            good.append(to_observation(schema, rec, default_time))
        except (ObservationError, ValueError) as e:
            bad.append(Bad(n, str(e)))
    return good, bad


def to_observation(schema: AtomSchema, rec: dict[str, Any], default_time: float) -> dict[str, Any]:
    t = rec.get("time", default_time)
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"time {t!r} is not a number (epoch seconds)") from None
    if not 0 <= t <= 1e11:
        raise ValueError(f"time {t!r} is out of range (epoch seconds)")
    values = clock_fields(schema, {k: v for k, v in rec.items() if k not in SPECIAL}, t)
    schema.encode(values)  # raises ObservationError naming the field
    obs: dict[str, Any] = {"time": t, "values": values}
    if rec.get("host") is not None:
        obs["host"] = str(rec["host"])[:200]
    return obs
