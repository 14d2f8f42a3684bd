"""Reading observations from the command line and from JSONL/CSV files, with line-exact errors.

Validation happens here, before anything is sent, with the same schema code the hub uses;
the hub validates again (it never trusts a client), but this way a user sees every bad line
of a file at once instead of one refusal per upload.
"""

from __future__ import annotations

import csv
import io
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO

import numpy as np
import orjson

from kiri.model.schema import CLOCK_FIELDS, AtomSchema, Field, ObservationError

SPECIAL = ("time", "ts", "host", "label")
# KIRI wrote each line's clock as letters even where the atom has no such field (its pulse
# lines carry H, the hour): derived from the line's time, they are dropped where the atom
# has no field of that letter
KIRI_CLOCK = ("H", "W")
FORMATS = ("jsonl", "csv")


class ImportFileError(ValueError):
    """The file as a whole cannot be read (missing, not UTF-8, not JSONL/CSV)."""


@dataclass
class Bad:
    line: int
    message: str


_CLOCKS: dict[int, tuple[AtomSchema, tuple[Field, ...]]] = {}


def _clock(schema: AtomSchema) -> tuple[Field, ...]:
    """The schema's hour and weekday fields (kept by identity: hashing a schema costs more
    than the lookup saves)."""
    hit = _CLOCKS.get(id(schema))
    if hit is None or hit[0] is not schema:
        hit = _CLOCKS[id(schema)] = (schema, tuple(f for f in schema.fields if f.name in CLOCK_FIELDS))
    return hit[1]


def clock_fields(schema: AtomSchema, values: dict[str, Any], t: float) -> dict[str, Any]:
    """Fill an atom's ``hour``/``weekday`` fields from the observation's local time when absent."""
    clock = _clock(schema)
    if not clock:
        return values
    lt = time.localtime(t)
    out = dict(values)
    for f in clock:
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


def _jsonl(stream: BinaryIO, name: str) -> Iterator[tuple[int, Any]]:
    for n, raw in enumerate(stream, start=1):
        try:
            yield n, orjson.loads(raw)  # checks UTF-8 itself: no decode of the good lines
            continue
        except orjson.JSONDecodeError as e:
            error = e
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ImportFileError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start} of line {n})") from None
        if line.strip():
            yield n, ValueError(f"not valid JSON ({error})")


def _csv(stream: BinaryIO, name: str) -> Iterator[tuple[int, Any]]:
    text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
    try:
        reader = csv.DictReader(text)
        if not reader.fieldnames:
            raise ImportFileError(f"{name}: empty CSV (the first line must name the fields)")
        for row in reader:
            if None in row:
                yield reader.line_num, ValueError("more values than header fields")
            else:
                yield reader.line_num, {k: v for k, v in row.items() if v is not None and v != ""}
    except UnicodeDecodeError as e:
        raise ImportFileError(f"{name}: not UTF-8 text ({e.reason})") from None
    finally:
        text.detach()


def records(stream: BinaryIO, name: str, fmt: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or the error reading it) for each line of a JSONL or CSV
    stream, read as it goes: memory stays flat whatever the file's size."""
    if fmt not in FORMATS:
        raise ImportFileError(f"{name}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return _csv(stream, name) if fmt == "csv" else _jsonl(stream, name)


def format_of(path: str) -> str:
    """A file's format from its extension: CSV for .csv, else JSON lines (stdin too)."""
    return "csv" if path.lower().endswith(".csv") else "jsonl"


def parse_time(raw: Any) -> float:
    """Epoch seconds from a number, or from an ISO 8601 string as KIRI wrote (``ts``:
    ``2026-02-14T14:05:00``, local time unless it names its offset)."""
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            pass
        try:
            t = datetime.fromisoformat(raw.strip()).timestamp()
        except (ValueError, OverflowError, OSError):
            shown = repr(raw) if len(raw) <= 40 else repr(raw[:40]) + "..."
            raise ValueError(f"time {shown} is neither epoch seconds nor an ISO 8601 date and time") from None
    elif isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"time {raw!r} is not a number (epoch seconds) or an ISO 8601 string")
    else:
        t = float(raw)
    if not 0 <= t <= 1e11:
        raise ValueError(f"time {raw!r} is out of range")
    return t


def to_observation(schema: AtomSchema, rec: dict[str, Any], default_time: float) -> dict[str, Any]:
    if "time" in rec and "ts" in rec:
        raise ValueError("give the time once: 'time' or KIRI's 'ts', not both")
    t = parse_time(rec["time"] if "time" in rec else rec.get("ts", default_time))
    values = {k: v for k, v in rec.items() if k not in SPECIAL}
    for letter in KIRI_CLOCK:
        if letter in values and schema.field_by_key(letter) is None:
            del values[letter]
    checked = schema.values(clock_fields(schema, values, t))
    obs: dict[str, Any] = {"time": t, "values": dict(zip(schema.names, checked, strict=True))}
    if rec.get("host") is not None:
        obs["host"] = str(rec["host"])[:200]
    return obs


def as_columns(schema: AtomSchema, chunk: list[dict[str, Any]]) -> dict[str, Any]:
    """Checked observations (``to_observation``'s, values in schema order) as ``observe``'s
    columns: the hub checks a chunk as a few typed lists instead of a model per row."""
    out: dict[str, Any] = {"fields": list(schema.names), "values": [list(o["values"].values()) for o in chunk],
                           "time": [o["time"] for o in chunk]}
    hosts = [o.get("host") for o in chunk]
    if any(h is not None for h in hosts):
        out["host"] = hosts
    return out


