//! Table configuration: inputs as a driver gives them, validated and derived exactly as Linux's
//! `alloc_io_pgtable_ops` does for the five LPAE formats.
//!
//! Linux treats `struct io_pgtable_cfg` as in/out: the format restricts the page-size bitmap,
//! clamps IAS/OAS, and derives the walk geometry. [`Config::new`] does the same from a
//! [`ConfigInput`] and returns a [`Config`] that cannot be inconsistent: every table built from
//! it agrees with Linux on granule, levels, start level, root size and concatenation. Where Linux
//! returns NULL, this returns a [`ConfigError`] that says why.

use crate::{Iova, PageSize, PageSizes, PhysAddr, Prot};
use core::fmt;

/// The LPAE descriptor format, as Linux's `enum io_pgtable_fmt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// `ARM_32_LPAE_S1`: AArch32 long-descriptor stage 1 (IAS ≤ 32, OAS ≤ 40, 4K granule).
    Arm32S1,
    /// `ARM_32_LPAE_S2`: AArch32 long-descriptor stage 2 (IAS, OAS ≤ 40, 4K granule).
    Arm32S2,
    /// `ARM_64_LPAE_S1`: AArch64 stage 1 (SMMUv3 CD, arm-smmu v2 S1, panthor).
    Arm64S1,
    /// `ARM_64_LPAE_S2`: AArch64 stage 2 (SMMU STE / VTCR).
    Arm64S2,
    /// `ARM_MALI_LPAE`: the Mali (Midgard/Bifrost) GPU MMU format used by panfrost.
    Mali,
}

impl Format {
    /// All formats, in Linux enum order.
    pub const ALL: [Format; 5] = [
        Format::Arm32S1,
        Format::Arm32S2,
        Format::Arm64S1,
        Format::Arm64S2,
        Format::Mali,
    ];

    /// Returns whether descriptors use stage-1 AP/AttrIndx encoding.
    #[must_use]
    pub const fn is_stage1(self) -> bool {
        matches!(self, Format::Arm32S1 | Format::Arm64S1)
    }

    /// Returns whether descriptors use stage-2 S2AP/MemAttr encoding.
    #[must_use]
    pub const fn is_stage2(self) -> bool {
        matches!(self, Format::Arm32S2 | Format::Arm64S2)
    }

    /// Returns Linux's name for the format.
    #[must_use]
    pub const fn linux_name(self) -> &'static str {
        match self {
            Format::Arm32S1 => "ARM_32_LPAE_S1",
            Format::Arm32S2 => "ARM_32_LPAE_S2",
            Format::Arm64S1 => "ARM_64_LPAE_S1",
            Format::Arm64S2 => "ARM_64_LPAE_S2",
            Format::Mali => "ARM_MALI_LPAE",
        }
    }

    /// Parses Linux's name for the format.
    #[must_use]
    pub fn from_linux_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.linux_name() == name)
    }

    /// The quirks the format accepts; any other bit makes [`Config::new`] fail.
    #[must_use]
    pub const fn accepted_quirks(self) -> Quirks {
        match self {
            Format::Arm32S1 | Format::Arm64S1 => Quirks::NS
                .union(Quirks::TTBR1)
                .union(Quirks::OUTER_WBWA)
                .union(Quirks::HD)
                .union(Quirks::NO_WARN),
            Format::Arm32S2 | Format::Arm64S2 => Quirks::S2FWB.union(Quirks::NO_WARN),
            Format::Mali => Quirks::empty(),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.linux_name())
    }
}

/// The translation granule: the size of one table and of the smallest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granule {
    /// 4 KiB: 512 entries a table, 9 bits a level.
    K4,
    /// 16 KiB: 2048 entries a table, 11 bits a level.
    K16,
    /// 64 KiB: 8192 entries a table, 13 bits a level.
    K64,
}

impl Granule {
    /// Returns the granule size in bytes.
    #[must_use]
    pub const fn size(self) -> u64 {
        1 << self.shift()
    }

