//! The harness: drives one design through one workload, as its users would, checking every
//! call and measuring.
//!
//! The run goes event by event. `submit` makes the reservations the design's
//! [`Policy`] asks for; `execute` cuts the bind into page-table calls (maps bound to those
//! reservations, or unmaps) and, if one fails, undoes the calls before it (panthor unmaps what
//! it had mapped); `complete` releases what the policy releases then. After the last event
//! the harness executes and completes whatever is still queued, unmaps everything still
//! mapped, releases every reservation, counts the table pages left, compares the whole tree
//! with the model, drops the table, and checks that the allocator got every page back.
//!
//! Each table call is timed alone ([`Instant`] around the call); the checker runs after it,
//! outside the measurement.

use crate::check::{CheckOptions, CheckResult, Checker, Divergence};
use crate::metrics::{CurvePoint, Metrics, Samples, downsample};
use crate::ops::{BindOp, Event, JobId, Workload};
use crate::policy::{Piece, Policy, split};
use iopt_api::{
    AllocError, Config, Gather, Iova, PageSize, PhysAddr, Prot, Reservation, Reserve, ReserveError,
};
use iopt_model::ReservePolicy;
use iopt_sim::{SimLayout, SimMemory};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// Builds a table of one design on `cfg`, allocating from the given memory.
pub type Builder<T> = Box<dyn Fn(Config, Arc<SimMemory>) -> Result<T, AllocError> + Send + Sync>;

/// A design under test: its name, how its users drive it, what the model expects of its
/// reservations, and how to build one.
pub struct Design<T> {
    /// Name in reports ("Design 1", "Design 2", ...).
    pub name: String,
    /// How its users drive it.
    pub policy: Policy,
    /// What the model expects of its reservations.
    pub model: ReservePolicy,
    /// Builds an empty table.
    pub build: Builder<T>,
}

impl<T> fmt::Debug for Design<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Design")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// How to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Checking options; `None` runs unchecked (measurement only).
    pub check: Option<CheckOptions>,
    /// Keep at most this many points of the memory curve.
    pub curve_points: usize,
    /// Treat `execute` as a no-op (reservation figures of binds too large to map).
    pub reserve_only: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            check: Some(CheckOptions::default()),
            curve_points: 400,
            reserve_only: false,
        }
    }
}

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunError {
    /// The table could not be built.
    Build(AllocError),
    /// A backend disagreed with the model.
    Divergence(Box<Divergence>),
    /// Pages were not returned to the allocator when the table was dropped.
    Leak {
        /// Pages still live.
        live_pages: u64,
        /// Frees of pages that were not live.
        bad_frees: u64,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Build(e) => write!(f, "could not build the table: {e}"),
            RunError::Divergence(d) => write!(f, "{d}"),
            RunError::Leak {
                live_pages,
                bad_frees,
            } => write!(
                f,
                "after the table was dropped the allocator still had {live_pages} live page(s) and saw {bad_frees} bad free(s)"
            ),
        }
    }
}

impl std::error::Error for RunError {}

/// The result of one design on one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// The measurements.
    pub metrics: Metrics,
    /// The memory curve (downsampled).
    pub curve: Vec<CurvePoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Executed,
    Completed,
    Refused,
}

#[derive(Debug)]
struct Job {
    op: BindOp,
    state: State,
    /// The reservation made at submit.
    reservation: Option<Reservation>,
    pieces: Vec<Piece>,
    ok: bool,
}

/// A Design 2 reservation waiting for its mapping to go.
#[derive(Debug)]
struct Held {
    res: Reservation,
    start: u64,
    len: u64,
    job_done: bool,
}

/// Disjoint half-open intervals: what the driver believes is mapped.
#[derive(Debug, Default)]
struct Intervals(BTreeMap<u64, u64>);

impl Intervals {
    fn insert(&mut self, s: u64, e: u64) {
        self.remove(s, e);
        self.0.insert(s, e);
    }

    fn remove(&mut self, s: u64, e: u64) {
        // Disjoint and sorted: walking down from the last start below `e`, the ends fall too.
        let hit: Vec<(u64, u64)> = self
            .0
            .range(..e)
            .rev()
            .take_while(|&(_, &ke)| ke > s)
            .map(|(&k, &v)| (k, v))
            .collect();
        for (ks, ke) in hit {
            self.0.remove(&ks);
            if ks < s {
                self.0.insert(ks, s);
            }
            if ke > e {
                self.0.insert(e, ke);
            }
        }
    }

