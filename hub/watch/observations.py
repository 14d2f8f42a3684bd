"""Observations in and out: validated against the atom's schema before anything is written.

Presets come from ``kiri.model.schema``; user-defined atoms are stored in the ``atoms``
table and cached here. A batch with one bad row is refused whole, with every problem named
(row index and field), so a client can report exactly what to fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from kiri.hub.core.queue import Env
from kiri.hub.store.bulk import BulkInsert
from kiri.hub.store.schema import atoms, imports, observations, staged_chunks, streams
from kiri.hub.watch import rollups as R
from kiri.model import schema as S
from kiri.protocol import Conflict, InvalidParams, NotFound
from kiri.protocol import params as P

MAX_ERRORS = 50
STAGED_TTL = 3600.0


class AtomRegistry:
    """Every atom the hub knows: the presets and the user's own, by name.

    A definition is staged while its transaction runs, so a later request in the same batch
    can already observe the new atom, and it joins the committed set only when the batch
    commits (``commit``); a rolled-back batch leaves no trace (``rollback``). The HTTP
    face's reader threads see committed atoms only (``get_committed``, ``all_committed``).
    """

    def __init__(self, lookup: Callable[[str], str | None] | None = None) -> None:
        self.custom: dict[str, S.AtomSchema] = {}
        self._staged: dict[str, S.AtomSchema] = {}  # written by the running transaction
        # reads one stored definition (on the hub's connection, in its running transaction):
        # hubs sharing PostgreSQL learn of an atom another hub defined at its first use here
        self.lookup = lookup

    def load(self, c: sa.Connection) -> None:
        self.custom = {
            name: S.AtomSchema.from_dict(orjson.loads(text), f"stored atom {name!r}")
            for name, text in c.execute(sa.select(atoms.c.name, atoms.c.schema))
        }
        self._staged = {}

    def commit(self) -> None:
        """The transaction that staged definitions committed: they are now the truth."""
        self.custom.update(self._staged)
        self._staged = {}

    def rollback(self) -> None:
        """The transaction that staged definitions rolled back: forget them."""
        self._staged = {}

    def get(self, name: str) -> S.AtomSchema:
        """An atom as the running transaction sees it (the batch loop only)."""
        known = {**self.custom, **self._staged}
        if name not in known and name not in S.PRESETS and self.lookup is not None:
            text = self.lookup(name)
            if text is not None:  # committed by another hub: as true as our own
                self.custom[name] = known[name] = S.AtomSchema.from_dict(orjson.loads(text), f"stored atom {name!r}")
        return self._find(name, known)

    def get_committed(self, name: str) -> S.AtomSchema:
        """An atom as committed to the database (safe from the reader threads)."""
        return self._find(name, self.custom)

    def all(self) -> list[S.AtomSchema]:
        return self._listed({**self.custom, **self._staged})

    def all_committed(self) -> list[S.AtomSchema]:
        return self._listed(self.custom)

    @staticmethod
    def _find(name: str, custom: dict[str, S.AtomSchema]) -> S.AtomSchema:
        try:
            return S.get(name, custom)
        except S.SchemaError as e:
            raise InvalidParams(str(e), {"atom": name}) from None

    @staticmethod
    def _listed(custom: dict[str, S.AtomSchema]) -> list[S.AtomSchema]:
        return [*S.PRESETS.values(), *sorted(custom.values(), key=lambda a: a.name)]

    # --- protocol methods --------------------------------------------------------------

    def list(self, c: sa.Connection, _p: P.Empty, env: Env) -> dict[str, Any]:
        return {"atoms": [{**a.to_dict(), "preset": a.name in S.PRESETS} for a in self.all()]}

    def define(self, c: sa.Connection, p: P.DefineAtom, env: Env) -> dict[str, Any]:
        try:
            schema = S.AtomSchema.from_dict(p.schema_)
        except S.SchemaError as e:
            raise InvalidParams(str(e)) from None
        if schema.name in S.PRESETS:
            raise Conflict(f"{schema.name!r} is a preset atom; give yours another name")
        text = orjson.dumps(schema.to_dict(), option=orjson.OPT_SORT_KEYS).decode()
        old = self._staged.get(schema.name) or self.custom.get(schema.name)
        if old is not None:
            if old == schema:
                return {"atom": schema.name, "created": False}
            has_data = c.execute(
                sa.select(observations.c.id).where(observations.c.atom == schema.name).limit(1)
            ).first()
            if has_data:
                raise Conflict(
                    f"atom {schema.name!r} already has observations under a different schema; "
                    "define the new layout under a new name"
                )
            c.execute(atoms.update().where(atoms.c.name == schema.name).values(schema=text, updated_at=env.now))
        else:
            c.execute(atoms.insert().values(name=schema.name, schema=text, created_at=env.now, updated_at=env.now))
        self._staged[schema.name] = schema
        return {"atom": schema.name, "created": old is None}

    def validate(self, p: P.Observe, env: Env) -> dict[str, list[Any]]:
        """The rows to insert as columns (ts, host, data); raises InvalidParams naming every
        bad row and field, and stores nothing."""
        schema = self.get(p.atom)
        if p.columns is not None:
            return self._validate_columns(schema, p.columns, env)
        assert p.observations is not None
        ts: list[float] = []
        hosts: list[str | None] = []
        data: list[str] = []
        errors: list[dict[str, Any]] = []
        names = schema.names
        for i, o in enumerate(p.observations):
            try:
                checked = schema.values(o.values)  # once: stored by field name, in schema order
            except S.ObservationError as e:
                errors.append({"index": i, "field": e.field, "message": str(e)})
                if len(errors) >= MAX_ERRORS:
                    break
                continue
            ts.append(env.now if o.time is None else o.time)
            hosts.append(o.host)
            data.append(orjson.dumps(dict(zip(names, checked, strict=True))).decode())
        _refuse(errors)
        return {"ts": ts, "host": hosts, "data": data}

    @staticmethod
    def _validate_columns(schema: S.AtomSchema, cols: P.ObservationColumns, env: Env) -> dict[str, list[Any]]:
        """Columns checked whole: the fields once (every one of the atom's, by name or letter,
        nothing unknown or twice), the values as one array (finite)."""
        by_key = {f.name: k for k, f in enumerate(schema.fields)} | {f.letter: k for k, f in enumerate(schema.fields)}
        unknown = [f for f in cols.fields if f not in by_key]
        if unknown:
            raise InvalidParams(f"{schema.name}: unknown field {unknown[0]!r}; fields are "
                                + ", ".join(f"{f.name} ({f.letter})" for f in schema.fields) + "; nothing was stored")
        order = [by_key[f] for f in cols.fields]
        if len(given := set(order)) != len(order):
            twice = next(f for f in cols.fields if order.count(by_key[f]) > 1)
            raise InvalidParams(f"{schema.name}: field {schema.fields[by_key[twice]].name!r} given twice; "
                                "nothing was stored")
        missing = [f for k, f in enumerate(schema.fields) if k not in given]
        if missing:
            raise InvalidParams(f"{schema.name}: missing field {missing[0].name!r} ({missing[0].letter}); "
                                "nothing was stored")
        values = np.array(cols.values, dtype=np.float64).reshape(len(cols.values), len(order))
        values = values[:, np.argsort(order)]  # schema order
        finite = np.isfinite(values)
        if not finite.all():
            errors = [{"index": int(i), "field": schema.fields[int(j)].name,
                       "message": f"field {schema.fields[int(j)].name!r}: not a finite number"}
                      for i, j in np.argwhere(~finite)[:MAX_ERRORS]]
            _refuse(errors)
        n = len(values)
        return {"ts": [env.now if t is None else t for t in cols.time] if cols.time is not None else [env.now] * n,
                "host": list(cols.host) if cols.host is not None else [None] * n,
                "data": json_objects(schema.names, values)}


def json_objects(names: tuple[str, ...], values: np.ndarray) -> list[str]:
    """Each row of finite ``values`` [n, F] as the JSON object {name: value} a reading is
    stored as, the same text ``orjson.dumps`` of the dict gives (shortest round-trip floats).

    The numbers are written by one C call over the whole array and cut into rows, then
    each row goes into a template of the names: half the cost of a dict and a dump per
    row, and every imported reading is written here."""
    template = "{" + ",".join(orjson.dumps(n).decode().replace("%", "%%") + ":%s" for n in names) + "}"
    return [template % tuple(row.split(",")) for row in number_rows(values)]


def number_rows(values: np.ndarray) -> list[str]:
    """Each row of finite ``values`` [n, F] as its numbers' JSON text, comma-separated ("" for
    F = 0), as ``orjson.dumps`` writes floats: the whole array in one C call, cut into rows."""
    if not len(values):
        return []
    text = orjson.dumps(np.ascontiguousarray(values, dtype=np.float64), option=orjson.OPT_SERIALIZE_NUMPY).decode()
    return text[2:-2].split("],[")


def _refuse(errors: list[dict[str, Any]]) -> None:
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidParams(f"observations[{first['index']}]: {first['message']}{more}; nothing was stored",
                            {"errors": errors})


_BULK = BulkInsert(observations, ["ts", "host", "data"])


def note_stored(c: sa.Connection, atom: str, hosts: list[str | None], ts: list[float], first_id: int) -> None:
    """Fold readings just stored (one atom, ids ``first_id`` onwards in list order: one
    insert gives them consecutive ids) into ``streams`` and mark their rollup buckets.

    Grouped here rather than asked of SQLite per stream: "the newest of these" walked the
    atom's time index back from its newest reading, across every other host's, so importing
    one host's past behind the others' got slower with each host already there."""
    at = np.asarray(ts, dtype=np.float64)
    by_host = R.host_groups(hosts)
    groups: dict[tuple[str, str], list[Any]] = {}
    keys: set[R.Key] = set()
    for host, ks in by_host.items():
        t = at[ks]
        newest = float(t.max())
        last = int(ks[np.flatnonzero(t == newest)[-1]])  # of equal times, the highest id
        groups[(atom, host)] = [len(ks), float(t.min()), (newest, first_id + last)]
        keys |= R.stream_keys(atom, host, t)
    _fold_streams(c, groups)
    R.mark(c, keys)


def _fold_streams(c: sa.Connection, groups: dict[tuple[str, str], list[Any]]) -> None:
    """Add each (atom, host) group's [count, first ts, (last ts, last id)] to its stream row."""
    st = streams.c
    for (atom, host), (n, first, (last, last_id)) in groups.items():
        newer = sa.or_(st.last_ts < last, sa.and_(st.last_ts == last, st.last_id < last_id))
        done = c.execute(streams.update().where(st.atom == atom, st.host == host).values(
            n=st.n + n,
            first_ts=sa.case((st.first_ts > first, first), else_=st.first_ts),
            last_ts=sa.case((newer, last), else_=st.last_ts),
            last_id=sa.case((newer, last_id), else_=st.last_id))).rowcount
        if not done:
            c.execute(streams.insert().values(atom=atom, host=host, n=n, first_ts=first, last_ts=last,
                                              last_id=last_id))


