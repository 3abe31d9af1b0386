//! Property tests: counts after every operation of random sequences with reservations, and a
//! differential test against the reference `LpaeTable`.

#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

mod common;

use common::*;
use iopt_api::{
    Gather, IoPageTable, IovaRange, MapError, PageSize, Prot, Reservation, Reserve, UnmapError,
};
use iopt_lpae::LpaeTable;
use iopt_prealloc::PreallocTable;
use iopt_sim::SimMemory;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// A 32 MiB window across the 1 GiB boundary: two L2 tables, one shared L1.
const W0: u64 = G1 - 16 * M2;
const PAGES: u64 = 32 * M2 / K4 / 2; // 8192
const RW: Prot = Prot::READ.union(Prot::WRITE);

#[derive(Debug, Clone)]
enum Op {
    Reserve {
        page: u64,
        pages: u64,
        big: bool,
    },
    MapReserved {
        idx: usize,
        off: u64,
        count: u64,
        big: bool,
        pa: u64,
    },
    Map {
        page: u64,
        count: u64,
        big: bool,
        pa: u64,
    },
    MapRange {
        page: u64,
        pages: u64,
        congruent: bool,
        pa: u64,
    },
    Unmap {
        page: u64,
        count: u64,
        big: bool,
    },
    /// Unmaps the `pick`-th leaf present (modulo their number), or with `widen` the whole
    /// 2 MiB slot holding it.
    UnmapLeaf {
        pick: usize,
        widen: bool,
    },
    Release {
        idx: usize,
    },
    /// Makes the `k`-th page allocation of the next operation fail.
    Inject {
        k: u64,
    },
}

fn at(page: u64, big: bool) -> u64 {
    if big {
        W0 + (page % 16) * M2
    } else {
        W0 + (page % PAGES) * K4
    }
}

fn size(big: bool) -> PageSize {
    if big {
        PageSize::SZ_2M
    } else {
        PageSize::SZ_4K
    }
}

fn pa_for(pa: u64, big: bool) -> u64 {
    if big {
        (pa % 256) * M2
    } else {
        (pa % 65536) * K4
    }
}

fn map_ops() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES, 1..40u64, any::<bool>(), any::<u64>())
            .prop_map(|(page, count, big, pa)| Op::Map { page, count: if big { 1 + count % 3 } else { count }, big, pa }),
        2 => (0..PAGES, 1..1100u64, any::<bool>(), any::<u64>())
            .prop_map(|(page, pages, congruent, pa)| Op::MapRange { page, pages, congruent, pa }),
        2 => (0..PAGES, 1..40u64, any::<bool>())
            .prop_map(|(page, count, big)| Op::Unmap { page, count: if big { 1 + count % 3 } else { count }, big }),
        3 => (any::<usize>(), prop::bool::weighted(0.3))
            .prop_map(|(pick, widen)| Op::UnmapLeaf { pick, widen }),
    ]
}

fn all_ops() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => map_ops(),
        2 => (0..PAGES, 1..1500u64, any::<bool>())
            .prop_map(|(page, pages, big)| Op::Reserve { page, pages, big }),
        3 => (0..8usize, 0..2000u64, 1..40u64, any::<bool>(), any::<u64>())
            .prop_map(|(idx, off, count, big, pa)| Op::MapReserved { idx, off, count: if big { 1 + count % 2 } else { count }, big, pa }),
        1 => (0..8usize).prop_map(|idx| Op::Release { idx }),
        2 => (0..4u64).prop_map(|k| Op::Inject { k }),
    ]
}

fn map_range_args(page: u64, pages: u64, congruent: bool, pa: u64) -> (u64, u64, u64) {
    let iova = at(page, false);
    let len = pages.min(PAGES - page % PAGES) * K4;
    let pa = if congruent {
        iova - W0 + 0x4000_0000
    } else {
        pa_for(pa, false)
    };
    (iova, pa, len)
}

/// The unmap an `UnmapLeaf` stands for, given the leaves present: (iova, size).
fn pick_leaf(
    leaves: &BTreeMap<u64, (u64, u64)>,
    pick: usize,
    widen: bool,
) -> Option<(u64, PageSize)> {
    let (&iova, &(sz, _)) = leaves.iter().nth(pick % leaves.len().max(1))?;
    if widen && sz < M2 {
        Some((iova & !(M2 - 1), PageSize::SZ_2M))
    } else {
        Some((iova, PageSize::new(sz).unwrap()))
    }
}

