//! The typed form of one line of the matrix, and the parser.
//!
//! The file's hex strings become `u64`, the format name becomes a [`Format`], and the two
//! shapes of a case (allocation failed, or a table with ops and a final state) become an
//! [`Outcome`] enum, so code that replays a case never looks at JSON.

use core::fmt;
use std::collections::BTreeMap;

use iopt_api::{Config, ConfigInput, Format, Granule, PageSizes, Quirks, Tcr, Vtcr};

/// Why the data could not be parsed.
#[derive(Debug)]
#[non_exhaustive]
pub enum GoldenError {
    /// A line is not valid JSON, or does not follow the schema (wrong type, unknown field,
    /// malformed hex, unknown format name, fields inconsistent with the format).
    Parse {
        /// 1-based line number.
        line: usize,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A line's case number is not larger than the one before it. Files are in case order;
    /// the first number may be anything, and gaps are allowed, but a repeated or decreasing
    /// number means lines were shuffled or two files concatenated.
    OutOfOrder {
        /// 1-based line number.
        line: usize,
        /// The smallest case number the position allows (one more than the previous case's).
        expected: usize,
        /// The case number found.
        found: usize,
    },
}

impl fmt::Display for GoldenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GoldenError::Parse { line, source } => {
                write!(f, "golden data line {line}: {source}")
            }
            GoldenError::OutOfOrder {
                line,
                expected,
                found,
            } => {
                write!(
                    f,
                    "golden data line {line}: case {found}, expected case {expected} or later"
                )
            }
        }
    }
}

impl std::error::Error for GoldenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GoldenError::Parse { source, .. } => Some(source),
            GoldenError::OutOfOrder { .. } => None,
        }
    }
}

/// The kinds of case the matrix file uses (its `kind` strings).
///
/// `kind` is informational: [`Case::kind`] keeps whatever string a file has (the random set
/// says `"random"`, a user's own recording may say anything), and [`Case::matrix_kind`] maps
/// the matrix's names to this enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Linux's `arm_lpae_run_tests()` sequence over the standard granule/size matrix.
    Selftest,
    /// Input address size larger than output address size.
    IasGtOas,
    /// Accepted and rejected quirk combinations.
    Quirks,
    /// Unusual page-size bitmaps.
    OddBitmap,
    /// Address sizes outside the standard set (clamped or rejected).
    OddAddrSize,
    /// `coherent_walk = false`.
    Noncoherent,
    /// Every prot value mapped as a page and as a block.
    ProtMatrix,
    /// 64 KiB granule with 52-bit output addresses.
    Pa52,
}

impl Kind {
    /// Every kind, in the order the README lists them.
    pub const ALL: [Kind; 8] = [
        Kind::Selftest,
        Kind::IasGtOas,
        Kind::Quirks,
        Kind::OddBitmap,
        Kind::OddAddrSize,
        Kind::Noncoherent,
        Kind::ProtMatrix,
        Kind::Pa52,
    ];

    /// Returns the kind the file's `kind` string names, if it is one of the matrix's.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Returns the name the file uses.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Selftest => "selftest",
            Kind::IasGtOas => "ias_gt_oas",
            Kind::Quirks => "quirks",
            Kind::OddBitmap => "odd_bitmap",
            Kind::OddAddrSize => "odd_addr_size",
            Kind::Noncoherent => "noncoherent",
            Kind::ProtMatrix => "prot_matrix",
            Kind::Pa52 => "pa52",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One case: a table configuration, and what Linux did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// The case number as the file gives it (the matrix numbers from 0, other sets need not).
    pub number: usize,
    /// The semantics label (`"modern"` in both shipped files).
    pub semantics: String,
    /// What the case exercises, as the file names it (informational; any string is accepted).
    pub kind: String,
    /// The descriptor format.
    pub format: Format,
    /// The requested page-size bitmap.
    pub pgsize_bitmap_in: u64,
    /// The requested input address size.
    pub ias_in: u32,
    /// The requested output address size.
    pub oas_in: u32,
    /// The requested quirk bits (Linux `IO_PGTABLE_QUIRK_*` values).
    pub quirks: u64,
    /// Whether the walker is coherent.
    pub coherent_walk: bool,
    /// WARN conditions Linux hit over the whole case (informational).
    pub warnings: u32,
    /// Whether allocation failed, and if not everything that followed.
    pub outcome: Outcome,
}

/// How a case ended in Linux.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `alloc_io_pgtable_ops` returned NULL; no op was run.
    AllocFailed,
    /// The table was allocated, the ops were run, and the tree was recorded before teardown.
    Allocated(Box<Allocated>),
}

