//! Deterministic tests: the worked examples of docs/designs.md §8, counters, semantics, flush
//! ordering, failure injection and teardown.

mod common;

use common::*;
use iopt_api::{
    FlushOps, Gather, IoPageTable, Iova, IovaRange, Issuer, MapError, PageSize, PageSizes, Prot,
    Reservation, Reserve, ReserveError, UnmapError,
};
use iopt_prealloc::PreallocTable;
use iopt_sim::SimMemory;
use std::sync::{Arc, Mutex};

const RW: Prot = Prot::READ.union(Prot::WRITE);

/// A base IOVA aligned to 512 GiB (so "VA" below is aligned to everything).
const VA: u64 = 3 * G512;

/// A physical address for `iova` that is congruent to it modulo 512 GiB and below 2^40.
fn congruent(iova: u64) -> u64 {
    (iova % G512) + G512 / 2
}

/// Maps `[start, start + len)` inside `r` with the largest leaves up to `max_leaf` the IOVA
/// alignment allows (what 2 MiB-contiguous backing gives), as `map_range` would split it.
fn map_congruent(t: &Table<'_>, r: &Reservation, start: u64, len: u64, max_leaf: PageSize) {
    let sizes = PageSizes::from_bits(t.config().page_sizes().bits() & (2 * max_leaf.get() - 1));
    let mut done = 0;
    while done < len {
        let at = start + done;
        let (size, count) = sizes.best_fit(at, congruent(at), len - done).unwrap();
        t.map_reserved(r, iova(at), pa(congruent(at)), size, count, RW)
            .unwrap();
        done += size.get() * count;
    }
}

/// docs/designs.md §8: (description, start, length, need with 4K-scattered backing, need with
/// 2M-contiguous backing).
const EXAMPLES: &[(&str, u64, u64, usize, usize)] = &[
    ("4 KiB at 2 MiB-aligned VA", VA, K4, 3, 3),
    ("64 KiB at 2 MiB-aligned VA", VA, 16 * K4, 3, 3),
    (
        "8 KiB straddling a 2 MiB boundary",
        VA + M2 - K4,
        2 * K4,
        4,
        4,
    ),
    (
        "8 KiB straddling a 1 GiB boundary",
        VA + G1 - K4,
        2 * K4,
        5,
        5,
    ),
    (
        "8 KiB straddling a 512 GiB boundary",
        VA + G512 - K4,
        2 * K4,
        6,
        6,
    ),
    ("2 MiB at 2 MiB-aligned VA", VA, M2, 3, 2),
    ("2 MiB at VA + 4 KiB", VA + K4, M2, 4, 4),
    ("1 GiB at 1 GiB-aligned VA", VA, G1, 514, 2),
    ("1 GiB at VA + 2 MiB", VA + M2, G1, 515, 3),
    ("1 GiB at VA + 4 KiB", VA + K4, G1, 516, 5),
    ("512 GiB at 512 GiB-aligned VA", VA, G512, 262_657, 513),
];

