"""The web console (`/console`) in a real browser: Debian's Chromium driven by Playwright, against the real
server, with bars written over Arrow Flight. Screenshots (catalog, query result, candle chart, live
chart, status) go to tests/python/artifacts/console/ (and, when MKTS_CONSOLE_SHOTS names a directory,
are copied there too). The `/api/` errors are checked with plain HTTP as well.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as fl
import pytest
import requests
from playwright.sync_api import Page, expect, sync_playwright

from conftest import mkts_bin

CHROMIUM = os.environ.get("MKTS_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "console"
T0 = 1_704_187_800  # 2024-01-02T09:30:00Z
KEY = "AAPL/1Min/OHLCV"


def bars(first: int, n: int, close: float | None = None) -> pa.Table:
    """`n` one-minute bars from T0 + 60*first: Open = 100+i, High = Open+2, Low = Open-1, Close = Open+0.5."""
    idx = list(range(first, first + n))
    opens = [100.0 + i for i in idx]
    return pa.table({
        "Epoch": pa.array([T0 + 60 * i for i in idx], pa.int64()),
        "Open": pa.array(opens, pa.float64()),
        "High": pa.array([o + 2 for o in opens], pa.float64()),
        "Low": pa.array([o - 1 for o in opens], pa.float64()),
        "Close": pa.array([close if close is not None else o + 0.5 for o in opens], pa.float64()),
        "Volume": pa.array([1000 + i for i in idx], pa.int64()),
    })


def put(srv, key: str, table: pa.Table, auth: tuple[str, str] | None = None) -> None:
    c = fl.FlightClient(srv.flight_url)
    opts = fl.FlightCallOptions(headers=[c.authenticate_basic_token(*auth)]) if auth else fl.FlightCallOptions()
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), table.schema, options=opts)
    w.write_table(table)
    w.done_writing()
    while True:
        try:
            if r.read() is None:
                break
        except StopIteration:
            break
    w.close()
    c.close()


@pytest.fixture(scope="module")
def browser():
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: the test command installs Debian's chromium (apt-get install -y chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("MKTS_CONSOLE_SHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


def cells(page: Page, table: str) -> list[list[str]]:
    return page.eval_on_selector_all(f"{table} tbody tr", "trs => trs.map(tr => [...tr.children].map(td => td.textContent))")


def headers(page: Page, table: str) -> list[str]:
    return page.eval_on_selector_all(f"{table} thead th", "ths => ths.map(th => th.textContent)")


# Pixels of the chart's canvases in the candles' up colour (#26a69a): every test bar closes above its open.
UP_PIXELS = """() => {
  let n = 0;
  for (const c of document.querySelectorAll('#chart canvas')) {
    const ctx = c.getContext('2d'); if (!ctx || !c.width || !c.height) continue;
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - 38) < 8 && Math.abs(d[i+1] - 166) < 8 && Math.abs(d[i+2] - 154) < 8) n++;
  }
  return n;
}"""


# A plugin, so the status panel has one to show: 5-minute bars aggregated from the 1-minute ones.
TRIGGERS = """triggers:
  - module: ondiskagg.so
    on: "*/1Min/OHLCV"
    config:
      destinations: [5Min]
