"""The polygon feeder against a local Polygon (tests/python/polygon_fake.py: its WebSocket and REST formats; no
internet): exact rows read back over Flight, duplicates and out-of-order events, trade-condition filtering, a
connection dropped mid-stream and the gap filled over REST (pagination, a 429), a restart resuming without
gap or duplicate, an authentication failure that is one log line and no retry.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request

from feeder_helpers import read
from polygon_fake import T0, FakePolygon, am, bar, minutes

KEY = "sekret-KEY-1234567890"


def bars_of(srv, key):
    t = read(srv, key)
    if t is None:
        return []
    ep = t.column("Epoch").cast("int64").to_pylist()
    cols = [t.column(c).to_pylist() for c in ("Open", "High", "Low", "Close", "Volume")]
    return [(ep[i],) + tuple(c[i] for c in cols) for i in range(len(ep))]


def expected_bars(sym, ts):
    return [(t, bar(sym, t)["o"], bar(sym, t)["h"], bar(sym, t)["l"], bar(sym, t)["c"], bar(sym, t)["v"]) for t in ts]


def wait_until(fn, timeout, what):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def config(fake, key_line=f"api_key: {KEY}"):
    return f"""bgworkers:
  - module: polygon.so
    name: Polygon
    config:
      {key_line}
      data_types: [bars, trades, quotes]
      symbols: [AAPL, MSFT]
      ws_servers: {fake.ws_url}
      base_url: {fake.base_url}
      request_interval: 5ms
