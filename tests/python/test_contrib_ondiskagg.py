"""ondiskagg + stream end to end: real server, writes over Flight and pymarketstore, pandas as the oracle.

The 5Min/1H/1D buckets must equal `DataFrame.resample(D, label="left", closed="left")` of the stored 1Min bars
(first/max/min/last/sum), including out-of-order batches and overwritten bars; ticks aggregate into bars;
`filter: nasdaq` under this UTC server is warned and filters nothing, as MarketStore (it applies only under
`timezone: America/New_York`: test_marketstore_timezone.py); a WebSocket subscriber and a Flight
subscription receive the stream trigger's pushes.
"""
from __future__ import annotations

import json
import threading
import time

import msgpack
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore as pymkts
import websocket

D0 = 1_704_153_600  # 2024-01-02 00:00 UTC (a Tuesday)

CONFIG = """triggers:
  - module: ondiskagg.so
    on: "*/1Min/OHLCV"
    config:
      destinations: [5Min, 15Min, 1H, 1D]
  - module: ondiskagg
    on: "*/1Sec/TRADE"
    config:
      destinations: [1Min, 5Min]
      price_column: Price
      size_column: Size
  - module: ondiskagg
    on: "*/1Min/NQ"
    config:
      destinations: [1D]
      filter: nasdaq
  - module: stream
    on: "*/*/*"
"""


def put(c, key, table):
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), table.schema)
    w.write_table(table)
    w.done_writing()
    try:
        while r.read() is not None:
            pass
    except StopIteration:
        pass
    w.close()


def get(c, key):
    return c.do_get(fl.Ticket(json.dumps({"destination": key}).encode())).read_all()


