//! One backend under check: the table, its memory and device, the model it must agree with,
//! and the checks run after every operation.

// Steps read best with short names: `t` the table, `n` the step, `m` the model.
#![allow(clippy::many_single_char_names)]

use crate::env::{Device, Hooked};
use crate::failure::Failure;
use crate::input::{Setup, Step};
use crate::scan::{Scan, scan, sizes_problems};
use iopt_alloc_ops::{AllocOpsTable, FreePolicy, InFlightCap};
use iopt_api::{
    AllocError, Config, FlushOps, Gather, Iova, IovaRange, Issuer, MapError, PageSize, PhysAddr,
    Prot, Reservation, Reserve, ReserveError, TableAlloc, UnmapError, WalkItem,
};
use iopt_lpae::account::{Accounting, Reserving};
use iopt_lpae::engine::hold::HELD;
use iopt_model::{CapRule, Model, ReservePolicy};
use iopt_prealloc::PreallocTable;
use iopt_sim::debug::render;
use iopt_sim::oracle::{Access, Fault, MemType, Walker};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

/// A backend as the checkers drive it: the [`Reserve`] trait, plus what only some backends
/// can say about themselves.
pub trait Subject: Reserve {
    /// Unlinked tables still waiting for a grace period (refcounted engines).
    fn deferred_frees(&self) -> usize {
        0
    }

    /// Tables live reservations hold (Design 1 freeing empty tables: the tables their maps
    /// installed from their pools, each with [`HELD`] in its reservations count).
    fn held_tables(&self) -> Vec<PhysAddr> {
        Vec::new()
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Subject for AllocOpsTable<A, F, K> {
    fn deferred_frees(&self) -> usize {
        self.engine().deferred_frees()
    }

    fn held_tables(&self) -> Vec<PhysAddr> {
        AllocOpsTable::held_tables(self)
    }
}

/// What the tables live reservations hold change in the checks: the reservations count each
/// held table must carry, and the held tables an unmap unlinked from above (orphans: still
/// allocated and counted live, freed by their holder at release).
#[derive(Debug, Default)]
pub struct Holds {
    held: std::collections::BTreeSet<PhysAddr>,
    /// Held tables not reachable from the root.
    pub orphans: u64,
}

impl Holds {
    /// The holds of `t`, against the tables `sc` found.
    #[must_use]
    pub fn of(t: &dyn Subject, sc: &Scan) -> Self {
        let held: std::collections::BTreeSet<PhysAddr> = t.held_tables().into_iter().collect();
        let reachable = sc.tables.iter().filter(|x| held.contains(&x.pa)).count();
        Self {
            orphans: (held.len() - reachable) as u64,
            held,
        }
    }

    /// What a hold adds to the reservations count of the table at `pa`.
    #[must_use]
    pub fn count(&self, pa: PhysAddr) -> u32 {
        if self.held.contains(&pa) { HELD } else { 0 }
    }
}

impl<A: TableAlloc, F: FlushOps, K: Reserving> Subject for PreallocTable<A, F, K> {
    fn deferred_frees(&self) -> usize {
        self.engine().deferred_frees()
    }
}

/// Which design a lane runs, and so what the checks expect of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Design {
    /// Design 1 (`AllocOpsTable`) with a free policy and an optional in-flight cap.
    AllocOps {
        /// When tables are freed.
        free: FreePolicy,
        /// The in-flight cap on reservations.
        cap: Option<CapRule>,
    },
    /// Design 2 (`PreallocTable`).
    Prealloc,
}

impl Design {
    /// Design 1 as the kernel drivers use it: Linux freeing, no cap.
    pub const D1: Self = Design::AllocOps {
        free: FreePolicy::Linux,
        cap: None,
    };
    /// Design 1 with eager freeing of empty tables.
    pub const D1_EAGER: Self = Design::AllocOps {
        free: FreePolicy::EmptyTables,
        cap: None,
    };
    /// Design 2.
    pub const D2: Self = Design::Prealloc;

    /// Whether the engine keeps `live_entries` (refcounted policy).
    #[must_use]
    pub fn counts_entries(self) -> bool {
        !matches!(
            self,
            Design::AllocOps {
                free: FreePolicy::Linux,
                ..
            }
        )
    }

    /// Whether tables carry reservation counts.
    #[must_use]
    pub fn counts_reservations(self) -> bool {
        self == Design::Prealloc
    }

    /// The model's policy for the design, if the model covers it (it does not model Design 1
    /// with eager freeing).
    #[must_use]
    pub fn model_policy(self) -> Option<ReservePolicy> {
        match self {
            Design::AllocOps {
                free: FreePolicy::Linux,
                cap,
            } => Some(ReservePolicy::Pools { cap }),
            Design::AllocOps { .. } => None,
            Design::Prealloc => Some(ReservePolicy::Refcounts),
        }
    }

    /// Builds the design's table over `alloc`, reporting flushes to `alloc.dev`.
    ///
    /// # Errors
    ///
    /// The allocator's error for the root.
    pub fn build(self, cfg: Config, alloc: Hooked) -> Result<Box<dyn Subject>, AllocError> {
        let flush = Arc::clone(&alloc.dev);
        self.build_with(cfg, alloc, flush)
    }

