//! `ALTER TABLE "KEY" ADD COLUMN …` / `DROP COLUMN …`: DataFusion plans no `ALTER TABLE`, so the statement
//! is recognised here and run by the operations layer as a bucket schema change
//! ([`crate::engine::Engine::alter`]); every other statement goes to DataFusion unchanged.

use datafusion::sql::sqlparser::ast::{AlterTableOperation, DataType as SqlType, ExactNumberInfo, Statement, TimezoneInfo};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::{QueryError, SQL_RECURSION_LIMIT};
use crate::engine::{BucketKey, ColumnDef, ColumnType, SchemaChange, TsUnit};

/// The bucket and change an `ALTER TABLE` statement asks for; `None` for any other statement. One kind of
/// operation per statement (`ADD COLUMN a …, ADD COLUMN b …` or `DROP COLUMN a, b`).
pub fn schema_change(text: &str) -> Result<Option<(BucketKey, SchemaChange)>, QueryError> {
    let head = text.trim_start();
    if !head.get(..5).is_some_and(|w| w.eq_ignore_ascii_case("alter")) {
        return Ok(None);
    }
    let mut parser = Parser::new(&GenericDialect {}).with_recursion_limit(SQL_RECURSION_LIMIT);
    parser = parser.try_with_sql(text).map_err(|e| QueryError::Sql(e.to_string()))?;
    let stmts = parser.parse_statements().map_err(|e| QueryError::Sql(e.to_string()))?;
    let [Statement::AlterTable(at)] = stmts.as_slice() else {
        return Ok(None);
    };
    let name = at.name.0.iter().map(|p| p.as_ident().map(|i| i.value.clone()).unwrap_or_else(|| p.to_string())).collect::<Vec<_>>();
    let table = match name.as_slice() {
        [t] => t.clone(),
        _ => return Err(QueryError::Sql(format!("ALTER TABLE names a bucket key, quoted: ALTER TABLE \"SYM/1Min/OHLCV\" …, not {}", at.name))),
    };
    let key = BucketKey::parse(&table).map_err(|e| QueryError::NotFound(format!("ALTER TABLE {table:?}: {e}")))?;
    let (mut add, mut drop) = (Vec::new(), Vec::new());
    for op in &at.operations {
        match op {
            AlterTableOperation::AddColumn { column_def, .. } => {
                let ty = column_type(&column_def.data_type)?;
                let mut c = ColumnDef::new(column_def.name.value.clone(), ty.0).with_nullable(true);
                c.tz = ty.1;
                add.push(c);
            }
            AlterTableOperation::DropColumn { column_names, .. } => drop.extend(column_names.iter().map(|i| i.value.clone())),
            other => return Err(QueryError::NotAllowed(format!("ALTER TABLE supports ADD COLUMN and DROP COLUMN, not {other}"))),
        }
    }
    let change = match (add.is_empty(), drop.is_empty()) {
        (false, true) => SchemaChange::AddColumns(add),
        (true, false) => SchemaChange::DropColumns(drop),
        _ => return Err(QueryError::NotAllowed("one ALTER TABLE either adds or drops columns, not both".into())),
    };
    Ok(Some((key, change)))
}

