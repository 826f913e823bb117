"""Tiering (`tiering:` in mkts.yml, issue #16) through the real server: a bucket with 3 years, the oldest 2
sealed for over a year, moved to a `file://` store and to a real S3-compatible server on loopback (moto's
server mode); reads over Flight, Flight SQL and pymarketstore of ranges spanning cold and hot equal the data
written; a write into a cold year; restarts; `kill -9` at every step of a move and of a thaw, then a
restart: nothing lost or duplicated; the objects read back with pyarrow.dataset and DuckDB."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as fl
import pymarketstore as pymkts
import pytest

from conftest import free_port
from test_flight_core import put

KEY = "AAPL/1Min/OHLCV"
ROWS_PER_YEAR = 3000
SECRET = "tier-secret-never-logged"


def years() -> list[int]:
    y = dt.datetime.now(dt.timezone.utc).year
    return [y - 3, y - 2, y - 1]


def year_start(y: int) -> int:
    return int(dt.datetime(y, 1, 1, tzinfo=dt.timezone.utc).timestamp())


def bars(start: int, n: int, v: float) -> pa.Table:
    ep = np.arange(n, dtype="int64") * 60 + start
    return pa.table({
        "Epoch": ep,
        "Open": pa.array(ep / 60.0 + v, pa.float64()),
        "Close": pa.array(ep / 60.0 + v + 0.5, pa.float64()),
        "Volume": pa.array(np.arange(n, dtype="int64") + int(v * 1000), pa.int64()),
    })


def written() -> pa.Table:
    return pa.concat_tables([bars(year_start(y), ROWS_PER_YEAR, 0.25) for y in years()])


def action(c: fl.FlightClient, name: str, body) -> dict:
    res = list(c.do_action(fl.Action(name, json.dumps(body).encode())))
    return json.loads(res[0].body.to_pybytes())


def read(c: fl.FlightClient, key: str, **kw) -> pa.Table:
    t = c.do_get(fl.Ticket(json.dumps({"destination": key, **kw}).encode())).read_all()
    return t.set_column(0, "Epoch", t.column("Epoch").cast(pa.int64()))


def sql(c: fl.FlightClient, text: str) -> pa.Table:
    return c.do_get(fl.Ticket(json.dumps({"sql": text}).encode())).read_all()


def tiers(c: fl.FlightClient) -> list[tuple[int, str]]:
    info = action(c, "get_info", {"key": KEY})
    return [(p["year"], p["tier"]) for p in info["partitions"]]


def as_rows(t: pa.Table) -> list[tuple]:
    cols = ["Epoch", "Open", "Close", "Volume"]
    t = t.select(cols)
    return list(zip(*(t.column(c).to_pylist() for c in cols)))


def wait_tiers(c: fl.FlightClient, want: list[tuple[int, str]], timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tiers(c) == want:
            return
        time.sleep(0.5)
    assert tiers(c) == want


# --- the stores -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_server():
    """moto's S3 server on a free loopback port, for the whole module."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


class FileStore:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def config(self) -> str:
        return f"tiering:\n  store: file://{self.path}\n  after: 1y\n"

    def objects(self) -> list[str]:
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*.parquet"))

    def dataset(self) -> ds.Dataset:
        return ds.dataset(self.path, format="parquet", partitioning="hive")


class S3Store:
    def __init__(self, endpoint: str, bucket: str):
        import boto3
        self.endpoint, self.bucket = endpoint, bucket
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id="test", aws_secret_access_key=SECRET)
        self.s3.create_bucket(Bucket=bucket)

    def config(self) -> str:
        return (f"tiering:\n  store: s3://{self.bucket}/cold\n  after: 1y\n"
                f"  s3: {{endpoint: \"{self.endpoint}\", region: us-east-1, allow_http: true, "
                f"access_key_id: test, secret_access_key: {SECRET}}}\n")

    def objects(self) -> list[str]:
        out = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="cold/").get("Contents", [])
        return sorted(o["Key"][len("cold/"):] for o in out)

    def dataset(self) -> ds.Dataset:
        from pyarrow import fs
        s3 = fs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region="us-east-1",
                             access_key="test", secret_key=SECRET)
        return ds.dataset(f"{self.bucket}/cold", filesystem=s3, format="parquet", partitioning="hive")


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(tmp_path / "cold")
    endpoint = request.getfixturevalue("moto_server")
    return S3Store(endpoint, f"mkts-{os.getpid()}-{int(time.time() * 1000) % 10**9}")


# --- tests ------------------------------------------------------------------------------------------------

