//! The descriptor checker: leaf and table descriptors for every level of a configuration
//! round-trip through the engine's encoder and decoder and equal an encoding re-derived here
//! from `docs/lpae-format.md` §4; decoding any 64-bit value at any level and format never panics and
//! agrees with the re-derived classification and decoding; and the hardware-walk oracle, run
//! from a configuration's registers (or from arbitrary register fields) over arbitrary raw
//! memory, never panics.
//!
//! The codec is a parameter ([`Codec`]) so the tests can show a broken one is caught.

use crate::config::ConfigCase;
use crate::failure::{Failure, Outcome};
use crate::input::setups;
use arbitrary::{Arbitrary, Unstructured};
use iopt_api::{Config, Format, Granule, PhysAddr, Prot, Quirks, Registers, Tcr, Vtcr};
use iopt_lpae::desc::{self, Kind};
use iopt_sim::oracle::{Access, PhysRead, PhysUpdate, Walker};
use std::sync::atomic::{AtomicU64, Ordering};

/// The descriptor functions under check.
pub trait Codec {
    /// Encodes a leaf.
    fn encode_leaf(&self, cfg: &Config, level: u32, pa: PhysAddr, prot: Prot) -> u64;
    /// Encodes a table descriptor.
    fn encode_table(&self, cfg: &Config, table: PhysAddr) -> u64;
    /// Classifies a descriptor.
    fn kind(&self, format: Format, level: u32, d: u64) -> Kind;
    /// The output address of a descriptor.
    fn unpack_pa(&self, d: u64, granule: Granule) -> PhysAddr;
    /// Packs an output address.
    fn pack_pa(&self, pa: PhysAddr) -> u64;
    /// The prot a leaf grants.
    fn decode_prot(&self, cfg: &Config, d: u64) -> Prot;
}

/// The engine's codec, `iopt_lpae::desc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lpae;

impl Codec for Lpae {
    fn encode_leaf(&self, cfg: &Config, level: u32, pa: PhysAddr, prot: Prot) -> u64 {
        desc::encode_leaf(cfg, level, pa, prot)
    }
    fn encode_table(&self, cfg: &Config, table: PhysAddr) -> u64 {
        desc::encode_table(cfg, table)
    }
    fn kind(&self, format: Format, level: u32, d: u64) -> Kind {
        desc::kind(format, level, d)
    }
    fn unpack_pa(&self, d: u64, granule: Granule) -> PhysAddr {
        desc::unpack_pa(d, granule)
    }
    fn pack_pa(&self, pa: PhysAddr) -> u64 {
        desc::pack_pa(pa)
    }
    fn decode_prot(&self, cfg: &Config, d: u64) -> Prot {
        desc::decode_prot(cfg, d)
    }
}

/// Register fields for the oracle, arbitrary within their hardware widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub struct RawRegs {
    /// Which register set: stage 1, stage 2 or Mali.
    pub kind: u8,
    /// T0SZ (6 bits).
    pub tsz: u8,
    /// TG (2 bits).
    pub tg: u8,
    /// IPS / PS (3 bits).
    pub ips: u8,
    /// SL0 (2 bits).
    pub sl: u8,
    /// TTBR1 flag.
    pub ttbr1: bool,
    /// Mali input size.
    pub mali_ias: u8,
    /// MAIR / MEMATTR.
    pub mair: u64,
}

/// One descriptor case. Decoding takes up to 32 probes and then words until the data runs
/// out (at most 256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescInput {
    /// A configuration request (used when valid).
    pub case: ConfigCase,
    /// The built-in configuration used otherwise.
    pub fallback: u8,
    /// Output address for the round trips (masked to the output size and aligned).
    pub pa: u64,
    /// `Prot` bits.
    pub prot: u8,
    /// Registers for the oracle: the configuration's (`None`) or raw fields.
    pub regs: Option<RawRegs>,
    /// IOVAs the oracle translates, with an access selector each.
    pub probes: Vec<(u64, u8)>,
    /// Raw words: decoded at every level and format, and the oracle's memory.
    pub words: Vec<u64>,
}

