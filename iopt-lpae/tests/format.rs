//! Golden values from the format facts: descriptors, register outputs, geometry, address
//! packing. Every number here is written out from the LPAE format reference, not computed by
//! the code under test.

#![allow(clippy::too_many_lines, clippy::type_complexity)] // table-driven tests

use iopt_api::{
    Config, ConfigError, ConfigInput, Format, Granule, PageSizes, PhysAddr, Prot, Quirks,
    Registers, Tcr, Vtcr,
};
use iopt_lpae::desc::{self, Kind};
use iopt_lpae::regs;

fn cfg(format: Format, sizes: PageSizes, ias: u32, oas: u32, quirks: Quirks) -> Config {
    Config::new(ConfigInput::new(format, sizes, ias, oas).with_quirks(quirks))
        .expect("valid config")
}

const PA: PhysAddr = PhysAddr::new(0x8_0000_0000);
const RW: Prot = Prot::READ.union(Prot::WRITE);

#[test]
fn worked_descriptor_values() {
    let s1 = cfg(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
        Quirks::empty(),
    );
    let s1_hd = cfg(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48, Quirks::HD);
    let s2 = cfg(
        Format::Arm64S2,
        PageSizes::GRANULE_4K,
        48,
        48,
        Quirks::empty(),
    );
    let s2_fwb = cfg(
        Format::Arm64S2,
        PageSizes::GRANULE_4K,
        48,
        48,
        Quirks::S2FWB,
    );
    let mali = cfg(Format::Mali, PageSizes::GRANULE_4K, 48, 40, Quirks::empty());
    let cases: &[(&str, &Config, u32, Prot, u64)] = &[
        (
            "S1 L3 RW|CACHE",
            &s1,
            3,
            RW | Prot::CACHE,
            0x0000_0008_0000_0F47,
        ),
        (
            "S1 L3 RW|CACHE|NOEXEC",
            &s1,
            3,
            RW | Prot::CACHE | Prot::NOEXEC,
            0x0060_0008_0000_0F47,
        ),
        (
            "S1 L3 R|CACHE",
            &s1,
            3,
            Prot::READ | Prot::CACHE,
            0x0000_0008_0000_0FC7,
        ),
        ("S1 L3 RW", &s1, 3, RW, 0x0000_0008_0000_0E43),
        (
            "S1 L3 RW|MMIO",
            &s1,
            3,
            RW | Prot::MMIO,
            0x0000_0008_0000_0E4B,
        ),
        (
            "S1 L3 RW|CACHE|PRIV",
            &s1,
            3,
            RW | Prot::CACHE | Prot::PRIV,
            0x0000_0008_0000_0F07,
        ),
        (
            "S1 L3 RW|CACHE HD",
            &s1_hd,
            3,
            RW | Prot::CACHE,
            0x0008_0008_0000_0F47,
        ),
        (
            "S1 L2 block RW|CACHE",
            &s1,
            2,
            RW | Prot::CACHE,
            0x0000_0008_0000_0F45,
        ),
        (
            "S2 L3 RW|CACHE",
            &s2,
            3,
            RW | Prot::CACHE,
            0x0000_0008_0000_07FF,
        ),
        (
            "S2 L3 RW|CACHE FWB",
            &s2_fwb,
            3,
            RW | Prot::CACHE,
            0x0000_0008_0000_07DB,
        ),
        ("S2 L3 RW", &s2, 3, RW, 0x0000_0008_0000_06D7),
        (
            "S2 L3 R|MMIO",
            &s2,
            3,
            Prot::READ | Prot::MMIO,
            0x0000_0008_0000_0647,
        ),
        (
            "S2 L2 block RW|CACHE",
            &s2,
            2,
            RW | Prot::CACHE,
            0x0000_0008_0000_07FD,
        ),
        (
            "Mali L3 RW|CACHE",
            &mali,
            3,
            RW | Prot::CACHE,
            0x0000_0008_0000_02C5,
        ),
        ("Mali L3 R", &mali, 3, Prot::READ, 0x0000_0008_0000_0241),
    ];
    for &(name, c, level, prot, want) in cases {
        let got = desc::encode_leaf(c, level, PA, prot);
        assert_eq!(got, want, "{name}: got {got:#018x}, want {want:#018x}");
        assert_eq!(desc::kind(c.format(), level, got), Kind::Leaf, "{name}");
        assert_eq!(desc::unpack_pa(got, c.granule()), PA, "{name}");
        assert_eq!(desc::decode_prot(c, got), c.effective_prot(prot), "{name}");
    }
}

