//! Checking while measuring: every call a backend answers is compared with the independent
//! [`Model`], and a sample of translations with both the backend's software lookup and the
//! hardware-walk oracle.
//!
//! The caller makes the call (and times it), then hands the inputs and the backend's result
//! to the [`Checker`], which asks the model for its result, compares the two (errors
//! included), applies the operation to the model, and probes translations in and around the
//! touched range. Any difference is a [`Divergence`] naming the call, its inputs and both
//! results; the harness stops there.
//!
//! Besides results and translations it checks, after every call: the backend's count of live
//! tables equals the model's tree; the allocator holds exactly the live tables plus the
//! reserved-but-unconsumed pages (nothing leaks, nothing is double-counted); and, for
//! Design 1, the reservation counters of [`Stats`](iopt_api::Stats) equal the model's. Every
//! `full_every` calls it walks the whole tree and compares every leaf and table.
//!
//! [`CheckedTable`] wraps a table, its memory and a checker into one value whose methods make
//! the call and check it: the form tests and fuzz targets use.
//!
//! ```
//! use compare::check::{CheckedTable, CheckOptions};
//! use iopt_model::ReservePolicy;
//! use compare::ops::TableKind;
//! use iopt_alloc_ops::AllocOpsTable;
//! use iopt_api::{Iova, IovaRange, PageSize, Prot};
//! use iopt_sim::SimMemory;
//! use std::sync::Arc;
//!
//! let cfg = TableKind::Panthor.config();
//! let mem = Arc::new(SimMemory::new());
//! let table = AllocOpsTable::new(cfg, Arc::clone(&mem))?;
//! let mut t = CheckedTable::new(&table, &mem, ReservePolicy::Pools { cap: None }, CheckOptions::default());
//! let range = IovaRange::new(Iova::new(0x4000_0000), 0x10000, 0x1000)?;
//! let res = t.reserve(range, PageSize::SZ_4K)?.expect("reserved");
//! assert_eq!(res.pages(), 3);
//! t.map(Some(&res), 0x4000_0000, 0x8000_0000, 0x1000, 16, Prot::READ)?.expect("mapped");
//! // A second map of the same page fails the same way on the backend and in the model.
//! assert!(t.map(Some(&res), 0x4000_0000, 0x9000_0000, 0x1000, 1, Prot::READ)?.is_err());
//! t.release(res)?.expect("released");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use iopt_api::{
    Gather, IoPageTable, Iova, IovaRange, MapError, PageSize, PhysAddr, Prot, ReleaseError,
    Reservation, Reserve, ReserveError, UnmapError, WalkItem,
};
use iopt_model::{Model, ReservePolicy};
use iopt_sim::SimMemory;
use iopt_sim::oracle::{Access, Walker};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::fmt;

/// How thoroughly to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Random translations probed in the touched range after each call (its first, middle
    /// and last page are always probed), and as many again in recently touched ranges.
    pub samples: usize,
    /// Walk the whole tree and compare it with the model every this many calls (0: never,
    /// except when [`Checker::full_check`] is called).
    pub full_every: u64,
    /// Compare table counts, allocator pages and Design 1's reservation counters after each
    /// call.
    pub check_stats: bool,
    /// Seed of the probe sampling.
    pub seed: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            samples: 4,
            full_every: 256,
            check_stats: true,
            seed: 0x5eed,
        }
    }
}

/// A call as the checker saw it: its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Call {
    /// `reserve(range, leaf)`.
    Reserve {
        /// First IOVA.
        start: u64,
        /// Bytes.
        len: u64,
        /// Leaf size.
        leaf: u64,
    },
    /// `map_reserved` (with a reservation id) or `map` (without).
    Map {
        /// Reservation id, if bound.
        res: Option<u64>,
        /// First IOVA.
        iova: u64,
        /// First PA.
        pa: u64,
        /// Page size.
        size: u64,
        /// Pages.
        count: u64,
        /// Prot bits.
        prot: u32,
    },
    /// `unmap(iova, size, count)`.
    Unmap {
        /// First IOVA.
        iova: u64,
        /// Page size.
        size: u64,
        /// Pages.
        count: u64,
    },
    /// `release(reservation)`.
    Release {
        /// Reservation id.
        res: u64,
    },
    /// A whole-tree comparison, not a call.
    FullCheck,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Call::Reserve { start, len, leaf } => {
                write!(f, "reserve([{start:#x}, +{len:#x}), leaf {leaf:#x})")
            }
            Call::Map {
                res: Some(r),
                iova,
                pa,
                size,
                count,
                prot,
            } => write!(
                f,
                "map_reserved(#{r}, iova {iova:#x}, pa {pa:#x}, size {size:#x}, count {count}, prot {prot:#x})"
            ),
            Call::Map {
                res: None,
                iova,
                pa,
                size,
                count,
                prot,
            } => write!(
                f,
                "map(iova {iova:#x}, pa {pa:#x}, size {size:#x}, count {count}, prot {prot:#x})"
            ),
            Call::Unmap { iova, size, count } => {
                write!(f, "unmap(iova {iova:#x}, size {size:#x}, count {count})")
            }
            Call::Release { res } => write!(f, "release(#{res})"),
            Call::FullCheck => f.write_str("full-tree comparison"),
        }
    }
}