    /// Builds the design's table over any allocator and flush callbacks (the broken variants
    /// pass wrappers).
    ///
    /// # Errors
    ///
    /// The allocator's error for the root.
    pub fn build_with<A, F>(
        self,
        cfg: Config,
        alloc: A,
        flush: F,
    ) -> Result<Box<dyn Subject>, AllocError>
    where
        A: TableAlloc + 'static,
        F: FlushOps + 'static,
    {
        match self {
            Design::AllocOps { free, cap } => {
                let cap = match cap {
                    None => InFlightCap::Unlimited,
                    Some(CapRule::Strict(n)) => InFlightCap::Strict(n),
                    Some(CapRule::MsmThrottle(n)) => InFlightCap::MsmThrottle(n),
                };
                Ok(match free {
                    FreePolicy::EmptyTables => Box::new(
                        AllocOpsTable::freeing_empty_tables(cfg, alloc, flush)?.with_cap(cap),
                    ),
                    _ => Box::new(AllocOpsTable::with_flush(cfg, alloc, flush)?.with_cap(cap)),
                })
            }
            Design::Prealloc => Ok(Box::new(PreallocTable::with_flush(cfg, alloc, flush)?)),
        }
    }
}

/// How to build a lane's table: the real designs, or a deliberately broken variant.
pub type Build = dyn Fn(Config, Hooked) -> Result<Box<dyn Subject>, AllocError> + Send + Sync;

/// A lane to run: a name, the design whose semantics it must have, and its constructor.
pub struct LaneSpec {
    /// Name in reports.
    pub name: String,
    /// The semantics expected.
    pub design: Design,
    /// The constructor.
    pub build: Box<Build>,
    /// Drive maps, unmaps and lookups through the exclusive (`&mut`) entry points
    /// ([`IoPageTable::map_mut`](iopt_api::IoPageTable::map_mut) and its siblings), which
    /// must give exactly what the shared ones give.
    pub exclusive: bool,
}

impl std::fmt::Debug for LaneSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneSpec")
            .field("name", &self.name)
            .field("design", &self.design)
            .field("exclusive", &self.exclusive)
            .finish_non_exhaustive()
    }
}

impl LaneSpec {
    /// The real backend of `design`.
    #[must_use]
    pub fn real(name: &str, design: Design) -> Self {
        Self {
            name: name.to_string(),
            design,
            build: Box::new(move |cfg, alloc| design.build(cfg, alloc)),
            exclusive: false,
        }
    }

    /// The same lane driven through the exclusive (`&mut`) entry points.
    #[must_use]
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }
}

/// A reservation handle as a lane holds it.
#[derive(Debug)]
enum Handle {
    /// Live on the table.
    Live(Reservation),
    /// Released, or never made: a forged copy that the table must refuse.
    Dead(Reservation),
}

impl Handle {
    fn get(&self) -> &Reservation {
        match self {
            Handle::Live(r) | Handle::Dead(r) => r,
        }
    }
}

/// A handle with `r`'s public fields, rebuilt as a driver keeping a released handle's
/// numbers would: the table must refuse it.
fn forge(r: &Reservation) -> Reservation {
    Issuer::new(r.table_id()).issue(r.id(), r.range(), r.max_leaf(), r.pages(), 0)
}

/// What an operation must not change when it fails: the walk, the allocator's live set, and
/// the counters of reachable and reserved pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    walk: Vec<WalkItem>,
    live: Vec<(PhysAddr, u64)>,
    live_tables: u64,
    outstanding: u64,
}

impl Snapshot {
    /// Takes a snapshot of `table` and its memory.
    #[must_use]
    pub fn take(table: &dyn Subject, mem: &iopt_sim::SimMemory) -> Self {
        let mut walk = Vec::new();
        table.walk(&mut |i| walk.push(i));
        let s = table.stats();
        Self {
            walk,
            live: mem.live_set(),
            live_tables: s.live_tables,
            outstanding: s.reserved_outstanding,
        }
    }

    /// Describes the first difference from `other`.
    #[must_use]
    pub fn diff(&self, other: &Self) -> String {
        if self.walk != other.walk {
            let i = self
                .walk
                .iter()
                .zip(&other.walk)
                .position(|(a, b)| a != b)
                .unwrap_or(self.walk.len().min(other.walk.len()));
            return format!(
                "walk differs at item {i}: before {:?}, after {:?} ({} vs {} items)",
                self.walk.get(i),
                other.walk.get(i),
                self.walk.len(),
                other.walk.len()
            );
        }
        if self.live != other.live {
            let gone: Vec<_> = self
                .live
                .iter()
                .filter(|p| !other.live.contains(p))
                .collect();
            let new: Vec<_> = other
                .live
                .iter()
                .filter(|p| !self.live.contains(p))
                .collect();
            return format!("allocator live set changed: freed {gone:x?}, allocated {new:x?}");
        }
        format!(
            "counters changed: live tables {} -> {}, reserved outstanding {} -> {}",
            self.live_tables, other.live_tables, self.outstanding, other.outstanding
        )
    }
}

/// Whether `e` is the allocator's out-of-memory error as a map reports it.
#[must_use]
pub fn map_oom(e: &MapError) -> bool {
    matches!(
        e,
        MapError::Alloc {
            source: AllocError::OutOfMemory { .. }
        }
    )
}

/// Whether `e` is the allocator's out-of-memory error as a reservation reports it.
#[must_use]
pub fn reserve_oom(e: &ReserveError) -> bool {
    matches!(
        e,
        ReserveError::Alloc {
            source: AllocError::OutOfMemory { .. }
        }
    )
}

/// One backend under check.
pub struct Lane {
    /// Name in reports.
    pub name: String,
    /// The semantics expected.
    pub design: Design,
    /// The configuration.
    pub setup: Setup,
    /// Memory and device.
    pub alloc: Hooked,
    table: Option<Box<dyn Subject>>,
    walker: Option<Walker>,
    model: Option<Model>,
    gather: Gather,
    handles: Vec<Handle>,
    log: Vec<String>,
    /// Fault injection: every failure seen must be typed and change nothing.
    injecting: bool,
    /// Maps, unmaps and lookups go through the exclusive entry points.
    exclusive: bool,
    /// Failures injected and absorbed so far.
    pub injected_hits: u64,
    /// Translations compared with the oracle so far.
    pub probes: u64,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("name", &self.name)
            .field("design", &self.design)
            .field("setup", &self.setup.name)
            .finish_non_exhaustive()
    }
}

/// A tree's shape: leaves `(iova, size, pa)` and tables below the root `(level, iova)`.
pub type Shape = (Vec<(u64, u64, u64)>, Vec<(u32, u64)>);

/// What a step gave: the backend's answer, the model's (if it models the lane), whether the
/// backend failed, and whether with the allocator's out-of-memory error.
type Answer = (String, Option<String>, bool, bool);

/// Ids of forged handles for reservations a lane refused (never issued by a table).
const FORGED: u64 = 1 << 62;

