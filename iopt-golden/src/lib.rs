//! # iopt-golden: Linux's own answers, and a replay that checks iopt against them
//!
//! **What.** This crate embeds two recordings of Linux's `io-pgtable-arm` (modern semantics:
//! the v6.13 no-split and run-per-granule changes, the v6.14 stage-2 concatenation rule, S2FWB
//! and NO_WARN): `data/lpae_modern_matrix.jsonl`, 470 cases over the configuration space
//! ([`cases`]), and `data/lpae_modern_random_dev.jsonl`, 160 cases of random calls
//! ([`random_cases`]). Each case is a table configuration, the calls made on it with what Linux
//! returned, and the final tree bit for bit. The crate parses them (or any file in the same
//! schema, with [`parse`]) into typed [`Case`]s and replays them against any [`IoPageTable`],
//! comparing by the rules of the crate's README.
//!
//! **Why.** iopt claims to behave exactly like modern Linux except in a short list of
//! deliberate, safer differences (typed errors for misaligned or end-of-range runs, no
//! silent subtree drop, whole-run maps, a MAIR without sign extension, optional eager freeing
//! of empty tables). Reading the Linux source is not proof; matching Linux's recorded outputs
//! call for call is. The replay accepts each deliberate difference only under the condition
//! that justifies it, counts it by kind, and reports everything else as a mismatch naming the
//! case, the op and both values. Equal answers are not enough: for block maps the replay also
//! predicts what Linux's call did to the tree and checks the table's leaves against it. Where a
//! deliberate difference leaves the trees apart (Linux tore tables down, iopt refused), the
//! replay brings the table to Linux's tree through the public API, counts a
//! resynchronisation ([`Resync`]) and goes on, so nearly every recorded call is compared.
//!
//! The data is compiled in with `include_str!`, so tests need no file outside this crate. The
//! `replay` example (`cargo run -p iopt-golden --example replay -- FILE...`) runs recorded
//! files through every table iopt ships.
//!
//! ```
//! let cases = iopt_golden::cases()?;
//! assert_eq!(cases.len(), iopt_golden::CASE_COUNT);
//! // Check what a Config alone can answer, for every case.
//! for case in &cases {
//!     let report = iopt_golden::check_config(case);
//!     assert!(report.passed(), "{report}");
//! }
//! # Ok::<(), iopt_golden::GoldenError>(())
//! ```
//!
//! With a table implementation, [`replay_all`] does the whole comparison. `build` receives
//! each accepted configuration and returns the table, boxed or behind any other pointer:
//!
//! ```
//! use iopt_api::{Config, IoPageTable};
//!
//! fn conformance(
//!     build: impl FnMut(Config) -> Box<dyn IoPageTable>,
//! ) -> Result<(), iopt_golden::GoldenError> {
//!     let summary = iopt_golden::replay_all(&iopt_golden::cases()?, build);
//!     assert!(summary.all_passed(), "{summary}");
//!     Ok(())
//! }
//! ```
//!
//! [`IoPageTable`]: iopt_api::IoPageTable

mod case;
mod replay;

pub use case::{
    Allocated, Case, CfgOut, FinalState, Flushes, Geom, GoldenError, IovaToPhysOp, Kind, Leaf,
    MapOp, Op, Outcome, RegsOut, UnmapOp, parse,
};
pub use replay::{
    AllowedDifference, CaseReport, Mismatch, Resync, Step, Stop, Summary, check_config, replay,
    replay_all,
};

/// The matrix, as embedded at build time (JSON Lines, one case a line).
pub const DATA: &str = include_str!("../data/lpae_modern_matrix.jsonl");

/// The SHA-256 of [`DATA`], as published with the data.
pub const DATA_SHA256: &str = "9e4676a1354fcdb24d1f6b7b124ad711d7a1b37a84cdc31796513d78a2d161e7";

/// The number of cases in [`DATA`].
pub const CASE_COUNT: usize = 470;

/// Parses every case of the embedded matrix.
///
/// # Errors
///
/// A [`GoldenError`] if the embedded data does not follow the schema (it does; the error
/// exists so that a replaced data file fails cleanly).
pub fn cases() -> Result<Vec<Case>, GoldenError> {
    parse(DATA)
}

/// The random development set, as embedded at build time: 160 cases of random calls recorded
/// from Linux in the matrix's schema, with `kind` `"random"` (see `data/README.md`).
pub const RANDOM_DATA: &str = include_str!("../data/lpae_modern_random_dev.jsonl");

