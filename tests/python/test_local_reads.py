"""Same-host reads (#17): the client maps a read's column files itself (python/mkts_local) instead of
receiving the bytes over Flight. Real server, real files: every read equals the Flight DoGet of the same
ticket; the arrays point into mappings of the bucket's files (/proc/self/maps); a read is a consistent
snapshot while a writer overwrites and appends; hot tails, bool and string16 come inline; errors are
clear; roles apply.
"""
from __future__ import annotations

import decimal
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as fl
import pytest

from conftest import REPO
from test_flight_core import action, client, get, put

sys.path.insert(0, str(REPO / "python"))
import mkts_local  # noqa: E402

Y2024 = 1_704_067_200  # 2024-01-01T00:00:00Z
KEY = "AAPL/1Min/OHLCV"


def short_socket() -> str:
    """A socket path well inside sun_path's 107 bytes (pytest's tmp paths can be longer)."""
    return os.path.join(tempfile.mkdtemp(prefix="mk"), "s.sock")


@pytest.fixture
def srv(server_factory):
    return server_factory(f"local_socket: {short_socket()}\n")


def bars(start: int, n: int, base: float = 0.0) -> pa.Table:
    i = np.arange(n)
    return pa.table({
        "Epoch": pa.array(start + 60 * i, pa.int64()),
        "Open": pa.array(base + i, pa.float32()),
        "High": pa.array(base + i + 0.5, pa.float32()),
        "Low": pa.array(base + i - 0.5, pa.float32()),
        "Close": pa.array(base + i + 0.25, pa.float64()),
        "Volume": pa.array(i * 10, pa.int64()),
    })


def maps_of_process() -> list[tuple[int, int, str]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, parts[5] if len(parts) > 5 else ""))
    return out


def test_reads_equal_flight_across_a_year_boundary(srv):
    c = client(srv)
    # 2023's last 1000 minutes and 2024's first 2000: two partitions.
    put(c, KEY, bars(Y2024 - 60 * 1000, 3000))
    with mkts_local.Client.discover(srv.flight_url) as lc:
        assert lc.path.endswith("s.sock")
        for q in [{}, {"epoch_start": Y2024 - 600, "epoch_end": Y2024 + 599}, {"limit_record_count": 1500},
                  {"limit_record_count": 10, "limit_from_start": True}, {"columns": ["Close", "Volume"]}]:
            t = lc.read(KEY, start=q.get("epoch_start"), end=q.get("epoch_end"), limit=q.get("limit_record_count"),
                        from_start=q.get("limit_from_start", False), columns=q.get("columns"))
            want = get(c, destination=KEY, **q)
            assert t.schema == want.schema, q
            assert t.equals(want), q
        assert lc.read(KEY).num_rows == 3000
        assert lc.read(KEY, start=Y2024 - 600, end=Y2024 + 599).num_rows == 20


def test_arrays_point_into_the_bucket_files(srv):
    c = client(srv)
    put(c, KEY, bars(Y2024, 5000))
    with mkts_local.Client.discover(srv.flight_url) as lc:
        t = lc.read(KEY)
    data_root = str(srv.root)
    maps = maps_of_process()
    for name in ["Epoch", "Open", "Close", "Volume"]:
        (chunk,) = t.column(name).chunks
        addr = chunk.buffers()[1].address
        hit = [m for m in maps if m[0] <= addr < m[1]]
        assert hit and hit[0][2].startswith(data_root), (name, hit)
    # The DataFrame path keeps values exact.
    df = t.to_pandas()
    assert df["Volume"].iloc[4999] == 49990 and df["Open"].iloc[123] == np.float32(123)


