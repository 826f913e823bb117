#!/usr/bin/env python3
"""Same-host reads (python/mkts_local) beside the peer benchmark's local stores and Flight, in one run.

Adds one peer, `server-local`, to the peer benchmark (../shared/bench/peers.py) and runs it with the
benchmark's own harness, data, timing and validation: it bulk-writes over Flight like `server-flight`, then
reads through the server's same-host socket (the client maps the column files; nothing crosses a socket but
the descriptors), into the same pandas DataFrame (DatetimeIndex `Epoch`, float32/int64 columns).

    # a release server must listen (benches/run_peers.sh starts one); then, from the repo:
    MKTS_BIN=~/.cache/mkts-target-release/release/mkts benches/run_peers.sh small \\
        --peers arcticdb,ref-flight-ram --ops bulk_write,read_full,read_range,read_tail   # Flight only
    python benches/local_read_bench.py --size small --server grpc://127.0.0.1:5995 --rpc none \\
        --peers arcticdb,ref-flight-ram,server-local --ops bulk_write,read_full,read_range,read_tail

Also adds `server-flight-stream`: server-flight with its appends as one DoPut stream
(`--flight-append-mode stream` for that peer only), so per-call and stream appends sit in one table. With
every peer, the server peers and both of these in one run (the command behind the peer table in
benches/README.md):

    PEERS_SCRIPT=benches/local_read_bench.py \
    PEERS=arcticdb,hdf5,parquet,parquet-rewrite,duckdb,ref-memcpy,ref-file,ref-file-fsync,ref-file-pandas,\
ref-arrow-pandas,ref-flight-ram,ref-flight-fsync,server-local,server-flight-stream benches/run_peers.sh small

With MKTS_BIN_BASE set, benches/run_peers.sh starts a second server from that binary, and the peers
`server-flight-base` / `server-flight-stream-base` measure it in the same run (a change side by side with
the binary before it).

Each peer still runs in its own process: the harness starts `<dir>/peers.py` per peer, and <dir> is set to
`benches/harness/`, whose peers.py registers these peers first. Options are peers.py's.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.environ.get("BENCH_DIR", os.path.join(os.path.dirname(REPO), "shared", "bench"))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, os.path.join(REPO, "python"))

import peers  # noqa: E402
import server_client  # noqa: E402

import mkts_local  # noqa: E402


class LocalPeer(server_client.FlightPeer):
    """mkts same-host reads: writes as server-flight, reads by mapping the bucket's files."""

    name = "server-local"
    ops = {"bulk_write", "read_full", "read_range", "read_tail", "read_after_append", "append"}

    def __init__(self, args):
        super().__init__(args)
        self.description = (f"mkts same-host read socket (discovered through {self.url}): the client maps "
                            "the column files (python/mkts_local) -> pandas with split_blocks; writes as "
                            "server-flight")
        self.local = None

    def open_read(self):
        if self.local is None:
            self.local = mkts_local.Client.discover(self.url)

    def close_read(self):
        if self.local is not None:
            self.local.close()
            self.local = None

    def _read(self, sym, **kw):
        self.open_read()
        return self.local.read_pandas(self.tbk(sym), **kw)

    def read_full(self, sym):
        return self._read(sym)

    def read_range(self, sym, t0, t1):
        return self._read(sym, start=t0.value // 10**9, end=t1.value // 10**9)

    def read_tail(self, sym, n):
        return self._read(sym, limit=n)

    def close(self):
        self.close_read()
        super().close()


class StreamPeer(server_client.FlightPeer):
    """server-flight with appends as one DoPut stream (one record batch per append)."""

    name = "server-flight-stream"
    ops = {"bulk_write", "append"}

    def __init__(self, args):
        super().__init__(argparse.Namespace(**{**vars(args), "flight_append_mode": "stream"}))


class BaseFlightPeer(server_client.FlightPeer):
    """server-flight against a second server running the binary a change is measured against
    (`MKTS_BIN_BASE` in benches/run_peers.sh, which exports its address as MKTS_BASE_SERVER), so the binary
    before and after a change sit in one run."""

    name = "server-flight-base"

    def __init__(self, args):
        base = os.environ.get("MKTS_BASE_SERVER", "grpc://127.0.0.1:6995")
        super().__init__(argparse.Namespace(**{**vars(args), "server": base}))
        self.description = "the base binary's " + self.description


class BaseStreamPeer(StreamPeer):
    """server-flight-stream against the base binary's server (see BaseFlightPeer)."""

    name = "server-flight-stream-base"

    def __init__(self, args):
        base = os.environ.get("MKTS_BASE_SERVER", "grpc://127.0.0.1:6995")
        super().__init__(argparse.Namespace(**{**vars(args), "server": base}))


peers.PEER_CLASSES[LocalPeer.name] = LocalPeer
peers.PEER_CLASSES[StreamPeer.name] = StreamPeer
peers.PEER_CLASSES[BaseFlightPeer.name] = BaseFlightPeer
peers.PEER_CLASSES[BaseStreamPeer.name] = BaseStreamPeer
# The harness starts each peer as <HERE>/peers.py: ours registers the peers above first.
peers.HERE = os.path.join(REPO, "benches", "harness")

if __name__ == "__main__":
    sys.exit(peers.main(sys.argv[1:]))
