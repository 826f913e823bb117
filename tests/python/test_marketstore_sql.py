"""MarketStore's SQL subset (reference §7.3) through pymarketstore's `sql()` (`is_sqlstatement`), over msgpack
JSON-RPC and gRPC, against the real server. Expected values are computed here from MarketStore's semantics
(its BETWEEN is exclusive at both ends; time literals are UTC; epoch integers above 32503680000 are
nanoseconds), not from the server."""
from __future__ import annotations

import calendar
import datetime as dt

import numpy as np
import pymarketstore as pymkts
import pytest

from test_pymarketstore import ok_write, OHLCV

T1200 = calendar.timegm(dt.datetime(2000, 1, 5, 12, 0).timetuple())  # 2000-01-05 12:00 UTC
N = 120  # 1Min bars 12:00 .. 13:59
KEY = "AAPL/1Min/OHLCV"


@pytest.fixture(params=["rpc", "grpc"])
def kind(request):
    return request.param


@pytest.fixture
def cli(server, kind):
    c = pymkts.Client(grpc=True, endpoint=server.grpc_addr) if kind == "grpc" else pymkts.Client(server.rpc_url)
    a = np.zeros(N, dtype=OHLCV)
    a["Epoch"] = T1200 + 60 * np.arange(N)
    a["Open"] = 100 + np.arange(N, dtype="f4")
    a["High"] = a["Open"] + 1.5
    a["Low"] = a["Open"] - 0.25
    a["Close"] = a["Open"] + 0.5
    a["Volume"] = 1 + np.arange(N)
    ok_write(kind, c.write(a, KEY))
    return c


def at(h, m):
    return calendar.timegm(dt.datetime(2000, 1, 5, h, m).timetuple())


def rows(cli, stmt):
    reply = cli.sql([stmt])
    (ds,) = reply.all().values()
    return ds.array


def epochs(cli, stmt):
    return rows(cli, stmt)["Epoch"].tolist()


def test_between_is_exclusive_as_marketstore(cli):
    # MarketStore's own unit test: 29 rows of 1Min data, the same as with > and <.
    got = epochs(cli, f"SELECT Epoch, Open, High, Low, Close from `{KEY}` WHERE Epoch BETWEEN '2000-01-05-12:30' AND '2000-01-05-13:00';")
    assert got == [at(12, 31) + 60 * i for i in range(29)]
    assert epochs(cli, f"SELECT * from `{KEY}` WHERE Epoch > '2000-01-05-12:30' AND Epoch < '2000-01-05-13:00';") == got
    # NOT BETWEEN: the rest (both bounds included).
    assert epochs(cli, f"SELECT Epoch FROM `{KEY}` WHERE Epoch NOT BETWEEN '2000-01-05-12:30' AND '2000-01-05-13:00';") == \
        [at(12, 0) + 60 * i for i in range(31)] + [at(13, 0) + 60 * i for i in range(60)]


def test_time_literals_in_every_layout_and_epoch_integers(cli):
    from_1230 = [at(12, 30) + 60 * i for i in range(90)]
    for lit in ["'2000-01-05-12:30'", "'2000-01-05-12:30:00'", "'2000-01-05-12:30:00.00000000'",
                "'2000-01-05-12:30:00 UTC'", str(at(12, 30)), str(at(12, 30) * 10**9),
                # ISO 8601 as mkts's SQL reads it (not a MarketStore layout; the migration notebook uses it).
                "'2000-01-05T12:30:00Z'", "'2000-01-05T07:30:00-05:00'", "'2000-01-05 12:30:00'"]:
        assert epochs(cli, f"SELECT Epoch, Close FROM `{KEY}` WHERE Epoch >= {lit};") == from_1230, lit
    # A date alone is midnight UTC; <= includes the bound.
    assert epochs(cli, f"SELECT Epoch FROM `{KEY}` WHERE Epoch <= '2000-01-05';") == []
    assert epochs(cli, f"SELECT Epoch FROM `{KEY}` WHERE Epoch = '2000-01-05-13:59';") == [at(13, 59)]
    # Other predicates are exact, ANDed with the Epoch range.
    got = rows(cli, f"SELECT Epoch, Close FROM `{KEY}` WHERE Epoch > '2000-01-05-12:30' AND Close <= 135.5;")
    assert got["Epoch"].tolist() == [at(12, 31) + 60 * i for i in range(5)]
    assert got["Close"].tolist() == [131.5, 132.5, 133.5, 134.5, 135.5]


def test_bad_time_literal_is_marketstores_error(cli):
    with pytest.raises(Exception, match="unable to convert string to date: noon"):
        cli.sql([f"SELECT * FROM `{KEY}` WHERE Epoch > 'noon';"])


def test_select_list_functions(cli):
    # candlecandler over the WHERE rows (12:30 .. 13:59), 30Min windows; LIMIT keeps the first 2 candles.
    got = rows(cli, f"SELECT candlecandler('30Min',Open,High,Low,Close,Avg::Volume,Sum::Volume) FROM `{KEY}` "
                    "WHERE Epoch >= '2000-01-05-12:30' LIMIT 2;")
    assert list(got.dtype.names) == ["Epoch", "Open", "High", "Low", "Close", "Volume_SUM", "Volume_AVG"]
    assert got["Epoch"].tolist() == [at(12, 30), at(13, 0)]
    # Bar i (0-based from 12:00) has Open 100+i, Volume 1+i: window 12:30 is i = 30..59, 13:00 is 60..89.
    assert got["Open"].tolist() == [130.0, 160.0]
    assert got["High"].tolist() == [159 + 1.5, 189 + 1.5]
    assert got["Low"].tolist() == [130 - 0.25, 160 - 0.25]
    assert got["Close"].tolist() == [159.5, 189.5]
    assert got["Volume_SUM"].tolist() == [float(sum(range(31, 61))), float(sum(range(61, 91)))]
    assert got["Volume_AVG"].tolist() == [sum(range(31, 61)) / 30, sum(range(61, 91)) / 30]
    # MarketStore's function names are case-insensitive (its test spells TickCandler).
    t = rows(cli, f"SELECT TickCandler('1H', Open) from `{KEY}` WHERE Epoch BETWEEN '2000-01-05-12:30' AND '2000-01-05-13:30';")
    assert t["Epoch"].tolist() == [at(12, 0), at(13, 0)]
    assert t["Open"].tolist() == [131.0, 160.0] and t["Close"].tolist() == [159.0, 189.0]
    c = rows(cli, f"SELECT count(*) from `{KEY}` WHERE Epoch BETWEEN '2000-01-05-12:30' AND '2000-01-05-13:00';")
    assert c["Count"].tolist() == [29]
