"""The atoms: state language, model, deterministic resumable training, scoring, nerve, data."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from kiri.model import schema as S
from kiri.model import synth
from kiri.model.codec import values_of
from kiri.model.gpt import Atom
from kiri.model.nerve import Label, Nerve, fold_check
from kiri.model.nerve import train as train_nerve
from kiri.model.score import Scorer
from kiri.model.train import TrainConfig, Trainer
from kiri.model.weights import WeightsError, content_hash, load_weights
from kiri.model.windows import encode_many, windows

torch.set_num_threads(1)

# --- the state language ------------------------------------------------------------------


def test_preset_vocab_sizes_match_kiri():
    assert (S.PULSE.vocab_size, S.RHYTHM.vocab_size, S.DRIFT.vocab_size) == (43, 30, 27)
    assert S.NERVE.vocab[-4:] == ["ok", "alert", "suppress", "retrain"]
    assert S.PULSE.vocab[:4] == ["<BOS>", "C0", "C1", "C2"]


@pytest.mark.parametrize(("value", "token"), [(0, "C0"), (52, "C5"), (99.99, "C9"), (100, "C9"),
                                              (-5, "C0"), (250, "C9"), ("52", "C5")])
def test_quantize_and_out_of_range_lands_in_edge_bucket(value, token):
    obs = {"cpu": value, "mem": 50, "disk": 50, "swap": 10, "load": 1, "net": 1}
    assert S.PULSE.tokens(S.PULSE.encode(obs))[0] == token


BAD_OBSERVATIONS = [
    ({"mem": 1, "disk": 1, "swap": 1, "load": 1, "net": 1}, "cpu", "missing field 'cpu'"),
    ({"cpu": float("nan"), "mem": 1, "disk": 1, "swap": 1, "load": 1, "net": 1}, "cpu", "finite"),
    ({"cpu": 1, "mem": float("inf"), "disk": 1, "swap": 1, "load": 1, "net": 1}, "mem", "finite"),
    ({"cpu": 1, "mem": 1, "disk": "lots", "swap": 1, "load": 1, "net": 1}, "disk", "not a number"),
    ({"cpu": 1, "mem": 1, "disk": 1, "swap": None, "load": 1, "net": 1}, "swap", "not a number"),
    ({"cpu": 1, "mem": 1, "disk": 1, "swap": 1, "load": True, "net": 1}, "load", "not a number"),
    ({"cpu": 1, "mem": 1, "disk": 1, "swap": 1, "load": 1, "net": 1, "gpu": 3}, "gpu", "unknown field"),
]


@pytest.mark.parametrize(("obs", "field", "needle"), BAD_OBSERVATIONS)
def test_bad_observations_are_refused_naming_the_field(obs, field, needle):
    with pytest.raises(S.ObservationError) as e:
        S.PULSE.encode(obs)
    assert e.value.field == field and needle in str(e.value)


@pytest.mark.parametrize(("obs", "field", "needle"), BAD_OBSERVATIONS)
def test_a_bad_observation_in_a_batch_is_refused_naming_its_row(obs, field, needle):
    """A batch of well-formed readings is checked as a whole (``values_of``); one bad reading
    among them is still refused with its row and field, as one alone is."""
    good = [{f: float(k + i) for i, f in enumerate(S.PULSE.names)} for k in range(5)]
    with pytest.raises(S.ObservationError) as e:
        values_of(S.PULSE, [*good[:2], obs, *good[2:]])
    assert e.value.field == field and needle in str(e.value) and str(e.value).startswith("observation 2:")
    # and a well-formed batch gives what row by row gives, ints and letters included
    ints = {"cpu": 1, "mem": 2, "disk": 3, "swap": 4, "load": 5, "net": 6}
    mixed = [*good, ints, dict(zip("CMDSLN", range(6), strict=True))]
    assert values_of(S.PULSE, good).tolist() == [S.PULSE.values(o) for o in good]
    assert values_of(S.PULSE, mixed).tolist() == [[float(v) for v in S.PULSE.values(o)] for o in mixed]


def test_fields_by_letter_or_name():
    by_name = S.DRIFT.encode({"added": 3, "completed": 1, "switched": 2, "hour": 10, "weekday": 1})
    by_letter = S.DRIFT.encode({"T": 3, "C": 1, "S": 2, "H": 10, "W": 1})
    assert by_name == by_letter


CUSTOM = """
[[atom]]
name = "greenhouse"
description = "temperature and humidity"
fields = [
  { letter = "T", name = "temp", low = -10, high = 40, buckets = 10 },
  { letter = "H", name = "humidity", low = 0, high = 100, buckets = 5 },
]
model = { n_embd = 16, n_head = 2, n_layer = 1, block_size = 12 }
"""


def test_custom_atom_from_toml_behaves_like_a_preset(tmp_path):
    p = tmp_path / "atoms.toml"
    p.write_text(CUSTOM)
    (atom,) = S.load_toml(p)
    assert atom.vocab_size == 16 and atom.max_context() == 5  # [BOS] + 6 obs x 2 tokens = 12 inputs
    rows = [{"temp": 15 + 5 * math.sin(i / 20), "humidity": 60} for i in range(300)]
    t = Trainer(atom, encode_many(atom, rows), TrainConfig(steps=30, batch_size=16))
    t.run()
    w = load_weights(t.weights_bytes())
    assert w.schema == atom
    hot = encode_many(atom, [*rows[-5:], {"temp": 39, "humidity": 5}])
    normal = encode_many(atom, rows[-6:])
    sc = Scorer(w)
    assert sc.score(hot, start=5).mean.item() > sc.score(normal, start=5).mean.item()


@pytest.mark.parametrize(("text", "needle"), [
    ("name = 'x'", "'fields' must be a non-empty list"),
    ("name = 'Bad Name'\nfields=[{letter='A', name='a', low=0, high=1, buckets=2}]", "atom name"),
    ("name = 'x'\nfields=[{letter='AA', name='a', low=0, high=1, buckets=2}]", "one capital letter"),
    ("name = 'x'\nfields=[{letter='A', name='a', low=5, high=1, buckets=2}]", "must be below high"),
    ("name = 'x'\nfields=[{letter='A', name='a', low=0, high=1, buckets=1}]", "buckets must be"),
    ("name = 'x'\nfields=[{letter='A', name='a', low=0, high=1, buckets=2.5}]", "buckets must be"),
    ("name = 'x'\nfields=[{letter='A', name='a', low=0, high=1}]", "missing buckets"),
    ("name = 'x'\nfields=[{letter='A', name='a', low=0, high=1, buckets=2},"
     "{letter='A', name='b', low=0, high=1, buckets=2}]", "used twice"),
    ("name = 'x'\ncolour = 'red'\nfields=[{letter='A', name='a', low=0, high=1, buckets=2}]", "unknown key"),
    ("name = 'x'\nfields=[{letter='A', name='a', low=0, high=1, buckets=2}]\nmodel={n_embd=30, n_head=4}",
     "divisible"),
    ("name = 'x'\nfields=[{letter='A', name='a', low=0, high=1, buckets=2}]\nmodel={block_size=1}", "block_size"),
    ("this is [not toml", "not valid TOML"),
])
def test_bad_custom_atoms_get_precise_errors(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(S.SchemaError) as e:
        S.load_toml(p)
    assert needle in str(e.value)


# --- model and training ------------------------------------------------------------------


def test_pulse_has_kiris_parameter_count():
    assert Atom.for_schema(S.PULSE).n_params() == 27_840
    for schema in S.PRESETS.values():  # the hub's torch-free count agrees with the model's
        assert schema.n_params == Atom.for_schema(schema).n_params(), schema.name
        shapes = {k: tuple(v.shape) for k, v in Atom.for_schema(schema).state_dict().items()}
        assert schema.tensor_shapes() == shapes, schema.name


def _pulse_ids(days: float = 2, seed: int = 0) -> torch.Tensor:
    return encode_many(S.PULSE, synth.generate("pulse", days, seed=seed).rows)


def test_loss_starts_near_ln_vocab_and_falls_below_one():
    t = Trainer(S.PULSE, _pulse_ids(), TrainConfig(steps=300, batch_size=32))
    first = t.step()
    assert abs(first - math.log(43)) < 0.6
    t.run()
    assert t.last_loss < 1.0


def test_training_windows_are_the_scoring_windows():
    ids = _pulse_ids(0.1)
    w = windows(ids, 1)
    assert w.shape == (len(ids) - 1, 13)
    assert torch.equal(w[5, 1:7], ids[5]) and torch.equal(w[5, 7:], ids[6]) and w[5, 0] == 0


def test_training_is_deterministic_under_a_seed():
    ids = _pulse_ids(0.5)
    a = Trainer(S.PULSE, ids, TrainConfig(steps=40, seed=3))
    b = Trainer(S.PULSE, ids, TrainConfig(steps=40, seed=3))
    a.run()
    b.run()
    assert content_hash(a.weights_bytes(calibrate=False)) == content_hash(b.weights_bytes(calibrate=False))
    c = Trainer(S.PULSE, ids, TrainConfig(steps=40, seed=4))
    c.run()
    assert content_hash(c.weights_bytes(calibrate=False)) != content_hash(a.weights_bytes(calibrate=False))


RESUME = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from kiri.model import schema as S, synth
    from kiri.model.train import Trainer
    from kiri.model.windows import encode_many
    ids = encode_many(S.PULSE, synth.generate("pulse", 0.5, seed=0).rows)
    state = open(sys.argv[1], "rb").read()
    t = Trainer.resume(S.PULSE, ids, state)
    t.run()
    open(sys.argv[2], "wb").write(t.weights_bytes(calibrate=False))
""")


