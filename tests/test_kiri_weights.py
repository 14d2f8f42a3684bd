"""KIRI's JSON weight files come in as weights versions and score as KIRI's own forward pass does.

The reference is written here the way KIRI computes (plain Python lists, one token at a
time with a growing key/value cache, as in the microgpt-style seed it was built on), and
knows nothing of kiri's model code; the scores compared are the ones a real scorer agent
stored in the hub after ``kiri weights import``.
"""

from __future__ import annotations

import base64
import json
import math
import random

import pytest

from kiri.model import schema as S
from kiri.protocol import InvalidParams
from tests.conftest import push, wait_until
from tests.test_cli import kiri


def kiri_weight_file(schema: S.AtomSchema, seed: int = 7, std: float = 0.3) -> dict[str, list[list[float]]]:
    rng = random.Random(seed)
    z, v = schema.size, schema.vocab_size
    d = z.n_embd

    def matrix(nout: int, nin: int) -> list[list[float]]:
        return [[rng.gauss(0, std) for _ in range(nin)] for _ in range(nout)]

    sd = {"wte": matrix(v, d), "wpe": matrix(z.block_size, d), "lm_head": matrix(v, d)}
    for i in range(z.n_layer):
        for x in "qkvo":
            sd[f"layer{i}.attn_w{x}"] = matrix(d, d)
        sd[f"layer{i}.mlp_fc1"] = matrix(4 * d, d)
        sd[f"layer{i}.mlp_fc2"] = matrix(d, 4 * d)
    return sd


# --- KIRI's forward pass, as plain Python --------------------------------------------------

def _linear(x: list[float], w: list[list[float]]) -> list[float]:
    return [sum(wi * xi for wi, xi in zip(row, x, strict=True)) for row in w]


def _rmsnorm(x: list[float]) -> list[float]:
    scale = (sum(xi * xi for xi in x) / len(x) + 1e-5) ** -0.5
    return [xi * scale for xi in x]


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def kiri_logits(sd: dict, tokens: list[int], n_layer: int, n_head: int) -> list[list[float]]:
    """The logits after each token of the sequence."""
    keys: list[list[list[float]]] = [[] for _ in range(n_layer)]
    values: list[list[list[float]]] = [[] for _ in range(n_layer)]
    out = []
    for pos, tok in enumerate(tokens):
        x = _rmsnorm([a + b for a, b in zip(sd["wte"][tok], sd["wpe"][pos], strict=True)])
        for li in range(n_layer):
            p = f"layer{li}."
            res = x
            x = _rmsnorm(x)
            q = _linear(x, sd[p + "attn_wq"])
            keys[li].append(_linear(x, sd[p + "attn_wk"]))
            values[li].append(_linear(x, sd[p + "attn_wv"]))
            hd = len(q) // n_head
            att_out: list[float] = []
            for h in range(n_head):
                hs = slice(h * hd, (h + 1) * hd)
                w = _softmax([sum(a * b for a, b in zip(q[hs], k[hs], strict=True)) / hd ** 0.5 for k in keys[li]])
                att_out += [sum(w[t] * values[li][t][hs][j] for t in range(len(w))) for j in range(hd)]
            x = [a + b for a, b in zip(_linear(att_out, sd[p + "attn_wo"]), res, strict=True)]
            res = x
            hidden = [max(0.0, h) for h in _linear(_rmsnorm(x), sd[p + "mlp_fc1"])]
            x = [a + b for a, b in zip(_linear(hidden, sd[p + "mlp_fc2"]), res, strict=True)]
        out.append(_linear(x, sd["lm_head"]))
    return out


def kiri_tokens(schema: S.AtomSchema, values: dict[str, float]) -> list[int]:
    """KIRI's quantization: equal-width buckets over each field's range; ids after BOS (0)."""
    ids, offset = [], 1
    for f in schema.fields:
        b = min(f.buckets - 1, max(0, math.floor((values[f.name] - f.low) / (f.high - f.low) * f.buckets)))
        ids.append(offset + b)
        offset += f.buckets
    return ids


def kiri_score(sd: dict, schema: S.AtomSchema, context: list[list[int]], target: list[int]) -> float:
    seq = [0] + [t for obs in context for t in obs] + target
    logits = kiri_logits(sd, seq, schema.size.n_layer, schema.size.n_head)
    f = len(target)
    surprise = [-math.log(_softmax(logits[len(seq) - f - 1 + j])[target[j]]) for j in range(f)]
    return sum(surprise) / f


