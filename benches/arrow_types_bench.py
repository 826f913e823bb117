"""Arrow types benchmark (#13): the cost of the nullable / variable-length engine, measured side by side.

Two servers in one run, the binary before the change (`--old`) and after it (`--new`), each on a fresh data
directory, with the same symbol-year of 1Min bars (525,600 rows, Open/High/Low/Close f32 + Volume i64, as the
peer benchmark's `small` size). Rounds alternate old/new so both see the same machine state:
- `read full`: DoGet of the symbol-year into pandas (`read_all().to_pandas()`);
- `append`: durable 60-row DoPut appends (each acknowledged after its log fsync), p50 per append.
Then on the new binary only, one run:
- a nullable float64 symbol-year (1% nulls, a validity bitmap on disk) vs the same column without nulls;
- a utf8 column of 20-byte strings (offsets + data files, read zero-copy) vs a float64 column: read time per
  MB of Arrow buffers.

    python benches/arrow_types_bench.py --old /tmp/bench/mkts-old --new /tmp/bench/mkts-new [--rounds 15]

Prints a Markdown table; medians (ms). Compare rows of the same run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from conftest import Server  # noqa: E402

Y2023 = 1_672_531_200
N = 525_600


def start(binary: str) -> Server:
    os.environ["MKTS_BIN"] = binary
    return Server(Path(tempfile.mkdtemp(prefix="mkts-bench-"))).start()


def put(c: fl.FlightClient, key: str, t: pa.Table) -> None:
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), t.schema)
    w.write_table(t)
    w.done_writing()
    r.read()
    w.close()


def bars(n: int, start: int) -> pa.Table:
    rng = np.random.default_rng(7)
    close = (100 + np.cumsum(rng.normal(0, 0.1, n))).astype(np.float32)
    return pa.table({
        "Epoch": pa.array(start + 60 * np.arange(n, dtype=np.int64)),
        "Open": pa.array(close), "High": pa.array(close + 1), "Low": pa.array(close - 1), "Close": pa.array(close),
        "Volume": pa.array(rng.integers(1, 1000, n).astype(np.int64)),
    })


def read_ms(c: fl.FlightClient, key: str, pandas: bool = True) -> float:
    t0 = time.perf_counter()
    t = c.do_get(fl.Ticket(json.dumps({"destination": key}).encode())).read_all()
    if pandas:
        t.to_pandas()
    return (time.perf_counter() - t0) * 1000


def append_p50_us(c: fl.FlightClient, key: str, start: int, count: int = 100) -> float:
    times = []
    for i in range(count):
        t = bars(60, start + i * 3600)
        t0 = time.perf_counter()
        put(c, key, t)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    servers = {"old": start(a.old), "new": start(a.new)}
    try:
        clients = {k: fl.FlightClient(s.flight_url) for k, s in servers.items()}
        for c in clients.values():
            put(c, "AAPL/1Min/OHLCV", bars(N, Y2023))
        reads = {k: [] for k in servers}
        appends = {k: [] for k in servers}
        for r in range(a.rounds):
            for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                reads[k].append(read_ms(clients[k], "AAPL/1Min/OHLCV"))
            for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                appends[k].append(append_p50_us(clients[k], f"APP{r}/1Min/OHLCV", Y2023 + r * 10_000_000, 20))
        print("| op | old binary | new binary | new / old |\n|---|---:|---:|---:|")
        for name, d, unit in (("read full symbol-year -> pandas (ms)", reads, 1), ("durable 60-row append p50 (us)", appends, 1)):
            o, n = statistics.median(d["old"]), statistics.median(d["new"])
            print(f"| {name} | {o:.1f} | {n:.1f} | {n / o:.2f}x |")

        c = clients["new"]
        rng = np.random.default_rng(3)
        vals = rng.normal(100, 1, N)
        ep = pa.array(Y2023 + 60 * np.arange(N, dtype=np.int64))
        mask = rng.random(N) < 0.01
        put(c, "F/1Min/NONNULL", pa.table({"Epoch": ep, "Close": pa.array(vals)}))
        put(c, "F/1Min/NULLABLE", pa.table({"Epoch": ep, "Close": pa.array(vals, mask=mask)}))
        words = np.array([f"{i:020d}" for i in range(N)])
        put(c, "S/1Min/UTF8", pa.table({"Epoch": ep, "Word": pa.array(words, pa.string())}))
        res = {k: [] for k in ("nonnull", "nullable", "utf8_arrow", "f64_arrow")}
        for _ in range(a.rounds):
            res["nonnull"].append(read_ms(c, "F/1Min/NONNULL"))
            res["nullable"].append(read_ms(c, "F/1Min/NULLABLE"))
            res["utf8_arrow"].append(read_ms(c, "S/1Min/UTF8", pandas=False))
            res["f64_arrow"].append(read_ms(c, "F/1Min/NONNULL", pandas=False))
        m = {k: statistics.median(v) for k, v in res.items()}
        print(f"\n| read (new binary) | ms | ratio |\n|---|---:|---:|")
        print(f"| float64 symbol-year, no nulls -> pandas | {m['nonnull']:.1f} | 1.00x |")
        print(f"| float64 symbol-year, 1% nulls (validity bitmap) -> pandas | {m['nullable']:.1f} | {m['nullable'] / m['nonnull']:.2f}x |")
        f64_mb = N * 16 / 1e6  # Epoch + Close
        utf8_mb = N * (8 + 4 + 20) / 1e6  # Epoch + offsets + data
        print(f"| Epoch + float64 -> Arrow ({f64_mb:.1f} MB) | {m['f64_arrow']:.1f} | {m['f64_arrow'] / f64_mb:.2f} ms/MB |")
        print(f"| Epoch + utf8 20-byte strings -> Arrow ({utf8_mb:.1f} MB) | {m['utf8_arrow']:.1f} | {m['utf8_arrow'] / utf8_mb:.2f} ms/MB |")
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()
