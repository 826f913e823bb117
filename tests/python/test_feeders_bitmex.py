"""bitmexfeeder against a local BitMEX REST server (no internet): `GET /api/v1/trade/bucketed?binSize&partial
&reverse&count&symbol&startTime&endTime` → `[{"timestamp" (end of the bucket), "symbol", "open", "high", "low",
"close", "trades", "volume", "vwap", "lastSize", "turnover", "homeNotional", "foreignNotional"}]` oldest first,
at most `count` (≤ 1000), empty buckets with null prices; `{"error": {"message", "name"}}` errors and a 429 with
Retry-After. MarketStore's default `base_timeframe: 1m` is accepted (its own parser rejected it).
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlparse

from feeder_helpers import JsonHttpServer, read


def bar(t):
    """Deterministic 1m bar opening at t, or None (a bucket without trades)."""
    m = t // 60
    if m % 5 == 2:
        return None
    p = 40000 + (m % 997) * 0.5
    return dict(t=t, open=p, high=p + 5, low=p - 5, close=p + 1, volume=float(1000 + m % 100))


def iso(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_iso(s):
    return int(datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp())


class Bitmex:
    def __init__(self):
        self.log = []
        self.n = 0
        self.lock = threading.Lock()
        self.server = JsonHttpServer(self.handle)
        self.url = self.server.url

    def handle(self, raw, headers):
        u = urlparse(raw)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        with self.lock:
            self.n += 1
            n = self.n
        code, body, hdr = self.route(u.path, q, n)
        with self.lock:
            self.log.append((u.path, q, code))
        return code, body, hdr

    def route(self, path, q, n):
        if n == 2:
            return 429, {"error": {"message": "Rate limit exceeded, retry in 1 seconds.", "name": "RateLimitError"}}, {"Retry-After": "1"}
        if path != "/api/v1/trade/bucketed":
            return 404, {"error": {"message": "Not Found", "name": "HTTPError"}}, {}
        if q.get("symbol") != "XBTUSD":
            return 400, {"error": {"message": "Invalid symbol", "name": "HTTPError"}}, {}
        assert q["binSize"] == "1m" and q["partial"] == "false" and q["reverse"] == "false"
        count = min(int(q.get("count", 100)), 1000)
        start, end = parse_iso(q["startTime"]), parse_iso(q["endTime"])
        out = []
        for close_t in range(start + (-start) % 60, end + 1, 60):
            b = bar(close_t - 60)
            row = {"timestamp": iso(close_t), "symbol": "XBTUSD", "trades": 0, "volume": 0, "vwap": None, "lastSize": None,
                   "turnover": 0, "homeNotional": 0, "foreignNotional": 0, "open": None, "high": None, "low": None, "close": None}
            if b:
                row.update(open=b["open"], high=b["high"], low=b["low"], close=b["close"], volume=b["volume"], trades=7)
            out.append(row)
        return 200, out[:count], {}


def rows(t):
    ep = t.column("Epoch").cast("int64").to_pylist()
    cols = [t.column(c).to_pylist() for c in ("Open", "High", "Low", "Close", "Volume")]
    return [dict(t=ep[i], open=cols[0][i], high=cols[1][i], low=cols[2][i], close=cols[3][i], volume=cols[4][i]) for i in range(len(ep))]


def wait_until(fn, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_bitmex_backfill_pages_429_and_restart(server_factory):
    ex = Bitmex()
    try:
        now = int(time.time())
        end = now - now % 60 - 3600
        while bar(end) is None:  # at query_end the feeder waits for a bar that never comes; keep it simple
            end -= 60
        start = end - 1200 * 60  # 1,201 minutes: three pages of 500
        fmt = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
        cfg = f"""bgworkers:
  - module: bitmexfeeder.so
    name: BitmexFetcher
    config:
      symbols: [XBTUSD, NOPE]
      query_start: "{fmt(start)}"
      query_end: "{fmt(end)}"
      base_timeframe: 1m
      base_url: {ex.url}
      request_interval: 5ms
