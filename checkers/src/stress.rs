//! Concurrency stress: N threads, each owning disjoint IOVAs that interleave with the other
//! threads' so that all of them share (and, on refcounted engines, free and reinstall) the same
//! intermediate and leaf tables, run random operations and check each result against their
//! own view. At a quiescent point the tree must equal the union of the views, pass every
//! structural invariant, translate through the oracle, and have the tables a model replay of
//! the final state predicts; a concurrent teardown must then leave the root alone (refcounted
//! engines) and dropping the table must return every page.
//!
//! [`shared_tables`] adds the shapes that random stress lacked (issue 20, findings 1 and 2):
//! 2 MiB block churn beside 4 KiB traffic in one level-2 table with every lookup checked right
//! after the thread's own map, and overlapping calls beside bystander pages no call touches,
//! on every eager table (Design 1 eager, Design 2 on both accountings) and Linux freeing.

#![allow(clippy::many_single_char_names)]

use crate::env::Hooked;
use crate::failure::Failure;
use crate::lane::{Design, Holds, Subject, covers};
use crate::scan::scan;
use crate::search::Rng;
use iopt_api::{Gather, Iova, IovaRange, PageSize, PhysAddr, Prot, Reservation, WalkItem};
use iopt_model::{Model, ReservePolicy};
use iopt_sim::debug::render;
use iopt_sim::oracle::{Access, Walker};
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::Arc;

const K4: u64 = 0x1000;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
/// Small pages straddle the 1 GiB boundary: two L2 and two L3 tables shared by every thread.
const SMALL: u64 = G1 - 16 * K4;
const SMALL_PAGES: u64 = 32;
/// Each thread's two 2 MiB block slots, in a region all threads share an L2 table in.
const BLOCKS: u64 = 5 * (512 << 30);
const RW: Prot = Prot::READ.union(Prot::WRITE);
/// Fresh regions the threads race to install tables in, one 512 GiB slot each.
const RACE: u64 = 16 * (512 << 30);
const RACE_REGIONS: u64 = 16;

/// What a stress run saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StressReport {
    /// Operations run, all threads.
    pub ops: u64,
    /// Table installs lost to another thread.
    pub races_lost: u64,
    /// Tables freed for being empty.
    pub empty_tables_freed: u64,
    /// Leaves at the quiescent point.
    pub leaves: usize,
}

#[derive(Default)]
struct View {
    leaves: BTreeMap<u64, (u64, u64)>,
    held: Vec<(Reservation, IovaRange)>,
    ops: u64,
}

