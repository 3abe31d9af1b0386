//! Race hunts: shapes of concurrent use that the random stress ([`crate::stress`]) reaches too
//! rarely, each driven hard against a time budget, through the public API only (the
//! [`IoPageTable`](iopt_api::IoPageTable) and [`Reserve`](iopt_api::Reserve) traits behind [`Subject`]), with a hang watchdog.
//!
//! - [`lookup_after_map`]: legal use on disjoint ranges. Threads churn 2 MiB blocks
//!   (map, unmap) beside threads churning 4 KiB pages (map, lookup, unmap) in the same level-2
//!   table, so that eager engines free and reinstall the leaf tables and the level-2 table
//!   under each other all the time. Every thread checks its own results at once: a lookup
//!   right after its own map must find the page, and the unmap of its own page must remove
//!   exactly that page.
//! - [`double_unmap`]: two threads unmap the same page at the same moment (overlapping calls,
//!   a caller bug) while a bystander page sits in the same leaf table. The overlap may be
//!   answered any way for the page itself, but the bystander must survive.
//! - [`overlap_chaos`]: threads map and unmap the same pages and the same block at random
//!   (overlapping calls) while a watcher keeps bystander pages mapped in the same leaf table
//!   and churns pages of its own there with strict checks. Bystanders must survive, no call may
//!   hang, and once everything is unmapped the tree must be the root alone (eager engines) and
//!   dropping the table must return every page.
//! - [`stalled_walk`]: a `walk` parked inside its callback (an operation left in flight)
//!   while another thread churns a 4 KiB map and unmap that frees tables each cycle. The
//!   pages held must stay bounded ([`STALL_LIVE_LIMIT`]) and the cost of a cycle must not
//!   grow with the number of cycles.
//!
//! Why: the engine's concurrency protocol (pins, claims, deferred frees) promises that
//! disjoint operations never see each other, and that overlapping operations, a caller bug,
//! may lose mappings in the overlap but never damage anything outside it, never hang and
//! never leak. Those promises fail on rare interleavings; these hunts make the interleavings
//! common and stop at the first broken promise.
//!
//! Every hunt runs its threads detached and watches them from the calling thread: a thread
//! whose progress counter has not moved for [`Budget::hang`] is reported as a hang (the hunt
//! returns; the stuck threads are left behind), so a hang fails a test instead of stalling it.

use crate::lane::{Design, Subject};
use iopt_api::{
    Config, ConfigInput, Format, Gather, Iova, NoFlush, PageSize, PageSizes, PhysAddr, Prot,
    WalkItem,
};
use iopt_sim::SimMemory;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const K4: u64 = 0x1000;
const M2: u64 = 2 << 20;
const RW: Prot = Prot::READ.union(Prot::WRITE);
const RLX: Ordering = Ordering::Relaxed;

/// The level-2 table [`lookup_after_map`] crowds: the 1 GiB from here.
pub const LOOKUP_BASE: u64 = 0x4000_0000;
/// The leaf table [`double_unmap`] and [`overlap_chaos`] fight over: the 2 MiB from here.
pub const OVERLAP_BASE: u64 = 0x8000_0000;
/// The page [`stalled_walk`] maps and unmaps: the only leaf in its leaf and level-2 tables.
pub const STALL_PAGE: u64 = 0x4000_0000;
/// The most pages [`stalled_walk`] allows the allocator to hand out while the walk is parked:
/// the root, the bystander's three tables and the churned page's tables, with ample room for
/// a bounded backlog of deferred frees.
pub const STALL_LIVE_LIMIT: u64 = iopt_lpae::reclaim::LIMBO_LIMIT as u64 + 64;
/// How much slower the last tenth of [`stalled_walk`]'s cycles may be than its first
/// [`STALL_START_CYCLES`]. The start is the reference, not the first tenth: a cost that grows
/// with the backlog has already grown over the first tenth of a long run.
pub const STALL_SLOWDOWN_LIMIT: f64 = 4.0;
/// The cycles at the start of [`stalled_walk`] whose mean cost is the reference.
pub const STALL_START_CYCLES: u64 = 1024;

