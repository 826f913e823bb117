"""Queries as MarketStore answers them (issue #14), through pymarketstore over /rpc and MarketStore gRPC.

* Timeframe mapping (reference §1.11, MarketStore's `utils.CandleDuration.QueryableTimeframe` and
  `QueryableNrecords`): a timeframe with nothing stored under it reads the largest built-in queryable
  timeframe dividing it, the row limit scaled by the ratio, and the reply key names the timeframe read.
  Unlike MarketStore (its issue #200) a bucket stored under any timeframe is read as itself.

Every test boots the real server; values are asserted exactly.
"""
from __future__ import annotations

import numpy as np
import pymarketstore as pymkts
import pytest

Y2024 = 1_704_067_200  # 2024-01-01T00:00:00Z
OHLCV = [("Epoch", "i8"), ("Open", "f4"), ("High", "f4"), ("Low", "f4"), ("Close", "f4"), ("Volume", "i8")]


def bars(n: int, step: int = 60, t0: int = Y2024) -> np.ndarray:
    a = np.zeros(n, dtype=OHLCV)
    a["Epoch"] = t0 + step * np.arange(n, dtype="i8")
    a["Open"] = 100 + np.arange(n, dtype="f4")
    a["High"] = a["Open"] + 1.5
    a["Low"] = a["Open"] - 0.25
    a["Close"] = a["Open"] + 0.5
    a["Volume"] = 1000 + np.arange(n)
    return a


def pym(server, kind: str):
    if kind == "grpc":
        return pymkts.Client(grpc=True, endpoint=server.grpc_addr)
    return pymkts.Client(server.rpc_url)


KINDS = pytest.mark.parametrize("kind", ["rpc", "grpc"])


@KINDS
def test_3min_reads_stored_1min_with_its_key(server, kind):
    cli = pym(server, kind)
    cli.write(bars(12), "TFM/1Min/OHLCV")
    reply = cli.query(pymkts.Params("TFM", "3Min", "OHLCV"))
    # The reply key names what was read: the 1Min bucket, every row of it.
    assert reply.keys() == ["TFM/1Min/OHLCV"]
    arr = reply.first().array
    assert arr["Epoch"].tolist() == [Y2024 + 60 * i for i in range(12)]
    # With candlecandler, the 3Min bars MarketStore users build from it.
    arr = cli.query(pymkts.Params("TFM", "3Min", "OHLCV", functions=["candlecandler('3Min',Open,High,Low,Close,Sum::Volume)"])).first().array
    assert arr["Epoch"].tolist() == [Y2024 + 180 * i for i in range(4)]
    assert arr["Open"].tolist() == [100.0, 103.0, 106.0, 109.0]
    assert arr["Close"].tolist() == [102.5, 105.5, 108.5, 111.5]
    assert arr["Volume_SUM"].tolist() == [3003.0, 3012.0, 3021.0, 3030.0]


@KINDS
def test_mapped_timeframe_scales_the_row_limit(server, kind):
    cli = pym(server, kind)
    cli.write(bars(20), "TFL/1Min/OHLCV")
    # limit 2 at 3Min = the last 6 one-minute rows (MarketStore: limit * 3Min/1Min).
    arr = cli.query(pymkts.Params("TFL", "3Min", "OHLCV", limit=2)).first().array
    assert arr["Epoch"].tolist() == [Y2024 + 60 * i for i in range(14, 20)]
    arr = cli.query(pymkts.Params("TFL", "3Min", "OHLCV", limit=2, limit_from_start=True)).first().array
    assert arr["Epoch"].tolist() == [Y2024 + 60 * i for i in range(6)]
    # 10Min reads 5Min (the largest listed divisor); with no 5Min bucket it is not found.
    with pytest.raises(Exception) as e:
        cli.query(pymkts.Params("TFL", "10Min", "OHLCV"))
    assert "TFL/5Min/OHLCV" in str(e.value)


@KINDS
def test_mapped_hours_weeks_and_months(server, kind):
    cli = pym(server, kind)
    cli.write(bars(40, step=3600), "TFH/2H/OHLCV")
    cli.write(bars(40, step=86400), "TFH/1D/OHLCV")
    # 4H reads 2H: MarketStore scans its list from the end, where 2H comes before 4H.
    reply = cli.query(pymkts.Params("TFH", "4H", "OHLCV", limit=3))
    assert reply.keys() == ["TFH/2H/OHLCV"]
    assert len(reply.first().array) == 6
    reply = cli.query(pymkts.Params("TFH", "1W", "OHLCV", limit=2))
    assert reply.keys() == ["TFH/1D/OHLCV"]
    assert reply.first().array["Epoch"].tolist() == [Y2024 + 86400 * i for i in range(26, 40)]
    # Months read 1D with the limit times 31.
    reply = cli.query(pymkts.Params("TFH", "1M", "OHLCV", limit=1))
    assert reply.keys() == ["TFH/1D/OHLCV"]
    assert len(reply.first().array) == 31


@KINDS
def test_a_stored_2min_bucket_is_read_as_itself(server, kind):
    cli = pym(server, kind)
    cli.write(bars(10), "TF2/1Min/OHLCV")
    cli.write(bars(5, step=120), "TF2/2Min/OHLCV")
    reply = cli.query(pymkts.Params("TF2", "2Min", "OHLCV", limit=2))
    # MarketStore would read 1Min here (issue #200); mkts reads the 2Min bucket, limit unscaled.
    assert reply.keys() == ["TF2/2Min/OHLCV"]
    assert reply.first().array["Epoch"].tolist() == [Y2024 + 360, Y2024 + 480]
    # A quarter bucket (`3M`): MarketStore maps every month timeframe to 1D (limit x31); mkts reads it.
    q = bars(2)
    q["Epoch"] = [Y2024, 1_711_929_600]  # 2024-01-01, 2024-04-01
    cli.write(q, "TF2/3M/OHLCV")
    reply = cli.query(pymkts.Params("TF2", "3M", "OHLCV", limit=1))
    assert reply.keys() == ["TF2/3M/OHLCV"]
    assert reply.first().array["Epoch"].tolist() == [1_711_929_600]
