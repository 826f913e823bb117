"""One operations layer under every interface (issue #11), through the real server: the same policy refusal
gives the same error class on Flight, Flight SQL, /rpc, MarketStore's gRPC and the plugin API; a missing
bucket is NotFound on Flight and Flight SQL and MarketStore's text on /rpc; /metrics records request counts
and durations per interface.
"""
from __future__ import annotations

import json
import re
import time

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import grpc
import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore.proto.marketstore_pb2 as pb
import pymarketstore.proto.marketstore_pb2_grpc as pbg
import pytest
import requests
import websocket

from test_plugins import rust_lib

Y2024 = 1_704_067_200
MP = {"Content-Type": "application/x-msgpack"}
NOT_QUERYABLE = "server is not queryable"
NO_CREATE = "creating buckets is disabled (enable_add: false)"


def rpc(srv, method, params):
    body = {"method": method, "jsonrpc": "2.0", "params": params, "id": 1}
    r = requests.post(srv.rpc_url, data=msgpack.dumps(body), headers=MP, timeout=10)
    assert r.status_code == 200
    return msgpack.loads(r.content)


def bars(epochs) -> pa.Table:
    return pa.table({"Epoch": pa.array(epochs, pa.int64()), "Close": pa.array([float(e % 97) for e in epochs])})


def put(c, key, table):
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), table.schema)
    w.write_table(table)
    w.close()


def rpc_write(srv, key, epochs):
    ds = {"types": ["i8", "f8"], "names": ["Epoch", "Close"],
          "data": [np.asarray(epochs, "<i8").tobytes(), np.asarray(epochs, "<f8").tobytes()],
          "length": len(epochs), "startindex": {key: 0}, "lengths": {key: len(epochs)}}
    return rpc(srv, "DataService.Write", {"requests": [{"dataset": ds, "is_variable_length": False}]})


def wait_for_log(srv, pattern, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, srv.log())
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in the log:\n{srv.log()[-3000:]}")


def worker(key: str) -> str:
    return f"""
bgworkers:
  - module: {rust_lib('worker')}
    name: ticker
    config:
      key: {key}
      interval_ms: 20
      count: 1
"""


def test_enable_add_false_is_one_refusal_on_every_interface(server_factory):
    srv = server_factory("enable_add: false\n" + worker("PLUG/1Min/X"))
    c = fl.connect(srv.flight_url)
    # Flight: an explicit create and a first write are both PERMISSION_DENIED.
    with pytest.raises(fl.FlightUnauthorizedError, match=re.escape(NO_CREATE)):
        list(c.do_action(fl.Action("create", json.dumps(
            {"key": "F/1Min/X", "column_names": ["Close"], "column_types": ["f8"]}).encode())))
    with pytest.raises(fl.FlightUnauthorizedError, match=r"bucket F/1Min/X does not exist and creating buckets is disabled"):
        put(c, "F/1Min/X", bars([Y2024]))
    # Flight SQL: a bulk ingest into a new bucket.
    with flightsql.connect(srv.flight_url) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as e:
            cur.adbc_ingest("SQL/1Min/X", bars([Y2024]), mode="append")
        assert e.value.status_code == adbc_driver_manager.AdbcStatusCode.UNAUTHORIZED, e.value
        assert "creating buckets is disabled (enable_add: false)" in str(e.value)
    # /rpc: MarketStore's per-request error with the same text.
    r = rpc(srv, "DataService.Create", {"requests": [
        {"key": "R/1Min/X:Symbol/Timeframe/AttributeGroup", "column_names": ["Epoch", "Close"],
         "column_types": ["i8", "f8"]}]})
    assert r["result"]["responses"][0]["error"] == f"creation of new catalog entry failed: {NO_CREATE}"
    r = rpc_write(srv, "RW/1Min/X", [Y2024])
    assert "bucket RW/1Min/X does not exist and creating buckets is disabled" in r["result"]["responses"][0]["error"]
    # MarketStore gRPC: the same per-request text.
    ch = grpc.insecure_channel(srv.grpc_addr)
    stub = pbg.MarketstoreStub(ch)
    r = stub.Create(pb.MultiCreateRequest(requests=[pb.CreateRequest(
        key="G/1Min/X", data_shapes=[pb.DataShape(name="Close", type="f8")], row_type="fixed")]))
    assert [x.error for x in r.responses] == [f"creation of new catalog entry failed: {NO_CREATE}"]
    ch.close()
    # Plugin API: the shared-library worker's first write, refused with the class named.
    wait_for_log(srv, r"worker failed: permission denied: bucket PLUG/1Min/X does not exist and creating buckets is disabled")
    assert list(c.list_flights()) == []


