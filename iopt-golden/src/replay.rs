//! Replaying a case against an [`IoPageTable`] and judging the result by the README's rules.

use core::fmt;
use core::ops::Deref;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use iopt_api::{
    Config, Format, Gather, IoPageTable, Iova, MapError, PageSize, PhysAddr, Prot, Registers,
    UnmapError, WalkItem,
};

use crate::case::{Allocated, Case, IovaToPhysOp, Leaf, MapOp, Op, RegsOut, UnmapOp};

/// Linux's `EINVAL`, as a negative return value.
const EINVAL: i32 = -22;
/// Linux's `ERANGE`.
const ERANGE: i32 = -34;
/// Linux's `EEXIST`.
const EEXIST: i32 = -17;
/// Linux's `ENOMEM`.
const ENOMEM: i32 = -12;
/// What an iopt error with no Linux counterpart is reported as (`EIO`).
const EIO: i32 = -5;

/// Where in a case a comparison was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Step {
    /// Whether the configuration is accepted.
    Allocation,
    /// The configuration outputs (bitmap, address sizes, registers).
    CfgOut,
    /// The walk geometry.
    Geom,
    /// The op at this index of the case's op list.
    Op {
        /// Index in [`Case::ops`].
        index: usize,
        /// The op's name.
        name: &'static str,
    },
    /// The final leaf list.
    FinalLeaves,
    /// The final table count per level.
    TableCounts,
    /// The table under test panicked.
    Panic,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Allocation => f.write_str("allocation"),
            Step::CfgOut => f.write_str("cfg_out"),
            Step::Geom => f.write_str("geom"),
            Step::Op { index, name } => write!(f, "op {index} ({name})"),
            Step::FinalLeaves => f.write_str("final leaves"),
            Step::TableCounts => f.write_str("tables_per_level"),
            Step::Panic => f.write_str("panic"),
        }
    }
}

/// A difference from Linux that the README does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Where it was found.
    pub step: Step,
    /// What differed, with Linux's value and iopt's.
    pub message: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

/// A difference from Linux that the README (and the architecture's "Where iopt deliberately
/// differs from Linux") allows, under the condition stated for each.
///
/// Some differences leave the two trees different ([`AllowedDifference::diverges`]): Linux
/// changed its tree and iopt did not. The replay then resynchronises: it makes the changes
/// Linux made through the table's public API, checks that the leaves of the affected range
/// now agree, counts a resynchronisation and goes on with the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum AllowedDifference {
    /// MAIR differs only above bit 31 (Linux sign-extends `0xf404ff44`).
    MairSignExtension,
    /// A map or unmap was rejected as misaligned, and its iova or pa is not a multiple of
    /// `pgsize`. Where Linux completed the call and only the iova was misaligned, the replay
    /// makes the call at the iova rounded down (what Linux's index arithmetic did); a
    /// misaligned pa ends up in Linux's descriptor as it is, which iopt cannot write, so that
    /// case stops there.
    MisalignedRejected,
    /// A run was rejected because its end leaves the IAS/OAS while its start does not.
    RangeEndRejected,
    /// `iova_to_phys` of an iova outside the input range answered "no translation".
    IovaToPhysOutOfRange,
    /// Linux mapped fewer pages than asked in one call; iopt was driven with Linux's count.
    ShortMapRun,
    /// Linux unmapped fewer pages than asked in one call; iopt was driven with Linux's count.
    ShortUnmapRun,
    /// Linux's block map succeeded over entries holding tables with leaves (it discarded
    /// them); iopt refused with `AlreadyMapped` and changed nothing. Checked: no leaf at the
    /// map's level or above it in the run, and a leaf below it in the run. Diverging.
    BlockOverLiveTableRejected,
    /// Linux's block map answered -EEXIST after tearing down the tables at entries of its run
    /// before the first leaf (their mappings discarded); iopt answered -EEXIST too but changed
    /// nothing. Checked: iopt's tree has a table at one of those entries and a leaf at the
    /// first entry Linux stopped at, and iopt's leaves are unchanged by the call. Diverging,
    /// never agreement.
    EexistAfterTeardown,
    /// Linux's unmap cleared an empty table entry (which counts `pgsize`) that iopt had
    /// already freed because it emptied, so iopt unmapped less. Checked: iopt holds no leaf
    /// anywhere in the part of the range Linux cleared and iopt did not.
    EagerFreedEmptyTable,
    /// Linux's unmap run mixed entries iopt holds with empty tables iopt had freed; iopt's
    /// unmap, all or nothing, refused the run. Checked: driven one entry at a time, every
    /// entry iopt holds unmaps whole and every entry it refuses holds no leaf. Counted apart
    /// from [`AllowedDifference::EagerFreedEmptyTable`] because iopt held leaves in Linux's
    /// range: it takes eager freeing and all-or-nothing unmaps together to explain it.
    /// Resynchronised by those per-entry calls.
    EagerFreedEntryInRun,
    /// Linux and iopt both refused a map before touching the tree, with different errnos.
    /// Checked: Linux's errno is the one its checks give in their order (page size in the
    /// bitmap, then the start's range, then the prot), and iopt's error states a condition
    /// that holds for the call's arguments.
    ErrorPrecedence,
    /// Linux's map with a page size that is in the bitmap but is no level's block size
    /// (larger than the walk's top level maps) descended to the last level, allocating every
    /// missing table on the path, and answered -EINVAL there; iopt refused it with
    /// `InvalidPageSize` before touching the tree. Checked: Linux's pre-walk checks pass, no
    /// level maps that size, Linux answered -EINVAL. Diverging in empty tables only: the
    /// replay maps and unmaps one granule page at the iova, which builds the same path. Also
    /// counted when Linux's descent met a block on the path and answered -EEXIST (checked: a
    /// leaf above the last level translates the iova); nothing changed then.
    OversizedPageSizeRejected,
    /// `tables_per_level` differs, but equals the count derived from the leaves: the
    /// implementation freed tables that Linux keeps empty.
    DerivedTableCount,
}

impl AllowedDifference {
    /// Every kind.
    pub const ALL: [AllowedDifference; 13] = [
        AllowedDifference::MairSignExtension,
        AllowedDifference::MisalignedRejected,
        AllowedDifference::RangeEndRejected,
        AllowedDifference::IovaToPhysOutOfRange,
        AllowedDifference::ShortMapRun,
        AllowedDifference::ShortUnmapRun,
        AllowedDifference::BlockOverLiveTableRejected,
        AllowedDifference::EexistAfterTeardown,
        AllowedDifference::EagerFreedEmptyTable,
        AllowedDifference::EagerFreedEntryInRun,
        AllowedDifference::ErrorPrecedence,
        AllowedDifference::OversizedPageSizeRejected,
        AllowedDifference::DerivedTableCount,
    ];

