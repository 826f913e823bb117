#!/usr/bin/env python3
"""Per-call durable appends against two running servers, alternated round by round (#17).

Each round sends N appends of 60 one-minute bars (one DoPut each, tables built before timing), rotating
over 10 buckets that already hold data, into a year no earlier round wrote, first to server A then to
server B, and prints per server and round: p50/p99 latency, the server's on-CPU time per append (all its
threads, /proc/<pid>/task/*/schedstat) and its context switches per append. Alternating keeps a noisy
machine's drift (CPU steal on a shared VM) out of the comparison; the medians over rounds are the result.

    benches/run_peers.sh starts servers for the peer benchmark; for this script start two yourself, e.g.
    mkts start --config a.yml & mkts start --config b.yml &   # different ports and root directories
    python benches/append_ab.py --a grpc://127.0.0.1:6995 --a-pid PID_A --b grpc://127.0.0.1:5995 --b-pid PID_B
"""
from __future__ import annotations

import argparse
import glob
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

SCHEMA = pa.schema([("Epoch", pa.int64()), ("Open", pa.float32()), ("High", pa.float32()), ("Low", pa.float32()),
                    ("Close", pa.float32()), ("Volume", pa.int64())])
SYMBOLS = [f"AB{i:03d}" for i in range(10)]
YEAR = 366 * 86400


def cpu_and_switches(pid: int) -> tuple[int, int]:
    ns = switches = 0
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            ns += int(open(f"{task}/schedstat").read().split()[0])
            for line in open(f"{task}/status"):
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except OSError:
            pass  # a thread ended meanwhile
    return ns, switches


def put(c, key, table):
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), table.schema)
    w.write_table(table)
    w.done_writing()
    r.read()
    w.close()


def tables(n: int, start: int):
    out = []
    for i in range(n):
        k = i // len(SYMBOLS)
        ep = start + 60 * (60 * k + np.arange(60, dtype=np.int64))
        cols = [pa.array(ep)] + [pa.array(np.ones(60, np.float32))] * 4 + [pa.array(np.ones(60, np.int64))]
        out.append((f"{SYMBOLS[i % len(SYMBOLS)]}/1Min/OHLCV", pa.table(cols, schema=SCHEMA)))
    return out


def round_(c, pid, n, start):
    batch = tables(n, start)
    ns0, cs0 = cpu_and_switches(pid)
    lat = []
    for key, t in batch:
        t0 = time.perf_counter()
        put(c, key, t)
        lat.append((time.perf_counter() - t0) * 1e6)
    ns1, cs1 = cpu_and_switches(pid)
    return np.percentile(lat, 50), np.percentile(lat, 99), (ns1 - ns0) / n / 1e3, (cs1 - cs0) / n


def server_pair(doc: str):
    """A parser for the two servers (`--a URL --a-pid PID --b URL --b-pid PID`) plus the caller's options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True)
    ap.add_argument("--a-pid", type=int, required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--b-pid", type=int, required=True)
    return ap


def connect_pair(args):
    """`[(name, client, pid)]` for servers a and b."""
    return [("a", fl.connect(args.a), args.a_pid), ("b", fl.connect(args.b), args.b_pid)]


def main():
    ap = server_pair(__doc__)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--appends", type=int, default=400)
    args = ap.parse_args()
    servers = connect_pair(args)
    base = 1735689600  # 2025-01-01: one year per round after the seed below
    for _, c, _ in servers:  # seed: every bucket holds a day of 2024
        for s in SYMBOLS:
            ep = 1704067200 + 60 * np.arange(1440, dtype=np.int64)
            put(c, f"{s}/1Min/OHLCV", pa.table([pa.array(ep)] + [pa.array(np.ones(1440, np.float32))] * 4
                                               + [pa.array(np.ones(1440, np.int64))], schema=SCHEMA))
    results = {name: [] for name, _, _ in servers}
    for r in range(args.rounds):
        for name, c, pid in servers:
            p50, p99, cpu, cs = round_(c, pid, args.appends, base + YEAR * (r + 1))
            results[name].append((p50, p99, cpu, cs))
            print(f"round {r + 1:2d} {name}: p50 {p50:6.0f} us  p99 {p99:6.0f} us  server CPU {cpu:5.0f} us/append  "
                  f"{cs:4.1f} context switches/append", flush=True)
    for name, rows in results.items():
        med = [statistics.median(x[i] for x in rows) for i in range(4)]
        print(f"{name}: median over rounds p50 {med[0]:.0f} us, p99 {med[1]:.0f} us, CPU {med[2]:.0f} us/append, "
              f"{med[3]:.1f} switches/append")
    wins = sum(1 for x, y in zip(results["a"], results["b"]) if y[0] < x[0])
    print(f"b's p50 below a's in {wins} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