def test_resumed_in_a_fresh_process_gives_bitwise_the_same_weights(tmp_path):
    ids = _pulse_ids(0.5)
    cfg = TrainConfig(steps=70, batch_size=32, seed=11)
    whole = Trainer(S.PULSE, ids, cfg)
    whole.run()
    part = Trainer(S.PULSE, ids, cfg)
    part.run(until=33)
    (tmp_path / "state").write_bytes(part.state_bytes())
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    subprocess.run([sys.executable, str(script), str(tmp_path / "state"), str(tmp_path / "out")],
                   check=True, timeout=120)
    resumed = load_weights((tmp_path / "out").read_bytes())
    ref = whole.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, ref[k]), f"{k} differs after resume"
    assert content_hash((tmp_path / "out").read_bytes()) == content_hash(whole.weights_bytes(calibrate=False))


def test_resume_refuses_other_data_or_garbage():
    ids = _pulse_ids(0.5)
    t = Trainer(S.PULSE, ids, TrainConfig(steps=10))
    t.run(until=5)
    state = t.state_bytes()
    with pytest.raises(WeightsError, match="different data"):
        Trainer.resume(S.PULSE, ids[:-10], state)
    with pytest.raises(WeightsError, match="different atom"):
        Trainer.resume(S.RHYTHM, ids, state)
    with pytest.raises(WeightsError):
        Trainer.resume(S.PULSE, ids, b"\x00" * 100)


