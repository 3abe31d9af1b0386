//! A raw structural scan of a table tree, straight from simulated memory, independent of the
//! engine's own walk: it sees dangling table descriptors (the engine's walk silently skips
//! them), tables linked twice, non-zero invalid descriptors, and every table's metadata.

use crate::env::{classify, out_addr};
use iopt_api::{Config, Iova, PhysAddr, TableAlloc};
use iopt_sim::SimMemory;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// A table page found by the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableInfo {
    /// Level.
    pub level: u32,
    /// First IOVA it covers (as the caller writes it: TTBR1 high bits set).
    pub iova: u64,
    /// Address.
    pub pa: PhysAddr,
    /// Valid descriptors in it.
    pub valid: usize,
    /// Its `TableMeta::live_entries`.
    pub live_entries: u32,
    /// Its `TableMeta::reservations`.
    pub reservations: u32,
}

/// A leaf found by the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafInfo {
    /// First IOVA (caller's form).
    pub iova: u64,
    /// Level.
    pub level: u32,
    /// Bytes mapped.
    pub size: u64,
    /// Output address.
    pub pa: u64,
    /// The raw descriptor.
    pub desc: u64,
}

/// What a scan found.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Every reachable table, the root first, in ascending IOVA order, parents before children.
    pub tables: Vec<TableInfo>,
    /// Every reachable leaf, in ascending IOVA order.
    pub leaves: Vec<LeafInfo>,
    /// Structural problems: dangling or doubly linked tables, junk descriptors.
    pub problems: Vec<String>,
}

impl Scan {
    /// `(level, first IOVA, address)` of every table below the root.
    #[must_use]
    pub fn linked(&self) -> Vec<(u32, u64, PhysAddr)> {
        self.tables
            .iter()
            .skip(1)
            .map(|t| (t.level, t.iova, t.pa))
            .collect()
    }
}

/// Scans the tree of `cfg` rooted at `root` in `mem`.
#[must_use]
pub fn scan(cfg: &Config, mem: &SimMemory, root: PhysAddr) -> Scan {
    let mut s = Scan::default();
    let mut seen: HashMap<PhysAddr, (u32, u64)> = HashMap::new();
    let high = if cfg.is_ttbr1() {
        !((1u64 << cfg.ias()) - 1)
    } else {
        0
    };
    walk(
        cfg,
        mem,
        root,
        cfg.start_level(),
        0,
        high,
        &mut seen,
        &mut s,
    );
    s
}

#[allow(clippy::too_many_arguments)]
fn walk(
    cfg: &Config,
    mem: &SimMemory,
    pa: PhysAddr,
    level: u32,
    base: u64,
    high: u64,
    seen: &mut HashMap<PhysAddr, (u32, u64)>,
    s: &mut Scan,
) {
    if let Some(&(l, i)) = seen.get(&pa) {
        s.problems.push(format!(
            "table {pa} is linked twice: as L{l} for {i:#x} and as L{level} for {:#x}",
            base | high
        ));
        return;
    }
    seen.insert(pa, (level, base | high));
    let Some(t) = mem.table(pa) else {
        s.problems.push(format!(
            "L{level} table for {:#x} at {pa} is not live memory: a freed (or foreign) page is \
             reachable",
            base | high
        ));
        return;
    };
    let n = cfg.entries_at(level);
    if t.entries.len() < n {
        s.problems.push(format!(
            "L{level} table {pa} has {} entries, the geometry needs {n}",
            t.entries.len()
        ));
        return;
    }
    let words: Vec<u64> = t.entries[..n]
        .iter()
        .map(|e| e.load(Ordering::SeqCst))
        .collect();
    let index = s.tables.len();
    s.tables.push(TableInfo {
        level,
        iova: base | high,
        pa,
        valid: 0,
        live_entries: t.meta.live_entries.load(Ordering::SeqCst),
        reservations: t.meta.reservations.load(Ordering::SeqCst),
    });
    let shift = cfg.level_shift(level);
    let mut valid = 0;
    for (i, &d) in words.iter().enumerate() {
        let iova = base + ((i as u64) << shift);
        match classify(cfg, level, d) {
            0 => {
                if d != 0 {
                    s.problems.push(format!(
                        "L{level} table {pa} entry {i} (iova {:#x}) holds the non-zero invalid \
                         descriptor {d:#x}",
                        iova | high
                    ));
                }
            }
            1 => {
                valid += 1;
                let next = PhysAddr::new(out_addr(cfg, d));
                walk(cfg, mem, next, level + 1, iova, high, seen, s);
            }
            _ => {
                valid += 1;
                s.leaves.push(LeafInfo {
                    iova: iova | high,
                    level,
                    size: cfg.block_size(level),
                    pa: out_addr(cfg, d),
                    desc: d,
                });
            }
        }
    }
    s.tables[index].valid = valid;
}

/// Whether `iova` (caller's form) of `cfg`'s table is in its input range.
#[must_use]
pub fn in_range(cfg: &Config, iova: u64) -> bool {
    cfg.iova_in_range(Iova::new(iova))
}

/// The live set of the allocator as a map from address to size.
#[must_use]
pub fn live_set(mem: &SimMemory) -> HashMap<PhysAddr, u64> {
    mem.live_set().into_iter().collect()
}

/// Checks that the tables of `scan` are live in `mem` with the right sizes (the root
/// `pgd_bytes`, the rest one granule).
#[must_use]
pub fn sizes_problems(cfg: &Config, mem: &SimMemory, scan: &Scan) -> Vec<String> {
    let live = live_set(mem);
    let mut out = Vec::new();
    for (i, t) in scan.tables.iter().enumerate() {
        let want = if i == 0 {
            cfg.pgd_bytes()
        } else {
            cfg.granule().size()
        };
        match live.get(&t.pa) {
            Some(&size) if size == want => {}
            Some(&size) => out.push(format!(
                "L{} table {} was allocated with {size:#x} bytes, not {want:#x}",
                t.level, t.pa
            )),
            None => out.push(format!(
                "L{} table {} is not in the live set",
                t.level, t.pa
            )),
        }
        if t.pa.get() % want != 0 {
            out.push(format!(
                "L{} table {} is not aligned to its size {want:#x}",
                t.level, t.pa
            ));
        }
    }
    out
}