@dataclass
class Chunk:
    """Up to a chunk's worth of a file's lines: the good ones as ``observe``'s columns (None
    when there are none) and the bad ones named."""

    columns: dict[str, Any] | None
    n: int
    bad: list[Bad]


def chunks(schema: AtomSchema, stream: BinaryIO, name: str, fmt: str, default_time: float,
           size: int) -> Iterator[Chunk]:
    """A file's observations ``size`` lines at a time, read as it goes (memory stays flat).

    A chunk in the common shape (every line the same keys, plain numbers, a numeric time) is
    checked as a whole (``_checked_whole``): a year of readings is a million lines, and the
    line-by-line check cost more than the hub's storing them. Any other chunk is checked line
    by line, which names each bad line and its reason."""
    block: list[tuple[int, Any]] = []
    for item in records(stream, name, fmt):
        block.append(item)
        if len(block) >= size:
            yield _chunk(schema, block, default_time)
            block = []
    if block:
        yield _chunk(schema, block, default_time)


def _chunk(schema: AtomSchema, block: list[tuple[int, Any]], default_time: float) -> Chunk:
    whole = _checked_whole(schema, [rec for _, rec in block], default_time)
    if whole is not None:
        return Chunk(whole, len(block), [])
    good: list[dict[str, Any]] = []
    bad: list[Bad] = []
    for n, rec in block:
        if isinstance(rec, Exception):
            bad.append(Bad(n, str(rec)))
        elif not isinstance(rec, dict):
            bad.append(Bad(n, "expected a JSON object of field: value"))
        else:
            try:
                good.append(to_observation(schema, rec, default_time))
            except (ObservationError, ValueError) as e:
                bad.append(Bad(n, str(e)))
    return Chunk(as_columns(schema, good) if good else None, len(good), bad)


def _checked_whole(schema: AtomSchema, recs: list[Any], default_time: float) -> dict[str, Any] | None:
    """``as_columns`` of ``to_observation`` of every record, computed column by column, or
    None when a record is not in the common shape or not valid (the caller then checks line
    by line, which accepts the rest and names what is wrong). Agrees with the per-line path
    on every chunk it accepts (``tests/test_observe.py`` compares the two)."""
    first = recs[0]
    if type(first) is not dict:
        return None
    keys = tuple(first)
    if any(type(r) is not dict or tuple(r) != keys for r in recs):
        return None
    if "time" in keys and "ts" in keys:
        return None
    tkey = "time" if "time" in keys else "ts" if "ts" in keys else None
    given: dict[int, str] = {}  # field's place in the schema -> its key in the records
    for k in keys:
        if k in SPECIAL:
            continue
        f = schema.field_by_key(k)
        if f is None:
            if k in KIRI_CLOCK:
                continue  # KIRI's clock letters, dropped where the atom has no such field
            return None
        at = schema.fields.index(f)
        if at in given:
            return None
        given[at] = k
    clock = _clock(schema)
    missing = [f for at, f in enumerate(schema.fields) if at not in given]
    if any(f not in clock for f in missing):
        return None
    fields = [given[at] for at in sorted(given)]  # the records' keys, in schema order
    if tkey is None:
        times = [default_time] * len(recs)
    else:
        times = [r[tkey] for r in recs]
        if any(type(t) is not float and type(t) is not int for t in times):
            return None
        times = [float(t) for t in times]
        if not all(0 <= t <= 1e11 for t in times):
            return None
    raw = [r[k] for r in recs for k in fields]
    if any(type(v) is not float and type(v) is not int for v in raw):
        return None
    try:
        values = np.array(raw, dtype=np.float64).reshape(len(recs), len(fields))
    except OverflowError:
        return None
    if not np.isfinite(values).all():
        return None
    rows = values.tolist()
    if missing:  # the hour and weekday, from each reading's local time (as clock_fields)
        rows = [_with_clock(schema, dict(zip(fields, row, strict=True)), t) for row, t in zip(rows, times, strict=True)]
    out: dict[str, Any] = {"fields": list(schema.names), "values": rows, "time": times}
    if "host" in keys:
        hosts = [r["host"] for r in recs]
        if any(h is not None for h in hosts):
            if not all(h is None or (type(h) is str and len(h) <= 200) for h in hosts):
                return None
            out["host"] = hosts
    return out


def _with_clock(schema: AtomSchema, values: dict[str, float], t: float) -> list[float]:
    filled = clock_fields(schema, values, t)
    return [float(filled[f.name] if f.name in filled else filled[f.letter]) for f in schema.fields]


class Pipelined:
    """Runs ``send`` on chunks in a background thread while the caller reads the next ones.

    Reading and checking a chunk (Python) and the hub storing the previous one (a round
    trip, during which the socket wait releases the GIL) overlap, so an import runs at the
    slower of the two, not their sum. At most ``depth`` chunks wait, so memory stays flat.
    The first error ``send`` raises stops the thread and is raised again by the next
    ``put`` or by ``close``.
    """

    def __init__(self, send: Callable[[dict[str, Any]], None], depth: int = 2) -> None:
        self._send = send
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kiri-upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._send(chunk)
                except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
                    self._error = e

    def put(self, chunk: dict[str, Any]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        """Wait for every chunk to be sent; raise what sending raised."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
