"""The plugin host against the real server: shared-library (Rust cdylib on plugins/api) and out-of-process
(Python, pyarrow.flight) triggers and workers, `on` matching, isolation, restarts, lag/drops, shutdown.

The example plugins are the ones in plugins/examples; the test command builds the Rust ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from conftest import REPO

PY_EXAMPLES = REPO / "plugins" / "examples" / "python"
MIRROR = PY_EXAMPLES / "mirror_trigger.py"
TICKER = PY_EXAMPLES / "ticker_worker.py"


def lib_dir() -> Path:
    tgt = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    return tgt / "debug"


def rust_lib(name: str) -> str:
    p = lib_dir() / f"libmkts_example_{name}.so"
    if not p.exists():
        raise RuntimeError(f"{p} not built: run ./test.sh (cargo build -p mkts-example-{name})")
    return str(p)


def client(srv) -> flight.FlightClient:
    return flight.connect(srv.flight_url)


def put(c: flight.FlightClient, key: str, table: pa.Table) -> int:
    writer, reader = c.do_put(flight.FlightDescriptor.for_path(key), table.schema)
    writer.write_table(table)
    writer.done_writing()
    buf = reader.read()
    writer.close()
    return json.loads(buf.to_pybytes())["rows"] if buf is not None else table.num_rows


def read(c: flight.FlightClient, key: str) -> pa.Table | None:
    try:
        return c.do_get(flight.Ticket(json.dumps({"destination": key}).encode())).read_all()
    except (flight.FlightError, pa.ArrowKeyError):
        return None


def bars(epochs, opens) -> pa.Table:
    return pa.table({"Epoch": pa.array(epochs, pa.int64()), "Open": pa.array(opens, pa.float64())})


def wait_for(pred, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def rows(c, key, n):
    """The table at `key` once it has exactly `n` rows."""
    return wait_for(lambda: (t := read(c, key)) is not None and t.num_rows >= n and t, what=f"{n} rows in {key}")


def metrics(srv) -> dict[tuple[str, str], float]:
    """`{(series, entry): value}` of the plugin series in /metrics."""
    text = urllib.request.urlopen(f"{srv.http_url}/metrics", timeout=5).read().decode()
    out = {}
    for m in re.finditer(r'^(mkts_(?:plugin|trigger)_\w+)\{[^}]*entry="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def epochs(t: pa.Table) -> list[int]:
    return t.column("Epoch").cast(pa.int64()).to_pylist()


def test_shared_library_trigger_and_worker_fire_with_exactly_the_appended_rows(server_factory):
    srv = server_factory(f"""
triggers:
  - module: {rust_lib('trigger')}
    on: */1Min/OHLCV
bgworkers:
  - module: {rust_lib('worker')}
    name: ticker
    config:
      key: TICKER/1Min/OHLCV
      interval_ms: 20
      count: 5
