//! Command-line tools beyond `start`/`init`: the SQL shell (`mkts connect`) and bulk transfer
//! (`mkts import`, `mkts export`).

pub mod connect;
pub mod transfer;
