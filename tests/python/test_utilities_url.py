"""`utilities_url` (MarketStore's key, reference §2.9): a second listener serving `/heartbeat` and CPU
profiles in pprof format (gzip-compressed `perftools.profiles.Profile` protobuf), on a free port of a
real server. The profile is decoded here with a small protobuf wire-format reader (no generated code).
"""
from __future__ import annotations

import gzip
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pymarketstore as pymkts

from conftest import free_port


def varint(b: bytes, i: int) -> tuple[int, int]:
    shift = v = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if c < 0x80:
            return v, i
        shift += 7


def fields(b: bytes) -> list[tuple[int, int, object]]:
    """Top-level (field number, wire type, value) of a protobuf message; raises on malformed input."""
    out, i = [], 0
    while i < len(b):
        key, i = varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 2:
            n, i = varint(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        if i > len(b):
            raise ValueError("truncated")
        out.append((num, wt, v))
    return out


def get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()


def test_heartbeat_and_cpu_profile_on_utilities_url(server_factory):
    port = free_port()
    srv = server_factory(config_extra=f"utilities_url: 127.0.0.1:{port}\n")
    assert "ignored" not in srv.log() and f"utilities=127.0.0.1:{port}" in srv.log()
    util = f"http://127.0.0.1:{port}"
    status, _, body = get(f"{util}/heartbeat")
    hb = json.loads(body)
    assert status == 200 and hb["status"] == "queryable" and hb["health"] == "ok"

    # Keep the server busy while it is profiled, so the profile has samples.
    cli = pymkts.Client(srv.rpc_url)
    a = np.zeros(5000, dtype=[("Epoch", "i8"), ("Close", "f8")])
    a["Epoch"] = 1_704_067_200 + 60 * np.arange(5000)
    a["Close"] = np.arange(5000)
    cli.write(a, "PROF/1Min/X")
    stop = threading.Event()

    def load():
        while not stop.is_set():
            cli.query(pymkts.Params("PROF", "1Min", "X", functions=["tickcandler('5Min',Close)"]))

    t = threading.Thread(target=load)
    t.start()
    try:
        status, headers, body = get(f"{util}/debug/pprof/profile?seconds=2")
    finally:
        stop.set()
        t.join()
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    raw = gzip.decompress(body)
    top = fields(raw)
    # perftools.profiles.Profile: 6 = string_table (entry 0 is ""), 1 = sample_type, 2 = sample,
    # 4 = location, 5 = function, 10 = duration_nanos, 11 = period_type, 12 = period.
    strings = [v.decode() for n, wt, v in top if n == 6]
    assert strings[0] == ""
    sample_types = [fields(v) for n, _, v in top if n == 1]
    assert sample_types, "no sample_type"
    names = {strings[f[0][2]] for f in sample_types if f and f[0][0] == 1}
    assert names & {"cpu", "samples"}, names
    duration = [v for n, _, v in top if n == 10]
    assert duration and 1_900_000_000 <= duration[0] <= 4_000_000_000, duration
    samples = [v for n, _, v in top if n == 2]
    assert samples, "the profile has no samples"
    assert any(n == 4 for n, _, _ in top) and any(n == 5 for n, _, _ in top)
    # MarketStore's path serves the same.
    status, _, body = get(f"{util}/pprof/profile?seconds=1")
    assert status == 200 and fields(gzip.decompress(body))

    # A bad length is refused with a clear error.
    try:
        get(f"{util}/debug/pprof/profile?seconds=0")
        raise AssertionError("seconds=0 was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "seconds must be a whole number 1..=300" in e.read().decode()
    # The main port serves no profiles.
    try:
        get(f"{srv.http_url}/debug/pprof/profile?seconds=1")
        raise AssertionError("the main port served a profile")
    except urllib.error.HTTPError as e:
        assert e.code == 404


def test_utilities_url_port_in_use_and_bad_value_are_clear_errors(server_factory, tmp_path):
    import socket
    import subprocess

    from conftest import mkts_bin

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = server_factory(config_extra=f"utilities_url: 127.0.0.1:{port}\n", start=False)
        r = subprocess.run([mkts_bin(), "start", "--config", str(srv.config_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port} (utilities_url)" in r.stderr, r.stderr
    srv = server_factory(config_extra="utilities_url: localhost\n", start=False)
    r = subprocess.run([mkts_bin(), "start", "--config", str(srv.config_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "utilities_url" in r.stderr and "host:port" in r.stderr, r.stderr
