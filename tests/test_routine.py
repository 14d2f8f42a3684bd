"""The day's routine: surprise that recurs at the same time on most days is not an anomaly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiri.model import schema as S
from kiri.model import synth
from kiri.model.codec import Codec, values_of
from kiri.model.gpt import Atom
from kiri.model.routine import Routine, beyond
from kiri.model.score import Scorer
from kiri.model.weights import load_weights, save_weights

DAY_ROWS = 288  # a day at 5 minutes


def clock_rows(days: int, first_weekday: int = 0) -> np.ndarray:
    """[days·288, 4] rhythm-shaped rows (idle, activity, hour, weekday) every 5 minutes."""
    hour = np.tile(np.arange(DAY_ROWS) * 5 / 60, days)
    weekday = np.repeat((first_weekday + np.arange(days)) % 7, DAY_ROWS).astype(float)
    return np.column_stack([np.zeros(len(hour)), np.zeros(len(hour)), hour, weekday])


def at(rows: np.ndarray, hour: float, weekend: bool) -> np.ndarray:
    return np.flatnonzero((np.abs(rows[:, 2] - hour) < 1e-9) & ((rows[:, 3] >= 5) == weekend))


def test_a_slot_surprising_on_most_days_is_routine_and_one_days_surprise_is_not() -> None:
    rows = clock_rows(14)
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 0.5, len(rows))
    scores[at(rows, 8.0, weekend=False)] = 6.0  # getting up, every workday
    scores[at(rows, 10.0, weekend=True)] = 5.0  # and at weekends, later
    odd = at(rows, 3.0, weekend=False)[4]
    scores[odd] = 9.0  # one night's anomaly
    late = at(rows, 12.5, weekend=False)
    scores[late[:3]] = 4.0  # lunch's surprise on 3 of 10 workdays only: not three days in four
    routine = Routine.fit(S.RHYTHM, rows, scores, floor=1.0)
    assert routine is not None and routine.slot_minutes == 5.0
    expected = routine.expected(S.RHYTHM, rows)
    assert np.all(expected[at(rows, 8.0, weekend=False)] == 6.0)
    assert np.all(expected[at(rows, 10.0, weekend=True)] == 5.0)
    assert np.all(expected[at(rows, 10.0, weekend=False)] == 0.0)  # a workday's 10:00 is not a weekend's
    assert np.all(expected[at(rows, 8.0, weekend=True)] == 0.0)
    assert np.all(expected[at(rows, 3.0, weekend=False)] == 0.0)
    assert np.all(expected[late] == 0.0)
    # the readings either side of a routine change carry its routine too (the model may
    # expect the change a reading early or late); two readings away, nothing
    assert np.all(expected[at(rows, 8.0 + 5 / 60, weekend=False)] == 6.0)
    assert np.all(expected[at(rows, 8.0 - 5 / 60, weekend=False)] == 6.0)
    assert np.all(expected[at(rows, 8.0 + 10 / 60, weekend=False)] == 0.0)
    assert np.all(expected[at(rows, 8.0 - 10 / 60, weekend=False)] == 0.0)
    got = beyond(torch.tensor([6.0, 8.5, 0.2, -0.3]), torch.tensor([6.0, 6.0, 0.0, 6.0]))
    assert got.tolist() == pytest.approx([0.0, 2.5, 0.2, -0.3])  # past its routine, a reading still counts
    assert Routine.fit(S.RHYTHM, rows, scores, floor=10.0) is None  # nothing recurs past the floor
    assert Routine.fit(S.AtomSchema("v", (S.Field("V", "value", 0, 1, 8),)), rows[:, :1], scores, 1.0) is None


def test_a_routine_round_trips_and_a_bad_one_is_refused() -> None:
    rows = clock_rows(7)
    scores = np.zeros(len(rows))
    scores[at(rows, 23.0, weekend=False)] = 3.0
    routine = Routine.fit(S.RHYTHM, rows, scores, floor=1.0)
    assert routine is not None
    back = Routine.from_dict(routine.to_dict())
    assert back is not None and np.array_equal(back.table, routine.table)
    assert Routine.from_dict(None) is None
    good = routine.to_dict()
    for bad in ({**good, "kind": "routine/9"}, {**good, "slot_minutes": 0.5},
                {**good, "slots": [[0, 288, 1.0]]}, {**good, "slots": [[2, 0, 1.0]]},
                {**good, "slots": [[0, 0, float("nan")]]}, {**good, "slots": 5}, {**good, "slots": [7]},
                {**good, "slots": [[0, "x", 1.0]]}, {**good, "slots": [[0, 1]]}):
        with pytest.raises(ValueError, match="routine"):
            Routine.from_dict(bad)


def test_weights_with_a_routine_score_beyond_it_when_given_the_values() -> None:
    values = values_of(S.RHYTHM, synth.generate("rhythm", 3, seed=0, interval=300.0, event_list=[]).rows)
    codec = Codec.fit(S.RHYTHM, values)
    model = Atom.for_schema(S.RHYTHM)
    model.init_weights(torch.Generator().manual_seed(0))
    ids = codec.encode(values)
    info = {"context": 2, "codec": codec.to_dict(), "scoring": "excess/2"}
    plain = Scorer(load_weights(save_weights(S.RHYTHM, model, info))).score(ids, values=values).mean
    eight = [i for i in at(values, 8.0, weekend=False) if i >= 2]
    table = Routine.empty(5.0)
    table.table[0, 96] = 1.5  # 8:00 on workdays
    sc = Scorer(load_weights(save_weights(S.RHYTHM, model, {**info, "routine": table.to_dict()})))
    assert sc.routine is not None
    assert torch.equal(sc.score(ids).mean, plain)  # without the values: the plain statistic
    got = sc.score(ids, values=values).mean
    assert eight and torch.allclose(got[eight], torch.maximum(plain[eight] - 1.5, plain[eight].clamp(max=0)))
    others = np.setdiff1d(np.arange(len(values)), eight)
    assert torch.equal(got[others], plain[others])
    assert torch.allclose(sc.score(ids, start=100, values=values).mean, got[100:])
    with pytest.raises(ValueError, match="rows"):
        sc.score(ids, values=values[1:])


def test_a_detector_learns_its_streams_routine_and_its_changes_stop_alarming() -> None:
    """Two weeks of the synthetic owner's rhythm (up at 8:00 on workdays, at the desk at 9:00,
    lunch at 12:30 …; up at 10:00 at weekends): the fitted weights carry the routine, and on
    the following week the schedule's changes are rarely alarms. Without the routine, 26 of
    their 80 readings (a change's and the next) were flagged, and 65 readings in all."""
    from kiri.model.detect import Detector

    start = synth.EPOCH + 14 * synth.DAY
    learn = values_of(S.RHYTHM, synth.generate("rhythm", 14, seed=0, interval=300.0, event_list=[]).rows)
    week = values_of(S.RHYTHM, synth.generate("rhythm", 7, seed=10, start=start, interval=300.0, event_list=[]).rows)
    det = Detector(S.RHYTHM, interval=300.0, seed=0, learn=False).fit(learn)
    assert load_weights(det.blob).info["routine"]["kind"] == "routine/1"
    routine = det.scorer.routine
    assert routine is not None
    changes = {False: (8.0, 9.0, 12.5, 13.5, 18.5, 23.0), True: (10.0, 11.0, 13.0, 15.0, 18.0)}
    on_change = np.zeros(len(week), dtype=bool)  # a change's reading and the next
    for weekend, hours in changes.items():
        for h in hours:
            on_change[at(week, h, weekend)] = on_change[at(week, h + 5 / 60, weekend)] = True
    learned = routine.expected(S.RHYTHM, week) > 0
    assert learned[on_change & (week[:, 3] < 5)].any() and learned[on_change & (week[:, 3] >= 5)].any()
    flagged = det.score(week).flagged
    # 6 on one machine, 8 on another (torch's float kernels differ by CPU): a third of 26 either way
    assert flagged[on_change].sum() <= 9, np.flatnonzero(flagged & on_change)


def test_weights_show_says_how_much_routine_a_version_learned(hub) -> None:
    """Over the real hub and CLI: a version with a routine says so in ``kiri weights show``;
    one without says nothing of it."""
    import base64

    from tests.test_cli import kiri

    model = Atom.for_schema(S.RHYTHM)
    model.init_weights(torch.Generator().manual_seed(0))
    table = Routine.empty(5.0)
    table.table[0, [96, 97, 150]] = 2.0  # 8:00, 8:05 and 12:30 on workdays
    table.table[1, 120] = 1.0  # 10:00 at weekends
    for info in ({"context": 2}, {"context": 2, "routine": table.to_dict()}):
        blob = save_weights(S.RHYTHM, model, info)
        hub.client().call("import_weights", {"atom": "rhythm", "blob": base64.b64encode(blob).decode()})
    assert "routine" not in kiri(hub, "weights", "show", "rhythm:1").stdout
    shown = kiri(hub, "weights", "show", "rhythm:2").stdout
    assert "routine      4 slots of 5 min (3 on workdays, 1 at weekends)" in shown, shown
