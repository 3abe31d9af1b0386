//! A Mali CSF (panthor-style) GPU VM: 64-bit stage 1, 4K granule, 48-bit VA, with the
//! AS_TRANSTAB / AS_MEMATTR / AS_TRANSCFG values the driver derives from the table's outputs;
//! and the legacy Mali LPAE format that panfrost programs directly.
//!
//! Run with `cargo run -p iopt --example panthor_s1`.

use iopt::{
    Config, ConfigInput, Format, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot, Registers,
    Table,
};
use iopt_sim::SimMemory;

/// Panthor derives AS_MEMATTR from the stage-1 MAIR: one byte per attribute index, each
/// translated to Mali's encoding (write-back → 0x8D-style allocate policy, non-cacheable and
/// device → 0x88-style). This mirrors that conversion for the three indices iopt uses.
fn mair_to_memattr(mair: u64) -> u64 {
    let mut out = 0u64;
    for idx in 0..3 {
        let attr = (mair >> (idx * 8)) & 0xff;
        // Write-back (0xFF) gets the allocate policy; non-cacheable (0x44) and device memory
        // both get the implementation-defined coherency encoding.
        let mali = if attr == 0xff { 0x8d } else { 0x88 };
        out |= mali << (idx * 8);
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mem = SimMemory::new();
    let cfg = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        40,
    ))?;
    let vm = Table::new(cfg, &mem)?;
    let Registers::Stage1 { ttbr, tcr, mair } = vm.registers() else {
        return Err("not stage 1".into());
    };
    let va_bits = 64 - u32::from(tcr.tsz);
    // AS_TRANSCFG: AARCH64_4K (6) | INA_BITS(55 - va_bits) << 6 | PTW_MEMATTR_WB (2 << 24) |
    // PTW_RA (1 << 30), plus PTW_SH_OS (2 << 28) on a coherent GPU.
    let transcfg = 6u64 | (u64::from(55 - va_bits) << 6) | (2 << 24) | (1 << 30) | (2 << 28);
    println!("panthor (ARM_64_LPAE_S1):");
    println!("  AS_TRANSTAB  {ttbr}");
    println!(
        "  AS_MEMATTR   {:#018x} (from MAIR {mair:#010x})",
        mair_to_memattr(mair)
    );
    println!("  AS_TRANSCFG  {transcfg:#018x}");
    println!("  TCR fields   {tcr:?}");
    vm.map(
        Iova::new(0x1_0000_0000),
        PhysAddr::new(0x8_0000_0000),
        PageSize::SZ_2M,
        4,
        Prot::READ | Prot::WRITE | Prot::CACHE,
    )?;
    let t = vm
        .iova_to_phys(Iova::new(0x1_0012_3456))
        .ok_or("unmapped")?;
    println!("  GPU VA 0x100123456 -> {} via a {} leaf", t.pa, t.size);

    let legacy = Config::new(ConfigInput::new(
        Format::Mali,
        PageSizes::from_bits(0x20_1000),
        33,
        40,
    ))?;
    let t = Table::new(legacy, &mem)?;
    let Registers::Mali { transtab, memattr } = t.registers() else {
        return Err("not Mali".into());
    };
    println!("panfrost (ARM_MALI_LPAE, ias 33):");
    println!(
        "  AS_TRANSTAB  {transtab:#018x}  (root {} | ADRMODE_TABLE | READ_INNER | SHARE_OUTER)",
        t.root()
    );
    println!("  AS_MEMATTR   {memattr:#018x}");
    println!(
        "  walk: {} levels from level {}",
        legacy.levels(),
        legacy.start_level()
    );
    Ok(())
}