/// A backend and the model disagree. The run stops here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// Index of the call (0-based) among the calls this checker saw.
    pub call_index: u64,
    /// The call and its inputs.
    pub call: Call,
    /// What was compared (the call's result, a translation, a counter...).
    pub what: String,
    /// The backend's answer.
    pub backend: String,
    /// The model's answer.
    pub model: String,
    /// Where in the workload it happened (set by the harness: event, job, design).
    pub context: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "divergence at call #{} {}: {}\n  backend: {}\n  model:   {}",
            self.call_index, self.call, self.what, self.backend, self.model
        )?;
        if !self.context.is_empty() {
            write!(f, "\n  context: {}", self.context)?;
        }
        Ok(())
    }
}

impl std::error::Error for Divergence {}

/// The result of a check: the value, or the divergence found (boxed: it carries strings).
pub type CheckResult<T> = Result<T, Box<Divergence>>;

/// Compares a backend's answers with the [`Model`] and the hardware-walk oracle.
#[derive(Debug)]
pub struct Checker {
    model: Model,
    walker: Walker,
    opts: CheckOptions,
    rng: ChaCha8Rng,
    calls: u64,
    recent: Vec<(u64, u64)>,
    probes: u64,
}

impl Checker {
    /// A checker for a new, empty `table`.
    ///
    /// # Panics
    ///
    /// If the table's registers cannot drive the oracle (a format the oracle does not know).
    pub fn new<T: IoPageTable + ?Sized>(
        table: &T,
        policy: ReservePolicy,
        opts: CheckOptions,
    ) -> Self {
        let cfg = *table.config();
        let walker =
            Walker::from_registers(cfg.format(), &table.registers(), cfg.is_ttbr1(), cfg.ias())
                .expect("the oracle understands the table's registers");
        Self {
            model: Model::new(cfg, policy),
            walker,
            opts,
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
            calls: 0,
            recent: Vec::new(),
            probes: 0,
        }
    }

    /// Returns the model.
    #[must_use]
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Returns how many calls were checked.
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Returns how many translations were probed (each through the lookup and the oracle).
    #[must_use]
    pub fn probes(&self) -> u64 {
        self.probes
    }

    fn diverge(
        &self,
        call: Call,
        what: impl Into<String>,
        backend: String,
        model: String,
    ) -> Box<Divergence> {
        Box::new(Divergence {
            call_index: self.calls,
            call,
            what: what.into(),
            backend,
            model,
            context: String::new(),
        })
    }

    /// Checks a `reserve` call and its result.
    ///
    /// # Errors
    ///
    /// The first difference found.
    pub fn reserve<T: IoPageTable + ?Sized>(
        &mut self,
        table: &T,
        mem: &SimMemory,
        range: IovaRange,
        leaf: PageSize,
        got: &Result<Reservation, ReserveError>,
    ) -> CheckResult<()> {
        let call = Call::Reserve {
            start: range.start().get(),
            len: range.len(),
            leaf: leaf.get(),
        };
        let id = got.as_ref().map_or(u64::MAX, Reservation::id);
        let want = self.model.reserve(id, range, leaf);
        let same = match (got, &want) {
            (Ok(r), Ok(n)) => r.pages() == *n,
            (Err(a), Err(b)) => a == b,
            _ => false,
        };
        if !same {
            return Err(self.diverge(
                call,
                "reserve result (pages taken)",
                format!("{:?}", got.as_ref().map(Reservation::pages)),
                format!("{want:?}"),
            ));
        }
        self.after(table, mem, call, None)
    }