    /// Returns a stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            AllowedDifference::MairSignExtension => "mair_sign_extension",
            AllowedDifference::MisalignedRejected => "misaligned_rejected",
            AllowedDifference::RangeEndRejected => "range_end_rejected",
            AllowedDifference::IovaToPhysOutOfRange => "iova_to_phys_out_of_range",
            AllowedDifference::ShortMapRun => "short_map_run",
            AllowedDifference::ShortUnmapRun => "short_unmap_run",
            AllowedDifference::BlockOverLiveTableRejected => "block_over_live_table_rejected",
            AllowedDifference::EexistAfterTeardown => "eexist_after_teardown",
            AllowedDifference::EagerFreedEmptyTable => "eager_freed_empty_table",
            AllowedDifference::EagerFreedEntryInRun => "eager_freed_entry_in_run",
            AllowedDifference::ErrorPrecedence => "error_precedence",
            AllowedDifference::OversizedPageSizeRejected => "oversized_page_size_rejected",
            AllowedDifference::DerivedTableCount => "derived_table_count",
        }
    }

    /// Returns whether this difference leaves Linux's tree and iopt's different when it
    /// occurs on a call Linux completed (the replay resynchronises, or stops if it cannot).
    pub const fn diverges(self) -> bool {
        matches!(
            self,
            AllowedDifference::MisalignedRejected
                | AllowedDifference::RangeEndRejected
                | AllowedDifference::BlockOverLiveTableRejected
                | AllowedDifference::EexistAfterTeardown
                | AllowedDifference::EagerFreedEntryInRun
                | AllowedDifference::OversizedPageSizeRejected
        )
    }
}

impl fmt::Display for AllowedDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the op replay of a case ended before its last op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// The op at `op` mismatched; later ops depend on the tree state, so none was run and
    /// the final state was not compared.
    Mismatch {
        /// Index of the op.
        op: usize,
    },
    /// The op at `op` differed in an allowed way that leaves the two trees different and
    /// that the public API cannot undo (iopt refuses the call Linux completed); later ops and
    /// the final state cannot be compared.
    Diverged {
        /// Index of the op.
        op: usize,
        /// The allowed difference.
        difference: AllowedDifference,
    },
    /// The table under test panicked.
    Panicked,
}

/// A diverging allowed difference after which the replay brought iopt's tree to Linux's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resync {
    /// Index of the op in [`Case::ops`].
    pub op: usize,
    /// The difference.
    pub difference: AllowedDifference,
    /// Leaves iopt still held that Linux had discarded, removed by the resynchronisation.
    pub leaves_removed: usize,
}

/// The result of checking one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    /// The case number.
    pub case: usize,
    /// The case's kind, as its file names it.
    pub kind: String,
    /// The case's format.
    pub format: Format,
    /// Whether Linux failed to allocate the table.
    pub linux_alloc_failed: bool,
    /// Ops the case records.
    pub ops_total: usize,
    /// Ops run and compared (the last one may be the mismatching one).
    pub ops_replayed: usize,
    /// Whether the final leaves and table counts were compared.
    pub final_compared: bool,
    /// Linux leaves compared (0 unless `final_compared`).
    pub leaves_compared: usize,
    /// Why the replay ended early, if it did.
    pub stopped: Option<Stop>,
    /// Differences the README does not allow. Empty means the case passed.
    pub mismatches: Vec<Mismatch>,
    /// Allowed differences met, by kind.
    pub allowed: BTreeMap<AllowedDifference, u64>,
    /// The resynchronisations made, in op order.
    pub resyncs: Vec<Resync>,
    /// Informational differences (never a failure).
    pub notes: Vec<String>,
}

impl CaseReport {
    fn new(case: &Case) -> Self {
        Self {
            case: case.number,
            kind: case.kind.clone(),
            format: case.format,
            linux_alloc_failed: case.alloc_failed(),
            ops_total: case.ops().len(),
            ops_replayed: 0,
            final_compared: false,
            leaves_compared: 0,
            stopped: None,
            mismatches: Vec::new(),
            allowed: BTreeMap::new(),
            resyncs: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Returns whether the case matched Linux (allowed differences aside).
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }

    fn mismatch(&mut self, step: Step, message: String) {
        self.mismatches.push(Mismatch { step, message });
    }

    fn allow(&mut self, difference: AllowedDifference) {
        *self.allowed.entry(difference).or_default() += 1;
    }

    fn field<T: Copy + PartialEq + fmt::Debug>(
        &mut self,
        step: Step,
        name: &str,
        linux: T,
        iopt: T,
    ) {
        if linux != iopt {
            self.mismatch(step, format!("{name}: Linux {linux:#x?}, iopt {iopt:#x?}"));
        }
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "case {} ({}, {}): {}, {}/{} ops",
            self.case,
            self.kind,
            self.format,
            if self.passed() { "pass" } else { "FAIL" },
            self.ops_replayed,
            self.ops_total
        )?;
        if let Some(stop) = self.stopped {
            write!(f, ", stopped: {stop:?}")?;
        }
        if !self.resyncs.is_empty() {
            write!(f, ", {} resyncs", self.resyncs.len())?;
        }
        for (k, n) in &self.allowed {
            write!(f, ", {k} x{n}")?;
        }
        for m in &self.mismatches {
            write!(f, "\n  {m}")?;
        }
        for n in &self.notes {
            write!(f, "\n  note: {n}")?;
        }
        Ok(())
    }
}

/// Checks only what a [`Config`] can answer, without a table: the allocation outcome, the
/// restricted bitmap, the clamped address sizes and the geometry.
pub fn check_config(case: &Case) -> CaseReport {
    let mut report = CaseReport::new(case);
    let _ = configure(case, &mut report);
    report
}

/// Replays `case` against a table built by `build` and compares everything the README lists:
/// allocation outcome, `cfg_out` (registers read from the table), geometry, every op in
/// order (each recorded call made exactly once; stopping at the first mismatch), the final
/// leaves bit for bit and the table count per level.
///
/// Around a block map the replay reads the table's tree over the run (through
/// [`IoPageTable::walk`]) to judge the call's effect, not only its answer. After a diverging
/// allowed difference it makes further calls of its own (unmaps of the entries Linux tore
/// down, the map Linux completed, or one granule page mapped and unmapped to build the path
/// Linux built), checks the leaves of the run, and records a [`Resync`] in the report.
///
/// `build` is called once, only when the configuration is accepted, with a fresh [`Config`];
/// it may return any owner of the table (`Box<T>`, `Box<dyn IoPageTable>`, `Arc<T>`, `&T`).
/// A panic in `build` or in the table is caught and reported as a [`Step::Panic`] mismatch.
pub fn replay<B>(case: &Case, build: impl FnOnce(Config) -> B) -> CaseReport
where
    B: Deref<Target: IoPageTable>,
{
    let mut report = CaseReport::new(case);
    let Some((cfg, golden)) = configure(case, &mut report) else {
        return report;
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let table = build(cfg);
        run(&*table, &cfg, golden, &mut report);
    }));
    if let Err(payload) = result {
        let what = payload
            .downcast_ref::<&str>()
            .map(ToString::to_string)
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        let message = format!(
            "table panicked ({} of {} ops started): {what}",
            report.ops_replayed, report.ops_total
        );
        report.mismatch(Step::Panic, message);
        report.stopped = Some(Stop::Panicked);
    }
    report
}

/// Replays every case with tables from `build` and aggregates the reports.
pub fn replay_all<B>(cases: &[Case], mut build: impl FnMut(Config) -> B) -> Summary
where
    B: Deref<Target: IoPageTable>,
{
    Summary::from_reports(cases.iter().map(|c| replay(c, &mut build)).collect())
}

