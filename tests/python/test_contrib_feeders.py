"""gdaxfeeder and binancefeeder against a local exchange server (no internet).

The local server speaks the exchanges' real formats: Coinbase Exchange
`/products/<id>/candles?start&end&granularity` → `[[time, low, high, open, close, volume], ...]` newest first
(at most 300), `{"message": ...}` errors; Binance `/api/v3/klines?symbol&interval&startTime&endTime&limit` →
`[[openTime ms, "o", "h", "l", "c", "v", closeTime ms, "qv", trades, "tb", "tq", "0"], ...]` oldest first
(at most 1000, including the still-open candle), `{"code": .., "msg": ..}` errors. Bars are a deterministic
function of the minute, minutes with no trades are missing (like real exchanges), some requests are answered
with 429 (Retry-After), 418 and 500 to exercise back-off.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pyarrow.flight as fl

T = 60  # 1Min


def bar(t: int):
    """Deterministic bar of minute t, or None when the minute had no trades."""
    m = t // 60
    if m % 7 == 3:
        return None
    p = 100 + (m % 1000) * 0.25
    return dict(t=t, open=p, high=p + 0.5, low=p - 0.5, close=p + 0.125, volume=float(m % 50 + 1))


def expected(start: int, end: int):
    return [b for b in (bar(t) for t in range(start, end + 1, T)) if b]


class Exchange:
    def __init__(self):
        self.log: list[tuple[str, dict, int]] = []
        self.n = 0
        self.lock = threading.Lock()
        ex = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def send(self, code, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                u = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(u.query).items()}
                with ex.lock:
                    ex.n += 1
                    n = ex.n
                code, body, headers = ex.route(u.path, q, n)
                with ex.lock:
                    ex.log.append((u.path, q, code))
                self.send(code, body, headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()

    def route(self, path, q, n):
        now = int(time.time())
        # Every 9th request is rate limited, the 5th is a server error, the 13th a Binance ban (418).
        if n % 9 == 0:
            if path.startswith("/api/"):
                return 429, {"code": -1003, "msg": "Too many requests; current limit is 6000 request weight per 1 MINUTE."}, {"Retry-After": "1"}
            return 429, {"message": "Public rate limit exceeded"}, {"Retry-After": "1"}
        if n == 5:
            return 500, {"message": "Internal server error"}, {}
        if n == 13 and path.startswith("/api/"):
            return 418, {"code": -1003, "msg": "Way too many requests; IP banned until soon."}, {"Retry-After": "1"}
        if path.startswith("/products/") and path.endswith("/candles"):
            product = path.split("/")[2]
            if product != "BTC-USD":
                return 404, {"message": "NotFound"}, {}
            start = int(datetime.strptime(q["start"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
            end = int(datetime.strptime(q["end"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
            if int(q["granularity"]) != 60:
                return 400, {"message": "Unsupported granularity"}, {}
            if (end - start) // 60 + 1 > 300:
                return 400, {"message": "granularity too small for the requested time range. Count of aggregations requested exceeds 300"}, {}
            # Coinbase also returns the current (still open) candle.
            rows = [b for b in expected(start - start % 60, min(end, now)) if b["t"] >= start]
            rows.reverse()  # newest first
            return 200, [[b["t"], b["low"], b["high"], b["open"], b["close"], b["volume"]] for b in rows], {}
        if path == "/api/v3/klines":
            if q.get("symbol") != "ETHUSDT":
                return 400, {"code": -1121, "msg": "Invalid symbol."}, {}
            if q.get("interval") != "1m":
                return 400, {"code": -1120, "msg": "Invalid interval."}, {}
            limit = min(int(q.get("limit", 500)), 1000)
            start = int(q["startTime"]) // 1000
            end = min(int(q.get("endTime", now * 1000)) // 1000, now)
            start = start + (-start % 60)
            rows = expected(start, end)[:limit]
            out = [[b["t"] * 1000, f"{b['open']:.8f}", f"{b['high']:.8f}", f"{b['low']:.8f}", f"{b['close']:.8f}",
                    f"{b['volume']:.8f}", b["t"] * 1000 + 59999, "1.0", 7, "0.5", "0.5", "0"] for b in rows]
            return 200, out, {}
        return 404, {"message": "NotFound"}, {}

    def candle_requests(self, marker):
        with self.lock:
            return [(p, q, c) for p, q, c in self.log if marker in p]


def read(srv, key):
    c = fl.FlightClient(srv.flight_url)
    try:
        return c.do_get(fl.Ticket(json.dumps({"destination": key}).encode())).read_all()
    except fl.FlightError:
        return None
    except Exception:  # noqa: BLE001  (NotFound maps to ArrowKeyError etc.)
        return None


def rows(tbl):
    ep = tbl.column("Epoch").cast("int64").to_pylist()
    cols = {c: tbl.column(c).to_pylist() for c in ("Open", "High", "Low", "Close", "Volume")}
    return [dict(t=ep[i], open=cols["Open"][i], high=cols["High"][i], low=cols["Low"][i], close=cols["Close"][i],
                 volume=cols["Volume"][i]) for i in range(len(ep))]


def wait_until(fn, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


GDAX = "gdax_BTC-USD/1Min/OHLCV"
BINANCE = "binance_ETH-USDT/1Min/OHLCV"


def config(url, start):
    qs = datetime.fromtimestamp(start, timezone.utc).strftime("%Y-%m-%d %H:%M")
    return f"""bgworkers:
  - module: gdaxfeeder.so
    name: GdaxFetcher
    config:
      symbols: [BTC-USD, NOPE-USD]
      query_start: "{qs}"
      base_timeframe: 1Min
      base_url: {url}
      request_interval: 5ms
      poll_delay: 300ms
  - module: binancefeeder
    name: BinanceFetcher
    config:
      symbols: [ETH, NOPE]
      base_currencies: [USDT]
      query_start: "{qs}"
      base_timeframe: 1Min
      base_url: {url}
      request_interval: 5ms
      poll_delay: 300ms
