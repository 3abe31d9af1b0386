//! Helpers shared by the integration tests.
#![allow(dead_code)]

use iopt_api::{
    Config, ConfigInput, Format, IoPageTable, Iova, IovaRange, PageSizes, Prot, Quirks, Stats,
    WalkItem,
};
use iopt_sim::SimMemory;

pub const K4: u64 = 0x1000;
pub const M2: u64 = 2 << 20;
pub const G1: u64 = 1 << 30;
pub const G512: u64 = 512 << 30;
pub const RW: Prot = Prot::READ.union(Prot::WRITE);

/// panthor's configuration (docs/designs.md §4.1): 64-bit stage 1, 4 KiB | 2 MiB, 48-bit VA.
pub fn panthor_cfg() -> Config {
    Config::new(
        ConfigInput::new(Format::Arm64S1, PageSizes::from_bits(0x20_1000), 48, 40)
            .with_quirks(Quirks::NO_WARN),
    )
    .expect("valid config")
}

/// 64-bit stage 1 with every 4 KiB-granule size (4K | 2M | 1G), 48-bit VA.
pub fn full_cfg() -> Config {
    Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        40,
    ))
    .expect("valid config")
}

pub fn range(start: u64, len: u64) -> IovaRange {
    IovaRange::new(Iova::new(start), len, K4).expect("valid range")
}

/// Every table and leaf, in walk order: the full state a failed operation must not change.
pub fn dump(t: &dyn IoPageTable) -> Vec<WalkItem> {
    let mut v = Vec::new();
    t.walk(&mut |i| v.push(i));
    v
}

/// The walk with table addresses erased: what two tables with different allocation orders
/// must agree on.
pub fn shape(t: &dyn IoPageTable) -> Vec<String> {
    dump(t)
        .into_iter()
        .map(|i| match i {
            WalkItem::Table {
                iova, level, live, ..
            } => format!("T {iova:?} L{level} live {live}"),
            other => format!("{other:?}"),
        })
        .collect()
}

/// Leaves only.
pub fn leaves(t: &dyn IoPageTable) -> Vec<WalkItem> {
    dump(t)
        .into_iter()
        .filter(|i| matches!(i, WalkItem::Leaf { .. }))
        .collect()
}

/// Tables in the tree, the root included.
pub fn tables(t: &dyn IoPageTable) -> usize {
    dump(t)
        .iter()
        .filter(|i| matches!(i, WalkItem::Table { .. }))
        .count()
}

/// Allocator calls of either kind made so far.
pub fn alloc_calls(mem: &SimMemory) -> u64 {
    let s = mem.stats();
    s.alloc_calls + s.alloc_bulk_calls
}

/// The reservation bookkeeping identity every backend state must satisfy.
pub fn assert_balanced(s: &Stats) {
    assert_eq!(
        s.pages_reserved,
        s.pages_consumed + s.reserved_unused + s.reserved_outstanding,
        "{s:?}"
    );
}
