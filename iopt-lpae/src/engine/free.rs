//! Freeing: what happens to the tables an operation removes or empties.
//!
//! Every path that takes a table out of the tree ends here, whatever the accounting:
//!
//! - a table descriptor removed by an unmap at block size, or replaced by a block map, takes
//!   its subtree with it: [`collect_tables`](Engine::collect_tables) lists the subtree (each
//!   table marked claimed, [`DEAD`], on the way, so that a later pin there fails) after the
//!   walk flush;
//! - on an engine that counts, a table whose count an operation brought to zero is claimed,
//!   with every ancestor that holds nothing else, and the topmost is unlinked
//!   ([`cascade`](Engine::cascade));
//! - the listed tables are *retired*: freed at once ([`Untracked`](crate::account::Untracked))
//!   or after the grace period of [`crate::reclaim`].

use super::{Engine, Frame, OpGuard, Path};
use crate::account::{Accounting, DEAD};
use crate::desc::Kind;
use crate::reclaim::Entered;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use iopt_api::{FlushOps, PhysAddr, TableAlloc};

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Enters an operation: tables reachable now stay allocated until the guard drops. The
    /// engine's own operations do this; a backend needs it only around its own reads of table
    /// memory. Costs nothing on an engine that frees at once.
    pub fn enter(&self) -> OpGuard<'_, A, F, K> {
        self.enter_at(0)
    }

    /// [`enter`](Self::enter) for an operation at local IOVA `iova`: operations in different
    /// regions announce themselves on different cache lines.
    #[inline]
    pub(crate) fn enter_at(&self, iova: u64) -> OpGuard<'_, A, F, K> {
        OpGuard {
            engine: self,
            entered: self.acct.enter(iova),
        }
    }

    /// [`enter_at`](Self::enter_at) for a map drawing from `S`: nothing when the source's
    /// maps are held by a reservation ([`PageSource::PATH_HELD`]: no table on their path can be
    /// freed while they run).
    #[inline]
    pub(crate) fn enter_for<S: super::PageSource>(&self, iova: u64) -> OpGuard<'_, A, F, K> {
        OpGuard {
            engine: self,
            entered: if S::PATH_HELD {
                None
            } else {
                self.acct.enter(iova)
            },
        }
    }

    /// Leaves an operation: frees what reclamation says is ready, and sweeps if asked.
    #[inline]
    pub(super) fn exit(&self, at: Entered) {
        let mut ready = Vec::new();
        let sweep = self.acct.exit(at, &mut ready);
        self.free_tables(&ready);
        if sweep {
            self.sweep();
        }
    }

    /// Hands the tables an operation unlinked (and flushed) to reclamation.
    #[inline]
    pub(crate) fn retire(&self, dead: &[PhysAddr]) {
        if !dead.is_empty() && self.acct.retire(dead) {
            self.free_tables(dead);
        }
    }

    /// Frees every retired table now (no operation can be running: `&mut self`).
    pub fn quiesce(&mut self) {
        let pages = self.acct.drain();
        self.free_tables(&pages);
    }

    /// Returns how many unlinked tables wait for running operations to finish before they are
    /// freed (0 whenever no operation is running, and always on an engine that frees at once).
    #[must_use]
    pub fn deferred_frees(&self) -> usize {
        self.acct.deferred()
    }

    /// Claims the empty tables that operations left linked while the limbo was full (see
    /// [`LIMBO_LIMIT`](crate::reclaim::LIMBO_LIMIT)): one post-order pass over the whole
    /// tree, with the claims a release makes (`collapse` clearing nothing).
    #[cold]
    #[inline(never)]
    fn sweep(&self) {
        let guard = self.enter();
        let mut dead = Vec::new();
        if let Some(root) = self.root_frame() {
            let end = self.local_end();
            self.collapse(root, 0, end, None, None, false, &mut dead);
        }
        self.retire(&dead);
        drop(guard);
    }

    /// Records a table claimed for freeing.
    pub(crate) fn note_dead(&self, pa: PhysAddr, dead: &mut Vec<PhysAddr>) {
        dead.push(pa);
        self.counters()
            .empty_tables_freed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Clears the table descriptor at `idx` of `parent` (its table was claimed) and flushes
    /// the walk caches for the span it covered.
    ///
    /// Returns `false` (nothing done) when the entry no longer links `child`: an overlapping
    /// block unmap removed it first, lowered `parent`'s count for it and left the claimed
    /// `child` to its claimer (see [`collect_tables`](Self::collect_tables)).
    pub(crate) fn unlink(
        &self,
        parent: Frame<'_>,
        idx: usize,
        iova_in_slot: u64,
        child: PhysAddr,
    ) -> bool {
        let cfg = self.config();
        let Some(slot) = parent.t.entries.get(idx) else {
            return false;
        };
        let old = slot.load(K::LOAD);
        if self.kind(parent.level, old) != Kind::Table || self.unpack(old) != child {
            return false;
        }
        if !K::remove(slot, old) {
            return false;
        }
        self.note_unlinked();
        self.sync_entries(parent.t, idx, 1);
        let span = cfg.block_size(parent.level);
        self.flush_ops().flush_walk(
            self.external(iova_in_slot & !(span - 1)),
            span,
            cfg.granule().size(),
        );
        true
    }

    /// Records that this caller removed `n` entries of `path[i]` and frees it, and the
    /// ancestors it leaves empty, if that emptied it. Returns whether `path[i]` was freed (it
    /// is then unlinked). Nothing, on an engine that does not count entries.
    #[inline]
    pub(crate) fn drop_live(
        &self,
        path: &[Frame<'_>],
        i: usize,
        n: u32,
        iova: u64,
        dead: &mut Vec<PhysAddr>,
    ) -> bool {
        if n == 0 {
            return false;
        }
        K::removed(path[i].t.meta, n) == Some(n) && self.emptied(path, i, iova, dead)
    }

    /// Gives back `n` pins of `path[i]` that a map did not use, freeing what that empties
    /// as [`drop_live`](Self::drop_live) does.
    #[inline]
    pub(crate) fn drop_pins(
        &self,
        path: &[Frame<'_>],
        i: usize,
        n: u32,
        held: bool,
        iova: u64,
        dead: &mut Vec<PhysAddr>,
    ) -> bool {
        if n == 0 {
            return false;
        }
        K::unpin(path[i].t.meta, n, held) == Some(n) && self.emptied(path, i, iova, dead)
    }

    /// [`drop_live`](Self::drop_live) after `path[i]`'s count reached zero.
    #[inline(never)]
    fn emptied(&self, path: &[Frame<'_>], i: usize, iova: u64, dead: &mut Vec<PhysAddr>) -> bool {
        if self.acct.hold_back() {
            // Reclamation is held back: keep the table linked and empty, for a sweep once it
            // catches up.
            return false;
        }
        if path[0].pa() != self.root() {
            // A path from the cursor holds the leaf table alone: walk to it for its ancestors
            // (still linked: it is, and they count the links).
            let f = path[i];
            return self
                .path_to(iova, f.level, f.pa())
                .is_some_and(|full| self.cascade(full.frames(), full.top(), iova, dead));
        }
        self.cascade(path, i, iova, dead)
    }

    /// The path from the root to the table at `level` for `iova`, if that is the table at
    /// `pa`.
    fn path_to(&self, iova: u64, level: u32, pa: PhysAddr) -> Option<Path<'_>> {
        self.path_from_root(iova, level)
            .filter(|path| path.last().pa() == pa)
    }

    /// `path[i]`'s count just reached 0: claim it and every ancestor holding nothing else,
    /// unlink the topmost, and continue above if that empties its parent. Returns whether
    /// `path[i]` itself was claimed.
    fn cascade(&self, path: &[Frame<'_>], i: usize, iova: u64, dead: &mut Vec<PhysAddr>) -> bool {
        if i == 0 || !K::try_claim(path[i].t, 0) {
            return false;
        }
        let cfg = self.config();
        let mut i = i;
        loop {
            let mut top = i;
            self.note_dead(path[top].pa(), dead);
            while top > 1 && K::try_claim(path[top - 1].t, 1) {
                top -= 1;
                self.note_dead(path[top].pa(), dead);
            }
            let parent = path[top - 1];
            if !self.unlink(parent, cfg.index(iova, parent.level), iova, path[top].pa())
                || K::removed(parent.t.meta, 1) != Some(1)
            {
                return true;
            }
            i = top - 1;
            if i == 0 || !K::try_claim(path[i].t, 0) {
                return true;
            }
        }
    }

    /// Post-order list of the tables below (and including) the unlinked table `entry` points
    /// at, each marked claimed ([`DEAD`]) on the way, so that a later pin there fails. A table
    /// some other operation claimed first is left to it with everything below it (a claimer
    /// owns the whole chain it claims): each table is listed exactly once.
    pub(crate) fn collect_tables(&self, entry: u64, level: u32, out: &mut Vec<PhysAddr>) {
        let pa = self.unpack(entry);
        if let Some(t) = self.allocator().table(pa) {
            // SeqCst: ordered with the pins and claims other operations make on the same
            // count (`LiveCounts::pin`, `LiveCounts::try_claim`), which must see it.
            if t.meta.live_entries.swap(DEAD, Ordering::SeqCst) == DEAD {
                return;
            }
            self.collect_below(t.entries, level, out);
            if Self::orphaned(t.meta) {
                // Held: its holder frees it (`hold`).
                return;
            }
        }
        out.push(pa);
    }

    /// [`collect_tables`](Self::collect_tables) of a table this caller claimed itself (a block
    /// map replaced it): the table, and whatever its subtree holds.
    pub(crate) fn collect_claimed(&self, entry: u64, level: u32, out: &mut Vec<PhysAddr>) {
        let pa = self.unpack(entry);
        if let Some(t) = self.allocator().table(pa) {
            t.meta.live_entries.store(DEAD, Ordering::SeqCst);
            self.collect_below(t.entries, level, out);
        }
        out.push(pa);
    }

    fn collect_below(
        &self,
        entries: &[iopt_api::atomic::AtomicU64],
        level: u32,
        out: &mut Vec<PhysAddr>,
    ) {
        if level < 3 {
            for e in entries {
                let v = e.load(Ordering::Acquire);
                if self.kind(level, v) == Kind::Table {
                    self.collect_tables(v, level + 1, out);
                }
            }
        }
    }

    /// Returns granule-sized table pages to the allocator in one bulk call.
    pub fn free_tables(&self, pages: &[PhysAddr]) {
        if pages.is_empty() {
            return;
        }
        self.note_unlinked();
        let c = self.counters();
        c.free_bulk_calls.fetch_add(1, Ordering::Relaxed);
        c.pages_freed
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        c.live_tables
            .fetch_sub(pages.len() as u64, Ordering::Relaxed);
        self.allocator()
            .free_bulk(pages, self.config().granule().size());
    }
}
