"""`mkts import-marketstore`: MarketStore roots written by an independent fixture writer
(marketstore_fixture.py, following the reference byte layout) are imported by the real binary and every
row, type and nanosecond is compared with what MarketStore's reader returns for those files."""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as fl
import pytest

from conftest import Server, mkts_bin
from marketstore_fixture import (
    DAY_NS, HEADER, MarketStoreRoot, index_to_epoch, jan1, time_from_ticks, time_to_index, served_value,
)

OHLCV = [("Open", 0), ("High", 0), ("Low", 0), ("Close", 0), ("Volume", 1)]
DAILY = [("Close", 2), ("Volume", 3)]
TRADE = [("Price", 2), ("Size", 0)]
QUOTE = [("Exch", 14), ("Bid", 0), ("Lvl", 11), ("Flags", 5)]
MISC = [("a", 9), ("b", 10), ("c", 12), ("d", 13), ("e", 6), ("s", 14)]


def run_import(src: Path, cfg: Path, *extra, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([mkts_bin(), "import-marketstore", str(src), "--config", str(cfg), *extra],
                          capture_output=True, text=True, timeout=timeout)


def write_cfg(path: Path, dest: Path, extra: str = "") -> Path:
    path.write_text(f"root_directory: {dest}\nlisten_host: 127.0.0.1\n" + extra)
    return path


def build_rich(root: Path, compressed=True, torn=True, wal=True):
    """Several years, fixed 1Min/1D with holes, ticks with many rows per interval and exact nanos, U16 and
    every other type, a WAL with un-applied groups after a checkpointed one, and a torn tail."""
    rnd = random.Random(7)
    ms = MarketStoreRoot(root, compressed=compressed)
    rows = []
    for y in (2019, 2020, 2021):
        t = jan1(y) + 60 * 5
        for i in range(300):
            rows.append((t, (1.0 + i, 2.5 + i, 0.5 + i / 3, 1.1 + i / 7, i * 10 - 50)))
            t += 60 * rnd.randint(1, 9)  # holes between slots
        rows.append((jan1(y + 1) - 60, (9.0, 9.5, 8.5, 9.25, 7)))  # last slot of the year
    ms.write_fixed("AAPL/1Min/OHLCV", OHLCV, rows)
    days = [jan1(2020), jan1(2020) + 86400, jan1(2020) + 59 * 86400, jan1(2021) - 86400, jan1(2021) + 3 * 86400]
    ms.write_fixed("AAPL/1D/OHLCV", DAILY, [(d, (100.0 + i * 0.125, 10**12 + i)) for i, d in enumerate(days)])
    ticks = []
    for y in (2020, 2021):
        for m in (0, 1, 7, 600):
            base = jan1(y) + 3600 + 60 * m
            for k in range(40):
                ns = rnd.choice([0, 1, 999_999_999, rnd.randrange(10**9)])
                ticks.append((base + rnd.randrange(60), ns, (100 + k * 0.01, float(k))))
    ms.write_variable("BTC/1Min/TRADE", TRADE, ticks)
    sec_ticks = [(jan1(2020) + 10, rnd.randrange(10**9), (1.5 + i, 2.0)) for i in range(30)]
    ms.write_variable("ETH/1Sec/TICK", TRADE, sec_ticks)
    quotes = [(jan1(2021) + 120, i * 1000, (["NYSE", "NASDAQ", "ÄÖÜ-exchange-long-name", ""][i % 4], 1.25 * i, 65535 - i, -i))
              for i in range(20)]
    ms.write_variable("XYZ/1Min/QUOTE", QUOTE, quotes)
    ms.write_fixed("XYZ/1H/MISC", MISC, [(jan1(2020) + 3600 * (3 * i), (-i, 255 - i, 2**32 - 1 - i, 2**64 - 1 - i, i % 2 == 0, f"s{i}é"))
                                         for i in range(10)])
    ms.flush()
    wal_rows = {}
    if wal:
        w = ms.wal()
        # tg 100 is checkpointed: MarketStore drops it on replay (its data is taken to be in the files).
        dropped = jan1(2021) + 60 * 100_000
        w.commit(100, [w.fixed_write("AAPL/1Min/OHLCV", dropped, (-1.0, -1.0, -1.0, -1.0, -1))])
        w.checkpoint(100)
        # tg 101: a WAL-only fixed row and an overwrite of an existing one.
        new_fixed = jan1(2021) + 60 * 200_000
        overwrite = rows[-2][0]
        w.commit(101, [w.fixed_write("AAPL/1Min/OHLCV", new_fixed, (5.0, 6.0, 4.0, 5.5, 42)),
                       w.fixed_write("AAPL/1Min/OHLCV", overwrite, (7.0, 8.0, 6.0, 7.5, 43))])
        # tg 102: ticks merged into an existing interval, and a new interval.
        existing = jan1(2020) + 3600 + 60
        merged = [(existing + 5, 123, (555.0, 1.0)), (existing + 59, 999_999_999, (556.0, 2.0))]
        fresh = [(jan1(2021) + 7200, 0, (557.0, 3.0)), (jan1(2021) + 7200, 500, (558.0, 4.0))]
        w.commit(102, [w.variable_write("BTC/1Min/TRADE", merged), w.variable_write("BTC/1Min/TRADE", fresh)])
        q = [(jan1(2021) + 86400, 7, ("WAL", 9.5, 7, 1))]
        w.commit(103, [w.variable_write("XYZ/1Min/QUOTE", q)])
        good_len = len(w.buf)
        tail = w.group(104, [w.fixed_write("AAPL/1Min/OHLCV", jan1(2021) + 60 * 300_000, (1.0, 1.0, 1.0, 1.0, 1))])[:30] if torn else b""
        w.save(tail)
        wal_rows = {"dropped": dropped, "new_fixed": new_fixed, "overwrite": overwrite, "merged": merged, "fresh": fresh,
                    "quote": q, "good_len": good_len, "wal_path": w.path}
    return ms, wal_rows


def tick_served(ms, key, rows):
    b = ms.buckets[key]
    out = []
    for epoch, nanos, vals in rows:
        y, idx, rec = ms.tick_record(b, epoch, nanos, vals)
        sec, ns = time_from_ticks(index_to_epoch(idx, b.tf_ns, y), DAY_NS // b.tf_ns, struct.unpack("<I", rec[-4:])[0])
        out.append((sec, ns, *ms.unpack(b, rec[:-4])))
    return out


def expected(ms, wal) -> dict[str, list]:
    exp = {k: ms.served(k) for k in ms.buckets}
    if wal:
        b = ms.buckets["AAPL/1Min/OHLCV"]
        d = {r[0]: r for r in exp["AAPL/1Min/OHLCV"]}
        for e, vals in ((wal["new_fixed"], (5.0, 6.0, 4.0, 5.5, 42)), (wal["overwrite"], (7.0, 8.0, 6.0, 7.5, 43))):
            start = index_to_epoch(time_to_index(e, b.tf_ns), b.tf_ns, 2021)
            d[start] = (start, *[served_value(c, v) for (_, c), v in zip(b.columns, vals)])
        exp["AAPL/1Min/OHLCV"] = [d[k] for k in sorted(d)]
        exp["BTC/1Min/TRADE"] += tick_served(ms, "BTC/1Min/TRADE", wal["merged"] + wal["fresh"])
        exp["XYZ/1Min/QUOTE"] += tick_served(ms, "XYZ/1Min/QUOTE", wal["quote"])
    return exp


def read_bucket(srv: Server, key: str, variable: bool):
    c = fl.FlightClient(srv.flight_url)
    t = c.do_get(fl.Ticket(json.dumps({"sql": f'SELECT * FROM "{key}"'}))).read_all()
    cols = t.column_names
    t = t.set_column(0, "Epoch", pc.cast(t.column("Epoch"), pa.int64()))
    names = ["Epoch"] + (["Nanoseconds"] if variable else []) + [n for n in cols if n not in ("Epoch", "Nanoseconds")]
    rows = [tuple(r[n] for n in names) for r in t.to_pylist()]
    return t.schema, rows


def norm(rows):
    return sorted(rows, key=lambda r: tuple((str(type(v)), v) for v in r))


def check_all(tmp_path, dest, exp, ms):
    (tmp_path / "srv").mkdir(exist_ok=True)
    srv = Server(tmp_path / "srv", root=dest)
    srv.start()
    try:
        for key, rows in exp.items():
            schema, got = read_bucket(srv, key, ms.buckets[key].variable)
            assert len(got) == len(rows), key
            assert norm(got) == norm(rows), key
            b = ms.buckets[key]
            want = {0: pa.float32(), 1: pa.int32(), 2: pa.float64(), 3: pa.int64(), 5: pa.int8(), 6: pa.bool_(), 9: pa.int16(),
                    10: pa.uint8(), 11: pa.uint16(), 12: pa.uint32(), 13: pa.uint64(), 14: pa.string()}
            for name, code in b.columns:
                assert schema.field(name).type == want[code], (key, name)
            assert ("Nanoseconds" in schema.names) == b.variable, key
    finally:
        srv.stop()


def test_import_every_row_type_nanosecond_wal_torn_tail_and_rerun(tmp_path):
    src, dest = tmp_path / "mktsdb", tmp_path / "dest"
    ms, wal = build_rich(src)
    # A truncated fixed file: 3 whole slots and half a record; the rest of the root still imports.
    bad = ms.bucket("BAD/1Min/OHLCV", OHLCV, False)
    ms.write_fixed("BAD/1Min/OHLCV", OHLCV, [(jan1(2020) + 60 * i, (1.0, 2.0, 3.0, 4.0, i)) for i in range(3)])
    ms.flush()
    bad_path = src / "BAD/1Min/OHLCV/2020.bin"
    with open(bad_path, "r+b") as f:
        f.truncate(HEADER + 3 * bad.record_length + 10)
    cfg = write_cfg(tmp_path / "mkts.yml", dest)
    exp = expected(ms, wal)

    r = run_import(src, cfg)
    assert r.returncode != 0, r.stdout + r.stderr
    assert f"{wal['wal_path']} at byte {wal['good_len']}: torn WAL tail" in r.stderr, r.stderr
    assert f"{bad_path} at byte {HEADER + 3 * bad.record_length}: truncated" in r.stderr, r.stderr
    assert "panicked" not in r.stderr
    assert "bucket" in r.stdout and "total:" in r.stdout
    for key in exp:
        assert key in r.stdout
    # The dropped (checkpointed) group is not imported; the WAL-only rows are (checked in check_all).
    assert ms.buckets["AAPL/1Min/OHLCV"]

    v1 = run_import(src, cfg, "--verify")
    assert "DIFFERS" not in v1.stdout, v1.stdout
    r2 = run_import(src, cfg)
    assert r2.returncode != 0 and "torn WAL tail" in r2.stderr
    v2 = run_import(src, cfg, "--verify")
    assert "DIFFERS" not in v2.stdout and v2.stdout.count(" ok") == v1.stdout.count(" ok") == len(exp), v2.stdout

    check_all(tmp_path, dest, exp, ms)
    epochs = {r[0] for r in exp["AAPL/1Min/OHLCV"]}
    assert wal["dropped"] not in epochs and wal["new_fixed"] in epochs
    # 1D: Jan 1 is never served by MarketStore (index 0 lands in the header), Jan 2 is.
    d = {r[0] for r in exp["AAPL/1D/OHLCV"]}
    assert jan1(2020) not in d and jan1(2020) + 86400 in d


def test_verify_passes_then_fails_on_one_flipped_byte(tmp_path):
    src, dest = tmp_path / "mktsdb", tmp_path / "dest"
    ms, _ = build_rich(src, wal=False)
    cfg = write_cfg(tmp_path / "mkts.yml", dest)
    r = run_import(src, cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    v = run_import(src, cfg, "--verify")
    assert v.returncode == 0 and "every bucket matches" in v.stdout, v.stdout + v.stderr
    # Flip one byte of the Close of one stored record.
    b = ms.buckets["AAPL/1Min/OHLCV"]
    (y, idx) = sorted(k for k in b.slots if k[0] == 2020)[10]
    off = HEADER + (idx - 1) * b.record_length + 8 + 12
    p = src / "AAPL/1Min/OHLCV/2020.bin"
    data = bytearray(p.read_bytes())
    data[off] ^= 0x01
    p.write_bytes(bytes(data))
    v = run_import(src, cfg, "--verify")
    assert v.returncode != 0
    line = next(l for l in v.stdout.splitlines() if l.startswith("AAPL/1Min/OHLCV"))
    assert "DIFFERS: Close" in line, v.stdout
    assert all(" ok" in l for l in v.stdout.splitlines()[1:] if l and not l.startswith("AAPL/1Min/OHLCV")), v.stdout


def test_uncompressed_root_needs_the_setting(tmp_path):
    src, dest = tmp_path / "mktsdb", tmp_path / "dest"
    ms, wal = build_rich(src, compressed=False, torn=False)
    refused = run_import(src, write_cfg(tmp_path / "plain.yml", tmp_path / "dest0"))
    assert refused.returncode != 0
    assert "refused" in refused.stderr and "disable_variable_compression: true" in refused.stderr, refused.stderr
    cfg = write_cfg(tmp_path / "mkts.yml", dest, "disable_variable_compression: true\n")
    r = run_import(src, cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    check_all(tmp_path, dest, expected(ms, wal), ms)


def test_kill9_during_import_then_rerun_gives_full_data(tmp_path):
    src, dest = tmp_path / "mktsdb", tmp_path / "dest"
    ms = MarketStoreRoot(src)
    rnd = random.Random(3)
    for s in ("A", "B", "C"):
        t0 = jan1(2020)
        ms.write_fixed(f"{s}/1Min/OHLCV", OHLCV, [(t0 + 60 * i, (1.0 * i, 2.0, 3.0, 4.0, i)) for i in range(0, 400_000, 2)])
    ms.write_variable("T/1Min/TRADE", TRADE, [(jan1(2020) + i // 7, rnd.randrange(10**9), (float(i), 1.0)) for i in range(300_000)])
    ms.flush()
    cfg = write_cfg(tmp_path / "mkts.yml", dest)
    p = subprocess.Popen([mkts_bin(), "import-marketstore", str(src), "--config", str(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Kill as soon as the first bucket is being written (a fixed delay after start-up raced a fast import).
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (dest / "A").exists():
        time.sleep(0.002)
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_import(src, cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    v = run_import(src, cfg, "--verify")
    assert v.returncode == 0 and "every bucket matches" in v.stdout, v.stdout + v.stderr
    assert killed, "the import finished before the kill; the data is complete but the kill was not exercised"


def test_bad_source_is_a_clear_error(tmp_path):
    r = subprocess.run([mkts_bin(), "import-marketstore", str(tmp_path / "nope"), "--config",
                        str(write_cfg(tmp_path / "mkts.yml", tmp_path / "d"))], capture_output=True, text=True)
    assert r.returncode != 0 and "not a MarketStore data directory" in r.stderr and "panicked" not in r.stderr
    src = tmp_path / "src"
    ms = MarketStoreRoot(src)
    ms.write_fixed("Q/1Min/OHLCV", OHLCV, [(jan1(2020) + 60, (1.0, 1.0, 1.0, 1.0, 1))])
    ms.flush()
    hdr = src / "Q/1Min/OHLCV/2020.bin"
    data = bytearray(hdr.read_bytes())
    struct.pack_into("<q", data, 288, 5000)  # element count
    hdr.write_bytes(bytes(data))
    r = run_import(src, tmp_path / "mkts.yml")
    assert r.returncode != 0 and f"{hdr} at byte 288: bad header" in r.stderr and "panicked" not in r.stderr, r.stderr


def test_import_over_flight_url(tmp_path):
    src = tmp_path / "mktsdb"
    ms, wal = build_rich(src, torn=False)
    (tmp_path / "srv").mkdir()
    srv = Server(tmp_path / "srv", root=tmp_path / "dest")
    srv.start()
    try:
        url = srv.flight_url
        cmd = [mkts_bin(), "import-marketstore", str(src), "--url", url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        # A partial/extra tick year (as a killed import leaves it) is replaced by the rerun, not added to.
        c = fl.FlightClient(url)
        extra = pa.table({"Epoch": pa.array([jan1(2020) + 5] * 3, pa.int64()), "Price": pa.array([1.0, 2.0, 3.0]),
                          "Size": pa.array([1.0, 1.0, 1.0], pa.float32()), "Nanoseconds": pa.array([1, 2, 3], pa.int32())})
        w, rd = c.do_put(fl.FlightDescriptor.for_path("BTC/1Min/TRADE"), extra.schema)
        w.write_table(extra)
        w.done_writing()
        rd.read()
        w.close()
        bad = subprocess.run(cmd + ["--verify"], capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0 and "DIFFERS" in bad.stdout, bad.stdout
        r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        v = subprocess.run(cmd + ["--verify"], capture_output=True, text=True, timeout=600)
        assert v.returncode == 0 and "every bucket matches" in v.stdout, v.stdout + v.stderr
        for key, rows in expected(ms, wal).items():
            _, got = read_bucket(srv, key, ms.buckets[key].variable)
            assert norm(got) == norm(rows), key
        # The HTTP port (found by asking, for a bare host:port) speaks JSON-RPC, which cannot delete rows: refused.
        r = subprocess.run([mkts_bin(), "import-marketstore", str(src), "--url", f"127.0.0.1:{srv.http_port}"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and "speaks JSON-RPC" in r.stderr and "grpc://host:5995" in r.stderr, r.stderr
    finally:
        srv.stop()
