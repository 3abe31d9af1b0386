//! Fuzz target `stress`: a thin shim over `iopt_checkers::stress::check_bytes` (the bytes
//! pick the table, threads, operations and seed of one shared-table stress run).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = iopt_checkers::stress::check_bytes(data) {
        panic!("{failure}");
    }
});
