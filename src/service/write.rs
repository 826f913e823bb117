//! Durable writes. A write to a missing bucket creates it, which `enable_add` governs.

use super::error::ServiceError;
use super::policy::Access;
use super::request::WriteRequest;
use super::{Caller, Service};
use crate::engine::{WriteAck, WriteOptions};

impl Service {
    fn authorize_write(&self, caller: &Caller, w: &WriteRequest) -> Result<(), ServiceError> {
        if self.engine.schema(&w.key).is_some() {
            self.authorize(caller, Access::Append)
        } else {
            self.authorize(caller, Access::CreateByWrite(&w.key))
        }
    }

    /// Write one batch; returns once the rows are durable and visible. A write racing a recreate of its
    /// bucket fails `Aborted` (nothing stored, safe to retry).
    /// A small write may be committed on the calling thread ([`crate::engine::Engine::write`]).
    pub async fn write(&self, caller: &Caller, w: &WriteRequest) -> Result<WriteAck, ServiceError> {
        self.authorize_write(caller, w)?;
        let ack = self.engine.write(&w.key, &w.batch, WriteOptions { variable: w.variable }).await?;
        super::acknowledged(&self.engine, self.ack_gate.as_deref(), ack.lsn).await?;
        Ok(ack)
    }

    /// [`Service::write`] in two steps, for interfaces that pipeline a stream of writes (a Flight DoPut
    /// of many batches): this checks and hands the write to the engine, in call order
    /// ([`crate::engine::Engine::submit_write`]); the returned future resolves when it may be
    /// acknowledged (durable, and held by a replica under `replication.ack: replica`).
    pub async fn submit_write(
        &self,
        caller: &Caller,
        w: &WriteRequest,
    ) -> Result<impl std::future::Future<Output = Result<WriteAck, ServiceError>> + Send + 'static, ServiceError> {
        self.authorize_write(caller, w)?;
        let pending = self.engine.submit_write(&w.key, &w.batch, WriteOptions { variable: w.variable }).await?;
        let (engine, gate) = (self.engine.clone(), self.ack_gate.clone());
        Ok(async move {
            let ack = pending.durable().await?;
            super::acknowledged(&engine, gate.as_deref(), ack.lsn).await?;
            Ok(ack)
        })
    }

    /// Blocking form of [`Service::write`], for threads outside the runtime (plugins, the CLI).
    pub fn write_blocking(&self, caller: &Caller, w: &WriteRequest) -> Result<WriteAck, ServiceError> {
        self.authorize_write(caller, w)?;
        let ack = self.engine.write_blocking(&w.key, &w.batch, WriteOptions { variable: w.variable })?;
        self.acknowledged_blocking(ack.lsn)?;
        Ok(ack)
    }
}
