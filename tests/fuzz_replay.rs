//! Replays every committed fuzz input (fuzz/seeds, fuzz/corpus, fuzz/artifacts-replay: one directory per
//! target) through the same entry points the fuzz targets call (`mkts::fuzzing`), without libFuzzer: each
//! must return (an error answer is fine) instead of panicking. Crash inputs found by fuzzing stay here as
//! regression tests (docs/fuzzing.md).

use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn replay(target: &str) {
    let (n, failures) = replay_kinds(target, &["seeds", "corpus", "artifacts-replay"]);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(n > 0, "no committed inputs for fuzz target {target}");
}

/// Replay the inputs under `fuzz/<kind>/<target>/`: how many ran, and the panics (file: message).
fn replay_kinds(target: &str, kinds: &[&str]) -> (usize, Vec<String>) {
    let (_, run) = mkts::fuzzing::TARGETS.iter().find(|(n, _)| *n == target).expect("known target");
    let mut n = 0;
    let mut failures = Vec::new();
    for kind in kinds {
        for f in inputs(kind, target) {
            let data = std::fs::read(&f).expect("readable input");
            if let Err(e) = std::panic::catch_unwind(|| run(&data)) {
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                failures.push(format!("{} panicked: {}", f.display(), msg.unwrap_or_default()));
            }
            n += 1;
        }
    }
    (n, failures)
}

/// Crashes found by fuzzing whose fix is not in yet (docs/fuzzing.md): they move to artifacts-replay with it.
#[test]
#[ignore]
fn pending_crashes() {
    let failures: Vec<String> = mkts::fuzzing::TARGETS.iter().flat_map(|(t, _)| replay_kinds(t, &["artifacts-pending"]).1).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rpc_msgpack() {
    replay("rpc_msgpack");
}

#[test]
fn rpc_json() {
    replay("rpc_json");
}

#[test]
fn numpy_multidataset() {
    replay("numpy_multidataset");
}

#[test]
fn flight_ticket() {
    replay("flight_ticket");
}

#[test]
fn flight_sql_command() {
    replay("flight_sql_command");
}

#[test]
fn ws_message() {
    replay("ws_message");
}

#[test]
fn config_yaml() {
    replay("config_yaml");
}

#[test]
fn csv_control() {
    replay("csv_control");
}

#[test]
fn wal_record() {
    replay("wal_record");
}

#[test]
fn manifest() {
    replay("manifest");
}

#[test]
fn every_target_is_replayed() {
    let names: Vec<&str> = mkts::fuzzing::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        ["rpc_msgpack", "rpc_json", "numpy_multidataset", "flight_ticket", "flight_sql_command", "ws_message", "config_yaml", "csv_control", "wal_record", "manifest", "engine_write"]
    );
    for n in names {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("fuzz_targets").join(format!("{n}.rs"));
        assert!(bin.exists(), "fuzz target {n} has no fuzz/fuzz_targets/{n}.rs");
    }
}

#[test]
fn engine_write() {
    replay("engine_write");
}
