"""Replication with real processes on loopback: a master and replicas, each `mkts start` with its own root
and ports (issue #12). Writes go to the master over Flight and pymarketstore; the replicas are read over
Flight and compared with the master exactly.
"""
from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore as pymkts
import pytest

from conftest import free_port
from test_bus_subscriptions import Subscriber
from test_flight_core import action, bars, client, get, put
from test_tls_auth import certs, users_yaml  # noqa: F401 - module-scoped fixtures (certificates, users)

Y2024 = 1_704_067_200
ERR = (pa.ArrowException, fl.FlightError)


def master_conf(port: int, extra: str = "") -> str:
    return f"replication:\n  enabled: true\n  listen_port: {port}\n{extra}"


def replica_conf(port: int, extra: str = "") -> str:
    return f"replication:\n  master_host: \"127.0.0.1:{port}\"\n  retry_interval: 200ms\n  retry_backoff_coeff: 1\n{extra}"


def status(srv) -> dict:
    return action(client(srv), "replication_status")


def wait_caught_up(master, replicas, timeout=60.0):
    """Until every replica has applied the master's position (and says it is connected)."""
    deadline = time.time() + timeout
    while True:
        head = status(master)["position"]
        states = [status(r)["replica"] for r in replicas]
        if all(s["connected"] and s["applied_position"] >= head and s["phase"] == "streaming" for s in states):
            return head
        if time.time() > deadline:
            raise AssertionError(f"replicas did not catch up with {head}: {states}\n{replicas[0].log()[-3000:]}")
        time.sleep(0.05)


def everything(srv) -> dict:
    """Every bucket of a server: key -> (info without timing fields, table)."""
    c = client(srv)
    keys = sorted(action(c, "list_symbols", {"format": "tbk"}) or [])
    out = {}
    for k in keys:
        info = action(c, "get_info", {"key": k})
        out[k] = (info, get(c, destination=k) if info["rows"] else None)
    return out


def assert_same(master, replica):
    m, r = everything(master), everything(replica)
    assert sorted(m) == sorted(r), (sorted(m), sorted(r))
    for k in m:
        assert m[k][0] == r[k][0], k
        if m[k][1] is None:
            assert r[k][1] is None, k
        else:
            assert m[k][1].equals(r[k][1]), k


