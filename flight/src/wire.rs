//! Stored-data DoGet without copying column buffers in user space.
//!
//! Through tonic, every byte of a DoGet reply was copied twice before the kernel's socket copy: arrow-ipc's
//! `IpcDataGenerator::encode` copies each (memory-mapped) column buffer into the message body, and prost
//! copies that body again into tonic's encode buffer. A profile of full reads put 40% of the server's CPU in
//! those two `memmove`s (benches/README.md). Any tonic `Codec` writes into one `BytesMut`, so no codec avoids
//! the second copy; pyarrow's C++ server avoids both by handing gRPC the buffers themselves.
//!
//! This module does the same for DoGet of stored data:
//! - the IPC messages come from arrow-ipc's [`StreamEncoder`], which hands out the batch's own buffers
//!   (plus its small header, prefix and padding buffers) instead of a copied body; this module only cuts
//!   its output into messages ([`cut_messages`]);
//! - each message is framed by hand as one gRPC message of a protobuf `FlightData` (`data_header`, field 2;
//!   `data_body`, field 1000) — by hand because prost needs the body as one contiguous `Bytes`, which is the
//!   copy this avoids ([`frame`]);
//! - the response body ([`WireBody`]) yields a message as a chain of `Bytes`: small pieces coalesced into one,
//!   column buffers as `Bytes` that own the Arrow buffer (and so the mapping), which h2 writes to the socket
//!   with vectored writes, uncopied.
//!
//! The wire format is standard Arrow Flight: the same messages as arrow-flight's `FlightDataEncoder` with
//! default options (schema first, batches split to `max_flight_data`, 64-byte alignment), except that
//! `data_header` keeps the IPC stream's alignment padding after the flatbuffer (readers ignore it).
//!
//! What is not served here goes to arrow-flight's generated server unchanged: every other method, and a
//! DoGet whose request is compressed. DoGet replies that are not stored data (Flight SQL results,
//! subscriptions), and stored data whose schema has dictionaries (which arrow-flight's encoder hydrates to
//! their value type), are prost-encoded here as before: one copy more than stored data, as through tonic.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::writer::{IpcWriteOptions, StreamEncoder};
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::{FlightData, SchemaAsIpc, Ticket};
use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use http_body::Frame;
use prost::Message;
use tonic::codec::{Codec, Streaming};
use tonic::{Request, Status};
use tower_service::Service;

use crate::{oversize_status, BatchStream, Bs, DoGetReply, FlightBackend, MktsFlightService};

const DO_GET: &str = "/arrow.flight.protocol.FlightService/DoGet";

/// `FlightData` protobuf field numbers (arrow's Flight.proto).
const DATA_HEADER_FIELD: u32 = 2;
const DATA_BODY_FIELD: u32 = 1000;

/// Pieces of a message shorter than this are copied into one chunk rather than sent as their own: a
/// chunk costs h2 a queue entry and an iovec, a copy of a few KiB costs less.
const COPY_BELOW: usize = 16 << 10;

/// One gRPC message, framed, as the chunks to send in order.
type Chunks = Vec<Bytes>;
type FrameStream = BoxStream<'static, Result<Chunks, Status>>;

/// The Flight service as tonic serves it: arrow-flight's generated server, with DoGet answered here (see
/// the module docs). Built by [`MktsFlightService::into_server`].
pub struct FlightServer<B: FlightBackend, S: FlightSqlService> {
    inner: FlightServiceServer<MktsFlightService<B, S>>,
    svc: Arc<MktsFlightService<B, S>>,
    recv_bytes: usize,
    send_bytes: usize,
}

impl<B: FlightBackend, S: FlightSqlService> Clone for FlightServer<B, S> {
    fn clone(&self) -> Self {
        FlightServer { inner: self.inner.clone(), svc: self.svc.clone(), recv_bytes: self.recv_bytes, send_bytes: self.send_bytes }
    }
}

impl<B: FlightBackend, S: FlightSqlService> FlightServer<B, S> {
    pub(crate) fn new(inner: FlightServiceServer<MktsFlightService<B, S>>, svc: MktsFlightService<B, S>, recv_bytes: usize, send_bytes: usize) -> Self {
        FlightServer { inner, svc: Arc::new(svc), recv_bytes, send_bytes }
    }
}