def test_kiri_weights_score_as_kiris_own_forward_pass(hub, agents_factory, tmp_path):
    schema = S.PULSE
    sd = kiri_weight_file(schema)
    path = tmp_path / "pulse_weights.json"
    path.write_text(json.dumps({"atom": "pulse", "step": 2000, "state_dict": sd}))
    rng = random.Random(3)
    rows = [{"C": rng.uniform(0, 100), "M": rng.uniform(0, 100), "D": rng.uniform(0, 100),
             "S": rng.uniform(0, 100), "L": rng.uniform(0, 20), "N": rng.choice([0, 1])} for _ in range(8)]
    push(hub, "pulse", rows, [1_700_000_000.0 + 30 * i for i in range(len(rows))])
    out = kiri(hub, "weights", "import", "pulse", str(path), "--activate").stdout
    assert "imported as pulse:1 (active, 27840 parameters)" in out
    assert "already imported as pulse:1" in kiri(hub, "weights", "import", "pulse", str(path)).stdout
    agents_factory(hub, "score")
    wait_until(lambda: hub.sql("select count(*) from scores")[0][0] == len(rows), 120, what="the readings scored")
    stored = hub.sql("select score, anomalous from scores order by observation_id")
    named = [{f.name: r[f.letter] for f in schema.fields} for r in rows]
    tokens = [kiri_tokens(schema, v) for v in named]
    k = schema.max_context()
    for i, (score, anomalous) in enumerate(stored):
        want = kiri_score(sd, schema, tokens[max(0, i - k): i], tokens[i])
        assert score == pytest.approx(want, abs=1e-4), i
        assert bool(anomalous) == (score > 5.0)  # KIRI's anomaly band: no calibration came along
    hist = hub.client().call("history", {"atom": "pulse", "n": 1})["observations"][0]
    assert hist["tokens"] == [schema.vocab[t] for t in tokens[-1]]
    (reason, task) = hub.sql("select reason, task_id from weights")[0]
    assert "KIRI weight file" in reason and task is None


BAD_FILES = [
    (lambda sd: sd.pop("layer1.mlp_fc2"), "missing layer1.mlp_fc2"),
    (lambda sd: sd.update(extra=[[0.0]]), "unexpected extra"),
    (lambda sd: sd["wpe"].pop(), "wpe: expected 16 rows of 32 numbers, found 15 rows"),
    (lambda sd: sd["lm_head"][3].append(0.1), "lm_head[3]: expected 32 numbers, found 33"),
    (lambda sd: sd["layer0.attn_wq"][0].__setitem__(5, "x"), "layer0.attn_wq[0][5]: 'x' is not a finite number"),
    (lambda sd: sd["wte"][0].__setitem__(0, 1e400), "wte[0][0]: inf is not a finite number"),
]


def test_a_bad_kiri_weight_file_is_refused_naming_what_is_wrong_and_stores_nothing(hub, tmp_path):
    from click.testing import CliRunner

    from kiri.cli import main

    for i, (mutate, says) in enumerate(BAD_FILES):
        sd = kiri_weight_file(S.PULSE, std=0.08)
        mutate(sd)
        path = tmp_path / f"w{i}.json"
        path.write_text(json.dumps(sd))
        if i == 0:  # the CLI as a user runs it, once
            out = kiri(hub, "weights", "import", "pulse", str(path), ok=False)
            code, stderr = out.returncode, out.stderr
        else:  # the same command in this process (no interpreter and torch to start each time)
            got = CliRunner().invoke(main, ["weights", "import", "pulse", str(path)],
                                     env={"KIRI_HUB": f"127.0.0.1:{hub.port}"})
            code, stderr = got.exit_code, got.stderr
        assert code == 1 and says in stderr, stderr
    assert hub.sql("select count(*) from weights") == [(0,)]


def test_other_bad_imports_are_refused_and_store_nothing(hub, tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps(kiri_weight_file(S.PULSE, std=0.08)))
    out = kiri(hub, "weights", "import", "rhythm", str(path), ok=False)  # pulse's matrices are not rhythm's
    assert out.returncode == 1 and "not KIRI weights for 'rhythm'" in out.stderr
    from click.testing import CliRunner

    from kiri.cli import main

    (tmp_path / "bad.json").write_text("{not json")
    for atom, file, says in (("nosuch", path, "nosuch"), ("pulse", tmp_path / "bad.json", "not JSON"),
                             ("pulse", tmp_path / "none.json", "No such file")):  # the same CLI, in this process
        got = CliRunner().invoke(main, ["weights", "import", atom, str(file)],
                                 env={"KIRI_HUB": f"127.0.0.1:{hub.port}"})
        assert got.exit_code == 1 and says in got.stderr, got.stderr
    # the hub checks what it is sent, whoever sends it
    from kiri.model.gpt import Atom
    from kiri.model.weights import save_weights

    c = hub.client()
    rhythm = base64.b64encode(save_weights(S.RHYTHM, Atom.for_schema(S.RHYTHM))).decode()
    for blob in (rhythm, base64.b64encode(b"junk" * 10).decode(), "***"):
        with pytest.raises(InvalidParams):
            c.call("import_weights", {"atom": "pulse", "blob": blob})
    assert hub.sql("select count(*) from weights") == [(0,)]


def test_the_seeds_flat_parameter_list_and_flat_matrices_read_as_the_same_model():
    import torch

    from kiri.model.kiri_weights import atom_from_kiri, expected_shapes

    schema = S.PULSE
    sd = kiri_weight_file(schema, seed=11)
    flat = [x for name in expected_shapes(schema) for row in sd[name] for x in row]  # [p.data for p in params]
    assert len(flat) == schema.n_params
    flat_rows = {name: [x for row in m for x in row] for name, m in sd.items()}
    models = [atom_from_kiri(schema, doc) for doc in (sd, {"state_dict": sd}, flat, {"params": flat}, flat_rows)]
    for m in models[1:]:
        for (name, a), b in zip(models[0].state_dict().items(), m.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    from kiri.model.header import WeightsError

    with pytest.raises(WeightsError, match="a flat parameter list of 27839 numbers; the model has 27840"):
        atom_from_kiri(schema, flat[:-1])
    with pytest.raises(WeightsError, match="JSON object of matrices"):
        atom_from_kiri(schema, "weights")
