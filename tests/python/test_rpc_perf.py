"""A full year of minute bars (525,600 rows x 5 columns) read over `/rpc` (raw msgpack and pymarketstore)
equals what was written and what Flight returns.

Only equality is asserted here: how long each path takes is measured by benches/rpc_vs_flight_bench.py
(timings are never pass/fail conditions of the test suite).
"""
from __future__ import annotations

import json

import msgpack
import numpy as np
import pyarrow.flight as fl
import pymarketstore as pymkts
import requests

Y2024 = 1_704_067_200
ROWS = 525_600


def test_full_year_read_msgpack_and_flight_agree(server):
    a = np.zeros(ROWS, dtype=[("Epoch", "i8"), ("Open", "f4"), ("High", "f4"), ("Low", "f4"), ("Close", "f4"),
                              ("Volume", "f8")])
    a["Epoch"] = Y2024 + 60 * np.arange(ROWS, dtype="i8")
    a["Open"] = np.arange(ROWS, dtype="f4")
    a["High"] = a["Open"] + 1
    a["Low"] = a["Open"] - 1
    a["Close"] = a["Open"] + 0.5
    a["Volume"] = np.arange(ROWS, dtype="f8") * 2
    cli = pymkts.Client(server.rpc_url)
    assert cli.write(a, "PERF/1Min/OHLCV") == {"responses": None}

    table = fl.FlightClient(server.flight_url).do_get(
        fl.Ticket(json.dumps({"destination": "PERF/1Min/OHLCV"}).encode())).read_all()
    body = msgpack.dumps({"method": "DataService.Query", "id": "1", "jsonrpc": "2.0",
                          "params": {"requests": [{"destination": "PERF/1Min/OHLCV"}]}})
    r = requests.post(server.rpc_url, data=body, headers={"Content-Type": "application/x-msgpack"})
    ds = msgpack.loads(r.content)["result"]["responses"][0]["result"]
    cols = {n: np.frombuffer(d, dtype=t) for n, t, d in zip(ds["names"], ds["types"], ds["data"])}
    arr = cli.query(pymkts.Params("PERF", "1Min", "OHLCV")).first().array
    assert table.num_rows == ROWS and len(cols["Epoch"]) == ROWS and len(arr) == ROWS
    for name in a.dtype.names:
        np.testing.assert_array_equal(cols[name], a[name])
        np.testing.assert_array_equal(arr[name], a[name])
    np.testing.assert_array_equal(table.column("Close").to_numpy(), a["Close"])
    np.testing.assert_array_equal(table.column("Epoch").cast("int64").to_numpy(), a["Epoch"])
