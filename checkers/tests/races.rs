//! Race hunts (`iopt_checkers::races`), one test per finding per affected table: Design 2
//! (`d2_*`), Design 1 with eager freeing (`d1e_*`) and, as a control where the finding can
//! apply, Design 1 with Linux freeing (`d1_linux_*`).
//!
//! Each hunt stops at its first failure or after `IOPT_RACE_SECS` seconds (default 3, so the
//! whole file stays well under a minute on 2 cores; hunting for real wants
//! `IOPT_RACE_SECS=120 cargo test -p iopt-checkers --release --test races`). A thread that
//! makes no progress for `IOPT_RACE_HANG_SECS` (default 10) fails the test as a hang.
//! The stalled-walk tests stop at 100,000 cycles.

use iopt_checkers::lane::Design;
use iopt_checkers::races::{self, Budget, RaceResult};
use std::sync::{Mutex, MutexGuard, PoisonError};

const DEFAULT_SECS: f64 = 3.0;

/// The hunts run one at a time: each gets both cores (their threads then truly run in
/// parallel, which is what finds races) and the stalled-walk timings are not disturbed.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn budget() -> Budget {
    Budget::from_env(DEFAULT_SECS)
}

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `IOPT_RACE_SHAPE=blocks,smalls` overrides the thread counts of the lookup hunts.
fn shape() -> (usize, usize) {
    std::env::var("IOPT_RACE_SHAPE")
        .ok()
        .and_then(|v| {
            let (b, s) = v.split_once(',')?;
            Some((b.trim().parse().ok()?, s.trim().parse().ok()?))
        })
        .unwrap_or((1, 1))
}

fn check(name: &str, hunt: impl FnOnce() -> RaceResult) {
    let _one = serial();
    match hunt() {
        Ok(r) => eprintln!(
            "{name}: {} rounds in {:.2} s, no failure {:?}",
            r.rounds,
            r.elapsed.as_secs_f64(),
            r.notes
        ),
        Err(f) => panic!("{name}: {f}"),
    }
}

/// Block threads and page threads in one level-2 table (one of each unless
/// `IOPT_RACE_SHAPE` says otherwise).
fn lookup_after_map(design: Design) {
    let (blocks, smalls) = shape();
    check(
        &format!("lookup_after_map {design:?} {blocks},{smalls}"),
        || races::lookup_after_map(design, blocks, smalls, &budget()),
    );
}

#[test]
fn d2_lookup_finds_own_fresh_map() {
    lookup_after_map(Design::D2);
}

#[test]
fn d1e_lookup_finds_own_fresh_map() {
    lookup_after_map(Design::D1_EAGER);
}

#[test]
fn d1_linux_lookup_finds_own_fresh_map() {
    lookup_after_map(Design::D1);
}

#[test]
fn d2_double_unmap_spares_bystander() {
    check("double_unmap D2", || {
        races::double_unmap(Design::D2, &budget())
    });
}

#[test]
fn d1e_double_unmap_spares_bystander() {
    check("double_unmap D1E", || {
        races::double_unmap(Design::D1_EAGER, &budget())
    });
}

#[test]
fn d1_linux_double_unmap_spares_bystander() {
    check("double_unmap D1", || {
        races::double_unmap(Design::D1, &budget())
    });
}

#[test]
fn d2_overlap_chaos_no_damage_hang_or_leak() {
    check("overlap_chaos D2", || {
        races::overlap_chaos(Design::D2, 3, &budget())
    });
}

#[test]
fn d1e_overlap_chaos_no_damage_hang_or_leak() {
    check("overlap_chaos D1E", || {
        races::overlap_chaos(Design::D1_EAGER, 3, &budget())
    });
}

#[test]
fn d1_linux_overlap_chaos_no_damage_hang_or_leak() {
    check("overlap_chaos D1", || {
        races::overlap_chaos(Design::D1, 3, &budget())
    });
}

fn stalled_walk(design: Design) {
    let _one = serial();
    match races::stalled_walk(design, 100_000, &budget()) {
        Ok(r) => {
            let p = r.problems();
            assert!(
                p.is_empty(),
                "stalled_walk {design:?}: {}\n{r:?}",
                p.join("; ")
            );
            eprintln!("stalled_walk {design:?}: {r:?}");
        }
        Err(f) => panic!("stalled_walk {design:?}: {f}"),
    }
}

#[test]
fn d2_stalled_walk_keeps_freeing() {
    stalled_walk(Design::D2);
}

#[test]
fn d1e_stalled_walk_keeps_freeing() {
    stalled_walk(Design::D1_EAGER);
}
