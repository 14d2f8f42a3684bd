"""Detection: fitted tokens, calibrated tail probabilities, robust training, the library API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiri.model import calibrate as cal
from kiri.model import schema as S
from kiri.model import streams
from kiri.model.codec import Codec, values_of
from kiri.model.detect import Detector
from kiri.model.gpt import Atom
from kiri.model.score import Scorer
from kiri.model.train import TrainConfig, Trainer
from kiri.model.weights import load_weights, save_weights

ONE = S.AtomSchema("level", (S.Field("V", "value", 0, 100, 32),))


# --- codec ------------------------------------------------------------------------------------

def test_fitted_codec_keeps_outer_buckets_for_levels_never_seen() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(40, 2, (500, 1))
    codec = Codec.fit(ONE, values)
    b = codec.buckets(np.array([[40.0], [10.0], [90.0], [values.min()], [values.max()]]))[:, 0]
    top = len(codec.edges[0])
    assert b[1] == 0 and b[2] == top  # far below / above anything seen: their own buckets
    assert 0 < b[3] < top and 0 < b[4] < top  # the seen extremes are inside
    used = len(np.unique(codec.buckets(values)[:, 0]))
    fixed = len(np.unique(Codec.fixed(ONE).buckets(values)[:, 0]))
    assert used >= 12 and used >= 2 * fixed  # resolution where the data lives (down to a quarter declared bucket)


def test_discrete_field_gets_a_bucket_per_value_and_codec_round_trips() -> None:
    values = np.array([[v] for v in [0, 1, 2, 3, 2, 1, 0, 3, 2, 1, 1, 2]], dtype=float)
    codec = Codec.fit(ONE, values)
    b = codec.buckets(np.array([[0.0], [1.0], [2.0], [3.0]]))[:, 0]
    assert len(set(b.tolist())) == 4
    again = Codec.from_dict(ONE, codec.to_dict())
    assert again.edges == codec.edges and again.fitted == codec.fitted
    with pytest.raises(ValueError, match="edges"):
        Codec.from_dict(ONE, {"kind": "fitted/1", "fields": {"value": {"edges": [3.0, 1.0]}}})
    with pytest.raises(ValueError, match="unknown codec"):
        Codec.from_dict(ONE, {"kind": "nope"})


def test_fixed_codec_is_the_schemas_own_buckets() -> None:
    rows = [{"cpu": c, "mem": 50, "disk": 40, "swap": 5, "load": 1, "net": 1} for c in (0, 9.99, 10, 55, 100, 250)]
    ids = Codec.fixed(S.PULSE).encode(values_of(S.PULSE, rows))
    assert ids.tolist() == [S.PULSE.encode(r) for r in rows]


# --- calibration --------------------------------------------------------------------------------

def test_tail_probabilities_are_uniform_on_fresh_normal_scores() -> None:
    rng = np.random.default_rng(1)
    ref = rng.gamma(2.0, 0.5, 3000)
    fresh = rng.gamma(2.0, 0.5, 20000)
    p = cal.Tail.fit(ref).sf(fresh)
    for level in (0.5, 0.2, 0.1, 0.05, 0.01):
        assert (p < level).mean() == pytest.approx(level, rel=0.35, abs=0.004)


def test_a_few_percent_of_far_anomalies_do_not_move_the_threshold() -> None:
    rng = np.random.default_rng(2)
    clean = rng.gamma(2.0, 0.5, 3000)
    dirty = np.concatenate([clean, rng.uniform(8, 12, 150)])  # 5% far out
    t_clean = cal.Tail.fit(clean).isf(1e-3)
    t_dirty = cal.Tail.fit(dirty).isf(1e-3)
    assert t_dirty == pytest.approx(t_clean, rel=0.15)
    assert t_dirty < 8  # the anomalies stay above it: contamination does not silence


def test_sustained_unusualness_alarms_where_no_single_reading_does() -> None:
    rng = np.random.default_rng(3)
    ref = rng.gamma(2.0, 0.5, 3000)
    c = cal.Calibration.fit(ref)
    stretch = np.full(12, np.quantile(ref, 0.97))  # each reading alone: p ~ 0.03
    p = c.tail_p(stretch, prefix=rng.gamma(2.0, 0.5, 10))
    assert c.point_p(stretch).min() > 0.01
    assert p[-1] < 1e-3


def test_nerve_rule_two_ordinary_highs_are_not_an_alarm_one_extreme_is() -> None:
    rate = cal.alarm_rate(cal.DEFAULT_ALARMS_PER_WEEK, 300.0)
    assert cal.combine([0.1, 0.1]) > 0.1
    assert cal.combine([0.02, 0.02, 0.5]) > rate
    assert cal.combine([1e-6, 0.9]) < rate
    assert cal.combine([1e-3, 1e-3]) < cal.combine([1e-3, 0.5])  # both mildly off beats one
    assert cal.fisher([0.5]) == pytest.approx(0.5)


def test_alarm_budget_is_checked() -> None:
    assert cal.alarm_rate(2, 300) == pytest.approx(2 * 300 / (7 * 86400))
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alarms per week"):
            cal.alarm_rate(bad, 300)


def test_clumpy_scores_do_not_make_ordinary_readings_look_extreme() -> None:
    # quantized streams score in clumps: here the 90th and 98th percentiles coincide, and a
    # tail scaled by their spread alone would call the next clump one in a million
    rng = np.random.default_rng(4)

    def draw(n: int) -> np.ndarray:
        return rng.choice([0.1, 0.9, 1.9, 2.4], size=n, p=[0.5, 0.38, 0.11, 0.01]) + rng.normal(0, 0.01, n)

    tail = cal.Tail.fit(draw(3000))
    assert tail.sf(2.4) > 1e-3  # one reading in a hundred is not a one-in-a-thousand alarm
    fresh = tail.sf(draw(20000))
    assert (fresh < 1e-3).mean() < 2e-3


def test_retrains_calibrate_on_alarms_too_so_ordinary_extremes_stop_alarming() -> None:
    """A plateau stream's steps are its normal. Its retrains calibrate on every score the
    stream got while watched, alarms included: left out, each step that once alarmed made the
    next calibration thinner and alarmed again (these two streams: 9.5 and 13.6 alarms a week
    against a budget of 2 when the alarms were left out)."""
    torch.set_num_threads(1)
    n = 4000
    learn = streams.learn_size(n)
    alarms, weeks = 0, 0.0
    for seed in (0, 3):
        st = streams.generate("plateaus", n=n, seed=100 + seed, anomalies=0)
        det = Detector(interval=st.interval, seed=seed).fit(st.values[:learn])
        alarms += int(det.score(st.values[learn:]).anomalous.sum())
        weeks += (n - learn) * st.interval / cal.WEEK
    assert det.retrains >= 10
    assert alarms / weeks <= 1.5 * cal.DEFAULT_ALARMS_PER_WEEK  # the budget, give or take half


def test_trimming_leaves_out_only_windows_a_blind_guess_beats() -> None:
    from kiri.model.train_step import trimmed

    logp = torch.tensor([-0.1, -9.0, -6.0, -0.2, -12.0, -5.0, -0.3, -0.1, -0.2, -0.4])
    weight = torch.full((10,), 0.1)
    out = trimmed(logp, weight, share=0.3, floor=7.0)  # a blind guess scores -7
    assert out[1] == 0 and out[4] == 0  # the two windows worse than blind are left out
    assert (out[[0, 2, 3, 5, 6, 7, 8, 9]] > 0).all()  # hard but better than blind: kept
    assert float(out.sum()) == pytest.approx(1.0)
    assert torch.equal(trimmed(logp, weight, share=0.3, floor=20.0), weight)  # nothing that bad


def spiked(seed: int, learn: int, spikes: int, later: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seasonal stream of 1,500 readings whose first ``learn`` hold ``spikes`` spikes nobody
    labelled, and with more at ``later``: (values, the history's spikes, the later ones)."""
    values = streams.generate("seasonal", n=1500, seed=seed, anomalies=0).values.copy()
    rng = np.random.default_rng(seed)
    history = rng.choice(np.arange(10, learn), size=spikes, replace=False)
    values[history] = rng.uniform(150, 160, len(history))
    values[later] = rng.uniform(150, 160, len(later))
    return values, history, np.array(later)


