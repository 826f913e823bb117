//! As-of join (trades to quotes): for each left row, the last right row at or before it.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array, new_null_array};
use arrow::compute::{cast, concat_batches, take};
use arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{ScalarValue, plan_err};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionState;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use crate::error::{Result, UdfError};
use crate::time_bucket::units_per_second;

/// Output schema of an as-of join: all left columns, then the right columns except the `by`
/// key. The right time column is renamed `<on_time>_right` (and, for tick tables joined on
/// `Epoch`, `Nanoseconds` becomes `Nanoseconds_right`); any other right column whose name is
/// taken gets a `_right` suffix. Right columns are nullable (left rows without a match).
pub fn asof_schema(
    left: &Schema,
    right: &Schema,
    on_time: &str,
    by: Option<&str>,
) -> Result<SchemaRef> {
    Ok(plan(left, right, on_time, by)?.schema)
}

struct Plan {
    schema: SchemaRef,
    /// Right column indices in output order.
    right_cols: Vec<usize>,
    left_time: usize,
    right_time: usize,
    left_nanos: Option<usize>,
    right_nanos: Option<usize>,
    left_by: Option<usize>,
    right_by: Option<usize>,
}

fn index_of(schema: &Schema, name: &str, side: &str) -> Result<usize> {
    schema
        .index_of(name)
        .ok()
        .or_else(|| {
            schema
                .fields()
                .iter()
                .position(|f| f.name().eq_ignore_ascii_case(name))
        })
        .ok_or_else(|| UdfError::ColumnNotFound {
            function: format!("asof_join ({side})"),
            column: name.to_string(),
            available: schema.fields().iter().map(|f| f.name().clone()).collect(),
        })
}

fn plan(left: &Schema, right: &Schema, on_time: &str, by: Option<&str>) -> Result<Plan> {
    let left_time = index_of(left, on_time, "left")?;
    let right_time = index_of(right, on_time, "right")?;
    for (schema, idx) in [(left, left_time), (right, right_time)] {
        units_per_second(schema.field(idx).data_type())?;
    }
    // Tick tables: Epoch + Nanoseconds together are the time.
    let nanos = |s: &Schema| {
        s.fields().iter().position(|f| {
            f.name().eq_ignore_ascii_case("Nanoseconds") && f.data_type().is_integer()
        })
    };
    let (left_nanos, right_nanos) = if on_time.eq_ignore_ascii_case("Epoch") {
        match (nanos(left), nanos(right)) {
            (Some(l), Some(r)) => (Some(l), Some(r)),
            _ => (None, None),
        }
    } else {
        (None, None)
    };
    let (left_by, right_by) = match by {
        Some(b) => (
            Some(index_of(left, b, "left")?),
            Some(index_of(right, b, "right")?),
        ),
        None => (None, None),
    };
    let mut fields: Vec<Field> = left.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut taken: HashSet<String> = fields.iter().map(|f| f.name().clone()).collect();
    let mut right_cols = Vec::new();
    for (i, f) in right.fields().iter().enumerate() {
        if Some(i) == right_by {
            continue;
        }
        let mut name = f.name().clone();
        if i == right_time || Some(i) == right_nanos || taken.contains(&name) {
            name = format!("{name}_right");
        }
        while taken.contains(&name) {
            name.push_str("_right");
        }
        taken.insert(name.clone());
        fields.push(
            Field::new(name, f.data_type().clone(), true).with_metadata(f.metadata().clone()),
        );
        right_cols.push(i);
    }
    Ok(Plan {
        schema: Arc::new(Schema::new(fields)),
        right_cols,
        left_time,
        right_time,
        left_nanos,
        right_nanos,
        left_by,
        right_by,
    })
}

/// Time as i64 nanoseconds (Option for nulls); Int64 columns are Unix seconds.
fn nanos_of(batch: &RecordBatch, time: usize, nanos: Option<usize>) -> Result<Vec<Option<i64>>> {
    let col = batch.column(time);
    let per_sec = units_per_second(col.data_type())?;
    let mul = 1_000_000_000 / per_sec;
    let raw = cast(col, &DataType::Int64)?;
    let extra = match nanos {
        Some(n) => Some(cast(batch.column(n), &DataType::Int32)?),
        None => None,
    };
    let extra = extra.as_ref().map(|a| a.as_primitive::<Int32Type>());
    Ok(raw
        .as_primitive::<Int64Type>()
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let base = v?.checked_mul(mul)?;
            match extra {
                Some(e) if e.is_valid(i) => base.checked_add(i64::from(e.value(i))),
                _ => Some(base),
            }
        })
        .collect())
}

