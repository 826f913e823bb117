"""`timezone: America/New_York` in mkts.yml: candlecandler windows as MarketStore's candler draws them, through
pymarketstore over /rpc and gRPC against the real server.

MarketStore's `CandleDuration.Truncate` (utils/timeframe.go): a `D` window starts at the calendar day's
midnight in the configured zone and an `M` window on the 1st of the month there; every other unit (`Sec`,
`Min`, `H`, `W`) is Go's `Time.Truncate`, a multiple of the duration in absolute time, whatever the zone.
The expected windows are computed here from those rules with zoneinfo, independently of the server.
Storage stays UTC epochs: the rows read back are the rows written.
"""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import numpy as np
import pymarketstore as pymkts
import pytest

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
