#!/usr/bin/env python3
"""Standalone Flight fetch of one symbol-year: `do_get(...).read_all()` (and `.to_pandas()`), median of N
repetitions, from one or more mkts binaries and from pyarrow's C++ Flight server serving the same table from
RAM (the floor, as `ref-flight-ram` in the peer benchmark). Targets are measured in alternation, several
rounds, in one sitting, so their medians compare.

    python benches/doget_fetch_bench.py --bin old=/tmp/mkts-old --bin new=$HOME/.cache/mkts-target-release-dget/release/mkts
    python benches/doget_fetch_bench.py --bin new=... --reps 30 --rounds 3 --rows 525600

Data: `--rows` 1Min bars of the peer benchmark's schema (Epoch int64, Open/High/Low/Close float32, Volume
int64), written to each server with one DoPut; the floor serves the table read back from the first server.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

KEY = "SYM/1Min/OHLCV"
START = 1672531200  # 2023-01-01T00:00:00Z


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bars(n: int) -> pa.Table:
    rng = np.random.default_rng(20240501)
    close = (100 + rng.normal(0, 0.1, n).cumsum()).astype(np.float32)
    return pa.table({
        "Epoch": pa.array(START + 60 * np.arange(n, dtype=np.int64)),
        "Open": pa.array(close + np.float32(0.01)),
        "High": pa.array(close + np.float32(0.05)),
        "Low": pa.array(close - np.float32(0.05)),
        "Close": pa.array(close),
        "Volume": pa.array(rng.integers(1, 10_000, n, dtype=np.int64)),
    })


class Mkts:
    def __init__(self, name: str, binary: str):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"doget-{name}-")
        self.http, self.grpc = free_port(), free_port()
        cfg = os.path.join(self.dir, "mkts.yml")
        with open(cfg, "w") as f:
            f.write(f"root_directory: {self.dir}/data\nlisten_host: 127.0.0.1\nlisten_port: {self.http}\n"
                    f"grpc_listen_port: {self.grpc}\nlog_level: warning\n")
        self.proc = subprocess.Popen([binary, "start", "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/heartbeat", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        self.url = f"grpc://127.0.0.1:{self.grpc}"
        self.ticket = fl.Ticket(json.dumps({"destination": KEY}).encode())

    def load(self, table: pa.Table):
        c = fl.FlightClient(self.url)
        w, r = c.do_put(fl.FlightDescriptor.for_path(KEY), table.schema)
        w.write_table(table)
        w.done_writing()
        r.read()
        w.close()

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def serve_floor(path: str, port: int):
    table = pa.ipc.open_file(path).read_all().combine_chunks()

    class Floor(fl.FlightServerBase):
        def do_get(self, context, ticket):
            return fl.RecordBatchStream(table)

    Floor(f"grpc://127.0.0.1:{port}").serve()


class FloorTarget:
    name = "ref-flight-ram"

    def __init__(self, table: pa.Table):
        self.dir = tempfile.mkdtemp(prefix="doget-floor-")
        path = os.path.join(self.dir, "t.arrow")
        with pa.ipc.new_file(path, table.schema) as w:
            w.write_table(table)
        port = free_port()
        self.proc = mp.get_context("spawn").Process(target=serve_floor, args=(path, port), daemon=True)
        self.proc.start()
        self.url = f"grpc://127.0.0.1:{port}"
        self.ticket = fl.Ticket(b"x")
        for _ in range(200):
            try:
                fl.FlightClient(self.url).do_get(self.ticket).read_all()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(t, reps: int) -> tuple[float, float]:
    c = fl.FlightClient(t.url)
    c.do_get(t.ticket).read_all()  # warm: connection, page cache
    fetch, pandas = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        tab = c.do_get(t.ticket).read_all()
        t1 = time.perf_counter()
        tab.to_pandas()
        t2 = time.perf_counter()
        fetch.append(t1 - t0)
        pandas.append(t2 - t0)
    c.close()
    return statistics.median(fetch) * 1e3, statistics.median(pandas) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", action="append", required=True, help="name=path of an mkts binary (repeatable)")
    ap.add_argument("--rows", type=int, default=525_600)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-floor", action="store_true")
    args = ap.parse_args()
    table = bars(args.rows)
    targets = [Mkts(*b.split("=", 1)) for b in args.bin]
    try:
        for t in targets:
            t.load(table)
        back = fl.FlightClient(targets[0].url).do_get(targets[0].ticket).read_all()
        assert back.num_rows == args.rows
        if not args.no_floor:
            targets.append(FloorTarget(back))
        for t in targets:  # every target serves the same values
            got = fl.FlightClient(t.url).do_get(t.ticket).read_all()
            assert got.equals(back), t.name
        results: dict[str, list[tuple[float, float]]] = {t.name: [] for t in targets}
        for r in range(args.rounds):
            for t in targets:
                results[t.name].append(measure(t, args.reps))
                f, p = results[t.name][-1]
                print(f"round {r + 1} {t.name:16s} fetch {f:7.2f} ms   fetch+to_pandas {p:7.2f} ms", flush=True)
        print(f"\n{args.rows} rows ({back.nbytes / 1e6:.1f} MB), median of {args.reps} per round; per target the rounds' medians:")
        for name, rs in results.items():
            print(f"{name:16s} fetch " + " / ".join(f"{f:.2f}" for f, _ in rs) + " ms   fetch+to_pandas " + " / ".join(f"{p:.2f}" for _, p in rs) + " ms")
    finally:
        for t in targets:
            t.stop()


if __name__ == "__main__":
    main()
