"""The dashboard in a real headless Chromium (Debian's), driven by Playwright.

Against a running hub with trained atoms and injected anomalies: the charts draw, a click on
the worst point shows its blame, "approve" stores a label in the database, and "retrain"
queues a train task whose progress bar moves. A screenshot lands in the test output
(``test-output/`` or ``$KIRI_TEST_OUTPUT``) for a reviewer to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import push, wait_until

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _chromium() -> str:
    path = os.environ.get("KIRI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium found: install Debian's chromium (make test does, as root) or set KIRI_CHROMIUM")
    return path


def _output_dir() -> Path:
    out = Path(os.environ.get("KIRI_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


class Page:
    """A page that records console errors and any request that leaves the hub."""

    def __init__(self, browser, base: str) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.foreign: list[str] = []
        host = urlparse(base).netloc
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def route(r) -> None:
            if urlparse(r.request.url).netloc != host:
                self.foreign.append(r.request.url)
                r.abort()
            else:
                r.continue_()

        self.page.route("**/*", route)


def _canvas_ink(page, selector: str) -> int:
    """How many pixels of the chart's canvas were painted."""
    return page.evaluate("""sel => {
        const c = document.querySelector(sel);
        if (!c) return 0;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;
    }""", selector)


def test_dashboard_draws_explains_records_feedback_and_retrains(watched, browser):
    hub = watched.hub
    pg = Page(browser, hub.url)
    page = pg.page
    page.goto(hub.url + "/")
    page.wait_for_selector("#live.on", timeout=20_000)

    # charts drew, with the anomalies marked and the threshold drawn
    page.wait_for_selector('[data-testid="chart-pulse"] canvas', timeout=20_000)
    wait_until(lambda: page.evaluate("() => !!(state.series.pulse && state.series.pulse.count)"), 20,
               what="pulse series loaded")
    page.click('#ranges button[data-range="all"]')
    wait_until(lambda: page.evaluate("() => state.series.pulse.since === null"), 20, what="the whole range")
    assert _canvas_ink(page, '[data-testid="chart-pulse"] canvas') > 5000
    assert _canvas_ink(page, '[data-testid="chart-drift"] canvas') > 5000
    marked = page.evaluate("() => state.series.pulse.anomalous.filter(Boolean).length")
    assert marked >= 2
    assert page.evaluate("() => state.series.pulse.threshold.some(v => v !== null)")
    assert page.evaluate("() => state.series.pulse.tail_p.some(v => v !== null && v >= 0 && v <= 1)")
    assert page.text_content('[data-atom="pulse"] .wv').startswith("weights v")
    assert "of its training data judged anomalous" in page.text_content('[data-atom="pulse"] .wv')
    assert page.text_content('[data-atom="pulse"] .hosts').startswith("hosts: synthetic ")  # one verdict per host
    assert (page.text_content('[data-testid="retention"]')
            == "finished tasks kept 7 days · raw readings 30 days, then rollups")

    # clicking the worst point shows its per-token blame: the spike is in C and M, not D or N
    x, y = page.evaluate("""() => {
        const u = state.charts.pulse.u, s = u.data[1];
        let best = 0;
        for (let i = 0; i < s.length; i++) if (s[i] !== null && s[i] > (s[best] ?? -1)) best = i;
        const r = u.over.getBoundingClientRect();
        return [r.left + u.valToPos(u.data[0][best], 'x'), r.top + u.valToPos(s[best], 's')];
    }""")
    page.mouse.click(x, y)
    page.wait_for_selector("#blame-section:not([hidden]) .blame-row", timeout=10_000)
    rows = page.query_selector_all("#blame .blame-row")
    assert len(rows) == 6
    title = page.text_content("#blame-title")
    assert "anomaly" in title
    shown_id = int(title.split("#")[1].split(" ")[0])
    assert shown_id in watched.spike_ids
    widths = {r.get_attribute("data-token")[0]: float(r.query_selector(".bar").get_attribute("style")
                                                        .split(":")[1].rstrip("%")) for r in rows}
    assert max(widths["C"], widths["M"]) > 3 * max(widths["D"], widths["N"])

    # approve a decision: the label is stored in the database and shown
    page.wait_for_selector('button[data-feedback="approve"]', timeout=20_000)
    button = page.query_selector('button[data-feedback="approve"]')
    decision = int(button.get_attribute("data-decision"))
    before = hub.sql("select count(*) from labels where decision_id = ? and verdict = 'approve'", decision)[0][0]
    button.click()
    wait_until(lambda: hub.sql("select count(*) from labels where decision_id = ? and verdict = 'approve'",
                               decision)[0][0] == before + 1, 10, what="the label stored")
    page.wait_for_function(
        "id => (document.querySelector(`[data-decision-row='${id}'] .label`) || {}).textContent?.startsWith('approve')",
        arg=decision, timeout=10_000)

    # retrain: a train task appears, its progress bar moves, and it finishes
    last_train = hub.sql("select coalesce(max(id), 0) from tasks where kind = 'train'")[0][0]
    # The button's default run (500 steps) ends in about a second, before the trainer's
    # heartbeats (every 2 s) can move a bar; the page's own request asks for a longer one.
    page.route("**/api/v1/atoms/pulse/retrain",
               lambda route: route.continue_(post_data=json.dumps({"steps": 6000})), times=1)
    page.click('button[data-retrain="pulse"]')
    task_id = wait_until(lambda: (hub.sql("select max(id) from tasks where kind = 'train' and atom = 'pulse' "
                                          "and id > ?", last_train)[0][0]), 10, what="a train task")
    bar = f'progress[data-task-progress="{task_id}"]'
    page.wait_for_selector(bar, timeout=30_000)
    seen: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        el = page.query_selector(bar)
        if el is None:
            break  # done: the row left the running table
        v = float(el.get_attribute("value") or el.evaluate("e => e.value"))
        if not seen or v != seen[-1]:
            seen.append(v)
        if len(seen) >= 3 and seen[-1] > 0:
            break
        time.sleep(0.05)
    moving = [v for v in seen if v > 0]
    assert len(moving) >= 2 and moving == sorted(moving), f"progress values seen: {seen}"
    page.screenshot(path=str(_output_dir() / "dashboard.png"), full_page=True)
    wait_until(lambda: hub.sql("select status from tasks where id = ?", task_id)[0][0] == "done", 180,
               what="the retrain finished")
    page.wait_for_selector(bar, state="detached", timeout=20_000)

    # the new version is listed with its lineage; activating the other one is a click
    page.wait_for_selector('tr[data-weights="pulse:2"]', timeout=20_000)
    parent = hub.sql("select p.version from weights w left join weights p on p.id = w.parent_id "
                     "where w.atom = 'pulse' and w.version = 2")[0][0]
    assert page.text_content('tr[data-weights="pulse:2"] td:nth-child(4)') == (f"v{parent}" if parent else "scratch")
    version = int(page.get_attribute('button[data-activate^="pulse:"]', "data-activate").split(":")[1])
    page.click(f'button[data-activate="pulse:{version}"]')  # (found again if the table was redrawn)
    wait_until(lambda: hub.sql("select status from weights where atom = 'pulse' and version = ?", version)[0][0]
               == "active", 10, what=f"pulse v{version} active")
    page.wait_for_function("v => document.querySelector(`tr[data-weights='pulse:${v}'] td:nth-child(3)`)"
                           "?.textContent === 'active'", arg=version, timeout=10_000)
    assert not pg.foreign, f"the page reached outside the hub: {pg.foreign}"
    assert not pg.errors, f"console errors: {pg.errors}"
    page.close()


