//! Same-host reads: a Unix socket (`local_socket` in `mkts.yml`, default `$TMPDIR/mkts-<hash of root>.sock`) that
//! answers a read with the open files of its snapshot, passed as file descriptors, so a client on this
//! machine maps the column files itself and the bytes never cross a socket (docs/local-reads.md).
//!
//! Protocol, per request on a connection (integers little-endian; a connection may carry many requests):
//!
//! - request: `u32` length, then JSON `{"query": <Flight ticket object>, "authorization": "Bearer …"}` —
//!   the query is the Flight JSON ticket (`destination`, `epoch_start`, `epoch_end`, `limit_record_count`,
//!   `limit_from_start`, `columns`, …); `authorization` is needed only with `auth:` (a token from the
//!   Flight handshake, or `Basic …`).
//! - reply: `u32` length, then the JSON header (below); then, when it lists `fds > 0`, messages of a `u32`
//!   count each carrying that many descriptors (`SCM_RIGHTS`, at most [`FDS_PER_MESSAGE`]); then the Arrow
//!   IPC stream of each bucket (its schema and its inline batches), as long as the header says.
//! - header: `{"store_id", "buckets": [{"key", "rows", "ipc": <bytes>, "pieces": [{"inline": <batch index>} |
//!   {"offset", "rows", "columns": [{"values": [fd, bytes], "validity": [fd, bytes] | null, "data": [fd,
//!   bytes] | null}]}]}], "fds": n}` or `{"error": {"code", "message"}, "store_id"}`. `store_id` is the
//!   server's ([`crate::engine::Engine::store_id`], also in the `local_socket` action's reply), so a client
//!   can tell that the socket it reached is the server it asked (not another root's, or another host's at
//!   the same path). Each column of a mapped piece is
//!   Arrow's buffers for its field in the schema: the first `bytes` of descriptor `fd` (an index into the
//!   descriptors of this reply), rows `offset..offset + rows`.
//!
//! The request goes through the operations layer like every interface ([`Service::local_read`]), so roles
//! and policy apply. The open descriptors are the lease: they keep the snapshot's files alive however the
//! bucket changes afterwards; the client closes them once mapped.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::ipc::writer::StreamWriter;
use mkts_flight::QueryTicket;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

use crate::context::ServerContext;
use crate::engine::{LocalFile, LocalPiece, LocalRead};
use crate::flight_backend::query_request;
use crate::service::{Caller, ErrorCode, Interface, QueryRequest, ServiceError};

/// Descriptors per `SCM_RIGHTS` message (the kernel's limit is 253).
pub const FDS_PER_MESSAGE: usize = 250;

/// Largest request accepted, in bytes (a ticket is a few hundred).
const MAX_REQUEST: usize = 1 << 20;

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 256;

/// Longest path a Unix socket address holds (`sun_path`, with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalRequest {
    query: QueryTicket,
    #[serde(default)]
    authorization: Option<String>,
}

/// Why the socket was not bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A live server answers on it (as a port in use: the start-up fails).
    #[error("{0}")]
    InUse(String),
    /// It cannot be made here (path too long, directory not writable): same-host reads are off.
    #[error("{0}")]
    Unusable(String),
}

/// Bind the socket at `path`: a stale socket a stopped server left there is replaced; one a live server
/// answers on is an error, as a port in use is.
pub async fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let shown = path.display();
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(BindError::Unusable(format!("local_socket {shown}: longer than {MAX_SOCKET_PATH} bytes (set local_socket to a shorter path, or off)")));
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(BindError::InUse(format!("local_socket {shown}: another server is listening on it")));
        }
        std::fs::remove_file(path).map_err(|e| BindError::Unusable(format!("local_socket {shown}: cannot replace the stale socket: {e}")))?;
    }
    UnixListener::bind(path).map_err(|e| BindError::Unusable(format!("local_socket {shown}: {e}")))
}

/// Serve same-host reads on `listener` until `shutdown`; the socket file is removed when serving stops.
pub async fn serve(ctx: Arc<ServerContext>, listener: UnixListener, path: PathBuf, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("local_socket accept: {e}");
                    continue;
                }
            },
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(&ctx, stream).await {
                tracing::debug!("local_socket connection: {e}");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Requests of one connection until the client closes it.
async fn connection(ctx: &ServerContext, mut stream: UnixStream) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_REQUEST {
            let e = ServiceError::invalid(format!("request of {len} bytes: at most {MAX_REQUEST}"));
            return send_error(&mut stream, &e, ctx.engine.store_id()).await;
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        match answer(ctx, &body).await {
            Ok(reads) => send_reads(&mut stream, &reads, ctx.engine.store_id()).await?,
            Err(e) => send_error(&mut stream, &e, ctx.engine.store_id()).await?,
        }
    }
}