#[allow(clippy::too_many_lines)]
fn worker(
    t: &dyn Subject,
    design: Design,
    id: u64,
    threads: u64,
    ops: u64,
    seed: u64,
    start: &std::sync::Barrier,
) -> Result<View, String> {
    let mut rng = Rng(seed ^ (id << 32));
    let mut v = View::default();
    // Install races: all threads map into the same fresh 512 GiB region at once, so they all
    // try to install the same L1, L2 and L3 tables; losers must give their pages back.
    for r in 0..RACE_REGIONS {
        start.wait();
        let p = RACE + r * (512 << 30) + id * K4;
        let pa = 0x3_0000_0000 + (r * threads + id) * K4;
        t.map(Iova::new(p), PhysAddr::new(pa), PageSize::SZ_4K, 1, RW)
            .map_err(|e| format!("thread {id}: racing map {p:#x}: {e:?}"))?;
        v.leaves.insert(p, (K4, pa));
        v.ops += 1;
    }
    let mut g = Gather::new();
    let own = |rng: &mut Rng| SMALL + (rng.below(SMALL_PAGES / threads) * threads + id) * K4;
    let region = BLOCKS + id * 2 * M2;
    let removes_on_release = design == Design::Prealloc;
    for _ in 0..ops {
        v.ops += 1;
        match rng.below(10) {
            0 | 1 => {
                let p = own(&mut rng);
                if v.leaves.contains_key(&p) || v.held.iter().any(|h| h.1.contains(Iova::new(p))) {
                    continue;
                }
                let r = IovaRange::new(Iova::new(p), K4, K4).map_err(|e| e.to_string())?;
                let res = t
                    .reserve(r, PageSize::SZ_4K)
                    .map_err(|e| format!("thread {id}: reserve {r:?}: {e:?}"))?;
                let pa = 0x1_0000_0000 + (rng.below(1 << 20) << 12);
                t.map_reserved(
                    &res,
                    Iova::new(p),
                    PhysAddr::new(pa),
                    PageSize::SZ_4K,
                    1,
                    RW,
                )
                .map_err(|e| format!("thread {id}: map_reserved {p:#x}: {e:?}"))?;
                v.leaves.insert(p, (K4, pa));
                v.held.push((res, r));
            }
            2 | 3 => {
                if v.held.is_empty() {
                    continue;
                }
                let i = rng.below(v.held.len() as u64) as usize;
                let (res, r) = v.held.swap_remove(i);
                t.release(res, &mut g)
                    .map_err(|e| format!("thread {id}: release {r:?}: {e:?}"))?;
                if removes_on_release {
                    v.leaves.remove(&r.start().get());
                }
            }
            4 | 5 => {
                let p = own(&mut rng);
                if v.leaves.contains_key(&p) {
                    continue;
                }
                let pa = 0x2_0000_0000 + (rng.below(1 << 20) << 12);
                t.map(Iova::new(p), PhysAddr::new(pa), PageSize::SZ_4K, 1, RW)
                    .map_err(|e| format!("thread {id}: map {p:#x}: {e:?}"))?;
                v.leaves.insert(p, (K4, pa));
            }
            6 | 7 => {
                let mine: Vec<u64> = v
                    .leaves
                    .range(SMALL..SMALL + SMALL_PAGES * K4)
                    .map(|(&k, _)| k)
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let p = mine[rng.below(mine.len() as u64) as usize];
                let r = t.unmap(Iova::new(p), PageSize::SZ_4K, 1, &mut g);
                if r != Ok(K4) {
                    return Err(format!("thread {id}: unmap {p:#x}: {r:?}"));
                }
                v.leaves.remove(&p);
            }
            8 => {
                let b = region + rng.below(2) * M2;
                match v.leaves.entry(b) {
                    Entry::Occupied(o) => {
                        let r = t.unmap(Iova::new(b), PageSize::SZ_2M, 1, &mut g);
                        if r != Ok(M2) {
                            return Err(format!("thread {id}: unmap block {b:#x}: {r:?}"));
                        }
                        o.remove();
                    }
                    Entry::Vacant(e) => {
                        let pa = 0x4000_0000 + rng.below(256) * M2;
                        t.map_range(Iova::new(b), PhysAddr::new(pa), M2, RW)
                            .map_err(|e| format!("thread {id}: map_range block {b:#x}: {e:?}"))?;
                        e.insert((M2, pa));
                    }
                }
            }
            _ => {
                let p = own(&mut rng);
                let got = t.iova_to_phys(Iova::new(p + 0x10)).map(|x| x.pa.get());
                let want = v.leaves.get(&p).map(|&(_, pa)| pa + 0x10);
                if got != want {
                    return Err(format!(
                        "thread {id}: lookup {p:#x}: {got:x?}, expected {want:x?}"
                    ));
                }
            }
        }
        if v.ops % 64 == 0 {
            g.reset();
        }
    }
    Ok(v)
}

