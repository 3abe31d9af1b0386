//! Four threads map, look up and unmap disjoint ranges that share intermediate tables, half
//! through their own reservations and half on demand; afterwards every translation matches a
//! model and no page is leaked or freed twice.

mod common;

use common::*;
use iopt_alloc_ops::AllocOpsTable;
use iopt_api::{Gather, IoPageTable, Iova, PageSize, PhysAddr, Reserve, WalkItem};
use iopt_sim::SimMemory;
use std::collections::BTreeMap;
use std::sync::Barrier;

const THREADS: u64 = 4;
const ITERS: u64 = 40;
/// Pages each thread maps per iteration; the four runs share one leaf table.
const PER: u64 = 24;
/// The iterations straddle a 1 GiB boundary, so L2 tables are raced for too.
const BASE: u64 = 5 * G1 - (ITERS / 2) * M2;

fn page_pa(thread: u64, iter: u64, j: u64) -> u64 {
    0x40_0000_0000 + (((thread * ITERS + iter) * PER + j) << 12)
}

#[test]
fn four_threads_disjoint_ranges_shared_tables() {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(full_cfg(), &mem).unwrap();
    let barrier = Barrier::new(THREADS as usize);
    let models: Vec<BTreeMap<u64, u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|k| {
                let (t, barrier) = (&t, &barrier);
                s.spawn(move || {
                    let mut model = BTreeMap::new();
                    let mut gather = Gather::new();
                    for i in 0..ITERS {
                        // Thread k's run inside region i; the first thread's run starts the
                        // region's leaf table, the others need the same one.
                        let iova = BASE + i * M2 + k * PER * K4;
                        let pa = page_pa(k, i, 0);
                        barrier.wait();
                        if (i + k) % 2 == 0 {
                            let res = t.reserve(range(iova, PER * K4), PageSize::SZ_4K).unwrap();
                            assert_eq!(res.pages(), 3);
                            t.map_reserved(
                                &res,
                                Iova::new(iova),
                                PhysAddr::new(pa),
                                PageSize::SZ_4K,
                                PER,
                                RW,
                            )
                            .unwrap();
                            t.release(res, &mut Gather::new()).unwrap();
                        } else {
                            t.map(Iova::new(iova), PhysAddr::new(pa), PageSize::SZ_4K, PER, RW)
                                .unwrap();
                        }
                        for j in 0..PER {
                            model.insert(iova + j * K4, pa + j * K4);
                        }
                        // Look up what this thread mapped, while the others write nearby.
                        for j in (0..PER).step_by(5) {
                            let tr = t.iova_to_phys(Iova::new(iova + j * K4 + 0x123)).unwrap();
                            assert_eq!(tr.pa.get(), pa + j * K4 + 0x123);
                        }
                        // Unmap a few pages of an earlier run.
                        if i >= 2 && i % 3 == 0 {
                            let old = BASE + (i - 2) * M2 + k * PER * K4 + 4 * K4;
                            assert_eq!(
                                t.unmap(Iova::new(old), PageSize::SZ_4K, 5, &mut gather)
                                    .unwrap(),
                                5 * K4
                            );
                            for j in 0..5 {
                                model.remove(&(old + j * K4));
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let model: BTreeMap<u64, u64> = models.into_iter().flatten().collect();

    // Every page of every region the threads touched translates as the model says.
    for i in 0..ITERS {
        for p in 0..(THREADS * PER + 8) {
            let iova = BASE + i * M2 + p * K4;
            let got = t.iova_to_phys(Iova::new(iova)).map(|tr| tr.pa.get());
            assert_eq!(got, model.get(&iova).copied(), "iova {iova:#x}");
        }
    }
    // And the leaf dump is exactly the model.
    let leaves: BTreeMap<u64, u64> = dump(&t)
        .into_iter()
        .filter_map(|w| match w {
            WalkItem::Leaf { iova, pa, .. } => Some((iova.get(), pa.get())),
            _ => None,
        })
        .collect();
    assert_eq!(leaves, model);

    // The tree holds exactly the tables it needs: root, one L1, two L2, one L3 per region.
    let s = t.stats();
    assert_eq!(tables(&t) as u64, 1 + 1 + 2 + ITERS);
    assert_eq!(s.live_tables, tables(&t) as u64);
    assert_eq!(s.reserved_outstanding, 0);
    assert_eq!(t.live_reservations(), 0);
    assert_eq!(t.in_flight(), 0);
    assert_balanced(&s);
    let m = mem.stats();
    assert_eq!(m.bad_frees, 0);
    assert_eq!(m.live_pages, s.live_tables, "no page held outside the tree");
    println!(
        "install races lost: {}, reserved {} consumed {} unused {}",
        s.install_races_lost, s.pages_reserved, s.pages_consumed, s.reserved_unused
    );
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}