async fn answer(ctx: &ServerContext, body: &[u8]) -> Result<Vec<LocalRead>, ServiceError> {
    let req: LocalRequest = serde_json::from_slice(body).map_err(|e| ServiceError::invalid(format!("local read request: {e}")))?;
    let caller = match &ctx.auth {
        None => Caller::anonymous(Interface::Local),
        Some(auth) => match auth.authenticate(req.authorization.as_deref()).await {
            Ok(p) => Caller::authenticated(Interface::Local, p),
            Err(_) => return Err(ServiceError::new(ErrorCode::Unauthenticated, crate::service::UNAUTHENTICATED)),
        },
    };
    let read = match query_request(&req.query)? {
        QueryRequest::Read(r) => r,
        QueryRequest::Sql(_) => return Err(ServiceError::invalid("SQL runs on the server: send it over Flight SQL or a {\"sql\"} Flight ticket")),
    };
    // Opening files (and waiting out a generation switch) blocks: off the async threads.
    let service = ctx.service.clone();
    tokio::task::spawn_blocking(move || service.local_read(&caller, &read))
        .await
        .map_err(|e| ServiceError::new(ErrorCode::Internal, format!("local read task: {e}")))?
}

async fn send_error(stream: &mut UnixStream, e: &ServiceError, store_id: &str) -> std::io::Result<()> {
    // Snake case of the code's words: `not_found`, `invalid_argument`, `permission_denied`, …
    let header = json!({"error": {"code": e.code.as_str().replace(' ', "_"), "message": e.message}, "store_id": store_id});
    write_frame(stream, &header).await
}

async fn write_frame(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("reply header too large"))?;
    stream.write_all(&len.to_le_bytes()).await?;
    stream.write_all(&body).await
}

/// The header, the descriptors and the IPC streams of `reads`.
async fn send_reads<'r>(stream: &mut UnixStream, reads: &'r [LocalRead], store_id: &str) -> std::io::Result<()> {
    let mut fds: Vec<&'r LocalFile> = Vec::new();
    let mut ipcs: Vec<Vec<u8>> = Vec::with_capacity(reads.len());
    let mut buckets = Vec::with_capacity(reads.len());
    for r in reads {
        let mut pieces = Vec::with_capacity(r.pieces.len());
        let mut ipc = StreamWriter::try_new(Vec::new(), &r.schema).map_err(std::io::Error::other)?;
        let mut inline = 0usize;
        for p in &r.pieces {
            match p {
                LocalPiece::Inline(b) => {
                    ipc.write(b).map_err(std::io::Error::other)?;
                    pieces.push(json!({"inline": inline}));
                    inline += 1;
                }
                LocalPiece::Mapped { offset, rows, columns } => {
                    let mut slot = |f: &'r LocalFile| -> Value {
                        fds.push(f);
                        json!([fds.len() - 1, f.len])
                    };
                    let cols: Vec<Value> = columns
                        .iter()
                        .map(|c| {
                            let values = slot(&c.values);
                            let validity = c.validity.as_ref().map(&mut slot);
                            let data = c.data.as_ref().map(&mut slot);
                            json!({"values": values, "validity": validity, "data": data})
                        })
                        .collect();
                    pieces.push(json!({"offset": offset, "rows": rows, "columns": cols}));
                }
            }
        }
        ipc.finish().map_err(std::io::Error::other)?;
        let bytes = ipc.into_inner().map_err(std::io::Error::other)?;
        buckets.push(json!({"key": r.key.to_string(), "rows": r.rows, "ipc": bytes.len(), "pieces": pieces}));
        ipcs.push(bytes);
    }
    write_frame(stream, &json!({"buckets": buckets, "fds": fds.len(), "store_id": store_id})).await?;
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let raw: Vec<RawFd> = chunk.iter().map(|f| f.file.as_raw_fd()).collect();
        send_fds(stream, &raw).await?;
    }
    for ipc in &ipcs {
        stream.write_all(ipc).await?;
    }
    stream.flush().await
}

/// One `u32` count carrying `fds` as `SCM_RIGHTS`. The descriptors stay open here (the kernel duplicates
/// them into the receiver); `fds` outlives the call.
async fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> std::io::Result<()> {
    if fds.is_empty() || fds.len() > FDS_PER_MESSAGE {
        return Err(std::io::Error::other(format!("{} descriptors in one message", fds.len())));
    }
    let count = (fds.len() as u32).to_le_bytes();
    loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || sendmsg_fds(stream.as_raw_fd(), &count, fds)) {
            // The count is 4 bytes: a stream socket with room takes them whole.
            Ok(4) => return Ok(()),
            Ok(n) => return Err(std::io::Error::other(format!("sent {n} of 4 bytes with the descriptors"))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `sendmsg(2)` of `bytes` with one `SCM_RIGHTS` message. Written on `libc` (already a dependency) rather
/// than rustix's `net` feature: turning that feature on changes rustix for the whole dependency graph
/// (tempfile, DataFusion's spill files) and rebuilds it, for these few lines.
fn sendmsg_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure size computations.
    let (space, cmsg_len) = unsafe { (libc::CMSG_SPACE(fd_bytes as u32) as usize, libc::CMSG_LEN(fd_bytes as u32) as usize) };
    // u64 words: the control buffer must be aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: zeroed msghdr is a valid empty header; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) bytes, so the first header and its data fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return Err(std::io::Error::other("no room for the control message"));
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = cmsg_len as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(c), fd_bytes);
    }
    // SAFETY: msg describes valid buffers; MSG_NOSIGNAL turns a closed peer into EPIPE, not SIGPIPE.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