impl<B: FlightBackend, S: FlightSqlService> tonic::server::NamedService for FlightServer<B, S> {
    const NAME: &'static str = <FlightServiceServer<MktsFlightService<B, S>> as tonic::server::NamedService>::NAME;
}

impl<B, S, ReqBody> Service<http::Request<ReqBody>> for FlightServer<B, S>
where
    B: FlightBackend,
    S: FlightSqlService<FlightService = S>,
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // The generated server accepts no compression either; it answers a compressed request with the
        // standard error, so leave those to it.
        let compressed = req.headers().get("grpc-encoding").is_some_and(|v| v.as_bytes() != b"identity");
        if req.uri().path() != DO_GET || compressed {
            return Box::pin(self.inner.call(req));
        }
        let svc = self.svc.clone();
        let (recv, send) = (self.recv_bytes, self.send_bytes);
        Box::pin(async move { Ok(do_get(svc, req, recv, send).await) })
    }
}

/// Serve one DoGet call: decode the ticket as tonic would (`Streaming::new_request`, the size limit),
/// answer it, and stream the reply as [`WireBody`].
async fn do_get<B, S, ReqBody>(svc: Arc<MktsFlightService<B, S>>, req: http::Request<ReqBody>, recv_bytes: usize, send_bytes: usize) -> http::Response<tonic::body::Body>
where
    B: FlightBackend,
    S: FlightSqlService<FlightService = S>,
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let (parts, body) = req.into_parts();
    let decoder = tonic_prost::ProstCodec::<FlightData, Ticket>::default().decoder();
    let mut messages = Streaming::new_request(decoder, body, None, Some(recv_bytes));
    let ticket = match messages.message().await {
        Ok(Some(t)) => t,
        Ok(None) => return Status::internal("Missing request message.").into_http(),
        Err(s) => return s.into_http(),
    };
    let request = Request::from_http(http::Request::from_parts(parts, ticket));
    let (metadata, frames) = match svc.do_get_reply(request).await {
        Err(s) => return s.into_http(),
        Ok(DoGetReply::Stored(schema, batches)) => match stored_frames(schema.clone(), svc.max_flight_data, send_bytes) {
            Some(encode) => (tonic::metadata::MetadataMap::new(), encode(batches)),
            None => (tonic::metadata::MetadataMap::new(), prost_frames(svc.encode(schema, batches), send_bytes)),
        },
        Ok(DoGetReply::Messages(r)) => {
            let (metadata, stream, _) = r.into_parts();
            (metadata, prost_frames(stream, send_bytes))
        }
    };
    let mut response = http::Response::new(tonic::body::Body::new(WireBody { frames, pending: VecDeque::new(), done: false }));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(http::header::CONTENT_TYPE, tonic::metadata::GRPC_CONTENT_TYPE);
    response
}

/// Messages already made, prost-encoded and framed (one copy, as tonic's encoder makes).
fn prost_frames(messages: Bs<FlightData>, send_bytes: usize) -> FrameStream {
    messages.map(move |m| m.and_then(|m| prost_frame(&m, send_bytes))).boxed()
}

fn prost_frame(m: &FlightData, send_bytes: usize) -> Result<Chunks, Status> {
    let len = m.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    put_grpc_prefix(&mut buf, len, send_bytes)?;
    m.encode(&mut buf).map_err(|e| Status::internal(format!("encoding FlightData: {e}")))?;
    Ok(vec![buf.freeze()])
}

/// The gRPC message prefix (uncompressed, length), with tonic's check of the send limit — under the
/// status the rest of the server reports for an oversize message.
fn put_grpc_prefix(buf: &mut BytesMut, len: usize, send_bytes: usize) -> Result<(), Status> {
    if len > send_bytes || len > u32::MAX as usize {
        return Err(oversize_status(Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {send_bytes} bytes"
        ))));
    }
    buf.put_u8(0);
    buf.put_u32(len as u32);
    Ok(())
}

