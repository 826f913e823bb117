#!/usr/bin/env python3
"""Bulk ingest against two running servers, alternated (#17): the peer benchmark's small data set (10 symbols
x 525,600 1Min bars, ../shared/bench/make_data.py), one DoPut per symbol, every bucket destroyed before each
repetition, tables built before timing. Per server and alternation: the wall time of each repetition and
the server's on-CPU time per repetition (all threads, /proc/<pid>/task/*/schedstat).

    python benches/bulk_ab.py --a grpc://127.0.0.1:6995 --a-pid PID_A --b grpc://127.0.0.1:5995 --b-pid PID_B
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from append_ab import connect_pair, cpu_and_switches, put, server_pair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("BENCH_DIR", os.path.join(os.path.dirname(REPO), "shared", "bench")))
import make_data as md  # noqa: E402


def main():
    ap = server_pair(__doc__)
    ap.add_argument("--alternations", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    frames = md.load_frames(md.ensure_dataset("small"))
    tables = {}
    for sym, df in frames.items():
        epoch = pa.array(df.index.values.astype("datetime64[s]").astype(np.int64))
        tables[sym] = pa.table([epoch] + [pa.array(df[c].to_numpy()) for c in md.COLUMNS], names=["Epoch"] + md.COLUMNS)
    servers = connect_pair(args)
    medians = {"a": [], "b": []}
    cpus = {"a": [], "b": []}
    for k in range(args.alternations):
        for name, c, pid in servers:
            walls = []
            ns0, _ = cpu_and_switches(pid)
            for _ in range(args.reps):
                for sym in tables:
                    try:
                        list(c.do_action(fl.Action("destroy", f"{sym}/1Min/OHLCV".encode())))
                    except (fl.FlightError, KeyError):  # not there yet (pyarrow raises not-found as a KeyError)
                        pass
                t0 = time.perf_counter()
                for sym, t in tables.items():
                    put(c, f"{sym}/1Min/OHLCV", t)
                walls.append((time.perf_counter() - t0) * 1e3)
            ns1, _ = cpu_and_switches(pid)
            cpu = (ns1 - ns0) / args.reps / 1e6
            medians[name].append(statistics.median(walls))
            cpus[name].append(cpu)
            print(f"alternation {k + 1} {name}: " + " ".join(f"{w:.0f}" for w in walls) + f" ms, server CPU {cpu:.0f} ms/rep", flush=True)
    for name in ("a", "b"):
        print(f"{name}: median wall {statistics.median(medians[name]):.0f} ms, server CPU {statistics.median(cpus[name]):.0f} ms per repetition")


if __name__ == "__main__":
    main()
