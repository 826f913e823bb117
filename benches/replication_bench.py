#!/usr/bin/env python3
"""Replication lag and the master's append cost with replicas, side by side in one run.

    /root/.cache/mkts-venv/bin/python benches/replication_bench.py [--bin PATH] [--appends 1000] [--rows 60]

The peer benchmark's append load: `--appends` Flight DoPuts of `--rows` 1Min bars each to one symbol (each
acknowledged before the next), on
  A. a master with no replica connected, and
  B. the same master with two replicas connected (`ack: local`, asynchronous), to a second symbol.
Lag (B, a third symbol): a Flight `{"subscribe"}` stream on each replica, in its own process, timestamps every replicated batch when it arrives
(the replica publishes it right after applying it through its own log); lag = arrival - the master's
acknowledgement of that append, same clock. A third subscriber, on the master, gives the floor that any
subscriber sees (publish -> Flight -> Python); the difference is what replication adds. The replica's fdatasync cost is measured on the same disk
(4 KiB write + fdatasync, 300 times) for the "within 2 fdatasyncs" aim. `--replica-dir /dev/shm` puts the
replicas' roots on tmpfs, separating the master's own cost from three processes sharing one disk and two
cores. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import tempfile
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


def subscriber(grpc_port, key, want, out_q):
    """In its own process (so the appender's timings do not share a GIL with it): arrival times of `want` batches."""
    arrivals = []
    client = fl.FlightClient(f"grpc://127.0.0.1:{grpc_port}")
    # do_get returns with the first message, so "ready" goes first and the caller waits a moment.
    out_q.put("ready")
    reader = client.do_get(fl.Ticket(json.dumps({"subscribe": key}).encode()))
    deadline = time.time() + 300
    try:
        for _chunk in reader:
            arrivals.append(time.time())
            if len(arrivals) >= want or time.time() > deadline:
                break
    except Exception:  # noqa: BLE001
        pass
    out_q.put(arrivals)


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
    ap.add_argument("--replica-dir", default=None, help="put the replicas' roots here (e.g. /dev/shm: their fsyncs then do not share the master's disk)")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mkts-repl-bench-"))
    rport = free_port()
    rbase = Path(tempfile.mkdtemp(prefix="mkts-repl-bench-", dir=a.replica_dir)) if a.replica_dir else base
    reps = []
    master = Srv(a.bin, base / "master", f"replication:\n  enabled: true\n  listen_port: {rport}\n")
    try:
        # A: no replica connected.
        appends(master, "WARM/1Min/OHLCV", 50, a.rows)
        lat_a = appends(master, "SOLO/1Min/OHLCV", a.appends, a.rows)
        # B: two replicas, each with a subscriber timestamping arrivals.
        reps += [Srv(a.bin, rbase / f"replica{i}", f"replication:\n  master_host: \"127.0.0.1:{rport}\"\n  retry_interval: 200ms\n") for i in range(2)]
        deadline = time.time() + 120
        while not all(r.status()["replica"]["phase"] == "streaming" and r.status()["replica"]["applied_position"] >= master.status()["position"] for r in reps):
            if time.time() > deadline:
                raise SystemExit("replicas did not catch up")
            time.sleep(0.05)
        # B1: the master's append cost with both replicas streaming, nothing else in this process.
        lat_b = appends(master, "BOTH/1Min/OHLCV", a.appends, a.rows)
        # B2: lag, with one subscriber process per replica.
        ctx = mp.get_context("spawn")
        # One subscriber per replica, plus one on the master itself: the floor (publish -> Flight -> Python).
        ports = [r.grpc for r in reps] + [master.grpc]
        qs = [ctx.Queue() for _ in ports]
        subs = [ctx.Process(target=subscriber, args=(p, "PAIR/1Min/OHLCV", a.appends, qs[i]), daemon=True) for i, p in enumerate(ports)]
        for s in subs:
            s.start()
        for q in qs:
            assert q.get(timeout=60) == "ready"
        time.sleep(1.0)
        acked = []
        appends(master, "PAIR/1Min/OHLCV", a.appends, a.rows, acked)
        arrivals = [q.get(timeout=300) for q in qs]
        local = arrivals.pop()
        local_lags = [local[i] - acked[i] for i in range(min(len(local), len(acked)))]  # negative: seen before the ack
        for s in subs:
            s.join(10)
        lags = []
        for x in arrivals:
            n = min(len(x), len(acked))
            lags.extend(max(0.0, x[i] - acked[i]) for i in range(n))
        sync = fdatasync_us(base)
        out = {
            "binary": a.bin,
            "replica_dir": a.replica_dir or "same disk as the master",
            "appends": a.appends,
            "rows": a.rows,
            "append_p50_us_no_replica": pct(lat_a, 50) * 1e6,
            "append_p50_us_two_replicas": pct(lat_b, 50) * 1e6,
            "append_p50_ratio_two_vs_none": pct(lat_b, 50) / pct(lat_a, 50),
            "lag_p50_us": pct(lags, 50) * 1e6,
            "lag_p99_us": pct(lags, 99) * 1e6,
            "lag_samples": len(lags),
            "local_subscriber_lag_p50_us": pct(local_lags, 50) * 1e6,
            "replication_added_lag_p50_us": (pct(lags, 50) - pct(local_lags, 50)) * 1e6,
            "replica_batches_seen": [len(x) for x in arrivals],
            "fdatasync_p50_us": sync,
            "lag_p50_in_fdatasyncs": pct(lags, 50) * 1e6 / sync,
        }
        print(json.dumps(out))
    finally:
        for r in reps:
            r.stop()
        master.stop()
        shutil.rmtree(base, ignore_errors=True)
        if a.replica_dir:
            shutil.rmtree(rbase, ignore_errors=True)


if __name__ == "__main__":
    main()