/// The zero-copy encoder of a stored-data reply with this schema, or `None` when the schema has
/// dictionaries (arrow-flight's encoder hydrates them; that path is kept for them) or is not IPC-encodable.
/// The returned function turns the batches into framed messages: the schema first, then each batch split to
/// about `max_flight_data` bytes.
fn stored_frames(schema: SchemaRef, max_flight_data: usize, send_bytes: usize) -> Option<impl FnOnce(BatchStream) -> FrameStream> {
    if schema.fields().iter().any(|f| has_dictionary(f.data_type())) {
        return None;
    }
    let options = IpcWriteOptions::default();
    let mut encoder = StreamEncoder::try_new_with_options(&schema, options.clone()).ok()?;
    let schema_message: FlightData = SchemaAsIpc::new(&schema, &options).into();
    Some(move |batches: BatchStream| {
        let first = futures::stream::once(futures::future::ready(prost_frame(&schema_message, send_bytes)));
        let rest = batches.flat_map(move |b| {
            let out = match b {
                Err(e) => vec![Err(Status::from(e))],
                Ok(b) => encode_batch(&mut encoder, &schema, b, max_flight_data, send_bytes),
            };
            futures::stream::iter(out)
        });
        first.chain(rest).boxed()
    })
}

fn has_dictionary(t: &DataType) -> bool {
    match t {
        DataType::Dictionary(..) => true,
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) | DataType::ListView(f) | DataType::LargeListView(f) | DataType::Map(f, _) => {
            has_dictionary(f.data_type())
        }
        DataType::Struct(fs) => fs.iter().any(|f| has_dictionary(f.data_type())),
        DataType::Union(fs, _) => fs.iter().any(|(_, f)| has_dictionary(f.data_type())),
        DataType::RunEndEncoded(r, v) => has_dictionary(r.data_type()) || has_dictionary(v.data_type()),
        _ => false,
    }
}

/// One batch as framed messages; an error ends the reply (nothing after it is sent).
fn encode_batch(encoder: &mut StreamEncoder, schema: &SchemaRef, batch: RecordBatch, max_flight_data: usize, send_bytes: usize) -> Vec<Result<Chunks, Status>> {
    let batch = match conform(schema, batch) {
        Ok(b) => b,
        Err(e) => return vec![Err(Status::internal(e.to_string()))],
    };
    let mut out = Vec::new();
    for piece in split_batch_for_grpc_response(batch, max_flight_data) {
        let framed = encoder
            .encode(&piece)
            .and_then(cut_messages)
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|ms| ms.into_iter().map(|m| frame(&m, send_bytes)).collect::<Result<Vec<_>, _>>());
        match framed {
            Ok(ms) => out.extend(ms.into_iter().map(Ok)),
            Err(e) => {
                out.push(Err(e));
                break;
            }
        }
    }
    out
}

/// The batch with the reply's schema, as arrow-flight's encoder makes it (its `hydrate_dictionaries`:
/// columns cast to the schema's types — a no-op for stored data, whose batches have that schema).
fn conform(schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch, ArrowError> {
    if batch.schema_ref() == schema {
        return Ok(batch);
    }
    let columns = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, c)| if c.data_type() == f.data_type() { Ok(c.clone()) } else { arrow::compute::cast(c, f.data_type()) })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(schema.clone(), columns, &options)
}

/// arrow-flight's `split_batch_for_grpc_response` (private there), so messages are cut where
/// `FlightDataEncoder` cuts them: rows split evenly so that each piece holds about `max` buffer bytes.
/// Slices share the batch's buffers.
fn split_batch_for_grpc_response(batch: RecordBatch, max: usize) -> Vec<RecordBatch> {
    let size: usize = batch.columns().iter().map(|c| c.get_buffer_memory_size()).sum();
    let n = size.div_ceil(max.max(1)).max(1);
    let rows = batch.num_rows();
    let per = (rows / n).max(1);
    let mut out = Vec::with_capacity(n);
    let mut offset = 0;
    while offset < rows {
        let len = per.min(rows - offset);
        out.push(batch.slice(offset, len));
        offset += len;
    }
    out
}

/// One IPC record-batch message: its flatbuffer header (with the stream's padding) and its body as the
/// buffers that make it up.
struct IpcMessage {
    header: Vec<u8>,
    body: Vec<Buffer>,
    body_len: usize,
}

