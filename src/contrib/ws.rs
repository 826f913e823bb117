//! The blocking WebSocket client of the streaming feeders (`polygon`, `alpaca`): `ws://` over TCP and
//! `wss://` over rustls (ring, the webpki-roots store the HTTP client uses), with a short read timeout so a
//! feeder thread can check its stop flag and send pings between frames.
//!
//! Credentials never go into URLs here: the feeders authenticate with a message after the handshake.
//!
//! Also here: what every streaming feeder does once a connection is authenticated ([`read_loop`]: gather the
//! events of consecutive messages, flush them per bucket, ping, give up on a silent connection, log progress)
//! and around its sessions ([`reconnect_loop`]: back-off, rotation through the servers, one log line and no
//! retry on an authentication failure).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::{HandshakeError, Message};

use super::feeder::{backoff_delay, fmt_time, Stop};
use super::ContribError;
use super::polygon::Sink;
use crate::metrics::FeedStats;

/// A TCP or TLS stream under the WebSocket.
pub enum WsStream {
    /// `ws://`
    Plain(TcpStream),
    /// `wss://`
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl WsStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            WsStream::Plain(s) => s,
            WsStream::Tls(s) => &s.sock,
        }
    }
}

impl Read for WsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            WsStream::Plain(s) => s.read(buf),
            WsStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for WsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            WsStream::Plain(s) => s.write(buf),
            WsStream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            WsStream::Plain(s) => s.flush(),
            WsStream::Tls(s) => s.flush(),
        }
    }
}

/// One frame read from the server, or why none was.
#[derive(Debug)]
pub enum Frame {
    /// A text (or UTF-8 binary) message.
    Text(String),
    /// Nothing arrived within the read timeout (pings and pongs are answered and count as traffic).
    Idle,
    /// A control frame (ping, pong): the connection is alive.
    Control,
}

/// An open WebSocket connection.
pub struct WsClient {
    ws: WebSocket<WsStream>,
    url: String,
}

fn transport(url: &str, msg: impl std::fmt::Display) -> ContribError {
    ContribError::Transport { url: url.into(), msg: msg.to_string() }
}

/// The certificate authorities a `wss://` connection trusts: the webpki-roots store (the public CAs the HTTP
/// client trusts), plus those of a feeder's `ca_file` (a proxy's or a test server's own CA).
#[derive(Clone)]
pub struct Trust(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Trust")
    }
}

impl Trust {
    /// The public roots, plus every certificate of the PEM file `ca_file` when given. A file that cannot
    /// be read or holds no certificate is an error (the feeder's config is refused).
    pub fn new(ca_file: Option<&Path>) -> Result<Trust, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("ca_file {}: cannot read: {e}", path.display()))?;
            let certs: Vec<rustls::pki_types::CertificateDer<'static>> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("ca_file {}: not a PEM certificate file: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("ca_file {}: holds no PEM certificate", path.display()));
            }
            for c in certs {
                roots.add(c).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
        Ok(Trust(Arc::new(b.with_root_certificates(roots).with_no_client_auth())))
    }
}

