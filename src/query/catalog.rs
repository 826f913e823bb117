//! The DataFusion catalog over the engine: catalog `mkts`, schema `public`, one table per bucket key plus one
//! multi-symbol table per `TIMEFRAME/ATTRGROUP`.
//!
//! Table names (quote them: they contain `/`):
//! - `"AAPL/1Min/OHLCV"` — one bucket, its columns as stored (`Epoch`, data columns, `Nanoseconds` for ticks);
//! - `"*/1Min/OHLCV"` (also `"1Min/OHLCV"`) — every symbol of that timeframe and group, plus a `Symbol` column;
//! - `"AAPL,TSLA/1Min/OHLCV"` — those symbols, plus `Symbol`.
//!
//! Tables are resolved on each lookup, so buckets created or destroyed by writers show up at once. Views made
//! with `CREATE VIEW` live in memory next to the buckets until the server stops (at most [`MAX_VIEWS`]); no
//! other kind of table can be registered (no in-memory tables, no files: SQL runs inside the store). When the
//! server is not `queryable`, bucket names are not listed (reads are refused by the engine).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, SchemaProvider, TableProvider};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::TableType;
use parking_lot::RwLock;

use super::scan::BucketTable;
use crate::engine::{BucketKey, Engine};

/// Name of the catalog.
pub const CATALOG: &str = "mkts";
/// Name of the schema holding the buckets.
pub const SCHEMA: &str = "public";
/// Views SQL may create (each holds a plan in memory until the server stops).
pub const MAX_VIEWS: usize = 1024;

/// The catalog: one schema of buckets.
#[derive(Debug)]
pub struct MktsCatalog {
    schema: Arc<BucketSchemaProvider>,
}

impl MktsCatalog {
    pub fn new(engine: Engine) -> Self {
        MktsCatalog { schema: Arc::new(BucketSchemaProvider::new(engine)) }
    }
}

impl CatalogProvider for MktsCatalog {
    fn schema_names(&self) -> Vec<String> {
        vec![SCHEMA.to_string()]
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        (name == SCHEMA).then(|| self.schema.clone() as Arc<dyn SchemaProvider>)
    }
}

/// The schema of buckets (and of in-memory tables created with SQL DDL).
#[derive(Debug)]
pub struct BucketSchemaProvider {
    engine: Engine,
    extra: RwLock<BTreeMap<String, Arc<dyn TableProvider>>>,
}

impl BucketSchemaProvider {
    pub fn new(engine: Engine) -> Self {
        BucketSchemaProvider { engine, extra: RwLock::new(BTreeMap::new()) }
    }
}

/// Every bucket key and every multi-symbol table name (`*/TF/GROUP`), sorted.
pub fn bucket_table_names(engine: &Engine) -> Vec<String> {
    let keys = engine.keys();
    let groups: BTreeSet<(String, String)> = keys.iter().map(|k| (k.timeframe.clone(), k.attr_group.clone())).collect();
    let mut names: Vec<String> = keys.iter().map(BucketKey::to_string).collect();
    names.extend(groups.into_iter().map(|(tf, ag)| format!("*/{tf}/{ag}")));
    names
}

#[async_trait]
impl SchemaProvider for BucketSchemaProvider {
    fn table_names(&self) -> Vec<String> {
        let mut names = if self.engine.policy().queryable { bucket_table_names(&self.engine) } else { Vec::new() };
        names.extend(self.extra.read().keys().cloned());
        names
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if let Some(t) = self.extra.read().get(name) {
            return Ok(Some(t.clone()));
        }
        Ok(BucketTable::open(&self.engine, name).map(|t| Arc::new(t) as Arc<dyn TableProvider>))
    }

    fn register_table(&self, name: String, table: Arc<dyn TableProvider>) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if name.contains('/') {
            return Err(DataFusionError::Plan(format!(
                "{name:?} looks like a bucket key; create buckets with \\create, the create action or a first write, then INSERT INTO"
            )));
        }
        if table.table_type() != TableType::View {
            return Err(DataFusionError::Plan(format!(
                "{name:?}: only views can be created in SQL (SQL runs inside the store; tables are buckets)"
            )));
        }
        let mut extra = self.extra.write();
        if extra.len() >= MAX_VIEWS && !extra.contains_key(&name) {
            return Err(DataFusionError::Plan(format!("too many views ({MAX_VIEWS}); DROP VIEW some first")));
        }
        Ok(extra.insert(name, table))
    }

    fn deregister_table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(self.extra.write().remove(name))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.extra.read().contains_key(name) || BucketTable::open(&self.engine, name).is_some()
    }
}