    /// Returns log2 of the granule size (`pg_shift`).
    #[must_use]
    pub const fn shift(self) -> u32 {
        match self {
            Granule::K4 => 12,
            Granule::K16 => 14,
            Granule::K64 => 16,
        }
    }

    /// Returns the index bits a level resolves (`bits_per_level`).
    #[must_use]
    pub const fn bits_per_level(self) -> u32 {
        self.shift() - 3
    }

    /// Returns the number of 8-byte entries in one granule-sized table.
    #[must_use]
    pub const fn entries(self) -> usize {
        1 << self.bits_per_level()
    }

    /// Returns the granule whose size is `bytes`.
    #[must_use]
    pub const fn from_size(bytes: u64) -> Option<Self> {
        match bytes {
            0x1000 => Some(Granule::K4),
            0x4000 => Some(Granule::K16),
            0x10000 => Some(Granule::K64),
            _ => None,
        }
    }

    /// The page and block sizes the granule allows, before the format's own restriction.
    #[must_use]
    pub const fn allowed_sizes(self, oas_in: u32) -> PageSizes {
        match self {
            Granule::K4 => PageSizes::GRANULE_4K,
            Granule::K16 => PageSizes::GRANULE_16K,
            Granule::K64 => {
                if oas_in > 48 {
                    PageSizes::from_bits(PageSizes::GRANULE_64K.bits() | (1 << 42))
                } else {
                    PageSizes::GRANULE_64K
                }
            }
        }
    }

    /// The widest input or output address this granule supports (48, or 52 with 64 KiB).
    #[must_use]
    pub const fn max_addr_bits(self) -> u32 {
        match self {
            Granule::K64 => 52,
            _ => 48,
        }
    }
}

bitflags::bitflags! {
    /// Linux `IO_PGTABLE_QUIRK_*` bits. Unknown bits are kept so that a configuration with
    /// them is rejected, as Linux rejects it, rather than silently accepted.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Quirks: u64 {
        /// `ARM_NS`: NS in every leaf, NSTABLE in every table descriptor (stage 1).
        const NS = 1 << 0;
        /// `NO_PERMS` (v7s only; rejected by every LPAE format).
        const NO_PERMS = 1 << 1;
        /// `ARM_MTK_EXT` (rejected by every LPAE format).
        const MTK_EXT = 1 << 3;
        /// `ARM_MTK_TTBR_EXT` (rejected by every LPAE format).
        const MTK_TTBR_EXT = 1 << 4;
        /// `ARM_TTBR1`: a table for the upper half of a split address space (stage 1).
        const TTBR1 = 1 << 5;
        /// `ARM_OUTER_WBWA`: outer write-back walks; only with a non-coherent walker (stage 1).
        const OUTER_WBWA = 1 << 6;
        /// `ARM_HD`: hardware dirty tracking, DBM in writable leaves (stage 1).
        const HD = 1 << 7;
        /// `ARM_S2FWB`: stage-2 forced write-back MemAttr encoding.
        const S2FWB = 1 << 8;
        /// `NO_WARN`: silence warnings on overmap and unmap of holes; changes no result.
        const NO_WARN = 1 << 9;
        const _ = !0;
    }
}

/// What a driver asks for: the inputs of Linux's `struct io_pgtable_cfg`.
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, PageSizes};
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
/// assert_eq!((cfg.levels(), cfg.start_level(), cfg.pgd_entries()), (4, 0, 512));
/// # Ok::<(), iopt_api::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConfigInput {
    /// Descriptor format.
    pub format: Format,
    /// Requested page sizes; restricted by the granule and format.
    pub pgsize_bitmap: PageSizes,
    /// Requested input address size in bits; clamped to the granule's maximum.
    pub ias: u32,
    /// Requested output address size in bits; clamped to the granule's maximum.
    pub oas: u32,
    /// Quirks.
    pub quirks: Quirks,
    /// Whether the walker snoops CPU caches.
    pub coherent_walk: bool,
    /// The preferred granule (Linux: the CPU `PAGE_SIZE`), used when the bitmap offers several.
    pub preferred_granule: Granule,
}

