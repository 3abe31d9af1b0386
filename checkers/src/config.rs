//! The configuration checker: an arbitrary [`ConfigInput`] must give either the typed error
//! the rules of `docs/lpae-format.md` §3 name, or a table whose geometry (§3.4-3.7) and register
//! outputs (§5) match those rules, re-derived here independently of `iopt-api`, and whose
//! registers really drive the hardware-walk oracle to the pages the table maps at both ends
//! of its input range.

// Geometry reads best with the document's short names (`g`, `i`, `p`...).
#![allow(clippy::many_single_char_names)]

use crate::env::Hooked;
use crate::failure::{Failure, Outcome};
use crate::lane::{Build, Design, Subject};
use arbitrary::{Arbitrary, Unstructured};
use iopt_api::{
    AllocError, Config, ConfigError, ConfigInput, Format, Gather, Granule, Iova, MapError,
    PageSize, PageSizes, PhysAddr, Prot, Quirks, Registers, Tcr, Vtcr,
};
use iopt_sim::debug::render;
use iopt_sim::oracle::{Access, Fault, Walker};

/// An arbitrary configuration request, biased towards the interesting values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigCase {
    /// The request.
    pub input: ConfigInput,
}

const SIZE_BITS: [u32; 8] = [12, 14, 16, 21, 25, 29, 30, 42];
const WIDTHS: [u32; 20] = [
    0, 8, 12, 14, 16, 17, 24, 31, 32, 33, 36, 39, 40, 42, 44, 47, 48, 49, 52, 64,
];

impl<'a> Arbitrary<'a> for ConfigCase {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let format = Format::ALL[usize::from(u.arbitrary::<u8>()?) % Format::ALL.len()];
        let bitmap = match u.arbitrary::<u8>()? % 10 {
            0 => PageSizes::GRANULE_4K.bits(),
            1 => 0x20_1000,
            2 => PageSizes::GRANULE_16K.bits(),
            3 => PageSizes::GRANULE_64K.bits() | (1 << 42),
            4 => {
                PageSizes::GRANULE_4K.bits()
                    | PageSizes::GRANULE_16K.bits()
                    | PageSizes::GRANULE_64K.bits()
            }
            5 => u.arbitrary::<u64>()?,
            _ => {
                let pick = u.arbitrary::<u8>()?;
                SIZE_BITS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| pick & (1 << i) != 0)
                    .fold(0u64, |b, (_, s)| b | (1 << s))
            }
        };
        let mut width = || -> arbitrary::Result<u32> {
            let x = u.arbitrary::<u8>()?;
            Ok(if x < 200 {
                WIDTHS[usize::from(x) % WIDTHS.len()]
            } else {
                u32::from(x)
            })
        };
        let ias = width()?;
        let oas = width()?;
        let quirks = match u.arbitrary::<u8>()? % 4 {
            0 => 0,
            1 => u64::from(u.arbitrary::<u16>()?) & 0x3ff,
            2 => u64::from(u.arbitrary::<u8>()?) & 0x3e1, // the accepted ones
            _ => u.arbitrary::<u64>()?,
        };
        let coherent = u.arbitrary::<bool>()?;
        let preferred =
            [Granule::K4, Granule::K16, Granule::K64][usize::from(u.arbitrary::<u8>()?) % 3];
        Ok(Self {
            input: ConfigInput::new(format, PageSizes::from_bits(bitmap), ias, oas)
                .with_quirks(Quirks::from_bits_retain(quirks))
                .with_coherent_walk(coherent)
                .with_preferred_granule(preferred),
        })
    }
}

/// The geometry the rules give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Restricted page sizes.
    pub bitmap: u64,
    /// Clamped IAS.
    pub ias: u32,
    /// Clamped OAS.
    pub oas: u32,
    /// Granule in bytes.
    pub granule: u64,
    /// Level of the root.
    pub start_level: u32,
    /// log2 of the root's entries.
    pub pgd_bits: u32,
    /// Concatenated root tables.
    pub concat: usize,
}

fn ips(bits: u32) -> Option<u8> {
    [32, 36, 40, 42, 44, 48, 52]
        .iter()
        .position(|&b| b == bits)
        .map(|p| p as u8)
}

