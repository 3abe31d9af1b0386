//! Fuzz target `faults`: a thin shim over `iopt_checkers::faults::check_bytes`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = iopt_checkers::faults::check_bytes(data) {
        panic!("{failure}");
    }
});
