"""Distributed SQL on Ballista (issue #16): an mkts server whose two oldest years are tiered to a `file://`
store, a Ballista scheduler and two executors (`mkts-ballista`, separate processes). GROUP BY, time-bucket
and as-of join statements over hot + cold data return the same rows from the cluster (ADBC on the
scheduler's Flight SQL endpoint, and `mkts connect --ballista`) as from the server alone, with the cold years in a
`file://` store and in a real S3-compatible server on loopback (moto); the plan reads cold years from Parquet
on the store and hot years over Flight; an executor killed mid-query is replaced by the
other and the query still answers exactly."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pytest

from conftest import Server, free_port, mkts_bin
from test_flight_core import put
from test_tiering import S3Store, moto_server  # noqa: F401  (moto_server: the S3-compatible server fixture)

ROWS = 2000          # 1Min bars per symbol-year
QUOTES = 400         # 5Min quotes per symbol-year
SYMBOLS = ["AAPL", "MSFT"]
WIDE = 12            # hot-only buckets of */1Min/WIDE


def ballista_bin() -> str:
    cand = Path(mkts_bin()).with_name("mkts-ballista")
    if not cand.exists():
        raise RuntimeError(f"{cand} not found; run `cargo build --workspace` first")
    return str(cand)


def years() -> list[int]:
    y = dt.datetime.now(dt.timezone.utc).year
    return [y - 3, y - 2, y - 1]


def year_start(y: int) -> int:
    return int(dt.datetime(y, 1, 1, tzinfo=dt.timezone.utc).timestamp())


def bars(sym_i: int, y: int) -> pa.Table:
    ep = np.arange(ROWS, dtype="int64") * 60 + year_start(y)
    i = np.arange(ROWS, dtype="int64")
    return pa.table({
        "Epoch": ep,
        "Open": pa.array(100.0 * (sym_i + 1) + (i % 97) * 0.25, pa.float64()),
        "Close": pa.array(100.0 * (sym_i + 1) + (i % 89) * 0.5, pa.float64()),
        "Volume": pa.array(i * 3 + sym_i * 7 + y, pa.int64()),
    })


def quotes(sym_i: int, y: int) -> pa.Table:
    ep = np.arange(QUOTES, dtype="int64") * 300 + year_start(y) + 30
    return pa.table({"Epoch": ep, "Bid": pa.array(np.arange(QUOTES) * 0.01 + sym_i, pa.float64())})


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not open:\n{log.read_text(errors='replace')}")


class Cluster:
    def __init__(self, workdir: Path, config: Path, env: dict | None = None):
        self.workdir, self.config = workdir, config
        self.env = env or {}  # extra environment of every process (e.g. MKTS_USER / MKTS_PASSWORD)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        p = subprocess.Popen([ballista_bin(), *args], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                             cwd=self.workdir, env=dict(os.environ, RUST_LOG="info", **self.env))
        self.procs[name] = p
        return p

    def start_scheduler(self) -> None:
        p = self._spawn("scheduler", ["scheduler", "--config", str(self.config), "--port", str(self.port),
                                      "--executor-timeout", "4"])
        wait_port(self.port, p, self.logs["scheduler"])

    def start_executor(self, name: str) -> None:
        port, grpc = free_port(), free_port()
        work = self.workdir / f"{name}-work"
        work.mkdir(exist_ok=True)
        p = self._spawn(name, ["executor", "--config", str(self.config), "--scheduler", f"127.0.0.1:{self.port}",
                               "--port", str(port), "--grpc-port", str(grpc), "--concurrent-tasks", "2",
                               "--work-dir", str(work), "--heartbeat", "1"])
        wait_port(port, p, self.logs[name])

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def query(url: str, text: str) -> pa.Table:
    with dbapi.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(text)
        return cur.fetch_arrow_table()


def normalized(t: pa.Table) -> pa.Table:
    """The same rows regardless of how each engine typed nullability."""
    return pa.table({n: t.column(n).combine_chunks() for n in t.column_names})


class LocalStore:
    def __init__(self, path: Path):
        self.path = path

    def config(self) -> str:
        return f"tiering:\n  store: file://{self.path}\n  after: 1y\n"

    def objects(self) -> list[str]:
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*.parquet"))


@pytest.fixture(scope="module", params=["file", "s3"])
def setup(request, tmp_path_factory):
    """The server, its store (a `file://` directory, or a bucket on a real S3-compatible server on
    loopback) and the cluster; executors read cold objects from that store with the settings in the
    server's mkts.yml."""
    wd = tmp_path_factory.mktemp("ballista")
    if request.param == "file":
        store = LocalStore(wd / "cold")
    else:
        store = S3Store(request.getfixturevalue("moto_server"), f"mkts-ballista-{os.getpid()}-{int(time.time() * 1000) % 10**9}")
    (wd / "server").mkdir()
    srv = Server(wd / "server", store.config())
    srv.start()
    c = fl.FlightClient(srv.flight_url)
    for i, s in enumerate(SYMBOLS):
        put(c, f"{s}/1Min/OHLCV", pa.concat_tables([bars(i, y) for y in years()]))
        put(c, f"{s}/5Min/QUOTE", pa.concat_tables([quotes(i, y) for y in years()]))
    # Many hot buckets: one table scan of many partitions, more than a task's share.
    for i in range(WIDE):
        put(c, f"W{i:02d}/1Min/WIDE", bars(i, years()[-1]).slice(0, 50 + i))
    srv.stop()  # the final checkpoint moves the two sealed years
    srv.start()
    cluster = Cluster(wd, srv.config_path)
    try:
        cluster.start_scheduler()
        cluster.start_executor("executor1")
        cluster.start_executor("executor2")
        # The executors register with their first heartbeat.
        deadline = time.time() + 60
        while True:
            try:
                if query(cluster.url, "SELECT 1 AS one").column("one").to_pylist() == [1]:
                    break
            except Exception:  # noqa: BLE001
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield srv, cluster, store
    finally:
        cluster.stop()
        srv.stop()