/// How long a hunt runs, and how long a thread may make no progress before it counts as hung.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// The hunt's run time; it stops earlier at the first failure.
    pub time: Duration,
    /// No progress for this long is a hang.
    pub hang: Duration,
}

impl Budget {
    /// `IOPT_RACE_SECS` (seconds, fractions allowed) or `default_secs`, and
    /// `IOPT_RACE_HANG_SECS` or 10 s for the hang watchdog.
    #[must_use]
    pub fn from_env(default_secs: f64) -> Self {
        let secs = |name: &str, d: f64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .unwrap_or(d)
        };
        Self {
            time: Duration::from_secs_f64(secs("IOPT_RACE_SECS", default_secs)),
            hang: Duration::from_secs_f64(secs("IOPT_RACE_HANG_SECS", 10.0)),
        }
    }
}

/// What a hunt that found nothing did.
#[derive(Debug, Clone, Default)]
pub struct RaceReport {
    /// Rounds run, all threads.
    pub rounds: u64,
    /// Time spent.
    pub elapsed: Duration,
    /// Counts of outcomes worth knowing that are not failures.
    pub notes: Vec<String>,
}

/// The first broken promise a hunt found.
#[derive(Debug, Clone)]
pub struct RaceFailure {
    /// What went wrong.
    pub message: String,
    /// Rounds run before it, all threads.
    pub rounds: u64,
    /// Time from the start of the hunt to the failure.
    pub elapsed: Duration,
    /// Rounds per thread.
    pub per_thread: Vec<(String, u64)>,
}

impl fmt::Display for RaceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "after {} rounds, {:.3} s: {} (rounds per thread:",
            self.rounds,
            self.elapsed.as_secs_f64(),
            self.message
        )?;
        for (n, r) in &self.per_thread {
            write!(f, " {n}={r}")?;
        }
        write!(f, ")")
    }
}

/// What a hunt returns.
pub type RaceResult = Result<RaceReport, RaceFailure>;

/// One legal-use cycle on a page the calling thread owns: map it, find it right away, and
/// unmap it (exactly one page).
fn own_page_cycle(t: &dyn Subject, p: u64) -> Result<(), String> {
    map4k(t, p).map_err(|e| format!("map own page {p:#x}: {e:?}"))?;
    expect_mapped(t, p, "own page just mapped:")?;
    match unmap(t, p, PageSize::SZ_4K) {
        Ok(K4) => Ok(()),
        r => Err(format!("unmap own page {p:#x}: {r:x?}")),
    }
}

/// The configuration every hunt uses: AArch64 stage 1, 4 KiB granule, 48-bit IAS and OAS.
///
/// # Panics
///
/// Never: the configuration is valid.
#[must_use]
pub fn config() -> Config {
    match Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
    )) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// A fresh table of `design` over a fresh [`SimMemory`], without flush callbacks.
///
/// # Panics
///
/// If the root cannot be allocated.
#[must_use]
pub fn build(design: Design) -> (Arc<dyn Subject>, Arc<SimMemory>) {
    let mem = Arc::new(SimMemory::new());
    match design.build_with(config(), Arc::clone(&mem), NoFlush) {
        Ok(t) => (Arc::from(t), mem),
        Err(e) => panic!("build {design:?}: {e:?}"),
    }
}

/// What a hunt's thread sees: when to stop, and where to count its progress.
#[derive(Debug, Clone)]
pub struct Ctx {
    stop: Arc<AtomicBool>,
    beat: Arc<AtomicU64>,
    deadline: Instant,
}

impl Ctx {
    /// Whether to run another round: no one stopped the hunt and the budget is not spent.
    pub fn go(&self) -> bool {
        !self.stop.load(RLX) && Instant::now() < self.deadline
    }

    /// Whether the hunt was stopped (a failure elsewhere, or a thread that ran out of budget
    /// and stopped its partners).
    pub fn stopped(&self) -> bool {
        self.stop.load(RLX)
    }

    /// Stops every thread of the hunt.
    pub fn halt(&self) {
        self.stop.store(true, RLX);
    }

