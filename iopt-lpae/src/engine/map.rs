//! Map: one path for every accounting.
//!
//! A map first validates everything it can without touching memory ([`super::check`]). A run
//! inside one leaf table (every single-page map) then goes straight to its segment:
//!
//! 1. **Cursor hit**: the cached leaf table holds the run and every target entry is empty;
//!    pin it for the new leaves (nothing to do without counts) and write them.
//! 2. **Walk**: descend from the root. Where a table is missing, take every page the rest of
//!    the path needs, link them into a private chain, write the leaves into its last table,
//!    and publish the whole chain with **one** compare-exchange on the first empty entry.
//!    Nothing is visible before that instant, so an allocation failure leaves nothing behind;
//!    a thread that loses the race zeroes its pages, gives them back to the source it took
//!    them from, and descends again into the winner's table.
//! 3. **Leaf table present**: check every target entry (a leaf refuses the map; an empty
//!    table is claimed and replaced by the block, its subtree freed after the walk flush),
//!    pin, write.
//!
//! A run over several leaf tables first plans all of it read-only (conflicts, and exactly how
//! many pages are missing), takes that many pages in one go, and then maps segment by
//! segment; should a segment still fail (only a concurrent caller can make it), the leaves
//! the call wrote are taken back and what that empties is freed.
//!
//! Entries are read with acquire loads and tables published with release exchanges, so a
//! concurrent walker sees a fully initialised table or none. What differs by accounting
//! (pins, claims, whether a leaf is written with a store or an exchange) is a primitive of
//! [`Accounting`].

use super::{
    Engine, Frame, PageSource, Path, Plan, Run, Stash, TopUp, all_zero, check_page, write_leaves,
};
use crate::account::Accounting;
use crate::desc::{self, Kind};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use iopt_api::{
    FlushOps, Iova, IovaRange, MapError, PageSize, PhysAddr, Prot, TableAlloc, TableRef,
};

/// Where a map's descent ended.
enum Descent {
    /// A missing table was installed with the segment's leaves in it: done.
    Mapped,
    /// Lost a race or met a dying table: walk again from the root.
    Retry,
    /// The path reaches the segment's leaf table.
    Leaf,
}

