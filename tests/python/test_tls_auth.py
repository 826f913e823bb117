"""TLS on both ports and users with roles on every interface (docs/operations.md), driven by the real
clients: pyarrow.flight (grpc+tls, authenticate_basic_token), ADBC Flight SQL (username/password),
pymarketstore over https with user:password in the URL, websocket-client over wss, grpcio with
`authorization` metadata, `mkts connect --ca-file --user`, and an out-of-process plugin with a role.

The certificates are made here with openssl: a test CA and a server certificate for localhost/127.0.0.1.
"""
from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
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

from conftest import REPO, mkts_bin

Y2024 = 1_704_067_200
PASSWORDS = {"alice": "wonder land", "rita": "r1ta-writes", "bob": "read only bob"}
ROLES = {"alice": "admin", "rita": "read_write", "bob": "read_only"}


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=mkts test CA", cwd=d)
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    # A second key that does not belong to server.pem.
    openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2", "-subj", "/CN=other", cwd=d)
    return d


def hash_password(pw: str) -> str:
    out = subprocess.run([mkts_bin(), "hash-password"], input=pw + "\n", capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def users_yaml() -> str:
    lines = ["auth:", "  users:"]
    for name, pw in PASSWORDS.items():
        lines += [f"    - name: {name}", f"      password_hash: \"{hash_password(pw)}\"", f"      role: {ROLES[name]}"]
    return "\n".join(lines) + "\n"


def tls_yaml(certs: Path) -> str:
    return f"tls:\n  cert_file: {certs / 'server.pem'}\n  key_file: {certs / 'server.key'}\n  ca_file: {certs / 'ca.pem'}\n"


@pytest.fixture
def secure(server_factory, certs, users_yaml):
    """A server with TLS on both ports and three users."""
    return server_factory(tls_yaml(certs) + users_yaml, tls_ca=certs / "ca.pem")


@pytest.fixture
def open_auth(server_factory, users_yaml):
    """A server with users but without TLS (the per-interface role checks, on plain ports)."""
    return server_factory(users_yaml)


def flight_client(srv, certs=None) -> fl.FlightClient:
    if certs:
        return fl.FlightClient(f"grpc+tls://localhost:{srv.grpc_port}", tls_root_certs=(certs / "ca.pem").read_bytes())
    return fl.FlightClient(srv.flight_url)


def login(client, user) -> fl.FlightCallOptions:
    header = client.authenticate_basic_token(user.encode(), PASSWORDS[user].encode())
    return fl.FlightCallOptions(headers=[header])


def bars(n=3, start=0):
    return pa.table({"Epoch": pa.array([Y2024 + 60 * (start + i) for i in range(n)], pa.int64()),
                     "Close": pa.array([float(start + i) for i in range(n)], pa.float64())})


def put(client, key, table, options):
    writer, reader = client.do_put(fl.FlightDescriptor.for_path(key), table.schema, options=options)
    writer.write_table(table)
    writer.done_writing()
    reader.read()
    writer.close()


def read(client, key, options):
    return client.do_get(fl.Ticket(json.dumps({"destination": key}).encode()), options=options).read_all()


def action(client, name, body, options):
    return [json.loads(r.body.to_pybytes()) for r in client.do_action(fl.Action(name, json.dumps(body).encode()), options=options)]


def basic(user, pw=None) -> dict:
    raw = f"{user}:{PASSWORDS[user] if pw is None else pw}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


# ---------------------------------------------------------------- TLS


def test_every_client_connects_over_tls_and_a_client_without_the_ca_is_refused(secure, certs, monkeypatch):
    ca = certs / "ca.pem"
    client = flight_client(secure, certs)
    alice = login(client, "alice")
    put(client, "TLS/1Min/OHLCV", bars(3), alice)
    assert read(client, "TLS/1Min/OHLCV", alice).column("Close").to_pylist() == [0.0, 1.0, 2.0]

    # Flight without the CA: the handshake fails, nothing is served.
    stranger = fl.FlightClient(f"grpc+tls://localhost:{secure.grpc_port}")
    with pytest.raises(fl.FlightError):  # Unavailable or Internal, by pyarrow version: the TLS handshake failed
        stranger.authenticate_basic_token(b"alice", PASSWORDS["alice"].encode())
    # Plaintext against the TLS port fails as well.
    with pytest.raises(fl.FlightError):
        list(fl.FlightClient(f"grpc://127.0.0.1:{secure.grpc_port}").list_flights(options=alice))

    # ADBC Flight SQL over grpc+tls with username/password options.
    with dbapi.connect(f"grpc+tls://localhost:{secure.grpc_port}", db_kwargs={
        "username": "bob", "password": PASSWORDS["bob"],
        "adbc.flight.sql.client_option.tls_root_certs": ca.read_text(),
    }) as conn, conn.cursor() as cur:
        cur.execute('SELECT "Close" FROM "TLS/1Min/OHLCV" ORDER BY "Epoch"')
        assert [r[0] for r in cur.fetchall()] == [0.0, 1.0, 2.0]

    # pymarketstore over https, the CA from REQUESTS_CA_BUNDLE, credentials in the URL.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    pm = pymkts.Client(f"https://rita:{PASSWORDS['rita']}@localhost:{secure.http_port}/rpc")
    data = np.array([(Y2024 + 600, 9.5)], dtype=[("Epoch", "i8"), ("Close", "f8")])
    pm.write(data, "TLS/1Min/OHLCV")
    df = pm.query(pymkts.Params("TLS", "1Min", "OHLCV")).first().df()
    assert df["Close"].tolist() == [0.0, 1.0, 2.0, 9.5]
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"https://localhost:{secure.http_port}/heartbeat", timeout=5)

    # /heartbeat and /metrics stay open (over TLS); /ws over wss with Basic.
    r = requests.get(f"https://localhost:{secure.http_port}/heartbeat", verify=str(ca), timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "queryable"
    assert requests.get(f"https://localhost:{secure.http_port}/metrics", verify=str(ca), timeout=5).status_code == 200
    ws = websocket.create_connection(f"wss://localhost:{secure.http_port}/ws", timeout=10,
                                     sslopt={"ca_certs": str(ca)}, header=[f"Authorization: {basic('bob')['Authorization']}"])
    frame = msgpack.dumps({"streams": ["TLS/*/*"]})
    ws.send(frame, opcode=websocket.ABNF.OPCODE_BINARY)
    assert msgpack.loads(ws.recv()) == {"streams": ["TLS/*/*"]}
    ws.close()
    with pytest.raises(ssl.SSLError):
        websocket.create_connection(f"wss://localhost:{secure.http_port}/ws", timeout=10)

    # mkts connect over TLS with the CA and a user.
    env = dict(os.environ, MKTS_PASSWORD=PASSWORDS["bob"])
    out = subprocess.run([mkts_bin(), "connect", "--url", f"grpc+tls://localhost:{secure.grpc_port}", "--ca-file", str(ca),
                          "--user", "bob", "-c", 'SELECT count(*) AS n FROM "TLS/1Min/OHLCV"'],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "4" in out.stdout
    out = subprocess.run([mkts_bin(), "connect", "--url", f"grpc+tls://localhost:{secure.grpc_port}", "--ca-file", str(ca),
                          "--user", "bob", "-c", "SELECT 1"],
                         capture_output=True, text=True, env=dict(os.environ, MKTS_PASSWORD="wrong"), timeout=60)
    assert out.returncode != 0 and "authentication as \"bob\" failed" in out.stderr, out.stderr


def test_connect_over_https_jsonrpc_with_ca_file_and_user(secure, certs):
    """`mkts connect --url https://…:5993` speaks JSON-RPC over TLS with --ca-file, HTTP Basic from --user."""
    ca = certs / "ca.pem"
    url = f"https://localhost:{secure.http_port}"
    run = lambda pw, *cmds, extra=(): subprocess.run(  # noqa: E731
        [mkts_bin(), "connect", "--url", url, *extra, *[x for c in cmds for x in ("-c", c)]],
        capture_output=True, text=True, env=dict(os.environ, MKTS_PASSWORD=pw), timeout=60)
    out = run(PASSWORDS["alice"], "\\create HTTPS/1Min/OHLCV Close/float64 fixed", "\\getinfo HTTPS/1Min/OHLCV",
              extra=("--ca-file", str(ca), "--user", "alice"))
    assert out.returncode == 0, out.stderr
    assert "created HTTPS/1Min/OHLCV" in out.stdout and "Data Types: {Epoch:i8 Close:f8}" in out.stdout
    # The role applies: bob reads but may not create.
    out = run(PASSWORDS["bob"], "\\create BOB/1Min/OHLCV Close/float64 fixed", extra=("--ca-file", str(ca), "--user", "bob"))
    assert out.returncode != 0 and "read_only" in out.stderr, out.stderr
    out = run("wrong", "\\getinfo HTTPS/1Min/OHLCV", extra=("--ca-file", str(ca), "--user", "bob"))
    assert out.returncode != 0 and "authentication failed" in out.stderr and "401" in out.stderr, out.stderr
    # Without the CA the server's certificate is not trusted; --ca-file needs a TLS url.
    out = run(PASSWORDS["bob"], "\\getinfo HTTPS/1Min/OHLCV", extra=("--user", "bob"))
    assert out.returncode != 0 and "cannot reach" in out.stderr, out.stderr
    out = subprocess.run([mkts_bin(), "connect", "--url", f"http://localhost:{secure.http_port}", "--ca-file", str(ca), "-c", "SELECT 1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--ca-file needs a TLS url" in out.stderr, out.stderr


def test_connect_to_a_bare_host_port_with_auth_finds_the_protocol(open_auth):
    """A bare host:port on another port than 5993/5995 is probed: mkts's /rpc under auth answers 401 with its
    challenge, so the HTTP port speaks JSON-RPC (GetInfo has no row count) and the gRPC port Flight SQL."""
    env = dict(os.environ, MKTS_PASSWORD=PASSWORDS["alice"])
    run = lambda port, *cmds, extra=("--user", "alice"): subprocess.run(  # noqa: E731
        [mkts_bin(), "connect", "--url", f"127.0.0.1:{port}", *extra, *[x for c in cmds for x in ("-c", c)]],
        capture_output=True, text=True, env=env, timeout=60)
    out = run(open_auth.http_port, "\\create BARE/1Min/OHLCV Close/float64 fixed", "\\getinfo BARE/1Min/OHLCV")
    assert out.returncode == 0, out.stderr
    assert "created BARE/1Min/OHLCV" in out.stdout and "Data Types: {Epoch:i8 Close:f8}" in out.stdout
    assert "Rows:" not in out.stdout
    out = run(open_auth.grpc_port, "\\getinfo BARE/1Min/OHLCV")
    assert out.returncode == 0, out.stderr
    assert "Rows: 0" in out.stdout
    out = run(open_auth.http_port, "\\getinfo BARE/1Min/OHLCV", extra=())
    assert out.returncode != 0 and "authentication failed" in out.stderr and "401" in out.stderr, out.stderr
    # Credentials in the url are refused and not echoed.
    out = subprocess.run([mkts_bin(), "connect", "--url", f"http://alice:{PASSWORDS['alice']}@127.0.0.1:{open_auth.http_port}", "-c", "SELECT 1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "must not carry credentials" in out.stderr, out.stderr
    assert PASSWORDS["alice"] not in out.stderr + out.stdout


@pytest.mark.parametrize("case", ["missing_cert", "missing_key", "not_pem", "mismatched_key"])
def test_bad_certificate_files_are_one_clear_start_up_error(server_factory, certs, case, tmp_path):
    cert, key = certs / "server.pem", certs / "server.key"
    if case == "missing_cert":
        cert = tmp_path / "nope.pem"
        says = f"tls.cert_file {cert}: cannot read"
    elif case == "missing_key":
        key = tmp_path / "nope.key"
        says = f"tls.key_file {key}: cannot read"
    elif case == "not_pem":
        cert = tmp_path / "junk.pem"
        cert.write_text("hello\n")
        says = "holds no PEM certificate"
    else:
        key = certs / "other.key"
        says = f"tls: the key in {key} does not belong to the certificate in {cert}"
    srv = server_factory(f"tls:\n  cert_file: {cert}\n  key_file: {key}\n", start=False)
    with pytest.raises(RuntimeError, match="exited with 1"):
        srv.start(timeout=30)
    assert says in srv.log(), srv.log()
    assert not (srv.root / ".wal").exists(), "nothing was opened before the error"


# ---------------------------------------------------------------- users and roles, per interface


def test_flight_credentials_and_roles(open_auth):
    client = flight_client(open_auth)
    with pytest.raises(fl.FlightUnauthenticatedError, match="authentication required"):
        list(client.list_flights())
    with pytest.raises(fl.FlightUnauthenticatedError) as wrong_pw:
        client.authenticate_basic_token(b"alice", b"nope")
    with pytest.raises(fl.FlightUnauthenticatedError) as no_user:
        client.authenticate_basic_token(b"mallory", b"nope")
    assert "invalid credentials" in str(wrong_pw.value)
    assert str(wrong_pw.value).split("gRPC client debug context")[0] == str(no_user.value).split("gRPC client debug context")[0]
    bogus = fl.FlightCallOptions(headers=[(b"authorization", b"Bearer mkts1.e30.AAAA")])
    with pytest.raises(fl.FlightUnauthenticatedError):
        list(client.list_flights(options=bogus))

    alice, rita, bob = login(client, "alice"), login(client, "rita"), login(client, "bob")
    put(client, "R/1Min/OHLCV", bars(3), alice)
    # read_only: reads yes, writes no, and nothing changes.
    assert read(client, "R/1Min/OHLCV", bob).num_rows == 3
    assert [f.descriptor.path[0].decode() for f in client.list_flights(options=bob)] == ["R/1Min/OHLCV"]
    with pytest.raises(fl.FlightUnauthorizedError, match="role read_only"):
        put(client, "R/1Min/OHLCV", bars(2, start=10), bob)
    with pytest.raises(fl.FlightUnauthorizedError):
        put(client, "NEW/1Min/OHLCV", bars(1), bob)
    assert read(client, "R/1Min/OHLCV", alice).num_rows == 3
    # read_write: writes (a new bucket too), but no destroy, create or delete_range.
    put(client, "R/1Min/OHLCV", bars(2, start=10), rita)
    put(client, "W/1Min/OHLCV", bars(1), rita)
    for name, body in [("destroy", {"key": "R/1Min/OHLCV"}),
                       ("delete_range", {"key": "R/1Min/OHLCV", "epoch_start": 0, "epoch_end": Y2024 * 2}),
                       ("create", {"key": "C/1Min/OHLCV", "column_names": ["Epoch", "Close"], "column_types": ["i8", "f8"]})]:
        with pytest.raises(fl.FlightUnauthorizedError, match="role read_write"):
            action(client, name, body, rita)
    assert read(client, "R/1Min/OHLCV", alice).num_rows == 5
    # admin: everything.
    assert action(client, "destroy", {"key": "W/1Min/OHLCV"}, alice) == [{"destroyed": "W/1Min/OHLCV"}]
    # A bearer header straight from the handshake works on later calls of any client.
    token = dict([client.authenticate_basic_token(b"bob", PASSWORDS["bob"].encode())])[b"authorization"]
    other = flight_client(open_auth)
    assert read(other, "R/1Min/OHLCV", fl.FlightCallOptions(headers=[(b"authorization", token)])).num_rows == 5


def test_flight_sql_statements_are_checked_by_what_they_do(open_auth):
    def conn(user):
        return dbapi.connect(open_auth.flight_url, db_kwargs={"username": user, "password": PASSWORDS[user]})

    client = flight_client(open_auth)
    put(client, "S/1Min/OHLCV", bars(3), login(client, "alice"))
    with conn("bob") as c, c.cursor() as cur:
        cur.execute('SELECT sum("Close") FROM "S/1Min/OHLCV"')
        assert cur.fetchone()[0] == 3.0
        for sql in [f'INSERT INTO "S/1Min/OHLCV" VALUES ({Y2024 + 6000}, 7.0)',
                    f'DELETE FROM "S/1Min/OHLCV" WHERE "Epoch" = to_timestamp({Y2024})',
                    'CREATE VIEW v AS SELECT 1']:
            with pytest.raises(dbapi.Error, match="role read_only"):
                cur.execute(sql)
                cur.fetchall()
    with conn("rita") as c, c.cursor() as cur:
        cur.execute(f'INSERT INTO "S/1Min/OHLCV" VALUES ({Y2024 + 6000}, 7.0)')
        cur.fetchall()
        with pytest.raises(dbapi.Error, match="role read_write"):
            cur.execute(f'DELETE FROM "S/1Min/OHLCV" WHERE "Epoch" = to_timestamp({Y2024})')
            cur.fetchall()
    with conn("alice") as c, c.cursor() as cur:
        cur.execute(f'DELETE FROM "S/1Min/OHLCV" WHERE "Epoch" = to_timestamp({Y2024})')
        cur.fetchall()
        cur.execute('SELECT "Close" FROM "S/1Min/OHLCV" ORDER BY "Epoch"')
        assert [r[0] for r in cur.fetchall()] == [1.0, 2.0, 7.0]
    with pytest.raises(dbapi.Error):
        with dbapi.connect(open_auth.flight_url, db_kwargs={"username": "bob", "password": "nope"}) as c, c.cursor() as cur:
            cur.execute("SELECT 1")


def test_rpc_credentials_and_roles(open_auth):
    rpc = open_auth.rpc_url
    url = lambda user, pw=None: f"http://{user}:{PASSWORDS[user] if pw is None else pw}@127.0.0.1:{open_auth.http_port}/rpc"  # noqa: E731
    body = msgpack.dumps({"jsonrpc": "2.0", "id": 1, "method": "DataService.ListSymbols", "params": {}})
    h = {"Content-Type": "application/x-msgpack"}
    r = requests.post(rpc, data=body, headers=h, timeout=10)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert "authentication required" in r.text
    wrong = requests.post(rpc, data=body, headers={**h, **basic("alice", "nope")}, timeout=10)
    nobody = requests.post(rpc, data=body, headers={**h, "Authorization": "Basic " + base64.b64encode(b"mallory:x").decode()}, timeout=10)
    assert wrong.status_code == nobody.status_code == 401 and wrong.text == nobody.text
    # /heartbeat stays open; /metrics too (protect_metrics is off).
    assert requests.get(f"{open_auth.http_url}/heartbeat", timeout=5).status_code == 200
    assert requests.get(f"{open_auth.http_url}/metrics", timeout=5).status_code == 200

    data = np.array([(Y2024, 1.0), (Y2024 + 60, 2.0)], dtype=[("Epoch", "i8"), ("Close", "f8")])
    pymkts.Client(url("rita")).write(data, "P/1Min/OHLCV")
    bob = pymkts.Client(url("bob"))
    assert bob.query(pymkts.Params("P", "1Min", "OHLCV")).first().df()["Close"].tolist() == [1.0, 2.0]
    with pytest.raises(requests.HTTPError) as e:
        bob.write(np.array([(Y2024 + 120, 3.0)], dtype=data.dtype), "P/1Min/OHLCV")
    assert e.value.response.status_code == 403
    assert b"role read_only" in e.value.response.content
    with pytest.raises(requests.HTTPError) as e:
        pymkts.Client(url("rita")).destroy("P/1Min/OHLCV")
    assert e.value.response.status_code == 403
    assert bob.query(pymkts.Params("P", "1Min", "OHLCV")).first().df()["Close"].tolist() == [1.0, 2.0]
    pymkts.Client(url("alice")).destroy("P/1Min/OHLCV")
    assert pymkts.Client(url("alice")).list_symbols() == []
    # The Flight handshake's token works as Bearer on /rpc.
    token = dict([flight_client(open_auth).authenticate_basic_token(b"bob", PASSWORDS["bob"].encode())])[b"authorization"]
    r = requests.post(rpc, data=body, headers={**h, "Authorization": token.decode()}, timeout=10)
    assert r.status_code == 200 and msgpack.loads(r.content)["result"] == {"Results": []}


def test_marketstore_grpc_and_ws_credentials_and_roles(open_auth):
    ch = grpc.insecure_channel(open_auth.grpc_addr)
    stub = pbg.MarketstoreStub(ch)
    md = lambda user: [("authorization", basic(user)["Authorization"])]  # noqa: E731

    def write(user):
        ds = pb.NumpyMultiDataset(
            data=pb.NumpyDataset(column_types=["i8", "f8"], column_names=["Epoch", "V"],
                                 column_data=[np.asarray([Y2024], "<i8").tobytes(), np.asarray([1.5], "<f8").tobytes()], length=1),
            start_index={"G/1Min/X": 0}, lengths={"G/1Min/X": 1})
        return stub.Write(pb.MultiWriteRequest(requests=[pb.WriteRequest(data=ds)]), metadata=md(user) if user else None)

    with pytest.raises(grpc.RpcError) as e:
        write(None)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.ListSymbols(pb.ListSymbolsRequest(), metadata=[("authorization", basic("bob", "nope")["Authorization"])])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        write("bob")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list(stub.ListSymbols(pb.ListSymbolsRequest(), metadata=md("bob")).results) == []
    assert len(write("rita").responses) == 0
    with pytest.raises(grpc.RpcError) as e:
        stub.Destroy(pb.MultiKeyRequest(requests=[pb.KeyRequest(key="G/1Min/X")]), metadata=md("rita"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list(stub.ListSymbols(pb.ListSymbolsRequest(), metadata=md("bob")).results) == ["G"]
    ch.close()

    ws_url = f"ws://127.0.0.1:{open_auth.http_port}/ws"
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(ws_url, timeout=10)
    assert e.value.status_code == 401
    ws = websocket.create_connection(ws_url, timeout=10, header=[f"Authorization: {basic('bob')['Authorization']}"])
    ws.send(msgpack.dumps({"streams": ["G/*/*"]}), opcode=websocket.ABNF.OPCODE_BINARY)
    assert msgpack.loads(ws.recv()) == {"streams": ["G/*/*"]}
    ws.close()


def test_plugins_act_with_the_role_of_their_entry(server_factory, users_yaml):
    worker = REPO / "plugins" / "examples" / "python" / "ticker_worker.py"
    srv = server_factory(users_yaml + (
        "triggers:\n"
        "  - module: ondiskagg\n    on: \"*/1Min/OHLCV\"\n    role: read_only\n    config:\n      destinations: [5Min]\n"
        "  - module: ondiskagg\n    on: \"*/1Min/OHLCV\"\n    config:\n      destinations: [15Min]\n"
        "bgworkers:\n"
        f"  - module: {worker}\n    name: pyticker\n    config:\n      key: PYTICK/1Min/OHLCV\n      interval_ms: 10\n      count: 3\n"
    ))
    client = flight_client(srv)
    alice = login(client, "alice")
    table = pa.table({"Epoch": pa.array([Y2024 + 60 * i for i in range(10)], pa.int64()),
                      "Open": pa.array([1.0] * 10, pa.float32()), "High": pa.array([2.0] * 10, pa.float32()),
                      "Low": pa.array([0.5] * 10, pa.float32()), "Close": pa.array([1.5] * 10, pa.float32()),
                      "Volume": pa.array([10] * 10, pa.int64())})
    put(client, "AGG/1Min/OHLCV", table, alice)
    deadline = time.time() + 30
    keys: set[str] = set()
    while time.time() < deadline:
        keys = {f.descriptor.path[0].decode() for f in client.list_flights(options=alice)}
        if {"AGG/15Min/OHLCV", "PYTICK/1Min/OHLCV"} <= keys and read(client, "PYTICK/1Min/OHLCV", alice).num_rows == 3:
            break
        time.sleep(0.1)
    # The default role (read_write) lets the second ondiskagg and the process worker write; the read_only
    # ondiskagg is refused, says so in the log, and writes nothing.
    assert read(client, "AGG/15Min/OHLCV", alice).column("Volume").to_pylist() == [100]
    assert read(client, "PYTICK/1Min/OHLCV", alice).column("Value").to_pylist() == [0.0, 1.0, 2.0]
    assert "AGG/5Min/OHLCV" not in keys
    assert "role read_only" in srv.log()


def test_start_up_says_how_open_the_server_is(server_factory, users_yaml, tmp_path):
    srv = server_factory(users_yaml)
    assert "passwords and tokens travel in clear text" in srv.log()
    srv.stop()
    # Without auth: on loopback a note; on all interfaces (MarketStore's default) a loud warning.
    srv = server_factory()
    assert "no authentication configured" in srv.log() and "NO AUTHENTICATION" not in srv.log()
    srv.stop()
    wide = server_factory(start=False)
    wide.config_path.write_text(wide.config_path.read_text().replace("listen_host: 127.0.0.1", "listen_host: 0.0.0.0"))
    wide.start()
    assert f"NO AUTHENTICATION: anyone who can reach 0.0.0.0:{wide.http_port} and 0.0.0.0:{wide.grpc_port}" in wide.log()


def test_hash_password_prints_an_argon2_hash_and_passwords_are_never_logged(server_factory, users_yaml):
    h = hash_password("s3cret")
    assert h.startswith("$argon2id$v=19$") and "s3cret" not in h
    assert hash_password("s3cret") != h
    srv = server_factory(users_yaml)
    client = flight_client(srv)
    login(client, "alice")
    with pytest.raises(fl.FlightUnauthenticatedError):
        client.authenticate_basic_token(b"alice", b"hunter2-wrong")
    srv.stop()
    log = srv.log()
    for secret in [*PASSWORDS.values(), "hunter2-wrong", "mkts1."]:
        assert secret not in log
