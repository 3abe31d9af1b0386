//! Planted divergences: test doubles around a real `LpaeTable` that answer like Linux but keep
//! a different tree, or change their tree and report success, at one chosen call. The replay
//! must report each as a mismatch naming the call, and must tell a table that does exactly
//! what Linux does (agreement) from iopt's deliberate refusal (a diverging allowed
//! difference, resynchronised), even though both answer -EEXIST.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use iopt_api::{
    Config, Gather, IoPageTable, Iova, MapError, PageSize, PhysAddr, Prot, Registers, Stats,
    Translation, UnmapError, WalkItem,
};
use iopt_golden::{AllowedDifference, Case, CaseReport, MapOp, Op, Step, Stop, UnmapOp};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;

/// What the double does differently from the table it wraps.
#[derive(Debug, Clone, Copy)]
enum Plant {
    /// Every block map behaves as Linux's: tables at entries before the first leaf of the run
    /// are torn down, then the call answers -EEXIST at that leaf or maps the run.
    LinuxTeardown,
    /// At the planted map: tear down every entry of the run, leaves included, and answer
    /// -EEXIST (Linux's answer, not Linux's tree).
    EexistButDropsLeaves(MapOp),
    /// At the planted map: tear down every entry of the run, map it, and answer success.
    TearDownAndSucceed(MapOp),
    /// At the planted unmap: answer "not mapped" and change nothing.
    RefuseUnmap(UnmapOp),
    /// At the planted map: answer `InvalidPageSize` and change nothing.
    RefuseMapAsInvalidSize(MapOp),
}

struct Double {
    inner: LpaeTable<Arc<SimMemory>>,
    plant: Plant,
    fired: AtomicBool,
}

impl Double {
    fn new(cfg: Config, plant: Plant) -> Self {
        Self {
            inner: LpaeTable::new(cfg, Arc::new(SimMemory::new())).expect("root"),
            plant,
            fired: AtomicBool::new(false),
        }
    }

    /// Whether this call is the planted one: the first with the planted op's arguments.
    fn fires(&self, call: (Iova, Option<PhysAddr>, PageSize, u64, Option<Prot>), op: Op) -> bool {
        let (iova, pa, size, count, prot) = call;
        let planted = match op {
            Op::Map(m) => (m.iova, Some(m.paddr), m.pgsize, m.pgcount, Some(m.prot)),
            Op::Unmap(u) => (u.iova, None, u.pgsize, u.pgcount, None),
            Op::IovaToPhys(_) => return false,
        };
        let call = (
            iova.get(),
            pa.map(PhysAddr::get),
            size.get(),
            count,
            prot.map(|p| p.bits()),
        );
        call == planted && !self.fired.swap(true, Ordering::SeqCst)
    }

    /// What entry `slot` of a run at `level` holds: `Some(true)` a leaf at that level,
    /// `Some(false)` a table (or leaves below), `None` nothing.
    fn entry(&self, slot: u64, size: u64, level: u32) -> Option<bool> {
        let mut found = None;
        self.inner.walk(&mut |item| match item {
            WalkItem::Leaf { iova, level: l, .. }
                if iova.get() >= slot && iova.get() - slot < size =>
            {
                found = Some(l == level);
            }
            WalkItem::Table { iova, level: l, .. } if l == level + 1 && iova.get() == slot => {
                found.get_or_insert(false);
            }
            _ => {}
        });
        found
    }

    /// The run a Linux map call covers: `count` entries, cut at the end of the table page.
    fn run(&self, iova: Iova, size: PageSize, count: u64) -> Option<(u32, u64)> {
        let cfg = self.inner.config();
        let level = cfg.leaf_level(size).filter(|&l| l < 3)?;
        let per_page = cfg.granule().entries() as u64;
        let idx = cfg.index(iova.get(), level) as u64 % per_page;
        Some((level, count.min(per_page - idx)))
    }

    fn tear_down(&self, slot: u64, size: PageSize) {
        let _ = self
            .inner
            .unmap(Iova::new(slot), size, 1, &mut Gather::new());
    }
}

impl IoPageTable for Double {
    fn config(&self) -> &Config {
        self.inner.config()
    }

