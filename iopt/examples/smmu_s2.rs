//! An SMMU stage-2 setup: a 40-bit IPA space for a guest, 4K granule, which the architecture
//! requires to start at level 1 with two concatenated tables. Prints the STE/VTCR fields a
//! driver programs, and the arm-smmu v2 VTCR word.
//!
//! Run with `cargo run -p iopt --example smmu_s2`.

use iopt::{
    Config, ConfigInput, Format, IoPageTable, Iova, PageSizes, PhysAddr, Prot, Quirks, Registers,
    Table, regs,
};
use iopt_sim::SimMemory;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = Config::new(
        ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_4K, 40, 40).with_quirks(Quirks::S2FWB),
    )?;
    let mem = SimMemory::new();
    let table = Table::new(cfg, &mem)?;
    println!(
        "stage 2: ias {} oas {}, start level {}, root {} bytes ({} concatenated tables)",
        cfg.ias(),
        cfg.oas(),
        cfg.start_level(),
        cfg.pgd_bytes(),
        cfg.concat_tables()
    );
    let Registers::Stage2 { vttbr, vtcr } = table.registers() else {
        return Err("not a stage-2 table".into());
    };
    println!("VTTBR  {vttbr}");
    println!(
        "VTCR   T0SZ {} SL0 {} IRGN0 {} ORGN0 {} SH0 {} TG0 {} PS {}  (arm-smmu v2 VTCR {:#010x})",
        vtcr.tsz,
        vtcr.sl,
        vtcr.irgn,
        vtcr.orgn,
        vtcr.sh,
        vtcr.tg,
        vtcr.ps,
        regs::smmu_v2_vtcr(&vtcr)
    );
    // 1 GiB of guest RAM as 2 MiB blocks, plus a device window.
    table.map_range(
        Iova::new(0x8000_0000),
        PhysAddr::new(0x40_0000_0000),
        1 << 30,
        Prot::READ | Prot::WRITE | Prot::CACHE,
    )?;
    table.map_range(
        Iova::new(0x0900_0000),
        PhysAddr::new(0x2000_0000),
        0x1_0000,
        Prot::READ | Prot::WRITE | Prot::MMIO,
    )?;
    for ipa in [0x8000_1234u64, 0xbfff_fff0, 0x0900_0010] {
        let t = table.iova_to_phys(Iova::new(ipa)).ok_or("unmapped")?;
        println!(
            "IPA {ipa:#012x} -> PA {} ({} leaf, {:?}, descriptor {:#018x})",
            t.pa, t.size, t.prot, t.descriptor
        );
    }
    println!("{} table pages in use", table.stats().live_tables);
    Ok(())
}
