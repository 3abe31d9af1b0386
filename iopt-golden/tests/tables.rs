//! Every table iopt ships, replayed against both embedded sets of Linux's recorded answers
//! (the 470-case matrix and the 160 random cases): LpaeTable, AllocOpsTable with each
//! FreePolicy, PreallocTable, and the facade with each backend.
//!
//! Each test prints its table's summary per set (calls compared, allowed differences by kind,
//! resynchronisations) and requires no unexplained mismatch, at least 99 % of the recorded
//! calls compared, and no leaked or doubly freed table page.

mod common;

use common::tables::{SUBJECTS, Subject, replay_checked};

/// The share of recorded calls every table must replay and compare.
const MIN_COMPARED: f64 = 0.99;

fn check(subject: &Subject) {
    for (set, cases) in iopt_golden::embedded_sets().expect("embedded data parses") {
        let (summary, leaks) = replay_checked(subject, &cases);
        println!("\n== {} on the {set} set\n{summary}", subject.name);
        assert!(summary.all_passed(), "{} on {set}: {summary}", subject.name);
        assert!(
            summary.compared_fraction() >= MIN_COMPARED,
            "{} on {set}: only {:.2} % of the calls compared\n{summary}",
            subject.name,
            100.0 * summary.compared_fraction()
        );
        assert_eq!(summary.cases, cases.len());
        assert!(leaks.is_empty(), "{leaks:#?}");
    }
}

#[test]
fn lpae_table() {
    check(&SUBJECTS[0]);
}

#[test]
fn alloc_ops_linux_free_policy() {
    check(&SUBJECTS[1]);
}

#[test]
fn alloc_ops_empty_tables_free_policy() {
    check(&SUBJECTS[2]);
}

#[test]
fn prealloc_table() {
    check(&SUBJECTS[3]);
}

#[test]
fn facade_alloc_ops_backend() {
    check(&SUBJECTS[4]);
}

#[test]
fn facade_prealloc_backend() {
    check(&SUBJECTS[5]);
}
