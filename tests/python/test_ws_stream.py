"""`/ws` streaming (reference §4) against the real server: pymarketstore's StreamConn receiving pushes after
writes, and the raw protocol (echo of the subscribe frame, invalid-stream error keeping the old set, glob
matching, newest-row payload with native msgpack types, writers unaffected by a client that never reads).
"""
from __future__ import annotations

import queue
import threading
import time

import msgpack
import numpy as np
import pymarketstore as pymkts
import pytest
import requests
import websocket

Y2024 = 1_704_067_200


def ws_url(srv):
    return f"ws://127.0.0.1:{srv.http_port}/ws"


def bar(epoch, close, dtype="f4"):
    a = np.zeros(1, dtype=[("Epoch", "i8"), ("Open", dtype), ("Close", dtype), ("Volume", "i8")])
    a["Epoch"] = epoch
    a["Open"] = close - 1
    a["Close"] = close
    a["Volume"] = 7
    return a


def subscribe(srv, streams, timeout=10):
    ws = websocket.create_connection(ws_url(srv), timeout=timeout)
    frame = msgpack.dumps({"streams": streams})
    ws.send(frame, opcode=websocket.ABNF.OPCODE_BINARY)
    echo = ws.recv()
    assert echo == frame  # exact bytes back
    return ws


def recv(ws):
    return msgpack.loads(ws.recv())


def test_streamconn_receives_pushes_after_writes(server):
    cli = pymkts.Client(server.rpc_url)
    conn = cli.client.stream()
    assert conn.endpoint == ws_url(server)
    got: "queue.Queue[dict]" = queue.Queue()

    class Done(Exception):
        pass

    @conn.on(r"^AAPL/")
    def on_aapl(c, msg):
        got.put(msg)
        if msg["data"]["Close"] == 999.5:
            raise Done()

    t = threading.Thread(target=lambda: pytest.raises(Done, conn.run, ["AAPL/*/*", "*/1Min/OTHER"]), daemon=True)
    t.start()
    # The subscription is in place once a push arrives; keep writing distinct bars until then.
    deadline = time.time() + 15
    i = 0
    first = None
    while time.time() < deadline and first is None:
        cli.write(bar(Y2024 + 60 * i, 100.0 + i), "AAPL/1Min/OHLCV")
        try:
            first = got.get(timeout=0.3)
        except queue.Empty:
            i += 1
    assert first is not None, "no push within 15 s"
    assert first["key"] == "AAPL/1Min/OHLCV"
    # A write to a non-matching key is not delivered; the next matching one is, with the newest row only.
    cli.write(bar(Y2024, 1.0), "MSFT/1Min/OHLCV")
    a = np.concatenate([bar(Y2024 + 86400, 998.5), bar(Y2024 + 86400 + 60, 999.5)])
    cli.write(a, "AAPL/1Min/OHLCV")
    msgs = []
    while True:
        m = got.get(timeout=10)
        msgs.append(m)
        if m["data"]["Close"] == 999.5:
            break
    assert all(m["key"] == "AAPL/1Min/OHLCV" for m in msgs)
    assert msgs[-1]["data"] == {"Epoch": Y2024 + 86400 + 60, "Open": 998.5, "Close": 999.5, "Volume": 7}
    t.join(10)
    assert not t.is_alive()


def test_raw_subscribe_echo_invalid_and_globs(server):
    cli = pymkts.Client(server.rpc_url)
    ws = subscribe(server, ["*/1Min/OHLCV"])
    # Invalid stream: error, old subscription kept.
    ws.send(msgpack.dumps({"streams": ["AAPL/1Min"]}), opcode=websocket.ABNF.OPCODE_BINARY)
    assert recv(ws) == {"error": "AAPL/1Min is an invalid stream"}
    # An empty list is ignored (no reply, subscriptions unchanged).
    ws.send(msgpack.dumps({"streams": []}), opcode=websocket.ABNF.OPCODE_BINARY)
    cli.write(bar(Y2024 + 120, 3.25), "ZZZ/1Min/OHLCV")
    m = recv(ws)
    assert m == {"key": "ZZZ/1Min/OHLCV", "data": {"Epoch": Y2024 + 120, "Open": 2.25, "Close": 3.25, "Volume": 7}}
    # Replace the set: only ticks now; a variable bucket pushes Nanoseconds too.
    frame = msgpack.dumps({"streams": ["*/1Sec/TICK"]})
    ws.send(frame, opcode=websocket.ABNF.OPCODE_BINARY)
    assert ws.recv() == frame
    cli.write(bar(Y2024 + 180, 4.0), "ZZZ/1Min/OHLCV")  # no longer matches
    t = np.zeros(2, dtype=[("Epoch", "i8"), ("Price", "f8"), ("Nanoseconds", "i4")])
    t["Epoch"] = [Y2024 + 5, Y2024 + 5]
    t["Price"] = [10.5, 11.5]
    t["Nanoseconds"] = [100, 900]
    cli.write(t, "BTC/1Sec/TICK", isvariablelength=True)
    m = recv(ws)
    assert m == {"key": "BTC/1Sec/TICK", "data": {"Epoch": Y2024 + 5, "Price": 11.5, "Nanoseconds": 900}}
    ws.close()


def test_float32_stays_float32_on_the_wire(server):
    cli = pymkts.Client(server.rpc_url)
    ws = subscribe(server, ["F32/*/*"])
    cli.write(bar(Y2024, 0.1), "F32/1Min/OHLCV")
    raw = ws.recv()
    assert b"\xca" + np.array([0.1], dtype=">f4").tobytes() in raw  # msgpack float32 marker + value
    assert msgpack.loads(raw)["data"]["Close"] == float(np.float32(0.1))
    ws.close()


def test_writers_do_not_wait_for_a_client_that_never_reads(server):
    cli = pymkts.Client(server.rpc_url)
    idle = subscribe(server, ["*/*/*"])  # never reads again
    m = requests.get(f"{server.http_url}/metrics").text
    assert "alpaca_marketstore_ws_connections 1" in m.splitlines()
    t0 = time.time()
    for i in range(300):
        assert cli.write(bar(Y2024 + 60 * i, float(i)), "FAST/1Min/OHLCV") == {"responses": None}
    assert time.time() - t0 < 30
    assert len(cli.query(pymkts.Params("FAST", "1Min", "OHLCV")).first().array) == 300
    idle.close()
    deadline = time.time() + 5
    while time.time() < deadline:
        if "alpaca_marketstore_ws_connections 0" in requests.get(f"{server.http_url}/metrics").text.splitlines():
            break
        time.sleep(0.05)
    else:
        pytest.fail("ws connection gauge did not drop to 0")
