"""Arrow's everyday types end to end (#13): nulls, strings of any length, binary, timestamps with time
zones, dates, decimals and dictionaries, over Flight and Flight SQL (ADBC), through out-of-order and
overwriting writes across a year boundary, `kill -9` and replay; pandas nullable dtypes; schema changes
(actions, SQL `ALTER TABLE`, `\\addcolumn`, `auto_add_columns`); what MarketStore's interfaces carry.
"""
from __future__ import annotations

import datetime as dt
import decimal
import json
import subprocess

import adbc_driver_flightsql.dbapi as dbapi
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as fl
import pymarketstore as pymkts
import pytest

from conftest import mkts_bin
from test_flight_core import ERR, action, client, get, put

Y2024 = 1_704_067_200  # 2024-01-01T00:00:00Z
UTC = dt.timezone.utc


def ts(secs: int, tz=UTC) -> dt.datetime:
    return dt.datetime.fromtimestamp(secs, UTC).astimezone(tz)


D = decimal.Decimal
# name -> (Arrow type written, Arrow type read back, values for 4 rows; None = null)
TYPES = {
    "ts_ns_utc": (pa.timestamp("ns", "UTC"), pa.timestamp("ns", "UTC"), [ts(1), None, ts(2**31), ts(Y2024)]),
    "ts_ms": (pa.timestamp("ms"), pa.timestamp("ms"), [dt.datetime(1999, 12, 31, 23, 59, 59, 999000), dt.datetime(2030, 1, 1), None, dt.datetime(1970, 1, 1)]),
    "ts_us_ny": (pa.timestamp("us", "America/New_York"), pa.timestamp("us", "America/New_York"), [None, ts(Y2024 + 1), ts(Y2024 + 2), ts(0)]),
    "date": (pa.date32(), pa.date32(), [dt.date(2023, 12, 31), dt.date(2024, 1, 1), None, dt.date(1900, 3, 1)]),
    "price": (pa.decimal128(12, 4), pa.decimal128(12, 4), [D("123.4500"), D("-0.0001"), D("99999999.9999"), None]),
    "text": (pa.string(), pa.string(), ["", None, "a string far longer than sixteen characters: ÄÖÜ€漢字", "x"]),
    "big_text": (pa.large_string(), pa.large_string(), [None, "large", "", "y" * 1000]),
    "blob": (pa.binary(), pa.binary(), [b"\x00\x01\xff", b"", None, bytes(range(256))]),
    "venue": (pa.dictionary(pa.int32(), pa.string()), pa.string(), ["NYSE", "ARCA", None, "NYSE"]),
    "close": (pa.float64(), pa.float64(), [1.5, None, float("inf"), -0.0]),
    "size": (pa.int64(), pa.int64(), [None, 2**63 - 1, -(2**63), 0]),
    "halted": (pa.bool_(), pa.bool_(), [True, None, False, True]),
}
EPOCHS = [Y2024 - 120, Y2024 - 60, Y2024, Y2024 + 60]  # two rows in 2023, two in 2024


def table(rows: list[int], values: dict[str, list]) -> pa.Table:
    cols = {"Epoch": pa.array([EPOCHS[i] for i in rows], pa.int64())}
    for name, (t, _, vals) in TYPES.items():
        src = values.get(name, vals)
        cols[name] = pa.array([src[i] for i in rows], t)
    return pa.table(cols)


def expected_rows(over: dict[str, list]) -> dict[str, list]:
    out = {}
    for name, (_, _, vals) in TYPES.items():
        out[name] = list(over.get(name, vals))
    return out


def check(got: pa.Table, values: dict[str, list]) -> None:
    assert got.column("Epoch").cast(pa.int64()).to_pylist() == EPOCHS
    for name, (_, read_type, _) in TYPES.items():
        col = got.column(name)
        assert col.type == read_type, (name, col.type)
        assert col.to_pylist() == pa.array(values[name], read_type if name != "venue" else pa.string()).to_pylist(), name


