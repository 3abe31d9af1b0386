//! Reading the tree: software translation (`iova_to_phys`) and the ordered walk.
//!
//! Both run inside an operation guard, so on an engine that frees tables they empty no table
//! they read is freed under them. A lookup starts from a cached leaf table when one is valid;
//! a leaf found there is an answer, a miss is checked again from the root (the cached table
//! may have been claimed since it was cached).

use super::Engine;
use crate::account::Accounting;
use crate::desc::{self, Kind};
use core::sync::atomic::Ordering;
use iopt_api::{FlushOps, Iova, PageSize, PhysAddr, TableAlloc, TableRef, Translation, WalkItem};

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Translates `iova` in software (`iova_to_phys`). `None` outside the input range or when
    /// no leaf maps it.
    #[must_use]
    pub fn lookup(&self, iova: Iova) -> Option<Translation> {
        if !self.cfg.iova_in_range(iova) {
            return None;
        }
        let _guard = self.enter_at(iova.get());
        self.lookup_in_range(iova)
    }

    /// [`lookup`](Self::lookup) for a caller that holds the engine exclusively: no grace period
    /// (no table can be freed under it).
    #[must_use]
    #[inline]
    pub fn lookup_mut(&mut self, iova: Iova) -> Option<Translation> {
        if !self.cfg.iova_in_range(iova) {
            return None;
        }
        self.lookup_in_range(iova)
    }

    /// The body of [`lookup`](Self::lookup) for an `iova` inside the input range. The caller
    /// keeps the tables alive: a guard from [`enter`](Self::enter), or exclusive access.
    #[inline]
    fn lookup_in_range(&self, iova: Iova) -> Option<Translation> {
        let local = iova.get() & self.local_mask;
        // The last operation's leaf table usually holds the next lookup's page; failing that,
        // the table above it (cached by earlier lookups) saves the top of the descent.
        let epoch = self.unlinks.load(Ordering::Acquire);
        let cached = match self.cursor_get(3, local) {
            Some(t) => Some((t, 3)),
            None => self.cursor_get(2, local).map(|t| (t, 2)),
        };
        if let Some((table, level)) = cached {
            if let Some(found) = self.lookup_below(table, level, local, epoch) {
                return Some(found);
            }
            // A cursor names a table that was linked when it was checked; on a counting
            // engine it may have been claimed since (emptied by other callers' unmaps), and
            // the page then lives in the table that replaced it. A leaf found is an answer,
            // a miss is not: only a walk from the root may say "not mapped".
        }
        self.lookup_below(self.root_table()?, self.cfg.start_level(), local, epoch)
    }

    /// The descent of [`lookup_in_range`](Self::lookup_in_range) from `table` at `level`.
    #[inline]
    fn lookup_below<'a>(
        &'a self,
        mut table: TableRef<'a>,
        mut level: u32,
        local: u64,
        epoch: u64,
    ) -> Option<Translation> {
        loop {
            let e = table
                .entries
                .get(self.index(local, level))?
                .load(Ordering::Acquire);
            match self.kind(level, e) {
                Kind::Invalid => return None,
                Kind::Table => {
                    let pa = self.unpack(e);
                    table = self.alloc.table(pa)?;
                    level += 1;
                    if level >= 2 && self.cursor_worth_caching(level, local) {
                        self.cursor_set(level, local, pa, epoch);
                    }
                }
                Kind::Leaf => {
                    let size = PageSize::from_shift(self.fast.shift[level as usize & 3])?;
                    let base = self.unpack(e);
                    return Some(Translation {
                        pa: PhysAddr::new(base.get() | (local & size.mask())),
                        size,
                        level,
                        prot: self.fast.decode_prot(e),
                        descriptor: e,
                    });
                }
            }
        }
    }

    /// Whether a lookup that missed the cursor should cache the table at `level` it found for
    /// `iova`: only when the previous lookup that missed in this slot wanted the same table
    /// (repeated lookups in one region), so that lookups spread over many tables do not
    /// rewrite the cursor (a locked read-modify-write) on every call. A plain store
    /// otherwise.
    #[inline]
    fn cursor_worth_caching(&self, level: u32, iova: u64) -> bool {
        if level <= self.cfg.start_level() {
            return false;
        }
        let key = self.cursor_key(level, iova);
        let c = self.cursor_slot(key);
        if c.missed.load(Ordering::Relaxed) == key {
            return true;
        }
        c.missed.store(key, Ordering::Relaxed);
        false
    }

    /// Visits every table and leaf in ascending IOVA order.
    pub fn walk(&self, visit: &mut dyn FnMut(WalkItem)) {
        let _guard = self.enter();
        if let Some(root) = self.root_table() {
            self.walk_table(root, self.root, self.cfg.start_level(), 0, visit);
        }
    }

    fn walk_table(
        &self,
        table: TableRef<'_>,
        pa: PhysAddr,
        level: u32,
        base: u64,
        visit: &mut dyn FnMut(WalkItem),
    ) {
        let entries = self.cfg.entries_at(level).min(table.entries.len());
        let live = table.entries[..entries]
            .iter()
            .filter(|e| e.load(Ordering::Acquire) != 0)
            .count();
        visit(WalkItem::Table {
            iova: self.external(base),
            level,
            pa,
            live,
        });
        let shift = self.cfg.level_shift(level);
        for (i, e) in table.entries[..entries].iter().enumerate() {
            let v = e.load(Ordering::Acquire);
            let iova = base + ((i as u64) << shift);
            match self.kind(level, v) {
                Kind::Invalid => {}
                Kind::Leaf => {
                    if let Some(size) = PageSize::new(self.cfg.block_size(level)) {
                        visit(WalkItem::Leaf {
                            iova: self.external(iova),
                            level,
                            size,
                            pa: self.unpack(v),
                            prot: desc::decode_prot(&self.cfg, v),
                            descriptor: v,
                        });
                    }
                }
                Kind::Table => {
                    let sub_pa = self.unpack(v);
                    if let Some(sub) = self.alloc.table(sub_pa) {
                        self.walk_table(sub, sub_pa, level + 1, iova, visit);
                    }
                }
            }
        }
    }
}
