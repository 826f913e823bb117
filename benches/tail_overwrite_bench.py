#!/usr/bin/env python3
"""A live feed re-sending its newest bar: cost of overwriting the last bar of a full year partition.

    /root/.cache/mkts-venv/bin/python benches/tail_overwrite_bench.py [--bin PATH] [--rows 525000] [--n 50]

Loads one year of 1Min bars (float32 OHLC + int64 Volume) into BTC/1Min/OHLCV over Flight, then times
(one DoPut each, acknowledged when durable) `--n` overwrites of the newest bar, `--n` appends of new bars, and
`--n` overwrites of the newest bar again (after the appends). Prints p50/p99 in ms.

With `--ondiskagg`, the server runs the ondiskagg trigger (5Min, 15Min, 1H, 1D) and the run also appends
`--n` live 1Min bars one by one, then reports how long after the last acknowledgement the 5Min bucket holds
it: every live bar makes ondiskagg rewrite the open 5Min/15Min/1H/1D bars, i.e. tail overwrites.
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

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(Path.home() / ".cache/mkts-target-release/release/mkts"))
    ap.add_argument("--rows", type=int, default=525_000)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--ondiskagg", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as wd:
        http, grpc = free_port(), free_port()
        cfg = f"root_directory: {wd}/data\nlisten_host: 127.0.0.1\nlisten_port: {http}\ngrpc_listen_port: {grpc}\nlog_level: warn\n"
        if a.ondiskagg:
            cfg += 'triggers:\n  - module: ondiskagg.so\n    on: "*/1Min/OHLCV"\n    config: {destinations: [5Min, 15Min, 1H, 1D]}\n'
        Path(wd, "mkts.yml").write_text(cfg)
        p = subprocess.Popen([a.bin, "start", "--config", f"{wd}/mkts.yml"], cwd=wd)
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http}/heartbeat", timeout=1)
                    break
                except Exception:  # noqa: BLE001
                    time.sleep(0.05)
            c = fl.connect(f"grpc://127.0.0.1:{grpc}")

            def put(t):
                w, r = c.do_put(fl.FlightDescriptor.for_path("BTC/1Min/OHLCV"), t.schema)
                w.write_table(t)
                w.done_writing()
                r.read()
                w.close()

            def bar(e, v):
                f = pa.array([v], pa.float32())
                return pa.table({"Epoch": pa.array([e], pa.int64()), "Open": f, "High": f, "Low": f, "Close": f, "Volume": pa.array([1], pa.int64())})

            ep = 1672531200 + 60 * np.arange(a.rows)  # 2023-01-01 onwards, all within 2023
            o = np.random.default_rng(1).random(a.rows).astype("f4")
            put(pa.table({"Epoch": ep, "Open": o, "High": o, "Low": o, "Close": o, "Volume": np.arange(a.rows)}))

            def timed(label, epochs):
                lat = []
                for i, e in enumerate(epochs):
                    s = time.perf_counter()
                    put(bar(int(e), float(i)))
                    lat.append((time.perf_counter() - s) * 1e3)
                print(f"{label:<40} p50 {np.percentile(lat, 50):7.2f} ms   p99 {np.percentile(lat, 99):7.2f} ms")

            last = int(ep[-1])
            if a.ondiskagg:
                def agg_last():
                    try:
                        t = c.do_get(fl.Ticket(json.dumps({"destination": "BTC/5Min/OHLCV", "limit_record_count": 1}).encode())).read_all()
                        return int(t.column("Epoch").cast(pa.int64())[0].as_py()), float(t.column("Close")[0].as_py())
                    except Exception:  # noqa: BLE001
                        return None
                while agg_last() is None or agg_last()[0] < last - last % 300:
                    time.sleep(0.01)
                lat = []
                for i in range(a.n):
                    s = time.perf_counter()
                    put(bar(last + 60 * (i + 1), 1000.0 + i))
                    lat.append((time.perf_counter() - s) * 1e3)
                t_last = time.perf_counter()
                want = (last + 60 * a.n - (last + 60 * a.n) % 300, 1000.0 + a.n - 1)
                while agg_last() != want:
                    time.sleep(0.002)
                print(f"{'live 1Min appends with ondiskagg':<40} p50 {np.percentile(lat, 50):7.2f} ms   p99 {np.percentile(lat, 99):7.2f} ms")
                print(f"{'5Min bar current after last ack':<40} {(time.perf_counter() - t_last) * 1e3:7.1f} ms")
                return
            timed(f"overwrite newest bar ({a.rows} rows)", [last] * a.n)
            timed("append a new bar", [last + 60 * (i + 1) for i in range(a.n)])
            timed("overwrite newest bar after appends", [last + 60 * a.n] * a.n)
        finally:
            p.terminate()
            p.wait(30)


if __name__ == "__main__":
    main()
