"""Import throughput: `mkts import-marketstore` of a 10-symbol x 1-year 1Min MarketStore root (built by the
test suite's independent fixture writer) beside `mkts import` of the same rows as Parquet, in one run.

    python benches/import_marketstore_bench.py --bin ~/.cache/mkts-target-import/release/mkts [--symbols 10]

Both imports write into a fresh data directory in-process (`--config` / `--dir`). Rows/s counts imported
rows; MB/s counts the bytes of the input files (MarketStore: the apparent size of the `.bin` files, which
MarketStore preallocates for the whole year; Parquet: the .parquet files).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from marketstore_fixture import MarketStoreRoot, jan1  # noqa: E402

OHLCV = [("Open", 0), ("High", 0), ("Low", 0), ("Close", 0), ("Volume", 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--symbols", type=int, default=10)
    ap.add_argument("--year", type=int, default=2021)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mkts-import-bench-"))
    try:
        n = (jan1(args.year + 1) - jan1(args.year)) // 60
        epochs = [jan1(args.year) + 60 * i for i in range(n)]
        src = work / "mktsdb"
        ms = MarketStoreRoot(src)
        pq_dir = work / "parquet"
        pq_dir.mkdir()
        syms = [f"S{i:02d}" for i in range(args.symbols)]
        for s in syms:
            o = [100.0 + (i % 1000) * 0.25 for i in range(n)]
            vol = [i % 100_000 for i in range(n)]
            ms.write_fixed(f"{s}/1Min/OHLCV", OHLCV, [(e, (o[i], o[i] + 1, o[i] - 1, o[i] + 0.5, vol[i])) for i, e in enumerate(epochs)])
            t = pa.table({"Epoch": pa.array(epochs, pa.int64()), "Open": pa.array(o, pa.float32()),
                          "High": pa.array([x + 1 for x in o], pa.float32()), "Low": pa.array([x - 1 for x in o], pa.float32()),
                          "Close": pa.array([x + 0.5 for x in o], pa.float32()), "Volume": pa.array(vol, pa.int32())})
            pq.write_table(t, pq_dir / f"{s}.parquet")
        ms.flush()
        rows = n * len(syms)
        ms_bytes = sum(p.stat().st_size for p in src.rglob("*.bin"))
        pq_bytes = sum(p.stat().st_size for p in pq_dir.glob("*.parquet"))

        dest1 = work / "dest-ms"
        cfg = work / "mkts.yml"
        cfg.write_text(f"root_directory: {dest1}\n")
        t0 = time.perf_counter()
        r = subprocess.run([args.bin, "import-marketstore", str(src), "--config", str(cfg)], capture_output=True, text=True)
        t_ms = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"import-marketstore failed: {r.stderr}")
        v = subprocess.run([args.bin, "import-marketstore", str(src), "--config", str(cfg), "--verify"], capture_output=True, text=True)
        if v.returncode != 0:
            sys.exit(f"verify failed: {v.stdout}{v.stderr}")

        dest2 = work / "dest-pq"
        t0 = time.perf_counter()
        for s in syms:
            r = subprocess.run([args.bin, "import", f"{s}/1Min/OHLCV", str(pq_dir / f"{s}.parquet"), "--dir", str(dest2)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"mkts import failed: {r.stderr}")
        t_pq = time.perf_counter() - t0

        print(f"{len(syms)} symbols x {n} 1Min rows = {rows} rows; MarketStore files {ms_bytes / 1e6:.1f} MB, Parquet {pq_bytes / 1e6:.1f} MB")
        print("| import | seconds | rows/s | input MB/s |")
        print("|---|---:|---:|---:|")
        print(f"| mkts import-marketstore (one command, whole root) | {t_ms:.2f} | {rows / t_ms:,.0f} | {ms_bytes / 1e6 / t_ms:,.1f} |")
        print(f"| mkts import x {len(syms)} Parquet files | {t_pq:.2f} | {rows / t_pq:,.0f} | {pq_bytes / 1e6 / t_pq:,.1f} |")
        print(f"ratio import-marketstore / Parquet time: {t_ms / t_pq:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
