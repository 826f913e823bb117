#!/usr/bin/env python3
"""What a trigger costs the writer, and how fast each kind of trigger keeps up.

    /root/.cache/mkts-venv/bin/python benches/plugins_bench.py [--bin PATH] [--lib-dir DIR] [--appends 2000]

One Flight client appends `--appends` single-row bars (DoPut, one per append, each acknowledged when
durable) to `BENCH/1Min/OHLCV`, in four configurations run one after the other on fresh servers:

- `none`: no trigger;
- `shared`: the example Rust copy trigger (plugins/examples/rust-trigger) as a shared library;
- `process`: the example Python mirror trigger (plugins/examples/python/mirror_trigger.py) over DoExchange;
- `slow`: the copy trigger sleeping 50 ms per append (it falls behind; acks must not).

Reported per configuration: acknowledgement latency p50/p99 (what the writer sees), appends/s, and the time
from the last acknowledgement until the trigger's copy holds every row ("caught up"; not waited for `slow`).
A copying trigger doubles the engine's writes, so `shared` and `process` include that work.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, root, triggers):
    wd = Path(tempfile.mkdtemp(dir=root))
    http, grpc = free_port(), free_port()
    cfg = f"root_directory: {wd / 'data'}\nlisten_host: 127.0.0.1\nlisten_port: {http}\ngrpc_listen_port: {grpc}\nlog_level: warn\n"
    if triggers:
        cfg += "triggers:\n" + triggers
    (wd / "mkts.yml").write_text(cfg)
    log = open(wd / "server.log", "wb")
    # The Python trigger (`#!/usr/bin/env python3`) runs with this interpreter's pyarrow.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    p = subprocess.Popen([binary, "start", "--config", str(wd / "mkts.yml")], stdout=log, stderr=subprocess.STDOUT, cwd=wd, env=env)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/heartbeat", timeout=1):
                break
        except Exception:  # noqa: BLE001
            time.sleep(0.05)
    return p, fl.connect(f"grpc://127.0.0.1:{grpc}")


def rows(c, key):
    try:
        return c.do_get(fl.Ticket(json.dumps({"destination": key}).encode())).read_all().num_rows
    except Exception:  # noqa: BLE001
        return 0


def run(binary, root, name, triggers, copy_key, n):
    p, c = start(binary, root, triggers)
    schema = pa.schema([("Epoch", pa.int64()), ("Open", pa.float64())])
    desc = fl.FlightDescriptor.for_path("BENCH/1Min/OHLCV")
    lat = []
    warm = 200  # connection and server warm-up, not measured (the copy still has to hold them)
    t0 = time.perf_counter()
    for i in range(-warm, n):
        if i == 0:
            t0 = time.perf_counter()
        b = pa.record_batch([pa.array([60 * (i + warm + 1)], pa.int64()), pa.array([float(i)])], schema=schema)
        s = time.perf_counter()
        w, r = c.do_put(desc, schema)
        w.write_batch(b)
        w.done_writing()
        r.read()
        w.close()
        if i >= 0:
            lat.append(time.perf_counter() - s)
    t_last = time.perf_counter()
    caught = None
    if copy_key:
        while rows(c, copy_key) < n + warm:
            if time.perf_counter() - t_last > 120:
                p.terminate()
                raise SystemExit(f"{name}: the trigger did not catch up in 120 s; see {p.args[-1]} and server.log beside it")
            time.sleep(0.005)
        caught = time.perf_counter() - t_last
    p.terminate()
    p.wait(60)
    lat_ms = np.array(lat) * 1e3
    res = {
        "config": name,
        "appends": n,
        "ack_p50_ms": round(float(np.percentile(lat_ms, 50)), 3),
        "ack_p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
        "appends_per_s": round(n / (t_last - t0), 1),
        "caught_up_after_last_ack_ms": None if caught is None else round(caught * 1e3, 1),
    }
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    rel = Path.home() / ".cache/mkts-target-release/release"
    ap.add_argument("--bin", default=str(rel / "mkts"))
    ap.add_argument("--lib-dir", default=str(rel))
    ap.add_argument("--appends", type=int, default=2000)
    a = ap.parse_args()
    lib = Path(a.lib_dir) / "libmkts_example_trigger.so"
    if not lib.exists():
        raise SystemExit(f"{lib} missing: cargo build --release -p mkts-example-trigger (same CARGO_TARGET_DIR as --bin)")
    mirror = REPO / "plugins/examples/python/mirror_trigger.py"
    on = '    on: "BENCH/1Min/OHLCV"\n'
    configs = [
        ("none", "", None),
        ("shared", f"  - module: {lib}\n{on}", "BENCH_COPY/1Min/OHLCV"),
        ("process", f"  - module: {mirror}\n{on}", "BENCH_MIRROR/1Min/OHLCV"),
        ("slow", f"  - module: {lib}\n{on}    config: {{sleep_ms: 50}}\n", None),
    ]
    with tempfile.TemporaryDirectory() as root:
        out = [run(a.bin, root, name, trig, key, a.appends) for name, trig, key in configs]
    base = out[0]["ack_p50_ms"]
    print("\n| config | ack p50 ms | ack p99 ms | vs none (p50) | appends/s | caught up after last ack |")
    print("|---|---|---|---|---|---|")
    for r in out:
        cu = "-" if r["caught_up_after_last_ack_ms"] is None else f"{r['caught_up_after_last_ack_ms']} ms"
        print(f"| {r['config']} | {r['ack_p50_ms']} | {r['ack_p99_ms']} | {r['ack_p50_ms'] / base:.2f}x | {r['appends_per_s']} | {cu} |")


if __name__ == "__main__":
    main()
