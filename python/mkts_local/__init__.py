"""Same-host reads from an mkts server: a read's column files, mapped as zero-copy Arrow arrays.

A client on the machine that runs mkts asks the server's Unix socket (``local_socket`` in mkts.yml, by
default ``$TMPDIR/mkts-<hash of root>.sock``) for a read; the server answers with the open files of the read's
snapshot (file descriptors passed over the socket) and where each column's buffers are in them. This module
maps those files read-only and builds ``pyarrow`` arrays directly over the mapped pages, so a symbol-year
reaches pandas without its bytes crossing a socket. Rows a writer may still change (the tail of a partition
that receives overwrites) and columns whose disk layout is not Arrow's (bool, string16) come inline as Arrow
IPC. The descriptors keep the snapshot's files alive whatever the server writes next; they are closed as
soon as they are mapped. Protocol: ``src/local.rs`` in the mkts repository; user guide: docs/local-reads.md.

    import mkts_local
    c = mkts_local.Client.discover("grpc://localhost:5995")      # or Client("/data/mkts.sock")
    t = c.read("AAPL/1Min/OHLCV", start=1704067200, end=1735689599)   # pyarrow.Table
    df = c.read_pandas("AAPL/1Min/OHLCV")                           # DatetimeIndex "Epoch"
"""
from __future__ import annotations

import json
import mmap
import os
import socket
import struct
from typing import Iterable, Optional

import pyarrow as pa

__all__ = ["Client", "MktsLocalError"]

# Descriptors per message the server sends at most (src/local.rs FDS_PER_MESSAGE).
_FDS_PER_MESSAGE = 250