/// The SHA-256 of [`RANDOM_DATA`], as published with the data.
pub const RANDOM_DATA_SHA256: &str =
    "0acfd230fe8df41d2cf8432e74e4ceed004de51a4edb7e78fd9592e8d8bb550b";

/// The number of cases in [`RANDOM_DATA`].
pub const RANDOM_CASE_COUNT: usize = 160;

/// Parses every case of the embedded random set.
///
/// # Errors
///
/// A [`GoldenError`] if the embedded data does not follow the schema.
pub fn random_cases() -> Result<Vec<Case>, GoldenError> {
    parse(RANDOM_DATA)
}

/// Both embedded sets by name, for replays that cover everything: `("matrix", ...)` and
/// `("random", ...)`.
///
/// # Errors
///
/// A [`GoldenError`] if either set does not follow the schema.
pub fn embedded_sets() -> Result<[(&'static str, Vec<Case>); 2], GoldenError> {
    Ok([("matrix", cases()?), ("random", random_cases()?)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn embedded_data_is_the_published_file() {
        assert_eq!(DATA.len(), 1_264_288);
        assert_eq!(DATA.lines().count(), CASE_COUNT);
    }

    #[test]
    fn embedded_random_set_is_the_published_file() {
        assert_eq!(RANDOM_DATA.len(), 2_817_502);
        assert_eq!(RANDOM_DATA.lines().count(), RANDOM_CASE_COUNT);
    }

    #[test]
    fn random_set_parses_with_its_own_kind_and_counts() {
        let cases = random_cases().unwrap();
        assert_eq!(cases.len(), RANDOM_CASE_COUNT);
        assert!(
            cases
                .iter()
                .all(|c| c.kind == "random" && c.matrix_kind().is_none())
        );
        assert_eq!(cases.iter().map(|c| c.ops().len()).sum::<usize>(), 18_801);
        let (mut map, mut unmap, mut lookup) = (BTreeMap::new(), 0, 0);
        for op in cases.iter().flat_map(Case::ops) {
            match op {
                Op::Map(m) => *map.entry(m.ret).or_insert(0) += 1,
                Op::Unmap(_) => unmap += 1,
                Op::IovaToPhys(_) => lookup += 1,
            }
        }
        assert_eq!(
            map,
            [(0, 4721), (-17, 2612), (-22, 693), (-34, 534)]
                .into_iter()
                .collect()
        );
        assert_eq!((unmap, lookup), (5576, 4665));
        let leaves: usize = cases
            .iter()
            .filter_map(Case::allocated)
            .map(|a| a.final_state.leaves.len())
            .sum();
        assert_eq!(leaves, 15_541);
    }

    #[test]
    fn any_kind_string_is_accepted() {
        let line = DATA
            .lines()
            .next()
            .unwrap()
            .replace("\"kind\":\"selftest\"", "\"kind\":\"my own recording\"");
        let c = &parse(&line).unwrap()[0];
        assert_eq!(
            (c.kind.as_str(), c.matrix_kind()),
            ("my own recording", None)
        );
    }

    #[test]
    fn parses_all_cases_and_ops() {
        let cases = cases().unwrap();
        assert_eq!(cases.len(), 470);
        assert_eq!(cases.iter().map(|c| c.ops().len()).sum::<usize>(), 10_421);
        assert!(cases.iter().enumerate().all(|(i, c)| c.number == i));
        assert!(cases.iter().all(|c| c.semantics == "modern"));
    }

    #[test]
    fn counts_match_the_readme() {
        let cases = cases().unwrap();
        assert_eq!(cases.iter().filter(|c| c.alloc_failed()).count(), 112);
        let mut by_kind: BTreeMap<Kind, (usize, usize)> = BTreeMap::new();
        for c in &cases {
            let e = by_kind.entry(c.matrix_kind().unwrap()).or_default();
            e.0 += 1;
            e.1 += usize::from(c.alloc_failed());
        }
        let expected = [
            (Kind::Selftest, (258, 75)),
            (Kind::IasGtOas, (45, 3)),
            (Kind::Quirks, (54, 11)),
            (Kind::OddBitmap, (27, 8)),
            (Kind::OddAddrSize, (58, 15)),
            (Kind::Noncoherent, (10, 0)),
            (Kind::ProtMatrix, (14, 0)),
            (Kind::Pa52, (4, 0)),
        ];
        assert_eq!(by_kind, expected.into_iter().collect());

        let ops = cases.iter().flat_map(Case::ops);
        let (mut map, mut unmap, mut lookup) = (BTreeMap::new(), 0, 0);
        let mut unmap_zero = 0;
        for op in ops {
            match op {
                Op::Map(m) => *map.entry(m.ret).or_insert(0) += 1,
                Op::Unmap(u) => {
                    unmap += 1;
                    unmap_zero += usize::from(u.ret == 0);
                }
                Op::IovaToPhys(_) => lookup += 1,
            }
        }
        assert_eq!(
            map,
            [(0, 3278), (-17, 1131), (-22, 448), (-34, 44)]
                .into_iter()
                .collect()
        );
        assert_eq!((unmap, unmap_zero, lookup), (1489, 384, 4031));
        let leaves: usize = cases
            .iter()
            .filter_map(Case::allocated)
            .map(|a| a.final_state.leaves.len())
            .sum();
        assert_eq!(leaves, 2185);
    }

    #[test]
    fn typed_fields_are_parsed() {
        let cases = cases().unwrap();
        let c = &cases[0];
        assert_eq!(
            (c.matrix_kind(), c.format),
            (Some(Kind::Selftest), iopt_api::Format::Arm64S1)
        );
        assert_eq!(
            (c.pgsize_bitmap_in, c.ias_in, c.oas_in),
            (0x4020_1000, 32, 32)
        );
        let a = c.allocated().unwrap();
        assert_eq!(
            a.geom,
            Geom {
                granule: 0x1000,
                start_level: 1,
                pgd_entries: 4
            }
        );
        match a.cfg_out.regs {
            RegsOut::Stage1 { tcr, mair } => {
                assert_eq!(mair, 0xffff_ffff_f404_ff44);
                assert_eq!((tcr.ips, tcr.sh, tcr.tsz), (0, 3, 32));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            a.ops[3],
            Op::Map(MapOp {
                iova: 0,
                paddr: 0,
                pgsize: 0x1000,
                pgcount: 1,
                prot: 15,
                ret: 0,
                mapped: 0x1000
            })
        );
    }

    #[test]
    fn derived_table_count_equals_linux_without_empty_tables() {
        // README: 146 allocated cases end with an empty table; in the other 212 the derived
        // count equals tables_per_level.
        let cases = cases().unwrap();
        let (mut equal, mut differ) = (0, 0);
        for c in &cases {
            let Some(a) = c.allocated() else { continue };
            let cfg = iopt_api::Config::new(c.config_input()).unwrap();
            let derived = a.final_state.derived_tables_per_level(&cfg);
            if derived == a.final_state.tables_per_level {
                equal += 1;
            } else {
                differ += 1;
            }
        }
        assert_eq!((equal, differ), (212, 146));
    }

    #[test]
    fn parse_errors_name_the_line() {
        let bad = DATA
            .lines()
            .next()
            .unwrap()
            .replace("\"0x40201000\"", "\"40201000\"");
        let text = format!("{}\n{bad}\n", DATA.lines().next().unwrap());
        let err = parse(&text).unwrap_err();
        assert!(matches!(err, GoldenError::Parse { line: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("0x prefix"), "{err}");
        // Case numbers may start anywhere and skip, but must increase.
        let mut lines = DATA.lines();
        let (first, second) = (lines.next().unwrap(), lines.next().unwrap());
        let renumbered = format!(
            "{}\n{}\n",
            first.replace("\"case\":0", "\"case\":7"),
            second.replace("\"case\":1", "\"case\":9")
        );
        let parsed = parse(&renumbered).unwrap();
        assert_eq!(parsed.iter().map(|c| c.number).collect::<Vec<_>>(), [7, 9]);
        let repeated = format!(
            "{}\n{}\n",
            first.replace("\"case\":0", "\"case\":7"),
            second.replace("\"case\":1", "\"case\":7")
        );
        assert!(matches!(
            parse(&repeated),
            Err(GoldenError::OutOfOrder {
                line: 2,
                expected: 8,
                found: 7
            })
        ));
        let bad = DATA
            .lines()
            .next()
            .unwrap()
            .replace("ARM_64_LPAE_S1", "ARM_V7S");
        let err = parse(&bad).unwrap_err();
        assert!(err.to_string().contains("ARM_V7S"), "{err}");
    }
}
