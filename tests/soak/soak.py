#!/usr/bin/env python3
"""Soak (issue #10): a real `mkts` (release by default) with ondiskagg, under 4 writers (Flight DoPut appends to
distinct buckets; every acknowledged row recorded), 4 readers (Flight do_get, pymarketstore over /rpc and
gRPC) and 10 subscribers (Flight `{"subscribe": ...}` tickets and `/ws` clients; one never reads) for
`--duration` seconds. Reports throughput, p50/p99 latency per operation, the server's RSS sampled every
`--rss-every` seconds, and errors; then checks every acknowledged row is present exactly once with its value
(before and after a restart) and that ondiskagg's 1H bars add up to the 1Min volume.

Exits non-zero on any error, a lost or duplicated row, or RSS growth after warm-up past the bound: the
post-warm-up maximum above the post-warm-up minimum by more than max(--rss-growth-mb, --rss-growth-pct %)
of the minimum. The bound applies to anonymous memory (RssAnon: heap, queues) by default, since the server
maps its column files and file-backed pages (RssFile) grow with the data written and are reclaimable; total
VmRSS is reported too (`--rss-metric total` gates on it).

Not collected by pytest (no test_ prefix). Example (the long configuration):

    python tests/soak/soak.py --bin $CARGO_TARGET_DIR/release/mkts --duration 600 --report docs/soak-report.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import defaultdict
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore as pymkts
import websocket

REPO = Path(__file__).resolve().parents[2]
T0 = 1_577_836_800  # 2020-01-01

CONFIG = """triggers:
  - module: ondiskagg
    on: "*/1Min/OHLCV"
    config:
      destinations: [5Min, 1H, 1D]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary: str, workdir: Path):
        self.binary, self.workdir = binary, workdir
        self.root = workdir / "data"
        self.http, self.grpc = free_port(), free_port()
        self.cfg = workdir / "mkts.yml"
        self.cfg.write_text(f"root_directory: {self.root}\nlisten_host: 127.0.0.1\nlisten_port: {self.http}\n"
                            f"grpc_listen_port: {self.grpc}\nlog_level: info\n" + CONFIG)
        self.log_path = workdir / "server.log"
        self.proc = None

    def start(self, timeout=120.0):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "start", "--config", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mkts exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/heartbeat", timeout=1) as r:
                    if r.status == 200:
                        return
            except Exception:  # noqa: BLE001
                time.sleep(0.05)
        raise RuntimeError("mkts not ready")

    def stop(self, timeout=120.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds to exit). Killed (-9) when it has not exited after `timeout`."""
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout), time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9, time.perf_counter() - t0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mem(self) -> dict:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
        return out

    @property
    def flight(self):
        return f"grpc://127.0.0.1:{self.grpc}"


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.lat = defaultdict(list)
        self.count = defaultdict(int)
        self.errors: list[str] = []
        self.notes: list[str] = []

    def record(self, op, secs, n=1):
        with self.lock:
            self.lat[op].append(secs)
            self.count[op] += n

    def error(self, who, e):
        with self.lock:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {who}: {type(e).__name__}: {e}"[:800])

    def note(self, s):
        with self.lock:
            self.notes.append(f"{time.strftime('%H:%M:%S')} {s}")


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def put(c, key, table):
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), table.schema)
    w.write_table(table)
    w.done_writing()
    acks = []
    while True:
        try:
            buf = r.read()
        except StopIteration:
            break
        if buf is None:
            break
        acks.append(json.loads(buf.to_pybytes()))
    w.close()
    return acks


def writer(i, srv, stop, stats, acked, batch):
    """Appends `batch` 1Min bars per DoPut to W{i}; Volume = a unique row number, Open = its low 24 bits."""
    key = f"W{i}/1Min/OHLCV"
    c = fl.FlightClient(srv.flight)
    row = 0
    while not stop.is_set():
        ep = T0 + 60 * (row + np.arange(batch, dtype=np.int64))
        vol = (i << 40) + row + np.arange(batch, dtype=np.int64)
        px = (vol & 0xFFFFFF).astype(np.float32)
        t = pa.table({"Epoch": ep, "Open": px, "High": px + 1, "Low": px - 1, "Close": px, "Volume": vol})
        t0 = time.perf_counter()
        try:
            acks = put(c, key, t)
            if acks != [{"rows": batch}]:
                raise RuntimeError(f"unexpected ack {acks}")
        except Exception as e:  # noqa: BLE001
            stats.error(f"writer {i}", e)
            time.sleep(0.5)
            c = fl.FlightClient(srv.flight)
            continue
        stats.record("write (Flight DoPut)", time.perf_counter() - t0, batch)
        acked[i] = row + batch  # rows [0, acked[i]) are acknowledged, in order
        row += batch


def reader(i, srv, stop, stats, acked):
    rng = np.random.default_rng(i)
    kind = ["flight", "flight", "rpc", "grpc"][i % 4]
    c = fl.FlightClient(srv.flight) if kind == "flight" else (
        pymkts.Client(f"http://127.0.0.1:{srv.http}/rpc") if kind == "rpc" else pymkts.Client(grpc=True, endpoint=f"127.0.0.1:{srv.grpc}"))
    name = {"flight": "read 1 day (Flight do_get)", "rpc": "read 1 day (pymarketstore /rpc)", "grpc": "read 1 day (pymarketstore gRPC)"}[kind]
    while not stop.is_set():
        w = int(rng.integers(0, 4))
        n = acked[w]
        if n < 1440:
            time.sleep(0.05)
            continue
        start_row = int(rng.integers(0, n - 1440 + 1))
        s, e = T0 + 60 * start_row, T0 + 60 * (start_row + 1439)
        t0 = time.perf_counter()
        try:
            if kind == "flight":
                t = c.do_get(fl.Ticket(json.dumps({"destination": f"W{w}/1Min/OHLCV", "epoch_start": s, "epoch_end": e}).encode())).read_all()
                got = t.column("Volume").to_numpy()
            else:
                got = c.query(pymkts.Params(f"W{w}", "1Min", "OHLCV", start=s, end=e)).first().array["Volume"]
            stats.record(name, time.perf_counter() - t0)
            want = (w << 40) + start_row + np.arange(1440, dtype=np.int64)
            if len(got) != 1440 or not np.array_equal(np.asarray(got), want):
                raise AssertionError(f"W{w} rows {start_row}..+1440: got {len(got)} rows, not the acknowledged values")
        except Exception as e:  # noqa: BLE001
            stats.error(f"reader {i} ({kind})", e)
            time.sleep(0.5)


def flight_subscriber(i, srv, stop, stats, counts, idle):
    pattern = "*/1Min/OHLCV" if i % 2 == 0 else f"W{i % 4}/1Min/OHLCV"
    c = fl.FlightClient(srv.flight)
    try:
        r = c.do_get(fl.Ticket(json.dumps({"subscribe": pattern}).encode()))
        if idle:
            stop.wait()
            r.cancel()
            return
        for chunk in r:
            counts[f"flight sub {i}"] += chunk.data.num_rows
            if stop.is_set():
                r.cancel()
                return
        if not stop.is_set():
            raise RuntimeError("the subscription stream ended")
    except Exception as e:  # noqa: BLE001
        if not stop.is_set():
            stats.error(f"flight subscriber {i}", e)


def ws_subscriber(i, srv, stop, stats, counts, idle):
    streams = ["*/1Min/*"] if i % 2 == 0 else [f"W{i % 4}/*/*"]
    try:
        ws = websocket.create_connection(f"ws://127.0.0.1:{srv.http}/ws", timeout=30)
        ws.send(msgpack.packb({"streams": streams}), opcode=websocket.ABNF.OPCODE_BINARY)
        msgpack.unpackb(ws.recv())  # echo
        if idle:
            stop.wait()
            # Was it dropped? A closed socket answers the next recv with an error or a close frame.
            try:
                ws.settimeout(2)
                while True:
                    op, _ = ws.recv_data(control_frame=True)
                    if op == websocket.ABNF.OPCODE_CLOSE:
                        stats.note(f"the never-reading /ws subscriber {i} was closed by the server")
                        break
            except Exception as e:  # noqa: BLE001
                stats.note(f"the never-reading /ws subscriber {i}: {type(e).__name__} when read at the end")
            return
        ws.settimeout(5)
        while not stop.is_set():
            try:
                msg = msgpack.unpackb(ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            counts[f"ws sub {i}"] += 1
            if "key" not in msg:
                raise RuntimeError(f"unexpected frame {msg!r}"[:200])
        ws.close()
    except Exception as e:  # noqa: BLE001
        if not stop.is_set():
            stats.error(f"/ws subscriber {i}", e)


def read_all(srv, key) -> pa.Table:
    return fl.FlightClient(srv.flight).do_get(fl.Ticket(json.dumps({"destination": key}).encode())).read_all()


def verify(srv, acked, stats, when):
    """Every acknowledged row exactly once with its value; returns the rows checked."""
    total = 0
    for i in range(4):
        t = read_all(srv, f"W{i}/1Min/OHLCV")
        ep = t.column("Epoch").cast(pa.int64()).to_numpy()
        vol = t.column("Volume").to_numpy()
        n = acked[i]
        want_ep = T0 + 60 * np.arange(n, dtype=np.int64)
        if len(ep) != n or not np.array_equal(ep, want_ep) or not np.array_equal(vol, (i << 40) + np.arange(n, dtype=np.int64)):
            dup = len(ep) - len(np.unique(ep))
            missing = len(np.setdiff1d(want_ep, ep))
            extra = len(np.setdiff1d(ep, want_ep))
            stats.error(f"verify {when}", AssertionError(f"W{i}: {len(ep)} rows stored, {n} acknowledged: {missing} missing, {extra} extra, {dup} duplicated"))
        total += len(ep)
    return total


def check_ondiskagg(srv, stats, timeout=60):
    """ondiskagg's 1H bars sum to the 1Min volume of every writer bucket (once it has caught up)."""
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        ok = True
        for i in range(4):
            m = int(pa.compute.sum(read_all(srv, f"W{i}/1Min/OHLCV").column("Volume")).as_py() or 0)
            try:
                h = int(pa.compute.sum(read_all(srv, f"W{i}/1H/OHLCV").column("Volume")).as_py() or 0)
            except Exception as e:  # noqa: BLE001
                h, last = -1, str(e)
            if m != h:
                ok, last = False, f"W{i}: 1H volume {h} != 1Min volume {m}"
        if ok:
            return
        time.sleep(2)
    stats.error("ondiskagg", AssertionError(last))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", str(REPO / "target")), "release", "mkts"))
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--batch", type=int, default=60, help="rows per DoPut (1Min bars)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the RSS bound applies (default 10%% of the duration, at least 20 s)")
    ap.add_argument("--rss-every", type=float, default=5)
    ap.add_argument("--rss-growth-mb", type=float, default=100)
    ap.add_argument("--rss-growth-pct", type=float, default=20)
    ap.add_argument("--rss-metric", choices=["anon", "total"], default="anon")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--report", default=None, help="also write the Markdown report here")
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else max(20.0, args.duration / 10)
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="mkts-soak-"))
    wd.mkdir(parents=True, exist_ok=True)
    srv = Server(args.bin, wd)
    srv.start()
    stats = Stats()
    stop = threading.Event()
    acked = [0, 0, 0, 0]
    counts: dict = defaultdict(int)
    threads = []
    subs_stop = threading.Event()
    for i in range(10):  # subscribers first, so they see the writes from the start
        idle = i == 9
        fn = flight_subscriber if i % 2 == 0 else ws_subscriber
        threads.append(threading.Thread(target=fn, args=(i, srv, subs_stop, stats, counts, idle), daemon=True))
    for i in range(4):
        threads.append(threading.Thread(target=writer, args=(i, srv, stop, stats, acked, args.batch), daemon=True))
        threads.append(threading.Thread(target=reader, args=(i, srv, stop, stats, acked), daemon=True))
    mem = []
    t_start = time.time()
    for t in threads:
        t.start()
    while time.time() - t_start < args.duration:
        time.sleep(min(args.rss_every, max(0.0, args.duration - (time.time() - t_start))))
        m = srv.mem()
        m["t"] = time.time() - t_start
        m["rows"] = sum(acked)
        mem.append(m)
        print(f"t={m['t']:6.0f}s rows={m['rows']:,} RSS={m['VmRSS']:.0f} MB anon={m['RssAnon']:.0f} MB file={m['RssFile']:.0f} MB errors={len(stats.errors)}", flush=True)
    stop.set()
    elapsed = time.time() - t_start
    for t in threads[10:]:
        t.join(30)
    subs_stop.set()
    for t in threads[:10]:
        t.join(10)
    # The heartbeat and /metrics at the end.
    hb = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{srv.http}/heartbeat", timeout=10).read())
    if hb.get("health") != "ok":
        stats.error("heartbeat", AssertionError(hb))
    try:
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.http}/metrics", timeout=10).read().decode()
        drop_lines = [l for l in metrics.splitlines() if "drop" in l and not l.startswith("#")]
    except Exception as e:  # noqa: BLE001
        drop_lines = [f"/metrics failed: {e}"]
    rows = verify(srv, acked, stats, "before restart")
    check_ondiskagg(srv, stats)
    rc, stop_s = srv.stop()
    if rc != 0:
        stats.error("stop", RuntimeError(f"mkts exited {rc} {stop_s:.0f} s after SIGTERM (-9: it had not stopped, killed)"))
    stats.note(f"SIGTERM to exit: {stop_s:.1f} s (exit code {rc})")
    t0 = time.perf_counter()
    srv.start()
    restart_s = time.perf_counter() - t0
    verify(srv, acked, stats, "after restart")
    srv.stop()  # nothing connected now
    log = srv.log()
    for line in log.splitlines():
        if " ERROR " in line or "panicked" in line:
            stats.error("server log", RuntimeError(line[:300]))
        elif "WARN" in line and ("drop" in line or "slow" in line or "subscriber" in line):
            stats.note("server: " + line[:300])

    # RSS bound.
    key = "RssAnon" if args.rss_metric == "anon" else "VmRSS"
    post = [m for m in mem if m["t"] >= warmup]
    rss_fail = None
    if post:
        lo = min(m[key] for m in post)
        hi = max(m[key] for m in post[[m[key] for m in post].index(lo):])
        bound = max(args.rss_growth_mb, lo * args.rss_growth_pct / 100)
        if hi - lo > bound:
            rss_fail = f"{key} grew {hi - lo:.0f} MB after warm-up (from {lo:.0f} to {hi:.0f} MB; bound {bound:.0f} MB)"
            stats.error("rss", AssertionError(rss_fail))

    report = render(args, srv, elapsed, stats, counts, mem, warmup, rows, restart_s, hb, drop_lines, acked)
    print(report)
    if args.report:
        Path(args.report).write_text(report)
    sys.exit(1 if stats.errors else 0)


