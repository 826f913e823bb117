"""alpacabkfeeder against a local Alpaca REST API (tests/python/alpaca_rest_fake.py: assets, snapshots, multi-symbol
bars with next_page_token, a stocks JSON file; current v2 formats, no internet): exact TICK rows from snapshot
polls, the daily-bar backfill paginated through a 429, a restart resuming the backfill after the last stored bar
without gap or duplicate, MarketStore's schedule keys (market hours, closedDays, off_hours_schedule,
extended_hours), its environment overrides, and a 401 that is one log line and no retry.

The schedule is driven by MarketStore's own keys, not by faking the clock: `open_time_NY: "0:00:00"` to
`close_time_NY: "23:59:59"` with no closed days polls every `interval`; today's New York date in `closedDays`
leaves only `off_hours_schedule`.
"""
from __future__ import annotations

import re
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np

from alpaca_rest_fake import FakeAlpacaRest, day_bar, snapshot, trading_days
from feeder_helpers import read, wait_until

KEY, SECRET = "PKFAKEBROKERKEY42", "fake-broker-secret-0xdeadbeef"
T1 = 1704207600  # 2024-01-02 15:00:00 UTC = 10:00 New York
TICK_COLS = ["QuoteTimestamp", "Ask", "AskSize", "Bid", "BidSize", "TradeTimestamp", "Price", "Size",
             "DailyTimestamp", "Open", "High", "Low", "Close", "Volume",
             "MinuteTimestamp", "MinuteOpen", "MinuteHigh", "MinuteLow", "MinuteClose", "MinuteVolume",
             "PreviousTimestamp", "PreviousOpen", "PreviousHigh", "PreviousLow", "PreviousClose", "PreviousVolume"]


def f32(x):
    return float(np.float32(x))