def test_anomalies_recurring_in_the_history_do_not_silence_the_atom() -> None:
    # a history with 3% spikes, nobody told: they must still alarm when they come again
    torch.set_num_threads(1)
    values, _, later = spiked(5, 700, 21, [800, 950, 1100, 1250, 1400])
    out = Detector(interval=300.0, learn=False).fit(values[:700]).score(values[700:])
    assert out.flagged[later - 700].sum() >= 4, out.tail_p[later - 700]
    assert out.flagged.sum() <= len(later) + 3
    # two defences, each enough alone: a first fit sets the spikes aside before it trains,
    # as a cluster past a gap in the values (``robust.beyond_gap``), so even an untrimmed
    # Detector catches them ...
    untrimmed = Detector(interval=300.0, learn=False, config=TrainConfig(trim=0.0)).fit(values[:700])
    assert untrimmed.score(values[700:]).flagged[later - 700].sum() >= 4
    # ... and the trimmed likelihood keeps a model that does see them from learning them
    from kiri.model import robust
    from kiri.model.detect import schema_for

    learn = values[:700].reshape(-1, 1)
    rate = cal.alarm_rate(cal.DEFAULT_ALARMS_PER_WEEK, 300.0)
    tail_p = []
    for trim in (0.0, 0.1):
        _, blob = robust.train_once(schema_for(learn), learn, TrainConfig(trim=trim), None, rate)
        sc = Scorer(load_weights(blob))
        p = sc.tail_p(sc.score(sc.encode(values.reshape(-1, 1)), values=values.reshape(-1, 1)).mean.numpy())
        tail_p.append(p[later])
    plain, trimmed = tail_p
    assert (trimmed < plain).all(), tail_p  # every one of them more surprising
    assert (trimmed < rate).sum() >= 4 and (trimmed < rate).sum() > (plain < rate).sum(), tail_p


