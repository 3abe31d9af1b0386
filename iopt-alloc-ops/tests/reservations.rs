//! Reservation mechanics: pools, zero allocator calls, exhaustion, handles, cap, drop.

#![allow(clippy::many_single_char_names, clippy::too_many_lines)] // scenario tests

mod common;

use common::*;
use iopt_alloc_ops::{AllocOpsTable, CountPolicy, InFlightCap, MSM_CAP_PAGES};
use iopt_api::{
    Gather, IoPageTable, Iova, Issuer, MapError, PageSize, PhysAddr, Reservation, Reserve,
    ReserveError,
};
use iopt_sim::{SimMemory, SimStats};

const VA: u64 = 0x40_0000_0000;

fn pa(off: u64) -> PhysAddr {
    PhysAddr::new(0x10_0000_0000 + off)
}

#[test]
fn map_inside_reservation_makes_no_allocator_call() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    let r = range(VA, 8 * M2);
    let res = t.reserve(r, PageSize::SZ_4K).unwrap();
    assert_eq!(res.pages(), 1 + 1 + 8);
    assert_eq!(res.table_id(), t.table_id());
    assert_eq!(
        mem.stats().alloc_bulk_calls,
        1,
        "one bulk call per reservation"
    );
    let before = mem.stats();
    // A 4 KiB run across two leaf tables, a 2 MiB block, a mixed map_range.
    t.map_reserved(
        &res,
        Iova::new(VA + M2 - 4 * K4),
        pa(0),
        PageSize::SZ_4K,
        8,
        RW,
    )
    .unwrap();
    t.map_reserved(
        &res,
        Iova::new(VA + 3 * M2),
        pa(3 * M2),
        PageSize::SZ_2M,
        1,
        RW,
    )
    .unwrap();
    t.map_range_reserved(
        &res,
        Iova::new(VA + 4 * M2 + K4),
        pa(4 * M2 + K4),
        2 * M2,
        RW,
    )
    .unwrap();
    let after = mem.stats();
    assert_eq!(after.alloc_calls, before.alloc_calls);
    assert_eq!(after.alloc_bulk_calls, before.alloc_bulk_calls);
    assert_eq!(after.pages_allocated, before.pages_allocated);
    assert_eq!(
        after.live_pages, before.live_pages,
        "pages moved from pool to tree"
    );
    let s = t.stats();
    // L1 + L2 + 2 L3 for the first map, 2 L3 for the map_range, none for the block.
    assert_eq!(s.pages_consumed, 6);
    assert_eq!(s.reserved_outstanding, 4);
    assert_eq!(s.live_tables, 7);
    assert_balanced(&s);
    t.release(res, &mut Gather::new()).unwrap();
    let s = t.stats();
    assert_eq!(s.reserved_unused, 4);
    assert_eq!(s.reserved_outstanding, 0);
    assert_eq!(mem.stats().free_bulk_calls, 1, "one bulk free per release");
    assert_eq!(mem.stats().live_pages, s.live_tables);
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}

/// Everything a failed map must leave alone.
struct Snapshot {
    dump: Vec<iopt_api::WalkItem>,
    live: Vec<(PhysAddr, u64)>,
    mem: SimStats,
    left: Option<usize>,
}

fn snapshot(t: &AllocOpsTable<&SimMemory>, mem: &SimMemory, res: &Reservation) -> Snapshot {
    Snapshot {
        dump: dump(t),
        live: mem.live_set(),
        mem: mem.stats(),
        left: t.reservation_left(res),
    }
}

fn assert_unchanged(
    t: &AllocOpsTable<&SimMemory>,
    mem: &SimMemory,
    res: &Reservation,
    s: &Snapshot,
) {
    assert_eq!(dump(t), s.dump, "table changed");
    assert_eq!(mem.live_set(), s.live, "allocator live set changed");
    let now = mem.stats();
    assert_eq!(now.alloc_calls, s.mem.alloc_calls, "allocator called");
    assert_eq!(
        now.alloc_bulk_calls, s.mem.alloc_bulk_calls,
        "allocator called"
    );
    assert_eq!(now.pages_freed, s.mem.pages_freed);
    assert_eq!(t.reservation_left(res), s.left, "pool changed");
    assert_balanced(&t.stats());
}

