//! Flight SQL on the server's real service stack — `MktsFlightService` over the Flight backend and the
//! Flight SQL handler, started by `mkts::server::start` exactly as `mkts start` composes it — driven by
//! arrow-flight's `FlightSqlServiceClient`: statements, prepared statements with bound parameters,
//! updates, bulk ingest and the metadata calls.

use std::sync::Arc;

use arrow::array::{AsArray, Float32Array, Int64Array, RecordBatch, TimestampSecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetTables, CommandStatementIngest, SqlInfo, TableDefinitionOptions};
use arrow_flight::FlightInfo;
use futures::TryStreamExt;
use mkts::server::RunningServer;
use tonic::transport::Channel;

const T0: i64 = 1_704_067_200;

fn bars(n: usize, base: f32) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
        Field::new("Close", DataType::Float32, false),
        Field::new("Volume", DataType::Int64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampSecondArray::from((0..n as i64).map(|i| T0 + 60 * i).collect::<Vec<_>>()).with_timezone("UTC")),
            Arc::new(Float32Array::from((0..n).map(|i| base + i as f32).collect::<Vec<_>>())),
            Arc::new(Int64Array::from((0..n as i64).collect::<Vec<_>>())),
        ],
    )
    .unwrap()
}

async fn serve() -> (tempfile::TempDir, FlightSqlServiceClient<Channel>, RunningServer) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "root_directory: {}\nlisten_host: 127.0.0.1\nlisten_port: 0\ngrpc_listen_port: 0\n",
        dir.path().join("data").display()
    );
    let config = mkts::config::Config::parse(&yaml, dir.path()).unwrap();
    let server = mkts::server::start(config).await.unwrap();
    let addr = server.grpc_addr.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    (dir, FlightSqlServiceClient::new(channel), server)
}

async fn fetch(client: &mut FlightSqlServiceClient<Channel>, info: FlightInfo) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for ep in info.endpoint {
        let s = client.do_get(ep.ticket.unwrap()).await.unwrap();
        out.extend(s.try_collect::<Vec<_>>().await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn flight_sql_end_to_end() {
    let (_dir, mut client, server) = serve().await;
    // Bulk ingest creates the buckets.
    for (sym, base) in [("AAPL", 100.0), ("TSLA", 200.0)] {
        let cmd = CommandStatementIngest {
            table_definition_options: Some(TableDefinitionOptions { if_not_exist: 1, if_exists: 2 }),
            table: format!("{sym}/1Min/OHLCV"),
            schema: None,
            catalog: None,
            temporary: false,
            transaction_id: None,
            options: Default::default(),
        };
        let n = client.execute_ingest(cmd, futures::stream::iter(vec![Ok(bars(30, base))])).await.unwrap();
        assert_eq!(n, 30);
    }
    // Statement.
    let info = client.execute(r#"SELECT "Symbol", sum(Volume) AS v FROM "*/1Min/OHLCV" GROUP BY 1 ORDER BY 1"#.into(), None).await.unwrap();
    let b = fetch(&mut client, info).await;
    assert_eq!(b[0].num_rows(), 2);
    assert_eq!(b[0].column(1).as_primitive::<arrow::datatypes::Int64Type>().values(), &[435, 435]);
    // Prepared statement with a parameter.
    let mut ps = client.prepare(r#"SELECT count(*) AS n FROM "AAPL/1Min/OHLCV" WHERE Close >= $1"#.into(), None).await.unwrap();
    assert_eq!(ps.parameter_schema().unwrap().fields().len(), 1);
    let params = RecordBatch::try_new(Arc::new(Schema::new(vec![Field::new("$1", DataType::Float32, false)])), vec![Arc::new(Float32Array::from(vec![120.0f32]))]).unwrap();
    ps.set_parameters(params).unwrap();
    let info = ps.execute().await.unwrap();
    let b = fetch(&mut client, info).await;
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 10);
    ps.close().await.unwrap();
    // Update.
    let n = client
        .execute_update(r#"INSERT INTO "*/1Min/OHLCV" SELECT Epoch, Close * 2, Volume, 'DBL' FROM "AAPL/1Min/OHLCV""#.into(), None)
        .await
        .unwrap();
    assert_eq!(n, 30);
    // Metadata.
    let info = client.get_catalogs().await.unwrap();
    let b = fetch(&mut client, info).await;
    assert_eq!(b[0].column(0).as_string::<i32>().value(0), "mkts");
    let info = client.get_db_schemas(CommandGetDbSchemas { catalog: None, db_schema_filter_pattern: None }).await.unwrap();
    let b = fetch(&mut client, info).await;
    assert_eq!(b[0].column(1).as_string::<i32>().value(0), "public");
    let info = client
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: Some("DBL%".into()),
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let b = fetch(&mut client, info).await;
    assert_eq!(b[0].num_rows(), 1);
    assert_eq!(b[0].column(2).as_string::<i32>().value(0), "DBL/1Min/OHLCV");
    let info = client.get_sql_info(vec![SqlInfo::FlightSqlServerName]).await.unwrap();
    let b = fetch(&mut client, info).await;
    assert_eq!(b[0].num_rows(), 1);
    // Errors carry the statement's problem.
    let e = client.execute(r#"SELECT * FROM "NOPE/1Min/OHLCV""#.into(), None).await.unwrap_err();
    let err = e.to_string();
    assert!(err.contains("NOPE/1Min/OHLCV"), "{err}");
    // A missing bucket is NotFound, not a malformed statement.
    assert!(matches!(&e, arrow_flight::error::FlightError::Tonic(s) if s.code() == tonic::Code::NotFound), "{e:?}");
    // Every call above was recorded as Flight SQL, per gRPC method.
    let metrics = server.ctx.metrics.render(&Default::default());
    for method in ["DoPut", "GetFlightInfo", "DoGet", "DoAction"] {
        assert!(server.ctx.metrics.calls("flight_sql", method) > 0, "{method}:\n{metrics}");
    }
    assert_eq!(server.ctx.metrics.calls("flight", "DoGet"), 0, "{metrics}");
    server.shutdown().await.unwrap();
}