    fn map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let call = (iova, Some(pa), size, count, Some(prot));
        match self.plant {
            Plant::LinuxTeardown => {
                let result = self.inner.map(iova, pa, size, count, prot);
                let (Err(MapError::AlreadyMapped { .. }), Some((level, n))) =
                    (&result, self.run(iova, size, count))
                else {
                    return result;
                };
                for i in 0..n {
                    let slot = iova.get() + i * size.get();
                    match self.entry(slot, size.get(), level) {
                        Some(true) => return result,
                        Some(false) => self.tear_down(slot, size),
                        None => {}
                    }
                }
                self.inner.map(iova, pa, size, count, prot)
            }
            Plant::EexistButDropsLeaves(op) if self.fires(call, Op::Map(op)) => {
                let (_, n) = self.run(iova, size, count).expect("a block map");
                for i in 0..n {
                    self.tear_down(iova.get() + i * size.get(), size);
                }
                Err(MapError::AlreadyMapped { iova })
            }
            Plant::TearDownAndSucceed(op) if self.fires(call, Op::Map(op)) => {
                let (_, n) = self.run(iova, size, count).expect("a block map");
                for i in 0..n {
                    self.tear_down(iova.get() + i * size.get(), size);
                }
                self.inner.map(iova, pa, size, count, prot)
            }
            Plant::RefuseMapAsInvalidSize(op) if self.fires(call, Op::Map(op)) => {
                Err(MapError::InvalidPageSize { size: size.get() })
            }
            _ => self.inner.map(iova, pa, size, count, prot),
        }
    }

    fn map_range(&self, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<(), MapError> {
        self.inner.map_range(iova, pa, len, prot)
    }

    fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        match self.plant {
            Plant::RefuseUnmap(op)
                if self.fires((iova, None, size, count, None), Op::Unmap(op)) =>
            {
                Err(UnmapError::NotMapped { iova })
            }
            _ => self.inner.unmap(iova, size, count, gather),
        }
    }

    fn iova_to_phys(&self, iova: Iova) -> Option<Translation> {
        self.inner.iova_to_phys(iova)
    }

    fn walk(&self, visit: &mut dyn FnMut(WalkItem)) {
        self.inner.walk(visit);
    }

    fn root(&self) -> PhysAddr {
        self.inner.root()
    }

    fn registers(&self) -> Registers {
        self.inner.registers()
    }

    fn stats(&self) -> Stats {
        self.inner.stats()
    }
}

fn random() -> Vec<Case> {
    iopt_golden::random_cases().expect("embedded random set parses")
}

fn plain(case: &Case) -> CaseReport {
    iopt_golden::replay(case, |cfg| {
        Box::new(LpaeTable::new(cfg, Arc::new(SimMemory::new())).expect("root"))
    })
}

fn planted(case: &Case, plant: Plant) -> CaseReport {
    iopt_golden::replay(case, |cfg| Box::new(Double::new(cfg, plant)))
}

/// The first recorded -EEXIST block map after which Linux had torn down tables holding
/// leaves, found by replaying the plain table: (case, op index, the op).
fn first_eexist_teardown(cases: &[Case]) -> (&Case, usize, MapOp) {
    for case in cases {
        let report = plain(case);
        let hit = report.resyncs.iter().find(|r| {
            r.difference == AllowedDifference::EexistAfterTeardown && r.leaves_removed > 0
        });
        if let Some(r) = hit {
            let Op::Map(m) = case.ops()[r.op] else {
                panic!("a map op")
            };
            assert_eq!(m.ret, -17);
            return (case, r.op, m);
        }
    }
    panic!("the random set has -EEXIST teardowns")
}

#[test]
fn iopt_refusal_is_a_diverging_difference_never_agreement() {
    let cases = random();
    let (case, op, _) = first_eexist_teardown(&cases);
    let report = plain(case);
    assert!(report.passed(), "{report}");
    let resync = report
        .resyncs
        .iter()
        .find(|r| r.op == op)
        .expect("the op is resynchronised");
    assert_eq!(resync.difference, AllowedDifference::EexistAfterTeardown);
    assert!(resync.leaves_removed > 0);
    assert!(report.allowed[&AllowedDifference::EexistAfterTeardown] >= 1);
    assert!(report.final_compared, "the replay went on to the end");
}

