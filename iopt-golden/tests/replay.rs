//! Tests of the replay harness itself, with a test double: an "oracle" table that answers every
//! call with what Linux recorded for it (checking that the call's arguments are the recorded
//! ones), and reports registers from `cfg_out`. While the ops run it walks as a shadow
//! `LpaeTable` that receives the same calls (the replay reads the tree to judge block maps and
//! resynchronise), and once the last op has been called it walks as the recorded final tree.
//! A call that is not the next recorded one (a resynchronisation's) goes to the shadow alone.
//! A replaced answer is not applied to the shadow: the double refused, or answered, without
//! changing its tree. Replaying a case against its own oracle must pass; each deliberate
//! deviation must be judged as the README says.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use iopt_api::{
    Config, Gather, IoPageTable, Iova, MapError, PageSize, PhysAddr, Prot, Registers, Stats,
    Translation, UnmapError, WalkItem,
};
use iopt_golden::{
    AllowedDifference, Case, Leaf, Op, Outcome, RegsOut, Step, Stop, Summary, replay, replay_all,
};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;

/// A replacement answer for one op index.
#[derive(Debug, Clone)]
enum Answer {
    Map(Result<(), MapError>),
    Unmap(Result<u64, UnmapError>),
    Lookup(Option<u64>),
    Panic,
}

/// How the oracle departs from Linux, for the negative tests.
#[derive(Debug, Clone, Default)]
struct Tweaks {
    /// Report MAIR without sign extension, as iopt does.
    mair_low_only: bool,
    /// Report the table counts an eager-freeing implementation would have.
    eager_free: bool,
    /// Answers replacing the recorded ones, by op index.
    answers: BTreeMap<usize, Answer>,
    /// Leaves replacing the recorded final leaves.
    leaves: Option<Vec<Leaf>>,
    /// Added to the recorded table count at level 3.
    extra_l3_tables: u64,
    /// Replaces TCR.TSZ / VTCR.TSZ.
    tsz: Option<u8>,
}

const ROOT: u64 = 0x8_1234_0000;

struct Oracle {
    cfg: Config,
    ops: Vec<Op>,
    regs: RegsOut,
    leaves: Vec<Leaf>,
    tables: BTreeMap<u32, u64>,
    tweaks: Tweaks,
    cursor: AtomicUsize,
    /// (count, prot) of every map call, to check what replay passed.
    map_calls: Mutex<Vec<(u64, Prot)>>,
    /// The tree the calls build, walked until the last op has been called.
    shadow: LpaeTable<Arc<SimMemory>>,
}

impl Oracle {
    fn new(cfg: Config, case: &Case, tweaks: Tweaks) -> Self {
        assert_eq!(
            cfg,
            Config::new(case.config_input()).unwrap(),
            "case {}",
            case.number
        );
        let Outcome::Allocated(a) = &case.outcome else {
            panic!("case {} failed", case.number)
        };
        let mut tables = if tweaks.eager_free {
            a.final_state.derived_tables_per_level(&cfg)
        } else {
            a.final_state.tables_per_level.clone()
        };
        *tables.entry(3).or_default() += tweaks.extra_l3_tables;
        Self {
            cfg,
            ops: a.ops.clone(),
            regs: a.cfg_out.regs,
            leaves: tweaks
                .leaves
                .clone()
                .unwrap_or_else(|| a.final_state.leaves.clone()),
            tables,
            tweaks,
            cursor: AtomicUsize::new(0),
            map_calls: Mutex::new(Vec::new()),
            shadow: LpaeTable::new(cfg, Arc::new(SimMemory::new())).expect("shadow root"),
        }
    }

    /// The recorded op the next call should be, if any.
    fn peek(&self) -> Option<Op> {
        self.ops.get(self.cursor.load(Ordering::SeqCst)).copied()
    }

    fn next(&self) -> (usize, Op) {
        let i = self.cursor.fetch_add(1, Ordering::SeqCst);
        let op = *self
            .ops
            .get(i)
            .unwrap_or_else(|| panic!("call {i} beyond the recorded ops"));
        if let Some(Answer::Panic) = self.tweaks.answers.get(&i) {
            panic!("oracle told to panic at op {i}");
        }
        (i, op)
    }

    fn calls(&self) -> usize {
        self.cursor.load(Ordering::SeqCst)
    }
}