#[allow(clippy::too_many_lines)]
fn quiescent_problems(
    t: &dyn Subject,
    alloc: &Hooked,
    design: Design,
    views: &[View],
) -> Vec<String> {
    let cfg = *t.config();
    let mut p = Vec::new();
    let mut want: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut live: Vec<(IovaRange, PageSize)> = Vec::new();
    for v in views {
        want.extend(v.leaves.iter().map(|(&k, &x)| (k, x)));
        live.extend(v.held.iter().map(|h| (h.1, h.0.max_leaf())));
    }
    let mut got = BTreeMap::new();
    t.walk(&mut |i| {
        if let WalkItem::Leaf { iova, size, pa, .. } = i {
            got.insert(iova.get(), (size.get(), pa.get()));
        }
    });
    if got != want {
        let first = want.iter().zip(got.iter()).find(|(a, b)| a != b);
        p.push(format!(
            "the tree holds {} leaves, the threads' views {} (first difference {first:x?})",
            got.len(),
            want.len()
        ));
    }
    let sc = scan(&cfg, &alloc.mem, t.root());
    p.extend(sc.problems.iter().cloned());
    let s = t.stats();
    let ms = alloc.mem.stats();
    let holds = Holds::of(t, &sc);
    // Held tables an unmap unlinked stay allocated, and counted, until their release.
    let tables = sc.tables.len() as u64 + holds.orphans;
    if ms.live_pages != tables + s.reserved_outstanding || s.live_tables != tables {
        p.push(format!(
            "allocator {} pages, {tables} tables reachable, {} reserved outstanding, stats live \
             tables {}",
            ms.live_pages, s.reserved_outstanding, s.live_tables
        ));
    }
    if ms.bad_frees != 0 || t.deferred_frees() != 0 {
        p.push(format!(
            "{} bad frees, {} deferred frees",
            ms.bad_frees,
            t.deferred_frees()
        ));
    }
    for (i, x) in sc.tables.iter().enumerate() {
        let le = if design.counts_entries() {
            x.valid as u32
        } else {
            0
        };
        let rs = if design.counts_reservations() {
            live.iter()
                .filter(|(r, l)| covers(&cfg, r, *l, x.iova, x.level))
                .count() as u32
        } else {
            0
        } + holds.count(x.pa);
        if x.live_entries != le || x.reservations != rs {
            p.push(format!(
                "L{} table {} for {:#x}: live_entries {} reservations {}, expected {le} and {rs}",
                x.level, x.pa, x.iova, x.live_entries, x.reservations
            ));
        }
        if i > 0 && design.counts_entries() && x.valid == 0 && rs == 0 {
            p.push(format!(
                "L{} table {} for {:#x} is empty and unreserved",
                x.level, x.pa, x.iova
            ));
        }
    }
    // The oracle agrees with every leaf.
    match Walker::from_registers(cfg.format(), &t.registers(), false, cfg.ias()) {
        Some(w) => {
            for (&iova, &(size, pa)) in &want {
                let access = Access {
                    write: true,
                    exec: false,
                    privileged: true,
                };
                match w.translate(alloc.mem.as_ref(), iova + size / 2, access) {
                    Ok(h) if h.pa.get() == pa + size / 2 && h.leaf_size == size => {}
                    other => p.push(format!("the oracle translates {iova:#x} to {other:x?}")),
                }
            }
        }
        None => p.push("the oracle refuses the registers".to_string()),
    }
    // The model's replay of the final state predicts the tables (refcounted engines hold
    // exactly those; Linux's policy keeps at least those).
    let policy = match design {
        Design::Prealloc => ReservePolicy::Refcounts,
        Design::AllocOps { .. } => ReservePolicy::Pools { cap: None },
    };
    let mut m = Model::new(cfg, policy);
    if design.counts_reservations() {
        for (i, (r, l)) in live.iter().enumerate() {
            if let Err(e) = m.reserve(i as u64, *r, *l) {
                p.push(format!("model replay: reserve {r:?}: {e:?}"));
            }
        }
    }
    for (&iova, &(size, pa)) in &want {
        if let Err(e) = m.map(None, iova, pa, size, 1, RW) {
            p.push(format!("model replay: map {iova:#x}: {e:?}"));
        }
    }
    let mut mt = m.table_keys();
    mt.sort_unstable();
    let mut tt: Vec<(u32, u64)> = sc
        .tables
        .iter()
        .skip(1)
        .map(|x| (x.level, x.iova))
        .collect();
    tt.sort_unstable();
    let exact = design.counts_entries();
    // Tables live reservations hold stay, empty or not, with the tables linking them.
    let held: Vec<(u32, u64)> = sc
        .tables
        .iter()
        .filter(|x| holds.count(x.pa) != 0)
        .map(|x| (x.level, x.iova))
        .collect();
    let on_a_held_path = |&(l, i): &(u32, u64)| {
        held.iter()
            .any(|&(hl, hi)| hl >= l && hi >= i && hi - i < cfg.block_size(l - 1))
    };
    let ok = if exact {
        mt.iter().all(|k| tt.contains(k)) && tt.iter().all(|k| mt.contains(k) || on_a_held_path(k))
    } else {
        mt.iter().all(|k| tt.contains(k))
    };
    if !ok {
        p.push(format!(
            "tables {tt:x?}, the model's replay predicts {mt:x?} (exact: {exact})"
        ));
    }
    p
}