#[test]
fn table_descriptors() {
    let s1 = cfg(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
        Quirks::empty(),
    );
    let ns = cfg(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48, Quirks::NS);
    let t = PhysAddr::new(0x4000_3000);
    assert_eq!(desc::encode_table(&s1, t), 0x4000_3003);
    assert_eq!(desc::encode_table(&ns, t), 0x8000_0000_4000_3003);
    for level in 0..3 {
        assert_eq!(desc::kind(Format::Arm64S1, level, 0x4000_3003), Kind::Table);
    }
    // Level 3 holds no tables; a Mali type-3 entry there is invalid, a type-1 entry a leaf.
    assert_eq!(desc::kind(Format::Arm64S1, 3, 0x4000_3003), Kind::Leaf);
    assert_eq!(desc::kind(Format::Mali, 3, 0x4000_3003), Kind::Invalid);
    assert_eq!(desc::kind(Format::Mali, 3, 0x4000_3001), Kind::Leaf);
    assert_eq!(desc::kind(Format::Arm64S1, 3, 0x4000_3001), Kind::Invalid);
    assert_eq!(desc::kind(Format::Arm64S1, 1, 0), Kind::Invalid);
    // NS leaves.
    let d = desc::encode_leaf(&ns, 3, PA, RW | Prot::CACHE);
    assert_eq!(d, 0x0000_0008_0000_0F67);
}

#[test]
fn address_packing_round_trips() {
    // 64K granule: PA[51:48] into descriptor bits [15:12].
    let pa = PhysAddr::new(0xF_1234_5678_0000);
    assert_eq!(desc::pack_pa(pa), 0x1234_5678_F000);
    assert_eq!(desc::unpack_pa(0x1234_5678_F000, Granule::K64), pa);
    for (granule, bits) in [
        (Granule::K4, 48),
        (Granule::K16, 48),
        (Granule::K64, 48),
        (Granule::K64, 52),
    ] {
        let g = granule.size();
        for k in [0u64, 1, 0x1234, 0xdead_beef] {
            let raw = (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (1u64 << bits)) & !(g - 1);
            let pa = PhysAddr::new(raw);
            let top = PhysAddr::new(((1u64 << bits) - 1) & !(g - 1));
            for p in [pa, top] {
                let d = desc::pack_pa(p);
                assert_eq!(d & !desc::ADDR_MASK, 0, "packing stays in [47:12]");
                assert_eq!(
                    desc::unpack_pa(d | 0xF47, granule),
                    p,
                    "{granule:?} {bits}-bit {p:?}"
                );
            }
        }
    }
}