#[test]
fn reserve_takes_exactly_the_needed_pages_of_each_worked_example() {
    for &(what, start, len, need_4k, need_2m) in EXAMPLES {
        for (leaf, need) in [(PageSize::SZ_4K, need_4k), (PageSize::SZ_2M, need_2m)] {
            let mem = SimMemory::new();
            let t = PreallocTable::new(panthor(), &mem).unwrap();
            let r = range(start, len);
            assert_eq!(
                t.pages_needed(r, leaf).unwrap(),
                need,
                "{what}, leaf {leaf}"
            );
            if len == G512 {
                continue; // counted only: the 4K case would be 1 GiB of tables
            }
            let before = mem.stats();
            let res = t.reserve(r, leaf).unwrap();
            let after = mem.stats();
            assert_eq!(res.pages(), need, "{what}, leaf {leaf}");
            assert_eq!(
                after.pages_allocated - before.pages_allocated,
                need as u64,
                "{what}"
            );
            assert_eq!(
                after.alloc_bulk_calls - before.alloc_bulk_calls,
                1,
                "{what}"
            );
            assert_eq!(
                after.alloc_calls, before.alloc_calls,
                "{what}: single allocs"
            );
            assert_eq!(after.live_pages, 1 + need as u64, "{what}");
            check_invariants(&t, &mem, &[(r, leaf)]);

            // Populated now: a reservation of the same range needs nothing and makes no
            // allocator call at all.
            assert_eq!(t.pages_needed(r, leaf).unwrap(), 0, "{what}");
            let again = t.reserve(r, leaf).unwrap();
            assert_eq!(again.pages(), 0);
            assert_eq!(mem.stats().alloc_bulk_calls, after.alloc_bulk_calls);
            check_invariants(&t, &mem, &[(r, leaf), (r, leaf)]);

            // Map the whole range inside the reservation: zero allocator calls.
            if leaf == PageSize::SZ_4K {
                // Scattered backing: 4 KiB pages, PA not congruent.
                t.map_reserved(
                    &res,
                    iova(start),
                    pa(congruent(start) + K4),
                    PageSize::SZ_4K,
                    len / K4,
                    RW,
                )
                .unwrap();
            } else {
                map_congruent(&t, &res, start, len, leaf);
            }
            let mapped = mem.stats();
            assert_eq!(
                mapped.alloc_calls, after.alloc_calls,
                "{what}: map allocated"
            );
            assert_eq!(mapped.alloc_bulk_calls, after.alloc_bulk_calls, "{what}");
            let off = if leaf == PageSize::SZ_4K { K4 } else { 0 };
            assert_eq!(
                t.iova_to_phys(iova(start + 0x123)).unwrap().pa,
                pa(congruent(start) + off + 0x123)
            );
            let mapped_bytes: u64 = leaves(&t).values().map(|&(size, _)| size).sum();
            assert_eq!(mapped_bytes, len);
            check_invariants(&t, &mem, &[(r, leaf), (r, leaf)]);

            // Unmap it all: zero frees. Release the inner reservation: still nothing freed.
            let mut g = Gather::new();
            let leaves = leaves(&t);
            for (&at, &(size, _)) in &leaves {
                t.unmap(iova(at), PageSize::new(size).unwrap(), 1, &mut g)
                    .unwrap();
            }
            t.release(again, &mut g).unwrap();
            let unmapped = mem.stats();
            assert_eq!(
                unmapped.pages_freed, mapped.pages_freed,
                "{what}: unmap freed"
            );
            assert_eq!(
                unmapped.free_calls + unmapped.free_bulk_calls,
                mapped.free_calls + mapped.free_bulk_calls
            );
            check_invariants(&t, &mem, &[(r, leaf)]);

            // Release: everything goes, in one bulk free.
            t.release(res, &mut g).unwrap();
            let released = mem.stats();
            assert_eq!(released.live_pages, 1, "{what}: root alone");
            assert_eq!(
                released.free_bulk_calls - unmapped.free_bulk_calls,
                1,
                "{what}"
            );
            assert_eq!(released.pages_freed - unmapped.pages_freed, need as u64);
            check_invariants(&t, &mem, &[]);
            let s = t.stats();
            assert_eq!(s.pages_reserved, need as u64);
            assert_eq!(s.pages_consumed, need as u64);
            assert_eq!(s.reserved_unused, 0);
            assert_eq!(s.empty_tables_freed, need as u64);
        }
    }
}

#[test]
fn many_small_binds_in_one_region_take_three_pages_in_total() {
    // docs/designs.md §8: 1000 separate 4 KiB binds in one 2 MiB region reserve 3,000 pages under
    // Design 1; here they take 3, once.
    let mem = SimMemory::new();
    let t = PreallocTable::new(panthor(), &mem).unwrap();
    let mut held = Vec::new();
    let mut total = 0;
    for i in 0..1000u64 {
        let r = t
            .reserve(range(VA + (i % 512) * K4, K4), PageSize::SZ_4K)
            .unwrap();
        total += r.pages();
        held.push(r);
    }
    assert_eq!(total, 3);
    assert_eq!(mem.stats().alloc_bulk_calls, 1);
    let mut g = Gather::new();
    for r in held {
        t.release(r, &mut g).unwrap();
    }
    check_invariants(&t, &mem, &[]);
    assert_eq!(mem.stats().live_pages, 1);
}

#[test]
fn nested_and_overlapping_reservations_share_tables() {
    let mem = SimMemory::new();
    let t = PreallocTable::new(panthor(), &mem).unwrap();
    let a = range(VA, 4 * M2);
    let b = range(VA + 2 * M2, 4 * M2);
    let inner = range(VA + M2 + 8 * K4, 4 * K4);
    let ra = t.reserve(a, PageSize::SZ_4K).unwrap();
    assert_eq!(ra.pages(), 2 + 4);
    let rb = t.reserve(b, PageSize::SZ_4K).unwrap();
    assert_eq!(rb.pages(), 2, "only the two L3 tables past A");
    let ri = t.reserve(inner, PageSize::SZ_4K).unwrap();
    assert_eq!(ri.pages(), 0);
    let mut live = vec![
        (a, PageSize::SZ_4K),
        (b, PageSize::SZ_4K),
        (inner, PageSize::SZ_4K),
    ];
    check_invariants(&t, &mem, &live);

    // Map in the overlap through B, and in A only through A.
    t.map_reserved(
        &rb,
        iova(VA + 2 * M2),
        pa(0x1000_0000),
        PageSize::SZ_4K,
        3,
        RW,
    )
    .unwrap();
    t.map_reserved(&ra, iova(VA), pa(0x2000_0000), PageSize::SZ_4K, 1, RW)
        .unwrap();
    // Releasing A frees A's first L3 table only: the second is the inner reservation's, the
    // last two are B's too. A's release unmaps what is inside A (the overlap included).
    let mut g = Gather::new();
    let before = mem.stats();
    t.release(ra, &mut g).unwrap();
    live.remove(0);
    check_invariants(&t, &mem, &live);
    assert_eq!(mem.stats().pages_freed - before.pages_freed, 1);
    assert_eq!(g.pages(), 4, "release unmapped the 4 leaves inside A");
    assert!(t.iova_to_phys(iova(VA + 2 * M2)).is_none());
    t.release(ri, &mut g).unwrap();
    live.pop();
    check_invariants(&t, &mem, &live);
    t.release(rb, &mut g).unwrap();
    check_invariants(&t, &mem, &[]);
    assert_eq!(mem.stats().live_pages, 1);
}

