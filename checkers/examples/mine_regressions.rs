//! Finds small inputs that reach each case the checkers once got wrong (the bridged model
//! difference, each oracle corner) or that exercise a feature end to end (dirty harvests
//! after device writes, non-coherent reservations, scatter-list maps with unmap_collect)
//! and writes them to `fuzz/regressions/<target>/`, where
//! `tests/regressions.rs` replays them. Run: `cargo run -p iopt-checkers --example
//! mine_regressions --release`.

use arbitrary::{Arbitrary, Unstructured};
use iopt_checkers::config::{ConfigCase, derive};
use iopt_checkers::descriptor::DescInput;
use iopt_checkers::faults::FaultInput;
use iopt_checkers::input::{DiffInput, Op, setup, setups};
use iopt_checkers::lane::bridged;
use iopt_checkers::search::Rng;
use iopt_checkers::{config, descriptor, differential, faults};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

fn dir(target: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// Whether a configuration selector picks a 64-bit stage-2 setup.
fn stage2(sel: u8) -> bool {
    setup(sel).cfg.format() == iopt_api::Format::Arm64S2 && setups().len() > 1
}

fn mine(target: &str, name: &str, max_len: u64, mut hit: impl FnMut(&[u8]) -> bool) {
    let mut rng = Rng(name.bytes().fold(0, |a, b| a * 31 + u64::from(b)));
    for i in 0..200_000u64 {
        let n = 16 + rng.below(max_len) as usize;
        let data = rng.bytes(n);
        if hit(&data) {
            std::fs::write(dir(target).join(name), &data).expect("write");
            println!("{target}/{name}: {} bytes after {i} tries", data.len());
            return;
        }
    }
    println!("{target}/{name}: not found");
}

fn counter_hit(c: &AtomicU64, data: &[u8]) -> bool {
    let before = c.load(Ordering::Relaxed);
    differential::check_bytes(data).expect("passes");
    c.load(Ordering::Relaxed) > before
}

fn main() {
    mine(
        "differential",
        "reserved-table-vs-leaf-precedence",
        1500,
        |d| counter_hit(&bridged::PRECEDENCE, d),
    );
    mine("differential", "stage2-memattr-bit5-is-not-ns", 300, |d| {
        let Ok(i) = DiffInput::arbitrary_take_rest(Unstructured::new(d)) else {
            return false;
        };
        // arm64-s2 configurations, several ops.
        stage2(i.config) && i.ops.len() >= 8 && differential::check_bytes(d).is_ok()
    });
    mine(
        "differential",
        "dirty-harvest-after-device-writes",
        600,
        |d| {
            let Ok(i) = DiffInput::arbitrary_take_rest(Unstructured::new(d)) else {
                return false;
            };
            let has = |f: fn(&Op) -> bool| i.ops.iter().any(f);
            setup(i.config).cfg.quirks().contains(iopt_api::Quirks::HD)
                && has(|o| matches!(o, Op::DeviceWrite { .. }))
                && has(|o| matches!(o, Op::ReadDirty { .. }))
                && has(|o| matches!(o, Op::Map { .. } | Op::MapRange { .. } | Op::MapSg { .. }))
                && differential::check_bytes(d).is_ok()
        },
    );
    mine(
        "differential",
        "non-coherent-reserve-map-release",
        600,
        |d| {
            let Ok(i) = DiffInput::arbitrary_take_rest(Unstructured::new(d)) else {
                return false;
            };
            let has = |f: fn(&Op) -> bool| i.ops.iter().any(f);
            !setup(i.config).cfg.coherent_walk()
                && has(|o| matches!(o, Op::Reserve { .. }))
                && has(|o| matches!(o, Op::MapReserved { .. }))
                && has(|o| matches!(o, Op::Release { .. }))
                && has(|o| matches!(o, Op::Unmap { .. } | Op::UnmapCollect { .. }))
                && differential::check_bytes(d).is_ok()
        },
    );
    mine("differential", "map-sg-and-unmap-collect", 600, |d| {
        let Ok(i) = DiffInput::arbitrary_take_rest(Unstructured::new(d)) else {
            return false;
        };
        let sg = i
            .ops
            .iter()
            .filter(|o| matches!(o, Op::MapSg { .. }))
            .count();
        sg >= 2
            && i.ops.iter().any(|o| matches!(o, Op::UnmapCollect { .. }))
            && differential::check_bytes(d).is_ok()
    });
    mine("faults", "root-allocation-fails", 300, |d| {
        let Ok(i) = FaultInput::arbitrary_take_rest(Unstructured::new(d)) else {
            return false;
        };
        i.at % 128 == 0 && !i.sticky && i.diff.ops.len() >= 4 && faults::check_bytes(d).is_ok()
    });
    mine("faults", "memory-exhausted-midway", 300, |d| {
        let Ok(i) = FaultInput::arbitrary_take_rest(Unstructured::new(d)) else {
            return false;
        };
        (3..8).contains(&(i.at % 128))
            && i.sticky
            && i.diff.ops.len() >= 8
            && faults::check_bytes(d).is_ok()
    });
    mine("config", "stage2-4k-start-level-3", 40, |d| {
        let Ok(c) = ConfigCase::arbitrary_take_rest(Unstructured::new(d)) else {
            return false;
        };
        let hit = derive(&c.input).is_ok_and(|g| config::sl0_unencodable(c.input.format, &g));
        hit && config::check_bytes(d).is_ok()
    });
    mine("descriptor", "stage2-4k-start-level-3", 200, |d| {
        let Ok(i) = DescInput::arbitrary_take_rest(Unstructured::new(d)) else {
            return false;
        };
        let hit = i.regs.is_none()
            && derive(&i.case.input)
                .is_ok_and(|g| config::sl0_unencodable(i.case.input.format, &g));
        hit && descriptor::check_bytes(d).is_ok()
    });
    mine("descriptor", "raw-ttbr1-t0sz-0", 200, |d| {
        let Ok(i) = DescInput::arbitrary_take_rest(Unstructured::new(d)) else {
            return false;
        };
        let hit = i
            .regs
            .is_some_and(|r| r.kind % 3 == 0 && r.ttbr1 && r.tsz % 64 == 0)
            && !i.probes.is_empty();
        hit && descriptor::check_bytes(d).is_ok()
    });
}