impl ConfigInput {
    /// Inputs with no quirks, a coherent walker and a 4 KiB preferred granule.
    #[must_use]
    pub const fn new(format: Format, pgsize_bitmap: PageSizes, ias: u32, oas: u32) -> Self {
        Self {
            format,
            pgsize_bitmap,
            ias,
            oas,
            quirks: Quirks::empty(),
            coherent_walk: true,
            preferred_granule: Granule::K4,
        }
    }

    /// Returns the inputs with `quirks` set.
    #[must_use]
    pub const fn with_quirks(mut self, quirks: Quirks) -> Self {
        self.quirks = quirks;
        self
    }

    /// Returns the inputs with `coherent_walk` set.
    #[must_use]
    pub const fn with_coherent_walk(mut self, coherent: bool) -> Self {
        self.coherent_walk = coherent;
        self
    }

    /// Returns the inputs with another preferred granule.
    #[must_use]
    pub const fn with_preferred_granule(mut self, granule: Granule) -> Self {
        self.preferred_granule = granule;
        self
    }
}

/// Why a configuration was rejected (where Linux's `alloc_io_pgtable_ops` returns NULL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A quirk the format does not accept.
    #[error("{format} does not accept quirks {rejected:#x}")]
    UnsupportedQuirks {
        /// The format.
        format: Format,
        /// The rejected quirk bits.
        rejected: u64,
    },
    /// `OUTER_WBWA` with a coherent walker.
    #[error("OUTER_WBWA requires a non-coherent walker")]
    OuterWbwaCoherent {
        /// The quirks requested.
        quirks: u64,
    },
    /// The format's own IAS/OAS limits (32-bit formats, Mali).
    #[error("{format} allows no ias {ias} / oas {oas}")]
    FormatLimit {
        /// The format.
        format: Format,
        /// Requested IAS.
        ias: u32,
        /// Requested OAS.
        oas: u32,
    },
    /// No 4K/16K/64K granule is left after restricting the bitmap.
    #[error("no usable granule in page sizes {requested:#x} (restricted to {restricted:#x})")]
    NoGranule {
        /// The requested bitmap.
        requested: u64,
        /// What remained after restriction.
        restricted: u64,
    },
    /// IAS above 52 bits or too small to need a single level.
    #[error("input address size {ias} is unusable with a {granule:?} granule")]
    BadIas {
        /// IAS after clamping.
        ias: u32,
        /// The granule.
        granule: Granule,
    },
    /// OAS above 52 or not one of 32, 36, 40, 42, 44, 48, 52 (stage 1 and 2); for Mali, no
    /// wider than a page (12 bits or fewer; Linux accepts these, but they map nothing).
    #[error("output address size {oas} has no IPS/PS encoding")]
    BadOas {
        /// OAS after clamping.
        oas: u32,
    },
    /// A mandatory stage-2 concatenation would need more than 16 root granules.
    #[error("stage-2 concatenation would need {tables} root tables (max 16)")]
    ConcatenationTooLarge {
        /// Granule tables the concatenated root would need.
        tables: usize,
    },
}

/// A validated configuration and its derived geometry.
///
/// Built only by [`Config::new`]; every accessor is cheap and total. Level numbers are ARM's:
/// 0 is the top, 3 the last.
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, PageSizes};
/// // Stage 2, 4K, ias = oas = 40: two concatenated level-1 tables.
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_4K, 40, 40))?;
/// assert_eq!(cfg.start_level(), 1);
/// assert_eq!(cfg.concat_tables(), 2);
/// assert_eq!(cfg.pgd_bytes(), 8192);
/// # Ok::<(), iopt_api::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Config {
    input: ConfigInput,
    pgsize_bitmap: PageSizes,
    ias: u32,
    oas: u32,
    granule: Granule,
    start_level: u32,
    pgd_bits: u32,
    concat_tables: usize,
    /// The level a leaf of size `1 << shift` sits at, or `NO_LEVEL` (computed once; map and
    /// unmap look it up on every call).
    leaf_levels: [u8; 64],
}