def _store(c: sa.Connection, atom: str, ts: list[float], hosts: list[str | None], data: list[str],
           now: float) -> tuple[int, int]:
    """Insert checked readings of one atom, fold them into streams and rollup marks: the
    first and last id they got."""
    before = c.execute(sa.select(sa.func.max(observations.c.id))).scalar() or 0
    n = len(data)
    _BULK.run(c, {"ts": ts, "host": hosts, "data": data}, {"atom": atom, "created_at": now})
    note_stored(c, atom, hosts, ts, before + 1)
    return before + 1, before + n


def observe(reg: AtomRegistry, c: sa.Connection, p: P.Observe, env: Env) -> dict[str, Any]:
    cols: dict[str, Any] = reg.validate(p, env)
    atom, n = reg.get(p.atom).name, len(cols["data"])
    if p.import_id is not None:
        note_staged(c, p.import_id, n, env)
        hosts = cols["host"] if any(h is not None for h in cols["host"]) else None
        c.execute(staged_chunks.insert().values(
            import_id=p.import_id, atom=atom, n=n, created_at=env.now,
            payload=orjson.dumps({"ts": cols["ts"], "host": hosts, "data": cols["data"]})))
        return {"staged": n, "import_id": p.import_id}
    first, last = _store(c, atom, cols["ts"], cols["host"], cols["data"], env.now)
    return {"stored": n, "first_id": first, "last_id": last}