""")
    c = client(srv)
    assert put(c, "AAPL/1Min/OHLCV", bars([60, 120, 180], [1.5, 2.5, 3.5])) == 3
    assert put(c, "AAPL/1Min/OHLCV", bars([240], [4.5])) == 1
    assert put(c, "AAPL/5Min/OHLCV", bars([300], [9.0])) == 1  # does not match `on`

    copy = rows(c, "AAPL_COPY/1Min/OHLCV", 4)
    assert epochs(copy) == [60, 120, 180, 240]
    assert copy.column("Open").to_pylist() == [1.5, 2.5, 3.5, 4.5]
    # Writes from MarketStore's interfaces fire triggers too (JSON-RPC and gRPC through pymarketstore).
    import numpy as np
    import pymarketstore as pymkts

    arr = np.array([(600, 7.0)], dtype=[("Epoch", "i8"), ("Open", "f8")])
    pymkts.Client(srv.rpc_url).write(arr, "RPC/1Min/OHLCV")
    pymkts.Client(grpc=True, endpoint=srv.grpc_addr).write(arr, "GRPC/1Min/OHLCV")
    for k in ("RPC_COPY/1Min/OHLCV", "GRPC_COPY/1Min/OHLCV"):
        t = rows(c, k, 1)
        assert epochs(t) == [600] and t.column("Open").to_pylist() == [7.0]
    # The worker's writes are durable, and they fire triggers like any other write.
    ticker = rows(c, "TICKER/1Min/OHLCV", 5)
    assert epochs(ticker) == [0, 60, 120, 180, 240]
    assert ticker.column("Value").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    tcopy = rows(c, "TICKER_COPY/1Min/OHLCV", 5)
    assert tcopy.column("Value").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    time.sleep(0.3)
    assert read(c, "AAPL_COPY/5Min/OHLCV") is None
    # A copy is never copied again.
    assert read(c, "AAPL_COPY_COPY/1Min/OHLCV") is None
    m = metrics(srv)
    assert m[("mkts_plugin_up", "triggers[0]")] == 1
    assert m[("mkts_trigger_fired_total", "triggers[0]")] >= 4
    # The same state as a Flight action.
    state = json.loads(next(iter(c.do_action(flight.Action("plugins", b"")))).body.to_pybytes())["plugins"]
    assert [(p["entry"], p["role"], p["kind"]) for p in state] == [("triggers[0]", "trigger", "shared_library"), ("bgworkers[0]", "worker", "shared_library")]
    assert state[0]["up"] is True and state[0]["dropped"] == 0 and state[0]["queued"] == 0 and state[0]["fired"] >= 4
    assert state[1]["queued"] is None
    assert m[("mkts_trigger_dropped_total", "triggers[0]")] == 0
    assert srv.stop() == 0
    log = srv.log()
    assert "stopped after row 5" in log


def test_on_patterns_are_anchored_globs_per_segment(server_factory):
    lib = rust_lib("trigger")
    srv = server_factory(f"""
triggers:
  - module: {lib}
    on: "AA*/1Min/OHLCV"
    config: {{destination: "{{symbol}}/{{timeframe}}/GLOB"}}
  - module: {lib}
    on: "*/1Min/*"
    config: {{destination: "{{symbol}}/{{timeframe}}/ANY"}}
  - module: {lib}
    on: "MSFT/*/OHLCV"
    config: {{destination: "{{symbol}}/{{timeframe}}/EXACT"}}
""")
    c = client(srv)
    for key in ["AAPL/1Min/OHLCV", "XAAPL/1Min/OHLCV", "AAPL/1Min/OHLCVX", "MSFT/1D/OHLCV", "MSFT/1D/OHLCVX", "AAPL/1Min/TRADE"]:
        put(c, key, bars([60], [1.0]))
    # Each expected copy arrives; then nothing else exists.
    expected = ["AAPL/1Min/GLOB", "AAPL/1Min/ANY", "XAAPL/1Min/ANY", "MSFT/1D/EXACT"]
    for k in expected:
        rows(c, k, 1)
    time.sleep(0.5)
    made = {f.descriptor.path[0].decode() for f in c.list_flights()}
    copies = {k for k in made if k.rsplit("/", 1)[1] in ("GLOB", "ANY", "EXACT")}
    # "*/1Min/*" also matches the GLOB and ANY copies it and others wrote; GLOB copies of them are anchored out.
    assert "XAAPL/1Min/GLOB" not in copies and "AAPL/1Min/EXACT" not in copies
    assert "MSFT/1D/ANY" not in copies
    assert set(expected) <= copies
    assert all(not k.startswith("MSFT/1D/") or k == "MSFT/1D/EXACT" for k in copies)


def test_python_worker_and_trigger_over_flight(server_factory):
    srv = server_factory(f"""
triggers:
  - module: {MIRROR}
    on: "*/1Min/OHLCV"
bgworkers:
  - module: {TICKER}
    name: pyticker
    config:
      key: PYTICK/1Min/OHLCV
      interval_ms: 20
      count: 4
