//! Differential tests against the on-demand reference `iopt_lpae::LpaeTable`: for random
//! operation sequences (maps, map_range, unmaps, lookups, and maps made through a reservation
//! of each policy) the results, errors, translations, leaf dump and tree shape are identical;
//! and the worst-case formula equals the engine's exact count on an empty tree for many
//! geometries.

#![allow(clippy::too_many_lines)] // one match over every operation

mod common;

use common::*;
use iopt_alloc_ops::{AllocOpsTable, CountPolicy, worst_case_pages};
use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, IovaRange, PageSize, PageSizes,
    PhysAddr, Prot, Quirks, Reserve,
};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;
use proptest::prelude::*;

/// The window: 8 MiB around a 512 GiB (and so 1 GiB) boundary.
const WIN: u64 = G512 - 4 * M2;
const WIN_PAGES: u64 = 4 * 512;

#[derive(Debug, Clone)]
enum Op {
    Map {
        page: u64,
        big: bool,
        count: u64,
        pa_page: u64,
        prot: u8,
    },
    MapRange {
        page: u64,
        pages: u64,
        pa_page: u64,
    },
    Unmap {
        page: u64,
        big: bool,
        count: u64,
    },
    Lookup {
        page: u64,
    },
    Reserved {
        policy: u8,
        page: u64,
        big: bool,
        count: u64,
        pa_page: u64,
        prot: u8,
    },
}

fn prot(p: u8) -> Prot {
    match p % 8 {
        0..=3 => RW,
        4 | 5 => Prot::READ,
        6 => RW | Prot::CACHE | Prot::NOEXEC,
        _ => Prot::CACHE, // no access: refused
    }
}

fn op() -> impl Strategy<Value = Op> {
    let page = 0..WIN_PAGES;
    prop_oneof![
        3 => (page.clone(), any::<bool>(), 1..40u64, 0..4096u64, any::<u8>()).prop_map(
            |(page, big, count, pa_page, prot)| Op::Map { page, big, count, pa_page, prot }
        ),
        2 => (page.clone(), 1..1100u64, 0..4096u64)
            .prop_map(|(page, pages, pa_page)| Op::MapRange { page, pages, pa_page }),
        2 => (page.clone(), any::<bool>(), 1..40u64)
            .prop_map(|(page, big, count)| Op::Unmap { page, big, count }),
        1 => page.clone().prop_map(|page| Op::Lookup { page }),
        3 => (0..3u8, page, any::<bool>(), 1..40u64, 0..4096u64, any::<u8>()).prop_map(
            |(policy, page, big, count, pa_page, prot)| Op::Reserved {
                policy, page, big, count, pa_page, prot
            }
        ),
    ]
}

/// Leaf size, aligned IOVA and a count that stays in the window (2 MiB leaves: at most 4).
fn place(page: u64, big: bool, count: u64) -> (PageSize, u64, u64) {
    if big {
        let blocks = 4;
        let first = (page / 512) % blocks;
        (
            PageSize::SZ_2M,
            WIN + first * M2,
            count.min(blocks - first).max(1),
        )
    } else {
        (
            PageSize::SZ_4K,
            WIN + page * K4,
            count.min(WIN_PAGES - page).max(1),
        )
    }
}

/// A PA page for a map: for 2 MiB leaves usually 2 MiB-aligned, sometimes not (refused).
fn pa_for(big: bool, page: u64, pa_page: u64) -> u64 {
    if big && pa_page % 8 != 0 {
        pa_page & !511
    } else {
        pa_page + page % 2
    }
}