def frame(df):
    return pa.table({
        "Epoch": pa.array(df.index.astype("int64") // 10**9, pa.int64()),
        **{c: pa.array(df[c].to_numpy()) for c in df.columns},
    })


def minute_bars(start, n, seed):
    rng = np.random.default_rng(seed)
    idx = pd.to_datetime(start + 60 * np.arange(n), unit="s", utc=True)
    o = 100 + rng.standard_normal(n).cumsum().astype("f4")
    return pd.DataFrame({
        "Open": o,
        "High": o + rng.random(n).astype("f4"),
        "Low": o - rng.random(n).astype("f4"),
        "Close": o + (rng.random(n).astype("f4") - 0.5),
        "Volume": rng.integers(1, 1000, n).astype("i8"),
    }, index=idx)


def resample(df, rule):
    r = df.resample(rule, label="left", closed="left").agg(
        {"Open": "first", "High": "max", "Low": "min", "Close": "last", "Volume": "sum"}).dropna()
    r["Volume"] = r["Volume"].astype("i8")
    return r


def as_df(tbl):
    d = tbl.drop_columns(["Epoch"]).to_pandas()
    d.index = pd.to_datetime(tbl.column("Epoch").cast(pa.int64()).to_numpy(), unit="s", utc=True)
    return d[["Open", "High", "Low", "Close", "Volume"]]


def wait_equal(c, key, want, timeout=60):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            got = as_df(get(c, key))
            if len(got) == len(want) and (got.index == want.index).all() and np.array_equal(got.to_numpy(), want.to_numpy()):
                return got
            last = got
        except Exception as e:  # noqa: BLE001 (bucket not created yet)
            last = e
        time.sleep(0.2)
    raise AssertionError(f"{key} never equalled the pandas resample;\nwant:\n{want}\nlast:\n{last}")


class WsCollector:
    def __init__(self, url, streams):
        self.frames = []
        self.ws = websocket.create_connection(url.replace("http://", "ws://") + "/ws", timeout=10)
        self.ws.send(msgpack.packb({"streams": streams}), opcode=websocket.ABNF.OPCODE_BINARY)
        assert msgpack.unpackb(self.ws.recv()) == {"streams": streams}  # echo
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while True:
            try:
                self.frames.append(msgpack.unpackb(self.ws.recv()))
            except Exception:  # noqa: BLE001
                return

    def wait(self, pred, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            hit = [f for f in list(self.frames) if pred(f)]
            if hit:
                return hit
            time.sleep(0.1)
        raise AssertionError(f"no matching frame; got {self.frames[-5:]}")


def test_ondiskagg_matches_pandas_and_streams(server_factory):
    srv = server_factory(config_extra=CONFIG)
    c = fl.FlightClient(srv.flight_url)
    ws = WsCollector(srv.http_url, ["*/*/*"])
    flight_sub = []

    def subscribe():
        # The stream trigger's rows (newest row per write) are the "stream" feed; a plain subscription
        # carries whole appends whether or not the trigger runs (test_bus_subscriptions.py).
        r = c.do_get(fl.Ticket(json.dumps({"subscribe": "AAPL/1Min/OHLCV", "feed": "stream"}).encode()))
        for chunk in r:
            flight_sub.append(chunk.data)
            return

    threading.Thread(target=subscribe, daemon=True).start()
    time.sleep(0.5)

    # Three days of AAPL 1Min bars over Flight: in 4 batches, the 3rd out of order (earlier than the 2nd).
    full = minute_bars(D0, 3 * 1440, seed=1)
    parts = [full.iloc[0:1000], full.iloc[2500:4320], full.iloc[1000:2500]]
    for p in parts:
        put(c, "AAPL/1Min/OHLCV", frame(p))
    # Overwrite 30 bars in the middle of day 1 (new values), and one bar with a new high.
    over = minute_bars(D0 + 600 * 60, 30, seed=2)
    put(c, "AAPL/1Min/OHLCV", frame(over))
    full.loc[over.index] = over
    spike = full.loc[[full.index[2000]]].copy()
    spike["High"] = np.float32(999.5)
    put(c, "AAPL/1Min/OHLCV", frame(spike))
    full.loc[spike.index] = spike

    stored = as_df(get(c, "AAPL/1Min/OHLCV"))
    assert np.array_equal(stored.to_numpy(), full.to_numpy())
    for rule, key in [("5min", "AAPL/5Min/OHLCV"), ("15min", "AAPL/15Min/OHLCV"), ("1h", "AAPL/1H/OHLCV"), ("1D", "AAPL/1D/OHLCV")]:
        got = wait_equal(c, key, resample(full, rule))
        assert get(c, key).schema.field("Open").type == pa.float32()  # input types kept
        assert get(c, key).schema.field("Volume").type == pa.int64()

    # Left labels (MarketStore #184): the 09:30 5Min bar holds 09:30..09:34.
    t930 = pd.Timestamp(D0 + 9.5 * 3600, unit="s", tz="UTC")
    assert got is not None
    five = as_df(get(c, "AAPL/5Min/OHLCV"))
    assert five.loc[t930, "Volume"] == full.loc[t930:t930 + pd.Timedelta(minutes=4), "Volume"].sum()

    # pymarketstore (JSON-RPC) writes trigger it too.
    cli = pymkts.Client(srv.rpc_url)
    m = minute_bars(D0, 600, seed=3)
    arr = np.zeros(len(m), dtype=[("Epoch", "i8"), ("Open", "f4"), ("High", "f4"), ("Low", "f4"), ("Close", "f4"), ("Volume", "i8")])
    arr["Epoch"] = m.index.astype("int64") // 10**9
    for col in ("Open", "High", "Low", "Close", "Volume"):
        arr[col] = m[col].to_numpy()
    assert cli.write(arr, "MSFT/1Min/OHLCV") == {"responses": None}
    wait_equal(c, "MSFT/1H/OHLCV", resample(m, "1h"))
    got = cli.query(pymkts.Params("MSFT", "5Min", "OHLCV")).first().df()
    assert len(got) == 120

    # Ticks → bars (MarketStore #338): variable bucket with Price/Size and an extra column.
    n = 500
    rng = np.random.default_rng(4)
    secs = np.sort(D0 + rng.integers(0, 1800, n))
    ticks = pa.table({
        "Epoch": pa.array(secs, pa.int64()),
        "Price": pa.array(100 + rng.standard_normal(n).cumsum(), pa.float64()),
        "Size": pa.array(rng.integers(1, 100, n), pa.uint64()),
        "Exchange": pa.array(rng.integers(0, 5, n), pa.uint8()),
        "Nanoseconds": pa.array(rng.integers(0, 10**9, n), pa.int32()),
    })
    put(c, "TCK/1Sec/TRADE", ticks)
    tt = get(c, "TCK/1Sec/TRADE")  # stored order = time order
    td = tt.drop_columns(["Epoch"]).to_pandas()
    td.index = pd.to_datetime(tt.column("Epoch").cast(pa.int64()).to_numpy(), unit="s", utc=True)
    want = td.resample("1min", label="left", closed="left").agg(
        Open=("Price", "first"), High=("Price", "max"), Low=("Price", "min"), Close=("Price", "last"), Volume=("Size", "sum")).dropna()
    want["Volume"] = want["Volume"].astype("u8")
    wait_equal(c, "TCK/1Min/OHLCV", want)
    want5 = td.resample("5min").agg(Open=("Price", "first"), High=("Price", "max"), Low=("Price", "min"),
                                    Close=("Price", "last"), Volume=("Size", "sum")).dropna()
    want5["Volume"] = want5["Volume"].astype("u8")
    wait_equal(c, "TCK/5Min/OHLCV", want5)

    # filter: nasdaq under timezone UTC: as MarketStore, a start-up warning and every row aggregated.
    put(c, "NQA/1Min/NQ", frame(full))
    wait_equal(c, "NQA/1D/NQ", resample(full, "1D"))
    assert "filter: nasdaq applies only when the server's timezone is America/New_York" in srv.log()

    # Stream: the newest row of each write reaches /ws (1Min at once; complete 5Min bars too) and Flight.
    last = full.index[-1]
    hit = ws.wait(lambda f: f.get("key") == "AAPL/1Min/OHLCV" and f["data"]["Epoch"] == int(spike.index[0].timestamp()))
    assert abs(hit[0]["data"]["High"] - 999.5) < 1e-6
    ws.wait(lambda f: f.get("key") == "AAPL/5Min/OHLCV")
    ws.wait(lambda f: f.get("key") == "TCK/1Sec/TRADE" and f["data"]["Epoch"] == int(secs[-1]))
    deadline = time.time() + 10
    while not flight_sub and time.time() < deadline:
        time.sleep(0.1)
    assert flight_sub and flight_sub[0].num_rows == 1
    assert flight_sub[0].column(0).cast(pa.int64())[0].as_py() == int(parts[0].index[-1].timestamp())
    assert last is not None
    assert "ondiskagg" in srv.log()
