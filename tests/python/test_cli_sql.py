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
