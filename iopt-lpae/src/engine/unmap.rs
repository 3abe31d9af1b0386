//! Unmap: one path for every accounting.
//!
//! An unmap is all or nothing: a **check pass** finds every entry of the run valid (and no
//! table a reservation holds) before a **clear pass** removes any. A one-leaf unmap (the
//! common case) does both in one step on the leaf's entry.
//!
//! The leaf table comes from the cursor when it holds it. On an engine that frees tables, a
//! cursor may name a table that was claimed since it was cached (emptied by other callers);
//! such a table holds nothing, so a hit through the cursor is final and a miss is checked
//! again by a walk from the root before the unmap answers [`UnmapError::NotMapped`].
//!
//! Each entry is removed with [`Accounting::remove`] (a plain store, or an exchange that
//! makes each removal count exactly once); the count units removed go back to the table, and
//! a table that empties is freed with the ancestors it empties ([`super::free`]). A table
//! descriptor removed at block size takes its subtree with it, after the walk flush.

use super::{Engine, Frame, Path, Run};
use crate::account::Accounting;
use crate::desc::{self, Kind};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use iopt_api::atomic::AtomicU64;
use iopt_api::{FlushOps, Gather, Iova, PageSize, PhysAddr, TableAlloc, TableRef, UnmapError};

/// What one attempt of a one-leaf unmap came to.
enum LeafStep {
    /// Finished, with this answer.
    Done(Result<u64, UnmapError>),
    /// The entry changed under it, or the cursor's table answered "not mapped": walk again
    /// from the root.
    Retry,
    /// The entry holds a table: the general path removes it.
    Table,
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Unmaps `count` leaves of `size` from `iova`, all or nothing:
    /// [`validate_unmap`](Self::validate_unmap) and [`unmap_run`](Self::unmap_run) in one
    /// step. Returns the bytes unmapped.
    ///
    /// # Errors
    ///
    /// As [`validate_unmap`](Self::validate_unmap) and [`unmap_run`](Self::unmap_run).
    #[inline]
    pub fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        if let Some(run) = self.quick_unmap_run(iova, size, count) {
            return self.unmap_run(run, gather);
        }
        let run = self.validate_unmap_slow(iova, size, count)?;
        self.unmap_run(run, gather)
    }

    /// [`unmap`](Self::unmap) for a caller that holds the engine exclusively: the same result
    /// and errors; a one-leaf unmap that leaves its table non-empty needs no grace period and
    /// no locked count update.
    ///
    /// # Errors
    ///
    /// As [`unmap`](Self::unmap).
    #[inline]
    pub fn unmap_mut(
        &mut self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        let this: &Self = self;
        if count == 1 {
            if let Some(run) = this.quick_unmap_run(iova, size, count) {
                if let Some(bytes) = this.unmap_one_exclusive(&run, gather) {
                    return Ok(bytes);
                }
                return this.unmap_run(run, gather);
            }
        }
        this.unmap(iova, size, count, gather)
    }

    /// A one-leaf unmap for a caller holding the engine exclusively: a plain count update, no
    /// grace period. `None` (nothing done) unless the cursor holds the leaf table, the entry
    /// is a leaf and the table keeps other entries (a table this unmap would empty is freed
    /// by the shared path).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn unmap_one_exclusive(&self, r: &Run, gather: &mut Gather) -> Option<u64> {
        let t = self.cursor_get(r.level, r.iova)?;
        let idx = self.index(r.iova, r.level);
        let e = t.entries.get(idx)?;
        // Relaxed: exclusive access.
        let old = e.load(Ordering::Relaxed);
        if self.kind(r.level, old) != Kind::Leaf || !K::unpin_exclusive_keeps(t.meta) {
            return None;
        }
        // Release: a later shared lookup acquires the entry.
        e.store(0, Ordering::Release);
        let size = r.size.get();
        self.flush_ops()
            .add_page(gather, self.external(r.iova), size);
        self.sync_entries(t, idx, 1);
        Some(size)
    }

    /// Unmaps a validated run, all or nothing, and returns the bytes unmapped.
    ///
    /// # Errors
    ///
    /// [`UnmapError::NotMapped`] if any entry of the run is empty, [`UnmapError::PartialBlock`]
    /// if a larger leaf covers it, [`UnmapError::ReservedTable`] where it would remove a table
    /// a reservation holds, [`UnmapError::BrokenTable`] on a corrupted tree.
    // Measured (callgrind): left to `#[inline]` it stays out of line, 15 instructions of call
    // overhead per single-page unmap.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn unmap_run(&self, r: Run, gather: &mut Gather) -> Result<u64, UnmapError> {
        if r.count == 1 {
            // The common case first: the cursor's table holds the leaf.
            let guard = self.enter_at(r.iova);
            let mut dead = Vec::new();
            if let Some(bytes) = self.unmap_leaf_at_cursor(r, gather, &mut dead) {
                self.retire(&dead);
                drop(guard);
                return Ok(bytes);
            }
            drop(guard);
            if let Some(done) = self.unmap_one_walk(r, gather) {
                return done;
            }
        }
        self.unmap_many(r, gather)
    }

    /// The common one-leaf unmap: the cursor holds the leaf table and the entry is a leaf
    /// this call removes. `None` (nothing done) otherwise: a miss through the cursor is no
    /// answer (the cursor's table may have been claimed since it was cached), so the walk
    /// from the root decides.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn unmap_leaf_at_cursor(
        &self,
        r: Run,
        gather: &mut Gather,
        dead: &mut Vec<PhysAddr>,
    ) -> Option<u64> {
        let t = self.cursor_get(r.level, r.iova)?;
        let idx = self.index(r.iova, r.level);
        let e = t.entries.get(idx)?;
        let old = e.load(K::LOAD);
        // Exactly once where counts are kept: only the caller whose exchange removes the
        // leaf counts it.
        if self.kind(r.level, old) != Kind::Leaf || !K::remove(e, old) {
            return None;
        }
        let size = r.size.get();
        self.flush_ops()
            .add_page(gather, self.external(r.iova), size);
        let leaf = [Frame { t, level: r.level }];
        if !self.drop_live(&leaf, 0, 1, r.iova, dead) {
            self.sync_entries(t, idx, 1);
        }
        Some(size)
    }

    /// A one-leaf unmap the cursor did not serve, by walks from the root until the entry is
    /// removed, or answers, or holds a table (`None`: nothing done, the general path removes
    /// it).
    #[inline(never)]
    fn unmap_one_walk(&self, r: Run, gather: &mut Gather) -> Option<Result<u64, UnmapError>> {
        let guard = self.enter_at(r.iova);
        let mut dead = Vec::new();
        let out = loop {
            let mut kept = None;
            match self.unmap_leaf_once(r, true, &mut kept, gather, &mut dead) {
                LeafStep::Retry => crate::atomic::spin_wait(),
                LeafStep::Done(x) => break Some(x),
                LeafStep::Table => break None,
            }
        };
        self.retire(&dead);
        drop(guard);
        out
    }

    /// One attempt of [`unmap_one_walk`](Self::unmap_one_walk), from the cursor's table unless
    /// `from_root`.
    #[inline]
    fn unmap_leaf_once<'a>(
        &'a self,
        r: Run,
        from_root: bool,
        kept: &mut Option<Path<'a>>,
        gather: &mut Gather,
        dead: &mut Vec<PhysAddr>,
    ) -> LeafStep {
        let path = match self.unmap_path(r.iova, r, from_root, kept) {
            Ok(p) => p,
            Err(e) => return LeafStep::Done(Err(e)),
        };
        let t = path.last().t;
        let idx = self.index(r.iova, r.level);
        let Some(e) = t.entries.get(idx) else {
            return LeafStep::Done(Err(UnmapError::BrokenTable {
                iova: self.external(r.iova),
                pa: t.pa,
            }));
        };
        let old = e.load(K::LOAD);
        match self.kind(r.level, old) {
            Kind::Table => return LeafStep::Table,
            // A cursor may name a table claimed since it was cached (empty, or it could not
            // have been claimed): only a walk from the root may answer "not mapped".
            Kind::Invalid if !from_root && path.frames()[0].pa() != self.root() => {
                return LeafStep::Retry;
            }
            Kind::Invalid => {
                return LeafStep::Done(Err(UnmapError::NotMapped {
                    iova: self.external(r.iova),
                }));
            }
            Kind::Leaf => {}
        }
        // Exactly once where counts are kept: only the caller whose exchange removes the
        // leaf counts it.
        if !K::remove(e, old) {
            return LeafStep::Retry;
        }
        let size = r.size.get();
        self.flush_ops()
            .add_page(gather, self.external(r.iova), size);
        if !self.drop_live(path.frames(), path.top(), 1, r.iova, dead) {
            self.sync_entries(t, idx, 1);
        }
        LeafStep::Done(Ok(size))
    }

    /// The path from the root to the leaf table of `iova` for an unmap at `r.level` (or the
    /// cursor's table alone, unless `from_root`), built in `slot` (where the caller keeps it:
    /// a path is too large to return by value cheaply).
    #[inline]
    fn unmap_path<'a, 's>(
        &'a self,
        iova: u64,
        r: Run,
        from_root: bool,
        slot: &'s mut Option<Path<'a>>,
    ) -> Result<&'s Path<'a>, UnmapError> {
        if !from_root {
            if let Some(t) = self.cursor_get(r.level, iova) {
                return Ok(slot.insert(Path::new(Frame { t, level: r.level })));
            }
        }
        self.unmap_walk(iova, r, slot)
    }

    /// The walk of [`unmap_path`](Self::unmap_path) from the root, caching the leaf table.
    #[inline(never)]
    fn unmap_walk<'a, 's>(
        &'a self,
        iova: u64,
        r: Run,
        slot: &'s mut Option<Path<'a>>,
    ) -> Result<&'s Path<'a>, UnmapError> {
        let cfg = self.config();
        let epoch = self.unlink_epoch();
        let root = self.root_frame().ok_or(UnmapError::BrokenTable {
            iova: self.external(iova),
            pa: self.root(),
        })?;
        let path = slot.insert(Path::new(root));
        let mut level = cfg.start_level();
        while level < r.level {
            let e = path
                .last()
                .t
                .entries
                .get(self.index(iova, level))
                .map_or(0, |e| e.load(K::LOAD));
            match self.kind(level, e) {
                Kind::Invalid => {
                    return Err(UnmapError::NotMapped {
                        iova: self.external(iova),
                    });
                }
                Kind::Leaf => {
                    return Err(UnmapError::PartialBlock {
                        iova: self.external(iova),
                        size: r.size,
                        leaf: PageSize::new(cfg.block_size(level)).unwrap_or(r.size),
                    });
                }
                Kind::Table => {
                    let t = self.resolve(e).ok_or(UnmapError::BrokenTable {
                        iova: self.external(iova),
                        pa: self.unpack(e),
                    })?;
                    level += 1;
                    path.push(Frame { t, level });
                }
            }
        }
        self.cursor_set(r.level, iova, path.last().pa(), epoch);
        Ok(path)
    }

    /// A run of several entries, or one holding a table: the check pass over every leaf table
    /// of the run, then the clear pass.
    fn unmap_many(&self, r: Run, gather: &mut Gather) -> Result<u64, UnmapError> {
        let guard = self.enter_at(r.iova);
        let size = r.size.get();
        // Check pass. A run inside one leaf table keeps its path for the clear pass: the
        // leaves it holds keep the tables alive.
        let single = self.entries_in_table(r.level, r.iova, r.count) == r.count;
        let mut kept = None;
        let (mut iova, mut left) = (r.iova, r.count);
        while left > 0 {
            let n = self.entries_in_table(r.level, iova, left);
            let mut from_root = false;
            loop {
                let mut fresh = None;
                let slot = if single { &mut kept } else { &mut fresh };
                let path = self.unmap_path(iova, r, from_root, slot)?;
                let cursor = path.frames()[0].pa() != self.root();
                match self.check_mapped(path.last().t, iova, n, r) {
                    // The cursor's table may have been claimed since (see `unmap_path`).
                    Err(UnmapError::NotMapped { .. }) if cursor => from_root = true,
                    res => break res?,
                }
            }
            iova += n * size;
            left -= n;
        }
        // Clear pass. A run over several leaf tables walks from the root again: a cursor
        // could name a claimed table that never held the run.
        let mut dead = Vec::new();
        let (mut iova, mut left) = (r.iova, r.count);
        let mut result = Ok(r.count * size);
        while left > 0 {
            let n = self.entries_in_table(r.level, iova, left);
            let mut fresh = None;
            let path = match kept.as_ref() {
                Some(p) => p,
                None => match self.unmap_path(iova, r, true, &mut fresh) {
                    Ok(p) => p,
                    Err(e) => {
                        // Only a concurrent overlapping operation (a caller bug) gets here.
                        result = Err(e);
                        break;
                    }
                },
            };
            let t = path.last().t;
            let removed = self.clear_segment(t, iova, n, r, gather, &mut dead);
            // A table this empties is unlinked (that clean suffices); one that survives must
            // show the walker its cleared entries.
            if !self.drop_live(path.frames(), path.top(), removed, iova, &mut dead) {
                self.sync_entries(t, self.index(iova, r.level), n as usize);
            }
            iova += n * size;
            left -= n;
        }
        self.retire(&dead);
        drop(guard);
        result
    }

    /// The clear pass over the `n` checked entries from `iova` of leaf table `t`: removes each
    /// and returns how many this call removed (only those give count units back: an
    /// overlapping unmap that got there first counted its own). A removed table descriptor
    /// takes its subtree with it, listed in `dead` after the walk flush.
    fn clear_segment(
        &self,
        t: TableRef<'_>,
        iova: u64,
        n: u64,
        r: Run,
        gather: &mut Gather,
        dead: &mut Vec<PhysAddr>,
    ) -> u32 {
        let size = r.size.get();
        let first = self.index(iova, r.level);
        let slots = &t.entries[first..first + n as usize];
        if n > 1 && self.all_leaves(slots, r.level) && K::clear_leaves(slots) {
            // Every entry a leaf, cleared in one pass (the common bulk unmap).
            let mut at = self.external(iova);
            for _ in 0..n {
                self.flush_ops().add_page(gather, at, size);
                at = Iova::new(at.get().wrapping_add(size));
            }
            return n as u32;
        }
        let mut removed = 0u32;
        for (k, e) in slots.iter().enumerate() {
            let mut old = e.load(K::LOAD);
            let at = iova + k as u64 * size;
            while self.kind(r.level, old) != Kind::Invalid {
                if K::remove(e, old) {
                    removed += 1;
                    if self.kind(r.level, old) == Kind::Table {
                        self.replaced_table(t, first + k, at, size);
                        self.collect_tables(old, r.level + 1, dead);
                    } else {
                        self.flush_ops().add_page(gather, self.external(at), size);
                    }
                    break;
                }
                old = e.load(K::LOAD);
            }
        }
        removed
    }

    /// The check pass of an unmap over the `n` entries from `iova` of the leaf table `table`:
    /// fails with [`UnmapError::NotMapped`] at the first empty entry, or
    /// [`UnmapError::ReservedTable`] at the first table a reservation holds (only a counting
    /// engine has any), whichever comes first.
    #[inline]
    pub(crate) fn check_mapped(
        &self,
        table: TableRef<'_>,
        iova: u64,
        n: u64,
        r: Run,
    ) -> Result<(), UnmapError> {
        let first = self.index(iova, r.level);
        let slots =
            table
                .entries
                .get(first..first + n as usize)
                .ok_or(UnmapError::BrokenTable {
                    iova: self.external(iova),
                    pa: table.pa,
                })?;
        if n > 1 && self.all_leaves(slots, r.level) {
            return Ok(());
        }
        for (k, e) in slots.iter().enumerate() {
            let v = e.load(Ordering::Acquire);
            let at = || self.external(iova + k as u64 * r.size.get());
            match self.kind(r.level, v) {
                Kind::Invalid => return Err(UnmapError::NotMapped { iova: at() }),
                Kind::Table
                    if self
                        .resolve(v)
                        .is_some_and(|t| t.meta.reservations.load(Ordering::Relaxed) != 0) =>
                {
                    return Err(UnmapError::ReservedTable { iova: at() });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether every entry of `slots` (at `level`) is a leaf: their type bits, folded with AND
    /// and with OR, both equal the level's leaf type. Out of line: for runs of several
    /// entries only.
    #[inline(never)]
    pub(crate) fn all_leaves(&self, slots: &[AtomicU64], level: u32) -> bool {
        let want = self.leaf_type(level);
        let (mut and, mut or) = (u64::MAX, 0);
        for e in slots {
            let v = e.load(Ordering::Acquire);
            and &= v;
            or |= v;
        }
        and & desc::TYPE_MASK == want && or & desc::TYPE_MASK == want
    }
}