def test_three_years_two_tiered_read_everywhere_write_restart(server_factory, store):
    a, b, last = years()
    srv = server_factory(config_extra=store.config())
    c = fl.FlightClient(srv.flight_url)
    data = written()
    put(c, KEY, data)
    assert store.objects() == []
    srv.stop()  # the final checkpoint moves what is due
    srv.start()
    c = fl.FlightClient(srv.flight_url)
    assert tiers(c) == [(a, "cold"), (b, "cold"), (last, "hot")]
    objs = store.objects()
    assert len(objs) == 2 and objs[0].startswith(f"symbol=AAPL/timeframe=1Min/attrgroup=OHLCV/year={a}/"), objs
    root = srv.root / "AAPL" / "1Min" / "OHLCV"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [str(last)]
    listing = {f.descriptor.path[0].decode(): f for f in c.list_flights()}
    meta = json.loads(listing[KEY].app_metadata)
    assert [(p["year"], p["tier"], p["rows"]) for p in meta["partitions"]] == \
        [(a, "cold", ROWS_PER_YEAR), (b, "cold", ROWS_PER_YEAR), (last, "hot", ROWS_PER_YEAR)]
    assert listing[KEY].total_records == 3 * ROWS_PER_YEAR and listing[KEY].total_bytes > 0

    want = as_rows(data)
    # Flight: everything, a range across cold and hot, a projection, the tail.
    assert as_rows(read(c, KEY)) == want
    s, e = year_start(b) + 60 * 1000, year_start(last) + 60 * 99
    rng = [r for r in want if s <= r[0] <= e]
    assert as_rows(read(c, KEY, epoch_start=s, epoch_end=e)) == rng
    proj = read(c, KEY, epoch_start=s, epoch_end=e, columns=["Volume"])
    assert proj.column_names == ["Epoch", "Volume"] and proj.column("Volume").to_pylist() == [r[3] for r in rng]
    tail = read(c, KEY, epoch_end=year_start(last) - 1, limit_record_count=7)
    assert as_rows(tail) == want[2 * ROWS_PER_YEAR - 7: 2 * ROWS_PER_YEAR]
    # SQL over cold + hot (Epoch range and columns pushed down into the cold scan).
    t = sql(c, f'SELECT count(*) AS n, sum("Volume") AS v FROM "{KEY}" '
               f"WHERE \"Epoch\" >= to_timestamp_seconds({s}) AND \"Epoch\" <= to_timestamp_seconds({e})")
    assert t.column("n")[0].as_py() == len(rng) and t.column("v")[0].as_py() == sum(r[3] for r in rng)
    hourly = sql(c, f'SELECT date_trunc(\'hour\', "Epoch") AS h, count(*) AS n FROM "{KEY}" GROUP BY 1 ORDER BY 1')
    assert sum(hourly.column("n").to_pylist()) == 3 * ROWS_PER_YEAR
    # pymarketstore (JSON-RPC) over the same span.
    cli = pymkts.Client(srv.rpc_url)
    df = cli.query(pymkts.Params("AAPL", "1Min", "OHLCV", start=s, end=e)).first().df()
    assert len(df) == len(rng) and df["Volume"].tolist() == [r[3] for r in rng]

    # A write into a cold year: an overwrite and new bars; read back at once, and after it moves again.
    over = bars(year_start(a) + 60 * 10, 5, 7.0)
    put(c, KEY, over)
    assert tiers(c)[1:] == [(b, "cold"), (last, "hot")]  # year a is local again (until it moves back)
    by_epoch = {r[0]: r for r in want}
    by_epoch.update({r[0]: r for r in as_rows(over)})
    want2 = sorted(by_epoch.values())
    assert as_rows(read(c, KEY)) == want2
    srv.stop()
    srv.start()
    c = fl.FlightClient(srv.flight_url)
    assert tiers(c) == [(a, "cold"), (b, "cold"), (last, "hot")]
    assert len(store.objects()) == 2 and store.objects() != objs  # year a's object was rewritten
    assert as_rows(read(c, KEY)) == want2

    # The objects are plain Parquet any engine reads: pyarrow.dataset with Hive partitioning...
    t = store.dataset().to_table()
    assert t.num_rows == 2 * ROWS_PER_YEAR
    assert sorted(set(t.column("year").to_pylist())) == [a, b] and set(t.column("symbol").to_pylist()) == {"AAPL"}
    cold_want = [r for r in want2 if r[0] < year_start(last)]
    got = t.sort_by("Epoch")
    got = got.set_column(got.schema.get_field_index("Epoch"), "Epoch", got.column("Epoch").cast(pa.timestamp("s", "UTC")).cast(pa.int64()))
    assert as_rows(got) == cold_want
    # ... and DuckDB (straight from the files of the file:// store; the S3 store through pyarrow).
    import duckdb
    con = duckdb.connect()
    if isinstance(store, FileStore):
        q = (f"SELECT count(*), sum(Volume), min(epoch(Epoch)), max(year) FROM "
             f"read_parquet('{store.path}/**/*.parquet', hive_partitioning = true)")
    else:
        con.register("cold", t)
        q = "SELECT count(*), sum(Volume), min(epoch(Epoch)), max(year) FROM cold"
    n, v, first, ymax = con.execute(q).fetchone()
    assert (n, v, int(first), int(ymax)) == (len(cold_want), sum(r[3] for r in cold_want), year_start(a), b)
    assert SECRET not in srv.log()


