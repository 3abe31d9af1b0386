//! The checkers under `cargo test`, on random inputs within a time budget (arbtest): the same
//! functions the fuzz targets call.

use std::time::Duration;

fn budget(ms: u64) -> u64 {
    std::env::var("IOPT_CHECKERS_BUDGET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ms)
}

fn prop(
    name: &str,
    ms: u64,
    check: fn(&mut arbitrary::Unstructured<'_>) -> arbitrary::Result<iopt_checkers::Outcome>,
) {
    let start = std::time::Instant::now();
    let mut runs = 0u64;
    arbtest::arbtest(|u| {
        runs += 1;
        if let Err(f) = check(u)? {
            panic!("{name}: {f}");
        }
        Ok(())
    })
    .budget(Duration::from_millis(budget(ms)));
    eprintln!("{name}: {runs} inputs in {:?}", start.elapsed());
}

#[test]
fn differential() {
    prop(
        "differential",
        8000,
        iopt_checkers::differential::check_unstructured,
    );
}

#[test]
fn faults() {
    prop("faults", 8000, iopt_checkers::faults::check_unstructured);
}

#[test]
fn config() {
    prop("config", 3000, iopt_checkers::config::check_unstructured);
}

#[test]
fn descriptor() {
    prop(
        "descriptor",
        2000,
        iopt_checkers::descriptor::check_unstructured,
    );
}
