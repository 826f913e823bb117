#!/usr/bin/env python3
"""Replication lag and the master's append cost with replicas, side by side in one run.

    /root/.cache/mkts-venv/bin/python benches/replication_bench.py [--bin PATH] [--appends 1000] [--rows 60]

The peer benchmark's append load: `--appends` Flight DoPuts of `--rows` 1Min bars each to one symbol (each
acknowledged before the next), on
  A. a master with no replica connected, and
  B. the same master with two replicas connected (`ack: local`, asynchronous), to a second symbol.
Lag (B): a Flight `{"subscribe"}` stream on each replica timestamps every replicated batch when it arrives
(the replica publishes it right after applying it through its own log); lag = arrival - the master's
acknowledgement of that append, same clock. The replica's fdatasync cost is measured on the same disk
(4 KiB write + fdatasync, 300 times) for the "within 2 fdatasyncs" aim. Prints one JSON line.
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

Y2024 = 1_704_067_200


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_bin():
    rel = Path("/root/.cache/mkts-target-release/release/mkts")
    if rel.exists():
        return str(rel)
    return str(Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "debug" / "mkts")


class Srv:
    def __init__(self, binary, work: Path, extra: str):
        self.work = work
        work.mkdir(parents=True)
        self.http, self.grpc = free_port(), free_port()
        (work / "mkts.yml").write_text(
            f"root_directory: {work / 'data'}\nlisten_host: 127.0.0.1\nlisten_port: {self.http}\n"
            f"grpc_listen_port: {self.grpc}\nlog_level: warning\n{extra}")
        self.proc = subprocess.Popen([binary, "start", "--config", str(work / "mkts.yml")],
                                     stdout=open(work / "log", "wb"), stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/heartbeat", timeout=1)
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.05)
        self.client = fl.FlightClient(f"grpc://127.0.0.1:{self.grpc}")

    def status(self):
        r = list(self.client.do_action(fl.Action("replication_status", b"")))
        return json.loads(r[0].body.to_pybytes())

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def batch(i, rows):
    ep = Y2024 + 60 * (np.arange(rows, dtype=np.int64) + i * rows)
    o = np.full(rows, float(i), dtype=np.float32)
    return pa.table({"Epoch": ep, "Open": o, "High": o, "Low": o, "Close": o, "Volume": np.ones(rows, dtype=np.int64)})


def appends(srv, key, n, rows, acked=None):
    lat = []
    for i in range(n):
        t = batch(i, rows)
        t0 = time.perf_counter()
        w, r = srv.client.do_put(fl.FlightDescriptor.for_path(key), t.schema)
        w.write_table(t)
        w.done_writing()
        r.read()
        w.close()
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        if acked is not None:
            acked.append(time.time())
    return lat


def subscriber(srv, key, arrivals, ready):
    # do_get returns with the first message, so the stream is opened here and the caller waits a moment.
    ready.set()
    reader = fl.FlightClient(f"grpc://127.0.0.1:{srv.grpc}").do_get(fl.Ticket(json.dumps({"subscribe": key}).encode()))
    try:
        for _chunk in reader:
            arrivals.append(time.time())
    except Exception:  # noqa: BLE001 - cancelled at the end
        pass


def fdatasync_us(dir_: Path, n=300):
    p = dir_ / "sync.probe"
    out = []
    with open(p, "wb") as f:
        buf = os.urandom(4096)
        for _ in range(n):
            f.write(buf)
            f.flush()
            t0 = time.perf_counter()
            os.fdatasync(f.fileno())
            out.append(time.perf_counter() - t0)
    p.unlink()
    return float(np.percentile(out, 50) * 1e6)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--appends", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=60)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mkts-repl-bench-"))
    rport = free_port()
    master = Srv(a.bin, base / "master", f"replication:\n  enabled: true\n  listen_port: {rport}\n")
    try:
        # A: no replica connected.
        appends(master, "WARM/1Min/OHLCV", 50, a.rows)
        lat_a = appends(master, "SOLO/1Min/OHLCV", a.appends, a.rows)
        # B: two replicas, each with a subscriber timestamping arrivals.
        reps = [Srv(a.bin, base / f"replica{i}", f"replication:\n  master_host: \"127.0.0.1:{rport}\"\n  retry_interval: 200ms\n") for i in range(2)]
        deadline = time.time() + 120
        while not all(r.status()["replica"]["phase"] == "streaming" and r.status()["replica"]["applied_position"] >= master.status()["position"] for r in reps):
            if time.time() > deadline:
                raise SystemExit("replicas did not catch up")
            time.sleep(0.05)
        arrivals = [[] for _ in reps]
        readies = [threading.Event() for _ in reps]
        subs = [threading.Thread(target=subscriber, args=(r, "PAIR/1Min/OHLCV", arrivals[i], readies[i]), daemon=True) for i, r in enumerate(reps)]
        for s in subs:
            s.start()
        for e in readies:
            e.wait(10)
        time.sleep(1.0)
        acked = []
        lat_b = appends(master, "PAIR/1Min/OHLCV", a.appends, a.rows, acked)
        deadline = time.time() + 120
        while any(len(x) < a.appends for x in arrivals) and time.time() < deadline:
            time.sleep(0.05)
        lags = []
        for x in arrivals:
            n = min(len(x), len(acked))
            lags.extend(max(0.0, x[i] - acked[i]) for i in range(n))
        sync = fdatasync_us(base)
        out = {
            "binary": a.bin,
            "appends": a.appends,
            "rows": a.rows,
            "append_p50_us_no_replica": pct(lat_a, 50) * 1e6,
            "append_p50_us_two_replicas": pct(lat_b, 50) * 1e6,
            "append_p50_ratio_two_vs_none": pct(lat_b, 50) / pct(lat_a, 50),
            "lag_p50_us": pct(lags, 50) * 1e6,
            "lag_p99_us": pct(lags, 99) * 1e6,
            "lag_samples": len(lags),
            "replica_batches_seen": [len(x) for x in arrivals],
            "fdatasync_p50_us": sync,
            "lag_p50_in_fdatasyncs": pct(lags, 50) * 1e6 / sync,
        }
        print(json.dumps(out))
        for r in reps:
            r.stop()
    finally:
        master.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
