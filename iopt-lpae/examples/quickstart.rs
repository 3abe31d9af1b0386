//! Builds the tables a panthor-style GPU driver and an SMMU stage-2 user would, maps through
//! them, and shows the hardware walker agreeing with the software lookup.
//!
//! Run with `cargo run --release -p iopt-lpae --example quickstart`.

use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot,
    Quirks, Registers,
};
use iopt_lpae::{LpaeTable, regs};
use iopt_sim::SimMemory;
use iopt_sim::oracle::{Access, Walker};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Stage 1, 4K granule, 48-bit VA, 40-bit PA: what panthor asks for.
    let cfg = Config::new(
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 40)
            .with_quirks(Quirks::NO_WARN),
    )?;
    let mem = SimMemory::new();
    let table = LpaeTable::new(cfg, &mem)?;
    let prot = Prot::READ | Prot::WRITE | Prot::CACHE;
    table.map_range(
        Iova::new(0x1_0000_0000),
        PhysAddr::new(0x80_0000_0000),
        64 << 20,
        prot,
    )?;
    table.map(
        Iova::new(0x2000_0000),
        PhysAddr::new(0x1234_5000),
        PageSize::SZ_4K,
        3,
        prot,
    )?;
    if let Registers::Stage1 { ttbr, tcr, mair } = table.registers() {
        println!(
            "stage 1: TTBR {ttbr}  TCR {tcr:?}  MAIR {mair:#x}  (arm-smmu v2 TCR {:#x})",
            regs::smmu_v2_tcr(&tcr)
        );
    }
    let hw = Walker::from_registers(cfg.format(), &table.registers(), false, 0).ok_or("walker")?;
    for iova in [0x1_0000_0042u64, 0x1_03ff_ffff, 0x2000_2abc] {
        let sw = table.iova_to_phys(Iova::new(iova)).ok_or("unmapped")?;
        let dev = hw
            .translate(&mem, iova, Access::WRITE)
            .map_err(|f| format!("{f:?}"))?;
        println!(
            "iova {iova:#014x} -> {} (leaf {} at L{}), device walk -> {}",
            sw.pa, sw.size, sw.level, dev.pa
        );
        assert_eq!(sw.pa, dev.pa);
    }
    let s = table.stats();
    println!(
        "tables live {} (peak {}), allocator calls {}",
        s.live_tables, s.peak_live_tables, s.alloc_calls
    );
    let mut gather = Gather::new();
    table.unmap(Iova::new(0x1_0000_0000), PageSize::SZ_2M, 32, &mut gather)?;
    println!(
        "unmapped 64 MiB; gathered invalidation {:?}",
        gather.range()
    );
    drop(table);
    println!("after drop: {} table pages live", mem.stats().live_pages);

    // Stage 2, 4K, ias = oas = 40: two concatenated level-1 tables.
    let s2 = Config::new(ConfigInput::new(
        Format::Arm64S2,
        PageSizes::GRANULE_4K,
        40,
        40,
    ))?;
    let t2 = LpaeTable::new(s2, &mem)?;
    if let Registers::Stage2 { vttbr, vtcr } = t2.registers() {
        println!(
            "stage 2: VTTBR {vttbr}  VTCR {vtcr:?}  (arm-smmu v2 VTCR {:#x}), root {} bytes",
            regs::smmu_v2_vtcr(&vtcr),
            s2.pgd_bytes()
        );
    }
    Ok(())
}