#[test]
fn a_table_that_tears_down_as_linux_does_agrees() {
    let cases = random();
    let mut linux_like = (0, 0);
    let mut iopt = (0, 0);
    for case in &cases {
        let report = planted(case, Plant::LinuxTeardown);
        assert!(report.passed(), "{report}");
        linux_like.0 += report
            .allowed
            .get(&AllowedDifference::EexistAfterTeardown)
            .copied()
            .unwrap_or(0);
        linux_like.1 += report
            .allowed
            .get(&AllowedDifference::BlockOverLiveTableRejected)
            .copied()
            .unwrap_or(0);
        let report = plain(case);
        iopt.0 += report
            .allowed
            .get(&AllowedDifference::EexistAfterTeardown)
            .copied()
            .unwrap_or(0);
        iopt.1 += report
            .allowed
            .get(&AllowedDifference::BlockOverLiveTableRejected)
            .copied()
            .unwrap_or(0);
    }
    // RANDOM-DEV.md: 252 block maps answer -EEXIST after tearing down a table.
    assert_eq!(iopt.0, 252);
    assert!(iopt.1 > 0);
    assert_eq!(linux_like, (0, 0), "Linux's own behaviour is no difference");
}

#[test]
fn eexist_with_a_different_tree_is_a_mismatch() {
    let cases = random();
    let (case, op, m) = first_eexist_teardown(&cases);
    let report = planted(case, Plant::EexistButDropsLeaves(m));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op }), "{report}");
    let mismatch = &report.mismatches[0];
    assert_eq!(
        mismatch.step,
        Step::Op {
            index: op,
            name: "map"
        }
    );
    assert!(
        mismatch
            .message
            .contains("the answers agree but the trees do not"),
        "{mismatch}"
    );
    assert!(mismatch.message.contains("Linux (ret -17"), "{mismatch}");
}

#[test]
fn teardown_reported_as_success_is_a_mismatch() {
    let cases = random();
    let (case, op, m) = first_eexist_teardown(&cases);
    let report = planted(case, Plant::TearDownAndSucceed(m));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op }), "{report}");
    let msg = &report.mismatches[0].message;
    assert!(
        msg.contains("Linux (ret -17, mapped 0x0), iopt (ret 0"),
        "{msg}"
    );
}

#[test]
fn an_unmap_refused_over_leaves_is_a_mismatch_not_eager_freeing() {
    let cases = random();
    let case = &cases[0];
    let (op, u) = case
        .ops()
        .iter()
        .enumerate()
        .find_map(|(i, op)| match op {
            Op::Unmap(u) if u.ret != 0 && u.ret == u.pgsize * u.pgcount => Some((i, *u)),
            _ => None,
        })
        .expect("an unmap Linux completed");
    let report = planted(case, Plant::RefuseUnmap(u));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op }), "{report}");
    assert!(
        !report
            .allowed
            .contains_key(&AllowedDifference::EagerFreedEmptyTable),
        "{report}"
    );
    assert!(
        report.mismatches[0].message.contains("iopt ret 0x0"),
        "{report}"
    );
}

#[test]
fn error_precedence_is_allowed_only_when_iopt_error_holds() {
    let cases = random();
    // A map Linux refused with -ERANGE whose page size a level of the walk does map.
    let (case, op, m) = cases
        .iter()
        .find_map(|c| {
            let cfg = Config::new(c.config_input()).ok()?;
            c.ops().iter().enumerate().find_map(|(i, op)| match op {
                Op::Map(m)
                    if m.ret == -34
                        && PageSize::new(m.pgsize).is_some_and(|s| cfg.leaf_level(s).is_some()) =>
                {
                    Some((c, i, *m))
                }
                _ => None,
            })
        })
        .expect("an -ERANGE map of a mappable size");
    assert!(plain(case).passed());
    let report = planted(case, Plant::RefuseMapAsInvalidSize(m));
    assert_eq!(report.stopped, Some(Stop::Mismatch { op }), "{report}");
    assert!(
        !report
            .allowed
            .contains_key(&AllowedDifference::ErrorPrecedence),
        "{report}"
    );
}

/// A copy of `case` with the op at `index` moved `by` bytes up, inside its first page: Linux
/// rounds the iova down, so its recorded answers stay exactly right for the moved call.
fn misalign(case: &Case, index: usize, by: u64) -> Case {
    let mut case = case.clone();
    let iopt_golden::Outcome::Allocated(a) = &mut case.outcome else {
        panic!("an allocated case")
    };
    match &mut a.ops[index] {
        Op::Map(m) => m.iova += by,
        Op::Unmap(u) => u.iova += by,
        Op::IovaToPhys(_) => panic!("a map or unmap"),
    }
    case
}

