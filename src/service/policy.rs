//! What a caller may do: MarketStore's `enable_add`, `enable_remove` and `queryable`, checked once per
//! operation in the operations layer, whatever interface the request came through.
//!
//! Today the rules are server-wide switches and every caller is anonymous. The authentication issue adds
//! per-role rules here (a read-only role, a replica that refuses writes) without touching an interface:
//! [`Policy::check`] receives the [`Caller`] for that reason. The engine keeps its own checks of the same
//! switches as a last line; the messages here are the engine's, so a refusal reads the same whichever
//! check caught it.

use super::caller::Caller;
use super::error::ServiceError;
use crate::engine::BucketKey;

/// The message of every read refused by `queryable: false`.
pub const NOT_QUERYABLE: &str = "server is not queryable";

/// A kind of operation, as far as policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Reads, SQL, listings, subscriptions (`queryable`).
    Read,
    /// Appending rows to a bucket that exists (always allowed today).
    Append,
    /// Creating a bucket explicitly (`enable_add`).
    Create,
    /// A write to `key`, which does not exist and would be created by it (`enable_add`).
    CreateByWrite(&'a BucketKey),
    /// Destroying buckets and deleting ranges, SQL `DELETE` included (`enable_remove`).
    Remove,
    /// Changing the SQL catalog without touching data: `CREATE VIEW`, `DROP VIEW` (always allowed today).
    Schema,
}

/// The server's rules (from `mkts.yml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub enable_add: bool,
    pub enable_remove: bool,
    pub queryable: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { enable_add: true, enable_remove: true, queryable: true }
    }
}

impl From<crate::engine::Policy> for Policy {
    fn from(p: crate::engine::Policy) -> Self {
        Policy { enable_add: p.enable_add, enable_remove: p.enable_remove, queryable: p.queryable }
    }
}

impl Policy {
    /// `Ok` when `caller` may perform `access`; otherwise the refusal every interface reports
    /// ([`super::ErrorCode::PermissionDenied`]).
    pub fn check(&self, caller: &Caller, access: Access<'_>) -> Result<(), ServiceError> {
        // No rule depends on who the caller is yet; roles come with authentication.
        let _ = caller;
        match access {
            Access::Read if !self.queryable => Err(ServiceError::denied(NOT_QUERYABLE)),
            Access::Create if !self.enable_add => Err(ServiceError::denied("creating buckets is disabled (enable_add: false)")),
            Access::CreateByWrite(key) if !self.enable_add => Err(ServiceError::denied(format!(
                "bucket {key} does not exist and creating buckets is disabled (enable_add: false)"
            ))),
            Access::Remove if !self.enable_remove => Err(ServiceError::denied("removing data is disabled (enable_remove: false)")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{ErrorCode, Interface};

    #[test]
    fn each_switch_refuses_its_operations_only() {
        let anon = Caller::anonymous(Interface::Flight);
        let key = BucketKey::parse("A/1Min/X").unwrap();
        let all = [Access::Read, Access::Append, Access::Create, Access::CreateByWrite(&key), Access::Remove, Access::Schema];
        assert!(all.iter().all(|a| Policy::default().check(&anon, *a).is_ok()));
        let locked = Policy { enable_add: false, enable_remove: false, queryable: false };
        let refused: Vec<_> = all.iter().map(|a| locked.check(&anon, *a).err().map(|e| (e.code, e.message))).collect();
        assert_eq!(refused[0], Some((ErrorCode::PermissionDenied, NOT_QUERYABLE.to_string())));
        assert_eq!(refused[1], None);
        assert!(refused[2].as_ref().unwrap().1.contains("enable_add: false"));
        assert!(refused[3].as_ref().unwrap().1.starts_with("bucket A/1Min/X does not exist"));
        assert!(refused[4].as_ref().unwrap().1.contains("enable_remove: false"));
        assert_eq!(refused[5], None);
    }
}
