//! Design 2's reservations on the engine: "allocate VA" installs and counts every table a
//! range needs, "unallocate VA" drops the counts and frees what nothing holds any more.
//!
//! `reserve(range, max_leaf)` plans leaves the way `map_range` would place them for backing
//! that is congruent to the IOVA (the Linux iommu core's `iommu_pgsize`, restricted to sizes
//! up to `max_leaf`): a slot at level `l` gets a leaf when it lies wholly inside the range and
//! a leaf of its size is allowed there (supported by the table and not larger than
//! `max_leaf`); every other slot the range touches needs a table at level `l + 1`. The
//! reservation installs exactly those tables (counting first, against the current tree, so it
//! takes exactly the missing pages in one bulk allocation) and increments the reservation
//! count of each of them, existing ones included. One `reserve` of 1 GiB at +4 KiB with
//! `max_leaf = 2 MiB` takes 5 pages, not the 516 of the worst case (`docs/designs.md` §8).
//!
//! A reservation is only ever taken under a pin, so no reservation can appear on a table
//! being freed; a claim re-checks the reservation count after its exchange and undoes itself
//! if one raced in ([`LiveCounts`]).
//!
//! [`collapse`](Engine::collapse), the release pass, also serves the sweep of tables left
//! linked while reclamation was held back ([`crate::reclaim`]).

// Interval arithmetic reads best with `a`/`b` bounds, `w` the plan and `f` the frame.
#![allow(clippy::many_single_char_names)]

use super::{Engine, Frame};
use crate::account::{Accounting, Reserving};
use crate::desc::{self, Kind};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use iopt_api::{
    FlushOps, Gather, IovaRange, PageSize, PhysAddr, ReserveError, TableAlloc, TableRef,
};

const SC: Ordering = Ordering::SeqCst;

/// The reservation plan of [`Engine::reserve_tables`]: which slots need a table below them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want {
    /// First local IOVA.
    start: u64,
    /// Local IOVA after the last (at most `2^52`).
    end: u64,
    /// Bit `l` set: a leaf may sit at level `l` (allowed size, not above `max_leaf`).
    allowed: u8,
}

/// Where a reservation takes its pages: the bulk allocation, topped up page by page only when
/// a concurrent free removed a table the count relied on.
struct ReserveSource<'e, A: TableAlloc, F: FlushOps, K: Accounting> {
    engine: &'e Engine<A, F, K>,
    pages: Vec<PhysAddr>,
    extra: usize,
    /// Pages `build` took for a private chain not yet published or dismantled: only a panic
    /// unwinding out of the allocator mid-build leaves any here at the drop.
    building: Vec<PhysAddr>,
}

