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
    pub async fn write(&self, caller: &Caller, w: &WriteRequest) -> Result<WriteAck, ServiceError> {
        self.authorize_write(caller, w)?;
        let ack = self.engine.write(&w.key, &w.batch, WriteOptions { variable: w.variable }).await?;
        self.acknowledged(ack.lsn).await?;
        Ok(ack)
    }

    /// Blocking form of [`Service::write`], for threads outside the runtime (plugins, the CLI).
    pub fn write_blocking(&self, caller: &Caller, w: &WriteRequest) -> Result<WriteAck, ServiceError> {
        self.authorize_write(caller, w)?;
        let ack = self.engine.write_blocking(&w.key, &w.batch, WriteOptions { variable: w.variable })?;
        self.acknowledged_blocking(ack.lsn)?;
        Ok(ack)
    }
}