/// Empty tables a block map replaces: (index in the segment, the table descriptor linking
/// it), each claimed for freeing.
type Claims = Vec<(usize, u64)>;

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Maps `count` leaves of `size` from `iova` to `pa` with `prot`, all or nothing, drawing
    /// missing tables from `src`: [`validate_map`](Self::validate_map) and
    /// [`map_run`](Self::map_run) in one step, so a valid request pays for its checks once.
    ///
    /// # Errors
    ///
    /// As [`validate_map`](Self::validate_map) and [`map_runs`](Self::map_runs).
    #[inline]
    pub fn map<S: PageSource>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        self.map_checking::<true, S>(iova, pa, size, count, prot, src)
    }

    /// [`map`](Self::map) of a run the caller has already proved to lie inside a range it
    /// checked against the input address size (a reservation's: both designs refuse to
    /// reserve outside it): the same result and errors, without checking the IOVA against
    /// the input address size again. The caller's proof is trusted: a debug assertion
    /// catches a run outside the input address size, and a release build maps it where its
    /// low `ias` bits point.
    ///
    /// # Errors
    ///
    /// As [`map`](Self::map).
    #[inline]
    pub fn map_within<S: PageSource>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        debug_assert!(
            self.quick_map_run::<false>(iova, pa, size, count, prot)
                .is_none()
                || self
                    .quick_map_run::<true>(iova, pa, size, count, prot)
                    .is_some(),
            "map_within: {iova} + {count} x {size} is outside the input address size"
        );
        self.map_checking::<false, S>(iova, pa, size, count, prot, src)
    }

    /// [`map`](Self::map), checking the IOVA against the input address size on the quick
    /// path only if `CHECK_IOVA` (errors still come from the full checks, in Linux's order).
    #[inline]
    fn map_checking<const CHECK_IOVA: bool, S: PageSource>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        if let Some(run) = self.quick_map_run::<CHECK_IOVA>(iova, pa, size, count, prot) {
            return self.map_run(run, prot, src);
        }
        let run = self.validate_map_slow(iova, pa, size, count, prot)?;
        self.map_many(&[run], prot, src)
    }

    /// [`map`](Self::map) for a caller that holds the engine exclusively, drawing missing
    /// tables on demand: the same result and errors, without the protocol that lets
    /// concurrent callers share an engine that frees tables (on a cursor hit, no grace period
    /// and no locked update of the leaf table's count). A driver that serialises its
    /// page-table operations under its own lock, or owns the table outright, pays only for the
    /// walk.
    ///
    /// ```
    /// use iopt_api::{Config, ConfigInput, Format, Gather, Iova, PageSize, PageSizes, PhysAddr, Prot, NoFlush};
    /// use iopt_lpae::Engine;
    /// use iopt_sim::SimMemory;
    /// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
    /// let mem = SimMemory::new();
    /// let mut e = Engine::counting(cfg, &mem, NoFlush)?;
    /// let (a, b) = (Iova::new(0x4000_0000), Iova::new(0x4000_1000));
    /// e.map_mut(a, PhysAddr::new(0x1000), PageSize::SZ_4K, 1, Prot::READ)?;
    /// e.map_mut(b, PhysAddr::new(0x2000), PageSize::SZ_4K, 1, Prot::READ)?; // the cursor's table
    /// assert_eq!(e.lookup_mut(b).map(|t| t.pa), Some(PhysAddr::new(0x2000)));
    /// let mut gather = Gather::new();
    /// e.unmap_mut(b, PageSize::SZ_4K, 1, &mut gather)?; // the table keeps `a`
    /// e.unmap_mut(a, PageSize::SZ_4K, 1, &mut gather)?; // empties it: freed as by `unmap`
    /// assert_eq!(mem.stats().live_pages, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`map`](Self::map).
    #[inline]
    pub fn map_mut(
        &mut self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let this: &Self = self;
        if let Some(run) = this.quick_map_run::<true>(iova, pa, size, count, prot) {
            if this.map_one_exclusive(&run, prot) {
                return Ok(());
            }
            return this.map_run(run, prot, &mut this.on_demand());
        }
        this.map(iova, pa, size, count, prot, &mut this.on_demand())
    }

    /// A map inside the cursor's leaf table for a caller holding the engine exclusively (the
    /// `&mut self` entry points): no other operation can run, so there is no grace period to
    /// enter and no concurrent claim to refuse, and the pin is a plain load and store of the
    /// count. `false` (nothing done) unless the cursor holds the leaf table, every target
    /// entry is empty and the run stays inside it; the shared path then decides, with the
    /// same result.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn map_one_exclusive(&self, r: &Run, prot: Prot) -> bool {
        if r.count != 1 && self.entries_in_table(r.level, r.iova, r.count) != r.count {
            return false;
        }
        let Some(t) = self.cursor_get(r.level, r.iova) else {
            return false;
        };
        let first = self.index(r.iova, r.level);
        let Some(slots) = t.entries.get(first..first + r.count as usize) else {
            return false;
        };
        // Relaxed: exclusive access, nothing to synchronise with.
        if !all_zero(slots, Ordering::Relaxed) || !K::pin_exclusive(t.meta, r.count as u32) {
            return false;
        }
        // Release: the walker (hardware) and later shared lookups acquire the entry.
        write_leaves(
            slots,
            self.leaf_bits(prot) | self.leaf_type(r.level),
            r.pa,
            self.leaf_size(r.level),
            Ordering::Release,
        );
        self.sync_entries(t, first, r.count as usize);
        true
    }

    /// Counts into `plan` the tables at levels `level+1 ..= target` needed to cover
    /// `[start, end)` below an empty entry at `level`, skipping a table already counted for an
    /// earlier run.
    fn missing_below(&self, plan: &mut Plan, level: u32, target: u32, start: u64, end: u64) {
        for m in (level + 1)..=target {
            let shift = self.cfg.level_shift(m - 1);
            let lo = start >> shift;
            let hi = (end - 1) >> shift;
            let last = &mut plan.last[m as usize];
            let shared = u64::from(*last == Some(lo));
            plan.missing += usize::try_from(hi - lo + 1 - shared).unwrap_or(usize::MAX);
            *last = Some(hi);
        }
    }

    /// Whether the subtree of `table` at `level` holds any leaf.
    pub(crate) fn subtree_has_leaf(&self, table: TableRef<'_>, level: u32) -> bool {
        table.entries.iter().any(|e| {
            let e = e.load(Ordering::Acquire);
            match self.kind(level, e) {
                Kind::Invalid => false,
                Kind::Leaf => true,
                Kind::Table => self
                    .resolve(e)
                    .is_none_or(|t| self.subtree_has_leaf(t, level + 1)),
            }
        })
    }

    /// Read-only pass over `[start, end)` (local IOVAs) of `table` at `level`: conflicts, and
    /// the tables a map of leaves at `target` would add, counted into `plan`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan(
        &self,
        plan: &mut Plan,
        table: TableRef<'_>,
        level: u32,
        target: u32,
        start: u64,
        end: u64,
        strict: bool,
    ) -> Result<(), MapError> {
        let shift = self.cfg.level_shift(level);
        if level == target {
            // The leaf table of a segment: a run of zero entries (the common case of a map
            // into present tables) needs nothing and conflicts with nothing.
            let first = self.index(start, level);
            let last = self.index(end - 1, level);
            if table
                .entries
                .get(first..=last)
                .is_some_and(|s| all_zero(s, Ordering::Acquire))
            {
                return Ok(());
            }
        }
        let mut at = start;
        while at < end {
            let next = ((at >> shift) + 1)
                .checked_shl(shift)
                .unwrap_or(u64::MAX)
                .min(end);
            let idx = self.index(at, level);
            let e = table
                .entries
                .get(idx)
                .map_or(0, |e| e.load(Ordering::Acquire));
            match (self.kind(level, e), level == target) {
                (Kind::Invalid, true) => {}
                (Kind::Invalid, false) => self.missing_below(plan, level, target, at, next),
                (Kind::Leaf, _) => {
                    if strict {
                        return Err(MapError::AlreadyMapped {
                            iova: self.external(at),
                        });
                    }
                }
                (Kind::Table, leaf_level) => {
                    let sub = self.resolve(e).ok_or(MapError::BrokenTable {
                        iova: self.external(at),
                        pa: self.unpack(e),
                    })?;
                    if !leaf_level {
                        self.plan(plan, sub, level + 1, target, at, next, strict)?;
                    } else if strict && self.subtree_has_leaf(sub, level + 1) {
                        return Err(MapError::AlreadyMapped {
                            iova: self.external(at),
                        });
                    }
                }
            }
            at = next;
        }
        Ok(())
    }

    /// Returns exactly how many table pages a map of `range` with `leaf`-sized leaves would
    /// allocate now (leaves already in the way are skipped, not counted).
    ///
    /// # Errors
    ///
    /// [`MapError::InvalidPageSize`] or [`MapError::Misaligned`] for a bad leaf size,
    /// [`MapError::IovaOutOfRange`] for a range outside the table.
    pub fn pages_needed(&self, range: IovaRange, leaf: PageSize) -> Result<usize, MapError> {
        let _guard = self.enter();
        let level = self
            .cfg
            .leaf_level(leaf)
            .ok_or(MapError::InvalidPageSize { size: leaf.get() })?;
        if !range.start().is_aligned(leaf.get()) || range.len() % leaf.get() != 0 {
            return Err(MapError::Misaligned {
                iova: range.start(),
                pa: PhysAddr::ZERO,
                size: leaf,
            });
        }
        if !self.cfg.iova_in_range(range.start()) {
            return Err(MapError::IovaOutOfRange {
                iova: range.start(),
            });
        }
        if !self.cfg.iova_in_range(range.last()) {
            return Err(MapError::IovaOutOfRange { iova: range.last() });
        }
        let root = self.root_table().ok_or(MapError::BrokenTable {
            iova: range.start(),
            pa: self.root,
        })?;
        let start = range.start().get() & self.local_mask;
        let end = (range.last().get() & self.local_mask) + 1;
        let mut plan = Plan::default();
        self.plan(
            &mut plan,
            root,
            self.cfg.start_level(),
            level,
            start,
            end,
            false,
        )?;
        Ok(plan.missing)
    }

    /// Maps validated runs with `prot`, all or nothing, drawing missing tables from `src`.
    ///
    /// Runs must be disjoint and in ascending IOVA order (as [`split_range`](crate::split_range)
    /// makes them); then exactly the missing tables are obtained, in one call to the source.
    ///
    /// # Errors
    ///
    /// [`MapError::AlreadyMapped`] on a conflict, the source's error when it cannot supply the
    /// pages, [`MapError::BrokenTable`] on a corrupted tree. Nothing changed.
    pub fn map_runs<S: PageSource>(
        &self,
        runs: &[Run],
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        if let [r] = runs {
            return self.map_run(*r, prot, src);
        }
        self.map_many(runs, prot, src)
    }

    /// [`map_runs`](Self::map_runs) of one run: a run inside one leaf table (every
    /// single-page map) goes straight to its segment.
    ///
    /// # Errors
    ///
    /// As [`map_runs`](Self::map_runs).
    // Measured (callgrind): with plain `#[inline]` a map through a reservation's page source
    // called it out of line, 20 instructions more per single-page map than through
    // `OnDemand`.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn map_run<S: PageSource>(&self, r: Run, prot: Prot, src: &mut S) -> Result<(), MapError> {
        if r.count != 1 && self.entries_in_table(r.level, r.iova, r.count) != r.count {
            return self.map_many(&[r], prot, src);
        }
        let guard = self.enter_for::<S>(r.iova);
        let bits = self.leaf_bits(prot);
        // The cursor's table first; only the walk keeps a list of tables to free.
        let result = match self.map_at_cursor::<S>(r.iova, r.pa, r.level, r.count, bits) {
            Some(done) => done,
            None => self.map_segment_alone(r.iova, r.pa, r.level, r.count, bits, src),
        };
        drop(guard);
        result
    }

    /// [`map_segment_walk`](Self::map_segment_walk) for a call of one segment: it keeps the
    /// tables a failure frees, and retires them.
    #[inline(never)]
    fn map_segment_alone<S: PageSource>(
        &self,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
        src: &mut S,
    ) -> Result<(), MapError> {
        let mut dead = Vec::new();
        let result = self.map_segment_walk(iova, pa, target, n, bits, src, &mut dead);
        self.retire(&dead);
        result
    }

    /// Runs over several leaf tables: plan (conflicts, exact missing count), obtain once, map
    /// segment by segment; on a failure, take back what the call wrote.
    #[inline(never)]
    fn map_many<S: PageSource>(
        &self,
        runs: &[Run],
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        let guard = self.enter_for::<S>(runs.first().map_or(0, |r| r.iova));
        let bits = self.leaf_bits(prot);
        let mut dead = Vec::new();
        let result = self.map_many_in(runs, bits, src, &mut dead);
        self.retire(&dead);
        drop(guard);
        result
    }

    fn map_many_in<S: PageSource>(
        &self,
        runs: &[Run],
        bits: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        let root = self.root_frame().ok_or(MapError::BrokenTable {
            iova: Iova::ZERO,
            pa: self.root(),
        })?;
        // Plan everything first: conflicts anywhere refuse the whole map before any write.
        let mut plan = Plan::default();
        for r in runs {
            let end = r.iova + r.count * r.size.get();
            self.plan(&mut plan, root.t, root.level, r.level, r.iova, end, true)?;
        }
        // Exactly the distinct missing tables (runs come in ascending order); anything a
        // concurrent installer saves us goes back to the source, and the source tops up what
        // concurrent frees cost us.
        let mut top = TopUp {
            stash: Stash::default(),
            src,
        };
        top.src.obtain(plan.missing, &mut top.stash.pages)?;
        let mut failure = None;
        'runs: for (i, r) in runs.iter().enumerate() {
            let (mut iova, mut pa, mut left) = (r.iova, r.pa, r.count);
            while left > 0 {
                let n = self.entries_in_table(r.level, iova, left);
                if let Err(e) = self.map_segment(iova, pa, r.level, n, bits, &mut top, dead) {
                    failure = Some((e, i, iova));
                    break 'runs;
                }
                let bytes = n * r.size.get();
                iova += bytes;
                pa += bytes;
                left -= n;
            }
        }
        if let Some((e, i, at)) = failure {
            // Only a concurrent caller (overlapping, or freeing tables the plan counted when
            // the source cannot top up) gets here: take back what this call wrote.
            for r in &runs[..=i] {
                self.take_back_run(r, at, bits, dead);
            }
            // `top` gives the unused pages back as it drops.
            return Err(e);
        }
        // `top` gives the unused pages back as it drops.
        Ok(())
    }

    /// Takes back the leaves of run `r` below local IOVA `until` that are still the ones this
    /// map wrote, giving their count units back (which frees what that empties).
    fn take_back_run(&self, r: &Run, until: u64, bits: u64, dead: &mut Vec<PhysAddr>) {
        let size = r.size.get();
        let attrs = bits | self.leaf_type(r.level);
        let (mut iova, mut pa, mut left) = (r.iova, r.pa, r.count);
        while left > 0 && iova < until {
            let n = self
                .entries_in_table(r.level, iova, left)
                .min((until - iova) / size);
            if let Some(path) = self.path_from_root(iova, r.level) {
                let t = path.last().t;
                let first = self.index(iova, r.level);
                let mut units = 0u32;
                for (k, e) in t.entries[first..first + n as usize].iter().enumerate() {
                    let mine = attrs | desc::pack_pa(PhysAddr::new(pa + k as u64 * size));
                    units += u32::from(Self::take_back(e, mine));
                }
                if !self.drop_live(path.frames(), path.top(), units, iova, dead) {
                    self.sync_entries(t, first, n as usize);
                }
            }
            iova += n * size;
            pa += n * size;
            left -= n;
        }
    }

    /// Removes the leaf `mine` this call wrote into `e`, unless an overlapping caller
    /// changed it since.
    #[inline]
    fn take_back(e: &iopt_api::atomic::AtomicU64, mine: u64) -> bool {
        e.load(K::LOAD) == mine && K::remove(e, mine)
    }

    /// The path from the root to the table at `level` holding `iova`, if every table on the
    /// way exists.
    pub(crate) fn path_from_root(&self, iova: u64, level: u32) -> Option<Path<'_>> {
        let mut path = Path::new(self.root_frame()?);
        let mut l = self.config().start_level();
        while l < level {
            let e = path
                .last()
                .t
                .entries
                .get(self.index(iova, l))?
                .load(K::LOAD);
            if self.kind(l, e) != Kind::Table {
                return None;
            }
            let t = self.resolve(e)?;
            l += 1;
            path.push(Frame { t, level: l });
        }
        Some(path)
    }

    /// Maps `n` leaves inside one leaf table, all or nothing.
    #[allow(clippy::inline_always, clippy::too_many_arguments)]
    #[inline(always)]
    fn map_segment<S: PageSource>(
        &self,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        if let Some(done) = self.map_at_cursor::<S>(iova, pa, target, n, bits) {
            return done;
        }
        self.map_segment_walk(iova, pa, target, n, bits, src, dead)
    }

    /// Maps the segment into the cursor's leaf table if the cursor holds it and every target
    /// entry is empty; `None` (nothing done) otherwise, for the walk to decide.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn map_at_cursor<S: PageSource>(
        &self,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
    ) -> Option<Result<(), MapError>> {
        let (t, first) = self.cursor_pinned(iova, target, n, S::PATH_HELD)?;
        let leaf = [Frame { t, level: target }];
        if n == 1 {
            // One leaf (every single-page map): one write, no slice or loop set-up.
            let d = bits | self.leaf_type(target) | desc::pack_pa(PhysAddr::new(pa));
            if K::put_leaf(&t.entries[first], d) {
                K::settle(t.meta, 1, S::PATH_HELD);
                self.sync_entries(t, first, 1);
                return Some(Ok(()));
            }
            return Some(self.lost_leaf::<S>(&leaf, iova));
        }
        let mut dead = Vec::new();
        let result = self.write_pinned(&leaf, iova, n, pa, bits, S::PATH_HELD, &mut dead);
        self.retire(&dead);
        Some(result)
    }

    /// An overlapping caller took the one entry a cursor map had pinned: give the pin back
    /// (freeing what that empties) and refuse.
    #[cold]
    #[inline(never)]
    fn lost_leaf<S: PageSource>(&self, leaf: &[Frame<'_>], iova: u64) -> Result<(), MapError> {
        let mut dead = Vec::new();
        self.drop_pins(leaf, 0, 1, S::PATH_HELD, iova, &mut dead);
        self.retire(&dead);
        Err(MapError::AlreadyMapped {
            iova: self.external(iova),
        })
    }

    /// The leaf table the cursor holds for `n` leaves at `iova`, pinned for them, and the
    /// index of the first, if every target entry is empty (else the walk decides).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn cursor_pinned(
        &self,
        iova: u64,
        target: u32,
        n: u64,
        held: bool,
    ) -> Option<(TableRef<'_>, usize)> {
        let t = self.cursor_get(target, iova)?;
        let first = self.index(iova, target);
        let empty = if n == 1 {
            // One leaf (every single-page map): no loop set-up.
            t.entries.get(first)?.load(K::LOAD) == 0
        } else {
            all_zero(
                t.entries.get(first..first + usize::try_from(n).ok()?)?,
                K::LOAD,
            )
        };
        (empty && K::pin(t.meta, u32::try_from(n).ok()?, held)).then_some((t, first))
    }

    /// Writes `n` leaves from `iova` (mapping `pa` on) into the last table of `path`, whose
    /// target entries were empty and are pinned for them. On a conflict (an overlapping map
    /// got there first) the leaves written are taken back and the error names the entry.
    #[allow(clippy::inline_always, clippy::too_many_arguments)]
    #[inline(always)]
    fn write_pinned(
        &self,
        path: &[Frame<'_>],
        iova: u64,
        n: u64,
        pa: u64,
        bits: u64,
        held: bool,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        let top = path.len() - 1;
        let Frame { t, level } = path[top];
        let first = self.index(iova, level);
        let slots = &t.entries[first..first + n as usize];
        let size = self.leaf_size(level);
        match K::put_leaves(slots, bits | self.leaf_type(level), pa, size) {
            Ok(()) => {
                K::settle(t.meta, n as u32, held);
                self.sync_entries(t, first, n as usize);
                Ok(())
            }
            Err((k, units)) => {
                self.sync_entries(t, first, k as usize);
                self.drop_pins(path, top, units, held, iova, dead);
                Err(MapError::AlreadyMapped {
                    iova: self.external(iova + k * size),
                })
            }
        }
    }

    /// A segment the cursor did not serve: walk from the root, install what is missing or
    /// prepare the leaf table, and write.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn map_segment_walk<S: PageSource>(
        &self,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        let root = self.root_frame().ok_or(MapError::BrokenTable {
            iova: self.external(iova),
            pa: self.root(),
        })?;
        loop {
            let epoch = self.unlink_epoch();
            // The root is never freed: a walk that must start again reuses its frame.
            let mut path = Path::new(root);
            match self.descend_for_map(&mut path, iova, pa, target, n, bits, src, dead, epoch)? {
                Descent::Mapped => return Ok(()),
                Descent::Retry => {
                    crate::atomic::spin_wait();
                    continue;
                }
                Descent::Leaf => {}
            }
            let Some(claims) = self.prepare_leaf(&path, iova, target, n, S::PATH_HELD, dead)?
            else {
                crate::atomic::spin_wait();
                continue;
            };
            self.cursor_set(target, iova, path.last().pa(), epoch);
            if claims.is_empty() {
                return self.write_pinned(path.frames(), iova, n, pa, bits, S::PATH_HELD, dead);
            }
            return self.replace_tables(&path, iova, n, pa, bits, &claims, S::PATH_HELD, dead);
        }
    }

    /// Descends from the root (`path` holds it) towards the leaf table at `target`; where an
    /// entry is empty, publishes the rest of the path with the leaves written.
    #[allow(clippy::too_many_arguments)]
    fn descend_for_map<'a, S: PageSource>(
        &'a self,
        path: &mut Path<'a>,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
        epoch: u64,
    ) -> Result<Descent, MapError> {
        let mut level = path.last().level;
        while level < target {
            let cur = *path.last();
            let idx = self.index(iova, level);
            let slot = cur.t.entries.get(idx).ok_or(MapError::BrokenTable {
                iova: self.external(iova),
                pa: cur.pa(),
            })?;
            let e = slot.load(K::LOAD);
            match self.kind(level, e) {
                Kind::Table => {
                    self.sync_seen(cur.t, idx, e);
                    let t = self.resolve(e).ok_or(MapError::BrokenTable {
                        iova: self.external(iova),
                        pa: self.unpack(e),
                    })?;
                    level += 1;
                    path.push(Frame { t, level });
                }
                Kind::Leaf => {
                    return Err(MapError::AlreadyMapped {
                        iova: self.external(iova),
                    });
                }
                Kind::Invalid => {
                    let published =
                        self.publish_chain(path, idx, iova, pa, target, n, bits, src, dead, epoch)?;
                    return Ok(if published {
                        Descent::Mapped
                    } else {
                        Descent::Retry
                    });
                }
            }
        }
        Ok(Descent::Leaf)
    }

    /// Builds the path below the empty entry `idx` of `path`'s last table privately: tables
    /// for the levels down to `target`, linked and counted, with the `n` leaves written into
    /// the last one; then publishes it with one compare-exchange. Returns `false` when another
    /// thread installed a table there first, or the parent is being freed: the pages are then
    /// zeroed and given back, and the caller walks again.
    #[allow(clippy::too_many_arguments)]
    fn publish_chain<S: PageSource>(
        &self,
        path: &Path<'_>,
        idx: usize,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
        epoch: u64,
    ) -> Result<bool, MapError> {
        let cfg = self.config();
        let parent = *path.last();
        let level = parent.level;
        let need = (target - level) as usize;
        // Pin the parent first: a parent being freed sends the caller back to the root
        // without taking pages it would only give back.
        if !K::pin(parent.t.meta, 1, S::PATH_HELD) {
            return Ok(false);
        }
        // Gives the chain's pages back unless they are published: on the lost race below,
        // and on a panic unwinding out of the allocator (`table`, `clean`) before that.
        let mut fresh = super::Fresh::new(src);
        let tables = match self.obtain_chain(need, &mut fresh) {
            Ok(tables) => tables,
            Err(e) => {
                drop(fresh);
                self.drop_pins(path.frames(), path.top(), 1, S::PATH_HELD, iova, dead);
                return Err(e);
            }
        };
        let held = fresh.pages;
        let pages = &held[..need];
        let chain = &tables[..need];
        for i in 0..need - 1 {
            let at = cfg.index(iova, level + 1 + i as u32);
            // Relaxed, as everything written into the private chain: the exchange that
            // publishes it releases it all.
            chain[i].entries[at].store(self.private_link(pages[i + 1]), Ordering::Relaxed);
            K::set_count(chain[i].meta, 1);
        }
        K::set_count(chain[need - 1].meta, n as u32);
        Self::hold_private::<S>(chain);
        let first = cfg.index(iova, target);
        let leaves = &chain[need - 1].entries[first..first + n as usize];
        let attrs = bits | self.leaf_type(target);
        write_leaves(leaves, attrs, pa, self.leaf_size(target), Ordering::Relaxed);
        for &t in chain {
            self.sync_table(t);
        }
        let new = desc::encode_table(cfg, pages[0]);
        // RMW ordering (release at least): publishes the chain to walkers that acquire the
        // entry; SeqCst on a counting engine, ordered with the pin just made.
        if parent.t.entries[idx]
            .compare_exchange(0, new, K::RMW, K::LOAD)
            .is_ok()
        {
            K::settle(parent.t.meta, 1, S::PATH_HELD);
            self.sync_installed(parent.t, idx, new);
            self.counters().add_live(need as u64);
            self.cursor_set(target, iova, pages[need - 1], epoch);
            fresh.keep();
            self.held_published(&mut *fresh.src, pages, iova, target);
            return Ok(true);
        }
        self.counters()
            .install_races_lost
            .fetch_add(1, Ordering::Relaxed);
        self.drop_pins(path.frames(), path.top(), 1, S::PATH_HELD, iova, dead);
        for (i, t) in chain.iter().enumerate() {
            if i + 1 < need {
                t.entries[cfg.index(iova, level + 1 + i as u32)].store(0, Ordering::Relaxed);
            }
            t.meta.clear();
        }
        for e in leaves {
            e.store(0, Ordering::Relaxed);
        }
        // The guard gives the pages back.
        drop(fresh);
        Ok(false)
    }

    /// Obtains the `need` (1 to 3) pages of a new chain of tables from `fresh`'s source into
    /// `fresh` and resolves them, in arrays (no vectors for the common single page). A page
    /// the table cannot use ([`check_page`]) is an error; `fresh` then gives them all back.
    pub(crate) fn obtain_chain<S: PageSource>(
        &self,
        need: usize,
        fresh: &mut super::Fresh<'_, S>,
    ) -> Result<[TableRef<'_>; 4], MapError> {
        if need == 1 {
            fresh.pages[0] = fresh.src.obtain_one()?;
        } else {
            let mut got = Vec::with_capacity(need);
            fresh.src.obtain(need, &mut got)?;
            fresh.pages[..need].copy_from_slice(&got);
        }
        fresh.n = need;
        let pages = &fresh.pages[..need];
        let resolve = |p: PhysAddr| {
            check_page(&self.cfg, &self.alloc, p, self.fast.granule_size)
                .map_err(|source| MapError::Alloc { source })
        };
        // On an error the caller's guard gives the pages back.
        let mut tables = [resolve(pages[0])?; 4];
        for (slot, &p) in tables.iter_mut().zip(pages).skip(1) {
            *slot = resolve(p)?;
        }
        Ok(tables)
    }

    /// The leaf-table half of a walk: checks the segment's entries, pins the table for the
    /// new leaves and claims the empty tables they replace. `Ok(None)`: the table is dying,
    /// walk again.
    fn prepare_leaf(
        &self,
        path: &Path<'_>,
        iova: u64,
        target: u32,
        n: u64,
        held: bool,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<Option<Claims>, MapError> {
        let size = self.leaf_size(target);
        let cur = path.last();
        let first = self.index(iova, target);
        let slots = cur
            .t
            .entries
            .get(first..first + n as usize)
            .ok_or(MapError::BrokenTable {
                iova: self.external(iova),
                pa: cur.pa(),
            })?;
        let mut free = 0u32;
        let mut claims = Claims::new();
        // The common case: every target entry is empty.
        let scan = if all_zero(slots, K::LOAD) {
            free = n as u32;
            &[]
        } else {
            slots
        };
        for (k, e) in scan.iter().enumerate() {
            let v = e.load(K::LOAD);
            let at = self.external(iova + k as u64 * size);
            match self.kind(target, v) {
                Kind::Invalid => free += 1,
                Kind::Leaf => return Err(MapError::AlreadyMapped { iova: at }),
                Kind::Table => {
                    let sub = self.resolve(v).ok_or(MapError::BrokenTable {
                        iova: at,
                        pa: self.unpack(v),
                    })?;
                    if self.subtree_has_leaf(sub, target + 1) {
                        return Err(MapError::AlreadyMapped { iova: at });
                    }
                    if sub.meta.reservations.load(K::LOAD) != 0 {
                        return Err(MapError::ReservedTable { iova: at });
                    }
                    claims.push((k, v));
                }
            }
        }
        if !K::pin(cur.t.meta, free, held) {
            return Ok(None);
        }
        for (j, &(k, link)) in claims.iter().enumerate() {
            if !self.resolve(link).is_some_and(|t| K::try_claim(t, 0)) {
                for &(_, done) in &claims[..j] {
                    if let Some(t) = self.resolve(done) {
                        K::unclaim(t.meta, 0);
                    }
                }
                self.drop_pins(path.frames(), path.top(), free, held, iova, dead);
                return Err(MapError::AlreadyMapped {
                    iova: self.external(iova + k as u64 * size),
                });
            }
        }
        Ok(Some(claims))
    }

    /// Writes a segment whose entries include empty tables to replace (claimed in
    /// `claims`): each replaced table's count unit becomes its leaf's, and its subtree is
    /// freed after the walk flush. Fails only when an overlapping operation changed one of
    /// the entries since they were checked (a caller bug); the segment is then undone.
    #[allow(clippy::too_many_arguments)]
    fn replace_tables(
        &self,
        path: &Path<'_>,
        iova: u64,
        n: u64,
        pa: u64,
        bits: u64,
        claims: &Claims,
        held: bool,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        let Frame { t, level } = *path.last();
        let size = self.leaf_size(level);
        let leaf_type = self.leaf_type(level);
        let first = self.index(iova, level);
        let slots = &t.entries[first..first + n as usize];
        let d = |k: usize| bits | leaf_type | desc::pack_pa(PhysAddr::new(pa + k as u64 * size));
        let claim = |k: usize| claims.iter().find(|c| c.0 == k);
        for (k, e) in slots.iter().enumerate() {
            let expected = claim(k).map_or(0, |c| c.1);
            if K::replace(e, expected, d(k)) {
                continue;
            }
            // Take back what this call wrote, give back the pins of what it did not, and
            // unlink the tables it claimed and did not yet replace.
            let mut units = 0u32;
            for (j, e) in slots.iter().enumerate() {
                match (j < k, claim(j)) {
                    (true, c) => {
                        units += u32::from(Self::take_back(e, d(j)));
                        if let Some(&(_, link)) = c {
                            // Replaced by this call's leaf before the conflict.
                            self.replaced_table(t, first + j, iova + j as u64 * size, size);
                            self.collect_claimed(link, level + 1, dead);
                        }
                    }
                    (false, None) => units += 1,
                    (false, Some(&(_, link))) => {
                        if K::remove(e, link) {
                            self.replaced_table(t, first + j, iova + j as u64 * size, size);
                            units += 1;
                        }
                        // Unlinked here or by the overlapping unmap that got there first
                        // (which leaves a claimed table to its claimer): retired once, here.
                        self.collect_claimed(link, level + 1, dead);
                    }
                }
            }
            // Only where entries are exchanged (counted engines) can a replacement fail, and
            // there the units are pins and counted entries alike.
            self.sync_entries(t, first, n as usize);
            self.drop_pins(path.frames(), path.top(), units, held, iova, dead);
            return Err(MapError::AlreadyMapped {
                iova: self.external(iova + k as u64 * size),
            });
        }
        // The pins of the empty entries are spent (each replaced table's unit became its
        // leaf's). One clean for the whole segment; then the walker forgets each replaced
        // table, freed after its flush.
        K::settle(t.meta, (n as usize - claims.len()) as u32, held);
        self.sync_entries(t, first, n as usize);
        for &(k, link) in claims {
            let at = iova + k as u64 * size;
            self.note_unlinked();
            self.flush_ops()
                .flush_walk(self.external(at), size, self.config().granule().size());
            self.collect_claimed(link, level + 1, dead);
        }
        Ok(())
    }

    /// After the table descriptor at `idx` of `t` (covering `size` bytes from `iova`) was
    /// replaced or removed: no cursor may lead to the old table, and the walker forgets it.
    pub(crate) fn replaced_table(&self, t: TableRef<'_>, idx: usize, iova: u64, size: u64) {
        self.note_unlinked();
        self.sync_entries(t, idx, 1);
        self.flush_ops()
            .flush_walk(self.external(iova), size, self.config().granule().size());
    }
}