#[test]
fn reservation_errors_are_typed_and_change_nothing() {
    let mem = SimMemory::new();
    let t = PreallocTable::new(panthor(), &mem).unwrap();
    let mem2 = SimMemory::new();
    let other = PreallocTable::new(panthor(), &mem2).unwrap();
    let r = range(VA, M2);
    let res = t.reserve(r, PageSize::SZ_2M).unwrap();
    let snap = (dump(&t), mem.live_set());

    // Outside the reservation, at either end.
    let e = t
        .map_reserved(&res, iova(VA - K4), pa(0), PageSize::SZ_4K, 2, RW)
        .unwrap_err();
    assert_eq!(
        e,
        MapError::OutsideReservation {
            id: res.id(),
            range: r,
            iova: iova(VA - K4)
        }
    );
    let e = t
        .map_reserved(&res, iova(VA + M2 - K4), pa(0), PageSize::SZ_4K, 2, RW)
        .unwrap_err();
    assert_eq!(
        e,
        MapError::OutsideReservation {
            id: res.id(),
            range: r,
            iova: iova(VA + M2)
        }
    );
    // A leaf smaller than planned needs a table the reservation did not install: refused,
    // never allocated.
    let e = t
        .map_reserved(&res, iova(VA), pa(0), PageSize::SZ_4K, 1, RW)
        .unwrap_err();
    assert_eq!(
        e,
        MapError::ReservationExhausted {
            id: res.id(),
            left: 0,
            needed: 1
        }
    );
    // Another table's handle, and a forged one.
    let forged = Issuer::new(t.id()).issue(999, r, PageSize::SZ_2M, 0, 0);
    assert_eq!(
        t.map_reserved(&forged, iova(VA), pa(0), PageSize::SZ_2M, 1, RW),
        Err(MapError::UnknownReservation { id: 999 })
    );
    // A handle rebuilt from a live one's fields is not that reservation, with the same range
    // and leaf size or others, even where the map lies inside both: only the handle the
    // table issued carries its key.
    let wider = range(VA, 2 * M2);
    for (fr, leaf) in [
        (r, PageSize::SZ_2M),
        (wider, PageSize::SZ_2M),
        (r, PageSize::SZ_4K),
    ] {
        let forged = Issuer::new(t.id()).issue(res.id(), fr, leaf, res.pages(), 0);
        assert_eq!(
            t.map_reserved(&forged, iova(VA), pa(0), PageSize::SZ_2M, 1, RW),
            Err(MapError::UnknownReservation { id: res.id() })
        );
    }
    let theirs = other.reserve(r, PageSize::SZ_2M).unwrap();
    assert!(matches!(
        t.map_reserved(&theirs, iova(VA), pa(0), PageSize::SZ_2M, 1, RW),
        Err(MapError::UnknownReservation { .. })
    ));
    let theirs_id = theirs.id();
    let (theirs, why) = t
        .release(theirs, &mut Gather::new())
        .unwrap_err()
        .into_parts();
    assert_eq!(why, ReserveError::UnknownReservation { id: theirs_id });
    // Bad arguments.
    assert!(matches!(
        t.reserve(r, PageSize::SZ_1G),
        Err(ReserveError::BadLeafSize { .. })
    ));
    let odd = IovaRange::new(iova(VA + 0x800), 0x1000, 0x800).unwrap();
    assert!(matches!(
        t.reserve(odd, PageSize::SZ_4K),
        Err(ReserveError::BadLeafSize { .. })
    ));
    let high = range(1 << 48, M2);
    assert!(matches!(
        t.reserve(high, PageSize::SZ_4K),
        Err(ReserveError::OutOfRange { .. })
    ));
    assert_eq!((dump(&t), mem.live_set()), snap);

    // Double release: the second handle (same id, range and leaf) is unknown.
    let copy = Issuer::new(t.id()).issue(res.id(), res.range(), res.max_leaf(), res.pages(), 0);
    t.release(res, &mut Gather::new()).unwrap();
    assert!(matches!(
        t.release(copy, &mut Gather::new()).map_err(|e| e.error()),
        Err(ReserveError::UnknownReservation { .. })
    ));
    check_invariants(&t, &mem, &[]);
    check_invariants(&other, &mem2, &[(r, PageSize::SZ_2M)]);
    // The refused release gave `theirs` back, live on the table that issued it.
    other.release(theirs, &mut Gather::new()).unwrap();
    check_invariants(&other, &mem2, &[]);
}

