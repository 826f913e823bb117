"""SQL runs inside the store (issue #10, defects 3 and 7): no files written or read through SQL, no setting
that outlives a statement, a bounded memory pool that fails one statement instead of the server.

Every test runs over the three ways SQL reaches the server: a Flight `{"sql": ...}` ticket (DoGet), `/rpc`
`is_sqlstatement` (pymarketstore `Client.sql`) and Flight SQL (ADBC DBAPI).
"""
from __future__ import annotations

import json
import urllib.request

import adbc_driver_flightsql.dbapi as dbapi
import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore as pymkts
import pytest

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z
POOL_MB = 32
# Far more groups than a 32 MB pool holds (unbounded, this needs gigabytes).
BIG_GROUP_BY = "SELECT count(*) AS n FROM (SELECT value % 40000000 AS k, count(*) AS c FROM range(40000000) GROUP BY 1)"


@pytest.fixture
def srv(server_factory):
    s = server_factory(config_extra=f"sql_memory_limit_mb: {POOL_MB}\n")
    c = fl.FlightClient(s.flight_url)
    t = pa.table({
        "Epoch": pa.array(T0 + 60 * np.arange(10, dtype=np.int64)),
        "Close": pa.array(100 + np.arange(10, dtype=np.float32)),
        "Volume": pa.array(np.arange(10, dtype=np.int64)),
    })
    w, r = c.do_put(fl.FlightDescriptor.for_path("AAPL/1Min/OHLCV"), t.schema)
    w.write_table(t)
    w.done_writing()
    r.read()
    w.close()
    return s


class Ticket:
    """SQL in a plain Flight ticket."""

    def __init__(self, s):
        self.c = fl.FlightClient(s.flight_url)

    def run(self, sql: str) -> pa.Table:
        return self.c.do_get(fl.Ticket(json.dumps({"sql": sql}).encode())).read_all()

    def close(self):
        self.c.close()


class Rpc:
    """SQL over MarketStore's msgpack JSON-RPC, as pymarketstore sends it."""

    def __init__(self, s):
        self.c = pymkts.Client(s.rpc_url)

    def run(self, sql: str) -> pa.Table:
        reply = self.c.sql([sql])
        arr = list(reply.all().values())[0].array
        return pa.table({n: arr[n] for n in arr.dtype.names})

    def close(self):
        pass


class Adbc:
    """SQL over Flight SQL with the ADBC driver."""

    def __init__(self, s):
        self.conn = dbapi.connect(s.flight_url, autocommit=True)

    def run(self, sql: str) -> pa.Table:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table()

    def close(self):
        self.conn.close()


@pytest.fixture(params=["ticket", "rpc", "adbc"])
def sql(request, srv):
    client = {"ticket": Ticket, "rpc": Rpc, "adbc": Adbc}[request.param](srv)
    yield client
    client.close()


def refused(client, statement: str, message: str) -> str:
    with pytest.raises(Exception) as e:
        client.run(statement)
    assert message in str(e.value), str(e.value)
    return str(e.value)


def batch_size(srv) -> int:
    """What a fresh statement sees, asked over a transport of its own (Flight ticket)."""
    t = Ticket(srv).run("SELECT CAST(value AS BIGINT) AS v FROM information_schema.df_settings "
                        "WHERE name = 'datafusion.execution.batch_size'")
    return t.column("v").to_pylist()[0]


