//! `Config`'s geometry accessors are total: every level and every IOVA gives an answer, never
//! an overflow.

use iopt_api::{Config, ConfigInput, Format, Granule, PageSizes, Quirks};
use proptest::prelude::*;

/// One configuration per granule and format family, TTBR1 and Mali included.
fn configs() -> Vec<Config> {
    let mut out = Vec::new();
    for (sizes, ias, oas) in [
        (PageSizes::GRANULE_4K, 48, 48),
        (PageSizes::GRANULE_4K, 32, 40),
        (PageSizes::GRANULE_16K, 47, 48),
        (PageSizes::GRANULE_64K, 52, 52),
        (PageSizes::GRANULE_64K, 42, 40),
    ] {
        for format in [Format::Arm64S1, Format::Arm64S2] {
            out.push(Config::new(ConfigInput::new(format, sizes, ias, oas)).unwrap());
        }
        out.push(
            Config::new(
                ConfigInput::new(Format::Arm64S1, sizes, ias, oas).with_quirks(Quirks::TTBR1),
            )
            .unwrap(),
        );
    }
    out.push(
        Config::new(ConfigInput::new(
            Format::Mali,
            PageSizes::GRANULE_4K,
            48,
            40,
        ))
        .unwrap(),
    );
    out.push(
        Config::new(ConfigInput::new(
            Format::Arm32S1,
            PageSizes::GRANULE_4K,
            32,
            40,
        ))
        .unwrap(),
    );
    out
}

/// The levels of ARM LPAE: 0 (top) to 3 (last).
fn is_level(level: u32) -> bool {
    level <= 3
}

#[test]
fn block_size_and_index_are_total_over_levels() {
    for cfg in configs() {
        let bpl = cfg.granule().bits_per_level();
        for level in 0..=255u32 {
            let bs = cfg.block_size(level);
            let shift = cfg.level_shift(level);
            for iova in [0, 1, 0x1234_5678_9abc_def0, u64::MAX >> 1, u64::MAX] {
                let idx = cfg.index(iova, level);
                if is_level(level) {
                    assert_eq!(shift, (4 - level) * bpl + 3);
                    assert_eq!(bs, 1 << shift);
                    assert!(idx < cfg.entries_at(level).max(cfg.granule().entries()));
                } else {
                    assert_eq!(bs, 0, "block_size({level})");
                    assert_eq!(shift, 64, "level_shift({level})");
                    assert_eq!(idx, 0, "index({iova:#x}, {level})");
                }
            }
        }
        for level in [u32::MAX, u32::MAX - 1, 1 << 31] {
            assert_eq!(cfg.block_size(level), 0);
            assert_eq!(cfg.index(u64::MAX, level), 0);
        }
    }
}

#[test]
fn the_issues_examples() {
    let cfg = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
    ))
    .unwrap();
    assert_eq!(cfg.block_size(5), 0);
    assert_eq!(cfg.index(0, 9), 0);
    assert_eq!(cfg.block_size(4), 0);
    assert_eq!(cfg.granule(), Granule::K4);
}

proptest! {
    #[test]
    fn index_matches_the_walk(which in 0usize..17, iova in any::<u64>(), level in any::<u32>()) {
        let cfgs = configs();
        let cfg = &cfgs[which % cfgs.len()];
        let idx = cfg.index(iova, level);
        if is_level(level) {
            let bits = if level == cfg.start_level() {
                cfg.pgd_bits()
            } else {
                cfg.granule().bits_per_level()
            };
            let want = (iova >> cfg.level_shift(level)) & ((1u64 << bits) - 1);
            prop_assert_eq!(idx as u64, want);
        } else {
            prop_assert_eq!(idx, 0);
            prop_assert_eq!(cfg.block_size(level), 0);
        }
    }
}

/// Mali has no IPS encoding to reject odd output sizes with, but an output size that cannot
/// address one page beyond the first is no configuration: a typed error, like every other
/// format's bad OAS. Every size from a page up to Linux's limit of 40 bits stays accepted.
#[test]
fn mali_rejects_an_output_size_below_a_page() {
    let mali = |ias, oas| {
        Config::new(ConfigInput::new(
            Format::Mali,
            PageSizes::GRANULE_4K,
            ias,
            oas,
        ))
    };
    for oas in 0..=12 {
        assert_eq!(
            mali(48, oas),
            Err(iopt_api::ConfigError::BadOas { oas }),
            "oas {oas}"
        );
    }
    for oas in 13..=40 {
        let cfg = mali(48, oas).unwrap();
        assert_eq!(cfg.oas(), oas);
    }
    for oas in 41..=64 {
        assert!(matches!(
            mali(48, oas),
            Err(iopt_api::ConfigError::FormatLimit { .. })
        ));
    }
    // What the golden matrix and panfrost use.
    for (ias, oas) in [(48, 40), (33, 40), (39, 39), (40, 36), (48, 32), (32, 32)] {
        assert!(mali(ias, oas).is_ok(), "ias {ias} oas {oas}");
    }
}
