"""Weights and training state as safetensors bytes: no pickle, so loading is safe.

A weights blob carries the schema and model config in its metadata, and its content hash
(sha256 of the bytes) names it. Loading refuses a blob whose tensors do not match its own
schema, so a corrupted or hostile file gives an error, not a half-loaded model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kiri.model.gpt import Atom
from kiri.model.header import WeightsError, read_meta
from kiri.model.schema import AtomSchema, SchemaError

FORMAT = "kiri.weights/1"


def pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    # One metadata entry: safetensors writes its metadata map in hash order, so several keys
    # would make identical weights hash differently.
    text = {"kiri": json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    return st_save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=text)


def unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_meta(blob)  # refuses a malformed header before safetensors parses the rest
    try:
        tensors = st_load(bytes(blob))
    except (ValueError, SafetensorError) as e:
        raise WeightsError(f"not a valid safetensors blob: {e}") from None
    return tensors, meta


def content_hash(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Weights:
    schema: AtomSchema
    model: Atom
    info: dict[str, Any]
    blob: bytes

    @property
    def hash(self) -> str:
        return content_hash(self.blob)


def save_weights(schema: AtomSchema, model: Atom, info: dict[str, Any] | None = None) -> bytes:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    return pack(tensors, {"format": FORMAT, "schema": schema.to_dict(), "info": info or {}})


def load_weights(blob: bytes) -> Weights:
    tensors, meta = unpack(blob)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"not kiri weights (format {meta.get('format')!r}, expected {FORMAT})")
    try:
        schema = AtomSchema.from_dict(meta["schema"])
    except (KeyError, SchemaError) as e:
        raise WeightsError(f"weights carry an invalid schema: {e}") from None
    model = Atom.for_schema(schema)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise WeightsError(f"tensors do not match the {schema.name!r} schema's model")
    model.load_state_dict(state)
    model.eval()
    return Weights(schema=schema, model=model, info=meta.get("info") or {}, blob=bytes(blob))
