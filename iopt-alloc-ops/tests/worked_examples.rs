//! docs/designs.md §8: reservation counts of panthor's formulas, and the pages maps actually take.

mod common;

use common::*;
use iopt_alloc_ops::{
    AllocOpsTable, CountPolicy, msm_merged_pages, unmap_reserve_pages, worst_case_pages,
};
use iopt_api::{Gather, IoPageTable, Iova, PageSize, PhysAddr, Reserve, ReserveError};
use iopt_sim::SimMemory;

/// A 2 MiB- and 1 GiB- and 512 GiB-aligned VA well inside 48 bits.
const VA: u64 = 3 * G512;

struct Row {
    name: &'static str,
    start: u64,
    len: u64,
    reserved: usize,
    need_4k: usize,
    need_2m: usize,
}

fn rows() -> Vec<Row> {
    let row = |name, start, len, reserved, need_4k, need_2m| Row {
        name,
        start,
        len,
        reserved,
        need_4k,
        need_2m,
    };
    vec![
        row("4 KiB at 2 MiB-aligned VA", VA + 5 * M2, K4, 3, 3, 3),
        row("64 KiB at 2 MiB-aligned VA", VA + 5 * M2, 16 * K4, 3, 3, 3),
        row("8 KiB straddling 2 MiB", VA + 6 * M2 - K4, 2 * K4, 4, 4, 4),
        row("8 KiB straddling 1 GiB", VA + 2 * G1 - K4, 2 * K4, 5, 5, 5),
        row("8 KiB straddling 512 GiB", VA - K4, 2 * K4, 6, 6, 6),
        row("2 MiB at 2 MiB-aligned VA", VA + 7 * M2, M2, 3, 3, 2),
        row("2 MiB at VA + 4 KiB", VA + 7 * M2 + K4, M2, 4, 4, 4),
        row("1 GiB at 1 GiB-aligned VA", VA + 4 * G1, G1, 514, 514, 2),
        row("1 GiB at VA + 2 MiB", VA + 4 * G1 + M2, G1, 515, 515, 3),
        row("1 GiB at VA + 4 KiB", VA + 4 * G1 + K4, G1, 516, 516, 5),
    ]
}

#[test]
fn reserved_column_under_worst_case() {
    let cfg = panthor_cfg();
    for r in rows() {
        assert_eq!(
            worst_case_pages(&cfg, range(r.start, r.len), PageSize::SZ_4K).unwrap(),
            r.reserved,
            "{}",
            r.name
        );
    }
    // 512 GiB at a 512 GiB-aligned VA: 1 + 512 + 262,144. Counted only, never mapped.
    let big = range(VA, G512);
    assert_eq!(
        worst_case_pages(&cfg, big, PageSize::SZ_4K).unwrap(),
        262_657
    );
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(cfg, &mem).unwrap();
    assert_eq!(
        t.count(&[big], PageSize::SZ_4K, CountPolicy::WorstCase)
            .unwrap(),
        262_657
    );
    // In KiB, as the table's last column.
    assert_eq!(262_657 * 4, 1_050_628);
}