    /// Checks a map (`map_reserved` when `res` is given, `map` otherwise) and its result.
    ///
    /// # Errors
    ///
    /// The first difference found.
    #[allow(clippy::too_many_arguments)]
    pub fn map<T: IoPageTable + ?Sized>(
        &mut self,
        table: &T,
        mem: &SimMemory,
        res: Option<&Reservation>,
        iova: u64,
        pa: u64,
        size: u64,
        count: u64,
        prot: Prot,
        got: &Result<(), MapError>,
    ) -> CheckResult<()> {
        let call = Call::Map {
            res: res.map(Reservation::id),
            iova,
            pa,
            size,
            count,
            prot: prot.bits(),
        };
        let want = self
            .model
            .map(res.map(Reservation::id), iova, pa, size, count, prot);
        if *got != want {
            return Err(self.diverge(call, "map result", format!("{got:?}"), format!("{want:?}")));
        }
        let span = size.saturating_mul(count).max(1);
        self.after(table, mem, call, Some((iova, span)))
    }

    /// Checks an `unmap` call and its result.
    ///
    /// # Errors
    ///
    /// The first difference found.
    pub fn unmap<T: IoPageTable + ?Sized>(
        &mut self,
        table: &T,
        mem: &SimMemory,
        iova: u64,
        size: u64,
        count: u64,
        got: &Result<u64, UnmapError>,
    ) -> CheckResult<()> {
        let call = Call::Unmap { iova, size, count };
        let want = self.model.unmap(iova, size, count);
        if *got != want {
            return Err(self.diverge(
                call,
                "unmap result",
                format!("{got:?}"),
                format!("{want:?}"),
            ));
        }
        let span = size.saturating_mul(count).max(1);
        self.after(table, mem, call, Some((iova, span)))
    }

    /// Checks a `release` of the reservation with id `id` and its result.
    ///
    /// # Errors
    ///
    /// The first difference found.
    pub fn release<T: IoPageTable + ?Sized>(
        &mut self,
        table: &T,
        mem: &SimMemory,
        id: u64,
        got: &Result<(), ReleaseError>,
    ) -> CheckResult<()> {
        let call = Call::Release { res: id };
        let want = self.model.release(id);
        let got = got.as_ref().map(|&()| ()).map_err(ReleaseError::error);
        if got != want {
            return Err(self.diverge(
                call,
                "release result",
                format!("{got:?}"),
                format!("{want:?}"),
            ));
        }
        self.after(table, mem, call, None)
    }

    fn after<T: IoPageTable + ?Sized>(
        &mut self,
        table: &T,
        mem: &SimMemory,
        call: Call,
        touched: Option<(u64, u64)>,
    ) -> CheckResult<()> {
        if let Some((start, len)) = touched {
            let last_page = start.saturating_add(len - 1) & !0xfff;
            let mut probes = vec![
                start & !0xfff,
                last_page,
                (start / 2 + last_page / 2) & !0xfff,
            ];
            let pages = len.div_ceil(4096).max(1);
            for _ in 0..self.opts.samples {
                probes.push(start.saturating_add(self.rng.random_range(0..pages) * 4096));
            }
            if !self.recent.is_empty() {
                for _ in 0..self.opts.samples {
                    let (s, l) = self.recent[self.rng.random_range(0..self.recent.len())];
                    probes.push(
                        s.saturating_add(self.rng.random_range(0..l.div_ceil(4096).max(1)) * 4096),
                    );
                }
            }
            // Just outside the range too: neighbours must be untouched.
            probes.push(start.saturating_sub(4096));
            probes.push(start.saturating_add(len));
            for iova in probes {
                let off = self.rng.random_range(0..512u64) * 8;
                self.probe(table, mem, call, iova + off)?;
            }
            if self.recent.len() < 64 {
                self.recent.push((start, len));
            } else {
                let i = self.rng.random_range(0..self.recent.len());
                self.recent[i] = (start, len);
            }
        }
        if self.opts.check_stats {
            self.check_stats(table, mem, call)?;
        }
        self.calls += 1;
        if self.opts.full_every > 0 && self.calls % self.opts.full_every == 0 {
            self.compare_trees(table, call)?;
        }
        Ok(())
    }