/// Removes from `model` every leaf inside `[start, end)`.
fn remove_inside(model: &mut BTreeMap<u64, (u64, u64)>, start: u64, end: u64) {
    let inside: Vec<u64> = model.range(start..end).map(|(&k, _)| k).collect();
    for k in inside {
        model.remove(&k);
    }
}

fn insert_run(model: &mut BTreeMap<u64, (u64, u64)>, iova: u64, pa: u64, size: u64, count: u64) {
    for i in 0..count {
        model.insert(iova + i * size, (size, pa + i * size));
    }
}

fn insert_range(
    t: &PreallocTable<&SimMemory>,
    model: &mut BTreeMap<u64, (u64, u64)>,
    iova: u64,
    pa: u64,
    len: u64,
) {
    let sizes = t.config().page_sizes();
    let mut done = 0;
    while done < len {
        let (s, c) = sizes.best_fit(iova + done, pa + done, len - done).unwrap();
        insert_run(model, iova + done, pa + done, s.get(), c);
        done += s.get() * c;
    }
}

struct Live {
    res: Reservation,
    range: IovaRange,
    leaf: PageSize,
}

fn run_sequence(ops: &[Op]) {
    let mem = SimMemory::new();
    let t = PreallocTable::new(s1_all(), &mem).unwrap();
    let mut live: Vec<Live> = Vec::new();
    let mut model: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut g = Gather::new();
    let mut inject = None;
    for op in ops {
        let op = &match *op {
            Op::UnmapLeaf { pick, widen } => match pick_leaf(&model, pick, widen) {
                Some((iova, sz)) => Op::Unmap {
                    page: (iova - W0) / sz.get(),
                    count: 1,
                    big: sz == PageSize::SZ_2M,
                },
                None => continue,
            },
            ref o => o.clone(),
        };
        if let Op::Inject { k } = *op {
            inject = Some(k);
            continue;
        }
        let before = (dump(&t), mem.live_set(), mem.stats());
        if let Some(k) = inject.take() {
            mem.fail_at(k);
        }
        let ok = match *op {
            Op::Reserve { page, pages, big } => {
                let leaf = size(big);
                let start = at(page, false);
                let len = pages.min(PAGES - page % PAGES) * K4;
                let r = range(start, len);
                let need = t.pages_needed(r, leaf).unwrap_or(usize::MAX);
                match t.reserve(r, leaf) {
                    Ok(res) => {
                        assert_eq!(res.pages(), need, "reserve took other than pages_needed");
                        let s = mem.stats();
                        assert_eq!(
                            s.alloc_bulk_calls - before.2.alloc_bulk_calls,
                            u64::from(need > 0)
                        );
                        assert_eq!(s.alloc_calls, before.2.alloc_calls);
                        live.push(Live {
                            res,
                            range: r,
                            leaf,
                        });
                        true
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e,
                                iopt_api::ReserveError::BlockInTheWay { .. }
                                    | iopt_api::ReserveError::Alloc { .. }
                            ),
                            "{e:?}"
                        );
                        false
                    }
                }
            }
            Op::MapReserved {
                idx,
                off,
                count,
                big,
                pa,
            } => {
                if live.is_empty() {
                    continue;
                }
                let l = &live[idx % live.len()];
                let sz = size(big).get();
                let base = l.range.start().get();
                let iova = (base + (off * K4) % l.range.len()) & !(sz - 1);
                let iova = iova.max(base.next_multiple_of(sz));
                let pa = pa_for(pa, big);
                let r = t.map_reserved(
                    &l.res,
                    common::iova(iova),
                    common::pa(pa),
                    size(big),
                    count,
                    RW,
                );
                let s = mem.stats();
                assert_eq!(
                    (s.alloc_calls, s.alloc_bulk_calls),
                    (before.2.alloc_calls, before.2.alloc_bulk_calls),
                    "a reserved map called the allocator"
                );
                match r {
                    Ok(()) => {
                        insert_run(&mut model, iova, pa, sz, count);
                        true
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e,
                                MapError::AlreadyMapped { .. }
                                    | MapError::OutsideReservation { .. }
                                    | MapError::ReservationExhausted { left: 0, .. }
                                    | MapError::ReservedTable { .. }
                            ),
                            "{e:?}"
                        );
                        false
                    }
                }
            }
            Op::Map {
                page,
                count,
                big,
                pa,
            } => {
                let sz = size(big).get();
                let (iova, pa) = (at(page, big), pa_for(pa, big));
                match t.map(common::iova(iova), common::pa(pa), size(big), count, RW) {
                    Ok(()) => {
                        insert_run(&mut model, iova, pa, sz, count);
                        true
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e,
                                MapError::AlreadyMapped { .. }
                                    | MapError::ReservedTable { .. }
                                    | MapError::Alloc { .. }
                            ),
                            "{e:?}"
                        );
                        false
                    }
                }
            }
            Op::MapRange {
                page,
                pages,
                congruent,
                pa,
            } => {
                let (iova, pa, len) = map_range_args(page, pages, congruent, pa);
                match t.map_range(common::iova(iova), common::pa(pa), len, RW) {
                    Ok(()) => {
                        insert_range(&t, &mut model, iova, pa, len);
                        true
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e,
                                MapError::AlreadyMapped { .. }
                                    | MapError::ReservedTable { .. }
                                    | MapError::Alloc { .. }
                            ),
                            "{e:?}"
                        );
                        false
                    }
                }
            }
            Op::Unmap { page, count, big } => {
                let sz = size(big).get();
                let iova = at(page, big);
                let len = count * sz;
                let in_4k_reservation = live
                    .iter()
                    .any(|l| l.leaf == PageSize::SZ_4K && l.range.covers(&range(iova, len)));
                match t.unmap(common::iova(iova), size(big), count, &mut g) {
                    Ok(n) => {
                        assert_eq!(n, len);
                        remove_inside(&mut model, iova, iova + len);
                        if in_4k_reservation {
                            assert_eq!(
                                mem.stats().pages_freed,
                                before.2.pages_freed,
                                "a reserved unmap freed"
                            );
                        }
                        true
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e,
                                UnmapError::NotMapped { .. }
                                    | UnmapError::PartialBlock { .. }
                                    | UnmapError::ReservedTable { .. }
                            ),
                            "{e:?}"
                        );
                        false
                    }
                }
            }
            Op::UnmapLeaf { .. } | Op::Inject { .. } => unreachable!("resolved above"),
            Op::Release { idx } => {
                if live.is_empty() {
                    continue;
                }
                let l = live.swap_remove(idx % live.len());
                t.release(l.res, &mut g).unwrap();
                remove_inside(&mut model, l.range.start().get(), l.range.last().get() + 1);
                true
            }
        };
        mem.clear_failure();
        if !ok {
            assert_eq!(dump(&t), before.0, "{op:?} failed but changed the tree");
            assert_eq!(
                mem.live_set(),
                before.1,
                "{op:?} failed but changed the live set"
            );
        }
        let spans: Vec<(IovaRange, PageSize)> = live.iter().map(|l| (l.range, l.leaf)).collect();
        check_invariants(&t, &mem, &spans);
        assert_eq!(leaves(&t), model, "after {op:?}");
    }
    // Release everything, unmap what is left: the root alone.
    for l in live.drain(..) {
        t.release(l.res, &mut g).unwrap();
    }
    for (&iova, &(sz, _)) in &leaves(&t) {
        t.unmap(common::iova(iova), PageSize::new(sz).unwrap(), 1, &mut g)
            .unwrap();
    }
    check_invariants(&t, &mem, &[]);
    assert_eq!(mem.stats().live_pages, 1);
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After every operation: reservation counts equal the live reservations covering each
    /// table, live counts equal valid descriptors, no empty unreserved table survives, the
    /// allocator holds exactly the reachable tables, leaves equal the model; failed operations
    /// change nothing; reserved maps never call the allocator.
    #[test]
    fn counts_hold_after_every_operation(ops in prop::collection::vec(all_ops(), 1..40)) {
        run_sequence(&ops);
    }

    /// Identical results, errors and leaves as the reference table (Linux's policy), except
    /// the one documented difference: an unmap at block size over a slot where Linux still
    /// holds an emptied table.
    #[test]
    fn same_results_as_the_reference_table(ops in prop::collection::vec(map_ops(), 1..60)) {
        let (m1, m2) = (SimMemory::new(), SimMemory::new());
        let lp = LpaeTable::new(s1_all(), &m1).unwrap();
        let pre = PreallocTable::new(s1_all(), &m2).unwrap();
        let (mut g1, mut g2) = (Gather::new(), Gather::new());
        for op in &ops {
            let op = &match *op {
                Op::UnmapLeaf { pick, widen } => match pick_leaf(&leaves(&lp), pick, widen) {
                    Some((iova, sz)) => Op::Unmap { page: (iova - W0) / sz.get(), count: 1, big: sz == PageSize::SZ_2M },
                    None => continue,
                },
                ref o => o.clone(),
            };
            let probe;
            match *op {
                Op::Map { page, count, big, pa } => {
                    let (iova, pa) = (at(page, big), pa_for(pa, big));
                    probe = iova;
                    let a = lp.map(common::iova(iova), common::pa(pa), size(big), count, RW);
                    let b = pre.map(common::iova(iova), common::pa(pa), size(big), count, RW);
                    prop_assert_eq!(a, b, "{:?}", op);
                }
                Op::MapRange { page, pages, congruent, pa } => {
                    let (iova, pa, len) = map_range_args(page, pages, congruent, pa);
                    probe = iova + len - 1;
                    let a = lp.map_range(common::iova(iova), common::pa(pa), len, RW);
                    let b = pre.map_range(common::iova(iova), common::pa(pa), len, RW);
                    prop_assert_eq!(a, b, "{:?}", op);
                }
                Op::Unmap { page, count, big } => {
                    let iova = at(page, big);
                    probe = iova;
                    let sz = size(big).get();
                    let before = leaves(&lp);
                    let a = lp.unmap(common::iova(iova), size(big), count, &mut g1);
                    let b = pre.unmap(common::iova(iova), size(big), count, &mut g2);
                    // Linux failing later in the run than we do is the same difference.
                    let later = matches!(
                        (&a, &b),
                        (Err(UnmapError::NotMapped { iova: xa }), Err(UnmapError::NotMapped { iova: xb }))
                            if xb < xa
                    );
                    if (a.is_ok() || later) && b != a {
                        // The documented difference: Linux still held an emptied table in a
                        // slot of the run (an unmap at block size "removes" it); ours was freed
                        // when it emptied, so the slot is not mapped. Nothing else may differ.
                        let Err(UnmapError::NotMapped { iova: x }) = b else {
                            return Err(TestCaseError::fail(format!("{op:?}: {a:?} vs {b:?}")));
                        };
                        let x = x.get();
                        prop_assert!(x % sz == 0 && before.range(x..x + sz).next().is_none(), "{:?}: {:?}", op, b);
                        // Resynchronise: unmap the slots that did hold leaves (when Linux's
                        // unmap went through; a failed one changed neither table).
                        for k in (0..count).filter(|_| a.is_ok()) {
                            let s = iova + k * sz;
                            if before.range(s..s + sz).next().is_some() {
                                prop_assert_eq!(pre.unmap(common::iova(s), size(big), 1, &mut g2), Ok(sz));
                            }
                        }
                    } else {
                        prop_assert_eq!(a, b, "{:?}", op);
                    }
                }
                _ => unreachable!(),
            }
            prop_assert_eq!(leaves(&lp), leaves(&pre), "after {:?}", op);
            for p in [probe, probe ^ 0x1000, probe.wrapping_add(M2)] {
                prop_assert_eq!(lp.iova_to_phys(common::iova(p)), pre.iova_to_phys(common::iova(p)));
            }
            check_invariants(&pre, &m2, &[]);
            // For leaf-aligned ranges, the reservation count equals the engine's own count of
            // what a map with exactly those leaves would allocate (an independent planner).
            for (leaf, n) in [(PageSize::SZ_4K, 700), (PageSize::SZ_2M, 3)] {
                let r = range(probe & !(leaf.get() - 1), n * leaf.get());
                if let Ok(mine) = pre.pages_needed(r, leaf) {
                    prop_assert_eq!(Ok(mine), pre.engine().pages_needed(r, leaf), "{:?}", r);
                }
            }
        }
    }
}