impl<'a> Arbitrary<'a> for DescInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let case = u.arbitrary()?;
        let fallback = u.arbitrary()?;
        let pa = u.arbitrary()?;
        let prot = u.arbitrary()?;
        let regs = u.arbitrary()?;
        let n = u.arbitrary::<u8>()? % 33;
        let mut probes = Vec::new();
        for _ in 0..n {
            probes.push(u.arbitrary()?);
        }
        let mut words = Vec::new();
        while !u.is_empty() && words.len() < 256 {
            words.push(u.arbitrary()?);
        }
        Ok(Self {
            case,
            fallback,
            pa,
            prot,
            regs,
            probes,
            words,
        })
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Self::arbitrary(&mut u)
    }
}

/// `docs/lpae-format.md` §4.2: `(pa | pa >> 36) & ADDR_MASK`.
fn pack(pa: u64) -> u64 {
    (pa | (pa >> 36)) & 0x0000_ffff_ffff_f000
}

/// `docs/lpae-format.md` §4.3-4.7: the leaf descriptor of `prot` at `level`, re-derived.
#[must_use]
pub fn expected_leaf(cfg: &Config, level: u32, pa: u64, prot: Prot) -> u64 {
    let f = cfg.format();
    let q = cfg.quirks();
    let has = |p: Prot| prot.contains(p);
    let mut d = pack(pa);
    d |= if level == 3 && f != Format::Mali {
        3
    } else {
        1
    };
    let attr_idx = if has(Prot::MMIO) {
        2
    } else {
        u64::from(has(Prot::CACHE))
    };
    match f {
        Format::Arm32S1 | Format::Arm64S1 => {
            d |= 1 << 11; // nG
            d |= 1 << 10; // AF
            d |= if has(Prot::CACHE) { 3 << 8 } else { 2 << 8 };
            if !has(Prot::PRIV) {
                d |= 1 << 6;
            }
            if has(Prot::READ) && !has(Prot::WRITE) {
                d |= 1 << 7;
            } else if q.contains(Quirks::HD) && has(Prot::WRITE) {
                d |= 1 << 51;
            }
            d |= attr_idx << 2;
            if q.contains(Quirks::NS) {
                d |= 1 << 5;
            }
        }
        Format::Arm32S2 | Format::Arm64S2 => {
            d |= 1 << 10;
            d |= if has(Prot::CACHE) { 3 << 8 } else { 2 << 8 };
            if has(Prot::READ) {
                d |= 1 << 6;
            }
            if has(Prot::WRITE) {
                d |= 1 << 7;
            }
            let memattr: u64 = if has(Prot::MMIO) {
                0b0001
            } else if has(Prot::CACHE) {
                if q.contains(Quirks::S2FWB) {
                    0b0110
                } else {
                    0b1111
                }
            } else {
                0b0101
            };
            d |= memattr << 2;
        }
        _ => {
            d |= 2 << 8;
            if has(Prot::READ) {
                d |= 1 << 6;
            }
            if has(Prot::WRITE) {
                d |= 1 << 7;
            }
            d |= attr_idx << 2;
        }
    }
    if has(Prot::NOEXEC) {
        d |= 3 << 53;
    }
    d
}

