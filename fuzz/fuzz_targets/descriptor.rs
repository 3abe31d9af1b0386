//! Fuzz target `descriptor`: a thin shim over `iopt_checkers::descriptor::check_bytes`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = iopt_checkers::descriptor::check_bytes(data) {
        panic!("{failure}");
    }
});