impl IoPageTable for Oracle {
    fn config(&self) -> &Config {
        &self.cfg
    }

    fn map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let recorded = matches!(self.peek(), Some(Op::Map(m))
            if (iova.get(), pa.get(), size.get(), prot.bits()) == (m.iova, m.paddr, m.pgsize, m.prot));
        if !recorded {
            return self.shadow.map(iova, pa, size, count, prot);
        }
        let (i, op) = self.next();
        let Op::Map(m) = op else {
            panic!("op {i}: map called, {op} recorded")
        };
        self.map_calls.lock().unwrap().push((count, prot));
        if let Some(Answer::Map(r)) = self.tweaks.answers.get(&i) {
            return *r;
        }
        let _ = self.shadow.map(iova, pa, size, count, prot);
        match m.ret {
            0 => Ok(()),
            -17 => Err(MapError::AlreadyMapped { iova }),
            -22 if !prot.is_accessible() => Err(MapError::NoAccess { prot }),
            -22 => Err(MapError::InvalidPageSize { size: size.get() }),
            -34 if !self.cfg.pa_in_range(pa) => Err(MapError::PaOutOfRange { pa }),
            -34 => Err(MapError::IovaOutOfRange { iova }),
            other => panic!("op {i}: unexpected ret {other}"),
        }
    }

    fn map_range(&self, iova: Iova, _: PhysAddr, _: u64, _: Prot) -> Result<(), MapError> {
        panic!("replay must not call map_range (at {iova})")
    }

    fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        let recorded = matches!(self.peek(), Some(Op::Unmap(u))
            if (iova.get(), size.get()) == (u.iova, u.pgsize)
                && (count == u.pgcount || count * u.pgsize == u.ret));
        if !recorded {
            return self.shadow.unmap(iova, size, count, gather);
        }
        let (i, op) = self.next();
        let Op::Unmap(u) = op else {
            panic!("op {i}: unmap called, {op} recorded")
        };
        assert!(gather.is_empty(), "op {i}: replay must pass a fresh gather");
        if let Some(Answer::Unmap(r)) = self.tweaks.answers.get(&i) {
            return *r;
        }
        let _ = self.shadow.unmap(iova, size, count, &mut Gather::new());
        if u.ret == 0 {
            Err(UnmapError::NotMapped { iova })
        } else {
            gather.add(iova, size.get());
            Ok(u.ret)
        }
    }

    fn iova_to_phys(&self, iova: Iova) -> Option<Translation> {
        let (i, op) = self.next();
        let Op::IovaToPhys(l) = op else {
            panic!("op {i}: iova_to_phys called, {op} recorded")
        };
        assert_eq!(iova.get(), l.iova);
        let pa = match self.tweaks.answers.get(&i) {
            Some(Answer::Lookup(pa)) => *pa,
            _ => (l.ret != 0).then_some(l.ret),
        };
        pa.map(|pa| Translation {
            pa: PhysAddr::new(pa),
            size: PageSize::SZ_4K,
            level: 3,
            prot: Prot::READ,
            descriptor: 0,
        })
    }

    fn walk(&self, visit: &mut dyn FnMut(WalkItem)) {
        if self.calls() < self.ops.len() {
            self.shadow.walk(visit);
            return;
        }
        for (&level, &n) in &self.tables {
            for _ in 0..n {
                visit(WalkItem::Table {
                    iova: Iova::ZERO,
                    level,
                    pa: PhysAddr::new(ROOT),
                    live: 0,
                });
            }
        }
        for l in &self.leaves {
            visit(WalkItem::Leaf {
                iova: Iova::new(l.iova),
                level: l.level,
                size: PageSize::new(self.cfg.block_size(l.level)).unwrap(),
                pa: PhysAddr::ZERO,
                prot: Prot::empty(),
                descriptor: l.pte,
            });
        }
    }

    fn root(&self) -> PhysAddr {
        PhysAddr::new(ROOT)
    }

    fn registers(&self) -> Registers {
        match self.regs {
            RegsOut::Stage1 { mut tcr, mair } => {
                tcr.tsz = self.tweaks.tsz.unwrap_or(tcr.tsz);
                let mair = if self.tweaks.mair_low_only {
                    mair & 0xffff_ffff
                } else {
                    mair
                };
                Registers::Stage1 {
                    ttbr: PhysAddr::new(ROOT),
                    tcr,
                    mair,
                }
            }
            RegsOut::Stage2 { mut vtcr } => {
                vtcr.tsz = self.tweaks.tsz.unwrap_or(vtcr.tsz);
                Registers::Stage2 {
                    vttbr: PhysAddr::new(ROOT),
                    vtcr,
                }
            }
            RegsOut::Mali {
                memattr,
                transtab_low_bits,
            } => Registers::Mali {
                transtab: ROOT | transtab_low_bits,
                memattr,
            },
        }
    }

    fn stats(&self) -> Stats {
        Stats::default()
    }
}