def test_nulls_strings_and_types_map_zero_copy(srv):
    c = client(srv)
    n = 2000
    i = np.arange(n)
    text = [None if k % 7 == 0 else f"row {k} " + "x" * (k % 40) for k in range(n)]
    t = pa.table({
        "Epoch": pa.array(Y2024 - 60 * 1000 + 60 * i, pa.int64()),
        "px": pa.array([None if k % 5 == 0 else float(k) for k in range(n)], pa.float64()),
        "note": pa.array(text, pa.string()),
        "big": pa.array([f"{k}" * 3 for k in range(n)], pa.large_string()),
        "blob": pa.array([bytes([k % 256]) * (k % 5) for k in range(n)], pa.binary()),
        "at": pa.array(Y2024 * 1_000_000 + i, pa.timestamp("us", "UTC")),
        "dec": pa.array([None if k % 3 else decimal.Decimal(k) / 100 for k in range(n)], pa.decimal128(12, 2)),
    })
    put(c, "TYPES/1Min/X", t)
    with mkts_local.Client.discover(srv.flight_url) as lc:
        got = lc.read("TYPES/1Min/X")
    want = get(c, destination="TYPES/1Min/X")
    assert got.equals(want)
    assert got.column("note").to_pylist() == text
    maps = maps_of_process()
    for name in ["px", "note"]:
        for chunk in got.column(name).chunks:
            for b in chunk.buffers():
                if b is None or b.size == 0:
                    continue
                hit = [m for m in maps if m[0] <= b.address < m[1]]
                assert hit and hit[0][2].startswith(str(srv.root)), (name, hit)


def test_snapshot_is_consistent_under_concurrent_writes(srv):
    c = client(srv)
    day = 1440
    put(c, KEY, bars(Y2024, day, base=0.0))
    stop = threading.Event()
    errors: list = []

    def writer():
        wc = client(srv)
        v = 1
        try:
            while not stop.is_set():
                # Rewrite the whole day with version v (an overwrite: a new generation), then append a bar.
                put(wc, KEY, bars(Y2024, day, base=1_000_000.0 * v))
                put(wc, KEY, bars(Y2024 + 60 * (day + v), 1, base=-1.0))
                v += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=writer)
    th.start()
    seen = set()
    try:
        with mkts_local.Client(action(c, "local_socket")["path"]) as lc:
            # At least 150 reads, and on until the writer's rewrites were seen (however busy the machine).
            for i in range(20000):
                if i >= 150 and len(seen) > 2:
                    break
                t = lc.read(KEY, end=Y2024 + 60 * (day - 1))
                opens = np.asarray(t.column("Open"))
                assert t.num_rows == day
                base = float(opens[0])
                # Every row of the day from the same write: one version, no torn mix.
                assert np.array_equal(opens, (base + np.arange(day)).astype(np.float32)), base
                seen.add(base)
    finally:
        stop.set()
        th.join()
    assert not errors, errors
    assert len(seen) > 1  # the writer really ran during the reads
    with mkts_local.Client.discover(srv.flight_url) as lc:
        assert lc.read(KEY).equals(get(c, destination=KEY))


def test_a_held_table_survives_later_writes(srv):
    c = client(srv)
    put(c, KEY, bars(Y2024, 3000))
    with mkts_local.Client.discover(srv.flight_url) as lc:
        held = lc.read(KEY)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, held.schema) as w:
            w.write_table(held)
        copy = pa.ipc.open_stream(sink.getvalue()).read_all()  # the same values in fresh memory
        put(c, KEY, bars(Y2024 + 60 * 100, 50, base=9e6))  # overwrite inside: new generation
        put(c, KEY, bars(Y2024 + 60 * 3000, 10))  # append
        c.do_action(fl.Action("delete_range", json.dumps({"key": KEY, "epoch_start": Y2024, "epoch_end": Y2024 + 60 * 9}).encode()))
        assert held.equals(copy)
        assert lc.read(KEY).equals(get(c, destination=KEY))
        assert lc.read(KEY).num_rows == 3000


