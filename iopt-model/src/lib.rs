//! # iopt-model: the one reference model of an iopt table
//!
//! `compare` checks every call of its workloads against it, `checkers` runs every design
//! against it under random and adversarial sequences, and the crates' property tests compare
//! their tables with it: one statement of what a correct table answers, so a fix or a new
//! behaviour is written once and every checker agrees on it.
//!
//! It shares no code with the engine or the backends: the mapping is a map from each leaf's
//! first IOVA to its size, output address and permissions (so "page → pa, prot" is a range
//! lookup), and the tree shape is a set of `(level, index)` keys, one per table page below the
//! root, where `index` is the IOVA divided by the span of the table. From those two it derives
//! what Linux's io-pgtable-arm (v6.13+, with iopt's typed errors) answers to every map and
//! unmap, which tables exist afterwards, and what each design's reservations add:
//!
//! - [`ReservePolicy::Pools`] (Design 1): a reservation is a private pool of
//!   `worst_case(range)` pages (panthor's `N(512G) + N(1G) + N(2M)`, computed here from the
//!   geometry); maps bound to it draw the tables they create from it and fail with
//!   `ReservationExhausted` when it holds too few; release returns the rest. Tables are freed
//!   only where Linux frees them.
//! - [`ReservePolicy::Refcounts`] (Design 2): a reservation installs every missing table that
//!   covers its range down to its leaf level and takes a reference on each covering table; a
//!   block map or a block-sized unmap that would remove a referenced table is refused
//!   (`ReservedTable`); release drops the references and frees, bottom-up, every table it
//!   referenced whose count reached zero and that holds nothing. An unmap frees the tables
//!   it leaves empty outside reservations.
//! - [`ReservePolicy::ReservationCounts`] (the seed's Design 2): the same reservations, but
//!   only a release frees tables.
//!
//! Only configurations without the TTBR1 quirk are modelled.

use iopt_api::{
    Config, Iova, IovaRange, MapError, PageSize, PageSizes, PhysAddr, Prot, ReserveError,
    UnmapError,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// A leaf of the model: bytes, output address and permissions as a lookup reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Leaf size in bytes.
    pub size: u64,
    /// Output address of the leaf's first byte.
    pub pa: u64,
    /// Effective permissions ([`Config::effective_prot`]).
    pub prot: Prot,
}

/// An in-flight cap on Design 1's reservations (msm's throttle), as the backend applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum CapRule {
    /// Refuse when the pages in flight already exceed the cap (msm, commit b74fae5492d1).
    MsmThrottle(usize),
    /// Refuse when in-flight plus the new reservation would exceed the cap.
    Strict(usize),
}

/// How a design's reservations behave, for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ReservePolicy {
    /// Design 1: worst-case private pools, optionally under an in-flight cap.
    Pools {
        /// The cap, if any.
        cap: Option<CapRule>,
    },
    /// Design 2: refcounted table installation, and tables an unmap leaves empty outside
    /// reservations freed at once (`LiveCounts`).
    Refcounts,
    /// Design 2 as the seed message has it (`ReservationCounts`): reservations as
    /// [`Refcounts`](Self::Refcounts), but unmaps never free; only a release frees the tables
    /// its range leaves unreserved and empty.
    ReservationCounts,
}

impl ReservePolicy {
    /// Whether reservations count the tables they cover (either Design 2).
    #[must_use]
    pub fn counts_reservations(self) -> bool {
        matches!(self, Self::Refcounts | Self::ReservationCounts)
    }
}

#[derive(Debug, Clone)]
struct ModelRes {
    start: u64,
    last: u64,
    range: IovaRange,
    leaf_level: u32,
    /// Pages taken at reserve time.
    reserved: usize,
    /// Pool pages not yet tables (Design 1).
    left: usize,
}