def ticks(n, start=0, base=Y2024):
    i = np.arange(start, start + n, dtype=np.int64)
    return pa.table({
        "Epoch": pa.array(base + i // 1000),
        "Nanoseconds": pa.array(((i % 1000) * 1000).astype(np.int32)),
        "Price": pa.array(i.astype(np.float64) / 4),
        "Size": pa.array(i.astype(np.int32)),
    })


@pytest.fixture
def trio(server_factory):
    port = free_port()
    master = server_factory(master_conf(port))
    replicas = [server_factory(replica_conf(port)) for _ in range(2)]
    return port, master, replicas


def test_master_and_two_replicas_hold_the_same_data_after_every_kind_of_change(trio):
    _, master, replicas = trio
    c = client(master)
    m = np.arange(5, dtype=np.int64) * 60 + Y2024
    put(c, "AAPL/1Min/OHLCV", bars(m, open_=[1, 2, 3, 4, 5]))
    put(c, "AAPL/1Min/OHLCV", bars(m[-1:], open_=[50]))  # overwrite the newest bar (last write wins)
    put(c, "BTC/1Sec/TICK", ticks(10))
    put(c, "BTC/1Sec/TICK", ticks(40_000, start=10))  # a bulk append (the direct path: no rows in the log)
    pm = pymkts.Client(master.rpc_url)
    a = np.array([(Y2024 + 86400 * i, 10.0 + i, 1000 + i) for i in range(3)], dtype=[("Epoch", "i8"), ("Close", "f4"), ("Volume", "i8")])
    assert pm.write(a, "MSFT/1D/OHLCV")["responses"] is None
    put(c, "GONE/1Min/OHLCV", bars(m))
    action(c, "delete_range", {"key": "AAPL/1Min/OHLCV", "epoch_start": int(m[1]), "epoch_end": int(m[2])})
    action(c, "destroy", {"key": "GONE/1Min/OHLCV"})
    action(c, "create", {"key": "EMPTY/1Min/OHLCV", "column_names": ["Open", "Volume"], "column_types": ["f4", "i8"]})
    # Schema changes: a column added (then written), a column dropped.
    action(c, "add_column", {"key": "AAPL/1Min/OHLCV", "column_names": ["Venue"], "column_types": ["utf8"]})
    put(c, "AAPL/1Min/OHLCV", pa.table({"Epoch": pa.array([int(m[-1]) + 60]), "Open": pa.array([60.0], pa.float32()),
                                        "Volume": pa.array([6]), "Venue": pa.array(["IEX"])}))
    action(c, "drop_column", {"key": "MSFT/1D/OHLCV", "column_names": ["Volume"]})
    wait_caught_up(master, replicas)
    for r in replicas:
        assert_same(master, r)
    aapl = get(client(replicas[0]), destination="AAPL/1Min/OHLCV")
    assert aapl.column("Open").to_pylist() == [1.0, 4.0, 50.0, 60.0]
    assert aapl.column("Venue").to_pylist() == [None, None, None, "IEX"]
    assert get(client(replicas[1]), destination="MSFT/1D/OHLCV").column_names == ["Epoch", "Close"]
    assert get(client(replicas[1]), destination="BTC/1Sec/TICK").num_rows == 40_010
    assert "GONE/1Min/OHLCV" not in everything(replicas[1])
    st = status(master)
    assert st["role"] == "master" and len(st["replicas"]) == 2
    assert all(x["connected"] and x["lag_records"] == 0 for x in st["replicas"]), st
    metrics = pymkts_metrics(replicas[0])
    assert "mkts_replication_connected" in metrics and "mkts_replication_lag_records" in metrics


def pymkts_metrics(srv) -> str:
    import urllib.request
    with urllib.request.urlopen(f"{srv.http_url}/metrics", timeout=5) as r:
        return r.read().decode()


def test_a_replica_refuses_every_write_on_every_interface_and_changes_nothing(trio):
    _, master, (replica, _) = trio
    put(client(master), "AAPL/1Min/OHLCV", bars([Y2024, Y2024 + 60]))
    wait_caught_up(master, [replica])
    before = everything(replica)
    c = client(replica)
    with pytest.raises(ERR, match="write is not allowed on replica"):
        put(c, "AAPL/1Min/OHLCV", bars([Y2024 + 120]))
    with pytest.raises(ERR, match="write is not allowed on replica"):
        put(c, "NEW/1Min/OHLCV", bars([Y2024]))
    for name, body in [
        ("create", {"key": "X/1Min/OHLCV", "column_names": ["Open"], "column_types": ["f4"]}),
        ("destroy", {"key": "AAPL/1Min/OHLCV"}),
        ("delete_range", {"key": "AAPL/1Min/OHLCV", "epoch_start": Y2024, "epoch_end": Y2024 + 60}),
    ]:
        with pytest.raises(ERR, match="write is not allowed on replica"):
            action(c, name, body)
    for sql in ['INSERT INTO "AAPL/1Min/OHLCV" VALUES (1704067500, 1.0, 1)', "DELETE FROM \"AAPL/1Min/OHLCV\""]:
        with pytest.raises(ERR, match="write is not allowed on replica"):
            get(c, sql=sql)
    a = np.array([(Y2024 + 300, 1.0, 1)], dtype=[("Epoch", "i8"), ("Open", "f4"), ("Volume", "i8")])
    for grpc in (False, True):
        pm = pymkts.Client(grpc=True, endpoint=replica.grpc_addr) if grpc else pymkts.Client(replica.rpc_url)
        try:
            resp = pm.write(a, "AAPL/1Min/OHLCV")
        except Exception as e:  # noqa: BLE001 - the JSON-RPC client raises the server's error text
            assert "write is not allowed on replica" in str(e)
        else:
            text = json.dumps(resp, default=str) if not hasattr(resp, "responses") else str(resp)
            assert "write is not allowed on replica" in text, text
    after = everything(replica)
    assert sorted(after) == sorted(before)
    assert all(after[k][0] == before[k][0] and after[k][1].equals(before[k][1]) for k in after)
    assert_same(master, replica)
    # Reads work.
    assert get(c, destination="AAPL/1Min/OHLCV").num_rows == 2


def test_a_replica_killed_during_a_write_stream_catches_up_exactly(trio):
    _, master, (victim, other) = trio
    c = client(master)
    stop = threading.Event()
    written = []

    def feed():
        wc = client(master)
        i = 0
        while not stop.is_set():
            put(wc, "ETH/1Sec/TICK", ticks(50, start=i))
            written.append(i)
            i += 50

    t = threading.Thread(target=feed)
    t.start()
    time.sleep(1.0)
    victim.kill()
    time.sleep(1.0)
    victim.start()
    time.sleep(1.0)
    stop.set()
    t.join()
    head = wait_caught_up(master, [victim, other])
    assert head == status(master)["position"]
    n = len(written) * 50
    for r in (victim, other):
        tbl = get(client(r), destination="ETH/1Sec/TICK")
        assert tbl.num_rows == n  # nothing missing, nothing applied twice
        assert tbl.equals(get(c, destination="ETH/1Sec/TICK"))
    # The restarted replica resumed from its position: no image was needed.
    assert status(victim)["replica"]["images_applied"] == 0


def test_a_replica_started_late_gets_an_image_then_the_log(server_factory):
    port = free_port()
    master = server_factory(master_conf(port))
    c = client(master)
    put(c, "AAPL/1Min/OHLCV", bars(np.arange(100, dtype=np.int64) * 60 + Y2024))
    put(c, "BTC/1Sec/TICK", ticks(70_000))  # more than one image message
    # The master restarts: what it logged before is checkpointed and the log trimmed.
    master.stop()
    master.start()
    replica = server_factory(replica_conf(port))
    wait_caught_up(master, [replica])
    assert status(replica)["replica"]["images_applied"] == 1
    put(c, "AAPL/1Min/OHLCV", bars([Y2024 + 100 * 60]))
    put(c, "BTC/1Sec/TICK", ticks(5, start=70_000))
    wait_caught_up(master, [replica])
    assert_same(master, replica)
    assert status(replica)["replica"]["images_applied"] == 1


def test_master_killed_and_restarted_replicas_reconnect_and_continue(trio):
    _, master, replicas = trio
    c = client(master)
    put(c, "AAPL/1Min/OHLCV", bars([Y2024, Y2024 + 60]))
    wait_caught_up(master, replicas)
    master.kill()
    time.sleep(0.5)
    assert all(not status(r)["replica"]["connected"] for r in replicas)
    master.start()
    c = client(master)
    put(c, "AAPL/1Min/OHLCV", bars([Y2024 + 120]))
    put(c, "TSLA/1Min/OHLCV", bars([Y2024]))
    wait_caught_up(master, replicas)
    for r in replicas:
        assert_same(master, r)
        # They were caught up when the master died, so they continued without an image.
        assert status(r)["replica"]["images_applied"] == 1


def test_ack_replica_keeps_an_acknowledged_write_when_the_master_root_is_lost(server_factory):
    port = free_port()
    master = server_factory(master_conf(port, "  ack: replica\n  ack_timeout: 800ms\n"))
    # No replica yet: a write waits ack_timeout, then fails clearly (it is durable on the master only).
    with pytest.raises(ERR, match="no replica acknowledged it"):
        put(client(master), "AAPL/1Min/OHLCV", bars([Y2024]))
    replica = server_factory(replica_conf(port))
    wait_caught_up(master, [replica])
    put(client(master), "AAPL/1Min/OHLCV", bars([Y2024 + 60], open_=[7]))  # acknowledged: a replica has it
    master.kill()
    shutil.rmtree(master.root)
    t = get(client(replica), destination="AAPL/1Min/OHLCV")
    assert t.column("Epoch").cast(pa.int64()).to_pylist() == [Y2024, Y2024 + 60]
    assert t.column("Open").to_pylist()[-1] == 7.0


def test_ack_replica_gates_sql_changes_on_every_path(server_factory):
    """An INSERT sent as a streamed `{"sql"}` ticket waits for a replica like a DoPut does (with none
    connected it fails with the clear message); a query does not wait."""
    port = free_port()
    master = server_factory(master_conf(port, "  ack: replica\n  ack_timeout: 300ms\n"))
    with pytest.raises(ERR, match="no replica acknowledged it"):
        put(client(master), "AAPL/1Min/OHLCV", bars([Y2024]))
    insert = """INSERT INTO "AAPL/1Min/OHLCV" SELECT "Epoch" + INTERVAL '1 minute' AS "Epoch", "Open", "Volume" FROM "AAPL/1Min/OHLCV\""""
    with pytest.raises(ERR, match="no replica acknowledged it"):
        client(master).do_get(fl.Ticket(json.dumps({"sql": insert}).encode())).read_all()
    # A query is not a change: it answers at once.
    t = client(master).do_get(fl.Ticket(json.dumps({"sql": 'SELECT count(*) AS n FROM "AAPL/1Min/OHLCV"'}).encode())).read_all()
    assert t.column("n").to_pylist() == [2]  # both rows are durable on the master, neither acknowledged
    replica = server_factory(replica_conf(port))
    wait_caught_up(master, [replica])
    t = client(master).do_get(fl.Ticket(json.dumps({"sql": insert.replace("'1 minute'", "'10 minutes'")}).encode())).read_all()
    assert t.num_rows == 1
    wait_caught_up(master, [replica])
    assert get(client(replica), destination="AAPL/1Min/OHLCV").num_rows == 4


def test_promoting_a_replica_makes_it_writable(trio):
    port, master, (replica, _) = trio
    put(client(master), "AAPL/1Min/OHLCV", bars([Y2024]))
    wait_caught_up(master, [replica])
    master.kill()
    replica.stop()
    replica.config_path.write_text(replica.config_path.read_text().split("replication:")[0])
    replica.start()
    put(client(replica), "AAPL/1Min/OHLCV", bars([Y2024 + 60]))
    assert get(client(replica), destination="AAPL/1Min/OHLCV").num_rows == 2
    assert status(replica)["role"] == "standalone"


def test_replication_over_tls_and_a_replica_without_the_ca_is_refused(server_factory, certs):  # noqa: F811
    port = free_port()
    master = server_factory(master_conf(port, f"  tls_enabled: true\n  cert_file: {certs / 'server.pem'}\n  key_file: {certs / 'server.key'}\n"))
    put(client(master), "AAPL/1Min/OHLCV", bars([Y2024, Y2024 + 60]))
    ok = server_factory(f"replication:\n  master_host: \"localhost:{port}\"\n  retry_interval: 200ms\n  tls_enabled: true\n  cert_file: {certs / 'ca.pem'}\n")
    wrong_ca = server_factory(f"replication:\n  master_host: \"localhost:{port}\"\n  retry_interval: 200ms\n  tls_enabled: true\n  cert_file: {certs / 'other.pem'}\n")
    plain = server_factory(replica_conf(port))
    wait_caught_up(master, [ok])
    assert_same(master, ok)
    time.sleep(1.0)
    for r in (wrong_ca, plain):
        s = status(r)["replica"]
        assert not s["connected"] and s["applied_position"] == 0 and s["last_error"], s
        assert everything(r) == {}
    # Only the replica that verified the master got through.
    assert len(status(master)["replicas"]) == 1


def test_replicated_writes_reach_the_replicas_subscribers_unless_fire_triggers_is_off(server_factory):
    port = free_port()
    master = server_factory(master_conf(port))
    firing = server_factory(replica_conf(port))
    quiet = server_factory(replica_conf(port, "  fire_triggers: false\n"))
    wait_caught_up(master, [firing, quiet])
    subs = [Subscriber(r, subscribe="*/1Min/*") for r in (firing, quiet)]
    time.sleep(0.5)
    put(client(master), "AAPL/1Min/OHLCV", bars([Y2024, Y2024 + 60], open_=[1, 2]))
    wait_caught_up(master, [firing, quiet])
    (meta, batch), = subs[0].wait(1)
    assert meta["key"] == "AAPL/1Min/OHLCV"
    assert batch.column(1).to_pylist() == [1.0, 2.0]
    time.sleep(0.5)
    assert subs[1].items == []


def test_a_stalled_replica_never_holds_the_master_back_and_recovers_with_an_image(server_factory):
    import signal as sig
    port = free_port()
    master = server_factory(master_conf(port, "  retain_mb: 1\n"))
    stalled = server_factory(replica_conf(port))
    put(client(master), "AAPL/1Min/OHLCV", bars([Y2024]))
    wait_caught_up(master, [stalled])
    stalled.proc.send_signal(sig.SIGSTOP)
    try:
        c = client(master)
        # ~36 MB of changes, far past the 1 MiB window and what the connection's buffers hold: every
        # write is acknowledged while the replica cannot read (a blocked writer would hang here).
        for i in range(150):
            ep = Y2024 + 60 * (1 + i * 5000 + np.arange(5000, dtype=np.int64))
            put(c, "AAPL/1Min/OHLCV", bars(ep))
        assert status(master)["replicas"][0]["lag_records"] > 0
    finally:
        stalled.proc.send_signal(sig.SIGCONT)
    wait_caught_up(master, [stalled], timeout=120)
    assert_same(master, stalled)
    s = status(stalled)["replica"]
    assert s["images_applied"] == 2, s  # the first one, and the one after it fell out of the window


def test_with_auth_a_replica_must_authenticate_on_the_replication_port(server_factory, users_yaml):  # noqa: F811
    from test_tls_auth import PASSWORDS, login
    from test_tls_auth import put as auth_put
    port = free_port()
    master = server_factory(users_yaml + master_conf(port))
    mc = client(master)
    opts = login(mc, "rita")
    auth_put(mc, "AAPL/1Min/OHLCV", bars([Y2024, Y2024 + 60]), opts)
    anonymous = server_factory(replica_conf(port))
    wrong = server_factory(replica_conf(port, "  user: bob\n  password: nope\n"))
    reader = server_factory(replica_conf(port, f"  user: bob\n  password: \"{PASSWORDS['bob']}\"\n"))
    deadline = time.time() + 60
    while status(reader)["replica"]["applied_position"] == 0 and time.time() < deadline:
        time.sleep(0.1)
    t = get(client(reader), destination="AAPL/1Min/OHLCV")
    assert t.column("Epoch").cast(pa.int64()).to_pylist() == [Y2024, Y2024 + 60]
    for r in (anonymous, wrong):
        s = status(r)["replica"]
        assert not s["connected"] and s["applied_position"] == 0, s
        assert "authentication required" in s["last_error"] or "invalid credentials" in s["last_error"], s
        assert everything(r) == {}
    # The password never reaches the replica's log.
    assert PASSWORDS["bob"] not in reader.log()