/// Runs `threads` threads of `ops` random operations each on a fresh table of `design`.
///
/// # Errors
///
/// The first wrong result or broken invariant, with a dump.
#[allow(clippy::too_many_lines)]
pub fn run(design: Design, threads: u64, ops: u64, seed: u64) -> Result<StressReport, Failure> {
    let cfg = crate::races::config();
    let alloc = Hooked::new();
    let mem = Arc::clone(&alloc.mem);
    let t = design
        .build(cfg, alloc.clone())
        .map_err(|e| Failure::new(format!("build: {e:?}"), String::new()))?;
    let dump = |t: &dyn Subject| {
        format!(
            "{design:?}\nstats {:?}\ntree:\n{}",
            t.stats(),
            render(t as &dyn iopt_api::IoPageTable)
        )
    };
    let start = std::sync::Barrier::new(usize::try_from(threads).unwrap_or(1));
    let results: Vec<Result<View, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|id| {
                let t = t.as_ref();
                let start = &start;
                s.spawn(move || worker(t, design, id, threads, ops, seed, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a thread panicked".to_string()))
            })
            .collect()
    });
    let mut views = Vec::new();
    for r in results {
        views.push(
            r.map_err(|e| Failure::new(format!("stress {design:?}: {e}"), dump(t.as_ref())))?,
        );
    }
    let problems = quiescent_problems(t.as_ref(), &alloc, design, &views);
    if !problems.is_empty() {
        return Err(Failure::new(
            format!(
                "stress {design:?} at the quiescent point:\n  {}",
                problems.join("\n  ")
            ),
            dump(t.as_ref()),
        ));
    }
    let leaves: usize = views.iter().map(|v| v.leaves.len()).sum();
    let ops_done: u64 = views.iter().map(|v| v.ops).sum();
    // Concurrent teardown.
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = views
            .into_iter()
            .map(|mut v| {
                let t = t.as_ref();
                s.spawn(move || {
                    let mut g = Gather::new();
                    for (res, r) in std::mem::take(&mut v.held) {
                        if let Err(e) = t.release(res, &mut g) {
                            return Err(format!("release {r:?}: {e:?}"));
                        }
                        if design == Design::Prealloc {
                            v.leaves.remove(&r.start().get());
                        }
                    }
                    for (&p, &(size, _)) in &v.leaves {
                        let ps = PageSize::new(size).ok_or("size")?;
                        let r = t.unmap(Iova::new(p), ps, 1, &mut g);
                        if r != Ok(size) {
                            return Err(format!("teardown unmap {p:#x}: {r:?}"));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a thread panicked".to_string()))
                    .err()
            })
            .collect()
    });
    let s = t.stats();
    let mut problems = errors;
    if design.counts_entries() && (mem.stats().live_pages != 1 || s.live_tables != 1) {
        problems.push(format!(
            "after the teardown {} pages are held, {} tables live: expected the root alone",
            mem.stats().live_pages,
            s.live_tables
        ));
    }
    let mut any_leaf = false;
    t.walk(&mut |i| any_leaf |= matches!(i, WalkItem::Leaf { .. }));
    if any_leaf {
        problems.push("leaves left after the teardown".to_string());
    }
    if !problems.is_empty() {
        return Err(Failure::new(
            format!("stress {design:?} teardown:\n  {}", problems.join("\n  ")),
            dump(t.as_ref()),
        ));
    }
    let report = StressReport {
        ops: ops_done,
        races_lost: s.install_races_lost,
        empty_tables_freed: s.empty_tables_freed,
        leaves,
    };
    drop(t);
    let ms = mem.stats();
    if ms.live_pages != 0 || ms.bad_frees != 0 {
        return Err(Failure::new(
            format!(
                "stress {design:?}: after drop {} pages held, {} bad frees",
                ms.live_pages, ms.bad_frees
            ),
            String::new(),
        ));
    }
    Ok(report)
}

/// The tables [`shared_tables`] runs on: every eager table and Linux freeing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Design 1, Linux freeing (`AllocOpsTable::new`).
    D1,
    /// Design 1, eager freeing (`AllocOpsTable::freeing_empty_tables`).
    D1Eager,
    /// Design 2 on `LiveCounts` (`PreallocTable::new`).
    D2,
    /// Design 2 on `ReservationCounts` (`PreallocTable::with_accounting`).
    D2Reservations,
}

impl Table {
    /// Every table, eager ones first.
    pub const ALL: [Table; 4] = [Table::D1Eager, Table::D2, Table::D2Reservations, Table::D1];

