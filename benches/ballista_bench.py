"""An aggregation over 10 symbol-years on mkts alone vs a Ballista cluster with 1 and 2 executors (#16).

One release server holds 10 symbols x 1 year of 1Min bars (5.26 M rows) twice: `*/1Min/HOT` (last year,
local and mmap'd) and `*/1Min/COLD` (a year sealed long ago, tiered to a `file://` store as Parquet). Then,
medians of `--reps` over ADBC (Flight SQL) for each table:
- `1Min->1H`: `time_bucket('1H')` bars per symbol (first/max/min/last/sum; 87,600 rows out);
- `by symbol`: count / sum / min / max per symbol (10 rows out);
against the server alone, then against `mkts-ballista scheduler` with one executor, then with two (each
executor: 2 task slots). On a 2-core machine the cluster cannot be faster: every process shares the same
cores, and the cluster adds planning on the scheduler, a shuffle and the Flight fetch of hot years.

    ~/.cache/mkts-venv/bin/python benches/ballista_bench.py --bin ~/.cache/mkts-target-release/release/mkts [--reps 5]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as fl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from conftest import Server  # noqa: E402
from test_ballista import Cluster, query  # noqa: E402
from test_flight_core import put  # noqa: E402
from tiering_bench import bars, year_start  # noqa: E402  (same data as the tiering benchmark)

YEAR_ROWS = 525_600
SYMBOLS = [f"S{i:02d}" for i in range(10)]


def statements(group: str) -> dict[str, str]:
    return {
        "1Min->1H": (f'SELECT "Symbol", time_bucket(\'1H\', "Epoch") AS h, first_value("Open" ORDER BY "Epoch") AS o, '
                     f'max("High") AS hi, min("Low") AS lo, last_value("Close" ORDER BY "Epoch") AS c, sum("Volume") AS v '
                     f'FROM "*/1Min/{group}" GROUP BY 1, 2 ORDER BY 1, 2'),
        "by symbol": (f'SELECT "Symbol", count(*) AS n, sum("Volume") AS v, min("Low") AS lo, max("High") AS hi '
                      f'FROM "*/1Min/{group}" GROUP BY 1 ORDER BY 1'),
    }


def timed(url: str, text: str, reps: int) -> tuple[float, pa.Table]:
    out = query(url, text)  # warm-up
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        out = query(url, text)
        ts.append(time.perf_counter() - s)
    return statistics.median(ts) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    os.environ["MKTS_BIN"] = a.bin
    work = Path(tempfile.mkdtemp(prefix="mkts-ballista-bench-"))
    now = dt.datetime.now(dt.timezone.utc).year
    (work / "server").mkdir()
    srv = Server(work / "server", config_extra=f"local_socket: off\ntiering:\n  store: file://{work / 'cold'}\n  after: 1y\n").start()
    cluster = Cluster(work, srv.config_path)
    try:
        c = fl.FlightClient(srv.flight_url)
        for i, s in enumerate(SYMBOLS):
            put(c, f"{s}/1Min/HOT", bars(year_start(now - 1), YEAR_ROWS, i))
            put(c, f"{s}/1Min/COLD", bars(year_start(now - 3), YEAR_ROWS, i))
        srv.stop()  # the COLD year moves at the final checkpoint
        srv.start()
        cluster.start_scheduler()
        cluster.start_executor("executor1")
        time.sleep(3)  # first heartbeat
        results: dict[tuple[str, str], dict[str, float]] = {}
        answers: dict[tuple[str, str], pa.Table] = {}
        setups = [("mkts alone", srv.flight_url), ("cluster, 1 executor", cluster.url)]
        for label, url in setups:
            for group in ("HOT", "COLD"):
                for op, text in statements(group).items():
                    ms, out = timed(url, text, a.reps)
                    results.setdefault((group, op), {})[label] = ms
                    ref = answers.setdefault((group, op), out)
                    assert out.to_pylist() == ref.to_pylist(), (label, group, op)
        cluster.start_executor("executor2")
        time.sleep(3)
        for group in ("HOT", "COLD"):
            for op, text in statements(group).items():
                ms, out = timed(cluster.url, text, a.reps)
                results[(group, op)]["cluster, 2 executors"] = ms
                assert out.to_pylist() == answers[(group, op)].to_pylist(), ("2 executors", group, op)
        labels = ["mkts alone", "cluster, 1 executor", "cluster, 2 executors"]
        print(f"10 symbol-years ({10 * YEAR_ROWS:,} rows) per table; medians of {a.reps} (ms)")
        print("| table | op | " + " | ".join(labels) + " | 1 exec / alone | 2 exec / 1 exec |")
        print("|---|---|" + "---:|" * (len(labels) + 2))
        for (group, op), r in results.items():
            cells = " | ".join(f"{r[l]:.0f}" for l in labels)
            print(f"| {group.lower()} | {op} | {cells} | {r[labels[1]] / r[labels[0]]:.2f}x | {r[labels[2]] / r[labels[1]]:.2f}x |")
    finally:
        cluster.stop()
        srv.stop()


if __name__ == "__main__":
    main()