/// Reserves each row under WorstCase, maps it two ways in fresh tables, and checks the pages
/// consumed (and the tables in the tree) equal the "need" columns, with no allocator call.
#[test]
fn maps_consume_the_need_columns() {
    let cfg = panthor_cfg();
    for r in rows() {
        for contiguous in [false, true] {
            let mem = SimMemory::new();
            let t = AllocOpsTable::new(cfg, &mem).unwrap();
            let res = t.reserve(range(r.start, r.len), PageSize::SZ_4K).unwrap();
            assert_eq!(res.pages(), r.reserved, "{}", r.name);
            let calls = alloc_calls(&mem);
            let before = t.stats();
            if contiguous {
                // PA offset modulo 2 MiB equal to the VA's: 2 MiB blocks where both align.
                let pa = PhysAddr::new(0x40_0000_0000 + (r.start % M2));
                t.map_range_reserved(&res, Iova::new(r.start), pa, r.len, RW)
                    .unwrap();
            } else {
                // Scattered backing: every page is 4 KiB (PA not congruent to the VA mod 2 MiB).
                let pa = PhysAddr::new(0x40_0000_0000 + (r.start + K4) % M2);
                t.map_reserved(
                    &res,
                    Iova::new(r.start),
                    pa,
                    PageSize::SZ_4K,
                    r.len / K4,
                    RW,
                )
                .unwrap();
            }
            let need = if contiguous { r.need_2m } else { r.need_4k };
            let after = t.stats();
            assert_eq!(alloc_calls(&mem), calls, "{}: allocator called", r.name);
            assert_eq!(
                after.pages_consumed - before.pages_consumed,
                need as u64,
                "{} contiguous={contiguous}",
                r.name
            );
            assert_eq!(after.live_tables, 1 + need as u64, "{}", r.name);
            assert_eq!(t.reservation_left(&res), Some(r.reserved - need));
            assert_balanced(&after);
            // Spot-check the translations at both ends.
            let first = t.iova_to_phys(Iova::new(r.start)).unwrap();
            let last = t.iova_to_phys(Iova::new(r.start + r.len - 1)).unwrap();
            assert_eq!(last.pa.get() - first.pa.get(), r.len - 1, "{}", r.name);
            let unused = r.reserved - need;
            let frees = mem.stats().free_bulk_calls;
            t.release(res, &mut Gather::new()).unwrap();
            assert_eq!(mem.stats().free_bulk_calls - frees, u64::from(unused > 0));
            assert_eq!(t.stats().reserved_unused, unused as u64);
            assert_eq!(t.stats().reserved_outstanding, 0);
            drop(t);
            assert_eq!(mem.stats().live_pages, 0, "{}", r.name);
            assert_eq!(mem.stats().bad_frees, 0);
        }
    }
}

#[test]
fn populated_region_reserves_the_same_and_uses_nothing() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(panthor_cfg(), &mem).unwrap();
    t.map(
        Iova::new(VA),
        PhysAddr::new(0x8000_0000),
        PageSize::SZ_4K,
        1,
        RW,
    )
    .unwrap();
    let r = range(VA + 0x10_000, K4);
    let res = t.reserve(r, PageSize::SZ_4K).unwrap();
    assert_eq!(res.pages(), 3);
    assert_eq!(t.pages_needed(r, PageSize::SZ_4K).unwrap(), 0);
    let exact = t
        .reserve_with(r, PageSize::SZ_4K, CountPolicy::Exact)
        .unwrap();
    assert_eq!(exact.pages(), 0);
    let calls = alloc_calls(&mem);
    t.map_reserved(
        &exact,
        r.start(),
        PhysAddr::new(0x9000_0000),
        PageSize::SZ_4K,
        1,
        RW,
    )
    .unwrap();
    assert_eq!(alloc_calls(&mem), calls);
    t.release(exact, &mut Gather::new()).unwrap();
    t.release(res, &mut Gather::new()).unwrap();
    assert_eq!(t.stats().reserved_unused, 3);
}

