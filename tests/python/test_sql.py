"""SQL over the bucket catalog, checked against pandas on the same data.

Data goes in over plain Flight DoPut; queries go through the ADBC Flight SQL driver (DBAPI + pandas), as a
user's notebook would.
"""
from __future__ import annotations

import json

import adbc_driver_flightsql.dbapi as dbapi
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as fl
import pytest

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z
SYMBOLS = {"AAPL": 100.0, "MSFT": 300.0, "TSLA": 200.0}
N = 600  # ten hours of minute bars


def frame(sym: str, base: float) -> pd.DataFrame:
    rng = np.random.default_rng(abs(hash(sym)) % 2**32)
    close = base + np.cumsum(rng.normal(0, 1, N)).astype(np.float32)
    return pd.DataFrame({
        "Epoch": T0 + 60 * np.arange(N, dtype=np.int64),
        "Open": (close + rng.normal(0, 0.1, N)).astype(np.float32),
        "High": (close + 1).astype(np.float32),
        "Low": (close - 1).astype(np.float32),
        "Close": close.astype(np.float32),
        "Volume": rng.integers(1, 1000, N).astype(np.int64),
    })


def put(srv, key: str, df: pd.DataFrame) -> None:
    c = fl.FlightClient(srv.flight_url)
    t = pa.Table.from_pandas(df, preserve_index=False)
    w, r = c.do_put(fl.FlightDescriptor.for_path(key), t.schema)
    w.write_table(t)
    w.done_writing()
    r.read()
    w.close()


@pytest.fixture
def loaded(server):
    frames = {}
    for sym, base in SYMBOLS.items():
        df = frame(sym, base)
        put(server, f"{sym}/1Min/OHLCV", df)
        frames[sym] = df
    conn = dbapi.connect(server.flight_url, autocommit=True)
    yield server, conn, frames
    conn.close()


def query(conn, sql: str) -> pd.DataFrame:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_df()


def pandas_bars(df: pd.DataFrame, rule: str) -> pd.DataFrame:
    d = df.copy()
    d["ts"] = pd.to_datetime(d["Epoch"], unit="s", utc=True)
    g = d.set_index("ts").resample(rule, origin="epoch")
    out = pd.DataFrame({
        "Open": g["Open"].first(), "High": g["High"].max(), "Low": g["Low"].min(),
        "Close": g["Close"].last(), "Volume": g["Volume"].sum(),
    }).dropna()
    out.index.name = "bar"
    return out.reset_index()