/// What Linux recorded for a case whose table was allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    /// The configuration outputs.
    pub cfg_out: CfgOut,
    /// The walk geometry (not part of Linux's API; a debugging aid).
    pub geom: Geom,
    /// The calls, in order, each with what Linux returned.
    pub ops: Vec<Op>,
    /// The tree after the last op.
    pub final_state: FinalState,
    /// TLB maintenance counts (informational).
    pub flushes: Flushes,
}

/// `struct io_pgtable_cfg` after `alloc_io_pgtable_ops`: restricted, clamped and derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CfgOut {
    /// The restricted page-size bitmap.
    pub pgsize_bitmap: u64,
    /// The clamped input address size.
    pub ias: u32,
    /// The clamped output address size.
    pub oas: u32,
    /// The format's register outputs.
    pub regs: RegsOut,
}

/// The register-level outputs of the configuration, by format family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegsOut {
    /// Stage-1 formats: TCR fields and MAIR.
    Stage1 {
        /// TCR fields.
        tcr: Tcr,
        /// MAIR exactly as Linux stores it (sign-extended: `0xfffffffff404ff44`).
        mair: u64,
    },
    /// Stage-2 formats: VTCR fields.
    Stage2 {
        /// VTCR fields.
        vtcr: Vtcr,
    },
    /// Mali.
    Mali {
        /// AS_MEMATTR.
        memattr: u64,
        /// AS_TRANSTAB with the root table's address removed.
        transtab_low_bits: u64,
    },
}

/// The walk geometry Linux ended up with, after stage-2 concatenation and Mali's forcing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geom {
    /// Granule size in bytes.
    pub granule: u64,
    /// Level of the root table.
    pub start_level: u32,
    /// Entries in the root table.
    pub pgd_entries: u64,
}

/// One recorded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `map_pages`.
    Map(MapOp),
    /// `unmap_pages`.
    Unmap(UnmapOp),
    /// `iova_to_phys`.
    IovaToPhys(IovaToPhysOp),
}

impl Op {
    /// Returns the op's name as the file spells it.
    pub const fn name(&self) -> &'static str {
        match self {
            Op::Map(_) => "map",
            Op::Unmap(_) => "unmap",
            Op::IovaToPhys(_) => "iova_to_phys",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Map(m) => write!(
                f,
                "map(iova {:#x}, pa {:#x}, pgsize {:#x}, pgcount {}, prot {:#x})",
                m.iova, m.paddr, m.pgsize, m.pgcount, m.prot
            ),
            Op::Unmap(u) => write!(
                f,
                "unmap(iova {:#x}, pgsize {:#x}, pgcount {})",
                u.iova, u.pgsize, u.pgcount
            ),
            Op::IovaToPhys(l) => write!(f, "iova_to_phys({:#x})", l.iova),
        }
    }
}

/// A `map_pages` call and its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapOp {
    /// First IOVA.
    pub iova: u64,
    /// First physical address.
    pub paddr: u64,
    /// Page size in bytes (as passed; may be invalid).
    pub pgsize: u64,
    /// Number of pages.
    pub pgcount: u64,
    /// Linux `IOMMU_*` prot bits.
    pub prot: u32,
    /// 0, or a negative errno (-22 EINVAL, -34 ERANGE, -17 EEXIST).
    pub ret: i32,
    /// Bytes mapped (the `*mapped` out-parameter).
    pub mapped: u64,
}

/// An `unmap_pages` call and its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapOp {
    /// First IOVA.
    pub iova: u64,
    /// Page size in bytes (as passed).
    pub pgsize: u64,
    /// Number of pages.
    pub pgcount: u64,
    /// Bytes unmapped (0 included).
    pub ret: u64,
}

/// An `iova_to_phys` call and its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaToPhysOp {
    /// The IOVA looked up.
    pub iova: u64,
    /// The output address, or 0 for "no translation".
    pub ret: u64,
}

/// The tree after the last op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalState {
    /// Every valid leaf, in ascending IOVA order.
    pub leaves: Vec<Leaf>,
    /// Table pages reachable per level (empty ones included; the root once at its level);
    /// keys run from the start level to 3.
    pub tables_per_level: BTreeMap<u32, u64>,
    /// Table allocations over the case (the root is one; informational).
    pub table_pages_allocated_total: u64,
    /// Tables freed before teardown (informational).
    pub table_pages_freed_total: u64,
}

