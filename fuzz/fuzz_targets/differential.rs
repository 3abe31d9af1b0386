//! Fuzz target `differential`: a thin shim over `iopt_checkers::differential::check_bytes`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = iopt_checkers::differential::check_bytes(data) {
        panic!("{failure}");
    }
});
