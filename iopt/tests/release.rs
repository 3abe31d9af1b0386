//! A release refused by the facade gives the handle back, with either design.

use iopt::{
    BACKENDS, Config, ConfigInput, Format, Gather, IoPageTable, Iova, IovaRange, NoFlush, PageSize,
    PageSizes, PhysAddr, Prot, Reserve, ReserveError, Table,
};
use iopt_sim::SimMemory;

#[test]
fn release_to_the_wrong_table_returns_the_handle() {
    let cfg = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
    ))
    .unwrap();
    for &backend in BACKENDS {
        let (mem_a, mem_b) = (SimMemory::new(), SimMemory::new());
        let a = Table::with_backend(backend, cfg, &mem_a, NoFlush).unwrap();
        let b = Table::with_backend(backend, cfg, &mem_b, NoFlush).unwrap();
        let range = IovaRange::new(Iova::new(0x4000_0000), 0x20_0000, 0x1000).unwrap();
        let res = a.reserve(range, PageSize::SZ_4K).unwrap();
        let id = res.id();

        let err = b.release(res, &mut Gather::new()).unwrap_err();
        assert_eq!(
            err.error(),
            ReserveError::UnknownReservation { id },
            "{backend:?}"
        );
        assert_eq!(
            mem_b.stats().live_pages,
            1,
            "{backend:?}: the wrong table changed"
        );
        let res = err.into_reservation();

        let before = mem_a.stats().pages_allocated;
        a.map_reserved(
            &res,
            range.start(),
            PhysAddr::new(0x8000_0000),
            PageSize::SZ_4K,
            8,
            Prot::READ,
        )
        .unwrap();
        assert_eq!(mem_a.stats().pages_allocated, before, "{backend:?}");
        let mut g = Gather::new();
        a.unmap(range.start(), PageSize::SZ_4K, 8, &mut g).unwrap();
        a.release(res, &mut g).unwrap();
        let s = a.stats();
        assert_eq!(s.reserved_outstanding, 0, "{backend:?}");
        drop(a);
        assert_eq!(mem_a.stats().live_pages, 0, "{backend:?}");
    }
}