/// Cut a [`StreamEncoder`] output (IPC stream framing: continuation marker and length, header, body of
/// the header's `bodyLength`) into its record-batch messages; the schema message of the first call is
/// dropped (the reply sends its own first, as arrow-flight's encoder does).
fn cut_messages(buffers: Vec<Buffer>) -> Result<Vec<IpcMessage>, ArrowError> {
    let mut rest: VecDeque<Buffer> = buffers.into();
    let mut out = Vec::new();
    while rest.iter().any(|b| !b.is_empty()) {
        let prefix = concat(take(&mut rest, 8)?);
        if prefix[..4] != [0xff; 4] {
            return Err(ArrowError::IpcError("IPC encoder output without a continuation marker".into()));
        }
        let len = i32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        let len = usize::try_from(len).map_err(|_| ArrowError::IpcError(format!("IPC message length {len}")))?;
        if len == 0 {
            break; // end-of-stream marker
        }
        let header = concat(take(&mut rest, len)?);
        let message = arrow::ipc::root_as_message(&header).map_err(|e| ArrowError::IpcError(format!("IPC encoder output: {e}")))?;
        let body_len = usize::try_from(message.bodyLength()).map_err(|_| ArrowError::IpcError("negative IPC body length".into()))?;
        let kind = message.header_type();
        let body = take(&mut rest, body_len)?;
        match kind {
            arrow::ipc::MessageHeader::Schema => {}
            arrow::ipc::MessageHeader::RecordBatch => out.push(IpcMessage { header, body, body_len }),
            other => return Err(ArrowError::IpcError(format!("unexpected IPC message {other:?} for a schema without dictionaries"))),
        }
    }
    Ok(out)
}

/// The next `n` bytes of `rest`, as whole buffers or slices of them (no copy).
fn take(rest: &mut VecDeque<Buffer>, mut n: usize) -> Result<Vec<Buffer>, ArrowError> {
    let mut out = Vec::new();
    while n > 0 {
        let b = rest.pop_front().ok_or_else(|| ArrowError::IpcError("IPC encoder output shorter than its headers say".into()))?;
        if b.len() <= n {
            n -= b.len();
            out.push(b);
        } else {
            out.push(b.slice_with_length(0, n));
            rest.push_front(b.slice(n));
            n = 0;
        }
    }
    Ok(out)
}

fn concat(buffers: Vec<Buffer>) -> Vec<u8> {
    buffers.iter().flat_map(|b| b.as_slice().iter().copied()).collect()
}

