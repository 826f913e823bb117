"""Fault injection through the real server (issue #10): crashes (SIGKILL), damaged files, a real full disk,
a read-only root, and kill -9 at random points of a mixed workload.

Every test runs the real `mkts start` process (conftest.Server) and real clients (pyarrow.flight,
pymarketstore, requests). The disk tests mount a size-limited tmpfs and are skipped when that is not
possible (not root). `MKTS_KILL_POINTS` sets how many random kill points `test_kill9_at_random_points`
runs (default 8; the long configuration is `MKTS_KILL_POINTS=50`); `MKTS_KILL_SEED` replays one run.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore as pymkts
import pytest
import requests

from conftest import Server, mkts_bin

Y2024 = 1_704_067_200  # 2024-01-01T00:00:00Z
ERR = (pa.ArrowException, fl.FlightError)


# ---- clients ----

def client(srv) -> fl.FlightClient:
    return fl.FlightClient(srv.flight_url)


def put(c, key, table):
    """One DoPut of one batch; returns the acks (raises if the server refuses the write)."""
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), table.schema)
    w.write_table(table)
    w.done_writing()
    acks = []
    while True:
        try:
            buf = r.read()
        except StopIteration:
            break
        if buf is None:
            break
        acks.append(json.loads(buf.to_pybytes()))
    w.close()
    return acks


def get(c, **q) -> pa.Table:
    return c.do_get(fl.Ticket(json.dumps(q).encode())).read_all()


def action(c, name, body):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    res = list(c.do_action(fl.Action(name, body)))
    return json.loads(res[0].body.to_pybytes()) if res else None


def bars(epochs, open_, volume=None) -> pa.Table:
    epochs = np.asarray(epochs, dtype=np.int64)
    open_ = np.broadcast_to(np.asarray(open_, dtype=np.float32), epochs.shape)
    volume = np.arange(len(epochs), dtype=np.int64) if volume is None else np.broadcast_to(np.asarray(volume, dtype=np.int64), epochs.shape)
    return pa.table({"Epoch": pa.array(epochs), "Open": pa.array(open_), "Volume": pa.array(volume)})


def minutes(start, n):
    return start + 60 * np.arange(n, dtype=np.int64)


def read_bucket(c, key) -> tuple[list[int], list[float], list[int]]:
    t = get(c, destination=key)
    return (t.column("Epoch").cast(pa.int64()).to_pylist(), t.column("Open").to_pylist(), t.column("Volume").to_pylist())


def heartbeat(srv) -> dict:
    r = requests.get(f"{srv.http_url}/heartbeat", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def segments(root: Path) -> list[Path]:
    return sorted((root / ".wal").glob("*.log"))


def records_end(data: bytes) -> int:
    """Where a segment's records end: the log zero-fills its segment ahead of the last record, so the file
    is longer (a record's own trailing zero bytes are counted out too; good enough to aim damage at)."""
    return len(data.rstrip(b"\0"))


def assert_no_panic(srv):
    assert "panicked" not in srv.log(), srv.log()[-4000:]


def start_fails(srv, timeout=60.0) -> tuple[int, str]:
    """Run `mkts start` expecting it to exit; return (exit code, its output)."""
    before = len(srv.log())
    try:
        srv.start(timeout=timeout)
    except RuntimeError:
        assert srv.proc.poll() is not None, "the server did not exit"
        return srv.proc.returncode, srv.log()[before:]
    srv.kill()
    raise AssertionError("the server started although it must refuse:\n" + srv.log()[before:])


@pytest.fixture
def srv_at(tmp_path):
    """`make(root=None, extra="")`: a stopped Server (start() it yourself); every one is stopped at teardown."""
    made: list[Server] = []

    def make(root: Path | None = None, extra: str = "") -> Server:
        wd = Path(tempfile.mkdtemp(dir=tmp_path))
        s = Server(wd, extra, root=root)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


# ---- 1a: bulk append then live overwrite, kill -9 within the checkpoint interval ----

def test_bulk_append_then_live_overwrite_survives_kill(srv_at):
    """Defect 1: bars, overwrite the newest (hot partition), bulk-append 40,000 rows (direct path), overwrite
    the newest again, kill -9 before the 10 s checkpoint tick: the server restarts with every value."""
    srv = srv_at().start()
    c = client(srv)
    key = "D1/1Min/OHLCV"
    model: dict[int, tuple[float, int]] = {}

    def w(epochs, open_, vol):
        assert put(c, key, bars(epochs, open_, vol)) == [{"rows": len(epochs)}]
        for e, o, v in zip(np.asarray(epochs).tolist(), np.broadcast_to(open_, len(epochs)).tolist(), np.broadcast_to(vol, len(epochs)).tolist()):
            model[int(e)] = (float(o), int(v))

    w(minutes(Y2024, 3), [1.0, 2.0, 3.0], [10, 20, 30])
    w([Y2024 + 120], [3.5], [35])  # overwrite the newest bar
    bulk = minutes(Y2024 + 180, 40_000)
    w(bulk, np.arange(40_000, dtype=np.float32) + 100, np.arange(40_000, dtype=np.int64) + 1000)
    w([int(bulk[-1])], [-7.25], [-7])  # overwrite the newest again: changes the bulk-appended bytes in place
    srv.kill()
    srv.start()
    ep, op, vol = read_bucket(client(srv), key)
    expect = sorted(model.items())
    assert ep == [e for e, _ in expect]
    assert op == [o for _, (o, _) in expect]
    assert vol == [v for _, (_, v) in expect]
    assert_no_panic(srv)


def test_replayed_then_overwrite_bulk_survives_kill(srv_at):
    """Found by the random kill test (MKTS_KILL_SEED=690852689), replayed here step by step: bars and a bulk
    append, kill -9, restart (replay); overwrite the newest bar, a bulk append (direct path: its record names
    the partition's generation), kill -9: the restart must replay both. It reports 'bulk append record (lsn 8)
    expects generation 1 at row 42857, partition is generation 2 with 42857 rows' and takes the bucket
    offline. With a clean stop instead of the first kill, or without the overwrite, it restarts fine."""
    srv = srv_at().start()
    c = client(srv)
    key = "D2/1Min/OHLCV"
    model: dict[int, tuple[float, int]] = {}

    def w(epochs, o, v):
        epochs = np.asarray(epochs, dtype=np.int64)
        assert put(c, key, bars(epochs, o, v)) == [{"rows": len(epochs)}]
        for e in epochs.tolist():
            model[e] = (float(o), int(v))

    w([Y2024], 1.0, 1)
    w(minutes(Y2024 + 60, 42_835), 2.0, 2)       # bulk
    w(minutes(Y2024 + 60 * 42_836, 3), 3.0, 3)
    w([Y2024 + 60 * 42_838], 4.0, 4)             # overwrite the newest
    w(minutes(Y2024 + 60 * 42_839, 18), 5.0, 5)
    srv.kill()
    srv.start()
    c = client(srv)
    newest = max(model)
    w([newest], 6.0, 6)                          # overwrite the newest
    w(minutes(newest + 60, 42_637), 7.0, 7)      # bulk
    srv.kill()
    srv.start()
    hb = heartbeat(srv)
    assert hb["damaged"] == [], hb
    ep, op, vol = read_bucket(client(srv), key)
    expect = sorted(model.items())
    assert ep == [e for e, _ in expect]
    assert op == [o for _, (o, _) in expect]
    assert vol == [v for _, (_, v) in expect]


# ---- 1b: a flipped bit in the middle of the log; a torn tail ----

def write_200_then_kill(srv, key) -> Path:
    c = client(srv)
    for i in range(200):
        assert put(c, key, bars([Y2024 + 60 * i], [float(i)], [i])) == [{"rows": 1}]
    srv.kill()
    segs = segments(srv.root)
    assert len(segs) == 1, segs
    return segs[0]


def test_flipped_bit_mid_log_refuses_start_then_recover_wal(srv_at):
    """Defect 2: one bit flipped mid-segment: start-up exits non-zero naming `mkts tool recover-wal` and
    changes nothing; the tool reports the dropped span and the quarantine copy; then 199 of 200 rows."""
    srv = srv_at().start()
    key = "F/1Min/OHLCV"
    seg = write_200_then_kill(srv, key)
    data = bytearray(seg.read_bytes())
    data[records_end(data) // 2] ^= 0x10
    seg.write_bytes(bytes(data))

    code, out = start_fails(srv)
    assert code != 0
    assert "mkts tool recover-wal" in out, out
    assert out.count("recover-wal") <= 2, f"one clear message, not a cascade:\n{out}"
    assert "panicked" not in out, out
    assert seg.read_bytes() == bytes(data), "a refused start must not change the segment"

    rec = subprocess.run([mkts_bin(), "tool", "recover-wal", "--root", str(srv.root)], capture_output=True, text=True, timeout=120)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    dropped = [l for l in rec.stdout.splitlines() if l.startswith("dropped unreadable bytes:")]
    kept = [l for l in rec.stdout.splitlines() if l.startswith("damaged segment kept as ")]
    assert len(dropped) == 1 and len(kept) == 1, rec.stdout
    qcopy = Path(kept[0].removeprefix("damaged segment kept as ").strip())
    assert qcopy.exists() and qcopy.read_bytes() == bytes(data), "the quarantine copy is the damaged segment as it was"

    srv.start()
    ep, op, vol = read_bucket(client(srv), key)
    assert len(ep) == 199, "exactly the damaged record is lost"
    assert len(set(ep)) == 199
    # Every surviving row carries its own acknowledged value.
    assert all(o == float((e - Y2024) // 60) and v == (e - Y2024) // 60 for e, o, v in zip(ep, op, vol))
    # And it keeps writing after recovery.
    assert put(client(srv), key, bars([Y2024 + 60 * 1000], [5.0], [5])) == [{"rows": 1}]
    srv.stop()
    srv.start()
    assert len(read_bucket(client(srv), key)[0]) == 200
    assert_no_panic(srv)


def test_torn_tail_is_cut_silently(srv_at):
    """A torn tail (the last record cut short) still starts, keeping the 199 complete records."""
    srv = srv_at().start()
    key = "T/1Min/OHLCV"
    seg = write_200_then_kill(srv, key)
    data = bytearray(seg.read_bytes())
    end = records_end(data)
    assert len(data) > end, "the segment is zero-filled after its records"
    data[end - 5:end] = bytes(5)  # the last record loses its end, inside the zero-filled space
    seg.write_bytes(bytes(data))
    srv.start()
    ep, op, _ = read_bucket(client(srv), key)
    assert ep == [Y2024 + 60 * i for i in range(199)]
    assert op == [float(i) for i in range(199)]
    assert heartbeat(srv)["health"] == "ok"
    assert_no_panic(srv)


# ---- 1c: too many columns ----

def test_too_many_columns_refused_engine_stays_writable(srv_at):
    """Defect 4: a DoPut with 65,600 columns gets a clear error; later writes work, /heartbeat says writable,
    and a restart works."""
    srv = srv_at().start()
    c = client(srv)
    n = 65_600
    cols = {"Epoch": pa.array([Y2024], pa.int64())}
    one = pa.array([1.0], pa.float32())
    for i in range(n):
        cols[f"c{i}"] = one
    wide = pa.table(cols)
    with pytest.raises(ERR) as ei:
        put(c, "W/1Min/OHLCV", wide)
    msg = str(ei.value)
    assert "column" in msg and "at most" in msg, msg
    assert "read-only" not in msg, msg
    c = client(srv)
    assert put(c, "OK/1Min/OHLCV", bars([Y2024], [1.0], [1])) == [{"rows": 1}]
    hb = heartbeat(srv)
    assert hb["writable"] is True and hb["health"] == "ok", hb
    with pytest.raises(ERR):
        get(c, destination="W/1Min/OHLCV")  # nothing of the refused write was stored
    srv.kill()  # crash: the OK write is only in the log
    srv.start()
    c = client(srv)
    assert read_bucket(c, "OK/1Min/OHLCV")[1] == [1.0]
    assert [f.descriptor.path[0].decode() for f in c.list_flights()] == ["OK/1Min/OHLCV"]
    assert put(c, "OK/1Min/OHLCV", bars([Y2024 + 60], [2.0], [2])) == [{"rows": 1}]
    assert_no_panic(srv)


# ---- 1d: a damaged bucket ----

def test_damaged_bucket_isolated_reported_and_restored(srv_at):
    """Defect 5: BAD's bucket.json truncated while its rows are only in the log: /heartbeat is degraded and
    names it; reads say it is damaged (Flight and pymarketstore), writes to it are refused, the others work;
    after the file is restored its rows are back."""
    srv = srv_at().start()
    c = client(srv)
    assert put(c, "BAD/1Min/OHLCV", bars(minutes(Y2024, 5), 1.0, 11)) == [{"rows": 5}]
    assert put(c, "GOOD/1Min/OHLCV", bars(minutes(Y2024, 5), 2.0, 22)) == [{"rows": 5}]
    srv.kill()  # before the checkpoint: the rows are only in the log
    bj = srv.root / "BAD" / "1Min" / "OHLCV" / "bucket.json"
    saved = bj.read_bytes()
    bj.write_bytes(saved[: len(saved) // 2])

    srv.start()
    hb = heartbeat(srv)
    assert hb["health"] == "degraded", hb
    assert hb["writable"] is True, hb
    assert [d["key"] for d in hb["damaged"]] == ["BAD/1Min/OHLCV"], hb
    c = client(srv)
    with pytest.raises(ERR) as ei:
        get(c, destination="BAD/1Min/OHLCV")
    msg = str(ei.value)
    assert "damaged" in msg and "does not exist" not in msg, msg
    for kind in ("rpc", "grpc"):
        pc = pymkts.Client(grpc=True, endpoint=srv.grpc_addr) if kind == "grpc" else pymkts.Client(srv.rpc_url)
        with pytest.raises(Exception) as ei:
            pc.query(pymkts.Params("BAD", "1Min", "OHLCV"))
        msg = str(ei.value)
        assert "damaged" in msg and "does not exist" not in msg, (kind, msg)
        assert pc.query(pymkts.Params("GOOD", "1Min", "OHLCV")).first().array["Open"].tolist() == [2.0] * 5
    with pytest.raises(ERR) as ei:
        put(c, "BAD/1Min/OHLCV", bars([Y2024 + 600], 9.0, 99))
    assert "damaged" in str(ei.value), str(ei.value)
    c = client(srv)
    assert read_bucket(c, "GOOD/1Min/OHLCV")[1] == [2.0] * 5
    assert put(c, "GOOD/1Min/OHLCV", bars([Y2024 + 300], 3.0, 33)) == [{"rows": 1}]
    assert put(c, "NEW/1Min/OHLCV", bars([Y2024], 4.0, 44)) == [{"rows": 1}]
    srv.stop()  # a clean stop checkpoints: BAD's records must be held, not trimmed

    bj.write_bytes(saved)
    srv.start()
    hb = heartbeat(srv)
    assert hb["health"] == "ok" and hb["damaged"] == [], hb
    c = client(srv)
    assert read_bucket(c, "BAD/1Min/OHLCV") == ([Y2024 + 60 * i for i in range(5)], [1.0] * 5, [11] * 5)
    assert read_bucket(c, "GOOD/1Min/OHLCV")[1] == [2.0] * 5 + [3.0]
    assert read_bucket(c, "NEW/1Min/OHLCV")[1] == [4.0]
    assert_no_panic(srv)


def test_kill_during_bucket_create_is_not_damage(srv_at):
    """kill -9 while a write creates a bucket (found by the random kill test): the directory holds only
    `bucket.json.tmp` and the write's records are in the log. A restart must not report a damaged bucket:
    the unfinished create is either completed from the log or dropped, and the key is writable."""
    srv = srv_at().start()
    c = client(srv)
    assert put(c, "OLD/1Min/OHLCV", bars([Y2024], 1.0, 1)) == [{"rows": 1}]
    assert put(c, "NEWB/1Min/OHLCV", bars(minutes(Y2024, 3), 2.0, 2)) == [{"rows": 3}]
    srv.kill()
    # The state a kill between create_bucket_files' write of bucket.json.tmp and its rename leaves.
    d = srv.root / "NEWB" / "1Min" / "OHLCV"
    (d / "bucket.json").rename(d / "bucket.json.tmp")
    for y in d.iterdir():
        if y.is_dir():
            shutil.rmtree(y)
    srv.start()
    hb = heartbeat(srv)
    assert hb["damaged"] == [] and hb["health"] == "ok", hb
    c = client(srv)
    ep = read_bucket(c, "NEWB/1Min/OHLCV")[0] if any(
        f.descriptor.path[0].decode() == "NEWB/1Min/OHLCV" for f in c.list_flights()) else []
    assert ep in ([], minutes(Y2024, 3).tolist()), ep
    assert put(c, "NEWB/1Min/OHLCV", bars([Y2024 + 600], 3.0, 3)) == [{"rows": 1}]
    assert read_bucket(c, "OLD/1Min/OHLCV")[1] == [1.0]


# ---- 1e: a real full disk, a read-only root ----

class Tmpfs:
    """A tmpfs of `mib` MiB on a fresh directory (needs root); unmounted by `close`."""

    def __init__(self, base: Path, mib: int):
        self.dir = Path(tempfile.mkdtemp(dir=base))
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a size-limited tmpfs")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(self.dir)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        self.filler = self.dir / "filler"

    @property
    def root(self) -> Path:
        return self.dir / "data"

    def fill(self):
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for size in (1 << 20, 65536, 4096, 512):
                chunk = b"\0" * size
                try:
                    while True:
                        os.write(fd, chunk)
                except OSError:
                    pass
        finally:
            os.close(fd)

    def free(self):
        self.filler.unlink()

    def remount(self, mode: str):
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.dir)], check=True)

    def close(self):
        subprocess.run(["umount", "-l", str(self.dir)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    made: list[Tmpfs] = []

    def make(mib: int) -> Tmpfs:
        t = Tmpfs(tmp_path, mib)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def is_disk_full_msg(msg: str) -> bool:
    m = msg.lower()
    return "no space" in m or "disk full" in m or "disk is full" in m or "enospc" in m


def wait_for(pred, timeout=60.0, step=0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def test_disk_full_during_appends_fails_cleanly_and_resumes(srv_at, tmpfs):
    """Defect 6 on a real 8 MiB tmpfs: writes that fail for lack of space get a clear error (Flight and
    pymarketstore), acknowledged rows stay, reads go on, writes resume once space is freed without a restart,
    and a failed write never appears, also after kill -9 and restart."""
    fs = tmpfs(8)
    srv = srv_at(root=fs.root).start()
    c = client(srv)
    key = "FULL/1Min/OHLCV"
    assert put(c, key, bars(minutes(Y2024, 100), 1.0, 1)) == [{"rows": 100}]
    assert put(c, key, bars([Y2024 + 100 * 60], 2.0, 2)) == [{"rows": 1}]
    fs.fill()

    failed = 0
    # Appends that need new blocks, an out-of-order write (a merge), a bulk append: each either works (the
    # server had room reserved) or fails with a disk-full error; the big ones must fail.
    attempts = [
        bars(minutes(Y2024 + 6000, 50_000), 9.0, 9),
        bars([Y2024 - 60], 9.0, 9),
        bars(minutes(Y2024 + 6000, 40_000), 9.0, 9),
    ]
    for i, t in enumerate(attempts):
        try:
            put(c, key, t)
        except ERR as e:
            assert is_disk_full_msg(str(e)), f"attempt {i}: not a clear disk-full error: {e}"
            failed += 1
        else:
            pytest.fail(f"attempt {i} ({t.num_rows} rows) was acknowledged on a full disk")
        c = client(srv)
    assert failed == 3
    # pymarketstore (msgpack /rpc) sees the same clear error.
    pc = pymkts.Client(srv.rpc_url)
    arr = np.zeros(50_000, dtype=[("Epoch", "i8"), ("Open", "f4"), ("Volume", "i8")])
    arr["Epoch"] = minutes(Y2024 + 6000, 50_000)
    arr["Open"] = 9.0
    arr["Volume"] = 9
    try:
        resp = pc.write(arr, key)
    except Exception as e:  # noqa: BLE001
        assert is_disk_full_msg(str(e)), str(e)
    else:
        errs = [r["error"] for r in (resp["responses"] or [])]
        assert errs and all(is_disk_full_msg(x) for x in errs), resp
    # Reads go on; nothing of the failed writes is visible.
    ep, op, _ = read_bucket(c, key)
    assert len(ep) == 101 and op == [1.0] * 100 + [2.0]
    assert pc.query(pymkts.Params("FULL", "1Min", "OHLCV")).first().array["Open"].tolist() == [1.0] * 100 + [2.0]
    hb = heartbeat(srv)
    assert hb["writable"] is True or (hb["health"] == "degraded" and hb["checkpoint_error"]), hb
    assert hb["halted"] is None, hb

    fs.free()
    assert put(c, key, bars(minutes(Y2024 + 101 * 60, 1_000), 3.0, 3)) == [{"rows": 1_000}]
    assert put(c, key, bars([Y2024 - 60], 4.0, 4)) == [{"rows": 1}]
    assert heartbeat(srv)["writable"] is True
    srv.kill()
    srv.start()
    ep, op, _ = read_bucket(client(srv), key)
    assert 9.0 not in op, "a write reported as failed appeared after restart"
    assert op == [4.0] + [1.0] * 100 + [2.0] + [3.0] * 1_000
    assert ep == [Y2024 - 60] + minutes(Y2024, 1_101).tolist()
    assert_no_panic(srv)


def test_start_on_a_full_disk_serves_reads_refuses_writes_then_resumes(srv_at, tmpfs):
    """Start-up on a full disk (kill, fill, start): reads see every acknowledged row, writes are refused with
    a clear error, and accepted again once space is freed (within a few checkpoint ticks), no restart."""
    fs = tmpfs(8)
    srv = srv_at(root=fs.root).start()
    c = client(srv)
    key = "S/1Min/OHLCV"
    for i in range(50):
        assert put(c, key, bars([Y2024 + 60 * i], float(i), i)) == [{"rows": 1}]
    srv.kill()  # the 50 rows are only in the log
    fs.fill()
    srv.start()
    c = client(srv)
    ep, op, _ = read_bucket(c, key)
    assert op == [float(i) for i in range(50)]
    hb = heartbeat(srv)
    assert hb["writable"] is False and hb["health"] == "degraded", hb
    with pytest.raises(ERR) as ei:
        put(c, key, bars([Y2024 + 60 * 100], 7.0, 7))
    msg = str(ei.value)
    assert "start-up" in msg or is_disk_full_msg(msg), msg
    pc = pymkts.Client(srv.rpc_url)
    assert pc.query(pymkts.Params("S", "1Min", "OHLCV")).first().array["Open"].tolist() == [float(i) for i in range(50)]
    fs.free()
    assert wait_for(lambda: heartbeat(srv)["writable"], timeout=45), heartbeat(srv)
    c = client(srv)
    assert put(c, key, bars([Y2024 + 60 * 100], 8.0, 8)) == [{"rows": 1}]
    srv.kill()
    srv.start()
    ep, op, _ = read_bucket(client(srv), key)
    assert op == [float(i) for i in range(50)] + [8.0], "the refused write never appears"
    assert_no_panic(srv)


def test_read_only_root_fails_clearly_or_serves_reads(srv_at, tmpfs):
    """A read-only root (the tmpfs remounted ro): start-up either fails with one clear error or serves reads;
    never a panic. Remounted rw, the data is all there."""
    fs = tmpfs(8)
    srv = srv_at(root=fs.root).start()
    c = client(srv)
    key = "RO/1Min/OHLCV"
    assert put(c, key, bars(minutes(Y2024, 10), 5.0, 5)) == [{"rows": 10}]
    srv.kill()
    fs.remount("ro")
    try:
        before = len(srv.log())
        try:
            srv.start()
        except RuntimeError:
            out = srv.log()[before:]
            assert srv.proc.returncode not in (0, None), out
            assert "panicked" not in out, out
            assert "read-only" in out.lower() or "permission" in out.lower(), f"not a clear error:\n{out}"
            print("read-only root: start-up refused:", out.strip().splitlines()[-1])
        else:
            c = client(srv)
            assert read_bucket(c, key)[1] == [5.0] * 10
            with pytest.raises(ERR) as ei:
                put(c, key, bars([Y2024 + 6000], 6.0, 6))
            print("read-only root: serves reads; a write gets:", ei.value)
            srv.kill()
            assert_no_panic(srv)
    finally:
        fs.remount("rw")
    srv.start()
    assert read_bucket(client(srv), key)[1] == [5.0] * 10
    assert_no_panic(srv)


# ---- 1f: kill -9 at random points of a mixed workload ----

KILL_POINTS = int(os.environ.get("MKTS_KILL_POINTS", "8"))
# Every pattern runs, including a bulk append to a bucket whose newest bar was overwritten after a replay
# (it used to take the bucket offline: test_replayed_then_overwrite_bulk_survives_kill). MKTS_KILL_AVOID_B2=1
# leaves that pattern out.
AVOID_B2 = os.environ.get("MKTS_KILL_AVOID_B2") == "1"
KEYS = ["K1/1Min/OHLCV", "K2/1Min/OHLCV", "K3/1Sec/OHLCV"]
STEP = {"1Min": 60, "1Sec": 1}

Model = dict  # key -> {epoch: (open, volume)}


def apply_op(model: Model, op) -> Model:
    """The state after `op` succeeds (a new dict; the input is unchanged)."""
    kind = op[0]
    out = {k: dict(v) for k, v in model.items()}
    if kind == "write":
        _, key, epochs, open_, vol = op
        b = out.setdefault(key, {})
        for e, o, v in zip(epochs, open_, vol):
            b[e] = (o, v)
    elif kind == "delete":
        _, key, s, e = op
        b = out.get(key, {})
        for ep in [x for x in b if s <= x <= e]:
            del b[ep]
    elif kind == "bad":
        pass
    return {k: v for k, v in out.items() if v}  # a bucket with no rows reads like none


def snapshot(c) -> Model:
    out: Model = {}
    for key in KEYS:
        try:
            ep, op, vol = read_bucket(c, key)
        except ERR as e:
            if "not" in str(e).lower() and ("exist" in str(e).lower() or "found" in str(e).lower()):
                continue
            raise
        d = {}
        for e, o, v in zip(ep, op, vol):
            assert e not in d, f"{key}: epoch {e} appears twice"
            d[e] = (o, v)
        if d:
            out[key] = d
    return out


def diff(a: Model, b: Model) -> str:
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, {}), b.get(key, {})
        miss = sorted(set(x) - set(y))
        extra = sorted(set(y) - set(x))
        changed = sorted(e for e in set(x) & set(y) if x[e] != y[e])
        if miss or extra or changed:
            lines.append(f"{key}: missing {len(miss)} {miss[:5]} extra {len(extra)} {extra[:5]} "
                         f"changed {len(changed)} {[(e, x[e], y[e]) for e in changed[:5]]}")
    return "; ".join(lines)


class Workload:
    """A seeded mix of appends, overwrites of the newest bar, out-of-order writes, bulk appends (>= 32,768
    rows), range deletes and refused writes, run until the server dies."""

    def __init__(self, rng: random.Random, model: Model):
        self.rng = rng
        self.seq = 1_000_000 * rng.randrange(1, 1000)
        self.model = model
        self.overwritten: set[str] = set()  # buckets whose newest bar this round overwrote

    def next_op(self):
        rng = self.rng
        key = rng.choice(KEYS)
        step = STEP[key.split("/")[1]]
        b = self.model.get(key, {})
        last = max(b) if b else Y2024
        r = rng.random()
        self.seq += 1
        v = self.seq
        o = float(v % 1_000_000)  # exact in float32
        if r < 0.40:  # append a few bars
            n = rng.randrange(1, 20)
            ep = [last + step * (i + 1) for i in range(n)]
            return ("write", key, ep, [o] * n, [v + i for i in range(n)])
        if r < 0.60 and b:  # overwrite the newest bar
            self.overwritten.add(key)
            return ("write", key, [last], [o], [v])
        if r < 0.72 and b:  # out of order: an older epoch, existing or a gap
            lo = min(b)
            e = lo + step * rng.randrange(-50, max(1, (last - lo) // step))
            return ("write", key, [e], [o], [v])
        if r < 0.80:  # bulk append through the direct path
            n = rng.randrange(32_768, 45_000)
            if AVOID_B2 and key in self.overwritten:
                n = 1 + n % 20
            ep = [last + step * (i + 1) for i in range(n)]
            return ("write", key, ep, [o] * n, [v] * n)
        if r < 0.90 and b:  # range delete
            eps = sorted(b)
            i = rng.randrange(len(eps))
            j = min(len(eps) - 1, i + rng.randrange(0, 200))
            return ("delete", key, eps[i], eps[j])
        return ("bad", key)

    def run_op(self, c, op):
        if op[0] == "write":
            _, key, ep, o, v = op
            acks = put(c, key, bars(ep, o, v))
            assert acks == [{"rows": len(ep)}], acks
        elif op[0] == "delete":
            _, key, s, e = op
            action(c, "delete_range", {"key": key, "epoch_start": s, "epoch_end": e})
        else:  # a write the server must refuse: wrong column type
            t = pa.table({"Epoch": pa.array([Y2024 + 1], pa.int64()), "Open": pa.array(["x"]), "Volume": pa.array([1], pa.int64())})
            try:
                put(c, op[1], t)
            except ERR:
                return False
            raise AssertionError("a write with a string Open column was acknowledged")
        return True


def test_kill9_at_random_points(srv_at):
    """kill -9 at random points of a mixed workload; after each, restart and check every acknowledged row is
    there exactly once with its last acknowledged value, and nothing refused appears."""
    seed = int(os.environ.get("MKTS_KILL_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    srv = srv_at()
    model: Model = {}
    uncertain = None  # the op in flight at the kill: it may or may not have landed
    stats = {"ops": 0, "kills": 0, "bulk": 0, "deletes": 0, "uncertain_landed": 0}
    journal: list[str] = []  # what each round did, printed on failure

    def note(op, status):
        if op[0] == "write":
            what = f"write {op[1]} {len(op[2])} rows {op[2][0]}..{op[2][-1]}"
        elif op[0] == "delete":
            what = f"delete_range {op[1]} {op[2]}..{op[3]}"
        else:
            what = f"refused write {op[1]}"
        journal.append(f"  {time.monotonic():.2f} {what}: {status}")
    try:
        for point in range(KILL_POINTS + 1):
            journal.append(f"round {point}: start")
            srv.start(timeout=180)  # replay on this shared 2-core machine can take tens of seconds
            c = client(srv)
            got = snapshot(c)
            if uncertain is not None:
                after = apply_op(model, uncertain)
                if got == after:
                    model = after
                    stats["uncertain_landed"] += 1
                    journal.append("  the in-flight op landed")
                else:
                    assert got == model, f"after kill {point}: neither before nor after the in-flight op: " \
                                         f"vs before: {diff(model, got)} | vs after: {diff(after, got)}"
            else:
                assert got == model, f"after kill {point}: {diff(model, got)}"
            assert_no_panic(srv)
            uncertain = None
            if point == KILL_POINTS:
                break
            # Some kill points fall after one or more 10 s checkpoint ticks.
            delay = rng.choice([rng.uniform(0.2, 4.0), rng.uniform(0.2, 4.0), rng.uniform(9.0, 14.0)])
            killed = threading.Event()

            def killer(p=srv.proc):
                time.sleep(delay)
                killed.set()
                p.kill()

            wl = Workload(rng, model)
            if point == 0:
                # Create every bucket before the first kill, so every round has all three to work on (a kill
                # during a bucket's creation is covered by test_kill_during_bucket_create_is_not_damage).
                for key in KEYS:
                    op = ("write", key, [Y2024], [0.0], [0])
                    wl.run_op(c, op)
                    note(op, "ok")
                    model = wl.model = apply_op(model, op)
            # One acknowledged op first, so the kill lands in the workload rather than the connection set-up.
            op = wl.next_op()
            wl.run_op(c, op)
            note(op, "ok")
            model = wl.model = apply_op(model, op)
            journal.append(f"  kill in {delay:.2f} s")
            t = threading.Thread(target=killer, daemon=True)
            t.start()
            while True:
                op = wl.next_op()
                try:
                    wl.run_op(c, op)
                except ERR as e:
                    if killed.is_set():
                        note(op, "in flight at the kill")
                        uncertain = op
                        break
                    note(op, f"FAILED {e}")
                    raise
                note(op, "ok")
                if killed.is_set() and srv.proc.poll() is not None:
                    # It returned before the kill landed: acknowledged.
                    model = apply_op(model, op)
                    wl.model = model
                    break
                model = apply_op(model, op)
                wl.model = model
                stats["ops"] += 1
                stats["bulk"] += op[0] == "write" and len(op[2]) >= 32_768
                stats["deletes"] += op[0] == "delete"
            t.join()
            srv.proc.wait()
            stats["kills"] += 1
    except BaseException:
        print(f"test_kill9_at_random_points: MKTS_KILL_SEED={seed} MKTS_KILL_POINTS={KILL_POINTS} stats={stats}")
        print("\n".join(journal[-300:]))
        print(srv.log()[-4000:])
        raise
    print(f"kill9: seed={seed} points={KILL_POINTS} stats={stats} rows={sum(len(v) for v in model.values())}")