def test_copy_to_is_refused_and_writes_nothing(sql, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    refused(sql, f"COPY (SELECT 1 AS a) TO '{out / 'x.csv'}' STORED AS CSV", "COPY TO is not allowed: SQL runs inside the store")
    refused(sql, f"COPY (SELECT * FROM \"AAPL/1Min/OHLCV\") TO '{out}/' STORED AS PARQUET", "COPY TO is not allowed")
    # Wrapped in EXPLAIN ANALYZE (which would run it) it is refused just the same.
    refused(sql, f"EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{out / 'y.csv'}' STORED AS CSV", "COPY TO is not allowed")
    assert list(out.iterdir()) == []


def test_external_tables_and_file_urls_are_refused(sql, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    secret = files / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    refused(sql, f"CREATE EXTERNAL TABLE secret (a INT, b INT) STORED AS CSV LOCATION '{secret}' OPTIONS ('format.has_header' 'true')",
            "CREATE EXTERNAL TABLE is not allowed: SQL runs inside the store")
    refused(sql, "SELECT * FROM secret", "secret")
    # No URL tables either: a quoted path is just an unknown table name.
    refused(sql, f"SELECT * FROM '{secret}'", "not found")
    # In-memory tables live outside the store and outside the memory pool.
    refused(sql, "CREATE TABLE t AS SELECT 1 AS a", "CREATE TABLE is not allowed")
    refused(sql, 'DROP TABLE "AAPL/1Min/OHLCV"', "DROP TABLE is not allowed")
    assert list(files.iterdir()) == [secret]


def test_set_does_not_outlive_its_statement(sql, srv):
    assert batch_size(srv) == 8192
    refused(sql, "SET datafusion.execution.batch_size = 1", "SET is not allowed: each statement runs in its own session")
    refused(sql, "SET datafusion.runtime.memory_limit = '100G'", "SET is not allowed")
    refused(sql, "RESET datafusion.execution.batch_size", "SET is not allowed")
    assert batch_size(srv) == 8192


def test_show_reads_settings(srv):
    a = Adbc(srv)
    try:
        t = a.run("SHOW datafusion.execution.batch_size")
        assert t.to_pydict() == {"name": ["datafusion.execution.batch_size"], "value": ["8192"]}
    finally:
        a.close()


def test_query_beyond_the_memory_pool_fails_alone(sql, srv):
    msg = refused(sql, BIG_GROUP_BY, "needs more memory than the SQL memory pool holds (sql_memory_limit_mb)")
    # DataFusion's own detail depends on which operator runs out first.
    assert any(t in msg for t in ("Resources exhausted", "Failed to allocate", "Memory Exhausted")), msg
    # The server is up and serves the next request, on every interface.
    with urllib.request.urlopen(f"{srv.http_url}/heartbeat", timeout=10) as r:
        assert r.status == 200
    t = sql.run('SELECT count(*) AS n, sum("Volume") AS v FROM "AAPL/1Min/OHLCV"')
    assert t.column("n").to_pylist() == [10] and t.column("v").to_pylist() == [45]
    # A smaller GROUP BY fits.
    t = sql.run("SELECT count(*) AS n FROM (SELECT value % 1000 AS k, count(*) AS c FROM range(100000) GROUP BY 1)")
    assert t.column("n").to_pylist() == [1000]


def test_collected_result_beyond_the_pool_fails_over_rpc(srv):
    # /rpc collects the whole result before packing it: 64 MB of int64 does not fit a 32 MB pool.
    refused(Rpc(srv), "SELECT value AS \"Epoch\" FROM range(8000000)", "needs more memory than the SQL memory pool holds")
    t = Rpc(srv).run('SELECT "Epoch", "Close" FROM "AAPL/1Min/OHLCV" ORDER BY "Epoch" LIMIT 2')
    assert t.column("Close").to_pylist() == [100.0, 101.0]


def test_insert_into_still_writes_through_the_engine(sql, srv, request):
    key = f"INS{request.node.callspec.id.upper()}/1Min/OHLCV"
    sql.run(f'INSERT INTO "*/1Min/OHLCV" SELECT "Epoch", "Close" * 2, "Volume", \'{key.split("/")[0]}\' FROM "AAPL/1Min/OHLCV"')
    c = fl.FlightClient(srv.flight_url)
    t = c.do_get(fl.Ticket(json.dumps({"destination": key}).encode())).read_all()
    assert t.column("Close").to_pylist() == [2.0 * (100 + i) for i in range(10)]
    assert t.column("Volume").to_pylist() == list(range(10))


def test_views_stay_available(srv):
    """CREATE VIEW is kept (a stored query over buckets, visible to every client until restart)."""
    a = Adbc(srv)
    try:
        a.run('CREATE VIEW closes AS SELECT "Epoch", "Close" FROM "AAPL/1Min/OHLCV" WHERE "Close" >= 105')
        assert Ticket(srv).run("SELECT count(*) AS n FROM closes").column("n").to_pylist() == [5]
        a.run("DROP VIEW closes")
        refused(Ticket(srv), "SELECT * FROM closes", "closes")
    finally:
        a.close()