/// Steps 2 and the table-free part of 3: allocation outcome, bitmap, ias/oas, geometry.
fn configure<'c>(case: &'c Case, report: &mut CaseReport) -> Option<(Config, &'c Allocated)> {
    let result = Config::new(case.config_input());
    let golden = match (case.allocated(), result) {
        (None, Err(_)) => return None,
        (None, Ok(cfg)) => {
            report.mismatch(
                Step::Allocation,
                format!(
                    "Linux failed allocation, iopt accepted it (granule {:#x}, start level {}, \
                     {} root entries, bitmap {:#x}, ias {}, oas {})",
                    cfg.granule().size(),
                    cfg.start_level(),
                    cfg.pgd_entries(),
                    cfg.page_sizes().bits(),
                    cfg.ias(),
                    cfg.oas()
                ),
            );
            return None;
        }
        (Some(_), Err(e)) => {
            report.mismatch(
                Step::Allocation,
                format!("Linux allocated the table, iopt rejected the configuration: {e}"),
            );
            return None;
        }
        (Some(golden), Ok(cfg)) => (cfg, golden),
    };
    let (cfg, a) = golden;
    let out = &a.cfg_out;
    report.field(
        Step::CfgOut,
        "pgsize_bitmap",
        out.pgsize_bitmap,
        cfg.page_sizes().bits(),
    );
    report.field(Step::CfgOut, "ias", out.ias, cfg.ias());
    report.field(Step::CfgOut, "oas", out.oas, cfg.oas());
    report.field(Step::Geom, "granule", a.geom.granule, cfg.granule().size());
    report.field(
        Step::Geom,
        "start_level",
        a.geom.start_level,
        cfg.start_level(),
    );
    report.field(
        Step::Geom,
        "pgd_entries",
        a.geom.pgd_entries,
        cfg.pgd_entries() as u64,
    );
    Some((cfg, a))
}

/// Registers, ops, final state.
fn run<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    golden: &Allocated,
    report: &mut CaseReport,
) {
    compare_registers(table, golden.cfg_out.regs, report);
    for (index, op) in golden.ops.iter().enumerate() {
        report.ops_replayed = index + 1;
        let at = At {
            index,
            step: Step::Op {
                index,
                name: op.name(),
            },
        };
        let stop = match op {
            Op::Map(m) => replay_map(table, cfg, m, at, report),
            Op::Unmap(u) => replay_unmap(table, cfg, u, at, report),
            Op::IovaToPhys(l) => replay_lookup(table, cfg, l, at.step, report),
        };
        if let Some(stop) = stop.map(|s| s.at(index)) {
            report.stopped = Some(stop);
            return;
        }
    }
    compare_final(table, cfg, golden, report);
}

/// The position of the op being replayed.
#[derive(Clone, Copy)]
struct At {
    index: usize,
    step: Step,
}

/// How an op ended the replay, before the op index is known.
enum OpStop {
    Mismatch,
    Diverged(AllowedDifference),
}

impl OpStop {
    fn at(self, op: usize) -> Stop {
        match self {
            OpStop::Mismatch => Stop::Mismatch { op },
            OpStop::Diverged(difference) => Stop::Diverged { op, difference },
        }
    }
}
fn compare_registers<T: IoPageTable + ?Sized>(table: &T, golden: RegsOut, report: &mut CaseReport) {
    let s = Step::CfgOut;
    match (golden, table.registers()) {
        (
            RegsOut::Stage1 { tcr, mair },
            Registers::Stage1 {
                tcr: t, mair: m, ..
            },
        ) => {
            report.field(s, "tcr.ips", tcr.ips, t.ips);
            report.field(s, "tcr.tg", tcr.tg, t.tg);
            report.field(s, "tcr.sh", tcr.sh, t.sh);
            report.field(s, "tcr.orgn", tcr.orgn, t.orgn);
            report.field(s, "tcr.irgn", tcr.irgn, t.irgn);
            report.field(s, "tcr.tsz", tcr.tsz, t.tsz);
            if m != mair {
                if m as u32 == mair as u32 {
                    report.allow(AllowedDifference::MairSignExtension);
                } else {
                    report.mismatch(
                        s,
                        format!("mair (low 32 bits): Linux {mair:#x}, iopt {m:#x}"),
                    );
                }
            }
        }
        (RegsOut::Stage2 { vtcr }, Registers::Stage2 { vtcr: v, .. }) => {
            report.field(s, "vtcr.ps", vtcr.ps, v.ps);
            report.field(s, "vtcr.tg", vtcr.tg, v.tg);
            report.field(s, "vtcr.sh", vtcr.sh, v.sh);
            report.field(s, "vtcr.orgn", vtcr.orgn, v.orgn);
            report.field(s, "vtcr.irgn", vtcr.irgn, v.irgn);
            report.field(s, "vtcr.sl", vtcr.sl, v.sl);
            report.field(s, "vtcr.tsz", vtcr.tsz, v.tsz);
        }
        (
            RegsOut::Mali {
                memattr,
                transtab_low_bits,
            },
            Registers::Mali {
                transtab,
                memattr: m,
            },
        ) => {
            report.field(s, "memattr", memattr, m);
            let root = table.root().get();
            report.field(s, "transtab & !root", transtab_low_bits, transtab & !root);
        }
        (golden, other) => {
            report.mismatch(
                s,
                format!("register set: Linux {golden:x?}, iopt {other:x?}"),
            );
        }
    }
}

/// What iopt answered, in Linux's terms.
struct Answer {
    ret: i32,
    mapped: u64,
    detail: String,
}

fn map_errno(e: &MapError) -> i32 {
    match e {
        MapError::InvalidPageSize { .. }
        | MapError::NoAccess { .. }
        | MapError::Misaligned { .. }
        | MapError::Empty { .. } => EINVAL,
        MapError::IovaOutOfRange { .. }
        | MapError::PaOutOfRange { .. }
        | MapError::Overflow { .. } => ERANGE,
        MapError::AlreadyMapped { .. } => EEXIST,
        MapError::Alloc { .. } => ENOMEM,
        _ => EIO,
    }
}

/// The last byte of a run, or `None` if it passes 2^64 (or the run is empty).
fn run_last(start: u64, len: Option<u64>) -> Option<u64> {
    len.and_then(|l| l.checked_sub(1))
        .and_then(|l| start.checked_add(l))
}

/// Whether a run starts inside the input (and output) range but ends outside it.
fn end_only_out_of_range(cfg: &Config, iova: u64, pa: Option<u64>, len: Option<u64>) -> bool {
    let iova_start_in = cfg.iova_in_range(Iova::new(iova));
    let iova_end_in = run_last(iova, len).is_some_and(|e| cfg.iova_in_range(Iova::new(e)));
    let (pa_start_in, pa_end_in) = match pa {
        None => (true, true),
        Some(pa) => (
            cfg.pa_in_range(PhysAddr::new(pa)),
            run_last(pa, len).is_some_and(|e| cfg.pa_in_range(PhysAddr::new(e))),
        ),
    };
    iova_start_in && pa_start_in && !(iova_end_in && pa_end_in)
}

/// The errno Linux's `arm_lpae_map_pages` returns before it walks, from its checks in their
/// order: the page size must be one bit of the bitmap (-EINVAL), the start iova and paddr in
/// range (-ERANGE), the prot must grant READ or WRITE (-EINVAL). `None` if all pass.
fn linux_map_precheck(cfg: &Config, op: &MapOp) -> Option<i32> {
    let bitmap = cfg.page_sizes().bits();
    if op.pgsize == 0 || !op.pgsize.is_power_of_two() || bitmap & op.pgsize != op.pgsize {
        return Some(EINVAL);
    }
    if !cfg.iova_in_range(Iova::new(op.iova)) || !cfg.pa_in_range(PhysAddr::new(op.paddr)) {
        return Some(ERANGE);
    }
    if !Prot::from_bits_retain(op.prot).is_accessible() {
        return Some(EINVAL);
    }
    None
}

/// The table pages the table holds, the root included.
fn count_tables<T: IoPageTable + ?Sized>(table: &T) -> usize {
    let mut n = 0;
    table.walk(&mut |item| n += usize::from(matches!(item, WalkItem::Table { .. })));
    n
}