"""


def test_console_catalog_sql_chart_live_and_status(server_factory, browser):
    server = server_factory(config_extra=TRIGGERS)
    put(server, KEY, bars(0, 30))
    put(server, "MSFT/1Min/OHLCV", bars(0, 5))
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.http_url + "/")
    expect(page).to_have_url(re.compile(r"/console/$"))

    # Catalog: both buckets listed with their rows; the AAPL bucket's schema, facts and newest rows.
    item = page.locator(f'#bucket-list li[data-key="{KEY}"]')
    expect(item).to_contain_text("30")
    expect(page.locator('#bucket-list li[data-key="MSFT/1Min/OHLCV"]')).to_contain_text("5")
    item.click()
    detail = page.locator(f'#bucket-detail[data-key="{KEY}"]')
    expect(detail).to_be_visible()
    expect(page.locator("#bucket-rows tbody tr")).to_have_count(30)
    facts = dict(zip(page.locator("#bucket-facts dt").all_text_contents(), page.locator("#bucket-facts dd").all_text_contents()))
    assert facts["Rows"] == "30" and facts["Years"] == "2024", facts
    assert (facts["First"], facts["Last"]) == ("2024-01-02T09:30:00Z", "2024-01-02T09:59:00Z"), facts
    assert cells(page, "#bucket-columns") == [["Epoch", "timestamp (s)"], ["Open", "f8"], ["High", "f8"], ["Low", "f8"],
                                              ["Close", "f8"], ["Volume", "i8"]]
    assert headers(page, "#bucket-rows") == ["Epoch", "Open", "High", "Low", "Close", "Volume"]
    assert cells(page, "#bucket-rows")[0] == ["2024-01-02T09:59:00Z", "129", "131", "128", "129.5", "1029"]
    shot(page, "catalog")

    # SQL: exact values in the result table; a bad statement shows the server's 400.
    page.click('header nav a[data-tab="sql"]')
    page.fill("#sql-text", 'SELECT "Epoch", "Close", "Volume" FROM "AAPL/1Min/OHLCV" WHERE "Close" > 127 ORDER BY "Epoch"')
    page.click("#sql-run")
    expect(page.locator("#sql-info")).to_contain_text("3 rows")
    assert headers(page, "#sql-result") == ["Epoch", "Close", "Volume"]
    assert cells(page, "#sql-result") == [["2024-01-02T09:57:00Z", "127.5", "1027"], ["2024-01-02T09:58:00Z", "128.5", "1028"],
                                          ["2024-01-02T09:59:00Z", "129.5", "1029"]]
    shot(page, "query")
    page.fill("#sql-text", "SELEC 1")
    page.click("#sql-run")
    expect(page.locator("#error")).to_contain_text("400 invalid_argument")
    page.fill("#sql-text", 'SELECT count(*) AS n, max("High") AS hi FROM "AAPL/1Min/OHLCV"')
    page.locator("#sql-text").press("Control+Enter")
    expect(page.locator("#sql-info")).to_contain_text("1 row")
    assert cells(page, "#sql-result") == [["30", "131"]]
    expect(page.locator("#error")).to_be_hidden()

    # Chart: all 30 candles drawn, then a range of 10, then everything again.
    page.goto(server.http_url + f"/console/#/chart/{KEY}")
    chart = page.locator("#chart")
    expect(chart).to_have_attribute("data-bars", "30")
    assert page.evaluate("window.mktsConsole.lastBar.close") == 129.5
    page.wait_for_function(UP_PIXELS.replace("return n;", "return n > 500;"))
    shot(page, "chart")
    page.fill("#chart-start", "2024-01-02 09:40")
    page.fill("#chart-end", "2024-01-02 09:49")
    page.click("#chart-draw")
    expect(chart).to_have_attribute("data-bars", "10")
    assert page.evaluate("window.mktsConsole.lastBar.close") == 119.5  # 09:49 is bar 19
    page.fill("#chart-start", "")
    page.fill("#chart-end", "")
    page.click("#chart-draw")
    expect(chart).to_have_attribute("data-bars", "30")

    # Live: a bar written over Flight appears without a reload.
    page.check("#chart-live")
    expect(chart).to_have_attribute("data-live", "on")
    put(server, KEY, bars(30, 1, close=142.25))
    expect(chart).to_have_attribute("data-bars", "31")
    assert page.evaluate("window.mktsConsole.lastBar") == {"time": T0 + 30 * 60, "open": 130, "high": 132, "low": 129, "close": 142.25}
    put(server, "MSFT/1Min/OHLCV", bars(5, 1))  # another bucket's write does not land on this chart
    put(server, KEY, bars(31, 2))
    expect(chart).to_have_attribute("data-bars", "33")
    assert page.evaluate("window.mktsConsole.lastBar.close") == 132.5
    shot(page, "chart-live")

    # Status: version, metrics, plugins table (none configured).
    version = requests.get(server.http_url + "/heartbeat", timeout=5).json()["version"]
    page.click('header nav a[data-tab="status"]')
    expect(page.locator("#status-facts")).to_contain_text(version)
    expect(page.locator("#status-metrics")).to_contain_text("rows_written")
    assert headers(page, "#status-plugins")[:5] == ["entry", "kind", "module", "role", "up"]
    plugin = cells(page, "#status-plugins")[0]
    assert plugin[2:5] == ["ondiskagg.so", "trigger", "true"] and int(plugin[5]) >= 1, plugin  # module, role, up; it fired
    expect(page.locator("#server-line")).to_contain_text(f"mkts {version}")
    shot(page, "status")
    assert errors == [], errors
    page.close()


def test_api_errors_are_json_with_their_status(server):
    put(server, KEY, bars(0, 3))
    base = server.http_url
    r = requests.get(f"{base}/api/buckets/NOPE/1Min/OHLCV", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    r = requests.post(f"{base}/api/sql", json={"sql": "SELEC 1"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument", r.text
    r = requests.post(f"{base}/api/sql", data="SELECT 1", headers={"content-type": "text/plain"}, timeout=5)
    assert r.status_code == 400 and "application/json" in r.json()["error"]["message"], r.text
    r = requests.get(f"{base}/api/query", params={"key": KEY, "limit": "-1"}, timeout=5)
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"], r.text
    r = requests.get(f"{base}/api/query", params={"key": KEY, "from": "first", "limit": "2"}, timeout=5)
    assert r.status_code == 200 and r.json()["rows"] == [["2024-01-02T09:30:00Z", 100.0, 102.0, 99.0, 100.5, 1000],
                                                         ["2024-01-02T09:31:00Z", 101.0, 103.0, 100.0, 101.5, 1001]], r.text
    r = requests.get(f"{base}/api/status", timeout=5)
    assert r.status_code == 200 and r.json()["metrics"]["buckets"] == 1 and r.json()["plugins"] == [], r.text


def hash_password(pw: str) -> str:
    return subprocess.run([mkts_bin(), "hash-password"], input=pw + "\n", capture_output=True, text=True, check=True).stdout.strip()


def test_with_auth_the_console_and_api_need_credentials(server_factory, browser):
    srv = server_factory(config_extra=(
        "auth:\n  users:\n"
        f"    - name: ann\n      password_hash: \"{hash_password('ann pw')}\"\n      role: admin\n"
        f"    - name: ro\n      password_hash: \"{hash_password('ro pw')}\"\n      role: read_only\n"
    ))
    put(srv, KEY, bars(0, 4), auth=("ann", "ann pw"))
    for path in ["/api/buckets", "/api/status", f"/api/query?key={KEY}", f"/api/live?key={KEY}"]:
        r = requests.get(srv.http_url + path, timeout=5)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "unauthenticated" and r.headers["www-authenticate"].startswith("Basic"), path
    assert requests.get(srv.http_url + "/console/", timeout=5).status_code == 401
    r = requests.get(srv.http_url + "/api/buckets", auth=("ro", "wrong"), timeout=5)
    assert r.status_code == 401
    token = "Basic " + base64.b64encode(b"ro:ro pw").decode()
    r = requests.post(srv.http_url + "/api/sql", json={"sql": f'DELETE FROM "{KEY}"'}, headers={"authorization": token}, timeout=5)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text

    # The browser sends the user's credentials to the page, /api/ and the event stream alike.
    ctx = browser.new_context(http_credentials={"username": "ro", "password": "ro pw"})
    page = ctx.new_page()
    page.goto(srv.http_url + f"/console/#/chart/{KEY}")
    expect(page.locator("#chart")).to_have_attribute("data-bars", "4")
    page.check("#chart-live")
    expect(page.locator("#chart")).to_have_attribute("data-live", "on")
    put(srv, KEY, bars(4, 1), auth=("ann", "ann pw"))
    expect(page.locator("#chart")).to_have_attribute("data-bars", "5")
    ctx.close()
    # Without credentials the page is refused before anything is shown (headless Chromium, which cannot
    # ask for a password, fails the navigation).
    anon = browser.new_context()
    assert anon.request.get(srv.http_url + "/console/").status == 401
    with pytest.raises(Exception, match="ERR_INVALID_AUTH_CREDENTIALS"):
        anon.new_page().goto(srv.http_url + "/console/")
    anon.close()


def test_the_committed_bundle_was_built_from_the_committed_sources():
    """`npm run build` records what it built from (src/console/assets/sources.sha256): a source changed
    without rebuilding the bundle fails here. Runs without a server or npm."""
    repo = Path(__file__).resolve().parents[2]
    listed = {}
    for line in (repo / "src/console/assets/sources.sha256").read_text().splitlines():
        digest, path = line.split("  ", 1)
        listed[path] = digest
    sources = {f"console/{p.relative_to(repo / 'console').as_posix()}" for p in (repo / "console/src").rglob("*") if p.is_file()}
    assert sources <= set(listed), f"not in the build's inputs: {sorted(sources - set(listed))} (add them to SOURCES in console/build.mjs)"
    stale = [p for p, d in listed.items() if hashlib.sha256((repo / p).read_bytes()).hexdigest() != d]
    assert not stale, f"changed since the bundle was built: {stale}; run `cd console && npm ci && npm run build`"
    for src, built in [("console/src/index.html", "index.html"), ("console/src/style.css", "console.css")]:
        assert (repo / src).read_bytes() == (repo / "src/console/assets" / built).read_bytes(), built