#[test]
fn drained_reservation_fails_typed_and_changes_nothing() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();

    // 1. Linux's freeing drains a worst-case pool: map, unmap the 2 MiB covering the leaf
    //    table (it is freed to the allocator, not to the pool), map again.
    let res = t.reserve(range(VA, M2), PageSize::SZ_4K).unwrap();
    assert_eq!(res.pages(), 3);
    t.map_reserved(&res, Iova::new(VA), pa(0), PageSize::SZ_4K, 1, RW)
        .unwrap();
    assert_eq!(t.reservation_left(&res), Some(0));
    let mut g = Gather::new();
    assert_eq!(
        t.unmap(Iova::new(VA), PageSize::SZ_2M, 1, &mut g).unwrap(),
        M2
    );
    let s = snapshot(&t, &mem, &res);
    let e = t.map_reserved(&res, Iova::new(VA + K4), pa(K4), PageSize::SZ_4K, 1, RW);
    assert_eq!(
        e,
        Err(MapError::ReservationExhausted {
            id: res.id(),
            left: 0,
            needed: 1
        })
    );
    assert_unchanged(&t, &mem, &res, &s);
    // A 2 MiB block there needs no table: the drained pool still serves it.
    t.map_range_reserved(&res, Iova::new(VA), pa(0), M2, RW)
        .unwrap();
    t.release(res, &mut Gather::new()).unwrap();

    // 2. A pool sized for 2 MiB leaves, used for 4 KiB leaves: the single-table path (left 1,
    //    needs L2 + L3).
    let res = t
        .reserve_with(range(VA + G1, 2 * M2), PageSize::SZ_2M, CountPolicy::Exact)
        .unwrap();
    assert_eq!(res.pages(), 1, "L1 exists; one L2");
    let s = snapshot(&t, &mem, &res);
    let e = t.map_reserved(&res, Iova::new(VA + G1), pa(0), PageSize::SZ_4K, 1, RW);
    assert_eq!(
        e,
        Err(MapError::ReservationExhausted {
            id: res.id(),
            left: 1,
            needed: 2
        })
    );
    assert_unchanged(&t, &mem, &res, &s);
    // 3. The multi-table path: a run across a 2 MiB boundary needs L2 + 2 L3.
    let e = t.map_reserved(
        &res,
        Iova::new(VA + G1 + M2 - K4),
        pa(0),
        PageSize::SZ_4K,
        2,
        RW,
    );
    assert_eq!(
        e,
        Err(MapError::ReservationExhausted {
            id: res.id(),
            left: 1,
            needed: 3
        })
    );
    assert_unchanged(&t, &mem, &res, &s);
    // 4. map_range over several runs.
    let e = t.map_range_reserved(&res, Iova::new(VA + G1 + K4), pa(K4), M2, RW);
    assert!(
        matches!(e, Err(MapError::ReservationExhausted { .. })),
        "{e:?}"
    );
    assert_unchanged(&t, &mem, &res, &s);
    // What the pool was made for still works.
    t.map_reserved(&res, Iova::new(VA + G1), pa(0), PageSize::SZ_2M, 2, RW)
        .unwrap();
    assert_eq!(t.reservation_left(&res), Some(0));
    t.release(res, &mut Gather::new()).unwrap();
    assert_balanced(&t.stats());
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}

