//! Lock-free concurrency on disjoint ranges that share intermediate tables: threads race to
//! install the same tables, losers give their pages back, and afterwards every translation
//! matches what each thread mapped, with no page leaked or freed twice.

use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot,
};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;

/// A 48-bit stage-1 table with a 4K granule.
fn cfg() -> Config {
    Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
    ))
    .unwrap()
}

#[test]
fn disjoint_threads_share_tables() {
    let cfg = cfg();
    for round in 0..20u64 {
        let mem = SimMemory::new();
        let t = LpaeTable::new(cfg, &mem).unwrap();
        let threads = 4u64;
        std::thread::scope(|s| {
            for th in 0..threads {
                let t = &t;
                s.spawn(move || {
                    // Interleaved 4K pages: every thread needs the same L1, L2 and L3 tables.
                    for i in 0..256u64 {
                        let page = i * threads + th;
                        let iova = (round << 39) + page * 4096;
                        t.map(
                            Iova::new(iova),
                            PhysAddr::new(0x1_0000_0000 + page * 4096),
                            PageSize::SZ_4K,
                            1,
                            Prot::READ,
                        )
                        .unwrap();
                        assert_eq!(
                            t.iova_to_phys(Iova::new(iova)).unwrap().pa.get(),
                            0x1_0000_0000 + page * 4096
                        );
                    }
                    // Unmap every other page of this thread's share.
                    for i in (0..256u64).step_by(2) {
                        let iova = (round << 39) + (i * threads + th) * 4096;
                        assert_eq!(
                            t.unmap(Iova::new(iova), PageSize::SZ_4K, 1, &mut Gather::new()),
                            Ok(4096)
                        );
                    }
                });
            }
        });
        for page in 0..256 * threads {
            let iova = (round << 39) + page * 4096;
            let want = ((page / threads) % 2 == 1).then_some(0x1_0000_0000 + page * 4096);
            assert_eq!(
                t.iova_to_phys(Iova::new(iova)).map(|x| x.pa.get()),
                want,
                "page {page}"
            );
        }
        let stats = t.stats();
        // 1 root + 1 L1 + 1 L2 + 2 L3 tables, however the races went.
        assert_eq!(stats.live_tables, 5);
        assert_eq!(
            mem.stats().live_pages,
            5,
            "race losers gave their pages back"
        );
        assert_eq!(stats.pages_allocated - stats.pages_freed, 5);
        drop(t);
        assert_eq!(mem.stats().live_pages, 0);
        assert_eq!(mem.stats().bad_frees, 0);
    }
}

/// The grace period: a table unlinked while any operation that entered before is still
/// running stays allocated until that operation leaves, whether it announced itself in a slot
/// of its own or (every slot taken, here by 40 nested guards) in the overflow counters.
#[test]
fn unlinked_tables_wait_for_every_guard_slot_or_overflow() {
    use iopt_lpae::Engine;
    let cfg = cfg();
    let mem = SimMemory::new();
    let e = Engine::counting(cfg, &mem, iopt_api::NoFlush).unwrap();
    let iova = Iova::new(0x4000_0000);
    let map = || {
        e.map(
            iova,
            PhysAddr::new(0x1000),
            PageSize::SZ_4K,
            1,
            Prot::READ,
            &mut e.on_demand(),
        )
        .unwrap();
    };
    let unmap = || {
        e.unmap(iova, PageSize::SZ_4K, 1, &mut Gather::new())
            .unwrap();
    };
    for held in [1usize, 31, 32, 33, 40] {
        map();
        assert_eq!(mem.stats().live_pages, 4, "root, L1, L2, L3");
        let guards: Vec<_> = (0..held).map(|_| e.enter()).collect();
        unmap();
        // L1, L2 and L3 are unlinked but still reachable by the guards' operations.
        assert_eq!(e.deferred_frees(), 3, "{held} guards");
        assert_eq!(mem.stats().live_pages, 4, "{held} guards");
        // Every guard but the last (the overflow one when `held` > 32) leaves: still held.
        let mut guards = guards;
        let last = guards.pop();
        drop(guards);
        drop(e.enter());
        assert_eq!(e.deferred_frees(), 3, "{held} guards, the last still held");
        drop(last);
        assert_eq!(e.deferred_frees(), 0, "{held} guards, all left");
        assert_eq!(mem.stats().live_pages, 1, "{held} guards: the root alone");
    }
}
