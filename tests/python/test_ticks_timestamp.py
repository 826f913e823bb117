"""Ticks as one timestamp (issue #13): a Flight ticket with `"epoch_ns": true` and the SQL table function
`ticks('KEY')` return a tick bucket's time as one `Epoch` column of `timestamp[ns, UTC]`; a write whose
`Epoch` is `timestamp[ns]` keeps its nanoseconds without a separate `Nanoseconds` column.
"""
from __future__ import annotations

import json

import adbc_driver_flightsql.dbapi as dbapi
import pyarrow as pa
import pyarrow.flight as fl
import pytest

T0 = 1_704_198_600  # 2024-01-02 12:30:00 UTC
NS = pa.timestamp("ns", "UTC")


def put(c, key, table):
    writer, reader = c.do_put(fl.FlightDescriptor.for_path(key), table.schema)
    writer.write_table(table)
    writer.done_writing()
    reader.read()
    writer.close()


def get(c, **ticket) -> pa.Table:
    return c.do_get(fl.Ticket(json.dumps(ticket).encode())).read_all()


def test_ticks_read_and_written_as_one_nanosecond_timestamp(server):
    c = fl.FlightClient(server.flight_url)
    put(c, "TSLA/1Sec/TICK", pa.table({"Epoch": pa.array([T0, T0], pa.int64()), "Price": [1.0, 2.0],
                                       "Nanoseconds": pa.array([123, 999_999_999], pa.int32())}))
    # A timestamp[ns] Epoch alone: its sub-second part is kept as the row's nanoseconds.
    stamps = [T0 * 10**9 + 500, (T0 + 1) * 10**9 + 7]
    put(c, "TSLA/1Sec/TICK", pa.table({"Epoch": pa.array(stamps, NS), "Price": [3.0, 4.0]}))

    plain = get(c, destination="TSLA/1Sec/TICK")
    assert plain.column_names == ["Epoch", "Price", "Nanoseconds"]
    assert plain.column("Nanoseconds").to_pylist() == [123, 500, 999_999_999, 7]

    one = get(c, destination="TSLA/1Sec/TICK", epoch_ns=True)
    assert one.schema.field("Epoch").type == NS and one.column_names == ["Epoch", "Price"]
    assert one.column("Epoch").cast(pa.int64()).to_pylist() == [T0 * 10**9 + 123, T0 * 10**9 + 500,
                                                                 T0 * 10**9 + 999_999_999, (T0 + 1) * 10**9 + 7]
    assert one.column("Price").to_pylist() == [1.0, 3.0, 2.0, 4.0]
    # Range bounds with nanoseconds still apply.
    part = get(c, destination="TSLA/1Sec/TICK", epoch_ns=True, epoch_start=T0, epoch_start_nanos=124, epoch_end=T0, epoch_end_nanos=999_999_999)
    assert part.column("Price").to_pylist() == [3.0, 2.0]
    # GetFlightInfo describes the same schema.
    info = c.get_flight_info(fl.FlightDescriptor.for_command(json.dumps({"destination": "TSLA/1Sec/TICK", "epoch_ns": True})))
    assert info.schema == one.schema

    # A fixed bucket has no Nanoseconds: unchanged.
    put(c, "AAPL/1Min/OHLCV", pa.table({"Epoch": pa.array([T0], pa.int64()), "Close": [9.0]}))
    fixed = get(c, destination="AAPL/1Min/OHLCV", epoch_ns=True)
    assert fixed.column_names == ["Epoch", "Close"] and fixed.schema.field("Epoch").type == pa.timestamp("s", "UTC")


