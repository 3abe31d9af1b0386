//! A second anchor besides Linux's recorded answers, in the manner of Linux's generic_pt
//! kunit tests, run against every table iopt ships (LpaeTable, AllocOpsTable with each
//! FreePolicy, PreallocTable, the facade with each backend) over several formats and
//! granules:
//!
//! - every page size mapped alone, checked by lookups (first, middle and last byte) and by a
//!   walk that counts the valid leaves per size, then unmapped;
//! - every page size mapped at once, each counted once;
//! - 1,000 random map and unmap calls against a reference map of what is mapped, where a map
//!   that overlaps a mapping must fail and leave the table unchanged, and an unmap must
//!   remove exactly one recorded mapping or fail; the walk must equal the reference at the
//!   end;
//! - a leak check at every exit: once a table is dropped its memory has every page back and
//!   no page was freed twice.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::tables::{SUBJECTS, Subject};
use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, MapError, PageSize, PageSizes,
    PhysAddr, Prot, UnmapError, WalkItem,
};
use iopt_sim::SimMemory;

/// The configurations every table is checked in: each granule, both stages, Mali, the
/// 32-bit format, and a concatenated stage-2 root.
fn configs() -> Vec<Config> {
    let k16_32m = PageSizes::from_bits((1 << 14) | (1 << 25));
    let k64_512m = PageSizes::from_bits((1 << 16) | (1 << 29));
    [
        (Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48),
        (Format::Arm64S2, PageSizes::GRANULE_4K, 40, 40),
        (Format::Arm64S1, k16_32m, 47, 48),
        (Format::Arm64S2, k64_512m, 42, 48),
        (Format::Arm32S1, PageSizes::GRANULE_4K, 32, 40),
        (Format::Mali, PageSizes::GRANULE_4K, 39, 40),
    ]
    .into_iter()
    .map(|(f, sizes, ias, oas)| {
        Config::new(ConfigInput::new(f, sizes, ias, oas)).expect("a valid configuration")
    })
    .collect()
}

/// The configuration in a few words, for failure messages.
fn short(cfg: &Config) -> String {
    format!(
        "{} {:?} ias {} oas {}",
        cfg.format(),
        cfg.page_sizes(),
        cfg.ias(),
        cfg.oas()
    )
}

/// Owns a table and its memory; dropping it checks that every table page came back.
struct Checked {
    table: Option<Box<dyn IoPageTable>>,
    mem: Arc<SimMemory>,
    what: String,
}

impl Checked {
    fn new(subject: &Subject, cfg: Config) -> Self {
        let mem = Arc::new(SimMemory::new());
        Self {
            table: Some((subject.build)(cfg, Arc::clone(&mem))),
            mem,
            what: format!("{} {}", subject.name, short(&cfg)),
        }
    }

    fn t(&self) -> &dyn IoPageTable {
        self.table.as_deref().expect("live table")
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        drop(self.table.take());
        let s = self.mem.stats();
        if !std::thread::panicking() {
            assert_eq!(
                (s.live_pages, s.bad_frees),
                (0, 0),
                "{}: table pages leaked or freed twice",
                self.what
            );
        }
    }
}

/// The valid leaves of the table, counted per leaf size.
fn count_per_size(t: &dyn IoPageTable) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    t.walk(&mut |item| {
        if let WalkItem::Leaf { size, .. } = item {
            *counts.entry(size.get()).or_insert(0) += 1;
        }
    });
    counts
}

/// Every valid leaf as (iova, size, pa).
fn leaves(t: &dyn IoPageTable) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    t.walk(&mut |item| {
        if let WalkItem::Leaf { iova, size, pa, .. } = item {
            out.push((iova.get(), size.get(), pa.get()));
        }
    });
    out
}

fn check_lookups(t: &dyn IoPageTable, iova: u64, size: u64, pa: u64, what: &str) {
    for off in [0, size / 2 + 42, size - 1] {
        let got = t.iova_to_phys(Iova::new(iova + off));
        let tr = got.unwrap_or_else(|| panic!("{what}: no translation at {:#x}", iova + off));
        assert_eq!(tr.pa.get(), pa + off, "{what}: lookup at {:#x}", iova + off);
        assert_eq!(tr.size.get(), size, "{what}");
    }
}

