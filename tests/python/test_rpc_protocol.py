"""Raw-protocol tests of MarketStore's `/rpc` envelope (reference §2.1) and the HTTP side routes, with
`requests` + `msgpack` against the real server: HEAD/405 with the version header, 415, JSON-RPC error
objects on HTTP 200, id echo with its msgpack type, notifications without a body, the JSON codec with Go
field names, GetInfo, multi-key writes, /heartbeat and /metrics, and the enable_add / enable_remove /
queryable refusals.
"""
from __future__ import annotations

import base64
import json

import msgpack
import numpy as np
import pytest
import requests

Y2024 = 1_704_067_200
MP = {"Content-Type": "application/x-msgpack"}


def call(srv, method, params, id_="1", raw=False):
    body = {"method": method, "jsonrpc": "2.0", "params": params}
    if id_ is not None:
        body["id"] = id_
    r = requests.post(srv.rpc_url, data=msgpack.dumps(body), headers=MP)
    assert r.status_code == 200
    if raw:
        return r
    return msgpack.loads(r.content)


def le(values, dtype):
    return np.asarray(values, dtype=dtype).tobytes()


def write_params(keys: dict[str, tuple[list[int], list[float]]], variable=False):
    """One dataset carrying several keys back to back (startindex/lengths slice it)."""
    epochs, closes, start, lengths = [], [], {}, {}
    for k, (e, c) in keys.items():
        start[k] = len(epochs)
        lengths[k] = len(e)
        epochs += e
        closes += c
    ds = {"types": ["i8", "f4"], "names": ["Epoch", "Close"], "data": [le(epochs, "<i8"), le(closes, "<f4")],
          "length": len(epochs), "startindex": start, "lengths": lengths}
    return {"requests": [{"dataset": ds, "is_variable_length": variable}]}


def test_head_and_get_are_405_with_version_header(server):
    h = requests.head(server.rpc_url)
    assert h.status_code == 405
    assert h.headers["Marketstore-Version"]
    g = requests.get(server.rpc_url)
    assert g.status_code == 405
    assert g.text == "rpc: POST method required, received GET"
    assert g.headers["Content-Type"].startswith("text/plain")
    assert g.headers["Marketstore-Version"] == h.headers["Marketstore-Version"]