impl Lane {
    /// Builds a lane. With `inject = Some((k, sticky))` the `k`-th page allocation (the
    /// root's is 0) fails, once or from then on; a refused root must leave nothing held, and
    /// is retried when the failure was one-shot.
    ///
    /// # Errors
    ///
    /// A failure of the construction contract.
    pub fn new(
        spec: &LaneSpec,
        setup: Setup,
        inject: Option<(u64, bool)>,
    ) -> Result<Self, Failure> {
        let alloc = Hooked::for_config(&setup.cfg);
        let mut lane = Self {
            name: spec.name.clone(),
            design: spec.design,
            setup,
            alloc,
            table: None,
            walker: None,
            model: spec.design.model_policy().map(|p| Model::new(setup.cfg, p)),
            gather: Gather::new(),
            handles: Vec::new(),
            log: Vec::new(),
            injecting: inject.is_some(),
            exclusive: spec.exclusive,
            injected_hits: 0,
            probes: 0,
        };
        if let Some((k, sticky)) = inject {
            if sticky {
                lane.alloc.mem.fail_from(k);
            } else {
                lane.alloc.mem.fail_at(k);
            }
        }
        for _ in 0..2 {
            match (spec.build)(setup.cfg, lane.alloc.clone()) {
                Ok(t) => {
                    lane.alloc.dev.attach(setup.cfg, t.root());
                    let cfg = setup.cfg;
                    lane.walker = Walker::from_registers(
                        cfg.format(),
                        &t.registers(),
                        cfg.is_ttbr1(),
                        cfg.ias(),
                    );
                    if lane.walker.is_none() {
                        return Err(lane.fail_on(
                            Some(t.as_ref()),
                            "the oracle cannot use the table's registers",
                        ));
                    }
                    lane.table = Some(t);
                    lane.check_after(None, None)?;
                    return Ok(lane);
                }
                Err(e) => {
                    let held = lane.alloc.mem.stats().live_pages;
                    if !lane.injecting || !matches!(e, AllocError::OutOfMemory { .. }) || held != 0
                    {
                        return Err(lane.fail_with(format!(
                            "building the table failed with {e:?}, {held} page(s) held"
                        )));
                    }
                    lane.injected_hits += 1;
                    lane.log.push(format!("construction refused: {e:?}"));
                    if inject.is_some_and(|(_, sticky)| sticky) {
                        return Ok(lane);
                    }
                }
            }
        }
        Err(lane.fail_with("construction failed twice after a one-shot injected failure"))
    }

    /// The operations run so far with the backend's answers, one line each.
    #[must_use]
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// The table, if it was built.
    #[must_use]
    pub fn table(&self) -> Option<&dyn Subject> {
        self.table.as_deref()
    }

    fn fail_with(&self, what: impl Into<String>) -> Failure {
        self.fail_on(self.table.as_deref(), what)
    }

    fn fail_on(&self, t: Option<&dyn Subject>, what: impl Into<String>) -> Failure {
        Failure::new(format!("[{}] {}", self.name, what.into()), self.dump_of(t))
    }

    /// A readable dump: the tree (`iopt_sim::debug::render`), the model, the device caches,
    /// the reservations and the last operations.
    #[must_use]
    pub fn dump(&self) -> String {
        self.dump_of(self.table.as_deref())
    }

