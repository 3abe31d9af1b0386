//! Descriptor encoding and decoding for the five LPAE formats.
//!
//! Bit positions follow the Arm ARM and Linux's `io-pgtable-arm.c`; every value here is checked
//! against Linux's own descriptors by the golden replay. The functions are `const`-friendly,
//! branch-light and free of memory access so the walker can inline them.

use iopt_api::{Config, Format, Granule, PhysAddr, Prot, Quirks};

/// Descriptor type bits \[1:0\]: block (levels 0-2) or Mali leaf at any level.
pub const TYPE_BLOCK: u64 = 1;
/// Descriptor type bits \[1:0\]: table (levels 0-2) or page (level 3).
pub const TYPE_TABLE: u64 = 3;
/// Mask of the type bits.
pub const TYPE_MASK: u64 = 3;
/// Stage-1 AttrIndx shift (bits 4:2).
pub const ATTRINDX_SHIFT: u32 = 2;
/// NS (bit 5), set with the `ARM_NS` quirk.
pub const NS: u64 = 1 << 5;
/// Stage-1 AP\[1\]: unprivileged access allowed.
pub const AP_UNPRIV: u64 = 1 << 6;
/// Stage-1 AP\[2\]: read-only.
pub const AP_RDONLY: u64 = 1 << 7;
/// Stage-2 / Mali S2AP read (bit 6).
pub const HAP_READ: u64 = 1 << 6;
/// Stage-2 / Mali S2AP write (bit 7).
pub const HAP_WRITE: u64 = 1 << 7;
/// SH = outer shareable (bits 9:8 = 2).
pub const SH_OS: u64 = 2 << 8;
/// SH = inner shareable (bits 9:8 = 3).
pub const SH_IS: u64 = 3 << 8;
/// Access flag (bit 10).
pub const AF: u64 = 1 << 10;
/// Not-global (bit 11, stage 1).
pub const NG: u64 = 1 << 11;
/// Dirty bit modifier (bit 51, `ARM_HD`).
pub const DBM: u64 = 1 << 51;
/// Contiguous hint (bit 52, never set by this engine).
pub const CONT: u64 = 1 << 52;
/// XN: UXN|PXN on stage 1, XN\[1:0\] on stage 2 (bits 54:53).
pub const XN: u64 = 3 << 53;
/// Software bit 55: a table descriptor whose cache line was already cleaned.
pub const SW_SYNC: u64 = 1 << 55;
/// NSTABLE (bit 63) in table descriptors with `ARM_NS`.
pub const NSTABLE: u64 = 1 << 63;
/// Output address bits \[47:12\].
pub const ADDR_MASK: u64 = ((1 << 48) - 1) & !((1 << 12) - 1);
/// Stage-2 MemAttr: Device-nGnRE.
pub const MEMATTR_DEV: u64 = 0x1 << 2;
/// Stage-2 MemAttr: normal non-cacheable.
pub const MEMATTR_NC: u64 = 0x5 << 2;
/// Stage-2 MemAttr: outer and inner write-back.
pub const MEMATTR_OIWB: u64 = 0xf << 2;
/// Stage-2 MemAttr with FWB: forced write-back.
pub const MEMATTR_FWB_WB: u64 = 0x6 << 2;
/// Mask of the stage-2 MemAttr field.
pub const MEMATTR_MASK: u64 = 0xf << 2;
/// MAIR index of normal non-cacheable memory.
pub const MAIR_IDX_NC: u64 = 0;
/// MAIR index of write-back cacheable memory.
pub const MAIR_IDX_CACHE: u64 = 1;
/// MAIR index of device memory.
pub const MAIR_IDX_DEV: u64 = 2;

/// Packs a physical address into the output-address field (PA\[51:48\] into bits \[15:12\]).
///
/// ```
/// use iopt_lpae::desc::{pack_pa, unpack_pa};
/// use iopt_api::{Granule, PhysAddr};
/// let pa = PhysAddr::new(0xF_1234_5678_0000);
/// assert_eq!(pack_pa(pa), 0x1234_5678_F000);
/// assert_eq!(unpack_pa(0x1234_5678_F000, Granule::K64), pa);
/// ```
#[must_use]
#[inline]
pub const fn pack_pa(pa: PhysAddr) -> u64 {
    let p = pa.get();
    (p | (p >> 36)) & ADDR_MASK
}

/// Extracts the output address of a descriptor (`iopte_to_paddr`).
#[must_use]
#[inline]
pub const fn unpack_pa(desc: u64, granule: Granule) -> PhysAddr {
    let p = desc & ADDR_MASK;
    match granule {
        Granule::K64 => PhysAddr::new((p | (p << 36)) & (ADDR_MASK << 4)),
        _ => PhysAddr::new(p),
    }
}

