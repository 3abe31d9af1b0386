//! The same test, whatever design the feature list picked.

use iopt::{Backend, IoPageTable, Iova};
use iopt_downstream::Vm;
use iopt_sim::SimMemory;

#[test]
fn binds_translate_and_nothing_leaks() {
    let mem = SimMemory::new();
    let vm = Vm::new(&mem).unwrap();
    // The design is the one this crate's features asked for. (Under `cargo test --workspace`
    // cargo unifies features across members and iopt may carry both; CI also runs this test
    // once per feature, where the choice is exact.)
    let mine: &[Backend] = &[
        #[cfg(feature = "alloc-ops")]
        Backend::AllocOps,
        #[cfg(feature = "prealloc")]
        Backend::Prealloc,
    ];
    if iopt::BACKENDS == mine {
        assert!(mine.contains(&vm.table().backend()));
        assert_eq!(mine.len(), 1, "one feature, one design");
    }
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
