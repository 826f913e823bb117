//! The operations of one caller: what the plugin host hands to plugins instead of the server.
//!
//! A built-in trigger (ondiskagg), a built-in feeder or a shared-library plugin gets a [`Client`]: the
//! operations layer bound to the identity it runs as. Everything it does goes through the same methods,
//! and the same policy, as a request from any other interface; it cannot reach the engine, the
//! configuration or other interfaces' state. With authentication, a plugin's identity (and so what it may
//! do) is decided where the client is made.
//!
//! ```no_run
//! # async fn demo(client: mkts::service::Client, batch: arrow::array::RecordBatch) -> Result<(), mkts::service::ServiceError> {
//! use mkts::service::{ReadRequest, WriteRequest};
//! let key = mkts::service::request::parse_key("AAPL/1Min/OHLCV")?;
//! client.write(&WriteRequest::new(key.clone(), batch)).await?;
//! let rows = client.read(&ReadRequest::key(&key)).await?.rows();
//! # let _ = rows; Ok(()) }
//! ```

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use super::error::ServiceError;
use super::read::ReadResult;
use super::request::{ReadRequest, WriteRequest};
use super::{Caller, Service};
use crate::engine::{BucketInfo, BucketKey, WriteAck};

/// A [`Service`] bound to one [`Caller`]. Cheap to clone; every clone acts as the same caller.
#[derive(Clone)]
pub struct Client {
    service: Arc<Service>,
    caller: Caller,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("caller", &self.caller).finish()
    }
}

impl Client {
    pub fn new(service: Arc<Service>, caller: Caller) -> Client {
        Client { service, caller }
    }

    /// Who this client's operations run as.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// [`Service::write`] as this caller.
    pub async fn write(&self, w: &WriteRequest) -> Result<WriteAck, ServiceError> {
        self.service.write(&self.caller, w).await
    }

    /// [`Service::write_blocking`] as this caller (threads outside the runtime).
    pub fn write_blocking(&self, w: &WriteRequest) -> Result<WriteAck, ServiceError> {
        self.service.write_blocking(&self.caller, w)
    }

    /// [`Service::read`] as this caller.
    pub async fn read(&self, req: &ReadRequest) -> Result<ReadResult, ServiceError> {
        self.service.read(&self.caller, req).await
    }

    /// [`Service::read_blocking`] as this caller (threads outside the runtime; no `functions`).
    pub fn read_blocking(&self, req: &ReadRequest) -> Result<ReadResult, ServiceError> {
        self.service.read_blocking(&self.caller, req)
    }

    /// [`Service::sql`] as this caller.
    pub async fn sql(&self, text: &str) -> Result<(SchemaRef, Vec<RecordBatch>), ServiceError> {
        self.service.sql(&self.caller, text).await
    }

    /// The server's `timezone` for day-and-longer intervals ([`crate::engine::Engine::timezone`]).
    pub fn timezone(&self) -> Option<chrono_tz::Tz> {
        self.service.engine().timezone()
    }

    /// [`Service::get_info`] as this caller.
    pub fn info(&self, key: &BucketKey) -> Result<BucketInfo, ServiceError> {
        self.service.get_info(&self.caller, key)
    }
}
