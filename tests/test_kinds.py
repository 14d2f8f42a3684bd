"""Per-kind settings through the real protocol: pause and resume, concurrency limits, deadlines."""

from __future__ import annotations

import threading

import pytest

from kiri.protocol import InvalidParams
from tests.conftest import wait_until


def _kind(c, kind: str) -> dict:
    return {k["kind"]: k for k in c.call("kinds")["kinds"]}[kind]


def _lease_in_background(c, kinds: list[str], wait: float = 20) -> tuple[threading.Thread, dict]:
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(c.lease(kinds, wait=wait)))
    th.start()
    return th, out


def test_a_paused_kind_is_leased_by_no_one_until_resumed(hub):
    c, waiter = hub.client(), hub.client()
    tid = c.enqueue("resize")["task_id"]
    other = c.enqueue("echo")["task_id"]
    res = c.call("set_kind", {"kind": "resize", "paused": True})
    assert res["changed"] and res["kind"]["paused"] and res["kind"]["queued"] == 1
    assert c.lease(["resize"]) == {"task": None}
    assert c.lease(["resize", "echo"])["task"]["id"] == other  # other kinds go on
    th, got = _lease_in_background(waiter, ["resize"])
    wait_until(lambda: c.call("stats")["hub"]["waiting_leases"] == 1, 10, what="the lease to wait")
    assert c.call("set_kind", {"kind": "resize", "paused": False})["changed"]
    th.join(30)
    assert got["task"]["id"] == tid
    assert c.call("set_kind", {"kind": "resize", "paused": False})["changed"] is False


def test_a_concurrency_limit_holds_across_agents_and_frees_a_slot_when_a_task_ends(hub):
    c = hub.client()
    agents = [hub.client() for _ in range(3)]
    ids = [c.enqueue("resize", priority=p)["task_id"] for p in (1, 5, 3, 0)]
    c.call("set_kind", {"kind": "resize", "concurrency": 2})
    first, second = agents[0].lease(["resize"]), agents[1].lease(["resize"])
    assert [first["task"]["id"], second["task"]["id"]] == [ids[1], ids[2]]  # priority order kept
    assert agents[2].lease(["resize"]) == {"task": None}
    assert _kind(c, "resize")["leased"] == 2
    th, got = _lease_in_background(agents[2], ["resize"])
    wait_until(lambda: c.call("stats")["hub"]["waiting_leases"] == 1, 10, what="the lease to wait")
    agents[0].call("ack", {"task_id": first["task"]["id"], "lease_token": first["lease"]["token"]})
    th.join(30)
    assert got["task"]["id"] == ids[0]
    assert agents[0].lease(["resize"]) == {"task": None}  # still two leased
    # a failed task frees its slot too, and raising the limit lets more run at once
    agents[1].call("fail", {"task_id": second["task"]["id"], "lease_token": second["lease"]["token"],
                            "error": "x", "retry": False})
    assert agents[1].lease(["resize"])["task"]["id"] == ids[3]
    c.call("set_kind", {"kind": "resize", "concurrency": None})
    assert _kind(c, "resize")["concurrency"] is None


def test_an_ack_with_next_respects_the_limit(any_hub):
    """On both backends: on PostgreSQL an ack whose next kinds have a limit is not the one
    ack-and-lease statement (nor run without a transaction), as the lease must see the ack."""
    hub = any_hub
    c = hub.client()
    a, b = c.enqueue("resize")["task_id"], c.enqueue("resize")["task_id"]
    c.enqueue("resize")
    c.call("set_kind", {"kind": "resize", "concurrency": 1})
    got = c.lease(["resize"])
    assert got["task"]["id"] == a
    res = c.call("ack", {"task_id": a, "lease_token": got["lease"]["token"], "next": {"kinds": ["resize"]}})
    assert res["next"]["task"]["id"] == b  # the ack freed the one slot it then takes
    assert hub.client().lease(["resize"]) == {"task": None}


def test_settings_not_given_stay_and_null_clears(hub):
    c = hub.client()
    c.call("set_kind", {"kind": "resize", "concurrency": 3, "deadline": 60.0})
    k = c.call("set_kind", {"kind": "resize", "paused": True})["kind"]
    assert (k["paused"], k["concurrency"], k["deadline"]) == (True, 3, 60.0)
    k = c.call("set_kind", {"kind": "resize", "deadline": None})["kind"]
    assert (k["paused"], k["concurrency"], k["deadline"]) == (True, 3, None)
    assert k["updated_at"] is not None and k["queued"] == 0


@pytest.mark.parametrize("bad", [
    {"kind": "resize", "concurrency": 0}, {"kind": "resize", "concurrency": "2"},
    {"kind": "resize", "deadline": -1.0}, {"kind": "resize", "deadline": 1e12},
    {"kind": "resize", "paused": None}, {"kind": "resize", "paused": "yes"}, {"kind": "bad kind!"}, {},
])
def test_bad_settings_are_refused_and_change_nothing(hub, bad):
    c = hub.client()
    c.call("set_kind", {"kind": "resize", "concurrency": 2})
    before = hub.sql("select * from kinds")
    with pytest.raises(InvalidParams):
        c.call("set_kind", bad)
    assert hub.sql("select * from kinds") == before


def test_a_task_gets_its_own_deadline_else_its_kind_default(hub):
    c = hub.client()
    own = c.enqueue("resize", deadline=5.0)["task_id"]
    bare = c.enqueue("resize")["task_id"]
    assert c.lease(["resize"])["task"]["deadline"] == 5.0
    c.call("set_kind", {"kind": "resize", "deadline": 90.0})
    got = c.lease(["resize"])["task"]
    assert (got["id"], got["deadline"]) == (bare, 90.0)
    c.enqueue("echo")
    assert c.lease(["echo"])["task"]["deadline"] is None  # no deadline anywhere: none
    assert hub.sql("select deadline from tasks where id in (?, ?) order by id", own, bare) == [(5.0,), (None,)]
    with pytest.raises(InvalidParams):
        c.enqueue("resize", deadline=0.0)


def test_setting_nothing_on_a_kind_nobody_has_used_changes_nothing(hub):
    c = hub.client()
    res = c.call("set_kind", {"kind": "never-used"})
    assert res == {"kind": {"kind": "never-used", "paused": False, "concurrency": None, "deadline": None,
                            "queued": 0, "leased": 0, "updated_at": None}, "changed": False}
    assert hub.sql("select count(*) from kinds") == [(0,)]