    /// Counts a round of progress.
    pub fn beat(&self) {
        self.beat.fetch_add(1, RLX);
    }
}

/// A hunt's thread: a name and its body, which returns its verdict.
pub type Job = (String, Box<dyn FnOnce(&Ctx) -> Result<(), String> + Send>);

/// Runs `jobs` on their own threads until all return, one fails (the others are stopped and
/// awaited), or one makes no progress for `budget.hang` (a hang: the hunt returns at once and
/// leaves the threads behind). `start` is when the hunt started (for the failure's time).
///
/// # Errors
///
/// The first job's error, a panic, or a hang.
///
/// # Panics
///
/// If a thread cannot be spawned.
#[allow(clippy::too_many_lines)]
pub fn watch(jobs: Vec<Job>, budget: &Budget, start: Instant) -> RaceResult {
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + budget.time;
    let (tx, rx) = mpsc::channel::<(usize, Result<(), String>)>();
    let mut names = Vec::new();
    let mut beats = Vec::new();
    let mut handles = Vec::new();
    for (i, (name, body)) in jobs.into_iter().enumerate() {
        let ctx = Ctx {
            stop: Arc::clone(&stop),
            beat: Arc::new(AtomicU64::new(0)),
            deadline,
        };
        beats.push(Arc::clone(&ctx.beat));
        names.push(name.clone());
        let tx = tx.clone();
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&ctx)))
                    .unwrap_or_else(|p| {
                        let m = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(ToString::to_string))
                            .unwrap_or_default();
                        Err(format!("panicked: {m}"))
                    });
                if r.is_err() {
                    ctx.halt();
                }
                let _ = tx.send((i, r));
            })
            .expect("spawn");
        handles.push(h);
    }
    drop(tx);
    let n = names.len();
    let per_thread = |beats: &[Arc<AtomicU64>]| -> Vec<(String, u64)> {
        names
            .iter()
            .cloned()
            .zip(beats.iter().map(|b| b.load(RLX)))
            .collect()
    };
    let mut done = vec![false; n];
    let mut last: Vec<(u64, Instant)> = vec![(0, Instant::now()); n];
    let mut first_err: Option<(String, Duration)> = None;
    let mut finished = 0;
    while finished < n {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((i, r)) => {
                done[i] = true;
                finished += 1;
                if let Err(e) = r {
                    if first_err.is_none() {
                        first_err = Some((format!("{}: {e}", names[i]), start.elapsed()));
                    }
                    stop.store(true, RLX);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let mut stuck = Vec::new();
                for i in 0..n {
                    let b = beats[i].load(RLX);
                    if b != last[i].0 {
                        last[i] = (b, now);
                    } else if !done[i] && now - last[i].1 >= budget.hang {
                        stuck.push(format!("{} (at round {b})", names[i]));
                    }
                }
                if !stuck.is_empty() {
                    stop.store(true, RLX);
                    let pt = per_thread(&beats);
                    let rounds = pt.iter().map(|x| x.1).sum();
                    let mut message = format!(
                        "hang: no progress for {:.1} s in {}",
                        budget.hang.as_secs_f64(),
                        stuck.join(", ")
                    );
                    if let Some((e, _)) = first_err {
                        message = format!("{message}, after an earlier failure: {e}");
                    }
                    return Err(RaceFailure {
                        message,
                        rounds,
                        elapsed: start.elapsed(),
                        per_thread: pt,
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let pt = per_thread(&beats);
    let rounds = pt.iter().map(|x| x.1).sum();
    match first_err {
        Some((message, elapsed)) => Err(RaceFailure {
            message,
            rounds,
            elapsed,
            per_thread: pt,
        }),
        None => Ok(RaceReport {
            rounds,
            elapsed: start.elapsed(),
            notes: Vec::new(),
        }),
    }
}

/// A barrier that spins briefly, then yields, and gives up when the hunt stops.
#[derive(Debug)]
struct SpinBarrier {
    n: usize,
    count: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        Self {
            n,
            count: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    /// Waits for all `n` threads; `false` if the hunt stopped meanwhile.
    fn wait(&self, ctx: &Ctx) -> bool {
        let g = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return true;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == g {
            if ctx.stopped() {
                return false;
            }
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        true
    }
}

/// The output address every hunt maps `iova` to: a fixed offset, so a lookup can check it.
fn pa_of(iova: u64) -> u64 {
    0x8_0000_0000 + iova
}

fn map4k(t: &dyn Subject, iova: u64) -> Result<(), iopt_api::MapError> {
    t.map(
        Iova::new(iova),
        PhysAddr::new(pa_of(iova)),
        PageSize::SZ_4K,
        1,
        RW,
    )
}

fn unmap(t: &dyn Subject, iova: u64, size: PageSize) -> Result<u64, iopt_api::UnmapError> {
    let mut g = Gather::new();
    t.unmap(Iova::new(iova), size, 1, &mut g)
}

fn lookup(t: &dyn Subject, iova: u64) -> Option<u64> {
    t.iova_to_phys(Iova::new(iova)).map(|x| x.pa.get())
}

/// Checks that `iova` translates to its own address.
fn expect_mapped(t: &dyn Subject, iova: u64, what: &str) -> Result<(), String> {
    match lookup(t, iova) {
        Some(pa) if pa == pa_of(iova) => Ok(()),
        other => Err(format!(
            "{what} {iova:#x}: lookup gives {other:x?}, expected {:#x}",
            pa_of(iova)
        )),
    }
}

/// Finding: a lookup misses a page its own thread just mapped (legal, disjoint use).
///
/// `blocks` threads each churn a 2 MiB block (map, lookup, unmap) in the odd 2 MiB slots of
/// the level-2 table at [`LOOKUP_BASE`]; `smalls` threads each churn the 512 pages of an even
/// slot (map page, look it up, unmap it), so every small round empties its leaf table. Every
/// result is checked at once.
///
/// # Errors
///
/// The first wrong result, or a hang.
///
/// # Panics
///
/// If the layout does not fit one level-2 table (`blocks` or `smalls` above 256).
pub fn lookup_after_map(
    design: Design,
    blocks: usize,
    smalls: usize,
    budget: &Budget,
) -> RaceResult {
    assert!(
        blocks <= 256 && smalls <= 256,
        "one level-2 table holds 512 slots"
    );
    let start = Instant::now();
    let (t, mem) = build(design);
    let mut jobs: Vec<Job> = Vec::new();
    for k in 0..blocks as u64 {
        let t = Arc::clone(&t);
        let b = LOOKUP_BASE + (2 * k + 1) * M2;
        jobs.push((
            format!("block{k}"),
            Box::new(move |ctx: &Ctx| {
                let t = t.as_ref();
                while ctx.go() {
                    t.map(
                        Iova::new(b),
                        PhysAddr::new(pa_of(b)),
                        PageSize::SZ_2M,
                        1,
                        RW,
                    )
                    .map_err(|e| format!("map own block {b:#x}: {e:?}"))?;
                    expect_mapped(t, b + 0x1234, "own block just mapped:")?;
                    match unmap(t, b, PageSize::SZ_2M) {
                        Ok(M2) => {}
                        r => return Err(format!("unmap own block {b:#x}: {r:x?}")),
                    }
                    ctx.beat();
                }
                Ok(())
            }),
        ));
    }
    for k in 0..smalls as u64 {
        let t = Arc::clone(&t);
        let base = LOOKUP_BASE + 2 * k * M2;
        jobs.push((
            format!("small{k}"),
            Box::new(move |ctx: &Ctx| {
                let t = t.as_ref();
                let mut i = 0u64;
                while ctx.go() {
                    let p = base + (i % 512) * K4;
                    i += 1;
                    own_page_cycle(t, p)?;
                    if let Some(pa) = lookup(t, p) {
                        return Err(format!("own page {p:#x} still maps {pa:#x} after unmap"));
                    }
                    ctx.beat();
                }
                Ok(())
            }),
        ));
    }
    let report = watch(jobs, budget, start)?;
    let rounds = report.rounds;
    finish(t, &mem, design.counts_entries(), Vec::new(), budget, start).map(|mut r| {
        r.rounds = rounds;
        r
    })
}

/// Pages both threads of [`double_unmap`] unmap each round.
pub const DOUBLE_UNMAP_PAGES: u64 = 64;

/// Finding: overlapping unmaps of one page remove a bystander in the same leaf table.
///
/// Each round the first thread maps a bystander page and [`DOUBLE_UNMAP_PAGES`] pages in the
/// leaf table at [`OVERLAP_BASE`] (the bystander's slot varies by round), then both threads
/// unmap those pages, in the same order, at once: a thread that falls behind finds pages
/// already gone, which is quicker than removing them, so the two fall into step and race on
/// most pages. Afterwards the bystander must still translate, and its own unmap must remove
/// exactly it and leave no leaf behind. A round is one such exchange.
///
/// # Errors
///
/// The first lost bystander, wrong result, or a hang; or a leak after the drop.
pub fn double_unmap(design: Design, budget: &Budget) -> RaceResult {
    let start = Instant::now();
    let (t, mem) = build(design);
    let bar = Arc::new(SpinBarrier::new(2));
    let doubles = Arc::new(AtomicU64::new(0));
    let mut jobs: Vec<Job> = Vec::new();
    for id in 0..2u64 {
        let t = Arc::clone(&t);
        let bar = Arc::clone(&bar);
        let doubles = Arc::clone(&doubles);
        jobs.push((
            format!("unmapper{id}"),
            Box::new(move |ctx: &Ctx| {
                let t = t.as_ref();
                let mut round = 0u64;
                let mut rng = crate::search::Rng(0xd0b1_e000 ^ id);
                let pages = |round: u64| {
                    let first = (round * 37) % (512 - DOUBLE_UNMAP_PAGES - 1);
                    (first..first + DOUBLE_UNMAP_PAGES).map(|s| OVERLAP_BASE + s * K4)
                };
                loop {
                    // The bystander sits right after the raced pages.
                    let q = OVERLAP_BASE
                        + ((round * 37) % (512 - DOUBLE_UNMAP_PAGES - 1) + DOUBLE_UNMAP_PAGES) * K4;
                    if id == 0 {
                        if !ctx.go() {
                            ctx.halt();
                            return Ok(());
                        }
                        map4k(t, q).map_err(|e| format!("map bystander {q:#x}: {e:?}"))?;
                        for p in pages(round) {
                            map4k(t, p).map_err(|e| format!("map {p:#x}: {e:?}"))?;
                        }
                    }
                    if !bar.wait(ctx) {
                        return Ok(());
                    }
                    // A varying head start each round, so the threads meet at varying
                    // points of the unmap path.
                    for _ in 0..rng.below(200) {
                        std::hint::spin_loop();
                    }
                    let mut ok = 0;
                    for p in pages(round) {
                        match unmap(t, p, PageSize::SZ_4K) {
                            Ok(K4) => ok += 1,
                            Ok(n) => {
                                return Err(format!("overlapping unmap {p:#x} returned {n:#x}"));
                            }
                            Err(_) => {}
                        }
                    }
                    doubles.fetch_add(ok, RLX);
                    if !bar.wait(ctx) {
                        return Ok(());
                    }
                    if id == 0 {
                        for p in pages(round) {
                            if let Some(pa) = lookup(t, p) {
                                return Err(format!("{p:#x} still maps {pa:#x} after both unmaps"));
                            }
                        }
                        expect_mapped(t, q, "bystander after two unmaps of its neighbours:")?;
                        match unmap(t, q, PageSize::SZ_4K) {
                            Ok(K4) => {}
                            r => return Err(format!("unmap bystander {q:#x}: {r:x?}")),
                        }
                        let mut left = Vec::new();
                        t.walk(&mut |i| {
                            if let WalkItem::Leaf { iova, .. } = i {
                                left.push(iova.get());
                            }
                        });
                        if !left.is_empty() {
                            return Err(format!("leaves {left:x?} left after the round"));
                        }
                    }
                    round += 1;
                    ctx.beat();
                }
            }),
        ));
    }
    let report = watch(jobs, budget, start)?;
    let rounds = report.rounds / 2;
    let oks = doubles.load(RLX);
    let notes = vec![format!(
        "{} of {} overlapping page unmaps were answered Ok twice",
        oks.saturating_sub(rounds * DOUBLE_UNMAP_PAGES),
        rounds * DOUBLE_UNMAP_PAGES
    )];
    finish(t, &mem, design.counts_entries(), notes, budget, start).map(|mut r| {
        r.rounds = rounds;
        r
    })
}

/// Finding: overlapping maps and unmaps damage bystanders, hang the table, or leak.
///
/// `threads` threads map and unmap, at random, the first 8 pages of the leaf table at
/// [`OVERLAP_BASE`] and the 2 MiB block after it, all sharing the same targets. A watcher
/// keeps 4 bystander pages (slots 256..260) mapped throughout and checks them after every
/// round, and churns pages of its own (slots 300..364) with strict checks.
///
/// # Errors
///
/// The first lost bystander, wrong strict result, hang, or, after a single-threaded unmap of
/// everything, a tree that is not the root alone (eager engines), or a leak after the drop.
pub fn overlap_chaos(design: Design, threads: usize, budget: &Budget) -> RaceResult {
    let start = Instant::now();
    let (t, mem) = build(design);
    let bystanders: Vec<u64> = (256..260).map(|s| OVERLAP_BASE + s * K4).collect();
    for &q in &bystanders {
        if let Err(e) = map4k(t.as_ref(), q) {
            return Err(RaceFailure {
                message: format!("map bystander {q:#x}: {e:?}"),
                rounds: 0,
                elapsed: start.elapsed(),
                per_thread: Vec::new(),
            });
        }
    }
    let mut jobs: Vec<Job> = Vec::new();
    for id in 0..threads as u64 {
        let t = Arc::clone(&t);
        jobs.push((
            format!("chaos{id}"),
            Box::new(move |ctx: &Ctx| {
                let t = t.as_ref();
                let mut rng = crate::search::Rng(0xc4a0_5eed ^ (id << 40));
                let block = OVERLAP_BASE + M2;
                while ctx.go() {
                    let p = OVERLAP_BASE + rng.below(8) * K4;
                    match rng.below(8) {
                        0..=2 => {
                            let _ = map4k(t, p);
                        }
                        3..=5 => match unmap(t, p, PageSize::SZ_4K) {
                            Ok(K4) | Err(_) => {}
                            Ok(n) => return Err(format!("unmap {p:#x} returned {n:#x}")),
                        },
                        6 => {
                            let _ = t.map(
                                Iova::new(block),
                                PhysAddr::new(pa_of(block)),
                                PageSize::SZ_2M,
                                1,
                                RW,
                            );
                        }
                        _ => match unmap(t, block, PageSize::SZ_2M) {
                            Ok(M2) | Err(_) => {}
                            Ok(n) => return Err(format!("unmap block returned {n:#x}")),
                        },
                    }
                    ctx.beat();
                }
                Ok(())
            }),
        ));
    }
    {
        let t = Arc::clone(&t);
        let bystanders = bystanders.clone();
        jobs.push((
            "watcher".to_string(),
            Box::new(move |ctx: &Ctx| {
                let t = t.as_ref();
                let mut i = 0u64;
                while ctx.go() {
                    for &q in &bystanders {
                        expect_mapped(t, q, "bystander beside overlapping calls:")?;
                    }
                    let p = OVERLAP_BASE + (300 + i % 64) * K4;
                    i += 1;
                    own_page_cycle(t, p)?;
                    ctx.beat();
                }
                Ok(())
            }),
        ));
    }
    let report = watch(jobs, budget, start)?;
    // Bystanders last: the teardown below unmaps them with the rest, strictly.
    for &q in &bystanders {
        if let Err(e) = expect_mapped(t.as_ref(), q, "bystander after the chaos:") {
            return Err(RaceFailure {
                message: e,
                rounds: report.rounds,
                elapsed: start.elapsed(),
                per_thread: Vec::new(),
            });
        }
    }
    let rounds = report.rounds;
    finish(t, &mem, design.counts_entries(), Vec::new(), budget, start).map(|mut r| {
        r.rounds = rounds;
        r
    })
}

/// The end of every hunt, under the watchdog too (a table left with a claimed table linked
/// may hang any later call): unmaps every leaf left, single-threaded; checks that no leaf is
/// left, that an eager engine is back to the root alone, and that dropping the table returns
/// every page.
pub(crate) fn finish(
    t: Arc<dyn Subject>,
    mem: &Arc<SimMemory>,
    counts_entries: bool,
    notes: Vec<String>,
    budget: &Budget,
    start: Instant,
) -> RaceResult {
    let mem2 = Arc::clone(mem);
    let jobs: Vec<Job> = vec![(
        "teardown".to_string(),
        Box::new(move |ctx: &Ctx| {
            let mut leaves = Vec::new();
            t.walk(&mut |i| {
                if let WalkItem::Leaf { iova, size, .. } = i {
                    leaves.push((iova.get(), size));
                }
            });
            for (iova, size) in leaves {
                match unmap(t.as_ref(), iova, size) {
                    Ok(n) if n == size.get() => {}
                    r => return Err(format!("teardown unmap {iova:#x}: {r:x?}")),
                }
                ctx.beat();
            }
            let mut left = 0;
            t.walk(&mut |i| left += usize::from(matches!(i, WalkItem::Leaf { .. })));
            if left != 0 {
                return Err(format!("{left} leaves left after unmapping every leaf"));
            }
            let s = t.stats();
            let live = mem2.stats().live_pages;
            if counts_entries && (s.live_tables != 1 || live != 1) {
                return Err(format!(
                    "after unmapping everything {live} pages are held and {} tables live: \
                     expected the root alone",
                    s.live_tables
                ));
            }
            drop(t);
            let ms = mem2.stats();
            if ms.live_pages != 0 || ms.bad_frees != 0 {
                return Err(format!(
                    "after the drop {} pages are held, {} bad frees",
                    ms.live_pages, ms.bad_frees
                ));
            }
            Ok(())
        }),
    )];
    let b = Budget {
        time: Duration::from_secs(3600),
        hang: budget.hang,
    };
    watch(jobs, &b, start).map(|mut r| {
        r.notes = notes;
        r
    })
}

/// What [`stalled_walk`] measured.
#[derive(Debug, Clone, Default)]
pub struct StallReport {
    /// Map and unmap cycles run while the walk was parked.
    pub cycles: u64,
    /// The most pages the allocator held during those cycles.
    pub max_live_pages: u64,
    /// Mean time of a cycle over the first [`STALL_START_CYCLES`] cycles (or the first tenth
    /// of the cycles, if fewer), in nanoseconds.
    pub start_ns: f64,
    /// Mean time of a cycle over the last tenth of the cycles, in nanoseconds.
    pub last_tenth_ns: f64,
    /// Time spent.
    pub elapsed: Duration,
}

impl StallReport {
    /// How much slower the last tenth of the cycles ran than the start.
    pub fn slowdown(&self) -> f64 {
        if self.start_ns > 0.0 {
            self.last_tenth_ns / self.start_ns
        } else {
            1.0
        }
    }

    /// The promises this run broke: more than [`STALL_LIVE_LIMIT`] pages held, or a slowdown
    /// above [`STALL_SLOWDOWN_LIMIT`].
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_live_pages > STALL_LIVE_LIMIT {
            p.push(format!(
                "{} pages held after {} cycles with one walk parked (limit {STALL_LIVE_LIMIT})",
                self.max_live_pages, self.cycles
            ));
        }
        if self.slowdown() > STALL_SLOWDOWN_LIMIT {
            p.push(format!(
                "a cycle took {:.0} ns over the last tenth of {} cycles, {:.0} ns over the \
                 first {STALL_START_CYCLES}: {:.1}x (limit {STALL_SLOWDOWN_LIMIT}x)",
                self.last_tenth_ns,
                self.cycles,
                self.start_ns,
                self.slowdown()
            ));
        }
        p
    }
}

/// Finding: one operation left in flight stops all freeing.
///
/// A bystander page is mapped far from [`STALL_PAGE`]; a thread walks the table and parks in
/// the walk's first callback; meanwhile a thread maps and unmaps [`STALL_PAGE`] (each cycle
/// installs and, on eager engines, frees its leaf and level-2 tables) for the budget or
/// `max_cycles`, timing batches of 64 cycles and sampling the allocator's live pages. Then the
/// walk is released, and the table must give back every page on drop.
///
/// # Errors
///
/// A wrong result, a hang, or a leak (the measured promises are in
/// [`StallReport::problems`]).
pub fn stalled_walk(
    design: Design,
    max_cycles: u64,
    budget: &Budget,
) -> Result<StallReport, RaceFailure> {
    const BATCH: u64 = 64;
    const BATCH_F: f64 = 64.0;
    let start = Instant::now();
    let (t, mem) = build(design);
    let far = 0x10_0000_0000;
    let fail = |message: String| RaceFailure {
        message,
        rounds: 0,
        elapsed: start.elapsed(),
        per_thread: Vec::new(),
    };
    map4k(t.as_ref(), far).map_err(|e| fail(format!("map bystander: {e:?}")))?;
    let (parked_tx, parked_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let report = Arc::new(std::sync::Mutex::new(StallReport::default()));
    let wait_limit = budget.time + budget.hang;
    let mut jobs: Vec<Job> = Vec::new();
    {
        let t = Arc::clone(&t);
        jobs.push((
            "walker".to_string(),
            Box::new(move |ctx: &Ctx| {
                let mut parked = false;
                t.walk(&mut |_| {
                    if !parked {
                        parked = true;
                        let _ = parked_tx.send(());
                        // Keep beating while parked: parking is the point, not a hang.
                        let until = Instant::now() + wait_limit;
                        while Instant::now() < until {
                            ctx.beat();
                            match release_rx.recv_timeout(Duration::from_millis(20)) {
                                Err(mpsc::RecvTimeoutError::Timeout) => {}
                                _ => break,
                            }
                        }
                    }
                });
                Ok(())
            }),
        ));
    }
    {
        let t = Arc::clone(&t);
        let mem = Arc::clone(&mem);
        let report = Arc::clone(&report);
        jobs.push((
            "churn".to_string(),
            Box::new(move |ctx: &Ctx| {
                let t = t.as_ref();
                parked_rx
                    .recv_timeout(wait_limit)
                    .map_err(|_| "the walker never reached its callback".to_string())?;
                let t0 = Instant::now();
                let mut batches = Vec::new();
                let mut max_live = 0;
                let mut cycles = 0;
                while ctx.go() && cycles < max_cycles {
                    let b0 = Instant::now();
                    for _ in 0..BATCH {
                        map4k(t, STALL_PAGE).map_err(|e| format!("map {STALL_PAGE:#x}: {e:?}"))?;
                        match unmap(t, STALL_PAGE, PageSize::SZ_4K) {
                            Ok(K4) => {}
                            r => return Err(format!("unmap {STALL_PAGE:#x}: {r:x?}")),
                        }
                    }
                    batches.push(b0.elapsed());
                    cycles += BATCH;
                    max_live = max_live.max(mem.stats().live_pages);
                    ctx.beat();
                }
                let tenth = (batches.len() / 10).max(1);
                let mean = |s: &[Duration]| {
                    s.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e9
                        / (f64::from(u32::try_from(s.len()).unwrap_or(u32::MAX)) * BATCH_F)
                };
                {
                    let mut r = report
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    r.cycles = cycles;
                    r.max_live_pages = max_live;
                    if !batches.is_empty() {
                        let start = tenth.min((STALL_START_CYCLES / BATCH) as usize);
                        r.start_ns = mean(&batches[..start]);
                        r.last_tenth_ns = mean(&batches[batches.len() - tenth..]);
                    }
                    r.elapsed = t0.elapsed();
                }
                let _ = release_tx.send(());
                Ok(())
            }),
        ));
    }
    watch(jobs, budget, start)?;
    finish(t, &mem, design.counts_entries(), Vec::new(), budget, start)?;
    let r = report
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(r)
}
