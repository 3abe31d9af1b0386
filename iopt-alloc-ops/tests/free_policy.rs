//! The opt-in freeing policy: tables an unmap leaves empty go back to the allocator (after the
//! walk flush), so a full unmap returns to the root alone; Linux's policy keeps them. Results
//! and translations are the same under both.

use iopt_alloc_ops::{AllocOpsTable, FreePolicy};
use iopt_api::{
    Config, ConfigInput, FlushOps, Format, Gather, IoPageTable, Iova, IovaRange, PageSize,
    PageSizes, PhysAddr, Prot, Reserve,
};
use iopt_sim::SimMemory;
use std::sync::Mutex;

const RW: Prot = Prot::READ.union(Prot::WRITE);

#[derive(Debug, Default)]
struct Walks(Mutex<Vec<(u64, u64)>>);

impl FlushOps for Walks {
    fn flush_walk(&self, iova: Iova, size: u64, _granule: u64) {
        self.0.lock().unwrap().push((iova.get(), size));
    }
}

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
fn full_unmap_returns_to_the_root() {
    let mem = SimMemory::new();
    let walks = Walks::default();
    let t = AllocOpsTable::freeing_empty_tables(cfg(), &mem, &walks).unwrap();
    assert_eq!(t.free_policy(), FreePolicy::EmptyTables);
    // Scattered 4K pages over two 1 GiB regions, through a reservation and on demand.
    let range = IovaRange::new(Iova::new(0x3fe0_0000), 0x40_0000, 0x1000).unwrap();
    let res = t.reserve(range, PageSize::SZ_4K).unwrap();
    t.map_reserved(
        &res,
        range.start(),
        PhysAddr::new(0x1_0000_0000),
        PageSize::SZ_4K,
        0x400,
        RW,
    )
    .unwrap();
    t.map(
        Iova::new(0x80_0000_0000),
        PhysAddr::new(0),
        PageSize::SZ_4K,
        3,
        RW,
    )
    .unwrap();
    assert!(mem.stats().live_pages > 6);
    let mut g = Gather::new();
    t.unmap(range.start(), PageSize::SZ_4K, 0x400, &mut g)
        .unwrap();
    t.unmap(Iova::new(0x80_0000_0000), PageSize::SZ_4K, 3, &mut g)
        .unwrap();
    t.release(res, &mut g).unwrap();
    assert_eq!(t.stats().live_tables, 1, "root alone");
    assert_eq!(mem.stats().live_pages, 1);
    assert!(t.stats().empty_tables_freed > 0);
    assert!(
        !walks.0.lock().unwrap().is_empty(),
        "every unlink was flushed"
    );
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}

#[test]
fn linux_policy_keeps_empty_tables_and_both_translate_alike() {
    let mem = SimMemory::new();
    let linux = AllocOpsTable::new(cfg(), &mem).unwrap();
    let eager = AllocOpsTable::freeing_empty_tables(cfg(), &mem, iopt_api::NoFlush).unwrap();
    for t in [&linux as &dyn IoPageTable, &eager] {
        t.map(
            Iova::new(0x20_0000),
            PhysAddr::new(0x4000_0000),
            PageSize::SZ_4K,
            8,
            RW,
        )
        .unwrap();
        t.map(
            Iova::new(0x4000_0000),
            PhysAddr::new(0x8000_0000),
            PageSize::SZ_2M,
            2,
            RW,
        )
        .unwrap();
        assert_eq!(
            t.unmap(Iova::new(0x20_0000), PageSize::SZ_4K, 8, &mut Gather::new()),
            Ok(0x8000)
        );
    }
    for iova in [0x20_0000u64, 0x4000_1234, 0x4020_0000, 0x4040_0000] {
        assert_eq!(
            linux.iova_to_phys(Iova::new(iova)),
            eager.iova_to_phys(Iova::new(iova))
        );
    }
    // Linux keeps the emptied L3 table and the L2 above it; the eager policy freed both.
    assert_eq!(
        (linux.stats().live_tables, eager.stats().live_tables),
        (5, 3)
    );
    assert_eq!(eager.stats().empty_tables_freed, 2);
}

#[test]
fn threads_with_eager_freeing_leave_the_root_alone() {
    for round in 0..10u64 {
        let mem = SimMemory::new();
        let t = AllocOpsTable::freeing_empty_tables(cfg(), &mem, iopt_api::NoFlush).unwrap();
        std::thread::scope(|s| {
            for th in 0..4u64 {
                let t = &t;
                s.spawn(move || {
                    for i in 0..300u64 {
                        // Interleaved pages: the threads share every table, and tables empty
                        // and refill while the others work.
                        let iova =
                            (round << 39) + ((i % 40) * 4 + th) * 0x1000 + (i / 40) * 0x20_0000;
                        let range = IovaRange::new(Iova::new(iova), 0x1000, 0x1000).unwrap();
                        let res = t.reserve(range, PageSize::SZ_4K).unwrap();
                        t.map_reserved(
                            &res,
                            Iova::new(iova),
                            PhysAddr::new(iova),
                            PageSize::SZ_4K,
                            1,
                            RW,
                        )
                        .unwrap();
                        assert_eq!(t.iova_to_phys(Iova::new(iova)).unwrap().pa.get(), iova);
                        assert_eq!(
                            t.unmap(Iova::new(iova), PageSize::SZ_4K, 1, &mut Gather::new()),
                            Ok(0x1000)
                        );
                        t.release(res, &mut Gather::new()).unwrap();
                    }
                });
            }
        });
        assert_eq!(t.stats().live_tables, 1, "round {round}: root alone");
        drop(t);
        assert_eq!(mem.stats().live_pages, 0);
        assert_eq!(mem.stats().bad_frees, 0);
    }
}
