"""`mkts connect` (every session command, non-interactive and through a pty), `\\load` with a MarketStore
control file, and `mkts import` / `mkts export` round trips (CSV, Parquet) against a real server and an
embedded data directory."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as fl
import pyarrow.parquet as pq
import pytest

from conftest import mkts_bin

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z


def mkts(*args, check=True, timeout=60, cwd=None):
    p = subprocess.run([mkts_bin(), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"mkts {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def shell(srv, *commands, check=True):
    args = ["connect", "--url", srv.grpc_addr]
    for c in commands:
        args += ["-c", c]
    return mkts(*args, check=check)


def bars(n=10, base=100.0):
    return pa.table({
        "Epoch": pa.array(T0 + 60 * np.arange(n, dtype=np.int64)),
        "Open": pa.array(base + np.arange(n, dtype=np.float32)),
        "Close": pa.array(base + 0.5 + np.arange(n, dtype=np.float32)),
        "Volume": pa.array(np.arange(n, dtype=np.int64) * 10),
    })


def put(srv, key, table):
    c = fl.FlightClient(srv.flight_url)
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), table.schema)
    w.write_table(table)
    w.done_writing()
    r.read()
    w.close()


def read(srv, key):
    c = fl.FlightClient(srv.flight_url)
    return c.do_get(fl.Ticket(json.dumps({"destination": key}).encode())).read_all()


def test_session_commands(server, tmp_path):
    put(server, "AAPL/1Min/OHLCV", bars())
    out = shell(server,
                "\\create TSLA/1Min/OHLCV:Symbol/Timeframe/AttributeGroup Open,Close/float32:Volume/int64 fixed",
                "\\getinfo TSLA/1Min/OHLCV",
                "\\tables",
                "\\timing",
                "SELECT count(*) AS n FROM `AAPL/1Min/OHLCV`;",
                "\\show AAPL/1Min/OHLCV 2024-01-01T00:02 2024-01-01T00:04",
                "\\destroy TSLA/1Min/OHLCV",
                "\\help").stdout
    assert "created TSLA/1Min/OHLCV" in out
    assert "Bucket: TSLA/1Min/OHLCV" in out and "RecordType: FIXED" in out and "Open:f4 Close:f4 Volume:i8" in out
    assert "| */1Min/OHLCV" in out and "| AAPL/1Min/OHLCV" in out and "| TSLA/1Min/OHLCV" in out
    assert "Timing is on." in out and "Elapsed query time:" in out
    assert "| 10 |" in out
    # \show: 00:02..00:04 inclusive = 3 rows.
    assert "2024-01-01T00:02:00Z | 102.0 | 102.5" in out and "2024-01-01T00:04:00Z" in out and "(3 rows * 4 columns)" in out
    assert "destroyed TSLA/1Min/OHLCV" in out
    assert "\\load KEY FILE.csv" in out
    keys = [f.descriptor.path[0].decode() for f in fl.FlightClient(server.flight_url).list_flights()]
    assert keys == ["AAPL/1Min/OHLCV"]
    # \o writes CSV.
    csv = tmp_path / "out.csv"
    shell(server, f"\\o {csv}", "SELECT Epoch, Close FROM \"AAPL/1Min/OHLCV\" ORDER BY Epoch LIMIT 2")
    assert csv.read_text().splitlines() == ["Epoch,Close", "2024-01-01T00:00:00Z,100.5", "2024-01-01T00:01:00Z,101.5"]
    # Errors fail the command with a clear message.
    p = shell(server, 'SELECT * FROM "NOPE/1Min/OHLCV"', check=False)
    assert p.returncode != 0 and "NOPE/1Min/OHLCV" in p.stderr


def test_insert_select_from_shell(server):
    put(server, "AAPL/1Min/OHLCV", bars(120))
    out = shell(server,
                "\\create AAPL/1H/OHLCV Open,Close/float32:Volume/int64 fixed",
                "INSERT INTO \"AAPL/1H/OHLCV\" SELECT date_bin(INTERVAL '1 hour', Epoch), first_value(Open ORDER BY Epoch), "
                "last_value(Close ORDER BY Epoch), sum(Volume) FROM \"AAPL/1Min/OHLCV\" GROUP BY 1").stdout
    assert "| 2     |" in out
    t = read(server, "AAPL/1H/OHLCV").to_pydict()
    assert t["Open"] == [100.0, 160.0] and t["Close"] == [159.5, 219.5]
    assert t["Volume"] == [sum(range(0, 60)) * 10, sum(range(60, 120)) * 10]


def test_load_csv_with_control_file(server, tmp_path):
    shell(server, "\\create ES/1Min/OHLCV Open,High,Low,Close/float32:Volume/int32 fixed")
    # Header-less file, date and time in two columns, New York time, Go layout.
    data = tmp_path / "es.csv"
    data.write_text("20240102,09:30:00,4700.25,4701,4699.5,4700.75,120\n"
                    "20240102,09:31:00,4700.75,4702,4700,4701.5,80\n"
                    "20240102,09:32:00,4701.5,4703.25,4701,4703,95\n")
    ctl = tmp_path / "es.yaml"
    ctl.write_text("firstRowHasColumnNames: false\n"
                   "timeFormat: \"20060102 15:04:05\"\n"
                   "timeZone: America/New_York\n"
                   "columnNameMap:\n  0: Epoch-date\n  1: Epoch-time\n  2: Open\n  3: High\n  4: Low\n  5: Close\n  6: Volume\n")
    out = shell(server, f"\\load ES/1Min/OHLCV {data} {ctl}").stdout
    assert "imported 3 rows into ES/1Min/OHLCV" in out
    t = read(server, "ES/1Min/OHLCV").to_pydict()
    # 09:30 New York (EST, UTC-5) = 14:30 UTC.
    assert [int(e.timestamp()) for e in t["Epoch"]] == [1704205800, 1704205860, 1704205920]
    assert t["Close"] == [4700.75, 4701.5, 4703.0] and t["Volume"] == [120, 80, 95]
    # With a header and Unix timestamps; columns matched by name, case-insensitive, any order.
    data2 = tmp_path / "es2.csv"
    data2.write_text("volume,epoch,open,high,low,close\n10,1704205980.5,1,2,0.5,1.5\n")
    ctl2 = tmp_path / "es2.yaml"
    ctl2.write_text("firstRowHasColumnNames: true\ntimeFormat: timestamp\n")
    shell(server, f"\\load ES/1Min/OHLCV {data2} {ctl2}")
    t = read(server, "ES/1Min/OHLCV").to_pydict()
    assert len(t["Close"]) == 4 and t["Close"][-1] == 1.5 and t["Volume"][-1] == 10


def epochs_s(table):
    return table.column("Epoch").cast(pa.int64()).to_pylist() if table.schema.field("Epoch").type == pa.int64() else \
        [int(x.timestamp()) for x in table.column("Epoch").to_pylist()]


def test_parquet_and_csv_round_trip(server, tmp_path):
    src = bars(5000)
    pq.write_table(src, tmp_path / "in.parquet")
    p = mkts("import", "--url", server.grpc_addr, "AAPL/1Min/OHLCV", str(tmp_path / "in.parquet"))
    assert "imported 5000 rows into AAPL/1Min/OHLCV" in p.stderr and "rows/s" in p.stderr
    p = mkts("export", "--url", server.grpc_addr, "--key", "AAPL/1Min/OHLCV", str(tmp_path / "out.parquet"))
    assert "exported 5000 rows" in p.stderr
    back = pq.read_table(tmp_path / "out.parquet")
    assert back.schema.field("Epoch").type == pa.timestamp("us", tz="UTC")
    assert epochs_s(back) == src.column("Epoch").to_pylist()
    for c in ["Open", "Close", "Volume"]:
        assert back.column(c).to_pylist() == src.column(c).to_pylist()
    # Parquet back into another bucket, then CSV out and in again.
    mkts("import", "--url", server.grpc_addr, "COPY/1Min/OHLCV", str(tmp_path / "out.parquet"))
    mkts("export", "--url", server.grpc_addr, "--sql", 'SELECT * FROM "COPY/1Min/OHLCV" WHERE Epoch < \'2024-01-01T01:00:00Z\'',
         str(tmp_path / "hour.csv"))
    hour = pacsv.read_csv(tmp_path / "hour.csv")
    assert hour.num_rows == 60
    mkts("import", "--url", server.grpc_addr, "HOUR/1Min/OHLCV", str(tmp_path / "hour.csv"))
    t = read(server, "HOUR/1Min/OHLCV")
    assert t.column("Close").to_pylist() == src.column("Close").to_pylist()[:60]
    assert t.column("Volume").to_pylist() == src.column("Volume").to_pylist()[:60]


def test_embedded_dir_mode(tmp_path):
    root = tmp_path / "data"
    src = bars(30)
    pq.write_table(src, tmp_path / "in.parquet")
    mkts("import", "--dir", str(root), "AAPL/1Min/OHLCV", str(tmp_path / "in.parquet"))
    out = mkts("connect", "--dir", str(root), "-c", 'SELECT count(*) AS n, sum(Volume) AS v FROM "*/1Min/OHLCV"',
               "-c", "EXPLAIN SELECT * FROM \"AAPL/1Min/OHLCV\" WHERE Epoch >= '2024-01-01T00:10:00Z' LIMIT 5").stdout
    assert "| 30 | 4350 |" in out
    assert "BucketScanExec: table=AAPL/1Min/OHLCV buckets=1 epoch_range=[2024-01-01T00:10:00Z, +inf) limit=5" in out
    # Script on stdin.
    p = subprocess.run([mkts_bin(), "connect", "--dir", str(root)], input='\\getinfo AAPL/1Min/OHLCV\nSELECT 1 + 1 AS two\n',
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Rows: 30" in p.stdout and "| 2   |" in p.stdout


def test_interactive_shell_through_pty(server):
    put(server, "AAPL/1Min/OHLCV", bars())
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.environ["HOME"] = "/tmp"
        os.execv(mkts_bin(), [mkts_bin(), "connect", "--url", server.grpc_addr])
    out = b""

    def read_until(token: bytes, timeout=30.0):
        nonlocal out
        deadline = time.time() + timeout
        while token not in out and time.time() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
        return token in out

    try:
        assert read_until("» ".encode()), out
        os.write(fd, b'SELECT max(Close) AS top FROM "AAPL/1Min/OHLCV";\r')
        assert read_until(b"109.5"), out
        os.write(fd, b"\\q\r")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
        os.close(fd)
    assert b"| top   |" in out


def test_trim_deletes_one_bucket_from_a_date_to_the_end_of_its_year(server, tmp_path):
    # Three rows in 2023, ten on 2024-01-01 (00:00..00:09), one in 2025; another bucket untouched.
    y2023, y2025 = T0 - 86_400, T0 + 366 * 86_400
    t = pa.table({"Epoch": pa.array([y2023, y2023 + 60, y2023 + 120], pa.int64()), "Open": pa.array([1.0] * 3, pa.float32()),
                  "Close": pa.array([1.0] * 3, pa.float32()), "Volume": pa.array([1] * 3, pa.int64())})
    put(server, "AAPL/1Min/OHLCV", t)
    put(server, "AAPL/1Min/OHLCV", bars())
    put(server, "AAPL/1Min/OHLCV", pa.table({"Epoch": pa.array([y2025], pa.int64()), "Open": pa.array([2.0], pa.float32()),
                                             "Close": pa.array([2.0], pa.float32()), "Volume": pa.array([2], pa.int64())}))
    put(server, "MSFT/1Min/OHLCV", bars())
    out = shell(server, "\\trim AAPL/1Min/OHLCV 2024-01-01T00:05").stdout
    assert "trimmed 5 rows of AAPL/1Min/OHLCV from 2024-01-01T00:05 to the end of 2024" in out
    epochs = read(server, "AAPL/1Min/OHLCV").column("Epoch").cast(pa.int64()).to_pylist()
    assert epochs == [y2023, y2023 + 60, y2023 + 120] + [T0 + 60 * i for i in range(5)] + [y2025]
    assert read(server, "MSFT/1Min/OHLCV").num_rows == 10
    # The embedded mode too, and a clear error for bad arguments.
    server.stop()
    out = mkts("connect", "--dir", str(server.root), "-c", "\\trim AAPL/1Min/OHLCV 2023-12-31T00:01").stdout
    assert "trimmed 2 rows" in out
    bad = mkts("connect", "--dir", str(server.root), "-c", "\\trim AAPL/1Min/OHLCV", check=False)
    assert bad.returncode != 0 and "\\trim KEY DATE" in bad.stderr


def ticks_ns(srv, key):
    """Epoch of a tick bucket as exact nanoseconds (int)."""
    c = fl.FlightClient(srv.flight_url)
    t = c.do_get(fl.Ticket(json.dumps({"destination": key, "epoch_ns": True}).encode())).read_all()
    return t.column("Epoch").cast(pa.int64()).to_pylist(), t


# 2024-01-02 09:30:00 America/New_York (EST) = 14:30:00 UTC.
NY_0930_NS = 1_704_205_800 * 10**9
LOADER_CTL = "firstRowHasColumnNames: true\ntimeFormat: \"20060102 15:04:05\"\ntimeZone: America/New_York\n"
# A header with spaces after the commas, and sub-second fields after the timeFormat part (MarketStore's loader:
# six digits are microseconds, a short field milliseconds).
LOADER_CSV = ("Epoch, Bid, Ask\n"
              "20240102 09:30:00 250000, 1.5, 2.5\n"
              "20240102 09:30:00 14, 1.25, 2.25\n"
              "20240102 09:30:01, 1.75 ,2.75\n")


@pytest.mark.parametrize("via", ["flight", "jsonrpc"])
def test_load_as_marketstore_loader_reads_headers_fractions_and_time_zone(server, tmp_path, via):
    url = server.grpc_addr if via == "flight" else f"http://127.0.0.1:{server.http_port}"
    data, ctl = tmp_path / "q.csv", tmp_path / "q.yaml"
    data.write_text(LOADER_CSV)
    ctl.write_text(LOADER_CTL)
    out = mkts("connect", "--url", url, "-c", "\\create Q/1Sec/TICK Bid,Ask/float32 variable",
               "-c", f"\\load Q/1Sec/TICK {data} {ctl}").stdout
    assert "imported 3 rows into Q/1Sec/TICK" in out
    epochs, t = ticks_ns(server, "Q/1Sec/TICK")
    assert epochs == [NY_0930_NS + 14_000_000, NY_0930_NS + 250_000_000, NY_0930_NS + 10**9]
    assert t.column("Bid").to_pylist() == [1.25, 1.5, 1.75]
    assert t.column("Ask").to_pylist() == [2.25, 2.5, 2.75]
    # `mkts import` shares the reader: a new bucket gets the trimmed names as its columns.
    p = mkts("import", "--url", url, "NEW/1Min/QUOTE", str(data), "--control", str(ctl))
    assert "imported 3 rows into NEW/1Min/QUOTE" in p.stderr
    t = read(server, "NEW/1Min/QUOTE")
    assert t.column_names == ["Epoch", "Bid", "Ask"]
    # A fixed 1Min bucket keeps one row per interval: the three times fall in one bar.
    assert [int(e.timestamp()) for e in t.column("Epoch").to_pylist()] == [NY_0930_NS // 10**9]
    # A sub-second field of another length is an error naming it, and nothing is written.
    bad = tmp_path / "bad.csv"
    bad.write_text("Epoch, Bid, Ask\n20240102 09:30:02 1234, 1, 2\n")
    p = mkts("connect", "--url", url, "-c", f"\\load Q/1Sec/TICK {bad} {ctl}", check=False)
    assert p.returncode != 0 and 'sub-second field "1234"' in p.stderr, p.stderr
    assert len(ticks_ns(server, "Q/1Sec/TICK")[0]) == 3


def test_connect_over_jsonrpc_to_the_http_port(server, tmp_path):
    put(server, "AAPL/1Min/OHLCV", bars())
    url = f"http://127.0.0.1:{server.http_port}"
    out = mkts("connect", "--url", url,
               "-c", "\\create TSLA/1Min/OHLCV:Symbol/Timeframe/AttributeGroup Open,Close/float32:Volume/int64 fixed",
               "-c", "\\getinfo TSLA/1Min/OHLCV",
               "-c", "\\tables",
               "-c", "SELECT count(*) AS n FROM `AAPL/1Min/OHLCV`;",
               "-c", "\\show AAPL/1Min/OHLCV 2024-01-01T00:02 2024-01-01T00:04",
               "-c", "\\destroy TSLA/1Min/OHLCV").stdout
    assert "created TSLA/1Min/OHLCV" in out
    assert "Bucket: TSLA/1Min/OHLCV" in out and "RecordType: FIXED" in out and "Open:f4 Close:f4 Volume:i8" in out
    assert "| AAPL/1Min/OHLCV" in out and "| TSLA/1Min/OHLCV" in out
    assert "| 10 |" in out
    assert "2024-01-01T00:02:00Z | 102.0 | 102.5" in out and "2024-01-01T00:04:00Z" in out and "(3 rows * 4 columns)" in out
    assert "destroyed TSLA/1Min/OHLCV" in out
    assert [f.descriptor.path[0].decode() for f in fl.FlightClient(server.flight_url).list_flights()] == ["AAPL/1Min/OHLCV"]
    # The server's errors come back with its message; \trim is not in MarketStore's JSON-RPC API.
    p = mkts("connect", "--url", url, "-c", "\\destroy NOPE/1Min/OHLCV", check=False)
    assert p.returncode != 0 and "removal of catalog entry failed" in p.stderr, p.stderr
    p = mkts("connect", "--url", url, "-c", "\\getinfo NOPE/1Min/OHLCV", check=False)
    assert p.returncode != 0 and "not found:" in p.stderr and "NOPE/1Min/OHLCV" in p.stderr, p.stderr
    # `mkts export` takes the same url: its query goes as /rpc's SQL statement.
    out_csv = tmp_path / "out.csv"
    p = mkts("export", "--url", url, "--key", "AAPL/1Min/OHLCV", "--start", "2024-01-01T00:07", str(out_csv))
    assert "exported 3 rows" in p.stderr, p.stderr
    lines = out_csv.read_text().splitlines()
    assert lines[0].startswith("Epoch,") and lines[1].startswith("2024-01-01T00:07:00Z,107") and len(lines) == 4, lines
    p = mkts("connect", "--url", url, "-c", "\\trim AAPL/1Min/OHLCV 2024-01-01T00:05", check=False)
    assert p.returncode != 0 and "not part of MarketStore's JSON-RPC API" in p.stderr, p.stderr
    # A bare host:port finds the protocol by asking: the HTTP port speaks JSON-RPC, the gRPC port Flight SQL
    # (where \trim works).
    out = mkts("connect", "--url", f"127.0.0.1:{server.http_port}", "-c", "\\show AAPL/1Min/OHLCV 2024-01-01T00:09").stdout
    assert "2024-01-01T00:09:00Z | 109.0 | 109.5" in out and "(1 row * 4 columns)" in out
    out = mkts("connect", "--url", server.grpc_addr, "-c", "\\trim AAPL/1Min/OHLCV 2024-01-01T00:05").stdout
    assert "trimmed 5 rows" in out
    p = mkts("connect", "--url", f"ftp://127.0.0.1:{server.http_port}", "-c", "SELECT 1", check=False)
    assert p.returncode != 0 and "unknown url scheme" in p.stderr