impl FinalState {
    /// The table count per level that an implementation which frees empty tables would have:
    /// the root once, plus every distinct table on the path of some leaf (the README's
    /// "derived table count"). Keys run from `cfg.start_level()` to 3, zeros included.
    pub fn derived_tables_per_level(&self, cfg: &Config) -> BTreeMap<u32, u64> {
        derived_tables_per_level(cfg, self.leaves.iter().map(|l| (l.iova, l.level)))
    }
}

/// Computes the derived table count of the leaves `(iova, level)` under `cfg`.
pub(crate) fn derived_tables_per_level(
    cfg: &Config,
    leaves: impl IntoIterator<Item = (u64, u32)>,
) -> BTreeMap<u32, u64> {
    let start = cfg.start_level();
    let ias_mask = if cfg.ias() >= 64 {
        u64::MAX
    } else {
        (1u64 << cfg.ias()) - 1
    };
    let mut ids: BTreeMap<u32, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for (iova, level) in leaves {
        let iova = iova & ias_mask;
        for l in start + 1..=level.min(3) {
            ids.entry(l)
                .or_default()
                .insert(iova >> cfg.level_shift(l - 1));
        }
    }
    (start..=3)
        .map(|l| {
            let n = if l == start {
                1
            } else {
                ids.get(&l).map_or(0, |s| s.len() as u64)
            };
            (l, n)
        })
        .collect()
}

/// One valid leaf descriptor of the final tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Leaf {
    /// First IOVA the leaf maps (TTBR1: upper bits set).
    pub iova: u64,
    /// ARM level (0 top, 3 last).
    pub level: u32,
    /// The whole 64-bit descriptor.
    pub pte: u64,
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{iova {:#x}, level {}, pte {:#x}}}",
            self.iova, self.level, self.pte
        )
    }
}

/// TLB maintenance counts Linux recorded (informational).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flushes {
    /// `tlb_flush_walk` calls.
    pub walk: u64,
    /// `tlb_add_page` calls.
    pub add_page: u64,
    /// `tlb_flush_all` calls (the teardown).
    pub all: u64,
}

impl Case {
    /// Returns [`Case::kind`] as one of the matrix's kinds, or `None` for any other name.
    pub fn matrix_kind(&self) -> Option<Kind> {
        Kind::from_name(&self.kind)
    }

    /// The inputs to build this case's configuration with: the file's format, bitmap,
    /// address sizes, quirks and walk coherency, and a 4 KiB preferred granule (the host page
    /// size the data was recorded with).
    pub fn config_input(&self) -> ConfigInput {
        ConfigInput::new(
            self.format,
            PageSizes::from_bits(self.pgsize_bitmap_in),
            self.ias_in,
            self.oas_in,
        )
        .with_quirks(Quirks::from_bits_retain(self.quirks))
        .with_coherent_walk(self.coherent_walk)
        .with_preferred_granule(Granule::K4)
    }

    /// Returns whether Linux failed to allocate the table.
    pub fn alloc_failed(&self) -> bool {
        matches!(self.outcome, Outcome::AllocFailed)
    }

    /// Returns what followed the allocation, if it succeeded.
    pub fn allocated(&self) -> Option<&Allocated> {
        match &self.outcome {
            Outcome::AllocFailed => None,
            Outcome::Allocated(a) => Some(a),
        }
    }

    /// Returns the recorded ops (none when allocation failed).
    pub fn ops(&self) -> &[Op] {
        self.allocated().map_or(&[], |a| &a.ops)
    }
}

/// Parses JSON Lines text in the matrix's schema: one case a line, in ascending case order.
///
/// The schema is a public interface, so that users can replay sets they record themselves:
/// `kind` may be any string, and case numbers may start anywhere and skip values; they must
/// only increase from line to line. Blank lines are skipped.
///
/// # Errors
///
/// [`GoldenError::Parse`] for the first line that is not a valid case,
/// [`GoldenError::OutOfOrder`] for the first case whose number is not larger than the
/// previous case's.
pub fn parse(text: &str) -> Result<Vec<Case>, GoldenError> {
    let mut cases: Vec<Case> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let raw: raw::Case = serde_json::from_str(line).map_err(|source| GoldenError::Parse {
            line: i + 1,
            source,
        })?;
        let case = raw.into_case().map_err(|msg| GoldenError::Parse {
            line: i + 1,
            source: <serde_json::Error as serde::de::Error>::custom(msg),
        })?;
        if let Some(prev) = cases.last() {
            if case.number <= prev.number {
                return Err(GoldenError::OutOfOrder {
                    line: i + 1,
                    expected: prev.number + 1,
                    found: case.number,
                });
            }
        }
        cases.push(case);
    }
    Ok(cases)
}

/// The serde shapes of the file, converted into the public types after parsing.
mod raw {
    use std::collections::BTreeMap;