/// `docs/lpae-format.md` §3: validates and derives, in the order Linux checks.
///
/// # Errors
///
/// The [`ConfigError`] the rules give.
#[allow(clippy::too_many_lines)] // one rule after another, in Linux's order
pub fn derive(i: &ConfigInput) -> Result<Geometry, ConfigError> {
    let (ns, ttbr1, wbwa, hd, s2fwb, nowarn) = (1, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 9);
    let accepted: u64 = match i.format {
        Format::Arm32S1 | Format::Arm64S1 => ns | ttbr1 | wbwa | hd | nowarn,
        Format::Arm32S2 | Format::Arm64S2 => s2fwb | nowarn,
        _ => 0,
    };
    let q = i.quirks.bits();
    if q & !accepted != 0 {
        return Err(ConfigError::UnsupportedQuirks {
            format: i.format,
            rejected: q & !accepted,
        });
    }
    if q & wbwa != 0 && i.coherent_walk {
        return Err(ConfigError::OuterWbwaCoherent { quirks: q });
    }
    let mut bitmap = i.pgsize_bitmap.bits();
    let limit = match i.format {
        Format::Arm32S1 => Some((32, 40)),
        Format::Arm32S2 => Some((40, 40)),
        Format::Mali => Some((48, 40)),
        _ => None,
    };
    if let Some((mi, mo)) = limit {
        if i.ias > mi || i.oas > mo {
            return Err(ConfigError::FormatLimit {
                format: i.format,
                ias: i.ias,
                oas: i.oas,
            });
        }
        bitmap &= (1 << 12) | (1 << 21) | (1 << 30);
    }
    let page: u64 = match i.preferred_granule {
        Granule::K4 => 1 << 12,
        Granule::K16 => 1 << 14,
        Granule::K64 => 1 << 16,
    };
    let below = bitmap & (page - 1);
    let above = bitmap & !((page << 1) - 1);
    let g = if bitmap & page != 0 {
        page
    } else if below != 0 {
        1 << below.ilog2()
    } else if above != 0 {
        1 << above.trailing_zeros()
    } else {
        0
    };
    let allowed: u64 = match g {
        0x1000 => (1 << 12) | (1 << 21) | (1 << 30),
        0x4000 => (1 << 14) | (1 << 25),
        0x1_0000 => (1 << 16) | (1 << 29) | if i.oas > 48 { 1 << 42 } else { 0 },
        _ => 0,
    };
    let restricted = bitmap & allowed;
    if restricted == 0 {
        return Err(ConfigError::NoGranule {
            requested: i.pgsize_bitmap.bits(),
            restricted,
        });
    }
    let granule = match g {
        0x1000 => Granule::K4,
        0x4000 => Granule::K16,
        _ => Granule::K64,
    };
    let max = if g == 0x1_0000 { 52 } else { 48 };
    let ias = i.ias.min(max);
    let oas = i.oas.min(max);
    let pg_shift = g.trailing_zeros();
    if ias <= pg_shift {
        return Err(ConfigError::BadIas { ias, granule });
    }
    let bpl = pg_shift - 3;
    let va = ias - pg_shift;
    let levels = va.div_ceil(bpl);
    let mut start = 4 - levels;
    let mut pgd_bits = va - bpl * (levels - 1);
    let mut concat = 1;
    let oas_ok = if i.format == Format::Mali {
        oas > pg_shift
    } else {
        ips(oas).is_some()
    };
    if !oas_ok {
        return Err(ConfigError::BadOas { oas });
    }
    match i.format {
        Format::Mali if start > 0 => {
            start = 0;
            pgd_bits = 0;
        }
        Format::Arm32S2 | Format::Arm64S2 => {
            let mandatory = (g == 0x4000 && start == 0 && (oas == 48 || ias == 48))
                || (g == 0x1000 && start == 0 && (oas == 40 || oas == 42))
                || (g == 0x4000 && start == 1 && oas == 40);
            if mandatory {
                let tables = 1usize << pgd_bits;
                if tables > 16 {
                    return Err(ConfigError::ConcatenationTooLarge { tables });
                }
                concat = tables;
                pgd_bits += bpl;
                start += 1;
            }
        }
        _ => {}
    }
    Ok(Geometry {
        bitmap: restricted,
        ias,
        oas,
        granule: g,
        start_level: start,
        pgd_bits,
        concat,
    })
}

