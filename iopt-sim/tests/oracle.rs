//! The hardware-walk oracle reports each fault class where an SMMU would, and a missing or
//! corrupted table shows up as a fault rather than a silent pass. Descriptors are corrupted
//! through raw memory, as a buggy backend would.

use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot,
    Quirks, TableAlloc, WalkItem,
};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;
use iopt_sim::oracle::{Access, Fault, MemType, Walker};
use std::sync::atomic::Ordering;

const RW: Prot = Prot::READ.union(Prot::WRITE);

fn setup(format: Format, ias: u32, oas: u32, quirks: Quirks) -> (SimMemory, Config) {
    let cfg =
        Config::new(ConfigInput::new(format, PageSizes::GRANULE_4K, ias, oas).with_quirks(quirks))
            .unwrap();
    (SimMemory::new(), cfg)
}

/// The address of the level-3 descriptor that maps `iova`.
fn leaf_slot(t: &dyn IoPageTable, iova: u64) -> (PhysAddr, usize) {
    let mut found = None;
    t.walk(&mut |item| {
        if let WalkItem::Table {
            iova: base,
            level: 3,
            pa,
            ..
        } = item
        {
            if base.get() <= iova && iova < base.get() + (2 << 20) {
                found = Some((pa, ((iova - base.get()) >> 12) as usize));
            }
        }
    });
    found.expect("a level-3 table maps the iova")
}

#[test]
fn fault_classes() {
    let (mem, cfg) = setup(Format::Arm64S1, 48, 40, Quirks::empty());
    let t = LpaeTable::new(cfg, &mem).unwrap();
    let hw = Walker::from_registers(cfg.format(), &t.registers(), false, 0).unwrap();
    t.map(
        Iova::new(0x10_0000),
        PhysAddr::new(0x8000_0000),
        PageSize::SZ_4K,
        4,
        Prot::READ | Prot::CACHE,
    )
    .unwrap();
    t.map(
        Iova::new(0x10_4000),
        PhysAddr::new(0x9000_0000),
        PageSize::SZ_4K,
        1,
        RW | Prot::PRIV | Prot::NOEXEC | Prot::MMIO,
    )
    .unwrap();

    let ok = hw.translate(&mem, 0x10_1234, Access::READ).unwrap();
    assert_eq!(
        (ok.pa, ok.level, ok.mem, ok.shareability),
        (PhysAddr::new(0x8000_1234), 3, MemType::NormalWriteBack, 3)
    );
    // Read-only leaf: writes fault.
    assert_eq!(
        hw.translate(&mem, 0x10_1234, Access::WRITE),
        Err(Fault::Permission { level: 3 })
    );
    // Privileged-only leaf: unprivileged access faults, privileged passes; NOEXEC blocks fetch.
    assert_eq!(
        hw.translate(&mem, 0x10_4000, Access::READ),
        Err(Fault::Permission { level: 3 })
    );
    let p = hw
        .translate(
            &mem,
            0x10_4000,
            Access {
                write: true,
                exec: false,
                privileged: true,
            },
        )
        .unwrap();
    assert_eq!(p.mem, MemType::Device);
    assert_eq!(
        hw.translate(
            &mem,
            0x10_4000,
            Access {
                write: false,
                exec: true,
                privileged: true
            }
        ),
        Err(Fault::Permission { level: 3 })
    );
    // Unmapped and out-of-range inputs: translation faults.
    assert!(matches!(
        hw.translate(&mem, 0x10_5000, Access::READ),
        Err(Fault::Translation { level: 3 })
    ));
    assert!(matches!(
        hw.translate(&mem, 0x4000_0000, Access::READ),
        Err(Fault::Translation { .. })
    ));
    assert!(matches!(
        hw.translate(&mem, 1 << 48, Access::READ),
        Err(Fault::Translation { .. })
    ));

    // Corrupt raw descriptors the way a buggy table would.
    let (l3, idx) = leaf_slot(&t, 0x10_0000);
    let entries = mem.table(l3).unwrap().entries;
    let good = entries[idx].load(Ordering::Relaxed);
    entries[idx].store(good & !(1 << 10), Ordering::Relaxed);
    assert_eq!(
        hw.translate(&mem, 0x10_0000, Access::READ),
        Err(Fault::AccessFlag { level: 3 })
    );
    entries[idx].store(good | (1 << 44), Ordering::Relaxed); // output beyond the 40-bit OAS
    assert_eq!(
        hw.translate(&mem, 0x10_0000, Access::READ),
        Err(Fault::AddressSize { level: 3 })
    );
    entries[idx].store(good & !2, Ordering::Relaxed); // type 1 at level 3: reserved
    assert_eq!(
        hw.translate(&mem, 0x10_0000, Access::READ),
        Err(Fault::Translation { level: 3 })
    );
    entries[idx].store(good, Ordering::Relaxed);
    assert!(hw.translate(&mem, 0x10_0000, Access::READ).is_ok());
}