impl WsClient {
    /// Connect and run the opening handshake within `timeout`. A handshake answered with HTTP 401 or 403 is
    /// [`ContribError::Auth`]; other failures are transport errors.
    pub fn connect(plugin: &'static str, url: &str, timeout: Duration, trust: &Trust) -> Result<WsClient, ContribError> {
        let request = url.into_client_request().map_err(|e| ContribError::Config { plugin, msg: format!("bad WebSocket URL {url:?}: {e}") })?;
        let uri = request.uri().clone();
        let tls = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => return Err(ContribError::Config { plugin, msg: format!("WebSocket URL must start with ws:// or wss://, got {url:?}") }),
        };
        let host = uri.host().ok_or_else(|| ContribError::Config { plugin, msg: format!("no host in {url:?}") })?.to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host_trim = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let addrs: Vec<_> = (host_trim.as_str(), port).to_socket_addrs().map_err(|e| transport(url, e))?.collect();
        let mut last_err = None;
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| transport(url, last_err.map_or_else(|| "no address".to_string(), |e| e.to_string())))?;
        tcp.set_read_timeout(Some(timeout)).map_err(|e| transport(url, e))?;
        tcp.set_write_timeout(Some(timeout)).map_err(|e| transport(url, e))?;
        let _ = tcp.set_nodelay(true);
        let stream = if tls {
            let name = rustls::pki_types::ServerName::try_from(host_trim.clone()).map_err(|e| transport(url, e))?;
            let conn = rustls::ClientConnection::new(trust.0.clone(), name).map_err(|e| transport(url, e))?;
            WsStream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        } else {
            WsStream::Plain(tcp)
        };
        match tungstenite::client::client(request, stream) {
            Ok((ws, _resp)) => Ok(WsClient { ws, url: url.to_string() }),
            Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).chars().take(200).collect::<String>()).unwrap_or_default();
                if status == 401 || status == 403 {
                    Err(ContribError::Auth { plugin, msg: format!("WebSocket handshake refused with HTTP {status} {body}") })
                } else {
                    Err(ContribError::Http { status, url: url.into(), body, retry_after: None })
                }
            }
            Err(HandshakeError::Failure(e)) => Err(transport(url, e)),
            Err(HandshakeError::Interrupted(_)) => Err(transport(url, "handshake timed out")),
        }
    }

    /// The URL connected to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Set how long [`WsClient::read`] waits for a frame before returning [`Frame::Idle`].
    pub fn set_read_timeout(&mut self, d: Duration) -> Result<(), ContribError> {
        self.ws.get_ref().tcp().set_read_timeout(Some(d)).map_err(|e| transport(&self.url, e))
    }

    /// Send a text message.
    pub fn send_text(&mut self, text: &str) -> Result<(), ContribError> {
        self.ws.send(Message::text(text)).map_err(|e| transport(&self.url, e))
    }

    /// Send a ping (the server's pong shows the connection is alive).
    pub fn ping(&mut self) -> Result<(), ContribError> {
        self.ws.send(Message::Ping(Default::default())).map_err(|e| transport(&self.url, e))
    }

    /// Read one frame. A close frame or a dropped connection is an error.
    pub fn read(&mut self) -> Result<Frame, ContribError> {
        match self.ws.read() {
            Ok(Message::Text(t)) => Ok(Frame::Text(t.as_str().to_string())),
            Ok(Message::Binary(b)) => match String::from_utf8(b.to_vec()) {
                Ok(s) => Ok(Frame::Text(s)),
                Err(_) => Err(transport(&self.url, "binary frame that is not UTF-8")),
            },
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => Ok(Frame::Control),
            Ok(Message::Close(c)) => Err(transport(&self.url, format!("server closed the connection{}", c.map(|c| format!(": {} {}", c.code, c.reason)).unwrap_or_default()))),
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                // Flush a pending pong or ping that a timed-out write left queued.
                let _ = self.ws.flush();
                Ok(Frame::Idle)
            }
            Err(e) => Err(transport(&self.url, e)),
        }
    }

    /// Wait up to `timeout` for the next text message (control frames are skipped).
    pub fn read_text(&mut self, timeout: Duration) -> Result<String, ContribError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.read()? {
                Frame::Text(t) => return Ok(t),
                Frame::Idle | Frame::Control => {
                    if std::time::Instant::now() >= deadline {
                        return Err(transport(&self.url, format!("no message within {timeout:?}")));
                    }
                }
            }
        }
    }

    /// Close politely (best effort).
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

/// Events of consecutive messages are gathered for at most this long (or [`FLUSH_EVENTS`]) and written per
/// bucket together; a pause in the stream flushes at once.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// See [`FLUSH_AFTER`].
pub(crate) const FLUSH_EVENTS: usize = 50_000;

/// What differs between the streaming feeders: their messages and what their control events mean.
pub(crate) trait Protocol {
    /// One event of a message.
    type Event;
    /// For log lines.
    const PLUGIN: &'static str;
    /// The events of one text message, or why it cannot be read.
    fn parse(text: &str) -> Result<Vec<Self::Event>, String>;
    /// Whether an event carries market data (a session that delivered some resets the back-off).
    fn is_data(ev: &Self::Event) -> bool;
    /// Put one event where it belongs: market data into `sink` (`checked`: the symbols whose gap was
    /// checked this session), control events into the log. An error ends the session
    /// ([`ContribError::Auth`] stops the worker).
    fn route(&self, ev: Self::Event, sink: &mut Sink<'_>, checked: &mut HashSet<String>) -> Result<(), ContribError>;
}

/// A streaming feeder: its protocol and the sink its events go to.
pub(crate) struct Feed<'a, P> {
    pub proto: P,
    pub sink: Sink<'a>,
}

impl<P: Protocol> Feed<'_, P> {
    /// Route and store one flush of events.
    pub fn handle(&mut self, events: Vec<P::Event>, checked: &mut HashSet<String>) -> Result<(), ContribError> {
        let mut res = Ok(());
        for ev in events {
            if let Err(e) = self.proto.route(ev, &mut self.sink, checked) {
                res = Err(e);
                break;
            }
        }
        // What was gathered before an error is stored all the same.
        self.sink.flush();
        res
    }
}

/// Log `msg` as a warning the first time it is seen (at most 100 distinct ones per feed).
pub(crate) fn warn_once(plugin: &'static str, warned: &mut HashSet<String>, msg: String) {
    if warned.len() < 100 && warned.insert(msg.clone()) {
        tracing::warn!(plugin, "{msg}");
    }
}