#[test]
fn block_maps_and_block_unmaps_never_remove_a_reserved_table() {
    let mem = SimMemory::new();
    let t = PreallocTable::new(panthor(), &mem).unwrap();
    let r = range(VA, M2);
    let res = t.reserve(r, PageSize::SZ_4K).unwrap();
    let snap = (dump(&t), mem.live_set());
    // A 2 MiB block over the reserved (empty) L3: Linux would free it.
    assert_eq!(
        t.map(iova(VA), pa(0), PageSize::SZ_2M, 1, RW),
        Err(MapError::ReservedTable { iova: iova(VA) })
    );
    assert_eq!(
        t.map_range(iova(VA - M2), pa(0), 2 * M2, RW),
        Err(MapError::ReservedTable { iova: iova(VA) })
    );
    assert_eq!((dump(&t), mem.live_set()), snap);
    // With a leaf inside, Linux's "already mapped" comes first.
    t.map_reserved(&res, iova(VA + K4), pa(0), PageSize::SZ_4K, 1, RW)
        .unwrap();
    assert_eq!(
        t.map(iova(VA), pa(0), PageSize::SZ_2M, 1, RW),
        Err(MapError::AlreadyMapped { iova: iova(VA) })
    );
    // An unmap at 2 MiB would remove the reserved table with its leaf.
    let mut g = Gather::new();
    assert_eq!(
        t.unmap(iova(VA), PageSize::SZ_2M, 1, &mut g),
        Err(UnmapError::ReservedTable { iova: iova(VA) })
    );
    // Unreserved, the same unmap removes the table and all it holds (Linux).
    t.map(iova(VA + M2 + K4), pa(0), PageSize::SZ_4K, 3, RW)
        .unwrap();
    assert_eq!(t.unmap(iova(VA + M2), PageSize::SZ_2M, 1, &mut g), Ok(M2));
    assert!(t.iova_to_phys(iova(VA + M2 + K4)).is_none());
    check_invariants(&t, &mem, &[(r, PageSize::SZ_4K)]);
    // A block already there is in the way of a 4 KiB reservation, not of a 2 MiB one.
    t.map(iova(VA + 4 * M2), pa(0), PageSize::SZ_2M, 1, RW)
        .unwrap();
    let snap = (dump(&t), mem.live_set());
    assert_eq!(
        t.reserve(range(VA + 4 * M2, M2), PageSize::SZ_4K),
        Err(ReserveError::BlockInTheWay {
            iova: iova(VA + 4 * M2)
        })
    );
    assert_eq!((dump(&t), mem.live_set()), snap);
    let over = t.reserve(range(VA + 4 * M2, M2), PageSize::SZ_2M).unwrap();
    assert_eq!(over.pages(), 0);
    t.release(over, &mut g).unwrap();
    assert!(
        t.iova_to_phys(iova(VA + 4 * M2)).is_none(),
        "release unmapped the block"
    );
    t.release(res, &mut g).unwrap();
    check_invariants(&t, &mem, &[]);
    assert_eq!(mem.stats().live_pages, 1);
}

#[test]
fn outside_reservations_tables_come_and_go_on_demand() {
    let mem = SimMemory::new();
    let t = PreallocTable::new(panthor(), &mem).unwrap();
    let mut g = Gather::new();
    t.map(iova(VA + 5 * K4), pa(0x4000), PageSize::SZ_4K, 1, RW)
        .unwrap();
    assert_eq!(mem.stats().live_pages, 4);
    assert_eq!(mem.stats().alloc_calls, 4, "one call per table, as Linux");
    t.map(iova(VA + 7 * K4), pa(0x4000), PageSize::SZ_4K, 1, RW)
        .unwrap();
    t.unmap(iova(VA + 5 * K4), PageSize::SZ_4K, 1, &mut g)
        .unwrap();
    assert_eq!(mem.stats().live_pages, 4, "the L3 still holds a leaf");
    t.unmap(iova(VA + 7 * K4), PageSize::SZ_4K, 1, &mut g)
        .unwrap();
    assert_eq!(mem.stats().live_pages, 1, "emptied tables freed eagerly");
    let s = t.stats();
    assert_eq!((s.empty_tables_freed, s.free_bulk_calls), (3, 1));
    // A plain map inside a reservation finds its tables; a smaller leaf allocates the rest.
    let r = t.reserve(range(VA, 4 * M2), PageSize::SZ_2M).unwrap();
    assert_eq!(r.pages(), 2);
    let before = mem.stats();
    t.map(iova(VA + M2), pa(0x20_0000), PageSize::SZ_2M, 1, RW)
        .unwrap();
    assert_eq!(mem.stats().pages_allocated, before.pages_allocated);
    t.map(iova(VA + 2 * M2), pa(0x4000), PageSize::SZ_4K, 1, RW)
        .unwrap();
    assert_eq!(mem.stats().pages_allocated, before.pages_allocated + 1);
    check_invariants(&t, &mem, &[(range(VA, 4 * M2), PageSize::SZ_2M)]);
    // The on-demand L3 under the reservation is not reserved: it goes when it empties.
    t.unmap(iova(VA + 2 * M2), PageSize::SZ_4K, 1, &mut g)
        .unwrap();
    assert_eq!(mem.stats().pages_freed, before.pages_freed + 1);
    t.release(r, &mut g).unwrap();
    check_invariants(&t, &mem, &[]);
    assert_eq!(mem.stats().live_pages, 1);
}