    fn dump_of(&self, table: Option<&dyn Subject>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "lane {} ({:?}) on {} ({:?})",
            self.name,
            self.design,
            self.setup.name,
            self.setup.cfg.input()
        );
        let _ = writeln!(out, "memory: {:?}", self.alloc.mem.stats());
        if let Some(t) = table {
            let _ = writeln!(out, "stats: {:?}", t.stats());
            let _ = writeln!(out, "tree:\n{}", render(t as &dyn iopt_api::IoPageTable));
        } else {
            let _ = writeln!(out, "(no table)");
        }
        if let Some(m) = &self.model {
            let _ = writeln!(
                out,
                "model: {} leaves, {} tables below the root {:x?}",
                m.leaves().len(),
                m.tables(),
                m.table_keys()
            );
            for (i, l) in m.leaves().iter().take(24) {
                let _ = writeln!(
                    out,
                    "  model leaf {i:#x} +{:#x} -> {:#x} {:?}",
                    l.size, l.pa, l.prot
                );
            }
        }
        let _ = write!(out, "device caches:\n{}", self.alloc.dev.describe());
        for (i, h) in self.handles.iter().enumerate() {
            let _ = writeln!(out, "res[{i}]: {h:?}");
        }
        let from = self.log.len().saturating_sub(32);
        let _ = writeln!(out, "last operations ({} in all):", self.log.len());
        for l in &self.log[from..] {
            let _ = writeln!(out, "  {l}");
        }
        out
    }

    /// Runs `step` on the table and the model and checks everything after it.
    ///
    /// # Errors
    ///
    /// The first disagreement, with a dump.
    pub fn step(&mut self, n: usize, step: &Step) -> Result<(), Failure> {
        let Some(mut table) = self.table.take() else {
            return Ok(());
        };
        let r = self.step_on(table.as_mut(), n, step);
        self.table = Some(table);
        r
    }

    /// Runs `step`; when an injected allocation failure hit it (checked: typed, nothing
    /// changed), runs it again, as a caller retrying after memory pressure would, and returns
    /// `true`.
    ///
    /// # Errors
    ///
    /// The first disagreement, with a dump.
    pub fn step_retrying(&mut self, n: usize, step: &Step) -> Result<bool, Failure> {
        let hits = self.injected_hits;
        self.step(n, step)?;
        if self.injected_hits == hits {
            return Ok(false);
        }
        if matches!(step, Step::Reserve { .. }) {
            // The refused reservation's forged handle gives way to the retry's.
            self.handles.pop();
        }
        self.step(n, step)?;
        Ok(true)
    }

    /// The tree's shape: leaves `(iova, size, pa)` and tables below the root `(level, iova)`.
    #[must_use]
    pub fn shape(&self) -> Shape {
        let Some(t) = &self.table else {
            return (Vec::new(), Vec::new());
        };
        let sc = scan(&self.setup.cfg, &self.alloc.mem, t.root());
        (
            sc.leaves.iter().map(|l| (l.iova, l.size, l.pa)).collect(),
            sc.tables
                .iter()
                .skip(1)
                .map(|x| (x.level, x.iova))
                .collect(),
        )
    }

    #[allow(clippy::too_many_lines)]
    fn step_on(&mut self, t: &mut dyn Subject, n: usize, step: &Step) -> Result<(), Failure> {
        let mem = Arc::clone(&self.alloc.mem);
        let before = Snapshot::take(t, &mem);
        let model_before = self.model.clone();
        let injected_before = mem.stats().injected_failures;
        // (what the backend said, what the model said, whether the backend failed, whether
        // that failure is the allocator's out-of-memory error)
        let (got, want, failed, oom): Answer = match *step {
            Step::Map {
                res,
                iova,
                pa,
                size,
                count,
                prot,
            } => {
                let Some(ps) = PageSize::new(size) else {
                    return Ok(());
                };
                let (got, id) = match res {
                    None if self.exclusive => (
                        t.map_mut(Iova::new(iova), PhysAddr::new(pa), ps, count, prot),
                        None,
                    ),
                    None => (
                        t.map(Iova::new(iova), PhysAddr::new(pa), ps, count, prot),
                        None,
                    ),
                    Some(i) => {
                        let Some(h) = self.handles.get(i) else {
                            return Ok(());
                        };
                        let r = h.get();
                        (
                            t.map_reserved(r, Iova::new(iova), PhysAddr::new(pa), ps, count, prot),
                            Some(r.id()),
                        )
                    }
                };
                let want = self
                    .model
                    .as_mut()
                    .map(|m| m.map(id, iova, pa, size, count, prot));
                let oom = got.as_ref().err().is_some_and(map_oom);
                (
                    format!("{got:?}"),
                    want.map(|w| format!("{w:?}")),
                    got.is_err(),
                    oom,
                )
            }
            Step::MapRange {
                iova,
                pa,
                len,
                prot,
            } => {
                let got = t.map_range(Iova::new(iova), PhysAddr::new(pa), len, prot);
                let want = self
                    .model
                    .as_mut()
                    .map(|m| m.map_range(iova, pa, len, prot));
                let oom = got.as_ref().err().is_some_and(map_oom);
                (
                    format!("{got:?}"),
                    want.map(|w| format!("{w:?}")),
                    got.is_err(),
                    oom,
                )
            }
            Step::Unmap { iova, size, count } => {
                let Some(ps) = PageSize::new(size) else {
                    return Ok(());
                };
                let got: Result<u64, UnmapError> = if self.exclusive {
                    t.unmap_mut(Iova::new(iova), ps, count, &mut self.gather)
                } else {
                    t.unmap(Iova::new(iova), ps, count, &mut self.gather)
                };
                let want = self.model.as_mut().map(|m| m.unmap(iova, size, count));
                (
                    format!("{got:?}"),
                    want.map(|w| format!("{w:?}")),
                    got.is_err(),
                    false,
                )
            }
            Step::Lookup { iova } => {
                self.alloc.dev.access(&mem, iova);
                if self.exclusive {
                    let shared = t.iova_to_phys(Iova::new(iova));
                    let mine = t.iova_to_phys_mut(Iova::new(iova));
                    if mine != shared {
                        return Err(self.fail_on(
                            Some(t),
                            format!(
                                "after {step}: exclusive lookup of {iova:#x} gave {mine:x?}, \
                                 the shared one {shared:x?}"
                            ),
                        ));
                    }
                }
                self.probe(t, iova, step)?;
                (String::new(), Some(String::new()), false, false)
            }
            Step::Reserve { start, len, leaf } => {
                let (Ok(range), Some(leaf)) = (
                    IovaRange::new(Iova::new(start), len, 1),
                    PageSize::new(leaf),
                ) else {
                    return Ok(());
                };
                let got = t.reserve(range, leaf);
                let id = got.as_ref().map_or(u64::MAX, Reservation::id);
                let want = self.model.as_mut().map(|m| m.reserve(id, range, leaf));
                let g = got.as_ref().map(Reservation::pages).map_err(|e| *e);
                let oom = got.as_ref().err().is_some_and(reserve_oom);
                let failed = got.is_err();
                let handle = match got {
                    Ok(r) => Handle::Live(r),
                    Err(_) => Handle::Dead(Issuer::new(0).issue(
                        FORGED + self.handles.len() as u64,
                        range,
                        leaf,
                        0,
                        0,
                    )),
                };
                self.handles.push(handle);
                (
                    format!("{g:?}"),
                    want.map(|w| format!("{w:?}")),
                    failed,
                    oom,
                )
            }
            Step::Release { res } => {
                let Some(h) = self.handles.get_mut(res) else {
                    return Ok(());
                };
                let (r, id) = match h {
                    Handle::Live(r) => {
                        let copy = forge(r);
                        let id = r.id();
                        let live = std::mem::replace(h, Handle::Dead(copy));
                        match live {
                            Handle::Live(r) | Handle::Dead(r) => (r, id),
                        }
                    }
                    Handle::Dead(r) => (forge(r), r.id()),
                };
                // The model knows the reason only; a refused handle (a forged or dead one
                // here) is dropped with the error.
                let got = t.release(r, &mut self.gather).map_err(|e| e.error());
                let want = self.model.as_mut().map(|m| m.release(id));
                (
                    format!("{got:?}"),
                    want.map(|w| format!("{w:?}")),
                    got.is_err(),
                    false,
                )
            }
            Step::Flush => {
                self.alloc.dev.flush_gather(&mut self.gather);
                (String::new(), Some(String::new()), false, false)
            }
            Step::MapSg {
                iova,
                segs,
                n,
                prot,
            } => {
                let list: Vec<(PhysAddr, u64)> = segs
                    .iter()
                    .take(n)
                    .map(|&(pa, len)| (PhysAddr::new(pa), len))
                    .collect();
                let got = t.map_sg(Iova::new(iova), &list, prot);
                // The model maps the segments one after the other: the table must succeed
                // exactly when that does (which error it names first may differ: it plans
                // the whole list before touching anything, and the snapshot shows nothing
                // changed).
                let want = self.model.as_mut().map(|m| {
                    let mut trial = m.clone();
                    let mut at = iova;
                    let mut r = Ok(());
                    for &(pa, len) in segs.iter().take(n) {
                        r = trial.map_range(at, pa, len, prot);
                        if r.is_err() {
                            break;
                        }
                        at = at.wrapping_add(len);
                    }
                    match (&got, r) {
                        (Ok(()), Ok(())) => {
                            *m = trial;
                            format!("{got:?}")
                        }
                        (Err(_), Err(_)) => format!("{got:?}"),
                        (_, r) => format!("the model, segment by segment: {r:?}"),
                    }
                });
                let oom = got.as_ref().err().is_some_and(map_oom);
                let g = format!("{got:?}");
                (g, want, got.is_err(), oom)
            }
            Step::UnmapCollect { iova, size, count } => {
                let Some(ps) = PageSize::new(size) else {
                    return Ok(());
                };
                let mut runs = Vec::new();
                let got = t.unmap_collect(Iova::new(iova), ps, count, &mut self.gather, &mut runs);
                let want = self.model.as_mut().map(|m| {
                    // The runs are the model's leaves inside the range, merged.
                    let end = iova.saturating_add(size.saturating_mul(count));
                    let mut expect = Vec::new();
                    for (&at, l) in m.leaves().range(iova..end) {
                        if let Some(s) = PageSize::new(l.size) {
                            iopt_api::push_pa_run(
                                &mut expect,
                                Iova::new(at),
                                PhysAddr::new(l.pa),
                                s.get(),
                            );
                        }
                    }
                    let r = m.unmap(iova, size, count);
                    if r.is_err() {
                        expect.clear();
                    }
                    format!("{r:?} {expect:?}")
                });
                let g = format!("{got:?} {runs:?}");
                (g, want, got.is_err(), false)
            }
            Step::DeviceWrite { iova } => {
                let Some(w) = self.walker else {
                    return Ok(());
                };
                // A write goes through where the table maps it writable (a DBM leaf becomes
                // dirty), faults for permission where it maps it otherwise, and for
                // translation where nothing is mapped.
                let got = match w.device_write(mem.as_ref(), iova) {
                    Ok(h) => format!("Ok({:#x})", h.pa.get()),
                    Err(Fault::Translation { .. }) => "translation fault".to_string(),
                    Err(Fault::Permission { .. }) => "permission fault".to_string(),
                    Err(f) => format!("{f:?}"),
                };
                // The device writes unprivileged: a stage-1 PRIV leaf refuses it.
                let stage1 = self.setup.cfg.format().is_stage1();
                let want = match self.expect(t, iova) {
                    None => "translation fault".to_string(),
                    Some((pa, _, prot))
                        if prot.contains(Prot::WRITE) && !(stage1 && prot.contains(Prot::PRIV)) =>
                    {
                        format!("Ok({pa:#x})")
                    }
                    Some(_) => "permission fault".to_string(),
                };
                (got, Some(want), false, false)
            }
            Step::ReadDirty { start, len, keep } => {
                let Ok(range) = IovaRange::new(Iova::new(start), len, 1) else {
                    return Ok(());
                };
                let want = expected_dirty(&self.setup.cfg, &mem, t.root(), range);
                let flags = if keep {
                    iopt_api::DirtyFlags::NO_CLEAR
                } else {
                    iopt_api::DirtyFlags::empty()
                };
                let mut records: Vec<(Iova, u64)> = Vec::new();
                let got = t.read_and_clear_dirty(range, flags, &mut records, &mut self.gather);
                let g = format!("{:?}", got.map(|()| records));
                if got.is_ok() && !keep {
                    // A second harvest right away finds nothing.
                    if let Ok(again) = expected_dirty(&self.setup.cfg, &mem, t.root(), range) {
                        if !again.is_empty() {
                            return Err(self.fail_on(
                                Some(t),
                                format!("after {step}: still dirty: {again:x?}"),
                            ));
                        }
                    }
                }
                (g, Some(format!("{want:?}")), got.is_err(), false)
            }
        };
        self.log.push(format!("#{n} {step} -> {got}"));
        let injected = mem.stats().injected_failures > injected_before;
        if injected {
            self.injected_hits += 1;
        }
        if failed {
            let after = Snapshot::take(t, &mem);
            if after != before {
                return Err(self.fail_on(
                    Some(t),
                    format!(
                        "step #{n} {step} failed with {got} but changed the table: {}",
                        before.diff(&after)
                    ),
                ));
            }
        }
        if injected && failed {
            if !oom {
                return Err(self.fail_on(Some(t), format!(
                    "step #{n} {step}: an injected allocation failure surfaced as {got}, not as \
                     the allocator's typed out-of-memory error"
                )));
            }
            // Nothing changed, so the model must not either.
            self.model = model_before;
        } else if !self.injecting && oom {
            return Err(self.fail_on(
                Some(t),
                format!("step #{n} {step}: out of memory ({got}) without an injected failure"),
            ));
        } else if let Some(want) = want {
            if got != want && !self.same_by_precedence(step, &got, &want) {
                return Err(self.fail_on(
                    Some(t),
                    format!("step #{n} {step}: the backend answered {got}, the model {want}"),
                ));
            }
        }
        self.check_on(t, Some(n), Some(step))
    }

    /// A map whose run spans several leaf tables is planned whole before any table is
    /// touched, so the engine reports a leaf in the way (`AlreadyMapped`) anywhere in the run
    /// before a reserved table in the way (`ReservedTable`) earlier in it; the model, like the
    /// engine for a run inside one leaf table, reports whichever comes first. Both are true
    /// (and nothing changes either way: checked), so this one difference in precedence is
    /// accepted when the leaf the backend names really is there.
    fn same_by_precedence(&self, step: &Step, got: &str, want: &str) -> bool {
        let cfg = &self.setup.cfg;
        match *step {
            Step::Map {
                iova, size, count, ..
            } => {
                // Only a run that spans several leaf tables is planned whole.
                let Some(level) = PageSize::new(size).and_then(|s| cfg.leaf_level(s)) else {
                    return false;
                };
                let per = cfg.granule().entries() as u64;
                let idx = (iova >> cfg.level_shift(level)) & (per - 1);
                if count <= per - idx {
                    return false;
                }
            }
            Step::MapRange { .. } => {}
            _ => return false,
        }
        if !want.starts_with("Err(ReservedTable") {
            return false;
        }
        let Some(m) = &self.model else { return false };
        let Some(at) = got
            .strip_prefix("Err(AlreadyMapped { iova: Iova(")
            .and_then(|r| r.strip_suffix(") })"))
            .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        else {
            return false;
        };
        let span = self
            .setup
            .cfg
            .page_sizes()
            .largest()
            .map_or(0, PageSize::get);
        let real = m
            .leaves()
            .range(..at.saturating_add(span))
            .next_back()
            .is_some_and(|(&i, l)| i + l.size > at);
        if real {
            bridged::PRECEDENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        real
    }

    /// Compares the software lookup and the hardware walk of `iova` with the expectation.
    fn probe(&mut self, t: &dyn Subject, iova: u64, step: &Step) -> Result<(), Failure> {
        let cfg = self.setup.cfg;
        self.probes += 1;
        let want = self.expect(t, iova);
        let got = t
            .iova_to_phys(Iova::new(iova))
            .map(|x| (x.pa.get(), x.size.get(), x.prot));
        if got != want {
            return Err(self.fail_on(
                Some(t),
                format!(
                    "after {step}: software lookup of {iova:#x} gave {got:x?}, expected {want:x?}"
                ),
            ));
        }
        let Some(walker) = self.walker else {
            return Ok(());
        };
        let write = want.is_some_and(|(_, _, p)| !p.contains(Prot::READ));
        let hw = walker.translate(
            self.alloc.mem.as_ref(),
            iova,
            Access {
                write,
                exec: false,
                privileged: true,
            },
        );
        let ok = match (want, &hw) {
            (None, Err(Fault::Translation { .. })) => true,
            (Some((pa, size, prot)), Ok(h)) => {
                let stage1 = cfg.format().is_stage1();
                let mem_type = if prot.contains(Prot::MMIO) {
                    MemType::Device
                } else if prot.contains(Prot::CACHE) {
                    MemType::NormalWriteBack
                } else {
                    MemType::NormalNonCacheable
                };
                h.pa.get() == pa
                    && h.leaf_size == size
                    && h.readable == (stage1 || prot.contains(Prot::READ))
                    && h.writable == prot.contains(Prot::WRITE)
                    && h.executable == (h.readable && !prot.contains(Prot::NOEXEC))
                    && h.mem == mem_type
                    && h.non_secure == (stage1 && cfg.quirks().contains(iopt_api::Quirks::NS))
            }
            _ => false,
        };
        if !ok {
            return Err(self.fail_on(
                Some(t),
                format!(
                    "after {step}: the hardware walk (oracle) of {iova:#x} gave {hw:x?}, expected \
                 {want:x?}"
                ),
            ));
        }
        Ok(())
    }

    /// What a lookup of `iova` must give: the model's answer, or (for a lane the model does
    /// not cover) the leaf the software walk reports.
    fn expect(&self, t: &dyn Subject, iova: u64) -> Option<(u64, u64, Prot)> {
        if !self.setup.cfg.iova_in_range(Iova::new(iova)) {
            return None;
        }
        if let Some(m) = &self.model {
            return m.lookup(iova);
        }
        let mut found = None;
        t.walk(&mut |item| {
            if let WalkItem::Leaf {
                iova: i,
                size,
                pa,
                prot,
                ..
            } = item
            {
                if iova >= i.get() && iova - i.get() < size.get() {
                    found = Some((pa.get() + (iova - i.get()), size.get(), prot));
                }
            }
        });
        found
    }

    /// Every structural invariant, the device's flush contract, the tree against the model,
    /// and translations in and around the touched range through the oracle.
    ///
    /// # Errors
    ///
    /// The first violation, with a dump.
    pub fn check_after(&mut self, n: Option<usize>, step: Option<&Step>) -> Result<(), Failure> {
        let Some(table) = self.table.take() else {
            return Ok(());
        };
        let r = self.check_on(table.as_ref(), n, step);
        self.table = Some(table);
        r
    }

    #[allow(clippy::too_many_lines)]
    fn check_on(
        &mut self,
        t: &dyn Subject,
        n: Option<usize>,
        step: Option<&Step>,
    ) -> Result<(), Failure> {
        let cfg = self.setup.cfg;
        let mem = Arc::clone(&self.alloc.mem);
        let at = n.map_or_else(|| "construction".to_string(), |n| format!("step #{n}"));
        let sc: Scan = scan(&cfg, &mem, t.root());
        let mut problems = sc.problems.clone();
        problems.extend(sizes_problems(&cfg, &mem, &sc));

        // The device: freed or unlinked tables it still caches, removed leaves not gathered.
        // Let it walk the touched range first, so the next operation's frees are watched.
        let leaves: BTreeMap<u64, (u64, u64)> =
            sc.leaves.iter().map(|l| (l.iova, (l.size, l.pa))).collect();
        let now = |iova: u64| {
            leaves
                .range(..=iova)
                .next_back()
                .filter(|(i, (s, _))| iova - **i < *s)
                .map(|(i, (s, p))| (p + (iova - i), *s))
        };
        self.alloc.dev.audit(&sc.linked(), &now, &self.gather);
        problems.extend(self.alloc.dev.take_violations());

        // A non-coherent walker sees only cleaned lines: every write must have been cleaned.
        if let Some((pa, cpu, dev)) = sc.tables.iter().find_map(|x| mem.first_stale(x.pa)) {
            problems.push(format!(
                "the walker cannot see the write at {pa:?}: the CPU holds {cpu:#x}, memory \
                 {dev:#x} (a descriptor write without a clean)"
            ));
        }

        // The software walk reports exactly what memory holds.
        let mut walk = Vec::new();
        t.walk(&mut |i| walk.push(i));
        let mut wt = Vec::new();
        let mut wl = Vec::new();
        for item in &walk {
            match *item {
                WalkItem::Table {
                    iova,
                    level,
                    pa,
                    live,
                } => wt.push((level, iova.get(), pa, live)),
                WalkItem::Leaf {
                    iova,
                    level,
                    size,
                    pa,
                    descriptor,
                    ..
                } => wl.push((iova.get(), level, size.get(), pa.get(), descriptor)),
                _ => {}
            }
        }
        let st: Vec<_> = sc
            .tables
            .iter()
            .map(|x| (x.level, x.iova, x.pa, x.valid))
            .collect();
        let sl: Vec<_> = sc
            .leaves
            .iter()
            .map(|l| (l.iova, l.level, l.size, l.pa, l.desc))
            .collect();
        if wt != st {
            problems.push(format!(
                "the table's walk reports tables {wt:x?}, memory holds {st:x?}"
            ));
        }
        if wl != sl {
            let i = wl.iter().zip(&sl).position(|(a, b)| a != b);
            problems.push(format!(
                "the table's walk reports {} leaves, memory holds {} (first difference at {i:?})",
                wl.len(),
                sl.len()
            ));
        }

        // Counters and the allocator's books.
        let stats = t.stats();
        let holds = Holds::of(t, &sc);
        // Held tables an unmap unlinked stay allocated, and counted, until their release.
        let tables = sc.tables.len() as u64 + holds.orphans;
        if stats.live_tables != tables {
            problems.push(format!(
                "stats.live_tables is {}, {tables} tables are reachable or held",
                stats.live_tables
            ));
        }
        let ms = mem.stats();
        if ms.live_pages != tables + stats.reserved_outstanding {
            problems.push(format!(
                "the allocator holds {} pages, reachable tables {tables} + unconsumed \
                 reservation pages {} = {}: a page leaked or was freed while in use",
                ms.live_pages,
                stats.reserved_outstanding,
                tables + stats.reserved_outstanding
            ));
        }
        if ms.bad_frees != 0 {
            problems.push(format!(
                "{} bad free(s) (double free or foreign page)",
                ms.bad_frees
            ));
        }
        if stats.pages_reserved
            != stats.pages_consumed + stats.reserved_unused + stats.reserved_outstanding
        {
            problems.push(format!(
                "reserved {} != consumed {} + unused {} + outstanding {}",
                stats.pages_reserved,
                stats.pages_consumed,
                stats.reserved_unused,
                stats.reserved_outstanding
            ));
        }
        if t.deferred_frees() != 0 {
            problems.push(format!(
                "{} freed table(s) still wait for a grace period with no operation running",
                t.deferred_frees()
            ));
        }

        // Table metadata: counts equal what they count.
        let live_res: Vec<(IovaRange, PageSize)> = self
            .handles
            .iter()
            .filter_map(|h| match h {
                Handle::Live(r) => Some((r.range(), r.max_leaf())),
                Handle::Dead(_) => None,
            })
            .collect();
        for (i, x) in sc.tables.iter().enumerate() {
            let want_le = if self.design.counts_entries() {
                x.valid as u32
            } else {
                0
            };
            let want_rs = if self.design.counts_reservations() {
                live_res
                    .iter()
                    .filter(|(r, l)| covers(&cfg, r, *l, x.iova, x.level))
                    .count() as u32
            } else {
                0
            } + holds.count(x.pa);
            if x.live_entries != want_le || x.reservations != want_rs {
                problems.push(format!(
                    "L{} table {} for {:#x}: live_entries {} reservations {}, expected {} and {}",
                    x.level, x.pa, x.iova, x.live_entries, x.reservations, want_le, want_rs
                ));
            }
            if i > 0 && self.design.counts_entries() && x.valid == 0 && want_rs == 0 {
                problems.push(format!(
                    "L{} table {} for {:#x} is empty and unreserved but was not freed",
                    x.level, x.pa, x.iova
                ));
            }
        }

        // The tree against the model.
        if let Some(m) = &self.model {
            let mut ml: Vec<(u64, u64, u64, Prot)> = m
                .leaves()
                .iter()
                .map(|(&i, l)| (i, l.size, l.pa, l.prot))
                .collect();
            ml.sort_unstable();
            let tl: Vec<(u64, u64, u64, Prot)> = walk
                .iter()
                .filter_map(|i| match *i {
                    WalkItem::Leaf {
                        iova,
                        size,
                        pa,
                        prot,
                        ..
                    } => Some((iova.get(), size.get(), pa.get(), prot)),
                    _ => None,
                })
                .collect();
            if ml != tl {
                let i = ml.iter().zip(&tl).position(|(a, b)| a != b);
                let first = i.map(|i| (ml.get(i), tl.get(i)));
                problems.push(format!(
                    "leaves: the model has {}, the table {} (first difference (model, table) \
                     {first:x?})",
                    ml.len(),
                    tl.len()
                ));
            }
            let mut mt = m.table_keys();
            mt.sort_unstable();
            let mut tt: Vec<(u32, u64)> = sc
                .tables
                .iter()
                .skip(1)
                .map(|x| (x.level, x.iova))
                .collect();
            tt.sort_unstable();
            if mt != tt {
                let extra: Vec<_> = tt.iter().filter(|k| !mt.contains(k)).take(4).collect();
                let missing: Vec<_> = mt.iter().filter(|k| !tt.contains(k)).take(4).collect();
                problems.push(format!(
                    "tables (level, iova): extra in the table {extra:x?}, missing {missing:x?}"
                ));
            }
            if let ReservePolicy::Pools { .. } = m.policy() {
                let c = m.counters();
                let got = (
                    stats.pages_reserved,
                    stats.pages_consumed,
                    stats.reserved_unused,
                    stats.reserved_outstanding,
                );
                let want = (
                    c.pages_reserved,
                    c.pages_consumed,
                    c.reserved_unused,
                    c.reserved_outstanding,
                );
                if got != want {
                    problems.push(format!(
                        "reservation counters (reserved, consumed, unused, outstanding): table \
                         {got:?}, model {want:?}"
                    ));
                }
            }
        }
        if !problems.is_empty() {
            let what = step.map_or_else(String::new, |s| format!(" {s}"));
            return Err(self.fail_on(
                Some(t),
                format!("after {at}{what}:\n  {}", problems.join("\n  ")),
            ));
        }

        // Translations, software and hardware, in and around the touched range.
        if let Some(step) = step {
            if let Some((start, len)) = step.touched() {
                let g = cfg.granule().size();
                let last = start.saturating_add(len.max(1) - 1);
                let mut probes = vec![start, last, start.wrapping_sub(g), last.wrapping_add(1)];
                for l in sc
                    .leaves
                    .iter()
                    .filter(|l| l.iova <= last && l.iova + (l.size - 1) >= start)
                    .take(48)
                {
                    probes.push(l.iova);
                    probes.push(l.iova + (l.size - 1));
                    probes.push(l.iova + l.size);
                    probes.push(l.iova.wrapping_sub(8));
                }
                for p in probes {
                    self.probe(t, p, step)?;
                }
                if !matches!(step, Step::Lookup { .. }) {
                    self.alloc.dev.access(&mem, start);
                    self.alloc.dev.access(&mem, last);
                }
            }
        }
        Ok(())
    }

    /// Checks every leaf through the oracle, releases every live reservation (checked), drops
    /// the table and checks that every page came back.
    ///
    /// # Errors
    ///
    /// The first violation.
    pub fn finish(mut self, n: usize) -> Result<(), Failure> {
        let Some(t) = self.table.take() else {
            return self.leak_check(n);
        };
        let mut leaves = Vec::new();
        t.walk(&mut |i| {
            if let WalkItem::Leaf { iova, size, .. } = i {
                leaves.push((iova.get(), size.get()));
            }
        });
        let step = Step::Flush;
        let mut r = Ok(());
        for (i, s) in leaves.into_iter().take(4096) {
            r = self
                .probe(t.as_ref(), i, &step)
                .and_then(|()| self.probe(t.as_ref(), i + (s - 1), &step));
            if r.is_err() {
                break;
            }
        }
        self.table = Some(t);
        r?;
        for i in 0..self.handles.len() {
            if matches!(self.handles[i], Handle::Live(_)) {
                self.step(n + i, &Step::Release { res: i })?;
            }
        }
        self.step(n + self.handles.len(), &Step::Flush)?;
        self.alloc.dev.detach();
        drop(self.table.take());
        self.leak_check(n)
    }

    fn leak_check(&self, n: usize) -> Result<(), Failure> {
        let s = self.alloc.mem.stats();
        let mut problems = self.alloc.dev.take_violations();
        if s.live_pages != 0 {
            problems.push(format!(
                "{} page(s) still held after the table was dropped: {:x?}",
                s.live_pages,
                self.alloc.mem.live_set()
            ));
        }
        if s.bad_frees != 0 {
            problems.push(format!("{} bad free(s)", s.bad_frees));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(self.fail_with(format!(
                "at teardown after {n} steps: {}",
                problems.join("; ")
            )))
        }
    }
}

