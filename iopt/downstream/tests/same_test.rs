//! The same test, whatever design the feature list picked.

use iopt::{Backend, IoPageTable, Iova, SimMemory};
use iopt_downstream::Vm;

#[test]
fn binds_translate_and_nothing_leaks() {
    let mem = SimMemory::new();
    let vm = Vm::new(&mem).unwrap();
    #[cfg(all(feature = "prealloc", not(feature = "alloc-ops")))]
    assert_eq!(vm.table().backend(), Backend::Prealloc);
    #[cfg(all(feature = "alloc-ops", not(feature = "prealloc")))]
    assert_eq!(vm.table().backend(), Backend::AllocOps);
    let _ = Backend::default();
    let mut held = Vec::new();
    for i in 0..64u64 {
        held.push(
            vm.bind(0x10_0000 + i * 0x3000, 0x8000_0000 + i * 0x10_0000, 2)
                .unwrap(),
        );
    }
    for i in 0..64u64 {
        let t = vm
            .table()
            .iova_to_phys(Iova::new(0x10_1234 + i * 0x3000))
            .unwrap();
        assert_eq!(t.pa.get(), 0x8000_1234 + i * 0x10_0000);
    }
    for res in held {
        vm.unbind(res).unwrap();
    }
    assert!(vm.table().iova_to_phys(Iova::new(0x10_0000)).is_none());
    drop(vm);
    assert_eq!(mem.stats().live_pages, 0);
}