#[test]
fn register_outputs() {
    let root = PhysAddr::new(0x4000_0000);
    let c = cfg(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
        Quirks::empty(),
    );
    assert_eq!(
        regs::registers(&c, root),
        Registers::Stage1 {
            ttbr: root,
            tcr: Tcr {
                ips: 5,
                tg: 0,
                sh: 3,
                orgn: 1,
                irgn: 1,
                tsz: 16
            },
            mair: 0xF404_FF44
        }
    );
    // TG1 encodings with TTBR1; TG0 otherwise.
    for (g, sizes, tg0, tg1) in [
        (Granule::K4, PageSizes::GRANULE_4K, 0, 2),
        (Granule::K16, PageSizes::GRANULE_16K, 2, 1),
        (Granule::K64, PageSizes::GRANULE_64K, 1, 3),
    ] {
        let plain = cfg(Format::Arm64S1, sizes, 48, 48, Quirks::empty());
        let high = cfg(Format::Arm64S1, sizes, 48, 48, Quirks::TTBR1);
        assert_eq!(plain.granule(), g);
        let Registers::Stage1 { tcr: a, .. } = regs::registers(&plain, root) else {
            panic!()
        };
        let Registers::Stage1 { tcr: b, .. } = regs::registers(&high, root) else {
            panic!()
        };
        assert_eq!((a.tg, b.tg), (tg0, tg1), "{g:?}");
    }
    // IPS per OAS.
    for (oas, ips) in [(32, 0), (36, 1), (40, 2), (42, 3), (44, 4), (48, 5)] {
        let c = cfg(
            Format::Arm64S1,
            PageSizes::GRANULE_4K,
            32,
            oas,
            Quirks::empty(),
        );
        let Registers::Stage1 { tcr, .. } = regs::registers(&c, root) else {
            panic!()
        };
        assert_eq!((tcr.ips, tcr.tsz), (ips, 32));
    }
    // Non-coherent walks: OS, NC, and outer WBWA only with the quirk.
    let nc = Config::new(
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48).with_coherent_walk(false),
    )
    .unwrap();
    let Registers::Stage1 { tcr, .. } = regs::registers(&nc, root) else {
        panic!()
    };
    assert_eq!((tcr.sh, tcr.irgn, tcr.orgn), (2, 0, 0));
    let wbwa = Config::new(
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48)
            .with_coherent_walk(false)
            .with_quirks(Quirks::OUTER_WBWA),
    )
    .unwrap();
    let Registers::Stage1 { tcr, .. } = regs::registers(&wbwa, root) else {
        panic!()
    };
    assert_eq!((tcr.sh, tcr.irgn, tcr.orgn), (2, 0, 1));
    assert!(matches!(
        Config::new(
            ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48)
                .with_quirks(Quirks::OUTER_WBWA)
        ),
        Err(ConfigError::OuterWbwaCoherent { .. })
    ));

    // Stage 2, 4K, ias = oas = 40: two concatenated L1 tables, SL0 = 1, tsz = 24.
    let s2 = cfg(
        Format::Arm64S2,
        PageSizes::GRANULE_4K,
        40,
        40,
        Quirks::empty(),
    );
    assert_eq!(
        regs::registers(&s2, root),
        Registers::Stage2 {
            vttbr: root,
            vtcr: Vtcr {
                ps: 2,
                tg: 0,
                sh: 3,
                orgn: 1,
                irgn: 1,
                sl: 1,
                tsz: 24
            }
        }
    );
    // SL0 per granule and start level.
    for (sizes, ias, oas, start, sl) in [
        (PageSizes::GRANULE_4K, 48, 48, 0, 2),
        (PageSizes::GRANULE_4K, 39, 48, 1, 1),
        (PageSizes::GRANULE_4K, 32, 48, 1, 1),
        (PageSizes::GRANULE_16K, 44, 44, 1, 2),
        (PageSizes::GRANULE_16K, 36, 48, 2, 1),
        (PageSizes::GRANULE_64K, 48, 48, 1, 2),
        (PageSizes::GRANULE_64K, 40, 48, 2, 1),
    ] {
        let c = cfg(Format::Arm64S2, sizes, ias, oas, Quirks::empty());
        assert_eq!(c.start_level(), start, "{sizes:?} {ias}/{oas}");
        let Registers::Stage2 { vtcr, .. } = regs::registers(&c, root) else {
            panic!()
        };
        assert_eq!(vtcr.sl, sl, "{sizes:?} {ias}/{oas}");
    }

    // Mali: memattr 0x888D88; transtab = root | ADRMODE_TABLE | READ_INNER (| SHARE_OUTER).
    let mali = cfg(Format::Mali, PageSizes::GRANULE_4K, 48, 40, Quirks::empty());
    assert_eq!(
        regs::registers(&mali, root),
        Registers::Mali {
            transtab: 0x4000_0017,
            memattr: 0x0088_8D88
        }
    );
    let mali_nc = Config::new(
        ConfigInput::new(Format::Mali, PageSizes::GRANULE_4K, 48, 40).with_coherent_walk(false),
    )
    .unwrap();
    assert_eq!(
        regs::registers(&mali_nc, root),
        Registers::Mali {
            transtab: 0x4000_0007,
            memattr: 0x0088_8D88
        }
    );

    // arm-smmu v2 packing.
    assert_eq!(
        regs::smmu_v2_tcr(&Tcr {
            ips: 5,
            tg: 0,
            sh: 3,
            orgn: 1,
            irgn: 1,
            tsz: 16
        }),
        0x8000_3510
    );
    assert_eq!(
        regs::smmu_v2_vtcr(&Vtcr {
            ps: 2,
            tg: 0,
            sh: 3,
            orgn: 1,
            irgn: 1,
            sl: 1,
            tsz: 24
        }),
        0x8002_3558
    );
}