/// The stored type of an SQL column type (and a timestamp's time zone).
fn column_type(t: &SqlType) -> Result<(ColumnType, Option<String>), QueryError> {
    use ColumnType as C;
    let ty = match t {
        SqlType::Double(_) | SqlType::DoublePrecision | SqlType::Float8 | SqlType::Float64 => C::F64,
        SqlType::Real | SqlType::Float4 | SqlType::Float(_) | SqlType::Float32 => C::F32,
        SqlType::BigInt(_) | SqlType::Int8(_) | SqlType::Int64 => C::I64,
        SqlType::Int(_) | SqlType::Integer(_) | SqlType::Int4(_) | SqlType::Int32 => C::I32,
        SqlType::SmallInt(_) | SqlType::Int2(_) | SqlType::Int16 => C::I16,
        SqlType::TinyInt(_) => C::I8,
        SqlType::BigIntUnsigned(_) | SqlType::UInt64 => C::U64,
        SqlType::IntUnsigned(_) | SqlType::IntegerUnsigned(_) | SqlType::UInt32 => C::U32,
        SqlType::SmallIntUnsigned(_) | SqlType::UInt16 => C::U16,
        SqlType::TinyIntUnsigned(_) | SqlType::UInt8 => C::U8,
        SqlType::Boolean | SqlType::Bool => C::Bool,
        SqlType::Varchar(_) | SqlType::Text | SqlType::String(_) | SqlType::CharVarying(_) | SqlType::CharacterVarying(_) => C::Utf8,
        SqlType::Bytea | SqlType::Blob(_) | SqlType::Binary(_) | SqlType::Varbinary(_) => C::Binary,
        SqlType::Date => C::Date32,
        SqlType::Timestamp(precision, tz) => {
            let unit = match precision {
                None | Some(9) => TsUnit::Ns,
                Some(6) => TsUnit::Us,
                Some(3) => TsUnit::Ms,
                Some(0) => TsUnit::S,
                Some(p) => return Err(QueryError::Sql(format!("TIMESTAMP({p}): precision 0, 3, 6 or 9"))),
            };
            let zone = matches!(tz, TimezoneInfo::WithTimeZone | TimezoneInfo::Tz).then(|| "UTC".to_string());
            return Ok((C::Timestamp(unit), zone));
        }
        SqlType::Decimal(info) | SqlType::Numeric(info) | SqlType::Dec(info) => match info {
            ExactNumberInfo::PrecisionAndScale(p, s) if (1..=38).contains(p) && *s >= 0 && (*s as u64) <= *p => C::Decimal128(*p as u8, *s as i8),
            ExactNumberInfo::Precision(p) if (1..=38).contains(p) => C::Decimal128(*p as u8, 0),
            _ => return Err(QueryError::Sql(format!("{t}: DECIMAL(precision, scale), precision 1..38, scale 0..precision"))),
        },
        other => return Err(QueryError::Sql(format!("ALTER TABLE ADD COLUMN: type {other} is not stored (DOUBLE, BIGINT, INT, BOOLEAN, VARCHAR, BYTEA, DATE, TIMESTAMP, DECIMAL(p, s), …)"))),
    };
    Ok((ty, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alter_statements_become_schema_changes() {
        let (k, c) = schema_change(r#"ALTER TABLE "AAPL/1Min/OHLCV" ADD COLUMN "Vwap" DOUBLE, ADD COLUMN Venue VARCHAR, ADD COLUMN p DECIMAL(12, 4), ADD COLUMN t TIMESTAMP WITH TIME ZONE"#)
            .unwrap()
            .unwrap();
        assert_eq!(k.to_string(), "AAPL/1Min/OHLCV");
        let SchemaChange::AddColumns(cols) = c else { panic!() };
        let got: Vec<(String, ColumnType, bool, Option<String>)> = cols.into_iter().map(|c| (c.name, c.ty, c.nullable, c.tz)).collect();
        assert_eq!(
            got,
            [
                ("Vwap".into(), ColumnType::F64, true, None),
                ("Venue".into(), ColumnType::Utf8, true, None),
                ("p".into(), ColumnType::Decimal128(12, 4), true, None),
                ("t".into(), ColumnType::Timestamp(TsUnit::Ns), true, Some("UTC".into()))
            ]
        );
        let (_, c) = schema_change(r#"alter table "A/1Min/OHLCV" drop column "Close", drop column Volume"#).unwrap().unwrap();
        assert_eq!(c, SchemaChange::DropColumns(vec!["Close".into(), "Volume".into()]));
        assert!(schema_change("SELECT 1").unwrap().is_none());
        assert!(schema_change(r#"ALTER TABLE "A/1Min/OHLCV" RENAME TO b"#).is_err());
        assert!(schema_change(r#"ALTER TABLE "A/1Min/OHLCV" ADD COLUMN x INTERVAL"#).is_err());
        assert!(schema_change(r#"ALTER TABLE "A/1Min/OHLCV" ADD COLUMN x INT, DROP COLUMN y"#).is_err());
    }
}