fn cases() -> Vec<Case> {
    iopt_golden::cases().unwrap()
}

/// Replays every case against its oracle; returns the summary and the call count of each.
fn replay_every_case(tweaks: &Tweaks) -> (Summary, Vec<(usize, usize)>) {
    let cases = cases();
    let mut allocated = cases.iter().filter(|c| !c.alloc_failed());
    let mut oracles = Vec::new();
    let summary = replay_all(&cases, |cfg| {
        let case = allocated
            .next()
            .expect("build called only for allocated cases");
        let oracle = Arc::new(Oracle::new(cfg, case, tweaks.clone()));
        oracles.push((case.ops().len(), Arc::clone(&oracle)));
        oracle
    });
    assert!(
        allocated.next().is_none(),
        "build called for every allocated case"
    );
    (
        summary,
        oracles.iter().map(|(n, o)| (*n, o.calls())).collect(),
    )
}

#[test]
fn every_case_passes_against_linux_answers() {
    let (summary, calls) = replay_every_case(&Tweaks::default());
    assert!(summary.all_passed(), "{summary}");
    assert_eq!(summary.cases, 470);
    assert_eq!(
        (summary.alloc_failed_expected, summary.alloc_failed_matched),
        (112, 112)
    );
    assert_eq!((summary.ops_total, summary.ops_replayed), (10_421, 10_421));
    assert_eq!(
        (summary.finals_compared, summary.leaves_compared),
        (358, 2185)
    );
    assert!(summary.allowed.is_empty(), "{summary}");
    assert_eq!(summary.diverged, 0);
    // Each op called exactly once.
    assert!(calls.iter().all(|(ops, called)| ops == called), "{calls:?}");
    let text = summary.to_string();
    assert!(text.contains("470/470 cases passed"), "{text}");
}

#[test]
fn iopt_style_mair_and_eager_freeing_are_allowed() {
    let tweaks = Tweaks {
        mair_low_only: true,
        eager_free: true,
        ..Tweaks::default()
    };
    let (summary, _) = replay_every_case(&tweaks);
    assert!(summary.all_passed(), "{summary}");
    let expected = [
        (AllowedDifference::MairSignExtension, 194),
        (AllowedDifference::DerivedTableCount, 146),
    ];
    assert_eq!(summary.allowed, expected.into_iter().collect(), "{summary}");
    let text = summary.to_string();
    assert!(text.contains("mair_sign_extension: 194"), "{text}");
}

#[test]
fn boxed_dyn_tables_work() {
    let cases = cases();
    let case = &cases[0];
    let report = replay(case, |cfg| {
        Box::new(Oracle::new(cfg, case, Tweaks::default())) as Box<dyn IoPageTable>
    });
    assert!(report.passed(), "{report}");
}

fn replay_with(case: &Case, tweaks: Tweaks) -> (iopt_golden::CaseReport, Arc<Oracle>) {
    let mut kept = None;
    let report = replay(case, |cfg| {
        let o = Arc::new(Oracle::new(cfg, case, tweaks));
        kept = Some(Arc::clone(&o));
        o
    });
    (report, kept.expect("table built"))
}

fn answers(list: impl IntoIterator<Item = (usize, Answer)>) -> Tweaks {
    Tweaks {
        answers: list.into_iter().collect(),
        ..Tweaks::default()
    }
}

