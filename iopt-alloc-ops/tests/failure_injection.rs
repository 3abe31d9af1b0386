//! A failure injected at every page allocation of several workloads: each failing operation
//! returns the typed allocation error and leaves every table and the allocator's live set as
//! they were; retried, it succeeds, and the workload ends in the same state as without
//! injection. Dropping the tables returns every page.

mod common;

use common::*;
use core::fmt::Debug;
use iopt_alloc_ops::{AllocOpsTable, CountPolicy};
use iopt_api::{
    AllocError, Config, Gather, IoPageTable, Iova, MapError, NoFlush, PageSize, PhysAddr, Reserve,
    ReserveError,
};
use iopt_sim::{SimLayout, SimMemory};

const VA: u64 = 0x7f_c000_0000; // 1 GiB-aligned, 2 GiB below a 512 GiB boundary

fn pa(off: u64) -> PhysAddr {
    PhysAddr::new(0x20_0000_0000 + off)
}

struct Injector<'m> {
    mem: &'m SimMemory,
    hits: u64,
}

impl Injector<'_> {
    /// Runs `op` until it succeeds. Every failure must be an injected one, typed as the
    /// allocator's, with `tables` and the live set unchanged.
    fn run<T, E: Debug>(
        &mut self,
        tables: &[&dyn IoPageTable],
        is_oom: fn(&E) -> bool,
        mut op: impl FnMut() -> Result<T, E>,
    ) -> T {
        loop {
            let dumps: Vec<_> = tables.iter().map(|t| dump(*t)).collect();
            let stats: Vec<_> = tables.iter().map(|t| t.stats().live_tables).collect();
            let live = self.mem.live_set();
            let injected = self.mem.stats().injected_failures;
            match op() {
                Ok(v) => return v,
                Err(e) => {
                    assert!(
                        self.mem.stats().injected_failures > injected,
                        "error without injection: {e:?}"
                    );
                    assert!(is_oom(&e), "not the allocator's error: {e:?}");
                    let after: Vec<_> = tables.iter().map(|t| dump(*t)).collect();
                    assert_eq!(after, dumps, "table changed by failed op {e:?}");
                    assert_eq!(self.mem.live_set(), live, "live set changed by {e:?}");
                    for (t, n) in tables.iter().zip(stats) {
                        assert_eq!(t.stats().live_tables, n);
                        assert_balanced(&t.stats());
                    }
                    self.hits += 1;
                }
            }
        }
    }
}

fn oom(e: &AllocError) -> bool {
    matches!(e, AllocError::OutOfMemory { .. })
}
fn map_oom(e: &MapError) -> bool {
    matches!(e, MapError::Alloc { source } if oom(source))
}
fn reserve_oom(e: &ReserveError) -> bool {
    matches!(e, ReserveError::Alloc { source } if oom(source))
}
fn never<E>(_: &E) -> bool {
    false
}

type Table<'m> = AllocOpsTable<&'m SimMemory>;

fn new_table<'m>(inj: &mut Injector<'m>, cfg: Config) -> Table<'m> {
    let mem = inj.mem;
    inj.run(&[], oom, || AllocOpsTable::new(cfg, mem))
}

