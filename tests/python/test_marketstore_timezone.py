"""`timezone: America/New_York` in mkts.yml: candlecandler windows as MarketStore's candler draws them, through
pymarketstore over /rpc and gRPC against the real server.

MarketStore's `CandleDuration.Truncate` (utils/timeframe.go): a `D` window starts at the calendar day's
midnight in the configured zone and an `M` window on the 1st of the month there; every other unit (`Sec`,
`Min`, `H`, `W`) is Go's `Time.Truncate`, a multiple of the duration in absolute time, whatever the zone.
The expected windows are computed here from those rules with zoneinfo, independently of the server.
Storage stays UTC epochs: the rows read back are the rows written.

A fixed `1D` bucket stores a row at the zone's midnight of its local date, as MarketStore's slot index
(`dayOfYear` in the zone, utils/io/timeindex.go), and the ondiskagg trigger draws day windows there;
`filter: nasdaq` applies (MarketStore applies it only in the calendar's own zone).
"""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow.flight as fl
import pymarketstore as pymkts
import pytest

from test_contrib_ondiskagg import D0, frame, minute_bars, put, resample, wait_equal
from test_pymarketstore import ok_write, OHLCV

NY = ZoneInfo("America/New_York")
T0 = int(dt.datetime(2024, 1, 2, 0, 0, tzinfo=dt.timezone.utc).timestamp())  # 2024-01-01 19:00 in New York
N = 12 * 60  # 1Min bars, 00:00 .. 11:59 UTC


@pytest.fixture(params=["rpc", "grpc"])
def kind(request):
    return request.param


@pytest.fixture
def cli(server_factory, kind):
    srv = server_factory(config_extra="timezone: America/New_York\n")
    c = pymkts.Client(grpc=True, endpoint=srv.grpc_addr) if kind == "grpc" else pymkts.Client(srv.rpc_url)
    a = np.zeros(N, dtype=OHLCV)
    a["Epoch"] = T0 + 60 * np.arange(N)
    a["Open"] = np.arange(N, dtype="f4")
    a["High"] = a["Open"] + 0.5
    a["Low"] = a["Open"] - 0.5
    a["Close"] = a["Open"] + 0.25
    a["Volume"] = 1
    ok_write(kind, c.write(a, "A/1Min/OHLCV"))
    return c


def ny_midnight(epoch: int) -> int:
    d = dt.datetime.fromtimestamp(epoch, NY).date()
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=NY).timestamp())


def expected(window_of):
    """(window start, first Open, last Close, row count) per window, in order."""
    out: dict[int, list] = {}
    for i in range(N):
        w = window_of(T0 + 60 * i)
        if w not in out:
            out[w] = [w, float(i), float(i) + 0.25, 0]
        out[w][2] = float(i) + 0.25
        out[w][3] += 1
    return list(out.values())


def candles(cli, tf):
    r = cli.query(pymkts.Params("A", "1Min", "OHLCV", functions=[f"candlecandler('{tf}',Open,High,Low,Close,Sum::Volume)"]))
    assert r.timezone == "America/New_York"
    a = r.first().array
    return [[int(e), float(o), float(c), int(v)] for e, o, c, v in zip(a["Epoch"], a["Open"], a["Close"], a["Volume_SUM"])]


def test_daily_candles_start_at_new_york_midnight(cli):
    got = candles(cli, "1D")
    want = expected(ny_midnight)
    assert [w[0] for w in want] == [T0 - 19 * 3600, T0 + 5 * 3600]  # 2024-01-01 and 2024-01-02, 00:00 EST
    assert got == want


def test_intraday_candles_are_absolute_as_go_truncate(cli):
    # 4H and 1H: multiples of the duration in absolute time (UTC-aligned), not counted from NY midnight.
    for tf, secs in [("4H", 4 * 3600), ("1H", 3600), ("30Min", 1800)]:
        assert candles(cli, tf) == expected(lambda t, s=secs: t - t % s), tf