/// Records every walk flush with the allocator's live page count at that moment.
#[derive(Debug)]
struct Recorder {
    mem: Arc<SimMemory>,
    flushes: Mutex<Vec<(Iova, u64, u64)>>,
}

impl FlushOps for Recorder {
    fn flush_walk(&self, iova: Iova, size: u64, _granule: u64) {
        let live = self.mem.stats().live_pages;
        self.flushes.lock().unwrap().push((iova, size, live));
    }
}

/// Shares a [`Recorder`] with the test.
struct F(Arc<Recorder>);

impl FlushOps for F {
    fn flush_walk(&self, iova: Iova, size: u64, granule: u64) {
        self.0.flush_walk(iova, size, granule);
    }
}

#[test]
fn release_flushes_each_unlinked_subtree_before_one_batch_free() {
    let mem = Arc::new(SimMemory::new());
    let rec = Arc::new(Recorder {
        mem: Arc::clone(&mem),
        flushes: Mutex::new(Vec::new()),
    });
    let t = PreallocTable::with_flush(panthor(), Arc::clone(&mem), F(Arc::clone(&rec))).unwrap();
    let r = t.reserve(range(VA + K4, G1), PageSize::SZ_4K).unwrap();
    assert_eq!(r.pages(), 516);
    t.map_reserved(&r, iova(VA + M2), pa(0), PageSize::SZ_4K, 10, RW)
        .unwrap();
    let live = mem.stats().live_pages;
    let bulk = mem.stats().free_bulk_calls;
    let mut g = Gather::new();
    t.release(r, &mut g).unwrap();
    // The whole L1 subtree is unlinked from the root at once: one flush of its 512 GiB span,
    // issued while every page was still live, then one bulk free of all 516.
    let flushes = rec.flushes.lock().unwrap().clone();
    assert_eq!(flushes, vec![(iova(VA), G512, live)]);
    assert_eq!(mem.stats().free_bulk_calls, bulk + 1);
    assert_eq!(mem.stats().live_pages, 1);
    assert_eq!(g.pages(), 10);
}

#[test]
fn dropping_the_table_returns_every_page() {
    let mem = SimMemory::new();
    {
        let t = PreallocTable::new(panthor(), &mem).unwrap();
        let r1 = t.reserve(range(VA + K4, G1), PageSize::SZ_2M).unwrap();
        let r2 = t.reserve(range(VA, 8 * M2), PageSize::SZ_4K).unwrap();
        t.map_reserved(&r2, iova(VA), pa(0), PageSize::SZ_4K, 100, RW)
            .unwrap();
        t.map(iova(7 * G512), pa(0), PageSize::SZ_2M, 3, RW)
            .unwrap();
        assert!(mem.stats().live_pages > 10);
        // Dropped without release: the table still owns and frees their tables.
        drop((r1, r2));
    }
    let s = mem.stats();
    assert_eq!((s.live_pages, s.bad_frees), (0, 0));
}

/// Runs `op` with an allocation failure injected at k = 0, 1, ... until it succeeds, checking
/// that each failure is `is_alloc_err` and leaves the tree and the allocator's live set as
/// they were. Returns how many failures were injected.
fn inject<T>(
    t: &Table<'_>,
    mem: &SimMemory,
    mut op: impl FnMut() -> Result<T, String>,
) -> (u64, T) {
    for k in 0.. {
        let before = (dump(t), mem.live_set());
        mem.fail_at(k);
        let res = op();
        mem.clear_failure();
        match res {
            Ok(v) => return (k, v),
            Err(e) => {
                assert!(
                    e.contains("Alloc") && e.contains("OutOfMemory"),
                    "k={k}: {e}"
                );
                assert_eq!(dump(t), before.0, "k={k}: tree changed by a failed op");
                assert_eq!(mem.live_set(), before.1, "k={k}: live set changed");
                assert_eq!(t.engine().deferred_frees(), 0);
            }
        }
    }
    unreachable!()
}

fn populated(mem: &SimMemory) -> Table<'_> {
    let t = PreallocTable::new(panthor(), mem).unwrap();
    // Some tables already there: part of the ranges below are populated.
    t.map(
        iova(VA + 3 * M2 + K4),
        pa(0x10_0000),
        PageSize::SZ_4K,
        2,
        RW,
    )
    .unwrap();
    t.map(
        iova(VA + G1 + 6 * M2),
        pa(0x20_0000),
        PageSize::SZ_2M,
        1,
        RW,
    )
    .unwrap();
    t
}