#[test]
fn outside_and_unknown_reservations() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    let other = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    assert_ne!(t.table_id(), other.table_id());
    let r = range(VA + M2, 4 * K4);
    let res = t.reserve(r, PageSize::SZ_4K).unwrap();
    let theirs = other.reserve(r, PageSize::SZ_4K).unwrap();
    let d = dump(&t);
    // Starts before, ends after, lies elsewhere.
    assert_eq!(
        t.map_reserved(&res, Iova::new(VA + M2 - K4), pa(0), PageSize::SZ_4K, 2, RW),
        Err(MapError::OutsideReservation {
            id: res.id(),
            range: r,
            iova: Iova::new(VA + M2 - K4)
        })
    );
    assert_eq!(
        t.map_reserved(
            &res,
            Iova::new(VA + M2 + 2 * K4),
            pa(0),
            PageSize::SZ_4K,
            3,
            RW
        ),
        Err(MapError::OutsideReservation {
            id: res.id(),
            range: r,
            iova: Iova::new(VA + M2 + 4 * K4)
        })
    );
    assert!(matches!(
        t.map_range_reserved(&res, Iova::new(VA), pa(0), K4, RW),
        Err(MapError::OutsideReservation { .. })
    ));
    // Another table's handle, here and at release.
    assert_eq!(
        t.map_reserved(&theirs, r.start(), pa(0), PageSize::SZ_4K, 1, RW),
        Err(MapError::UnknownReservation { id: theirs.id() })
    );
    // Argument errors come first, exactly as an unreserved map reports them.
    assert_eq!(
        t.map_reserved(
            &res,
            Iova::new(VA + M2 + 0x800),
            pa(0),
            PageSize::SZ_4K,
            1,
            RW
        ),
        t.map(Iova::new(VA + M2 + 0x800), pa(0), PageSize::SZ_4K, 1, RW)
    );
    assert!(matches!(
        t.map_reserved(
            &res,
            r.start(),
            pa(0),
            PageSize::SZ_4K,
            1,
            iopt_api::Prot::CACHE
        ),
        Err(MapError::NoAccess { .. })
    ));
    assert_eq!(dump(&t), d);
    // A batch reservation binds the union of its ranges, not the hull's gaps.
    let a = range(VA + 4 * M2, K4);
    let b = range(VA + 4 * M2 + 8 * K4, K4);
    let batch = t.reserve_batch(&[a, b], PageSize::SZ_4K).unwrap();
    assert_eq!(batch.range(), range(VA + 4 * M2, 9 * K4));
    assert_eq!(batch.pages(), 6, "WorstCase sums per range");
    assert_eq!(
        t.map_reserved(&batch, a.start(), pa(0), PageSize::SZ_4K, 2, RW),
        Err(MapError::OutsideReservation {
            id: batch.id(),
            range: batch.range(),
            iova: Iova::new(VA + 4 * M2 + K4)
        })
    );
    t.map_reserved(&batch, b.start(), pa(0), PageSize::SZ_4K, 1, RW)
        .unwrap();
    // Release: other table's handle, then a forged copy of a released one.
    let forged_id = res.id();
    let theirs_id = theirs.id();
    let forged = Issuer::new(t.table_id()).issue(forged_id, r, PageSize::SZ_4K, 3, 1);
    let (theirs, why) = t
        .release(theirs, &mut Gather::new())
        .unwrap_err()
        .into_parts();
    assert_eq!(why, ReserveError::UnknownReservation { id: theirs_id });
    t.release(res, &mut Gather::new()).unwrap();
    assert_eq!(
        t.release(forged, &mut Gather::new()).map_err(|e| e.error()),
        Err(ReserveError::UnknownReservation { id: forged_id })
    );
    let forged = Issuer::new(t.table_id()).issue(forged_id, r, PageSize::SZ_4K, 3, 1);
    assert_eq!(
        t.map_reserved(&forged, r.start(), pa(0), PageSize::SZ_4K, 1, RW),
        Err(MapError::UnknownReservation { id: forged_id })
    );
    assert_eq!(t.reservation_left(&forged), None);
    t.release(batch, &mut Gather::new()).unwrap();
    // The failed release above gave `theirs` back, its pool intact: `other` takes it.
    assert_eq!(other.live_reservations(), 1);
    other.release(theirs, &mut Gather::new()).unwrap();
    assert_eq!(other.live_reservations(), 0);
    drop(other);
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}

