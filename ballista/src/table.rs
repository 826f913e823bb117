//! The mkts catalog on a Ballista cluster: catalog `mkts`, schema `public`, the same table names as the
//! server's SQL (`"AAPL/1Min/OHLCV"`, `"*/1Min/OHLCV"` or `"1Min/OHLCV"`, `"AAPL,TSLA/1Min/OHLCV"`, the last
//! three with a `Symbol` column), resolved from the server's listing at each lookup.
//!
//! A table's scan is split by tier, as the listing reports each year:
//! - **cold years** are Parquet objects in the tiering store, scanned by DataFusion's own Parquet source
//!   (row-group pruning with the statement's filters, only the projected columns), one file group per
//!   object; Ballista's default codec ships that plan and every executor reads the objects itself from the
//!   store registered as [`crate::COLD_STORE_URL`];
//! - **hot years** are read from the server over Flight by [`FlightSource`]'s scan, one partition per run of
//!   consecutive hot years per bucket, with the `Epoch` range the filters imply.
//!
//! Filters are reported [`TableProviderFilterPushDown::Inexact`]: both scans use them to read less, and
//! DataFusion applies them exactly above. A year that moves between planning and execution is still read
//! (the server reads cold years too); a cold year thawed by a write after planning fails the query, which
//! then can be resubmitted.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use datafusion::catalog::{CatalogProvider, SchemaProvider, Session, TableProvider};
use datafusion::common::{DFSchema, DataFusionError, Result as DfResult, ScalarValue};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use mkts::engine::TimePoint;
use mkts::query::scan::Pushdown;
use object_store::path::Path as ObjPath;

use crate::exec::{FlightSource, HotPart, SYMBOL};
use crate::remote::{Bucket, Remote};

/// Catalog and schema names, as on the server.
pub const CATALOG: &str = "mkts";
pub const SCHEMA: &str = "public";

/// Where cold objects live, as this process sees the store: the object store registered under
/// [`crate::COLD_STORE_URL`] and the prefix object names are relative to.
#[derive(Debug, Clone, Default)]
pub struct ColdLayout {
    pub prefix: ObjPath,
}

/// The catalog `mkts` with its one schema.
#[derive(Debug)]
pub struct RemoteCatalog {
    schema: Arc<RemoteSchema>,
}

impl RemoteCatalog {
    pub fn new(remote: Remote, cold: ColdLayout) -> Self {
        RemoteCatalog { schema: Arc::new(RemoteSchema { remote, cold }) }
    }
}

impl CatalogProvider for RemoteCatalog {
    fn schema_names(&self) -> Vec<String> {
        vec![SCHEMA.to_string()]
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        (name == SCHEMA).then(|| self.schema.clone() as Arc<dyn SchemaProvider>)
    }
}

/// The schema `public`: the server's buckets and multi-symbol names.
#[derive(Debug)]
pub struct RemoteSchema {
    remote: Remote,
    cold: ColdLayout,
}

#[async_trait]
impl SchemaProvider for RemoteSchema {
    fn table_names(&self) -> Vec<String> {
        let Ok(buckets) = self.remote.listing() else { return Vec::new() };
        let groups: BTreeSet<(String, String)> = buckets.iter().map(|b| (b.parts().1.to_string(), b.parts().2.to_string())).collect();
        let mut names: Vec<String> = buckets.iter().map(|b| b.key.clone()).collect();
        names.extend(groups.into_iter().map(|(tf, ag)| format!("*/{tf}/{ag}")));
        names
    }

    /// Resolved synchronously (see [`crate::remote`]): `asof_join` polls this once.
    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let buckets = self.remote.listing().map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(MktsTable::resolve(&self.remote, &self.cold, name, &buckets).map(|t| Arc::new(t) as Arc<dyn TableProvider>))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.remote.listing().map(|b| MktsTable::resolve(&self.remote, &self.cold, name, &b).is_some()).unwrap_or(false)
    }
}