/// Whether no level of the walk has leaves of `pgsize` (a power of two).
fn no_level_maps(cfg: &Config, pgsize: u64) -> bool {
    !(cfg.start_level()..=3).any(|l| cfg.block_size(l) == pgsize)
}

/// Whether the condition iopt's map error states holds for the call's arguments (so the
/// refusal is justified, whatever Linux checked first).
fn map_error_holds(cfg: &Config, op: &MapOp, e: &MapError) -> bool {
    let len = op.pgsize.checked_mul(op.pgcount);
    let span = 1u64.checked_shl(cfg.ias()).unwrap_or(u64::MAX);
    match e {
        MapError::InvalidPageSize { .. } => {
            // Not in the bitmap, or no level of this walk has leaves of that size (a block
            // as large as the whole input range or above the start level).
            PageSize::new(op.pgsize).is_none_or(|s| !cfg.page_sizes().contains(s))
                || op.pgsize >= span
                || no_level_maps(cfg, op.pgsize)
        }
        MapError::NoAccess { .. } => !Prot::from_bits_retain(op.prot).is_accessible(),
        MapError::IovaOutOfRange { .. } => {
            !cfg.iova_in_range(Iova::new(op.iova))
                || run_last(op.iova, len).is_none_or(|e| !cfg.iova_in_range(Iova::new(e)))
        }
        MapError::PaOutOfRange { .. } => {
            !cfg.pa_in_range(PhysAddr::new(op.paddr))
                || run_last(op.paddr, len).is_none_or(|e| !cfg.pa_in_range(PhysAddr::new(e)))
        }
        MapError::Misaligned { .. } => op.iova % op.pgsize != 0 || op.paddr % op.pgsize != 0,
        MapError::Empty { .. } => op.pgcount == 0,
        MapError::Overflow { .. } => {
            run_last(op.iova, len).is_none() || run_last(op.paddr, len).is_none()
        }
        _ => false,
    }
}

/// A leaf of the table under test, as a snapshot keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SnapLeaf {
    iova: u64,
    level: u32,
    size: u64,
    pa: u64,
}

impl SnapLeaf {
    fn last(&self) -> u64 {
        self.iova.saturating_add(self.size - 1)
    }
}

impl fmt::Display for SnapLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{iova {:#x}, level {}, pa {:#x}}}",
            self.iova, self.level, self.pa
        )
    }
}

/// The leaves and the non-root tables of the table under test that meet `[lo, hi]`.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    leaves: Vec<SnapLeaf>,
    /// (first iova, level) of every table page starting in the range, the root excluded.
    tables: Vec<(u64, u32)>,
}

fn snapshot<T: IoPageTable + ?Sized>(table: &T, cfg: &Config, lo: u64, hi: u64) -> Snapshot {
    let mut s = Snapshot::default();
    let root = cfg.start_level();
    table.walk(&mut |item| match item {
        WalkItem::Leaf {
            iova,
            level,
            size,
            pa,
            ..
        } => {
            let leaf = SnapLeaf {
                iova: iova.get(),
                level,
                size: size.get(),
                pa: pa.get(),
            };
            if leaf.iova <= hi && leaf.last() >= lo {
                s.leaves.push(leaf);
            }
        }
        WalkItem::Table { iova, level, .. } if level > root && (lo..=hi).contains(&iova.get()) => {
            s.tables.push((iova.get(), level));
        }
        _ => {}
    });
    s
}

fn show_leaves(leaves: &[SnapLeaf]) -> String {
    const SHOWN: usize = 4;
    let mut s: Vec<String> = leaves.iter().take(SHOWN).map(ToString::to_string).collect();
    if leaves.len() > SHOWN {
        s.push(format!("... ({} in all)", leaves.len()));
    }
    format!("[{}]", s.join(", "))
}

/// What one entry of a map's run holds, at the map's level, in the table under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Empty,
    Leaf,
    /// A table, holding this many leaves.
    Table(usize),
}

/// The run a Linux block map acts on, read from the table under test before the call.
struct RunPlan {
    /// The map's leaf size.
    block: u64,
    /// A leaf above the map's level covers the run's start (Linux: -EEXIST, nothing done).
    above: bool,
    /// The run's entries Linux looks at in one call, in order.
    entries: Vec<Entry>,
    /// The table before the call, over the run.
    before: Snapshot,
}

impl RunPlan {
    fn slot(&self, iova: u64, i: usize) -> u64 {
        iova + i as u64 * self.block
    }

    /// The entries Linux tears down before answering -EEXIST: the tables before the first
    /// leaf. `None` if Linux cannot have answered -EEXIST on this tree (no leaf on the path
    /// or in the run).
    fn eexist_teardown(&self) -> Option<Vec<usize>> {
        if self.above {
            return Some(Vec::new());
        }
        let first = self.entries.iter().position(|e| *e == Entry::Leaf)?;
        Some(
            (0..first)
                .filter(|&i| matches!(self.entries[i], Entry::Table(_)))
                .collect(),
        )
    }

    /// The leaves of `before` outside the slots `slots`.
    fn leaves_outside(&self, iova: u64, slots: &[usize]) -> Vec<SnapLeaf> {
        self.before
            .leaves
            .iter()
            .filter(|l| {
                !slots.iter().any(|&i| {
                    let s = self.slot(iova, i);
                    l.iova >= s && l.iova <= s + (self.block - 1)
                })
            })
            .copied()
            .collect()
    }
}

/// Reads the run of a map at `level` from the table, as Linux's `__arm_lpae_map` will see
/// it: at most `pgcount` entries, never past the end of one table page at that level (for a
/// concatenated root, one granule page of it).
fn plan_run<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    iova: u64,
    block: u64,
    level: u32,
    pgcount: u64,
) -> RunPlan {
    let per_page = cfg.granule().entries() as u64;
    let idx = cfg.index(iova, level) as u64 % per_page;
    let fits = (u64::MAX - iova) / block + 1;
    let n = pgcount.min(per_page - idx).min(fits).max(1);
    let hi = iova.saturating_add((n * block).saturating_sub(1));
    let before = snapshot(table, cfg, iova, hi);
    let mut entries = vec![Entry::Empty; n as usize];
    let mut above = false;
    for l in &before.leaves {
        if l.level < level {
            above |= l.iova <= iova && l.last() >= iova;
            continue;
        }
        if l.iova < iova {
            continue;
        }
        let i = ((l.iova - iova) / block) as usize;
        if i >= entries.len() {
            continue;
        }
        entries[i] = if l.level == level {
            Entry::Leaf
        } else {
            match entries[i] {
                Entry::Table(k) => Entry::Table(k + 1),
                _ => Entry::Table(1),
            }
        };
    }
    for &(t, tl) in &before.tables {
        if tl == level + 1 && t >= iova && (t - iova) % block == 0 {
            let i = ((t - iova) / block) as usize;
            if i < entries.len() && entries[i] == Entry::Empty {
                entries[i] = Entry::Table(0);
            }
        }
    }
    RunPlan {
        block,
        above,
        entries,
        before,
    }
}

/// Unmaps the entries `slots` of a run at their block size, as Linux's teardown of a table
/// entry does (the table and everything under it goes). Returns the leaves removed.
fn tear_down<T: IoPageTable + ?Sized>(
    table: &T,
    plan: &RunPlan,
    iova: u64,
    slots: &[usize],
) -> Result<usize, String> {
    let size = PageSize::new(plan.block).ok_or("block size is not a power of two")?;
    let mut removed = 0;
    for &i in slots {
        let s = plan.slot(iova, i);
        if let Entry::Table(k) = plan.entries[i] {
            removed += k;
        }
        let mut gather = Gather::new();
        match table.unmap(Iova::new(s), size, 1, &mut gather) {
            Ok(b) if b == plan.block => {}
            other => {
                return Err(format!(
                    "resync: unmap(iova {s:#x}, pgsize {:#x}, 1) of a table entry answered \
                     {other:x?}",
                    plan.block
                ));
            }
        }
    }
    Ok(removed)
}