""")
    c = client(srv)
    put(c, "AAPL/1Min/OHLCV", bars([60, 120], [1.0, 2.0]))
    # Another schema: the trigger's stream ends and the plugin reconnects for it.
    other = pa.table({"Epoch": pa.array([60], pa.int64()), "Close": pa.array([7.25], pa.float32()), "Volume": pa.array([9], pa.int64())})
    put(c, "BTC/1Min/OHLCV", other)
    put(c, "AAPL/1Min/OHLCV", bars([180], [3.0]))

    m = rows(c, "AAPL_MIRROR/1Min/OHLCV", 3)
    assert epochs(m) == [60, 120, 180]
    assert m.column("Open").to_pylist() == [1.0, 2.0, 3.0]
    b = rows(c, "BTC_MIRROR/1Min/OHLCV", 1)
    assert b.column("Close").to_pylist() == [7.25] and b.column("Volume").to_pylist() == [9]
    assert b.schema.field("Close").type == pa.float32()
    t = rows(c, "PYTICK/1Min/OHLCV", 4)
    assert t.column("Value").to_pylist() == [0.0, 1.0, 2.0, 3.0]
    pm = rows(c, "PYTICK_MIRROR/1Min/OHLCV", 4)
    assert pm.column("Value").to_pylist() == [0.0, 1.0, 2.0, 3.0]
    # The worker wrote its 4 rows and exited 0: finished, not restarted.
    wait_for(lambda: "plugin process finished (exit status 0)" in srv.log(), what="the worker to finish")
    assert "mirroring */1Min/OHLCV" in srv.log()  # the plugin's stdout is in the server log


def test_panicking_shared_library_trigger_is_disabled_and_the_server_runs_on(server_factory):
    lib = rust_lib("trigger")
    srv = server_factory(f"""
triggers:
  - module: {lib}
    on: "*/1Min/OHLCV"
    config: {{panic_on: BOOM}}
  - module: {lib}
    on: "*/1Min/OHLCV"
    config: {{destination: "{{symbol}}/{{timeframe}}/OTHER"}}
""")
    c = client(srv)
    assert put(c, "BOOM/1Min/OHLCV", bars([60], [1.0])) == 1
    wait_for(lambda: "panicked and is disabled" in srv.log() or "trigger disabled" in srv.log(), what="the panic in the log")
    # The server and the other trigger run on; the write that made it panic is stored.
    assert put(c, "AAPL/1Min/OHLCV", bars([60], [2.0])) == 1
    assert rows(c, "AAPL/1Min/OTHER", 1).column("Open").to_pylist() == [2.0]
    assert read(c, "BOOM/1Min/OHLCV").column("Open").to_pylist() == [1.0]
    time.sleep(0.3)
    assert read(c, "AAPL_COPY/1Min/OHLCV") is None  # the panicked trigger is never called again
    m = metrics(srv)
    assert m[("mkts_plugin_up", "triggers[0]")] == 0
    assert m[("mkts_plugin_errors_total", "triggers[0]")] == 1
    assert m[("mkts_plugin_up", "triggers[1]")] == 1
    assert "asked to panic on BOOM" in srv.log()
    assert srv.stop() == 0


def test_panicking_shared_library_worker_is_disabled(server_factory):
    srv = server_factory(f"""
bgworkers:
  - module: {rust_lib('worker')}
    name: panicky
    config: {{key: PANICKY/1Min/OHLCV, interval_ms: 10, panic_after: 3}}
""")
    c = client(srv)
    wait_for(lambda: "worker panicked and is disabled" in srv.log(), what="the worker's panic in the log")
    assert "asked to panic after row 3" in srv.log()
    assert read(c, "PANICKY/1Min/OHLCV").column("Value").to_pylist() == [0.0, 1.0, 2.0]
    m = metrics(srv)
    assert m[("mkts_plugin_up", "bgworkers[0]")] == 0 and m[("mkts_plugin_errors_total", "bgworkers[0]")] == 1
    assert put(c, "AAPL/1Min/OHLCV", bars([60], [1.0])) == 1
    assert srv.stop() == 0


def test_crashing_external_trigger_is_restarted_and_gets_what_queued_meanwhile(server_factory):
    srv = server_factory(f"""
triggers:
  - module: {MIRROR}
    on: "CRASH/*/*"
    config: {{exit_after: 2}}
""")
    c = client(srv)
    for i in range(5):  # written back to back: some wait in the queue while the process restarts
        put(c, "CRASH/1Min/OHLCV", bars([60 * (i + 1)], [float(i)]))
    m = rows(c, "CRASH_MIRROR/1Min/OHLCV", 5)
    assert m.column("Open").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    log = srv.log()
    assert log.count("plugin process exited (exit status: 3)") >= 2
    # The batch a process died holding (mirrored, not acknowledged) went to its successor again: at least once.
    assert log.count("mirrored CRASH/1Min/OHLCV to CRASH_MIRROR/1Min/OHLCV: 1 rows from Epoch 1970-01-01 00:02:00") == 2, log
    assert metrics(srv)[("mkts_plugin_restarts_total", "triggers[0]")] >= 2


def test_crashing_external_worker_is_restarted_with_backoff(server_factory):
    srv = server_factory(f"""
