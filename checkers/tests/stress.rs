//! Concurrency stress: 4 threads on disjoint, interleaved ranges sharing every table, random
//! operations on Design 1 (Linux and eager freeing) and Design 2 (with reservations), then
//! the quiescent-state checks, the model replay, a concurrent teardown and the leak check.

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