def test_the_sealed_years_are_cold(setup):
    srv, _, store = setup
    a, b, last = years()
    c = fl.FlightClient(srv.flight_url)
    for f in c.list_flights():
        if f.descriptor.path[0].decode().endswith("/WIDE"):
            continue
        parts = json.loads(f.app_metadata)["partitions"]
        assert [(p["year"], p["tier"]) for p in parts] == [(a, "cold"), (b, "cold"), (last, "hot")]
    assert len(store.objects()) == 2 * 2 * len(SYMBOLS)


STATEMENTS = {
    "group_by": 'SELECT "Symbol", count(*) AS n, sum("Volume") AS v, min("Open") AS lo, max("Close") AS hi '
                'FROM "*/1Min/OHLCV" GROUP BY "Symbol" ORDER BY "Symbol"',
    "time_bucket": 'SELECT "Symbol", time_bucket(\'1D\', "Epoch") AS "Day", first_value("Open" ORDER BY "Epoch") AS "Open", '
                   'max("Close") AS "High", last_value("Close" ORDER BY "Epoch") AS "Close", sum("Volume") AS "Volume" '
                   'FROM "*/1Min/OHLCV" GROUP BY 1, 2 ORDER BY 1, 2',
    "range": 'SELECT count(*) AS n, sum("Volume") AS v FROM "AAPL/1Min/OHLCV" '
             'WHERE "Epoch" >= to_timestamp_seconds({s}) AND "Epoch" <= to_timestamp_seconds({e})',
    "wide": 'SELECT "Symbol", count(*) AS n, sum("Volume") AS v FROM "*/1Min/WIDE" GROUP BY 1 ORDER BY 1',
    "asof": 'SELECT * FROM asof_join(\'*/1Min/OHLCV\', \'*/5Min/QUOTE\', \'Epoch\', \'Symbol\') '
            'ORDER BY "Symbol", "Epoch"',
}


def statement(name: str) -> str:
    _, b, last = years()
    return STATEMENTS[name].format(s=year_start(b) + 60 * 1500, e=year_start(last) + 60 * 20)


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_the_cluster_answers_as_the_server_does(setup, name):
    srv, cluster, _ = setup
    text = statement(name)
    alone = normalized(query(srv.flight_url, text))
    on_cluster = normalized(query(cluster.url, text))
    assert on_cluster.num_rows > 0
    assert on_cluster.column_names == alone.column_names
    assert on_cluster.to_pylist() == alone.to_pylist()


def test_exact_values_over_hot_and_cold(setup):
    _, cluster, _ = setup
    t = query(cluster.url, statement("group_by")).to_pylist()
    for i, s in enumerate(SYMBOLS):
        data = pa.concat_tables([bars(i, y) for y in years()])
        assert t[i]["Symbol"] == s
        assert t[i]["n"] == 3 * ROWS
        assert t[i]["v"] == sum(data.column("Volume").to_pylist())
        assert t[i]["lo"] == min(data.column("Open").to_pylist())
        assert t[i]["hi"] == max(data.column("Close").to_pylist())
    _, b, last = years()
    s, e = year_start(b) + 60 * 1500, year_start(last) + 60 * 20
    r = query(cluster.url, statement("range")).to_pylist()[0]
    want = [v for ep, v in zip(*(pa.concat_tables([bars(0, y) for y in years()]).column(c).to_pylist() for c in ("Epoch", "Volume"))) if s <= ep <= e]
    assert (r["n"], r["v"]) == (len(want), sum(want))
    wide = query(cluster.url, statement("wide")).to_pylist()
    assert [(w["Symbol"], w["n"]) for w in wide] == [(f"W{i:02d}", 50 + i) for i in range(WIDE)]


def test_the_plan_reads_cold_parquet_and_hot_flight(setup):
    _, cluster, _ = setup
    plan = query(cluster.url, 'EXPLAIN SELECT sum("Volume") FROM "*/1Min/OHLCV"')
    text = "\n".join(str(v) for v in plan.column(plan.column_names[-1]).to_pylist())
    assert "file_type=mkts-flight" in text and "parts=2" in text, text
    assert "file_type=parquet" in text and "year=" in text and ".parquet" in text, text