fn run(ops: &[Op]) {
    let cfg = full_cfg();
    let (ma, mb) = (SimMemory::new(), SimMemory::new());
    let ours = AllocOpsTable::new(cfg, &ma).unwrap();
    let reference = LpaeTable::new(cfg, &mb).unwrap();
    let pa_of = |p: u64| PhysAddr::new(0x10_0000_0000 + p * K4);
    for (n, o) in ops.iter().enumerate() {
        match *o {
            Op::Map {
                page,
                big,
                count,
                pa_page,
                prot: p,
            } => {
                let (size, iova, count) = place(page, big, count);
                let pa = pa_of(pa_for(big, page, pa_page));
                let a = ours.map(Iova::new(iova), pa, size, count, prot(p));
                let b = reference.map(Iova::new(iova), pa, size, count, prot(p));
                assert_eq!(a, b, "op {n}: {o:?}");
            }
            Op::MapRange {
                page,
                pages,
                pa_page,
            } => {
                let len = pages.min(WIN_PAGES - page) * K4;
                // Half the time 2 MiB-contiguous backing (PA congruent to the IOVA mod 2 MiB).
                let pa_page = if pa_page % 2 == 0 {
                    (pa_page & !511) + page % 512
                } else {
                    pa_page
                };
                let (iova, pa) = (Iova::new(WIN + page * K4), pa_of(pa_page));
                let a = ours.map_range(iova, pa, len, RW);
                let b = reference.map_range(iova, pa, len, RW);
                assert_eq!(a, b, "op {n}: {o:?}");
            }
            Op::Unmap { page, big, count } => {
                let (size, iova, count) = place(page, big, count);
                let a = ours.unmap(Iova::new(iova), size, count, &mut Gather::new());
                let b = reference.unmap(Iova::new(iova), size, count, &mut Gather::new());
                assert_eq!(a, b, "op {n}: {o:?}");
            }
            Op::Lookup { page } => {
                let iova = Iova::new(WIN + page * K4 + 0x18);
                assert_eq!(
                    ours.iova_to_phys(iova),
                    reference.iova_to_phys(iova),
                    "op {n}"
                );
            }
            Op::Reserved {
                policy,
                page,
                big,
                count,
                pa_page,
                prot: p,
            } => {
                let (size, iova, count) = place(page, big, count);
                let policy = [
                    CountPolicy::WorstCase,
                    CountPolicy::MsmMerged,
                    CountPolicy::Exact,
                ][policy as usize];
                let r = IovaRange::new(Iova::new(iova), size.get() * count, size.get()).unwrap();
                let exact = ours.pages_needed(r, size).unwrap();
                let res = ours.reserve_with(r, size, policy).unwrap();
                assert!(res.pages() >= exact, "{policy:?} below the exact count");
                let calls = alloc_calls(&ma);
                let before = ours.stats();
                let ref_before = reference.stats();
                let pa = pa_of(pa_for(big, page, pa_page));
                let a = ours.map_reserved(&res, Iova::new(iova), pa, size, count, prot(p));
                let b = reference.map(Iova::new(iova), pa, size, count, prot(p));
                assert_eq!(a, b, "op {n}: {o:?} under {policy:?}");
                assert_eq!(alloc_calls(&ma), calls, "reserved map called the allocator");
                // The reservation supplied exactly what the reference allocated.
                let used = ours.stats().pages_consumed - before.pages_consumed;
                let allocated = reference.stats().pages_allocated - ref_before.pages_allocated;
                // On success the reference keeps all it allocated; on failure it keeps nothing.
                assert_eq!(used, if a.is_ok() { allocated } else { 0 }, "op {n}: {o:?}");
                ours.release(res, &mut Gather::new()).unwrap();
                assert_eq!(ours.stats().reserved_outstanding, 0);
            }
        }
        assert_eq!(
            leaves(&ours),
            leaves(&reference),
            "leaf dump after op {n}: {o:?}"
        );
        assert_eq!(
            ours.stats().live_tables,
            reference.stats().live_tables,
            "op {n}"
        );
        assert_balanced(&ours.stats());
    }
    assert_eq!(shape(&ours), shape(&reference));
    for page in 0..WIN_PAGES {
        let iova = Iova::new(WIN + page * K4);
        assert_eq!(ours.iova_to_phys(iova), reference.iova_to_phys(iova));
    }
    drop(ours);
    assert_eq!(ma.stats().live_pages, 0);
    assert_eq!(ma.stats().bad_frees, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn same_behaviour_as_on_demand_reference(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops);
    }
}

/// Geometries: 4 KiB 3 and 4 levels, 16 KiB, 64 KiB, a concatenated stage-2 root, Mali, TTBR1.
fn geometries() -> Vec<Config> {
    let inputs = [
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 40),
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 39, 40),
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_16K, 47, 40),
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_64K, 48, 48),
        ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_4K, 40, 40),
        ConfigInput::new(Format::Mali, PageSizes::GRANULE_4K, 48, 40),
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 39, 40).with_quirks(Quirks::TTBR1),
    ];
    inputs
        .into_iter()
        .map(|i| Config::new(i).expect("valid config"))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// `WorstCase` is, by definition, the exact count of a tree that holds only the root.
    #[test]
    fn worst_case_is_exact_on_an_empty_tree(
        g in 0..7usize,
        frac in 0..(1u64 << 20),
        pages in 1..5000u64,
        leaf_pick in any::<prop::sample::Index>(),
    ) {
        let cfg = geometries()[g];
        let leaf = *leaf_pick.get(&cfg.page_sizes().iter().collect::<Vec<_>>());
        let (lo, hi) = cfg.iova_bounds();
        let span = hi.get() - lo.get();
        let len = (pages * leaf.get()).min(span / 2 + 1) / leaf.get() * leaf.get();
        prop_assume!(len > 0);
        let start = lo.get() + (span - len) / (1 << 20) * frac / leaf.get() * leaf.get();
        let r = IovaRange::new(Iova::new(start), len, leaf.get()).unwrap();
        let mem = SimMemory::new();
        let t = AllocOpsTable::new(cfg, &mem).unwrap();
        let worst = worst_case_pages(&cfg, r, leaf).unwrap();
        prop_assert_eq!(worst, t.pages_needed(r, leaf).unwrap());
        prop_assert_eq!(worst, t.count(&[r], leaf, CountPolicy::MsmMerged).unwrap());
        prop_assert_eq!(worst, t.count(&[r], leaf, CountPolicy::Exact).unwrap());
        // Small enough to map: the map takes exactly that many pages from the reservation.
        if worst <= 64 && len / leaf.get() <= 4096 && len <= 1 << 36 {
            let res = t.reserve(r, leaf).unwrap();
            let calls = alloc_calls(&mem);
            t.map_reserved(&res, r.start(), PhysAddr::new(0), leaf, len / leaf.get(), RW).unwrap();
            prop_assert_eq!(alloc_calls(&mem), calls);
            prop_assert_eq!(t.reservation_left(&res), Some(0));
            t.release(res, &mut Gather::new()).unwrap();
        }
    }
}
