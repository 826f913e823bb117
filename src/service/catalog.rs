//! Catalog operations: create, destroy, delete a time range, list symbols or buckets, describe a bucket.

use super::error::ServiceError;
use super::policy::Access;
use super::request::CreateRequest;
use super::{Caller, Service};
use crate::engine::{BucketInfo, BucketKey, BucketSchema, SchemaChange, TimePoint};

/// What `list_symbols` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolFormat {
    /// Distinct symbols, sorted (MarketStore's default).
    Symbols,
    /// Full `SYM/TF/GROUP` keys, sorted (MarketStore's `tbk`).
    Keys,
}

impl Service {
    /// Create an empty bucket.
    pub async fn create(&self, caller: &Caller, c: &CreateRequest) -> Result<(), ServiceError> {
        self.authorize(caller, Access::Create)?;
        self.engine.create(&c.key, c.schema.clone()).await?;
        self.acknowledged(0).await
    }

    /// Remove a bucket and all its data (a damaged one too).
    pub async fn destroy(&self, caller: &Caller, key: &BucketKey) -> Result<(), ServiceError> {
        self.authorize(caller, Access::Remove)?;
        self.engine.destroy(key).await?;
        self.acknowledged(0).await
    }

    /// Delete the rows with `start <= time <= end`; rows removed.
    pub async fn delete_range(&self, caller: &Caller, key: &BucketKey, start: TimePoint, end: TimePoint) -> Result<usize, ServiceError> {
        self.authorize(caller, Access::Remove)?;
        let n = self.engine.delete_range(key, start, end).await?;
        self.acknowledged(0).await?;
        Ok(n)
    }

    /// Add columns (nullable: stored rows read as null; `enable_add`, role admin) or drop columns with
    /// their data (`enable_remove`, role admin). Returns the bucket's new schema.
    pub async fn alter(&self, caller: &Caller, key: &BucketKey, change: SchemaChange) -> Result<BucketSchema, ServiceError> {
        let access = match change {
            SchemaChange::AddColumns(_) => Access::Create,
            SchemaChange::DropColumns(_) => Access::Remove,
        };
        self.authorize(caller, access)?;
        let schema = self.engine.alter(key, change).await?;
        self.acknowledged(0).await?;
        Ok(schema)
    }