const RW: Prot = Prot::READ.union(Prot::WRITE);

#[test]
fn each_page_size_maps_alone_and_is_counted() {
    for subject in &SUBJECTS {
        for cfg in configs() {
            for size in cfg.page_sizes().iter() {
                let s = size.get();
                let what = format!("{} {} size {s:#x}", subject.name, short(&cfg));
                let c = Checked::new(subject, cfg);
                let t = c.t();
                // Third slot of that size: an address with lower levels on both sides.
                let iova = 2 * s;
                let pa = 3 * s;
                t.map(Iova::new(iova), PhysAddr::new(pa), size, 1, RW)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                check_lookups(t, iova, s, pa, &what);
                assert!(t.iova_to_phys(Iova::new(iova + s)).is_none(), "{what}");
                assert_eq!(count_per_size(t), BTreeMap::from([(s, 1)]), "{what}");
                // Mapping over it again fails and changes nothing.
                let again = t.map(Iova::new(iova), PhysAddr::new(pa), size, 1, RW);
                assert!(
                    matches!(again, Err(MapError::AlreadyMapped { .. })),
                    "{what}: {again:?}"
                );
                assert_eq!(count_per_size(t), BTreeMap::from([(s, 1)]), "{what}");
                let done = t.unmap(Iova::new(iova), size, 1, &mut Gather::new());
                assert_eq!(done, Ok(s), "{what}");
                assert!(count_per_size(t).is_empty(), "{what}");
                assert!(t.iova_to_phys(Iova::new(iova)).is_none(), "{what}");
            }
        }
    }
}

#[test]
fn every_page_size_at_once_is_counted_once() {
    for subject in &SUBJECTS {
        for cfg in configs() {
            let what = format!("{} {}", subject.name, short(&cfg));
            let c = Checked::new(subject, cfg);
            let t = c.t();
            let largest = cfg.page_sizes().iter().last().expect("a size").get();
            let mut expected = BTreeMap::new();
            for (i, size) in cfg.page_sizes().iter().enumerate() {
                // Each size in its own slot of the largest size.
                let iova = (i as u64 + 1) * largest;
                t.map(Iova::new(iova), PhysAddr::new(iova), size, 1, RW)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                expected.insert(size.get(), 1);
            }
            assert_eq!(count_per_size(t), expected, "{what}");
            for (i, size) in cfg.page_sizes().iter().enumerate() {
                let iova = (i as u64 + 1) * largest;
                check_lookups(t, iova, size.get(), iova, &what);
            }
        }
    }
}

/// splitmix64: a tiny deterministic generator, so a failure reproduces exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Whether `[iova, iova + len)` meets any mapping of `reference`.
fn overlaps(reference: &BTreeMap<u64, (u64, u64)>, iova: u64, len: u64) -> bool {
    let end = iova + len;
    reference
        .range(..end)
        .next_back()
        .is_some_and(|(&start, &(size, _))| start + size > iova)
}

const CALLS: usize = 1000;