/// A table over one or more buckets of the server, as planned now.
#[derive(Debug, Clone)]
pub struct MktsTable {
    pub remote: Remote,
    pub cold: ColdLayout,
    /// The name as written in SQL.
    pub name: String,
    /// True when the table has a `Symbol` column.
    pub multi: bool,
    pub buckets: Vec<Bucket>,
    pub schema: SchemaRef,
}

/// The union of the buckets' columns in first-seen order (nullable where some bucket lacks one),
/// `Nanoseconds` after the data columns: as the server's multi-symbol tables.
fn union_fields(buckets: &[Bucket]) -> Vec<Field> {
    let mut fields: Vec<Field> = Vec::new();
    let mut present: Vec<usize> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for b in buckets {
        for f in b.schema.fields() {
            match index.get(f.name()) {
                Some(&i) => present[i] += 1,
                None => {
                    index.insert(f.name().clone(), fields.len());
                    fields.push(f.as_ref().clone());
                    present.push(1);
                }
            }
        }
    }
    let mut out: Vec<Field> = fields.into_iter().zip(present).map(|(f, n)| if n < buckets.len() { f.with_nullable(true) } else { f }).collect();
    if let Some(i) = out.iter().position(|f| f.name() == "Nanoseconds") {
        let f = out.remove(i);
        out.push(f);
    }
    out
}

/// First and last instant of a UTC year (the server's partitions are UTC years).
fn year_bounds(y: i32) -> (TimePoint, TimePoint) {
    let at = |y: i32| Utc.with_ymd_and_hms(y, 1, 1, 0, 0, 0).single().map_or(i64::MAX, |t| t.timestamp());
    let start = at(y);
    let next = at(y.saturating_add(1));
    (TimePoint { secs: start, nanos: 0 }, TimePoint { secs: next.saturating_sub(1), nanos: 999_999_999 })
}