/// Counters the model keeps, to cross-check a backend's [`Stats`](iopt_api::Stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ModelCounters {
    /// Pages taken by reservations.
    pub pages_reserved: u64,
    /// Pool pages that became tables (Design 1).
    pub pages_consumed: u64,
    /// Pool pages returned unused at release (Design 1).
    pub reserved_unused: u64,
    /// Pool pages held now (Design 1).
    pub reserved_outstanding: u64,
}

/// The model of one table.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    policy: ReservePolicy,
    leaves: BTreeMap<u64, Leaf>,
    /// Tables below the root: `(level, iova >> level_shift(level - 1))` → references held.
    tables: BTreeMap<(u32, u64), u32>,
    res: HashMap<u64, ModelRes>,
    in_flight: usize,
    counters: ModelCounters,
}

impl Model {
    /// An empty table (only the root) of `cfg`, with reservations behaving as `policy` says.
    #[must_use]
    pub fn new(cfg: Config, policy: ReservePolicy) -> Self {
        Self {
            cfg,
            policy,
            leaves: BTreeMap::new(),
            tables: BTreeMap::new(),
            res: HashMap::new(),
            in_flight: 0,
            counters: ModelCounters::default(),
        }
    }

    /// Returns the configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Returns the reservation policy.
    #[must_use]
    pub fn policy(&self) -> ReservePolicy {
        self.policy
    }

    /// Returns the leaves, by first IOVA.
    #[must_use]
    pub fn leaves(&self) -> &BTreeMap<u64, Leaf> {
        &self.leaves
    }

    /// Returns the number of table pages below the root.
    #[must_use]
    pub fn tables(&self) -> usize {
        self.tables.len()
    }

    /// Returns the set of tables below the root as `(level, first IOVA)`.
    #[must_use]
    pub fn table_keys(&self) -> Vec<(u32, u64)> {
        self.tables
            .keys()
            .map(|&(l, idx)| (l, idx << self.cfg.level_shift(l - 1)))
            .collect()
    }

    /// Returns the model's counters.
    #[must_use]
    pub fn counters(&self) -> ModelCounters {
        self.counters
    }

    /// Returns the live reservations.
    #[must_use]
    pub fn live_reservations(&self) -> usize {
        self.res.len()
    }

    /// Returns what a lookup of `iova` finds: `(pa, leaf size, prot)`.
    #[must_use]
    pub fn lookup(&self, iova: u64) -> Option<(u64, u64, Prot)> {
        let (&i, l) = self.leaves.range(..=iova).next_back()?;
        (iova - i < l.size).then_some((l.pa + (iova - i), l.size, l.prot))
    }

    fn shift_above(&self, level: u32) -> u32 {
        self.cfg.level_shift(level - 1)
    }

    fn first_table_level(&self) -> u32 {
        self.cfg.start_level() + 1
    }

    /// Whether any leaf overlaps `[start, start + len)`.
    fn overlaps(&self, start: u64, len: u64) -> bool {
        if let Some((&i, l)) = self.leaves.range(..start).next_back() {
            if i + l.size > start {
                return true;
            }
        }
        self.leaves
            .range(start..start.saturating_add(len))
            .next()
            .is_some()
    }

    /// The tables a block leaf at `level` covering `iova` sits above.
    fn child_key(&self, iova: u64, level: u32) -> (u32, u64) {
        (level + 1, iova >> self.cfg.level_shift(level))
    }