"""


def check_complete(srv, key, start):
    tbl = read(srv, key)
    assert tbl is not None, key
    assert tbl.schema.field("Open").type == "double" and tbl.schema.field("Volume").type == "double"
    got = rows(tbl)
    eps = [r["t"] for r in got]
    assert eps == sorted(set(eps)), "duplicates or disorder"
    assert got == expected(start, eps[-1]), "gap or wrong values"
    return eps[-1]


def test_feeders_backfill_restart_resume_and_follow(server_factory):
    ex = Exchange()
    try:
        now = int(time.time())
        start = now - now % 60 - 2500 * 60  # 2,500 minutes: 9 Coinbase pages, 3 Binance pages
        srv = server_factory(config_extra=config(ex.url, start))
        last_closed = lambda: int(time.time()) // 60 * 60 - 60  # noqa: E731

        def caught_up(key):
            t = read(srv, key)
            if t is None or t.num_rows == 0:
                return False
            last = t.column("Epoch").cast("int64").to_pylist()[-1]
            # the newest closed minute, unless it had no trades
            return last >= last_closed() - 120

        wait_until(lambda: caught_up(GDAX) and caught_up(BINANCE), 120, "backfill")
        last_g = check_complete(srv, GDAX, start)
        last_b = check_complete(srv, BINANCE, start)
        log = srv.log()
        assert "gdaxfeeder" in log and "bars up to" in log  # progress in the log
        assert "NOPE-USD" in log and "404" in log  # a bad product is logged, the good one is fed
        assert "Invalid symbol" in log
        assert "429" in log and "retrying" in log  # rate limits were backed off
        # Coinbase pages never exceed 300 candles; Binance asks for at most 1000.
        for _, q, _ in ex.candle_requests("/candles"):
            s = datetime.strptime(q["start"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
            e = datetime.strptime(q["end"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
            assert (e - s) / 60 + 1 <= 300
        assert all(int(q["limit"]) <= 1000 for _, q, _ in ex.candle_requests("/klines"))

        # Stop, restart: the feeders resume after the last stored bar.
        assert srv.stop() == 0
        n_before = len(ex.log)
        srv.start()
        wait_until(lambda: any("/candles" in p and "BTC-USD" in p and c == 200 for p, q, c in ex.log[n_before:]), 90, "gdax request after restart")
        wait_until(lambda: any("/klines" in p and q.get("symbol") == "ETHUSDT" and c == 200 for p, q, c in ex.log[n_before:]), 90, "binance request after restart")
        after = ex.log[n_before:]
        g0 = next(q for p, q, c in after if "BTC-USD" in p and "/candles" in p)
        b0 = next(q for p, q, c in after if "/klines" in p and q.get("symbol") == "ETHUSDT")
        g_starts = [int(datetime.strptime(q["start"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
                    for p, q, c in after if "BTC-USD" in p and "/candles" in p]
        b_starts = [int(q["startTime"]) // 1000 for p, q, c in after if "/klines" in p and q.get("symbol") == "ETHUSDT"]
        # Resume point: right after the last stored bar, never earlier (no re-fetch, no duplicate) and no gap.
        assert g_starts[0] >= last_g + 60 and min(g_starts) == g_starts[0], (g_starts, last_g)
        assert b_starts[0] >= last_b + 60 and min(b_starts) == b_starts[0], (b_starts, last_b)
        g_eps = set(read(srv, GDAX).column("Epoch").cast("int64").to_pylist())
        b_eps = set(read(srv, BINANCE).column("Epoch").cast("int64").to_pylist())
        assert g_starts[0] - 60 in g_eps and b_starts[0] - 60 in b_eps
        assert "starting at " + datetime.fromtimestamp(g_starts[0], timezone.utc).strftime("%Y-%m-%d %H:%M:%S") in srv.log()
        # Follow: new closed bars arrive, still without gap or duplicate.
        wait_until(lambda: read(srv, GDAX).column("Epoch").cast("int64").to_pylist()[-1] > last_g, 150, "a new gdax bar")
        wait_until(lambda: read(srv, BINANCE).column("Epoch").cast("int64").to_pylist()[-1] > last_b, 150, "a new binance bar")
        check_complete(srv, GDAX, start)
        check_complete(srv, BINANCE, start)
    finally:
        ex.close()