#[test]
fn geometry_table() {
    // granule, ias, levels, start level, pgd entries, pgd bytes allocated (stage 1).
    let rows: &[(PageSizes, u32, u32, u32, usize, u64)] = &[
        (PageSizes::GRANULE_4K, 32, 3, 1, 4, 64),
        (PageSizes::GRANULE_4K, 36, 3, 1, 64, 512),
        (PageSizes::GRANULE_4K, 39, 3, 1, 512, 4096),
        (PageSizes::GRANULE_4K, 40, 4, 0, 2, 64),
        (PageSizes::GRANULE_4K, 42, 4, 0, 8, 64),
        (PageSizes::GRANULE_4K, 44, 4, 0, 32, 256),
        (PageSizes::GRANULE_4K, 48, 4, 0, 512, 4096),
        (PageSizes::GRANULE_16K, 32, 2, 2, 128, 1024),
        (PageSizes::GRANULE_16K, 36, 2, 2, 2048, 16384),
        (PageSizes::GRANULE_16K, 40, 3, 1, 16, 128),
        (PageSizes::GRANULE_16K, 42, 3, 1, 64, 512),
        (PageSizes::GRANULE_16K, 44, 3, 1, 256, 2048),
        (PageSizes::GRANULE_16K, 48, 4, 0, 2, 64),
        (PageSizes::GRANULE_64K, 32, 2, 2, 8, 64),
        (PageSizes::GRANULE_64K, 36, 2, 2, 128, 1024),
        (PageSizes::GRANULE_64K, 40, 2, 2, 2048, 16384),
        (PageSizes::GRANULE_64K, 42, 2, 2, 8192, 65536),
        (PageSizes::GRANULE_64K, 44, 3, 1, 4, 64),
        (PageSizes::GRANULE_64K, 48, 3, 1, 64, 512),
        (PageSizes::GRANULE_64K, 52, 3, 1, 1024, 8192),
    ];
    for &(sizes, ias, levels, start, entries, bytes) in rows {
        let oas = if ias == 52 { 52 } else { 48 };
        let c = cfg(Format::Arm64S1, sizes, ias, oas, Quirks::empty());
        assert_eq!(
            (c.levels(), c.start_level(), c.pgd_entries(), c.pgd_bytes()),
            (levels, start, entries, bytes),
            "{sizes:?} ias {ias}"
        );
    }
    // Leaf sizes per level.
    let c4 = cfg(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
        Quirks::empty(),
    );
    assert_eq!(
        [c4.block_size(3), c4.block_size(2), c4.block_size(1)],
        [4 << 10, 2 << 20, 1 << 30]
    );
    let c16 = cfg(
        Format::Arm64S1,
        PageSizes::GRANULE_16K,
        48,
        48,
        Quirks::empty(),
    );
    assert_eq!([c16.block_size(3), c16.block_size(2)], [16 << 10, 32 << 20]);
    let with_4t = PageSizes::from_bits((1 << 16) | (1 << 29) | (1 << 42));
    let c64 = cfg(Format::Arm64S1, with_4t, 52, 52, Quirks::empty());
    assert_eq!(
        [c64.block_size(3), c64.block_size(2), c64.block_size(1)],
        [64 << 10, 512 << 20, 1 << 42]
    );
    assert_eq!(
        c64.page_sizes().bits(),
        (1 << 16) | (1 << 29) | (1 << 42),
        "4T only with oas > 48"
    );
    let c64_48 = cfg(Format::Arm64S1, with_4t, 48, 48, Quirks::empty());
    assert_eq!(c64_48.page_sizes(), PageSizes::GRANULE_64K);
    // Worked index decode: IOVA 0x1234_5678_9000 at 4K/48.
    let iova = 0x1234_5678_9000;
    assert_eq!(
        [
            c4.index(iova, 0),
            c4.index(iova, 1),
            c4.index(iova, 2),
            c4.index(iova, 3)
        ],
        [0x24, 0xD1, 0xB3, 0x189]
    );
}

#[test]
fn stage2_concatenation() {
    // (granule, ias, oas) -> (concatenated tables, start level, pgd bytes) or failure.
    let rows: &[(PageSizes, u32, u32, Option<(usize, u32, u64)>)] = &[
        (PageSizes::GRANULE_4K, 40, 40, Some((2, 1, 8192))),
        (PageSizes::GRANULE_4K, 40, 42, Some((2, 1, 8192))),
        (PageSizes::GRANULE_4K, 42, 42, Some((8, 1, 32768))),
        (PageSizes::GRANULE_16K, 40, 40, Some((16, 2, 262_144))),
        (PageSizes::GRANULE_16K, 48, 48, Some((2, 1, 32768))),
        (PageSizes::GRANULE_16K, 48, 40, Some((2, 1, 32768))),
        // Not mandatory: no concatenation.
        (PageSizes::GRANULE_4K, 40, 48, Some((1, 0, 64))),
        (PageSizes::GRANULE_4K, 42, 44, Some((1, 0, 64))),
        (PageSizes::GRANULE_4K, 48, 48, Some((1, 0, 4096))),
        // Mandatory with more than 16 root tables: rejected.
        (PageSizes::GRANULE_4K, 44, 40, None),
        (PageSizes::GRANULE_4K, 48, 40, None),
        (PageSizes::GRANULE_16K, 44, 40, None),
    ];
    for &(sizes, ias, oas, want) in rows {
        let got = Config::new(ConfigInput::new(Format::Arm64S2, sizes, ias, oas));
        match want {
            Some((n, start, bytes)) => {
                let c = got.unwrap_or_else(|e| panic!("{sizes:?} {ias}/{oas}: {e}"));
                assert_eq!(
                    (c.concat_tables(), c.start_level(), c.pgd_bytes()),
                    (n, start, bytes),
                    "{sizes:?} {ias}/{oas}"
                );
            }
            None => assert!(
                matches!(got, Err(ConfigError::ConcatenationTooLarge { .. })),
                "{sizes:?} {ias}/{oas}: {got:?}"
            ),
        }
    }
    // Stage 1 never concatenates.
    let s1 = cfg(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        40,
        40,
        Quirks::empty(),
    );
    assert_eq!((s1.concat_tables(), s1.start_level()), (1, 0));
}

