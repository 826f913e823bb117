#!/usr/bin/env python3
"""The server's side of the Flight aims of #17, against the benchmark's own Flight floors, alternated.

The peer benchmark times `server-flight` with its client code (`server_client.py`: `to_wire` per append,
`from_wire` per read) and the floors `ref-flight-ram` / `ref-flight-fsync` with theirs (tables prepared
before timing; `pop` + `DatetimeIndex` after a read). This script separates the two parts on one symbol-year
of the benchmark's data (`make_data.gen_symbol`, the `small` size's first symbol):

1. the wire: per round, each server in turn, the median of `do_get(...).read_all()` for the full year, one
   day and the last 1,000 rows, of a per-call durable append of 60 bars (DoPut + close, tables built
   before timing), and the time of a bulk write of the `small` size's 10 symbol-years (one DoPut each, into
   buckets / files no earlier round wrote); the floors run the benchmark's own server code (`peers.RefFlightRam.SERVER`,
   `peers.RefFlightFsync.SERVER`) in their own processes;
2. the client code each side's peer runs on the same table: `server_client.FlightPeer.from_wire` vs the
   floor's conversion (`peers.RefFlightRam._get` after `read_all`), and `FlightPeer.to_wire` (timed inside
   each server-flight append) vs nothing (the floor's tables are built untimed).

    mkts start --config mkts.yml &      # a release build, its own root
    python benches/flight_floor_ab.py --server grpc://127.0.0.1:5995 [--bench ../shared/bench] [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as fl

KEY = "FLOORAB/1Min/OHLCV"
APPEND_KEY = "FLOORAPPEND/1Min/OHLCV"  # appends go to their own bucket: the reads stay on the same rows


def median_ms(f, n: int) -> float:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs) * 1e3


def start(code: str, *argv: str):
    p = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True)
    return p, fl.FlightClient(f"grpc://127.0.0.1:{int(p.stdout.readline())}")


def put(c, path: str, table):
    w, _ = c.do_put(fl.FlightDescriptor.for_path(path), table.schema)
    w.write_table(table)
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="grpc://127.0.0.1:5995")
    ap.add_argument("--bench", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--appends", type=int, default=300)
    ap.add_argument("--bulk-symbols", type=int, default=10)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.bench))
    import make_data as md
    import peers
    import server_client

    # server_client's methods called as the server-flight peer calls them (they read only `args` / `client`).
    wire_peer = argparse.Namespace(args=argparse.Namespace(flight_epoch="int64"))
    cols = md.gen_symbol(0, 525_600)
    df = md.cols_to_frame(cols)
    table = server_client.FlightPeer.to_wire(wire_peer, df)
    rows = table.num_rows
    mk = fl.FlightClient(args.server)
    for key in (KEY, APPEND_KEY):
        try:
            list(mk.do_action(fl.Action("destroy", key.encode())))
        except (fl.FlightError, KeyError):  # not there yet (a missing bucket is pyarrow's KeyError)
            pass
    put(mk, KEY, table)
    put(mk, APPEND_KEY, table.slice(0, 1440))  # appends go to an existing bucket, as in the benchmark
    work = tempfile.mkdtemp(prefix="flight-floor-ab-")
    with pa.OSFile(os.path.join(work, "SYM.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    ram_proc, ram = start(peers.RefFlightRam.SERVER, work, "SYM")
    fsync_dir = os.path.join(work, "fsync")
    os.makedirs(fsync_dir)
    fsync_proc, fsync = start(peers.RefFlightFsync.SERVER, fsync_dir)
    floor = argparse.Namespace(client=ram)  # for peers.RefFlightRam._get

    day0 = int(cols["Epoch"][0]) + 200 * 86400
    i0 = (day0 - int(cols["Epoch"][0])) // 60
    reads = {
        "read full": ({}, {"offset": 0}, 20),
        "read 1 day": ({"epoch_start": day0, "epoch_end": day0 + 86400 - 60}, {"offset": i0, "length": 1440}, 100),
        "tail 1000": ({"limit_record_count": 1000, "limit_from_start": False}, {"offset": rows - 1000}, 100),
    }
    mk_t = {op: fl.Ticket(json.dumps({"destination": KEY, **q}).encode()) for op, (q, _, _) in reads.items()}
    ram_t = {op: fl.Ticket(json.dumps({"sym": "SYM", **q}).encode()) for op, (_, q, _) in reads.items()}
    for op in reads:  # the same rows on both sides
        a = mk.do_get(mk_t[op]).read_all()
        b = ram.do_get(ram_t[op]).read_all()
        assert a.num_rows == b.num_rows and a.column("Open").equals(b.column("Open")), op

    bulk = [table] + [server_client.FlightPeer.to_wire(wire_peer, md.cols_to_frame(md.gen_symbol(i, 525_600)))
                      for i in range(1, args.bulk_symbols)]
    ops = list(reads) + ["append p50", "bulk write"]
    wire = {(op, side): [] for op in ops for side in ("mkts", "floor")}
    physical = []
    last = int(cols["Epoch"][-1])
    for r in range(args.rounds):
        for op, (_, _, n) in reads.items():
            wire[(op, "mkts")].append(median_ms(lambda: mk.do_get(mk_t[op]).read_all(), n))
            wire[(op, "floor")].append(median_ms(lambda: ram.do_get(ram_t[op]).read_all(), n))
        for side, c in (("mkts", mk), ("floor", fsync)):
            batch = []
            for i in range(args.appends):
                ep = last + 60 * (1 + 60 * (r * args.appends + i) + np.arange(60, dtype=np.int64))
                batch.append(pa.table([pa.array(ep)] + [table.column(name).slice(0, 60) for name in table.column_names[1:]],
                                      names=table.column_names))
            lat = []
            for t in batch:
                t0 = time.perf_counter()
                put(c, APPEND_KEY, t)
                lat.append(time.perf_counter() - t0)
            wire[("append p50", side)].append(statistics.median(lat) * 1e3)
        for side, c in (("mkts", mk), ("floor", fsync)):
            t0 = time.perf_counter()
            for i, t in enumerate(bulk):
                put(c, f"BULK{i}R{r}/1Min/OHLCV", t)
            wire[("bulk write", side)].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()  # the physical floor: the same buffers written to fresh files here, fsync'd
        for i, t in enumerate(bulk):
            fd = os.open(os.path.join(work, f"bulk{i}r{r}.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
            for col in t.columns:
                for chunk in col.chunks:
                    for buf in chunk.buffers():
                        if buf is not None:
                            os.write(fd, buf)
            os.fdatasync(fd)
            os.close(fd)
        physical.append((time.perf_counter() - t0) * 1e3)
        for i in range(len(bulk)):
            os.unlink(os.path.join(work, f"bulk{i}r{r}.bin"))
            list(mk.do_action(fl.Action("destroy", f"BULK{i}R{r}/1Min/OHLCV".encode())))
        print(f"round {r + 1}: " + ", ".join(f"{op} {wire[(op, 'mkts')][-1]:.3f}/{wire[(op, 'floor')][-1]:.3f}"
                                              for op in ops) + " ms (mkts/floor)", flush=True)

    print("\n| op | mkts, wire only (ms) | floor, wire only (ms) | ratio | rounds mkts below |")
    print("|---|---:|---:|---:|---:|")
    for op in ops:
        a, b = wire[(op, "mkts")], wire[(op, "floor")]
        below = sum(x < y for x, y in zip(a, b))
        print(f"| {op} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | "
              f"{statistics.median(a) / statistics.median(b):.2f}x | {below} of {len(a)} |")

    print(f"\nbulk write's physical floor (the same buffers: write + fdatasync per symbol, no network): "
          f"median {statistics.median(physical):.0f} ms, rounds {min(physical):.0f}-{max(physical):.0f} ms")
    print("\n| client code on the same table | server-flight's (ms) | the floor's (ms) |")
    print("|---|---:|---:|")
    for op in reads:
        t = mk.do_get(mk_t[op]).read_all()
        n = reads[op][2] * 2
        ours = median_ms(lambda: server_client.FlightPeer.from_wire(t), n)
        def floor_conv():
            df = t.to_pandas()
            df.index = pd.DatetimeIndex(df.pop("Epoch"), name="Epoch").tz_convert("UTC").tz_localize(None)
        theirs = median_ms(floor_conv, n)
        q = reads[op][1]
        assert server_client.FlightPeer.from_wire(t).equals(peers.RefFlightRam._get(floor, "SYM", q["offset"], q.get("length")))
        print(f"| {op}: from_wire vs pop + DatetimeIndex | {ours:.3f} | {theirs:.3f} |")
    frames = [md.cols_to_frame({k: v[i * 60:(i + 1) * 60] for k, v in cols.items()}) for i in range(1000)]
    it = iter(frames)
    print(f"| append: to_wire of a fresh 60-bar frame | {median_ms(lambda: server_client.FlightPeer.to_wire(wire_peer, next(it)), 1000):.3f} | 0 (built untimed) |")
    for proc in (ram_proc, fsync_proc):
        proc.kill()
        proc.wait()
    shutil.rmtree(work)
    for key in (KEY, APPEND_KEY):
        list(mk.do_action(fl.Action("destroy", key.encode())))


if __name__ == "__main__":
    main()
