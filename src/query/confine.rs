//! SQL runs inside the store: which statements are refused, decided on the logical plan (what a statement
//! does, not how it is spelled) before anything runs.
//!
//! Refused: `COPY ... TO` (writes files), `CREATE EXTERNAL TABLE` (reads files), `CREATE TABLE` /
//! `CREATE TABLE AS` (in-memory tables outside the store and outside the memory pool), `DROP TABLE` (buckets
//! are destroyed with `destroy`), `CREATE`/`DROP DATABASE`/`SCHEMA`, `CREATE`/`DROP FUNCTION`,
//! `CREATE INDEX`, `SET`/`RESET` (each statement runs in its own session, so a setting could not outlive it)
//! and SQL `PREPARE`/`EXECUTE`/`DEALLOCATE` (Flight SQL prepared statements are the way to bind `$1`).
//! Allowed: queries, `EXPLAIN`, `SHOW`, `DESCRIBE`, `INSERT INTO "KEY" ...`, `DELETE FROM "KEY" WHERE ...`
//! and `CREATE VIEW`/`DROP VIEW` (a stored query over the buckets). What an allowed statement does
//! ([`effect`]) is checked against the caller's policy by the operations layer before it runs.

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::{DdlStatement, LogicalPlan, Statement};
use datafusion::sql::parser::Statement as DfStatement;

use super::QueryError;

/// Why SQL refuses file access.
const INSIDE: &str = "SQL runs inside the store";

fn copy_to() -> String {
    format!("COPY TO is not allowed: {INSIDE} (read results over Flight or with `mkts export`)")
}

fn external_table() -> String {
    format!("CREATE EXTERNAL TABLE is not allowed: {INSIDE} (load files with `mkts import` or `\\load`)")
}

/// Refuse `COPY` and `CREATE EXTERNAL TABLE` as parsed, before planning (which already looks up file formats
/// and may fail with a less clear message); [`check`] then covers every other statement.
pub fn check_statement(st: &DfStatement) -> Result<(), QueryError> {
    match st {
        DfStatement::CopyTo(_) => Err(QueryError::NotAllowed(copy_to())),
        DfStatement::CreateExternalTable(_) => Err(QueryError::NotAllowed(external_table())),
        DfStatement::Explain(e) => check_statement(&e.statement),
        DfStatement::Statement(_) | DfStatement::Reset(_) => Ok(()),
    }
}

/// The refusal for one plan node, if any.
fn refusal(node: &LogicalPlan) -> Option<String> {
    let m = match node {
        LogicalPlan::Copy(_) => copy_to(),
        LogicalPlan::Ddl(ddl) => match ddl {
            DdlStatement::CreateExternalTable(_) => external_table(),
            DdlStatement::CreateMemoryTable(_) => format!(
                "CREATE TABLE is not allowed: {INSIDE}; tables are buckets (create one with the `create` action or `\\create`, then INSERT INTO)"
            ),
            DdlStatement::DropTable(_) => {
                format!("DROP TABLE is not allowed: {INSIDE}; buckets are removed with the `destroy` action or `\\destroy`")
            }
            DdlStatement::CreateCatalog(_) => format!("CREATE DATABASE is not allowed: {INSIDE}; the catalog is the store's buckets"),
            DdlStatement::CreateCatalogSchema(_) => format!("CREATE SCHEMA is not allowed: {INSIDE}; the catalog is the store's buckets"),
            DdlStatement::DropCatalogSchema(_) => format!("DROP SCHEMA is not allowed: {INSIDE}; the catalog is the store's buckets"),
            DdlStatement::CreateFunction(_) => format!("CREATE FUNCTION is not allowed: {INSIDE}"),
            DdlStatement::DropFunction(_) => format!("DROP FUNCTION is not allowed: {INSIDE}"),
            DdlStatement::CreateIndex(_) => format!("CREATE INDEX is not allowed: {INSIDE}"),
            DdlStatement::CreateView(_) | DdlStatement::DropView(_) => return None,
        },
        LogicalPlan::Statement(st) => match st {
            Statement::SetVariable(_) | Statement::ResetVariable(_) => {
                "SET is not allowed: each statement runs in its own session, so a setting could not outlive it".to_string()
            }
            Statement::Prepare(_) | Statement::Execute(_) | Statement::Deallocate(_) => {
                format!("{} is not allowed in SQL text: use Flight SQL prepared statements ($1 parameters)", st.name().to_uppercase())
            }
            Statement::TransactionStart(_) | Statement::TransactionEnd(_) => return None,
        },
        _ => return None,
    };
    Some(m)
}

/// Refuse a statement that would reach outside the store (see the module docs). Walks the whole plan,
/// subqueries and `EXPLAIN` inputs included, so wrapping a refused statement does not hide it.
pub fn check(plan: &LogicalPlan) -> Result<(), QueryError> {
    let mut refused = None;
    plan.apply_with_subqueries(|node| {
        Ok(match refusal(node) {
            Some(m) => {
                refused = Some(m);
                TreeNodeRecursion::Stop
            }
            None => TreeNodeRecursion::Continue,
        })
    })?;
    match refused {
        Some(m) => Err(QueryError::NotAllowed(m)),
        None => Ok(()),
    }
}

/// What an allowed statement does to the store, for the operations layer's policy check (decided on the
/// plan before anything runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Reads only: queries, `EXPLAIN` (without `ANALYZE` of a change), `SHOW`, `DESCRIBE`, transactions.
    Read,
    /// Adds rows to buckets that exist: `INSERT INTO "KEY" …`.
    Append,
    /// Removes rows: `DELETE FROM "KEY" WHERE …`.
    Remove,
    /// Changes the SQL catalog but no data: `CREATE VIEW`, `DROP VIEW`.
    Schema,
}

/// The strongest [`Effect`] anywhere in `plan` (subqueries and `EXPLAIN ANALYZE` inputs included: an
/// `EXPLAIN ANALYZE INSERT` runs the insert). A plain `EXPLAIN` runs nothing and reads.
pub fn effect(plan: &LogicalPlan) -> Effect {
    use datafusion::logical_expr::WriteOp;
    fn rank(e: Effect) -> u8 {
        match e {
            Effect::Read => 0,
            Effect::Schema => 1,
            Effect::Append => 2,
            Effect::Remove => 3,
        }
    }
    if let LogicalPlan::Explain(_) = plan {
        return Effect::Read;
    }
    let mut strongest = Effect::Read;
    let _ = plan.apply_with_subqueries(|node| {
        let e = match node {
            LogicalPlan::Dml(d) => match d.op {
                WriteOp::Delete => Effect::Remove,
                WriteOp::Insert(_) | WriteOp::Ctas => Effect::Append,
                // UPDATE, TRUNCATE, MERGE: no bucket implements them; whatever would, changes rows.
                _ => Effect::Remove,
            },
            LogicalPlan::Ddl(DdlStatement::CreateView(_) | DdlStatement::DropView(_)) => Effect::Schema,
            LogicalPlan::Ddl(_) => Effect::Remove,
            _ => Effect::Read,
        };
        if rank(e) > rank(strongest) {
            strongest = e;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    strongest
}