#[test]
fn failure_at_every_allocation_inside_reserve_changes_nothing() {
    let cases: &[(u64, u64, PageSize)] = &[
        (VA, K4, PageSize::SZ_4K),
        (VA + M2 - K4, 2 * K4, PageSize::SZ_4K),
        (VA + K4, G1, PageSize::SZ_2M),
        (VA + 2 * M2, 8 * M2, PageSize::SZ_4K),
        (VA + G1 - 4 * M2, 8 * M2 + K4, PageSize::SZ_2M),
        (VA + G512 - K4, 2 * K4, PageSize::SZ_4K),
    ];
    let mut injected = 0;
    for &(start, len, leaf) in cases {
        let mem = SimMemory::new();
        let t = populated(&mem);
        let need = t.pages_needed(range(start, len), leaf).unwrap();
        let (k, r) = inject(&t, &mem, || {
            t.reserve(range(start, len), leaf)
                .map_err(|e| format!("{e:?}"))
        });
        // One bulk allocation: it fails whole for every k inside it.
        assert_eq!(k, need as u64, "{start:#x}+{len:#x}");
        injected += k;
        assert_eq!(r.pages(), need);
        check_invariants(&t, &mem, &[(range(start, len), leaf)]);
        t.release(r, &mut Gather::new()).unwrap();
        check_invariants(&t, &mem, &[]);
    }
    assert!(injected > 0);
}