def test_progress_is_reported():
    seen = []
    t = Trainer(S.PULSE, _pulse_ids(0.3), TrainConfig(steps=30))
    t.run(on_progress=seen.append, every=10)
    assert [p.step for p in seen] == [10, 20, 30]
    assert all(p.lr <= 0.01 and p.loss > 0 for p in seen)
    assert seen[-1].lr == pytest.approx(0.001)  # floored at 10%


def test_weights_round_trip_and_refuse_tampering():
    t = Trainer(S.PULSE, _pulse_ids(0.3), TrainConfig(steps=5))
    t.run()
    blob = t.weights_bytes()
    w = load_weights(blob)
    assert w.hash == hashlib.sha256(blob).hexdigest() and w.info["steps"] == 5
    assert w.info["threshold"] > 0 and w.info["held_out"] > 0 and w.info["calibration"]["kind"] == "tail/1"
    with pytest.raises(WeightsError):
        load_weights(blob[:-100])
    with pytest.raises(WeightsError):
        load_weights(b"not weights at all")
    rhythm = Trainer(S.RHYTHM, encode_many(S.RHYTHM, synth.generate("rhythm", 1).rows), TrainConfig(steps=2))
    rhythm.run()
    tensors_of_rhythm = rhythm.weights_bytes()
    assert load_weights(tensors_of_rhythm).schema.name == "rhythm"


# --- scoring -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pulse_week():
    ids = _pulse_ids(7)
    t = Trainer(S.PULSE, ids, TrainConfig(steps=500, batch_size=32))
    t.run()
    return load_weights(t.weights_bytes())


def _obs(c, m, d, s, load, n):
    return {"C": c, "M": m, "D": d, "S": s, "L": load, "N": n}