/// The prot a descriptor grants, re-derived (stage 1 with DBM counts as writable).
#[must_use]
pub fn expected_prot(cfg: &Config, d: u64) -> Prot {
    let f = cfg.format();
    let mut p = Prot::empty();
    let bit = |b: u32| d & (1 << b) != 0;
    if f.is_stage1() {
        p |= Prot::READ;
        if !bit(7) || bit(51) {
            p |= Prot::WRITE;
        }
        if !bit(6) {
            p |= Prot::PRIV;
        }
    } else {
        if bit(6) {
            p |= Prot::READ;
        }
        if bit(7) {
            p |= Prot::WRITE;
        }
    }
    if f.is_stage2() {
        match (d >> 2) & 0xf {
            0b0001 => p |= Prot::MMIO,
            0b1111 | 0b0110 => p |= Prot::CACHE,
            _ => {}
        }
    } else {
        match (d >> 2) & 7 {
            2 => p |= Prot::MMIO,
            1 => p |= Prot::CACHE,
            _ => {}
        }
    }
    if (d >> 53) & 3 != 0 {
        p |= Prot::NOEXEC;
    }
    p
}

fn expected_kind(format: Format, level: u32, d: u64) -> Kind {
    if d & 1 == 0 {
        return Kind::Invalid;
    }
    if level == 3 {
        let leaf = if format == Format::Mali { 1 } else { 3 };
        return if d & 3 == leaf {
            Kind::Leaf
        } else {
            Kind::Invalid
        };
    }
    if d & 3 == 3 { Kind::Table } else { Kind::Leaf }
}

fn expected_unpack(d: u64, g: Granule) -> u64 {
    let a = d & 0x0000_ffff_ffff_f000;
    if g == Granule::K64 {
        (a & !0xffff) | (((a >> 12) & 0xf) << 48)
    } else {
        a
    }
}

/// Memory for the oracle made of arbitrary words: a few pages at fixed addresses, and every
/// other address either unbacked or aliased onto the words, so walks through arbitrary table
/// descriptors go deep.
#[derive(Debug)]
pub struct JunkMemory {
    base: u64,
    words: Vec<AtomicU64>,
}

impl JunkMemory {
    /// Memory at `base` holding `words` (at least one).
    #[must_use]
    pub fn new(base: u64, words: &[u64]) -> Self {
        let mut w: Vec<AtomicU64> = words.iter().map(|&x| AtomicU64::new(x)).collect();
        if w.is_empty() {
            w.push(AtomicU64::new(0));
        }
        Self { base, words: w }
    }

