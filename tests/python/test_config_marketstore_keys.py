"""Every mkts.yml key of MarketStore's configuration (reference §8) either does what MarketStore does or is
warned about at start-up as not applicable, with the reason; a MarketStore file starts the real server."""
from __future__ import annotations

import socket
import urllib.request

from conftest import free_port

# MarketStore keys mkts accepts without acting on them, each with the reason the start-up warning gives
# (the same list as src/config.rs IGNORED_KEYS and docs/config.md).
IGNORED = {
    "wal_rotate_interval": ("5", "mkts checkpoints every 10 s and whenever a log segment passes 256 MiB, then trims the log"),
    "background_sync": ("true", "every write is fsync'd (group commit) before it is acknowledged; there is no background flusher"),
    "wal_bypass": ("false", "every write goes through the write-ahead log; it cannot be bypassed"),
    "disable_variable_compression": ("true", "the server stores variable-length buckets uncompressed; "
                                             "`mkts import-marketstore --config` reads the key to decode MarketStore's files"),
    "init_catalog": ("true", "the catalog is always loaded at start-up"),
    "init_wal_cache": ("true", "the write-ahead log is always replayed and writes are always enabled"),
    "enable_last_known": ("false", "there is no last-known-value cache; queries read the buckets"),
    "stale_threshold": ("5", "there is no last-known-value cache to expire"),
}

# Keys MarketStore's own parser ignores (§8.1): mkts says so too, as unknown keys.
MARKETSTORE_IGNORES = {"polling_interval": "1s", "start_time": "0"}


def test_every_marketstore_key_applies_or_is_warned_with_its_reason(server_factory):
    util_port = free_port()
    repl_port = free_port()
    extra = (
        "grpc_max_send_msg_size: 1024\n"
        "grpc_max_recv_msg_size: 1024\n"
        f"utilities_url: 127.0.0.1:{util_port}\n"
        "timezone: America/New_York\n"
        "stop_grace_period: 1\n"
        "enable_add: true\nenable_remove: true\nqueryable: true\n"
        "replication:\n"
        "  enabled: true\n"
        f"  listen_port: {repl_port}\n"
        "  tls_enabled: false\n"
        "  cert_file: \"\"\n"
        "  key_file: \"\"\n"
        "  master_host: \"\"\n"
        "  retry_interval: 10s\n"
        "  retry_backoff_coeff: 2\n"
        "triggers: []\n"
        "bgworkers: []\n"
        + "".join(f"{k}: {v}\n" for k, (v, _) in IGNORED.items())
        + "".join(f"{k}: {v}\n" for k, v in MARKETSTORE_IGNORES.items())
    )
    srv = server_factory(config_extra=extra)
    log = srv.log()
    for key, (_, why) in IGNORED.items():
        assert f'configuration key "{key}" is accepted but ignored: {why}' in log, (key, log)
    for key in MARKETSTORE_IGNORES:
        assert f'unknown configuration key "{key}" is ignored' in log, (key, log)
    # No key MarketStore applies is unknown to mkts.
    warned_unknown = [line for line in log.splitlines() if "unknown configuration key" in line]
    assert len(warned_unknown) == len(MARKETSTORE_IGNORES), warned_unknown
    # utilities_url serves /heartbeat.
    with urllib.request.urlopen(f"http://127.0.0.1:{util_port}/heartbeat", timeout=10) as r:
        assert r.status == 200
    import numpy as np
    import pymarketstore as pymkts
    cli = pymkts.Client(srv.rpc_url)
    assert cli.list_symbols() == []
    # timezone: the query reply names the configured zone.
    cli.write(np.array([(1_704_067_200, 1.0)], dtype=[("Epoch", "i8"), ("Close", "f8")]), "TZ/1Min/OHLCV")
    assert cli.query(pymkts.Params("TZ", "1Min", "OHLCV")).timezone == "America/New_York"
    # replication.enabled with listen_port: this master serves the replication port.
    with socket.create_connection(("127.0.0.1", repl_port), timeout=10):
        pass
    # stop_grace_period: the server waits before stopping, as MarketStore.
    assert srv.stop() == 0
    assert "waiting stop_grace_period = 1s" in srv.log()
