//! Both designs hand back the same output-address runs from an unmap.

use iopt::{
    BACKENDS, Config, ConfigInput, Format, Gather, IoPageTable, Iova, NoFlush, PageSize, PageSizes,
    PhysAddr, Prot, Table,
};
use iopt_sim::SimMemory;

#[test]
fn both_designs_return_the_removed_runs() {
    let cfg = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
    ))
    .unwrap();
    let mut results = Vec::new();
    for &backend in BACKENDS {
        let mem = SimMemory::new();
        let t = Table::with_backend(backend, cfg, &mem, NoFlush).unwrap();
        let rw = Prot::READ | Prot::WRITE;
        t.map_range(
            Iova::new(0x1f_f000),
            PhysAddr::new(0x7f_f000),
            0x20_2000,
            rw,
        )
        .unwrap();
        t.map(
            Iova::new(0x4000_0000),
            PhysAddr::new(0x1000),
            PageSize::SZ_4K,
            2,
            rw,
        )
        .unwrap();
        let mut removed = Vec::new();
        let mut g = Gather::new();
        t.unmap_collect(
            Iova::new(0x1f_f000),
            PageSize::SZ_4K,
            1,
            &mut g,
            &mut removed,
        )
        .unwrap();
        t.unmap_collect(
            Iova::new(0x20_0000),
            PageSize::SZ_2M,
            1,
            &mut g,
            &mut removed,
        )
        .unwrap();
        t.unmap_collect(
            Iova::new(0x40_0000),
            PageSize::SZ_4K,
            1,
            &mut g,
            &mut removed,
        )
        .unwrap();
        t.unmap_collect(
            Iova::new(0x4000_0000),
            PageSize::SZ_4K,
            2,
            &mut g,
            &mut removed,
        )
        .unwrap();
        let total: u64 = removed.iter().map(|r| r.len).sum();
        assert_eq!(total, 0x20_4000, "{backend:?}");
        results.push(removed);
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
}