#[test]
fn config_rejections() {
    let base = ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48);
    let reject = |i: ConfigInput| Config::new(i).unwrap_err();
    assert!(matches!(
        reject(base.with_quirks(Quirks::S2FWB)),
        ConfigError::UnsupportedQuirks { .. }
    ));
    assert!(matches!(
        reject(base.with_quirks(Quirks::NO_PERMS)),
        ConfigError::UnsupportedQuirks { .. }
    ));
    assert!(matches!(
        reject(
            ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_4K, 48, 48)
                .with_quirks(Quirks::NS)
        ),
        ConfigError::UnsupportedQuirks { .. }
    ));
    assert!(matches!(
        reject(
            ConfigInput::new(Format::Mali, PageSizes::GRANULE_4K, 48, 40)
                .with_quirks(Quirks::NO_WARN)
        ),
        ConfigError::UnsupportedQuirks { .. }
    ));
    assert!(matches!(
        reject(ConfigInput::new(
            Format::Arm32S1,
            PageSizes::GRANULE_4K,
            36,
            40
        )),
        ConfigError::FormatLimit { .. }
    ));
    assert!(matches!(
        reject(ConfigInput::new(
            Format::Arm32S2,
            PageSizes::GRANULE_4K,
            40,
            42
        )),
        ConfigError::FormatLimit { .. }
    ));
    assert!(matches!(
        reject(ConfigInput::new(
            Format::Mali,
            PageSizes::GRANULE_4K,
            48,
            42
        )),
        ConfigError::FormatLimit { .. }
    ));
    assert!(matches!(
        reject(ConfigInput::new(
            Format::Arm64S1,
            PageSizes::from_bits(0),
            48,
            48
        )),
        ConfigError::NoGranule { .. }
    ));
    assert!(matches!(
        reject(ConfigInput::new(
            Format::Arm64S1,
            PageSizes::from_bits((1 << 21) | (1 << 30)),
            48,
            48
        )),
        ConfigError::NoGranule { .. }
    ));
    assert!(matches!(
        reject(ConfigInput::new(
            Format::Arm64S1,
            PageSizes::GRANULE_4K,
            48,
            33
        )),
        ConfigError::BadOas { oas: 33 }
    ));
    assert!(matches!(
        reject(ConfigInput::new(
            Format::Arm64S1,
            PageSizes::GRANULE_4K,
            12,
            48
        )),
        ConfigError::BadIas { .. }
    ));
    // Silent clamps: 4K limits to 48 bits, 64K to 52.
    let c = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        52,
        52,
    ))
    .unwrap();
    assert_eq!((c.ias(), c.oas()), (48, 48));
    let c = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_64K,
        60,
        56,
    ))
    .unwrap();
    assert_eq!((c.ias(), c.oas()), (52, 52));
    // Mali always walks four levels from level 0; with ias <= 39 the root has one entry.
    let m = Config::new(ConfigInput::new(
        Format::Mali,
        PageSizes::GRANULE_4K,
        32,
        40,
    ))
    .unwrap();
    assert_eq!(
        (m.start_level(), m.pgd_entries(), m.pgd_bytes()),
        (0, 1, 64)
    );
    // Granule choice: host page size first, then the largest below it, then the smallest above.
    let c = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::from_bits((1 << 14) | (1 << 16) | (1 << 25)),
        48,
        48,
    ))
    .unwrap();
    assert_eq!(c.granule(), Granule::K16);
    let c = Config::new(
        ConfigInput::new(
            Format::Arm64S1,
            PageSizes::from_bits((1 << 12) | (1 << 16)),
            48,
            48,
        )
        .with_preferred_granule(Granule::K64),
    )
    .unwrap();
    assert_eq!(c.granule(), Granule::K64);
}