#[test]
fn a_wrong_lookup_stops_the_replay() {
    let cases = cases();
    let case = &cases[0];
    assert!(matches!(case.ops()[5], Op::IovaToPhys(l) if l.ret == 0x2a));
    let (report, oracle) = replay_with(case, answers([(5, Answer::Lookup(Some(0x2b)))]));
    assert_eq!(report.mismatches.len(), 1, "{report}");
    let m = &report.mismatches[0];
    assert_eq!(
        m.step,
        Step::Op {
            index: 5,
            name: "iova_to_phys"
        }
    );
    assert!(
        m.message.contains("Linux ret 0x2a") && m.message.contains("iopt ret 0x2b"),
        "{m}"
    );
    assert_eq!(report.stopped, Some(Stop::Mismatch { op: 5 }));
    assert_eq!(report.ops_replayed, 6);
    assert_eq!(oracle.calls(), 6, "no op after the mismatch is called");
    assert!(!report.final_compared);
}

#[test]
fn a_wrong_map_result_is_a_mismatch() {
    let cases = cases();
    let case = &cases[0];
    assert!(matches!(case.ops()[3], Op::Map(m) if m.ret == 0 && m.pgsize == 0x1000));
    let err = MapError::AlreadyMapped { iova: Iova::ZERO };
    let (report, _) = replay_with(case, answers([(3, Answer::Map(Err(err)))]));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op: 3 }), "{report}");
    let msg = &report.mismatches[0].message;
    assert!(msg.contains("Linux (ret 0, mapped 0x1000)"), "{msg}");
    assert!(msg.contains("iopt (ret -17, mapped 0x0)"), "{msg}");
    assert!(report.allowed.is_empty());
}

#[test]
fn a_wrong_unmap_result_is_a_mismatch() {
    let cases = cases();
    let case = &cases[0];
    let (i, u) = case
        .ops()
        .iter()
        .enumerate()
        .find_map(|(i, op)| match op {
            Op::Unmap(u) if u.ret != 0 => Some((i, *u)),
            _ => None,
        })
        .unwrap();
    let err = UnmapError::NotMapped {
        iova: Iova::new(u.iova),
    };
    let (report, _) = replay_with(case, answers([(i, Answer::Unmap(Err(err)))]));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op: i }), "{report}");
    assert!(
        report.mismatches[0].message.contains("iopt ret 0x0"),
        "{report}"
    );
}

#[test]
fn misaligned_rejection_is_allowed_only_when_misaligned() {
    let cases = cases();
    // Aligned op rejected as misaligned: a mismatch.
    let case = &cases[0];
    let m = |iova| MapError::Misaligned {
        iova: Iova::new(iova),
        pa: PhysAddr::ZERO,
        size: PageSize::SZ_4K,
    };
    let (report, _) = replay_with(case, answers([(3, Answer::Map(Err(m(0))))]));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op: 3 }), "{report}");

    // The same op with a misaligned iova and pa (as if Linux had mapped it): allowed, and
    // the replay stops there because the trees now differ and a misaligned pa cannot be
    // written by iopt (with only the iova misaligned it is made rounded down: planted.rs).
    let mut case = cases[0].clone();
    let Outcome::Allocated(a) = &mut case.outcome else {
        unreachable!()
    };
    let Op::Map(op) = &mut a.ops[3] else {
        unreachable!()
    };
    (op.iova, op.paddr) = (0x800, 0x800);
    let (report, oracle) = replay_with(&case, answers([(3, Answer::Map(Err(m(0x800))))]));
    assert!(report.passed(), "{report}");
    assert_eq!(
        report.allowed,
        [(AllowedDifference::MisalignedRejected, 1)]
            .into_iter()
            .collect()
    );
    assert_eq!(
        report.stopped,
        Some(Stop::Diverged {
            op: 3,
            difference: AllowedDifference::MisalignedRejected
        })
    );
    assert_eq!(oracle.calls(), 4);
    assert!(!report.final_compared);
}

