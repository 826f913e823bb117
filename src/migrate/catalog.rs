//! The catalog walk: MarketStore's `SYMBOL/TIMEFRAME/ATTRGROUP/<year>.bin` tree (§1.1).
//!
//! As MarketStore's `catalog.NewDirectory` does, a directory without a `category_name` file is skipped and
//! `metadata.db` is ignored; a `.bin` file whose base name is not a year is ignored. The walk hard-codes
//! the three levels MarketStore's code paths assume.

use std::path::{Path, PathBuf};

use super::{MigrateError, Problem};

/// One `<year>.bin` data file and the bucket it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DataFile {
    /// `SYMBOL/TIMEFRAME/ATTRGROUP`, as the directories spell it.
    pub key: String,
    pub year: i64,
    pub path: PathBuf,
    /// Path relative to the root, as MarketStore's WAL names it (`AAPL/1Min/OHLCV/2020.bin`).
    pub rel: String,
}

/// What the walk found: data files (sorted by key, year) and the WAL files in the root (sorted by name).
#[derive(Debug, Default)]
pub struct Tree {
    pub files: Vec<DataFile>,
    pub wal_files: Vec<PathBuf>,
    pub problems: Vec<Problem>,
}

fn subdirs(dir: &Path, problems: &mut Vec<Problem>) -> Result<Vec<(String, PathBuf)>, MigrateError> {
    let rd = std::fs::read_dir(dir).map_err(|e| MigrateError::Io { path: dir.to_path_buf(), source: e })?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| MigrateError::Io { path: dir.to_path_buf(), source: e })?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "metadata.db" || name.starts_with('.') {
            continue;
        }
        if !path.join("category_name").is_file() {
            problems.push(Problem::whole(&path, "directory without a category_name file is skipped (as MarketStore does)"));
            continue;
        }
        out.push((name, path));
    }
    out.sort();
    Ok(out)
}

/// Walk a MarketStore root.
pub fn walk(root: &Path) -> Result<Tree, MigrateError> {
    if !root.join("category_name").is_file() {
        return Err(MigrateError::Config(format!(
            "{} is not a MarketStore data directory (no category_name file in it)",
            root.display()
        )));
    }
    let mut tree = Tree::default();
    let rd = std::fs::read_dir(root).map_err(|e| MigrateError::Io { path: root.to_path_buf(), source: e })?;
    for entry in rd {
        let entry = entry.map_err(|e| MigrateError::Io { path: root.to_path_buf(), source: e })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("WALFile.") && name.ends_with(".walfile") && entry.path().is_file() {
            tree.wal_files.push(entry.path());
        }
    }
    // WALFile.<UTC unix nanos>.walfile: by number, so files of different digit counts still come in
    // creation order.
    tree.wal_files.sort_by_key(|p| {
        let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let num = n.trim_start_matches("WALFile.").trim_end_matches(".walfile").parse::<u128>().unwrap_or(u128::MAX);
        (num, n)
    });
    let mut problems = Vec::new();
    for (sym, sym_dir) in subdirs(root, &mut problems)? {
        for (tf, tf_dir) in subdirs(&sym_dir, &mut problems)? {
            for (group, group_dir) in subdirs(&tf_dir, &mut problems)? {
                let rd = std::fs::read_dir(&group_dir).map_err(|e| MigrateError::Io { path: group_dir.clone(), source: e })?;
                for entry in rd {
                    let entry = entry.map_err(|e| MigrateError::Io { path: group_dir.clone(), source: e })?;
                    let fname = entry.file_name().to_string_lossy().into_owned();
                    let Some(base) = fname.strip_suffix(".bin") else { continue };
                    let Ok(year) = base.parse::<i64>() else { continue };
                    tree.files.push(DataFile {
                        key: format!("{sym}/{tf}/{group}"),
                        year,
                        path: entry.path(),
                        rel: format!("{sym}/{tf}/{group}/{fname}"),
                    });
                }
            }
        }
    }
    tree.files.sort();
    tree.problems = problems;
    Ok(tree)
}
