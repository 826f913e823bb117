"""1Min -> 1H downsampling of one symbol-year (#17), two mkts binaries side by side and ArcticDB in one run.

Each binary gets its own server with the same 525,600 1Min bars (the peer benchmark's shape: Open, High, Low,
Close, Volume). Rounds alternate between the servers; per round and server, medians of `--reps` of:
- `functions`: Flight DoGet with `functions=["candlecandler('1H',Open,High,Low,Close,Sum::Volume)"]` -> pandas
  (what `server_client.py`'s downsample does, Epoch index included);
- `sql`: the same bars with `time_bucket('1H', "Epoch")`, first/max/min/last/sum over Flight SQL's ticket
  path -> pandas.
ArcticDB (local LMDB, in this process) resamples the same frame with `QueryBuilder.resample('1h')`, as the
peer benchmark's arcticdb peer does, when `--arcticdb` is given (run with the bench venv).

    python benches/downsample_bench.py --bin old=<mkts> --bin new=<mkts> [--reps 15 --rounds 3] [--arcticdb]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as fl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
import conftest  # noqa: E402
from conftest import Server  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiering_bench import timed  # noqa: E402  (median of reps, ms)

YEAR_ROWS = 525_600
T0 = 1_609_459_200  # 2021-01-01
CANDLE = "candlecandler('1H',Open,High,Low,Close,Sum::Volume)"
SQL = ('SELECT time_bucket(\'1H\', "Epoch") AS "Epoch", first_value("Open" ORDER BY "Epoch") AS "Open", '
       'max("High") AS "High", min("Low") AS "Low", last_value("Close" ORDER BY "Epoch") AS "Close", '
       'sum(CAST("Volume" AS DOUBLE)) AS "Volume_SUM" FROM "BENCH/1Min/OHLCV" GROUP BY 1 ORDER BY 1')


def frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    close = 100 + np.cumsum(rng.standard_normal(YEAR_ROWS) * 0.01)
    idx = pd.DatetimeIndex((T0 + 60 * np.arange(YEAR_ROWS, dtype=np.int64)).astype("datetime64[s]").astype("datetime64[ns]"), name="Epoch")
    return pd.DataFrame({"Open": close, "High": close + 0.01, "Low": close - 0.01, "Close": close,
                         "Volume": rng.integers(1, 1000, YEAR_ROWS).astype(np.float64)}, index=idx)


def to_pandas(t: pa.Table) -> pd.DataFrame:
    df = t.to_pandas()
    return df.set_index(pd.DatetimeIndex(df.pop("Epoch"), name="Epoch"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append", required=True, help="label=path")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arcticdb", action="store_true")
    a = ap.parse_args()
    df = frame()
    table = pa.table({"Epoch": pa.array(df.index.values.astype("datetime64[s]").astype(np.int64))} | {c: df[c].to_numpy() for c in df.columns})
    servers = {}
    work = Path(tempfile.mkdtemp(prefix="mkts-downsample-"))
    try:
        for spec in a.bin:
            label, path = spec.split("=", 1)
            conftest.mkts_bin = lambda p=path: p  # each Server starts its own binary
            (work / label).mkdir()
            srv = Server(work / label, config_extra="local_socket: off\n").start()
            c = fl.FlightClient(srv.flight_url)
            w, r = c.do_put(fl.FlightDescriptor.for_path("BENCH/1Min/OHLCV"), table.schema)
            w.write_table(table)
            w.close()
            servers[label] = (srv, c)
        ops = {
            "functions": lambda c: to_pandas(c.do_get(fl.Ticket(json.dumps({"destination": "BENCH/1Min/OHLCV", "functions": [CANDLE]}).encode())).read_all()),
            "sql": lambda c: to_pandas(c.do_get(fl.Ticket(json.dumps({"sql": SQL}).encode())).read_all()),
        }
        ref = None
        for label, (_, c) in servers.items():
            out = ops["functions"](c)
            assert len(out) == 8760, len(out)
            ref = out if ref is None else ref
            pd.testing.assert_frame_equal(out, ref)
            sql_out = ops["sql"](c)
            assert np.allclose(sql_out["Close"].to_numpy(), out["Close"].to_numpy())
        arctic = None
        if a.arcticdb:
            import arcticdb as adb
            lib = adb.Arctic(f"lmdb://{work / 'arctic'}").get_library("bench", create_if_missing=True)
            lib.write("BENCH", df)

            def resample():
                q = adb.QueryBuilder().resample("1h").agg({"Open": "first", "High": "max", "Low": "min", "Close": "last", "Volume": "sum"})
                return lib.read("BENCH", query_builder=q).data
            assert len(resample()) == 8760
            arctic = resample
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(a.rounds):
            for label, (_, c) in servers.items():
                for op, fn in ops.items():
                    fn(c)
                    results.setdefault((label, op), []).append(timed(lambda: fn(c), a.reps))
            if arctic:
                arctic()
                results.setdefault(("arcticdb", "resample"), []).append(timed(arctic, a.reps))
        print(f"1Min->1H of one symbol-year ({YEAR_ROWS:,} rows -> 8,760 bars) into pandas; median of {a.reps}, per round (ms)")
        print("| binary | op | " + " | ".join(f"round {i + 1}" for i in range(a.rounds)) + " | best |")
        print("|---|---|" + "---:|" * (a.rounds + 1))
        for (label, op), ms in results.items():
            print(f"| {label} | {op} | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {min(ms):.2f} |")
    finally:
        for srv, _ in servers.values():
            srv.stop()


if __name__ == "__main__":
    main()