def secs(t: str) -> int:
    return int(datetime.strptime(t.split(".")[0].rstrip("Z"), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp())


def want_tick(s: dict):
    q, t = s["latestQuote"], s["latestTrade"]
    row = [max(secs(q["t"]), secs(t["t"])), secs(q["t"]), f32(q["ap"]), q["as"], f32(q["bp"]), q["bs"], secs(t["t"]), f32(t["p"]), t["s"]]
    for b in (s["dailyBar"], s["minuteBar"], s["prevDailyBar"]):
        row += [secs(b["t"]), f32(b["o"]), f32(b["h"]), f32(b["l"]), f32(b["c"]), b["v"]]
    return tuple(row)


def ticks(srv, sym):
    t = read(srv, f"{sym}/1Sec/TICK")
    if t is None:
        return []
    cols = [t.column("Epoch").cast("int64").to_pylist()] + [t.column(c).to_pylist() for c in TICK_COLS]
    return list(zip(*cols))


def daily(srv, sym):
    t = read(srv, f"{sym}/1D/OHLCV")
    if t is None:
        return []
    return list(zip(t.column("Epoch").cast("int64").to_pylist(), *(t.column(c).to_pylist() for c in ("Open", "High", "Low", "Close", "Volume"))))


def want_daily(sym, last):
    out = []
    for d in trading_days("2024-01-01", last):
        b = day_bar(sym, d)
        out.append((int(d.timestamp()), b["o"], b["h"], b["l"], b["c"], b["v"]))
    return out


def config(fake, extra: str, creds: str = f"api_key_id: {KEY}\n      api_secret_key: {SECRET}") -> str:
    return f"""bgworkers:
  - module: alpacabkfeeder.so
    name: AlpacaBk
    config:
      {creds}
      timeframe: 1Sec
      interval: 1
      base_url: {fake.url}
      assets_url: {fake.url}
      request_interval: 5ms
{extra}"""


ALWAYS_OPEN = """      exchanges: [NASDAQ]
      open_time_NY: "0:00:00"
      close_time_NY: "23:59:59"
      closedDaysOfTheWeek: []
      update_time: "23:59:59"
      backfill: {enabled: true, since: "2024-01-01", timeframe: 1D}
"""


def metrics(srv):
    with urllib.request.urlopen(f"{srv.http_url}/metrics", timeout=5) as r:
        text = r.read().decode()

    def metric(name):
        m = re.search(rf'^{name}(?:_total)?{{[^}}]*module="alpacabkfeeder.so"[^}}]*}} (\d+)', text, re.M)
        assert m, (name, [ln for ln in text.splitlines() if "feeder" in ln])
        return int(m.group(1))
    return metric


def test_alpacabk_snapshots_backfill_restart(server_factory):
    fake = FakeAlpacaRest(KEY, SECRET, page_size=3, rate_limit_first=1)
    try:
        s1 = snapshot(T1, T1 - 2, ask=185.5, bid=185.25, price=185.375, size=100)
        fake.snapshots = {"AAPL": s1}  # MSFT: null (no data yet)
        srv = server_factory(config_extra=config(fake, ALWAYS_OPEN))
        dump = lambda: srv.log()[-5000:] + "\n" + repr(fake.log[-20:])  # noqa: E731
        wait_until(lambda: ticks(srv, "AAPL") == [want_tick(s1)], 30, "the first TICK row", dump)
        assert read(srv, "MSFT/1Sec/TICK") is None
        # The next polls see new snapshots: one row per distinct time (a fixed 1Sec bucket), nothing twice.
        s2 = snapshot(T1 + 31, T1 + 30, ask=185.75, bid=185.5, price=185.625, size=5)
        m1 = snapshot(T1 + 5, T1 + 7, ask=370.5, bid=370.25, price=370.375, size=12)
        fake.snapshots = {"AAPL": s2, "MSFT": m1}
        wait_until(lambda: ticks(srv, "AAPL") == [want_tick(s1), want_tick(s2)] and ticks(srv, "MSFT") == [want_tick(m1)], 30, "the second poll", dump)
        time.sleep(2)  # more polls of the same snapshots change nothing
        assert ticks(srv, "AAPL") == [want_tick(s1), want_tick(s2)]
        t = read(srv, "AAPL/1Sec/TICK")
        assert [str(t.schema.field(c).type) for c in ("Ask", "AskSize", "QuoteTimestamp", "Volume")] == ["float", "uint32", "int64", "uint64"]

        # The backfill: the NASDAQ symbols only, one multi-symbol request paginated through next_page_token.
        wait_until(lambda: daily(srv, "AAPL") == want_daily("AAPL", "2024-01-12") and daily(srv, "MSFT") == want_daily("MSFT", "2024-01-12"), 30, "daily bars", dump)
        assert read(srv, "IBM/1D/OHLCV") is None
        bars = fake.requests("/v2/stocks/bars")
        assert any(c == 429 for p, _, c in fake.log if p == "/v2/stocks/bars"), "rate limited once, retried"
        assert bars[0]["symbols"] == "AAPL,MSFT" and bars[0]["start"] == "2024-01-01T00:00:00Z" and "page_token" not in bars[0]
        assert len(bars) == 7 and bars[-1]["page_token"] == "18", bars  # 20 bars, 3 a page
        snaps = fake.requests("/v2/stocks/snapshots")
        assert snaps[0]["symbols"] == "AAPL,MSFT"
        m = metrics(srv)
        assert m("mkts_feeder_rows_backfilled") == 20
        assert m("mkts_feeder_rows_written") >= 23  # 20 bars and at least 3 TICK rows (re-polls rewrite them)
        assert m("mkts_feeder_messages") >= len(bars) + len(snaps)
        assert m("mkts_feeder_last_bar_time_seconds") == int(datetime(2024, 1, 12, tzinfo=timezone.utc).timestamp())

        # Stop and restart a week later: the backfill asks only for what follows the last stored bar.
        assert srv.stop() == 0
        n_before = len(fake.requests("/v2/stocks/bars"))
        fake.last_day = "2024-01-19"
        srv.start()
        wait_until(lambda: daily(srv, "AAPL") == want_daily("AAPL", "2024-01-19") and daily(srv, "MSFT") == want_daily("MSFT", "2024-01-19"), 30, "bars after restart", dump)
        again = fake.requests("/v2/stocks/bars")[n_before:]
        assert again[0]["start"] == "2024-01-13T00:00:00Z", again
        assert ticks(srv, "AAPL") == [want_tick(s1), want_tick(s2)]
        assert metrics(srv)("mkts_feeder_rows_backfilled") == 10
        log = srv.log()
        assert "backfill of 1D bars done" in log and "2 symbols to poll" in log
        assert KEY not in log and SECRET not in log
    finally:
        fake.close()


def test_alpacabk_schedule_extended_hours_stocks_json_env(server_factory, monkeypatch):
    """Market closed today (closedDays): only `off_hours_schedule` polls, at most once a minute; with
    `extended_hours: false` a snapshot last updated outside 9:30-16:00 New York is not stored. Symbols come
    from `stocks_json_url` behind Basic auth; the key from $ALPACA_BROKER_FEEDER_API_KEY_ID overrides the config's;
    `auth_method: header`."""
    fake = FakeAlpacaRest(KEY, SECRET, auth="header")
    try:
        today = datetime.now(ZoneInfo("America/New_York")).date()
        closed = ", ".join(f'"{today + timedelta(days=d)}"' for d in (-1, 0, 1))
        fake.snapshots = {
            "AAPL": snapshot(T1, T1 - 1, ask=185.5, bid=185.25, price=185.375, size=100),
            "MSFT": snapshot(T1 + 7 * 3600, T1 + 7 * 3600, ask=370.5, bid=370.25, price=370.375, size=1),  # 17:00 NY
        }
        monkeypatch.setenv("ALPACA_BROKER_FEEDER_API_KEY_ID", KEY)
        extra = f"""      exchanges: [NYSE]
      auth_method: header
      stocks_json_url: {fake.url}/stocks.json
      stocks_json_basic_auth: "user:pass"
      open_time_NY: "9:30:00"
      close_time_NY: "16:00:00"
      closedDaysOfTheWeek: []
      closedDays: [{closed}]
      off_hours_schedule: "{",".join(str(m) for m in range(60))}"
      extended_hours: false
"""
        srv = server_factory(config_extra=config(fake, extra, creds=f"api_key_id: wrong-key-in-config\n      api_secret_key: {SECRET}"))
        wait_until(lambda: len(ticks(srv, "AAPL")) == 1, 30, "the off-hours poll", lambda: srv.log()[-4000:] + repr(fake.log))
        time.sleep(3)
        snaps = fake.requests("/v2/stocks/snapshots")
        assert 1 <= len(snaps) <= 2, snaps  # interval 1 s, but at most one poll a minute off hours
        assert snaps[0]["symbols"] == "AAPL,IBM,MSFT"
        assert read(srv, "MSFT/1Sec/TICK") is None, "17:00 New York is outside the hours: dropped"
        assert not fake.requests("/v2/assets") and not fake.requests("/v2/stocks/bars")
        log = srv.log()
        assert "off_hours_schedule is set but extended_hours is false" in log
        assert KEY not in log and SECRET not in log and "user:pass" not in log
    finally:
        fake.close()


def test_alpacabk_401_is_one_line_and_no_retry(server_factory, monkeypatch):
    fake = FakeAlpacaRest("the-real-key", "the-real-secret")
    try:
        monkeypatch.setenv("APCA_API_KEY_ID", KEY)  # credentials from Alpaca's SDK variables
        monkeypatch.setenv("APCA_API_SECRET_KEY", SECRET)
        srv = server_factory(config_extra=config(fake, ALWAYS_OPEN, creds=""))
        wait_until(lambda: "authentication failed" in srv.log(), 30, "the 401")
        time.sleep(3)
        assert [(p, c) for p, _, c in fake.log] == [("/v2/assets", 401)]
        lines = [ln for ln in srv.log().splitlines() if "authentication failed" in ln]
        assert len(lines) == 1 and "HTTP 401" in lines[0] and "not retrying until restart" in lines[0], lines
        assert KEY not in srv.log() and SECRET not in srv.log()
    finally:
        fake.close()