def test_unknown_content_type_is_415(server):
    r = requests.post(server.rpc_url, data=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.text == "rpc: unrecognized Content-Type: text/plain"
    r = requests.post(server.rpc_url, data=b"{}")
    assert r.status_code == 415
    # Parameters after ';' and letter case do not matter.
    r = requests.post(server.rpc_url, data=msgpack.dumps({"jsonrpc": "2.0", "method": "DataService.ListSymbols", "id": 1,
                                                          "params": {}}),
                      headers={"Content-Type": "Application/X-Msgpack; charset=binary"})
    assert r.status_code == 200 and msgpack.loads(r.content)["result"] == {"Results": []}


def test_error_object_on_http_200_and_id_types(server):
    r = call(server, "DataService.Query", {"requests": [{"destination": "NOPE/1Min/OHLCV"}]}, raw=True)
    assert r.headers["Content-Type"] == "application/x-msgpack"
    assert r.headers["Marketstore-Version"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    body = msgpack.loads(r.content)
    assert set(body) == {"jsonrpc", "error", "id"}
    assert body["error"]["code"] == -32000
    assert body["error"]["message"].startswith("no files returned from query parse")
    assert body["error"]["data"] is None
    # The id comes back with its msgpack type.
    for id_ in ["abc", 7, 2**63 + 5, -3, b"\x00\x01", 1.5]:
        assert call(server, "DataService.ListSymbols", {}, id_=id_)["id"] == id_
    assert call(server, "DataService.Nope", {})["error"] == {
        "code": -32000, "message": 'rpc: can\'t find method "DataService.Nope"', "data": None}
    assert call(server, "Other.Query", {})["error"]["message"] == 'rpc: can\'t find service "Other.Query"'
    assert call(server, "Query", {})["error"]["message"] == 'rpc: service/method request ill-formed: "Query"'
    bad = requests.post(server.rpc_url, headers=MP,
                        data=msgpack.dumps({"jsonrpc": "1.0", "method": "DataService.ListSymbols", "id": 1}))
    assert msgpack.loads(bad.content)["error"]["code"] == -32600
    garbage = requests.post(server.rpc_url, headers=MP, data=b"\xc1\xc1")
    assert garbage.status_code == 200 and msgpack.loads(garbage.content)["error"]["code"] == -32700


def test_notification_has_no_body_but_runs(server):
    r = call(server, "DataService.Write", write_params({"NOTE/1Min/OHLCV": ([Y2024], [1.5])}), id_=None, raw=True)
    assert r.content == b""
    res = call(server, "DataService.ListSymbols", {"format": "tbk"})["result"]
    assert res == {"Results": ["NOTE/1Min/OHLCV"]}


def test_params_as_one_element_array(server):
    r = call(server, "DataService.ListSymbols", [{"format": "symbol"}])
    assert r["result"] == {"Results": []}


def test_query_reply_shape(server):
    call(server, "DataService.Write", write_params({"AAPL/1Min/OHLCV": ([Y2024, Y2024 + 60], [1.5, 2.5])}))
    res = call(server, "DataService.Query", {"requests": [{"destination": "AAPL/1Min/OHLCV"}]})["result"]
    assert set(res) == {"responses", "version", "timezone"}
    assert res["timezone"] == "UTC"
    ds = res["responses"][0]["result"]
    key = "AAPL/1Min/OHLCV:Symbol/Timeframe/AttributeGroup"
    assert ds == {"types": ["i8", "f4"], "names": ["Epoch", "Close"],
                  "data": [le([Y2024, Y2024 + 60], "<i8"), le([1.5, 2.5], "<f4")],
                  "length": 2, "startindex": {key: 0}, "lengths": {key: 2}}


def test_write_several_keys_in_one_dataset(server):
    r = call(server, "DataService.Write", write_params({
        "K1/1Min/OHLCV": ([Y2024, Y2024 + 60], [1.0, 2.0]),
        "K2/1Min/OHLCV:Symbol/Timeframe/AttributeGroup": ([Y2024], [3.0]),
    }))
    assert r["result"] == {"responses": None}
    res = call(server, "DataService.Query", {"requests": [{"destination": "K1,K2/1Min/OHLCV"}]})["result"]
    ds = res["responses"][0]["result"]
    assert ds["length"] == 3
    k1, k2 = "K1/1Min/OHLCV:Symbol/Timeframe/AttributeGroup", "K2/1Min/OHLCV:Symbol/Timeframe/AttributeGroup"
    assert ds["lengths"] == {k1: 2, k2: 1}
    closes = np.frombuffer(ds["data"][1], "<f4")
    assert list(closes[ds["startindex"][k1]:][:2]) == [1.0, 2.0]
    assert list(closes[ds["startindex"][k2]:][:1]) == [3.0]
    # Several requests in one call: only the failing one is reported.
    two = write_params({"K3/1Min/OHLCV": ([Y2024], [1.0])})
    bad = write_params({"K4/1Min/OHLCV": ([Y2024], [1.0])})
    bad["requests"][0]["dataset"]["types"] = ["f8", "f4"]
    two["requests"] += bad["requests"]
    errs = call(server, "DataService.Write", two)["result"]["responses"]
    assert len(errs) == 1 and errs[0]["error"].startswith("unexpected data type for Epoch column")
    assert errs[0]["version"]


def test_create_accepts_is_variable_length_and_getinfo(server):
    req = {"key": "ETH/1Sec/TICK:Symbol/Timeframe/AttributeGroup", "column_names": ["Epoch", "Price", "Size"],
           "column_types": ["i8", "f8", "u4"], "is_variable_length": True}
    assert call(server, "DataService.Create", {"requests": [req]})["result"] == {
        "responses": [{"error": "", "version": requests.head(server.rpc_url).headers["Marketstore-Version"]}]}
    info = call(server, "DataService.GetInfo", {"requests": [{"key": "ETH/1Sec/TICK"}, {"key": "NO/1Min/X"}]})
    a, b = info["result"]["responses"]
    assert a["RecordType"] == 1
    assert a["TimeFrame"] == 1_000_000_000
    assert a["DSV"] == [{"Name": "Epoch", "Type": 3}, {"Name": "Price", "Type": 2}, {"Name": "Size", "Type": 12}]
    assert a["ServerResp"]["error"] == ""
    assert a["LatestYear"] >= 2024
    assert b["ServerResp"]["error"].startswith("unable to get info about key NO/1Min/X")
    # An unknown type stops processing the remaining requests (MarketStore).
    r = call(server, "DataService.Create", {"requests": [
        {"key": "X/1Min/A:Symbol/Timeframe/AttributeGroup", "column_names": ["v"], "column_types": ["S8"]},
        {"key": "Y/1Min/A:Symbol/Timeframe/AttributeGroup", "column_names": ["v"], "column_types": ["f4"]}]})
    assert [x["error"] for x in r["result"]["responses"]] == ["unexpected data type:S8"]


def test_json_codec_go_field_names(server):
    h = {"Content-Type": "application/json"}
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    w = {"jsonrpc": "2.0", "method": "DataService.Write", "id": 1, "params": {"Requests": [{"Data": {
        "ColumnTypes": ["i8", "f8"], "ColumnNames": ["Epoch", "Px"],
        "ColumnData": [b64(le([Y2024, Y2024 + 60], "<i8")), b64(le([1.25, 2.5], "<f8"))],
        "Length": 2, "StartIndex": {"JS/1Min/X": 0}, "Lengths": {"JS/1Min/X": 2}}}]}}
    r = requests.post(server.rpc_url, data=json.dumps(w), headers=h)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.json() == {"jsonrpc": "2.0", "result": {"Responses": None}, "id": 1}
    qry = {"jsonrpc": "2.0", "method": "DataService.Query", "id": "q",
           "params": {"Requests": [{"destination": "JS/1Min/X", "EpochStart": Y2024 + 60, "LimitRecordCount": 10}]}}
    out = requests.post(server.rpc_url, data=json.dumps(qry), headers=h).json()
    res = out["result"]
    assert res["Timezone"] == "UTC" and res["Version"]
    ds = res["Responses"][0]["Result"]
    assert ds["ColumnNames"] == ["Epoch", "Px"] and ds["ColumnTypes"] == ["i8", "f8"] and ds["Length"] == 1
    assert ds["ColumnData"] == [b64(le([Y2024 + 60], "<i8")), b64(le([2.5], "<f8"))]
    assert ds["StartIndex"] == {"JS/1Min/X:Symbol/Timeframe/AttributeGroup": 0}
    err = requests.post(server.rpc_url, headers=h, data=json.dumps(
        {"jsonrpc": "2.0", "method": "DataService.Query", "id": 5, "params": {"Requests": [{"destination": "NO/1Min/X"}]}})).json()
    assert err["id"] == 5 and err["error"]["code"] == -32000 and "result" not in err


def test_heartbeat_and_metrics(server):
    hb = requests.get(f"{server.http_url}/heartbeat")
    assert hb.status_code == 200
    j = hb.json()
    assert j["status"] == "queryable" and j["version"] and "git_hash" in j
    assert j["uptime"].endswith("s")
    call(server, "DataService.Write", write_params({"M/1Min/X": ([Y2024, Y2024 + 60, Y2024 + 120], [1, 2, 3])}))
    call(server, "DataService.Query", {"requests": [{"destination": "M/1Min/X"}]})
    m = requests.get(f"{server.http_url}/metrics")
    assert m.status_code == 200 and m.headers["Content-Type"].startswith("text/plain")
    lines = m.text.splitlines()
    assert "mkts_rows_written_total 3" in lines
    assert 'alpaca_marketstore_rpc_successful_request_duration_seconds_count{method="Write"} 1' in lines
    assert 'alpaca_marketstore_rpc_successful_request_duration_seconds_count{method="Query"} 1' in lines
    assert "alpaca_marketstore_ws_connections 0" in lines
    disk = [l for l in lines if l.startswith("alpaca_marketstore_total_disk_usage_bytes ")]
    assert disk and int(disk[0].split()[1]) > 0


def test_policy_refusals_surface(server_factory):
    srv = server_factory("enable_add: false\nenable_remove: false\nqueryable: false\n")
    r = call(srv, "DataService.Write", write_params({"A/1Min/X": ([Y2024], [1.0])}))
    errs = r["result"]["responses"]
    assert len(errs) == 1 and "enable_add: false" in errs[0]["error"]
    r = call(srv, "DataService.Create", {"requests": [
        {"key": "A/1Min/X:Symbol/Timeframe/AttributeGroup", "column_names": ["v"], "column_types": ["f4"]}]})
    assert "enable_add: false" in r["result"]["responses"][0]["error"]
    r = call(srv, "DataService.Destroy", {"requests": [{"key": "A/1Min/X"}]})
    assert r["result"]["responses"][0]["error"].startswith("removal of catalog entry failed")
    assert call(srv, "DataService.ListSymbols", {})["error"]["message"] == "server is not queryable"
    assert call(srv, "DataService.Query", {"requests": [{"destination": "A/1Min/X"}]})["error"]["message"] == \
        "server is not queryable"


def test_enable_remove_false_refuses_destroy(server_factory):
    srv = server_factory("enable_remove: false\n")
    call(srv, "DataService.Write", write_params({"A/1Min/X": ([Y2024], [1.0])}))
    r = call(srv, "DataService.Destroy", {"requests": [{"key": "A/1Min/X"}]})
    assert "enable_remove: false" in r["result"]["responses"][0]["error"]
    assert call(srv, "DataService.ListSymbols", {})["result"] == {"Results": ["A"]}
