"""Cold (tiered to object storage as Parquet) vs hot (local, mmap'd) year partitions (#16), in one run.

One release server with `tiering: {store: file://…, after: 1y}` and two buckets of one full year of 1Min bars
each (525,600 rows): `COLD/1Min/OHLCV` holds a year sealed long enough to move, `HOT/1Min/OHLCV` holds last
year (it stays local). After a restart the cold year is in the store; then, per bucket, medians of `--reps`:
- `read full`: Flight DoGet of the year -> Arrow table;
- `read 1 day`: 1,440 rows in the middle;
- `1Min->1H`: `functions=["candlecandler('1H',Open,High,Low,Close,Sum::Volume)"]` over the year;
- `SQL 1H`: `SELECT time_bucket('1H', "Epoch"), first_value, max, min, last_value, sum ... GROUP BY 1`.
The first cold read after the restart (footer + column chunks fetched and decoded) is reported apart from
the repeated ones (served from the chunk cache, `tiering.cache_bytes`).

    python benches/tiering_bench.py --bin ~/.cache/mkts-target-release/release/mkts [--reps 9]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from conftest import Server  # noqa: E402
from test_flight_core import put  # noqa: E402

YEAR_ROWS = 525_600
CANDLE = "candlecandler('1H',Open,High,Low,Close,Sum::Volume)"


def year_start(y: int) -> int:
    return int(dt.datetime(y, 1, 1, tzinfo=dt.timezone.utc).timestamp())


def bars(t0: int, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.standard_normal(n) * 0.01)
    return pa.table({"Epoch": t0 + 60 * np.arange(n, dtype=np.int64), "Open": close, "High": close + 0.01,
                     "Low": close - 0.01, "Close": close, "Volume": rng.integers(1, 1000, n, dtype=np.int64)})


def get(c: fl.FlightClient, **q) -> pa.Table:
    return c.do_get(fl.Ticket(json.dumps(q).encode())).read_all()


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args()
    os.environ["MKTS_BIN"] = a.bin
    work = Path(tempfile.mkdtemp(prefix="mkts-tier-bench-"))
    now = dt.datetime.now(dt.timezone.utc).year
    years = {"COLD": now - 3, "HOT": now - 1}
    srv = Server(work, config_extra=f"local_socket: off\ntiering:\n  store: file://{work / 'cold'}\n  after: 1y\n").start()
    try:
        c = fl.FlightClient(srv.flight_url)
        for sym, y in years.items():
            put(c, f"{sym}/1Min/OHLCV", bars(year_start(y), YEAR_ROWS, 7))
        srv.stop()  # the cold year moves at the final checkpoint
        srv.start()
        c = fl.FlightClient(srv.flight_url)
        info = json.loads(list(c.do_action(fl.Action("get_info", json.dumps({"key": "COLD/1Min/OHLCV"}).encode())))[0].body.to_pybytes())
        assert [p["tier"] for p in info["partitions"]] == ["cold"], info
        obj_bytes = info["partitions"][0]["bytes"]
        hot_info = json.loads(list(c.do_action(fl.Action("get_info", json.dumps({"key": "HOT/1Min/OHLCV"}).encode())))[0].body.to_pybytes())
        hot_bytes = hot_info["partitions"][0]["bytes"]
        ops = {
            "read full": lambda sym, y: get(c, destination=f"{sym}/1Min/OHLCV"),
            "read 1 day": lambda sym, y: get(c, destination=f"{sym}/1Min/OHLCV", epoch_start=year_start(y) + 180 * 86400,
                                             epoch_end=year_start(y) + 181 * 86400 - 1),
            "1Min->1H": lambda sym, y: get(c, destination=f"{sym}/1Min/OHLCV", functions=[CANDLE]),
            "SQL 1H": lambda sym, y: get(c, sql=(
                f"SELECT time_bucket('1H', \"Epoch\") AS h, first_value(\"Open\" ORDER BY \"Epoch\") AS o, max(\"High\") AS hi, "
                f"min(\"Low\") AS lo, last_value(\"Close\" ORDER BY \"Epoch\") AS cl, sum(\"Volume\") AS v "
                f"FROM \"{sym}/1Min/OHLCV\" GROUP BY 1 ORDER BY 1")),
        }
        # First cold read after the restart: nothing cached.
        s = time.perf_counter()
        first = ops["read full"]("COLD", years["COLD"])
        first_ms = (time.perf_counter() - s) * 1e3
        assert first.num_rows == YEAR_ROWS
        rows = []
        for name, fn in ops.items():
            ref = {}
            med = {}
            for sym in ("HOT", "COLD"):
                fn(sym, years[sym])  # warm-up (maps / caches)
                med[sym] = timed(lambda: fn(sym, years[sym]), a.reps)
                ref[sym] = fn(sym, years[sym]).num_rows
            assert ref["HOT"] == ref["COLD"], (name, ref)
            rows.append((name, med["HOT"], med["COLD"], ref["HOT"]))
        print(f"cold year: one Parquet object of {obj_bytes:,} bytes (local year: {hot_bytes:,} bytes of column files)")
        print(f"first cold read full (nothing cached): {first_ms:.1f} ms")
        print("| op | hot ms | cold ms | cold/hot | rows |")
        print("|---|---:|---:|---:|---:|")
        for name, h, cd, n in rows:
            print(f"| {name} | {h:.2f} | {cd:.2f} | {cd / h:.2f}x | {n:,} |")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
