"""Observations in through the protocol and the CLI: validated, atomic, line-exact errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiri.protocol import Conflict, InvalidParams, NotFound
from tests.test_cli import kiri

PULSE_ROW = {"cpu": 50, "mem": 50, "disk": 40, "swap": 10, "load": 1, "net": 1}


def _count(hub, atom: str = "pulse") -> int:
    return hub.sql("select count(*) from observations where atom=?", atom)[0][0]


def test_observe_drift_kiri_style_fills_the_clock(hub):
    out = kiri(hub, "observe", "drift", "--added", "3", "--completed=1", "switched=2", "--time", "1704193200")
    assert "stored observation 1 for drift" in out.stdout
    (data,) = hub.sql("select data from observations where atom='drift'")[0]
    values = json.loads(data)
    assert values["added"] == 3 and values["completed"] == 1 and values["switched"] == 2
    assert 0 <= values["hour"] < 24 and 0 <= values["weekday"] <= 6  # from the observation's local time


@pytest.mark.parametrize(("args", "needle"), [
    (["pulse", "cpu=abc", "mem=1", "disk=1", "swap=1", "load=1", "net=1"], "'cpu': 'abc' is not a number"),
    (["pulse", "cpu=1"], "missing field 'mem'"),
    (["pulse", "cpu=nan", "mem=1", "disk=1", "swap=1", "load=1", "net=1"], "not a finite number"),
    (["pulse", "cpu=inf", "mem=1", "disk=1", "swap=1", "load=1", "net=1"], "not a finite number"),
    (["pulse", "cpu=1", "mem=1", "disk=1", "swap=1", "load=1", "net=1", "gpu=3"], "unknown field 'gpu'"),
    (["weather", "temp=3"], "unknown atom 'weather'"),
    (["pulse", "--cpu"], "missing a value"),
    (["pulse", "cpu=1", "cpu=2"], "given twice"),
])
def test_bad_single_observations_are_refused(hub, args, needle):
    out = kiri(hub, "observe", *args, ok=False)
    assert out.returncode in (1, 2) and needle in out.stderr, out.stderr
    assert hub.sql("select count(*) from observations")[0][0] == 0


def test_out_of_range_values_are_legal_and_land_in_the_edge_bucket(hub):
    out = kiri(hub, "observe", "pulse", "cpu=250", "mem=-3", "disk=40", "swap=10", "load=99", "net=1")
    assert "C9 M0 D4 S0 L4 N1" in out.stdout


def _write(path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_bulk_jsonl_is_all_or_nothing_with_exact_lines(hub, tmp_path):
    f = tmp_path / "data.jsonl"
    good = [{**PULSE_ROW, "time": 1704067200 + 30 * i} for i in range(5000)]
    rows = [*good[:10], "{broken json", {**PULSE_ROW, "cpu": "NaN"}, {"cpu": 1}, *good[10:]]
    _write(f, rows)
    out = kiri(hub, "observe", "pulse", "--file", str(f), ok=False)
    assert out.returncode == 1
    assert "line 11: not valid JSON" in out.stderr and "line 12: field 'cpu'" in out.stderr
    assert "line 13: pulse: missing field 'mem'" in out.stderr and "nothing was imported" in out.stderr
    assert _count(hub) == 0
    res = json.loads(kiri(hub, "--json", "observe", "pulse", "--file", str(f), "--skip-bad").stdout)
    assert res["stored"] == 5000 and [s["line"] for s in res["skipped"]] == [11, 12, 13]
    assert _count(hub) == 5000  # several chunks, one commit
    times = [r[0] for r in hub.sql("select ts from observations order by id")]
    assert times == sorted(times) and times[0] == 1704067200


def test_kiri_history_lines_import_as_kiri_wrote_them(hub, tmp_path):
    import datetime as dt

    # KIRI's own lines: letter keys, an ISO local time in ts, and (pulse) the hour as H
    kiri_lines = {
        "pulse": ['{"C":52,"M":55,"D":40,"S":10,"L":1,"N":1,"H":14,"ts":"2026-02-14T14:05:00"}',
                  '{"C":12,"M":48,"D":40,"S":9,"L":0.4,"N":1,"H":3,"ts":"2026-02-15T03:00:30"}'],
        "rhythm": ['{"I":30,"A":42,"H":14,"W":5,"ts":"2026-02-14T14:05:00"}'],
        "drift": ['{"T":3,"C":2,"S":2,"H":14,"W":5,"ts":"2026-02-14T14:00:00"}'],
    }
    for atom, lines in kiri_lines.items():
        f = tmp_path / f"{atom}.jsonl"
        f.write_text("\n".join(lines) + "\n")
        res = json.loads(kiri(hub, "--json", "observe", atom, "--file", str(f)).stdout)
        assert res["stored"] == len(lines), res
    got = hub.sql("select ts, data from observations where atom = 'pulse' order by ts")
    assert got[0][0] == dt.datetime(2026, 2, 14, 14, 5).timestamp()  # KIRI wrote local time
    assert json.loads(got[0][1]) == {"cpu": 52.0, "mem": 55.0, "disk": 40.0, "swap": 10.0, "load": 1.0, "net": 1.0}
    (rhythm,) = hub.sql("select data from observations where atom = 'rhythm'")
    assert json.loads(rhythm[0]) == {"idle": 30.0, "activity": 42.0, "hour": 14.0, "weekday": 5.0}
    # a malformed KIRI line names its file and line, and nothing is imported
    f = tmp_path / "bad.jsonl"
    f.write_text(kiri_lines["pulse"][0] + "\n" + '{"C":1,"M":1,"D":1,"S":1,"L":1,"N":1,"ts":"14:05 yesterday"}\n')
    out = kiri(hub, "observe", "pulse", "--file", str(f), ok=False)
    assert f"{f}: 1 bad line(s)" in out.stderr and "line 2: time '14:05 yesterday'" in out.stderr
    assert hub.sql("select count(*) from observations where atom = 'pulse'")[0][0] == 2


def test_a_kiri_data_directory_imports_in_one_commit_with_a_summary_per_file(hub, tmp_path):
    kiri_dir = tmp_path / "kiri-data"
    kiri_dir.mkdir()
    (kiri_dir / "pulse.jsonl").write_text(
        '{"C":52,"M":55,"D":40,"S":10,"L":1,"N":1,"H":14,"ts":"2026-02-14T14:05:00"}\n'
        '{"C":53,"M":55,"D":40,"S":10,"L":1,"N":1,"H":14,"ts":"2026-02-14T14:05:30"}\n')
    (kiri_dir / "rhythm-2026-02.jsonl").write_text('{"I":30,"A":42,"H":14,"W":5,"ts":"2026-02-14T14:05:00"}\n')
    (kiri_dir / "drift.jsonl").write_text('{"T":3,"C":2,"S":2,"H":14,"W":5,"ts":"2026-02-14T14:00:00"}\n')
    (kiri_dir / "notes.jsonl").write_text('{"x": 1}\n')
    res = json.loads(kiri(hub, "--json", "import", "kiri", str(kiri_dir)).stdout)
    assert res["stored"] == 4 and res["ignored"] == ["notes.jsonl"]
    assert {(f["file"], f["atom"], f["staged"]) for f in res["files"]} == {
        ("pulse.jsonl", "pulse", 2), ("rhythm-2026-02.jsonl", "rhythm", 1), ("drift.jsonl", "drift", 1)}
    assert dict(hub.sql("select atom, count(*) from observations group by atom")) == {"pulse": 2, "rhythm": 1,
                                                                                      "drift": 1}
    out = kiri(hub, "import", "kiri", str(kiri_dir)).stdout  # the text summary names each file
    assert "pulse.jsonl: 2 observation(s) into pulse" in out and "notes.jsonl: not an atom's history" in out
    # one bad line in one file: nothing from any file is imported, and the line is named
    (kiri_dir / "drift.jsonl").write_text('{"T":3,"C":2,"S":2,"H":14,"W":5,"ts":"not a time"}\n')
    out = kiri(hub, "import", "kiri", str(kiri_dir), ok=False)
    assert out.returncode == 1 and "drift.jsonl: 1 bad line(s)" in out.stderr and "line 1: time" in out.stderr
    assert hub.sql("select count(*) from observations")[0][0] == 8  # the two good imports, nothing more
    assert hub.sql("select count(*) from staged_chunks")[0][0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    out = kiri(hub, "import", "kiri", str(empty), ok=False)
    assert out.returncode == 1 and "no KIRI history here" in out.stderr


def test_bulk_import_from_standard_input_in_either_format(hub):
    lines = "".join(json.dumps({**PULSE_ROW, "time": 1704067200 + 30 * i, "host": "h1"}) + "\n" for i in range(4500))
    res = json.loads(kiri(hub, "--json", "observe", "pulse", "--file", "-", stdin=lines).stdout)
    assert res["stored"] == 4500 and _count(hub) == 4500  # three chunks, one commit
    assert hub.sql("select count(*) from observations where host = 'h1'")[0][0] == 4500
    bad = lines + "{oops\n"
    out = kiri(hub, "observe", "pulse", "--file", "-", stdin=bad, ok=False)
    assert "standard input: 1 bad line(s); nothing was imported" in out.stderr and "line 4501" in out.stderr
    assert _count(hub) == 4500  # the staged chunks were dropped
    assert hub.sql("select count(*) from staged_chunks")[0][0] == 0
    csv = "time,cpu,mem,disk,swap,load,net\n1704200000,50,50,40,10,1,1\n"
    res = json.loads(kiri(hub, "--json", "observe", "pulse", "--file", "-", "--format", "csv", stdin=csv).stdout)
    assert res["stored"] == 1 and _count(hub) == 4501


def test_bulk_csv(hub, tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("time,cpu,mem,disk,swap,load,net\n1704067200,50,50,40,10,1,1\n1704067230,55,50,40,10,1,1\n"
                 "1704067260,x,50,40,10,1,1\n1704067290,1,2,3\n")
    out = kiri(hub, "observe", "pulse", "--file", str(f), ok=False)
    assert "line 4: field 'cpu': 'x'" in out.stderr and "line 5: pulse: missing field 'swap'" in out.stderr
    res = json.loads(kiri(hub, "--json", "observe", "pulse", "--file", str(f), "--skip-bad").stdout)
    assert res["stored"] == 2 and _count(hub) == 2


def test_bad_files(hub, tmp_path):
    out = kiri(hub, "observe", "pulse", "--file", str(tmp_path / "missing.jsonl"), ok=False)
    assert out.returncode == 1 and "no such file" in out.stderr
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    out = kiri(hub, "observe", "pulse", "--file", str(binary), ok=False)
    assert "not UTF-8" in out.stderr
    assert _count(hub) == 0


def test_protocol_batch_with_one_bad_row_stores_nothing_and_names_each_problem(hub):
    c = hub.client()
    rows = [{"values": PULSE_ROW}, {"values": {**PULSE_ROW, "load": "high"}}, {"values": {"cpu": 1}}]
    with pytest.raises(InvalidParams) as e:
        c.call("observe", {"atom": "pulse", "observations": rows})
    assert "observations[1]" in e.value.message and "nothing was stored" in e.value.message
    assert [(x["index"], x["field"]) for x in e.value.data["errors"]] == [(1, "load"), (2, "mem")]
    assert _count(hub) == 0
    res = c.call("observe", {"atom": "pulse", "observations": [{"values": PULSE_ROW, "time": 5.0}]})
    assert res == {"stored": 1, "first_id": 1, "last_id": 1}


def test_staged_import_is_invisible_until_committed(hub):
    c = hub.client()
    imp = "a" * 16
    c.call("observe", {"atom": "pulse", "observations": [{"values": PULSE_ROW}] * 3, "import_id": imp})
    c.call("observe", {"atom": "pulse", "observations": [{"values": PULSE_ROW}] * 2, "import_id": imp})
    c.close()  # the importer "dies" here
    c = hub.client()
    assert _count(hub) == 0
    assert c.call("observations", {"atom": "pulse"})["observations"] == []
    first = c.call("commit_import", {"import_id": imp})
    assert first["stored"] == 5 and first["remaining"] == 0
    assert _count(hub) == 5
    assert c.call("commit_import", {"import_id": imp}) == first  # a resend after a lost reply: same answer
    with pytest.raises(Conflict):  # committed: it applies entirely
        c.call("abort_import", {"import_id": imp})
    with pytest.raises(Conflict):
        c.call("observe", {"atom": "pulse", "observations": [{"values": PULSE_ROW}], "import_id": imp})
    with pytest.raises(NotFound):
        c.call("commit_import", {"import_id": "c" * 16})
    other = "b" * 16
    c.call("observe", {"atom": "pulse", "observations": [{"values": PULSE_ROW}], "import_id": other})
    assert c.call("abort_import", {"import_id": other}) == {"discarded": 1}
    assert _count(hub) == 5 and hub.sql("select count(*) from staged_chunks")[0][0] == 0


def test_observations_are_paged(hub):
    c = hub.client()
    c.call("observe", {"atom": "pulse", "observations": [{"values": PULSE_ROW, "time": float(i)}
                                                          for i in range(25)]})
    page = c.call("observations", {"atom": "pulse", "limit": 10})
    assert [o["time"] for o in page["observations"]] == [float(i) for i in range(10)]
    assert page["observations"][0]["values"]["cpu"] == 50
    got = list(page["observations"])
    while page["next_after_id"]:
        page = c.call("observations", {"atom": "pulse", "limit": 10, "after_id": page["next_after_id"]})
        got += page["observations"]
    assert len(got) == 25
    window = c.call("observations", {"atom": "pulse", "since": 5, "until": 8})["observations"]
    assert [o["time"] for o in window] == [5.0, 6.0, 7.0]


def test_custom_atoms_are_defined_once_and_guarded(hub):
    c = hub.client()
    tank = {"name": "tank", "fields": [{"letter": "L", "name": "level", "low": 0, "high": 10, "buckets": 4}]}
    assert c.call("define_atom", {"schema": tank}) == {"atom": "tank", "created": True}
    assert c.call("define_atom", {"schema": tank}) == {"atom": "tank", "created": False}
    assert "tank" in [a["name"] for a in c.call("atoms")["atoms"]]
    c.call("observe", {"atom": "tank", "observations": [{"values": {"level": 7}}]})
    changed = {**tank, "fields": [{**tank["fields"][0], "buckets": 8}]}
    with pytest.raises(Conflict, match="already has observations"):
        c.call("define_atom", {"schema": changed})
    with pytest.raises(Conflict, match="preset"):
        c.call("define_atom", {"schema": {**tank, "name": "pulse"}})
    with pytest.raises(InvalidParams, match="must be below high"):
        c.call("define_atom", {"schema": {**tank, "name": "bad", "fields": [{**tank["fields"][0], "low": 20}]}})
    # the definition survives a hub restart
    hub.terminate()
    hub.start()
    c = hub.client()
    assert kiri(hub, "observe", "tank", "level=9").returncode == 0
    assert _count(hub, "tank") == 2


def test_observations_as_columns_store_what_one_object_each_stores_and_bad_columns_store_nothing(hub):
    c = hub.client()
    names = list(PULSE_ROW)
    rows = [{**PULSE_ROW, "cpu": 10.0 + i} for i in range(4)]
    c.call("observe", {"atom": "pulse", "observations": [
        {"values": r, "time": 100.0 + i, **({"host": "h1"} if i % 2 else {})} for i, r in enumerate(rows)]})
    # the same as columns, fields in another order and by letter, ints where floats are
    letters = {"cpu": "C", "mem": "M"}
    order = list(reversed(names))
    res = c.call("observe", {"atom": "pulse", "columns": {
        "fields": [letters.get(n, n) for n in order], "values": [[r[n] for n in order] for r in rows],
        "time": [100.0 + i for i in range(4)], "host": [("h1" if i % 2 else None) for i in range(4)]}})
    assert res == {"stored": 4, "first_id": 5, "last_id": 8}
    got = hub.sql("select ts, host, data from observations order by id")
    assert got[:4] == got[4:]
    assert json.loads(got[0][2]) == {n: float(rows[0][n]) for n in names}  # stored by name, schema order
    before = _count(hub)
    cols = {"fields": names, "values": [[PULSE_ROW[n] for n in names]] * 2}
    for bad, needle in (
        ({**cols, "fields": [*names[:-1], "bogus"]}, "unknown field 'bogus'"),
        ({**cols, "fields": names[:-1], "values": [[1.0] * (len(names) - 1)]}, "missing field"),
        ({**cols, "fields": [*names[:-1], names[0]]}, "given twice"),
        ({**cols, "values": [[1.0] * len(names), [1.0] * (len(names) - 1)]}, "values[1] has"),
        ({**cols, "time": [1.0]}, "time must have one entry per row"),
        ({**cols, "values": [[1.0] * len(names), ["1.0"] * len(names)]}, "values.1.0"),
    ):
        with pytest.raises(InvalidParams) as e:
            c.call("observe", {"atom": "pulse", "columns": bad})
        assert needle in e.value.message, (bad, e.value.message)
    with pytest.raises(InvalidParams) as e:  # both forms at once
        c.call("observe", {"atom": "pulse", "columns": cols, "observations": [{"values": PULSE_ROW}]})
    assert "not both" in e.value.message
    assert _count(hub) == before
    c.close()


def test_an_import_is_expired_only_when_it_has_sent_nothing_for_an_hour(tmp_path):
    import sqlalchemy as sa

    from kiri.hub.core.queue import Env, QueueSettings
    from kiri.hub.store import migrate
    from kiri.hub.store.db import make_engine
    from kiri.hub.store.schema import staged_chunks
    from kiri.hub.watch import observations as O
    from kiri.hub.watch.observations import STAGED_TTL, expire_staged
    from kiri.protocol import params as P

    eng = make_engine(f"sqlite:///{tmp_path / 'staged.db'}")
    migrate.upgrade(eng)
    reg = O.AtomRegistry()
    t0 = 1_000_000.0

    def stage(import_id: str, at: float) -> None:
        with eng.begin() as c:
            O.observe(reg, c, P.Observe(atom="pulse", import_id=import_id,
                                        observations=[P.ObservationIn(values={k: float(v) for k, v in
                                                                              PULSE_ROW.items()})]),
                      Env(now=at, settings=QueueSettings()))

    with eng.begin() as c:
        reg.load(c)
    stage("long-import", t0)  # a long import, still sending an hour and more after it began
    stage("gone-import", t0 + 10)  # one abandoned after its first chunk
    stage("done-import", t0 + 20)  # one committed, then left
    with eng.begin() as c:
        O.commit_import(c, P.ImportRef(import_id="done-import"), Env(now=t0 + 30, settings=QueueSettings()))
    stage("long-import", t0 + STAGED_TTL + 15)
    with eng.begin() as c:
        assert expire_staged(c, t0 + STAGED_TTL + 20) == 1  # only the abandoned one's row
        left = c.execute(sa.select(staged_chunks.c.import_id, sa.func.sum(staged_chunks.c.n))
                         .group_by(staged_chunks.c.import_id)).all()
        assert left == [("long-import", 2)]
        # the committed one answers the same for an hour after its last step, then is forgotten
        assert O.progress(c, "done-import")["stored"] == 1
        expire_staged(c, t0 + 30 + STAGED_TTL + 1)
        assert c.exec_driver_sql("SELECT group_concat(import_id) FROM imports").scalar() == "long-import"
    eng.dispose()


def test_a_big_import_moves_in_steps_and_a_hub_killed_midway_finishes_it(hub):
    from kiri.hub.watch.observations import COMMIT_STEP
    from tests.conftest import wait_until

    n = 3 * COMMIT_STEP + 123
    names = list(PULSE_ROW)
    c = hub.client()
    imp = "big-import-1"
    for lo in range(0, n, COMMIT_STEP):  # a step moves whole chunks: here, one
        k = range(lo, min(n, lo + COMMIT_STEP))
        c.call("observe", {"atom": "pulse", "import_id": imp, "columns": {
            "fields": names, "values": [[float(i % 97)] * len(names) for i in k],
            "time": [1_000_000.0 + 30 * i for i in k], "host": [f"h{i % 3}" for i in k]}})
    first = c.call("commit_import", {"import_id": imp})
    assert first["stored"] == COMMIT_STEP and first["remaining"] == n - COMMIT_STEP  # the first step
    hub.kill()  # SIGKILL while the rest moves (or after)
    at_kill = _count(hub)
    assert at_kill in {k * COMMIT_STEP for k in (1, 2, 3)} | {n}  # steps land whole or not at all
    hub.start()  # the restarted hub finishes the committed import by itself
    wait_until(lambda: _count(hub) == n, 60, what="the import's rest moved after the restart")
    c = hub.client()
    done = c.call("commit_import", {"import_id": imp})
    assert done == {"stored": n, "first_id": 1, "last_id": n, "atoms": ["pulse"], "remaining": 0}
    assert hub.sql("select count(*) from staged_chunks")[0][0] == 0
    # every row once: no step moved twice, none lost
    assert hub.sql("select count(distinct ts), min(ts), max(ts) from observations") == [
        (n, 1_000_000.0, 1_000_000.0 + 30 * (n - 1))]
    assert sorted(hub.sql("select host, n from streams")) == [(f"h{h}", len(range(h, n, 3))) for h in range(3)]
    with pytest.raises(Conflict):
        c.call("abort_import", {"import_id": imp})
    c.close()


def test_a_commit_with_wait_answers_when_its_import_has_moved_or_its_wait_ran_out(hub):
    """commit_import with ``wait``: one answer once the last step has moved (no polling), or,
    when ``wait`` runs out first, the progress so far; a bad wait is refused."""
    from kiri.hub.watch.observations import COMMIT_STEP
    from kiri.protocol import RpcError

    names = list(PULSE_ROW)
    c = hub.client()

    def stage(imp: str, n: int, t0: float) -> None:
        for lo in range(0, n, COMMIT_STEP):
            k = range(lo, min(n, lo + COMMIT_STEP))
            c.call("observe", {"atom": "pulse", "import_id": imp, "columns": {
                "fields": names, "values": [[float(i % 89)] * len(names) for i in k],
                "time": [t0 + 30 * i for i in k]}})

    n = 8 * COMMIT_STEP + 7
    stage("waited-import", n, 2_000_000.0)
    done = c.call("commit_import", {"import_id": "waited-import", "wait": 60})
    assert done == {"stored": n, "first_id": 1, "last_id": n, "atoms": ["pulse"], "remaining": 0}
    assert _count(hub) == n
    # a wait shorter than the move: the progress so far, and a later ask follows it to the end
    stage("short-wait", n, 3_000_000.0)
    early = c.call("commit_import", {"import_id": "short-wait", "wait": 0.001})
    assert 0 < early["remaining"] < n and early["stored"] + early["remaining"] == n
    assert c.call("commit_import", {"import_id": "short-wait", "wait": 60})["remaining"] == 0
    assert _count(hub) == 2 * n
    for bad in (-1, 61, "soon", None):
        with pytest.raises(RpcError) as e:
            c.call("commit_import", {"import_id": "short-wait", "wait": bad})
        assert e.value.code == -32602 and "wait" in e.value.message
    c.close()


def _line_by_line(schema, recs, now):
    """What the per-line path makes of a chunk: its columns, or the first refusal."""
    from kiri.importing import as_columns, to_observation

    good = []
    for rec in recs:
        if not isinstance(rec, dict):
            return "refused"
        try:
            good.append(to_observation(schema, rec, now))
        except ValueError:  # ObservationError is one
            return "refused"
    return as_columns(schema, good)


_ODD = [None, True, "3.5", "x", float("nan"), float("inf"), 10**30, -0.0, 7, 2.5, [1]]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(atom=st.sampled_from(["pulse", "rhythm", "drift"]), n=st.integers(1, 6), data=st.data())
def test_a_chunk_checked_whole_agrees_with_the_line_by_line_check(atom, n, data):
    """The import's whole-chunk check (its fast path) either hands the chunk to the
    line-by-line check or produces exactly the columns that check produces."""
    from kiri.importing import _checked_whole
    from kiri.model import schema as S

    schema = S.get(atom)
    keys = [f.name if data.draw(st.booleans()) else f.letter for f in schema.fields]
    if data.draw(st.booleans()):  # the clock left for the importer to fill (rhythm, drift)
        keys = [k for k, f in zip(keys, schema.fields, strict=True) if f.name not in ("hour", "weekday")]
    extra = data.draw(st.lists(st.sampled_from(["time", "ts", "host", "host", "label", "H", "W"]), unique=True))
    if data.draw(st.integers(0, 19)) == 0:
        extra.append("bogus")
    recs = []
    for i in range(n):
        rec = {k: data.draw(st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-5, 5)
                            | st.sampled_from(_ODD)) if data.draw(st.integers(0, 29)) == 0 else float(i)
               for k in keys}
        for k in extra:
            rec[k] = {"time": data.draw(st.sampled_from([1.7e9 + 30 * i, 1.7e9 + 30 * i, -1.0, 2e11, 5])),
                      "ts": data.draw(st.sampled_from([1.7e9, 1.7e9 + 7, "2026-02-14T14:05:00", -1.0])),
                      "host": data.draw(st.sampled_from(["a", "c", None, "b" * 300, 5])), "label": "x",
                      "H": 3, "W": 1, "bogus": 1.0}[k]
        if data.draw(st.integers(0, 9)) == 0:
            rec = dict(reversed(list(rec.items())))  # same keys, another order
        recs.append(rec)
    whole = _checked_whole(schema, recs, 1.7e9)
    if whole is not None:
        assert whole == _line_by_line(schema, recs, 1.7e9)


@pytest.mark.parametrize("odd", _ODD, ids=repr)
def test_a_chunk_with_one_odd_value_is_checked_as_the_lines_are(odd):
    from kiri.importing import _checked_whole
    from kiri.model import schema as S

    schema = S.get("pulse")
    recs = [{"time": 1.7e9 + i, **{f.name: 1.0 for f in schema.fields}} for i in range(3)]
    recs[1]["mem"] = odd
    whole = _checked_whole(schema, recs, 1.7e9)
    assert whole is None or whole == _line_by_line(schema, recs, 1.7e9)


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 6), rows=st.integers(0, 40), data=st.data())
def test_stored_json_text_is_what_dumping_each_reading_gives(width, rows, data):
    """The hub writes a batch's readings as JSON text in one pass (``json_objects``); each
    text must be exactly what dumping that reading's dict gives, whatever the floats."""
    import numpy as np
    import orjson

    from kiri.hub.watch.observations import json_objects

    names = tuple(data.draw(st.lists(st.text(min_size=1, max_size=8), min_size=width, max_size=width, unique=True)))
    floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, -0.0, 1.0, 2.0**53, 1e-300])
    values = [[data.draw(floats) for _ in range(width)] for _ in range(rows)]
    got = json_objects(names, np.array(values, dtype=np.float64).reshape(rows, width))
    assert got == [orjson.dumps(dict(zip(names, row, strict=True))).decode() for row in values]