fn random_sequence(subject: &Subject, cfg: Config, seed: u64) {
    let what = format!("{} {} seed {seed:#x}", subject.name, short(&cfg));
    let c = Checked::new(subject, cfg);
    let t = c.t();
    let mut rng = Rng(seed);
    let sizes: Vec<PageSize> = cfg.page_sizes().iter().collect();
    let largest = sizes.last().expect("a size").get();
    // iova -> (size, pa) of every leaf mapped and not yet unmapped.
    let mut reference: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let (mut maps, mut over_maps, mut unmaps) = (0, 0, 0);
    for call in 0..CALLS {
        if rng.below(100) < 60 {
            // Small sizes more often; a few hot slots per region so runs collide.
            let size = sizes[(rng.below(10) as usize * sizes.len() / 10).min(sizes.len() - 1)];
            let s = size.get();
            let slots = (largest / s).min(16);
            let iova = rng.below(4) * largest + rng.below(slots) * s;
            let count = 1 + rng.below(3).min(slots - 1 - (iova % largest) / s);
            let pa = iova ^ (1 << 33);
            let result = t.map(Iova::new(iova), PhysAddr::new(pa), size, count, RW);
            if overlaps(&reference, iova, s * count) {
                assert!(
                    matches!(result, Err(MapError::AlreadyMapped { .. })),
                    "{what}: call {call}: map over a mapping at {iova:#x} x{count} {s:#x}: {result:?}"
                );
                over_maps += 1;
            } else {
                result.unwrap_or_else(|e| panic!("{what}: call {call}: map {iova:#x}: {e}"));
                for i in 0..count {
                    reference.insert(iova + i * s, (s, pa + i * s));
                }
                maps += 1;
            }
        } else if !reference.is_empty() && rng.below(4) != 0 {
            // Unmap one recorded mapping exactly.
            let k = rng.below(reference.len() as u64) as usize;
            let (&iova, &(s, _)) = reference.iter().nth(k).expect("k < len");
            let size = PageSize::new(s).expect("a page size");
            let result = t.unmap(Iova::new(iova), size, 1, &mut Gather::new());
            assert_eq!(result, Ok(s), "{what}: call {call}: unmap {iova:#x}");
            reference.remove(&iova);
            unmaps += 1;
        } else {
            // Unmap at a size no recorded mapping has there. Over smaller mappings this is
            // Linux's table-entry unmap: the whole table goes and the call answers the size.
            // Inside a larger one it must fail; over nothing it fails, or answers the size
            // when an empty table (kept by Linux's freeing policy) sits there.
            let size = sizes[rng.below(sizes.len() as u64) as usize];
            let s = size.get();
            let iova = rng.below(4) * largest + rng.below((largest / s).min(16)) * s;
            if reference.get(&iova).is_some_and(|&(rs, _)| rs == s) {
                continue;
            }
            let inside: Vec<u64> = reference
                .range(iova..iova + s)
                .filter(|&(_, &(rs, _))| rs < s)
                .map(|(&i, _)| i)
                .collect();
            let covered = overlaps(&reference, iova, s) && inside.is_empty();
            let before = leaves(t);
            let result = t.unmap(Iova::new(iova), size, 1, &mut Gather::new());
            if inside.is_empty() {
                let refused = matches!(
                    result,
                    Err(UnmapError::NotMapped { .. } | UnmapError::PartialBlock { .. })
                );
                assert!(
                    refused || (!covered && result == Ok(s)),
                    "{what}: call {call}: unmap {iova:#x} {s:#x} with no such mapping: {result:?}"
                );
                assert_eq!(leaves(t), before, "{what}: call {call}: the tree changed");
            } else {
                assert_eq!(
                    result,
                    Ok(s),
                    "{what}: call {call}: unmap of a table at {iova:#x}"
                );
                for i in inside {
                    reference.remove(&i);
                }
                unmaps += 1;
            }
        }
        if call % 50 == 0 {
            for (&iova, &(s, pa)) in &reference {
                check_lookups(t, iova, s, pa, &format!("{what}: call {call}"));
            }
        }
    }
    let expected: Vec<(u64, u64, u64)> = reference.iter().map(|(&i, &(s, p))| (i, s, p)).collect();
    assert_eq!(leaves(t), expected, "{what}: final tree");
    let mut per_size = BTreeMap::new();
    for &(_, s, _) in &expected {
        *per_size.entry(s).or_insert(0) += 1;
    }
    assert_eq!(count_per_size(t), per_size, "{what}");
    // The sequence exercised all three outcomes.
    assert!(
        maps > 50 && over_maps > 20 && unmaps > 50,
        "{what}: {maps} maps, {over_maps} over-maps, {unmaps} unmaps"
    );
}

#[test]
fn random_map_unmap_against_a_reference() {
    for subject in &SUBJECTS {
        for (i, cfg) in configs().into_iter().enumerate() {
            random_sequence(subject, cfg, 0x6765_6e65_7269_6300 + i as u64);
        }
    }
}