/// Reads the table over the plan's run.
fn run_snapshot<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    iova: u64,
    plan: &RunPlan,
) -> Snapshot {
    let hi = iova.saturating_add((plan.entries.len() as u64 * plan.block).saturating_sub(1));
    snapshot(table, cfg, iova, hi)
}

/// Checks that the table holds, over the plan's run, exactly `expected`.
fn check_run<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    iova: u64,
    plan: &RunPlan,
    expected: &[SnapLeaf],
) -> Result<(), String> {
    compare_run(plan, expected, &run_snapshot(table, cfg, iova, plan).leaves)
}

fn compare_run(plan: &RunPlan, expected: &[SnapLeaf], now: &[SnapLeaf]) -> Result<(), String> {
    if now == expected {
        Ok(())
    } else {
        Err(format!(
            "leaves over the run: before the call {}, Linux's after it {}, iopt's {}",
            show_leaves(&plan.before.leaves),
            show_leaves(expected),
            show_leaves(now)
        ))
    }
}

/// The leaves a completed Linux block map leaves over its run: the entries it did not
/// reach as before, and `count` new leaves.
fn after_block_map(plan: &RunPlan, op: &MapOp, level: u32, count: u64) -> Vec<SnapLeaf> {
    let mapped: Vec<usize> = (0..count as usize).collect();
    let mut leaves = plan.leaves_outside(op.iova, &mapped);
    leaves.extend(mapped.iter().map(|&i| SnapLeaf {
        iova: plan.slot(op.iova, i),
        level,
        size: plan.block,
        pa: op.paddr + i as u64 * plan.block,
    }));
    leaves.sort_by_key(|l| l.iova);
    leaves
}

#[allow(clippy::too_many_lines)] // one decision table over Linux's and iopt's answers
fn replay_map<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &MapOp,
    at: At,
    report: &mut CaseReport,
) -> Option<OpStop> {
    let step = at.step;
    let full = op.pgsize.checked_mul(op.pgcount);
    let Some(size) = PageSize::new(op.pgsize) else {
        // Not a power of two (or zero): no call is possible; iopt's answer is InvalidPageSize.
        if (op.ret, op.mapped) == (EINVAL, 0) {
            return None;
        }
        report.mismatch(
            step,
            format!(
                "{}: Linux (ret {}, mapped {:#x}), iopt (ret {EINVAL}, mapped 0x0) [page size \
                 not a power of two, not callable]",
                Op::Map(*op),
                op.ret,
                op.mapped
            ),
        );
        return Some(OpStop::Mismatch);
    };
    // A map_pages call that stopped at a table boundary reports fewer bytes; iopt maps whole
    // runs, so it is driven with the count Linux actually mapped.
    let mut count = op.pgcount;
    if op.ret == 0
        && op.mapped > 0
        && full.is_some_and(|f| op.mapped < f)
        && op.mapped % op.pgsize == 0
    {
        count = op.mapped / op.pgsize;
        report.allow(AllowedDifference::ShortMapRun);
    }
    // A block map that Linux walked (it answered 0 or -EEXIST): read what its run holds
    // first, to see what Linux tore down.
    let level = cfg.leaf_level(size);
    // Linux's index arithmetic rounds a misaligned iova down, so its run starts there.
    let down = op.iova & !(op.pgsize - 1);
    let plan = level
        .filter(|&l| {
            l < 3 && (op.ret == 0 || op.ret == EEXIST) && linux_map_precheck(cfg, op).is_none()
        })
        .map(|l| plan_run(table, cfg, down, op.pgsize, l, op.pgcount));
    let prot = Prot::from_bits_retain(op.prot);
    let result = table.map(
        Iova::new(op.iova),
        PhysAddr::new(op.paddr),
        size,
        count,
        prot,
    );
    let ours = match &result {
        Ok(()) => Answer {
            ret: 0,
            mapped: op.pgsize.saturating_mul(count),
            detail: "Ok".to_owned(),
        },
        Err(e) => Answer {
            ret: map_errno(e),
            mapped: 0,
            detail: format!("Err({e:?})"),
        },
    };
    let fail = |report: &mut CaseReport, why: &str| {
        report.mismatch(
            step,
            format!(
                "{}: Linux (ret {}, mapped {:#x}), iopt (ret {}, mapped {:#x}) [{}]{why}",
                Op::Map(*op),
                op.ret,
                op.mapped,
                ours.ret,
                ours.mapped,
                ours.detail
            ),
        );
        Some(OpStop::Mismatch)
    };
    if let (Some(plan), Some(level), true) = (&plan, level, down == op.iova) {
        match (op.ret, &result) {
            (EEXIST, Err(MapError::AlreadyMapped { .. })) => {
                let Some(torn) = plan.eexist_teardown() else {
                    return fail(
                        report,
                        "; iopt's tree holds no leaf on the path or in the run, so Linux's \
                         -EEXIST does not follow from it",
                    );
                };
                let linux_after = plan.leaves_outside(op.iova, &torn);
                let now = run_snapshot(table, cfg, op.iova, plan);
                // The torn-down entries where the table still holds a table or leaves.
                let kept: Vec<usize> = torn
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let s = plan.slot(op.iova, i);
                        let inside = |x: u64| x >= s && x <= s + (plan.block - 1);
                        now.tables.iter().any(|&(t, tl)| tl > level && inside(t))
                            || now.leaves.iter().any(|l| inside(l.iova))
                    })
                    .collect();
                if kept.is_empty() {
                    // The table tore down what Linux did (or there was nothing to tear
                    // down): agreement, if its leaves ended where Linux's did.
                    return match compare_run(plan, &linux_after, &now.leaves) {
                        Ok(()) => None,
                        Err(e) => fail(
                            report,
                            &format!("; the answers agree but the trees do not: {e}"),
                        ),
                    };
                }
                if now.leaves != plan.before.leaves {
                    let e = compare_run(plan, &linux_after, &now.leaves)
                        .err()
                        .unwrap_or_default();
                    return fail(
                        report,
                        &format!(
                            "; the table changed its leaves but kept tables Linux tore down: {e}"
                        ),
                    );
                }
                // iopt refused the whole call unchanged; Linux destroyed those tables first.
                report.allow(AllowedDifference::EexistAfterTeardown);
                let removed = match tear_down(table, plan, op.iova, &kept) {
                    Ok(n) => n,
                    Err(e) => return fail(report, &format!("; {e}")),
                };
                if let Err(e) = check_run(table, cfg, op.iova, plan, &linux_after) {
                    return fail(report, &format!("; after the resync, {e}"));
                }
                report.resyncs.push(Resync {
                    op: at.index,
                    difference: AllowedDifference::EexistAfterTeardown,
                    leaves_removed: removed,
                });
                return None;
            }
            (0, Ok(())) => {
                let expected = after_block_map(plan, op, level, count);
                return match check_run(table, cfg, op.iova, plan, &expected) {
                    Ok(()) => None,
                    Err(e) => fail(
                        report,
                        &format!("; the answers agree but the trees do not: {e}"),
                    ),
                };
            }
            (0, Err(MapError::AlreadyMapped { .. })) => {
                let reached = &plan.entries[..(count as usize).min(plan.entries.len())];
                let live = reached
                    .iter()
                    .any(|e| matches!(e, Entry::Table(k) if *k > 0));
                let leafless = !plan.above && !reached.contains(&Entry::Leaf);
                if !(live && leafless) {
                    return fail(report, "");
                }
                report.allow(AllowedDifference::BlockOverLiveTableRejected);
                let torn: Vec<usize> = (0..reached.len())
                    .filter(|&i| matches!(reached[i], Entry::Table(_)))
                    .collect();
                let removed = match tear_down(table, plan, op.iova, &torn) {
                    Ok(n) => n,
                    Err(e) => return fail(report, &format!("; {e}")),
                };
                let redo = table.map(
                    Iova::new(op.iova),
                    PhysAddr::new(op.paddr),
                    size,
                    count,
                    prot,
                );
                if let Err(e) = redo {
                    return fail(
                        report,
                        &format!("; resync: the map after the teardown failed: {e:?}"),
                    );
                }
                let expected = after_block_map(plan, op, level, count);
                if let Err(e) = check_run(table, cfg, op.iova, plan, &expected) {
                    return fail(report, &format!("; after the resync, {e}"));
                }
                report.resyncs.push(Resync {
                    op: at.index,
                    difference: AllowedDifference::BlockOverLiveTableRejected,
                    leaves_removed: removed,
                });
                return None;
            }
            _ => {}
        }
    }
    let oversized = matches!(result, Err(MapError::InvalidPageSize { .. }))
        && linux_map_precheck(cfg, op).is_none()
        && no_level_maps(cfg, op.pgsize);
    if oversized
        && op.ret == EEXIST
        && table
            .iova_to_phys(Iova::new(op.iova))
            .is_some_and(|t| t.level < 3)
    {
        // Linux's descent met a block on the path first: -EEXIST, nothing changed.
        report.allow(AllowedDifference::OversizedPageSizeRejected);
        return None;
    }
    if oversized && op.ret == EINVAL {
        // Linux built the path down to the last level before failing; build it too.
        report.allow(AllowedDifference::OversizedPageSizeRejected);
        let granule = cfg.granule().size();
        let page = PageSize::new(granule)?;
        let at_page = Iova::new(op.iova & !(granule - 1));
        let before = snapshot(table, cfg, at_page.get(), at_page.get() + (granule - 1));
        let tables_before = count_tables(table);
        if table
            .map(at_page, PhysAddr::new(0), page, 1, Prot::READ)
            .is_ok()
        {
            let undone = table.unmap(at_page, page, 1, &mut Gather::new());
            let after = snapshot(table, cfg, at_page.get(), at_page.get() + (granule - 1));
            if undone != Ok(granule) || after.leaves != before.leaves {
                return fail(
                    report,
                    &format!(
                        "; resync: mapping and unmapping one granule page at {at_page} to build \
                         Linux's path left {} (unmap answered {undone:x?})",
                        show_leaves(&after.leaves)
                    ),
                );
            }
            if count_tables(table) != tables_before {
                report.resyncs.push(Resync {
                    op: at.index,
                    difference: AllowedDifference::OversizedPageSizeRejected,
                    leaves_removed: 0,
                });
            }
        }
        return None;
    }
    if (ours.ret, ours.mapped) == (op.ret, op.mapped) {
        return None;
    }
    let linux_changed = op.ret == 0;
    let allowed = match &result {
        Err(MapError::Misaligned { .. })
            if op.iova % op.pgsize != 0 || op.paddr % op.pgsize != 0 =>
        {
            Some(AllowedDifference::MisalignedRejected)
        }
        Err(
            MapError::IovaOutOfRange { .. }
            | MapError::PaOutOfRange { .. }
            | MapError::Overflow { .. },
        ) if end_only_out_of_range(cfg, op.iova, Some(op.paddr), full) => {
            Some(AllowedDifference::RangeEndRejected)
        }
        Err(e)
            if op.ret < 0
                && op.ret != EEXIST
                && linux_map_precheck(cfg, op) == Some(op.ret)
                && map_error_holds(cfg, op, e) =>
        {
            Some(AllowedDifference::ErrorPrecedence)
        }
        _ => None,
    };
    if let Some(difference) = allowed {
        report.allow(difference);
        if difference == AllowedDifference::MisalignedRejected {
            let aligned = MapOp { iova: down, ..*op };
            match misaligned_map_resync(table, cfg, &aligned, count, plan.as_ref(), level) {
                Ok(None) => return None,
                Ok(Some(removed)) => {
                    report.resyncs.push(Resync {
                        op: at.index,
                        difference,
                        leaves_removed: removed,
                    });
                    return None;
                }
                Err(Some(e)) => return fail(report, &format!("; {e}")),
                Err(None) => {}
            }
        }
        if !linux_changed {
            return None;
        }
        return Some(OpStop::Diverged(difference));
    }
    fail(report, "")
}