    /// Whether the table frees every table an unmap leaves empty (so that, once everything
    /// is unmapped, the root is all that is left). `ReservationCounts` frees tables at the
    /// release of the reservations that hold them, not at unmaps.
    #[must_use]
    pub fn eager(self) -> bool {
        matches!(self, Table::D1Eager | Table::D2)
    }

    /// A fresh table over a fresh [`SimMemory`](iopt_sim::SimMemory), without flush callbacks.
    ///
    /// # Panics
    ///
    /// If the root cannot be allocated.
    #[must_use]
    pub fn build(self) -> (Arc<dyn Subject>, Arc<iopt_sim::SimMemory>) {
        use iopt_lpae::account::ReservationCounts;
        use iopt_prealloc::PreallocTable;
        match self {
            Table::D1 => crate::races::build(Design::D1),
            Table::D1Eager => crate::races::build(Design::D1_EAGER),
            Table::D2 => crate::races::build(Design::D2),
            Table::D2Reservations => {
                let mem = Arc::new(iopt_sim::SimMemory::new());
                match PreallocTable::<_, _, ReservationCounts>::with_accounting(
                    crate::races::config(),
                    Arc::clone(&mem),
                    iopt_api::NoFlush,
                ) {
                    Ok(t) => (Arc::new(t), mem),
                    Err(e) => panic!("build {self:?}: {e:?}"),
                }
            }
        }
    }
}

/// The level-2 table [`shared_tables`] crowds with legal, disjoint traffic: thread `k` owns
/// the 2 MiB slots `2k` (4 KiB pages) and `2k + 1` (a 2 MiB block). Nothing else lives in
/// this level-2 table, so eager engines free it, and its leaf tables, whenever the threads
/// happen to have nothing mapped, and reinstall them under each other's lookups.
pub const SHARED_L2: u64 = 0x100_4000_0000;
/// The leaf table [`shared_tables`] aims overlapping calls at: its first
/// [`CONTESTED_PAGES`] pages, and the 2 MiB block after it, are everyone's.
pub const CONTESTED: u64 = SHARED_L2 + G1;
/// Pages at the start of [`CONTESTED`] that every thread maps and unmaps at random.
pub const CONTESTED_PAGES: u64 = 8;
/// Bystander slots in the [`CONTESTED`] leaf table: mapped before the threads start, touched
/// by no call, checked all the time.
pub const BYSTANDER_SLOTS: std::ops::Range<u64> = 256..260;

/// Which operations [`shared_tables`] mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shapes {
    /// Legal disjoint traffic and overlapping calls, in bursts.
    Both,
    /// Legal disjoint traffic only (blocks beside pages, lookups after own maps).
    Disjoint,
    /// Overlapping calls beside the bystanders only.
    Overlap,
}

impl Shapes {
    /// All three mixes.
    pub const ALL: [Shapes; 3] = [Shapes::Both, Shapes::Disjoint, Shapes::Overlap];
}

fn pa_for(iova: u64) -> u64 {
    0x8_0000_0000 + iova
}

fn translate(t: &dyn Subject, iova: u64) -> Option<u64> {
    t.iova_to_phys(Iova::new(iova)).map(|x| x.pa.get())
}

fn expect_own(t: &dyn Subject, iova: u64, what: &str) -> Result<(), String> {
    match translate(t, iova) {
        Some(pa) if pa == pa_for(iova) => Ok(()),
        other => Err(format!(
            "{what} {iova:#x}: lookup gives {other:x?}, expected {:#x}",
            pa_for(iova)
        )),
    }
}

fn map_one(t: &dyn Subject, iova: u64, size: PageSize) -> Result<(), iopt_api::MapError> {
    t.map(Iova::new(iova), PhysAddr::new(pa_for(iova)), size, 1, RW)
}

fn unmap_one(t: &dyn Subject, iova: u64, size: PageSize) -> Result<u64, iopt_api::UnmapError> {
    let mut g = Gather::new();
    t.unmap(Iova::new(iova), size, 1, &mut g)
}

