"""The alpaca feeder against a local Alpaca v2 market-data stream and REST bars (real message formats, no
internet): exact bars/trades/quotes over Flight, duplicates and out-of-order events, a dropped connection
reconnecting with the gap filled over REST (429, next_page_token), a non-fatal error logged, auth failure and insufficient subscription as one log line without retries.

Stream format: `[{"T":"success","msg":"connected"}]`; client `{"action":"auth","key","secret"}` →
`[{"T":"success","msg":"authenticated"}]` or `[{"T":"error","code":402,"msg":"auth failed"}]`; client
`{"action":"subscribe","bars":[..],"trades":[..],"quotes":[..]}` → `[{"T":"subscription",...}]`; events
`{"T":"b"|"t"|"q","S":...}` with RFC 3339 times.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlparse

from feeder_helpers import JsonHttpServer, read
from polygon_fake import FakePolygon

KEY, SECRET = "AKFAKEKEYID123", "fake-secret-xyz-987"
T0 = 1704205800  # 2024-01-02 14:30:00 UTC


def iso(secs: int, ns: int = 0) -> str:
    """RFC 3339 as Alpaca sends it (nanoseconds when there are any)."""
    return datetime.fromtimestamp(secs, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + (f".{ns:09d}Z" if ns else "Z")


def bar(m: int) -> dict:
    p = 470.0 + m
    return {"T": "b", "S": "SPY", "o": p, "h": p + 1, "l": p - 1, "c": p + 0.5, "v": 1000 + m, "t": iso(T0 + 60 * m), "n": 10 + m, "vw": p}


def want_bar(m):
    p = 470.0 + m
    return (T0 + 60 * m, p, p + 1, p - 1, p + 0.5, 1000 + m)


TR1 = {"T": "t", "S": "AAPL", "i": 96921, "x": "D", "p": 185.5, "s": 100, "t": iso(T0 + 1, 250_000_000), "c": ["@", "I"], "z": "C"}
TR2 = {"T": "t", "S": "AAPL", "i": 96922, "x": "V", "p": 185.75, "s": 5, "t": iso(T0 + 2, 123), "c": ["@"], "z": "C"}
TR_EARLY = {"T": "t", "S": "AAPL", "i": 96920, "x": "D", "p": 185.25, "s": 7, "t": iso(T0, 500_000_000), "c": ["@"], "z": "C"}
Q1 = {"T": "q", "S": "AAPL", "bx": "U", "bp": 185.4, "bs": 1, "ax": "Q", "ap": 185.6, "as": 4, "t": iso(T0 + 1, 335_689_322), "c": ["R"], "z": "C"}


def login(conn, ok=True, code=402, msg="auth failed"):
    conn.send([{"T": "success", "msg": "connected"}])
    a = conn.recv()
    assert a["action"] == "auth"
    if not ok or a.get("key") != KEY or a.get("secret") != SECRET:
        conn.send([{"T": "error", "code": code, "msg": msg}])
        return False
    conn.send([{"T": "success", "msg": "authenticated"}])
    sub = conn.recv()
    assert sub["action"] == "subscribe"
    conn.send([{"T": "subscription", "trades": sub["trades"], "quotes": sub["quotes"], "bars": sub["bars"], "updatedBars": [], "dailyBars": []}])
    return True


def conn1(conn):
    if not login(conn):
        return
    conn.send([bar(0), bar(1)])
    conn.send([TR1, Q1, TR2])
    conn.send([TR_EARLY, TR1, Q1])  # early trade after later ones; TR1 and Q1 repeated
    conn.send([bar(2), bar(1)])  # bar 1 re-sent
    time.sleep(1.0)
    conn.drop()


def conn2(conn):
    if not login(conn):
        return
    conn.send([{"T": "error", "code": 405, "msg": "symbol limit exceeded"}])
    conn.send([bar(7), bar(8)])  # minutes 3..6 were missed while disconnected
    conn.idle()


class AlpacaRest:
    """`GET /v2/stocks/{sym}/bars?timeframe=1Min&start&end&limit&adjustment&feed[&page_token]` →
    `{"bars": [{"t","o","h","l","c","v","n","vw"}], "symbol", "next_page_token"}`, pages of 2, key/secret
    headers required (403 `{"message": "forbidden."}` otherwise), the first request answered 429."""

    def __init__(self):
        self.log = []
        self.first = True
        self.server = JsonHttpServer(self.route)
        self.url = self.server.url

    def route(self, raw, headers):
        u = urlparse(raw)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if headers.get("APCA-API-KEY-ID") != KEY or headers.get("APCA-API-SECRET-KEY") != SECRET:
            code, body, hdr = 403, {"message": "forbidden."}, {}
        elif self.first:
            self.first = False
            code, body, hdr = 429, {"message": "too many requests."}, {"Retry-After": "1"}
        else:
            sym = u.path.split("/")[3]
            start = int(datetime.strptime(q["start"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
            end = int(datetime.strptime(q["end"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
            ms = [m for m in range(0, 100) if start <= T0 + 60 * m <= end]
            skip = int(q.get("page_token", "0"))
            page = ms[skip:skip + 2]
            bars = [{k: v for k, v in bar(m).items() if k not in ("T", "S")} for m in page]
            code, body, hdr = 200, {"bars": bars, "symbol": sym, "next_page_token": str(skip + 2) if skip + 2 < len(ms) else None}, {}
        self.log.append((u.path, q, code))
        return code, body, hdr


def config(fake, creds=f"api_key: {KEY}\n      api_secret: {SECRET}", base_url="http://127.0.0.1:9"):
    return f"""bgworkers:
  - module: alpaca.so
    name: Alpaca
    config:
      {creds}
      ws_server: {fake.ws_url}/v2/iex
      feed: iex
      minute_bar_symbols: [SPY]
      trade_symbols: [AAPL]
      quote_symbols: [AAPL]
      ws_worker_count: 10
      base_url: {base_url}
      request_interval: 5ms