/// `docs/lpae-format.md` §5: the register outputs of a table with geometry `g` and root `root`.
#[must_use]
pub fn expected_registers(i: &ConfigInput, g: &Geometry, root: PhysAddr) -> Registers {
    let coherent = i.coherent_walk;
    let outer = i.quirks.bits() & (1 << 6) != 0;
    let tsz = (64 - g.ias) as u8;
    let ips = ips(g.oas).unwrap_or(0);
    let tg0 = match g.granule {
        0x1000 => 0,
        0x1_0000 => 1,
        _ => 2,
    };
    let tg1 = match g.granule {
        0x4000 => 1,
        0x1000 => 2,
        _ => 3,
    };
    let (sh, irgn) = if coherent { (3, 1) } else { (2, 0) };
    match i.format {
        Format::Arm32S1 | Format::Arm64S1 => Registers::Stage1 {
            ttbr: root,
            tcr: Tcr {
                ips,
                tg: if i.quirks.bits() & (1 << 5) != 0 {
                    tg1
                } else {
                    tg0
                },
                sh,
                orgn: u8::from(coherent || outer),
                irgn,
                tsz,
            },
            mair: 0xF404_FF44,
        },
        Format::Arm32S2 | Format::Arm64S2 => {
            let s = if g.granule == 0x1000 {
                g.start_level + 1
            } else {
                g.start_level
            };
            Registers::Stage2 {
                vttbr: root,
                vtcr: Vtcr {
                    ps: ips,
                    tg: tg0,
                    sh,
                    orgn: u8::from(coherent),
                    irgn,
                    sl: (!s & 3) as u8,
                    tsz,
                },
            }
        }
        _ => Registers::Mali {
            transtab: root.get() | 3 | 4 | if coherent { 1 << 4 } else { 0 },
            memattr: 0x0088_8D88,
        },
    }
}

fn bad(what: impl std::fmt::Display, dump: String) -> Failure {
    Failure::new(format!("config: {what}"), dump)
}

/// Whether the geometry is a 4 KiB stage-2 table starting at level 3: VTCR.SL0 then reads 3
/// (`~(3 + 1) & 3`, `docs/lpae-format.md` §5.2), an encoding the architecture reserves for 4 KiB
/// granules without FEAT_TTST, so the oracle cannot start a walk from it. Only tiny input
/// sizes (IAS ≤ 21) get here.
#[must_use]
pub fn sl0_unencodable(format: Format, g: &Geometry) -> bool {
    matches!(format, Format::Arm32S2 | Format::Arm64S2) && g.granule == 0x1000 && g.start_level == 3
}

/// Compares `cfg`'s accessors with the derived geometry.
fn geometry_problems(cfg: &Config, g: &Geometry) -> Vec<String> {
    let mut p = Vec::new();
    let bpl = g.granule.trailing_zeros() - 3;
    let got = (
        cfg.page_sizes().bits(),
        cfg.ias(),
        cfg.oas(),
        cfg.granule().size(),
        cfg.start_level(),
        cfg.pgd_bits(),
        cfg.concat_tables(),
    );
    let want = (
        g.bitmap,
        g.ias,
        g.oas,
        g.granule,
        g.start_level,
        g.pgd_bits,
        g.concat,
    );
    if got != want {
        p.push(format!(
            "(sizes, ias, oas, granule, start level, pgd bits, concatenated) = {got:x?}, the \
             rules give {want:x?}"
        ));
    }
    if cfg.levels() != 4 - g.start_level {
        p.push(format!(
            "levels {} for start level {}",
            cfg.levels(),
            g.start_level
        ));
    }
    if cfg.pgd_entries() != 1 << g.pgd_bits {
        p.push(format!("pgd entries {}", cfg.pgd_entries()));
    }
    let bytes = (8u64 << g.pgd_bits).max(64);
    if cfg.pgd_bytes() != bytes {
        p.push(format!(
            "pgd bytes {:#x}, the rules give {bytes:#x}",
            cfg.pgd_bytes()
        ));
    }
    for l in g.start_level..4 {
        let want = 1u64 << ((4 - l) * bpl + 3);
        if cfg.block_size(l) != want {
            p.push(format!(
                "block size at L{l} {:#x}, not {want:#x}",
                cfg.block_size(l)
            ));
        }
        let want_entries = if l == g.start_level {
            1usize << g.pgd_bits
        } else {
            1usize << bpl
        };
        if cfg.entries_at(l) != want_entries {
            p.push(format!(
                "L{l} entries {} not {want_entries}",
                cfg.entries_at(l)
            ));
        }
    }
    for bit in 0..64u32 {
        let size = 1u64 << bit;
        let want = if g.bitmap & size != 0 {
            (g.start_level..4).find(|&l| (4 - l) * bpl + 3 == bit)
        } else {
            None
        };
        let got = PageSize::new(size).and_then(|s| cfg.leaf_level(s));
        if got != want {
            p.push(format!(
                "leaf level of {size:#x}: {got:?}, expected {want:?}"
            ));
        }
    }
    let span = (1u64 << g.ias) - 1;
    let ttbr1 = cfg.input().quirks.contains(Quirks::TTBR1);
    let want = if ttbr1 { (!span, u64::MAX) } else { (0, span) };
    let (lo, hi) = cfg.iova_bounds();
    if (lo.get(), hi.get()) != want {
        p.push(format!("iova bounds {lo:?}..{hi:?}, expected {want:x?}"));
    }
    p
}