COMMIT_STEP = 5_000  # a step moves whole staged chunks until this many readings (about 25 ms of the hub's loop)


def note_staged(c: sa.Connection, import_id: str, n: int, env: Env) -> None:
    """Count a staged chunk into its import's row (created with the first chunk)."""
    im = imports.c
    if c.execute(imports.update().where(im.import_id == import_id, im.committed_at.is_(None))
                 .values(staged=im.staged + n, last_at=env.now)).rowcount:
        return
    if c.execute(sa.select(im.import_id).where(im.import_id == import_id)).first() is not None:
        raise Conflict(f"import {import_id!r} is already committed; stage more under a new import_id")
    c.execute(imports.insert().values(import_id=import_id, staged=n, last_at=env.now, stored=0, atoms="[]"))


def commit_import(c: sa.Connection, p: P.ImportRef, env: Env) -> dict[str, Any]:
    """Commit an import: record the intent, move its first step, answer with the progress.

    Small imports are done in this call, as one transaction. Bigger ones continue in steps
    (``move_step``, driven by the hub between requests and by the importer asking again):
    their rows become visible a step at a time over some seconds, and a hub killed midway
    finishes the move when it starts again. Asking again is safe at any time and answers
    with the same totals once done (for an hour).
    """
    im = imports.c
    row = c.execute(sa.select(im.committed_at, im.done_at).where(im.import_id == p.import_id)).first()
    if row is None:
        raise NotFound(f"no staged observations for import {p.import_id!r} (aborted or expired)")
    if row.committed_at is None:
        c.execute(imports.update().where(im.import_id == p.import_id).values(committed_at=env.now, last_at=env.now))
    if row.done_at is None:
        move_step(c, p.import_id, env)
    return progress(c, p.import_id)


