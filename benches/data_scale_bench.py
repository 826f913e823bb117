"""Scale in the data (#17): the same reads on 1 symbol x 1 year, 1 symbol x 10 years and 100 symbols x 1 year
of 1Min bars, as cost per row, so a flat column means the cost grows with the rows read and nothing else.

One release server, one fresh data directory per shape, data written through Flight DoPut (one batch per
symbol-year, the bulk path). Per shape, medians of `--reps` runs over Flight with pyarrow:
- `read full`: DoGet of one symbol's whole history -> Arrow table -> pandas;
- `read 1 day`: 1,440 rows in the middle of the history;
- `1Min->1H`: `functions=["candlecandler('1H',Open,High,Low,Close,Sum::Volume)"]` over the whole history;
- `SQL all symbols` (100 symbols only): `SELECT count(*), sum("Volume") FROM "*/1Min/OHLCV"` over every row.

    python benches/data_scale_bench.py --bin ~/.cache/mkts-target-release/release/mkts [--reps 7]
"""
from __future__ import annotations

import argparse
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

Y2015 = 1_420_070_400  # 2015-01-01
YEAR_ROWS = 525_600
CANDLE = "candlecandler('1H',Open,High,Low,Close,Sum::Volume)"


def bars(t0: int, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    close = (100 + np.cumsum(rng.standard_normal(n) * 0.01)).astype(np.float32)
    return pa.table({"Epoch": t0 + 60 * np.arange(n, dtype=np.int64), "Open": close, "High": close + 0.01,
                     "Low": close - 0.01, "Close": close, "Volume": rng.integers(1, 1000, n, dtype=np.int64)})


def timed(fn, reps: int) -> float:
    fn()  # warm-up (maps the partitions)
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return statistics.median(ts)


def run_shape(binary: str, symbols: int, years: int, reps: int) -> dict:
    os.environ["MKTS_BIN"] = binary
    srv = Server(Path(tempfile.mkdtemp(prefix="mkts-scale-")), config_extra="local_socket: off\n").start()
    try:
        c = fl.FlightClient(srv.flight_url)
        t_write = time.perf_counter()
        for s in range(symbols):
            for y in range(years):
                put(c, f"S{s:03d}/1Min/OHLCV", bars(Y2015 + y * YEAR_ROWS * 60, YEAR_ROWS, s * 100 + y))
        t_write = time.perf_counter() - t_write
        rows = years * YEAR_ROWS
        key = "S000/1Min/OHLCV"

        def get(**q):
            return c.do_get(fl.Ticket(json.dumps({"destination": key, **q}).encode())).read_all()

        mid = Y2015 + rows * 60 // 2
        out = {"shape": f"{symbols} x {years}y", "rows": rows * symbols, "write_s": t_write}
        out["read_full"] = (timed(lambda: get().to_pandas(), reps), rows)
        assert get().num_rows == rows
        out["read_day"] = (timed(lambda: get(epoch_start=mid, epoch_end=mid + 86_399).to_pandas(), reps), 1440)
        out["candle"] = (timed(lambda: get(functions=[CANDLE]).to_pandas(), reps), rows)
        if symbols > 1:
            sql = 'SELECT count(*) AS n, sum("Volume") AS v FROM "*/1Min/OHLCV"'
            tk = fl.Ticket(json.dumps({"sql": sql}).encode())
            out["sql_all"] = (timed(lambda: c.do_get(tk).read_all(), reps), rows * symbols)
            assert c.do_get(tk).read_all().column("n")[0].as_py() == rows * symbols
        c.close()
        return out
    finally:
        srv.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    shapes = [run_shape(args.bin, 1, 1, args.reps), run_shape(args.bin, 1, 10, args.reps), run_shape(args.bin, 100, 1, args.reps)]
    base = shapes[0]
    print("| shape | rows stored | write s | read full ms | ns/row | read 1 day ms | 1Min->1H ms | ns/row | SQL all symbols ms | ns/row |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in shapes:
        f, fr = s["read_full"]
        d, _ = s["read_day"]
        k, kr = s["candle"]
        sql = s.get("sql_all")
        sql_cells = f"{sql[0] * 1e3:.1f} | {sql[0] * 1e9 / sql[1]:.2f}" if sql else "- | -"
        print(f"| {s['shape']} | {s['rows']:,} | {s['write_s']:.2f} | {f * 1e3:.1f} | {f * 1e9 / fr:.1f} | {d * 1e3:.2f} | "
              f"{k * 1e3:.1f} | {k * 1e9 / kr:.1f} | {sql_cells} |")
    for s in shapes[1:]:
        print(f"\n{s['shape']} vs {base['shape']}: read full per row {s['read_full'][0] / s['read_full'][1] / (base['read_full'][0] / base['read_full'][1]):.2f}x, "
              f"1 day {s['read_day'][0] / base['read_day'][0]:.2f}x, 1Min->1H per row {s['candle'][0] / s['candle'][1] / (base['candle'][0] / base['candle'][1]):.2f}x")


if __name__ == "__main__":
    main()
