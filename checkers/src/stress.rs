//! Concurrency stress: N threads, each owning disjoint IOVAs that interleave with the other
//! threads' so that all of them share (and, on refcounted engines, free and reinstall) the same
//! intermediate and leaf tables, run random operations and check each result against their
//! own view. At a quiescent point the tree must equal the union of the views, pass every
//! structural invariant, translate through the oracle, and have the tables a model replay of
//! the final state predicts; a concurrent teardown must then leave the root alone (refcounted
//! engines) and dropping the table must return every page.

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