"""


def trade(i, sec, ms, p, s, c, x=4, q=None):
    return {"ev": "T", "sym": "AAPL", "x": x, "i": str(i), "z": 3, "p": p, "s": s, "c": c, "t": (T0 + sec) * 1000 + ms, "q": q or i}


TR1 = trade(1, 1, 250, 100.5, 100, [0, 12])
TR2 = trade(2, 2, 500, 100.75, 50, [37], x=11)
TR_OFFICIAL_CLOSE = trade(3, 3, 0, 101.0, 500, [15])
TR_ZERO = trade(4, 3, 1, 101.0, 0, [])
TR_LATE = trade(5, 0, 100, 100.25, 10, [])  # arrives after TR2 but happened first
Q1 = {"ev": "Q", "sym": "AAPL", "bx": 4, "bp": 100.4, "bs": 3, "ax": 7, "ap": 100.6, "as": 2, "c": 1, "i": [604], "t": (T0 + 1) * 1000 + 5, "q": 77}
Q2 = {"ev": "Q", "sym": "AAPL", "bx": 11, "bp": 100.45, "bs": 1, "ax": 12, "ap": 100.55, "as": 9, "c": 0, "t": (T0 + 4) * 1000, "q": 78}


def stream_minutes(conn, a, b):
    for t in minutes(a, b):
        conn.send([am("AAPL", t), am("MSFT", t)])


def conn1(conn):
    if not conn.login(KEY):
        return
    stream_minutes(conn, 0, 5)
    conn.send([am("AAPL", T0 + 4 * 60)])  # duplicate bar
    conn.send([am("MSFT", T0 + 2 * 60), am("AAPL", T0 + 2 * 60)])  # out of order (re-sent)
    conn.send([TR1, Q1, TR2, TR_OFFICIAL_CLOSE, TR_ZERO])
    conn.send([TR_LATE, TR1, Q1, Q2])  # TR1 and Q1 again
    stream_minutes(conn, 6, 9)
    time.sleep(1.0)
    conn.drop()  # network loss mid-stream


def conn2(conn):
    if conn.login(KEY):
        conn.send([{"ev": "status", "status": "error", "message": "not authorized: Q.MSFT"}])  # a refused channel
        stream_minutes(conn, 20, 29)
        conn.idle()


def conn3(conn):
    if conn.login(KEY):
        stream_minutes(conn, 40, 44)
        conn.idle()


def test_polygon_stream_drop_gap_fill_restart(server_factory):
    fake = FakePolygon(KEY, [conn1, conn2, conn3], page_size=4, rate_limit_first=1)
    try:
        srv = server_factory(config_extra=config(fake))
        want = lambda a, b: {s: expected_bars(s, minutes(a, b)) for s in ("AAPL", "MSFT")}  # noqa: E731
        got = lambda: {s: bars_of(srv, f"{s}/1Min/OHLCV") for s in ("AAPL", "MSFT")}  # noqa: E731
        try:
            wait_until(lambda: got() == want(0, 29), 60, "bars 0..29 (streamed, gap 10..19 over REST)")
        except AssertionError:
            print(srv.log()[-6000:], got(), fake.rest_log, fake.errors, sep="\n")
            raise
        assert fake.connections == 2

        # Progress in /metrics, labelled like the plugin.
        with urllib.request.urlopen(f"{srv.http_url}/metrics", timeout=5) as r:
            metrics = r.read().decode()

        def metric(name):
            m = re.search(rf'^{name}(?:_total)?{{[^}}]*module="polygon.so"[^}}]*}} (\d+)', metrics, re.M)
            assert m, (name, [ln for ln in metrics.splitlines() if "feeder" in ln])
            return int(m.group(1))

        assert metric("mkts_feeder_reconnects") >= 1
        assert metric("mkts_feeder_last_bar_time_seconds") == minutes(0, 29)[-1]
        assert metric("mkts_feeder_rows_backfilled") == 2 * len(minutes(10, 19))
        assert metric("mkts_feeder_duplicates_dropped") == 2  # TR1 and Q1 re-sent
        assert metric("mkts_feeder_rows_written") >= 2 * len(minutes(0, 29)) + 3 + 2
        assert metric("mkts_feeder_messages") > 0

        # Schemas: MarketStore's bar types.
        t = read(srv, "AAPL/1Min/OHLCV")
        assert [str(t.schema.field(c).type) for c in ("Open", "High", "Low", "Close", "Volume")] == ["double"] * 4 + ["uint64"]

        # Trades: filtered by size and condition, the repeat dropped, stored in time order.
        tr = read(srv, "AAPL/1Sec/TRADE")
        assert tr is not None
        rows = list(zip(tr.column("Epoch").cast("int64").to_pylist(), tr.column("Nanoseconds").to_pylist(), tr.column("Price").to_pylist(),
                        tr.column("Size").to_pylist(), tr.column("Exchange").to_pylist(), tr.column("TapeID").to_pylist(),
                        tr.column("Cond1").to_pylist(), tr.column("Cond2").to_pylist(), tr.column("Cond3").to_pylist(), tr.column("Cond4").to_pylist()))
        assert rows == [
            (T0, 100_000_000, 100.25, 10, 4, 3, 0, 0, 0, 0),
            (T0 + 1, 250_000_000, 100.5, 100, 4, 3, 0, 12, 0, 0),
            (T0 + 2, 500_000_000, 100.75, 50, 11, 3, 37, 0, 0, 0),
        ]
        qt = read(srv, "AAPL/1Sec/QUOTE")
        qrows = list(zip(*(qt.column(c).to_pylist() for c in ("Nanoseconds", "BidPrice", "AskPrice", "BidSize", "AskSize", "BidExchange", "AskExchange", "Cond"))))
        assert qt.column("Epoch").cast("int64").to_pylist() == [T0 + 1, T0 + 4]
        assert qrows == [(5_000_000, 100.4, 100.6, 3, 2, 4, 7, 1), (0, 100.45, 100.55, 1, 9, 11, 12, 0)]

        # The gap went over REST: rate limited once, paginated through next_url, only the missing minutes.
        ok = [(p, q) for p, q, c in fake.rest_log if c == 200]
        assert any(c == 429 for _, _, c in fake.rest_log)
        first_pages = [p for p, q in ok if "cursor" not in q]
        assert sorted(first_pages) == sorted(f"/v2/aggs/ticker/{s}/range/1/minute/{(T0 + 600) * 1000}/{(T0 + 19 * 60) * 1000 + 59999}" for s in ("AAPL", "MSFT"))
        assert any("cursor" in q for _, q in ok), "next_url followed"
        log = srv.log()
        assert "429" in log and "retrying" in log
        assert "lost" in log and "reconnecting" in log
        assert "filled over REST" in log
        assert "error: not authorized: Q.MSFT" in log  # logged; the stream goes on
        assert "subscribing to 6 channels" in log
        # Subscribed to what was configured; the key went only into the auth message.
        subs = [m["params"] for m in fake.ws_messages if m.get("action") == "subscribe"]
        assert subs[0] == "AM.AAPL,AM.MSFT,T.AAPL,T.MSFT,Q.AAPL,Q.MSFT", subs
        assert all(m["params"] == KEY for m in fake.ws_messages if m.get("action") == "auth")

        # Stop and restart: the third connection streams minutes 40..; 30..39 comes over REST, nothing twice.
        assert srv.stop() == 0
        srv.start()
        wait_until(lambda: got() == want(0, 44), 60, "bars 0..44 after restart")
        assert fake.connections == 3
        assert len(read(srv, "AAPL/1Sec/TRADE")) == 3
        log = srv.log()
        assert KEY not in log, "the API key must never be logged"
        assert not fake.errors, fake.errors
    finally:
        fake.close()


def test_polygon_auth_failure_is_one_line_and_no_retry(server_factory, monkeypatch):
    def refuse(conn):
        conn.login(KEY, ok=False)
        conn.idle()

    fake = FakePolygon(KEY, [refuse])
    try:
        wrong = "wrong-key-from-env-42"
        monkeypatch.setenv("POLYGON_API_KEY", wrong)  # no api_key in the config: the environment's is used
        srv = server_factory(config_extra=config(fake, key_line=""))
        wait_until(lambda: "authentication failed" in srv.log(), 30, "the auth failure")
        time.sleep(4)  # a retrying client would have reconnected by now (1 s back-off)
        assert fake.connections == 1
        lines = [ln for ln in srv.log().splitlines() if "authentication failed" in ln]
        assert len(lines) == 1, lines
        assert "not retrying" in lines[0]
        assert wrong not in srv.log() and KEY not in srv.log()
        # The server itself keeps serving.
        assert read(srv, "AAPL/1Min/OHLCV") is None
    finally:
        fake.close()


def test_polygon_rest_401_disables_gap_fill_once(server_factory):
    """The stream's key works but REST refuses it: one log line, no retries, the stream goes on."""
    def c1(conn):
        if conn.login(KEY):
            stream_minutes(conn, 0, 2)
            time.sleep(0.5)
            conn.drop()

    def c2(conn):
        if conn.login(KEY):
            stream_minutes(conn, 20, 22)
            time.sleep(1.5)
            stream_minutes(conn, 23, 24)
            conn.idle()

    fake = FakePolygon("another-key-the-rest-api-wants", [c1, c2], rate_limit_first=0)
    try:
        srv = server_factory(config_extra=config(fake))
        want = [t for t in minutes(0, 2) + minutes(20, 24)]
        wait_until(lambda: [r[0] for r in bars_of(srv, "AAPL/1Min/OHLCV")] == want, 60, "streamed bars")
        time.sleep(1)
        lines = [ln for ln in srv.log().splitlines() if "REST authentication failed" in ln]
        assert len(lines) == 1 and "HTTP 401" in lines[0] and "gap fills disabled" in lines[0], lines
        assert len([1 for _, _, c in fake.rest_log if c == 401]) == 1, fake.rest_log  # not retried, MSFT not tried
        assert KEY not in srv.log()
    finally:
        fake.close()


def test_polygon_and_alpaca_handshake_403_is_one_line_and_no_retry(server_factory):
    """The WebSocket upgrade itself refused (HTTP 403, as a proxy or an expired plan answers): one line, no retry."""
    for module, cfg in (("polygon", lambda f: config(f)),
                        ("alpaca", lambda f: f"""bgworkers:
  - module: alpaca
    name: Alpaca
    config:
      api_key: {KEY}
      api_secret: s3cr3t-value
      ws_server: {f.ws_url}/v2/iex
      trade_symbols: [AAPL]
      base_url: http://127.0.0.1:9
""")):
        fake = FakePolygon(KEY, [lambda conn: None])
        fake.ws_status = 403
        try:
            srv = server_factory(config_extra=cfg(fake))
            wait_until(lambda: "authentication failed" in srv.log(), 30, f"{module}: the refusal")
            lines = [ln for ln in srv.log().splitlines() if "authentication failed" in ln]
            assert len(lines) == 1 and "HTTP 403" in lines[0] and "not retrying" in lines[0], lines
            assert fake.connections == 1
            assert KEY not in srv.log() and "s3cr3t-value" not in srv.log()
            srv.stop()
        finally:
            fake.close()
