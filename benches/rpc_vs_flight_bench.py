#!/usr/bin/env python3
"""Full read of one year of minute bars over `/rpc` (msgpack) vs Arrow Flight, end to end from the client.

    /root/.cache/mkts-venv/bin/python benches/rpc_vs_flight_bench.py [--bin PATH] [--rows 525600] [--n 5]

Writes `--rows` 1Min bars (Epoch + OHLC float32 + Volume float64) with pymarketstore, then times, best of
`--n` after one warm-up each: a Flight DoGet read into an Arrow table; a raw msgpack `/rpc` Query read in one
call and decoded into numpy; and pymarketstore's `query()` (which reads the body through `requests` in 10 KiB
pieces, ~10 ms of client-side Python per 17 MB on its own). Prints the times and the ratios to Flight; every
result is checked against the written data. Moved here from tests/python/test_rpc_perf.py: a timing is a
measurement, not a pass/fail condition (the equality check stays a test there).
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pyarrow.flight as fl
import pymarketstore as pymkts
import requests

Y2024 = 1_704_067_200


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def best_of(n, fn):
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bars(rows):
    a = np.zeros(rows, dtype=[("Epoch", "i8"), ("Open", "f4"), ("High", "f4"), ("Low", "f4"), ("Close", "f4"),
                              ("Volume", "f8")])
    a["Epoch"] = Y2024 + 60 * np.arange(rows, dtype="i8")
    a["Open"] = np.arange(rows, dtype="f4")
    a["High"] = a["Open"] + 1
    a["Low"] = a["Open"] - 1
    a["Close"] = a["Open"] + 0.5
    a["Volume"] = np.arange(rows, dtype="f8") * 2
    return a


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(Path.home() / ".cache/mkts-target-release/release/mkts"))
    ap.add_argument("--rows", type=int, default=525_600)
    ap.add_argument("--n", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as wd:
        http, grpc = free_port(), free_port()
        Path(wd, "mkts.yml").write_text(f"root_directory: {wd}/data\nlisten_host: 127.0.0.1\nlisten_port: {http}\n"
                                        f"grpc_listen_port: {grpc}\nlog_level: warning\n")
        p = subprocess.Popen([a.bin, "start", "--config", f"{wd}/mkts.yml"], cwd=wd)
        try:
            rpc_url = f"http://127.0.0.1:{http}/rpc"
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http}/heartbeat", timeout=1)
                    break
                except Exception:  # noqa: BLE001
                    time.sleep(0.05)
            data = bars(a.rows)
            cli = pymkts.Client(rpc_url)
            assert cli.write(data, "PERF/1Min/OHLCV") == {"responses": None}
            flight = fl.FlightClient(f"grpc://127.0.0.1:{grpc}")
            ticket = fl.Ticket(json.dumps({"destination": "PERF/1Min/OHLCV"}).encode())
            session = requests.Session()
            body = msgpack.dumps({"method": "DataService.Query", "id": "1", "jsonrpc": "2.0",
                                  "params": {"requests": [{"destination": "PERF/1Min/OHLCV"}]}})

            def via_flight():
                return flight.do_get(ticket).read_all()

            def via_msgpack():
                r = session.post(rpc_url, data=body, headers={"Content-Type": "application/x-msgpack"}, stream=True)
                ds = msgpack.loads(r.raw.read())["result"]["responses"][0]["result"]
                return {n: np.frombuffer(d, dtype=t) for n, t, d in zip(ds["names"], ds["types"], ds["data"])}

            def via_pymarketstore():
                return cli.query(pymkts.Params("PERF", "1Min", "OHLCV")).first().array

            via_flight(), via_msgpack(), via_pymarketstore()  # warm up (page cache, connections)
            t_flight, table = best_of(a.n, via_flight)
            t_rpc, cols = best_of(a.n, via_msgpack)
            t_pymkts, arr = best_of(a.n, via_pymarketstore)
            assert table.num_rows == a.rows and len(cols["Epoch"]) == a.rows and len(arr) == a.rows
            for name in data.dtype.names:
                np.testing.assert_array_equal(cols[name], data[name])
                np.testing.assert_array_equal(arr[name], data[name])
            print(f"full read of {a.rows} rows (best of {a.n}): flight {t_flight * 1e3:.1f} ms, "
                  f"msgpack /rpc {t_rpc * 1e3:.1f} ms (x{t_rpc / t_flight:.2f}), "
                  f"pymarketstore {t_pymkts * 1e3:.1f} ms (x{t_pymkts / t_flight:.2f})")
        finally:
            p.terminate()
            p.wait(30)


if __name__ == "__main__":
    main()
