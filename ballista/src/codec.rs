//! Extension codecs: how mkts's plan pieces travel between a Ballista client, the scheduler and executors.
//!
//! - Physical: the hot scan (a file scan over a [`FlightSource`]) as JSON (server URL, table, parts, the
//!   parts of each partition) plus its schema as Arrow IPC;
//!   everything else goes to Ballista's own codec (its shuffle nodes, then DataFusion's default, which
//!   covers the Parquet scans of cold years).
//! - Logical: an [`MktsTable`] as its server URL and name; decoding resolves the name again against the
//!   server's listing (in the decoding process's view of the cold store).
//!
//! Each encoding starts with one tag byte (`0` = Ballista's, `1` = mkts's), so decoding never guesses.
//! Every process of a cluster installs the same codecs ([`crate::cluster`]).

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::{IpcMessage, SchemaAsIpc};
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::catalog::TableProvider;
use datafusion::common::{DataFusionError, Result as DfResult, TableReference};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use serde::{Deserialize, Serialize};

use crate::exec::{FlightSource, HotPart};
use crate::remote::Remote;
use crate::table::{ColdLayout, MktsTable};

const TAG_BALLISTA: u8 = 0;
const TAG_MKTS: u8 = 1;

fn bad(what: &str) -> DataFusionError {
    DataFusionError::Internal(format!("mkts codec: {what}"))
}

#[derive(Serialize, Deserialize)]
struct ScanNode {
    url: String,
    table: String,
    parts: Vec<HotPart>,
    /// Part indexes of each output partition (Ballista slices them per task).
    groups: Vec<Vec<usize>>,
}

fn schema_bytes(schema: &Schema) -> DfResult<Vec<u8>> {
    let msg = IpcMessage::try_from(SchemaAsIpc::new(schema, &IpcWriteOptions::default())).map_err(|e| bad(&format!("schema: {e}")))?;
    Ok(msg.0.to_vec())
}

fn schema_of(bytes: &[u8]) -> DfResult<SchemaRef> {
    let msg = IpcMessage(bytes.to_vec().into());
    Ok(Arc::new(Schema::try_from(msg).map_err(|e| bad(&format!("schema: {e}")))?))
}

/// `[tag][u32 LE json length][json][rest]`.
fn frame(json: &[u8], rest: &[u8], buf: &mut Vec<u8>) -> DfResult<()> {
    let n = u32::try_from(json.len()).map_err(|_| bad("node too large"))?;
    buf.push(TAG_MKTS);
    buf.extend_from_slice(&n.to_le_bytes());
    buf.extend_from_slice(json);
    buf.extend_from_slice(rest);
    Ok(())
}

fn unframe(buf: &[u8]) -> DfResult<(&[u8], &[u8])> {
    let head = buf.get(1..5).ok_or_else(|| bad("truncated node"))?;
    let n = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let end = 5usize.checked_add(n).ok_or_else(|| bad("bad length"))?;
    let json = buf.get(5..end).ok_or_else(|| bad("truncated node"))?;
    Ok((json, &buf[end..]))
}