bgworkers:
  - module: {TICKER}
    name: crashy
    config:
      key: CRASHY/1Min/OHLCV
      interval_ms: 10
      count: 6
      exit_after: 2
""")
    c = client(srv)
    # Runs of 2 rows each, exit status 3 after each; restarts resume after the last stored row.
    t = wait_for(lambda: (t := read(c, "CRASHY/1Min/OHLCV")) is not None and t.num_rows == 6 and t, timeout=30, what="6 rows")
    assert t.column("Value").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    log = srv.log()
    assert log.count("plugin process exited (exit status: 3)") >= 2
    assert "restarting in 0.5s" in log and "restarting in 1.0s" in log  # exponential backoff
    m = metrics(srv)
    assert m[("mkts_plugin_restarts_total", "bgworkers[0]")] >= 2
    assert m[("mkts_plugin_errors_total", "bgworkers[0]")] >= 2
    assert urllib.request.urlopen(f"{srv.http_url}/heartbeat", timeout=5).status == 200


def test_slow_trigger_does_not_delay_acknowledgements_and_drops_are_counted(server_factory):
    srv = server_factory(f"""
triggers:
  - module: {rust_lib('trigger')}
    on: "SLOW/1Min/OHLCV"
    queue_size: 2
    config: {{sleep_ms: 3000}}
""")
    c = client(srv)
    took = []
    for i in range(6):
        t0 = time.monotonic()
        assert put(c, "SLOW/1Min/OHLCV", bars([60 * (i + 1)], [float(i)])) == 1
        took.append(time.monotonic() - t0)
        if i == 0:  # the trigger has the first append in hand (and sleeps on it) before the rest arrive
            wait_for(lambda: metrics(srv).get(("mkts_trigger_fired_total", "triggers[0]")) == 1, what="first fire")
    # Each acknowledgement came long before the trigger's 3 s call could have finished.
    assert max(took) < 2.0, took
    m = metrics(srv)
    # One append in the trigger's hands, two queued (its lag), three dropped.
    assert m[("mkts_trigger_queue_depth", "triggers[0]")] == 2
    assert m[("mkts_trigger_dropped_total", "triggers[0]")] == 3
    assert read(c, "SLOW/1Min/OHLCV").num_rows == 6
    assert "trigger fell behind" in wait_for(lambda: "trigger fell behind" in srv.log() and srv.log(), what="drop warning")


def pids_in_log(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"plugin process started .*?pid=(\d+)", log)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_shutdown_stops_every_plugin(server_factory):
    srv = server_factory(f"""
triggers:
  - module: {rust_lib('trigger')}
    on: "PYFOREVER/1Min/OHLCV"
  - module: {MIRROR}
    on: "FOREVER/1Min/OHLCV"
bgworkers:
  - module: {rust_lib('worker')}
    name: forever
    config: {{key: FOREVER/1Min/OHLCV, interval_ms: 50}}
  - module: {TICKER}
    name: pyforever
    config: {{key: PYFOREVER/1Min/OHLCV, interval_ms: 50}}
""")
    c = client(srv)
    rows(c, "FOREVER_MIRROR/1Min/OHLCV", 1)
    rows(c, "PYFOREVER_COPY/1Min/OHLCV", 1)
    pids = wait_for(lambda: len(p := pids_in_log(srv.log())) == 2 and p, what="two plugin processes")
    assert all(alive(p) for p in pids), (pids, srv.log())
    assert srv.stop() == 0
    log = srv.log()
    assert all(not alive(p) for p in pids), pids
    for p in pids:
        assert f"plugin process stopped plugin=" in log and f"pid={p}" in log
    assert "stopped after row" in log  # the shared-library worker returned from run
    assert log.count("worker stopped") == 2 and log.count("trigger stopped") == 2
    assert "mkts stopped cleanly" in log
    # The Python worker got SIGTERM and finished its loop.
    assert re.search(r'stopped after row \d+ plugin="bgworkers\[1\]', log)


def test_plugin_processes_die_with_a_killed_server(server_factory):
    srv = server_factory(f"""