CRASH_POINTS = ["tier:pending", "tier:put", "tier:commit"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_during_a_move_loses_and_duplicates_nothing(server_factory, tmp_path, monkeypatch, point):
    a, b, last = years()
    store = FileStore(tmp_path / "cold")
    monkeypatch.setenv("MKTS_CRASH_AT", point)
    srv = server_factory(config_extra=store.config())
    c = fl.FlightClient(srv.flight_url)
    data = written()
    put(c, KEY, data)
    srv.stop()  # the server starts its first move at shutdown and SIGKILLs itself at `point`
    assert srv.proc.returncode == -9, srv.log()[-2000:]
    monkeypatch.delenv("MKTS_CRASH_AT")
    srv.start()
    c = fl.FlightClient(srv.flight_url)
    assert as_rows(read(c, KEY)) == as_rows(data)
    info = tiers(c)
    cold = [y for y, t in info if t == "cold"]
    # Exactly one object per cold year: an uncommitted object was deleted, a committed move kept (a
    # checkpoint tick after the start may already have moved more).
    assert len(store.objects()) == len(cold), (store.objects(), info)
    assert (a in cold) if point == "tier:commit" else True, info
    assert last not in cold
    srv.stop()
    srv.start()
    c = fl.FlightClient(srv.flight_url)
    assert tiers(c) == [(a, "cold"), (b, "cold"), (last, "hot")]
    assert len(store.objects()) == 2
    assert as_rows(read(c, KEY)) == as_rows(data)


@pytest.mark.parametrize("point", ["thaw:local", "thaw:commit"])
def test_kill_9_during_a_thaw_keeps_the_acknowledged_state(server_factory, tmp_path, monkeypatch, point):
    a, b, last = years()
    store = FileStore(tmp_path / "cold")
    srv = server_factory(config_extra=store.config())
    c = fl.FlightClient(srv.flight_url)
    data = written()
    put(c, KEY, data)
    srv.stop()
    monkeypatch.setenv("MKTS_CRASH_AT", point)
    srv.start()
    c = fl.FlightClient(srv.flight_url)
    assert tiers(c) == [(a, "cold"), (b, "cold"), (last, "hot")]
    with pytest.raises(Exception):
        put(c, KEY, bars(year_start(a) + 60, 3, 9.0))  # the server dies before the write is logged
    srv.proc.wait(30)
    monkeypatch.delenv("MKTS_CRASH_AT")
    srv.start()
    c = fl.FlightClient(srv.flight_url)
    assert as_rows(read(c, KEY)) == as_rows(data)  # the unacknowledged write is not there, nothing else lost
    info = tiers(c)
    cold = [y for y, t in info if t == "cold"]
    # One object per cold year: a thaw killed before its commit left year a cold (its local copy was
    # removed at start), one killed after it left year a local and its old object deleted (a checkpoint
    # tick may have moved it again since).
    assert len(store.objects()) == len(cold), (store.objects(), info)
    assert b in cold and last not in cold and (a in cold if point == "thaw:local" else True), info
    # The write, sent again, is stored.
    again = bars(year_start(a) + 60, 3, 9.0)
    put(c, KEY, again)
    by_epoch = {r[0]: r for r in as_rows(data)}
    by_epoch.update({r[0]: r for r in as_rows(again)})
    assert as_rows(read(c, KEY)) == sorted(by_epoch.values())


def test_bad_tiering_config_is_one_clear_error(server_factory):
    srv = server_factory(config_extra="tiering:\n  store: ftp://x\n", start=False)
    with pytest.raises(RuntimeError) as e:
        srv.start(timeout=20)
    assert "tiering.store" in str(e.value) and "unsupported scheme" in str(e.value)
    srv = server_factory(config_extra="tiering:\n  store: file:///tmp/x\n  s3: {nonsense_key: 1}\n", start=False)
    with pytest.raises(RuntimeError) as e:
        srv.start(timeout=20)
    assert "tiering.s3.nonsense_key" in str(e.value)