/// Makes, after iopt refused a misaligned map, what Linux did with it at the iova rounded
/// down (`op` carries that iova): the teardown of the tables in its run, and for a completed
/// call the map itself. Returns the leaves the teardown removed, or `None` if Linux changed
/// nothing.
///
/// # Errors
///
/// `Err(None)` when iopt cannot make Linux's tree (Linux wrote a misaligned pa into its
/// descriptors); `Err(Some(why))` when the resynchronised run differs from Linux's.
fn misaligned_map_resync<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &MapOp,
    count: u64,
    plan: Option<&RunPlan>,
    level: Option<u32>,
) -> Result<Option<usize>, Option<String>> {
    let (torn, expected) = match (op.ret, plan, level) {
        (EEXIST, None, _) => return Ok(None),
        (EEXIST, Some(plan), _) => {
            let torn = plan
                .eexist_teardown()
                .ok_or_else(|| Some("no leaf on the path or in the run".to_owned()))?;
            if torn.is_empty() {
                return Ok(None);
            }
            let after = plan.leaves_outside(op.iova, &torn);
            (torn, after)
        }
        (0, _, _) if op.paddr % op.pgsize != 0 => return Err(None),
        (0, Some(plan), Some(level)) => {
            let reached = (count as usize).min(plan.entries.len());
            let torn = (0..reached)
                .filter(|&i| matches!(plan.entries[i], Entry::Table(_)))
                .collect();
            (torn, after_block_map(plan, op, level, count))
        }
        (0, None, _) => (Vec::new(), Vec::new()),
        _ => return Err(None),
    };
    let removed = match plan {
        Some(plan) => tear_down(table, plan, op.iova, &torn).map_err(Some)?,
        None => 0,
    };
    if op.ret == 0 {
        let size = PageSize::new(op.pgsize).ok_or(None)?;
        let prot = Prot::from_bits_retain(op.prot);
        if table
            .map(
                Iova::new(op.iova),
                PhysAddr::new(op.paddr),
                size,
                count,
                prot,
            )
            .is_err()
        {
            return Err(None);
        }
    }
    if let Some(plan) = plan {
        check_run(table, cfg, op.iova, plan, &expected)
            .map_err(|e| Some(format!("after the resync at the iova rounded down, {e}")))?;
    }
    Ok(Some(removed))
}

