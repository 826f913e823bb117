"""What the feeder tests share: a loopback JSON HTTP server for the providers' REST fakes, reading a bucket back
over Flight, and waiting for a condition."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.flight as fl


class JsonHttpServer:
    """Serve `route(path, headers) -> (status, body, extra headers)` as JSON on 127.0.0.1 (a free port)."""

    def __init__(self, route):
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                code, body, headers = route(self.path, self.headers)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def read(srv, key):
    """The rows of bucket `key` as a pyarrow Table, or None when it does not exist."""
    c = fl.FlightClient(srv.flight_url)
    try:
        return c.do_get(fl.Ticket(json.dumps({"destination": key}).encode())).read_all()
    except Exception:  # noqa: BLE001  (missing bucket)
        return None
    finally:
        c.close()


def wait_until(fn, timeout, what, dump=None):
    """Poll `fn` until it is truthy (its value is returned); on timeout print `dump()` and fail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    if dump:
        print(dump())
    raise AssertionError(f"timed out waiting for {what}")