/// Reservations of every kind and maps inside them, with on-demand maps in between.
fn reserve_workload(inj: &mut Injector<'_>) -> Vec<Vec<String>> {
    let t = new_table(inj, full_cfg());
    let tt: &[&dyn IoPageTable] = &[&t];
    let sz4 = PageSize::SZ_4K;
    let r1 = inj.run(tt, reserve_oom, || t.reserve(range(VA, K4), sz4));
    inj.run(tt, never, || {
        t.map_reserved(&r1, Iova::new(VA), pa(0), sz4, 1, RW)
    });
    // 64 KiB straddling a 2 MiB boundary.
    let r2 = inj.run(tt, reserve_oom, || {
        t.reserve(range(VA + 3 * M2 - 0x8000, 0x10000), sz4)
    });
    inj.run(tt, never, || {
        t.map_reserved(
            &r2,
            Iova::new(VA + 3 * M2 - 0x8000),
            pa(0x10_0000),
            sz4,
            16,
            RW,
        )
    });
    // On demand between reservations.
    inj.run(tt, map_oom, || {
        t.map(Iova::new(VA + 8 * M2 + K4), pa(0x20_0000), sz4, 3, RW)
    });
    // A merged batch of sparse binds.
    let ops: Vec<_> = (0..8)
        .map(|i| range(VA + 9 * M2 + i * 0x3000, K4))
        .collect();
    let r3 = inj.run(tt, reserve_oom, || {
        t.reserve_batch_with(&ops, sz4, CountPolicy::MsmMerged)
    });
    for (i, op) in ops.iter().enumerate() {
        inj.run(tt, never, || {
            t.map_reserved(&r3, op.start(), pa(0x40_0000 + i as u64 * K4), sz4, 1, RW)
        });
    }
    t.release(r1, &mut Gather::new()).unwrap();
    // 32 MiB at +4 KiB across the 512 GiB boundary, scattered 4 KiB backing.
    let r4_range = range(VA + G1 - 8 * M2 + K4, 16 * M2);
    let r4 = inj.run(tt, reserve_oom, || t.reserve(r4_range, sz4));
    assert_eq!(r4.pages(), 2 + 2 + 17);
    inj.run(tt, never, || {
        t.map_reserved(&r4, r4_range.start(), pa(0x100_0000), sz4, 16 * 512, RW)
    });
    // Exact against the tree, then a map there.
    let r5_range = range(VA + 12 * M2, 2 * M2);
    let r5 = inj.run(tt, reserve_oom, || {
        t.reserve_with(r5_range, sz4, CountPolicy::Exact)
    });
    assert_eq!(r5.pages(), 2);
    inj.run(tt, never, || {
        t.map_range_reserved(&r5, r5_range.start(), pa(12 * M2), 2 * M2, RW)
    });
    // Unmap with the border-remap reservation.
    let hole = range(VA + 12 * M2 + 0x8000, 0x4000);
    let r6 = inj.run(tt, reserve_oom, || t.reserve_unmap(hole));
    assert_eq!(r6.pages(), 1);
    inj.run(tt, never, || {
        t.unmap(
            Iova::new(VA + 12 * M2),
            PageSize::SZ_2M,
            1,
            &mut Gather::new(),
        )
    });
    inj.run(tt, never, || {
        t.map_range_reserved(&r6, Iova::new(VA + 12 * M2), pa(12 * M2), 0x8000, RW)
    });
    // A big worst case mostly returned unused: 128 MiB at +4 KiB, two pages mapped.
    let r7_range = range(VA + 2 * G1 + K4, 64 * M2);
    let r7 = inj.run(tt, reserve_oom, || t.reserve(r7_range, sz4));
    assert_eq!(r7.pages(), 1 + 1 + 65);
    inj.run(tt, never, || {
        t.map_reserved(&r7, Iova::new(VA + 2 * G1 + 40 * M2), pa(0), sz4, 2, RW)
    });
    for r in [r2, r3, r4, r5, r6, r7] {
        t.release(r, &mut Gather::new()).unwrap();
    }
    vec![shape(&t)]
}

/// On-demand maps of every shape, including runs and map_range calls across many tables.
fn on_demand_workload(inj: &mut Injector<'_>) -> Vec<Vec<String>> {
    let t = new_table(inj, full_cfg());
    let tt: &[&dyn IoPageTable] = &[&t];
    let sz4 = PageSize::SZ_4K;
    inj.run(tt, map_oom, || t.map(Iova::new(VA), pa(0), sz4, 1, RW));
    // A 4 KiB run across four leaf tables.
    inj.run(tt, map_oom, || {
        t.map(
            Iova::new(VA + 2 * M2 - 2 * K4),
            pa(0x1000_0000),
            sz4,
            3 * 512 + 4,
            RW,
        )
    });
    // map_range, 2 MiB-contiguous, across a 1 GiB and a 512 GiB boundary: runs of 4 KiB,
    // 2 MiB and 4 KiB in five tables or more.
    inj.run(tt, map_oom, || {
        t.map_range(Iova::new(VA + G1 - 3 * M2 + K4), pa(M2 + K4), 5 * M2, RW)
    });
    // map_range, scattered: one 4 KiB run across tables.
    inj.run(tt, map_oom, || {
        t.map_range(Iova::new(VA + 64 * M2 + K4), pa(0x3000_2000), 3 * M2, RW)
    });
    // Blocks: 2 MiB and 1 GiB.
    inj.run(tt, map_oom, || {
        t.map(Iova::new(VA + G1 + 8 * M2), pa(0), PageSize::SZ_2M, 3, RW)
    });
    inj.run(tt, map_oom, || {
        t.map(
            Iova::new(VA + 5 * G1),
            PhysAddr::new(0x40_0000_0000),
            PageSize::SZ_1G,
            1,
            RW,
        )
    });
    inj.run(tt, never, || {
        t.unmap(Iova::new(VA), sz4, 1, &mut Gather::new())
    });
    inj.run(tt, never, || {
        t.unmap(Iova::new(VA), PageSize::SZ_2M, 1, &mut Gather::new())
    });
    inj.run(tt, map_oom, || {
        t.map(Iova::new(VA + K4), pa(K4), sz4, 2, RW)
    });
    vec![shape(&t)]
}

/// Two tables on one allocator, interleaved, with reservations on both.
fn two_table_workload(inj: &mut Injector<'_>) -> Vec<Vec<String>> {
    let a = new_table(inj, panthor_cfg());
    let b = new_table(inj, full_cfg());
    let both: &[&dyn IoPageTable] = &[&a, &b];
    let sz4 = PageSize::SZ_4K;
    let ra = inj.run(both, reserve_oom, || a.reserve(range(VA + K4, M2), sz4));
    inj.run(both, map_oom, || {
        b.map_range(Iova::new(VA + K4), pa(K4), 4 * M2, RW)
    });
    inj.run(both, never, || {
        a.map_range_reserved(&ra, Iova::new(VA + K4), pa(0x8000_0000), M2, RW)
    });
    let rb = inj.run(both, reserve_oom, || b.reserve(range(VA + G1, 2 * M2), sz4));
    inj.run(both, map_oom, || {
        a.map(Iova::new(VA + G1), pa(0), sz4, 513, RW)
    });
    inj.run(both, never, || {
        b.map_reserved(&rb, Iova::new(VA + G1), pa(0), sz4, 1024, RW)
    });
    a.release(ra, &mut Gather::new()).unwrap();
    // `rb` is left for drop to return.
    drop(rb);
    vec![shape(&a), shape(&b)]
}

