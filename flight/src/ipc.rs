//! Decoding Arrow IPC that a client sent, without letting malformed bytes take the server down.
//!
//! arrow-ipc validates what it decodes, but some malformed messages still reach a `panic!` or an
//! out-of-bounds slice inside it (an unknown type id in a schema, a buffer that runs past the body), and
//! `StreamReader` allocates a message body from its length prefix before reading it (a few bytes claiming
//! 2^60 abort the process on allocation failure). Both were found by the `engine_write` fuzzer. So every
//! decode of client bytes goes through here:
//!
//! - [`decode_stream`] decodes an in-memory IPC stream with arrow's `StreamDecoder`, which grows its
//!   buffers only as bytes actually arrive, and turns a decoder panic into an error.
//! - [`guard`] wraps a stream of decoded batches (Flight `DoPut`'s `FlightRecordBatchStream`) so a decoder
//!   panic becomes one `FlightError` and ends the stream.
//!
//! While a guarded decode runs, [`in_guarded_decode`] is true on that thread: a process-wide panic hook
//! (the fuzz harness's) can tell a panic that is about to be caught here from a real one.
//!
//! ```
//! use mkts_flight::ipc::decode_stream;
//! // Not an IPC stream: a clear error, not a panic or an abort.
//! assert!(decode_stream(bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f])).is_err());
//! ```

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use arrow::array::RecordBatch;
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamDecoder;
use arrow_flight::error::FlightError;
use futures::Stream;

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// True while this thread is inside a guarded decode (a panic now is caught and reported as an error).
pub fn in_guarded_decode() -> bool {
    GUARDED.with(|g| g.get())
}

/// Run `f` with panics caught; `None` when it panicked.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            GUARDED.with(|g| g.set(self.0));
        }
    }
    let _reset = Reset(GUARDED.with(|g| g.replace(true)));
    catch_unwind(AssertUnwindSafe(f)).ok()
}

fn malformed() -> ArrowError {
    ArrowError::IpcError("malformed Arrow IPC stream: the decoder rejected it".into())
}

/// Decode a whole in-memory Arrow IPC stream: its schema (None for empty input) and batches. The batches'
/// buffers are slices of `bytes` where their alignment allows (no copy of the column data).
pub fn decode_stream(bytes: bytes::Bytes) -> Result<(Option<SchemaRef>, Vec<RecordBatch>), ArrowError> {
    if bytes.is_empty() {
        return Ok((None, Vec::new()));
    }
    guarded(|| {
        let mut decoder = StreamDecoder::new();
        let mut buf = Buffer::from(bytes);
        let mut batches = Vec::new();
        while !buf.is_empty() {
            match decoder.decode(&mut buf)? {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        decoder.finish()?;
        Ok((decoder.schema(), batches))
    })
    .unwrap_or_else(|| Err(malformed()))
}

/// A batch stream whose decoder panics become one error that ends it.
pub struct Guarded<S> {
    inner: Option<S>,
}

/// Guard a stream of decoded batches (see the module docs).
pub fn guard<S>(inner: S) -> Guarded<S> {
    Guarded { inner: Some(inner) }
}

impl<S: Stream<Item = Result<RecordBatch, FlightError>> + Unpin> Stream for Guarded<S> {
    type Item = Result<RecordBatch, FlightError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        match guarded(|| Pin::new(inner).poll_next(cx)) {
            Some(p) => p,
            None => {
                // The decoder's state after a panic is unknown: drop it and end the stream.
                self.inner = None;
                Poll::Ready(Some(Err(FlightError::Arrow(malformed()))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn ipc(batch: &RecordBatch) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
        w.write(batch).unwrap();
        w.finish().unwrap();
        drop(w);
        out
    }

    #[test]
    fn round_trips_a_stream() {
        let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).unwrap();
        let (s, got) = decode_stream(ipc(&b).into()).unwrap();
        assert_eq!(s.unwrap(), schema);
        assert_eq!(got, vec![b]);
        assert!(!in_guarded_decode());
    }

    #[test]
    fn a_huge_length_prefix_is_an_error_not_an_allocation() {
        // Continuation marker, then a message length near 2^31 with 8 bytes behind it.
        let mut bytes = vec![0xff, 0xff, 0xff, 0xff, 0xf0, 0xff, 0xff, 0x7f];
        bytes.extend_from_slice(&[0u8; 8]);
        assert!(decode_stream(bytes.into()).is_err());
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false)]));
        let b = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).unwrap();
        let bytes = ipc(&b);
        for cut in [5, bytes.len() / 2, bytes.len() - 9] {
            assert!(decode_stream(bytes::Bytes::copy_from_slice(&bytes[..cut])).is_err(), "cut at {cut}");
        }
    }
}
