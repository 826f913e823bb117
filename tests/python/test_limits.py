"""Memory bounds and `queryable: false` on every interface, through the real server (issue #10, defects 7-8).

- `/rpc` bodies are bounded by bytes (`max_request_mb`) and by decoded values before anything is decoded;
  a crafted NumpyMultiDataset length is an error that stores nothing; the server keeps answering.
- gRPC messages past `grpc_max_recv_msg_size` are refused with RESOURCE_EXHAUSTED (Flight and
  proto.Marketstore).
- A Flight `{"subscribe"}` subscriber or a `/ws` client that does not read is dropped once
  `subscriber_queue_mb` is waiting for it, with a log line naming it and a counter in `/metrics`, while a
  subscriber that reads gets exactly the rows written.
- `queryable: false` refuses every read, listing and subscription with one PERMISSION_DENIED-class error;
  writes still work.
"""
from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time

import grpc
import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore as pymkts
import pymarketstore.proto.marketstore_pb2 as pb
import pymarketstore.proto.marketstore_pb2_grpc as pbg
import pytest
import requests
import websocket

Y2024 = 1_704_067_200
MSGPACK = {"Content-Type": "application/x-msgpack"}


def metric(srv, name: str) -> float:
    text = requests.get(f"{srv.http_url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def alive(srv):
    r = requests.get(f"{srv.http_url}/heartbeat", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "queryable"


def rpc(srv, method, params, raw: bytes | None = None):
    body = raw if raw is not None else msgpack.dumps({"jsonrpc": "2.0", "id": "1", "method": method, "params": params})
    r = requests.post(srv.rpc_url, data=body, headers=MSGPACK, timeout=120)
    assert r.status_code == 200, r.text
    return msgpack.loads(r.content)


def peak_rss_kb(srv) -> int:
    with open(f"/proc/{srv.proc.pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


def bars(n, start=Y2024):
    a = np.zeros(n, dtype=[("Epoch", "i8"), ("Close", "f8")])
    a["Epoch"] = start + 60 * np.arange(n, dtype="i8")
    a["Close"] = np.arange(n, dtype="f8")
    return a


# ------------------------------------------------------------------------------------------------ /rpc bodies

def test_oversize_rpc_body_is_refused_and_server_answers(server_factory):
    srv = server_factory(config_extra="max_request_mb: 1\n")
    cli = pymkts.Client(srv.rpc_url)
    small = bars(1000)
    assert cli.write(small, "OK/1Min/X") == {"responses": None}
    big = bars(80_000)  # 1.28 MB of column data
    with pytest.raises(Exception) as e:
        cli.write(big, "BIG/1Min/X")
    assert "larger than max_request_mb (1 MiB)" in str(e.value)
    # A raw body (chunked, no Content-Length) past the limit: the same JSON-RPC error.
    def chunks():
        for _ in range(3):
            yield b"\x00" * 500_000
    r = requests.post(srv.rpc_url, data=chunks(), headers=MSGPACK, timeout=60)
    assert r.status_code == 200
    err = msgpack.loads(r.content)["error"]
    assert err["code"] == -32600 and "request body of 1500000 bytes is larger than max_request_mb" in err["message"]
    alive(srv)
    assert cli.list_symbols() == ["OK"]
    assert len(cli.query(pymkts.Params("OK", "1Min", "X")).first().array) == 1000


def test_body_of_many_tiny_values_is_refused_without_expanding(server):
    alive(server)
    before = peak_rss_kb(server)
    n = 20_000_000  # 20 MB of positive fixints: ~1 GB once decoded into a value tree
    head = b"\x84" + b"".join(msgpack.dumps(x) for x in ("jsonrpc", "2.0", "id", "1", "method", "DataService.Write", "params"))
    body = head + b"\xdd" + struct.pack(">I", n) + b"\x01" * n
    reply = rpc(server, None, None, raw=body)
    assert reply["error"]["code"] == -32600
    assert reply["error"]["message"].startswith("rpc: request has more than 1000000 values")
    # JSON: 10 MB of `1,`.
    r = requests.post(server.rpc_url, data=b"[" + b"1," * 5_000_000 + b"1]",
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200 and "more than 1000000 values" in r.json()["error"]["message"]
    # An array claiming 4 billion elements in 6 bytes.
    reply = rpc(server, None, None, raw=head + b"\xdd\xff\xff\xff\xff\x01")
    assert reply["error"]["code"] == -32700 and "past the end of the body" in reply["error"]["message"]
    alive(server)
    # The bodies were held once (20 MB + 10 MB), never decoded: peak memory grew by far less than 1 GB.
    assert peak_rss_kb(server) - before < 200_000, (before, peak_rss_kb(server))


def numpy_write(key, length, start=0, n=None, rows=2):
    epochs = (Y2024 + 60 * np.arange(rows, dtype="<i8")).tobytes()
    closes = np.arange(rows, dtype="<f8").tobytes()
    ds = {"types": ["i8", "f8"], "names": ["Epoch", "Close"], "data": [epochs, closes], "length": length,
          "startindex": {key: start}, "lengths": {key: length if n is None else n}}
    return {"requests": [{"dataset": ds, "is_variable_length": False}]}


def test_crafted_numpy_lengths_are_clear_errors_and_store_nothing(server):
    cases = [
        (2**62, None, 0, "is too large for column Epoch"),
        (2**63 - 1, None, 0, "is too large for column Epoch"),
        (3, None, 0, "column Epoch: 16 bytes for 3 rows of 8 bytes"),
        (-5, None, 0, "length -5 must not be negative"),
        (2, 2**63 - 1, 1, "are outside the dataset's 2 rows"),
        (2, 1, 2**63 - 1, "are outside the dataset's 2 rows"),
        (2, 1, -1, "are outside the dataset's 2 rows"),
    ]
    for length, n, start, want in cases:
        reply = rpc(server, "DataService.Write", numpy_write("CRAFT/1Min/X", length, start=start, n=n))
        resp = reply["result"]["responses"]
        assert len(resp) == 1 and want in resp[0]["error"], (length, n, start, resp)
    alive(server)
    cli = pymkts.Client(server.rpc_url)
    assert cli.list_symbols() == []
    # The same shape with honest numbers is stored.
    assert rpc(server, "DataService.Write", numpy_write("CRAFT/1Min/X", 2))["result"]["responses"] is None
    assert cli.query(pymkts.Params("CRAFT", "1Min", "X")).first().array["Close"].tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------------ gRPC sizes

def test_oversize_grpc_messages_are_resource_exhausted(server_factory):
    srv = server_factory(config_extra="grpc_max_recv_msg_size: 1\n")
    big = pa.table({"Epoch": pa.array(Y2024 + 60 * np.arange(200_000), pa.int64()),
                    "Close": pa.array(np.arange(200_000, dtype="f8"))})  # 3.2 MB in one message
    c = fl.connect(srv.flight_url)
    w, r = c.do_put(fl.FlightDescriptor.for_path("G/1Min/X"), big.schema)
    with pytest.raises((fl.FlightError, pa.ArrowException)) as e:
        w.write_table(big)
        w.done_writing()
        r.read()
        w.close()
    assert "gRPC returned resource exhausted error" in str(e.value), e.value
    assert "decoded message length too large: found 3200193 bytes, the limit is: 1048576 bytes" in str(e.value)

    ch = grpc.insecure_channel(srv.grpc_addr)
    stub = pbg.MarketstoreStub(ch)

    def write(rows):
        a = bars(rows)
        ds = pb.NumpyMultiDataset(
            data=pb.NumpyDataset(column_types=["i8", "f8"], column_names=["Epoch", "Close"],
                                 column_data=[a["Epoch"].tobytes(), a["Close"].tobytes()], length=rows),
            start_index={"G/1Min/X": 0}, lengths={"G/1Min/X": rows})
        return stub.Write(pb.MultiWriteRequest(requests=[pb.WriteRequest(data=ds)]))

    with pytest.raises(grpc.RpcError) as e:
        write(200_000)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    assert len(write(10).responses) == 0  # the server still serves, and small messages pass
    alive(srv)
    q = stub.Query(pb.MultiQueryRequest(requests=[pb.QueryRequest(destination="G/1Min/X")]))
    assert q.responses[0].result.data.length == 10  # nothing of the refused writes was stored
    ch.close()


# ------------------------------------------------------------------------------------------------ subscribers

def subscribe_ticket(pattern):
    return fl.Ticket(json.dumps({"subscribe": pattern}).encode())


def wait_for(cond, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_idle_flight_subscriber_is_dropped_reader_gets_every_row(server_factory):
    srv = server_factory(config_extra="subscriber_queue_mb: 1\n")
    key = "SUB/1Min/X"
    c = fl.connect(srv.flight_url)
    got: list[np.ndarray] = []
    reader_error: list[BaseException] = []

    def reader():
        try:
            rd = fl.connect(srv.flight_url).do_get(subscribe_ticket(key))
            while True:
                chunk = rd.read_chunk()
                got.append(chunk.data.column(0).cast(pa.int64()).to_numpy())
        except StopIteration:
            pass
        except BaseException as e:  # noqa: BLE001
            reader_error.append(e)

    idle: dict = {}

    def idler():
        try:
            idle["reader"] = fl.connect(srv.flight_url).do_get(subscribe_ticket(key))
        except BaseException as e:  # noqa: BLE001
            idle["error"] = e

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=idler, daemon=True)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(srv, "mkts_flight_subscribers") == 2, what="two subscriptions")

    rows_per_batch = 1024  # 16 KiB per batch: a reader that keeps up never has 1 MiB waiting
    schema = pa.schema([("Epoch", pa.int64()), ("Close", pa.float64())])
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), schema)
    written = 0
    batches = 0
    while metric(srv, "mkts_flight_dropped_subscribers_total") == 0:
        assert batches < 4000, "the idle subscriber was never dropped"
        for _ in range(50):
            ep = Y2024 + 60 * (written + np.arange(rows_per_batch, dtype="i8"))
            w.write_batch(pa.record_batch([pa.array(ep), pa.array(ep.astype("f8"))], schema=schema))
            r.read()
            written += rows_per_batch
            batches += 1
    for _ in range(20):  # the reader keeps receiving after the drop
        ep = Y2024 + 60 * (written + np.arange(rows_per_batch, dtype="i8"))
        w.write_batch(pa.record_batch([pa.array(ep), pa.array(ep.astype("f8"))], schema=schema))
        r.read()
        written += rows_per_batch
    w.close()

    wait_for(lambda: sum(len(g) for g in got) >= written or reader_error, what="the reader to catch up")
    assert not reader_error, reader_error
    received = np.concatenate(got)
    np.testing.assert_array_equal(received, Y2024 + 60 * np.arange(written, dtype="i8"))
    assert metric(srv, "mkts_flight_dropped_subscribers_total") == 1
    log = srv.log()
    assert re.search(r'dropping Flight subscriber.*subscriber=peer 127\.0\.0\.1:\d+, pattern "SUB/1Min/X"', log), log[-3000:]

    # The idle client, reading now, gets what was buffered before the drop and then the reason.
    assert "reader" in idle, idle
    with pytest.raises((fl.FlightError, pa.ArrowException)) as e:
        while True:
            idle["reader"].read_chunk()
    assert "gRPC returned resource exhausted error" in str(e.value), e.value
    assert "subscription dropped" in str(e.value) and "past subscriber_queue_mb (1048576 bytes)" in str(e.value)
    wait_for(lambda: metric(srv, "mkts_flight_subscribers") == 1, what="the dropped stream to close")
    assert metric(srv, "mkts_flight_dropped_subscribers_total") == 1


def test_ws_client_that_never_reads_is_dropped_logged_counted(server_factory):
    srv = server_factory(config_extra="subscriber_queue_mb: 1\n")
    key = "WS/1Min/X"
    ncols = 200  # ~2.8 KB per pushed frame
    schema = pa.schema([("Epoch", pa.int64())] + [(f"c{i:03}", pa.float64()) for i in range(ncols)])
    c = fl.connect(srv.flight_url)

    def row(i):
        return pa.record_batch([pa.array([Y2024 + 60 * i], pa.int64())] +
                               [pa.array([float(i)]) for _ in range(ncols)], schema=schema)

    w, r = c.do_put(fl.FlightDescriptor.for_path(key), schema)
    w.write_batch(row(0))
    r.read()
    sub = msgpack.dumps({"streams": [key]})
    # A small receive buffer so the kernel holds little for the idle client.
    idle = websocket.create_connection(f"ws://127.0.0.1:{srv.http_port}/ws", timeout=30,
                                       sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    idle.send(sub, opcode=websocket.ABNF.OPCODE_BINARY)
    assert idle.recv() == sub
    idle_port = idle.sock.getsockname()[1]

    live = websocket.create_connection(f"ws://127.0.0.1:{srv.http_port}/ws", timeout=30)
    live.send(sub, opcode=websocket.ABNF.OPCODE_BINARY)
    assert live.recv() == sub
    frames: list[int] = []

    def read_live():
        try:
            while True:
                frames.append(msgpack.loads(live.recv())["data"]["Epoch"])
        except Exception:  # noqa: BLE001
            pass

    t = threading.Thread(target=read_live, daemon=True)
    t.start()

    i = 1
    while metric(srv, "mkts_ws_dropped_clients_total") == 0:
        assert i < 20_000, "the idle /ws client was never dropped"
        for _ in range(100):
            w.write_batch(row(i))
            r.read()
            i += 1
    w.close()
    print(f"idle /ws client dropped after {i - 1} pushed rows")
    wait_for(lambda: len(frames) >= i - 1, what="the reading /ws client to catch up")
    assert frames == [Y2024 + 60 * k for k in range(1, i)]
    assert metric(srv, "mkts_ws_dropped_clients_total") == 1
    wait_for(lambda: metric(srv, "alpaca_marketstore_ws_connections") == 1, what="the idle client to be closed")
    log = srv.log()
    # Whichever comes first on this machine: 1 MiB waiting in its queue, or a socket send blocked for 10 s.
    assert re.search(r"dropping /ws client: (\d+ bytes wait unsent, past subscriber_queue_mb \(1048576 bytes\)"
                     rf"|a send did not complete within 10s) client=\d+ peer=127\.0\.0\.1:{idle_port} "
                     r"patterns=\[\"WS/1Min/X\"\]", log), log[-3000:]
    live.close()
    idle.close()


# ------------------------------------------------------------------------------------------------ queryable

def test_queryable_false_refuses_every_read_and_writes_still_work(server_factory, tmp_path):
    root = tmp_path / "root"
    srv = server_factory(config_extra="queryable: false\n", root=root)
    cli = pymkts.Client(srv.rpc_url)
    assert cli.write(bars(3), "Q/1Min/X") == {"responses": None}  # writes are allowed
    c = fl.connect(srv.flight_url)
    t = pa.table({"Epoch": pa.array([Y2024 + 600], pa.int64()), "Close": pa.array([9.0])})
    w, r = c.do_put(fl.FlightDescriptor.for_path("Q/1Min/X"), t.schema)
    w.write_table(t)
    w.close()

    def denied(fn):
        with pytest.raises(fl.FlightUnauthorizedError) as e:
            res = fn()
            if hasattr(res, "read_all"):
                res.read_all()
            else:
                list(res)
        assert "server is not queryable" in str(e.value)

    denied(lambda: c.list_flights())
    denied(lambda: c.do_action(fl.Action("get_info", b"Q/1Min/X")))
    denied(lambda: c.do_action(fl.Action("list_symbols", b"")))
    denied(lambda: c.do_get(fl.Ticket(json.dumps({"destination": "Q/1Min/X"}).encode())))
    denied(lambda: c.do_get(fl.Ticket(b"Q/1Min/X")))
    denied(lambda: c.do_get(subscribe_ticket("Q/1Min/X")))
    with pytest.raises(fl.FlightUnauthorizedError):
        c.get_flight_info(fl.FlightDescriptor.for_path("Q/1Min/X"))
    import adbc_driver_flightsql.dbapi as flightsql  # Flight SQL reads are refused before any SQL runs
    with flightsql.connect(srv.flight_url) as conn, conn.cursor() as cur:
        with pytest.raises(Exception) as e:
            cur.execute('SELECT * FROM "Q/1Min/X"')
            cur.fetchall()
        assert "server is not queryable" in str(e.value)

    for fn in (lambda: cli.query(pymkts.Params("Q", "1Min", "X")), cli.list_symbols):
        with pytest.raises(Exception) as e:
            fn()
        assert "server is not queryable" in str(e.value)
    reply = rpc(srv, "DataService.GetInfo", {"requests": [{"key": "Q/1Min/X"}]})
    assert reply["error"]["message"] == "server is not queryable"

    ch = grpc.insecure_channel(srv.grpc_addr)
    stub = pbg.MarketstoreStub(ch)
    for call in (lambda: stub.Query(pb.MultiQueryRequest(requests=[pb.QueryRequest(destination="Q/1Min/X")])),
                 lambda: stub.ListSymbols(pb.ListSymbolsRequest())):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and e.value.details() == "server is not queryable"
    ch.close()

    ws = websocket.create_connection(f"ws://127.0.0.1:{srv.http_port}/ws", timeout=10)
    ws.send(msgpack.dumps({"streams": ["Q/1Min/X"]}), opcode=websocket.ABNF.OPCODE_BINARY)
    assert msgpack.loads(ws.recv()) == {"error": "server is not queryable"}
    w, r = c.do_put(fl.FlightDescriptor.for_path("Q/1Min/X"), t.schema)
    w.write_table(pa.table({"Epoch": pa.array([Y2024 + 1200], pa.int64()), "Close": pa.array([10.0])}))
    w.close()
    ws.settimeout(1.0)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv()  # nothing is pushed
    ws.close()
    srv.stop()

    # Every write above was stored: the same root, queryable again.
    srv2 = server_factory(root=root)
    got = pymkts.Client(srv2.rpc_url).query(pymkts.Params("Q", "1Min", "X")).first().array
    assert got["Close"].tolist() == [0.0, 1.0, 2.0, 9.0, 10.0]


# --- Malformed Arrow IPC from a client (found by the engine_write fuzzer; see mkts_flight::ipc) ----------

ARTIFACTS = __import__("pathlib").Path(__file__).resolve().parents[2] / "fuzz" / "artifacts-replay" / "engine_write"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _first_ipc_message(stream: bytes) -> tuple[bytes, bytes]:
    """The first message of an IPC stream: (flatbuffer header, the bytes after it)."""
    i = 4 if stream[:4] == b"\xff\xff\xff\xff" else 0
    (n,) = struct.unpack_from("<I", stream, i)
    return stream[i + 4 : i + 4 + n], stream[i + 4 + n :]


@pytest.mark.parametrize("artifact", ["arrow_ipc_convert_198", "arrow_ipc_convert_514", "arrow_ipc_buffer_immutable_287"])
def test_malformed_ipc_in_do_put_is_invalid_argument(server, artifact):
    """Raw FlightData whose IPC header makes arrow's decoder panic: one INVALID_ARGUMENT, nothing stored."""
    header, rest = _first_ipc_message((ARTIFACTS / artifact).read_bytes()[1:])
    desc = _varint(1 << 3 | 0) + _varint(1) + _field(3, b"FZBAD/1Min/OHLCV")
    msgs = [_field(1, desc) + _field(2, header) + _field(1000, rest[:64])]
    # Further messages of the same stream, so a schema that decodes still meets the bad batch.
    if len(rest) > 8:
        try:
            h2, r2 = _first_ipc_message(rest)
            msgs.append(_field(2, h2) + _field(1000, r2[:512]))
        except struct.error:
            pass
    ch = grpc.insecure_channel(server.grpc_addr)
    call = ch.stream_stream("/arrow.flight.protocol.FlightService/DoPut", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        list(call(iter(msgs), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "decode" in e.value.details() or "malformed" in e.value.details()
    ch.close()
    alive(server)
    client = fl.connect(server.flight_url)
    keys = [f.descriptor.path[0].decode() for f in client.list_flights()]
    assert not any(k.startswith("FZBAD") for k in keys)


def test_malformed_result_handle_is_invalid_argument_not_an_abort(server):
    """A Flight SQL statement handle claiming a 2 GiB IPC message: an error, and the server stays up."""
    handle = b"\0mkts-result\0" + b"\xff\xff\xff\xff\xf0\xff\xff\x7f" + b"\0" * 8
    any_ = _field(1, b"type.googleapis.com/arrow.flight.protocol.sql.TicketStatementQuery") + _field(2, _field(1, handle))
    client = fl.connect(server.flight_url)
    with pytest.raises((fl.FlightError, pa.ArrowInvalid)) as e:
        client.do_get(fl.Ticket(any_)).read_all()
    assert "statement handle" in str(e.value)
    alive(server)
