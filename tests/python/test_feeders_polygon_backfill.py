"""`mkts backfill polygon` (MarketStore's polygon backfiller) against a local Polygon REST (tests/python/polygon_fake.py:
v2 aggregates with next_url pagination, v3 trades and quotes with cursor next_urls, a 429, a 401; no internet),
writing over Flight into a running server or in-process into a stopped server's data directory: exact rows, a
run killed mid-range and rerun (no gap, no duplicate, also inside one timestamp cut by a page boundary), a
finished range rerun (nothing written), one clear line on a refused key, MarketStore's 4-column TRADE bucket
refused before anything is fetched, and streamed and backfilled rows in the same TRADE and OHLCV buckets.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import pyarrow as pa
import pyarrow.flight as fl
import pytest

from conftest import mkts_bin
from feeder_helpers import read, wait_until
from polygon_fake import T0, FakePolygon, am, bar

KEY = "backfill-KEY-0987654321"
D1 = 1704153600  # 2024-01-02 00:00 UTC (T0's day)
D2 = D1 + 86400
NS = 1_000_000_000
SKIPPED = {15, 16, 17, 18, 19, 51}


def v3_trade(i, ns, price, size, x=4, conds=(), tape=3):
    t = {"exchange": x, "id": str(i), "participant_timestamp": ns - 500, "price": price, "sequence_number": 1000 + i,
         "sip_timestamp": ns, "size": size, "tape": tape}
    if conds:
        t["conditions"] = list(conds)
    return t


def v3_quote(i, ns, bp, bs, ap, as_, bx=4, ax=7, conds=(1,)):
    return {"ask_exchange": ax, "ask_price": ap, "ask_size": as_, "bid_exchange": bx, "bid_price": bp, "bid_size": bs,
            "conditions": list(conds), "participant_timestamp": ns - 100, "sequence_number": 5000 + i, "sip_timestamp": ns, "tape": 3}


B = T0 * NS
TRADES = [
    v3_trade(0, B + 1_000, 100.0, 10, conds=(12,)),
    v3_trade(1, B + 2_000, 100.1, 10, conds=(15,)),  # official open: dropped as the stream drops it
    v3_trade(2, B + 3_000, 100.2, 20, x=11),
    v3_trade(3, B + 4_000, 100.3, 0),  # size 0: dropped
    v3_trade(4, B + 5_000, 100.4, 30, conds=(12, 37, 41, 53, 14)),  # a fifth condition is not stored
    v3_trade(5, B + 6_000, 100.5, 40),
    # One timestamp across the page boundary at offset 8 (limit 4), two of its trades identical in value.
    v3_trade(6, B + 7_000, 10.0, 5),
    v3_trade(7, B + 7_000, 10.5, 5),
    v3_trade(8, B + 7_000, 10.0, 5),
    v3_trade(9, B + 8_000, 100.9, 90),
    v3_trade(10, B + 1_500_000_000, 101.0, 100, x=12, tape=1),
    v3_trade(11, (T0 + 60) * NS, 101.1, 110),
    v3_trade(12, (T0 + 3600) * NS + 999_999_999, 101.2, 120),
    v3_trade(13, D2 * NS + 5, 200.0, 1),  # the next day: outside the range
]
QUOTES = [
    v3_quote(0, B + 10, 99.9, 3, 100.1, 4),
    v3_quote(1, B + 20, 99.95, 1, 100.05, 2, bx=11, ax=12, conds=()),
    v3_quote(2, B + 20, 99.96, 1, 100.04, 2),
    v3_quote(3, (T0 + 5) * NS, 100.0, 7, 100.2, 8),
    v3_quote(4, (T0 + 9) * NS, 100.1, 9, 100.3, 1, conds=(8, 9)),
]


def expected_trades(rows):
    out = []
    for r in sorted(rows, key=lambda r: r["sip_timestamp"]):
        c = r.get("conditions", [])
        if r["size"] <= 0 or r["price"] <= 0 or SKIPPED & set(c) or not (D1 * NS <= r["sip_timestamp"] < D2 * NS):
            continue
        c4 = (c + [0, 0, 0, 0])[:4]
        out.append((r["sip_timestamp"] // NS, r["sip_timestamp"] % NS, r["price"], r["size"], r["exchange"], r["tape"], *c4))
    return out


def expected_quotes(rows):
    return [(r["sip_timestamp"] // NS, r["sip_timestamp"] % NS, r["bid_price"], r["ask_price"], r["bid_size"], r["ask_size"],
             r["bid_exchange"], r["ask_exchange"], (r["conditions"] or [0])[0]) for r in sorted(rows, key=lambda r: r["sip_timestamp"])]


def expected_bars(sym, a=D1, b=D2):
    return [(t, x["o"], x["h"], x["l"], x["c"], x["v"]) for t in range(a, b, 60) if (x := bar(sym, t))]


TRADE_COLS = ("Price", "Size", "Exchange", "TapeID", "Cond1", "Cond2", "Cond3", "Cond4")
QUOTE_COLS = ("BidPrice", "AskPrice", "BidSize", "AskSize", "BidExchange", "AskExchange", "Cond")


def rows_of(srv, key, cols, ticks=True):
    t = read(srv, key)
    if t is None:
        return []
    names = ["Epoch"] + (["Nanoseconds"] if ticks else []) + list(cols)
    data = [t.column("Epoch").cast("int64").to_pylist()] + [t.column(c).to_pylist() for c in names[1:]]
    return list(zip(*data))


STATE = {"dir": "none"}


@pytest.fixture(autouse=True)
def state_dir(tmp_path):
    """Checkpoints of each test in its own directory."""
    STATE["dir"] = str(tmp_path / "backfill-state")
    yield


def backfill_cmd(target, *extra, base_url=None, day_from="2024-01-02", day_to="2024-01-03"):
    cmd = [mkts_bin(), "backfill", "polygon", *target, "--from", day_from, "--to", day_to, "--state-dir", STATE["dir"], *extra]
    if base_url:
        cmd += ["--base-url", base_url]
    return cmd


def env_with(key):
    e = dict(os.environ)
    e.pop("POLYGON_API_KEY", None)
    if key:
        e["POLYGON_API_KEY"] = key
    return e


def run(cmd, key=KEY):
    p = subprocess.run(cmd, env=env_with(key), capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_backfill_pages_429_kill_and_rerun(server_factory):
    fake = FakePolygon(KEY, [lambda c: None], page_size=500, rate_limit_first=1,
                       ticks={("trades", "AAPL"): TRADES, ("quotes", "AAPL"): QUOTES})
    fake.hold = ("trades", 8)
    try:
        srv = server_factory()
        cmd = backfill_cmd(["--url", srv.flight_url], "--symbols", "AAPL", "--bars", "--trades", "--quotes", "--batch-size", "4",
                           base_url=fake.base_url)
        p = subprocess.Popen(cmd, env=env_with(KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(fake.held.is_set, 120, "the backfill to ask for the third trades page")
            # Pages are written before the next is asked for: the bars and two trades pages are stored.
            assert rows_of(srv, "AAPL/1Min/OHLCV", ("Open", "High", "Low", "Close", "Volume"), ticks=False) == expected_bars("AAPL")
            stored = rows_of(srv, "AAPL/1Sec/TRADE", TRADE_COLS)
            assert stored == expected_trades(TRADES[:8]), stored
            p.send_signal(signal.SIGKILL)  # killed mid-range
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
            fake.release.set()
        out1 = p.stdout.read() + p.stderr.read()
        assert "429" in out1 and "retrying" in out1, out1

        # The rerun continues after the stored rows: no gap, no duplicate.
        fake.hold = None
        before = len(fake.rest_log)
        rc, out, err = run(cmd)
        assert rc == 0, out + err
        assert rows_of(srv, "AAPL/1Min/OHLCV", ("Open", "High", "Low", "Close", "Volume"), ticks=False) == expected_bars("AAPL")
        assert rows_of(srv, "AAPL/1Sec/TRADE", TRADE_COLS) == expected_trades(TRADES)
        assert rows_of(srv, "AAPL/1Sec/QUOTE", QUOTE_COLS) == expected_quotes(QUOTES)
        rerun = fake.rest_log[before:]
        assert not any(p.startswith("/v2/aggs") for p, _, _ in rerun), "bars were complete: not fetched again"
        first_trades = [q for p, q, _ in rerun if p == "/v3/trades/AAPL" and "offset" not in q]
        assert [int(q["timestamp.gte"]) for q in first_trades] == [B + 7_000], first_trades  # the last stored time
        assert "AAPL trades: 5 rows" in err and "continuing after the stored rows" in err, err
        assert "backfill done: 10 rows (bars 0, trades 5, quotes 5)" in err, err

        # Pagination followed next_url on the configured host (the fake's cursor pages were asked for).
        assert any("offset" in q and int(q["offset"]) == 4 for p, q, c in fake.rest_log if p == "/v3/quotes/AAPL"), fake.rest_log
        assert len([1 for p, q, c in fake.rest_log if p.startswith("/v2/aggs") and c == 200]) == 3  # 1234 bars, 500 a page

        # A finished range run again: nothing written, nothing changed.
        rc, out, err = run(cmd)
        assert rc == 0 and "backfill done: 0 rows" in err, out + err
        assert rows_of(srv, "AAPL/1Sec/TRADE", TRADE_COLS) == expected_trades(TRADES)
        assert rows_of(srv, "AAPL/1Sec/QUOTE", QUOTE_COLS) == expected_quotes(QUOTES)
        assert KEY not in out1 + out + err and KEY not in srv.log()

        # One schema per bucket, the stream's: MarketStore's TRADE and QUOTE types.
        tr = read(srv, "AAPL/1Sec/TRADE")
        assert {f.name: str(f.type) for f in tr.schema if f.name != "Epoch"} == {
            "Price": "double", "Size": "uint64", "Exchange": "uint8", "TapeID": "uint8", "Cond1": "uint8",
            "Cond2": "uint8", "Cond3": "uint8", "Cond4": "uint8", "Nanoseconds": "int32"}
    finally:
        fake.close()


def test_backfill_401_is_one_line(server_factory):
    fake = FakePolygon(KEY, [lambda c: None], rate_limit_first=0)
    try:
        srv = server_factory()
        wrong = "wrong-key-5555"
        rc, out, err = run(backfill_cmd(["--url", srv.flight_url], "--symbols", "AAPL,MSFT", "--bars", "--trades", base_url=fake.base_url), key=wrong)
        assert rc != 0
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("mkts: error: polygon refused the API key (HTTP 401") and "POLYGON_API_KEY" in lines[0], lines
        assert [c for _, _, c in fake.rest_log] == [401], fake.rest_log  # not retried, nothing else tried
        assert wrong not in out + err
        assert read(srv, "AAPL/1Min/OHLCV") is None
        # No key at all: refused before any request.
        rc, out, err = run(backfill_cmd(["--url", srv.flight_url], "--symbols", "AAPL", "--bars", base_url=fake.base_url), key=None)
        assert rc != 0 and "no API key" in err and len(fake.rest_log) == 1
    finally:
        fake.close()


def test_backfill_refuses_marketstores_stream_trade_schema(server_factory):
    """A TRADE bucket in MarketStore's 4-column stream schema: one clear error before anything is fetched."""
    fake = FakePolygon(KEY, [lambda c: None], rate_limit_first=0, ticks={("trades", "IBM"): TRADES})
    try:
        srv = server_factory()
        t = pa.table({"Epoch": pa.array([T0], pa.int64()), "Nanoseconds": pa.array([5], pa.int32()),
                      "Price": pa.array([1.5]), "Size": pa.array([10], pa.uint64())})
        c = fl.FlightClient(srv.flight_url)
        w, r = c.do_put(fl.FlightDescriptor.for_path("IBM/1Sec/TRADE"), t.schema)
        w.write_table(t)
        w.done_writing()
        r.read()
        w.close()
        rc, out, err = run(backfill_cmd(["--url", srv.flight_url], "--symbols", "IBM", "--trades", base_url=fake.base_url))
        assert rc != 0 and "IBM/1Sec/TRADE" in err and "one schema per bucket" in err, err
        assert not any(p.startswith("/v3/") for p, _, _ in fake.rest_log)
        assert len(read(srv, "IBM/1Sec/TRADE")) == 1
    finally:
        fake.close()


