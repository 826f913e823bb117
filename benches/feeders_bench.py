#!/usr/bin/env python3
"""Sustained ingest of streamed trades by the polygon feeder, and what it costs other writers.

    /root/.cache/mkts-venv/bin/python benches/feeders_bench.py [--bin PATH] [--symbols 500] [--messages 2000] [--per-message 50]

A local Polygon WebSocket (tests/python/polygon_fake.py) streams `--messages` messages of `--per-message`
trades each, round-robin over `--symbols` tickers (`T.S000` …), as fast as the feeder reads them. Reported:
the feeder's ingest rate (trades stored per second, from the first message sent until `/metrics` shows every
row written), and the acknowledgement latency p50/p99 of a Flight client appending single-row bars to
`BENCH/1Min/OHLCV` meanwhile, against the same client on an idle server (`baseline`).
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
from polygon_fake import FakePolygon  # noqa: E402

KEY = "bench-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, extra=""):
    wd = Path(tempfile.mkdtemp(prefix="mkts-feeders-bench-"))
    http, grpc = free_port(), free_port()
    (wd / "mkts.yml").write_text(f"root_directory: {wd / 'data'}\nlisten_host: 127.0.0.1\nlisten_port: {http}\n"
                                 f"grpc_listen_port: {grpc}\nlog_level: warn\n" + extra)
    p = subprocess.Popen([binary, "start", "--config", str(wd / "mkts.yml")], stdout=open(wd / "log", "wb"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/heartbeat", timeout=1)
            return p, http, grpc
        except Exception:  # noqa: BLE001
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def rows_written(http):
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as r:
        m = re.search(r'^mkts_feeder_rows_written_total\{[^}]*\} (\d+)', r.read().decode(), re.M)
    return int(m.group(1)) if m else 0


def appender(grpc, stop, lat):
    c = fl.FlightClient(f"grpc://127.0.0.1:{grpc}")
    schema = pa.schema([("Epoch", pa.int64()), ("Open", pa.float64()), ("High", pa.float64()), ("Low", pa.float64()), ("Close", pa.float64()), ("Volume", pa.float64())])
    t = 1_700_000_000
    while not stop.is_set():
        b = pa.record_batch([pa.array([t]), *(pa.array([1.0]) for _ in range(5))], schema=schema)
        t0 = time.perf_counter()
        w, _ = c.do_put(fl.FlightDescriptor.for_path("BENCH/1Min/OHLCV"), schema)
        w.write_batch(b)
        w.close()
        lat.append(time.perf_counter() - t0)
        t += 60


def pct(xs, p):
    return float(np.percentile(np.array(xs) * 1000, p)) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(Path.home() / ".cache/mkts-target-release/release/mkts"))
    ap.add_argument("--symbols", type=int, default=500)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--per-message", type=int, default=50)
    ap.add_argument("--baseline-seconds", type=float, default=5)
    a = ap.parse_args()
    syms = [f"S{i:03d}" for i in range(a.symbols)]
    total = a.messages * a.per_message
    t0_base = 1_704_205_800 * 1000

    # Baseline: the appender alone.
    p, http, grpc = start(a.bin)
    stop, base = threading.Event(), []
    th = threading.Thread(target=appender, args=(grpc, stop, base))
    th.start()
    time.sleep(a.baseline_seconds)
    stop.set()
    th.join()
    p.terminate()
    p.wait()

    sent = {}

    def script(conn):
        if not conn.login(KEY):
            return
        sent["t0"] = time.perf_counter()
        k = 0
        for _ in range(a.messages):
            msg = []
            for _ in range(a.per_message):
                s = syms[k % len(syms)]
                msg.append({"ev": "T", "sym": s, "x": 4, "i": str(k), "z": 3, "p": 100 + (k % 100) * 0.01, "s": 100, "c": [0], "t": t0_base + k, "q": k})
                k += 1
            conn.send(msg)
        sent["t1"] = time.perf_counter()
        conn.idle()

    fake = FakePolygon(KEY, [script])
    cfg = f"""bgworkers:
  - module: polygon
    name: Bench
    config:
      api_key: {KEY}
      data_types: [trades]
      symbols: [{", ".join(syms)}]
      ws_servers: {fake.ws_url}
      base_url: {fake.base_url}
"""
    p, http, grpc = start(a.bin, cfg)
    stop, lat = threading.Event(), []
    th = threading.Thread(target=appender, args=(grpc, stop, lat))
    th.start()
    deadline = time.time() + 600
    while rows_written(http) < total and time.time() < deadline:
        time.sleep(0.05)
    done = time.perf_counter()
    stop.set()
    th.join()
    got = rows_written(http)
    p.terminate()
    p.wait()
    fake.close()
    secs = done - sent["t0"]
    res = {
        "binary": a.bin, "symbols": a.symbols, "messages": a.messages, "trades_per_message": a.per_message,
        "trades_stored": got, "seconds": round(secs, 3), "trades_per_s": round(got / secs), "messages_per_s": round(a.messages * got / total / secs),
        "server_send_seconds": round(sent["t1"] - sent["t0"], 3),
        "append_p50_ms_baseline": round(pct(base, 50), 3), "append_p99_ms_baseline": round(pct(base, 99), 3),
        "append_p50_ms_feeding": round(pct(lat, 50), 3), "append_p99_ms_feeding": round(pct(lat, 99), 3), "appends_during_feed": len(lat),
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
