#!/usr/bin/env python3
"""Example out-of-process background worker for mkts: append one row per interval to a bucket over Flight.

    bgworkers:
      - module: /path/to/ticker_worker.py       # executable; or a file name in plugin_dir
        name: pyticker
        config:
          key: PYTICK/1Min/OHLCV   # where to write (the default)
          interval_ms: 100         # pause between rows (default 1000)
          count: 50                # stop after this many rows in total (default: run until stopped)
          exit_after: 0            # crash (exit 3) after writing this many rows in one run: shows the restart

Row `i` has Epoch = i * 60 and Value = i. On start the worker reads the bucket and resumes after its last
row, so a restart continues the series instead of rewriting it. It needs only pyarrow. The protocol it
follows (environment variables, DoPut, SIGTERM) is in docs/plugins.md.
"""
import json
import os
import signal
import sys
import time

import pyarrow as pa
import pyarrow.flight as flight

stopping = False


def on_term(_sig, _frame):
    global stopping
    stopping = True


def existing_rows(client: flight.FlightClient, key: str) -> int:
    try:
        return client.do_get(flight.Ticket(json.dumps({"destination": key}).encode())).read_all().num_rows
    except pa.ArrowException:  # FlightError, or ArrowKeyError for a bucket that does not exist yet
        return 0


class _Authorization(flight.ClientMiddlewareFactory):
    """Sends MKTS_AUTH_HEADER (set when the server has `auth:`) on every call."""

    def __init__(self, value: str):
        self.value = value

    def start_call(self, info):
        value = self.value

        class Header(flight.ClientMiddleware):
            def sending_headers(self):
                return {"authorization": value}

        return Header()


def connect() -> flight.FlightClient:
    """The server's Flight port, with its CA under `tls:` and the plugin's token under `auth:`."""
    kwargs = {}
    if os.environ.get("MKTS_TLS_ROOT_CERTS"):
        with open(os.environ["MKTS_TLS_ROOT_CERTS"], "rb") as f:
            kwargs["tls_root_certs"] = f.read()
    if os.environ.get("MKTS_AUTH_HEADER"):
        kwargs["middleware"] = [_Authorization(os.environ["MKTS_AUTH_HEADER"])]
    return flight.connect(os.environ["MKTS_FLIGHT_ADDR"], **kwargs)


def main() -> int:
    signal.signal(signal.SIGTERM, on_term)
    config = json.loads(os.environ.get("MKTS_PLUGIN_CONFIG") or "null") or {}
    key = config.get("key", "PYTICK/1Min/OHLCV")
    interval = config.get("interval_ms", 1000) / 1000.0
    count = config.get("count")
    exit_after = config.get("exit_after", 0)
    client = connect()

    i = existing_rows(client, key)
    print(f"{os.environ.get('MKTS_PLUGIN_NAME')}: writing to {key} from row {i}", flush=True)
    written = 0
    schema = pa.schema([("Epoch", pa.int64()), ("Value", pa.float64())])
    while not stopping and (count is None or i < count):
        batch = pa.record_batch([pa.array([i * 60], pa.int64()), pa.array([float(i)])], schema=schema)
        writer, reader = client.do_put(flight.FlightDescriptor.for_path(key), schema)
        writer.write_batch(batch)
        writer.done_writing()
        reader.read()  # the server's acknowledgement: the row is durable
        writer.close()
        i += 1
        written += 1
        if exit_after and written >= exit_after:
            print(f"exiting with status 3 after {written} rows (exit_after)", file=sys.stderr, flush=True)
            return 3
        deadline = time.monotonic() + interval
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, interval))
    print(f"stopped after row {i}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
