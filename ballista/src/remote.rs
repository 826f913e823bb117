//! The mkts server as the cluster sees it: its bucket listing (ListFlights, with each year's tier and
//! object) and key reads (DoGet), over Arrow Flight.
//!
//! Planning needs the listing synchronously (DataFusion's `asof_join` table function resolves its tables by
//! polling once, and codecs decode table providers in plain functions), so [`Remote::listing`] runs its
//! request on a small runtime of its own and waits on a channel: that works from any thread, inside a Tokio
//! runtime or not. Credentials for a server with `auth:` come from `MKTS_USER` / `MKTS_PASSWORD` in each
//! process's environment and are sent as HTTP Basic on every call; they never enter a plan and are never
//! logged.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{Criteria, FlightClient, Ticket};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use serde::Deserialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{ClusterError, Result};

/// Largest message accepted from the server (it sends at most 64 MiB).
const MAX_MESSAGE: usize = 256 << 20;

/// One year of a bucket as ListFlights reports it (`app_metadata.partitions`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Partition {
    pub year: i32,
    /// `hot` (mapped files on the server) or `cold` (a Parquet object in the tiering store).
    pub tier: String,
    pub rows: u64,
    /// Cold: the object's size.
    pub bytes: u64,
    /// Cold: the object's path under the store's prefix.
    #[serde(default)]
    pub object: Option<String>,
}

/// One bucket of the server's listing.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// `SYMBOL/TIMEFRAME/ATTRGROUP`.
    pub key: String,
    pub schema: SchemaRef,
    pub partitions: Vec<Partition>,
}

impl Bucket {
    /// (symbol, timeframe, attribute group).
    pub fn parts(&self) -> (&str, &str, &str) {
        let mut it = self.key.splitn(3, '/');
        (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next().unwrap_or(""))
    }
}

#[derive(Deserialize)]
struct ListingMetadata {
    #[serde(default)]
    partitions: Vec<Partition>,
}

/// An mkts server's Flight endpoint (`grpc://host:5995`, `grpc+tls://…`, or `http(s)://…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The URL as given (it is what plans carry).
    pub url: String,
}

/// The runtime blocking calls run on (one worker; listings are small).
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mkts-catalog")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| ClusterError::Remote(format!("cannot start the catalog runtime: {e}")))
}

/// Run `fut` on the catalog runtime and wait for it from this thread.
pub fn block_on<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime()?.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| ClusterError::Remote("catalog request was dropped".into()))
}

impl Remote {
    pub fn new(url: impl Into<String>) -> Remote {
        Remote { url: url.into() }
    }

    fn http_url(&self) -> (String, bool) {
        let u = self.url.trim_end_matches('/');
        if let Some(rest) = u.strip_prefix("grpc+tls://") {
            (format!("https://{rest}"), true)
        } else if let Some(rest) = u.strip_prefix("grpc://") {
            (format!("http://{rest}"), false)
        } else if u.starts_with("https://") {
            (u.to_string(), true)
        } else if u.starts_with("http://") {
            (u.to_string(), false)
        } else {
            (format!("http://{u}"), false)
        }
    }

    async fn channel(&self) -> Result<Channel> {
        let (url, tls) = self.http_url();
        let mut ep = Endpoint::from_shared(url.clone()).map_err(|e| ClusterError::Remote(format!("bad mkts URL {:?}: {e}", self.url)))?;
        if tls {
            ep = ep
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|e| ClusterError::Remote(format!("TLS for {:?}: {e}", self.url)))?;
        }
        ep.connect().await.map_err(|e| ClusterError::Remote(format!("cannot reach mkts at {}: {e}", self.url)))
    }

    /// HTTP Basic from `MKTS_USER` / `MKTS_PASSWORD`, when set.
    fn authorization() -> Option<String> {
        use base64::Engine as _;
        let user = std::env::var("MKTS_USER").ok().filter(|u| !u.is_empty())?;
        let password = std::env::var("MKTS_PASSWORD").unwrap_or_default();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Some(format!("Basic {token}"))
    }

    async fn client(&self) -> Result<FlightClient> {
        let inner = FlightServiceClient::new(self.channel().await?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut client = FlightClient::new_from_inner(inner);
        if let Some(v) = Self::authorization() {
            client.add_header("authorization", &v).map_err(|e| ClusterError::Remote(e.to_string()))?;
        }
        Ok(client)
    }

    /// Every bucket with its schema and per-year tiers, sorted by key (async).
    pub async fn listing_async(&self) -> Result<Vec<Bucket>> {
        let mut client = self.client().await?;
        let infos: Vec<_> = client
            .list_flights(Criteria::default().expression)
            .await
            .map_err(|e| ClusterError::Remote(format!("ListFlights on {}: {e}", self.url)))?
            .try_collect()
            .await
            .map_err(|e| ClusterError::Remote(format!("ListFlights on {}: {e}", self.url)))?;
        let mut out = Vec::with_capacity(infos.len());
        for info in infos {
            let Some(key) = info.flight_descriptor.as_ref().and_then(|d| d.path.first()).cloned() else { continue };
            let schema = Arc::new(info.clone().try_decode_schema().map_err(|e| ClusterError::Remote(format!("schema of {key}: {e}")))?);
            let meta: ListingMetadata = if info.app_metadata.is_empty() {
                ListingMetadata { partitions: Vec::new() }
            } else {
                serde_json::from_slice(&info.app_metadata).map_err(|e| ClusterError::Remote(format!("partitions of {key}: {e}")))?
            };
            out.push(Bucket { key, schema, partitions: meta.partitions });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// [`Remote::listing_async`], waited for on this thread.
    pub fn listing(&self) -> Result<Vec<Bucket>> {
        let me = self.clone();
        block_on(async move { me.listing_async().await })?
    }

    /// A DoGet of `ticket` (the server's JSON ticket), as a stream of batches.
    pub async fn do_get(&self, ticket: String) -> Result<BoxStream<'static, Result<RecordBatch>>> {
        let mut client = self.client().await?;
        let url = self.url.clone();
        let stream = client
            .do_get(Ticket::new(ticket))
            .await
            .map_err(|e| ClusterError::Remote(format!("DoGet on {url}: {e}")))?;
        Ok(stream.map(move |r| r.map_err(|e| ClusterError::Remote(format!("DoGet on {url}: {e}")))).boxed())
    }
}