const NO_LEVEL: u8 = u8::MAX;

/// For each size shift, the level whose block that size is, among the allowed sizes.
fn leaf_levels(sizes: u64, start_level: u32, bpl: u32) -> [u8; 64] {
    let mut out = [NO_LEVEL; 64];
    for level in start_level..4 {
        let shift = (4 - level) * bpl + 3;
        if shift < 64 && sizes & (1 << shift) != 0 {
            out[shift as usize] = level as u8;
        }
    }
    out
}

/// Whether a (clamped) output size is one `format` can use: one with an IPS/PS encoding, or
/// for Mali, which has no such field (Linux takes any OAS up to 40), one wider than a page, as
/// a narrower one maps nothing but the first page.
const fn oas_usable(format: Format, oas: u32, pg_shift: u32) -> bool {
    match format {
        Format::Mali => oas > pg_shift,
        _ => ips_encoding(oas).is_some(),
    }
}

impl Config {
    /// Validates `input` and derives the geometry the way Linux does for `input.format`.
    ///
    /// # Errors
    ///
    /// Returns the [`ConfigError`] variant naming the first rule that fails, in Linux's order:
    /// quirks, format limits, granule, address sizes, OAS encoding, concatenation.
    pub fn new(input: ConfigInput) -> Result<Self, ConfigError> {
        let format = input.format;
        let rejected = input.quirks.bits() & !format.accepted_quirks().bits();
        if rejected != 0 {
            return Err(ConfigError::UnsupportedQuirks { format, rejected });
        }
        if input.quirks.contains(Quirks::OUTER_WBWA) && input.coherent_walk {
            return Err(ConfigError::OuterWbwaCoherent {
                quirks: input.quirks.bits(),
            });
        }
        let mut bitmap = input.pgsize_bitmap.bits();
        let limit = match format {
            Format::Arm32S1 => Some((32, 40)),
            Format::Arm32S2 => Some((40, 40)),
            Format::Mali => Some((48, 40)),
            Format::Arm64S1 | Format::Arm64S2 => None,
        };
        if let Some((max_ias, max_oas)) = limit {
            if input.ias > max_ias || input.oas > max_oas {
                return Err(ConfigError::FormatLimit {
                    format,
                    ias: input.ias,
                    oas: input.oas,
                });
            }
            bitmap &= PageSizes::GRANULE_4K.bits();
        }

        // arm_lpae_restrict_pgsizes: granule choice, then the granule's sizes, then clamps.
        let page = input.preferred_granule.size();
        let granule_bytes = if bitmap & page != 0 {
            page
        } else if bitmap & (page - 1) != 0 {
            1 << (bitmap & (page - 1)).ilog2()
        } else if bitmap & !(page - 1) != 0 {
            1 << (bitmap & !(page - 1)).trailing_zeros()
        } else {
            0
        };
        let granule = Granule::from_size(granule_bytes);
        let allowed = granule.map_or(0, |g| g.allowed_sizes(input.oas).bits());
        let restricted = bitmap & allowed;
        let Some(granule) = granule.filter(|_| restricted != 0) else {
            return Err(ConfigError::NoGranule {
                requested: input.pgsize_bitmap.bits(),
                restricted,
            });
        };
        let max = granule.max_addr_bits();
        let ias = input.ias.min(max);
        let oas = input.oas.min(max);
        let pg_shift = granule.shift();
        let bpl = granule.bits_per_level();
        if ias <= pg_shift {
            return Err(ConfigError::BadIas { ias, granule });
        }
        let va_bits = ias - pg_shift;
        let levels = va_bits.div_ceil(bpl);
        let mut start_level = 4 - levels;
        let mut pgd_bits = va_bits - bpl * (levels - 1);
        let mut concat_tables = 1;

        if !oas_usable(format, oas, pg_shift) {
            return Err(ConfigError::BadOas { oas });
        }
        match format {
            Format::Mali => {
                if start_level > 0 {
                    start_level = 0;
                    pgd_bits = 0;
                }
            }
            Format::Arm32S2 | Format::Arm64S2 => {
                let mandatory = match (granule, start_level) {
                    (Granule::K16, 0) => oas == 48 || ias == 48,
                    (Granule::K4, 0) => oas == 40 || oas == 42,
                    (Granule::K16, 1) => oas == 40,
                    _ => false,
                };
                if mandatory {
                    let tables = 1usize << pgd_bits;
                    if tables > 16 {
                        return Err(ConfigError::ConcatenationTooLarge { tables });
                    }
                    concat_tables = tables;
                    pgd_bits += bpl;
                    start_level += 1;
                }
            }
            Format::Arm32S1 | Format::Arm64S1 => {}
        }
        Ok(Self {
            input,
            pgsize_bitmap: PageSizes::from_bits(restricted),
            ias,
            oas,
            granule,
            start_level,
            pgd_bits,
            concat_tables,
            leaf_levels: leaf_levels(restricted, start_level, bpl),
        })
    }

