#!/usr/bin/env python3
"""Same-host read vs ArcticDB's local read of one symbol-year, with and without touching every value.

A mapped DataFrame is lazy: its pages are read when used. This puts both reads on the same footing by
also timing read + a sum over every column. Needs a server holding SYM000/1Min/OHLCV (run
benches/local_read_bench.py first, against the same server) and the bench venv (arcticdb):

    ~/.cache/mkts-bench-venv/bin/python benches/local_read_touch.py grpc://127.0.0.1:5995
"""
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import arcticdb as adb  # noqa: E402

import mkts_local  # noqa: E402

KEY = "SYM000/1Min/OHLCV"


def median_ms(f, n=9):
    f(), f()
    runs = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        runs.append((time.perf_counter() - s) * 1e3)
    return statistics.median(runs)


def touch(df):
    return float(sum(df[c].to_numpy().sum() for c in ["Open", "High", "Low", "Close", "Volume"]))


def main(url):
    c = mkts_local.Client.discover(url)
    lib = adb.Arctic(f"lmdb://{tempfile.mkdtemp()}").get_library("b", create_if_missing=True)
    lib.write("SYM000", c.read_pandas(KEY))
    assert touch(c.read_pandas(KEY)) == touch(lib.read("SYM000").data)
    for name, f in [("local read", lambda: c.read_pandas(KEY)),
                    ("arcticdb read", lambda: lib.read("SYM000").data),
                    ("local read + sum of every column", lambda: touch(c.read_pandas(KEY))),
                    ("arcticdb read + sum of every column", lambda: touch(lib.read("SYM000").data))]:
        print(f"{name:40s} {median_ms(f):8.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "grpc://127.0.0.1:5995")