#[test]
fn drop_returns_unreleased_pools() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    let a = t.reserve(range(VA, G1), PageSize::SZ_4K).unwrap();
    let b = t
        .reserve(range(VA + 3 * G1 + K4, M2), PageSize::SZ_4K)
        .unwrap();
    t.map_reserved(&a, Iova::new(VA), pa(0), PageSize::SZ_4K, 1, RW)
        .unwrap();
    t.map(Iova::new(VA + 9 * G1), pa(0), PageSize::SZ_2M, 1, RW)
        .unwrap();
    assert_eq!(mem.stats().live_pages, 1 + 514 + 4 + 1);
    // Dropping handles without releasing keeps the pages held until the table goes.
    drop((a, b));
    assert_eq!(t.live_reservations(), 2);
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}

#[test]
fn in_flight_caps_refuse_without_blocking() {
    let mem = SimMemory::new();
    // Strict: in_flight + needed <= cap.
    let t = AllocOpsTable::new(full_cfg(), &mem)
        .unwrap()
        .with_cap(InFlightCap::Strict(10));
    assert_eq!(t.cap(), InFlightCap::Strict(10));
    let a = t.reserve(range(VA, 4 * M2), PageSize::SZ_4K).unwrap(); // 6
    assert_eq!(t.in_flight(), 6);
    let bulk = mem.stats().alloc_bulk_calls;
    assert_eq!(
        t.reserve(range(VA, 3 * M2), PageSize::SZ_4K),
        Err(ReserveError::CapExceeded {
            in_flight: 6,
            needed: 5,
            cap: 10
        })
    );
    assert_eq!(
        mem.stats().alloc_bulk_calls,
        bulk,
        "refused before allocating"
    );
    let b = t.reserve(range(VA, 2 * M2), PageSize::SZ_4K).unwrap(); // 4: exactly the cap
    assert_eq!(t.in_flight(), 10);
    // Consumption does not lower the in-flight count; release does.
    t.map_reserved(&a, Iova::new(VA), pa(0), PageSize::SZ_4K, 1, RW)
        .unwrap();
    assert_eq!(t.in_flight(), 10);
    t.release(a, &mut Gather::new()).unwrap();
    assert_eq!(t.in_flight(), 4);
    // Bigger than the cap: never admitted.
    assert!(matches!(
        t.reserve(range(VA, G1), PageSize::SZ_4K),
        Err(ReserveError::CapExceeded { needed: 514, .. })
    ));
    t.release(b, &mut Gather::new()).unwrap();
    assert!(matches!(
        t.reserve(range(VA, G1), PageSize::SZ_4K),
        Err(ReserveError::CapExceeded { in_flight: 0, .. })
    ));
    drop(t);

    // msm's rule: admitted while in_flight <= cap, whatever the size.
    let t = AllocOpsTable::new(full_cfg(), &mem)
        .unwrap()
        .with_cap(InFlightCap::MsmThrottle(MSM_CAP_PAGES));
    let mut held = Vec::new();
    // 1 GiB-aligned 1 GiB maps: 514 each. 0 -> 514 -> 1028 (admitted at 514 <= 1024).
    for i in 0..2 {
        held.push(t.reserve(range(VA + i * G1, G1), PageSize::SZ_4K).unwrap());
    }
    assert_eq!(t.in_flight(), 1028);
    assert_eq!(
        t.reserve(range(VA, K4), PageSize::SZ_4K),
        Err(ReserveError::CapExceeded {
            in_flight: 1028,
            needed: 3,
            cap: 1024
        })
    );
    t.release(held.pop().unwrap(), &mut Gather::new()).unwrap();
    // A single reservation over the cap on an idle table goes through.
    t.release(held.pop().unwrap(), &mut Gather::new()).unwrap();
    let big = t.reserve(range(VA, 2 * G1 + M2), PageSize::SZ_4K).unwrap();
    assert_eq!(big.pages(), 1 + 3 + 1025);
    assert!(t.in_flight() > MSM_CAP_PAGES);
    t.release(big, &mut Gather::new()).unwrap();
    assert_eq!(t.in_flight(), 0);
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
}

