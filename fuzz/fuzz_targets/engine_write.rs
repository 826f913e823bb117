#![no_main]
// See mkts::fuzzing and docs/fuzzing.md for the input format.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mkts::fuzzing::engine_write(data);
});
