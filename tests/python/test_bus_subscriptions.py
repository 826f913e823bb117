"""The event bus against the real server: what a Flight `{"subscribe"}` stream carries (whole appended
batches, with or without a `stream` trigger; the stream trigger's rows only when asked with
`"feed": "stream"`), a schema change mid-stream (the segment ends with a marker; resuming continues with
the new schema), resuming from a log position after a reconnect and after a restart, and the shutdown
drain of a slow out-of-process trigger (every queued append handled before the process is stopped).
"""
from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pyarrow.flight as fl

from conftest import REPO

MIRROR = REPO / "plugins" / "examples" / "python" / "mirror_trigger.py"


def put(c: fl.FlightClient, key: str, table: pa.Table) -> None:
    writer, reader = c.do_put(fl.FlightDescriptor.for_path(key), table.schema)
    writer.write_table(table)
    writer.done_writing()
    reader.read()
    writer.close()


def bars(epochs, opens) -> pa.Table:
    return pa.table({"Epoch": pa.array(epochs, pa.int64()), "Open": pa.array(opens, pa.float64())})


def ticket(**kw) -> fl.Ticket:
    return fl.Ticket(json.dumps(kw).encode())


class Subscriber:
    """Reads a subscription on a thread: `(metadata dict, batch or None)` per message, then `end`."""

    def __init__(self, srv, **kw):
        self.items: list[tuple[dict, pa.RecordBatch | None]] = []
        self.end: object = None
        self.reader = None
        # do_get returns once the first message arrives, so the call itself runs on the thread too.
        threading.Thread(target=self.run, args=(srv, kw), daemon=True).start()

    def run(self, srv, kw):
        try:
            self.reader = fl.connect(srv.flight_url).do_get(ticket(**kw))
            while True:
                chunk = self.reader.read_chunk()
                meta = json.loads(chunk.app_metadata.to_pybytes()) if chunk.app_metadata is not None else {}
                self.items.append((meta, chunk.data))
        except StopIteration:
            self.end = "eof"
        except Exception as e:  # noqa: BLE001
            self.end = e

    def wait(self, n, timeout=15.0):
        deadline = time.time() + timeout
        while len(self.items) < n and time.time() < deadline:
            time.sleep(0.02)
        assert len(self.items) >= n, (self.items, self.end)
        return self.items[:n]

    def wait_end(self, timeout=15.0):
        deadline = time.time() + timeout
        while self.end is None and time.time() < deadline:
            time.sleep(0.02)
        assert self.end is not None, self.items
        return self.end


def settle():
    time.sleep(0.4)  # the subscription is registered before the next write


def epochs(b: pa.RecordBatch) -> list[int]:
    return b.column(0).cast(pa.int64()).to_pylist()


def test_subscriptions_carry_whole_batches_whether_or_not_stream_is_configured(server_factory):
    plain = server_factory()
    gated = server_factory("triggers:\n  - module: stream\n    on: \"*/*/*\"\n")
    for srv in (plain, gated):
        sub = Subscriber(srv, subscribe="AAPL/1Min/OHLCV")
        settle()
        c = fl.connect(srv.flight_url)
        put(c, "AAPL/1Min/OHLCV", bars([60, 120, 180], [1.0, 2.0, 3.0]))
        put(c, "AAPL/1Min/OHLCV", bars([240], [4.0]))
        (m1, b1), (m2, b2) = sub.wait(2)
        assert epochs(b1) == [60, 120, 180] and epochs(b2) == [240], srv.log()
        assert m1["key"] == "AAPL/1Min/OHLCV" and m2["lsn"] > m1["lsn"] > 0
    # With the stream trigger, `"feed": "stream"` asks for what it pushes: the newest row of each write.
    rows = Subscriber(gated, subscribe="MSFT/1Min/OHLCV", feed="stream")
    settle()
    put(fl.connect(gated.flight_url), "MSFT/1Min/OHLCV", bars([60, 120, 180], [1.0, 2.0, 3.0]))
    ((m, b),) = rows.wait(1)
    assert epochs(b) == [180] and m["key"] == "MSFT/1Min/OHLCV"
    # An unknown feed is refused, not ignored.
    bad = Subscriber(plain, subscribe="*/*/*", feed="rows")
    e = bad.wait_end()
    assert isinstance(e, Exception) and "invalid argument" in str(e) and "unknown feed" in str(e), e