def test_a_cluster_apart_from_the_rest_is_set_aside_a_heavy_tail_is_not() -> None:
    from kiri.model import robust
    from kiri.model.detect import schema_for

    values, history, _ = spiked(3, 1000, 40, [])  # 4%: past a gap above the daily range
    learn = values[:1000].reshape(-1, 1)
    apart = robust.beyond_gap(schema_for(learn), learn)
    assert set(np.flatnonzero(apart).tolist()) == set(history.tolist())
    for seed in range(4):  # latency with Student-t bursts: extremes that decay, no gap
        heavy = streams.generate("heavy_tail", n=1000, seed=seed, anomalies=0).values.reshape(-1, 1)
        assert not robust.beyond_gap(schema_for(heavy), heavy).any()
        counts = streams.generate("counts", n=1000, seed=seed, anomalies=0).values.reshape(-1, 1)
        assert not robust.beyond_gap(schema_for(counts), counts).any()  # discrete: a bucket per value


def test_a_model_that_never_saw_the_blatant_anomalies_finds_the_ones_half_learned() -> None:
    from kiri.model import robust
    from kiri.model.detect import schema_for

    # 5% of a history are spikes: the model that saw them all half-learns them
    values, history, later = spiked(2, 1000, 50, [1100, 1200, 1300, 1400, 1450])
    learn = values[:1000].reshape(-1, 1)
    rate = cal.alarm_rate(cal.DEFAULT_ALARMS_PER_WEEK, 300.0)
    _, first = robust.train_once(schema_for(learn), learn, TrainConfig(), None, rate)
    assert robust.judge(first, learn)[history].sum() < 25  # the first judgement finds under half
    det = Detector(interval=300.0, learn=False).fit(values[:1000])
    assert det.flags[history].sum() >= 40  # the second, by a model trained without those, most of the rest
    assert det.flags.sum() - det.flags[history].sum() <= 1  # and next to nothing normal
    out = det.score(values[1000:])
    assert out.flagged[later - 1000].all(), out.tail_p[later - 1000]
    assert out.flagged.sum() <= len(later) + 2


# --- training sized to its data ------------------------------------------------------------------