fn key_rows(left: &ArrayRef, right: &ArrayRef) -> Result<(Rows, Rows)> {
    let right = if right.data_type() != left.data_type() {
        cast(right, left.data_type())?
    } else {
        right.clone()
    };
    let converter = RowConverter::new(vec![SortField::new(left.data_type().clone())])?;
    let l = converter.convert_columns(std::slice::from_ref(left))?;
    let r = converter.convert_columns(&[right])?;
    Ok((l, r))
}

/// Join two collected batches (see [`asof_join`]).
pub fn asof_join_batches(
    left: &RecordBatch,
    right: &RecordBatch,
    on_time: &str,
    by: Option<&str>,
) -> Result<RecordBatch> {
    let p = plan(&left.schema(), &right.schema(), on_time, by)?;
    let lt = nanos_of(left, p.left_time, p.left_nanos)?;
    let rt = nanos_of(right, p.right_time, p.right_nanos)?;
    let keys = match (p.left_by, p.right_by) {
        (Some(l), Some(r)) => Some(key_rows(left.column(l), right.column(r))?),
        _ => None,
    };
    let key_valid = |side: usize, i: usize| match (side, p.left_by, p.right_by) {
        (0, Some(c), _) => left.column(c).is_valid(i),
        (1, _, Some(c)) => right.column(c).is_valid(i),
        _ => true,
    };
    let cmp_key = |a: usize, b: usize, a_left: bool, b_left: bool| -> Ordering {
        match &keys {
            Some((l, r)) => {
                let ka = if a_left { l.row(a) } else { r.row(a) };
                let kb = if b_left { l.row(b) } else { r.row(b) };
                ka.cmp(&kb)
            }
            None => Ordering::Equal,
        }
    };
    let mut lidx: Vec<usize> = (0..left.num_rows())
        .filter(|&i| lt[i].is_some() && key_valid(0, i))
        .collect();
    let mut ridx: Vec<usize> = (0..right.num_rows())
        .filter(|&i| rt[i].is_some() && key_valid(1, i))
        .collect();
    lidx.sort_by(|&a, &b| cmp_key(a, b, true, true).then(lt[a].cmp(&lt[b])));
    // Stable: among equal (key, time) the later input row wins.
    ridx.sort_by(|&a, &b| cmp_key(a, b, false, false).then(rt[a].cmp(&rt[b])));
    let mut matched: Vec<Option<u32>> = vec![None; left.num_rows()];
    let mut j = 0usize;
    let mut last: Option<usize> = None;
    for &i in &lidx {
        while j < ridx.len() {
            let r = ridx[j];
            let ord = cmp_key(r, i, false, true).then(rt[r].cmp(&lt[i]));
            if ord == Ordering::Greater {
                break;
            }
            last = Some(r);
            j += 1;
        }
        matched[i] = match last {
            Some(r) if cmp_key(r, i, false, true) == Ordering::Equal => u32::try_from(r).ok(),
            _ => None,
        };
    }
    let indices = UInt32Array::from(matched);
    let mut columns: Vec<ArrayRef> = left.columns().to_vec();
    for &c in &p.right_cols {
        let col = right.column(c);
        columns.push(if right.num_rows() == 0 {
            new_null_array(col.data_type(), left.num_rows())
        } else {
            take(col.as_ref(), &indices, None)?
        });
    }
    Ok(RecordBatch::try_new(p.schema, columns)?)
}

