//! The blocking WebSocket client of the streaming feeders (`polygon`, `alpaca`): `ws://` over TCP and
//! `wss://` over rustls (ring, the webpki-roots store the HTTP client uses), with a short read timeout so a
//! feeder thread can check its stop flag and send pings between frames.
//!
//! Credentials never go into URLs here: the feeders authenticate with a message after the handshake.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::{HandshakeError, Message};

use super::ContribError;

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

fn tls_config(url: &str) -> Result<Arc<rustls::ClientConfig>, ContribError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().map_err(|e| transport(url, e))?;
    Ok(Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
}

impl WsClient {
    /// Connect and run the opening handshake within `timeout`. A handshake answered with HTTP 401 or 403 is
    /// [`ContribError::Auth`]; other failures are transport errors.
    pub fn connect(plugin: &'static str, url: &str, timeout: Duration) -> Result<WsClient, ContribError> {
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
            let conn = rustls::ClientConnection::new(tls_config(url)?, name).map_err(|e| transport(url, e))?;
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
