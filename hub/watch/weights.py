"""Weights versions: published by the trainer holding the task's lease, activated or rejected.

The hub checks a blob's safetensors header itself (format, atom) without loading tensors, so
it needs no torch; agents load and use the weights.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson
import sqlalchemy as sa

from kiri.hub.core import queue as Q
from kiri.hub.core.queue import Env
from kiri.hub.store.db import as_dict
from kiri.hub.store.schema import weights
from kiri.model.header import WeightsError, read_header, read_meta
from kiri.model.info import check_info
from kiri.model.schema import AtomSchema
from kiri.protocol import InvalidParams, LeaseLost, NotFound
from kiri.protocol import params as P

MAX_BLOB = 64 << 20
_SUMMARY = [c for c in weights.c if c.name != "blob"]


def blob_meta(blob: bytes) -> dict[str, Any]:
    """The kiri metadata of a safetensors weights blob; InvalidParams if it is not one."""
    try:
        meta = read_meta(blob)
    except WeightsError as e:
        raise InvalidParams(f"blob: not kiri weights in safetensors format ({e})") from None
    if meta.get("format") != "kiri.weights/1":
        raise InvalidParams(f"blob: format {meta.get('format')!r} is not kiri.weights/1")
    return meta


def _row(r: sa.Row, with_blob: bool = False) -> dict[str, Any]:
    d = as_dict(r)
    d["info"] = orjson.Fragment(d["info"])
    if "blob" in d:
        d["blob"] = base64.b64encode(d["blob"]).decode() if with_blob else None
    return d


def query(c: sa.Connection, p: P.WeightsQuery, env: Env) -> dict[str, Any]:
    cols = list(weights.c) if p.blob else _SUMMARY
    q = sa.select(*cols)
    if p.weights_id is not None:
        q = q.where(weights.c.id == p.weights_id)
    if p.atom is not None:
        q = q.where(weights.c.atom == p.atom)
    if p.version is not None:
        q = q.where(weights.c.version == p.version)
    if p.active:
        q = q.where(weights.c.status == "active")
    rows = c.execute(q.order_by(weights.c.id.desc()).limit(p.limit)).all()
    single = p.weights_id is not None or p.version is not None or p.active
    if single and not rows:
        raise NotFound("no such weights version" if not p.active else f"atom {p.atom!r} has no active weights")
    return {"weights": [_row(r, p.blob) for r in rows]}


def publish(c: sa.Connection, p: P.PublishWeights, env: Env) -> dict[str, Any]:
    existing = c.execute(sa.select(*_SUMMARY).where(weights.c.task_id == p.task_id)).first()
    if existing is not None:
        return {"weights": _row(existing), "already": True}  # a resend after a lost reply
    if not Q.holds_lease(c, p.task_id, p.lease_token):
        raise LeaseLost(f"task {p.task_id} is not leased to you; its weights are not published")
    blob = Q.decode_base64(p.blob, "blob", "blob", MAX_BLOB)
    meta = blob_meta(blob)
    if meta.get("schema", {}).get("name") != p.atom:
        raise InvalidParams(f"blob holds weights for {meta.get('schema', {}).get('name')!r}, not {p.atom!r}")
    parent = c.execute(sa.select(weights.c.id).where(weights.c.id == p.parent_id)).first() if p.parent_id else True
    if parent is None:
        raise NotFound(f"parent weights {p.parent_id} do not exist")
    try:
        schema = AtomSchema.from_dict(meta["schema"], "blob schema")
    except (ValueError, TypeError, KeyError) as e:
        raise InvalidParams(f"blob's schema cannot be read: {e}") from None
    info = {**meta.get("info", {}), **p.info}
    _usable(schema, info)
    return _store(c, p.atom, blob, info, env.now, activate=p.activate,
                  held="rejected", task_id=p.task_id, parent_id=p.parent_id, obs_from=p.obs_from,
                  obs_to=p.obs_to, loss=p.loss, reason=p.reason)


def _store(c: sa.Connection, atom: str, blob: bytes, info: dict[str, Any], now: float, *, activate: bool,
           held: str, **lineage: Any) -> dict[str, Any]:
    """A new version of ``atom``: the next number, active (the previous active one made
    inactive) or ``held`` ("rejected" by the quality gate, "inactive" when imported)."""
    version = (c.execute(sa.select(sa.func.max(weights.c.version)).where(weights.c.atom == atom)).scalar() or 0) + 1
    if activate:
        c.execute(weights.update().where(weights.c.atom == atom, weights.c.status == "active")
                  .values(status="inactive"))
    wid = c.execute(weights.insert().values(
        atom=atom, version=version, hash=hashlib.sha256(blob).hexdigest(), blob=blob,
        info=orjson.dumps(info).decode(), status="active" if activate else held, created_at=now,
        activated_at=now if activate else None, **lineage,
    ).returning(weights.c.id)).scalar_one()
    return {"weights": _row(c.execute(sa.select(*_SUMMARY).where(weights.c.id == wid)).one()), "already": False}


def _usable(schema: AtomSchema, info: Any) -> None:
    """Refuse weights whose info a scorer could not use (``kiri.model.info``): stored, they
    would fail every score task of the atom instead of this one call."""
    if not isinstance(info, dict):
        raise InvalidParams(f"weights info must be an object, not {type(info).__name__}")
    try:
        check_info(schema, info)
    except ValueError as e:
        raise InvalidParams(f"{e}; nothing was stored") from None


def import_(c: sa.Connection, schema: AtomSchema, p: P.ImportWeights, env: Env) -> dict[str, Any]:
    """Store weights made outside kiri's training (a KIRI weight file, converted by the CLI):
    a version with no task, inactive unless ``activate``. The blob must be for this atom's
    schema exactly, tensor by tensor (read from its header: the hub loads no tensors)."""
    blob = Q.decode_base64(p.blob, "blob", "blob", MAX_BLOB)
    meta = blob_meta(blob)
    if meta.get("schema") != schema.to_dict():
        raise InvalidParams(f"blob holds weights for another layout than atom {p.atom!r}'s "
                            f"({(meta.get('schema') or {}).get('name')!r})")
    tensors = {k.removeprefix("model."): v for k, v in read_header(blob).items()
               if k != "__metadata__" and isinstance(v, dict)}
    if ({k: tuple(v.get("shape", ())) for k, v in tensors.items()} != schema.tensor_shapes()
            or any(v.get("dtype") != "F32" for v in tensors.values())):
        raise InvalidParams(f"blob's tensors do not match atom {p.atom!r}'s model")
    _usable(schema, meta.get("info", {}))
    same = c.execute(sa.select(*_SUMMARY).where(weights.c.atom == p.atom,
                                                weights.c.hash == hashlib.sha256(blob).hexdigest())).first()
    if same is not None:  # the same file imported again: the version it already is
        return {"weights": _row(same), "already": True}
    return _store(c, p.atom, blob, meta.get("info", {}), env.now, activate=p.activate, held="inactive",
                  reason=p.reason or "imported")


def activate(c: sa.Connection, p: P.ActivateWeights, env: Env) -> dict[str, Any]:
    target = c.execute(sa.select(weights.c.id, weights.c.status).where(
        weights.c.atom == p.atom, weights.c.version == p.version)).first()
    if target is None:
        raise NotFound(f"{p.atom} has no weights version {p.version}")
    if target.status != "active":
        c.execute(weights.update().where(weights.c.atom == p.atom, weights.c.status == "active")
                  .values(status="inactive"))
        c.execute(weights.update().where(weights.c.id == target.id).values(status="active", activated_at=env.now))
    return {"atom": p.atom, "version": p.version, "status": "active"}
