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

    r = mkts_local.Reader("grpc://db-host:5995")   # same-host socket when it is this server's, else Flight
    t = r.read("AAPL/1Min/OHLCV")                  # r.local says which path answered
"""
from __future__ import annotations

import json
import mmap
import os
import socket
import struct
from typing import Iterable, Optional

import pyarrow as pa

__all__ = ["Client", "MktsLocalError", "Reader"]

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

    def __init__(self, path: str, authorization: Optional[str] = None, store_id: Optional[str] = None):
        """``store_id``: the server's (from its ``local_socket`` action, as :meth:`discover` passes it); a
        reply from a socket of another store is refused (``wrong_server``) instead of read."""
        self.path = path
        self.authorization = authorization
        self.store_id = store_id
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
        answer = json.loads(result[0].body.to_pybytes())
        return cls(answer["path"], authorization, answer.get("store_id"))

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
        return self._request(_ticket(key, start, end, limit, from_start, columns))

    def read_pandas(self, key: str, **kw):
        """:meth:`read` as a pandas DataFrame indexed by ``Epoch`` (a UTC-naive ``DatetimeIndex``, as
        pymarketstore's DataFrames)."""
        return _pandas(self.read(key, **kw))

    # -- protocol ----------------------------------------------------------------------------------

    def _request(self, query: dict) -> dict:
        req = {"query": query}
        if self.authorization:
            req["authorization"] = self.authorization
        body = json.dumps(req).encode()
        self.sock.sendall(struct.pack("<I", len(body)) + body)
        header = json.loads(self._recv_exact(struct.unpack("<I", self._recv_exact(4))[0]))
        if self.store_id is not None and header.get("store_id") != self.store_id:
            # Another server's socket at this path (another root, or this path on another host than the
            # server's): its rows are not the ones asked for. The connection is not used again.
            self.sock.close()
            raise MktsLocalError("wrong_server", f"{self.path} belongs to store {header.get('store_id')!r}, not {self.store_id!r}")
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


def _ticket(key, start=None, end=None, limit=None, from_start=False, columns=None) -> dict:
    """The Flight ticket (MarketStore's query fields) of a read; the socket takes the same."""
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
    return q


def _pandas(t: pa.Table):
    """A read as a pandas DataFrame indexed by ``Epoch`` (a UTC-naive ``DatetimeIndex``)."""
    import pandas as pd

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


class Reader:
    """Reads one server's buckets the fastest way this machine allows: through its same-host socket when
    the server offers one, it is reachable from here and it answers as that server (its store id), else
    over Flight (a DoGet of the same ticket: the same schema and rows). A socket that stops answering, or
    turns out to be another server's, is given up for Flight for the rest of the reader's life.
    ``local`` is true while reads go through the socket; ``why_not_local`` says why they do not."""

    def __init__(self, flight_url: str, authorization: Optional[str] = None, **flight_kwargs):
        import pyarrow.flight as fl

        self._headers = [(b"authorization", authorization.encode())] if authorization else []
        self._flight = fl.FlightClient(flight_url, **flight_kwargs)
        self._client: Optional[Client] = None
        self.why_not_local: Optional[str] = None
        try:
            self._client = Client.discover(flight_url, authorization, **flight_kwargs)
        except (MktsLocalError, OSError, fl.FlightError, pa.ArrowException) as e:
            self.why_not_local = f"{type(e).__name__}: {e}"

    @property
    def local(self) -> bool:
        return self._client is not None

    def read(self, key: str, start: Optional[int] = None, end: Optional[int] = None, limit: Optional[int] = None,
             from_start: bool = False, columns: Optional[Iterable[str]] = None) -> pa.Table:
        """One bucket's rows (as :meth:`Client.read`, or as the Flight DoGet of the same ticket)."""
        if self._client is not None:
            try:
                return self._client.read(key, start, end, limit, from_start, columns)
            except MktsLocalError as e:
                if e.code != "wrong_server":
                    raise
                self._give_up(e)
            except OSError as e:  # the socket went away (server restarted, socket removed)
                self._give_up(e)
        import pyarrow.flight as fl

        ticket = fl.Ticket(json.dumps(_ticket(key, start, end, limit, from_start, columns)).encode())
        return self._flight.do_get(ticket, options=fl.FlightCallOptions(headers=self._headers)).read_all()

    def read_pandas(self, key: str, **kw):
        """:meth:`read` as a pandas DataFrame indexed by ``Epoch`` (as :meth:`Client.read_pandas`)."""
        return _pandas(self.read(key, **kw))

    def _give_up(self, e: Exception) -> None:
        self.why_not_local = f"{type(e).__name__}: {e}"
        try:
            self._client.close()
        except OSError:
            pass
        self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._flight.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
