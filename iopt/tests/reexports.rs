//! What a driver needs to configure a design is reachable from the facade alone.

/// Design 1's free policy can be chosen without naming `iopt-alloc-ops`.
#[cfg(feature = "alloc-ops")]
#[test]
fn free_policy_is_reexported() {
    use iopt::{AllocOpsTable, Config, ConfigInput, Format, FreePolicy, NoFlush, PageSizes};
    use iopt_sim::SimMemory;
    let cfg = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
    ))
    .unwrap();
    let mem = SimMemory::new();
    let t = AllocOpsTable::freeing_empty_tables(cfg, &mem, NoFlush).unwrap();
    assert_eq!(t.free_policy(), FreePolicy::EmptyTables);
    assert_eq!(FreePolicy::default(), FreePolicy::Linux);
}
