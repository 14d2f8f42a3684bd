"""KIRI's JSON weight files, read into kiri weights.

KIRI trained the same model as ``Atom`` (its seed architecture) in plain Python and saved its
parameters as JSON: one matrix per name, each a list of rows, in the layout of the
microgpt-style state dict it was built on::

    wte [vocab][d]   wpe [block][d]   lm_head [vocab][d]
    layer{i}.attn_wq, attn_wk, attn_wv, attn_wo [d][d]
    layer{i}.mlp_fc1 [4d][d]   layer{i}.mlp_fc2 [d][4d]

Rows are output units, as in ``torch.nn.Linear.weight``, so each matrix maps onto a tensor of
``Atom`` as it is, except that kiri keeps Q, K and V in one matrix (``qkv``: wq, then wk, then
wv). The matrices may also sit under ``"state_dict"`` (or ``"weights"``) beside other keys, a
matrix may be one flat row-major list, and the whole file may be the seed's flat parameter
list (``[p.data for p in params]``: every matrix above in that order, row by row), bare or
under ``"params"``.

KIRI tokenized with each field's equal-width buckets over its declared range, which is
kiri's fixed codec, so imported weights carry no fitted codec and score the tokens KIRI
scored. They carry no calibration either: their verdict is KIRI's own, a mean surprise over
``KIRI_ANOMALY`` nats (KIRI's bands: normal below 2, elevated below 5, anomaly above).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kiri.model.gpt import Atom
from kiri.model.header import WeightsError
from kiri.model.schema import AtomSchema
from kiri.model.weights import save_weights

KIRI_ANOMALY = 5.0  # KIRI's "anomaly" band starts here (mean surprise, nats)
MAX_FILE_BYTES = 64 << 20


def expected_shapes(schema: AtomSchema) -> dict[str, tuple[int, int]]:
    """Every matrix a KIRI weight file for this atom holds, with its [rows, columns]."""
    s, v = schema.size, schema.vocab_size
    d = s.n_embd
    out = {"wte": (v, d), "wpe": (s.block_size, d), "lm_head": (v, d)}
    for i in range(s.n_layer):
        out |= {f"layer{i}.attn_w{x}": (d, d) for x in "qkvo"}
        out |= {f"layer{i}.mlp_fc1": (4 * d, d), f"layer{i}.mlp_fc2": (d, 4 * d)}
    return out


def _matrices(doc: Any, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    if isinstance(doc, dict):
        for key in ("state_dict", "weights", "params"):
            if isinstance(doc.get(key), dict | list):
                doc = doc[key]
                break
    if isinstance(doc, list):  # the flat parameter list, matrices in the seed's order
        total = sum(r * c for r, c in shapes.values())
        if len(doc) != total:
            raise WeightsError(f"a flat parameter list of {len(doc)} numbers; the model has {total}")
        out, at = {}, 0
        for name, (r, c) in shapes.items():
            out[name], at = doc[at: at + r * c], at + r * c
        return out
    if not isinstance(doc, dict):
        raise WeightsError("a KIRI weight file is a JSON object of matrices, or a list of parameters")
    return dict(doc)


def _tensor(name: str, rows: Any, shape: tuple[int, int]) -> torch.Tensor:
    if isinstance(rows, list) and len(rows) == shape[0] * shape[1] and shape[1] > 1 and not any(
            isinstance(x, list) for x in rows[:1]):  # one flat row-major list
        rows = [rows[i * shape[1]: (i + 1) * shape[1]] for i in range(shape[0])]
    want = f"{shape[0]} rows of {shape[1]} numbers"
    if not isinstance(rows, list) or len(rows) != shape[0]:
        got = f"{len(rows)} rows" if isinstance(rows, list) else type(rows).__name__
        raise WeightsError(f"{name}: expected {want}, found {got}")
    for r, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != shape[1]:
            got = f"{len(row)} numbers" if isinstance(row, list) else type(row).__name__
            raise WeightsError(f"{name}[{r}]: expected {shape[1]} numbers, found {got}")
        for c, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
                raise WeightsError(f"{name}[{r}][{c}]: {x!r} is not a finite number")
    return torch.tensor(rows, dtype=torch.float32)


def _not_for(schema: AtomSchema) -> str:
    return f"not KIRI weights for {schema.name!r} ({schema.n_params} parameters)"


def atom_from_kiri(schema: AtomSchema, doc: Any) -> Atom:
    """The ``Atom`` holding a KIRI weight file's parameters; ``WeightsError`` naming the first
    matrix that is missing, unexpected, of the wrong shape or not numbers."""
    shapes = expected_shapes(schema)
    try:
        mats = _matrices(doc, shapes)
    except WeightsError as e:
        raise WeightsError(f"{_not_for(schema)}: {e}") from None
    missing = [k for k in shapes if k not in mats]
    extra = sorted(k for k in mats if k not in shapes)
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:10])}"] if extra else [])
        raise WeightsError(f"{_not_for(schema)}: {'; '.join(parts)}")
    try:
        t = {k: _tensor(k, mats[k], shape) for k, shape in shapes.items()}
    except WeightsError as e:
        raise WeightsError(f"{_not_for(schema)}: {e}") from None
    state = {"wte.weight": t["wte"], "wpe.weight": t["wpe"], "lm_head.weight": t["lm_head"]}
    for i in range(schema.size.n_layer):
        p = f"layer{i}."
        state |= {
            f"blocks.{i}.qkv.weight": torch.cat([t[p + "attn_wq"], t[p + "attn_wk"], t[p + "attn_wv"]]),
            f"blocks.{i}.proj.weight": t[p + "attn_wo"],
            f"blocks.{i}.fc1.weight": t[p + "mlp_fc1"],
            f"blocks.{i}.fc2.weight": t[p + "mlp_fc2"],
        }
    model = Atom.for_schema(schema)
    model.load_state_dict(state)
    return model.eval()


def blob_from_kiri(schema: AtomSchema, doc: Any, source: str) -> bytes:
    """kiri weights (safetensors) from a KIRI weight file's parsed JSON."""
    model = atom_from_kiri(schema, doc)
    info = {"imported_from": "KIRI", "source": source[:500], "threshold": KIRI_ANOMALY}
    return save_weights(schema, model, info)