/// Checks one configuration request on the real designs.
///
/// # Errors
///
/// The first rule broken, with a dump.
pub fn check(case: &ConfigCase) -> Outcome {
    check_with(case, &|cfg, alloc| Design::D1.build(cfg, alloc))?;
    check_with(case, &|cfg, alloc| Design::D2.build(cfg, alloc))
}

/// Checks one configuration request on the backend `build` makes.
///
/// # Errors
///
/// The first rule broken, with a dump.
#[allow(clippy::too_many_lines)]
pub fn check_with(case: &ConfigCase, build: &Build) -> Outcome {
    let i = case.input;
    let dump = format!("input: {i:?}");
    let derived = derive(&i);
    let cfg = match (Config::new(i), derived) {
        (Err(got), Err(want)) if got == want => return Ok(()),
        (Err(got), want) => {
            return Err(bad(
                format!("Config::new refused with {got:?}, the rules give {want:?}"),
                dump,
            ));
        }
        (Ok(cfg), Err(want)) => {
            return Err(bad(
                format!("Config::new accepted ({cfg:?}), the rules give {want:?}"),
                dump,
            ));
        }
        (Ok(cfg), Ok(_)) => cfg,
    };
    let Ok(g) = derived else { return Ok(()) };
    let p = geometry_problems(&cfg, &g);
    if !p.is_empty() {
        return Err(bad(p.join("; "), format!("{dump}\nconfig: {cfg:?}")));
    }
    let alloc = Hooked::for_config(&cfg);
    let mem = std::sync::Arc::clone(&alloc.mem);
    let table = match build(cfg, alloc) {
        Ok(t) => t,
        // No simulated memory fits under so small an output address size (see
        // `Hooked::for_config`): the root is refused, as it must be.
        Err(AllocError::BadPage { .. }) if cfg.oas() < 21 => return Ok(()),
        Err(e) => return Err(bad(format!("building the table failed: {e:?}"), dump)),
    };
    let r = smoke(table.as_ref(), &cfg, &g, &mem);
    let rendered = render(table.as_ref() as &dyn iopt_api::IoPageTable);
    drop(table);
    if let Err(what) = r {
        return Err(bad(
            what,
            format!("{dump}\nconfig: {cfg:?}\ntree:\n{rendered}"),
        ));
    }
    let s = mem.stats();
    if s.live_pages != 0 || s.bad_frees != 0 {
        return Err(bad(
            format!(
                "after drop {} page(s) held, {} bad free(s)",
                s.live_pages, s.bad_frees
            ),
            dump,
        ));
    }
    Ok(())
}