#[test]
fn overlapping_reservations_and_policies() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem)
        .unwrap()
        .with_policy(CountPolicy::Exact);
    assert_eq!(t.policy(), CountPolicy::Exact);
    let r = range(VA, 2 * M2);
    // Two exact reservations of the same range, both made against the empty tree: each counts
    // 4; the first map installs all, the second pool stays full.
    let a = t.reserve(r, PageSize::SZ_4K).unwrap();
    let b = t.reserve(r, PageSize::SZ_4K).unwrap();
    assert_eq!((a.pages(), b.pages()), (4, 4));
    t.map_reserved(&a, r.start(), pa(0), PageSize::SZ_4K, 1024, RW)
        .unwrap();
    assert_eq!(t.reservation_left(&a), Some(0));
    // Exact now: nothing needed.
    assert_eq!(t.pages_needed(r, PageSize::SZ_4K).unwrap(), 0);
    assert_eq!(t.reserve(r, PageSize::SZ_4K).unwrap().pages(), 0);
    // A block map over an empty leaf table inside a reservation frees it (after the flush)
    // and consumes nothing.
    let mut g = Gather::new();
    t.unmap(Iova::new(VA + M2), PageSize::SZ_4K, 512, &mut g)
        .unwrap();
    let tables = t.stats().live_tables;
    t.map_reserved(&b, Iova::new(VA + M2), pa(M2), PageSize::SZ_2M, 1, RW)
        .unwrap();
    assert_eq!(t.stats().live_tables, tables - 1);
    assert_eq!(t.reservation_left(&b), Some(4));
    t.release(a, &mut Gather::new()).unwrap();
    t.release(b, &mut Gather::new()).unwrap();
    let s = t.stats();
    assert_eq!(s.pages_reserved, 8);
    assert_eq!(s.pages_consumed, 4);
    assert_eq!(s.reserved_unused, 4);
    // The third (zero-page) reservation was never released: still live, counted nowhere.
    assert_eq!(t.live_reservations(), 1);
    assert_balanced(&s);
}

/// The engine plans a map with several runs (mixed page sizes) run by run, counting an upper
/// table that two runs share once per run, and asks the source for the sum up front. A pool
/// holding the true need, or even panthor's worst case, can then report exhaustion. Needs an
/// exact multi-run plan in `Engine::map_runs` (see the crate docs).
#[test]
fn worst_case_pool_suffices_for_mixed_map_range() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    // [2M - 4K, 4M + 4K): runs 4K x1, 2M x1, 4K x1. Worst case with 4 KiB leaves: 1 + 1 + 3.
    // True need with 2 MiB-contiguous backing: L1, L2, 2 x L3 = 4. Engine plan: 3 + 2 + 3.
    let r = range(VA + M2 - K4, M2 + 2 * K4);
    let res = t.reserve(r, PageSize::SZ_4K).unwrap();
    assert_eq!(res.pages(), 5);
    t.map_range_reserved(&res, r.start(), pa(M2 - K4), r.len(), RW)
        .unwrap();
    assert_eq!(t.reservation_left(&res), Some(1));
    t.release(res, &mut Gather::new()).unwrap();
}

#[test]
fn table_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<AllocOpsTable<SimMemory>>();
    check::<AllocOpsTable<&SimMemory>>();
    check::<AllocOpsTable<std::sync::Arc<SimMemory>>>();
}

