//! `mkts import-marketstore --verify`: for every bucket, the row count and one checksum per column of the
//! MarketStore files (read as the import reads them, WAL included) against the imported bucket.
//!
//! A column's checksum is the wrapping sum over rows of FNV-1a of (Epoch, Nanoseconds, value), so it does
//! not depend on the order rows come back in (ties of equal time included) but any changed value, time
//! or missing row changes it.

use std::path::Path;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, Int8Array,
    RecordBatch, StringArray, TimestampSecondArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow::datatypes::DataType;

use super::importer::Source;
use super::MigrateError;
use crate::cli::connect::Client;
use crate::engine::{EPOCH, NANOSECONDS};

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn value_bytes(a: &ArrayRef, i: usize) -> Vec<u8> {
    macro_rules! le {
        ($t:ty) => {
            a.as_any().downcast_ref::<$t>().map(|x| x.value(i).to_le_bytes().to_vec()).unwrap_or_default()
        };
    }
    match a.data_type() {
        DataType::Int8 => le!(Int8Array),
        DataType::Int16 => le!(Int16Array),
        DataType::Int32 => le!(Int32Array),
        DataType::Int64 => le!(Int64Array),
        DataType::UInt8 => le!(UInt8Array),
        DataType::UInt16 => le!(UInt16Array),
        DataType::UInt32 => le!(UInt32Array),
        DataType::UInt64 => le!(UInt64Array),
        DataType::Float32 => le!(Float32Array),
        DataType::Float64 => le!(Float64Array),
        DataType::Boolean => a.as_any().downcast_ref::<BooleanArray>().map(|x| vec![x.value(i) as u8]).unwrap_or_default(),
        DataType::Utf8 => a.as_any().downcast_ref::<StringArray>().map(|x| x.value(i).as_bytes().to_vec()).unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn epochs(a: &ArrayRef) -> Vec<i64> {
    if let Some(x) = a.as_any().downcast_ref::<Int64Array>() {
        return x.values().to_vec();
    }
    if let Some(x) = a.as_any().downcast_ref::<TimestampSecondArray>() {
        return x.values().to_vec();
    }
    vec![0; a.len()]
}

/// Row count and per-column checksums (`Epoch` first: the times alone) of `batches`, columns by name.
pub fn checksums(batches: &[RecordBatch], columns: &[String]) -> (u64, Vec<u64>) {
    let mut sums = vec![0u64; columns.len() + 1];
    let mut rows = 0u64;
    for b in batches {
        let schema = b.schema();
        let Some((ei, _)) = schema.column_with_name(EPOCH) else { continue };
        let ep = epochs(b.column(ei));
        let ns: Vec<i32> = schema
            .column_with_name(NANOSECONDS)
            .and_then(|(i, _)| b.column(i).as_any().downcast_ref::<Int32Array>().map(|a| a.values().to_vec()))
            .filter(|_| !columns.iter().any(|c| c == NANOSECONDS))
            .unwrap_or_else(|| vec![0; b.num_rows()]);
        let cols: Vec<Option<&ArrayRef>> = columns.iter().map(|c| schema.column_with_name(c).map(|(i, _)| b.column(i))).collect();
        for r in 0..b.num_rows() {
            let (e, n) = (ep[r].to_le_bytes(), ns[r].to_le_bytes());
            sums[0] = sums[0].wrapping_add(fnv1a(&[&e, &n]));
            for (k, c) in cols.iter().enumerate() {
                let v = c.map(|c| value_bytes(c, r)).unwrap_or_default();
                sums[k + 1] = sums[k + 1].wrapping_add(fnv1a(&[&e, &n, &v]));
            }
        }
        rows += b.num_rows() as u64;
    }
    (rows, sums)
}

/// Compare every bucket of `source` with the destination; prints one line per bucket.
pub async fn verify(client: &mut Client, source: &Source, root: &Path) -> Result<(), MigrateError> {
    let _ = root;
    let mut problems = source.problems.clone();
    let mut differ = 0usize;
    println!("{:<32}  {:>12}  {:>12}  result", "bucket", "marketstore", "mkts");
    for key in source.keys() {
        let Some(b) = source.read_bucket(&key, &mut problems) else { continue };
        let names: Vec<String> = b.schema.columns.iter().map(|c| c.name.clone()).collect();
        let (src_rows, src_sums) = checksums(&b.batches, &names);
        let dst = client.sql(&format!("SELECT * FROM \"{}\"", b.key)).await;
        let (dst_rows, dst_sums) = match &dst {
            Ok((_, batches)) => checksums(batches, &names),
            Err(_) => (0, vec![0; names.len() + 1]),
        };
        let mut bad: Vec<String> = Vec::new();
        if dst.is_err() {
            bad.push("bucket missing".into());
        } else {
            if src_rows != dst_rows {
                bad.push("row count".into());
            }
            if src_sums[0] != dst_sums[0] {
                bad.push("Epoch/Nanoseconds".into());
            }
            for (i, n) in names.iter().enumerate() {
                if src_sums[i + 1] != dst_sums[i + 1] {
                    bad.push(n.clone());
                }
            }
        }
        let result = if bad.is_empty() { "ok".to_string() } else { format!("DIFFERS: {}", bad.join(", ")) };
        if !bad.is_empty() {
            differ += 1;
        }
        println!("{key:<32}  {src_rows:>12}  {dst_rows:>12}  {result}");
    }
    for p in &problems {
        eprintln!("skipped: {p}");
    }
    if differ > 0 {
        return Err(MigrateError::Mismatch(differ));
    }
    if !problems.is_empty() {
        return Err(MigrateError::Incomplete(problems.len()));
    }
    println!("verify: every bucket matches the MarketStore files");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn order_independent_and_value_sensitive() {
        let mk = |e: Vec<i64>, v: Vec<f32>| {
            let s = Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new("Epoch", DataType::Int64, false),
                arrow::datatypes::Field::new("P", DataType::Float32, false),
            ]));
            RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(e)), Arc::new(Float32Array::from(v))]).unwrap()
        };
        let cols = vec!["P".to_string()];
        let a = checksums(&[mk(vec![1, 2], vec![1.0, 2.0])], &cols);
        let b = checksums(&[mk(vec![2, 1], vec![2.0, 1.0])], &cols);
        assert_eq!(a, b);
        let c = checksums(&[mk(vec![1, 2], vec![1.0, 2.5])], &cols);
        assert_eq!(a.1[0], c.1[0]);
        assert_ne!(a.1[1], c.1[1]);
    }
}
