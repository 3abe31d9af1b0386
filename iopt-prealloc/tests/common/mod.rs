//! Helpers shared by the integration tests: configurations, structural invariants, dumps.
#![allow(dead_code, clippy::missing_panics_doc)]

use iopt_api::{
    Config, ConfigInput, Format, IoPageTable, Iova, IovaRange, PageSize, PageSizes, PhysAddr,
    TableAlloc, WalkItem,
};
use iopt_prealloc::PreallocTable;
use iopt_sim::SimMemory;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

pub const K4: u64 = 0x1000;
pub const M2: u64 = 2 << 20;
pub const G1: u64 = 1 << 30;
pub const G512: u64 = 512 << 30;

/// panthor's configuration: 48-bit stage 1, 4 KiB | 2 MiB.
pub fn panthor() -> Config {
    Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::from_bits(0x20_1000),
        48,
        40,
    ))
    .unwrap()
}

/// 48-bit stage 1 with every 4 KiB-granule size.
pub fn s1_all() -> Config {
    Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
    ))
    .unwrap()
}

pub type Table<'m> = PreallocTable<&'m SimMemory>;

pub fn range(start: u64, len: u64) -> IovaRange {
    IovaRange::new(Iova::new(start), len, K4).unwrap()
}

/// Everything a walk reports, in order: the table's full observable state.
pub fn dump<T: IoPageTable + ?Sized>(t: &T) -> Vec<WalkItem> {
    let mut v = Vec::new();
    t.walk(&mut |i| v.push(i));
    v
}

/// The leaves of a walk: iova → (size, pa).
pub fn leaves<T: IoPageTable + ?Sized>(t: &T) -> BTreeMap<u64, (u64, u64)> {
    let mut m = BTreeMap::new();
    t.walk(&mut |i| {
        if let WalkItem::Leaf { iova, size, pa, .. } = i {
            m.insert(iova.get(), (size.get(), pa.get()));
        }
    });
    m
}

/// Whether a leaf of `size` may sit at `level` under `cfg`.
fn leaf_ok(cfg: &Config, level: u32, max_leaf: u64) -> bool {
    let bs = cfg.block_size(level);
    bs <= max_leaf && PageSize::new(bs).and_then(|s| cfg.leaf_level(s)) == Some(level)
}

/// Whether a reservation of `r` with `max_leaf` covers the table at `level` whose first IOVA
/// is `base`: recomputed here from the definition, independently of the engine.
pub fn covers(cfg: &Config, r: &IovaRange, max_leaf: PageSize, base: u64, level: u32) -> bool {
    if level <= cfg.start_level() {
        return false;
    }
    // Compare in the table's local address space (TTBR1 sets every bit above IAS).
    let mask = (1u64 << cfg.ias()) - 1;
    let parent = level - 1;
    let s = base & mask & !(cfg.block_size(parent) - 1);
    let e = s + cfg.block_size(parent);
    let (rs, re) = (r.start().get() & mask, (r.last().get() & mask) + 1);
    let touches = s < re && rs < e;
    let leaf_here = s >= rs && e <= re && leaf_ok(cfg, parent, max_leaf.get());
    touches && !leaf_here
}

/// Checks, at a quiescent point, every structural invariant of a refcounted table:
/// - each table's `live_entries` equals its valid descriptors;
/// - each table's `reservations` equals the number of live reservations covering it;
/// - no table other than the root is empty and unreserved (eager freeing);
/// - the allocator's live pages are exactly the reachable tables, and nothing waits for a
///   grace period.
pub fn check_invariants(t: &Table<'_>, mem: &SimMemory, live: &[(IovaRange, PageSize)]) {
    let cfg = *t.config();
    let mut tables = 0u64;
    let mut bad = Vec::new();
    t.walk(&mut |item| {
        if let WalkItem::Table {
            iova,
            level,
            pa,
            live: valid,
        } = item
        {
            tables += 1;
            let m = mem.table(pa).expect("walked table is live");
            let le = m.meta.live_entries.load(Ordering::SeqCst) as usize;
            let rs = m.meta.reservations.load(Ordering::SeqCst) as usize;
            let want = live
                .iter()
                .filter(|(r, l)| covers(&cfg, r, *l, iova.get(), level))
                .count();
            if le != valid {
                bad.push(format!(
                    "{iova:?} L{level}: live_entries {le} != valid {valid}"
                ));
            }
            if rs != want {
                bad.push(format!(
                    "{iova:?} L{level}: reservations {rs} != expected {want}"
                ));
            }
            if level != cfg.start_level() && valid == 0 && rs == 0 {
                bad.push(format!("{iova:?} L{level}: empty unreserved table kept"));
            }
        }
    });
    assert!(bad.is_empty(), "invariants broken:\n{}", bad.join("\n"));
    assert_eq!(t.engine().deferred_frees(), 0, "frees left pending");
    assert_eq!(
        mem.stats().live_pages,
        tables,
        "allocator live set != reachable tables"
    );
    assert_eq!(t.stats().live_tables, tables, "live_tables counter");
    assert_eq!(mem.stats().bad_frees, 0, "bad frees");
}

pub fn pa(x: u64) -> PhysAddr {
    PhysAddr::new(x)
}

pub fn iova(x: u64) -> Iova {
    Iova::new(x)
}