#[test]
fn a_freed_table_is_never_walked() {
    let (mem, cfg) = setup(Format::Arm64S1, 48, 48, Quirks::empty());
    let t = LpaeTable::new(cfg, &mem).unwrap();
    let hw = Walker::from_registers(cfg.format(), &t.registers(), false, 0).unwrap();
    t.map(
        Iova::new(0x20_0000),
        PhysAddr::new(0x8000_0000),
        PageSize::SZ_4K,
        1,
        RW,
    )
    .unwrap();
    let (l3, _) = leaf_slot(&t, 0x20_0000);
    // A covering unmap frees the level-3 table; the walk now stops at the cleared L2 entry.
    assert_eq!(
        t.unmap(Iova::new(0), PageSize::SZ_2M, 2, &mut Gather::new()),
        Err(iopt_api::UnmapError::NotMapped { iova: Iova::new(0) })
    );
    assert_eq!(
        t.unmap(Iova::new(0x20_0000), PageSize::SZ_2M, 1, &mut Gather::new()),
        Ok(2 << 20)
    );
    assert!(
        mem.table(l3).is_none(),
        "the page went back to the allocator"
    );
    assert_eq!(
        hw.translate(&mem, 0x20_0000, Access::READ),
        Err(Fault::Translation { level: 2 })
    );
    // A descriptor left pointing at the freed page would be an external abort, not a pass.
    let root = mem.table(t.root()).unwrap().entries;
    let l1 = mem
        .table(iopt_lpae::desc::unpack_pa(
            root[0].load(Ordering::Relaxed),
            cfg.granule(),
        ))
        .unwrap();
    let l2 = iopt_lpae::desc::unpack_pa(l1.entries[0].load(Ordering::Relaxed), cfg.granule());
    mem.table(l2).unwrap().entries[1].store(l3.get() | 3, Ordering::Relaxed);
    assert!(matches!(
        hw.translate(&mem, 0x20_0000, Access::READ),
        Err(Fault::External { level: 3, .. })
    ));
    mem.table(l2).unwrap().entries[1].store(0, Ordering::Relaxed);
}

#[test]
fn stage2_and_mali_attributes() {
    let (mem, cfg) = setup(Format::Arm64S2, 40, 40, Quirks::S2FWB);
    let t = LpaeTable::new(cfg, &mem).unwrap();
    let hw = Walker::from_registers(cfg.format(), &t.registers(), false, 0).unwrap();
    // The last entry of the second concatenated root table.
    let top = (1u64 << 40) - (1 << 30);
    t.map(
        Iova::new(top),
        PhysAddr::new(0x40_0000_0000 >> 2),
        PageSize::SZ_1G,
        1,
        Prot::WRITE | Prot::CACHE,
    )
    .unwrap();
    let w = hw.translate(&mem, top + 0x1234, Access::WRITE).unwrap();
    assert_eq!(
        (w.pa.get(), w.level, w.mem),
        ((0x40_0000_0000 >> 2) + 0x1234, 1, MemType::NormalWriteBack)
    );
    assert_eq!(
        hw.translate(&mem, top, Access::READ),
        Err(Fault::Permission { level: 1 })
    );

    let (mem, cfg) = setup(Format::Mali, 33, 40, Quirks::empty());
    let t = LpaeTable::new(cfg, &mem).unwrap();
    let hw = Walker::from_registers(cfg.format(), &t.registers(), false, cfg.ias()).unwrap();
    t.map(
        Iova::new(0x1_0000_0000),
        PhysAddr::new(0x1000),
        PageSize::SZ_4K,
        1,
        Prot::READ | Prot::CACHE,
    )
    .unwrap();
    let m = hw.translate(&mem, 0x1_0000_0008, Access::READ).unwrap();
    assert_eq!(
        (m.pa.get(), m.level, m.mem, m.shareability),
        (0x1008, 3, MemType::NormalWriteBack, 2)
    );
    assert_eq!(
        hw.translate(&mem, 0x1_0000_0008, Access::WRITE),
        Err(Fault::Permission { level: 3 })
    );
}