/// Read an authenticated connection until `stop` (then `Ok`) or an error: events of consecutive messages
/// are gathered and handed to [`Feed::handle`] every [`FLUSH_AFTER`] / [`FLUSH_EVENTS`], at a pause,
/// on a lost connection and on stop (what arrived is always stored). Pings every `ping_interval`; a
/// connection silent for three intervals is an error. Logs progress every 10 s. `got_data` is set once
/// market data arrives.
pub(crate) fn read_loop<P: Protocol>(feed: &mut Feed<'_, P>, mut ws: WsClient, checked: &mut HashSet<String>, stop: &Stop, ping_interval: Duration, got_data: &mut bool) -> Result<(), ContribError> {
    let mut pending: Vec<P::Event> = Vec::new();
    let mut pending_since = Instant::now();
    let (mut last_frame, mut last_ping, mut last_log) = (Instant::now(), Instant::now(), Instant::now());
    ws.set_read_timeout(Duration::from_millis(50))?;
    loop {
        if stop.is_stopped() {
            feed.handle(std::mem::take(&mut pending), checked)?;
            ws.close();
            return Ok(());
        }
        let frame = match ws.read() {
            Ok(f) => f,
            Err(e) => {
                // What arrived before the connection broke is stored.
                feed.handle(std::mem::take(&mut pending), checked)?;
                return Err(e);
            }
        };
        if !pending.is_empty() && (!matches!(frame, Frame::Text(_)) || pending.len() >= FLUSH_EVENTS || pending_since.elapsed() >= FLUSH_AFTER) {
            feed.handle(std::mem::take(&mut pending), checked)?;
        }
        match frame {
            Frame::Text(text) => {
                last_frame = Instant::now();
                feed.sink.stats().messages.fetch_add(1, Ordering::Relaxed);
                match P::parse(&text) {
                    Ok(events) => {
                        *got_data |= events.iter().any(P::is_data);
                        if pending.is_empty() {
                            pending_since = Instant::now();
                        }
                        pending.extend(events);
                    }
                    Err(m) => warn_once(P::PLUGIN, &mut feed.sink.warned, format!("unreadable message: {m}")),
                }
            }
            Frame::Control => last_frame = Instant::now(),
            Frame::Idle => {}
        }
        if last_frame.elapsed() > ping_interval * 3 {
            let url = ws.url().to_string();
            feed.handle(std::mem::take(&mut pending), checked)?;
            return Err(ContribError::Transport { url, msg: format!("no traffic for {:?}", ping_interval * 3) });
        }
        if last_ping.elapsed() >= ping_interval {
            ws.ping()?;
            last_ping = Instant::now();
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            log_progress(P::PLUGIN, feed.sink.stats());
            last_log = Instant::now();
        }
    }
}

/// One progress line: messages, rows, backfilled rows, duplicates, reconnects, newest bar.
pub(crate) fn log_progress(plugin: &'static str, s: &FeedStats) {
    tracing::info!(
        plugin,
        "{} messages, {} rows written, {} backfilled, {} duplicates dropped, {} reconnects, last bar {}",
        s.messages.load(Ordering::Relaxed),
        s.rows.load(Ordering::Relaxed),
        s.backfilled.load(Ordering::Relaxed),
        s.duplicates.load(Ordering::Relaxed),
        s.reconnects.load(Ordering::Relaxed),
        fmt_time(s.last_bar.load(Ordering::Relaxed) as i64)
    );
}

/// The worker loop of a streaming feeder: `session(url, got_data)` against `urls` in turn until `stop`
/// (`session` returns `Ok` when stopped). Any error reconnects after 1 s doubling to 60 s (reset after a
/// session that delivered data); an authentication failure is logged once (with `auth_hint`, e.g. `check
/// api_key / $POLYGON_API_KEY`) and ends the worker: no retry until the server is restarted.
pub(crate) fn reconnect_loop(plugin: &'static str, urls: &[String], auth_hint: &str, stop: &Stop, stats: &FeedStats, mut session: impl FnMut(&str, &mut bool) -> Result<(), ContribError>) {
    let mut attempt: u32 = 0;
    let mut n: usize = 0;
    while !stop.is_stopped() && !urls.is_empty() {
        let url = &urls[n % urls.len()];
        let mut got_data = false;
        match session(url, &mut got_data) {
            Ok(()) => break,
            Err(ContribError::Auth { msg, .. }) => {
                tracing::error!(plugin, url = %url, "authentication failed ({msg}); {auth_hint}; not retrying until restart");
                break;
            }
            Err(e) => {
                if got_data {
                    attempt = 0;
                }
                let d = backoff_delay(attempt, None);
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(plugin, "connection to {url} lost: {e}; reconnecting in {d:?}");
                if !stop.sleep(d) {
                    break;
                }
                attempt = attempt.saturating_add(1);
                n += 1;
            }
        }
    }
}