def test_hot_tail_bool_and_string16_come_inline(srv):
    c = client(srv)
    put(c, KEY, bars(Y2024, 1000))
    for k in range(5):  # live-feed overwrites of the newest bar: the partition turns hot
        put(c, KEY, bars(Y2024 + 60 * 999, 1, base=100.0 + k))
    with mkts_local.Client.discover(srv.flight_url) as lc:
        t = lc.read(KEY)
        assert t.equals(get(c, destination=KEY))
        assert t.column("Open").to_pylist()[-1] == 104.0
        assert t.column("Open").num_chunks == 2  # mapped rows, then the heap tail
        action(c, "create", {"key": "FLAGS/1Min/X", "column_names": ["up", "name"], "column_types": ["b1", "U16"]})
        import pymarketstore as pymkts
        rec = np.array([(Y2024, True, "abc"), (Y2024 + 60, False, "de")], dtype=[("Epoch", "i8"), ("up", "?"), ("name", "U16")])
        pymkts.Client(srv.rpc_url).write(rec, "FLAGS/1Min/X")
        assert lc.read("FLAGS/1Min/X").equals(get(c, destination="FLAGS/1Min/X"))
        assert lc.read("FLAGS/1Min/X").column("name").to_pylist() == ["abc", "de"]


def test_many_buckets_and_clear_errors(srv):
    c = client(srv)
    for s in ["A", "B", "C"]:
        put(c, f"{s}/1Min/OHLCV", bars(Y2024, 10, base=ord(s)))
    with mkts_local.Client.discover(srv.flight_url) as lc:
        many = lc.read_many("*/1Min/OHLCV")
        assert sorted(many) == ["A/1Min/OHLCV", "B/1Min/OHLCV", "C/1Min/OHLCV"]
        assert many["B/1Min/OHLCV"].equals(get(c, destination="B/1Min/OHLCV"))
        with pytest.raises(mkts_local.MktsLocalError) as e:
            lc.read("NOPE/1Min/OHLCV")
        assert e.value.code == "not_found"
        with pytest.raises(mkts_local.MktsLocalError) as e:
            lc._request({"destination": KEY, "functions": ["candlecandler('1H',Open,High,Low,Close,Sum::Volume)"]})
        assert e.value.code == "invalid_argument" and "Flight" in e.value.message
        with pytest.raises(mkts_local.MktsLocalError) as e:
            lc._request({"sql": "SELECT 1"})
        assert e.value.code == "invalid_argument"
        with pytest.raises(mkts_local.MktsLocalError) as e:
            lc._request({"destination": "../../etc/1Min/X"})
        assert e.value.code == "invalid_argument"
        # The connection stays usable after refusals.
        assert lc.read("A/1Min/OHLCV").num_rows == 10
        df = lc.read_pandas("A/1Min/OHLCV")
        assert isinstance(df.index, pd.DatetimeIndex) and df.index[0] == pd.Timestamp("2024-01-01")


def test_default_socket_off_and_roles(server_factory):
    s = server_factory()
    path = action(client(s), "local_socket")["path"]
    assert path.startswith(tempfile.gettempdir()) and path.endswith(".sock") and os.path.exists(path)
    assert not any(p.is_socket() for p in s.root.rglob("*"))  # nothing in the data directory
    s.stop()
    assert not os.path.exists(path)  # removed at shutdown
    off = server_factory("local_socket: off\n")
    with pytest.raises((fl.FlightError, pa.ArrowKeyError), match="no same-host reads"):
        action(client(off), "local_socket")


def test_queryable_false_refuses(server_factory):
    s = server_factory(f"local_socket: {short_socket()}\nqueryable: false\n")
    sock = Path(s.config_path.read_text().split("local_socket: ")[1].split("\n")[0])
    with mkts_local.Client(str(sock)) as lc:
        with pytest.raises(mkts_local.MktsLocalError) as e:
            lc.read(KEY)
        assert "queryable" in e.value.message