/// As-of join of two DataFrames: for each `left` row, the last `right` row whose time is
/// `<=` the left row's time (and, with `by`, whose `by` key is equal) — e.g. the prevailing
/// quote for each trade. Left rows without such a row get nulls (a left join, like pandas
/// `merge_asof(direction="backward")`).
///
/// * `on_time` names the time column of both sides (timestamp of any unit, or Int64 Unix
///   seconds). When it is `Epoch` and both sides carry an integer `Nanoseconds` column
///   (MarketStore tick tables) the time is `Epoch` + `Nanoseconds`.
/// * Output: left rows in their original order, with the columns of [`asof_schema`].
/// * Ties: among right rows with equal key and time, the last one in input order wins.
///
/// Both inputs are collected into memory (as-of joins need the sorted right side anyway).
pub async fn asof_join(
    left: DataFrame,
    right: DataFrame,
    on_time: &str,
    by: Option<&str>,
) -> Result<DataFrame> {
    let (state, left_plan) = left.into_parts();
    let left = DataFrame::new(state.clone(), left_plan);
    let left_schema = Arc::new(left.schema().as_arrow().clone());
    let right_schema = Arc::new(right.schema().as_arrow().clone());
    let l = concat_batches(&left_schema, &left.collect().await?)?;
    let r = concat_batches(&right_schema, &right.collect().await?)?;
    let joined = asof_join_batches(&l, &r, on_time, by)?;
    Ok(SessionContext::new_with_state(state).read_batch(joined)?)
}

/// SQL table function `asof_join('left_table', 'right_table', 'Epoch' [, 'Symbol'])`.
///
/// Registered by [`crate::register_all`]. Table names are resolved in the calling session
/// (quoted names such as `'AAPL/1Sec/TRADE'` are taken literally). The table providers must
/// answer `table()` without waiting (true for in-memory catalogs and most custom ones).
#[derive(Debug, Default)]
pub struct AsofJoinFunction;

fn string_arg(e: &Expr, what: &str) -> DfResult<String> {
    match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)),
            _,
        ) => Ok(s.clone()),
        other => plan_err!("asof_join: {what} must be a string literal, got {other}"),
    }
}

/// Poll a future that is expected to be immediately ready.
fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn lookup(state: &SessionState, name: &str) -> DfResult<Arc<dyn TableProvider>> {
    use datafusion::common::TableReference;
    // A name as written (MarketStore keys such as `AAPL/1Min/OHLCV` contain no dots), then,
    // for `schema.table` / `catalog.schema.table`, the parsed reference.
    let mut candidates = vec![TableReference::bare(name)];
    if name.contains('.') {
        candidates.push(TableReference::from(name));
    }
    for reference in candidates {
        let Ok(schema) = state.schema_for_ref(reference.clone()) else {
            continue;
        };
        match now_or_never(schema.table(reference.table())) {
            Some(Ok(Some(t))) => return Ok(t),
            Some(Ok(None)) => {}
            Some(Err(e)) => return Err(e),
            None => return plan_err!("asof_join: table {name:?} cannot be resolved synchronously"),
        }
    }
    plan_err!("asof_join: table {name:?} not found")
}

impl TableFunctionImpl for AsofJoinFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if !(3..=4).contains(&exprs.len()) {
            return plan_err!(
                "asof_join('left', 'right', 'time_column' [, 'by_column']) takes 3 or 4 arguments"
            );
        }
        let left = string_arg(&exprs[0], "left table")?;
        let right = string_arg(&exprs[1], "right table")?;
        let on = string_arg(&exprs[2], "time column")?;
        let by = exprs
            .get(3)
            .map(|e| string_arg(e, "by column"))
            .transpose()?;
        let Some(state) = args.session().as_any().downcast_ref::<SessionState>() else {
            return plan_err!("asof_join: unsupported session type");
        };
        let left = lookup(state, &left)?;
        let right = lookup(state, &right)?;
        let schema = asof_schema(&left.schema(), &right.schema(), &on, by.as_deref())?;
        Ok(Arc::new(AsofTable {
            left,
            right,
            on,
            by,
            schema,
        }))
    }
}

/// Table produced by the `asof_join` table function; computes the join when scanned.
#[derive(Debug)]
struct AsofTable {
    left: Arc<dyn TableProvider>,
    right: Arc<dyn TableProvider>,
    on: String,
    by: Option<String>,
    schema: SchemaRef,
}

#[async_trait::async_trait]
impl TableProvider for AsofTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let Some(state) = state.as_any().downcast_ref::<SessionState>() else {
            return Err(DataFusionError::Plan(
                "asof_join: unsupported session type".into(),
            ));
        };
        let ctx = SessionContext::new_with_state(state.clone());
        let left = ctx.read_table(self.left.clone())?;
        let right = ctx.read_table(self.right.clone())?;
        let joined = asof_join(left, right, &self.on, self.by.as_deref())
            .await?
            .collect()
            .await?;
        Ok(MemorySourceConfig::try_new_exec(
            &[joined],
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}