/// Design 1 freeing empty tables (issue 20, finding 4): reservations whose maps hold the
/// tables they install, emptied and mapped again, a map over several leaf tables, an
/// on-demand map into a held table, a held table unlinked from above by a block-size unmap,
/// and releases with and without leaves left.
fn held_workload(inj: &mut Injector<'_>) -> Vec<Vec<String>> {
    let mem = inj.mem;
    let t = inj.run(&[], oom, || {
        AllocOpsTable::freeing_empty_tables(full_cfg(), mem, NoFlush)
    });
    let tt: &[&dyn IoPageTable] = &[&t];
    let sz4 = PageSize::SZ_4K;
    // The L2 of this 1 GiB comes on demand, not from a pool.
    inj.run(tt, map_oom, || t.map(Iova::new(VA), pa(0), sz4, 1, RW));
    let r1 = inj.run(tt, reserve_oom, || t.reserve(range(VA + M2, 4 * K4), sz4));
    for i in 0..3 {
        inj.run(tt, never, || {
            t.map_reserved(&r1, Iova::new(VA + M2), pa(i * 0x10000), sz4, 4, RW)
        });
        inj.run(tt, never, || {
            t.unmap(Iova::new(VA + M2), sz4, 4, &mut Gather::new())
        });
    }
    // 4 MiB at +4 KiB over three leaf tables, backing not congruent: 4 KiB leaves.
    let r2_range = range(VA + G1 + K4, 2 * M2);
    let r2 = inj.run(tt, reserve_oom, || t.reserve(r2_range, sz4));
    for i in 0..2 {
        inj.run(tt, never, || {
            t.map_range_reserved(&r2, r2_range.start(), pa(i * M2 + 2 * K4), 2 * M2, RW)
        });
        if i == 0 {
            inj.run(tt, never, || {
                t.unmap(r2_range.start(), sz4, 1024, &mut Gather::new())
            });
        }
    }
    // On demand into `r1`'s held leaf table, then the whole 1 GiB at block size: the held
    // table leaves the tree and waits for its holder.
    inj.run(tt, map_oom, || {
        t.map(Iova::new(VA + M2 + 8 * K4), pa(0x40_0000), sz4, 1, RW)
    });
    inj.run(tt, never, || {
        t.unmap(Iova::new(VA), PageSize::SZ_1G, 1, &mut Gather::new())
    });
    t.release(r1, &mut Gather::new()).unwrap();
    inj.run(tt, map_oom, || t.map(Iova::new(VA + M2), pa(0), sz4, 2, RW));
    // Released with its leaves in place: its tables stay.
    t.release(r2, &mut Gather::new()).unwrap();
    vec![shape(&t)]
}

/// A small memory, so that a live-set snapshot (a scan of every slot) stays cheap.
fn small_memory() -> SimMemory {
    SimMemory::with_layout(SimLayout {
        base: 1 << 30,
        region_span: 16 << 20,
    })
}

fn exercise(name: &str, workload: fn(&mut Injector<'_>) -> Vec<Vec<String>>) -> u64 {
    let mem = small_memory();
    let baseline = workload(&mut Injector { mem: &mem, hits: 0 });
    assert_eq!(mem.stats().live_pages, 0, "{name}: leak without injection");
    let total = mem.stats().pages_allocated;
    let mut points = 0;
    for k in 0.. {
        let mem = small_memory();
        mem.fail_at(k);
        let mut inj = Injector { mem: &mem, hits: 0 };
        let end = workload(&mut inj);
        let s = mem.stats();
        assert_eq!(end, baseline, "{name}: k={k} ended elsewhere");
        assert_eq!(s.live_pages, 0, "{name}: k={k} leaked");
        assert_eq!(s.bad_frees, 0, "{name}: k={k} bad free");
        if s.injected_failures == 0 {
            assert_eq!(inj.hits, 0);
            break;
        }
        assert_eq!(inj.hits, 1, "{name}: k={k}");
        points += 1;
    }
    assert_eq!(
        points, total,
        "{name}: one injection point per page allocation"
    );
    println!("{name}: {points} injection points, {total} pages allocated without injection");
    assert!(points > 0);
    points
}

#[test]
fn failure_at_every_allocation() {
    let points = exercise("reservations", reserve_workload)
        + exercise("on-demand maps", on_demand_workload)
        + exercise("two tables", two_table_workload)
        + exercise("held tables", held_workload);
    println!("total: {points} injection points exercised");
    assert!(points > 50);
}
