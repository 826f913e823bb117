#!/usr/bin/env python3
"""Scale: many buckets in one root (issue #10). For each size (default 10, 10,000, 100,000 buckets, one small
year each: one day of 1Min OHLCV bars), build a root through the real server (parallel Flight DoPuts), stop it
cleanly, then measure with the given (release) binary:

- start-up time to ready: from spawn until `/heartbeat` answers 200: the first start after the build (reads
  every bucket's files, writes the catalog snapshot), then `--starts` starts from the snapshot;
- RSS of the server after start and after a ListFlights;
- ListFlights latency (median of `--lists` calls);
- one-bucket query latency: Flight do_get of one day of one bucket: the first read of each of `--hot` random
  buckets, then median and p99 of `--queries` reads over those buckets (the same count at every size, so the
  sizes differ only in the catalog), then `--queries` reads of random buckets of the whole root;
- the ratio of the query latency at the largest size vs the smallest, from this one run.

    CARGO_TARGET_DIR=... cargo build --release --bin mkts
    python benches/scale_bench.py --bin $CARGO_TARGET_DIR/release/mkts --out benches/scale.md

Aims (issue #10): start-up with 100,000 buckets under 2 s; query latency with 100,000 buckets within 1.2x of
a 10-bucket root. `--strace` also runs one start-up of each size under `strace -c -f` and appends the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

DAY0 = 1_704_067_200 + 86400 * 100  # 2024-04-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Srv:
    def __init__(self, binary: str, workdir: Path, root: Path, strace: Path | None = None):
        self.binary, self.workdir, self.root = binary, workdir, root
        self.http, self.grpc = free_port(), free_port()
        self.cfg = workdir / "mkts.yml"
        self.cfg.write_text(f"root_directory: {root}\nlisten_host: 127.0.0.1\nlisten_port: {self.http}\n"
                            f"grpc_listen_port: {self.grpc}\nlog_level: warn\n")
        self.strace = strace
        self.proc = None

    def start(self, timeout=600.0) -> float:
        cmd = [self.binary, "start", "--config", str(self.cfg)]
        if self.strace:
            cmd = ["strace", "-c", "-f", "-o", str(self.strace)] + cmd
        log = open(self.workdir / "server.log", "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        url = f"http://127.0.0.1:{self.http}/heartbeat"
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mkts exited {self.proc.returncode}: {(self.workdir / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except Exception:  # noqa: BLE001
                time.sleep(0.005)
        raise RuntimeError("not ready")

    def pid(self) -> int:
        if not self.strace:
            return self.proc.pid
        # strace's child: the mkts process.
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else self.proc.pid

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(300)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def url(self):
        return f"grpc://127.0.0.1:{self.grpc}"


ROWS = 390  # one trading day of 1Min bars (09:30-16:00); --rows changes it


def day_table(seed: int) -> pa.Table:
    n = ROWS
    rng = np.random.default_rng(seed)
    px = (100 + rng.standard_normal(n).cumsum()).astype(np.float32)
    return pa.table({
        "Epoch": pa.array(DAY0 + 34_200 + 60 * np.arange(n, dtype=np.int64)),
        "Open": px, "High": px + 1, "Low": px - 1, "Close": px,
        "Volume": pa.array(rng.integers(1, 1000, n, dtype=np.int64)),
    })


def key(i: int) -> str:
    return f"S{i:06d}/1Min/OHLCV"


def build(binary: str, workdir: Path, root: Path, n: int, threads: int) -> float:
    srv = Srv(binary, workdir, root)
    srv.start()
    tables = [day_table(s) for s in range(16)]
    t0 = time.perf_counter()
    chunks = [range(i, n, threads) for i in range(threads)]

    def work(idx):
        c = fl.FlightClient(srv.url)
        for i in idx:
            t = tables[i % len(tables)]
            w, r = c.do_put(fl.FlightDescriptor.for_path(key(i)), t.schema)
            w.write_table(t)
            w.done_writing()
            w.close()

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, chunks))
    took = time.perf_counter() - t0
    srv.stop()
    return took


def build_clone(binary: str, workdir: Path, root: Path, n: int) -> float:
    """One bucket written through the server (then stopped cleanly) is the template; its files are copied
    to every other key with `bucket.json` naming that key. Writing 100,000 buckets through the server costs
    several fsyncs each, hours on a busy shared disk; the files are byte for byte what the server writes."""
    t0 = time.perf_counter()
    tw = workdir / "template"
    shutil.rmtree(tw, ignore_errors=True)
    tw.mkdir()
    srv = Srv(binary, tw, tw / "data")
    srv.start()
    c = fl.FlightClient(srv.url)
    t = day_table(0)
    w, _ = c.do_put(fl.FlightDescriptor.for_path(key(0)), t.schema)
    w.write_table(t)
    w.done_writing()
    w.close()
    srv.stop()
    src = tw / "data" / "S000000" / "1Min" / "OHLCV"
    files = [(p.relative_to(src), p.read_bytes()) for p in sorted(src.rglob("*")) if p.is_file()]
    dirs = sorted({rel.parent for rel, _ in files if str(rel.parent) != "."})
    meta = json.loads((src / "bucket.json").read_bytes())
    assert meta.get("key") == key(0), meta
    shutil.copytree(tw / "data", root, ignore=lambda d, names: [x for x in names if x.startswith("S0")])
    for i in range(n):
        d = root / f"S{i:06d}" / "1Min" / "OHLCV"
        for sub in dirs:
            (d / sub).mkdir(parents=True, exist_ok=True)
        for rel, data in files:
            if rel.name == "bucket.json":
                data = json.dumps(dict(meta, key=key(i)), indent=2).encode()
            (d / rel).write_bytes(data)
    return time.perf_counter() - t0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def measure(binary: str, workdir: Path, root: Path, n: int, args) -> dict:
    res: dict = {"buckets": n}
    # The first start after the root was built reads every bucket's files (no catalog snapshot yet, or one
    # that describes other directories) and writes the snapshot; later starts read the snapshot.
    srv = Srv(binary, workdir, root)
    res["startup_first_s"] = srv.start()
    srv.stop()
    starts = []
    for _ in range(args.starts):
        srv = Srv(binary, workdir, root)
        starts.append(srv.start())
        res.setdefault("rss_after_start_mb", srv.rss_mb())
        if _ < args.starts - 1:
            srv.stop()
    res["startup_s"] = starts
    c = fl.FlightClient(srv.url)
    lists = []
    for _ in range(args.lists):
        t0 = time.perf_counter()
        got = sum(1 for _ in c.list_flights())
        lists.append(time.perf_counter() - t0)
        assert got == n, (got, n)
    res["listflights_s"] = statistics.median(lists)
    res["rss_after_list_mb"] = srv.rss_mb()
    rng = random.Random(1)
    tick = lambda i: fl.Ticket(json.dumps({"destination": key(i), "epoch_start": DAY0, "epoch_end": DAY0 + 86399}).encode())

    def timed(i):
        t0 = time.perf_counter()
        t = c.do_get(tick(i)).read_all()
        took = time.perf_counter() - t0
        assert t.num_rows == ROWS, t.num_rows
        return took

    # The same number of distinct buckets at every size: their first reads (map the partition, fault its
    # pages) and then repeated reads of them, so the sizes differ only in how many buckets the catalog holds.
    hot = rng.sample(range(n), min(args.hot, n))
    res["first_read_p50_ms"] = statistics.median(timed(i) for i in hot) * 1e3
    for _ in range(20):  # warm up the connection and the code paths
        timed(rng.choice(hot))
    q = [timed(rng.choice(hot)) for _ in range(args.queries)]
    res["query_p50_ms"] = statistics.median(q) * 1e3
    res["query_p99_ms"] = pct(q, 99) * 1e3
    # Random buckets of the whole root: at 10 buckets all mapped after a few reads, at 100,000 mostly first reads.
    r = [timed(rng.randrange(n)) for _ in range(args.queries)]
    res["random_p50_ms"] = statistics.median(r) * 1e3
    res["rss_after_queries_mb"] = srv.rss_mb()
    srv.stop()
    if args.strace and shutil.which("strace"):
        out = workdir / f"strace-{n}.txt"
        s = Srv(binary, workdir, root, strace=out)
        res["startup_under_strace_s"] = s.start()
        s.stop()
        res["strace"] = out.read_text()
    return res


def main():
    global ROWS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "mkts"))
    ap.add_argument("--sizes", default="10,10000,100000")
    ap.add_argument("--threads", type=int, default=8, help="parallel DoPut clients (--setup flight)")
    ap.add_argument("--setup", choices=["clone", "flight"], default="clone",
                    help="clone: one bucket through the server, copied to every key (default); flight: every bucket by DoPut")
    ap.add_argument("--rows", type=int, default=390, help="1Min bars per bucket (one day)")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--lists", type=int, default=3)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--hot", type=int, default=10, help="distinct buckets read repeatedly at every size")
    ap.add_argument("--workdir", default=None, help="where the roots go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the roots")
    ap.add_argument("--reuse", action="store_true", help="reuse roots already built in --workdir")
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--out", default=None, help="write a Markdown report here")
    args = ap.parse_args()
    ROWS = args.rows
    base = Path(args.workdir or tempfile.mkdtemp(prefix="mkts-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            wd = base / f"b{n}"
            wd.mkdir(exist_ok=True)
            root = wd / "data"
            r: dict = {}
            if not (args.reuse and root.exists()):
                shutil.rmtree(root, ignore_errors=True)
                r["setup_s"] = (build(args.bin, wd, root, n, args.threads) if args.setup == "flight"
                                else build_clone(args.bin, wd, root, n))
            du = subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True).stdout.split()[0]
            r.update(measure(args.bin, wd, root, n, args))
            r["disk_mb"] = int(du)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "strace"}), flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    lo, hi = results[0], results[-1]
    ratio = hi["query_p50_ms"] / lo["query_p50_ms"]
    hi_start = statistics.median(hi["startup_s"])
    print(f"query p50 ratio {hi['buckets']} vs {lo['buckets']}: {ratio:.2f}; start-up with {hi['buckets']}: {hi_start:.2f} s")
    if args.out:
        write_md(Path(args.out), args, results, ratio, hi_start)


def write_md(path: Path, args, results, ratio, hi_start):
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    lines = [
        "# Scale: many buckets in one root",
        "",
        f"Command: `python benches/scale_bench.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}; binary `{args.bin}` (release). "
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The machine was shared with other builds "
        "and tests while this ran, so absolute figures are noisy; the ratios come from one run.",
        "",
        f"Each bucket: one day of 1Min OHLCV bars ({args.rows:,} rows) in 2024. "
        + ("Setup: one bucket written by Flight DoPut through the real server (stopped cleanly), its files copied "
           "to every other key with bucket.json naming it (writing 100,000 buckets through the server costs several "
           "fsyncs each: hours on this shared disk). " if args.setup == "clone" else
           f"Setup: parallel Flight DoPuts ({args.threads} clients) through the real server, stopped cleanly. ")
        + "Start-up = spawn until "
        "`/heartbeat` answers 200: first start after the build (no usable catalog snapshot: every bucket's files "
        "are read, then the snapshot is written), then each later start (from the snapshot). "
        f"Query = Flight do_get of that one day: the first read of each of {args.hot} random buckets (partition "
        f"not mapped yet), then {args.queries} reads spread over those {args.hot} buckets (p50/p99), then "
        f"{args.queries} reads of random buckets of the whole root.",
        "",
        "| buckets | setup (s) | disk (MB) | first start (s) | start-up with snapshot (s), each run | RSS after start (MB) | ListFlights (s) | RSS after list (MB) | first read p50 (ms) | query p50 (ms) | query p99 (ms) | random bucket p50 (ms) |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['buckets']:,} | {r.get('setup_s', float('nan')):.1f} | {r['disk_mb']:,} | {r['startup_first_s']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['startup_s'])} | {r['rss_after_start_mb']:.0f} | "
                     f"{r['listflights_s']:.3f} | {r['rss_after_list_mb']:.0f} | {r['first_read_p50_ms']:.2f} | "
                     f"{r['query_p50_ms']:.2f} | {r['query_p99_ms']:.2f} | {r['random_p50_ms']:.2f} |")
    lo, hi = results[0], results[-1]
    lines += [
        "",
        f"- Query latency ratio, {hi['buckets']:,} vs {lo['buckets']:,} buckets (p50): **{ratio:.2f}x** "
        f"(aim: within 1.2x) — {'met' if ratio <= 1.2 else 'NOT met'}. First reads: "
        f"{hi['first_read_p50_ms'] / lo['first_read_p50_ms']:.2f}x; random buckets: {hi['random_p50_ms'] / lo['random_p50_ms']:.2f}x.",
        f"- Start-up with {hi['buckets']:,} buckets (median): **{hi_start:.2f} s** (aim: under 2 s) — "
        f"{'met' if hi_start < 2 else 'NOT met'}.",
    ]
    for r in results:
        if r.get("strace"):
            lines += ["", f"## `strace -c -f` of one start-up with {r['buckets']:,} buckets "
                      f"(ready after {r['startup_under_strace_s']:.2f} s under strace)", "", "```",
                      "\n".join(r["strace"].splitlines()[:30]), "```"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
