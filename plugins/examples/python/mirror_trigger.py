#!/usr/bin/env python3
"""Example out-of-process trigger for mkts: mirror every appended batch to another bucket over Flight.

    triggers:
      - module: /path/to/mirror_trigger.py
        on: "*/1Min/OHLCV"
        config:
          destination: "{symbol}_MIRROR/{timeframe}/{attrgroup}"   # the default

The server queues the appends matching `on` for this trigger; the process reads them with DoGet on the
ticket in MKTS_TRIGGER_TICKET. Every batch of one stream has one schema and names its key in app_metadata;
when the stream ends (the next append has another schema) the trigger simply asks again. Each batch is
written back with DoPut. The trigger skips the keys it writes itself, so mirrors are not mirrored again.
The protocol is in docs/plugins.md.
"""
import json
import os
import signal
import sys

import pyarrow.flight as flight


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = json.loads(os.environ.get("MKTS_PLUGIN_CONFIG") or "null") or {}
    destination = config.get("destination", "{symbol}_MIRROR/{timeframe}/{attrgroup}")
    client = flight.connect(os.environ["MKTS_FLIGHT_ADDR"])
    ticket = flight.Ticket(os.environ["MKTS_TRIGGER_TICKET"].encode())
    print(f"mirroring {os.environ['MKTS_PLUGIN_ON']} to {destination}", flush=True)
    written: set[str] = set()
    while True:  # one stream per run of appends with the same schema
        reader = client.do_get(ticket)
        for chunk in reader:
            key = json.loads(chunk.app_metadata.to_pybytes())["key"]
            if key in written:
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


if __name__ == "__main__":
    sys.exit(main())