    /// Symbols or keys of every bucket, sorted.
    pub fn list_symbols(&self, caller: &Caller, format: SymbolFormat) -> Result<Vec<String>, ServiceError> {
        self.authorize(caller, Access::Read)?;
        let keys = self.engine.keys();
        let mut out: Vec<String> = match format {
            SymbolFormat::Keys => keys.iter().map(|k| k.to_string()).collect(),
            SymbolFormat::Symbols => keys.iter().map(|k| k.symbol.clone()).collect(),
        };
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Every bucket with its description, by key (damaged buckets, which cannot be described, are left
    /// out).
    pub fn list_buckets(&self, caller: &Caller) -> Result<Vec<(BucketKey, BucketInfo)>, ServiceError> {
        self.authorize(caller, Access::Read)?;
        Ok(self.engine.keys().into_iter().filter_map(|k| self.engine.info(&k).ok().map(|i| (k, i))).collect())
    }

    /// Schema, row count and time span of a bucket.
    pub fn get_info(&self, caller: &Caller, key: &BucketKey) -> Result<BucketInfo, ServiceError> {
        self.authorize(caller, Access::Read)?;
        Ok(self.engine.info(key)?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    use crate::engine::{BucketKey, Engine, EngineConfig, Policy as EnginePolicy};
    use crate::service::*;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Close", DataType::Float64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![60, 120])), Arc::new(Float64Array::from(vec![1.0, 2.0]))]).unwrap()
    }

    fn service(dir: &std::path::Path, policy: EnginePolicy) -> Service {
        let mut cfg = EngineConfig::new(dir);
        cfg.policy = policy;
        // A closed engine's writer thread holds the directory's lock until it exits.
        for _ in 0..500 {
            if let Ok(e) = Engine::open(cfg.clone()) {
                return Service::new(e, chrono_tz::UTC, Some(64 << 20));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("cannot reopen {}", dir.display())
    }

    #[tokio::test]
    async fn pathological_sql_nesting_is_refused_and_ordinary_nesting_runs() {
        let dir = tempfile::tempdir().unwrap();
        let anon = Caller::anonymous(Interface::Cli);
        let svc = service(dir.path(), EnginePolicy::default());
        // The shape the flight_ticket fuzzer found (fuzz/artifacts-replay/flight_ticket/sql_parse_backtracking):
        // at sqlparser's default depth, four groups took minutes to parse.
        let head = "SELECT MMMMMClo%eMMMoo%eMIMo%eMMMM.MeMMMMM.MMM.MeMM                 .MM.MMM.MoMM            ";
        let seg = ".((( L.MMMMMM.MMMM.ELECT0MMMMMCMMMMeMM   .MM.MMM.MeMM   ";
        let e = svc.sql(&anon, &format!("{head}{}", seg.repeat(4))).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("RecursionLimitExceeded"), "{}", e.message);
        // Ten nested parentheses and functions still run.
        let (_, b) = svc.sql(&anon, "SELECT abs(abs(abs(abs(abs((((((((((1)))))))))))))) AS n").await.unwrap();
        let n = b[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap().value(0);
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn operations_check_policy_and_classify_errors() {
        let dir = tempfile::tempdir().unwrap();
        let anon = Caller::anonymous(Interface::Cli);
        let svc = service(dir.path(), EnginePolicy::default());
        let key = BucketKey::parse("A/1Min/X").unwrap();
        assert_eq!(svc.write(&anon, &WriteRequest::new(key.clone(), batch())).await.unwrap().rows, 2);
        let r = svc.read(&anon, &ReadRequest::parse("A/1Min/X").unwrap()).await.unwrap();
        assert_eq!((r.single, r.rows()), (true, 2));
        let missing = svc.read(&anon, &ReadRequest::parse("NOPE/1Min/X").unwrap()).await.unwrap_err();
        assert_eq!(missing.code, ErrorCode::NotFound);
        let sql = svc.sql(&anon, r#"SELECT * FROM "NOPE/1Min/X""#).await.unwrap_err();
        assert_eq!(sql.code, ErrorCode::NotFound, "{sql:?}");
        assert!(sql.message.contains("NOPE/1Min/X"), "{}", sql.message);
        assert_eq!(svc.sql(&anon, "SELEC 1").await.unwrap_err().code, ErrorCode::InvalidArgument);
        let n = svc.sql_update(&anon, r#"INSERT INTO "*/1Min/X" SELECT Epoch, Close, 'B' FROM "A/1Min/X""#, None).await.unwrap();
        assert_eq!(n, 2);
        assert_eq!(svc.list_symbols(&anon, SymbolFormat::Symbols).unwrap(), ["A", "B"]);
        let all = svc.read(&anon, &ReadRequest::parse("*/1Min/X").unwrap()).await.unwrap();
        let (schema, _) = all.into_stream().unwrap();
        assert_eq!(schema.field(schema.fields().len() - 1).name(), read::SYMBOL_COLUMN);
        assert_eq!(svc.create(&anon, &CreateRequest::parse("A/1Min/X", &["V".into()], &["f4".into()], false).unwrap()).await.unwrap_err().code, ErrorCode::AlreadyExists);
        svc.engine().shutdown().await.unwrap();
        drop(svc);

        let locked = service(dir.path(), EnginePolicy { enable_add: false, enable_remove: false, queryable: false });
        let refused = [
            locked.read(&anon, &ReadRequest::parse("A/1Min/X").unwrap()).await.unwrap_err(),
            locked.sql(&anon, "SELECT 1").await.unwrap_err(),
            locked.list_symbols(&anon, SymbolFormat::Keys).unwrap_err(),
            locked.get_info(&anon, &key).unwrap_err(),
            locked.create(&anon, &CreateRequest::parse("C/1Min/X", &["V".into()], &["f4".into()], false).unwrap()).await.unwrap_err(),
            locked.write(&anon, &WriteRequest::new(BucketKey::parse("C/1Min/X").unwrap(), batch())).await.unwrap_err(),
            locked.destroy(&anon, &key).await.unwrap_err(),
        ];
        assert!(refused.iter().all(|e| e.code == ErrorCode::PermissionDenied), "{refused:?}");
        assert_eq!(refused[0].message, NOT_QUERYABLE);
        // Appending to a bucket that exists needs no permission.
        assert_eq!(locked.write(&anon, &WriteRequest::new(key, batch())).await.unwrap().rows, 2);
        locked.engine().shutdown().await.unwrap();
    }

    /// SQL is checked by what the statement does, once, in the operations layer: `DELETE` is a removal
    /// (`enable_remove`), refused before it runs, the rows stay; queries, `INSERT` into a bucket that exists
    /// and views still work.
    #[tokio::test]
    async fn sql_statements_are_checked_by_their_effect() {
        let dir = tempfile::tempdir().unwrap();
        let anon = Caller::anonymous(Interface::FlightSql);
        let svc = service(dir.path(), EnginePolicy { enable_add: true, enable_remove: false, queryable: true });
        let key = BucketKey::parse("A/1Min/X").unwrap();
        svc.write(&anon, &WriteRequest::new(key.clone(), batch())).await.unwrap();
        let e = svc.sql_update(&anon, r#"DELETE FROM "A/1Min/X" WHERE "Epoch" < 100"#, None).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");
        assert_eq!(e.message, "removing data is disabled (enable_remove: false)");
        let e = svc.sql(&anon, r#"EXPLAIN ANALYZE DELETE FROM "A/1Min/X" WHERE "Epoch" < 100"#).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");
        // A plain EXPLAIN runs nothing.
        assert!(svc.sql(&anon, r#"EXPLAIN DELETE FROM "A/1Min/X" WHERE "Epoch" < 100"#).await.is_ok());
        assert_eq!(svc.get_info(&anon, &key).unwrap().rows, 2);
        let n = svc.sql_update(&anon, r#"INSERT INTO "A/1Min/X" SELECT "Epoch" + INTERVAL '2 minutes', "Close" FROM "A/1Min/X" WHERE "Close" = 2.0"#, None).await;
        assert_eq!(n.unwrap(), 1);
        svc.sql(&anon, r#"CREATE VIEW v AS SELECT * FROM "A/1Min/X""#).await.unwrap();
        let (_, b) = svc.sql(&anon, "SELECT count(*) AS n FROM v").await.unwrap();
        assert_eq!(b[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap().value(0), 3);
        svc.engine().shutdown().await.unwrap();
    }
}