def test_rows_are_stored_as_utc_epochs(cli):
    a = cli.query(pymkts.Params("A", "1Min", "OHLCV")).first().array
    assert a["Epoch"].tolist() == (T0 + 60 * np.arange(N)).tolist()


def utc(y, mo, d, h=0, mi=0):
    return int(dt.datetime(y, mo, d, h, mi, tzinfo=dt.timezone.utc).timestamp())


def test_fixed_1d_bucket_stores_rows_at_new_york_midnight(cli, kind):
    # Each row lands at the New York midnight of its New York date; the last row of a day wins.
    written = [utc(2024, 1, 2, 0, 0),    # 2024-01-01 19:00 EST -> Jan 1
               utc(2024, 1, 2, 4, 59),   # 2024-01-01 23:59 EST -> Jan 1 (wins)
               utc(2024, 1, 2, 5, 0),    # 2024-01-02 00:00 EST -> Jan 2
               utc(2024, 3, 10, 12, 0),  # spring forward: the day starts at 05:00 UTC
               utc(2024, 3, 11, 3, 59),  # 2024-03-10 23:59 EDT -> Mar 10 (wins)
               utc(2024, 7, 2, 3, 0),    # 2024-07-01 23:00 EDT -> Jul 1
               utc(2024, 11, 3, 23, 0)]  # fall back: 2024-11-03 18:00 EST -> Nov 3, 04:00 UTC
    a = np.zeros(len(written), dtype=OHLCV)
    a["Epoch"] = written
    a["Open"] = np.arange(len(written), dtype="f4")
    a["Close"] = a["Open"]
    a["Volume"] = 1
    ok_write(kind, cli.write(a, "D/1D/OHLCV"))
    r = cli.query(pymkts.Params("D", "1D", "OHLCV"))
    got = r.first().array
    want = {}
    for i, t in enumerate(written):
        want[ny_midnight(t)] = float(i)
    assert got["Epoch"].tolist() == sorted(want)
    assert got["Epoch"].tolist() == [utc(2024, 1, 1, 5), utc(2024, 1, 2, 5), utc(2024, 3, 10, 5),
                                    utc(2024, 7, 1, 4), utc(2024, 11, 3, 4)]
    assert got["Open"].tolist() == [want[e] for e in sorted(want)]
    # A range starting inside a New York day includes that day's bar.
    r = cli.query(pymkts.Params("D", "1D", "OHLCV", start=utc(2024, 3, 10, 20), end=utc(2024, 7, 2)))
    assert r.first().array["Epoch"].tolist() == [utc(2024, 3, 10, 5), utc(2024, 7, 1, 4)]


ONDISKAGG_NY = """timezone: America/New_York
triggers:
  - module: ondiskagg
    on: "*/1Min/OHLCV"
    config:
      destinations: [1H, 1D]
  - module: ondiskagg
    on: "*/1Min/NQ"
    config:
      destinations: [1D]
      filter: nasdaq
"""


def test_ondiskagg_day_windows_and_nasdaq_filter_in_new_york(server_factory):
    srv = server_factory(config_extra=ONDISKAGG_NY)
    c = fl.FlightClient(srv.flight_url)
    full = minute_bars(D0, 3 * 1440, seed=7)  # 2024-01-02 .. 2024-01-04 UTC
    put(c, "AAPL/1Min/OHLCV", frame(full))
    ny = full.tz_convert("America/New_York")
    days = resample(ny, "1D").tz_convert("UTC")
    # Four New York days (Jan 1 evening .. Jan 4 evening), each at its New York midnight.
    assert [int(t.timestamp()) for t in days.index] == [utc(2024, 1, d, 5) for d in (1, 2, 3, 4)]
    wait_equal(c, "AAPL/1D/OHLCV", days)
    wait_equal(c, "AAPL/1H/OHLCV", resample(full, "1h"))  # hours: absolute, as in UTC

    # filter: nasdaq in the calendar's own zone: the regular session only (09:30-16:00 New York).
    put(c, "NQA/1Min/NQ", frame(full))
    t = ny.index
    session = ny[(t.time >= pd.Timestamp("09:30").time()) & (t.time < pd.Timestamp("16:00").time()) & (t.dayofweek < 5)]
    wait_equal(c, "NQA/1D/NQ", resample(session, "1D").tz_convert("UTC"))
    assert "filter: nasdaq applies only" not in srv.log()