    /// Returns the inputs this configuration was built from.
    #[must_use]
    pub const fn input(&self) -> &ConfigInput {
        &self.input
    }

    /// Returns the descriptor format.
    #[must_use]
    pub const fn format(&self) -> Format {
        self.input.format
    }

    /// Returns the quirks.
    #[must_use]
    pub const fn quirks(&self) -> Quirks {
        self.input.quirks
    }

    /// Returns whether the walker is coherent.
    #[must_use]
    pub const fn coherent_walk(&self) -> bool {
        self.input.coherent_walk
    }

    /// Returns the restricted page sizes.
    #[must_use]
    pub const fn page_sizes(&self) -> PageSizes {
        self.pgsize_bitmap
    }

    /// Returns the clamped input address size in bits.
    #[must_use]
    pub const fn ias(&self) -> u32 {
        self.ias
    }

    /// Returns the clamped output address size in bits.
    #[must_use]
    pub const fn oas(&self) -> u32 {
        self.oas
    }

    /// Returns the granule.
    #[must_use]
    pub const fn granule(&self) -> Granule {
        self.granule
    }

    /// Returns the number of levels walked (Mali: always 4).
    #[must_use]
    pub const fn levels(&self) -> u32 {
        4 - self.start_level
    }

    /// Returns the level of the root table (after concatenation and Mali's forcing).
    #[must_use]
    pub const fn start_level(&self) -> u32 {
        self.start_level
    }

    /// Returns log2 of the root's entry count.
    #[must_use]
    pub const fn pgd_bits(&self) -> u32 {
        self.pgd_bits
    }

    /// Returns the root's entry count.
    #[must_use]
    pub const fn pgd_entries(&self) -> usize {
        1 << self.pgd_bits
    }

    /// Returns the bytes allocated for the root: `max(8 << pgd_bits, 64)`.
    #[must_use]
    pub const fn pgd_bytes(&self) -> u64 {
        let b = 8u64 << self.pgd_bits;
        if b < 64 { 64 } else { b }
    }

    /// Returns how many granule tables a stage-2 root concatenates (1 when it does not).
    #[must_use]
    pub const fn concat_tables(&self) -> usize {
        self.concat_tables
    }

    /// Returns the IOVA shift of `level`: `(4 - level) * bpl + 3` for the levels 0..=3, and
    /// 64 (a shift past every address bit) for any other level.
    #[must_use]
    pub const fn level_shift(&self, level: u32) -> u32 {
        if level > 3 {
            return 64;
        }
        (4 - level) * self.granule.bits_per_level() + 3
    }