/// Gives the allocator back every page the reservation obtained and did not install: the
/// unused rest at the end of every `reserve_tables`, and, on a panic unwinding out of the
/// allocator (`alloc`, `table`, `clean`), the pages of the chain being built too.
impl<A: TableAlloc, F: FlushOps, K: Accounting> Drop for ReserveSource<'_, A, F, K> {
    fn drop(&mut self) {
        for &p in &self.building {
            if let Some(t) = self.engine.allocator().table(p) {
                for e in t.entries {
                    e.store(0, Ordering::Relaxed);
                }
                t.meta.clear();
            }
        }
        self.pages.append(&mut self.building);
        if !self.pages.is_empty() {
            let c = self.engine.counters();
            let n = self.pages.len() as u64;
            c.free_bulk_calls.fetch_add(1, Ordering::Relaxed);
            c.pages_freed.fetch_add(n, Ordering::Relaxed);
            c.reserved_unused.fetch_add(n, Ordering::Relaxed);
            self.engine
                .allocator()
                .free_bulk(&self.pages, self.engine.config().granule().size());
        }
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> ReserveSource<'_, A, F, K> {
    fn take(&mut self) -> Result<PhysAddr, ReserveError> {
        if let Some(p) = self.pages.pop() {
            return Ok(p);
        }
        let c = self.engine.counters();
        c.alloc_calls.fetch_add(1, Ordering::Relaxed);
        let p = self
            .engine
            .allocator()
            .alloc(self.engine.config().granule().size())?;
        c.pages_allocated.fetch_add(1, Ordering::Relaxed);
        c.pages_reserved.fetch_add(1, Ordering::Relaxed);
        self.extra += 1;
        Ok(p)
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// The table a table descriptor links, with its address.
    #[inline]
    fn table_of(&self, e: u64) -> Option<(TableRef<'_>, PhysAddr)> {
        let pa = self.unpack(e);
        self.allocator().table(pa).map(|t| (t, pa))
    }

    fn want(&self, range: IovaRange, max_leaf: PageSize) -> Result<Want, ReserveError> {
        let cfg = self.config();
        let bad = ReserveError::BadLeafSize {
            range,
            size: max_leaf.get(),
        };
        if cfg.leaf_level(max_leaf).is_none() {
            return Err(bad);
        }
        let min = cfg
            .page_sizes()
            .smallest()
            .map_or(cfg.granule().size(), PageSize::get);
        if !range.start().is_aligned(min) || range.len() % min != 0 {
            return Err(bad);
        }
        if !cfg.iova_in_range(range.start()) || !cfg.iova_in_range(range.last()) {
            return Err(ReserveError::OutOfRange { range });
        }
        let mut allowed = 0u8;
        for l in cfg.start_level()..=3 {
            let bs = cfg.block_size(l);
            if bs <= max_leaf.get() && PageSize::new(bs).and_then(|s| cfg.leaf_level(s)) == Some(l)
            {
                allowed |= 1 << l;
            }
        }
        let m = self.local_mask;
        Ok(Want {
            start: range.start().get() & m,
            end: (range.last().get() & m) + 1,
            allowed,
        })
    }

    /// Whether the slot at `level` starting at `slot` needs a table below it for `w`.
    fn needs_child(&self, w: &Want, level: u32, slot: u64) -> bool {
        if level >= 3 {
            return false;
        }
        let end = slot + self.config().block_size(level);
        !(slot >= w.start && end <= w.end && w.allowed & (1 << level) != 0)
    }

    /// Calls `f(slot_start, from, to)` for every slot of a table at `level` that `[a, b)`
    /// touches, with the part of `[a, b)` inside it.
    fn slots(&self, level: u32, a: u64, b: u64, mut f: impl FnMut(u64, u64, u64) -> bool) {
        let bs = self.config().block_size(level);
        let mut at = a;
        while at < b {
            let s = at & !(bs - 1);
            let next = (s + bs).min(b);
            if !f(s, at, next) {
                return;
            }
            at = next;
        }
    }

    /// Tables needed for a new, fully covered table at `level` and everything below it.
    fn count_full(&self, w: &Want, level: u32) -> usize {
        if level >= 3 || w.allowed & (1 << level) != 0 {
            return 1;
        }
        let per = self.config().granule().entries();
        per.saturating_mul(self.count_full(w, level + 1))
            .saturating_add(1)
    }

    /// Tables needed for a new table at `level` covering `[a, b)` and everything below it.
    fn count_virtual(&self, w: &Want, level: u32, a: u64, b: u64) -> usize {
        if level >= 3 {
            return 1;
        }
        let bs = self.config().block_size(level);
        let first = a & !(bs - 1);
        let last = (b - 1) & !(bs - 1);
        let part = |s: u64, from: u64, to: u64| {
            if self.needs_child(w, level, s) {
                self.count_virtual(w, level + 1, from, to)
            } else {
                0
            }
        };
        if first == last {
            return 1 + part(first, a, b);
        }
        let head = part(first, a, first + bs);
        let tail = part(last, last, b);
        let inner = usize::try_from((last - first) / bs - 1).unwrap_or(usize::MAX);
        let per = if inner > 0 && self.needs_child(w, level, first + bs) {
            self.count_full(w, level + 1)
        } else {
            0
        };
        inner
            .saturating_mul(per)
            .saturating_add(head)
            .saturating_add(tail)
            .saturating_add(1)
    }

    /// Missing tables for `w` below the existing `table` at `level`, over `[a, b)`.
    fn count_existing(
        &self,
        table: TableRef<'_>,
        level: u32,
        a: u64,
        b: u64,
        w: &Want,
    ) -> Result<usize, ReserveError> {
        let cfg = self.config();
        let mut n = 0usize;
        let mut err = None;
        self.slots(level, a, b, |s, at, next| {
            if !self.needs_child(w, level, s) {
                return true;
            }
            let e = table
                .entries
                .get(cfg.index(at, level))
                .map_or(0, |e| e.load(SC));
            let r = match self.kind(level, e) {
                Kind::Invalid => Ok(self.count_virtual(w, level + 1, at, next)),
                Kind::Leaf => Err(ReserveError::BlockInTheWay {
                    iova: self.external(at),
                }),
                Kind::Table => match self.table_of(e) {
                    Some((sub, _)) => self.count_existing(sub, level + 1, at, next, w),
                    None => Err(ReserveError::BlockInTheWay {
                        iova: self.external(at),
                    }),
                },
            };
            match r {
                Ok(k) => {
                    n = n.saturating_add(k);
                    true
                }
                Err(e) => {
                    err = Some(e);
                    false
                }
            }
        });
        err.map_or(Ok(n), Err)
    }

    /// Takes a reservation on every table `w` needs below `f` over `[a, b)`, installing the
    /// missing ones from `src`. Records every table counted in `taken`.
    #[allow(clippy::too_many_arguments)]
    fn reserve_walk<'a>(
        &'a self,
        f: Frame<'a>,
        a: u64,
        b: u64,
        w: &Want,
        src: &mut ReserveSource<'_, A, F, K>,
        taken: &mut Vec<PhysAddr>,
    ) -> Result<(), ReserveError> {
        let cfg = self.config();
        let mut result = Ok(());
        self.slots(f.level, a, b, |s, at, next| {
            if !self.needs_child(w, f.level, s) {
                return true;
            }
            let idx = cfg.index(at, f.level);
            let Some(slot) = f.t.entries.get(idx) else {
                result = Err(ReserveError::BlockInTheWay {
                    iova: self.external(at),
                });
                return false;
            };
            loop {
                let e = slot.load(SC);
                match self.kind(f.level, e) {
                    Kind::Leaf => {
                        result = Err(ReserveError::BlockInTheWay {
                            iova: self.external(at),
                        });
                        return false;
                    }
                    Kind::Table => {
                        let Some((sub, spa)) = self.table_of(e) else {
                            result = Err(ReserveError::BlockInTheWay {
                                iova: self.external(at),
                            });
                            return false;
                        };
                        if !K::pin(sub.meta, 1, false) {
                            // Being freed: its parent slot empties shortly.
                            crate::atomic::spin_wait();
                            continue;
                        }
                        self.sync_seen(f.t, idx, e);
                        sub.meta.reservations.fetch_add(1, SC);
                        K::unpin(sub.meta, 1, false);
                        taken.push(spa);
                        let child = Frame {
                            t: sub,
                            level: f.level + 1,
                        };
                        result = self.reserve_walk(child, at, next, w, src, taken);
                        return result.is_ok();
                    }
                    Kind::Invalid => {
                        let mut built = Vec::new();
                        let top = match self.build(w, f.level + 1, at, next, src, &mut built) {
                            Ok(p) => p,
                            Err(e) => {
                                Self::dismantle(&built, src);
                                result = Err(e);
                                return false;
                            }
                        };
                        // `f` is the root or held by this reservation: never dead.
                        let pinned = K::pin(f.t.meta, 1, false);
                        debug_assert!(pinned);
                        for &(_, t) in &built {
                            self.sync_table(t);
                        }
                        let new = desc::encode_table(cfg, top);
                        if pinned && slot.compare_exchange(0, new, SC, SC).is_ok() {
                            // The pin is the new link's count (or, where pins are
                            // transient, given back).
                            K::settle(f.t.meta, 1, false);
                            self.sync_installed(f.t, idx, new);
                            let c = self.counters();
                            c.add_live(built.len() as u64);
                            c.pages_consumed
                                .fetch_add(built.len() as u64, Ordering::Relaxed);
                            taken.extend(built.iter().map(|&(p, _)| p));
                            src.building.clear();
                            return true;
                        }
                        if pinned {
                            K::unpin(f.t.meta, 1, false);
                        }
                        Self::dismantle(&built, src);
                        self.counters()
                            .install_races_lost
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        result
    }

    /// Builds, privately, a table at `level` for `[a, b)` and everything `w` needs below it,
    /// each with one reservation. Returns its address; every table is pushed to `built`.
    fn build<'a>(
        &'a self,
        w: &Want,
        level: u32,
        a: u64,
        b: u64,
        src: &mut ReserveSource<'_, A, F, K>,
        built: &mut Vec<(PhysAddr, TableRef<'a>)>,
    ) -> Result<PhysAddr, ReserveError> {
        let cfg = self.config();
        let p = src.take()?;
        src.building.push(p);
        let t = match super::check_page(cfg, self.allocator(), p, cfg.granule().size()) {
            Ok(t) => t,
            Err(source) => {
                src.building.pop();
                src.pages.push(p);
                return Err(ReserveError::Alloc { source });
            }
        };
        t.meta.reservations.store(1, Ordering::Relaxed);
        built.push((p, t));
        if level >= 3 {
            return Ok(p);
        }
        let mut result = Ok(p);
        let mut links = 0u32;
        self.slots(level, a, b, |s, at, next| {
            if !self.needs_child(w, level, s) {
                return true;
            }
            match self.build(w, level + 1, at, next, src, built) {
                Ok(c) => {
                    // Relaxed: the table is private until its chain is published.
                    t.entries[cfg.index(at, level)].store(self.private_link(c), Ordering::Relaxed);
                    links += 1;
                    true
                }
                Err(e) => {
                    result = Err(e);
                    false
                }
            }
        });
        K::set_count(t.meta, links);
        result
    }

    /// Zeroes privately built tables and returns their pages to the reservation's source.
    fn dismantle(built: &[(PhysAddr, TableRef<'_>)], src: &mut ReserveSource<'_, A, F, K>) {
        for &(p, t) in built {
            for e in t.entries {
                e.store(0, Ordering::Relaxed);
            }
            t.meta.clear();
            src.pages.push(p);
        }
        src.building.clear();
    }

    /// Post-order pass over the tables under `f` that `[a, b)` touches: clears the leaves
    /// inside the range (with `gather`), drops `f`'s reservation if `dec_self`, and claims
    /// every table left with nothing. Returns whether `f` itself was claimed (and is still
    /// linked: the caller unlinks it or claims its parent in turn).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn collapse(
        &self,
        f: Frame<'_>,
        a: u64,
        b: u64,
        w: Option<&Want>,
        mut gather: Option<&mut Gather>,
        dec_self: bool,
        dead: &mut Vec<PhysAddr>,
    ) -> bool {
        let cfg = self.config();
        let bs = cfg.block_size(f.level);
        let mut cleared = 0u32;
        // First and last entry cleared (slots come in ascending order).
        let mut span: Option<(usize, usize)> = None;
        let mut kids: Vec<(usize, u64, PhysAddr)> = Vec::new();
        self.slots(f.level, a, b, |s, at, next| {
            let idx = cfg.index(at, f.level);
            let Some(slot) = f.t.entries.get(idx) else {
                return true;
            };
            let e = slot.load(SC);
            match self.kind(f.level, e) {
                Kind::Leaf => {
                    if let (Some(g), Some(w)) = (gather.as_deref_mut(), w) {
                        // Counted only if this exchange removed it (exactly once, and SeqCst,
                        // as in `unmap_leaf_once`).
                        if s >= w.start
                            && s + bs <= w.end
                            && slot.compare_exchange(e, 0, SC, SC).is_ok()
                        {
                            span = Some(span.map_or((idx, idx), |(lo, _)| (lo, idx)));
                            self.flush_ops().add_page(g, self.external(s), bs);
                            cleared += 1;
                        }
                    }
                }
                Kind::Table => {
                    if let Some((sub, spa)) = self.table_of(e) {
                        let dec = w.is_some_and(|w| self.needs_child(w, f.level, s));
                        let child = Frame {
                            t: sub,
                            level: f.level + 1,
                        };
                        if self.collapse(child, at, next, w, gather.as_deref_mut(), dec, dead) {
                            kids.push((idx, s, spa));
                        }
                    }
                }
                Kind::Invalid => {}
            }
            true
        });
        if cleared > 0 {
            K::removed(f.t.meta, cleared);
        }
        if dec_self {
            f.t.meta.reservations.fetch_sub(1, SC);
        }
        let is_root = f.pa() == self.root();
        let k = kids.len() as u32;
        if !is_root && K::try_claim(f.t, k) {
            // Unlinked by the caller: that clean hides the cleared leaves too.
            self.note_dead(f.pa(), dead);
            return true;
        }
        // Links an overlapping block unmap removed first were counted off by it.
        let unlinked = kids
            .iter()
            .filter(|&&(idx, s, child)| self.unlink(f, idx, s, child))
            .count() as u32;
        if unlinked > 0
            && K::removed(f.t.meta, unlinked) == Some(unlinked)
            && !is_root
            && K::try_claim(f.t, 0)
        {
            self.note_dead(f.pa(), dead);
            return true;
        }
        // It stays linked: the walker must see its cleared leaves.
        if let Some((lo, hi)) = span {
            self.sync_entries(f.t, lo, hi - lo + 1);
        }
        false
    }
}

impl<A: TableAlloc, F: FlushOps, K: Reserving> Engine<A, F, K> {
    /// Returns exactly how many table pages [`reserve_tables`](Self::reserve_tables) would
    /// allocate now for `range` and `max_leaf`: what a `map_range` of the range with leaves up
    /// to `max_leaf` (and IOVA-congruent backing) would install.
    ///
    /// # Errors
    ///
    /// [`ReserveError::BadLeafSize`] for an unsupported `max_leaf` or a range not aligned to
    /// the smallest page size, [`ReserveError::OutOfRange`], and
    /// [`ReserveError::BlockInTheWay`] where a leaf larger than the plan occupies a slot that
    /// needs a table (also reported for a corrupted tree).
    pub fn reserve_pages_needed(
        &self,
        range: IovaRange,
        max_leaf: PageSize,
    ) -> Result<usize, ReserveError> {
        let w = self.want(range, max_leaf)?;
        let _guard = self.enter();
        let root = self.root_frame().ok_or(ReserveError::BlockInTheWay {
            iova: range.start(),
        })?;
        self.count_existing(root.t, root.level, w.start, w.end, &w)
    }

    /// Reserves `range` for leaves up to `max_leaf` (Design 2's "allocate VA"): counts the
    /// missing tables, takes them in one `alloc_bulk`, installs them, and increments the
    /// reservation count of every table covering the range (see `engine/reserve.rs`).
    /// Returns the pages taken from the allocator. All or nothing.
    ///
    /// The engine does not track reservations; the caller must release each successful
    /// reservation exactly once with the same arguments.
    ///
    /// # Errors
    ///
    /// As [`reserve_pages_needed`](Self::reserve_pages_needed), plus [`ReserveError::Alloc`].
    /// Nothing changed.
    pub fn reserve_tables(
        &self,
        range: IovaRange,
        max_leaf: PageSize,
    ) -> Result<usize, ReserveError> {
        let w = self.want(range, max_leaf)?;
        let guard = self.enter();
        let root = self.root_frame().ok_or(ReserveError::BlockInTheWay {
            iova: range.start(),
        })?;
        let need = self.count_existing(root.t, root.level, w.start, w.end, &w)?;
        let c = self.counters();
        let mut src = ReserveSource {
            engine: self,
            pages: Vec::new(),
            extra: 0,
            building: Vec::new(),
        };
        if need > 0 {
            c.alloc_bulk_calls.fetch_add(1, Ordering::Relaxed);
            self.allocator()
                .alloc_bulk(self.config().granule().size(), need, &mut src.pages)?;
            c.pages_allocated.fetch_add(need as u64, Ordering::Relaxed);
            c.pages_reserved.fetch_add(need as u64, Ordering::Relaxed);
        }
        let mut taken = Vec::new();
        let result = self.reserve_walk(root, w.start, w.end, &w, &mut src, &mut taken);
        let mut dead = Vec::new();
        if result.is_err() {
            for &pa in &taken {
                if let Some(t) = self.allocator().table(pa) {
                    t.meta.reservations.fetch_sub(1, SC);
                }
            }
            self.collapse(root, w.start, w.end, None, None, false, &mut dead);
        }
        let extra = src.extra;
        // Gives back the pages left unused.
        drop(src);
        self.retire(&dead);
        drop(guard);
        result.map(|()| need + extra)
    }

    /// Releases a reservation made by [`reserve_tables`](Self::reserve_tables) with the same
    /// arguments (Design 2's "unallocate VA"): **unmaps every leaf inside the range first**
    /// (adding it to `gather`), drops the range's reservation counts, then unlinks — after one
    /// [`FlushOps::flush_walk`] per unlinked subtree — and frees in one batch every table left
    /// with neither live entries nor reservations. Tables other reservations hold survive.
    ///
    /// # Errors
    ///
    /// As [`reserve_pages_needed`](Self::reserve_pages_needed) for invalid arguments.
    pub fn release_tables(
        &self,
        range: IovaRange,
        max_leaf: PageSize,
        gather: &mut Gather,
    ) -> Result<(), ReserveError> {
        let w = self.want(range, max_leaf)?;
        let guard = self.enter();
        let root = self.root_frame().ok_or(ReserveError::BlockInTheWay {
            iova: range.start(),
        })?;
        let mut dead = Vec::new();
        self.collapse(
            root,
            w.start,
            w.end,
            Some(&w),
            Some(gather),
            false,
            &mut dead,
        );
        self.retire(&dead);
        drop(guard);
        Ok(())
    }
}
