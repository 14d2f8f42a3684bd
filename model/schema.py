"""The state language: how an observation becomes tokens (CPU 52% -> ``C5``).

A field has a token letter, a name, a range and a bucket count; a value maps to
``floor((v - low) / (high - low) * buckets)`` clamped into ``[0, buckets - 1]``, so values
outside the range land in the edge bucket (they are often the anomaly). Anything that is not
a finite number is refused with an error naming the field: silently dropping or bucketing it
would hide exactly the readings that matter.
"""

from __future__ import annotations

import functools
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOS = "<BOS>"
# Fields named so are the observation's clock, filled from its time when absent
# (``kiri.importing.clock_fields``). The model reads them (activity at 3am is odd because
# of the hour) but is never surprised by them: the time itself is not an anomaly.
CLOCK_FIELDS = ("hour", "weekday")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
LETTER_RE = re.compile(r"^[A-Z]$")


class SchemaError(ValueError):
    """An atom definition is invalid."""


class ObservationError(ValueError):
    """An observation does not fit its atom's schema; ``field`` names the culprit."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Field:
    letter: str
    name: str
    low: float
    high: float
    buckets: int

    def bucket(self, value: float) -> int:
        b = math.floor((value - self.low) / (self.high - self.low) * self.buckets)
        return min(self.buckets - 1, max(0, b))

    def tokens(self) -> list[str]:
        return [f"{self.letter}{i}" for i in range(self.buckets)]


@dataclass(frozen=True)
class ModelSize:
    n_embd: int = 32
    n_head: int = 4
    n_layer: int = 2
    block_size: int = 16


@dataclass(frozen=True)
class AtomSchema:
    name: str
    fields: tuple[Field, ...]
    actions: tuple[str, ...] = ()
    size: ModelSize = field(default_factory=ModelSize)
    description: str = ""

    def __post_init__(self) -> None:
        validate(self)

    # --- vocabulary --------------------------------------------------------------------

    @property
    def vocab(self) -> list[str]:
        out = [BOS]
        for f in self.fields:
            out += f.tokens()
        return out + list(self.actions)

    @property
    def vocab_size(self) -> int:
        return 1 + sum(f.buckets for f in self.fields) + len(self.actions)

    @property
    def width(self) -> int:
        """Tokens per observation."""
        return len(self.fields)

    def offsets(self) -> list[int]:
        """Token id of bucket 0 of each field."""
        out, at = [], 1
        for f in self.fields:
            out.append(at)
            at += f.buckets
        return out

    def action_ids(self) -> list[int]:
        start = 1 + sum(f.buckets for f in self.fields)
        return list(range(start, start + len(self.actions)))

    @property
    def n_params(self) -> int:
        """The atom model's parameter count, from the schema alone (no torch): token and
        position embeddings, each block's four matrices (q/k/v, projection, two MLP layers;
        no biases, RMSNorm unweighted), the output head. ``Atom.n_params`` counts the same."""
        d, z = self.size.n_embd, self.size
        return 2 * self.vocab_size * d + z.block_size * d + 12 * d * d * z.n_layer

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The atom model's tensors by state-dict name, with their shapes (no torch): what a
        weights blob for this schema must hold, checked by the hub from the blob's header."""
        d, z, v = self.size.n_embd, self.size, self.vocab_size
        out: dict[str, tuple[int, ...]] = {"wte.weight": (v, d), "wpe.weight": (z.block_size, d)}
        for i in range(z.n_layer):
            out |= {f"blocks.{i}.qkv.weight": (3 * d, d), f"blocks.{i}.proj.weight": (d, d),
                    f"blocks.{i}.fc1.weight": (4 * d, d), f"blocks.{i}.fc2.weight": (d, 4 * d)}
        out["lm_head.weight"] = (v, d)
        return out

    @functools.cached_property
    def judged(self) -> tuple[int, ...]:
        """Indices of the fields an observation is judged on: all but the clock fields
        (``CLOCK_FIELDS``), or all of them if nothing else is left."""
        out = tuple(i for i, f in enumerate(self.fields) if f.name not in CLOCK_FIELDS)
        return out or tuple(range(len(self.fields)))

    def max_context(self) -> int:
        """Most whole previous observations that fit the block with BOS and the target."""
        return max(0, (self.size.block_size + 1 - 1 - self.width) // self.width)

    # --- observations ------------------------------------------------------------------

    def field_by_key(self, key: str) -> Field | None:
        for f in self.fields:
            if key in (f.name, f.letter):
                return f
        return None

    @functools.cached_property
    def _keys(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields) | frozenset(f.letter for f in self.fields)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """Field names in schema order."""
        return tuple(f.name for f in self.fields)

    def values(self, obs: Mapping[str, Any]) -> list[float]:
        """One observation's values in schema order, checked once: every field present
        (by name or letter), nothing unknown, every value a finite number."""
        if type(obs) is dict and len(obs) == len(self.fields):
            # the common shape, decided in a few C-level steps: exactly the field names,
            # every value a finite float (x - x is 0.0 only for finite x)
            try:
                raw = [obs[n] for n in self.names]
            except KeyError:
                raw = None
            if raw is not None and all(type(v) is float and v - v == 0.0 for v in raw):
                return raw
        if not isinstance(obs, Mapping):
            raise ObservationError(f"{self.name}: an observation must be a mapping of field to value")
        known = self._keys
        unknown = [k for k in obs if k not in known]
        if unknown:
            raise ObservationError(
                f"{self.name}: unknown field {unknown[0]!r}; fields are "
                + ", ".join(f"{f.name} ({f.letter})" for f in self.fields),
                unknown[0],
            )
        out = []
        for f in self.fields:
            if f.name in obs:
                raw = obs[f.name]
            elif f.letter in obs:
                raw = obs[f.letter]
            else:
                raise ObservationError(f"{self.name}: missing field {f.name!r} ({f.letter})", f.name)
            out.append(self.check_value(f, raw))
        return out

    def encode(self, obs: Mapping[str, Any]) -> list[int]:
        """Token ids of one observation (fields keyed by name or letter), in schema order."""
        return self.encode_values(self.values(obs))

    def stored_tokens(self, values: Mapping[str, float]) -> list[str]:
        """Display tokens of values the hub stored (checked when they arrived), by field name."""
        return self.tokens(self.encode_values([values[f.name] for f in self.fields]))

    def encode_values(self, values: Sequence[float]) -> list[int]:
        """Token ids of values already checked by ``values``, in schema order."""
        return [off + f.bucket(v) for f, off, v in zip(self.fields, self.offsets(), values, strict=True)]

    @staticmethod
    def check_value(f: Field, raw: Any) -> float:
        if type(raw) is float:  # the common case, decided in one step (a bulk import checks millions)
            if raw - raw == 0.0:  # finite: inf - inf and nan - nan are nan
                return raw
            raise ObservationError(f"field {f.name!r}: {raw!r} is not a finite number", f.name)
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            if isinstance(raw, str):
                try:
                    raw = float(raw.strip())
                except ValueError:
                    shown = repr(raw) if len(raw) <= 40 else repr(raw[:40]) + "..."
                    raise ObservationError(f"field {f.name!r}: {shown} is not a number", f.name) from None
            else:  # named by type: a hostile value may be huge or nested a thousand deep
                what = "null" if raw is None else repr(raw) if isinstance(raw, bool) else f"a {type(raw).__name__}"
                raise ObservationError(f"field {f.name!r}: {what} is not a number", f.name)
        value = float(raw)
        if not math.isfinite(value):
            raise ObservationError(f"field {f.name!r}: {raw!r} is not a finite number", f.name)
        return value

    def tokens(self, ids: Sequence[int]) -> list[str]:
        v = self.vocab
        return [v[i] for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "fields": [
                {"letter": f.letter, "name": f.name, "low": f.low, "high": f.high, "buckets": f.buckets}
                for f in self.fields
            ],
            "actions": list(self.actions),
            "model": {"n_embd": self.size.n_embd, "n_head": self.size.n_head,
                      "n_layer": self.size.n_layer, "block_size": self.size.block_size},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "atom") -> AtomSchema:
        return _from_dict(d, where)


def resolve_context(schema: AtomSchema, context: int | None) -> int:
    """Previous observations a window holds: ``context``, or as many as fit when None."""
    fit = schema.max_context()
    if context is None:
        return fit
    if not 0 <= context <= fit:
        raise ValueError(
            f"context {context} does not fit atom {schema.name!r}: block {schema.size.block_size} holds "
            f"at most {fit} previous observation(s) of {schema.width} tokens"
        )
    return context


def validate(s: AtomSchema) -> None:
    if not NAME_RE.match(s.name):
        raise SchemaError(f"atom name {s.name!r}: use lowercase letters, digits and _ (max 32), starting with a letter")
    if not s.fields:
        raise SchemaError(f"atom {s.name!r}: needs at least one field")
    letters: set[str] = set()
    names: set[str] = set()
    for i, f in enumerate(s.fields):
        where = f"atom {s.name!r} field {i + 1}"
        if not LETTER_RE.match(f.letter):
            raise SchemaError(f"{where}: letter {f.letter!r} must be one capital letter A-Z")
        if f.letter in letters:
            raise SchemaError(f"{where}: letter {f.letter!r} is used twice")
        if not NAME_RE.match(f.name):
            raise SchemaError(f"{where}: name {f.name!r} must be lowercase letters, digits and _")
        if f.name in names:
            raise SchemaError(f"{where}: name {f.name!r} is used twice")
        letters.add(f.letter)
        names.add(f.name)
        for bound in (f.low, f.high):
            if isinstance(bound, bool) or not isinstance(bound, int | float) or not math.isfinite(bound):
                raise SchemaError(f"{where} ({f.name}): low and high must be finite numbers")
        if not f.low < f.high:
            raise SchemaError(f"{where} ({f.name}): low ({f.low}) must be below high ({f.high})")
        if isinstance(f.buckets, bool) or not isinstance(f.buckets, int) or not 2 <= f.buckets <= 100:
            raise SchemaError(f"{where} ({f.name}): buckets must be an integer from 2 to 100")
    for a in s.actions:
        if not NAME_RE.match(a):
            raise SchemaError(f"atom {s.name!r}: action {a!r} must be lowercase letters, digits and _")
    if len(set(s.actions)) != len(s.actions):
        raise SchemaError(f"atom {s.name!r}: actions must be distinct")
    z = s.size
    for key, value, lo, hi in (("n_embd", z.n_embd, 4, 1024), ("n_head", z.n_head, 1, 64),
                               ("n_layer", z.n_layer, 1, 24), ("block_size", z.block_size, 2, 1024)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise SchemaError(f"atom {s.name!r}: model {key} must be an integer from {lo} to {hi}")
    if z.n_embd % z.n_head:
        raise SchemaError(f"atom {s.name!r}: n_embd ({z.n_embd}) must be divisible by n_head ({z.n_head})")
    need = 1 + s.width + (1 if s.actions else 0)
    if z.block_size + 1 < need:
        raise SchemaError(
            f"atom {s.name!r}: block_size {z.block_size} is too small for {s.width} fields; need >= {need - 1}"
        )


def _from_dict(d: Mapping[str, Any], where: str) -> AtomSchema:
    if not isinstance(d, Mapping):
        raise SchemaError(f"{where}: expected a table")
    allowed = {"name", "description", "fields", "actions", "model"}
    extra = set(d) - allowed
    if extra:
        raise SchemaError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")
    name = d.get("name")
    if not isinstance(name, str):
        raise SchemaError(f"{where}: 'name' is required and must be a string")
    raw_fields = d.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise SchemaError(f"{where} {name!r}: 'fields' must be a non-empty list of tables")
    fields = []
    for i, rf in enumerate(raw_fields):
        fw = f"{where} {name!r} field {i + 1}"
        if not isinstance(rf, Mapping):
            raise SchemaError(f"{fw}: expected a table with letter, name, low, high, buckets")
        missing = [k for k in ("letter", "name", "low", "high", "buckets") if k not in rf]
        if missing:
            raise SchemaError(f"{fw}: missing {', '.join(missing)}")
        extra = set(rf) - {"letter", "name", "low", "high", "buckets"}
        if extra:
            raise SchemaError(f"{fw}: unknown key(s) {', '.join(sorted(extra))}")
        if not isinstance(rf["letter"], str) or not isinstance(rf["name"], str):
            raise SchemaError(f"{fw}: letter and name must be strings")
        fields.append(Field(rf["letter"], rf["name"], rf["low"], rf["high"], rf["buckets"]))
    actions = d.get("actions", [])
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        raise SchemaError(f"{where} {name!r}: 'actions' must be a list of strings")
    model = d.get("model", {})
    if not isinstance(model, Mapping):
        raise SchemaError(f"{where} {name!r}: 'model' must be a table")
    extra = set(model) - {"n_embd", "n_head", "n_layer", "block_size"}
    if extra:
        raise SchemaError(f"{where} {name!r}: unknown model key(s) {', '.join(sorted(extra))}")
    size = ModelSize(**{k: model[k] for k in model})
    desc = d.get("description", "")
    if not isinstance(desc, str):
        raise SchemaError(f"{where} {name!r}: 'description' must be a string")
    return AtomSchema(name=name, fields=tuple(fields), actions=tuple(actions), size=size, description=desc)


def load_toml(path: str | Path) -> list[AtomSchema]:
    """Atoms defined in a TOML file, as ``[[atom]]`` tables (or one atom at the top level)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{p}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"{p}: not valid TOML: {e}") from None
    tables = data.get("atom", [data])
    if not isinstance(tables, list):
        raise SchemaError(f"{p}: 'atom' must be an array of tables ([[atom]])")
    out = [AtomSchema.from_dict(t, f"{p}: atom {i + 1}") for i, t in enumerate(tables)]
    names = [a.name for a in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SchemaError(f"{p}: atom {sorted(dup)[0]!r} is defined twice")
    return out


def _f(letter: str, name: str, low: float, high: float, buckets: int) -> Field:
    return Field(letter, name, low, high, buckets)


PULSE = AtomSchema("pulse", (
    _f("C", "cpu", 0, 100, 10), _f("M", "mem", 0, 100, 10), _f("D", "disk", 0, 100, 10),
    _f("S", "swap", 0, 100, 5), _f("L", "load", 0, 20, 5), _f("N", "net", 0, 1, 2),
), description="machine vitals: CPU, memory, disk, swap %, 1-min load, network up (1) / down (0)")
RHYTHM = AtomSchema("rhythm", (
    _f("I", "idle", 0, 3600, 8), _f("A", "activity", 0, 60, 6), _f("H", "hour", 0, 24, 8),
    _f("W", "weekday", 0, 7, 7),
), description="the owner's rhythm: keyboard/mouse idle seconds, active minutes per hour, hour, weekday")
DRIFT = AtomSchema("drift", (
    _f("T", "added", 0, 20, 5), _f("C", "completed", 0, 20, 5), _f("S", "switched", 0, 10, 5),
    _f("H", "hour", 0, 24, 8), _f("W", "weekday", 0, 7, 3),
), description="work drift: tasks added, completed, context switches, hour, weekday")
NERVE_ACTIONS = ("ok", "alert", "suppress", "retrain")
NERVE = AtomSchema("nerve", (
    _f("P", "pulse", 0, 20, 5), _f("R", "rhythm", 0, 20, 5), _f("D", "drift", 0, 20, 5),
    _f("H", "hour", 0, 24, 5), _f("W", "weekday", 0, 7, 5),
), actions=NERVE_ACTIONS, description="reads every atom's latest score and decides what to do")

PRESETS: dict[str, AtomSchema] = {a.name: a for a in (PULSE, RHYTHM, DRIFT, NERVE)}
# The preset atoms the nerve reads, in its field order: the one list of "the watched atoms".
NERVE_INPUTS: tuple[str, ...] = tuple(f.name for f in NERVE.fields if f.name in PRESETS)


def get(name: str, custom: Mapping[str, AtomSchema] | None = None) -> AtomSchema:
    if custom and name in custom:
        return custom[name]
    if name in PRESETS:
        return PRESETS[name]
    known = sorted(set(PRESETS) | set(custom or {}))
    raise SchemaError(f"unknown atom {name!r}; known atoms: {', '.join(known)}")