def progress(c: sa.Connection, import_id: str) -> dict[str, Any]:
    im = imports.c
    r = c.execute(sa.select(im.staged, im.stored, im.first_id, im.last_id, im.atoms)
                  .where(im.import_id == import_id)).one()
    return {"stored": r.stored, "first_id": r.first_id or 0, "last_id": r.last_id or 0,
            "atoms": orjson.loads(r.atoms), "remaining": r.staged - r.stored}


def committing(c: sa.Connection) -> list[str]:
    """Imports whose commit is still moving rows (oldest commit first)."""
    im = imports.c
    return list(c.execute(sa.select(im.import_id).where(im.committed_at.is_not(None), im.done_at.is_(None))
                          .order_by(im.committed_at)).scalars())


def move_step(c: sa.Connection, import_id: str, env: Env) -> list[str]:
    """Move the next staged chunks of a committing import, at least ``COMMIT_STEP`` readings
    or what is left, into the observations (streams, rollup marks and progress with them, in
    this transaction). The atoms moved."""
    sc, im = staged_chunks.c, imports.c
    # one step of an import at a time, across hubs sharing the database (a no-op on SQLite)
    c.execute(sa.select(im.import_id).where(im.import_id == import_id).with_for_update())
    moved, atom_names, first_id, last_id = 0, set(), None, None
    while moved < COMMIT_STEP:
        chunk = c.execute(sa.select(sc.id, sc.atom, sc.payload).where(sc.import_id == import_id)
                          .order_by(sc.id).limit(1)).first()
        if chunk is None:
            break
        cols = orjson.loads(chunk.payload)
        n = len(cols["data"])
        first, last = _store(c, chunk.atom, cols["ts"], cols["host"] or [None] * n, cols["data"], env.now)
        c.execute(staged_chunks.delete().where(sc.id == chunk.id))
        moved += n
        atom_names.add(chunk.atom)
        first_id, last_id = first_id or first, last
    r = c.execute(sa.select(im.atoms, im.first_id).where(im.import_id == import_id)).one()
    left = c.execute(sa.select(sc.id).where(sc.import_id == import_id).limit(1)).first() is not None
    c.execute(imports.update().where(im.import_id == import_id).values(
        stored=im.stored + moved, first_id=r.first_id or first_id,
        last_id=last_id if moved else im.last_id,
        atoms=orjson.dumps(sorted(set(orjson.loads(r.atoms)) | atom_names)).decode(),
        done_at=None if left else env.now))
    return sorted(atom_names)


