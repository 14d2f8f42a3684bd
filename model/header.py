"""The one reader of a safetensors header, without torch: for the hub and for ``weights``.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor
offsets and a string-to-string ``__metadata__`` map), then the tensor bytes. kiri keeps its
own metadata as one JSON string under ``__metadata__["kiri"]``. The hub reads it to check a
published blob (format, atom) without importing torch; ``kiri.model.weights`` reads it on
load. Both go through here, so a malformed or hostile blob is refused the same way.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_HEADER = 16 << 20


class WeightsError(ValueError):
    """A weights or state blob is malformed or does not fit its schema."""


def read_header(blob: bytes) -> dict[str, Any]:
    """The safetensors JSON header of ``blob``; WeightsError if it is not one."""
    if not isinstance(blob, bytes | bytearray) or len(blob) < 8:
        raise WeightsError("not a safetensors blob (too short)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8 or n > MAX_HEADER:
        raise WeightsError("not a safetensors blob (bad header length)")
    try:
        header = json.loads(blob[8: 8 + n])
    except ValueError as e:
        raise WeightsError(f"not a safetensors blob (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError("not a safetensors blob (header is not an object)")
    return header


def read_meta(blob: bytes) -> dict[str, Any]:
    """kiri's metadata object inside a safetensors blob ({} when it has none)."""
    raw = read_header(blob).get("__metadata__") or {}
    try:
        meta = json.loads(raw.get("kiri", "{}"))
    except (TypeError, ValueError, AttributeError) as e:
        raise WeightsError(f"bad metadata: {e}") from None
    if not isinstance(meta, dict):
        raise WeightsError("bad metadata: expected an object")
    return meta