    use iopt_api::{Format, Tcr, Vtcr};
    use serde::{Deserialize, Deserializer, de::Error as _};

    fn hex<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        let digits = s
            .strip_prefix("0x")
            .ok_or_else(|| D::Error::custom(format!("hex value {s:?} lacks the 0x prefix")))?;
        u64::from_str_radix(digits, 16)
            .map_err(|e| D::Error::custom(format!("bad hex value {s:?}: {e}")))
    }

    fn opt_hex<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        hex(d).map(Some)
    }

    fn format<'de, D: Deserializer<'de>>(d: D) -> Result<Format, D::Error> {
        let s = String::deserialize(d)?;
        Format::from_linux_name(&s).ok_or_else(|| D::Error::custom(format!("unknown format {s:?}")))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Case {
        #[serde(rename = "case")]
        number: usize,
        semantics: String,
        kind: String,
        #[serde(deserialize_with = "format")]
        fmt: Format,
        #[serde(deserialize_with = "hex")]
        pgsize_bitmap_in: u64,
        ias_in: u32,
        oas_in: u32,
        #[serde(deserialize_with = "hex")]
        quirks: u64,
        coherent_walk: bool,
        #[serde(default)]
        alloc_failed: bool,
        cfg_out: Option<CfgOut>,
        geom: Option<Geom>,
        ops: Option<Vec<super::Op>>,
        #[serde(rename = "final")]
        final_state: Option<FinalState>,
        flushes: Option<Flushes>,
        warnings: u32,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CfgOut {
        #[serde(deserialize_with = "hex")]
        pgsize_bitmap: u64,
        ias: u32,
        oas: u32,
        tcr: Option<RawTcr>,
        #[serde(default, deserialize_with = "opt_hex")]
        mair: Option<u64>,
        vtcr: Option<RawVtcr>,
        #[serde(default, deserialize_with = "opt_hex")]
        memattr: Option<u64>,
        #[serde(default, deserialize_with = "opt_hex")]
        transtab_low_bits: Option<u64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawTcr {
        ips: u8,
        tg: u8,
        sh: u8,
        orgn: u8,
        irgn: u8,
        tsz: u8,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawVtcr {
        ps: u8,
        tg: u8,
        sh: u8,
        orgn: u8,
        irgn: u8,
        sl: u8,
        tsz: u8,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Geom {
        #[serde(deserialize_with = "hex")]
        granule: u64,
        start_level: u32,
        pgd_entries: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct FinalState {
        leaves: Vec<Leaf>,
        tables_per_level: BTreeMap<u32, u64>,
        table_pages_allocated_total: u64,
        table_pages_freed_total: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Leaf {
        #[serde(deserialize_with = "hex")]
        iova: u64,
        level: u32,
        #[serde(deserialize_with = "hex")]
        pte: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Flushes {
        walk: u64,
        add_page: u64,
        all: u64,
    }

    #[derive(Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum Op {
        Map(MapOp),
        Unmap(UnmapOp),
        IovaToPhys(IovaToPhysOp),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MapOp {
        #[serde(deserialize_with = "hex")]
        iova: u64,
        #[serde(deserialize_with = "hex")]
        paddr: u64,
        #[serde(deserialize_with = "hex")]
        pgsize: u64,
        pgcount: u64,
        prot: u32,
        ret: i32,
        #[serde(deserialize_with = "hex")]
        mapped: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct UnmapOp {
        #[serde(deserialize_with = "hex")]
        iova: u64,
        #[serde(deserialize_with = "hex")]
        pgsize: u64,
        pgcount: u64,
        #[serde(deserialize_with = "hex")]
        ret: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct IovaToPhysOp {
        #[serde(deserialize_with = "hex")]
        iova: u64,
        #[serde(deserialize_with = "hex")]
        ret: u64,
    }

    impl<'de> Deserialize<'de> for super::Op {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(match Op::deserialize(d)? {
                Op::Map(m) => super::Op::Map(super::MapOp {
                    iova: m.iova,
                    paddr: m.paddr,
                    pgsize: m.pgsize,
                    pgcount: m.pgcount,
                    prot: m.prot,
                    ret: m.ret,
                    mapped: m.mapped,
                }),
                Op::Unmap(u) => super::Op::Unmap(super::UnmapOp {
                    iova: u.iova,
                    pgsize: u.pgsize,
                    pgcount: u.pgcount,
                    ret: u.ret,
                }),
                Op::IovaToPhys(l) => super::Op::IovaToPhys(super::IovaToPhysOp {
                    iova: l.iova,
                    ret: l.ret,
                }),
            })
        }
    }

    impl Case {
        /// Checks that the case has exactly the fields its outcome and format call for.
        pub(super) fn into_case(self) -> Result<super::Case, String> {
            let n = self.number;
            let outcome = if self.alloc_failed {
                if self.cfg_out.is_some()
                    || self.geom.is_some()
                    || self.ops.is_some()
                    || self.final_state.is_some()
                    || self.flushes.is_some()
                {
                    return Err(format!("case {n}: alloc_failed with table outputs"));
                }
                super::Outcome::AllocFailed
            } else {
                let missing = |what: &str| format!("case {n}: allocated but no {what}");
                let cfg_out = self.cfg_out.ok_or_else(|| missing("cfg_out"))?;
                let geom = self.geom.ok_or_else(|| missing("geom"))?;
                let ops = self.ops.ok_or_else(|| missing("ops"))?;
                let fin = self.final_state.ok_or_else(|| missing("final"))?;
                let flushes = self.flushes.ok_or_else(|| missing("flushes"))?;
                let regs = regs_out(n, self.fmt, &cfg_out)?;
                super::Outcome::Allocated(Box::new(super::Allocated {
                    cfg_out: super::CfgOut {
                        pgsize_bitmap: cfg_out.pgsize_bitmap,
                        ias: cfg_out.ias,
                        oas: cfg_out.oas,
                        regs,
                    },
                    geom: super::Geom {
                        granule: geom.granule,
                        start_level: geom.start_level,
                        pgd_entries: geom.pgd_entries,
                    },
                    ops,
                    final_state: super::FinalState {
                        leaves: fin
                            .leaves
                            .into_iter()
                            .map(|l| super::Leaf {
                                iova: l.iova,
                                level: l.level,
                                pte: l.pte,
                            })
                            .collect(),
                        tables_per_level: fin.tables_per_level,
                        table_pages_allocated_total: fin.table_pages_allocated_total,
                        table_pages_freed_total: fin.table_pages_freed_total,
                    },
                    flushes: super::Flushes {
                        walk: flushes.walk,
                        add_page: flushes.add_page,
                        all: flushes.all,
                    },
                }))
            };
            Ok(super::Case {
                number: n,
                semantics: self.semantics,
                kind: self.kind,
                format: self.fmt,
                pgsize_bitmap_in: self.pgsize_bitmap_in,
                ias_in: self.ias_in,
                oas_in: self.oas_in,
                quirks: self.quirks,
                coherent_walk: self.coherent_walk,
                warnings: self.warnings,
                outcome,
            })
        }
    }

    fn regs_out(n: usize, fmt: Format, c: &CfgOut) -> Result<super::RegsOut, String> {
        let extra = |what: &str| format!("case {n}: {fmt} cfg_out has {what}");
        let need = |what: &str| format!("case {n}: {fmt} cfg_out lacks {what}");
        if fmt.is_stage1() {
            if c.vtcr.is_some() || c.memattr.is_some() || c.transtab_low_bits.is_some() {
                return Err(extra("stage-2 or Mali fields"));
            }
            let t = c.tcr.as_ref().ok_or_else(|| need("tcr"))?;
            Ok(super::RegsOut::Stage1 {
                tcr: Tcr {
                    ips: t.ips,
                    tg: t.tg,
                    sh: t.sh,
                    orgn: t.orgn,
                    irgn: t.irgn,
                    tsz: t.tsz,
                },
                mair: c.mair.ok_or_else(|| need("mair"))?,
            })
        } else if fmt.is_stage2() {
            if c.tcr.is_some() || c.mair.is_some() || c.memattr.is_some() {
                return Err(extra("stage-1 or Mali fields"));
            }
            if c.transtab_low_bits.is_some() {
                return Err(extra("transtab_low_bits"));
            }
            let v = c.vtcr.as_ref().ok_or_else(|| need("vtcr"))?;
            Ok(super::RegsOut::Stage2 {
                vtcr: Vtcr {
                    ps: v.ps,
                    tg: v.tg,
                    sh: v.sh,
                    orgn: v.orgn,
                    irgn: v.irgn,
                    sl: v.sl,
                    tsz: v.tsz,
                },
            })
        } else {
            if c.tcr.is_some() || c.mair.is_some() || c.vtcr.is_some() {
                return Err(extra("stage-1 or stage-2 fields"));
            }
            Ok(super::RegsOut::Mali {
                memattr: c.memattr.ok_or_else(|| need("memattr"))?,
                transtab_low_bits: c
                    .transtab_low_bits
                    .ok_or_else(|| need("transtab_low_bits"))?,
            })
        }
    }
}