def abort_import(c: sa.Connection, p: P.ImportRef, env: Env) -> dict[str, Any]:
    im = imports.c
    committed = c.execute(sa.select(im.committed_at).where(im.import_id == p.import_id)).scalar()
    if committed is not None:
        raise Conflict(f"import {p.import_id!r} is committed (or being committed) and will apply entirely; "
                       "it cannot be aborted")
    staged = c.execute(sa.select(im.staged).where(im.import_id == p.import_id)).scalar() or 0
    _drop_chunks(c, p.import_id)
    c.execute(imports.delete().where(im.import_id == p.import_id))
    return {"discarded": staged}


def _drop_chunks(c: sa.Connection, import_id: str) -> None:
    c.execute(staged_chunks.delete().where(staged_chunks.c.import_id == import_id))


def expire_staged(c: sa.Connection, now: float) -> int:
    """Drop imports abandoned mid-way (the importer died before committing): those that have
    sent nothing for ``STAGED_TTL``. An import still sending is never cut, however long it
    has run, nor one being committed. Finished imports are forgotten after the same hour.
    The number of readings dropped."""
    im = imports.c
    c.execute(imports.delete().where(im.done_at < now - STAGED_TTL))
    dropped = 0
    for import_id, staged in c.execute(sa.select(im.import_id, im.staged).where(
            im.committed_at.is_(None), im.last_at < now - STAGED_TTL)).all():
        dropped += staged
        _drop_chunks(c, import_id)
        c.execute(imports.delete().where(im.import_id == import_id))
    return dropped


def list_observations(reg: AtomRegistry, c: sa.Connection, p: P.Observations, env: Env) -> dict[str, Any]:
    schema = reg.get(p.atom)
    o = observations.c
    since = p.since
    if p.recent is not None:
        newest = c.execute(sa.select(sa.func.max(streams.c.last_ts)).where(streams.c.atom == schema.name)).scalar()
        if newest is not None:
            since = newest - p.recent if since is None else max(since, newest - p.recent)
    after = p.after_id
    if since is not None and after == 0:
        # start at the window's first reading (the time index), not at the start of the history
        first = c.execute(sa.select(sa.func.min(o.id)).where(o.atom == schema.name, o.ts >= since)).scalar()
        after = max(after, (first or 1) - 1)
    q = sa.select(o.id, o.ts, o.host, o.data).where(o.atom == schema.name, o.id > after)
    if p.host is not None:
        q = q.where(o.host == p.host)
    if since is not None:
        q = q.where(o.ts >= since)
    if p.until is not None:
        q = q.where(o.ts < p.until)
    rows = c.execute(q.order_by(o.id).limit(p.limit)).all()
    return {
        "atom": schema.name,
        "observations": [{"id": r.id, "time": r.ts, "host": r.host, "values": orjson.Fragment(r.data)} for r in rows],
        "next_after_id": rows[-1].id if len(rows) == p.limit else None,
        "since": since,
    }