def test_kiris_check_maxed_out_scores_far_above_normal_and_blames_the_right_tokens(pulse_week):
    sc = Scorer(pulse_week)
    normal = _obs(55, 55, 45, 25, 5, 1)  # C5 M5 D4 S1 L1 N1
    maxed = _obs(95, 95, 45, 90, 18, 1)  # C9 M9 D4 S4 L4 N1
    base = sc.score(encode_many(S.PULSE, [normal, normal]), start=1)
    hot = sc.score(encode_many(S.PULSE, [normal, maxed]), start=1)
    assert S.PULSE.tokens(hot.token_ids[0].tolist()) == ["C9", "M9", "D4", "S4", "L4", "N1"]
    assert hot.mean.item() >= 5 * base.mean.item()
    blame = {b["token"][0]: b["surprise"] for b in hot.breakdown(0)}
    assert min(blame["C"], blame["M"], blame["S"], blame["L"]) > max(blame["D"], blame["N"])
    assert hot.mean.item() > sc.threshold > base.mean.item()
    assert pulse_week.info["calibrated_on"] == "holdout"  # threshold from unseen windows, not labels


def test_batched_scoring_equals_one_at_a_time_and_is_context_true(pulse_week):
    sc = Scorer(pulse_week)
    ids = _pulse_ids(0.05, seed=5)
    batch = sc.score(ids)
    assert len(batch.mean) == len(ids)
    for i in (0, 1, 7, len(ids) - 1):
        alone = sc.score(ids[max(0, i - sc.k): i + 1], start=min(i, sc.k))
        assert torch.allclose(alone.mean, batch.mean[i: i + 1], atol=1e-5)
    # only the previous k observations matter: changing an older one changes nothing
    changed = ids.clone()
    changed[3] = ids[40]
    again = sc.score(changed)
    assert torch.allclose(again.mean[3 + sc.k + 1:], batch.mean[3 + sc.k + 1:], atol=1e-6)
    assert not torch.allclose(again.mean[3: 3 + sc.k + 1], batch.mean[3: 3 + sc.k + 1])


def test_breakdown_probabilities_are_consistent(pulse_week):
    r = Scorer(pulse_week).score(_pulse_ids(0.01))
    for b in r.breakdown(2):
        assert b["prob"] == pytest.approx(math.exp(-b["surprise"]))


# --- the nerve ---------------------------------------------------------------------------


def test_nerve_falls_back_to_the_threshold_rule_without_labels():
    n = Nerve()
    calm = n.decide({"pulse": 0.3, "rhythm": 0.2, "drift": 0.1}, 14, 2)
    storm = n.decide({"pulse": 6.0}, 3, 6)
    assert calm.action == "ok" and storm.action == "alert"
    assert calm.policy.startswith("rule:") and sum(storm.probs.values()) == pytest.approx(1.0)


def test_nerve_learns_from_human_labels_only():
    labels = []
    for i in range(25):
        labels.append(Label({"pulse": 8.0 + i % 3}, 3, 6, "suppress"))  # weekend night backups
        labels.append(Label({"pulse": 8.0 + i % 3}, 14, 2, "alert"))
        labels.append(Label({"pulse": 0.2}, 14, 2, "ok"))
    n = Nerve(train_nerve(labels))
    assert n.learned
    night = n.decide({"pulse": 9.0}, 3, 6)
    day = n.decide({"pulse": 9.0}, 14, 2)
    assert night.action == "suppress" and day.action == "alert"
    assert night.policy.startswith("model:")
    assert sum(day.probs.values()) == pytest.approx(1.0)
    few = Nerve(train_nerve(labels[:5]))
    assert not few.learned  # under min_labels: still the rule
    with pytest.raises(ValueError, match="not one of"):
        train_nerve([Label({"pulse": 1}, 1, 1, "panic")])


def test_a_learned_nerve_must_keep_the_owners_promise_on_held_out_labels():
    """On folds of the owner's own labels: no fewer alerts on approved incidents than the
    rule, no more on dismissed readings; else the learned nerve is not trusted."""
    thr = {"pulse": 4.0, "rhythm": 4.0, "drift": 4.0}
    good = []
    for i in range(12):
        good.append(Label({"pulse": 8.0 + i % 3}, 14, 2, "alert", thr))  # real incidents by day
        good.append(Label({"pulse": 8.0 + i % 3}, 3, 6, "ok", thr))  # the weekend-night backup, dismissed
        good.append(Label({"pulse": 0.5}, 14, 2, "ok", thr))
    check = fold_check(good, steps=200)
    assert check["passed"], check["reason"]
    assert check["approved"]["learned"] >= check["approved"]["rule"] == 12
    assert check["dismissed"]["learned"] < check["dismissed"]["rule"]  # it learned to leave backups alone
    # the same incidents, mostly dismissed: a nerve trained on that would miss the approved ones
    muddled = [Label({"pulse": 9.0}, 14, 2, "ok" if i % 4 else "alert", thr) for i in range(24)]
    bad = fold_check(muddled, steps=200)
    assert not bad["passed"] and "the rule stays" in bad["reason"]
    assert bad["approved"]["learned"] < bad["approved"]["rule"]