/// The physical codec of every cluster process.
#[derive(Debug, Default)]
pub struct MktsPhysicalCodec {
    inner: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for MktsPhysicalCodec {
    fn try_decode(&self, buf: &[u8], inputs: &[Arc<dyn ExecutionPlan>], ctx: &TaskContext, conv: &dyn PhysicalProtoConverterExtension) -> DfResult<Arc<dyn ExecutionPlan>> {
        match buf.first() {
            Some(&TAG_BALLISTA) => self.inner.try_decode(&buf[1..], inputs, ctx, conv),
            Some(&TAG_MKTS) => {
                let (json, rest) = unframe(buf)?;
                let node: ScanNode = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
                if node.groups.iter().flatten().any(|&i| i >= node.parts.len()) {
                    return Err(bad("partition names a part that is not there"));
                }
                Ok(FlightSource::new(Remote::new(node.url), node.table, node.parts, schema_of(rest)?).scan(node.groups)?)
            }
            _ => Err(bad("unknown node tag")),
        }
    }

    fn try_encode(&self, node: Arc<dyn ExecutionPlan>, buf: &mut Vec<u8>, conv: &dyn PhysicalProtoConverterExtension) -> DfResult<()> {
        if let Some((src, groups)) = FlightSource::of(node.as_ref()) {
            let scan = ScanNode { url: src.remote.url.clone(), table: src.table.clone(), parts: src.parts.as_ref().clone(), groups };
            let json = serde_json::to_vec(&scan).map_err(|e| bad(&e.to_string()))?;
            return frame(&json, &schema_bytes(src.schema())?, buf);
        }
        buf.push(TAG_BALLISTA);
        self.inner.try_encode(node, buf, conv)
    }
}

#[derive(Serialize, Deserialize)]
struct TableNode {
    url: String,
    name: String,
}

/// The logical codec of every cluster process.
#[derive(Debug)]
pub struct MktsLogicalCodec {
    inner: BallistaLogicalExtensionCodec,
    cold: ColdLayout,
}

impl MktsLogicalCodec {
    pub fn new(cold: ColdLayout) -> Self {
        MktsLogicalCodec { inner: BallistaLogicalExtensionCodec::default(), cold }
    }
}

impl LogicalExtensionCodec for MktsLogicalCodec {
    fn try_decode(&self, buf: &[u8], inputs: &[LogicalPlan], ctx: &TaskContext) -> DfResult<Extension> {
        self.inner.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> DfResult<()> {
        self.inner.try_encode(node, buf)
    }

    fn try_decode_file_format(&self, buf: &[u8], ctx: &TaskContext) -> DfResult<Arc<dyn datafusion::datasource::file_format::FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(&self, buf: &mut Vec<u8>, node: Arc<dyn datafusion::datasource::file_format::FileFormatFactory>) -> DfResult<()> {
        self.inner.try_encode_file_format(buf, node)
    }

    fn try_decode_table_provider(&self, buf: &[u8], table_ref: &TableReference, schema: SchemaRef, ctx: &TaskContext) -> DfResult<Arc<dyn TableProvider>> {
        match buf.first() {
            Some(&TAG_BALLISTA) => self.inner.try_decode_table_provider(&buf[1..], table_ref, schema, ctx),
            Some(&TAG_MKTS) => {
                let (json, _) = unframe(buf)?;
                let node: TableNode = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
                let remote = Remote::new(node.url);
                let listing = remote.listing().map_err(|e| DataFusionError::External(Box::new(e)))?;
                let table = MktsTable::resolve(&remote, &self.cold, &node.name, &listing)
                    .ok_or_else(|| DataFusionError::Plan(format!("table '{}' not found", node.name)))?;
                Ok(Arc::new(table))
            }
            _ => Err(bad("unknown table tag")),
        }
    }

    fn try_encode_table_provider(&self, table_ref: &TableReference, node: Arc<dyn TableProvider>, buf: &mut Vec<u8>) -> DfResult<()> {
        if let Some(t) = node.downcast_ref::<MktsTable>() {
            let json = serde_json::to_vec(&TableNode { url: t.remote.url.clone(), name: t.name.clone() }).map_err(|e| bad(&e.to_string()))?;
            return frame(&json, &[], buf);
        }
        buf.push(TAG_BALLISTA);
        self.inner.try_encode_table_provider(table_ref, node, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field};
    use datafusion::physical_plan::empty::EmptyExec;
    use datafusion_proto::physical_plan::DefaultPhysicalProtoConverter;

    #[test]
    fn the_flight_scan_round_trips_and_other_nodes_go_to_ballista() {
        let schema = Arc::new(Schema::new(vec![Field::new("Close", DataType::Float64, true), Field::new("Symbol", DataType::Utf8, false)]));
        let part = |s: &str| HotPart { key: format!("{s}/1Min/OHLCV"), symbol: Some(s.into()), start: (1, 0), end: (2, 999_999_999) };
        let parts = vec![part("AAPL"), part("MSFT"), part("TSLA")];
        // As Ballista leaves it for one task: the partitions of parts 2 and 0.
        let node: Arc<dyn ExecutionPlan> = FlightSource::new(Remote::new("grpc://h:1"), "*/1Min/OHLCV".into(), parts.clone(), schema.clone()).scan(vec![vec![2], vec![0]]).unwrap();
        let codec = MktsPhysicalCodec::default();
        let conv = DefaultPhysicalProtoConverter {};
        let mut buf = Vec::new();
        codec.try_encode(node, &mut buf, &conv).unwrap();
        assert_eq!(buf[0], TAG_MKTS);
        let ctx = TaskContext::default();
        let back = codec.try_decode(&buf, &[], &ctx, &conv).unwrap();
        let (src, groups) = FlightSource::of(back.as_ref()).unwrap();
        assert_eq!((src.remote.url.as_str(), src.table.as_str(), src.parts.as_ref(), src.schema()), ("grpc://h:1", "*/1Min/OHLCV", &parts, &schema));
        assert_eq!(groups, vec![vec![2], vec![0]]);
        assert_eq!(back.properties().output_partitioning().partition_count(), 2);
        assert_eq!(back.schema(), schema);

        // A node that is not ours is Ballista's to encode (which refuses plain DataFusion nodes).
        let mut buf = Vec::new();
        let other: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(schema));
        let _ = codec.try_encode(other, &mut buf, &conv);
        assert_eq!(buf.first(), Some(&TAG_BALLISTA));
        // Truncated or unknown input is an error, not a panic.
        assert!(codec.try_decode(&[TAG_MKTS, 9, 0], &[], &ctx, &conv).is_err());
        assert!(codec.try_decode(&[7], &[], &ctx, &conv).is_err());
        assert!(codec.try_decode(&[], &[], &ctx, &conv).is_err());
        let mut bad_group = vec![TAG_MKTS];
        let json = br#"{"url":"grpc://h:1","table":"t","parts":[],"groups":[[0]]}"#;
        bad_group.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bad_group.extend_from_slice(json);
        assert!(codec.try_decode(&bad_group, &[], &ctx, &conv).is_err());
    }
}