"""


def bars_of(srv):
    t = read(srv, "SPY/1Min/OHLCV")
    if t is None:
        return []
    return list(zip(t.column("Epoch").cast("int64").to_pylist(), *(t.column(c).to_pylist() for c in ("Open", "High", "Low", "Close", "Volume"))))


def wait_until(fn, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_alpaca_stream_reconnect_exact_rows(server_factory):
    fake = FakePolygon(KEY, [conn1, conn2])
    rest = AlpacaRest()
    try:
        srv = server_factory(config_extra=config(fake, base_url=rest.url))
        wait_until(lambda: bars_of(srv) == [want_bar(m) for m in range(9)], 60, "bars 0..8 (3..6 over REST)")
        ok = [q for p, q, c in rest.log if c == 200]
        assert [p for p, q, c in rest.log][0] == "/v2/stocks/SPY/bars" and any(c == 429 for _, _, c in rest.log)
        assert ok[0]["start"] == iso(T0 + 180) and ok[0]["end"] == iso(T0 + 360) and ok[0]["feed"] == "iex"
        assert len(ok) == 2 and ok[1]["page_token"] == "2"  # followed next_page_token
        assert fake.connections == 2
        tr = read(srv, "AAPL/1Sec/TRADE")
        rows = list(zip(tr.column("Epoch").cast("int64").to_pylist(), *(tr.column(c).to_pylist() for c in ("Nanoseconds", "Price", "Size", "Exchange", "TapeID", "Cond1", "Cond2", "Cond3", "Cond4"))))
        assert rows == [
            (T0, 500_000_000, 185.25, 7, ord("D"), ord("C"), ord("@"), 0, 0, 0),
            (T0 + 1, 250_000_000, 185.5, 100, ord("D"), ord("C"), ord("@"), ord("I"), 0, 0),
            (T0 + 2, 123, 185.75, 5, ord("V"), ord("C"), ord("@"), 0, 0, 0),
        ]
        q = read(srv, "AAPL/1Sec/QUOTE")
        assert q.num_rows == 1
        assert [q.column(c)[0].as_py() for c in ("Nanoseconds", "BidPrice", "AskPrice", "BidSize", "AskSize", "BidExchange", "AskExchange", "Cond")] == [335_689_322, 185.4, 185.6, 1, 4, ord("U"), ord("Q"), ord("R")]
        subs = [m for m in fake.ws_messages if m.get("action") == "subscribe"]
        assert subs[0] == {"action": "subscribe", "bars": ["SPY"], "trades": ["AAPL"], "quotes": ["AAPL"]}
        log = srv.log()
        assert "lost" in log and "reconnecting" in log
        assert "error 405: symbol limit exceeded" in log
        assert KEY not in log and SECRET not in log
        assert not fake.errors, fake.errors
    finally:
        fake.close()
        rest.server.close()


def test_alpaca_auth_failure_and_insufficient_subscription_stop(server_factory, monkeypatch):
    for code, msg in ((402, "auth failed"), (409, "insufficient subscription")):
        def refuse(conn, code=code, msg=msg):
            login(conn, ok=False, code=code, msg=msg)
            conn.idle()

        fake = FakePolygon(KEY, [refuse])
        try:
            # Credentials from Alpaca's environment variables.
            monkeypatch.setenv("APCA_API_KEY_ID", KEY)
            monkeypatch.setenv("APCA_API_SECRET_KEY", SECRET)
            srv = server_factory(config_extra=config(fake, creds=""))
            wait_until(lambda: "authentication failed" in srv.log(), 30, "the failure")
            time.sleep(3)
            assert fake.connections == 1
            lines = [ln for ln in srv.log().splitlines() if "authentication failed" in ln]
            assert len(lines) == 1 and f"error {code}: {msg}" in lines[0] and "not retrying" in lines[0], lines
            assert KEY not in srv.log() and SECRET not in srv.log()
            srv.stop()
        finally:
            fake.close()


def test_alpaca_stop_and_restart_resumes_without_gap_or_duplicate(server_factory):
    """Stopped after minutes 0..2 and restarted: the stream resumes at minute 7, minutes 3..6 come over REST, the
    trades are not written twice."""
    def first(conn):
        if login(conn):
            conn.send([bar(0), bar(1), bar(2)])
            conn.send([TR1, TR2])
            conn.idle()

    def after_restart(conn):
        if login(conn):
            conn.send([bar(7), bar(8)])
            conn.idle()

    fake = FakePolygon(KEY, [first, after_restart])
    rest = AlpacaRest()
    try:
        srv = server_factory(config_extra=config(fake, base_url=rest.url))
        tr_rows = lambda: (t := read(srv, "AAPL/1Sec/TRADE")) is not None and t.num_rows  # noqa: E731
        wait_until(lambda: bars_of(srv) == [want_bar(m) for m in range(3)] and tr_rows() == 2, 60, "bars 0..2 and two trades")
        assert not rest.log, "nothing to fill before the first bar of an empty bucket"
        assert srv.stop() == 0
        srv.start()
        wait_until(lambda: bars_of(srv) == [want_bar(m) for m in range(9)], 60, "bars 0..8 after the restart (3..6 over REST)")
        ok = [q for p, q, c in rest.log if c == 200]
        assert ok[0]["start"] == iso(T0 + 180) and ok[0]["end"] == iso(T0 + 360), ok
        assert read(srv, "AAPL/1Sec/TRADE").num_rows == 2
        assert fake.connections == 2
        assert KEY not in srv.log() and SECRET not in srv.log()
    finally:
        fake.close()
        rest.server.close()