/// Registers, root, and a few maps at the ends of the input range through the oracle.
#[allow(clippy::too_many_lines)]
fn smoke(
    t: &dyn Subject,
    cfg: &Config,
    g: &Geometry,
    mem: &iopt_sim::SimMemory,
) -> Result<(), String> {
    let i = cfg.input();
    let root = t.root();
    let want = expected_registers(i, g, root);
    let got = t.registers();
    if got != want {
        return Err(format!("registers {got:x?}, the rules give {want:x?}"));
    }
    let live = mem.live_set();
    let pgd = (8u64 << g.pgd_bits).max(64);
    if live != vec![(root, pgd)] {
        return Err(format!(
            "a new table holds {live:x?}, expected the root alone ({pgd:#x} bytes at {root})"
        ));
    }
    if root.get() % pgd != 0 || (i.format == Format::Mali && root.get() % 4096 != 0) {
        return Err(format!("root {root} is not aligned to {pgd:#x}"));
    }
    if g.oas < 32 {
        // Simulated memory lives above 1 GiB: nothing maps there with so few output bits.
        return Ok(());
    }
    if root.get() >> g.oas != 0 {
        return Err(format!(
            "root {root} is beyond the {}-bit output size",
            g.oas
        ));
    }
    let ttbr1 = i.quirks.contains(Quirks::TTBR1);
    let Some(walker) = Walker::from_registers(i.format, &got, ttbr1, g.ias) else {
        if sl0_unencodable(i.format, g) {
            // Linux's formula gives SL0 = 3 here, which 4 KiB stage 2 reserves (FEAT_TTST):
            // no walker starts there, so there is nothing to walk.
            return Ok(());
        }
        return Err("the oracle cannot derive a walk from the registers".to_string());
    };
    let sizes: Vec<u64> = (0..64)
        .map(|b| 1u64 << b)
        .filter(|s| g.bitmap & s != 0)
        .collect();
    let (small, large) = (sizes[0], sizes[sizes.len() - 1]);
    let span = 1u64 << g.ias;
    let lo = if ttbr1 { !(span - 1) } else { 0 };
    let hi = lo + (span - small);
    let pa_lo = 1u64 << (g.oas - 1);
    let pa_hi = (1u64 << g.oas) - small;
    let mut maps = vec![(lo, pa_lo, small)];
    if large < span / 2 {
        maps.push((lo + large, pa_lo, large));
    }
    if !maps.iter().any(|&(a, _, s)| hi >= a && hi - a < s) {
        maps.push((hi, pa_hi, small));
    }
    let prot = Prot::READ | Prot::WRITE | Prot::CACHE;
    for &(iova, pa, size) in &maps {
        let ps = PageSize::new(size).ok_or("size")?;
        t.map(Iova::new(iova), PhysAddr::new(pa), ps, 1, prot)
            .map_err(|e| format!("map of {size:#x} at {iova:#x} -> {pa:#x} failed: {e:?}"))?;
    }
    for &(iova, pa, size) in &maps {
        for off in [0, size / 2, size - 8] {
            let access = Access {
                write: true,
                exec: false,
                privileged: true,
            };
            match walker.translate(mem, iova + off, access) {
                Ok(h) if h.pa.get() == pa + off && h.leaf_size == size => {}
                other => {
                    return Err(format!(
                        "the oracle translates {:#x} to {other:x?}, the table mapped {pa:#x} + \
                         {off:#x} with a {size:#x} leaf",
                        iova + off
                    ));
                }
            }
            let sw = t
                .iova_to_phys(Iova::new(iova + off))
                .map(|x| (x.pa.get(), x.size.get()));
            if sw != Some((pa + off, size)) {
                return Err(format!("lookup of {:#x} gives {sw:x?}", iova + off));
            }
        }
    }
    // Just outside the input range: refused, and the device faults.
    let outside = if ttbr1 {
        lo.checked_sub(small)
    } else {
        lo.checked_add(span)
    };
    if let (Some(o), Some(ps)) = (outside, PageSize::new(small)) {
        let r = t.map(Iova::new(o), PhysAddr::new(pa_lo), ps, 1, Prot::READ);
        if !matches!(r, Err(MapError::IovaOutOfRange { .. })) {
            return Err(format!(
                "a map at {o:#x}, outside the input range, gave {r:?}"
            ));
        }
        if !matches!(
            walker.translate(mem, o, Access::READ),
            Err(Fault::Translation { .. })
        ) {
            return Err(format!(
                "the oracle translates {o:#x}, outside the input range"
            ));
        }
    }
    let mut gather = Gather::new();
    for &(iova, _, size) in &maps {
        let ps = PageSize::new(size).ok_or("size")?;
        let r = t.unmap(Iova::new(iova), ps, 1, &mut gather);
        if r != Ok(size) {
            return Err(format!("unmap of {size:#x} at {iova:#x} gave {r:?}"));
        }
        if walker.translate(mem, iova, Access::READ).is_ok() {
            return Err(format!(
                "the oracle still translates {iova:#x} after its unmap"
            ));
        }
    }
    Ok(())
}

/// The fuzz target's entry.
///
/// # Errors
///
/// As [`check`].
pub fn check_bytes(data: &[u8]) -> Outcome {
    let Ok(case) = ConfigCase::arbitrary_take_rest(Unstructured::new(data)) else {
        return Ok(());
    };
    check(&case)
}

/// Draws a case from `u` and checks it.
///
/// # Errors
///
/// `arbitrary`'s error when `u` runs out.
pub fn check_unstructured(u: &mut Unstructured<'_>) -> arbitrary::Result<Outcome> {
    let case = ConfigCase::arbitrary(u)?;
    Ok(check(&case))
}