bgworkers:
  - module: {TICKER}
    name: orphan
    config: {{key: ORPHAN/1Min/OHLCV, interval_ms: 50}}
""")
    pid = wait_for(lambda: pids_in_log(srv.log()), what="the plugin process")[0]
    srv.kill()
    wait_for(lambda: not alive(pid), timeout=10, what="the plugin to exit after the server died")


def test_missing_and_incompatible_plugins_are_one_line_each(server_factory, tmp_path):
    plugin_dir = tmp_path / "plugdir"
    plugin_dir.mkdir()
    (plugin_dir / "garbage.so").write_text("not a library")
    (plugin_dir / "ondiskagg.so").write_bytes(b"\x7fELF a MarketStore Go plugin")  # never loaded
    (plugin_dir / "fake.so").write_text("mentions mkts_plugin_descriptor but is no library")
    (plugin_dir / "notexec.py").write_text("print('hi')\n")
    shutil.copy(rust_lib("worker"), plugin_dir / "workeronly.so")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc:
        # A library exporting a descriptor of a future ABI version.
        src = tmp_path / "v99.c"
        src.write_text(
            "struct d { unsigned v; const char *name; const void *t; const void *w; };\n"
            "static const struct d D = {99, \"future\", 0, 0};\n"
            "const struct d *mkts_plugin_descriptor(void) { return &D; }\n"
        )
        subprocess.run([gcc, "-shared", "-fPIC", "-o", str(plugin_dir / "v99.so"), str(src)], check=True)
    srv = server_factory(f"""
plugin_dir: {plugin_dir}
triggers:
  - module: missing.so
    on: "*/*/*"
  - module: garbage.so
    on: "*/*/*"
  - module: fake.so
    on: "*/*/*"
  - module: notexec.py
    on: "*/*/*"
  - module: workeronly.so
    on: "*/*/*"
  - module: v99.so
    on: "*/*/*"
  - module: ondiskagg.so
    on: "bad pattern"
  - module: ondiskagg.so
    on: "*/1Min/OHLCV"
    config: {{destinations: [5Min]}}
bgworkers:
  - module: /no/such/worker
    name: ghost
""")
    log = srv.log()
    errors = [l for l in log.splitlines() if "not started" in l]
    assert len(errors) == (8 if gcc else 7), "\n".join(errors)
    assert any('module "missing.so" not found' in l and "not a built-in trigger (ondiskagg, stream)" in l for l in errors)
    assert any("garbage.so is not an mkts plugin" in l for l in errors)
    assert any("fake.so" in l and "cannot load" in l for l in errors)
    assert any("notexec.py is neither a shared library" in l for l in errors)
    assert any("workeronly.so exports no trigger" in l for l in errors)
    assert any("bad `on` pattern" in l for l in errors)
    assert any("/no/such/worker does not exist" in l for l in errors)
    if gcc:
        assert any("speaks plugin ABI version 99, this server speaks 1" in l for l in errors)
    assert "using the built-in ondiskagg instead" in log
    # The server runs on, with the built-in ondiskagg standing in for the Go file.
    c = client(srv)
    ohlcv = pa.table({"Epoch": pa.array([60, 120], pa.int64()), "Open": [1.0, 2.0], "High": [3.0, 4.0], "Low": [0.5, 1.5], "Close": [2.0, 3.0], "Volume": pa.array([10, 20], pa.int64())})
    assert put(c, "AAPL/1Min/OHLCV", ohlcv) == 2
    agg = rows(c, "AAPL/5Min/OHLCV", 1)
    assert epochs(agg) == [0]
    assert [agg.column(k).to_pylist() for k in ("Open", "High", "Low", "Close", "Volume")] == [[1.0], [4.0], [0.5], [3.0], [30]]
    state = json.loads(next(iter(c.do_action(flight.Action("plugins", b"")))).body.to_pybytes())["plugins"]
    assert [(p["module"], p["kind"]) for p in state] == [("ondiskagg.so", "builtin")]
    assert srv.stop() == 0