/// The attribute and permission bits of a leaf for `prot` (`arm_lpae_prot_to_pte`), without
/// the type bits or the address.
#[must_use]
pub fn prot_bits(cfg: &Config, prot: Prot) -> u64 {
    let format = cfg.format();
    let quirks = cfg.quirks();
    let mut pte = if format.is_stage1() {
        let mut p = NG;
        if prot.contains(Prot::READ) && !prot.contains(Prot::WRITE) {
            p |= AP_RDONLY;
        } else if quirks.contains(Quirks::HD) {
            p |= DBM;
        }
        if !prot.contains(Prot::PRIV) {
            p |= AP_UNPRIV;
        }
        p
    } else {
        let mut p = 0;
        if prot.contains(Prot::READ) {
            p |= HAP_READ;
        }
        if prot.contains(Prot::WRITE) {
            p |= HAP_WRITE;
        }
        p
    };
    if format.is_stage2() {
        pte |= if prot.contains(Prot::MMIO) {
            MEMATTR_DEV
        } else if prot.contains(Prot::CACHE) {
            if quirks.contains(Quirks::S2FWB) {
                MEMATTR_FWB_WB
            } else {
                MEMATTR_OIWB
            }
        } else {
            MEMATTR_NC
        };
    } else if prot.contains(Prot::MMIO) {
        pte |= MAIR_IDX_DEV << ATTRINDX_SHIFT;
    } else if prot.contains(Prot::CACHE) {
        pte |= MAIR_IDX_CACHE << ATTRINDX_SHIFT;
    }
    pte |= if prot.contains(Prot::CACHE) && format != Format::Mali {
        SH_IS
    } else {
        SH_OS
    };
    if prot.contains(Prot::NOEXEC) {
        pte |= XN;
    }
    if quirks.contains(Quirks::NS) {
        pte |= NS;
    }
    if format != Format::Mali {
        pte |= AF;
    }
    pte
}

/// The type bits of a leaf at `level`: page (3) at level 3, block (1) above; Mali always 1.
#[must_use]
#[inline]
pub fn leaf_type(format: Format, level: u32) -> u64 {
    if level == 3 && format != Format::Mali {
        TYPE_TABLE
    } else {
        TYPE_BLOCK
    }
}

/// Encodes a complete leaf descriptor.
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, PageSizes, PhysAddr, Prot};
/// use iopt_lpae::desc::encode_leaf;
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
/// let d = encode_leaf(&cfg, 3, PhysAddr::new(0x8_0000_0000), Prot::READ | Prot::WRITE | Prot::CACHE);
/// assert_eq!(d, 0x0000_0008_0000_0F47);
/// # Ok::<(), iopt_api::ConfigError>(())
/// ```
#[must_use]
pub fn encode_leaf(cfg: &Config, level: u32, pa: PhysAddr, prot: Prot) -> u64 {
    prot_bits(cfg, prot) | leaf_type(cfg.format(), level) | pack_pa(pa)
}

/// Encodes a table descriptor pointing at `table` (NSTABLE with `ARM_NS`).
#[must_use]
#[inline]
pub fn encode_table(cfg: &Config, table: PhysAddr) -> u64 {
    let ns = if cfg.quirks().contains(Quirks::NS) {
        NSTABLE
    } else {
        0
    };
    pack_pa(table) | TYPE_TABLE | ns
}

/// What a descriptor is, at a level, for a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Zero or otherwise invalid (bit 0 clear, or a table type at level 3 for Mali).
    Invalid,
    /// A pointer to the next level's table.
    Table,
    /// A leaf (page or block).
    Leaf,
}

/// Classifies `desc` at `level` (`iopte_leaf` / `iopte_table`).
#[must_use]
#[inline]
pub fn kind(format: Format, level: u32, desc: u64) -> Kind {
    let t = desc & TYPE_MASK;
    if level == 3 {
        let leaf = if format == Format::Mali {
            TYPE_BLOCK
        } else {
            TYPE_TABLE
        };
        if t == leaf { Kind::Leaf } else { Kind::Invalid }
    } else {
        match t {
            TYPE_TABLE => Kind::Table,
            TYPE_BLOCK => Kind::Leaf,
            _ => Kind::Invalid,
        }
    }
}

/// Decodes the prot a leaf grants, in the terms [`Config::effective_prot`] uses.
///
/// A stage-1 leaf with DBM counts as writable even while cleaned (AP\[2\] set), since the
/// hardware will make it writable on the next write.
#[must_use]
pub fn decode_prot(cfg: &Config, desc: u64) -> Prot {
    let format = cfg.format();
    let mut p = Prot::empty();
    if format.is_stage1() {
        p |= Prot::READ;
        if desc & AP_RDONLY == 0 || desc & DBM != 0 {
            p |= Prot::WRITE;
        }
        if desc & AP_UNPRIV == 0 {
            p |= Prot::PRIV;
        }
    } else {
        if desc & HAP_READ != 0 {
            p |= Prot::READ;
        }
        if desc & HAP_WRITE != 0 {
            p |= Prot::WRITE;
        }
    }
    if format.is_stage2() {
        match desc & MEMATTR_MASK {
            MEMATTR_DEV => p |= Prot::MMIO,
            MEMATTR_OIWB | MEMATTR_FWB_WB => p |= Prot::CACHE,
            _ => {}
        }
    } else {
        match (desc >> ATTRINDX_SHIFT) & 7 {
            MAIR_IDX_DEV => p |= Prot::MMIO,
            MAIR_IDX_CACHE => p |= Prot::CACHE,
            _ => {}
        }
    }
    if desc & XN != 0 {
        p |= Prot::NOEXEC;
    }
    p
}
