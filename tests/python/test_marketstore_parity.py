"""MarketStore parity items of issue #14, each through every interface a MarketStore user reaches it by.

* `candlecandler(..., Sum::Volume, Avg::Volume)` names its extra columns `Volume_SUM` and `Volume_AVG`
  (float64, after the OHLC columns, every Sum column before every Avg column), as MarketStore's candler:
  pymarketstore over /rpc and MarketStore gRPC, Flight tickets, the SQL table functions.
* Create with an empty column list makes an Epoch-only bucket that is listed, written and read:
  /rpc DataService.Create, MarketStore gRPC Create, the Flight `create` action.

Every test boots the real server; values are asserted exactly.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore as pymkts
import pytest
from pymarketstore.params import ListSymbolsFormat

Y2024 = 1_704_067_200  # 2024-01-01T00:00:00Z
OHLCV = [("Epoch", "i8"), ("Open", "f4"), ("High", "f4"), ("Low", "f4"), ("Close", "f4"), ("Volume", "i8")]
CANDLE = "candlecandler('5Min',Open,High,Low,Close,Avg::Volume,Sum::Volume)"
COLUMNS = ["Epoch", "Open", "High", "Low", "Close", "Volume_SUM", "Volume_AVG"]
# Ten 1Min bars: Volume 1000..1009, so the 5Min windows sum to 5010 and 5035 and average 1002 and 1007.
SUMS = [5010.0, 5035.0]
AVGS = [1002.0, 1007.0]


def bars(n: int) -> np.ndarray:
    a = np.zeros(n, dtype=OHLCV)
    a["Epoch"] = Y2024 + 60 * np.arange(n, dtype="i8")
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


def flight_get(server, **ticket) -> pa.Table:
    c = fl.FlightClient(server.flight_url)
    return c.do_get(fl.Ticket(json.dumps(ticket).encode())).read_all()


def flight_action(server, name: str, body: dict):
    c = fl.FlightClient(server.flight_url)
    res = list(c.do_action(fl.Action(name, json.dumps(body).encode())))
    return json.loads(res[0].body.to_pybytes()) if res else None


def assert_candles(names, dtypes, cols):
    """`names`, numpy/arrow dtype strings and a name -> values mapping of a candlecandler result."""
    assert list(names) == COLUMNS
    assert dtypes["Volume_SUM"] == "float64" and dtypes["Volume_AVG"] == "float64"
    assert dtypes["Open"] == "float32"
    assert list(cols["Epoch"]) == [Y2024, Y2024 + 300]
    assert list(cols["Open"]) == [100.0, 105.0]
    assert list(cols["High"]) == [105.5, 110.5]
    assert list(cols["Low"]) == [99.75, 104.75]
    assert list(cols["Close"]) == [104.5, 109.5]
    assert list(cols["Volume_SUM"]) == SUMS
    assert list(cols["Volume_AVG"]) == AVGS


@pytest.mark.parametrize("kind", ["rpc", "grpc"])
def test_candlecandler_sum_avg_names_pymarketstore(server, kind):
    cli = pym(server, kind)
    cli.write(bars(10), "FN/1Min/OHLCV")
    arr = cli.query(pymkts.Params("FN", "1Min", "OHLCV", functions=[CANDLE])).first().array
    dtypes = {n: str(arr.dtype[n]) for n in arr.dtype.names}
    cols = {n: arr[n].tolist() for n in arr.dtype.names}
    assert_candles(arr.dtype.names, dtypes, cols)
    # A Sum column alone is `<col>_SUM` too (it used to keep the input's name and type).
    arr = cli.query(pymkts.Params("FN", "1Min", "OHLCV", functions=["candlecandler('5Min',Open,High,Low,Close,Sum::Volume)"])).first().array
    assert list(arr.dtype.names) == COLUMNS[:6]
    assert arr["Volume_SUM"].dtype == np.float64
    assert arr["Volume_SUM"].tolist() == SUMS


def test_candlecandler_sum_avg_names_flight_and_sql(server):
    pymkts.Client(server.rpc_url).write(bars(10), "FN/1Min/OHLCV")

    def check(t: pa.Table):
        if "Epoch" in t.column_names and pa.types.is_timestamp(t.schema.field("Epoch").type):
            t = t.set_column(0, "Epoch", t.column("Epoch").cast(pa.int64()))
        dtypes = {f.name: {"float": "float32", "double": "float64"}.get(str(f.type), str(f.type)) for f in t.schema}
        assert_candles(t.column_names, dtypes, t.to_pydict())

    check(flight_get(server, destination="FN/1Min/OHLCV", functions=[CANDLE]))
    # The SQL table functions, through a Flight `sql` ticket and through /rpc's SQL statement.
    sql = "SELECT * FROM candlecandler('FN/1Min/OHLCV', '5Min', 'Open', 'High', 'Low', 'Close', 'Avg::Volume', 'Sum::Volume')"
    check(flight_get(server, sql=sql))
    check(flight_get(server, sql=f"SELECT * FROM functions('FN/1Min/OHLCV', '{CANDLE.replace(chr(39), chr(39) * 2)}')"))
    arr = list(pymkts.Client(server.rpc_url).sql([sql]).all().values())[0].array
    assert list(arr.dtype.names) == COLUMNS
    assert arr["Volume_SUM"].tolist() == SUMS and arr["Volume_AVG"].tolist() == AVGS


def create_errors(kind: str, resp) -> list[str]:
    if kind == "grpc":
        return [r.error for r in resp.responses]
    return [r["error"] for r in (resp["responses"] or [])]


@pytest.mark.parametrize("kind", ["rpc", "grpc"])
@pytest.mark.parametrize("dtype", [[], [("Epoch", "i8")]], ids=["no-columns", "epoch-only"])
def test_create_epoch_only_bucket_pymarketstore(server, kind, dtype):
    cli = pym(server, kind)
    assert create_errors(kind, cli.create("EMPTY/1Min/EVENTS", dtype)) == [""]
    assert "EMPTY/1Min/EVENTS" in cli.list_symbols(ListSymbolsFormat.TBK)
    info = flight_action(server, "get_info", {"key": "EMPTY/1Min/EVENTS"})
    assert info["columns"] == [] and info["is_variable_length"] is False, info  # data columns: none
    # It takes rows of Epoch alone and serves them.
    w = np.array([(Y2024,), (Y2024 + 60,)], dtype=[("Epoch", "i8")])
    cli.write(w, "EMPTY/1Min/EVENTS")
    arr = cli.query(pymkts.Params("EMPTY", "1Min", "EVENTS")).first().array
    assert list(arr.dtype.names) == ["Epoch"]
    assert arr["Epoch"].tolist() == [Y2024, Y2024 + 60]
    # Creating it again is refused as for any bucket.
    assert "exist" in create_errors(kind, cli.create("EMPTY/1Min/EVENTS", dtype))[0]


def test_create_epoch_only_bucket_flight_survives_restart(server):
    assert flight_action(server, "create", {"key": "E/1Min/X", "column_names": [], "column_types": []}) == {"created": "E/1Min/X"}
    assert flight_action(server, "create", {"key": "T/1Sec/EV", "is_variable_length": True}) == {"created": "T/1Sec/EV"}
    c = fl.FlightClient(server.flight_url)
    listed = {f.descriptor.path[0].decode(): f.schema.names for f in c.list_flights()}
    assert listed["E/1Min/X"] == ["Epoch"]
    assert listed["T/1Sec/EV"] == ["Epoch", "Nanoseconds"]
    w, r = c.do_put(fl.FlightDescriptor.for_path("E/1Min/X"), pa.schema([("Epoch", pa.int64())]))
    w.write_table(pa.table({"Epoch": pa.array([Y2024 + 61, Y2024], pa.int64())}))
    w.done_writing()
    assert json.loads(r.read().to_pybytes()) == {"rows": 2}
    w.close()
    server.stop()
    server.start()
    t = flight_get(server, destination="E/1Min/X")
    assert t.column_names == ["Epoch"]
    assert t.column("Epoch").cast(pa.int64()).to_pylist() == [Y2024, Y2024 + 60]
    assert flight_get(server, destination="T/1Sec/EV").num_rows == 0


def test_write_without_data_columns_does_not_create_a_bucket(server):
    c = fl.FlightClient(server.flight_url)
    w, r = c.do_put(fl.FlightDescriptor.for_path("NEW/1Min/X"), pa.schema([("Epoch", pa.int64())]))
    with pytest.raises((pa.ArrowException, fl.FlightError), match="at least one data column"):
        w.write_table(pa.table({"Epoch": pa.array([Y2024], pa.int64())}))
        w.done_writing()
        r.read()
        w.close()
    assert "NEW/1Min/X" not in {f.descriptor.path[0].decode() for f in c.list_flights()}