# --- synthetic data ----------------------------------------------------------------------


def test_synthetic_data_is_reproducible_and_labelled():
    def digest(seed: int) -> str:
        w = synth.world(7, seed=seed, anomalies={"spike": 2, "busy_idle_owner": 1, "night_activity": 1})
        return hashlib.sha256(json.dumps({a: (s.times, s.rows, s.labels) for a, s in w.items()}).encode()).hexdigest()

    assert digest(1) == digest(1)
    assert digest(1) != digest(2)
    w = synth.world(7, seed=1, anomalies={"spike": 2, "busy_idle_owner": 1, "night_activity": 1, "overload": 1})
    assert {"spike", "busy_idle_owner"} <= set(w["pulse"].labels)
    assert set(w["rhythm"].labels) == {None, "night_activity"}  # the sleeping owner looks normal
    assert "overload" in w["drift"].labels
    assert w["pulse"].times[0] == synth.EPOCH
    # every generated row is valid for its atom
    for atom, series in w.items():
        encode_many(S.get(atom), series.rows)


def test_impossible_anomaly_placement_is_an_error():
    with pytest.raises(ValueError, match="could not place"):
        synth.events(0, 2, synth.EPOCH, {"night_activity": 1})  # Mon-Tue: no weekend night
    with pytest.raises(ValueError, match="unknown anomaly class"):
        synth.events(0, 7, synth.EPOCH, {"meteor": 1})


def test_scoring_distinct_windows_once_is_exact(pulse_week):
    from kiri.model.score import window_keys

    sc = Scorer(pulse_week)
    ids = _pulse_ids(1, seed=9)  # a day of 30 s data: a few dozen distinct windows
    w = windows(ids, sc.k)
    keys = window_keys(S.PULSE, w)
    assert len(torch.unique(keys)) == len(torch.unique(w, dim=0)) < len(w) // 10  # no collisions, many repeats
    assert torch.allclose(sc._surprise(w), sc._forward(w), atol=1e-6)
    # an atom whose windows overflow one int64 key falls back to row-wise dedupe
    big = S.AtomSchema("wide", tuple(S.Field(chr(65 + i), f"f{i}", 0, 1, 100) for i in range(6)),
                       size=S.ModelSize(block_size=16))
    assert window_keys(big, torch.zeros((3, 13), dtype=torch.long)) is None


def test_a_scorer_remembers_windows_across_calls_and_stays_exact(pulse_week, monkeypatch):
    """A Scorer from weights scores a stream batch by batch as one whole call would, and
    computes again only windows no earlier batch had; when its memo fills up it forgets and
    stays exact."""
    import kiri.model.score as SM

    ids = _pulse_ids(1, seed=4)
    whole = Scorer(pulse_week)
    whole._memo = None  # the reference remembers nothing
    want = whole.score(ids, start=1).surprise

    default = SM.MEMO_WINDOWS

    def batches(capacity: int | None) -> tuple[Scorer, list[int], torch.Tensor]:
        monkeypatch.setattr(SM, "MEMO_WINDOWS", capacity or default)
        sc = Scorer(pulse_week)
        if capacity is None:
            sc._memo = None
        computed: list[int] = []
        forward = sc._forward
        monkeypatch.setattr(sc, "_forward", lambda w: computed.append(len(w)) or forward(w))
        got = torch.cat([sc.score(ids[max(0, i - 1): i + 300], start=1).surprise for i in range(0, len(ids), 300)])
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
        return sc, computed, got

    _, plain, _ = batches(None)
    sc, first, got = batches(default)
    assert 0 < sum(first) < sum(plain) / 2  # a day of pulse repeats its windows from batch to batch
    computed_again: list[int] = []
    forward = sc._forward
    monkeypatch.setattr(sc, "_forward", lambda w: computed_again.append(len(w)) or forward(w))
    again = torch.cat([sc.score(ids[max(0, i - 1): i + 300], start=1).surprise for i in range(0, len(ids), 300)])
    assert sum(computed_again) == 0 and torch.equal(again, got)  # every window remembered
    small, _, _ = batches(40)  # forgets whenever 40 would be exceeded, and stays exact
    assert small._memo and all(len(m.slot) <= 40 for m in small._memo.values())
    # a Scorer over a model that may still train remembers nothing
    assert Scorer.from_model(S.PULSE, pulse_week.model, 1)._memo is None