def test_select_into_pandas(loaded):
    _, conn, frames = loaded
    df = query(conn, 'SELECT * FROM "AAPL/1Min/OHLCV"')
    assert list(df.columns) == ["Epoch", "Open", "High", "Low", "Close", "Volume"]
    assert str(df["Epoch"].dtype) == "datetime64[s, UTC]" or str(df["Epoch"].dtype).startswith("datetime64")
    exp = frames["AAPL"]
    assert (df["Epoch"].astype("int64") // (10**9 if df["Epoch"].dtype.unit == "ns" else 1) == exp["Epoch"]).all()
    np.testing.assert_array_equal(df["Close"].to_numpy(), exp["Close"].to_numpy())
    # MarketStore spelling (backquotes, trailing ;) is accepted too.
    df2 = query(conn, "SELECT Close FROM `AAPL/1Min/OHLCV` LIMIT 3;")
    np.testing.assert_array_equal(df2["Close"].to_numpy(), exp["Close"].to_numpy()[:3])


def test_resample_matches_pandas(loaded):
    _, conn, frames = loaded
    sql = '''SELECT date_bin(INTERVAL '15 minutes', Epoch) AS bar,
                    first_value(Open ORDER BY Epoch) AS "Open", max(High) AS "High", min(Low) AS "Low",
                    last_value(Close ORDER BY Epoch) AS "Close", sum(Volume) AS "Volume"
             FROM "TSLA/1Min/OHLCV" GROUP BY 1 ORDER BY 1'''
    got = query(conn, sql)
    exp = pandas_bars(frames["TSLA"], "15min")
    assert len(got) == len(exp) == N // 15
    for col in ["Open", "High", "Low", "Close"]:
        np.testing.assert_array_equal(got[col].to_numpy(), exp[col].to_numpy().astype(np.float32), err_msg=col)
    np.testing.assert_array_equal(got["Volume"].to_numpy(), exp["Volume"].to_numpy())
    # time_bucket (udf crate) gives the same bars.
    sql2 = '''SELECT time_bucket('15Min', Epoch) AS bar, first_value(Open ORDER BY Epoch) AS o, max(High) AS h,
                     min(Low) AS l, last_value(Close ORDER BY Epoch) AS c, sum(Volume) AS v
              FROM "TSLA/1Min/OHLCV" GROUP BY 1 ORDER BY 1'''
    got2 = query(conn, sql2)
    for col, name in [("o", "Open"), ("h", "High"), ("l", "Low"), ("c", "Close")]:
        np.testing.assert_array_equal(got2[col].to_numpy(), exp[name].to_numpy().astype(np.float32), err_msg=col)
    np.testing.assert_array_equal(got2["v"].to_numpy(), exp["Volume"].to_numpy())
    # Both run as one pass over the time-ordered scan (query::sorted_agg), not as a hash aggregation.
    for q in (sql, sql2):
        plan = "\n".join(query(conn, "EXPLAIN " + q)["plan"])
        assert "SortedAggregateExec" in plan and "(first row)" in plan and "(last row)" in plan, plan
        assert "AggregateExec: mode=Partial" not in plan, plan


def test_group_by_symbol_matches_pandas(loaded):
    _, conn, frames = loaded
    got = query(conn, '''SELECT "Symbol", count(*) AS n, sum(Volume) AS v, avg(Close) AS c, max(High) AS h
                         FROM "*/1Min/OHLCV" WHERE Epoch >= '2024-01-01T02:00:00Z' GROUP BY 1 ORDER BY 1''')
    allf = pd.concat([f.assign(Symbol=s) for s, f in frames.items()])
    allf = allf[allf["Epoch"] >= T0 + 7200]
    exp = allf.groupby("Symbol").agg(n=("Close", "size"), v=("Volume", "sum"), c=("Close", "mean"), h=("High", "max")).reset_index()
    assert got["Symbol"].tolist() == exp["Symbol"].tolist() == sorted(SYMBOLS)
    np.testing.assert_array_equal(got["n"].to_numpy(), exp["n"].to_numpy())
    np.testing.assert_array_equal(got["v"].to_numpy(), exp["v"].to_numpy())
    np.testing.assert_allclose(got["c"].to_numpy(), exp["c"].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(got["h"].to_numpy(), exp["h"].to_numpy())


def test_join_across_buckets_matches_pandas(loaded):
    _, conn, frames = loaded
    got = query(conn, '''SELECT a.Epoch, a.Close AS a_close, m.Close AS m_close, a.Close - m.Close AS spread
                         FROM "AAPL/1Min/OHLCV" a JOIN "MSFT/1Min/OHLCV" m ON a.Epoch = m.Epoch
                         WHERE a.Epoch < '2024-01-01T01:00:00Z' ORDER BY 1''')
    a, m = frames["AAPL"], frames["MSFT"]
    exp = a.merge(m, on="Epoch", suffixes=("_a", "_m"))
    exp = exp[exp["Epoch"] < T0 + 3600]
    assert len(got) == len(exp) == 60
    np.testing.assert_array_equal(got["spread"].to_numpy(), (exp["Close_a"] - exp["Close_m"]).to_numpy().astype(np.float32))


def test_pushdown_in_explain(loaded):
    _, conn, _ = loaded
    plan = query(conn, '''EXPLAIN SELECT "Symbol", Close FROM "*/1Min/OHLCV"
                          WHERE "Symbol" IN ('AAPL', 'TSLA') AND Epoch >= '2024-01-01T05:00:00Z'
                          AND Epoch < '2024-01-01T06:00:00Z' LIMIT 10''')
    text = "\n".join(plan["plan"].tolist())
    assert "BucketScanExec: table=*/1Min/OHLCV buckets=2 symbols=[AAPL, TSLA]" in text, text
    assert "epoch_range=[2024-01-01T05:00:00Z, 2024-01-01T05:59:59.999999999Z]" in text, text
    assert "limit=10" in text, text
    got = query(conn, '''SELECT "Symbol", Close FROM "*/1Min/OHLCV" WHERE "Symbol" IN ('AAPL', 'TSLA')
                         AND Epoch >= '2024-01-01T05:00:00Z' AND Epoch < '2024-01-01T06:00:00Z' ''')
    assert len(got) == 120 and sorted(set(got["Symbol"])) == ["AAPL", "TSLA"]


def test_insert_select_writes_buckets(loaded):
    srv, conn, frames = loaded
    c = fl.FlightClient(srv.flight_url)
    body = {"key": "AAPL/1H/OHLCV", "column_names": ["Open", "High", "Low", "Close", "Volume"],
            "column_types": ["f4", "f4", "f4", "f4", "i8"]}
    list(c.do_action(fl.Action("create", json.dumps(body).encode())))
    with conn.cursor() as cur:
        cur.execute('''INSERT INTO "AAPL/1H/OHLCV"
                       SELECT date_bin(INTERVAL '1 hour', Epoch), first_value(Open ORDER BY Epoch), max(High), min(Low),
                              last_value(Close ORDER BY Epoch), sum(Volume)
                       FROM "AAPL/1Min/OHLCV" GROUP BY 1''')
        assert cur.fetchall() == [(10,)]
    # Read back over plain Flight: the rows went through the engine.
    t = c.do_get(fl.Ticket(json.dumps({"destination": "AAPL/1H/OHLCV"}).encode())).read_all().to_pandas()
    exp = pandas_bars(frames["AAPL"], "1h")
    np.testing.assert_array_equal(t["Close"].to_numpy(), exp["Close"].to_numpy().astype(np.float32))
    np.testing.assert_array_equal(t["Volume"].to_numpy(), exp["Volume"].to_numpy())


def test_metadata_calls(loaded):
    _, conn, _ = loaded
    info = conn.adbc_get_info()
    assert info["vendor_name"] == "mkts"
    objs = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    assert objs[0]["catalog_name"] == "mkts"
    tables = {t["table_name"] for s in objs[0]["catalog_db_schemas"] for t in s["db_schema_tables"]}
    assert {"AAPL/1Min/OHLCV", "MSFT/1Min/OHLCV", "TSLA/1Min/OHLCV", "*/1Min/OHLCV"} <= tables
    schema = conn.adbc_get_table_schema("*/1Min/OHLCV")
    assert schema.names == ["Epoch", "Open", "High", "Low", "Close", "Volume", "Symbol"]
    assert schema.field("Epoch").type == pa.timestamp("s", tz="UTC")
    assert set(conn.adbc_get_table_types()) >= {"TABLE"}


def test_sql_errors_are_clear(loaded):
    _, conn, _ = loaded
    with pytest.raises(Exception, match="NOPE/1Min/OHLCV"):
        query(conn, 'SELECT * FROM "NOPE/1Min/OHLCV"')


def test_adbc_bound_parameters(loaded):
    """Parameters travel as a DoPut of CommandPreparedStatementQuery; the Flight service decodes them."""
    _, conn, frames = loaded
    df = frames["AAPL"]
    cut = float(df["Close"].median())
    with conn.cursor() as cur:
        cur.execute('SELECT count(*) AS n FROM "AAPL/1Min/OHLCV" WHERE "Close" > $1', parameters=(cut,))
        got = cur.fetch_df()
    assert int(got["n"][0]) == int((df["Close"].astype(np.float64) > cut).sum())