def test_queryable_false_is_one_refusal_on_every_interface(server_factory):
    srv = server_factory("queryable: false\n" + worker("PLUGQ/1Min/X"))
    c = fl.connect(srv.flight_url)
    put(c, "Q/1Min/X", bars([Y2024]))  # writes are allowed
    with pytest.raises(fl.FlightUnauthorizedError, match=NOT_QUERYABLE):
        c.do_get(fl.Ticket(b"Q/1Min/X")).read_all()
    with flightsql.connect(srv.flight_url) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as e:
            cur.execute('SELECT * FROM "Q/1Min/X"')
            cur.fetchall()
        assert e.value.status_code == adbc_driver_manager.AdbcStatusCode.UNAUTHORIZED, e.value
        assert NOT_QUERYABLE in str(e.value)
    assert rpc(srv, "DataService.Query", {"requests": [{"destination": "Q/1Min/X"}]})["error"]["message"] == NOT_QUERYABLE
    ch = grpc.insecure_channel(srv.grpc_addr)
    with pytest.raises(grpc.RpcError) as e:
        pbg.MarketstoreStub(ch).Query(pb.MultiQueryRequest(requests=[pb.QueryRequest(destination="Q/1Min/X")]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and e.value.details() == NOT_QUERYABLE
    ch.close()
    # Plugin API: the worker's read of its bucket, refused with the class named (it then writes anyway).
    wait_for_log(srv, r"nothing to resume from in PLUGQ/1Min/X: permission denied: server is not queryable")


def test_missing_bucket_is_not_found_on_flight_and_marketstores_text_on_rpc(server):
    c = fl.connect(server.flight_url)
    put(c, "HERE/1Min/X", bars([Y2024]))
    with pytest.raises(pa.ArrowKeyError, match="NOPE/1Min/X does not exist"):  # gRPC NOT_FOUND
        c.do_get(fl.Ticket(json.dumps({"destination": "NOPE/1Min/X"}).encode())).read_all()
    with pytest.raises(pa.ArrowKeyError):
        list(c.do_action(fl.Action("get_info", b"NOPE/1Min/X")))
    with flightsql.connect(server.flight_url) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as e:
            cur.execute('SELECT * FROM "NOPE/1Min/X"')
            cur.fetchall()
        assert e.value.status_code == adbc_driver_manager.AdbcStatusCode.NOT_FOUND, e.value
        assert "NOPE/1Min/X" in str(e.value)
    err = rpc(server, "DataService.Query", {"requests": [{"destination": "NOPE/1Min/X"}]})["error"]
    assert err == {"code": -32000, "message": "no files returned from query parse: bucket NOPE/1Min/X does not exist",
                   "data": None}
    r = rpc(server, "DataService.Destroy", {"requests": [{"key": "NOPE/1Min/X"}]})
    assert r["result"]["responses"][0]["error"] == \
        "removal of catalog entry failed: Unable to find level item: NOPE in directory"


def metric_lines(srv) -> list[str]:
    return requests.get(f"{srv.http_url}/metrics", timeout=10).text.splitlines()


def test_metrics_count_and_time_every_interface(server):
    c = fl.connect(server.flight_url)
    put(c, "M/1Min/X", bars([Y2024, Y2024 + 60]))                                   # Flight DoPut
    assert c.do_get(fl.Ticket(b"M/1Min/X")).read_all().num_rows == 2                # Flight DoGet
    with flightsql.connect(server.flight_url) as conn, conn.cursor() as cur:        # Flight SQL
        cur.execute('SELECT count(*) FROM "M/1Min/X"')
        assert cur.fetchall() == [(2,)]
    assert "result" in rpc(server, "DataService.Query", {"requests": [{"destination": "M/1Min/X"}]})  # JSON-RPC
    ch = grpc.insecure_channel(server.grpc_addr)                                    # gRPC
    assert list(pbg.MarketstoreStub(ch).ListSymbols(pb.ListSymbolsRequest()).results) == ["M"]
    ch.close()
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.http_port}/ws", timeout=10)  # /ws
    ws.close()

    lines = metric_lines(server)
    count = {}
    for line in lines:
        m = re.match(r'^mkts_request_duration_seconds_count\{api="(\w+)",method="(\w+)"\} (\d+)$', line)
        if m:
            count[(m.group(1), m.group(2))] = int(m.group(3))
    assert count[("flight", "DoPut")] == 1 and count[("flight", "DoGet")] == 1, count
    assert count[("flight_sql", "GetFlightInfo")] >= 1 and count[("flight_sql", "DoGet")] >= 1, count
    assert count[("jsonrpc", "Query")] == 1 and count[("grpc", "ListSymbols")] == 1, count
    assert count[("ws", "connect")] == 1, count
    # Durations are histograms: a sum and buckets beside each count.
    for api, method in count:
        assert any(l.startswith(f'mkts_request_duration_seconds_sum{{api="{api}",method="{method}"}} ') for l in lines)
        assert f'mkts_request_duration_seconds_bucket{{le="+Inf",api="{api}",method="{method}"}} {count[(api, method)]}' in lines
        assert any(l.startswith(f'mkts_request_errors_total{{api="{api}",method="{method}"}} ') for l in lines)
    for api, method in [("flight", "DoPut"), ("flight", "DoGet"), ("jsonrpc", "Query"), ("grpc", "ListSymbols"), ("ws", "connect")]:
        assert f'mkts_request_errors_total{{api="{api}",method="{method}"}} 0' in lines
        assert f'mkts_requests_total{{api="{api}",method="{method}"}} {count[(api, method)]}' in lines
    # MarketStore's own series are kept.
    assert 'alpaca_marketstore_rpc_successful_request_duration_seconds_count{method="Query"} 1' in lines
    assert "alpaca_marketstore_rpc_total_request_duration_seconds_count 1" in lines