#[test]
fn failure_at_every_allocation_inside_unreserved_maps_changes_nothing() {
    type Op = fn(&Table<'_>) -> Result<(), MapError>;
    let ops: &[(&str, Op)] = &[
        ("4K in an empty 512G region", |t| {
            t.map(iova(5 * G512 + M2), pa(0), PageSize::SZ_4K, 1, RW)
        }),
        ("4K run across a 1G boundary", |t| {
            t.map(iova(VA + G1 - 2 * K4), pa(0), PageSize::SZ_4K, 4, RW)
        }),
        ("map_range 4K+2M+4K", |t| {
            t.map_range(iova(VA + 8 * M2 - K4), pa(2 * M2 - K4), M2 + 2 * K4, RW)
        }),
        ("map_range next to populated tables", |t| {
            t.map_range(iova(VA + 3 * M2 + 8 * K4), pa(0), M2 + 64 * K4, RW)
        }),
        ("many 2M blocks across 1G", |t| {
            t.map(
                iova(VA + 5 * G1 - 4 * M2),
                pa(0x4000_0000),
                PageSize::SZ_2M,
                8,
                RW,
            )
        }),
        ("4K across 512G", |t| {
            t.map(iova(VA + G512 - K4), pa(0), PageSize::SZ_4K, 2, RW)
        }),
    ];
    let mut injected = 0;
    for &(what, op) in ops {
        let mem = SimMemory::new();
        let t = populated(&mem);
        let (k, ()) = inject(&t, &mem, || op(&t).map_err(|e| format!("{e:?}")));
        assert!(k > 0, "{what}: needed no allocation");
        injected += k;
        check_invariants(&t, &mem, &[]);
    }
    assert!(injected >= 10);
}

#[test]
fn send_sync() {
    fn is<T: Send + Sync>() {}
    is::<PreallocTable<SimMemory>>();
    is::<PreallocTable<Arc<SimMemory>, Recorder>>();
}

#[test]
fn differs_from_linux_only_where_linux_keeps_an_emptied_table() {
    let (m1, m2) = (SimMemory::new(), SimMemory::new());
    let lp = iopt_lpae::LpaeTable::new(panthor(), &m1).unwrap();
    let pre = PreallocTable::new(panthor(), &m2).unwrap();
    let mut g = Gather::new();
    for t in [&lp as &dyn IoPageTable, &pre] {
        t.map(iova(VA + K4), pa(0), PageSize::SZ_4K, 1, RW).unwrap();
        t.unmap(iova(VA + K4), PageSize::SZ_4K, 1, &mut g).unwrap();
    }
    // Linux still holds the empty L3 and an unmap at 2 MiB "removes" it; ours is gone.
    assert_eq!(lp.unmap(iova(VA), PageSize::SZ_2M, 1, &mut g), Ok(M2));
    assert_eq!(
        pre.unmap(iova(VA), PageSize::SZ_2M, 1, &mut g),
        Err(UnmapError::NotMapped { iova: iova(VA) })
    );
    assert_eq!((m1.stats().live_pages, m2.stats().live_pages), (3, 1));
}

/// An allocator that runs a hook once, inside the next allocation: a way to make another
/// operation happen between a reservation's (or a map's) count and its installation.
struct HookAlloc {
    mem: SimMemory,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl iopt_api::TableAlloc for HookAlloc {
    fn alloc(&self, size: u64) -> Result<iopt_api::PhysAddr, iopt_api::AllocError> {
        let r = self.mem.alloc(size);
        let hook = self.hook.lock().unwrap().take();
        if let Some(h) = hook {
            h();
        }
        r
    }
    fn alloc_bulk(
        &self,
        size: u64,
        count: usize,
        out: &mut Vec<iopt_api::PhysAddr>,
    ) -> Result<(), iopt_api::AllocError> {
        let r = self.mem.alloc_bulk(size, count, out);
        let hook = self.hook.lock().unwrap().take();
        if let Some(h) = hook {
            h();
        }
        r
    }
    fn free(&self, pa: iopt_api::PhysAddr, size: u64) {
        self.mem.free(pa, size);
    }
    fn free_bulk(&self, pages: &[iopt_api::PhysAddr], size: u64) {
        self.mem.free_bulk(pages, size);
    }
    fn table(&self, pa: iopt_api::PhysAddr) -> Option<iopt_api::TableRef<'_>> {
        self.mem.table(pa)
    }
    fn clean(&self, pa: iopt_api::PhysAddr, bytes: u64) {
        self.mem.clean(pa, bytes);
    }
}

#[test]
fn reserve_tops_up_or_rolls_back_when_a_counted_table_is_freed_meanwhile() {
    for fail in [false, true] {
        let alloc = Arc::new(HookAlloc {
            mem: SimMemory::new(),
            hook: Mutex::new(None),
        });
        let t = Arc::new(PreallocTable::new(panthor(), Arc::clone(&alloc)).unwrap());
        t.map(iova(VA), pa(0), PageSize::SZ_4K, 1, RW).unwrap();
        let r = range(VA + M2, K4);
        assert_eq!(
            t.pages_needed(r, PageSize::SZ_4K).unwrap(),
            1,
            "only an L3 is missing"
        );
        // Between the count and the install, the only leaf goes and with it L1, L2 and L3.
        let weak = Arc::downgrade(&t);
        let a2 = Arc::clone(&alloc);
        *alloc.hook.lock().unwrap() = Some(Box::new(move || {
            let t = weak.upgrade().unwrap();
            t.unmap(iova(VA), PageSize::SZ_4K, 1, &mut Gather::new())
                .unwrap();
            if fail {
                a2.mem.fail_at(1); // the second top-up page
            }
        }));
        let res = t.reserve(r, PageSize::SZ_4K);
        alloc.mem.clear_failure();
        if fail {
            assert!(matches!(res, Err(ReserveError::Alloc { .. })), "{res:?}");
            // Rolled back: what the unmap left, the root alone.
            assert_eq!(alloc.mem.stats().live_pages, 1);
            assert_eq!(dump(&*t).len(), 1);
        } else {
            let res = res.unwrap();
            assert_eq!(res.pages(), 3, "one bulk page plus two top-ups");
            let s = t.stats();
            assert_eq!(
                (s.alloc_bulk_calls, s.pages_reserved, s.reserved_unused),
                (1, 3, 0)
            );
            assert_eq!(alloc.mem.stats().live_pages, 4);
            t.release(res, &mut Gather::new()).unwrap();
            assert_eq!(alloc.mem.stats().live_pages, 1);
        }
        assert_eq!(t.engine().deferred_frees(), 0);
        assert_eq!(alloc.mem.stats().bad_frees, 0);
        drop(t);
        assert_eq!(alloc.mem.stats().live_pages, 0);
    }
}

#[test]
fn a_multi_table_map_tops_up_or_undoes_everything_when_a_shared_table_goes_meanwhile() {
    // [VA + 4M - 4K, VA + 4M + 4K): two L3 tables under the L2 that the leaf at VA keeps alive.
    // The first allocation of the map unmaps that leaf, so L1 and L2 go too: the map needs 5
    // tables, not the 2 it counted. k: which of the 2 extra single allocations fails (none: 2).
    for k in 0..=2u64 {
        let alloc = Arc::new(HookAlloc {
            mem: SimMemory::new(),
            hook: Mutex::new(None),
        });
        let t = Arc::new(PreallocTable::new(panthor(), Arc::clone(&alloc)).unwrap());
        t.map(iova(VA), pa(0), PageSize::SZ_4K, 1, RW).unwrap();
        let weak = Arc::downgrade(&t);
        let a2 = Arc::clone(&alloc);
        *alloc.hook.lock().unwrap() = Some(Box::new(move || {
            let t = weak.upgrade().unwrap();
            t.unmap(iova(VA), PageSize::SZ_4K, 1, &mut Gather::new())
                .unwrap();
            // The next allocation is the second counted page; the extra ones follow it.
            a2.mem.fail_at(1 + k);
        }));
        let res = t.map(iova(VA + 2 * M2 - K4), pa(0x8000), PageSize::SZ_4K, 2, RW);
        alloc.mem.clear_failure();
        if k < 2 {
            assert!(matches!(res, Err(MapError::Alloc { .. })), "k={k}: {res:?}");
            assert_eq!(dump(&*t).len(), 1, "k={k}: only the root left");
            assert_eq!(alloc.mem.stats().live_pages, 1, "k={k}");
        } else {
            res.unwrap();
            assert_eq!(alloc.mem.stats().live_pages, 5);
            assert_eq!(leaves(&*t).len(), 2);
            t.unmap(
                iova(VA + 2 * M2 - K4),
                PageSize::SZ_4K,
                2,
                &mut Gather::new(),
            )
            .unwrap();
            assert_eq!(alloc.mem.stats().live_pages, 1);
        }
        assert_eq!(t.engine().deferred_frees(), 0);
        assert_eq!(alloc.mem.stats().bad_frees, 0);
    }
}

#[test]
fn other_geometries_reserve_map_and_release_to_the_root() {
    use iopt_api::{Config, ConfigInput, Format, Quirks};
    let configs = [
        // Stage 2, 40-bit: start level 1 with two concatenated root tables.
        ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_4K, 40, 40),
        // 64 KiB granule: three levels, 512 MiB blocks.
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_64K, 48, 48),
        // 16 KiB granule, 47 bits.
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_16K, 47, 48),
        // TTBR1: the upper half of the address space.
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48).with_quirks(Quirks::TTBR1),
        // Mali: always four levels, leaf type 1 at level 3.
        ConfigInput::new(Format::Mali, PageSizes::GRANULE_4K, 48, 40),
        // 32-bit LPAE stage 1.
        ConfigInput::new(Format::Arm32S1, PageSizes::from_bits(0x20_1000), 32, 40),
    ];
    for input in configs {
        let cfg = Config::new(input).unwrap();
        let g = cfg.granule().size();
        let big = cfg.block_size(cfg.leaf_level(PageSize::new(g).unwrap()).unwrap() - 1);
        let (lo, _) = cfg.iova_bounds();
        let base = lo.get() + 8 * big;
        let mem = SimMemory::new();
        let t = PreallocTable::new(cfg, &mem).unwrap();
        let small = PageSize::new(g).unwrap();
        let block = PageSize::new(big).unwrap();
        let name = format!("{:?} {:?}", cfg.format(), cfg.granule());
        // 3 blocks at +1 granule, planned for blocks: head and tail tables of small pages.
        let r = IovaRange::new(iova(base + g), 3 * big, g).unwrap();
        let need = t.pages_needed(r, block).unwrap();
        let res = t.reserve(r, block).unwrap();
        assert_eq!(res.pages(), need, "{name}");
        let spans = [(r, block)];
        check_invariants(&t, &mem, &spans);
        let before = mem.stats();
        t.map_reserved(
            &res,
            iova(base + g),
            pa(0x1000_0000 + g),
            small,
            big / g - 1,
            RW,
        )
        .unwrap();
        t.map_reserved(&res, iova(base + big), pa(0x4000_0000), block, 2, RW)
            .unwrap();
        t.map_reserved(&res, iova(base + 3 * big), pa(0x2000_0000), small, 1, RW)
            .unwrap();
        assert_eq!(
            mem.stats().pages_allocated,
            before.pages_allocated,
            "{name}"
        );
        assert_eq!(
            t.iova_to_phys(iova(base + big + 0x88)).unwrap().pa,
            pa(0x4000_0088),
            "{name}"
        );
        let mut gather = Gather::new();
        t.unmap(iova(base + big), block, 2, &mut gather).unwrap();
        assert_eq!(mem.stats().pages_freed, before.pages_freed, "{name}");
        // Plain maps outside the reservation come and go.
        t.map(iova(base + 20 * big + g), pa(0), small, 2, RW)
            .unwrap();
        t.unmap(iova(base + 20 * big + g), small, 2, &mut gather)
            .unwrap();
        check_invariants(&t, &mem, &spans);
        t.release(res, &mut gather).unwrap();
        assert_eq!(gather.pages(), 2 + big / g - 1 + 1 + 2, "{name}");
        assert_eq!(mem.stats().live_pages, 1, "{name}: root alone");
        assert_eq!(t.stats().live_tables, 1, "{name}");
        drop(t);
        assert_eq!(mem.stats().live_pages, 0, "{name}");
    }
}