def test_every_type_round_trips_with_nulls_across_years_out_of_order_overwrites_and_kill_9(server):
    c = client(server)
    key = "TYP/1Min/ALL"
    # The two 2024 rows first, then 2023's out of order (an earlier year, and an insert before stored rows).
    assert put(c, key, table([3, 2], {})) == [{"rows": 2}]
    put(c, key, table([1, 0], {}))
    # Overwrites (last write wins): a null becomes a value, a value becomes null, a string grows.
    over = expected_rows({})
    over["text"][1] = "now set " * 100
    over["close"][1] = 7.25
    over["size"][1] = None
    over["blob"][2] = b"set"
    over["ts_ns_utc"][1] = ts(Y2024 - 60)
    over["price"][3] = D("1.0000")
    put(c, key, table([1, 2, 3], over))
    check(get(c, destination=key), over)
    info = action(c, "get_info", key)
    nullable = {x["name"]: x["nullable"] for x in info["columns"]}
    assert all(nullable.values()), nullable  # pyarrow fields are nullable unless said otherwise
    # The same through Flight SQL (ADBC), and typed filters on the new types.
    with dbapi.connect(server.flight_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT * FROM "{key}" ORDER BY "Epoch"')
        check(cur.fetch_arrow_table(), over)
        cur.execute(f'SELECT count(*) AS n FROM "{key}" WHERE text IS NULL OR close IS NULL')
        assert cur.fetchall() == [(0,)]
        cur.execute(f'SELECT count(*) AS n, max(price) AS p, max(length(text)) AS l FROM "{key}" WHERE date >= DATE \'2024-01-01\' OR date IS NULL')
        assert cur.fetchall() == [(2, D("99999999.9999"), 800)]
    # The same types without a single null: no validity bitmap is written at all.
    full = {name: [v if v is not None else next(x for x in vals if x is not None) for v in vals] for name, (_, _, vals) in TYPES.items()}
    put(c, "TYPNN/1Min/ALL", table([3, 0, 2, 1], full))
    check(get(c, destination="TYPNN/1Min/ALL"), full)
    assert not list((server.root / "TYPNN").rglob("*.valid"))
    assert list((server.root / "TYP").rglob("*.valid"))
    # kill -9: nothing checkpointed; replay gives the same rows.
    server.kill()
    server.start()
    check(get(client(server), destination=key), over)
    check(get(client(server), destination="TYPNN/1Min/ALL"), full)


def test_pandas_nullable_dtypes_and_none_round_trip_exactly(server):
    df = pd.DataFrame({
        "Epoch": np.array([Y2024, Y2024 + 60, Y2024 + 120], dtype=np.int64),
        "Size": pd.array([1, None, 3], dtype="Int64"),
        "Sym": pd.array(["AAPL", None, "a string longer than sixteen"], dtype="string"),
        "Px": pd.array([1.5, 2.5, None], dtype="Float64"),
        "Note": ["x", None, "z"],  # object column with None
    })
    c = client(server)
    put(c, "PD/1Min/ALL", pa.Table.from_pandas(df, preserve_index=False))
    got = get(c, destination="PD/1Min/ALL")
    mapping = {pa.int64(): pd.Int64Dtype(), pa.float64(): pd.Float64Dtype(), pa.string(): pd.StringDtype()}
    back = got.to_pandas(types_mapper=mapping.get)
    back["Epoch"] = got.column("Epoch").cast(pa.int64()).to_numpy()
    expected = df.copy()
    expected["Note"] = expected["Note"].astype("string")
    pd.testing.assert_frame_equal(back, expected)


def test_a_one_megabyte_string_round_trips(server):
    c = client(server)
    big = "".join(chr(0x41 + i % 26) for i in range(1 << 20))
    put(c, "BIG/1Min/S", pa.table({"Epoch": pa.array([Y2024, Y2024 + 60]), "S": pa.array([big, "small"])}))
    got = get(c, destination="BIG/1Min/S")
    assert got.column("S").to_pylist() == [big, "small"]
    with dbapi.connect(server.flight_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute('SELECT length("S") FROM "BIG/1Min/S" ORDER BY "Epoch"')
        assert cur.fetchall() == [(1 << 20,), (5,)]


def test_epoch_and_nanoseconds_are_never_null(server):
    c = client(server)
    with pytest.raises(ERR, match="Epoch"):
        put(c, "NN/1Min/X", pa.table({"Epoch": pa.array([Y2024, None], pa.int64()), "V": pa.array([1.0, 2.0])}))
    with pytest.raises(ERR, match="Nanoseconds"):
        put(c, "NN/1Sec/TICK", pa.table({"Epoch": pa.array([Y2024, Y2024]), "V": pa.array([1.0, 2.0]),
                                          "Nanoseconds": pa.array([1, None], pa.int32())}))
    assert action(c, "list_symbols") in (None, [])


def bars(epochs, close):
    return pa.table({"Epoch": pa.array(epochs, pa.int64()), "Close": pa.array(close, pa.float64())})


def test_schema_changes_over_actions_sql_and_the_shell(server):
    c = client(server)
    key = "SC/1Min/OHLCV"
    put(c, key, bars([Y2024 - 60, Y2024], [1.0, 2.0]))  # 2023 and 2024
    # A write with a column the bucket lacks is refused (auto_add_columns is off by default), naming it.
    with pytest.raises(ERR, match="Vwap"):
        put(c, key, pa.table({"Epoch": pa.array([Y2024 + 60]), "Close": pa.array([3.0]), "Vwap": pa.array([3.1])}))
    r = action(c, "add_column", {"key": key, "column_names": ["Vwap", "Venue"], "column_types": ["f8", "utf8"]})
    assert r["columns"] == [{"name": "Close", "type": "f8", "nullable": True}, {"name": "Vwap", "type": "f8", "nullable": True},
                            {"name": "Venue", "type": "utf8", "nullable": True}]
    put(c, key, pa.table({"Epoch": pa.array([Y2024 + 60]), "Close": pa.array([3.0]), "Vwap": pa.array([3.1]), "Venue": pa.array(["IEX"])}))
    got = get(c, destination=key)
    assert got.column("Vwap").to_pylist() == [None, None, 3.1]
    assert got.column("Venue").to_pylist() == [None, None, "IEX"]
    # A write that omits a nullable column stores nulls in it.
    put(c, key, pa.table({"Epoch": pa.array([Y2024 + 120]), "Close": pa.array([4.0])}))
    assert get(c, destination=key, epoch_start=Y2024 + 120).column("Venue").to_pylist() == [None]
    # SQL: ALTER TABLE ADD and DROP COLUMN (ADBC), then the shell's \addcolumn and \dropcolumn.
    with dbapi.connect(server.flight_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f'ALTER TABLE "{key}" ADD COLUMN "Px" DECIMAL(10, 2), ADD COLUMN "T" TIMESTAMP WITH TIME ZONE')
        assert cur.fetchall() == [(2,)]
        cur.execute(f'ALTER TABLE "{key}" DROP COLUMN "Vwap"')
        assert cur.fetchall() == [(1,)]  # done once its result is read (ADBC reads it in the background)
        cur.execute(f'SELECT * FROM "{key}" ORDER BY "Epoch"')
        t = cur.fetch_arrow_table()
        assert t.column_names == ["Epoch", "Close", "Venue", "Px", "T"]
        assert t.column("Px").type == pa.decimal128(10, 2) and t.column("T").type == pa.timestamp("ns", "UTC")
        assert t.column("Px").null_count == 4
        with pytest.raises(Exception, match="Nope"):
            cur.execute(f'ALTER TABLE "{key}" DROP COLUMN "Nope"')
            cur.fetchall()
    out = subprocess.run([mkts_bin(), "connect", "--url", server.grpc_addr, "-c", f"\\addcolumn {key} Count/int64:Flag/bool",
                          "-c", f"\\dropcolumn {key} Px,T"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{key}: Close:f8? Venue:utf8? Px:decimal128(10,2)? T:timestamp[ns, UTC]? Count:i8? Flag:b1?\n{key}: Close:f8? Venue:utf8? Count:i8? Flag:b1?\n" == out.stdout, out.stdout
    put(c, key, pa.table({"Epoch": pa.array([Y2024 + 180]), "Close": pa.array([5.0]), "Count": pa.array([9]), "Flag": pa.array([True])}))
    # A restart keeps every change; the old rows read as null in the new columns.
    server.stop()
    server.start()
    got = get(client(server), destination=key)
    assert got.column_names == ["Epoch", "Close", "Venue", "Count", "Flag"]
    assert got.column("Close").to_pylist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert got.column("Count").to_pylist() == [None, None, None, None, 9]
    assert got.column("Flag").to_pylist() == [None, None, None, None, True]


def test_schema_changes_follow_the_servers_switches(server_factory):
    srv = server_factory("enable_add: false\nenable_remove: false\n")
    c = client(srv)
    with pytest.raises(ERR, match="enable_add"):
        action(c, "add_column", {"key": "X/1Min/OHLCV", "column_names": ["A"], "column_types": ["f8"]})
    with pytest.raises(ERR, match="enable_remove"):
        action(c, "drop_column", {"key": "X/1Min/OHLCV", "column_names": ["A"]})


def test_auto_add_columns_lets_a_feed_add_fields(server_factory):
    srv = server_factory("auto_add_columns: true\n")
    c = client(srv)
    key = "AUTO/1Min/OHLCV"
    put(c, key, bars([Y2024], [1.0]))
    put(c, key, pa.table({"Epoch": pa.array([Y2024 + 60]), "Close": pa.array([2.0]), "Trades": pa.array([12], pa.int32()),
                          "Exchange": pa.array(["a venue name longer than 16 chars"])}))
    got = get(c, destination=key)
    assert got.column_names == ["Epoch", "Close", "Trades", "Exchange"]
    assert got.column("Trades").to_pylist() == [None, 12]
    assert got.column("Exchange").to_pylist() == [None, "a venue name longer than 16 chars"]
    srv.kill()
    srv.start()
    assert get(client(srv), destination=key).column("Trades").to_pylist() == [None, 12]


def test_marketstore_interfaces_carry_what_they_can(server):
    c = client(server)
    put(c, "MS/1Min/OHLCV", pa.table({
        "Epoch": pa.array([Y2024, Y2024 + 60]),
        "Close": pa.array([1.5, None], pa.float64()),
        "Venue": pa.array(["a venue name much longer than sixteen", "NYSE"]),
    }))
    put(c, "MSI/1Min/OHLCV", pa.table({"Epoch": pa.array([Y2024, Y2024 + 60]), "Volume": pa.array([1, None], pa.int64())}))
    put(c, "MSB/1Min/OHLCV", pa.table({"Epoch": pa.array([Y2024]), "Raw": pa.array([b"\x00"], pa.binary())}))
    pm = pymkts.Client(server.rpc_url)
    df = pm.query(pymkts.Params("MS", "1Min", "OHLCV")).first().df()
    assert df["Close"].iloc[0] == 1.5 and np.isnan(df["Close"].iloc[1])  # a null float is NaN
    arr = pm.query(pymkts.Params("MS", "1Min", "OHLCV")).first().array
    assert arr.dtype["Venue"] == np.dtype("<U37")  # numpy unicode of the width needed
    assert list(arr["Venue"]) == ["a venue name much longer than sixteen", "NYSE"]
    with pytest.raises(Exception, match="Volume"):
        pm.query(pymkts.Params("MSI", "1Min", "OHLCV"))  # a null integer has no numpy value
    with pytest.raises(Exception, match="Raw"):
        pm.query(pymkts.Params("MSB", "1Min", "OHLCV"))  # binary has no MarketStore type


def test_a_column_added_to_a_year_of_data_reads_null_in_old_rows_everywhere(server):
    c = client(server)
    key = "YEAR/1Min/OHLCV"
    n = 525_600  # 2023, every minute
    epochs = Y2024 - 60 * n + 60 * np.arange(n, dtype=np.int64)
    put(c, key, pa.table({"Epoch": pa.array(epochs), "Close": pa.array(np.arange(n, dtype=np.float64))}))
    action(c, "add_column", {"key": key, "column_names": ["Vwap"], "column_types": ["f8"]})
    new = Y2024 + 60 * np.arange(10, dtype=np.int64)
    put(c, key, pa.table({"Epoch": pa.array(new), "Close": pa.array(np.ones(10)), "Vwap": pa.array(np.arange(10, dtype=np.float64) / 2)}))
    got = get(c, destination=key)
    assert got.num_rows == n + 10 and got.column("Vwap").null_count == n
    assert got.column("Vwap").to_pylist()[-10:] == [i / 2 for i in range(10)]
    with dbapi.connect(server.flight_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT count(*), count("Vwap"), sum("Vwap") FROM "{key}"')
        assert cur.fetchall() == [(n + 10, 10, 22.5)]
    df = pymkts.Client(server.rpc_url).query(pymkts.Params("YEAR", "1Min", "OHLCV", limit=15)).first().df()
    assert df["Vwap"].isna().tolist() == [True] * 5 + [False] * 10
    assert df["Vwap"].tolist()[5:] == [i / 2 for i in range(10)]


def big_table(n: int, start: int) -> pa.Table:
    """`n` minute bars from `start` with every stored type, nulls at different periods in each column."""
    i = np.arange(n)
    cols = {"Epoch": pa.array(start + 60 * i.astype(np.int64))}
    for name, (t, _, vals) in TYPES.items():
        period = 3 + len(name) % 5  # a different null pattern per column
        src = [vals[(k * 7 + len(name)) % 4] if k % period else None for k in range(n)]
        cols[name] = pa.array(src, t)
    return pa.table(cols)


def test_large_reads_of_every_type_over_flight_are_exact_split_into_several_messages(server_factory):
    """Stored-data DoGet frames column buffers without copying them (flight/src/wire.rs): full, ranged
    (batches sliced at an odd row, so bitmaps and string offsets start mid-buffer) and tail reads of every
    stored type, split into several messages by a 1 MiB send limit, equal what was written."""
    srv = server_factory("grpc_max_send_msg_size: 1\n")
    c = client(srv)
    key = "BIG/1Min/ALL"
    n = 60_000
    want = big_table(n, Y2024 - 60 * 1000)  # crosses into 2024: two partitions
    for off in range(0, n, 20_000):
        put(c, key, want.slice(off, 20_000))
    read_types = pa.schema([("Epoch", pa.int64())] + [(name, rt) for name, (_, rt, _) in TYPES.items()])
    want = want.cast(read_types)

    def read(**q):
        reader = c.do_get(fl.Ticket(json.dumps({"destination": key, **q}).encode()))
        chunks = []
        while True:
            try:
                chunks.append(reader.read_chunk().data)
            except StopIteration:
                break
        got = pa.Table.from_batches(chunks, reader.schema)
        return got.set_column(0, "Epoch", got.column("Epoch").cast(pa.int64())), len(chunks)

    got, messages = read()
    assert messages > 4, messages
    assert got.schema.remove_metadata() == read_types
    assert got.equals(want), "full read"
    assert got.to_pylist()[1234] == want.to_pylist()[1234]

    first, last = 12_345, 47_891
    got, _ = read(epoch_start=int(want["Epoch"][first].as_py()), epoch_end=int(want["Epoch"][last].as_py()))
    assert got.equals(want.slice(first, last - first + 1)), "range read"

    got, _ = read(limit_record_count=777)
    assert got.equals(want.slice(n - 777)), "tail read"
    got, _ = read(limit_record_count=33, limit_from_start=True, epoch_start=int(want["Epoch"][999].as_py()))
    assert got.equals(want.slice(999, 33)), "head read from an offset"