/// One thread of [`shared_tables`]: random operations of three kinds, each checked at once.
///
/// - Legal, disjoint traffic in [`SHARED_L2`]: map one of its own 4 KiB pages, look it up
///   (it must be found: nothing else touches it), unmap it (exactly one page), look it up
///   again (it must be gone); or the same with its own 2 MiB block beside the pages.
/// - Overlapping calls (a caller bug) on the contested pages and block of [`CONTESTED`]:
///   maps and unmaps of the same targets by every thread, any answer accepted but an unmap
///   claiming more than it was asked for.
/// - A bystander check: every bystander page still translates to its own address.
#[allow(clippy::too_many_lines)]
fn shared_worker(
    t: &dyn Subject,
    ctx: &crate::races::Ctx,
    id: u64,
    rounds: u64,
    seed: u64,
    shapes: Shapes,
) -> Result<(), String> {
    let mut rng = Rng(seed ^ (id << 40) ^ 0x5_4a2e_d000);
    let pages = SHARED_L2 + 2 * id * M2;
    let block = pages + M2;
    let bystanders = BYSTANDER_SLOTS.map(|s| CONTESTED + s * K4);
    let mut n = 0;
    let mut legal = true;
    while n < rounds && ctx.go() {
        // Bursts: for 256 operations at a time a thread stays with legal traffic (two bursts
        // in three) or with overlapping calls, so that the threads are often all in the
        // shared level-2 table together, emptying and refilling it under each other.
        if n % 256 == 0 {
            legal = match shapes {
                Shapes::Both => rng.below(3) != 0,
                Shapes::Disjoint => true,
                Shapes::Overlap => false,
            };
        }
        n += 1;
        let op = if legal {
            rng.below(9)
        } else {
            9 + rng.below(7)
        };
        match op {
            0..=5 => {
                let p = pages + rng.below(512) * K4;
                map_one(t, p, PageSize::SZ_4K)
                    .map_err(|e| format!("map own page {p:#x}: {e:?}"))?;
                expect_own(t, p, "own page just mapped:")?;
                match unmap_one(t, p, PageSize::SZ_4K) {
                    Ok(K4) => {}
                    r => return Err(format!("unmap own page {p:#x}: {r:x?}")),
                }
                if let Some(pa) = translate(t, p) {
                    return Err(format!(
                        "own page {p:#x} still maps {pa:#x} after its unmap"
                    ));
                }
            }
            6 => {
                // A reservation over the block's slot, one page mapped in it and checked at
                // once, then unmapped and released: on `ReservationCounts` the release frees
                // the tables the reservation holds, under the other threads' lookups.
                let r = IovaRange::new(Iova::new(block), M2, K4).map_err(|e| e.to_string())?;
                let res = t
                    .reserve(r, PageSize::SZ_4K)
                    .map_err(|e| format!("reserve own slot {block:#x}: {e:?}"))?;
                let p = block + rng.below(512) * K4;
                t.map_reserved(
                    &res,
                    Iova::new(p),
                    PhysAddr::new(pa_for(p)),
                    PageSize::SZ_4K,
                    1,
                    RW,
                )
                .map_err(|e| format!("map_reserved own page {p:#x}: {e:?}"))?;
                expect_own(t, p, "own reserved page just mapped:")?;
                match unmap_one(t, p, PageSize::SZ_4K) {
                    Ok(K4) => {}
                    r => return Err(format!("unmap own reserved page {p:#x}: {r:x?}")),
                }
                let mut g = Gather::new();
                t.release(res, &mut g)
                    .map_err(|e| format!("release own slot {block:#x}: {e:?}"))?;
            }
            7 | 8 => {
                map_one(t, block, PageSize::SZ_2M)
                    .map_err(|e| format!("map own block {block:#x}: {e:?}"))?;
                expect_own(t, block + (rng.below(512) << 12), "own block just mapped:")?;
                match unmap_one(t, block, PageSize::SZ_2M) {
                    Ok(M2) => {}
                    r => return Err(format!("unmap own block {block:#x}: {r:x?}")),
                }
            }
            9..=11 => {
                let p = CONTESTED + rng.below(CONTESTED_PAGES) * K4;
                if let Ok(n) = unmap_one(t, p, PageSize::SZ_4K) {
                    if n != K4 {
                        return Err(format!("overlapping unmap {p:#x} returned {n:#x}"));
                    }
                }
            }
            12 | 13 => {
                let p = CONTESTED + rng.below(CONTESTED_PAGES) * K4;
                let _ = map_one(t, p, PageSize::SZ_4K);
            }
            14 => {
                let b = CONTESTED + M2;
                if rng.below(2) == 0 {
                    let _ = map_one(t, b, PageSize::SZ_2M);
                } else if let Ok(n) = unmap_one(t, b, PageSize::SZ_2M) {
                    if n != M2 {
                        return Err(format!("overlapping unmap of block {b:#x} returned {n:#x}"));
                    }
                }
            }
            _ => {
                for q in bystanders.clone() {
                    expect_own(t, q, "bystander beside overlapping calls:")?;
                }
            }
        }
        ctx.beat();
    }
    // Whoever stops first stops the others: the shape needs its partners running.
    ctx.halt();
    Ok(())
}

