"""`proto.Marketstore` over gRPC with pymarketstore's generated stub (reference §3): proto3 defaults
(`epoch_end == 0` = no end), status codes, Create's `row_type` rules, ServerVersion, and that the service
shares the port with Arrow Flight.
"""
from __future__ import annotations

import json

import grpc
import numpy as np
import pyarrow.flight as fl
import pytest
import requests
import pymarketstore as pymkts
import pymarketstore.proto.marketstore_pb2 as pb
import pymarketstore.proto.marketstore_pb2_grpc as pbg

Y2024 = 1_704_067_200


@pytest.fixture
def stub(server):
    ch = grpc.insecure_channel(server.grpc_addr)
    yield pbg.MarketstoreStub(ch)
    ch.close()


def write(stub, key, epochs, values):
    ds = pb.NumpyMultiDataset(
        data=pb.NumpyDataset(column_types=["i8", "f8"], column_names=["Epoch", "V"],
                             column_data=[np.asarray(epochs, "<i8").tobytes(), np.asarray(values, "<f8").tobytes()],
                             length=len(epochs)),
        start_index={key: 0}, lengths={key: len(epochs)})
    return stub.Write(pb.MultiWriteRequest(requests=[pb.WriteRequest(data=ds, is_variable_length=False)]))


def test_query_defaults_and_errors(stub):
    assert len(write(stub, "G/1Min/X", [Y2024, Y2024 + 60, Y2024 + 120], [1, 2, 3]).responses) == 0
    # epoch_end 0 = no end; epoch_start 0 = from the beginning; limit 0 = no limit.
    r = stub.Query(pb.MultiQueryRequest(requests=[pb.QueryRequest(destination="G/1Min/X")]))
    assert r.timezone == "UTC" and r.version
    d = r.responses[0].result
    assert d.data.length == 3
    assert list(d.data.column_names) == ["Epoch", "V"] and list(d.data.column_types) == ["i8", "f8"]
    np.testing.assert_array_equal(np.frombuffer(d.data.column_data[1], "<f8"), [1, 2, 3])
    assert dict(d.start_index) == {"G/1Min/X:Symbol/Timeframe/AttributeGroup": 0}
    assert dict(d.lengths) == {"G/1Min/X:Symbol/Timeframe/AttributeGroup": 3}
    r = stub.Query(pb.MultiQueryRequest(requests=[pb.QueryRequest(destination="G/1Min/X", epoch_start=Y2024 + 60,
                                                                  epoch_end=Y2024 + 60)]))
    assert np.frombuffer(r.responses[0].result.data.column_data[0], "<i8").tolist() == [Y2024 + 60]
    with pytest.raises(grpc.RpcError) as e:
        stub.Query(pb.MultiQueryRequest(requests=[pb.QueryRequest(destination="NOPE/1Min/X")]))
    assert e.value.code() == grpc.StatusCode.UNKNOWN
    assert e.value.details().startswith("no files returned from query parse")


def test_create_row_type_and_types(stub):
    ok = stub.Create(pb.MultiCreateRequest(requests=[pb.CreateRequest(
        key="C/1Sec/TICK", data_shapes=[pb.DataShape(name="Epoch", type="i8"), pb.DataShape(name="P", type="f4")],
        row_type="variable")]))
    assert [x.error for x in ok.responses] == [""]
    bad = stub.Create(pb.MultiCreateRequest(requests=[pb.CreateRequest(
        key="D/1Min/X", data_shapes=[pb.DataShape(name="P", type="f4")], row_type="weird")]))
    assert [x.error for x in bad.responses] == ['record type "weird" must be one of fixed or variable']
    bad = stub.Create(pb.MultiCreateRequest(requests=[pb.CreateRequest(
        key="E/1Min/X", data_shapes=[pb.DataShape(name="P", type="b8")], row_type="fixed")]))
    assert [x.error for x in bad.responses] == ["not supported data type: b8"]
    syms = stub.ListSymbols(pb.ListSymbolsRequest(format=pb.ListSymbolsRequest.TIME_BUCKET_KEY))
    assert list(syms.results) == ["C/1Sec/TICK"]
    assert list(stub.ListSymbols(pb.ListSymbolsRequest()).results) == ["C"]


def test_server_version_and_shared_port(server, stub):
    v = stub.ServerVersion(pb.ServerVersionRequest()).version
    assert v == requests.head(server.rpc_url).headers["Marketstore-Version"]
    assert pymkts.Client(grpc=True, endpoint=server.grpc_addr).server_version() == v
    # Flight answers on the same port.
    write(stub, "SH/1Min/X", [Y2024], [4.5])
    t = fl.FlightClient(server.flight_url).do_get(fl.Ticket(json.dumps({"destination": "SH/1Min/X"}).encode())).read_all()
    assert t.column("V").to_pylist() == [4.5]
    m = requests.get(f"{server.http_url}/metrics").text
    assert 'mkts_request_duration_seconds_count{api="grpc",method="Write"} 1' in m.splitlines()
