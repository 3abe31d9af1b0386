//! Concurrent reserve / map / unmap / release on disjoint ranges that share every
//! intermediate table, checked against per-thread models; no leak, no bad free.

mod common;

use common::*;
use iopt_api::{Gather, IoPageTable, PageSize, Prot, Reservation, Reserve};
use iopt_prealloc::PreallocTable;
use iopt_sim::SimMemory;
use std::collections::BTreeMap;
use std::sync::{Barrier, Mutex};

const THREADS: u64 = 4;
/// Interleaved 4 KiB pages: page `p` of `[BASE, BASE + 64 KiB)` belongs to thread `p % 4`, so
/// all threads share the two L3 tables and the two L2 tables on either side of the 1 GiB
/// boundary, and the L1; with few pages mapped at a time, all of them empty and are freed
/// and reinstalled over and over while other threads walk through them.
const BASE: u64 = G1 - 8 * K4;
const SMALL_PAGES: u64 = 16;
/// Each thread also owns 4 MiB of 2 MiB blocks in another 512 GiB region.
const BLOCKS: u64 = 5 * G512;
/// Operations per thread and round (`IOPT_STRESS_OPS` overrides, for long runs).
fn ops() -> u64 {
    std::env::var("IOPT_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}
const RW: Prot = Prot::READ.union(Prot::WRITE);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one thread believes: its leaves (iova → (size, pa)) and its live reservations.
#[derive(Default)]
struct Model {
    leaves: BTreeMap<u64, (u64, u64)>,
    held: Vec<(Reservation, iopt_api::IovaRange, PageSize)>,
    /// The held reservations' spans, as handed to the main thread.
    spans: Vec<(iopt_api::IovaRange, PageSize)>,
}

#[allow(clippy::too_many_lines)]
fn worker<T: IoPageTable + Reserve + ?Sized>(t: &T, id: u64, ops: u64, model: &mut Model) {
    let mut rng = Rng(0x5EED + id);
    let mut g = Gather::new();
    let own_page = |rng: &mut Rng| BASE + (rng.below(SMALL_PAGES / THREADS) * THREADS + id) * K4;
    let region = BLOCKS + id * 2 * M2;
    for _ in 0..ops {
        match rng.below(10) {
            // Reserve one own page and map it inside the reservation.
            0 | 1 => {
                let p = own_page(&mut rng);
                if model.leaves.contains_key(&p) || model.held.iter().any(|h| h.1.contains(iova(p)))
                {
                    continue;
                }
                let r = range(p, K4);
                let res = t.reserve(r, PageSize::SZ_4K).unwrap();
                let pa = 0x1_0000_0000 + (rng.below(1 << 20) << 12);
                t.map_reserved(&res, iova(p), common::pa(pa), PageSize::SZ_4K, 1, RW)
                    .unwrap();
                model.leaves.insert(p, (K4, pa));
                model.held.push((res, r, PageSize::SZ_4K));
            }
            // Release a reservation (which unmaps what it holds).
            2 | 3 => {
                if model.held.is_empty() {
                    continue;
                }
                let i = rng.below(model.held.len() as u64) as usize;
                let (res, r, _) = model.held.swap_remove(i);
                t.release(res, &mut g).unwrap();
                let start = r.start().get();
                let inside: Vec<u64> = model
                    .leaves
                    .range(start..=r.last().get())
                    .map(|(&k, _)| k)
                    .collect();
                for k in inside {
                    model.leaves.remove(&k);
                }
            }
            // Plain map of an own page (allocating on demand).
            4 | 5 => {
                let p = own_page(&mut rng);
                if model.leaves.contains_key(&p) {
                    continue;
                }
                let pa = 0x2_0000_0000 + (rng.below(1 << 20) << 12);
                t.map(iova(p), common::pa(pa), PageSize::SZ_4K, 1, RW)
                    .unwrap();
                model.leaves.insert(p, (K4, pa));
            }
            // Unmap an own mapped page, reserved or not.
            6 | 7 => {
                let small: Vec<u64> = model
                    .leaves
                    .range(BASE..BASE + SMALL_PAGES * K4)
                    .map(|(&k, _)| k)
                    .collect();
                if small.is_empty() {
                    continue;
                }
                let p = small[rng.below(small.len() as u64) as usize];
                t.unmap(iova(p), PageSize::SZ_4K, 1, &mut g).unwrap();
                model.leaves.remove(&p);
            }
            // The block region: reserve for 2 MiB leaves, map a block, or tear it down.
            8 => {
                let r = range(region, 2 * M2);
                if let Some(i) = model.held.iter().position(|h| h.1 == r) {
                    let (res, _, _) = model.held.swap_remove(i);
                    t.release(res, &mut g).unwrap();
                    model.leaves.remove(&region);
                    model.leaves.remove(&(region + M2));
                } else {
                    let res = t.reserve(r, PageSize::SZ_2M).unwrap();
                    let b = region + rng.below(2) * M2;
                    let pa = 0x4000_0000 + rng.below(256) * M2;
                    t.map_reserved(&res, iova(b), common::pa(pa), PageSize::SZ_2M, 1, RW)
                        .unwrap();
                    model.leaves.insert(b, (M2, pa));
                    model.held.push((res, r, PageSize::SZ_2M));
                }
            }
            // Lookups of own addresses agree with the model.
            _ => {
                let p = own_page(&mut rng);
                let got = t.iova_to_phys(iova(p + 0x10)).map(|x| x.pa.get());
                let want = model.leaves.get(&p).map(|&(_, pa)| pa + 0x10);
                assert_eq!(got, want, "thread {id} lookup {p:#x}");
            }
        }
    }
}

#[test]
fn concurrent_operations_on_disjoint_ranges_sharing_tables() {
    let ops = ops();
    for round in 0..3u64 {
        let mem = SimMemory::new();
        let t = PreallocTable::new(s1_all(), &mem).unwrap();
        let barrier = Barrier::new(THREADS as usize + 1);
        let models: Mutex<Vec<Model>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for id in 0..THREADS {
                let (t, barrier, models) = (&t, &barrier, &models);
                s.spawn(move || {
                    let mut model = Model::default();
                    barrier.wait();
                    worker(t, id + round * THREADS, ops, &mut model);
                    let leaves = model.leaves.clone();
                    let held = std::mem::take(&mut model.held);
                    let spans = held.iter().map(|h| (h.1, h.2)).collect();
                    models.lock().unwrap().push(Model {
                        leaves,
                        held: Vec::new(),
                        spans,
                    });
                    barrier.wait(); // the main thread checks the quiescent state
                    barrier.wait();
                    // Tear down concurrently: release everything, unmap the rest.
                    let mut g = Gather::new();
                    for (res, _, _) in held {
                        t.release(res, &mut g).unwrap();
                        // (release unmapped the leaves inside)
                    }
                    for (&p, &(size, _)) in &model.leaves {
                        // Leaves in released ranges are gone already; the rest are unmapped.
                        let _ = t.unmap(iova(p), PageSize::new(size).unwrap(), 1, &mut g);
                    }
                });
            }
            barrier.wait(); // start together
            barrier.wait();
            // Quiescent: the tree equals the union of the models, counts hold.
            let mut all = BTreeMap::new();
            let mut spans = Vec::new();
            for m in models.lock().unwrap().iter() {
                all.extend(m.leaves.iter().map(|(&k, &v)| (k, v)));
                spans.extend_from_slice(&m.spans);
            }
            assert_eq!(leaves(&t), all, "round {round}");
            check_invariants(&t, &mem, &spans);
            barrier.wait();
        });
        check_invariants(&t, &mem, &[]);
        assert_eq!(mem.stats().live_pages, 1, "round {round}: leak");
        assert_eq!(mem.stats().bad_frees, 0, "round {round}: bad free");
        let s = t.stats();
        eprintln!(
            "round {round}: races lost {}, empty tables freed {}, allocs {}, bulk allocs {}",
            s.install_races_lost, s.empty_tables_freed, s.alloc_calls, s.alloc_bulk_calls
        );
        drop(t);
        assert_eq!(mem.stats().live_pages, 0);
    }
}