/// The table's allocator counters agree with what the allocator itself counted.
#[test]
fn statistics_agree_with_the_allocator() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    let res = t.reserve(range(VA, 4 * M2), PageSize::SZ_4K).unwrap();
    t.map_reserved(&res, Iova::new(VA), pa(0), PageSize::SZ_4K, 600, RW)
        .unwrap();
    // Several runs: the engine takes its plan up front and gives back the surplus.
    t.map_range(Iova::new(VA + G1 - M2 + K4), pa(M2 + K4), 3 * M2, RW)
        .unwrap();
    t.map(Iova::new(VA + 8 * M2), pa(0), PageSize::SZ_4K, 1, RW)
        .unwrap();
    let mut g = Gather::new();
    t.unmap(Iova::new(VA + 8 * M2), PageSize::SZ_2M, 1, &mut g)
        .unwrap();
    t.release(res, &mut Gather::new()).unwrap();
    let (s, m) = (t.stats(), mem.stats());
    assert_eq!(s.alloc_calls, m.alloc_calls);
    assert_eq!(s.alloc_bulk_calls, m.alloc_bulk_calls);
    assert_eq!(s.pages_allocated, m.pages_allocated);
    assert_eq!(s.free_calls, m.free_calls);
    assert_eq!(s.free_bulk_calls, m.free_bulk_calls);
    assert_eq!(s.pages_freed, m.pages_freed);
    assert_eq!(s.live_tables, m.live_pages);
    assert_eq!(s.live_tables, tables(&t) as u64);
    assert!(s.peak_live_tables >= s.live_tables);
    assert_eq!(s.pages_reserved, 6);
    assert_eq!(s.pages_consumed, 4);
    assert_eq!(s.reserved_unused, 2);
    assert_balanced(&s);
}

/// Flush callbacks that check, at every walk flush, that the table pages being retired are
/// still live in the allocator (the table frees only after the flush returns).
struct FreedAfterFlush {
    mem: std::sync::Arc<SimMemory>,
    watched: std::sync::Mutex<Vec<PhysAddr>>,
    flushes: std::sync::atomic::AtomicU32,
}

