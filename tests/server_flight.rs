//! Boots the real server and drives it with arrow-flight's Rust client.

mod common;

use std::sync::Arc;

use arrow::array::{AsArray, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, TimestampSecondType};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::{FlightClient, FlightDescriptor, Ticket};
use common::TestServer;
use futures::TryStreamExt;

async fn client(s: &TestServer) -> FlightClient {
    let ch = tonic::transport::Channel::from_shared(s.flight_url()).unwrap().connect().await.unwrap();
    FlightClient::new(ch)
}

fn batch(epochs: Vec<i64>, close: Vec<f64>) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Close", DataType::Float64, false)]));
    RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(epochs)), Arc::new(Float64Array::from(close))]).unwrap()
}

async fn put(c: &mut FlightClient, key: &str, b: RecordBatch) -> Result<Vec<String>, arrow_flight::error::FlightError> {
    let data = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![key.to_string()])))
        .build(futures::stream::iter(vec![Ok(b)]));
    let acks: Vec<_> = c.do_put(data).await?.try_collect().await?;
    Ok(acks.into_iter().map(|a| String::from_utf8_lossy(&a.app_metadata).to_string()).collect())
}

async fn get(c: &mut FlightClient, ticket: &str) -> Vec<RecordBatch> {
    c.do_get(Ticket::new(ticket.to_string())).await.unwrap().try_collect().await.unwrap()
}

fn closes(batches: &[RecordBatch]) -> Vec<f64> {
    batches.iter().flat_map(|b| b.column_by_name("Close").unwrap().as_primitive::<arrow::datatypes::Float64Type>().values().to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_upsert_and_survive_kill_9() {
    let mut s = TestServer::start("");
    let mut c = client(&s).await;
    let acks = put(&mut c, "ES/1H/OHLCV", batch(vec![0, 3600, 7200], vec![1.0, 2.0, 3.0])).await.unwrap();
    assert_eq!(acks, vec![r#"{"rows":3}"#.to_string()]);
    put(&mut c, "ES/1H/OHLCV", batch(vec![3700], vec![20.0])).await.unwrap(); // replaces the 3600 bar
    let got = get(&mut c, r#"{"destination":"ES/1H/OHLCV","epoch_start":3600}"#).await;
    assert_eq!(closes(&got), vec![20.0, 3.0]);
    let ep = got[0].column(0).as_primitive::<TimestampSecondType>();
    assert_eq!(ep.values().to_vec(), vec![3600, 7200]);
    assert_eq!(ep.timezone(), Some("UTC"));

    // Bad input: clear error, nothing changed.
    let err = put(&mut c, "ES/1H/OHLCV", batch(vec![10800], vec![f64::NAN]).project(&[0]).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("missing column \\\"Close\\\"") || err.to_string().contains("missing column"), "{err}");
    assert!(put(&mut c, "../x/OHLCV", batch(vec![0], vec![0.0])).await.is_err());

    s.kill_and_restart();
    let mut c = client(&s).await;
    let got = get(&mut c, "ES/1H/OHLCV").await;
    assert_eq!(closes(&got), vec![1.0, 20.0, 3.0]);
    let infos: Vec<_> = c.list_flights(bytes::Bytes::new()).await.unwrap().try_collect().await.unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].total_records, 3);
    assert_eq!(s.stop(), Some(0));
}