#[test]
fn a_misaligned_call_linux_completed_is_made_rounded_down() {
    let cases = random();
    let case = &cases[0];
    let ops = case.ops();
    let map = ops
        .iter()
        .position(|op| matches!(op, Op::Map(m) if m.ret == 0 && m.mapped == m.pgsize * m.pgcount))
        .expect("a completed map");
    let unmap = ops
        .iter()
        .position(|op| matches!(op, Op::Unmap(u) if u.ret != 0))
        .expect("a completed unmap");
    for index in [map, unmap] {
        let moved = misalign(case, index, 0x800);
        let report = plain(&moved);
        assert!(report.passed(), "{report}");
        assert_eq!(report.ops_replayed, report.ops_total, "{report}");
        assert!(report.final_compared);
        assert!(
            report
                .resyncs
                .iter()
                .any(|r| r.op == index && r.difference == AllowedDifference::MisalignedRejected),
            "{report}"
        );
    }
}

#[test]
fn a_misaligned_eexist_still_tears_down_what_linux_did() {
    let cases = random();
    let (case, op, _) = first_eexist_teardown(&cases);
    let moved = misalign(case, op, 0x800);
    let report = plain(&moved);
    assert!(report.passed(), "{report}");
    assert_eq!(report.ops_replayed, report.ops_total, "{report}");
    let resync = report
        .resyncs
        .iter()
        .find(|r| r.op == op)
        .expect("the misaligned -EEXIST is resynchronised");
    assert_eq!(resync.difference, AllowedDifference::MisalignedRejected);
    assert!(resync.leaves_removed > 0, "{report}");
}

/// A copy of `case` with one more map at its end: a size the bitmap has but no level of the
/// walk maps, answered `ret` by Linux (nothing changed, so the final state stays valid).
fn with_oversized_map(case: &Case, iova: u64, pgsize: u64, ret: i32) -> Case {
    let mut case = case.clone();
    let iopt_golden::Outcome::Allocated(a) = &mut case.outcome else {
        panic!("an allocated case")
    };
    a.ops.push(Op::Map(MapOp {
        iova,
        paddr: 0,
        pgsize,
        pgcount: 1,
        prot: 3,
        ret,
        mapped: 0,
    }));
    case
}

#[test]
fn an_oversized_map_meeting_a_block_is_eexist_only_over_a_block() {
    let cases = random();
    // A case whose bitmap has a size no level maps (1G with a 30-bit input range), ending
    // with a block above the last level.
    let (case, block, pgsize) = cases
        .iter()
        .find_map(|c| {
            let cfg = Config::new(c.config_input()).ok()?;
            let big = cfg
                .page_sizes()
                .iter()
                .find(|s| cfg.leaf_level(*s).is_none())?;
            let leaf = c
                .allocated()?
                .final_state
                .leaves
                .iter()
                .find(|l| l.level < 3)?;
            Some((c, leaf.iova, big.get()))
        })
        .expect("such a case");
    let report = plain(&with_oversized_map(case, block, pgsize, -17));
    assert!(report.passed(), "{report}");
    let before = plain(case).allowed[&AllowedDifference::OversizedPageSizeRejected];
    assert_eq!(
        report.allowed[&AllowedDifference::OversizedPageSizeRejected],
        before + 1
    );
    // Where no block translates the iova, Linux's -EEXIST does not follow: a mismatch.
    let cfg = Config::new(case.config_input()).unwrap();
    let (lo, _) = cfg.iova_bounds();
    let free = (0..64)
        .map(|i| lo.get() + i * cfg.block_size(cfg.start_level() + 1))
        .find(|&i| {
            case.allocated()
                .unwrap()
                .final_state
                .leaves
                .iter()
                .all(|l| {
                    let size = cfg.block_size(l.level);
                    i < l.iova || i >= l.iova + size
                })
        })
        .expect("an unmapped iova");
    let report = plain(&with_oversized_map(case, free, pgsize, -17));
    assert!(!report.passed(), "{report}");
    assert!(
        matches!(report.stopped, Some(Stop::Mismatch { op }) if op == case.ops().len()),
        "{report}"
    );
}