def stream_trade(i, sym, ns, p, s, x=4, c=(0,)):
    return {"ev": "T", "sym": sym, "x": x, "i": str(i), "z": 3, "p": p, "s": s, "c": list(c), "t": ns // 1_000_000, "q": i}


def test_streamed_and_backfilled_buckets_merge(server_factory):
    """The stream creates MSFT/1Sec/TRADE, the backfill AAPL's; each then writes into the other's bucket (over
    Flight while streaming, then in-process with --config while the server is stopped): no schema error, and a
    streamed trade the backfill fetches again is not stored twice."""
    go = threading.Event()
    D3 = D2 + 86400
    s0 = stream_trade(0, "MSFT", (T0 + 60) * NS, 101.1 + 200, 110, c=())  # the same trade the backfill fetches
    s1 = stream_trade(1, "MSFT", (D2 + 100) * NS, 300.5, 7, x=11, c=(12,))
    s2 = stream_trade(2, "AAPL", (D2 + 200) * NS, 150.25, 3, c=(0, 37))
    s3 = stream_trade(3, "MSFT", (D2 + 300) * NS, 301.0, 9)

    def script(conn):
        if not conn.login(KEY):
            return
        conn.send([s0, s1, am("AAPL", D2 + 600)])
        go.wait(120)
        conn.send([s2, s3, am("MSFT", D2 + 660)])
        conn.idle()

    def after_restart(conn):
        if conn.login(KEY):  # Polygon does not replay what it sent before
            conn.idle()

    msft_day1 = [dict(r, price=r["price"] + 200) for r in TRADES]
    ticks = {("trades", "AAPL"): TRADES, ("trades", "MSFT"): msft_day1}
    # Day 3 in the stopped server's data directory, for --config.
    day3 = [v3_trade(50, (D3 + 7) * NS + 3, 99.0, 1), v3_trade(51, (D3 + 8) * NS, 99.5, 2)]
    ticks[("trades", "AAPL")] = TRADES + day3
    fake = FakePolygon(KEY, [script, after_restart], page_size=500, rate_limit_first=0, ticks=ticks)
    try:
        cfg = f"""bgworkers:
  - module: polygon.so
    name: Polygon
    config:
      api_key: {KEY}
      data_types: [bars, trades]
      symbols: [AAPL, MSFT]
      ws_servers: {fake.ws_url}
      base_url: {fake.base_url}
"""
        srv = server_factory(config_extra=cfg)
        wait_until(lambda: (t := read(srv, "MSFT/1Sec/TRADE")) is not None and t.num_rows == 2 and read(srv, "AAPL/1Min/OHLCV") is not None, 60, "the streamed MSFT trades and AAPL bar")
        rc, out, err = run(backfill_cmd(["--url", srv.flight_url], "--symbols", "AAPL,MSFT", "--bars", "--trades", base_url=fake.base_url))
        assert rc == 0, out + err
        go.set()
        want_stream = lambda s: (s["t"] * 1_000_000 // NS, s["t"] * 1_000_000 % NS, s["p"], s["s"], s["x"], 3, *((s["c"] + [0, 0, 0])[:4]))  # noqa: E731
        aapl = expected_trades(TRADES) + [want_stream(s2)]
        msft = expected_trades(msft_day1) + [want_stream(s1), want_stream(s3)]
        wait_until(lambda: rows_of(srv, "AAPL/1Sec/TRADE", TRADE_COLS) == aapl and rows_of(srv, "MSFT/1Sec/TRADE", TRADE_COLS) == msft,
                   60, "streamed and backfilled trades in one bucket each", dump=srv.log)
        bars_cols = ("Open", "High", "Low", "Close", "Volume")
        exp_bar = lambda sym, t: (t, bar(sym, t)["o"], bar(sym, t)["h"], bar(sym, t)["l"], bar(sym, t)["c"], bar(sym, t)["v"])  # noqa: E731
        # MSFT's first streamed bar after the backfilled day: the stream fills D2 00:00 .. 00:10 over REST.
        wait_until(lambda: rows_of(srv, "MSFT/1Min/OHLCV", bars_cols, ticks=False) == expected_bars("MSFT", D1, D2 + 661), 60, "MSFT bars")
        assert rows_of(srv, "AAPL/1Min/OHLCV", bars_cols, ticks=False) == expected_bars("AAPL") + [exp_bar("AAPL", D2 + 600)]
        assert "unable to match" not in srv.log() and "write failed" not in srv.log()

        # The server stopped: --config writes into its data directory with its polygon worker's key and base_url.
        assert srv.stop() == 0
        rc, out, err = run([mkts_bin(), "backfill", "polygon", "--config", str(srv.config_path), "--symbols", "AAPL", "--trades",
                            "--from", "2024-01-04", "--to", "2024-01-05", "--state-dir", STATE["dir"]], key=None)
        assert rc == 0, out + err
        assert "AAPL trades: 2 rows" in err, err
        srv.start()
        assert rows_of(srv, "AAPL/1Sec/TRADE", TRADE_COLS) == aapl + expected_trades_day(day3, D3)
        assert KEY not in out + err
    finally:
        fake.close()


def expected_trades_day(rows, day):
    return [(r["sip_timestamp"] // NS, r["sip_timestamp"] % NS, r["price"], r["size"], r["exchange"], r["tape"], 0, 0, 0, 0)
            for r in sorted(rows, key=lambda r: r["sip_timestamp"]) if day * NS <= r["sip_timestamp"] < (day + 86400) * NS]


def test_add_bar_tick_count_stream_gap_fill_and_backfill(server_factory):
    """`add_bar_tick_count: true`: the bars bucket has TickCnt int32; streamed `AM` (no `n`) stores 0, REST
    aggregates (gap fill and backfill) their `n`. The backfill follows the stored bucket without being told."""
    from polygon_fake import minutes

    def c1(conn):
        if conn.login(KEY):
            for t in minutes(0, 1):
                conn.send([am("AAPL", t)])
            conn.drop()

    def c2(conn):
        if conn.login(KEY):
            for t in minutes(5, 6):
                conn.send([am("AAPL", t)])
            conn.idle()

    fake = FakePolygon(KEY, [c1, c2], page_size=500, rate_limit_first=0)
    try:
        cfg = f"""bgworkers:
  - module: polygon
    name: Polygon
    config:
      api_key: {KEY}
      data_types: [bars]
      symbols: [AAPL]
      ws_servers: {fake.ws_url}
      base_url: {fake.base_url}
      add_bar_tick_count: true
"""
        srv = server_factory(config_extra=cfg)
        cols = ("Open", "High", "Low", "Close", "Volume", "TickCnt")
        row = lambda t, n: (t, bar("AAPL", t)["o"], bar("AAPL", t)["h"], bar("AAPL", t)["l"], bar("AAPL", t)["c"], bar("AAPL", t)["v"], n)  # noqa: E731
        streamed = [row(t, 0) for t in minutes(0, 1)] + [row(t, bar("AAPL", t)["n"]) for t in minutes(2, 4)] + [row(t, 0) for t in minutes(5, 6)]
        wait_until(lambda: rows_of(srv, "AAPL/1Min/OHLCV", cols, ticks=False) == streamed, 60, "streamed bars, 2..4 over REST", dump=srv.log)
        assert str(read(srv, "AAPL/1Min/OHLCV").schema.field("TickCnt").type) == "int32"
        rc, out, err = run(backfill_cmd(["--url", srv.flight_url], "--symbols", "AAPL", "--bars", base_url=fake.base_url))
        assert rc == 0, out + err
        # The stored bars of the range are fetched again (REST's TickCnt replaces the streamed 0), the rest filled.
        assert rows_of(srv, "AAPL/1Min/OHLCV", cols, ticks=False) == [row(t, bar("AAPL", t)["n"]) for t in range(D1, D2, 60) if bar("AAPL", t)]
        assert "write failed" not in srv.log()
    finally:
        fake.close()