def test_a_schema_change_ends_the_segment_and_resuming_continues_with_the_new_schema(server):
    sub = Subscriber(server, subscribe="*/1Min/*")
    settle()
    c = fl.connect(server.flight_url)
    put(c, "AAA/1Min/OHLCV", bars([60, 120], [1.0, 2.0]))
    other = pa.table({"Epoch": pa.array([60], pa.int64()), "Close": pa.array([7.25], pa.float32())})
    put(c, "BBB/1Min/QUOTE", other)
    put(c, "AAA/1Min/OHLCV", bars([180], [3.0]))
    (m1, b1), (marker, data) = sub.wait(2)
    assert epochs(b1) == [60, 120]
    # A metadata-only message ends the segment, naming where to resume, and the stream ends cleanly.
    assert data is None and marker == {"end": "schema_change", "key": "BBB/1Min/QUOTE", "from_lsn": m1["lsn"]}
    assert sub.wait_end() == "eof"
    # Resuming from that position starts the next segment with the batch that did not fit, then the next.
    nxt = Subscriber(server, subscribe="*/1Min/*", from_lsn=marker["from_lsn"])
    ((m2, b2), (marker2, none)) = nxt.wait(2)
    assert m2["key"] == "BBB/1Min/QUOTE" and b2.column("Close").to_pylist() == [7.25] and "gap" not in m2
    assert marker2["end"] == "schema_change" and marker2["from_lsn"] == m2["lsn"] and none is None
    third = Subscriber(server, subscribe="*/1Min/*", from_lsn=m2["lsn"])
    ((m3, b3),) = third.wait(1)
    assert m3["key"] == "AAA/1Min/OHLCV" and epochs(b3) == [180]
    assert "skipping a batch" not in server.log()


def test_resume_from_lsn_after_a_reconnect_and_after_a_restart(server_factory):
    srv = server_factory()
    c = fl.connect(srv.flight_url)
    sub = Subscriber(srv, subscribe="R/1Min/OHLCV")
    settle()
    put(c, "R/1Min/OHLCV", bars([60], [1.0]))
    ((m1, _),) = sub.wait(1)
    sub.reader.cancel()  # the client goes away
    for e in (120, 180, 240):
        put(c, "R/1Min/OHLCV", bars([e], [float(e)]))
    put(c, "OTHER/1Min/OHLCV", bars([60], [0.0]))
    # Reconnect with the last LSN handled: exactly the appends after it, in order, then live ones.
    again = Subscriber(srv, subscribe="R/1Min/OHLCV", from_lsn=m1["lsn"])
    got = again.wait(3)
    assert [epochs(b) for _, b in got] == [[120], [180], [240]]
    assert all("gap" not in m for m, _ in got) and got[0][0]["lsn"] > m1["lsn"]
    put(c, "R/1Min/OHLCV", bars([300], [5.0]))
    (m5, b5) = again.wait(4)[3]
    assert epochs(b5) == [300]
    assert len(again.items) == 4  # nothing twice

    # Across a restart the server holds nothing from before it: resuming from an older LSN names the gap
    # on the first delivery; resuming from the last LSN of the old run is exact.
    root = srv.root
    assert srv.stop() == 0
    srv2 = server_factory(root=root)
    c2 = fl.connect(srv2.flight_url)
    stale = Subscriber(srv2, subscribe="R/1Min/OHLCV", from_lsn=m1["lsn"])
    exact = Subscriber(srv2, subscribe="R/1Min/OHLCV", from_lsn=m5["lsn"])
    settle()
    put(c2, "R/1Min/OHLCV", bars([360], [6.0]))
    ((ms, bs),) = stale.wait(1)
    ((me, be),) = exact.wait(1)
    assert epochs(bs) == epochs(be) == [360]
    assert ms["gap"]["after_lsn"] == m1["lsn"] and ms["gap"]["through_lsn"] >= m5["lsn"], ms
    assert "gap" not in me, me


def test_shutdown_hands_a_slow_process_trigger_everything_queued_for_it(server_factory):
    srv = server_factory(f"""
triggers:
  - module: {MIRROR}
    on: "SLOWQ/1Min/OHLCV"
    config: {{sleep_ms: 400}}
""")
    c = fl.connect(srv.flight_url)
    deadline = time.time() + 20
    while "mirroring SLOWQ/1Min/OHLCV" not in srv.log() and time.time() < deadline:
        time.sleep(0.05)
    for i in range(9):
        put(c, "SLOWQ/1Min/OHLCV", bars([60 * (i + 1)], [float(i)]))
    # SIGTERM with (nearly) all nine still queued or held by the process: shutdown waits for each one.
    assert srv.stop() == 0
    log = srv.log()
    assert "mkts stopped cleanly" in log
    assert "not delivered" not in log and "did not acknowledge" not in log, log
    again = server_factory(root=srv.root)
    t = fl.connect(again.flight_url).do_get(ticket(destination="SLOWQ_MIRROR/1Min/OHLCV")).read_all()
    assert t.column("Epoch").cast(pa.int64()).to_pylist() == [60 * (i + 1) for i in range(9)]
    assert log.count("mirrored SLOWQ/1Min/OHLCV") == 9
