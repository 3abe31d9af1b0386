//! A `TableAlloc` that panics (issue 20, finding 11): whichever allocator call panics, at
//! whichever point of a call, the unwinding gives back every page that call obtained. Each
//! table runs a fixed workload (maps that build chains of 1 to 3 tables, a range map, a
//! reservation with a reserved map and its release) with the k-th `alloc`, `table` or `clean`
//! call panicking, for every k the workload reaches; the panic is caught, everything left is
//! unmapped, the table dropped, and the memory must hold no page and have seen no bad free.
//!
//! Not covered: a `table` call panicking inside `release` or `unmap`, which obtain no page
//! but unlink tables to free; the tables unlinked before the panic are lost with it. Those
//! calls run with `table` panics paused.

use iopt_api::{
    AllocError, Gather, Iova, IovaRange, NoFlush, PageSize, PhysAddr, Prot, TableAlloc, TableRef,
    WalkItem,
};
use iopt_checkers::lane::{Design, Subject};
use iopt_lpae::account::ReservationCounts;
use iopt_prealloc::PreallocTable;
use iopt_sim::SimMemory;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

const RW: Prot = Prot::READ.union(Prot::WRITE);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    Alloc,
    Table,
    Clean,
}

/// `SimMemory` whose `at`-th call of kind `site` (counting from 0) panics, once.
#[derive(Debug)]
struct Panicky {
    mem: Arc<SimMemory>,
    site: Site,
    at: Arc<AtomicU64>,
    /// Set around `release` and `unmap`: their `table` calls do not panic.
    freeing: Arc<AtomicBool>,
}

impl Panicky {
    fn tick(&self, site: Site) {
        if site == Site::Table && self.freeing.load(Relaxed) {
            return;
        }
        assert!(
            site != self.site || self.at.fetch_sub(1, Relaxed) != 0,
            "allocator panics in {site:?}"
        );
    }
}

impl TableAlloc for Panicky {
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError> {
        self.tick(Site::Alloc);
        self.mem.alloc(size)
    }
    fn free(&self, pa: PhysAddr, size: u64) {
        self.mem.free(pa, size);
    }
    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        self.tick(Site::Table);
        self.mem.table(pa)
    }
    fn clean(&self, pa: PhysAddr, bytes: u64) {
        self.tick(Site::Clean);
        self.mem.clean(pa, bytes);
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    D1,
    D1Eager,
    D2,
    D2Reservations,
}

fn build(kind: Kind, alloc: Panicky) -> Box<dyn Subject> {
    let cfg = iopt_checkers::races::config();
    let t: Result<Box<dyn Subject>, AllocError> = match kind {
        Kind::D1 => Design::D1.build_with(cfg, alloc, NoFlush),
        Kind::D1Eager => Design::D1_EAGER.build_with(cfg, alloc, NoFlush),
        Kind::D2 => Design::D2.build_with(cfg, alloc, NoFlush),
        Kind::D2Reservations => {
            PreallocTable::<_, _, ReservationCounts>::with_accounting(cfg, alloc, NoFlush)
                .map(|t| Box::new(t) as Box<dyn Subject>)
        }
    };
    t.expect("build")
}

/// The workload: maps needing chains of 3, 0 and 2 new tables, a range map with a block, and
/// a reservation used and released.
fn workload(t: &dyn Subject, freeing: &AtomicBool) {
    let mut g = Gather::new();
    let map = |iova: u64, size: PageSize| {
        let _ = t.map(Iova::new(iova), PhysAddr::new(iova), size, 1, RW);
    };
    map(0x1000_0000, PageSize::SZ_4K);
    map(0x1000_1000, PageSize::SZ_4K);
    map(0x8000_0000, PageSize::SZ_4K);
    let _ = t.map_range(
        Iova::new(0x2_0000_0000),
        PhysAddr::new(0x2_0000_0000),
        (2 << 20) + 0x2000,
        RW,
    );
    if let Ok(r) = IovaRange::new(Iova::new(0x3_0000_0000), 4 << 20, 0x1000) {
        if let Ok(res) = t.reserve(r, PageSize::SZ_4K) {
            let _ = t.map_reserved(
                &res,
                Iova::new(0x3_0000_0000),
                PhysAddr::new(0x3_0000_0000),
                PageSize::SZ_4K,
                1,
                RW,
            );
            freeing.store(true, Relaxed);
            let _ = t.release(res, &mut g);
            freeing.store(false, Relaxed);
        }
    }
    map(0x40_0000_0000, PageSize::SZ_4K);
    freeing.store(true, Relaxed);
    let _ = t.unmap(Iova::new(0x1000_0000), PageSize::SZ_4K, 1, &mut g);
}

/// Runs the workload with the `at`-th call at `site` panicking; `Some((leaked pages, bad
/// frees))` if it panicked, `None` once `at` is past the workload's calls.
fn once(kind: Kind, site: Site, at: u64) -> Option<(u64, u64)> {
    let mem = Arc::new(SimMemory::new());
    let trigger = Arc::new(AtomicU64::new(u64::MAX));
    let freeing = Arc::new(AtomicBool::new(false));
    let t = build(
        kind,
        Panicky {
            mem: Arc::clone(&mem),
            site,
            at: Arc::clone(&trigger),
            freeing: Arc::clone(&freeing),
        },
    );
    // Armed after the build: the root's allocation is the constructor's business.
    trigger.store(at, Relaxed);
    let panicked = catch_unwind(AssertUnwindSafe(|| workload(t.as_ref(), &freeing))).is_err();
    trigger.store(u64::MAX, Relaxed);
    freeing.store(false, Relaxed);
    if !panicked {
        return None;
    }
    let mut leaves = Vec::new();
    t.walk(&mut |i| {
        if let WalkItem::Leaf { iova, size, .. } = i {
            leaves.push((iova, size));
        }
    });
    let mut g = Gather::new();
    for (iova, size) in leaves {
        let _ = t.unmap(iova, size, 1, &mut g);
    }
    drop(t);
    let s = mem.stats();
    Some((s.live_pages, s.bad_frees))
}

fn check(kind: Kind) {
    // The panics are expected; keep the output readable.
    std::panic::set_hook(Box::new(|_| {}));
    let mut bad = Vec::new();
    let mut runs = 0;
    for site in [Site::Alloc, Site::Table, Site::Clean] {
        for at in 0.. {
            match once(kind, site, at) {
                None => break,
                Some((0, 0)) => runs += 1,
                Some((live, bad_frees)) => {
                    runs += 1;
                    bad.push(format!(
                        "{site:?} call {at} panics: {live} pages leaked, {bad_frees} bad frees"
                    ));
                }
            }
        }
    }
    let _ = std::panic::take_hook();
    assert!(
        runs > 0,
        "{kind:?}: the workload never reached the allocator"
    );
    assert!(
        bad.is_empty(),
        "{kind:?} after {runs} panics:\n  {}",
        bad.join("\n  ")
    );
    eprintln!("{kind:?}: {runs} panicking allocator calls, no page leaked");
}

#[test]
fn design1_linux_freeing() {
    check(Kind::D1);
}

#[test]
fn design1_eager_freeing() {
    check(Kind::D1Eager);
}

#[test]
fn design2_live_counts() {
    check(Kind::D2);
}

#[test]
fn design2_reservation_counts() {
    check(Kind::D2Reservations);
}