def test_mkts_connect_ballista(setup):
    srv, cluster, _ = setup
    text = statement("group_by")
    out = subprocess.run([mkts_bin(), "connect", "--ballista", cluster.url, "-c", text],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    alone = subprocess.run([mkts_bin(), "connect", "--url", srv.flight_url, "-c", text],
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    assert out.stdout == alone.stdout and "AAPL" in out.stdout and "MSFT" in out.stdout
    # `mkts ballista` runs the cluster binary.
    v = subprocess.run([mkts_bin(), "ballista", "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("mkts-ballista"), v.stderr


def test_an_executor_killed_mid_query_is_retried(setup):
    """A self-join on Symbol (2 x 6000^2 matches) keeps the executors busy for a while; the first executor to
    receive a task of the query is killed right then. The scheduler notices the lost executor (no heartbeat
    for `--executor-timeout`), runs its tasks on the other one, and the count is exact. A replacement
    executor joins afterwards."""
    _, cluster, _ = setup
    text = 'SELECT count(*) AS n FROM "*/1Min/OHLCV" a JOIN "*/1Min/OHLCV" b ON a."Symbol" = b."Symbol"'
    want = len(SYMBOLS) * (3 * ROWS) ** 2
    result: dict = {}

    def run():
        try:
            result["t"] = query(cluster.url, text)
        except Exception as e:  # noqa: BLE001
            result["e"] = e

    names = ["executor1", "executor2"]
    seen = {n: cluster.logs[n].read_text(errors="replace").count("Execute task") for n in names}
    th = threading.Thread(target=run)
    th.start()
    victim = None
    deadline = time.time() + 60
    while victim is None and th.is_alive() and time.time() < deadline:
        for n in names:
            if cluster.logs[n].read_text(errors="replace").count("Execute task") > seen[n]:
                victim = n
                break
        else:
            time.sleep(0.005)
    assert victim is not None and th.is_alive(), f"the query ended before an executor could be killed: {result}"
    cluster.procs[victim].kill()
    cluster.procs[victim].wait()
    th.join(240)
    assert not th.is_alive(), "the query did not answer after an executor was killed"
    assert "e" not in result, result.get("e")
    assert result["t"].column("n").to_pylist() == [want]
    survivor = next(n for n in names if n != victim)
    assert cluster.procs[survivor].poll() is None
    cluster.start_executor("executor3")


def test_a_cluster_reads_a_server_with_users(tmp_path):
    """With `auth:` on the server, the scheduler and executors read with MKTS_USER / MKTS_PASSWORD from
    their environment (a read-only user is enough); without them the statement fails with the server's
    refusal. The password appears in no log."""
    from test_tls_auth import hash_password
    password = "cluster-reader-pw-never-logged"
    (tmp_path / "server").mkdir()
    srv = Server(tmp_path / "server", "auth:\n  users:\n    - name: reader\n"
                 f"      password_hash: \"{hash_password(password)}\"\n      role: read_only\n"
                 "    - name: writer\n"
                 f"      password_hash: \"{hash_password(password + '-w')}\"\n      role: read_write\n")
    srv.start()
    cluster = Cluster(tmp_path, srv.config_path, env={"MKTS_USER": "reader", "MKTS_PASSWORD": password})
    try:
        c = fl.FlightClient(srv.flight_url)
        token = c.authenticate_basic_token(b"writer", (password + "-w").encode())
        opts = fl.FlightCallOptions(headers=[token])
        data = bars(0, years()[-1]).slice(0, 300)
        w, r = c.do_put(fl.FlightDescriptor.for_path("AAPL/1Min/OHLCV"), data.schema, options=opts)
        w.write_table(data)
        w.close()
        text = 'SELECT count(*) AS n, sum("Volume") AS v FROM "AAPL/1Min/OHLCV"'
        cluster.start_scheduler()
        cluster.start_executor("executor1")
        deadline = time.time() + 60
        while True:
            try:
                got = query(cluster.url, text).to_pylist()
                break
            except Exception:  # noqa: BLE001
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        assert got == [{"n": 300, "v": sum(data.column("Volume").to_pylist())}]
        cluster.stop()
        # The same cluster without credentials: the server refuses, and the statement says so.
        (tmp_path / "bare").mkdir()
        bare = Cluster(tmp_path / "bare", srv.config_path)
        bare.start_scheduler()
        bare.start_executor("executor1")
        time.sleep(2)
        with pytest.raises(Exception, match="(?i)unauthenticated|credentials|authoriz"):
            query(bare.url, text)
        bare.stop()
        for log in list(cluster.logs.values()) + list(bare.logs.values()) + [srv.log_path]:
            assert password not in log.read_text(errors="replace"), log
    finally:
        cluster.stop()
        srv.stop()
