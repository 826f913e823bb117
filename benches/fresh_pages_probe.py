#!/usr/bin/env python3
"""What a durable bulk write costs this machine's page cache: fresh pages vs pages just freed.

Writes N files of 16.8 MB (a symbol-year of the peer benchmark's columns) with one `write` + `fdatasync` each,
deletes them and writes them again, in repetitions: immediately after the delete, and after a pause. On a VM
whose guest reports free pages to the host (`dmesg | grep "Free page reporting"`, Firecracker's
`page_reporting`), memory freed for a few seconds goes back to the host and the next first touch of each page
costs a host fault: a write into the page cache is then several times slower than into pages the guest just
freed. Any store writing new bytes pays it (mkts, ArcticDB's LMDB, the benchmark's floors), so bulk timings
on such a host depend on what the page cache did just before.

    python benches/fresh_pages_probe.py [--dir /tmp] [--files 10] [--pause 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def write_all(d: str, data: list[bytes]) -> float:
    t0 = time.perf_counter()
    for i, b in enumerate(data):
        fd = os.open(os.path.join(d, f"s{i}.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b)
        os.fdatasync(fd)
        os.close(fd)
    return (time.perf_counter() - t0) * 1e3


def delete_all(d: str, n: int):
    for i in range(n):
        os.unlink(os.path.join(d, f"s{i}.bin"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--pause", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    data = [rng.random(2_102_400).tobytes() for _ in range(args.files)]  # 16.8 MB each
    mb = sum(len(b) for b in data) / 1e6
    d = tempfile.mkdtemp(dir=args.dir, prefix="fresh-pages-")
    try:
        now, paused = [], []
        for _ in range(args.reps):
            time.sleep(args.pause)
            paused.append(write_all(d, data))
            delete_all(d, args.files)
            now.append(write_all(d, data))
            delete_all(d, args.files)
        print(f"{args.files} files, {mb:.0f} MB, write + fdatasync each, {args.reps} repetitions:")
        print(f"  after a {args.pause:.0f} s pause (pages handed back): median {statistics.median(paused):.0f} ms "
              f"({min(paused):.0f}-{max(paused):.0f})")
        print(f"  right after deleting the same amount (pages just freed): median {statistics.median(now):.0f} ms "
              f"({min(now):.0f}-{max(now):.0f})")
    finally:
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


if __name__ == "__main__":
    main()