/// Unmaps the `op.ret / op.pgsize` entries Linux cleared one at a time, after iopt refused
/// them as one run. Returns how many iopt held nothing at (each checked to hold no leaf), and
/// how many it unmapped.
///
/// # Errors
///
/// A description of the first entry that neither unmapped whole nor held nothing.
fn unmap_by_entry<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &UnmapOp,
) -> Result<(u64, u64), String> {
    let size = PageSize::new(op.pgsize).ok_or("page size is not a power of two")?;
    let (mut freed, mut removed) = (0, 0);
    for i in 0..op.ret / op.pgsize {
        let at = op.iova + i * op.pgsize;
        let mut gather = Gather::new();
        match table.unmap(Iova::new(at), size, 1, &mut gather) {
            Ok(b) if b == op.pgsize => removed += 1,
            Err(UnmapError::NotMapped { .. }) => {
                let held = snapshot(table, cfg, at, at + (op.pgsize - 1)).leaves;
                if !held.is_empty() {
                    return Err(format!(
                        "entry {at:#x} refused as not mapped, yet iopt holds {}",
                        show_leaves(&held)
                    ));
                }
                freed += 1;
            }
            other => {
                return Err(format!(
                    "entry by entry, unmap(iova {at:#x}, pgsize {:#x}, 1) answered {other:x?}, \
                     where Linux cleared the entry",
                    op.pgsize
                ));
            }
        }
    }
    Ok((freed, removed))
}

/// Judges an unmap iopt refused as not mapped where Linux cleared `op.ret` bytes. iopt's
/// unmap is all or nothing; Linux's clears entry after entry. So iopt is driven one entry at a
/// time: the entries it holds must unmap as Linux's did, and the ones it refuses must hold no
/// leaf (tables it freed when they emptied). Returns the resynchronisation made, if entries
/// had to be unmapped one by one.
///
/// # Errors
///
/// Why the difference is not the eager-freeing one, for the mismatch message.
fn eager_freed<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &UnmapOp,
    at: At,
) -> Result<Option<Resync>, String> {
    match unmap_by_entry(table, cfg, op).map_err(|e| format!("; {e}"))? {
        (0, _) => Err(
            "; iopt refused the run as a whole but unmapped every entry of it one by one"
                .to_owned(),
        ),
        (_, 0) => Ok(None),
        _ => Ok(Some(Resync {
            op: at.index,
            difference: AllowedDifference::EagerFreedEntryInRun,
            leaves_removed: 0,
        })),
    }
}

/// Linux cleared `[iova + ours, iova + ret)` and iopt did not: allowed only if iopt holds no
/// leaf there (the entries were tables iopt freed when they emptied).
///
/// # Errors
///
/// The leaves iopt still holds there, for the mismatch message.
fn holds_no_leaf<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &UnmapOp,
    ours: u64,
) -> Result<(), String> {
    let lo = op.iova.saturating_add(ours);
    let hi = op.iova.saturating_add(op.ret - 1);
    let held = snapshot(table, cfg, lo, hi).leaves;
    if held.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "; iopt still holds leaves where Linux unmapped: {}",
            show_leaves(&held)
        ))
    }
}

/// Makes a misaligned unmap Linux completed at the iova rounded down, where Linux's index
/// arithmetic put it. Returns whether iopt unmapped what Linux did.
fn misaligned_unmap_resync<T: IoPageTable + ?Sized>(
    table: &T,
    op: &UnmapOp,
    size: PageSize,
    count: u64,
) -> bool {
    let down = op.iova & !(op.pgsize - 1);
    table.unmap(Iova::new(down), size, count, &mut Gather::new()) == Ok(op.ret)
}

/// Notes (informationally) a gathered invalidation size outside the page-size bitmap.
fn note_gather(cfg: &Config, gather: &Gather, step: Step, report: &mut CaseReport) {
    if gather.pgsize() != 0
        && PageSize::new(gather.pgsize()).is_none_or(|s| !cfg.page_sizes().contains(s))
    {
        report.notes.push(format!(
            "{step}: gathered leaf size {:#x} is not in pgsize_bitmap {:#x}",
            gather.pgsize(),
            cfg.page_sizes().bits()
        ));
    }
}

fn replay_unmap<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &UnmapOp,
    at: At,
    report: &mut CaseReport,
) -> Option<OpStop> {
    let step = at.step;
    let full = op.pgsize.checked_mul(op.pgcount);
    let Some(size) = PageSize::new(op.pgsize) else {
        if op.ret == 0 {
            return None;
        }
        report.mismatch(
            step,
            format!(
                "{}: Linux ret {:#x}, iopt ret 0x0 [page size not a power of two, not callable]",
                Op::Unmap(*op),
                op.ret
            ),
        );
        return Some(OpStop::Mismatch);
    };
    let mut count = op.pgcount;
    if op.ret > 0 && full.is_some_and(|f| op.ret < f) && op.ret % op.pgsize == 0 {
        count = op.ret / op.pgsize;
        report.allow(AllowedDifference::ShortUnmapRun);
    }
    let mut gather = Gather::new();
    let result = table.unmap(Iova::new(op.iova), size, count, &mut gather);
    note_gather(cfg, &gather, step, report);
    let (ours, detail) = match &result {
        Ok(bytes) => (*bytes, format!("Ok({bytes:#x})")),
        Err(e) => (0, format!("Err({e:?})")),
    };
    if ours == op.ret {
        return None;
    }
    let linux_changed = op.ret != 0;
    let mut why = String::new();
    let allowed = match &result {
        Err(UnmapError::Misaligned { .. }) if op.iova % op.pgsize != 0 => {
            Some(AllowedDifference::MisalignedRejected)
        }
        Err(UnmapError::IovaOutOfRange { .. } | UnmapError::Overflow { .. })
            if end_only_out_of_range(cfg, op.iova, None, full) =>
        {
            Some(AllowedDifference::RangeEndRejected)
        }
        Err(UnmapError::NotMapped { .. })
            if op.ret > 0 && op.ret % op.pgsize == 0 && op.iova % op.pgsize == 0 =>
        {
            match eager_freed(table, cfg, op, at) {
                Ok(None) => Some(AllowedDifference::EagerFreedEmptyTable),
                Ok(Some(resync)) => {
                    report.resyncs.push(resync);
                    Some(resync.difference)
                }
                Err(e) => {
                    why = e;
                    None
                }
            }
        }
        Ok(_) if ours < op.ret => match holds_no_leaf(table, cfg, op, ours) {
            Ok(()) => Some(AllowedDifference::EagerFreedEmptyTable),
            Err(e) => {
                why = e;
                None
            }
        },
        _ => None,
    };
    if let Some(difference) = allowed {
        report.allow(difference);
        // An entry-by-entry run has already been resynchronised.
        if !(linux_changed && difference.diverges())
            || difference == AllowedDifference::EagerFreedEntryInRun
        {
            return None;
        }
        if difference == AllowedDifference::MisalignedRejected
            && misaligned_unmap_resync(table, op, size, count)
        {
            report.resyncs.push(Resync {
                op: at.index,
                difference,
                leaves_removed: 0,
            });
            return None;
        }
        return Some(OpStop::Diverged(difference));
    }
    report.mismatch(
        step,
        format!(
            "{}: Linux ret {:#x}, iopt ret {ours:#x} [{detail}]{why}",
            Op::Unmap(*op),
            op.ret
        ),
    );
    Some(OpStop::Mismatch)
}
fn replay_lookup<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &IovaToPhysOp,
    step: Step,
    report: &mut CaseReport,
) -> Option<OpStop> {
    let found = table.iova_to_phys(Iova::new(op.iova));
    let ours = found.map_or(0, |t| t.pa.get());
    if ours == op.ret {
        return None;
    }
    if found.is_none() && !cfg.iova_in_range(Iova::new(op.iova)) {
        report.allow(AllowedDifference::IovaToPhysOutOfRange);
        return None;
    }
    report.mismatch(
        step,
        format!(
            "{}: Linux ret {:#x}, iopt ret {ours:#x} [{found:x?}]",
            Op::IovaToPhys(*op),
            op.ret
        ),
    );
    Some(OpStop::Mismatch)
}

