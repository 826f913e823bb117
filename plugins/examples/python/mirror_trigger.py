#!/usr/bin/env python3
"""Example out-of-process trigger for mkts: mirror every appended batch to another bucket over Flight.

    triggers:
      - module: /path/to/mirror_trigger.py
        on: "*/1Min/OHLCV"
        config:
          destination: "{symbol}_MIRROR/{timeframe}/{attrgroup}"   # the default
          exit_after: 0   # crash (exit 3) after mirroring this many batches in one run, before acknowledging
                          # the last: shows the restart and the redelivery
          sleep_ms: 0     # take this long over each batch (a slow trigger: shows the shutdown drain)

The server queues the appends matching `on` for this trigger; the process reads them over a DoExchange
whose descriptor is the ticket in MKTS_TRIGGER_TICKET, and acknowledges each batch once it is handled
(unacknowledged batches are delivered again after a crash). Every batch of one exchange has one schema and
names its key in app_metadata; when the exchange ends (the next append has another schema) the trigger
simply opens another. Each batch is written back with DoPut. The trigger skips the keys it writes itself,
so mirrors are not mirrored again. The protocol is in docs/plugins.md.
"""
import json
import os
import signal
import sys
import time

import pyarrow as pa
import pyarrow.flight as flight

ACK = pa.py_buffer(b'{"ack": 1}')


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
    # Default action: a Python handler would only run once a blocking pyarrow call returns (docs/plugins.md).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    config = json.loads(os.environ.get("MKTS_PLUGIN_CONFIG") or "null") or {}
    destination = config.get("destination", "{symbol}_MIRROR/{timeframe}/{attrgroup}")
    exit_after = config.get("exit_after", 0)
    sleep_s = config.get("sleep_ms", 0) / 1000
    mirrored = 0
    client = connect()
    descriptor = flight.FlightDescriptor.for_command(os.environ["MKTS_TRIGGER_TICKET"])
    print(f"mirroring {os.environ['MKTS_PLUGIN_ON']} to {destination}", flush=True)
    written: set[str] = set()
    while True:  # one exchange per run of appends with the same schema
        exchange, reader = client.do_exchange(descriptor)
        exchange.write_metadata(pa.py_buffer(b'{"ack": 0}'))  # opens the exchange
        for chunk in reader:
            key = json.loads(chunk.app_metadata.to_pybytes())["key"]
            if sleep_s:
                time.sleep(sleep_s)
            if key in written:
                exchange.write_metadata(ACK)
                continue
            symbol, timeframe, attrgroup = key.split("/")
            dest = destination.format(symbol=symbol, timeframe=timeframe, attrgroup=attrgroup)
            written.add(dest)
            batch = chunk.data
            writer, ack = client.do_put(flight.FlightDescriptor.for_path(dest), batch.schema)
            writer.write_batch(batch)
            writer.done_writing()
            ack.read()
            writer.close()
            mirrored += 1
            print(f"mirrored {key} to {dest}: {batch.num_rows} rows from Epoch {batch.column(0)[0]}", flush=True)
            if exit_after and mirrored >= exit_after:
                print(f"exiting with status 3 after {mirrored} batches (exit_after)", file=sys.stderr, flush=True)
                return 3
            exchange.write_metadata(ACK)  # handled: the server will not deliver it again
        exchange.close()


if __name__ == "__main__":
    sys.exit(main())
