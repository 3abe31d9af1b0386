//! Replaying a case against an [`IoPageTable`] and judging the result by the README's rules.

use core::fmt;
use core::ops::Deref;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use iopt_api::{
    Config, Format, Gather, IoPageTable, Iova, MapError, PageSize, PhysAddr, Prot, Registers,
    UnmapError, WalkItem,
};

use crate::case::{Allocated, Case, IovaToPhysOp, Kind, Leaf, MapOp, Op, RegsOut, UnmapOp};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum AllowedDifference {
    /// MAIR differs only above bit 31 (Linux sign-extends `0xf404ff44`).
    MairSignExtension,
    /// A map or unmap was rejected as misaligned, and its iova or pa is not a multiple of
    /// `pgsize`.
    MisalignedRejected,
    /// A run was rejected because its end leaves the IAS/OAS while its start does not.
    RangeEndRejected,
    /// `iova_to_phys` of an iova outside the input range answered "no translation".
    IovaToPhysOutOfRange,
    /// Linux mapped fewer pages than asked in one call; iopt was driven with Linux's count.
    ShortMapRun,
    /// Linux unmapped fewer pages than asked in one call; iopt was driven with Linux's count.
    ShortUnmapRun,
    /// A block map over a table that still holds leaves was refused (Linux drops the leaves).
    BlockOverLiveTableRejected,
    /// `tables_per_level` differs, but equals the count derived from the leaves: the
    /// implementation freed tables that Linux keeps empty.
    DerivedTableCount,
}

impl AllowedDifference {
    /// Every kind.
    pub const ALL: [AllowedDifference; 8] = [
        AllowedDifference::MairSignExtension,
        AllowedDifference::MisalignedRejected,
        AllowedDifference::RangeEndRejected,
        AllowedDifference::IovaToPhysOutOfRange,
        AllowedDifference::ShortMapRun,
        AllowedDifference::ShortUnmapRun,
        AllowedDifference::BlockOverLiveTableRejected,
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
            AllowedDifference::DerivedTableCount => "derived_table_count",
        }
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
    /// The op at `op` differed in an allowed way that leaves the two trees different (Linux
    /// changed its tree, iopt refused); later ops and the final state cannot be compared.
    Diverged {
        /// Index of the op.
        op: usize,
        /// The allowed difference.
        difference: AllowedDifference,
    },
    /// The table under test panicked.
    Panicked,
}

/// The result of checking one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    /// The case number.
    pub case: usize,
    /// The case's kind.
    pub kind: Kind,
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
    /// Informational differences (never a failure).
    pub notes: Vec<String>,
}

impl CaseReport {
    fn new(case: &Case) -> Self {
        Self {
            case: case.number,
            kind: case.kind,
            format: case.format,
            linux_alloc_failed: case.alloc_failed(),
            ops_total: case.ops().len(),
            ops_replayed: 0,
            final_compared: false,
            leaves_compared: 0,
            stopped: None,
            mismatches: Vec::new(),
            allowed: BTreeMap::new(),
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
/// order (each called exactly once; stopping at the first mismatch), the final leaves bit for
/// bit and the table count per level.
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
        let step = Step::Op {
            index,
            name: op.name(),
        };
        let stop = match op {
            Op::Map(m) => replay_map(table, cfg, m, step, report),
            Op::Unmap(u) => replay_unmap(table, cfg, u, step, report),
            Op::IovaToPhys(l) => replay_lookup(table, cfg, l, step, report),
        };
        if let Some(stop) = stop.map(|s| s.at(index)) {
            report.stopped = Some(stop);
            return;
        }
    }
    compare_final(table, cfg, golden, report);
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

fn replay_map<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &MapOp,
    step: Step,
    report: &mut CaseReport,
) -> Option<OpStop> {
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
        Err(MapError::AlreadyMapped { .. })
            if linux_changed && has_deeper_leaf(table, cfg, op.iova, size, count) =>
        {
            Some(AllowedDifference::BlockOverLiveTableRejected)
        }
        _ => None,
    };
    if let Some(difference) = allowed {
        report.allow(difference);
        return linux_changed.then_some(OpStop::Diverged(difference));
    }
    report.mismatch(
        step,
        format!(
            "{}: Linux (ret {}, mapped {:#x}), iopt (ret {}, mapped {:#x}) [{}]",
            Op::Map(*op),
            op.ret,
            op.mapped,
            ours.ret,
            ours.mapped,
            ours.detail
        ),
    );
    Some(OpStop::Mismatch)
}

/// Whether the table holds a leaf inside `[iova, iova + size * count)` below the level a
/// leaf of `size` sits at: a map of that size would have to replace a live table.
fn has_deeper_leaf<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    iova: u64,
    size: PageSize,
    count: u64,
) -> bool {
    let Some(level) = cfg.leaf_level(size) else {
        return false;
    };
    let last = run_last(iova, size.get().checked_mul(count)).unwrap_or(u64::MAX);
    let mut found = false;
    table.walk(&mut |item| {
        if let WalkItem::Leaf {
            iova: i, level: l, ..
        } = item
        {
            found |= l > level && (iova..=last).contains(&i.get());
        }
    });
    found
}

fn replay_unmap<T: IoPageTable + ?Sized>(
    table: &T,
    cfg: &Config,
    op: &UnmapOp,
    step: Step,
    report: &mut CaseReport,
) -> Option<OpStop> {
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
    if gather.pgsize() != 0
        && PageSize::new(gather.pgsize()).is_none_or(|s| !cfg.page_sizes().contains(s))
    {
        report.notes.push(format!(
            "{step}: gathered leaf size {:#x} is not in pgsize_bitmap {:#x}",
            gather.pgsize(),
            cfg.page_sizes().bits()
        ));
    }
    let (ours, detail) = match &result {
        Ok(bytes) => (*bytes, format!("Ok({bytes:#x})")),
        Err(e) => (0, format!("Err({e:?})")),
    };
    if ours == op.ret {
        return None;
    }
    let linux_changed = op.ret != 0;
    let allowed = match &result {
        Err(UnmapError::Misaligned { .. }) if op.iova % op.pgsize != 0 => {
            Some(AllowedDifference::MisalignedRejected)
        }
        Err(UnmapError::IovaOutOfRange { .. } | UnmapError::Overflow { .. })
            if end_only_out_of_range(cfg, op.iova, None, full) =>
        {
            Some(AllowedDifference::RangeEndRejected)
        }
        _ => None,
    };
    if let Some(difference) = allowed {
        report.allow(difference);
        return linux_changed.then_some(OpStop::Diverged(difference));
    }
    report.mismatch(
        step,
        format!(
            "{}: Linux ret {:#x}, iopt ret {ours:#x} [{detail}]",
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
    /// Cases stopped by an allowed difference that leaves the trees different.
    pub diverged: usize,
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
            s.notes += r.notes.len();
        }
        s.reports = reports;
        s
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
            "  ops compared: {}/{}",
            self.ops_replayed, self.ops_total
        )?;
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