#[test]
fn many_small_binds_worst_case_vs_msm_merge() {
    let cfg = panthor_cfg();
    // 1000 separate 4 KiB binds, contiguous from a 2 MiB-aligned VA.
    let ops: Vec<_> = (0..1000).map(|i| range(VA + i * K4, K4)).collect();
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(cfg, &mem).unwrap();
    assert_eq!(
        t.count(&ops, PageSize::SZ_4K, CountPolicy::WorstCase)
            .unwrap(),
        3000
    );
    assert_eq!(
        t.count(&ops, PageSize::SZ_4K, CountPolicy::MsmMerged)
            .unwrap(),
        4
    );
    assert_eq!(msm_merged_pages(&cfg, &ops, PageSize::SZ_4K).unwrap(), 4);
    // All inside one 2 MiB region: 3 (the most ever needed).
    let inside: Vec<_> = (0..512).map(|i| range(VA + i * K4, K4)).collect();
    assert_eq!(msm_merged_pages(&cfg, &inside, PageSize::SZ_4K).unwrap(), 3);
    // Unsorted binds in one region still merge (order inside the region does not matter).
    let shuffled: Vec<_> = (0..64)
        .map(|i| range(VA + ((i * 37) % 64) * K4, K4))
        .collect();
    assert_eq!(
        msm_merged_pages(&cfg, &shuffled, PageSize::SZ_4K).unwrap(),
        3
    );
    // Binds in different 2 MiB regions do not merge: 3 each.
    let apart: Vec<_> = (0..4).map(|i| range(VA + i * 2 * M2, K4)).collect();
    assert_eq!(msm_merged_pages(&cfg, &apart, PageSize::SZ_4K).unwrap(), 12);
    // A bind ending exactly on a boundary merges with one starting there.
    let touching = [range(VA + M2 - K4, K4), range(VA + M2, K4)];
    assert_eq!(
        msm_merged_pages(&cfg, &touching, PageSize::SZ_4K).unwrap(),
        4
    );
    // For a single range the merge is the worst case.
    for r in rows() {
        let one = [range(r.start, r.len)];
        assert_eq!(
            msm_merged_pages(&cfg, &one, PageSize::SZ_4K).unwrap(),
            r.reserved
        );
    }
    // The merged batch reservation serves all 1000 binds without the allocator.
    let res = t
        .reserve_batch_with(&ops, PageSize::SZ_4K, CountPolicy::MsmMerged)
        .unwrap();
    assert_eq!(res.pages(), 4);
    assert_eq!(res.range(), range(VA, 1000 * K4));
    let calls = alloc_calls(&mem);
    for (i, op) in ops.iter().enumerate() {
        let pa = PhysAddr::new(0x8000_0000 + ((i as u64 * 7) % 1000) * K4);
        t.map_reserved(&res, op.start(), pa, PageSize::SZ_4K, 1, RW)
            .unwrap();
    }
    assert_eq!(alloc_calls(&mem), calls);
    assert_eq!(t.reservation_left(&res), Some(0));
    t.release(res, &mut Gather::new()).unwrap();
}

#[test]
fn queue_depth_of_1gib_maps() {
    // Q maps of 1 GiB each reserve 514 pages each: 2.0 / 16.1 / 128.5 MiB for Q = 1 / 8 / 64.
    let cfg = panthor_cfg();
    for (q, tenths_mib) in [(1u64, 20u64), (8, 161), (64, 1285)] {
        let ops: Vec<_> = (0..q).map(|i| range(VA + i * G1, G1)).collect();
        let worst: usize = ops
            .iter()
            .map(|&r| worst_case_pages(&cfg, r, PageSize::SZ_4K).unwrap())
            .sum();
        assert_eq!(worst as u64, 514 * q);
        assert_eq!((worst as u64 * 4096 * 10 + (1 << 19)) >> 20, tenths_mib);
    }
}

#[test]
fn unmap_reservation_table() {
    // docs/designs.md §8, unmap reservations (§4.6).
    let cases = [
        ("4 KiB at 2 MiB-aligned VA", VA, K4, 1),
        ("4 KiB at VA + 4 KiB", VA + K4, K4, 1),
        ("2 MiB, aligned", VA, M2, 0),
        ("[VA + 4 KiB, VA + 2 MiB + 4 KiB)", VA + K4, M2, 2),
        ("1 GiB, aligned", VA + G1, G1, 0),
        ("1 GiB at VA + 4 KiB", VA + G1 + K4, G1, 2),
    ];
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(panthor_cfg(), &mem).unwrap();
    for (name, start, len, want) in cases {
        assert_eq!(unmap_reserve_pages(range(start, len), M2), want, "{name}");
        assert_eq!(t.unmap_reserve_pages(range(start, len)), want, "{name}");
    }
    // Both ends inside one block: one page. The very top of the address space does not wrap.
    assert_eq!(unmap_reserve_pages(range(VA + K4, 2 * K4), M2), 1);
    assert_eq!(unmap_reserve_pages(range(u64::MAX - 0xfff, K4), M2), 1);
}