    /// Returns the size a leaf at `level` maps, or 0 for a level outside 0..=3.
    #[must_use]
    pub const fn block_size(&self, level: u32) -> u64 {
        // Every granule's level 0 shift is below 64 (55 at most, with 64 KiB).
        match 1u64.checked_shl(self.level_shift(level)) {
            Some(size) => size,
            None => 0,
        }
    }

    /// Returns the index of `iova` in a table at `level` (high bits beyond IAS drop out), or
    /// 0 for a level outside 0..=3.
    #[must_use]
    pub const fn index(&self, iova: u64, level: u32) -> usize {
        let bits = if level == self.start_level {
            self.pgd_bits
        } else {
            self.granule.bits_per_level()
        };
        let Some(above) = iova.checked_shr(self.level_shift(level)) else {
            return 0;
        };
        (above & ((1u64 << bits) - 1)) as usize
    }

    /// Returns the entry count of a table at `level`.
    #[must_use]
    pub const fn entries_at(&self, level: u32) -> usize {
        if level == self.start_level {
            self.pgd_entries()
        } else {
            self.granule.entries()
        }
    }

    /// Returns the level at which a leaf of `size` sits, if `size` is an allowed page size.
    #[must_use]
    #[inline]
    pub fn leaf_level(&self, size: PageSize) -> Option<u32> {
        match self.leaf_levels[size.shift() as usize & 63] {
            NO_LEVEL => None,
            l => Some(u32::from(l)),
        }
    }

    /// Returns whether IOVAs have every bit above IAS set (the TTBR1 upper half).
    #[must_use]
    pub const fn is_ttbr1(&self) -> bool {
        self.input.quirks.contains(Quirks::TTBR1)
    }

    /// Returns whether `iova` lies in the table's input range (inverted for TTBR1), exactly
    /// Linux's start check.
    #[must_use]
    pub const fn iova_in_range(&self, iova: Iova) -> bool {
        let hi = iova.get() >> self.ias;
        if self.is_ttbr1() {
            hi == u64::MAX >> self.ias
        } else {
            hi == 0
        }
    }

    /// Returns the lowest and highest IOVA the table translates.
    #[must_use]
    pub const fn iova_bounds(&self) -> (Iova, Iova) {
        let span = (1u64 << self.ias) - 1;
        if self.is_ttbr1() {
            (Iova::new(!span), Iova::new(u64::MAX))
        } else {
            (Iova::new(0), Iova::new(span))
        }
    }

    /// Returns whether `pa` fits the output address size.
    #[must_use]
    pub const fn pa_in_range(&self, pa: PhysAddr) -> bool {
        pa.get() >> self.oas == 0
    }

    /// Returns the prot a lookup reports for a mapping made with `prot`: what the descriptor
    /// can express (stage 1 cannot deny reads; MMIO wins over CACHE; Mali and stage 2 have no
    /// PRIV). Backends and models compare translations through this.
    #[must_use]
    pub fn effective_prot(&self, prot: Prot) -> Prot {
        let mut p = prot & (Prot::READ | Prot::WRITE | Prot::NOEXEC);
        if prot.contains(Prot::MMIO) {
            p |= Prot::MMIO;
        } else if prot.contains(Prot::CACHE) {
            p |= Prot::CACHE;
        }
        if self.format().is_stage1() {
            p |= Prot::READ;
            if prot.contains(Prot::PRIV) {
                p |= Prot::PRIV;
            }
        }
        p
    }
}

/// Returns the TCR.IPS / VTCR.PS encoding of an address size, if it has one.
#[must_use]
pub const fn ips_encoding(bits: u32) -> Option<u8> {
    match bits {
        32 => Some(0),
        36 => Some(1),
        40 => Some(2),
        42 => Some(3),
        44 => Some(4),
        48 => Some(5),
        52 => Some(6),
        _ => None,
    }
}
