//! What a caller may do: MarketStore's `enable_add`, `enable_remove` and `queryable`, checked once per
//! operation in the operations layer, whatever interface the request came through.
//!
//! Two kinds of rule, both here: who the caller is (with `auth:`, an anonymous caller is refused as
//! unauthenticated and a user's [`Role`] must cover the access) and the server-wide switches, which hold
//! for every caller. The engine keeps its own checks of the switches as a last line; the messages here
//! are the engine's, so a refusal reads the same whichever check caught it.

use super::caller::{Caller, Interface, Role};
use super::error::{ErrorCode, ServiceError};
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
    /// `auth:` is configured: every caller but the CLI's embedded mode (which opened the files itself)
    /// must have authenticated.
    pub require_auth: bool,
    /// This server is a replica: its data comes from its master only, so every change is refused
    /// ([`REPLICA_READ_ONLY`]), whoever asks and through whichever interface.
    pub replica: bool,
}

/// The message of every change refused on a replica (MarketStore's text).
pub const REPLICA_READ_ONLY: &str = "write is not allowed on replica";

impl Default for Policy {
    fn default() -> Self {
        Policy { enable_add: true, enable_remove: true, queryable: true, require_auth: false, replica: false }
    }
}

impl From<crate::engine::Policy> for Policy {
    fn from(p: crate::engine::Policy) -> Self {
        Policy { enable_add: p.enable_add, enable_remove: p.enable_remove, queryable: p.queryable, require_auth: false, replica: false }
    }
}

/// The message of a call without credentials on a server with `auth:`.
pub const UNAUTHENTICATED: &str = "authentication required: send HTTP Basic credentials or a Bearer token";

impl Access<'_> {
    /// The least role that may do this.
    pub fn role(&self) -> Role {
        match self {
            Access::Read => Role::ReadOnly,
            Access::Append | Access::CreateByWrite(_) => Role::ReadWrite,
            Access::Create | Access::Remove | Access::Schema => Role::Admin,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Append => "write",
            Access::CreateByWrite(_) => "create buckets by writing",
            Access::Create => "create buckets",
            Access::Remove => "destroy buckets or delete data",
            Access::Schema => "change the SQL catalog",
        }
    }
}

impl Policy {
    /// `Ok` when `caller` may perform `access`; otherwise the refusal every interface reports
    /// ([`super::ErrorCode::PermissionDenied`]).
    pub fn check(&self, caller: &Caller, access: Access<'_>) -> Result<(), ServiceError> {
        self.check_caller(caller, access)?;
        self.check_switches(access)
    }

    /// The half of [`Policy::check`] about who is asking: authentication and role. Interfaces that run
    /// a batch of requests (MarketStore's `Write`, `Create`, `Destroy`) check it for the whole call first,
    /// so a caller without the role is refused outright (PermissionDenied / 403) instead of per request.
    pub fn check_caller(&self, caller: &Caller, access: Access<'_>) -> Result<(), ServiceError> {
        match &caller.principal {
            Some(p) if p.role < access.role() => {
                return Err(ServiceError::denied(format!(
                    "user {:?} (role {}) may not {}: that needs role {}",
                    p.user,
                    p.role.as_str(),
                    access.describe(),
                    access.role().as_str()
                )));
            }
            None if self.require_auth && caller.interface != Interface::Cli => {
                return Err(ServiceError::new(ErrorCode::Unauthenticated, UNAUTHENTICATED));
            }
            _ => {}
        }
        Ok(())
    }

    /// The server-wide switches (`queryable`, `enable_add`, `enable_remove`), for every caller.
    fn check_switches(&self, access: Access<'_>) -> Result<(), ServiceError> {
        if self.replica && access != Access::Read {
            return Err(ServiceError::denied(REPLICA_READ_ONLY));
        }
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
        let locked = Policy { enable_add: false, enable_remove: false, queryable: false, require_auth: false, replica: false };
        let refused: Vec<_> = all.iter().map(|a| locked.check(&anon, *a).err().map(|e| (e.code, e.message))).collect();
        assert_eq!(refused[0], Some((ErrorCode::PermissionDenied, NOT_QUERYABLE.to_string())));
        assert_eq!(refused[1], None);
        assert!(refused[2].as_ref().unwrap().1.contains("enable_add: false"));
        assert!(refused[3].as_ref().unwrap().1.starts_with("bucket A/1Min/X does not exist"));
        assert!(refused[4].as_ref().unwrap().1.contains("enable_remove: false"));
        assert_eq!(refused[5], None);
    }

    #[test]
    fn each_role_covers_its_accesses_and_anonymous_callers_need_credentials() {
        use crate::service::Principal;
        let key = BucketKey::parse("A/1Min/X").unwrap();
        let all = [Access::Read, Access::Append, Access::CreateByWrite(&key), Access::Create, Access::Remove, Access::Schema];
        let policy = Policy { require_auth: true, ..Policy::default() };
        let as_role = |role| Caller::authenticated(Interface::Flight, Principal { user: "u".into(), role });
        let allowed = |c: &Caller| all.iter().map(|a| policy.check(c, *a).is_ok()).collect::<Vec<_>>();
        assert_eq!(allowed(&as_role(Role::ReadOnly)), [true, false, false, false, false, false]);
        assert_eq!(allowed(&as_role(Role::ReadWrite)), [true, true, true, false, false, false]);
        assert_eq!(allowed(&as_role(Role::Admin)), [true; 6]);
        let e = policy.check(&as_role(Role::ReadOnly), Access::Append).unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::PermissionDenied, "user \"u\" (role read_only) may not write: that needs role read_write"));
        for i in [Interface::Flight, Interface::FlightSql, Interface::JsonRpc, Interface::Grpc, Interface::Ws, Interface::HttpApi, Interface::Plugin] {
            let e = policy.check(&Caller::anonymous(i), Access::Read).unwrap_err();
            assert_eq!((e.code, e.message.as_str()), (ErrorCode::Unauthenticated, UNAUTHENTICATED));
        }
        // The embedded CLI opened the data directory itself: the files are its credentials.
        assert!(policy.check(&Caller::anonymous(Interface::Cli), Access::Remove).is_ok());
        // Switches still hold for an admin.
        let locked = Policy { enable_remove: false, ..policy };
        assert!(locked.check(&as_role(Role::Admin), Access::Remove).is_err());
        // A replica refuses every change to everyone, and still reads.
        let replica = Policy { replica: true, ..policy };
        for a in &all[1..] {
            let e = replica.check(&as_role(Role::Admin), *a).unwrap_err();
            assert_eq!((e.code, e.message.as_str()), (ErrorCode::PermissionDenied, REPLICA_READ_ONLY));
        }
        assert!(replica.check(&as_role(Role::ReadOnly), Access::Read).is_ok());
        assert!(replica.check(&Caller::anonymous(Interface::Cli), Access::Append).is_err());
    }
}