class MktsLocalError(Exception):
    """The server refused the read: ``code`` is its error code (``not_found``, ``invalid_argument``, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    """One connection to a server's same-host read socket (not thread-safe: one request at a time)."""

    def __init__(self, path: str, authorization: Optional[str] = None):
        self.path = path
        self.authorization = authorization
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    @classmethod
    def discover(cls, flight_url: str, authorization: Optional[str] = None, **flight_kwargs) -> "Client":
        """Ask the Flight server at ``flight_url`` (on this machine) for its socket, then connect to it.
        ``authorization`` (``"Bearer <token>"`` or ``"Basic ..."``) is sent with the action and every read."""
        import pyarrow.flight as fl

        options = None
        if authorization:
            options = fl.FlightCallOptions(headers=[(b"authorization", authorization.encode())])
        with fl.FlightClient(flight_url, **flight_kwargs) as f:
            result = list(f.do_action(fl.Action("local_socket", b""), options=options))
        path = json.loads(result[0].body.to_pybytes())["path"]
        return cls(path, authorization)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads -------------------------------------------------------------------------------------

    def read(self, key: str, start: Optional[int] = None, end: Optional[int] = None, limit: Optional[int] = None,
             from_start: bool = False, columns: Optional[Iterable[str]] = None) -> pa.Table:
        """One bucket's rows as a ``pyarrow.Table`` (the same schema and rows as a Flight DoGet of the same
        ticket). ``start``/``end``: inclusive Unix seconds; ``limit``: at most that many rows, the last ones
        unless ``from_start``."""
        tables = self.read_many(key, start, end, limit, from_start, columns)
        if len(tables) != 1:
            raise MktsLocalError("invalid_argument", f"{key} selects {len(tables)} buckets; use read_many")
        return next(iter(tables.values()))

    def read_many(self, key: str, start: Optional[int] = None, end: Optional[int] = None, limit: Optional[int] = None,
                  from_start: bool = False, columns: Optional[Iterable[str]] = None) -> dict:
        """Every bucket a key selects (``A,B/1Min/OHLCV``, ``*/1Min/OHLCV``): ``{key: pyarrow.Table}``."""
        q: dict = {"destination": key}
        if start is not None:
            q["epoch_start"] = int(start)
        if end is not None:
            q["epoch_end"] = int(end)
        if limit is not None:
            q["limit_record_count"] = int(limit)
            q["limit_from_start"] = bool(from_start)
        if columns is not None:
            q["columns"] = list(columns)
        return self._request(q)

    def read_pandas(self, key: str, **kw):
        """:meth:`read` as a pandas DataFrame indexed by ``Epoch`` (a UTC-naive ``DatetimeIndex``, as
        pymarketstore's DataFrames)."""
        import numpy as np
        import pandas as pd

        t = self.read(key, **kw)
        epoch = t.column("Epoch")
        df = t.drop_columns(["Epoch"]).to_pandas(split_blocks=True)
        if pa.types.is_integer(epoch.type):
            secs = epoch.to_numpy()
            idx = pd.DatetimeIndex(secs.astype("datetime64[s]").astype("datetime64[ns]"), name="Epoch")
        else:
            idx = pd.DatetimeIndex(epoch.to_numpy(), name="Epoch")
            if idx.tz is not None:
                idx = idx.tz_convert("UTC").tz_localize(None)
        df.index = idx
        return df

    # -- protocol ----------------------------------------------------------------------------------

    def _request(self, query: dict) -> dict:
        req = {"query": query}
        if self.authorization:
            req["authorization"] = self.authorization
        body = json.dumps(req).encode()
        self.sock.sendall(struct.pack("<I", len(body)) + body)
        header = json.loads(self._recv_exact(struct.unpack("<I", self._recv_exact(4))[0]))
        if "error" in header:
            raise MktsLocalError(header["error"].get("code", "unknown"), header["error"].get("message", ""))
        fds = self._recv_fds(header["fds"])
        try:
            maps = [None] * len(fds)
            ipcs = [self._recv_exact(b["ipc"]) for b in header["buckets"]]
            out = {}
            for b, ipc in zip(header["buckets"], ipcs):
                out[b["key"]] = _assemble(b, ipc, fds, maps)
            return out
        finally:
            for fd in fds:
                os.close(fd)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError("mkts closed the same-host read socket")
            got += k
        return bytes(buf)

    def _recv_fds(self, n: int) -> list:
        fds: list = []
        while len(fds) < n:
            data, got, _flags, _addr = socket.recv_fds(self.sock, 4, _FDS_PER_MESSAGE)
            fds.extend(got)
            if len(data) < 4:
                data += self._recv_exact(4 - len(data))
            (count,) = struct.unpack("<I", data)
            if count != len(got):
                for fd in fds:
                    os.close(fd)
                raise ConnectionError(f"expected {count} descriptors, received {len(got)}")
        return fds


def _buffer(slot, fds, maps) -> Optional[pa.Buffer]:
    """The first ``bytes`` of descriptor ``fd`` as an Arrow buffer over a read-only shared mapping."""
    if slot is None:
        return None
    i, length = slot
    if length == 0:
        return pa.py_buffer(b"")
    m = maps[i]
    if m is None or len(m) < length:
        # One mapping per file, as long as the longest use of it in this reply.
        m = mmap.mmap(fds[i], length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        maps[i] = m
    return pa.py_buffer(m)


def _assemble(bucket: dict, ipc: bytes, fds, maps) -> pa.Table:
    reader = pa.ipc.open_stream(ipc)
    schema = reader.schema
    inline = list(reader)
    batches = []
    for p in bucket["pieces"]:
        if "inline" in p:
            batches.append(inline[p["inline"]])
            continue
        offset, rows = p["offset"], p["rows"]
        arrays = []
        for field, col in zip(schema, p["columns"]):
            validity = _buffer(col["validity"], fds, maps)
            values = _buffer(col["values"], fds, maps)
            data = _buffer(col["data"], fds, maps)
            bufs = [validity, values] if data is None else [validity, values, data]
            arr = pa.Array.from_buffers(field.type, rows, bufs, offset=offset)
            arrays.append(arr)
        batches.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return pa.Table.from_batches(batches, schema=schema)