/// The same workload on the seed's accounting (`ReservationCounts`): unmaps never free and
/// maps inside reservations take no pin, while releases free what they leave empty under
/// other threads' on-demand maps into the same tables. The tree equals the models at the
/// quiescent point and is empty of leaves after the concurrent teardown; the release of the
/// last reservation and the drop return every page.
#[test]
fn reservation_counts_under_concurrent_operations() {
    use iopt_lpae::account::ReservationCounts;
    let ops = ops();
    for round in 0..3u64 {
        let mem = SimMemory::new();
        let t = PreallocTable::<_, _, ReservationCounts>::with_accounting(
            s1_all(),
            &mem,
            iopt_api::NoFlush,
        )
        .unwrap();
        let barrier = Barrier::new(THREADS as usize + 1);
        let models: Mutex<Vec<BTreeMap<u64, (u64, u64)>>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for id in 0..THREADS {
                let (t, barrier, models) = (&t, &barrier, &models);
                s.spawn(move || {
                    let mut model = Model::default();
                    barrier.wait();
                    worker(t, id + round * THREADS, ops, &mut model);
                    models.lock().unwrap().push(model.leaves.clone());
                    barrier.wait();
                    barrier.wait();
                    let mut g = Gather::new();
                    for (res, _, _) in std::mem::take(&mut model.held) {
                        t.release(res, &mut g).unwrap();
                    }
                    for (&p, &(size, _)) in &model.leaves {
                        let _ = t.unmap(iova(p), PageSize::new(size).unwrap(), 1, &mut g);
                    }
                });
            }
            barrier.wait();
            barrier.wait();
            let mut all = BTreeMap::new();
            for m in models.lock().unwrap().iter() {
                all.extend(m.iter().map(|(&k, &v)| (k, v)));
            }
            assert_eq!(leaves(&t), all, "round {round}");
            barrier.wait();
        });
        assert!(leaves(&t).is_empty(), "round {round}: leaves left");
        assert_eq!(t.engine().deferred_frees(), 0, "round {round}");
        assert_eq!(mem.stats().bad_frees, 0, "round {round}: bad free");
        drop(t);
        assert_eq!(mem.stats().live_pages, 0, "round {round}: leak");
    }
}
