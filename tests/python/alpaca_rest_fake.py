"""A local stand-in for Alpaca's REST APIs as `alpacabkfeeder` uses them (no internet), in their current v2 formats.

- `GET /v2/assets?status=active` (trading API) → `[{"id","class":"us_equity","exchange","symbol","name","status",
  "tradable",...}]`.
- `GET /v2/stocks/snapshots?symbols=A,B` → `{"A": {"latestTrade": {"t","x","p","s","c","i","z"}, "latestQuote":
  {"t","ax","ap","as","bx","bp","bs","c","z"}, "minuteBar", "dailyBar", "prevDailyBar": {"t","o","h","l","c","v",
  "n","vw"}}, "B": null}` — the snapshots the test sets in `snapshots`.
- `GET /v2/stocks/bars?symbols=A,B&timeframe=1Day&start&end&limit&adjustment=raw[&page_token]` → `{"bars":
  {"A": [bar, ...]}, "next_page_token": str|null}`, `page_size` bars a page across symbols (sorted by symbol, then
  time, as Alpaca pages them).
- `GET /stocks.json` → `{"data": {"AAPL": {...}, ...}}` behind HTTP Basic `stocks_auth`.

Credentials: HTTP Basic key:secret (`auth="basic"`) or the `APCA-API-KEY-ID` / `APCA-API-SECRET-KEY` headers
(`auth="header"`); anything else is answered 401 `{"code": 40110000, "message": "request is not authorized"}`.
The first `rate_limit_first` bars requests get a 429 with `Retry-After: 1`.
"""
from __future__ import annotations

import base64
import threading
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlparse

from feeder_helpers import JsonHttpServer

ASSETS = [("AAPL", "NASDAQ"), ("MSFT", "NASDAQ"), ("IBM", "NYSE"), ("OTCX", "OTC")]


def iso(secs: int, ns: int = 0) -> str:
    return datetime.fromtimestamp(secs, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + (f".{ns:09d}Z" if ns else "Z")


def day_bar(sym: str, day: datetime) -> dict:
    """Deterministic daily bar of `sym` on `day` (prices exact in binary)."""
    k = (day - datetime(2024, 1, 1, tzinfo=timezone.utc)).days
    base = 100.0 if sym == "AAPL" else 300.0
    p = base + k * 0.5
    return {"t": (day + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%SZ"), "o": p, "h": p + 2, "l": p - 1, "c": p + 0.25, "v": 1_000_000 + k, "n": 100 + k, "vw": p}


def trading_days(first: str, last: str):
    d = datetime.strptime(first, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    end = datetime.strptime(last, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    out = []
    while d <= end:
        if d.weekday() < 5:
            out.append(d)
        d += timedelta(days=1)
    return out


class FakeAlpacaRest:
    def __init__(self, key: str, secret: str, auth: str = "basic", page_size: int = 3, rate_limit_first: int = 1,
                 stocks_auth: str = "user:pass"):
        self.key, self.secret, self.auth = key, secret, auth
        self.page_size = page_size
        self.rate_limit_left = rate_limit_first
        self.stocks_auth = stocks_auth
        self.last_day = "2024-01-12"
        self.snapshots: dict = {}
        self.log: list[tuple[str, dict, int]] = []
        self.lock = threading.Lock()
        self.server = JsonHttpServer(self.route)
        self.url = self.server.url

    def authorized(self, headers) -> bool:
        if self.auth == "header":
            return headers.get("APCA-API-KEY-ID") == self.key and headers.get("APCA-API-SECRET-KEY") == self.secret
        want = "Basic " + base64.b64encode(f"{self.key}:{self.secret}".encode()).decode()
        return headers.get("Authorization") == want

    def requests(self, path: str, code: int = 200):
        with self.lock:
            return [q for p, q, c in self.log if p == path and c == code]

    def route(self, raw: str, headers):
        u = urlparse(raw)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        code, body, hdr = self._route(u.path, q, headers)
        with self.lock:
            self.log.append((u.path, q, code))
        return code, body, hdr

    def _route(self, path, q, headers):
        if path == "/stocks.json":
            if headers.get("Authorization") != "Basic " + base64.b64encode(self.stocks_auth.encode()).decode():
                return 401, {"message": "unauthorized"}, {}
            return 200, {"data": {"MSFT": {"name": "Microsoft"}, "AAPL": {"name": "Apple"}, "IBM": {}}}, {}
        if not self.authorized(headers):
            return 401, {"code": 40110000, "message": "request is not authorized"}, {}
        if path == "/v2/assets":
            assert q.get("status") == "active", q
            return 200, [{"id": f"id-{s}", "class": "us_equity", "exchange": e, "symbol": s, "name": s, "status": "active",
                          "tradable": True, "marginable": True, "shortable": True, "easy_to_borrow": True, "fractionable": True}
                         for s, e in ASSETS], {}
        if path == "/v2/stocks/snapshots":
            syms = q["symbols"].split(",")
            return 200, {s: self.snapshots.get(s) for s in syms}, {}
        if path == "/v2/stocks/bars":
            with self.lock:
                if self.rate_limit_left > 0:
                    self.rate_limit_left -= 1
                    return 429, {"code": 42910000, "message": "rate limit exceeded"}, {"Retry-After": "1"}
            assert q["timeframe"] == "1Day" and q["adjustment"] == "raw", q
            start = datetime.strptime(q["start"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            end = datetime.strptime(q["end"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
            rows = []
            for s in sorted(q["symbols"].split(",")):
                if s not in ("AAPL", "MSFT"):
                    continue  # no bars for the others
                for d in trading_days("2024-01-01", self.last_day):
                    b = day_bar(s, d)
                    t = datetime.strptime(b["t"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
                    if start <= t <= end:
                        rows.append((s, b))
            skip = int(q.get("page_token", "0"))
            page = rows[skip:skip + self.page_size]
            bars: dict = {}
            for s, b in page:
                bars.setdefault(s, []).append(b)
            nxt = str(skip + self.page_size) if skip + self.page_size < len(rows) else None
            return 200, {"bars": bars, "next_page_token": nxt}, {}
        return 404, {"message": "Not Found"}, {}

    def close(self):
        self.server.close()


def snapshot(quote_t: int, trade_t: int, ask: float, bid: float, price: float, size: int, day: str = "2024-01-02") -> dict:
    d = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    return {
        "latestTrade": {"t": iso(trade_t, 123456789), "x": "Q", "p": price, "s": size, "c": ["@"], "i": 52983525029461, "z": "C"},
        "latestQuote": {"t": iso(quote_t, 5), "ax": "P", "ap": ask, "as": 3, "bx": "Q", "bp": bid, "bs": 7, "c": ["R"], "z": "C"},
        "minuteBar": {"t": iso(trade_t - trade_t % 60), "o": price, "h": price + 0.5, "l": price - 0.5, "c": price, "v": 1234, "n": 12, "vw": price},
        "dailyBar": day_bar("AAPL", d),
        "prevDailyBar": day_bar("AAPL", d - timedelta(days=1)),
    }