impl iopt_api::FlushOps for FreedAfterFlush {
    fn flush_walk(&self, _iova: Iova, _size: u64, _granule: u64) {
        use iopt_api::TableAlloc;
        for &p in self.watched.lock().unwrap().iter() {
            assert!(self.mem.table(p).is_some(), "{p:?} freed before the flush");
        }
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn freed_tables_reach_the_allocator_after_the_walk_flush() {
    use iopt_api::TableAlloc;
    use std::sync::Arc;
    let mem = Arc::new(SimMemory::new());
    let flush = FreedAfterFlush {
        mem: Arc::clone(&mem),
        watched: std::sync::Mutex::new(Vec::new()),
        flushes: 0.into(),
    };
    let t = AllocOpsTable::with_flush(full_cfg(), Arc::clone(&mem), flush).unwrap();
    let leaf_table = |t: &AllocOpsTable<Arc<SimMemory>, FreedAfterFlush>, at: u64| {
        dump(t)
            .into_iter()
            .find_map(|w| match w {
                iopt_api::WalkItem::Table {
                    iova, level: 3, pa, ..
                } if iova.get() == at => Some(pa),
                _ => None,
            })
            .unwrap()
    };
    let res = t.reserve(range(VA, 2 * M2), PageSize::SZ_4K).unwrap();
    t.map_reserved(&res, Iova::new(VA), pa(0), PageSize::SZ_4K, 1024, RW)
        .unwrap();
    // An unmap with the block size over a table.
    let l3 = leaf_table(&t, VA);
    t.engine().flush_ops().watched.lock().unwrap().push(l3);
    t.unmap(Iova::new(VA), PageSize::SZ_2M, 1, &mut Gather::new())
        .unwrap();
    assert!(mem.table(l3).is_none(), "freed after the flush");
    // A block map over an emptied table, inside the reservation.
    let l3 = leaf_table(&t, VA + M2);
    *t.engine().flush_ops().watched.lock().unwrap() = vec![l3];
    t.unmap(Iova::new(VA + M2), PageSize::SZ_4K, 512, &mut Gather::new())
        .unwrap();
    assert!(
        mem.table(l3).is_some(),
        "small unmaps keep tables (Linux policy)"
    );
    t.map_reserved(&res, Iova::new(VA + M2), pa(M2), PageSize::SZ_2M, 1, RW)
        .unwrap();
    assert!(mem.table(l3).is_none());
    assert_eq!(
        t.engine()
            .flush_ops()
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    t.release(res, &mut Gather::new()).unwrap();
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}

/// Many live reservations, each answering for itself; a handle rebuilt from a live one's
/// fields is refused for maps and release while the original keeps working, and after.
#[test]
fn many_live_reservations_and_their_copies() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    let n = 131;
    let held: Vec<Reservation> = (0..n)
        .map(|i| {
            t.reserve(range(VA + i * M2, 2 * K4), PageSize::SZ_4K)
                .unwrap()
        })
        .collect();
    for (i, res) in (0u64..).zip(&held) {
        let at = VA + i * M2;
        t.map_reserved(res, Iova::new(at), pa(at), PageSize::SZ_4K, 2, RW)
            .unwrap();
        assert_eq!(
            t.map_reserved(res, Iova::new(at + K4), pa(0), PageSize::SZ_4K, 2, RW),
            Err(MapError::OutsideReservation {
                id: res.id(),
                range: res.range(),
                iova: Iova::new(at + 2 * K4)
            })
        );
        assert_eq!(
            t.map_reserved(res, Iova::new(at), pa(0), PageSize::SZ_4K, 0, RW),
            t.map(Iova::new(at), pa(0), PageSize::SZ_4K, 0, RW)
        );
    }
    for res in held {
        let copy = || Issuer::new(t.table_id()).issue(res.id(), res.range(), res.max_leaf(), 0, 1);
        let at = res.range().start();
        assert_eq!(
            t.map_reserved(&copy(), at, pa(0), PageSize::SZ_4K, 1, RW),
            Err(MapError::UnknownReservation { id: res.id() })
        );
        assert_eq!(
            t.release(copy(), &mut Gather::new()).map_err(|e| e.error()),
            Err(ReserveError::UnknownReservation { id: res.id() })
        );
        assert_eq!(t.reservation_left(&copy()), None);
        assert!(t.reservation_left(&res).is_some());
        let forged = copy();
        t.release(res, &mut Gather::new()).unwrap();
        assert_eq!(
            t.map_reserved(
                &forged,
                forged.range().start(),
                pa(0),
                PageSize::SZ_4K,
                1,
                RW
            ),
            Err(MapError::UnknownReservation { id: forged.id() })
        );
    }
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
}

/// A release sent to the wrong table, or with a rebuilt handle, fails and gives the handle
/// back with the reservation intact: the right table still maps inside it without the
/// allocator and its release returns every page.
#[test]
fn failed_release_returns_the_handle() {
    let (mem_a, mem_b) = (SimMemory::new(), SimMemory::new());
    let a = AllocOpsTable::new(full_cfg(), &mem_a).unwrap();
    let b = AllocOpsTable::new(full_cfg(), &mem_b).unwrap();
    let r = range(VA, 4 * M2);
    let res = a.reserve(r, PageSize::SZ_4K).unwrap();
    let (id, pages) = (res.id(), res.pages());
    let before_b = (dump(&b), mem_b.stats());

    let err = b.release(res, &mut Gather::new()).unwrap_err();
    assert_eq!(err.error(), ReserveError::UnknownReservation { id });
    assert_eq!(err.reservation().id(), id);
    assert!(err.to_string().contains("not live on this table"), "{err}");
    assert!(core::error::Error::source(&err).is_some());
    assert_eq!(
        (dump(&b), mem_b.stats()),
        before_b,
        "the wrong table changed"
    );
    let res = err.into_reservation();

    // Intact on the table that issued it.
    assert_eq!(a.reservation_left(&res), Some(pages));
    assert_eq!(a.live_reservations(), 1);
    assert_eq!(a.in_flight(), pages);
    let calls = alloc_calls(&mem_a);
    a.map_reserved(&res, r.start(), pa(0), PageSize::SZ_4K, 3, RW)
        .unwrap();
    assert_eq!(alloc_calls(&mem_a), calls, "the map drew on the pool");

    // A rebuilt handle is refused and handed back unchanged too.
    let forged = Issuer::new(a.table_id()).issue(id, r, PageSize::SZ_4K, pages, 1);
    let (forged, e) = a
        .release(forged, &mut Gather::new())
        .unwrap_err()
        .into_parts();
    assert_eq!(e, ReserveError::UnknownReservation { id });
    assert_eq!(forged.id(), id);
    assert_eq!(a.live_reservations(), 1);

    // The right table takes it: the unused pages come back.
    let used = mem_a.stats().live_pages;
    let left = a.reservation_left(&res).unwrap();
    assert!(left < pages);
    a.release(res, &mut Gather::new()).unwrap();
    assert_eq!(a.live_reservations(), 0);
    assert_eq!(a.in_flight(), 0);
    assert_eq!(mem_a.stats().live_pages, used - left as u64);
    assert_eq!(a.stats().reserved_outstanding, 0);
    drop(a);
    assert_eq!(mem_a.stats().live_pages, 0);
}

/// A batch over many disjoint ranges: a map inside any one of them is accepted, and one that
/// leaves the union (before the first, between two, after the last, or straddling an edge) is
/// refused at the first IOVA outside, the table unchanged.
#[test]
fn batch_bounds_over_many_ranges() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    // 1000 two-page ranges, one every 16 KiB, given out of order; two of them touch.
    let n = 1000u64;
    let at = |i: u64| VA + i * 4 * K4;
    let mut ranges: Vec<_> = (0..n).map(|i| range(at(i), 2 * K4)).collect();
    ranges.push(range(at(n - 1) + 2 * K4, K4)); // extends the last range to three pages
    ranges.reverse();
    ranges.swap(3, 700);
    let batch = t
        .reserve_batch_with(&ranges, PageSize::SZ_4K, CountPolicy::MsmMerged)
        .unwrap();
    assert_eq!(batch.range(), range(at(0), at(n - 1) + 3 * K4 - at(0)));
    let outside = |iova: u64, count: u64, first_out: u64| {
        let before = dump(&t);
        assert_eq!(
            t.map_reserved(&batch, Iova::new(iova), pa(0), PageSize::SZ_4K, count, RW),
            Err(MapError::OutsideReservation {
                id: batch.id(),
                range: batch.range(),
                iova: Iova::new(first_out)
            }),
            "map of {count} page(s) at {iova:#x}"
        );
        assert_eq!(dump(&t), before);
    };
    outside(at(0) - K4, 1, at(0) - K4);
    outside(at(0) - K4, 2, at(0) - K4);
    for i in [0, 1, 499, 998] {
        outside(at(i) + 2 * K4, 1, at(i) + 2 * K4); // the gap after range i
        outside(at(i) + 3 * K4, 1, at(i) + 3 * K4);
        outside(at(i) + K4, 2, at(i) + 2 * K4); // straddles its end
        outside(at(i), 4, at(i) + 2 * K4); // covers the gap up to the next range
    }
    outside(at(n - 1) + 3 * K4, 1, at(n - 1) + 3 * K4);
    outside(at(n - 1) + K4, 3, at(n - 1) + 3 * K4);
    outside(at(n + 100), 1, at(n + 100));
    // Inside: every range, both pages, the merged tail's three.
    for i in (0..n).rev() {
        t.map_reserved(
            &batch,
            Iova::new(at(i)),
            pa(i * 2 * K4),
            PageSize::SZ_4K,
            2,
            RW,
        )
        .unwrap();
    }
    t.map_reserved(
        &batch,
        Iova::new(at(n - 1) + 2 * K4),
        pa(0),
        PageSize::SZ_4K,
        1,
        RW,
    )
    .unwrap();
    assert_eq!(leaves(&t).len() as u64, 2 * n + 1);
    t.release(batch, &mut Gather::new()).unwrap();
}