/// A record-batch message as a gRPC message of a protobuf `FlightData { data_header, data_body }`, the
/// body's buffers uncopied (fields in prost's order; empty ones left out as proto3 does). The varint and
/// key helpers are prost's, the ones its generated code calls.
fn frame(m: &IpcMessage, send_bytes: usize) -> Result<Chunks, Status> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let field_len = |tag: u32, len: usize| if len == 0 { 0 } else { key_len(tag) + encoded_len_varint(len as u64) + len };
    let len = field_len(DATA_HEADER_FIELD, m.header.len()) + field_len(DATA_BODY_FIELD, m.body_len);
    let mut head = BytesMut::with_capacity(32 + m.header.len());
    put_grpc_prefix(&mut head, len, send_bytes)?;
    if !m.header.is_empty() {
        encode_key(DATA_HEADER_FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(m.header.len() as u64, &mut head);
        head.put_slice(&m.header);
    }
    if m.body_len > 0 {
        encode_key(DATA_BODY_FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(m.body_len as u64, &mut head);
    }
    let mut chunks = Vec::new();
    for b in &m.body {
        if b.len() < COPY_BELOW {
            head.put_slice(b.as_slice());
        } else {
            if !head.is_empty() {
                chunks.push(head.split().freeze());
            }
            chunks.push(Bytes::from_owner(Owned(b.clone())));
        }
    }
    if !head.is_empty() {
        chunks.push(head.freeze());
    }
    Ok(chunks)
}

/// An Arrow buffer as the owner of a `Bytes` (which needs `AsRef<[u8]>`): the bytes stay those of the
/// buffer — a mapped file's pages for stored data — and the buffer lives until h2 has written them.
struct Owned(Buffer);

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// The response body: each message's chunks as data frames, then the gRPC status as trailers (OK at the
/// end, or the error that ended the reply).
struct WireBody {
    frames: FrameStream,
    pending: VecDeque<Bytes>,
    done: bool,
}

impl http_body::Body for WireBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            let status = match ready!(self.frames.poll_next_unpin(cx)) {
                Some(Ok(chunks)) => {
                    self.pending.extend(chunks);
                    continue;
                }
                Some(Err(s)) => s,
                None => Status::ok(""),
            };
            self.done = true;
            let mut trailers = http::HeaderMap::new();
            if status.add_header(&mut trailers).is_err() {
                Status::internal("the reply's error could not be encoded").add_header(&mut trailers).ok();
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BooleanArray, Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use arrow_flight::decode::FlightRecordBatchStream;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("Epoch", DataType::Int64, false),
            Field::new("Close", DataType::Float64, true),
            Field::new("Sym", DataType::Utf8, true),
            Field::new("Flag", DataType::Boolean, true),
        ]));
        let n = 50_000;
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..n)),
                Arc::new(Float64Array::from_iter((0..n).map(|i| (i % 7 != 0).then_some(i as f64 * 0.5)))),
                Arc::new(StringArray::from_iter((0..n).map(|i| (i % 5 != 0).then(|| format!("s{i}"))))),
                Arc::new(BooleanArray::from_iter((0..n).map(|i| (i % 3 != 0).then_some(i % 2 == 0)))),
            ],
        )
        .unwrap()
    }

    /// Parse framed chunks back into FlightData as a client would (gRPC prefix, then prost).
    fn unframe(chunks: Vec<Chunks>) -> Vec<FlightData> {
        chunks
            .into_iter()
            .map(|c| {
                let all: Vec<u8> = c.iter().flat_map(|b| b.iter().copied()).collect();
                assert_eq!(all[0], 0);
                let len = u32::from_be_bytes([all[1], all[2], all[3], all[4]]) as usize;
                assert_eq!(len, all.len() - 5);
                FlightData::decode(&all[5..]).unwrap()
            })
            .collect()
    }

    async fn round_trip(batches: Vec<RecordBatch>, max: usize) -> Vec<RecordBatch> {
        let schema = batches[0].schema();
        let encode = stored_frames(schema, max, usize::MAX).unwrap();
        let frames: Vec<Chunks> = encode(futures::stream::iter(batches.into_iter().map(Ok)).boxed()).map(|r| r.unwrap()).collect().await;
        let data = unframe(frames);
        let s = FlightRecordBatchStream::new_from_flight_data(futures::stream::iter(data.into_iter().map(Ok)));
        futures::TryStreamExt::try_collect(s).await.unwrap()
    }

    #[tokio::test]
    async fn framed_messages_decode_to_the_batch() {
        let b = batch();
        let got = round_trip(vec![b.clone()], 64 << 20).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0], b);
    }

    #[tokio::test]
    async fn large_and_sliced_batches_split_and_stay_exact() {
        let b = batch();
        // A slice at an odd offset (bitmaps not byte-aligned, string offsets not starting at 0), split into
        // several messages.
        let sliced = b.slice(13, 40_001);
        let got = round_trip(vec![sliced.clone(), b.slice(0, 0), b.clone()], 100_000).await;
        assert!(got.len() > 4, "{} messages", got.len());
        let got = arrow::compute::concat_batches(&b.schema(), &got).unwrap();
        let want = arrow::compute::concat_batches(&b.schema(), &[sliced, b]).unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn body_buffers_are_the_batch_buffers() {
        let b = batch();
        let encode = stored_frames(b.schema(), 64 << 20, usize::MAX).unwrap();
        let frames: Vec<Chunks> = encode(futures::stream::iter(vec![Ok(b.clone())]).boxed()).map(|r| r.unwrap()).collect().await;
        let epoch = b.column(0).to_data().buffers()[0].as_ptr();
        assert!(frames.iter().flatten().any(|c| c.as_ptr() == epoch), "the Epoch values were copied");
    }

    #[test]
    fn dictionaries_keep_arrow_flights_encoder() {
        let t = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        let schema = Arc::new(Schema::new(vec![Field::new("d", t, true)]));
        assert!(stored_frames(schema, 1 << 20, usize::MAX).is_none());
    }

    #[test]
    fn an_oversize_message_is_resource_exhausted() {
        let b = batch();
        let ms = cut_messages(StreamEncoder::try_new(&b.schema()).unwrap().encode(&b).unwrap()).unwrap();
        let e = frame(&ms[0], 1000).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }
}