#[test]
fn out_of_range_lookup_may_answer_nothing() {
    let mut case = cases()[0].clone();
    assert_eq!(case.ias_in, 32);
    let Outcome::Allocated(a) = &mut case.outcome else {
        unreachable!()
    };
    // Pretend Linux aliased an iova above IAS into the table.
    let Op::IovaToPhys(l) = &mut a.ops[0] else {
        unreachable!()
    };
    (l.iova, l.ret) = (1 << 40, 0x1234);
    let (report, oracle) = replay_with(&case, answers([(0, Answer::Lookup(None))]));
    assert!(report.passed(), "{report}");
    assert_eq!(
        report.allowed,
        [(AllowedDifference::IovaToPhysOutOfRange, 1)]
            .into_iter()
            .collect()
    );
    assert_eq!(report.stopped, None);
    assert_eq!(oracle.calls(), case.ops().len());

    // In range, "no translation" where Linux found one is a mismatch.
    let Outcome::Allocated(a) = &mut case.outcome else {
        unreachable!()
    };
    let Op::IovaToPhys(l) = &mut a.ops[0] else {
        unreachable!()
    };
    l.iova = 0x2a;
    let (report, _) = replay_with(&case, answers([(0, Answer::Lookup(None))]));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op: 0 }), "{report}");
}

#[test]
fn short_linux_map_runs_drive_iopt_with_linux_count() {
    let mut case = cases()[0].clone();
    let Outcome::Allocated(a) = &mut case.outcome else {
        unreachable!()
    };
    let Op::Map(op) = &mut a.ops[3] else {
        unreachable!()
    };
    // Linux was asked for 3 pages and mapped 1 (a table boundary), returning 0.
    op.pgcount = 3;
    assert_eq!(op.mapped, 0x1000);
    let (report, oracle) = replay_with(&case, Tweaks::default());
    assert!(report.passed(), "{report}");
    assert_eq!(
        report.allowed,
        [(AllowedDifference::ShortMapRun, 1)].into_iter().collect()
    );
    assert_eq!(
        oracle.map_calls.lock().unwrap()[0].0,
        1,
        "iopt asked for Linux's count"
    );
}

#[test]
fn block_map_refusal_without_a_live_table_is_a_mismatch() {
    let cases = cases();
    let case = &cases[0];
    // Op 6 maps a 2M block at 0x4000_0000 with success over an empty region: refusing it as
    // "already mapped" has no live table to justify it.
    let Op::Map(op) = case.ops()[6] else {
        unreachable!()
    };
    assert_eq!((op.iova, op.pgsize, op.ret), (0x4000_0000, 0x20_0000, 0));
    let err = MapError::AlreadyMapped {
        iova: Iova::new(0x4000_1000),
    };
    let (report, _) = replay_with(case, answers([(6, Answer::Map(Err(err)))]));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op: 6 }), "{report}");
    assert!(report.allowed.is_empty(), "{report}");
    assert!(report.resyncs.is_empty(), "{report}");
}

#[test]
fn final_state_and_registers_are_compared() {
    let cases = cases();
    let case = &cases[0];
    let golden = &case.allocated().unwrap().final_state;

    let mut leaves = golden.leaves.clone();
    leaves[1].pte ^= 1 << 10;
    let (report, _) = replay_with(
        case,
        Tweaks {
            leaves: Some(leaves),
            ..Tweaks::default()
        },
    );
    assert_eq!(report.mismatches.len(), 1, "{report}");
    assert_eq!(report.mismatches[0].step, Step::FinalLeaves);
    assert!(
        report.mismatches[0].message.contains("[1] Linux"),
        "{report}"
    );

    let (report, _) = replay_with(
        case,
        Tweaks {
            extra_l3_tables: 1,
            ..Tweaks::default()
        },
    );
    assert_eq!(report.mismatches.len(), 1, "{report}");
    assert_eq!(report.mismatches[0].step, Step::TableCounts);

    let (report, _) = replay_with(
        case,
        Tweaks {
            tsz: Some(25),
            ..Tweaks::default()
        },
    );
    assert_eq!(report.mismatches.len(), 1, "{report}");
    assert_eq!(report.mismatches[0].step, Step::CfgOut);
    assert!(report.mismatches[0].message.contains("tcr.tsz"), "{report}");
    // A register mismatch does not stop the op replay.
    assert!(report.final_compared);
}

#[test]
fn a_panicking_table_is_reported() {
    let cases = cases();
    let (report, _) = replay_with(&cases[0], answers([(2, Answer::Panic)]));
    assert_eq!(report.stopped, Some(Stop::Panicked), "{report}");
    assert_eq!(report.mismatches[0].step, Step::Panic);
    assert!(
        report.mismatches[0]
            .message
            .contains("oracle told to panic at op 2"),
        "{report}"
    );
}