fn compare_final<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    golden: &Allocated,
    report: &mut CaseReport,
) {
    let fin = &golden.final_state;
    let mut leaves = Vec::new();
    let mut tables: BTreeMap<u32, u64> = (cfg.start_level()..=3).map(|l| (l, 0)).collect();
    table.walk(&mut |item| match item {
        WalkItem::Leaf {
            iova,
            level,
            descriptor,
            ..
        } => {
            leaves.push(Leaf {
                iova: iova.get(),
                level,
                pte: descriptor,
            });
        }
        WalkItem::Table { level, .. } => *tables.entry(level).or_default() += 1,
        _ => {}
    });
    report.final_compared = true;
    report.leaves_compared = fin.leaves.len();
    if leaves != fin.leaves {
        report.mismatch(Step::FinalLeaves, leaf_diff(&fin.leaves, &leaves));
    }
    if tables != fin.tables_per_level {
        let derived = fin.derived_tables_per_level(cfg);
        if tables == derived {
            report.allow(AllowedDifference::DerivedTableCount);
        } else {
            report.mismatch(
                Step::TableCounts,
                format!(
                    "Linux {:?} (derived from its leaves: {derived:?}), iopt {tables:?}",
                    fin.tables_per_level
                ),
            );
        }
    }
    let stats = table.stats();
    if stats.pages_allocated != fin.table_pages_allocated_total
        || stats.pages_freed != fin.table_pages_freed_total
    {
        report.notes.push(format!(
            "table pages allocated/freed: Linux {}/{}, iopt {}/{} (informational)",
            fin.table_pages_allocated_total,
            fin.table_pages_freed_total,
            stats.pages_allocated,
            stats.pages_freed
        ));
    }
}

/// Describes how two leaf lists differ: sizes and the first few differing positions.
fn leaf_diff(linux: &[Leaf], iopt: &[Leaf]) -> String {
    use fmt::Write as _;
    let mut s = format!("Linux has {} leaves, iopt {}", linux.len(), iopt.len());
    let mut shown = 0;
    for i in 0..linux.len().max(iopt.len()) {
        let (a, b) = (linux.get(i), iopt.get(i));
        if a == b {
            continue;
        }
        if shown == 3 {
            s.push_str("; ...");
            break;
        }
        let show = |l: Option<&Leaf>| l.map_or_else(|| "none".to_owned(), ToString::to_string);
        let _ = write!(s, "; [{i}] Linux {}, iopt {}", show(a), show(b));
        shown += 1;
    }
    s
}

/// The aggregate of many case reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// Every case's report, in case order.
    pub reports: Vec<CaseReport>,
    /// Cases checked.
    pub cases: usize,
    /// Cases with no mismatch.
    pub passed: usize,
    /// Cases in which Linux failed allocation.
    pub alloc_failed_expected: usize,
    /// Of those, the ones iopt rejected too.
    pub alloc_failed_matched: usize,
    /// Ops the cases record.
    pub ops_total: usize,
    /// Ops run and compared.
    pub ops_replayed: usize,
    /// Cases whose final state was compared.
    pub finals_compared: usize,
    /// Leaves compared in those.
    pub leaves_compared: usize,
    /// Mismatches over all cases.
    pub mismatches: usize,
    /// Allowed differences by kind, over all cases.
    pub allowed: BTreeMap<AllowedDifference, u64>,
    /// Cases stopped by an allowed difference that leaves the trees different and that the
    /// replay could not resynchronise.
    pub diverged: usize,
    /// Resynchronisations after diverging allowed differences, over all cases.
    pub resyncs: usize,
    /// Leaves the resynchronisations removed (Linux had discarded them).
    pub resync_leaves_removed: usize,
    /// Resynchronisations by the allowed difference that called for them.
    pub resyncs_by_kind: BTreeMap<AllowedDifference, usize>,
    /// Informational notes over all cases.
    pub notes: usize,
}

impl Summary {
    /// Aggregates `reports`.
    pub fn from_reports(reports: Vec<CaseReport>) -> Self {
        let mut s = Summary {
            cases: reports.len(),
            ..Summary::default()
        };
        for r in &reports {
            s.passed += usize::from(r.passed());
            if r.linux_alloc_failed {
                s.alloc_failed_expected += 1;
                s.alloc_failed_matched += usize::from(r.passed());
            }
            s.ops_total += r.ops_total;
            s.ops_replayed += r.ops_replayed;
            s.finals_compared += usize::from(r.final_compared);
            s.leaves_compared += r.leaves_compared;
            s.mismatches += r.mismatches.len();
            for (k, n) in &r.allowed {
                *s.allowed.entry(*k).or_default() += n;
            }
            s.diverged += usize::from(matches!(r.stopped, Some(Stop::Diverged { .. })));
            s.resyncs += r.resyncs.len();
            for x in &r.resyncs {
                *s.resyncs_by_kind.entry(x.difference).or_default() += 1;
            }
            s.resync_leaves_removed += r.resyncs.iter().map(|x| x.leaves_removed).sum::<usize>();
            s.notes += r.notes.len();
        }
        s.reports = reports;
        s
    }

    /// Returns the fraction of the recorded calls that were replayed and compared (1.0 when
    /// there are none).
    pub fn compared_fraction(&self) -> f64 {
        if self.ops_total == 0 {
            1.0
        } else {
            #[allow(clippy::cast_precision_loss)] // counts far below 2^52
            let f = self.ops_replayed as f64 / self.ops_total as f64;
            f
        }
    }

    /// Returns whether every case passed.
    pub fn all_passed(&self) -> bool {
        self.passed == self.cases
    }

    /// Iterates the reports of the cases that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CaseReport> {
        self.reports.iter().filter(|r| !r.passed())
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Failed cases listed in full; the rest are only counted.
        const SHOWN: usize = 20;
        writeln!(
            f,
            "golden replay: {}/{} cases passed, {} mismatches",
            self.passed, self.cases, self.mismatches
        )?;
        writeln!(
            f,
            "  allocation failures matched: {}/{}",
            self.alloc_failed_matched, self.alloc_failed_expected
        )?;
        writeln!(
            f,
            "  calls compared: {}/{} ({:.2} %)",
            self.ops_replayed,
            self.ops_total,
            100.0 * self.compared_fraction()
        )?;
        write!(
            f,
            "  resynchronisations: {} ({} leaves Linux had discarded removed)",
            self.resyncs, self.resync_leaves_removed
        )?;
        for (k, n) in &self.resyncs_by_kind {
            write!(f, "; {k}: {n}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  final states compared: {} ({} leaves)",
            self.finals_compared, self.leaves_compared
        )?;
        if self.allowed.is_empty() {
            writeln!(f, "  allowed differences: none")?;
        } else {
            writeln!(f, "  allowed differences:")?;
            for (k, n) in &self.allowed {
                writeln!(f, "    {k}: {n}")?;
            }
        }
        if self.diverged > 0 {
            writeln!(
                f,
                "  cases stopped by a diverging allowed difference: {}",
                self.diverged
            )?;
        }
        if self.notes > 0 {
            writeln!(f, "  informational notes: {}", self.notes)?;
        }
        let failed = self.cases - self.passed;
        for r in self.failures().take(SHOWN) {
            writeln!(f, "{r}")?;
        }
        if failed > SHOWN {
            writeln!(f, "... and {} more failed cases", failed - SHOWN)?;
        }
        Ok(())
    }
}