def test_sql_ticks_view(server):
    c = fl.FlightClient(server.flight_url)
    put(c, "TSLA/1Sec/TICK", pa.table({"Epoch": pa.array([T0, T0, T0 + 1], pa.int64()), "Price": [1.0, 2.0, 3.0],
                                       "Nanoseconds": pa.array([5, 6, 7], pa.int32())}))
    put(c, "NVDA/1Sec/TICK", pa.table({"Epoch": pa.array([T0], pa.int64()), "Price": [10.0],
                                       "Nanoseconds": pa.array([8], pa.int32())}))
    put(c, "AAPL/1Min/OHLCV", pa.table({"Epoch": pa.array([T0], pa.int64()), "Close": [9.0]}))
    with dbapi.connect(server.flight_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT \"Epoch\", \"Price\" FROM ticks('TSLA/1Sec/TICK') "
                    "WHERE \"Epoch\" > TIMESTAMP '2024-01-02 12:30:00.000000005' ORDER BY \"Epoch\"")
        t = cur.fetch_arrow_table()
        assert t.schema.field("Epoch").type == NS
        assert t.column("Epoch").cast(pa.int64()).to_pylist() == [T0 * 10**9 + 6, (T0 + 1) * 10**9 + 7]
        assert t.column("Price").to_pylist() == [2.0, 3.0]
        # Several symbols: the Symbol column comes along.
        cur.execute("SELECT \"Symbol\", count(*) AS n FROM ticks('*/1Sec/TICK') GROUP BY \"Symbol\" ORDER BY \"Symbol\"")
        assert cur.fetchall() == [("NVDA", 1), ("TSLA", 3)]
        for sql, says in [("SELECT * FROM ticks('AAPL/1Min/OHLCV')", "not a tick bucket"),
                          ("SELECT * FROM ticks('NOPE/1Sec/TICK')", "NOPE/1Sec/TICK"),
                          ("SELECT * FROM ticks(1)", "one string literal")]:
            with pytest.raises(dbapi.Error, match=says):
                cur.execute(sql)
                cur.fetchall()


def test_sql_epoch_bounds_on_a_tick_bucket_apply_to_the_whole_second(server):
    """`Epoch` of a tick bucket reads as whole seconds: `Epoch <= s` holds every tick of second s, `Epoch < s`
    none of them, whatever their Nanoseconds (the bounds are pushed into the scan, which must agree)."""
    c = fl.FlightClient(server.flight_url)
    put(c, "B/1Sec/TICK", pa.table({"Epoch": pa.array([10, 10, 11, 11, 12]), "Price": pa.array([1.0, 2.0, 3.0, 4.0, 5.0]),
                                     "Nanoseconds": pa.array([0, 500, 0, 999_999_999, 7], pa.int32())}))
    q = lambda where: get(c, sql=f'SELECT "Price" FROM "B/1Sec/TICK" WHERE {where} ORDER BY "Price"').column("Price").to_pylist()
    assert q('"Epoch" <= to_timestamp_seconds(11)') == [1.0, 2.0, 3.0, 4.0]
    assert q('"Epoch" < to_timestamp_seconds(11)') == [1.0, 2.0]
    assert q('"Epoch" >= to_timestamp_seconds(11)') == [3.0, 4.0, 5.0]
    assert q('"Epoch" > to_timestamp_seconds(10)') == [3.0, 4.0, 5.0]
    assert q('"Epoch" = to_timestamp_seconds(11)') == [3.0, 4.0]
    assert q('"Epoch" BETWEEN to_timestamp_seconds(10) AND to_timestamp_seconds(11)') == [1.0, 2.0, 3.0, 4.0]
    assert q("\"Epoch\" <= TIMESTAMP '1970-01-01T00:00:11.5Z'") == [1.0, 2.0, 3.0, 4.0]
    assert q("\"Epoch\" > TIMESTAMP '1970-01-01T00:00:10.5Z'") == [3.0, 4.0, 5.0]
    # DELETE uses the same bounds: every tick of second 10 goes, nothing of 11.
    get(c, sql='DELETE FROM "B/1Sec/TICK" WHERE "Epoch" < to_timestamp_seconds(11)')
    assert q("true") == [3.0, 4.0, 5.0]
