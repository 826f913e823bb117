//! Engine changes to and from the replication stream's messages ([`super::pb`]). Rows travel as Arrow IPC
//! streams (schema + batches), so a replica gets exactly the columns the master stored.

use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use arrow::ipc::writer::StreamWriter;

use super::pb;
use crate::engine::{BucketKey, BucketSchema, Change, ChangeRecord, TimePoint};

/// Rows per image message at most (a few MiB of market data), so a large bucket never needs one huge
/// message.
pub const IMAGE_CHUNK_ROWS: usize = 65_536;

/// A replication message that could not be decoded (the stream is dropped and reconnected).
#[derive(Debug, thiserror::Error)]
#[error("bad replication message: {0}")]
pub struct WireError(pub String);

fn bad(e: impl std::fmt::Display) -> WireError {
    WireError(e.to_string())
}

/// Encode batches of one schema as one Arrow IPC stream.
pub fn to_ipc(batches: &[RecordBatch]) -> Result<Vec<u8>, WireError> {
    let Some(first) = batches.first() else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, &first.schema()).map_err(bad)?;
    for b in batches {
        w.write(b).map_err(bad)?;
    }
    w.finish().map_err(bad)?;
    drop(w);
    Ok(out)
}

/// Decode an Arrow IPC stream ([`to_ipc`]); empty bytes are no batches.
pub fn from_ipc(bytes: &bytes::Bytes) -> Result<Vec<RecordBatch>, WireError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    mkts_flight::ipc::decode_stream(bytes.clone()).map(|(_, batches)| batches).map_err(bad)
}

pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos().min(i64::MAX as u128) as i64).unwrap_or(0)
}

/// One applied change as a message.
pub fn encode_change(rec: &ChangeRecord) -> Result<pb::Change, WireError> {
    use pb::change::Op;
    let op = match &rec.change {
        Change::Create { schema, .. } => Op::CreateSchemaJson(serde_json::to_string(schema).map_err(bad)?),
        Change::Write { batch, .. } => Op::WriteArrowIpc(to_ipc(std::slice::from_ref(batch))?.into()),
        Change::Destroy { .. } => Op::Destroy(true),
        Change::Alter { schema, .. } => Op::AlterSchemaJson(serde_json::to_string(schema).map_err(bad)?),
        Change::DeleteRange { start, end, .. } => Op::DeleteRange(pb::Range {
            start_secs: start.secs,
            start_nanos: start.nanos,
            end_secs: end.secs,
            end_nanos: end.nanos,
        }),
    };
    Ok(pb::Change { lsn: rec.lsn, key: rec.change.key().to_string(), applied_at_ns: unix_nanos(rec.applied_at), op: Some(op) })
}

/// A change message back into a change (its LSN is `m.lsn`). A write may arrive as several batches.
pub fn decode_change(m: &pb::Change) -> Result<Vec<Change>, WireError> {
    use pb::change::Op;
    let key = BucketKey::parse(&m.key).map_err(bad)?;
    Ok(match m.op.as_ref().ok_or_else(|| bad("a change without an operation"))? {
        Op::CreateSchemaJson(s) => vec![Change::Create { key, schema: parse_schema(s)? }],
        Op::WriteArrowIpc(b) => from_ipc(b)?.into_iter().map(|batch| Change::Write { key: key.clone(), batch }).collect(),
        Op::Destroy(_) => vec![Change::Destroy { key }],
        Op::AlterSchemaJson(s) => vec![Change::Alter { key, schema: parse_schema(s)? }],
        Op::DeleteRange(r) => vec![Change::DeleteRange {
            key,
            start: TimePoint { secs: r.start_secs, nanos: r.start_nanos },
            end: TimePoint { secs: r.end_secs, nanos: r.end_nanos },
        }],
    })
}

pub fn parse_schema(s: &str) -> Result<BucketSchema, WireError> {
    let schema: BucketSchema = serde_json::from_str(s).map_err(bad)?;
    schema.validate().map_err(bad)?;
    Ok(schema)
}

/// Split a bucket's rows into IPC chunks of at most [`IMAGE_CHUNK_ROWS`] rows (none for an empty bucket).
pub fn image_chunks(batches: &[RecordBatch]) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for b in batches {
        let mut off = 0;
        while off < b.num_rows() {
            let n = IMAGE_CHUNK_ROWS.min(b.num_rows() - off);
            out.push(b.slice(off, n));
            off += n;
        }
    }
    out
}
