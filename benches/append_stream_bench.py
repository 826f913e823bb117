"""Durable appends over Flight: one DoPut per append vs one DoPut stream whose batches are each acknowledged
when durable (issue #17: a stream at least 3x the per-call rate).

Each binary gets a fresh data directory and a server; rounds alternate the binaries (`--old`, `--new`, or
just `--new`) so both see the same machine state. Per round and binary, on a bucket holding one day:
- `per-call`: `--appends` DoPuts of 60 1Min bars, each waited for (its PutResult) before the next;
- `stream`: one DoPut, `--appends` batches of 60 bars written as fast as the client can while a second
  thread reads the PutResults; a batch's latency is its PutResult's arrival minus its write.
Rates are appends per second of wall time; latencies are per append (p50, p99, µs).

    python benches/append_stream_bench.py --new target/release/mkts [--old /tmp/mkts-old] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from conftest import Server  # noqa: E402

DAY = 1_704_067_200  # 2024-01-01


def bars(t0: int, n: int = 60) -> pa.RecordBatch:
    ep = t0 + 60 * np.arange(n, dtype=np.int64)
    f = np.linspace(100, 101, n, dtype=np.float32)
    return pa.record_batch({"Epoch": ep, "Open": f, "High": f, "Low": f, "Close": f, "Volume": np.arange(n, dtype=np.int64)})


def start(binary: str) -> Server:
    os.environ["MKTS_BIN"] = binary
    return Server(Path(tempfile.mkdtemp(prefix="mkts-append-bench-"))).start()


def per_call(c: fl.FlightClient, key: str, t0: int, n: int) -> tuple[float, list[float]]:
    lat = []
    begin = time.perf_counter()
    for i in range(n):
        b = bars(t0 + 3600 * i)
        s = time.perf_counter()
        w, r = c.do_put(fl.FlightDescriptor.for_path(key), b.schema)
        w.write_batch(b)
        w.done_writing()
        r.read()
        w.close()
        lat.append((time.perf_counter() - s) * 1e6)
    return n / (time.perf_counter() - begin), lat


def stream(c: fl.FlightClient, key: str, t0: int, n: int) -> tuple[float, list[float]]:
    batches = [bars(t0 + 3600 * i) for i in range(n)]
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), batches[0].schema)
    sent = [0.0] * n
    acked = [0.0] * n

    def read_acks():
        for i in range(n):
            buf = r.read()
            acked[i] = time.perf_counter()
            assert json.loads(buf.to_pybytes()) == {"rows": 60}

    reader = threading.Thread(target=read_acks)
    begin = time.perf_counter()
    reader.start()
    for i, b in enumerate(batches):
        sent[i] = time.perf_counter()
        w.write_batch(b)
    w.done_writing()
    reader.join()
    elapsed = time.perf_counter() - begin
    w.close()
    return n / elapsed, [(a - s) * 1e6 for s, a in zip(sent, acked)]


def pct(v: list[float], p: float) -> float:
    return float(np.percentile(v, p))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", required=True)
    ap.add_argument("--old")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--appends", type=int, default=300)
    args = ap.parse_args()
    bins = [("old", args.old), ("new", args.new)] if args.old else [("new", args.new)]
    servers = {name: start(b) for name, b in bins}
    res = {name: {"per-call": ([], []), "stream": ([], [])} for name, _ in bins}
    try:
        for rnd in range(args.rounds):
            for name, _ in bins:
                c = fl.FlightClient(servers[name].flight_url)
                # Each round appends to a fresh bucket after one day of bars, far apart in time.
                base = DAY + rnd * 10_000_000
                for mode, fn, off in (("per-call", per_call, 0), ("stream", stream, 5_000_000)):
                    key = f"B{rnd}{mode[0]}/1Min/OHLCV"
                    w, r = c.do_put(fl.FlightDescriptor.for_path(key), bars(base + off - 86400, 1440).schema)
                    w.write_batch(bars(base + off - 86400, 1440))
                    w.done_writing()
                    r.read()
                    w.close()
                    rate, lat = fn(c, key, base + off, args.appends)
                    res[name][mode][0].append(rate)
                    res[name][mode][1].extend(lat)
                c.close()
    finally:
        for s in servers.values():
            s.stop()
    print(f"{args.rounds} rounds x {args.appends} appends of 60 bars per mode and binary\n")
    print("| binary | mode | appends/s (median of rounds) | p50 µs | p99 µs |")
    print("|---|---|---:|---:|---:|")
    for name, _ in bins:
        for mode in ("per-call", "stream"):
            rates, lat = res[name][mode]
            print(f"| {name} | {mode} | {statistics.median(rates):,.0f} | {pct(lat, 50):,.0f} | {pct(lat, 99):,.0f} |")
    for name, _ in bins:
        pc, st = (statistics.median(res[name][m][0]) for m in ("per-call", "stream"))
        print(f"\n{name}: stream / per-call rate = {st / pc:.2f}x")


if __name__ == "__main__":
    main()