def render(args, srv, elapsed, stats, counts, mem, warmup, rows, restart_s, hb, drop_lines, acked) -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    ver = subprocess.run([args.bin, "--version"], capture_output=True, text=True).stdout.strip()
    L = [
        "# Soak report",
        "",
        f"Command: `python tests/soak/soak.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, "
        f"{platform.platform()}; binary `{args.bin}` ({ver}); Python {platform.python_version()}, pyarrow {pa.__version__}. "
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The machine's 2 cores were shared with other "
        "builds and tests while this ran.",
        "",
        "Load: 4 writers (Flight DoPut appends of "
        f"{args.batch} 1Min bars to W0..W3/1Min/OHLCV), 4 readers (2 Flight do_get, 1 pymarketstore /rpc, 1 pymarketstore "
        "gRPC; one day = 1,440 rows of a random writer bucket, values checked), 10 subscribers (5 Flight "
        "`{\"subscribe\"}` tickets, 5 `/ws`; `/ws` subscriber 9 never reads), ondiskagg to 5Min/1H/1D.",
        "",
        f"## Result: {'PASS' if not stats.errors else 'FAIL'}",
        "",
        f"- duration {elapsed:.0f} s; errors: **{len(stats.errors)}**",
        f"- rows written and acknowledged: {sum(acked):,} ({sum(acked) / elapsed:,.0f} rows/s, "
        f"{stats.count['write (Flight DoPut)'] and len(stats.lat['write (Flight DoPut)']) / elapsed:,.1f} DoPuts/s)",
        f"- rows verified present exactly once with their values: {rows:,} of {sum(acked):,}, before and after a restart "
        f"(restart to ready: {restart_s:.2f} s); ondiskagg 1H volume = 1Min volume for every bucket"
        + (" (see errors)" if any("ondiskagg" in e for e in stats.errors) else ""),
        f"- /heartbeat at the end: health={hb.get('health')} writable={hb.get('writable')} damaged={hb.get('damaged')}",
        "",
        "| operation | count | per second | p50 (ms) | p99 (ms) | max (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for op, xs in sorted(stats.lat.items()):
        L.append(f"| {op} | {len(xs):,} | {len(xs) / elapsed:,.1f} | {pct(xs, 50) * 1e3:.2f} | {pct(xs, 99) * 1e3:.2f} | {max(xs) * 1e3:.1f} |")
    L += ["", "Subscribers (rows or frames received): " + ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items())), ""]
    if drop_lines:
        L += ["/metrics lines about drops at the end:", "", "```", *drop_lines[:20], "```", ""]
    L += [f"## RSS of the server (MB), every {args.rss_every:g} s; warm-up {warmup:.0f} s; bound on "
          f"{'RssAnon' if args.rss_metric == 'anon' else 'VmRSS'}: max({args.rss_growth_mb:g} MB, {args.rss_growth_pct:g}%)", "",
          "| t (s) | rows acknowledged | VmRSS | RssAnon | RssFile |", "|---:|---:|---:|---:|---:|"]
    step = max(1, len(mem) // 40)
    for m in mem[::step] + ([mem[-1]] if mem and (len(mem) - 1) % step else []):
        L.append(f"| {m['t']:.0f} | {m['rows']:,} | {m['VmRSS']:.0f} | {m['RssAnon']:.0f} | {m['RssFile']:.0f} |")
    post = [m for m in mem if m["t"] >= warmup]
    if post:
        L += ["", f"After warm-up: RssAnon {min(m['RssAnon'] for m in post):.0f}..{max(m['RssAnon'] for m in post):.0f} MB, "
              f"VmRSS {min(m['VmRSS'] for m in post):.0f}..{max(m['VmRSS'] for m in post):.0f} MB (peak VmHWM {mem[-1].get('VmHWM', float('nan')):.0f} MB)."]
    L += ["", "## Notes", ""] + [f"- {n}" for n in stats.notes] + (["- none"] if not stats.notes else [])
    L += ["", "## Errors", ""] + [f"- {e}" for e in stats.errors[:50]] + (["- none"] if not stats.errors else [])
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