def test_sized_training_stops_early_and_resumes_bitwise() -> None:
    torch.set_num_threads(1)
    st = streams.generate("seasonal", n=700, seed=0, anomalies=0)
    codec = Codec.fit(ONE, st.values.reshape(-1, 1))
    ids = codec.encode(st.values.reshape(-1, 1))
    whole = Trainer(ONE, ids, TrainConfig(), codec=codec)
    whole.run()
    assert whole.finished and whole.stopped and whole.step_no < whole.total_steps  # early stopping ran
    assert whole.k == 2  # 700 observations: a short context, not the 15 that fit
    half = Trainer(ONE, ids, TrainConfig(), codec=codec)
    half.run(until=whole.step_no // 2)
    resumed = Trainer.resume(ONE, ids, half.state_bytes())
    assert Trainer.state_codec(ONE, half.state_bytes()).edges == codec.edges
    resumed.run()
    assert resumed.step_no == whole.step_no
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_weights_carry_codec_and_calibration_and_say_what_they_judged_anomalous() -> None:
    st = streams.generate("seasonal", n=900, seed=1, anomalies=0)
    det = Detector(interval=300.0).fit(st.values)
    info = load_weights(det.blob).info
    assert info["codec"]["kind"] == "fitted/1" and info["calibration"]["kind"] == "tail/1"
    assert info["scoring"] == "excess/2" and 0 <= info["judged_anomalous"] < 0.02
    assert info["threshold"] == pytest.approx(det.scorer.calibration.threshold(info["alarm_rate"]))


# --- the detector as a user calls it ------------------------------------------------------------

def test_detector_catches_spikes_and_stays_within_budget_on_clean_data() -> None:
    st = streams.generate("seasonal", n=3000, seed=4, anomalies=0)
    values = st.values.copy()
    spikes = [1200, 1700, 2300, 2800]
    values[spikes] += 60
    det = Detector(interval=300.0).fit(values[:600])
    out = det.score(values[600:])
    flagged = set((np.nonzero(out.anomalous)[0] + 600).tolist())
    assert len(set(spikes) & flagged) >= 3
    weeks = 2400 * 300 / (7 * 86400)
    false = len(flagged - set(spikes))
    assert false <= 4 * cal.DEFAULT_ALARMS_PER_WEEK * weeks + 2
    assert det.retrains >= 7  # retrained daily while scoring
    blame = out.blame(spikes[0] - 600)
    assert blame[0]["field"] == "x0" and blame[0]["surprise"] > 3


def test_a_heavy_tails_next_extreme_scores_like_the_highest_seen_a_reading_far_past_alarms() -> None:
    """Latency with Student-t bursts: one reading in a few hundred lies past anything the
    first days held. Graded by how far past (``score.Scorer``), those score like the highest
    seen readings, where the beyond token alone priced each like a runaway; a reading far
    past keeps the token's surprise and alarms."""
    torch.set_num_threads(1)
    st = streams.generate("heavy_tail", n=2000, seed=1, anomalies=0)
    values = st.values.copy()
    spikes = np.array([1300, 1700])
    values[spikes] = values[:700].max() * 12
    det = Detector(interval=300.0, learn=False).fit(values[:700])
    sc = det.scorer
    rows = values.reshape(-1, 1)
    ids = sc.encode(rows)
    graded = sc.score(ids, start=700, values=rows).mean.numpy()
    token_only = sc.score(ids, start=700).mean.numpy()  # without the values: the token is all there is
    tail = sc.codec.tails[0]
    past = np.flatnonzero(values[700:] >= sc.codec.edges[0][-1])
    ordinary = np.setdiff1d(past, spikes - 700)
    assert tail is not None and tail.log and len(ordinary) >= 3  # a heavy tail's new extremes
    assert (graded[past] <= token_only[past] + 1e-6).all()  # never more surprising than the token
    assert np.mean(token_only[ordinary] - graded[ordinary]) > 1.0, (graded[ordinary], token_only[ordinary])
    far = spikes - 700  # twelve times the highest seen: the token's own surprise, an alarm
    assert np.allclose(graded[far], token_only[far]) and (sc.tail_p(graded[far]) < det.alarm_rate).all()
    out = det.score(values[700:])
    assert set(np.flatnonzero(out.anomalous).tolist()) >= set((spikes - 700).tolist())


def test_a_drifting_stream_is_refitted_and_keeps_being_scored() -> None:
    st = streams.generate("drift", n=2400, seed=0, anomalies=0)
    det = Detector(interval=300.0).fit(st.values[:600])
    top_before = det.scorer.codec.edges[0][-1]
    out = det.score(st.values[600:])
    assert det.scorer.codec.edges[0][-1] > top_before + 50  # the edges moved with the level
    last_day = out.flagged[-288:]
    assert last_day.mean() < 0.5  # still telling normal from not, not one long alarm


def test_old_weights_without_codec_or_calibration_score_as_before() -> None:
    model = Atom.for_schema(S.PULSE)
    model.init_weights(torch.Generator().manual_seed(0))
    blob = save_weights(S.PULSE, model, {"threshold": 2.0, "context": 1})
    sc = Scorer(load_weights(blob))
    assert sc.calibration is None and not sc.ordinal and sc.codec.fitted == (False,) * 6
    rows = [{"cpu": 10 * i % 100, "mem": 50, "disk": 40, "swap": 5, "load": 1, "net": 1} for i in range(20)]
    ids = sc.encode(values_of(S.PULSE, rows))
    r = sc.score(ids)
    w = torch.cat([torch.zeros(1, dtype=torch.long), ids[4:6].reshape(-1)]).unsqueeze(0)
    with torch.no_grad():
        logp = torch.log_softmax(model(w[:, :-1], last=6), dim=-1)[0]
    want = -logp.gather(1, ids[5].view(-1, 1)).view(-1)
    assert torch.allclose(r.surprise[5], want, atol=1e-5)
    assert sc.verdicts(r.mean, sc.tail_p(r.mean)).tolist() == (r.mean > 2.0).tolist()


def _fitted_pulse(seed: int = 0) -> tuple[Atom, Codec, torch.Tensor]:
    from kiri.model import synth

    rows = synth.generate("pulse", 1, seed=seed, interval=300.0, event_list=[]).rows
    values = values_of(S.PULSE, rows)
    codec = Codec.fit(S.PULSE, values)
    model = Atom.for_schema(S.PULSE)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model, codec, codec.encode(values)


def test_excess_scoring_is_the_surprise_beyond_what_the_model_expected() -> None:
    """``excess/1``: each field's ordinal surprise minus its expectation under the model's own
    prediction, sum_b p(b)·s(b), checked against a brute force that scores every bucket."""
    model, codec, ids = _fitted_pulse()
    k = 1
    plain = Scorer.from_model(S.PULSE, model, k, codec=codec)  # -log p(token)
    ordinal = Scorer.from_model(S.PULSE, model, k, ordinal=True, codec=codec)
    excess = Scorer.from_model(S.PULSE, model, k, excess=True, codec=codec)
    got = excess.score(ids)
    assert torch.allclose(got.surprise, ordinal.score(ids).surprise, atol=1e-5)  # blame stays the surprise
    assert torch.allclose(got.mean, got.surprise.mean(dim=1) - got.expected.mean(dim=1), atol=1e-6)
    for t in (5, 40, 200):
        want = []
        for j, (off, f) in enumerate(zip(S.PULSE.offsets(), S.PULSE.fields, strict=True)):
            total = 0.0
            for b in range(f.buckets):
                alt = ids[: t + 1].clone()
                alt[t, j] = off + b
                p = float(torch.exp(-plain.score(alt, start=t).surprise[0, j]))
                total += p * float(ordinal.score(alt, start=t).surprise[0, j])
            want.append(total)
        assert torch.allclose(got.expected[t], torch.tensor(want), atol=1e-4), (t, got.expected[t], want)


def test_a_reading_past_the_seen_range_is_graded_by_how_far_past_it_is() -> None:
    """A beyond-range token's surprise is the nearest seen bucket's plus one nat per tail scale
    past the edge, or the token's own if that is less; only with the raw values to measure."""
    _, codec, ids = _fitted_pulse()
    trainer = Trainer(S.PULSE, ids, TrainConfig(steps=150, seed=0), codec=codec)
    trainer.run()  # a model that never saw a beyond token: it prices one far above its neighbour
    model = trainer.model.eval()
    assert codec.tails is not None and codec.tails[0] is not None and codec.tails[0].high is not None
    again = Codec.from_dict(S.PULSE, codec.to_dict())
    assert again.tails == codec.tails  # the scales travel with the weights
    untailed = {"kind": "fitted/1", "fields": {f: {k: v for k, v in spec.items() if k != "tail"}
                                               for f, spec in codec.to_dict()["fields"].items()}}
    assert Codec.from_dict(S.PULSE, untailed).tails is None  # codecs from before: no grading
    for hostile in ({"seen": [5.0, 1.0], "high": 1.0}, {"seen": [1.0, 2.0], "high": -1.0}, {"seen": "x"},
                    {"seen": [1.0, 2.0], "low": True}, {"log": True, "seen": [0.0, 3.0], "high": 1.0},
                    {"seen": [1.0, float("inf")]}, [1, 2]):
        spec = {**untailed["fields"]["cpu"], "tail": hostile}
        with pytest.raises(ValueError, match="codec tail for field 'cpu'"):
            Codec.from_dict(S.PULSE, {"kind": "fitted/1", "fields": {**untailed["fields"], "cpu": spec}})
    sc = Scorer.from_model(S.PULSE, model, 1, excess=True, codec=codec)
    assert sc.graded
    from kiri.model import synth

    rows = synth.generate("pulse", 1, seed=0, interval=300.0, event_list=[]).rows
    values = values_of(S.PULSE, rows)
    t, top, tail = 100, codec.edges[0][-1], codec.tails[0]
    assert tail.seen[1] == values[:, 0].max() < top
    scale = tail.high

    def at(steps: float) -> float:  # ``steps`` tail scales past the highest value trained on
        return tail.seen[1] * np.exp(steps * scale) if tail.log else tail.seen[1] + steps * scale

    edge = (np.log(top / tail.seen[1]) if tail.log else top - tail.seen[1]) / scale
    base = values[: t + 1].copy()
    near_seen = base.copy()
    near_seen[t, 0] = codec.edges[0][-2]  # the highest seen bucket
    s_near = float(sc.score(codec.encode(near_seen), start=t, values=near_seen).surprise[0, 0])
    raw = None
    got = []
    for steps in (edge, edge + 0.5, edge + 2.0, edge + 6.0, edge + 60.0):
        v = base.copy()
        v[t, 0] = at(steps)
        ids_v = codec.encode(v)
        assert int(ids_v[t, 0]) - S.PULSE.offsets()[0] == len(codec.edges[0])  # the beyond token
        plain = float(sc.score(ids_v, start=t).surprise[0, 0])  # no values: the token alone
        raw = plain if raw is None else raw
        assert plain == pytest.approx(raw)  # the token cannot tell how far
        graded = float(sc.score(ids_v, start=t, values=v).surprise[0, 0])
        assert graded == pytest.approx(min(raw, s_near + steps), abs=1e-4)
        got.append(graded)
    assert got == sorted(got)  # farther is never less surprising
    assert got[0] < raw - 0.1 and got[-1] == pytest.approx(raw)  # just past: graded; far past: the token's own
    mean_graded = sc.score(codec.encode(base), start=t, values=base).mean
    assert torch.allclose(mean_graded, sc.score(codec.encode(base), start=t).mean)  # inside the range: as before


def test_the_clock_is_read_but_never_judged() -> None:
    """``excess/2``: hour and weekday condition the model but are left out of the score, so a
    row whose clock alone is unexpected (a new day, the hour bucket turning over) scores
    exactly as with its usual clock; ``excess/1`` weights still average every field."""
    from kiri.model import synth

    values = values_of(S.RHYTHM, synth.generate("rhythm", 2, seed=0, interval=300.0, event_list=[]).rows)
    codec = Codec.fit(S.RHYTHM, values)
    model = Atom.for_schema(S.RHYTHM)
    model.init_weights(torch.Generator().manual_seed(0))
    ids = codec.encode(values)
    assert [S.RHYTHM.fields[i].name for i in S.RHYTHM.judged] == ["idle", "activity"]
    odd = ids.clone()
    t = 100
    hour, weekday = S.RHYTHM.names.index("hour"), S.RHYTHM.names.index("weekday")
    for j in (hour, weekday):  # another bucket of the same field
        off, top = S.RHYTHM.offsets()[j], S.RHYTHM.offsets()[j] + S.RHYTHM.fields[j].buckets - 1
        odd[t, j] = off if int(ids[t, j]) != off else top
    for scoring, cols in (("excess/2", [0, 1]), ("excess/1", [0, 1, 2, 3])):
        blob = save_weights(S.RHYTHM, model, {"context": 1, "codec": codec.to_dict(), "scoring": scoring})
        sc = Scorer(load_weights(blob))
        got, changed = sc.score(ids), sc.score(odd)
        assert torch.allclose(got.mean, (got.surprise - got.expected)[:, cols].mean(dim=1), atol=1e-6)
        assert changed.surprise[t, hour] != got.surprise[t, hour]  # the odd clock is seen (and blamed)
        if scoring == "excess/2":
            assert float(changed.mean[t]) == pytest.approx(float(got.mean[t]), abs=1e-6)
        else:
            assert abs(float(changed.mean[t]) - float(got.mean[t])) > 1e-3
    fresh = Scorer.from_model(S.RHYTHM, model, 1, excess=True, codec=codec).score(ids)  # what training calibrates
    assert torch.allclose(fresh.mean, Scorer(load_weights(save_weights(
        S.RHYTHM, model, {"context": 1, "codec": codec.to_dict(), "scoring": "excess/2"}))).score(ids).mean, atol=1e-6)
    clock_only = S.AtomSchema("clock", (S.Field("H", "hour", 0, 24, 8), S.Field("W", "weekday", 0, 7, 7)))
    assert clock_only.judged == (0, 1)  # nothing else to judge: the clock is all there is


def test_weights_scored_with_ordinal_surprise_keep_it() -> None:
    """Weights made before ``excess/1`` (``scoring: ordinal/1``) score with plain ordinal surprise."""
    model, codec, ids = _fitted_pulse(1)
    blob = save_weights(S.PULSE, model, {"context": 1, "codec": codec.to_dict(), "scoring": "ordinal/1"})
    sc = Scorer(load_weights(blob))
    assert sc.ordinal and not sc.excess
    r = sc.score(ids)
    assert r.expected is None
    want = Scorer.from_model(S.PULSE, model, 1, ordinal=True, codec=codec).score(ids).surprise
    assert torch.allclose(r.surprise, want, atol=1e-6) and torch.allclose(r.mean, want.mean(dim=1), atol=1e-6)


def test_an_incident_alarms_once_at_its_start() -> None:
    from kiri.model.detect import onsets

    flags = np.array([0, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1], dtype=bool)
    # flags fewer than 3 readings apart are one incident; the last one, 4 readings on, is new
    assert onsets(flags, 3).tolist() == [False, True] + [False] * 10 + [True]
    # with a gap of 2, the normal reading at 6 ends the first incident
    assert onsets(flags, 2).tolist() == [False, True] + [False] * 5 + [True] + [False] * 4 + [True]
    assert onsets(np.zeros(0, dtype=bool), 3).tolist() == []


def _seasonal_trainer(steps: int) -> tuple[Trainer, Codec, np.ndarray]:
    """A one-field atom trained on a clean seasonal stream: the trainer, its codec, the values."""
    st = streams.generate("seasonal", n=900, seed=2, anomalies=0)
    values = st.values.reshape(-1, 1)
    codec = Codec.fit(ONE, values)
    t = Trainer(ONE, codec.encode(values), TrainConfig(steps=steps), codec=codec)
    t.run()
    return t, codec, values


def test_calibration_is_fitted_on_the_scores_the_weights_will_give() -> None:
    t, codec, values = _seasonal_trainer(200)
    w = load_weights(t.weights_bytes())
    held = Scorer(w).score(codec.encode(values)).mean[t.held]
    # (excess scores sit near zero: a hundredth of a nat apart is the same; the bug this
    # guards against put them a whole nat apart)
    assert w.info["score_p50"] == pytest.approx(float(held.median()), rel=0.02, abs=0.01)


def test_weights_calibrate_on_the_streams_recent_normal_once_there_is_enough_of_it() -> None:
    t, _, _ = _seasonal_trainer(60)
    rng = np.random.default_rng(0)
    few = rng.exponential(0.3, cal.RECENT_MIN - 1)
    assert load_weights(t.weights_bytes(recent=few)).info["calibrated_on"] == "holdout"
    recent = rng.exponential(0.3, cal.RECENT_MIN)
    w = load_weights(t.weights_bytes(recent=recent, alarm_rate=1e-3))
    calib = cal.Calibration.fit(recent)
    assert w.info["calibrated_on"] == "recent" and cal.Calibration.from_dict(w.info["calibration"]) == calib
    assert w.info["threshold"] == pytest.approx(calib.threshold(1e-3))
    assert w.info["suspect_share"] == pytest.approx(cal.suspect_share(calib, recent))


def test_detector_refuses_what_is_not_a_finite_number() -> None:
    good = np.random.default_rng(0).normal(10, 1, 300)
    for bad in (np.append(good, np.nan), [*good.tolist(), "x"], [{"a": 1.0}, {"a": None}], [[1.0, 2.0], [3.0]]):
        with pytest.raises(ValueError, match=r"finite|numbers"):
            Detector(interval=300.0).fit(bad)
    det = Detector(interval=300.0, learn=False).fit(good)
    with pytest.raises(ValueError, match="row 1"):
        det.score(np.array([10.0, np.inf]))
    with pytest.raises(ValueError, match=r"\[N, 1\]"):
        det.score(np.ones((3, 2)))


def test_candidates_are_judged_on_the_newest_held_out_block() -> None:
    st = streams.generate("seasonal", n=900, seed=3, anomalies=0)
    values = st.values.reshape(-1, 1)
    codec = Codec.fit(ONE, values)
    t = Trainer(ONE, codec.encode(values), TrainConfig(steps=20), codec=codec)
    newest = t.newest_held()
    assert 20 <= len(newest) < len(t.held)
    assert int(newest.max()) == int(t.held.max()) == len(values) - 1  # it ends at the newest observation
    older = t.held[~torch.isin(t.held, newest)]
    assert int(older.max()) < int(newest.min())  # and nothing older is in it


# --- what a retrain leaves out ---------------------------------------------------------------------

def test_a_retrain_leaves_out_alarms_and_only_the_excess_of_suspects() -> None:
    from kiri.model.robust import SUSPECT_P, suspects

    rng = np.random.default_rng(3)
    normal = (np.arange(2000) + 0.5) / 2000  # calibrated normal: SUSPECT_P of it falls under SUSPECT_P
    normal[:3] = [1e-7, 2e-7, 5e-7]  # three of those are alarms
    out = suspects(normal, alarm_rate=1e-5)
    # a heavy tail's ordinary extremes are learned: only the alarms go
    assert out.sum() == 3 and out[:3].all()
    # 150 anomalies on top of it (the judged week of bench/detect.py's composition): the
    # excess over normal's share goes, most extreme first, and they are the anomalies
    p = np.concatenate([normal, rng.uniform(1e-4, 1e-3, 150)])
    out = suspects(p, alarm_rate=1e-5)
    excess = int((p < SUSPECT_P).sum() - np.floor(SUSPECT_P * len(p)))
    assert out.sum() == excess + 0 and out[-150:].sum() >= min(150, excess) - 3
    # a clumpy stream puts far less than SUSPECT_P of its normal there: measured, not assumed
    assert suspects(p, alarm_rate=1e-5, normal_share=0.0).sum() == (p < SUSPECT_P).sum()
    # readings never scored are kept, and do not count towards the share
    q = np.concatenate([np.full(5000, np.nan), rng.uniform(1e-4, 1e-3, 100), rng.uniform(0, 1, 100)])
    out = suspects(q, alarm_rate=1e-5)
    assert not out[:5000].any() and out[5000:5100].sum() >= 90


def test_suspect_share_is_measured_on_normal_scores() -> None:
    # how many normal readings fall under SUSPECT_P depends on the shape of the scores, so it
    # is measured on the held-out ones, and holds on fresh normal data of the same stream
    rng = np.random.default_rng(5)
    shares = []
    for draw in (lambda n: rng.gamma(2.0, 0.5, n), lambda n: np.where(rng.random(n) < 0.1, 1.0, 0.0)):
        c = cal.Calibration.fit(draw(4000))
        held, fresh = cal.suspect_share(c, draw(4000)), cal.suspect_share(c, draw(20000))
        assert abs(held - fresh) < 0.02
        shares.append(fresh)
    assert 0.03 < shares[0] < 0.08  # continuous scores: about SUSPECT_P
    assert abs(shares[1] - cal.SUSPECT_P) > 0.05  # scores in clumps: not at all