/// Stress on shared tables: `threads` threads (see `shared_worker`) mix legal disjoint
/// traffic (4 KiB map, lookup, unmap beside 2 MiB block churn in one level-2 table, every
/// lookup right after the thread's own map checked) with overlapping calls next to
/// bystander pages that no call touches. Each thread runs `rounds` operations or until
/// `budget.time` runs out; a thread stuck for `budget.hang` is a hang. At the end the
/// bystanders must still be mapped, a single-threaded unmap of every leaf must succeed, an
/// eager table must be back to its root alone, and the drop must return every page.
///
/// # Errors
///
/// The first wrong result, lost bystander, hang, or leak, with the time it took to find.
pub fn shared_tables(
    table: Table,
    shapes: Shapes,
    threads: u64,
    rounds: u64,
    seed: u64,
    budget: &crate::races::Budget,
) -> crate::races::RaceResult {
    use crate::races::{Ctx, Job, RaceFailure, finish, watch};
    let start = std::time::Instant::now();
    let (t, mem) = table.build();
    for s in BYSTANDER_SLOTS {
        let q = CONTESTED + s * K4;
        if let Err(e) = map_one(t.as_ref(), q, PageSize::SZ_4K) {
            return Err(RaceFailure {
                message: format!("map bystander {q:#x}: {e:?}"),
                rounds: 0,
                elapsed: start.elapsed(),
                per_thread: Vec::new(),
            });
        }
    }
    let jobs: Vec<Job> = (0..threads)
        .map(|id| {
            let t = Arc::clone(&t);
            let job: Job = (
                format!("shared{id}"),
                Box::new(move |ctx: &Ctx| shared_worker(t.as_ref(), ctx, id, rounds, seed, shapes)),
            );
            job
        })
        .collect();
    let report = watch(jobs, budget, start)?;
    for s in BYSTANDER_SLOTS {
        let q = CONTESTED + s * K4;
        if let Err(message) = expect_own(t.as_ref(), q, "bystander after the stress:") {
            return Err(RaceFailure {
                message,
                rounds: report.rounds,
                elapsed: start.elapsed(),
                per_thread: Vec::new(),
            });
        }
    }
    let rounds = report.rounds;
    finish(t, &mem, table.eager(), Vec::new(), budget, start).map(|mut r| {
        r.rounds = rounds;
        r
    })
}

/// The fuzz target `stress`: the bytes choose the table and the mix (byte 0), the threads
/// (2 to 4), the operations per thread (up to 4,096) and the seed of one [`shared_tables`] run of at most
/// 2 s (a hang is 10 s without progress).
///
/// # Errors
///
/// The run's failure.
pub fn check_bytes(data: &[u8]) -> Result<(), Failure> {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let table = Table::ALL[usize::from(byte(0)) % Table::ALL.len()];
    let shapes = Shapes::ALL[usize::from(byte(0) >> 4) % Shapes::ALL.len()];
    let threads = 2 + u64::from(byte(1)) % 3;
    let rounds = 1 + (u64::from(byte(2)) << 4 | u64::from(byte(3)) >> 4);
    let seed = data
        .iter()
        .skip(4)
        .take(8)
        .fold(0u64, |a, &b| a << 8 | u64::from(b));
    let budget = crate::races::Budget {
        time: std::time::Duration::from_secs(2),
        hang: std::time::Duration::from_secs(10),
    };
    shared_tables(table, shapes, threads, rounds, seed, &budget)
        .map(|_| ())
        .map_err(|f| {
            Failure::new(
                format!(
                    "stress {table:?}, {threads} threads, {rounds} rounds each, seed {seed:#x}: {f}"
                ),
                String::new(),
            )
        })
}
