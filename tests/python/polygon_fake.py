"""A local stand-in for Polygon (no internet): its stocks WebSocket and its REST aggregates, in their real formats.

WebSocket (RFC 6455, stdlib only): on connect `[{"ev":"status","status":"connected",...}]`; the client sends
`{"action":"auth","params":KEY}` → `auth_success` or `auth_failed`; `{"action":"subscribe","params":"AM.X,..."}`
→ one `success` status per channel; then events as JSON arrays (`AM`, `T`, `Q`). Each connection runs the next
script of `ws_scripts` (a function of the connection object).

REST: `GET /v2/aggs/ticker/{sym}/range/1/minute/{from_ms}/{to_ms}` → `{"ticker","status":"OK","queryCount",
"resultsCount","adjusted","results":[{"v","vw","o","c","h","l","t","n"}],"request_id","next_url"}` with pages of
`page_size` bars and a `next_url` on Polygon's own host (the client must rebase it and add its key itself);
`Authorization: Bearer KEY` required (401 `{"status":"ERROR","error":"Unknown API Key"}` otherwise); the first
`rate_limit_first` requests get a 429 with `Retry-After: 1`.

REST v3 (the backfill): `GET /v3/trades/{sym}` and `/v3/quotes/{sym}` with `timestamp.gte`, `timestamp.lt` (ns),
`order=asc`, `sort=timestamp`, `limit` → `{"results":[...],"status":"OK","request_id","next_url"}`, rows in
Polygon's field names (`sip_timestamp`, `participant_timestamp`, `price`, `size`, `exchange`, `tape`,
`conditions`, `id`, `sequence_number`; quotes `bid_price`, `ask_size`, ...) from `ticks[(kind, sym)]`; the
`next_url` carries an opaque `cursor` only, on Polygon's host. `hold` = (kind, offset): the request for the page
starting at that offset waits until `release` is set (a test kills the client meanwhile).
"""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
from urllib.parse import parse_qs, urlparse

from feeder_helpers import JsonHttpServer

T0 = 1704205800  # 2024-01-02 14:30:00 UTC, a trading minute


def bar(sym: str, t: int):
    """Deterministic minute bar of `sym` at t, or None for minutes without trades."""
    m = (t - T0) // 60
    if m % 7 == 3:
        return None
    base = 100.0 if sym == "AAPL" else 300.0
    p = base + m * 0.25
    return dict(t=t, o=p, h=p + 0.5, l=p - 0.5, c=p + 0.125, v=1000 + m, n=10 + m)


def am(sym: str, t: int) -> dict:
    b = bar(sym, t)
    return {"ev": "AM", "sym": sym, "v": b["v"], "av": 99999, "op": 100.0, "vw": b["o"], "o": b["o"], "c": b["c"],
            "h": b["h"], "l": b["l"], "a": b["o"], "z": 5, "s": t * 1000, "e": (t + 60) * 1000}


def minutes(a: int, b: int):
    """Trading minutes a..b (inclusive, minute indexes) that have a bar."""
    return [T0 + 60 * m for m in range(a, b + 1) if bar("AAPL", T0 + 60 * m)]


