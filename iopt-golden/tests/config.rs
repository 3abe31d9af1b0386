//! What `Config` alone can answer, checked for every golden case: allocation outcome,
//! restricted page-size bitmap, clamped address sizes and walk geometry.
//!
//! This is written out field by field, independently of the crate's `check_config`, so that
//! a failure prints the inputs next to Linux's and iopt's values.

use iopt_api::Config;
use iopt_golden::Case;

fn inputs(c: &Case) -> String {
    format!(
        "case {} ({}, {}): bitmap {:#x}, ias {}, oas {}, quirks {:#x}, coherent {}",
        c.number,
        c.kind,
        c.format,
        c.pgsize_bitmap_in,
        c.ias_in,
        c.oas_in,
        c.quirks,
        c.coherent_walk
    )
}

#[test]
fn config_matches_linux_for_every_case() {
    let cases = iopt_golden::cases().expect("embedded data parses");
    assert_eq!(cases.len(), iopt_golden::CASE_COUNT);
    let mut problems = Vec::new();
    let mut failed_as_linux = 0;
    for c in &cases {
        match (c.allocated(), Config::new(c.config_input())) {
            (None, Err(_)) => failed_as_linux += 1,
            (None, Ok(cfg)) => problems.push(format!(
                "{}: Linux failed allocation, Config::new accepted it: {cfg:?}",
                inputs(c)
            )),
            (Some(_), Err(e)) => problems.push(format!(
                "{}: Linux allocated, Config::new failed: {e} ({e:?})",
                inputs(c)
            )),
            (Some(a), Ok(cfg)) => {
                let fields = [
                    (
                        "pgsize_bitmap",
                        a.cfg_out.pgsize_bitmap,
                        cfg.page_sizes().bits(),
                    ),
                    ("ias", a.cfg_out.ias.into(), cfg.ias().into()),
                    ("oas", a.cfg_out.oas.into(), cfg.oas().into()),
                    ("granule", a.geom.granule, cfg.granule().size()),
                    (
                        "start_level",
                        a.geom.start_level.into(),
                        cfg.start_level().into(),
                    ),
                    ("pgd_entries", a.geom.pgd_entries, cfg.pgd_entries() as u64),
                ];
                for (name, linux, iopt) in fields {
                    if linux != iopt {
                        problems.push(format!(
                            "{}: {name}: Linux {linux:#x}, iopt {iopt:#x}",
                            inputs(c)
                        ));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} disagreements:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(failed_as_linux, 112);
}

#[test]
fn check_config_agrees() {
    let cases = iopt_golden::cases().expect("embedded data parses");
    let summary =
        iopt_golden::Summary::from_reports(cases.iter().map(iopt_golden::check_config).collect());
    assert!(summary.all_passed(), "{summary}");
    assert_eq!(
        (summary.alloc_failed_expected, summary.alloc_failed_matched),
        (112, 112)
    );
}