    fn slot(&self, pa: PhysAddr) -> Option<&AtomicU64> {
        let a = pa.get();
        let n = self.words.len() as u64;
        if let Some(off) = a.checked_sub(self.base) {
            if off / 8 < n {
                return self.words.get(usize::try_from(off / 8).ok()?);
            }
        }
        // Elsewhere: a third unbacked, the rest aliased.
        let h = (a >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        if h % 3 == 0 {
            return None;
        }
        self.words.get(usize::try_from((h >> 8) % n).ok()?)
    }
}

impl PhysRead for JunkMemory {
    fn read_u64(&self, pa: PhysAddr) -> Option<u64> {
        self.slot(pa).map(|w| w.load(Ordering::Relaxed))
    }
}

impl PhysUpdate for JunkMemory {
    fn fetch_and_u64(&self, pa: PhysAddr, mask: u64) -> Option<u64> {
        self.slot(pa).map(|w| w.fetch_and(mask, Ordering::Relaxed))
    }
}

fn fail(what: impl std::fmt::Display, input: &DescInput) -> Failure {
    Failure::new(format!("descriptor: {what}"), format!("input: {input:x?}"))
}

/// Checks one case with the engine's codec.
///
/// # Errors
///
/// The first disagreement.
pub fn check(input: &DescInput) -> Outcome {
    check_with(input, &Lpae)
}

/// Checks one case with `codec`.
///
/// # Errors
///
/// The first disagreement.
#[allow(clippy::too_many_lines)]
pub fn check_with(input: &DescInput, codec: &dyn Codec) -> Outcome {
    let cfg = Config::new(input.case.input).unwrap_or_else(|_| {
        let all = setups();
        all[usize::from(input.fallback) % all.len()].cfg
    });
    let g = cfg.granule();
    let oas_mask = (1u64 << cfg.oas()) - 1;
    let mut prot = Prot::from_bits_truncate(u32::from(input.prot) & 0x3f);
    if !prot.is_accessible() {
        prot |= Prot::READ;
    }
    // Leaves at every level a page size allows, tables at every level above the last.
    for size in cfg.page_sizes().iter() {
        let Some(level) = cfg.leaf_level(size) else {
            continue;
        };
        let pa = input.pa & oas_mask & !size.mask();
        let d = codec.encode_leaf(&cfg, level, PhysAddr::new(pa), prot);
        let want = expected_leaf(&cfg, level, pa, prot);
        if d != want {
            return Err(fail(
                format!(
                    "leaf L{level} {size} -> {pa:#x} {prot:?}: encoded {d:#018x}, the format gives \
                     {want:#018x}"
                ),
                input,
            ));
        }
        let k = codec.kind(cfg.format(), level, d);
        let back = codec.unpack_pa(d, g).get();
        let p = codec.decode_prot(&cfg, d);
        if k != Kind::Leaf || back != pa || p != cfg.effective_prot(prot) {
            return Err(fail(
                format!(
                    "leaf L{level} {d:#018x} decodes as {k:?} -> {back:#x} {p:?}, encoded from \
                     {pa:#x} {prot:?} (effective {:?})",
                    cfg.effective_prot(prot)
                ),
                input,
            ));
        }
    }
    let table = input.pa & oas_mask & !(g.size() - 1);
    for level in cfg.start_level()..3 {
        let d = codec.encode_table(&cfg, PhysAddr::new(table));
        let ns = if cfg.quirks().contains(Quirks::NS) {
            1 << 63
        } else {
            0
        };
        let want = pack(table) | 3 | ns;
        let k = codec.kind(cfg.format(), level, d);
        let back = codec.unpack_pa(d, g).get();
        if d != want || k != Kind::Table || back != table {
            return Err(fail(
                format!(
                    "table descriptor for {table:#x} at L{level}: {d:#x} ({k:?} -> {back:#x}), the \
                     format gives {want:#x}"
                ),
                input,
            ));
        }
    }
    let packed = codec.pack_pa(PhysAddr::new(input.pa));
    if packed != pack(input.pa) {
        return Err(fail(
            format!(
                "pack_pa({:#x}) = {packed:#x}, expected {:#x}",
                input.pa,
                pack(input.pa)
            ),
            input,
        ));
    }
    // Arbitrary words at every level and format: no panic, and the re-derived decoding.
    for &w in input.words.iter().take(256) {
        for format in Format::ALL {
            for level in 0..=4u32 {
                let k = codec.kind(format, level, w);
                if level <= 3 && k != expected_kind(format, level, w) {
                    return Err(fail(
                        format!("{format} L{level}: {w:#x} classified {k:?}"),
                        input,
                    ));
                }
            }
        }
        for gr in [Granule::K4, Granule::K16, Granule::K64] {
            let a = codec.unpack_pa(w, gr).get();
            if a != expected_unpack(w, gr) {
                return Err(fail(
                    format!(
                        "{gr:?}: {w:#x} unpacks to {a:#x}, expected {:#x}",
                        expected_unpack(w, gr)
                    ),
                    input,
                ));
            }
        }
        let p = codec.decode_prot(&cfg, w);
        if p != expected_prot(&cfg, w) {
            return Err(fail(
                format!(
                    "{w:#x} decodes to {p:?}, expected {:?}",
                    expected_prot(&cfg, w)
                ),
                input,
            ));
        }
    }
    // The oracle over junk memory, from the configuration's registers or raw fields.
    let base = 0x4000_0000;
    let mem = JunkMemory::new(base, &input.words);
    let walker = match input.regs {
        None => {
            let regs = iopt_lpae::regs::registers(&cfg, PhysAddr::new(base));
            let tiny_s2 =
                cfg.format().is_stage2() && cfg.granule() == Granule::K4 && cfg.start_level() == 3;
            match Walker::from_registers(cfg.format(), &regs, cfg.is_ttbr1(), cfg.ias()) {
                Some(w) => Some(w),
                // SL0 cannot encode it (see `config::sl0_unencodable`).
                None if tiny_s2 => None,
                None => {
                    return Err(fail(
                        format!("the oracle refuses the registers of a valid table: {regs:x?}"),
                        input,
                    ));
                }
            }
        }
        Some(r) => raw_walker(&r, base),
    };
    if let Some(w) = walker {
        for &(iova, sel) in input.probes.iter().take(32) {
            let access = Access {
                write: sel & 1 != 0,
                exec: sel & 2 != 0,
                privileged: sel & 4 != 0,
            };
            let r = if sel & 8 != 0 {
                w.device_write(&mem, iova)
            } else {
                w.translate(&mem, iova, access)
            };
            if let Ok(t) = r {
                if !t.leaf_size.is_power_of_two() || t.level > 3 {
                    return Err(fail(
                        format!("the oracle returned {t:x?} for {iova:#x}"),
                        input,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A walker from raw register fields, masked to their hardware widths, the way a device would
/// take them. Fields that describe no walk (an input size below the granule, or a start level
/// out of range) are refused here, before the oracle: `Walker::from_registers` panics on them
/// (reported; see the crate's tests).
fn raw_walker(r: &RawRegs, root: u64) -> Option<Walker> {
    let tsz = r.tsz & 0x3f;
    let tg = r.tg & 3;
    let ias = 64 - u32::from(tsz);
    let (format, regs) = match r.kind % 3 {
        0 => {
            let shift = if r.ttbr1 {
                match tg {
                    1 => 14,
                    2 => 12,
                    3 => 16,
                    _ => return None,
                }
            } else {
                match tg {
                    0 => 12,
                    1 => 16,
                    2 => 14,
                    _ => return None,
                }
            };
            // A walk needs 1-4 levels: IAS above the page shift, at most 4 levels of it; and
            // a TTBR1 walk an upper half (IAS below 64).
            if ias <= shift || (ias - shift).div_ceil(shift - 3) > 4 || (r.ttbr1 && ias >= 64) {
                return None;
            }
            (
                Format::Arm64S1,
                Registers::Stage1 {
                    ttbr: PhysAddr::new(root),
                    tcr: Tcr {
                        ips: r.ips & 7,
                        tg,
                        sh: 3,
                        orgn: 1,
                        irgn: 1,
                        tsz,
                    },
                    mair: r.mair,
                },
            )
        }
        1 => (
            Format::Arm64S2,
            Registers::Stage2 {
                vttbr: PhysAddr::new(root),
                vtcr: Vtcr {
                    ps: r.ips & 7,
                    tg,
                    sh: 3,
                    orgn: 1,
                    irgn: 1,
                    sl: r.sl & 3,
                    tsz,
                },
            },
        ),
        _ => (
            Format::Mali,
            Registers::Mali {
                transtab: root | 3,
                memattr: r.mair,
            },
        ),
    };
    let mali_ias = u32::from(r.mali_ias % 49).max(13);
    Walker::from_registers(
        format,
        &regs,
        r.ttbr1 && format == Format::Arm64S1,
        mali_ias,
    )
}

/// The fuzz target's entry.
///
/// # Errors
///
/// As [`check`].
pub fn check_bytes(data: &[u8]) -> Outcome {
    let Ok(input) = DescInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return Ok(());
    };
    check(&input)
}

/// Draws a case from `u` and checks it.
///
/// # Errors
///
/// `arbitrary`'s error when `u` runs out.
pub fn check_unstructured(u: &mut Unstructured<'_>) -> arbitrary::Result<Outcome> {
    let input = DescInput::arbitrary(u)?;
    Ok(check(&input))
}