class WsConn:
    def __init__(self, sock: socket.socket, received: list):
        self.sock = sock
        self.buf = b""
        self.received = received

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError("closed")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def handshake(self, status: int = 101) -> bool:
        req = b""
        while b"\r\n\r\n" not in req:
            d = self.sock.recv(4096)
            if not d:
                return False
            req += d
        head, self.buf = req.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.decode().split("\r\n")[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 101:
            body = b'{"status":"ERROR","error":"Unknown API Key"}'
            self.sock.sendall(f"HTTP/1.1 {status} Unauthorized\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            return False
        accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        return True

    def _frame(self, op: int, payload: bytes):
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x80 | op, n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x80 | op, 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x80 | op, 127, n)
        self.sock.sendall(hdr + payload)

    def send(self, obj):
        self._frame(1, json.dumps(obj).encode())

    def recv_frame(self):
        b1, b2 = self._read(2)
        op, n = b1 & 0x0F, b2 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        mask = self._read(4) if b2 & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(self._read(n)))
        return op, data

    def recv(self):
        """The next text message as JSON (pings answered)."""
        while True:
            op, data = self.recv_frame()
            if op == 9:
                self._frame(10, data)
            elif op == 8:
                raise ConnectionError("client closed")
            elif op == 1:
                msg = json.loads(data)
                self.received.append(msg)
                return msg

    def login(self, key: str, ok: bool = True) -> bool:
        self.send([{"ev": "status", "status": "connected", "message": "Connected Successfully"}])
        msg = self.recv()
        assert msg["action"] == "auth"
        if not ok or msg["params"] != key:
            self.send([{"ev": "status", "status": "auth_failed", "message": "authentication failed"}])
            return False
        self.send([{"ev": "status", "status": "auth_success", "message": "authenticated"}])
        sub = self.recv()
        assert sub["action"] == "subscribe"
        self.send([{"ev": "status", "status": "success", "message": f"subscribed to: {p}"} for p in sub["params"].split(",")])
        return True

    def idle(self):
        """Answer pings until the client goes away."""
        try:
            while True:
                self.recv()
        except (ConnectionError, OSError):
            pass

    def drop(self):
        """Drop the TCP connection without a close frame (network loss)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class FakePolygon:
    def __init__(self, key: str, ws_scripts, page_size: int = 4, rate_limit_first: int = 1, ticks=None):
        self.key = key
        self.ticks = ticks or {}  # (kind "trades"|"quotes", sym) -> rows in Polygon's v3 format
        self.hold = None  # (kind, offset)
        self.held = threading.Event()
        self.release = threading.Event()
        self.ws_scripts = list(ws_scripts)
        self.connections = 0
        self.rest_log: list[tuple[str, dict, int]] = []
        self.page_size = page_size
        self.rate_limit_left = rate_limit_first
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.ws_messages: list = []  # every text message clients sent
        self.ws_status = 101  # another status answers the WebSocket upgrade with that HTTP error
        self.ws_sock = socket.socket()
        self.ws_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ws_sock.bind(("127.0.0.1", 0))
        self.ws_sock.listen(16)
        self.ws_url = f"ws://127.0.0.1:{self.ws_sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()
        self.server = JsonHttpServer(lambda path, headers: self.route(path, headers.get("Authorization", "")))
        self.base_url = self.server.url

    def _accept(self):
        while True:
            try:
                s, _ = self.ws_sock.accept()
            except OSError:
                return
            with self.lock:
                n = self.connections
                self.connections += 1
                script = self.ws_scripts[n] if n < len(self.ws_scripts) else self.ws_scripts[-1]
            threading.Thread(target=self._run, args=(s, script), daemon=True).start()

    def _run(self, s, script):
        conn = WsConn(s, self.ws_messages)
        try:
            if conn.handshake(self.ws_status):
                script(conn)
        except (ConnectionError, OSError):
            pass
        except Exception as e:  # noqa: BLE001  (an assertion in a script: reported by the test)
            self.errors.append(repr(e))
        finally:
            try:
                s.close()
            except OSError:
                pass

    def route(self, path: str, auth: str):
        u = urlparse(path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        with self.lock:
            if auth != f"Bearer {self.key}":
                self.rest_log.append((u.path, q, 401))
                return 401, {"status": "ERROR", "request_id": "r", "error": "Unknown API Key"}, {}
            if self.rate_limit_left > 0:
                self.rate_limit_left -= 1
                self.rest_log.append((u.path, q, 429))
                return 429, {"status": "ERROR", "request_id": "r", "error": "You've exceeded the maximum requests per minute, please wait or upgrade your subscription to continue."}, {"Retry-After": "1"}
        parts = u.path.split("/")
        if len(parts) == 4 and parts[1] == "v3" and parts[2] in ("trades", "quotes"):
            return self.v3(parts[2], parts[3], u.path, q)
        # /v2/aggs/ticker/{sym}/range/1/minute/{from}/{to}
        if len(parts) != 10 or parts[1:4] != ["v2", "aggs", "ticker"] or parts[5:8] != ["range", "1", "minute"]:
            return 404, {"status": "NOT_FOUND", "message": "Not found"}, {}
        sym, frm, to = parts[4], int(parts[8]) // 1000, int(parts[9]) // 1000
        first = frm + (-frm) % 60
        rows = [b for b in (bar(sym, t) for t in range(first, to + 1, 60)) if b]
        page, rest = rows[: self.page_size], rows[self.page_size:]
        body = {"ticker": sym, "queryCount": len(page), "resultsCount": len(page), "adjusted": True,
                "results": [{"v": b["v"], "vw": b["o"], "o": b["o"], "c": b["c"], "h": b["h"], "l": b["l"], "t": b["t"] * 1000, "n": b["n"]} for b in page],
                "status": "OK", "request_id": "abc", "count": len(page)}
        if rest:
            # Polygon's own host: the client must send it to its configured base_url.
            body["next_url"] = f"https://api.polygon.io/v2/aggs/ticker/{sym}/range/1/minute/{rest[0]['t'] * 1000}/{to * 1000 + 59999}?cursor=Y3Vyc29y"
        with self.lock:
            self.rest_log.append((u.path, q, 200))
        return 200, body, {}

    def v3(self, kind: str, sym: str, path: str, q: dict):
        if "cursor" in q:
            q = dict(q, **json.loads(base64.urlsafe_b64decode(q["cursor"].encode()).decode()))
        gte, lt, limit, off = int(q["timestamp.gte"]), int(q["timestamp.lt"]), int(q.get("limit", 1000)), int(q.get("offset", 0))
        assert q.get("order") == "asc" and q.get("sort") == "timestamp", q
        rows = sorted((r for r in self.ticks.get((kind, sym), []) if gte <= r["sip_timestamp"] < lt), key=lambda r: r["sip_timestamp"])
        with self.lock:
            self.rest_log.append((path, q, 200))
        if self.hold == (kind, off) and not self.release.is_set():
            self.held.set()
            self.release.wait()
        page = rows[off: off + limit]
        body = {"results": page, "status": "OK", "request_id": f"req-{off}"}
        if off + limit < len(rows):
            cur = base64.urlsafe_b64encode(json.dumps({"timestamp.gte": gte, "timestamp.lt": lt, "limit": limit, "offset": off + limit,
                                                       "order": "asc", "sort": "timestamp"}).encode()).decode()
            body["next_url"] = f"https://api.polygon.io/v3/{kind}/{sym}?cursor={cur}"
        return 200, body, {}

    def close(self):
        self.release.set()
        self.server.close()
        self.ws_sock.close()