def test_dashboard_asks_for_the_token_once(hub_factory, browser):
    hub = hub_factory(token="s3cret-token", http=True)
    pg = Page(browser, hub.url)
    page = pg.page
    page.goto(hub.url + "/")
    page.wait_for_selector("#tokendlg[open]", timeout=20_000)
    page.fill("#tokeninput", "wrong")
    page.click("#tokenform button")
    page.wait_for_selector("#tokendlg[open]", timeout=20_000)
    assert "refused" in page.text_content("#tokenerr")
    page.fill("#tokeninput", "s3cret-token")
    page.click("#tokenform button")
    page.wait_for_selector("#live.on", timeout=20_000)
    page.wait_for_selector('[data-atom="pulse"]', timeout=20_000)
    page.reload()  # remembered: no second prompt
    page.wait_for_selector("#live.on", timeout=20_000)
    assert page.query_selector("#tokendlg[open]") is None
    assert not pg.foreign
    page.close()


def test_dashboard_picks_a_host_and_draws_min_max_bands(hub_factory, browser):
    hub = hub_factory(http=True)
    t0 = 1_700_000_000.0
    for h, base in (("alpha", 2), ("beta", 12)):
        rows = [{"added": base + (i % 5), "completed": i % 7, "switched": 1, "hour": (i // 60) % 24, "weekday": 2}
                for i in range(2000)]
        push(hub, "drift", rows, [t0 + 60 * i for i in range(2000)], host=h)
    pg = Page(browser, hub.url)
    page = pg.page
    page.goto(hub.url + "/")
    page.wait_for_selector("#live.on", timeout=20_000)
    page.click('#ranges button[data-range="all"]')
    wait_until(lambda: page.evaluate("() => !!(state.series.drift && state.series.drift.count === 4000)"), 20,
               what="both hosts' readings in the chart")
    # zoomed out, each bucket holds several readings: the chart fills each field's min..max band
    s = page.evaluate("() => state.series.drift")
    assert s["host"] is None and s["bucket"] > 0 and max(s["n"]) > 1
    assert all(lo <= m <= hi for lo, m, hi in zip(s["min"]["added"], s["values"]["added"], s["max"]["added"],
                                                   strict=True))
    assert max(s["max"]["added"]) == 16 and min(s["min"]["added"]) == 2  # the band spans both hosts
    wait_until(lambda: page.evaluate("() => state.charts.drift.drawn") > 0, 10, what="bands drawn")
    # the host picker lists both hosts; picking one charts only its readings
    page.wait_for_selector('select[data-host-pick="drift"]:not([hidden])', timeout=20_000)
    options = page.eval_on_selector('select[data-host-pick="drift"]', "s => [...s.options].map(o => o.value)")
    assert options == ["*", "alpha", "beta"]
    page.select_option('select[data-host-pick="drift"]', "beta")
    wait_until(lambda: page.evaluate("() => state.series.drift.host") == "beta", 20, what="beta's chart")
    s = page.evaluate("() => state.series.drift")
    assert s["count"] == 2000 and min(s["min"]["added"]) == 12
    assert not pg.errors, f"console errors: {pg.errors}"
    page.close()