/// A release sent to the wrong table, or with a rebuilt handle, fails and gives the handle
/// back with the reservation intact: its tables stay counted, maps inside it still need no
/// allocator, and the right table's release then frees every page it took.
#[test]
fn failed_release_returns_the_handle() {
    let (mem_a, mem_b) = (SimMemory::new(), SimMemory::new());
    let a = PreallocTable::new(panthor(), &mem_a).unwrap();
    let b = PreallocTable::new(panthor(), &mem_b).unwrap();
    let r = range(VA + M2, 4 * M2);
    let res = a.reserve(r, PageSize::SZ_4K).unwrap();
    let id = res.id();
    assert!(res.pages() > 0);
    let before_b = (dump(&b), mem_b.live_set());

    let err = b.release(res, &mut Gather::new()).unwrap_err();
    assert_eq!(err.error(), ReserveError::UnknownReservation { id });
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(
        (dump(&b), mem_b.live_set()),
        before_b,
        "the wrong table changed"
    );
    let res = err.into_reservation();
    assert_eq!(res.id(), id);
    assert_eq!(a.live_reservations(), 1);
    check_invariants(&a, &mem_a, &[(r, PageSize::SZ_4K)]);

    let before = mem_a.stats();
    a.map_reserved(&res, iova(VA + M2), pa(0), PageSize::SZ_4K, 16, RW)
        .unwrap();
    assert_eq!(mem_a.stats().pages_allocated, before.pages_allocated);

    let forged = Issuer::new(a.id()).issue(id, r, PageSize::SZ_4K, res.pages(), 0);
    let (forged, e) = a
        .release(forged, &mut Gather::new())
        .unwrap_err()
        .into_parts();
    assert_eq!(
        (forged.id(), e),
        (id, ReserveError::UnknownReservation { id })
    );
    check_invariants(&a, &mem_a, &[(r, PageSize::SZ_4K)]);

    a.release(res, &mut Gather::new()).unwrap();
    assert_eq!(a.live_reservations(), 0);
    assert_eq!(mem_a.stats().live_pages, 1, "the root alone");
    check_invariants(&a, &mem_a, &[]);
}