/// How often the checker bridged the one known difference between `iopt_model::Model`
/// and the backends (see `same_by_precedence` in [`Lane::step`]): a counter for the
/// regression-corpus miner and for reports.
pub mod bridged {
    use std::sync::atomic::AtomicU64;
    /// A multi-table run met both a reserved table and a leaf; the backend named the leaf.
    pub static PRECEDENCE: AtomicU64 = AtomicU64::new(0);
}

/// What `read_and_clear_dirty` over `range` must report, worked out from raw memory: every
/// leaf overlapping the range whose descriptor has DBM with AP\[2\] clear, as `(first IOVA,
/// size)` in order; or the error for a format without dirty tracking, a range outside the
/// input range, or the first unmapped page.
fn expected_dirty(
    cfg: &Config,
    mem: &iopt_sim::SimMemory,
    root: PhysAddr,
    range: IovaRange,
) -> Result<Vec<(Iova, u64)>, iopt_api::DirtyError> {
    use iopt_lpae::desc::{AP_RDONLY, DBM};
    if cfg.format() != iopt_api::Format::Arm64S1 {
        return Err(iopt_api::DirtyError::Unsupported {
            format: cfg.format(),
        });
    }
    if !cfg.iova_in_range(range.start()) || !cfg.iova_in_range(range.last()) {
        return Err(iopt_api::DirtyError::OutOfRange { range });
    }
    let sc = scan(cfg, mem, root);
    let leaves: BTreeMap<u64, (u64, u64)> = sc
        .leaves
        .iter()
        .map(|l| (l.iova, (l.size, l.desc)))
        .collect();
    let mut out = Vec::new();
    let mut at = range.start().get();
    loop {
        let Some((&li, &(size, d))) = leaves
            .range(..=at)
            .next_back()
            .filter(|(i, (s, _))| at - **i < *s)
        else {
            return Err(iopt_api::DirtyError::NotMapped {
                iova: Iova::new(at),
            });
        };
        if d & (AP_RDONLY | DBM) == DBM {
            out.push((Iova::new(li), size));
        }
        match (li + size).checked_sub(1) {
            Some(end) if end < range.last().get() => at = end + 1,
            _ => return Ok(out),
        }
    }
}

/// Whether a Design 2 reservation of `r` for leaves up to `max_leaf` covers the table at
/// `level` whose first IOVA is `base`, recomputed from the definition (docs/designs.md; the
/// prealloc crate docs): the table's parent slot is touched by the range and is not a slot
/// where a leaf of an allowed size lies wholly inside the range.
#[must_use]
pub fn covers(cfg: &Config, r: &IovaRange, max_leaf: PageSize, base: u64, level: u32) -> bool {
    if level <= cfg.start_level() {
        return false;
    }
    let mask = (1u64 << cfg.ias()) - 1;
    let parent = level - 1;
    let bs = cfg.block_size(parent);
    let s = base & mask & !(bs - 1);
    let e = s + bs;
    let (rs, re) = (r.start().get() & mask, (r.last().get() & mask) + 1);
    let touches = s < re && rs < e;
    let leaf_ok =
        bs <= max_leaf.get() && PageSize::new(bs).and_then(|x| cfg.leaf_level(x)) == Some(parent);
    let leaf_here = s >= rs && e <= re && leaf_ok;
    touches && !leaf_here
}

/// Gives the device a chance to observe frees: helper for workloads outside [`Lane`].
pub fn device_of(alloc: &Hooked) -> &Device {
    &alloc.dev
}