def test_with_auth_the_socket_needs_credentials(server_factory):
    import base64
    import subprocess

    from conftest import mkts_bin

    pw_hash = subprocess.run([mkts_bin(), "hash-password"], input="s3cret\n", capture_output=True, text=True, check=True).stdout.strip()
    sock = short_socket()
    s = server_factory(f"local_socket: {sock}\nauth:\n  users:\n    - name: reader\n      password_hash: \"{pw_hash}\"\n      role: read_only\n")
    basic = "Basic " + base64.b64encode(b"reader:s3cret").decode()
    with mkts_local.Client(sock) as lc:
        with pytest.raises(mkts_local.MktsLocalError) as e:
            lc.read(KEY)
        assert e.value.code == "unauthenticated"
    with mkts_local.Client(sock, authorization="Basic " + base64.b64encode(b"reader:wrong").decode()) as lc:
        with pytest.raises(mkts_local.MktsLocalError) as e:
            lc.read(KEY)
        assert e.value.code == "unauthenticated"
    with mkts_local.Client.discover(s.flight_url, authorization=basic) as lc:
        # Authenticated and allowed to read: the bucket does not exist.
        with pytest.raises(mkts_local.MktsLocalError) as e:
            lc.read(KEY)
        assert e.value.code == "not_found"


def test_reader_uses_the_socket_and_falls_back_to_flight_without_one(server_factory):
    on = server_factory(f"local_socket: {short_socket()}\n")
    off = server_factory("local_socket: off\n")
    for s in (on, off):
        put(client(s), KEY, bars(Y2024 - 600, 30))
    with mkts_local.Reader(on.flight_url) as r:
        assert r.local and r.why_not_local is None
        assert r.read(KEY, start=Y2024 - 300).equals(get(client(on), destination=KEY, epoch_start=Y2024 - 300))
    with mkts_local.Reader(off.flight_url) as r:
        assert not r.local and "no same-host reads" in r.why_not_local
        assert r.read(KEY, start=Y2024 - 300).equals(get(client(off), destination=KEY, epoch_start=Y2024 - 300))
        assert r.read_pandas(KEY).index[0] == pd.Timestamp(Y2024 - 600, unit="s")


def test_a_socket_of_another_store_is_refused_and_the_reader_falls_back(server_factory):
    # What a client sees when the path a server advertises is, where the client runs, another server's
    # socket (another root's, or the same path on another host): that server's store id, not the asked one's.
    a = server_factory(f"local_socket: {short_socket()}\n")
    b = server_factory(f"local_socket: {short_socket()}\n")
    put(client(a), KEY, bars(Y2024, 10, base=100.0))
    put(client(b), KEY, bars(Y2024, 10, base=200.0))
    a_id = action(client(a), "local_socket")["store_id"]
    b_path = action(client(b), "local_socket")["path"]
    assert a_id != action(client(b), "local_socket")["store_id"]
    with pytest.raises(mkts_local.MktsLocalError, match="belongs to store") as e:
        mkts_local.Client(b_path, store_id=a_id).read(KEY)
    assert e.value.code == "wrong_server"
    with mkts_local.Reader(a.flight_url) as r:
        r._client.close()
        r._client = mkts_local.Client(b_path, store_id=a_id)  # as if a's path led to b's socket
        assert r.read(KEY).equals(get(client(a), destination=KEY))
        assert not r.local and "belongs to store" in r.why_not_local
        assert r.read(KEY).column("Open").to_pylist()[0] == 100.0


def test_an_unreachable_socket_falls_back_to_flight(srv):
    # The advertised path does not exist where the client runs (a server on another host).
    put(client(srv), KEY, bars(Y2024, 5))
    os.remove(action(client(srv), "local_socket")["path"])
    with mkts_local.Reader(srv.flight_url) as r:
        assert not r.local and ("FileNotFoundError" in r.why_not_local or "ConnectionRefusedError" in r.why_not_local)
        assert r.read(KEY).equals(get(client(srv), destination=KEY))