/// Panthor's partial unmap of a huge page (8e7460eac786): reserve the 0–2 pages at unmap
/// preparation, unmap the whole 2 MiB block, remap the borders from the reservation.
#[test]
fn unmap_reservation_remaps_the_borders() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(panthor_cfg(), &mem).unwrap();
    let pa = 0x8020_0000u64;
    t.map(
        Iova::new(VA + M2),
        PhysAddr::new(pa),
        PageSize::SZ_2M,
        1,
        RW,
    )
    .unwrap();
    let hole = range(VA + M2 + 0x10_000, 0x4000);
    let res = t.reserve_unmap(hole).unwrap();
    assert_eq!(res.pages(), 1);
    assert_eq!(res.range(), range(VA + M2, M2));
    let calls = alloc_calls(&mem);
    let mut g = Gather::new();
    assert_eq!(
        t.unmap(Iova::new(VA + M2), PageSize::SZ_2M, 1, &mut g)
            .unwrap(),
        M2
    );
    t.map_range_reserved(&res, Iova::new(VA + M2), PhysAddr::new(pa), 0x10_000, RW)
        .unwrap();
    let tail = hole.end().unwrap().get();
    t.map_range_reserved(
        &res,
        Iova::new(tail),
        PhysAddr::new(pa + (tail - VA - M2)),
        VA + 2 * M2 - tail,
        RW,
    )
    .unwrap();
    assert_eq!(alloc_calls(&mem), calls);
    assert_eq!(t.reservation_left(&res), Some(0));
    assert!(t.iova_to_phys(hole.start()).is_none());
    assert_eq!(
        t.iova_to_phys(Iova::new(tail)).unwrap().pa.get(),
        pa + (tail - VA - M2)
    );
    t.release(res, &mut Gather::new()).unwrap();
    // Nothing to remap for an aligned unmap: an empty reservation, no allocator call.
    let calls = alloc_calls(&mem);
    let none = t.reserve_unmap(range(VA, M2)).unwrap();
    assert_eq!(none.pages(), 0);
    assert_eq!(alloc_calls(&mem), calls);
    t.release(none, &mut Gather::new()).unwrap();
}

#[test]
fn reserve_validation_errors() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(panthor_cfg(), &mem).unwrap();
    let r = range(VA + K4, M2);
    assert!(matches!(
        t.reserve(r, PageSize::SZ_2M),
        Err(ReserveError::BadLeafSize { size, .. }) if size == M2
    ));
    assert!(matches!(
        t.reserve(range(VA, G1), PageSize::SZ_1G),
        Err(ReserveError::BadLeafSize { .. })
    ));
    let high = range(1 << 48, K4);
    assert!(matches!(
        t.reserve(high, PageSize::SZ_4K),
        Err(ReserveError::OutOfRange { .. })
    ));
    let straddle = range((1 << 48) - K4, 2 * K4);
    assert!(matches!(
        t.reserve(straddle, PageSize::SZ_4K),
        Err(ReserveError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.pages_needed(straddle, PageSize::SZ_4K),
        Err(ReserveError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.reserve_batch(&[], PageSize::SZ_4K),
        Err(ReserveError::Range { .. })
    ));
    assert_eq!(t.live_reservations(), 0);
    assert_eq!(t.in_flight(), 0);
    assert_eq!(mem.stats().alloc_bulk_calls, 0);
}