    /// Translates `iova` through the backend's lookup and the oracle and compares both with
    /// the model.
    fn probe<T: IoPageTable + ?Sized>(
        &mut self,
        table: &T,
        mem: &SimMemory,
        call: Call,
        iova: u64,
    ) -> CheckResult<()> {
        let cfg = self.model.config();
        if !cfg.iova_in_range(Iova::new(iova)) {
            return Ok(());
        }
        self.probes += 1;
        let want = self.model.lookup(iova);
        let got = table
            .iova_to_phys(Iova::new(iova))
            .map(|t| (t.pa.get(), t.size.get(), t.prot));
        if got != want {
            return Err(self.diverge(
                call,
                format!("software lookup of {iova:#x} (pa, leaf size, prot)"),
                format!("{got:x?}"),
                format!("{want:x?}"),
            ));
        }
        // The device's view: probe with an access the leaf allows (write-only leaves fault on
        // reads), privileged so stage-1 PRIV leaves are readable.
        let write = want.is_some_and(|(_, _, p)| !p.contains(Prot::READ));
        let dev = self.walker.translate(
            mem,
            iova,
            Access {
                write,
                exec: false,
                privileged: true,
            },
        );
        let ok = match (want, &dev) {
            (Some((pa, size, _)), Ok(h)) => h.pa.get() == pa && h.leaf_size == size,
            (None, Err(_)) => true,
            _ => false,
        };
        if !ok {
            return Err(self.diverge(
                call,
                format!("hardware walk (oracle) of {iova:#x}"),
                format!("{dev:x?}"),
                format!("{want:x?}"),
            ));
        }
        Ok(())
    }

    fn check_stats<T: IoPageTable + ?Sized>(
        &self,
        table: &T,
        mem: &SimMemory,
        call: Call,
    ) -> CheckResult<()> {
        let s = table.stats();
        let want_tables = self.model.tables() as u64 + 1;
        if s.live_tables != want_tables {
            return Err(self.diverge(
                call,
                "live table pages (root included)",
                s.live_tables.to_string(),
                want_tables.to_string(),
            ));
        }
        let held = mem.stats().live_pages;
        if held != s.live_tables + s.reserved_outstanding {
            return Err(self.diverge(
                call,
                "allocator pages held = live tables + unconsumed reservations",
                format!(
                    "allocator {held}, stats {} + {}",
                    s.live_tables, s.reserved_outstanding
                ),
                format!("{}", s.live_tables + s.reserved_outstanding),
            ));
        }
        if let ReservePolicy::Pools { .. } = self.model.policy() {
            let m = self.model.counters();
            let got = (
                s.pages_reserved,
                s.pages_consumed,
                s.reserved_unused,
                s.reserved_outstanding,
            );
            let want = (
                m.pages_reserved,
                m.pages_consumed,
                m.reserved_unused,
                m.reserved_outstanding,
            );
            if got != want {
                return Err(self.diverge(
                    call,
                    "reservation counters (reserved, consumed, unused, outstanding)",
                    format!("{got:?}"),
                    format!("{want:?}"),
                ));
            }
        }
        Ok(())
    }

    fn compare_trees<T: IoPageTable + ?Sized>(&self, table: &T, call: Call) -> CheckResult<()> {
        let start_level = self.model.config().start_level();
        let mut leaves = BTreeMap::new();
        let mut tables = Vec::new();
        table.walk(&mut |item| match item {
            WalkItem::Leaf {
                iova,
                size,
                pa,
                prot,
                ..
            } => {
                leaves.insert(iova.get(), (size.get(), pa.get(), prot));
            }
            WalkItem::Table { iova, level, .. } if level > start_level => {
                tables.push((level, iova.get()));
            }
            _ => {}
        });
        let want: BTreeMap<u64, (u64, u64, Prot)> = self
            .model
            .leaves()
            .iter()
            .map(|(&i, l)| (i, (l.size, l.pa, l.prot)))
            .collect();
        if leaves != want {
            let first = leaves
                .iter()
                .zip(want.iter())
                .find(|(a, b)| a != b)
                .map_or_else(
                    || "(lengths differ)".to_string(),
                    |(a, b)| format!("{a:?} vs {b:?}"),
                );
            return Err(self.diverge(
                call,
                format!("leaves after the call (first difference {first})"),
                format!("{} leaves", leaves.len()),
                format!("{} leaves", want.len()),
            ));
        }
        tables.sort_unstable();
        let mut want_tables = self.model.table_keys();
        want_tables.sort_unstable();
        if tables != want_tables {
            let extra: Vec<_> = tables
                .iter()
                .filter(|t| !want_tables.contains(t))
                .take(4)
                .collect();
            let missing: Vec<_> = want_tables
                .iter()
                .filter(|t| !tables.contains(t))
                .take(4)
                .collect();
            return Err(self.diverge(
                call,
                format!("table pages (level, iova): extra {extra:x?}, missing {missing:x?}"),
                format!("{} tables", tables.len()),
                format!("{} tables", want_tables.len()),
            ));
        }
        Ok(())
    }

