//! Concurrency stress: 4 threads on disjoint, interleaved ranges sharing every table, random
//! operations on Design 1 (Linux and eager freeing) and Design 2 (with reservations), then
//! the quiescent-state checks, the model replay, a concurrent teardown and the leak check.
//!
//! The `shared_tables_*` tests run `stress::shared_tables` on each table for
//! `IOPT_STRESS_SECS` (default 1 s; hunting wants e.g. `IOPT_STRESS_SECS=300 cargo test
//! --release -p iopt-checkers --test stress shared`), one table at a time.

use iopt_checkers::lane::Design;
use iopt_checkers::stress;

fn ops() -> u64 {
    std::env::var("IOPT_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn run(design: Design) {
    for round in 0..4u64 {
        match stress::run(design, 4, ops(), 0x5eed + round) {
            Ok(r) => eprintln!("{design:?} round {round}: {r:?}"),
            Err(f) => panic!("{design:?} round {round}:\n{f}"),
        }
    }
}

#[test]
fn design1_linux_freeing() {
    run(Design::D1);
}

#[test]
fn design1_eager_freeing() {
    run(Design::D1_EAGER);
}

#[test]
fn design2_with_reservations() {
    run(Design::D2);
}

/// `IOPT_STRESS_SECS` (fractions allowed) or 1 s per table for the shared-table stress.
fn shared_budget() -> iopt_checkers::races::Budget {
    let secs = std::env::var("IOPT_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(1.0);
    iopt_checkers::races::Budget {
        time: std::time::Duration::from_secs_f64(secs),
        hang: std::time::Duration::from_secs(10),
    }
}

/// The shared-table stress runs one table at a time, so its threads get both cores.
static SHARED_ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Block churn beside 4 KiB traffic in one level-2 table with lookups checked right after
/// each own map, and overlapping calls beside watched bystanders, on one table:
/// `IOPT_STRESS_THREADS` threads (default 2) for `IOPT_STRESS_SECS`, mixing both shapes in
/// bursts (`IOPT_STRESS_SHAPES=disjoint` or `overlap` for one alone).
fn shared(table: stress::Table) {
    let _one = SHARED_ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let threads = std::env::var("IOPT_STRESS_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let shapes = match std::env::var("IOPT_STRESS_SHAPES").as_deref() {
        Ok("disjoint") => stress::Shapes::Disjoint,
        Ok("overlap") => stress::Shapes::Overlap,
        _ => stress::Shapes::Both,
    };
    match stress::shared_tables(table, shapes, threads, u64::MAX, 0x5eed, &shared_budget()) {
        Ok(r) => eprintln!(
            "shared tables {table:?} {shapes:?}, {threads} threads: {} rounds in {:.2} s",
            r.rounds,
            r.elapsed.as_secs_f64()
        ),
        Err(f) => panic!("shared tables {table:?} {shapes:?}, {threads} threads: {f}"),
    }
}

#[test]
fn shared_tables_design1_linux_freeing() {
    shared(stress::Table::D1);
}

#[test]
fn shared_tables_design1_eager_freeing() {
    shared(stress::Table::D1Eager);
}

#[test]
fn shared_tables_design2_live_counts() {
    shared(stress::Table::D2);
}

#[test]
fn shared_tables_design2_reservation_counts() {
    shared(stress::Table::D2Reservations);
}
