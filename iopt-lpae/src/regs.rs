//! Register outputs: what a driver programs to point its SMMU or GPU MMU at a table.
//!
//! Field values, as Linux hands them out since its 2019 rework: stage-1 `tcr` and `mair`,
//! stage-2 `vtcr`, Mali `transtab` and `memattr`. Packing into a particular register layout
//! is the driver's job; [`smmu_v2_tcr`] and [`smmu_v2_vtcr`] show the arm-smmu v2 packing.

use iopt_api::{Config, Format, Granule, PhysAddr, Quirks, Registers, Tcr, Vtcr, ips_encoding};

/// MAIR: index 0 normal NC (0x44), 1 write-back (0xFF), 2 device nGnRE (0x04), 3 0xF4.
///
/// Linux's constant sign-extends to 0xFFFFFFFF_F404FF44; indices 4-7 are never selected, so
/// the zero-extended value programs identical behaviour.
pub const MAIR: u64 = 0xF404_FF44;
/// Mali AS_MEMATTR: 0x88 (NC, implementation-defined), 0x8D (write-allocate), 0x88 (device).
pub const MALI_MEMATTR: u64 = 0x0088_8D88;
/// Mali TRANSTAB: ADRMODE_TABLE.
pub const MALI_TRANSTAB_ADRMODE_TABLE: u64 = 3;
/// Mali TRANSTAB: READ_INNER.
pub const MALI_TRANSTAB_READ_INNER: u64 = 1 << 2;
/// Mali TRANSTAB: SHARE_OUTER (coherent walker).
pub const MALI_TRANSTAB_SHARE_OUTER: u64 = 1 << 4;

const fn tg0(g: Granule) -> u8 {
    match g {
        Granule::K4 => 0,
        Granule::K64 => 1,
        Granule::K16 => 2,
    }
}

const fn tg1(g: Granule) -> u8 {
    match g {
        Granule::K16 => 1,
        Granule::K4 => 2,
        Granule::K64 => 3,
    }
}

/// (sh, irgn, orgn) of table walks.
fn walk_attrs(cfg: &Config, allow_outer_wbwa: bool) -> (u8, u8, u8) {
    if cfg.coherent_walk() {
        (3, 1, 1)
    } else {
        let orgn = u8::from(allow_outer_wbwa && cfg.quirks().contains(Quirks::OUTER_WBWA));
        (2, 0, orgn)
    }
}

/// Computes the register values for a table with `root` built from `cfg`.
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, PageSizes, PhysAddr, Registers, Tcr};
/// use iopt_lpae::regs::registers;
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
/// let Registers::Stage1 { tcr, mair, .. } = registers(&cfg, PhysAddr::new(0x4000_0000)) else {
///     unreachable!()
/// };
/// assert_eq!(tcr, Tcr { ips: 5, tg: 0, sh: 3, orgn: 1, irgn: 1, tsz: 16 });
/// assert_eq!(mair, 0xF404_FF44);
/// # Ok::<(), iopt_api::ConfigError>(())
/// ```
#[must_use]
pub fn registers(cfg: &Config, root: PhysAddr) -> Registers {
    let tsz = (64 - cfg.ias()) as u8;
    let ips = ips_encoding(cfg.oas()).unwrap_or(0);
    match cfg.format() {
        Format::Arm32S1 | Format::Arm64S1 => {
            let (sh, irgn, orgn) = walk_attrs(cfg, true);
            let tg = if cfg.is_ttbr1() {
                tg1(cfg.granule())
            } else {
                tg0(cfg.granule())
            };
            Registers::Stage1 {
                ttbr: root,
                tcr: Tcr {
                    ips,
                    tg,
                    sh,
                    orgn,
                    irgn,
                    tsz,
                },
                mair: MAIR,
            }
        }
        Format::Arm32S2 | Format::Arm64S2 => {
            let (sh, irgn, orgn) = walk_attrs(cfg, false);
            let s = if cfg.granule() == Granule::K4 {
                cfg.start_level() + 1
            } else {
                cfg.start_level()
            };
            let sl = (!s & 3) as u8;
            Registers::Stage2 {
                vttbr: root,
                vtcr: Vtcr {
                    ps: ips,
                    tg: tg0(cfg.granule()),
                    sh,
                    orgn,
                    irgn,
                    sl,
                    tsz,
                },
            }
        }
        _ => {
            let mut transtab = root.get() | MALI_TRANSTAB_ADRMODE_TABLE | MALI_TRANSTAB_READ_INNER;
            if cfg.coherent_walk() {
                transtab |= MALI_TRANSTAB_SHARE_OUTER;
            }
            Registers::Mali {
                transtab,
                memattr: MALI_MEMATTR,
            }
        }
    }
}

/// Packs stage-1 fields into an arm-smmu v2 `TCR` (T0SZ, IRGN0, ORGN0, SH0, TG0, EAE).
///
/// For a TTBR1 table the driver shifts these into the TTBR1 fields itself.
#[must_use]
pub fn smmu_v2_tcr(tcr: &Tcr) -> u32 {
    u32::from(tcr.tsz & 0x3f)
        | (u32::from(tcr.irgn & 3) << 8)
        | (u32::from(tcr.orgn & 3) << 10)
        | (u32::from(tcr.sh & 3) << 12)
        | (u32::from(tcr.tg & 3) << 14)
        | (1 << 31)
}

/// Packs stage-2 fields into an arm-smmu v2 `VTCR` (T0SZ, SL0, IRGN0, ORGN0, SH0, TG0, PS,
/// RES1 bit 31).
#[must_use]
pub fn smmu_v2_vtcr(vtcr: &Vtcr) -> u32 {
    u32::from(vtcr.tsz & 0x3f)
        | (u32::from(vtcr.sl & 3) << 6)
        | (u32::from(vtcr.irgn & 3) << 8)
        | (u32::from(vtcr.orgn & 3) << 10)
        | (u32::from(vtcr.sh & 3) << 12)
        | (u32::from(vtcr.tg & 3) << 14)
        | (u32::from(vtcr.ps & 7) << 16)
        | (1 << 31)
}