"""
        srv = server_factory(config_extra=cfg)
        want = [b for b in (bar(t) for t in range(start, end + 1, 60)) if b]
        key = "bitmex_XBTUSD/1Min/OHLCV"
        wait_until(lambda: (t := read(srv, key)) is not None and rows(t) == want, 60, "the backfill")
        log = srv.log()
        assert "429" in log and "retrying" in log
        assert "Invalid symbol" in log  # a bad instrument is logged, the good one is fed
        pages = [q for p, q, c in ex.log if c == 200 and q.get("symbol") == "XBTUSD"]
        assert len(pages) == 3 and all(int(q["count"]) <= 500 for q in pages)
        # Requests ask for bucket ends: the first covers the bar opening at query_start.
        assert parse_iso(pages[0]["startTime"]) == start + 60

        # Restart: everything up to query_end is stored, so nothing is fetched again and nothing doubles.
        assert srv.stop() == 0
        n = len(ex.log)
        srv.start()
        time.sleep(3)
        assert not [q for p, q, c in ex.log[n:] if q.get("symbol") == "XBTUSD"]
        assert rows(read(srv, key)) == want
    finally:
        ex.server.close()


def bitmex_config(ex, start, end, symbols="[XBTUSD]"):
    fmt = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
    return f"""bgworkers:
  - module: bitmexfeeder.so
    name: BitmexFetcher
    config:
      symbols: {symbols}
      query_start: "{fmt(start)}"
      query_end: "{fmt(end)}"
      base_url: {ex.url}
      request_interval: 5ms
"""


def test_bitmex_stopped_mid_backfill_resumes_without_gap_or_duplicate(server_factory):
    """The server stops while the feeder is backing off a failing page; restarted, it continues right after the
    last stored bar. `base_timeframe` is left out: the default (MarketStore's `1m`, which its parser rejected)
    works."""
    class Flaky(Bitmex):
        healthy = False

        def route(self, path, q, n):
            pages = [1 for p, qq, c in self.log if c == 200 and qq.get("symbol") == "XBTUSD"]
            if not self.healthy and len(pages) >= 1:
                return 503, {"error": {"message": "The system is currently overloaded. Please try again later.", "name": "HTTPError"}}, {}
            return super().route(path, q, n)

    ex = Flaky()
    try:
        now = int(time.time())
        end = now - now % 60 - 3600
        while bar(end) is None:
            end -= 60
        start = end - 1200 * 60
        srv = server_factory(config_extra=bitmex_config(ex, start, end))
        key = "bitmex_XBTUSD/1Min/OHLCV"
        want = [b for b in (bar(t) for t in range(start, end + 1, 60)) if b]
        wait_until(lambda: any(c == 503 for _, _, c in ex.log), 60, "a failing second page")
        first = rows(read(srv, key))
        assert first == want[:len(first)] and 0 < len(first) < len(want)
        assert srv.stop() == 0  # interrupts the back-off
        ex.healthy = True
        n = len(ex.log)
        srv.start()
        wait_until(lambda: (t := read(srv, key)) is not None and rows(t) == want, 60, "the rest of the backfill")
        after = [q for p, q, c in ex.log[n:] if c == 200 and q.get("symbol") == "XBTUSD"]
        # Bucket ends: the first request after the restart covers the bar right after the last stored one.
        assert parse_iso(after[0]["startTime"]) == first[-1]["t"] + 120, (after[0], first[-1])
    finally:
        ex.server.close()


def test_bitmex_403_is_one_line_and_stops(server_factory):
    class Banned(Bitmex):
        def route(self, path, q, n):
            return 403, {"error": {"message": "Forbidden", "name": "HTTPError"}}, {}

    ex = Banned()
    try:
        now = int(time.time())
        srv = server_factory(config_extra=bitmex_config(ex, now - 7200, now - 3600, symbols="[XBTUSD, ETHUSD]"))
        wait_until(lambda: "access refused" in srv.log(), 60, "the refusal")
        lines = [ln for ln in srv.log().splitlines() if "HTTP 403" in ln]
        assert len(lines) == 1 and "not retrying" in lines[0], lines
        assert len(ex.log) == 1, ex.log  # not retried, the second symbol not tried: the worker has ended
        assert read(srv, "bitmex_XBTUSD/1Min/OHLCV") is None
    finally:
        ex.server.close()