    fn overlaps(&self, s: u64, e: u64) -> bool {
        self.0.range(..e).next_back().is_some_and(|(_, &ke)| ke > s)
    }
}

struct Runner<'a, T: Reserve> {
    table: T,
    mem: Arc<SimMemory>,
    policy: Policy,
    cfg: Config,
    checker: Option<Checker>,
    jobs: HashMap<JobId, Job>,
    queue: VecDeque<JobId>,
    running: VecDeque<JobId>,
    held: BTreeMap<u64, Held>,
    mapped: Intervals,
    reserved_now: u64,
    m: Metrics,
    lat_map: Samples,
    lat_unmap: Samples,
    lat_reserve: Samples,
    lat_release: Samples,
    curve: Vec<CurvePoint>,
    event: u64,
    context: &'a str,
    reserve_only: bool,
    tearing_down: bool,
}

/// Memory layout for runs: 16 GiB of address space per page size, so even the 262,657-page
/// worst case of a 512 GiB bind fits.
const LAYOUT: SimLayout = SimLayout {
    base: 1 << 30,
    region_span: 1 << 34,
};

/// Runs `design` through `workload`.
///
/// `progress` is called after each event with the number of events done since the last call.
///
/// # Errors
///
/// [`RunError`]: the table could not be built, a call diverged from the model (the run stops
/// there), or pages leaked.
pub fn run<T: Reserve>(
    design: &Design<T>,
    workload: &Workload,
    opts: &RunOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<RunResult, RunError> {
    let start = Instant::now();
    let cfg = workload.table.config();
    // A non-coherent walker's memory: the checker's oracle then sees only cleaned writes.
    let mem = Arc::new(if cfg.coherent_walk() {
        SimMemory::with_layout(LAYOUT)
    } else {
        SimMemory::non_coherent_with_layout(LAYOUT)
    });
    let table = (design.build)(cfg, Arc::clone(&mem)).map_err(RunError::Build)?;
    let checker = opts.check.map(|c| Checker::new(&table, design.model, c));
    let context = format!("{} on {}", design.name, workload.name);
    let mut r = Runner {
        table,
        mem: Arc::clone(&mem),
        policy: design.policy,
        cfg,
        checker,
        jobs: HashMap::new(),
        queue: VecDeque::new(),
        running: VecDeque::new(),
        held: BTreeMap::new(),
        mapped: Intervals::default(),
        reserved_now: 0,
        m: Metrics::default(),
        lat_map: Samples::default(),
        lat_unmap: Samples::default(),
        lat_reserve: Samples::default(),
        lat_release: Samples::default(),
        curve: Vec::with_capacity(workload.events.len() + 16),
        event: 0,
        context: &context,
        reserve_only: opts.reserve_only,
        tearing_down: false,
    };
    let wrap = |mut d: Box<Divergence>, r: &Runner<'_, T>| {
        d.context = format!("{}, event #{} of {}", r.context, r.event, workload.name);
        RunError::Divergence(d)
    };
    for (i, ev) in workload.events.iter().enumerate() {
        r.event = i as u64;
        let res = match *ev {
            Event::Submit { id, op } => r.submit(id, op),
            Event::Execute { id } => r.execute(id),
            Event::Complete { id } => r.complete(id),
        };
        if let Err(d) = res {
            let mut d = d;
            d.context = format!("{}: {} (event #{i})", context, describe(ev, &r.jobs));
            return Err(RunError::Divergence(d));
        }
        r.sample();
        progress(1);
    }
    r.event = workload.events.len() as u64;
    r.teardown().map_err(|d| wrap(d, &r))?;
    let stats = r.table.stats();
    r.m.pages_consumed = stats.pages_consumed;
    r.m.reserved_unused = stats.reserved_unused;
    r.m.tables_left_after_unmap = stats.live_tables.saturating_sub(1);
    if let Some(c) = &r.checker {
        c.full_check(&r.table).map_err(|d| wrap(d, &r))?;
        r.m.checked_calls = c.calls();
        r.m.probes = c.probes();
    }
    let s = mem.stats();
    r.m.peak_memory_pages = s.peak_pages;
    r.m.alloc_calls = s.alloc_calls;
    r.m.alloc_bulk_calls = s.alloc_bulk_calls;
    r.m.pages_allocated = s.pages_allocated;
    r.m.free_calls = s.free_calls;
    r.m.free_bulk_calls = s.free_bulk_calls;
    r.m.pages_freed = s.pages_freed;
    r.m.cache_cleans = stats.cache_cleans;
    r.m.bytes_cleaned = stats.bytes_cleaned;
    r.m.peak_live_tables = stats.peak_live_tables;
    r.m.map = r.lat_map.summary();
    r.m.unmap = r.lat_unmap.summary();
    r.m.reserve = r.lat_reserve.summary();
    r.m.release = r.lat_release.summary();
    let busy = r.m.map.total_ns + r.m.unmap.total_ns + r.m.reserve.total_ns + r.m.release.total_ns;
    r.m.calls = r.m.map.count + r.m.unmap.count + r.m.reserve.count + r.m.release.count;
    r.m.calls_per_sec = if busy > 0 {
        r.m.calls as f64 / (busy as f64 / 1e9)
    } else {
        0.0
    };
    let curve = downsample(&r.curve, opts.curve_points);
    let mut metrics = std::mem::take(&mut r.m);
    drop(r);
    let s = mem.stats();
    if s.live_pages != 0 || s.bad_frees != 0 {
        return Err(RunError::Leak {
            live_pages: s.live_pages,
            bad_frees: s.bad_frees,
        });
    }
    metrics.wall_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(RunResult { metrics, curve })
}