/// Every register encoding, however nonsensical, gives a walker or `None`, and a walker
/// faults or translates on any input, at any root: no panic, no overflow.
#[test]
fn any_register_value_walks_or_is_refused_without_panicking() {
    use iopt_api::{Registers, Tcr, Vtcr};
    let mem = SimMemory::new();
    let root = mem.alloc(4096).unwrap();
    let roots = [root, PhysAddr::new(!0xfff), PhysAddr::new(0)];
    let iovas = [
        0,
        0x1000,
        1 << 47,
        u64::MAX,
        u64::MAX << 12,
        0x8000_0000_0000_0000,
    ];
    let mut walkers = 0;
    for format in [
        Format::Arm64S1,
        Format::Arm32S1,
        Format::Arm64S2,
        Format::Arm32S2,
        Format::Mali,
    ] {
        for tsz in 0..=63u8 {
            for tg in 0..=3u8 {
                for (sl, ttbr1) in [(0, false), (1, false), (2, true), (3, true)] {
                    for &r in &roots {
                        let regs = match format {
                            Format::Arm64S1 | Format::Arm32S1 => Registers::Stage1 {
                                ttbr: r,
                                tcr: Tcr {
                                    ips: tg + sl,
                                    tg,
                                    sh: 3,
                                    orgn: 1,
                                    irgn: 1,
                                    tsz,
                                },
                                mair: 0xf404_ff44,
                            },
                            Format::Mali => Registers::Mali {
                                transtab: r.get() | u64::from(tg),
                                memattr: 0x88_8d88,
                            },
                            _ => Registers::Stage2 {
                                vttbr: r,
                                vtcr: Vtcr {
                                    ps: tg + sl,
                                    tg,
                                    sh: 3,
                                    orgn: 1,
                                    irgn: 1,
                                    sl,
                                    tsz,
                                },
                            },
                        };
                        let Some(w) =
                            Walker::from_registers(format, &regs, ttbr1, u32::from(tsz) + 8)
                        else {
                            continue;
                        };
                        walkers += 1;
                        for &iova in &iovas {
                            let _ = w.translate(&mem, iova, Access::READ);
                            let _ = w.device_write(&mem, iova);
                        }
                    }
                }
            }
        }
    }
    assert!(walkers > 1000, "only {walkers} encodings accepted");
}

/// T0SZ values a stage-1 walk cannot start from are refused, not misderived.
#[test]
fn stage1_input_sizes_beyond_four_levels_or_below_one_are_refused() {
    use iopt_api::{Registers, Tcr};
    let regs = |tsz, tg| Registers::Stage1 {
        ttbr: PhysAddr::new(0x4000_0000),
        tcr: Tcr {
            ips: 5,
            tg,
            sh: 3,
            orgn: 1,
            irgn: 1,
            tsz,
        },
        mair: 0,
    };
    // 4K granule: 48 bits is four levels, 49 would be five; 13 bits is one level, 12 none.
    assert!(Walker::from_registers(Format::Arm64S1, &regs(16, 0), false, 0).is_some());
    assert!(Walker::from_registers(Format::Arm64S1, &regs(15, 0), false, 0).is_none());
    assert!(Walker::from_registers(Format::Arm64S1, &regs(0, 0), false, 0).is_none());
    assert!(Walker::from_registers(Format::Arm64S1, &regs(51, 0), false, 0).is_some());
    assert!(Walker::from_registers(Format::Arm64S1, &regs(52, 0), false, 0).is_none());
    assert!(Walker::from_registers(Format::Arm64S1, &regs(60, 0), true, 0).is_none());
    // 64K granule: 52 bits is three levels.
    assert!(Walker::from_registers(Format::Arm64S1, &regs(12, 1), false, 0).is_some());
}