def test_integrity_checks_day_rows_in_the_servers_zone(server_factory):
    # 1D rows at New York midnight are interval starts under --timezone America/New_York, not under UTC.
    import subprocess
    from conftest import mkts_bin

    srv = server_factory(config_extra="timezone: America/New_York\n")
    cli = pymkts.Client(srv.rpc_url)
    a = np.zeros(2, dtype=OHLCV)
    a["Epoch"] = [utc(2024, 1, 2, 12), utc(2024, 1, 3, 12)]
    ok_write("rpc", cli.write(a, "D/1D/OHLCV"))
    assert cli.query(pymkts.Params("D", "1D", "OHLCV")).first().array["Epoch"].tolist() == [utc(2024, 1, 2, 5), utc(2024, 1, 3, 5)]
    assert srv.stop() == 0
    # The zone is recorded in the data directory: the check uses it unless told otherwise.
    for zone in ([], ["--timezone", "America/New_York"]):
        ok = subprocess.run([mkts_bin(), "tool", "integrity", str(srv.root), *zone], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "intact" in ok.stdout
    bad = subprocess.run([mkts_bin(), "tool", "integrity", str(srv.root), "--timezone", "UTC"], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "is not the start of its 1D interval (timezone UTC; give --timezone" in bad.stdout


def test_the_zone_is_recorded_with_the_data(server_factory, tmp_path):
    # MarketStore re-reads every stored day when `timezone` changes; mkts records the zone and refuses.
    import subprocess
    from conftest import Server, mkts_bin

    srv = server_factory(config_extra="timezone: America/New_York\n")
    cli = pymkts.Client(srv.rpc_url)
    a = np.zeros(1, dtype=OHLCV)
    a["Epoch"] = [utc(2024, 1, 2, 12)]
    ok_write("rpc", cli.write(a, "D/1D/OHLCV"))
    assert srv.stop() == 0
    assert (srv.root / ".timezone").read_text() == "America/New_York"
    (tmp_path / "utc").mkdir()
    utc_srv = Server(tmp_path / "utc", root=srv.root)
    with pytest.raises(RuntimeError) as e:
        utc_srv.start(timeout=20)
    assert "placed at midnights of America/New_York (D/1D/OHLCV)" in str(e.value)
    assert "timezone: America/New_York" in str(e.value)
    # `connect --dir` opens the directory in the recorded zone: a bar written there lands on New York's day.
    cols = ", ".join(f"arrow_cast(1.5, 'Float32') AS \"{c}\"" for c in ("Open", "High", "Low", "Close"))
    sql = f'INSERT INTO "D/1D/OHLCV" SELECT to_timestamp_seconds({utc(2024, 1, 4, 2)}) AS "Epoch", {cols}, arrow_cast(7, \'Int64\') AS "Volume"'
    p = subprocess.run([mkts_bin(), "connect", "--dir", str(srv.root), "-c", sql], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    srv.start()
    r = pymkts.Client(srv.rpc_url).query(pymkts.Params("D", "1D", "OHLCV")).first().array
    # 2024-01-04 02:00 UTC is 2024-01-03 21:00 in New York.
    assert r["Epoch"].tolist() == [utc(2024, 1, 2, 5), utc(2024, 1, 3, 5)]
    assert r["Volume"].tolist() == [0, 7]