impl MktsTable {
    /// Resolve a table name against a listing (the server's naming rules), or `None` when it names no
    /// bucket.
    pub fn resolve(remote: &Remote, cold: &ColdLayout, name: &str, listing: &[Bucket]) -> Option<MktsTable> {
        let full = if name.split('/').count() == 2 { format!("*/{name}") } else { name.to_string() };
        let mut parts = full.split('/');
        let (syms, tf, ag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || tf.is_empty() || ag.is_empty() {
            return None;
        }
        let wanted: Option<BTreeSet<&str>> = (syms != "*").then(|| syms.split(',').map(str::trim).collect());
        let buckets: Vec<Bucket> = listing
            .iter()
            .filter(|b| {
                let (s, t, a) = b.parts();
                t == tf && a == ag && wanted.as_ref().is_none_or(|w| w.contains(s))
            })
            .cloned()
            .collect();
        let first = buckets.first()?;
        let multi = wanted.as_ref().is_none_or(|w| w.len() != 1) || name.contains(',');
        let schema = if multi {
            let mut fields = union_fields(&buckets);
            fields.push(Field::new(SYMBOL, DataType::Utf8, false));
            Arc::new(Schema::new(fields))
        } else {
            first.schema.clone()
        };
        Some(MktsTable { remote: remote.clone(), cold: cold.clone(), name: name.to_string(), multi, buckets, schema })
    }

    /// The hot parts and cold files a scan with `pushdown` reads.
    fn split(&self, pushdown: &Pushdown) -> (Vec<HotPart>, Vec<PartitionedFile>) {
        let (start, end) = (pushdown.start.unwrap_or(TimePoint::MIN), pushdown.end.unwrap_or(TimePoint::MAX));
        let mut hot = Vec::new();
        let mut cold = Vec::new();
        for b in &self.buckets {
            let (symbol, _, _) = b.parts();
            if self.multi && pushdown.symbols.as_ref().is_some_and(|s| !s.contains(symbol)) {
                continue;
            }
            let symbol = self.multi.then(|| symbol.to_string());
            let mut years: Vec<_> = b.partitions.iter().collect();
            years.sort_by_key(|p| p.year);
            let mut run: Option<(i32, i32)> = None;
            let flush = |run: Option<(i32, i32)>, hot: &mut Vec<HotPart>| {
                if let Some((y0, y1)) = run {
                    let (s, e) = (year_bounds(y0).0.max(start), year_bounds(y1).1.min(end));
                    if s <= e {
                        hot.push(HotPart { key: b.key.clone(), symbol: symbol.clone(), start: (s.secs, s.nanos), end: (e.secs, e.nanos) });
                    }
                }
            };
            for p in years {
                let (ys, ye) = year_bounds(p.year);
                if p.tier == "cold" {
                    flush(run.take(), &mut hot);
                    let Some(object) = &p.object else { continue };
                    if ye < start || ys > end {
                        continue;
                    }
                    let Ok(rel) = ObjPath::parse(object) else { continue };
                    let path: ObjPath = self.cold.prefix.parts().chain(rel.parts()).collect();
                    let mut f = PartitionedFile::new(path.to_string(), p.bytes);
                    if let Some(s) = &symbol {
                        f = f.with_partition_values(vec![ScalarValue::Utf8(Some(s.clone()))]);
                    }
                    cold.push(f);
                } else {
                    run = Some(match run {
                        Some((y0, y1)) if y1.checked_add(1) == Some(p.year) => (y0, p.year),
                        other => {
                            flush(other, &mut hot);
                            (p.year, p.year)
                        }
                    });
                }
            }
            flush(run, &mut hot);
        }
        (hot, cold)
    }

    fn cold_scan(&self, state: &dyn Session, files: Vec<PartitionedFile>, projection: Option<&Vec<usize>>, filters: &[Expr], limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let file_fields: Vec<FieldRef> = self.schema.fields().iter().filter(|f| !(self.multi && f.name() == SYMBOL)).cloned().collect();
        let file_schema = Arc::new(Schema::new(file_fields));
        let table_schema = if self.multi {
            TableSchema::builder(file_schema.clone()).with_table_partition_cols(vec![Arc::new(Field::new(SYMBOL, DataType::Utf8, false))]).build()
        } else {
            TableSchema::from(file_schema.clone())
        };
        let mut source = ParquetSource::new(table_schema);
        // Row-group pruning with the filters on stored columns (Symbol is a per-file value).
        let on_files: Vec<Expr> = filters.iter().filter(|e| !e.column_refs().iter().any(|c| c.name == SYMBOL)).cloned().collect();
        if let Some(pred) = conjunction(on_files) {
            let df_schema = DFSchema::try_from(file_schema.as_ref().clone())?;
            if let Ok(p) = state.create_physical_expr(pred, &df_schema) {
                source = source.with_predicate(p);
            }
        }
        let url = ObjectStoreUrl::parse(crate::COLD_STORE_URL)?;
        let groups: Vec<FileGroup> = files.into_iter().map(|f| FileGroup::new(vec![f])).collect();
        let config = FileScanConfigBuilder::new(url, Arc::new(source))
            .with_file_groups(groups)
            .with_projection_indices(projection.cloned())?
            .with_limit(if filters.is_empty() { limit } else { None })
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

#[async_trait]
impl TableProvider for MktsTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(&self, state: &dyn Session, projection: Option<&Vec<usize>>, filters: &[Expr], limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let projected = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        let (hot, cold) = self.split(&Pushdown::from_filters(filters));
        let mut plans: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        if !hot.is_empty() {
            plans.push(FlightSource::new(self.remote.clone(), self.name.clone(), hot, projected.clone()).scan_all()?);
        }
        if !cold.is_empty() {
            plans.push(self.cold_scan(state, cold, projection, filters, limit)?);
        }
        Ok(match plans.len() {
            0 => Arc::new(EmptyExec::new(projected)),
            1 => plans.remove(0),
            _ => UnionExec::try_new(plans)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::Partition;

    fn bucket(key: &str, parts: &[(i32, &str)]) -> Bucket {
        let schema = Arc::new(Schema::new(vec![
            Field::new("Epoch", DataType::Timestamp(arrow::datatypes::TimeUnit::Second, Some("UTC".into())), false),
            Field::new("Close", DataType::Float64, false),
        ]));
        let partitions = parts
            .iter()
            .map(|(y, t)| Partition {
                year: *y,
                tier: t.to_string(),
                rows: 10,
                bytes: 100,
                object: (*t == "cold").then(|| format!("symbol={}/year={y}/1.parquet", &key[..4])),
            })
            .collect();
        Bucket { key: key.into(), schema, partitions }
    }

    #[test]
    fn names_resolve_as_on_the_server_and_years_split_by_tier() {
        let remote = Remote::new("grpc://127.0.0.1:1");
        let cold = ColdLayout { prefix: ObjPath::from("pre") };
        let listing = vec![
            bucket("AAPL/1Min/OHLCV", &[(2021, "cold"), (2022, "cold"), (2023, "hot"), (2024, "hot")]),
            bucket("MSFT/1Min/OHLCV", &[(2022, "hot"), (2023, "cold"), (2024, "hot")]),
            bucket("MSFT/1H/OHLCV", &[(2024, "hot")]),
        ];
        let one = MktsTable::resolve(&remote, &cold, "AAPL/1Min/OHLCV", &listing).unwrap();
        assert!(!one.multi && one.schema.fields().len() == 2);
        let all = MktsTable::resolve(&remote, &cold, "1Min/OHLCV", &listing).unwrap();
        assert!(all.multi && all.buckets.len() == 2 && all.schema.field(2).name() == SYMBOL);
        assert_eq!(MktsTable::resolve(&remote, &cold, "AAPL,MSFT/1Min/OHLCV", &listing).unwrap().buckets.len(), 2);
        assert!(MktsTable::resolve(&remote, &cold, "AAPL/1Min/OHLCV", &listing[1..]).is_none());
        assert!(MktsTable::resolve(&remote, &cold, "a/b/c/d", &listing).is_none());

        let (hot, files) = all.split(&Pushdown::default());
        // AAPL: 2023-2024 in one run; MSFT: 2022 and 2024 around a cold 2023.
        let spans: Vec<_> = hot.iter().map(|p| (p.key.as_str(), p.start.0, p.end.0)).collect();
        let y = |y: i32| year_bounds(y);
        assert_eq!(spans, vec![
            ("AAPL/1Min/OHLCV", y(2023).0.secs, y(2024).1.secs),
            ("MSFT/1Min/OHLCV", y(2022).0.secs, y(2022).1.secs),
            ("MSFT/1Min/OHLCV", y(2024).0.secs, y(2024).1.secs),
        ]);
        assert!(hot.iter().all(|p| p.symbol.as_deref() == Some(&p.key[..4])));
        let paths: Vec<_> = files.iter().map(|f| f.object_meta.location.to_string()).collect();
        assert_eq!(paths, vec!["pre/symbol=AAPL/year=2021/1.parquet", "pre/symbol=AAPL/year=2022/1.parquet", "pre/symbol=MSFT/year=2023/1.parquet"]);
        assert_eq!(files[2].partition_values, vec![ScalarValue::Utf8(Some("MSFT".into()))]);

        // An Epoch range inside 2022 and a Symbol choice read only what they cover.
        let p = Pushdown {
            start: Some(TimePoint { secs: y(2022).0.secs + 100, nanos: 0 }),
            end: Some(TimePoint { secs: y(2022).0.secs + 200, nanos: 0 }),
            symbols: Some(["MSFT".to_string()].into_iter().collect()),
            only_epoch: false,
        };
        let (hot, files) = all.split(&p);
        assert_eq!(hot.len(), 1);
        assert_eq!((hot[0].start.0, hot[0].end.0), (y(2022).0.secs + 100, y(2022).0.secs + 200));
        assert!(files.is_empty());
    }
}
