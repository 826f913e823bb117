"""`mkts tool integrity` and `mkts estimate` (MarketStore's `integritycheck` and `estimate` equivalents).

A data root is built by the real server (writes over pyarrow.flight, then a clean stop); the CLI checks it,
then single files are damaged (a flipped byte, a truncation, a deleted manifest) and the report must name the
damaged file and exit non-zero.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as fl
import pytest

from conftest import mkts_bin
from test_flight_core import put

Y2024 = 1_704_067_200  # 2024-01-01T00:00:00Z


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([mkts_bin(), *map(str, args)], capture_output=True, text=True, timeout=300)


def integrity(root: Path, *extra) -> subprocess.CompletedProcess:
    return cli("tool", "integrity", root, *extra)


@pytest.fixture
def root(server_factory, tmp_path) -> Path:
    """A stopped data root: a fixed 1Min bucket with nullable float and string columns holding nulls, a 1D
    bucket of float32 over two years, and a tick bucket with nanoseconds; copied so tests may damage it."""
    srv = server_factory()
    c = fl.FlightClient(srv.flight_url)
    put(c, "AAPL/1Min/OHLCV", pa.table({
        "Epoch": pa.array([Y2024, Y2024 + 60, Y2024 + 120], pa.int64()),
        "Open": pa.array([1.0, None, 3.0]),
        "Note": pa.array(["a", None, "ccc"]),
    }))
    put(c, "MSFT/1D/OHLCV", pa.table({
        "Epoch": pa.array([Y2024 - 86400, Y2024, Y2024 + 86400], pa.int64()),
        "Close": pa.array([0.5, 1.5, 2.5], pa.float32()),
    }))
    put(c, "BTC/1Sec/TICK", pa.table({
        "Epoch": pa.array([Y2024 + 5, Y2024 + 5, Y2024 + 7], pa.int64()),
        "Price": pa.array([10.0, 11.0, 12.0]),
        "Nanoseconds": pa.array([1, 999_999_999, 0], pa.int32()),
    }))
    assert srv.stop() == 0
    dst = tmp_path / "copy"
    shutil.copytree(srv.root, dst)
    return dst


def summary(root: Path, verdict: str, rows: int = 9, files: int = 13) -> str:
    return (f"checked {root}: 3 buckets, 4 year partitions, {rows} rows, {files} column files, "
            f"0 log records in 1 segments: {verdict}\n")


def gen(root: Path, key: str, year: int) -> Path:
    return root / key / str(year) / "g0"


def test_intact_root_is_reported_intact(root):
    r = integrity(root)
    assert r.returncode == 0, r.stderr
    assert r.stdout == summary(root, "intact")
    # MarketStore's `--dir` spelling and JSON output.
    j = cli("tool", "integrity", "--dir", root, "--json")
    assert j.returncode == 0, j.stderr
    rep = json.loads(j.stdout)
    assert (rep["buckets"], rep["partitions"], rep["rows"], rep["column_files"]) == (3, 4, 9, 13)
    assert rep["damage"] == [] and rep["notes"] == []


def test_not_a_data_directory_and_a_running_server_are_refused(tmp_path, server_factory):
    r = integrity(tmp_path / "nope")
    assert r.returncode != 0 and "nope" in r.stderr
    (tmp_path / "empty").mkdir()
    r = integrity(tmp_path / "empty")
    assert r.returncode != 0 and "is not an mkts data directory" in r.stderr
    srv = server_factory()
    r = integrity(srv.root)
    assert r.returncode != 0 and "in use by another mkts process" in r.stderr


def assert_damaged(root: Path, path: Path, what: str, rows: int = 9, files: int = 13):
    r = integrity(root)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"DAMAGED {path}: "), r.stdout
    assert what in lines[0], lines[0]
    assert r.stdout.endswith(summary(root, "1 damaged", rows, files))
    assert f"{root} is damaged (1 problems)" in r.stderr


def flip(path: Path, offset: int, mask: int = 0x80):
    b = bytearray(path.read_bytes())
    b[offset] ^= mask
    path.write_bytes(bytes(b))


def test_flipped_epoch_byte(root):
    # The high byte of row 1's Epoch: the row leaves its year.
    p = gen(root, "AAPL/1Min/OHLCV", 2024) / "c000.i64"
    flip(p, 8 + 7, 0x01)
    assert_damaged(root, p, f"row 1: Epoch {(Y2024 + 60) ^ (1 << 56)} is outside the year 2024")


def test_epoch_not_at_interval_start_and_out_of_order(root):
    p = gen(root, "MSFT/1D/OHLCV", 2024) / "c000.i64"
    flip(p, 0, 0x01)  # row 0: Y2024 + 1
    assert_damaged(root, p, f"row 0: Epoch {Y2024 + 1} is not the start of its 1D interval")


def test_flipped_nanoseconds_byte(root):
    p = gen(root, "BTC/1Sec/TICK", 2024) / "c001.i32"
    flip(p, 4 + 3, 0x40)  # row 1: 999_999_999 + 2^30
    assert_damaged(root, p, f"row 1: Nanoseconds {999_999_999 + (1 << 30)} is outside 0..1e9")


def test_truncated_value_file(root):
    p = gen(root, "AAPL/1Min/OHLCV", 2024) / "c001.f64"
    p.write_bytes(p.read_bytes()[:16])
    assert_damaged(root, p, "holds 16 bytes, manifest says 3 rows (3 rows of 8 bytes)")


def test_truncated_validity_bitmap(root):
    p = gen(root, "AAPL/1Min/OHLCV", 2024) / "c001.valid"
    p.write_bytes(b"")
    assert_damaged(root, p, "validity bitmap holds 0 bytes, 3 rows need 1")


def test_offsets_decreasing_or_past_the_data(root):
    offs = [f for f in gen(root, "AAPL/1Min/OHLCV", 2024).iterdir() if f.name.startswith("c002.") and f.name.endswith(".off")]
    assert len(offs) == 1
    p = offs[0]
    # Offsets of "a", null, "ccc": 0, 1, 1, 4 (int32 little-endian).
    assert p.read_bytes()[:16] == b"".join(o.to_bytes(4, "little") for o in (0, 1, 1, 4))
    flip(p, 8, 0x01)  # offset 2: 1 -> 0
    r = integrity(root)
    assert r.returncode == 1
    assert r.stdout.splitlines()[0] == f"DAMAGED {p}: offset 2 is 0, after 1: offsets must start at 0 and never decrease"
    flip(p, 8, 0x01)  # restore, then cut the data file below the last offset
    d = gen(root, "AAPL/1Min/OHLCV", 2024) / "c002.data"
    d.write_bytes(d.read_bytes()[:2])
    assert_damaged(root, d, "holds 2 bytes, the last offset is 4")


def test_deleted_manifest(root):
    m = root / "MSFT/1D/OHLCV/2023/manifest.json"
    m.unlink()
    # The partition's rows and files are not counted: nothing says what they are.
    assert_damaged(root, m, "unreadable manifest: No such file or directory", rows=8, files=11)


def test_manifest_newer_format_and_validity_on_a_non_nullable_column(root):
    m = root / "MSFT/1D/OHLCV/2024/manifest.json"
    doc = json.loads(m.read_text())
    doc["format"] = 99
    m.write_text(json.dumps(doc))
    assert_damaged(root, m, "partition format 99 is newer than this build reads", rows=7, files=11)
    doc["format"] = 2
    doc["validity"] = [0]
    m.write_text(json.dumps(doc))
    assert_damaged(root, m, "validity bitmap listed for column 0, which is not nullable", rows=7, files=11)


def test_bucket_json_of_another_key(root):
    b = root / "MSFT/1D/OHLCV/bucket.json"
    doc = json.loads(b.read_text())
    doc["key"] = "IBM/1D/OHLCV"
    b.write_text(json.dumps(doc))
    assert_damaged(root, b, "names bucket IBM/1D/OHLCV, but sits in MSFT/1D/OHLCV")


def test_damaged_catalog_snapshot_is_a_note(root):
    snap = root / ".catalog"
    flip(snap, snap.stat().st_size // 2)
    r = integrity(root)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"note    {snap}: catalog snapshot is damaged or of an older format; start-up reads the files instead\n"
                        + summary(root, "intact"))


def test_flipped_log_record_byte(server_factory, tmp_path):
    """A killed server leaves its writes in the log: a flipped byte in the first of two records is damage
    (valid records follow it); in the last one it is a torn tail, which start-up cuts (a note)."""
    srv = server_factory()
    c = fl.FlightClient(srv.flight_url)
    for i in range(2):
        put(c, "AAPL/1Min/OHLCV", pa.table({"Epoch": pa.array([Y2024 + 60 * i], pa.int64()), "Open": pa.array([1.0 + i])}))
    srv.kill()
    seg = sorted((srv.root / ".wal").glob("*.log"))[-1]
    first = tmp_path / "first"
    shutil.copytree(srv.root, first)
    r = integrity(first)
    assert r.returncode == 0, r.stderr
    records = json.loads(cli("tool", "integrity", first, "--json").stdout)["log_records"]
    assert records >= 2
    size = len(seg.read_bytes().rstrip(b"\0"))  # the records' end; the log zero-fills the segment after it
    fseg = first / ".wal" / seg.name
    flip(fseg, 40)  # inside the first record (the segment begins with it)
    r = integrity(first)
    assert r.returncode == 1
    assert r.stdout.startswith(f"DAMAGED {fseg}: unreadable log bytes 0..")
    last = tmp_path / "last"
    shutil.copytree(srv.root, last)
    lseg = last / ".wal" / seg.name
    flip(lseg, size - 2)
    r = integrity(last)
    assert r.returncode == 0, r.stdout
    assert r.stdout.startswith(f"note    {lseg}: torn tail (")


# ---- mkts estimate (MarketStore's cmd/estimate formula, computed here independently) ----


def marketstore_estimate(symbols, years, per_day, c4=0, c8=5, days=261, hours=6.5) -> float:
    rec = 8 + 4 * c4 + 8 * c8
    rec += rec % 8  # MarketStore "pads" by adding the remainder
    return (37024 + rec * per_day * days * (hours / 24.0)) * symbols * years


def human(b: float) -> str:
    for i, unit in enumerate(["KB", "MB", "GB", "TB", "PB", "EB"]):
        size = 10 ** (3 * (i + 1))
        if b < size * 10000:
            return f"{b / size:.0f}{unit}"
    raise AssertionError


def test_estimate_defaults():
    r = cli("estimate")
    assert r.returncode == 0, r.stderr
    rows = 261 * 6.5 * 60  # 101,790 one-minute rows per symbol-year
    mkts = 1000 * 10 * (rows * 48 + 4096) + 1000 * 4096
    assert r.stdout == (
        f"Estimated space required for 1000 symbols with 10 years of 1Min data: {human(mkts)}\n"
        "  101790 rows per symbol-year x 48 bytes per row (Epoch 8 + 0 x 4 + 5 x 8), plus a 4 KiB manifest per "
        "symbol-year and bucket.json per symbol\n"
        f"  MarketStore's estimate for the same flags: {human(marketstore_estimate(1000, 10, 1440))}\n"
    )
    assert human(marketstore_estimate(1000, 10, 1440)) == "49GB"


def test_estimate_flags_as_marketstore_spells_them():
    r = cli("estimate", "-s", "1", "-t", "1Sec", "-y", "1", "--4byteCols", "3", "--8byteCols", "2", "-d", "250", "--hours", "8")
    assert r.returncode == 0, r.stderr
    rows = 250 * 8 * 3600
    row = 8 + 12 + 16
    assert r.stdout == (
        f"Estimated space required for 1 symbol with 1 year of 1Sec data: {human(rows * row + 4096 + 4096)}\n"
        f"  {rows} rows per symbol-year x {row} bytes per row (Epoch 8 + 3 x 4 + 2 x 8), plus a 4 KiB manifest per "
        "symbol-year and bucket.json per symbol\n"
        f"  MarketStore's estimate for the same flags: {human(marketstore_estimate(1, 1, 86400, 3, 2, 250, 8))}\n"
    )
    r = cli("estimate", "-t", "5Min")
    assert r.returncode == 0
    assert r.stdout.splitlines()[1].startswith("  20358 rows per symbol-year")
    assert r.stdout.splitlines()[2] == "  (MarketStore's estimate knows only 1D, 1Min and 1Sec)"
    bad = cli("estimate", "--hours", "25")
    assert bad.returncode != 0 and "--hours must be in 0..=24, got 25" in bad.stderr