fn describe(ev: &Event, jobs: &HashMap<JobId, Job>) -> String {
    match ev {
        Event::Submit { .. } => format!("{ev}"),
        Event::Execute { id } | Event::Complete { id } => match jobs.get(id) {
            Some(j) => format!("{ev} (job {id}: {})", j.op),
            None => format!("{ev}"),
        },
    }
}

impl<T: Reserve> Runner<'_, T> {
    fn sample(&mut self) {
        let s = self.table.stats();
        self.curve.push(CurvePoint {
            event: self.event,
            memory_pages: self.mem.stats().live_pages,
            reserved_pages: self.reserved_now,
            live_tables: s.live_tables,
            unconsumed_pages: s.reserved_outstanding,
        });
    }

    fn note_reserved(&mut self, pages: u64, add: bool) {
        if add {
            self.reserved_now += pages;
            self.m.peak_reserved_pages = self.m.peak_reserved_pages.max(self.reserved_now);
        } else {
            self.reserved_now -= pages;
        }
    }

    fn reserve(
        &mut self,
        range: iopt_api::IovaRange,
        leaf: PageSize,
    ) -> CheckResult<Result<Reservation, ReserveError>> {
        let t = Instant::now();
        let got = self.table.reserve(range, leaf);
        self.lat_reserve.push(t.elapsed().as_nanos() as u64);
        if let Some(c) = &mut self.checker {
            c.reserve(&self.table, &self.mem, range, leaf, &got)?;
        }
        if let Ok(r) = &got {
            self.m.reservations += 1;
            self.m.pages_reserved += r.pages() as u64;
            self.note_reserved(r.pages() as u64, true);
        }
        Ok(got)
    }

    fn release(&mut self, res: Reservation) -> CheckResult<()> {
        let (id, pages) = (res.id(), res.pages() as u64);
        let t = Instant::now();
        let got = self.table.release(res, &mut Gather::new());
        self.lat_release.push(t.elapsed().as_nanos() as u64);
        if let Some(c) = &mut self.checker {
            c.release(&self.table, &self.mem, id, &got)?;
        }
        if got.is_ok() {
            self.note_reserved(pages, false);
        }
        Ok(())
    }

    fn map_call(&mut self, res: Option<&Reservation>, p: Piece, prot: Prot) -> CheckResult<bool> {
        let Some(size) = PageSize::new(p.size) else {
            return Ok(false);
        };
        let t = Instant::now();
        let got = match res {
            Some(r) => self.table.map_reserved(
                r,
                Iova::new(p.iova),
                PhysAddr::new(p.pa),
                size,
                p.count,
                prot,
            ),
            None => self
                .table
                .map(Iova::new(p.iova), PhysAddr::new(p.pa), size, p.count, prot),
        };
        self.lat_map.push(t.elapsed().as_nanos() as u64);
        if let Some(c) = &mut self.checker {
            c.map(
                &self.table,
                &self.mem,
                res,
                p.iova,
                p.pa,
                p.size,
                p.count,
                prot,
                &got,
            )?;
        }
        Ok(got.is_ok())
    }

    fn unmap_call(&mut self, p: Piece) -> CheckResult<bool> {
        let Some(size) = PageSize::new(p.size) else {
            return Ok(false);
        };
        let t = Instant::now();
        let got = self
            .table
            .unmap(Iova::new(p.iova), size, p.count, &mut Gather::new());
        self.lat_unmap.push(t.elapsed().as_nanos() as u64);
        if let Some(c) = &mut self.checker {
            c.unmap(&self.table, &self.mem, p.iova, p.size, p.count, &got)?;
        }
        if got.is_ok() {
            self.mapped.remove(p.iova, p.iova + p.len());
        }
        Ok(got.is_ok())
    }

    fn submit(&mut self, id: JobId, op: BindOp) -> CheckResult<()> {
        if !self.tearing_down {
            self.m.jobs += 1;
        }
        let mut job = Job {
            op,
            state: State::Queued,
            reservation: None,
            pieces: Vec::new(),
            ok: false,
        };
        if let BindOp::Map { va, size, pa, .. } = op {
            let plan = (size > 0)
                .then(|| split(self.cfg.page_sizes(), va, pa, size))
                .flatten()
                .and_then(|pieces| {
                    let r = self.policy.reservation(&self.cfg, va, size, &pieces)?;
                    Some((pieces, r))
                });
            let Some((pieces, (range, leaf))) = plan else {
                // The driver refuses a bind no page size fits, before reserving anything.
                job.state = State::Refused;
                self.m.jobs_refused += 1;
                self.jobs.insert(id, job);
                return Ok(());
            };
            job.pieces = pieces;
            let got = loop {
                match self.reserve(range, leaf)? {
                    Err(ReserveError::CapExceeded { .. }) if self.policy.waits_on_cap() => {
                        if !self.drain_one()? {
                            break None;
                        }
                    }
                    Err(_) => break None,
                    Ok(r) => break Some(r),
                }
            };
            if let Some(r) = got {
                job.reservation = Some(r);
            } else {
                job.state = State::Refused;
                self.m.jobs_refused += 1;
            }
        }
        if job.state == State::Queued {
            self.queue.push_back(id);
        }
        self.jobs.insert(id, job);
        Ok(())
    }

    /// Makes room under a cap: executes the oldest queued job, or completes the oldest
    /// executed one. Returns whether anything happened.
    fn drain_one(&mut self) -> CheckResult<bool> {
        if let Some(&id) = self.running.front() {
            self.complete(id)?;
            return Ok(true);
        }
        if let Some(&id) = self.queue.front() {
            self.execute(id)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn execute(&mut self, id: JobId) -> CheckResult<()> {
        let Some(job) = self.jobs.get_mut(&id) else {
            return Ok(());
        };
        if job.state != State::Queued {
            return Ok(());
        }
        job.state = State::Executed;
        self.queue.retain(|&q| q != id);
        self.running.push_back(id);
        if self.reserve_only {
            return Ok(());
        }
        let op = job.op;
        let ok = match op {
            BindOp::Map { va, size, prot, .. } => {
                let prot = Prot::from_bits_retain(prot);
                let pieces = self.jobs[&id].pieces.clone();
                let res = self.jobs.get_mut(&id).expect("job").reservation.take();
                let mut done = 0;
                let mut ok = true;
                for &p in &pieces {
                    let r = self.map_call(res.as_ref(), p, prot);
                    if !r? {
                        ok = false;
                        break;
                    }
                    done += 1;
                }
                self.jobs.get_mut(&id).expect("job").reservation = res;
                if ok {
                    self.mapped.insert(va, va + size);
                } else {
                    // Undo what was mapped, as panthor does on a map error.
                    for &p in pieces[..done].iter().rev() {
                        self.unmap_call(p)?;
                    }
                }
                ok
            }
            BindOp::Unmap { va, size } => match self.policy.unmap_pieces(&self.table, va, size) {
                None => false,
                Some(pieces) => {
                    let mut ok = true;
                    for p in pieces {
                        if !self.unmap_call(p)? {
                            ok = false;
                            break;
                        }
                    }
                    ok
                }
            },
        };
        if !ok && !self.tearing_down {
            self.m.jobs_failed += 1;
        }
        self.jobs.get_mut(&id).expect("job").ok = ok;
        Ok(())
    }

    fn complete(&mut self, id: JobId) -> CheckResult<()> {
        let Some(job) = self.jobs.get_mut(&id) else {
            return Ok(());
        };
        match job.state {
            State::Executed => {}
            State::Queued => {
                // Completing a job that never ran: run it first (traces may skip `execute`
                // only through the final drain, but be robust).
                self.execute(id)?;
            }
            State::Completed | State::Refused => return Ok(()),
        }
        let job = self.jobs.get_mut(&id).expect("job");
        job.state = State::Completed;
        self.running.retain(|&q| q != id);
        let (op, ok) = (job.op, job.ok);
        let reservation = job.reservation.take();
        match self.policy {
            Policy::PerBind => {
                if let Some(r) = reservation {
                    self.release(r)?;
                }
            }
            Policy::PerMapping => {
                let (va, size) = op.range();
                if let Some(r) = reservation {
                    // Held until no mapping is left in its range: the unmap that removes the
                    // mapping releases it (at once if the map failed and nothing else is
                    // mapped there; Design 2's release unmaps whatever is in its range).
                    let (start, len) = (r.range().start().get(), r.range().len());
                    self.held.insert(
                        r.id(),
                        Held {
                            res: r,
                            start,
                            len,
                            job_done: true,
                        },
                    );
                }
                let _ = ok;
                self.release_unmapped(va, va.saturating_add(size))?;
            }
        }
        Ok(())
    }

    /// Design 2: releases every held reservation overlapping `[s, e)` whose bind completed
    /// and whose range holds no mapping any more.
    fn release_unmapped(&mut self, s: u64, e: u64) -> CheckResult<()> {
        let ids: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| h.job_done && h.start < e && h.start + h.len > s)
            .filter(|(_, h)| !self.mapped.overlaps(h.start, h.start + h.len))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            if let Some(h) = self.held.remove(&id) {
                self.release(h.res)?;
            }
        }
        Ok(())
    }

    fn teardown(&mut self) -> CheckResult<()> {
        // Run and clean up whatever is still queued, in order.
        while let Some(&id) = self.queue.front() {
            self.execute(id)?;
        }
        while let Some(&id) = self.running.front() {
            self.complete(id)?;
        }
        self.reserve_only = false;
        self.tearing_down = true;
        // Unmap everything still mapped, as unmap binds.
        let ranges: Vec<(u64, u64)> = self.mapped.0.iter().map(|(&s, &e)| (s, e)).collect();
        let mut next = u64::MAX - ranges.len() as u64 - 1;
        for (s, e) in ranges {
            next += 1;
            self.submit(next, BindOp::Unmap { va: s, size: e - s })?;
            self.execute(next)?;
            self.complete(next)?;
        }
        // Release anything still held.
        let ids: Vec<u64> = self.held.keys().copied().collect();
        for id in ids {
            if let Some(h) = self.held.remove(&id) {
                self.release(h.res)?;
            }
        }
        self.sample();
        Ok(())
    }
}

/// A design of any table type, for lists of designs.
pub trait AnyDesign: Send + Sync {
    /// The design's name.
    fn name(&self) -> &str;

    /// Runs it through `workload` (see [`run`]).
    ///
    /// # Errors
    ///
    /// As [`run`].
    fn run(
        &self,
        workload: &Workload,
        opts: &RunOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<RunResult, RunError>;
}

impl<T: Reserve> AnyDesign for Design<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(
        &self,
        workload: &Workload,
        opts: &RunOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<RunResult, RunError> {
        run(self, workload, opts, progress)
    }
}