    /// Walks the whole tree now and compares every leaf and table with the model.
    ///
    /// # Errors
    ///
    /// The first difference found.
    pub fn full_check<T: IoPageTable + ?Sized>(&self, table: &T) -> CheckResult<()> {
        self.compare_trees(table, Call::FullCheck)
    }
}

/// A table, its simulated memory and a [`Checker`] in one value: each method makes the call on
/// the table and checks it, returning the backend's result, or the divergence.
#[derive(Debug)]
pub struct CheckedTable<'a, T: Reserve + ?Sized> {
    table: &'a T,
    mem: &'a SimMemory,
    checker: Checker,
}

impl<'a, T: Reserve + ?Sized> CheckedTable<'a, T> {
    /// Wraps a new, empty table allocating from `mem`.
    pub fn new(
        table: &'a T,
        mem: &'a SimMemory,
        policy: ReservePolicy,
        opts: CheckOptions,
    ) -> Self {
        Self {
            table,
            mem,
            checker: Checker::new(table, policy, opts),
        }
    }

    /// Returns the checker.
    #[must_use]
    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    /// Reserves and checks.
    ///
    /// # Errors
    ///
    /// A divergence; otherwise `Ok` with the backend's result.
    pub fn reserve(
        &mut self,
        range: IovaRange,
        leaf: PageSize,
    ) -> CheckResult<Result<Reservation, ReserveError>> {
        let got = self.table.reserve(range, leaf);
        self.checker
            .reserve(self.table, self.mem, range, leaf, &got)?;
        Ok(got)
    }

    /// Maps (bound to `res`, or on demand) and checks.
    ///
    /// # Errors
    ///
    /// A divergence; otherwise `Ok` with the backend's result.
    pub fn map(
        &mut self,
        res: Option<&Reservation>,
        iova: u64,
        pa: u64,
        size: u64,
        count: u64,
        prot: Prot,
    ) -> CheckResult<Result<(), MapError>> {
        let got = match PageSize::new(size) {
            None => Err(MapError::InvalidPageSize { size }),
            Some(ps) => match res {
                Some(r) => {
                    self.table
                        .map_reserved(r, Iova::new(iova), PhysAddr::new(pa), ps, count, prot)
                }
                None => self
                    .table
                    .map(Iova::new(iova), PhysAddr::new(pa), ps, count, prot),
            },
        };
        self.checker
            .map(self.table, self.mem, res, iova, pa, size, count, prot, &got)?;
        Ok(got)
    }

    /// Unmaps and checks.
    ///
    /// # Errors
    ///
    /// A divergence; otherwise `Ok` with the backend's result.
    pub fn unmap(
        &mut self,
        iova: u64,
        size: u64,
        count: u64,
    ) -> CheckResult<Result<u64, UnmapError>> {
        let got = match PageSize::new(size) {
            None => Err(UnmapError::InvalidPageSize { size }),
            Some(ps) => self
                .table
                .unmap(Iova::new(iova), ps, count, &mut Gather::new()),
        };
        self.checker
            .unmap(self.table, self.mem, iova, size, count, &got)?;
        Ok(got)
    }

    /// Releases and checks.
    ///
    /// # Errors
    ///
    /// A divergence; otherwise `Ok` with the backend's result.
    pub fn release(&mut self, res: Reservation) -> CheckResult<Result<(), ReleaseError>> {
        let id = res.id();
        let got = self.table.release(res, &mut Gather::new());
        self.checker.release(self.table, self.mem, id, &got)?;
        Ok(got)
    }

    /// Compares the whole tree with the model.
    ///
    /// # Errors
    ///
    /// The first difference.
    pub fn full_check(&self) -> CheckResult<()> {
        self.checker.full_check(self.table)
    }
}
