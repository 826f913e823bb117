#!/usr/bin/env python3
"""Ingest one year of 1Min bars for N symbols over Arrow Flight, with ondiskagg on and off.

    /root/.cache/mkts-venv/bin/python benches/ondiskagg_bench.py [--bin PATH] [--symbols 100] [--writers 4]

Data: every weekday of 2023, regular-session minutes 14:30–20:59 UTC (390 bars a day, 260 days = 101,400 bars
per symbol), float32 OHLC + int64 Volume, written one month per request (12 writes per symbol) by `--writers`
concurrent Flight clients. With ondiskagg on (`on: */1Min/OHLCV`, destinations 5Min, 15Min, 1H, 1D) the
run also waits until every destination bucket of every symbol holds its expected bar count ("caught up").
Prints one JSON line per mode and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

DESTS = {"5Min": 78, "15Min": 26, "1H": 7, "1D": 1}  # bars per trading day (14:30–21:00 UTC: 1H has 7 windows)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_bin():
    rel = Path("/root/.cache/mkts-target-release/release/mkts")
    if rel.exists():
        return str(rel)
    return str(Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "debug" / "mkts")


def month_batches(seed):
    days = np.arange(np.datetime64("2023-01-01"), np.datetime64("2024-01-01"))
    days = days[np.is_busday(days)]
    start = days.astype("datetime64[s]").astype("i8") + 14 * 3600 + 1800
    ep = (start[:, None] + 60 * np.arange(390)[None, :]).ravel()
    rng = np.random.default_rng(seed)
    n = len(ep)
    o = (100 + rng.standard_normal(n).cumsum()).astype("f4")
    tbl = pa.table({
        "Epoch": pa.array(ep, pa.int64()),
        "Open": o, "High": o + 1, "Low": o - 1, "Close": o + 0.5,
        "Volume": pa.array(rng.integers(1, 1000, n), pa.int64()),
    })
    months = ep.astype("datetime64[s]").astype("datetime64[M]").astype("i8")
    out = []
    for m in np.unique(months):
        idx = np.nonzero(months == m)[0]
        out.append(tbl.slice(int(idx[0]), int(len(idx))))
    return out, len(days)


def start_server(binary, root, agg):
    wd = Path(tempfile.mkdtemp(dir=root))
    http, grpc = free_port(), free_port()
    cfg = f"root_directory: {wd / 'data'}\nlisten_host: 127.0.0.1\nlisten_port: {http}\ngrpc_listen_port: {grpc}\nlog_level: warn\n"
    if agg:
        cfg += 'triggers:\n  - module: ondiskagg\n    on: "*/1Min/OHLCV"\n    config:\n      destinations: [5Min, 15Min, 1H, 1D]\n'
    (wd / "mkts.yml").write_text(cfg)
    log = open(wd / "server.log", "wb")
    p = subprocess.Popen([binary, "start", "--config", str(wd / "mkts.yml")], stdout=log, stderr=subprocess.STDOUT, cwd=wd)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/heartbeat", timeout=1):
                break
        except Exception:  # noqa: BLE001
            time.sleep(0.1)
    return p, wd, grpc


def rss_mb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def run(binary, symbols, writers, agg, data, ndays, root):
    p, wd, grpc = start_server(binary, root, agg)
    url = f"grpc://127.0.0.1:{grpc}"
    jobs = [(f"S{i:04d}", b) for i in range(symbols) for b in data]
    lock = threading.Lock()

    def writer():
        c = fl.FlightClient(url)
        while True:
            with lock:
                if not jobs:
                    return
                sym, b = jobs.pop()
            w, r = c.do_put(fl.FlightDescriptor.for_path(f"{sym}/1Min/OHLCV"), b.schema)
            w.write_table(b)
            w.done_writing()
            try:
                while r.read() is not None:
                    pass
            except StopIteration:
                pass
            w.close()

    t0 = time.time()
    ts = [threading.Thread(target=writer) for _ in range(writers)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    ingest = time.time() - t0
    caught = None
    if agg:
        c = fl.FlightClient(url)
        want = {f"S{i:04d}/{d}/OHLCV": n * ndays for i in range(symbols) for d, n in DESTS.items()}
        while time.time() - t0 < 3600:
            have = {f.descriptor.path[0].decode(): f.total_records for f in c.list_flights()}
            if all(have.get(k) == v for k, v in want.items()):
                caught = time.time() - t0
                break
            time.sleep(0.5)
    fds = len(os.listdir(f"/proc/{p.pid}/fd"))
    peak = rss_mb(p.pid)
    p.send_signal(signal.SIGTERM)
    p.wait(120)
    shutil.rmtree(wd, ignore_errors=True)
    rows = symbols * sum(b.num_rows for b in data)
    return {"ondiskagg": agg, "symbols": symbols, "rows": rows, "writes": symbols * len(data), "ingest_s": round(ingest, 2),
            "rows_per_s": int(rows / ingest), "aggregates_complete_s": caught and round(caught, 2),
            "open_fds_at_end": fds, "peak_rss_mb": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("MKTS_BIN") or default_bin())
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--root", default=tempfile.gettempdir())
    a = ap.parse_args()
    data, ndays = month_batches(7)
    print(json.dumps({"binary": a.bin, "bars_per_symbol": sum(b.num_rows for b in data)}), flush=True)
    off = run(a.bin, a.symbols, a.writers, False, data, ndays, a.root)
    print(json.dumps(off), flush=True)
    on = run(a.bin, a.symbols, a.writers, True, data, ndays, a.root)
    print(json.dumps(on), flush=True)
    print(json.dumps({"ingest_slowdown": round(on["ingest_s"] / off["ingest_s"], 3),
                      "until_aggregates_complete_vs_plain_ingest": on["aggregates_complete_s"] and round(on["aggregates_complete_s"] / off["ingest_s"], 3)}))


if __name__ == "__main__":
    main()