    fn tables_in(
        &self,
        level: u32,
        start: u64,
        last: u64,
    ) -> impl Iterator<Item = (u32, u64)> + '_ {
        let sh = self.shift_above(level);
        self.tables
            .range((level, start >> sh)..=(level, last >> sh))
            .map(|(&k, _)| k)
    }

    fn remove_tables_under(&mut self, iova: u64, level: u32) {
        let last = iova + (self.cfg.block_size(level) - 1);
        for l in (level + 1)..=self.last_level() {
            let keys: Vec<_> = self.tables_in(l, iova, last).collect();
            for k in keys {
                self.tables.remove(&k);
            }
        }
    }

    fn last_level(&self) -> u32 {
        self.cfg.start_level() + self.cfg.levels() - 1
    }

    /// The table keys covering `[start, last]` at levels below the root down to `level`.
    fn covering(&self, start: u64, last: u64, level: u32) -> Vec<(u32, u64)> {
        let mut v = Vec::new();
        for l in self.first_table_level()..=level {
            let sh = self.shift_above(l);
            for idx in (start >> sh)..=(last >> sh) {
                v.push((l, idx));
            }
        }
        v
    }

    fn missing(&self, start: u64, last: u64, level: u32) -> Vec<(u32, u64)> {
        self.covering(start, last, level)
            .into_iter()
            .filter(|k| !self.tables.contains_key(k))
            .collect()
    }

    fn validate_map(
        &self,
        iova: u64,
        pa: u64,
        size: u64,
        count: u64,
        prot: Prot,
    ) -> Result<u32, MapError> {
        let cfg = &self.cfg;
        let ps = PageSize::new(size).ok_or(MapError::InvalidPageSize { size })?;
        let level = cfg
            .leaf_level(ps)
            .ok_or(MapError::InvalidPageSize { size })?;
        let (vi, vp) = (Iova::new(iova), PhysAddr::new(pa));
        if !cfg.iova_in_range(vi) {
            return Err(MapError::IovaOutOfRange { iova: vi });
        }
        if !cfg.pa_in_range(vp) {
            return Err(MapError::PaOutOfRange { pa: vp });
        }
        if !prot.is_accessible() {
            return Err(MapError::NoAccess { prot });
        }
        if count == 0 {
            return Err(MapError::Empty { iova: vi });
        }
        let len = count.checked_mul(size).ok_or(MapError::Overflow {
            iova: vi,
            len: u64::MAX,
        })?;
        let last = iova
            .checked_add(len - 1)
            .ok_or(MapError::Overflow { iova: vi, len })?;
        let last_pa = pa
            .checked_add(len - 1)
            .ok_or(MapError::Overflow { iova: vi, len })?;
        if iova % size != 0 || pa % size != 0 {
            return Err(MapError::Misaligned {
                iova: vi,
                pa: vp,
                size: ps,
            });
        }
        if !cfg.iova_in_range(Iova::new(last)) {
            return Err(MapError::IovaOutOfRange {
                iova: Iova::new(last),
            });
        }
        if !cfg.pa_in_range(PhysAddr::new(last_pa)) {
            return Err(MapError::PaOutOfRange {
                pa: PhysAddr::new(last_pa),
            });
        }
        Ok(level)
    }

    /// Maps `count` leaves of `size` bytes from `iova` to `pa`, bound to the reservation with
    /// backend id `res` or on demand (`None`): the result the backend must give, applied to
    /// the model when it is `Ok`.
    ///
    /// # Errors
    ///
    /// The error the backend must return; the model is then unchanged.
    pub fn map(
        &mut self,
        res: Option<u64>,
        iova: u64,
        pa: u64,
        size: u64,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        // The handle first, as both designs check it: a dead handle is refused whatever the
        // arguments.
        if let Some(id) = res {
            if !self.res.contains_key(&id) {
                return Err(MapError::UnknownReservation { id });
            }
        }
        let level = self.validate_map(iova, pa, size, count, prot)?;
        let last = iova + (size * count - 1);
        if let Some(id) = res {
            let r = self
                .res
                .get(&id)
                .ok_or(MapError::UnknownReservation { id })?;
            // The first IOVA of the run outside the range: its start when that already is.
            let outside = if iova < r.start || iova > r.last {
                Some(iova)
            } else if last > r.last {
                Some(r.last + 1)
            } else {
                None
            };
            if let Some(at) = outside {
                return Err(MapError::OutsideReservation {
                    id,
                    range: r.range,
                    iova: Iova::new(at),
                });
            }
        }
        let refcounts = self.policy.counts_reservations();
        if self.overlaps(iova, size * count) || (refcounts && level < self.last_level()) {
            // Slot by slot, as the walker checks them: a leaf in the way, then (Design 2) a
            // table a reservation holds.
            for k in 0..count {
                let i = iova + k * size;
                if self.overlaps(i, size) {
                    return Err(MapError::AlreadyMapped { iova: Iova::new(i) });
                }
                if refcounts
                    && level < self.last_level()
                    && self
                        .tables
                        .get(&self.child_key(i, level))
                        .is_some_and(|&h| h > 0)
                {
                    return Err(MapError::ReservedTable { iova: Iova::new(i) });
                }
            }
        }
        let missing = self.missing(iova, last, level);
        if let Some(id) = res {
            let r = self
                .res
                .get_mut(&id)
                .ok_or(MapError::UnknownReservation { id })?;
            let left = match self.policy {
                ReservePolicy::Pools { .. } => r.left,
                ReservePolicy::Refcounts | ReservePolicy::ReservationCounts => 0,
            };
            if missing.len() > left {
                return Err(MapError::ReservationExhausted {
                    id,
                    left,
                    needed: missing.len(),
                });
            }
            if let ReservePolicy::Pools { .. } = self.policy {
                r.left -= missing.len();
                self.counters.pages_consumed += missing.len() as u64;
                self.counters.reserved_outstanding -= missing.len() as u64;
            }
        }
        for k in missing {
            self.tables.insert(k, 0);
        }
        let eprot = self.cfg.effective_prot(prot);
        for k in 0..count {
            let i = iova + k * size;
            if level < self.last_level() {
                self.remove_tables_under(i, level);
            }
            self.leaves.insert(
                i,
                Leaf {
                    size,
                    pa: pa + k * size,
                    prot: eprot,
                },
            );
        }
        Ok(())
    }

    fn validate_unmap(&self, iova: u64, size: u64, count: u64) -> Result<u32, UnmapError> {
        let cfg = &self.cfg;
        let ps = PageSize::new(size).ok_or(UnmapError::InvalidPageSize { size })?;
        let level = cfg
            .leaf_level(ps)
            .ok_or(UnmapError::InvalidPageSize { size })?;
        let vi = Iova::new(iova);
        if !cfg.iova_in_range(vi) {
            return Err(UnmapError::IovaOutOfRange { iova: vi });
        }
        if count == 0 {
            return Err(UnmapError::Empty { iova: vi });
        }
        let len = count.checked_mul(size).ok_or(UnmapError::Overflow {
            iova: vi,
            len: u64::MAX,
        })?;
        let last = iova
            .checked_add(len - 1)
            .ok_or(UnmapError::Overflow { iova: vi, len })?;
        if iova % size != 0 {
            return Err(UnmapError::Misaligned { iova: vi, size: ps });
        }
        if !cfg.iova_in_range(Iova::new(last)) {
            return Err(UnmapError::IovaOutOfRange {
                iova: Iova::new(last),
            });
        }
        Ok(level)
    }

    /// `map_range`: the runs `iommu_pgsize` cuts `[iova, iova + len)` into (largest page
    /// size both addresses allow), each validated first as `split_range` does, then mapped all
    /// or nothing on demand.
    ///
    /// # Errors
    ///
    /// The error the backend must give; the model is then unchanged.
    pub fn map_range(&mut self, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<(), MapError> {
        let cfg = self.cfg;
        let vi = Iova::new(iova);
        if len == 0 {
            return Err(MapError::Empty { iova: vi });
        }
        if iova.checked_add(len - 1).is_none() || pa.checked_add(len - 1).is_none() {
            return Err(MapError::Overflow { iova: vi, len });
        }
        let sizes: PageSizes = cfg.page_sizes();
        let mut runs = Vec::new();
        let mut done = 0;
        while done < len {
            let (i, p) = (iova + done, pa + done);
            let Some((size, count)) = sizes.best_fit(i, p, len - done) else {
                return Err(MapError::Misaligned {
                    iova: Iova::new(i),
                    pa: PhysAddr::new(p),
                    size: sizes.smallest().unwrap_or(PageSize::SZ_4K),
                });
            };
            // Validation alone: an empty model answers only argument errors.
            Model::new(cfg, self.policy).map(None, i, p, size.get(), count, prot)?;
            runs.push((i, p, size.get(), count));
            done += size.get() * count;
        }
        let mut next = self.clone();
        for (i, p, size, count) in runs {
            next.map(None, i, p, size, count, prot)?;
        }
        *self = next;
        Ok(())
    }

    /// Unmaps `count` leaves of `size` bytes from `iova` (a block-sized unmap over a table
    /// removes the table and all it holds): the result the backend must give, applied when
    /// `Ok`.
    ///
    /// # Errors
    ///
    /// The error the backend must return; the model is then unchanged.
    pub fn unmap(&mut self, iova: u64, size: u64, count: u64) -> Result<u64, UnmapError> {
        let level = self.validate_unmap(iova, size, count)?;
        let ps = PageSize::new(size).ok_or(UnmapError::InvalidPageSize { size })?;
        let refcounts = self.policy.counts_reservations();
        for k in 0..count {
            let i = iova + k * size;
            if let Some((&li, l)) = self.leaves.range(..=i).next_back() {
                if li + l.size > i && l.size > size {
                    return Err(UnmapError::PartialBlock {
                        iova: Iova::new(i),
                        size: ps,
                        leaf: PageSize::new(l.size).unwrap_or(ps),
                    });
                }
            }
            let is_leaf = self.leaves.get(&i).is_some_and(|l| l.size == size);
            let child = self.child_key(i, level);
            let is_table = level < self.last_level() && self.tables.contains_key(&child);
            if !is_leaf && !is_table {
                return Err(UnmapError::NotMapped { iova: Iova::new(i) });
            }
            if is_table && refcounts && self.tables.get(&child).is_some_and(|&h| h > 0) {
                return Err(UnmapError::ReservedTable { iova: Iova::new(i) });
            }
        }
        for k in 0..count {
            let i = iova + k * size;
            let gone: Vec<u64> = self.leaves.range(i..i + size).map(|(&a, _)| a).collect();
            for a in gone {
                self.leaves.remove(&a);
            }
            if level < self.last_level() {
                self.remove_tables_under(i, level);
            }
        }
        if self.policy == ReservePolicy::Refcounts {
            self.sweep(iova, iova + (size * count - 1));
        }
        Ok(size * count)
    }

    /// Reserves `range` for leaves of `leaf`: the pages the backend must report
    /// ([`Reservation::pages`](iopt_api::Reservation::pages)), applied under the backend's id
    /// `id` when `Ok`.
    ///
    /// # Errors
    ///
    /// The error the backend must return; the model is then unchanged.
    pub fn reserve(
        &mut self,
        id: u64,
        range: IovaRange,
        leaf: PageSize,
    ) -> Result<usize, ReserveError> {
        let cfg = &self.cfg;
        let bad = ReserveError::BadLeafSize {
            range,
            size: leaf.get(),
        };
        let level = cfg.leaf_level(leaf).ok_or(bad)?;
        // Design 1 wants the range aligned to the leaf size; Design 2 only to the smallest
        // page size (its plan puts smaller leaves at unaligned ends).
        let align = match self.policy {
            ReservePolicy::Pools { .. } => leaf.get(),
            ReservePolicy::Refcounts | ReservePolicy::ReservationCounts => cfg
                .page_sizes()
                .smallest()
                .map_or(leaf.get(), PageSize::get),
        };
        if !range.start().is_aligned(align) || range.len() % align != 0 {
            return Err(bad);
        }
        if !cfg.iova_in_range(range.start()) || !cfg.iova_in_range(range.last()) {
            return Err(ReserveError::OutOfRange { range });
        }
        let (start, last) = (range.start().get(), range.last().get());
        let pages = match self.policy {
            ReservePolicy::Pools { cap } => {
                let n = usize::try_from(
                    (self.first_table_level()..=level)
                        .map(|l| (last >> self.shift_above(l)) - (start >> self.shift_above(l)) + 1)
                        .sum::<u64>(),
                )
                .unwrap_or(usize::MAX);
                if let Some(cap) = cap {
                    let (refuse, c) = match cap {
                        CapRule::MsmThrottle(c) => (self.in_flight > c, c),
                        CapRule::Strict(c) => (self.in_flight + n > c, c),
                    };
                    if refuse {
                        return Err(ReserveError::CapExceeded {
                            in_flight: self.in_flight,
                            needed: n,
                            cap: c,
                        });
                    }
                }
                self.in_flight += n;
                self.counters.reserved_outstanding += n as u64;
                n
            }
            ReservePolicy::Refcounts | ReservePolicy::ReservationCounts => {
                let pieces = self.plan(start, last, leaf);
                // A leaf larger than the plan's leaf where the plan needs a table below it.
                for &(ps, pl, psize) in &pieces {
                    if let Some(at) = self.larger_leaf_in(ps, pl, psize) {
                        return Err(ReserveError::BlockInTheWay {
                            iova: Iova::new(at),
                        });
                    }
                }
                let keys = self.plan_keys(&pieces);
                let mut n = 0;
                for k in keys {
                    let h = self.tables.entry(k).or_insert_with(|| {
                        n += 1;
                        0
                    });
                    *h += 1;
                }
                n
            }
        };
        self.counters.pages_reserved += pages as u64;
        self.res.insert(
            id,
            ModelRes {
                start,
                last,
                range,
                leaf_level: level,
                reserved: pages,
                left: pages,
            },
        );
        Ok(pages)
    }

    /// Releases the reservation with backend id `id`.
    ///
    /// # Errors
    ///
    /// [`ReserveError::UnknownReservation`] when it is not live.
    pub fn release(&mut self, id: u64) -> Result<(), ReserveError> {
        let r = self
            .res
            .remove(&id)
            .ok_or(ReserveError::UnknownReservation { id })?;
        match self.policy {
            ReservePolicy::Pools { .. } => {
                self.in_flight -= r.reserved;
                self.counters.reserved_unused += r.left as u64;
                self.counters.reserved_outstanding -= r.left as u64;
            }
            ReservePolicy::Refcounts | ReservePolicy::ReservationCounts => {
                // Release unmaps what is left in the range first.
                let gone: Vec<u64> = self
                    .leaves
                    .range(..=r.last)
                    .rev()
                    .take_while(|&(&i, l)| i + l.size > r.start || i >= r.start)
                    .filter(|&(&i, l)| i + l.size > r.start)
                    .map(|(&i, _)| i)
                    .collect();
                for i in gone {
                    self.leaves.remove(&i);
                }
                let leaf = PageSize::from_shift(self.cfg.level_shift(r.leaf_level))
                    .unwrap_or(PageSize::SZ_4K);
                let pieces = self.plan(r.start, r.last, leaf);
                for k in self.plan_keys(&pieces) {
                    if let Some(h) = self.tables.get_mut(&k) {
                        *h = h.saturating_sub(1);
                    }
                }
                self.sweep(r.start, r.last);
            }
        }
        Ok(())
    }

    /// Design 2's plan for a reservation: the pieces `(start, last, leaf size)` a map of the
    /// range with IOVA-congruent backing and leaves up to `max_leaf` would use.
    fn plan(&self, start: u64, last: u64, max_leaf: PageSize) -> Vec<(u64, u64, u64)> {
        let bits = self.cfg.page_sizes().bits() & ((max_leaf.get() << 1) - 1);
        let sizes = iopt_api::PageSizes::from_bits(bits);
        let mut out = Vec::new();
        let mut at = start;
        let len = last - start + 1;
        while at <= last && at - start < len {
            let Some((size, count)) = sizes.best_fit(at, at, last - at + 1) else {
                break;
            };
            let n = size.get() * count;
            out.push((at, at + (n - 1), size.get()));
            match at.checked_add(n) {
                Some(next) => at = next,
                None => break,
            }
        }
        out
    }

    fn plan_keys(&self, pieces: &[(u64, u64, u64)]) -> Vec<(u32, u64)> {
        let mut keys: Vec<(u32, u64)> = Vec::new();
        for &(ps, pl, psize) in pieces {
            let level = PageSize::new(psize)
                .and_then(|s| self.cfg.leaf_level(s))
                .unwrap_or(self.last_level());
            keys.extend(self.covering(ps, pl, level));
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The first IOVA in `[start, last]` covered by a leaf larger than `size`.
    fn larger_leaf_in(&self, start: u64, last: u64, size: u64) -> Option<u64> {
        if let Some((&i, l)) = self.leaves.range(..start).next_back() {
            if i + l.size > start && l.size > size {
                return Some(start);
            }
        }
        self.leaves
            .range(start..=last)
            .find(|(_, l)| l.size > size)
            .map(|(&i, _)| i)
    }

    /// Design 2's freeing: every table covering `[start, last]` that no reservation holds and
    /// that holds nothing goes, deepest first (so emptied ancestors go too).
    fn sweep(&mut self, start: u64, last: u64) {
        let keys = self.covering(start, last, self.last_level());
        for k in keys.into_iter().rev() {
            if self.tables.get(&k) == Some(&0) && self.table_is_empty(k) {
                self.tables.remove(&k);
            }
        }
    }

    fn table_is_empty(&self, (level, idx): (u32, u64)) -> bool {
        let sh = self.shift_above(level);
        let start = idx << sh;
        let last = start + ((1u64 << sh) - 1);
        if self.leaves.range(start..=last).next().is_some() {
            return false;
        }
        level >= self.last_level() || self.tables_in(level + 1, start, last).next().is_none()
    }

    /// Returns whether the reservation with backend id `id` is live.
    #[must_use]
    pub fn is_live(&self, id: u64) -> bool {
        self.res.contains_key(&id)
    }
}

/// `iopt_alloc_ops::CountPolicy::WorstCase` recomputed
/// independently: the tables a map of `[va, va + size)` with leaves at the smallest page size
/// needs in a tree holding only the root (panthor's `N(512G) + N(1G) + N(2M)` on a 48-bit,
/// 4 KiB-granule table).
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, PageSizes};
/// use iopt_model::worst_case;
/// // panthor's table: 48-bit stage 1, 4 KiB and 2 MiB pages.
/// let sizes = PageSizes::from_bits((1 << 12) | (1 << 21));
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, sizes, 48, 48)).unwrap();
/// assert_eq!(worst_case(&cfg, 1 << 30, 1 << 30), 514);
/// assert_eq!(worst_case(&cfg, (2 << 20) - 4096, 8192), 4);
/// ```
#[must_use]
pub fn worst_case(cfg: &Config, va: u64, size: u64) -> u64 {
    let last = va + (size - 1);
    let leaf = cfg
        .page_sizes()
        .smallest()
        .and_then(|s| cfg.leaf_level(s))
        .unwrap_or(3);
    ((cfg.start_level() + 1)..=leaf)
        .map(|l| {
            let sh = cfg.level_shift(l - 1);
            (last >> sh) - (va >> sh) + 1
        })
        .sum()
}
