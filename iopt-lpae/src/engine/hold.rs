//! Holds: the tables a reservation's maps installed from its own pages, kept for it until it
//! is released.
//!
//! **Why.** On an engine that frees the tables it empties
//! ([`LiveCounts`](crate::account::LiveCounts)), a Design 1 reservation's pool pays for the
//! tables its maps install once. Without holds, unmapping those maps frees the tables (to the
//! allocator, not back to the pool), and mapping the same range again inside the same live
//! reservation finds the pool empty: the reservation would be single-use, and its promise
//! that a map inside it cannot fail for memory broken.
//!
//! **What.** A [`PageSource`] whose pages belong to a reservation says so with
//! [`PageSource::HOLDS`]. Each table a map builds from such pages is then *held*: its
//! `reservations` count is raised by [`HELD`] while the table is still private to the map
//! (before the exchange that publishes the chain), so there is no instant at which another
//! thread could claim it; after the exchange the engine reports the chain to the source
//! ([`PageSource::held`]), which records it in its [`Holds`]. A held table counts as reserved
//! everywhere the engine looks at reservations, exactly as Design 2's: an unmap that empties
//! it leaves it linked and empty, ready for the next map; a block map over it, or an unmap at
//! its parent's block size, is refused with `ReservedTable`. [`Engine::release_held`] drops
//! the holds and, through the engine's own claiming pass (`collapse`, which also serves
//! Design 2's release and the sweep), frees every table left with neither
//! live entries nor reservations, with the ancestors that empties; tables still holding
//! leaves stay, to be freed by the unmaps that empty them.
//!
//! **A held table unlinked from above.** An unmap at the block size of an *unheld* ancestor
//! (a table that was there before the reservation's map) removes the whole subtree. The
//! engine then leaves each held table in it to its holder: `collect_tables` marks it
//! *orphaned* instead of freeing it, and `release_held` frees it (after the grace period, as
//! every unlinked table). One read-modify-write on the `reservations` word each decides who
//! frees it — the later of the unmap's `fetch_or(ORPHAN)` and the release's
//! `fetch_and(!HELD)` — so it is freed exactly once, and a released hold never touches a page
//! that went back to the allocator. [`HELD`] is a bit no Design 2 count reaches, so a Design
//! 2 reservation (whose tables its release finds by walking the tree) is never orphaned.
//!
//! **Cost.** Holding is decided by the types: with [`Untracked`](crate::account::Untracked)
//! or a source that does not hold, every function here compiles to nothing on the map path,
//! and `collect_tables` pays one predictable branch only on a counting engine.

use super::{Engine, PageSource};
use crate::account::Accounting;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use iopt_api::{FlushOps, PhysAddr, TableAlloc, TableMeta, TableRef};

/// What a hold adds to a table's `reservations` count: a bit no count of Design 2's
/// reservations reaches, so that an unmap can tell a held table from a reserved one.
pub const HELD: u32 = 1 << 30;

/// Set in the `reservations` word of a held table an unmap unlinked: its holder frees it.
const ORPHAN: u32 = 1 << 31;

const SC: Ordering = Ordering::SeqCst;

/// A chain of tables a map just published from a holding source's pages.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a> {
    /// The chain's tables, the one linked into the existing tree first.
    pub tables: &'a [PhysAddr],
    /// First local IOVA the chain's last (deepest) table covers.
    pub start: u64,
    /// Local IOVA after the last one it covers.
    pub end: u64,
}

/// The tables a holder holds, and where: what [`Engine::release_held`] gives up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holds {
    tables: Vec<PhysAddr>,
    /// The IOVA spans of the chains' deepest tables: every held table lies on the path to
    /// one of them.
    spans: Vec<(u64, u64)>,
}

impl Holds {
    /// Records a chain reported through [`PageSource::held`].
    pub fn record(&mut self, chain: Chain<'_>) {
        self.tables.extend_from_slice(chain.tables);
        if self.spans.last() != Some(&(chain.start, chain.end)) {
            self.spans.push((chain.start, chain.end));
        }
    }

    /// The tables held.
    #[must_use]
    pub fn tables(&self) -> &[PhysAddr] {
        &self.tables
    }

    /// Whether nothing is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Marks the tables of a private chain held, if pages from `S` are held and the engine
    /// counts (nothing otherwise, at compile time).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(super) fn hold_private<S: PageSource>(chain: &[TableRef<'_>]) {
        if K::COUNTS && S::HOLDS {
            for t in chain {
                // Relaxed: the table is private; the exchange that publishes the chain
                // releases this with everything else written into it.
                t.meta.reservations.store(HELD, Ordering::Relaxed);
            }
        }
    }

    /// Reports a chain just published from `src`'s pages (`pages`, its deepest table at
    /// level `target` covering local IOVA `iova`) to `src`, if it holds them.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(super) fn held_published<S: PageSource>(
        &self,
        src: &mut S,
        pages: &[PhysAddr],
        iova: u64,
        target: u32,
    ) {
        if K::COUNTS && S::HOLDS {
            let span = self.config().block_size(target - 1);
            let start = iova & !(span - 1);
            src.held(Chain {
                tables: pages,
                start,
                end: start.saturating_add(span),
            });
        }
    }

    /// Called by [`collect_tables`](Engine::collect_tables) on a table it just claimed
    /// (`DEAD`) after unlinking it: whether the table is held, and so left to its holder
    /// (orphaned) instead of being freed now.
    #[inline]
    pub(super) fn orphaned(meta: &TableMeta) -> bool {
        // SeqCst, the load and both exchanges: ordered with the holder's `fetch_and` in
        // `release_held`; of the two read-modify-writes, the later one frees the table.
        if !K::COUNTS || meta.reservations.load(SC) & HELD == 0 {
            return false;
        }
        if meta.reservations.fetch_or(ORPHAN, SC) & HELD != 0 {
            return true;
        }
        // Released meanwhile: the holder saw no orphan, so the table is ours to free.
        meta.reservations.fetch_and(!ORPHAN, SC);
        false
    }

    /// Gives up the tables `holds` holds (all of them held through one [`PageSource`] of this
    /// engine) and frees, through the engine's claiming pass and after the grace period,
    /// every one left with neither live entries nor reservations, with the ancestors that
    /// empties; tables that still hold leaves stay (the unmaps that empty them free them).
    /// Held tables an unmap unlinked meanwhile are freed here. `holds` is left empty.
    ///
    /// Must be called exactly once per recorded chain (the engine does not track holders);
    /// nothing to do on an engine that does not count.
    pub fn release_held(&self, holds: &mut Holds) {
        if !K::COUNTS || holds.is_empty() {
            holds.tables.clear();
            holds.spans.clear();
            return;
        }
        let guard = self.enter();
        let mut dead = Vec::new();
        for &pa in &holds.tables {
            // Every held table is either linked (nothing frees a held table) or orphaned
            // (left to us): its page is still ours.
            let Some(t) = self.allocator().table(pa) else {
                debug_assert!(false, "held table {pa:?} is gone");
                continue;
            };
            // SeqCst: ordered with `orphaned`'s exchanges (the later frees) and with the
            // reservation checks of `try_claim`, so a claim after this sees it unreserved.
            let before = t.meta.reservations.fetch_and(!HELD, SC);
            debug_assert!(before & HELD != 0, "table {pa:?} was not held");
            if before & ORPHAN != 0 {
                // Unlinked and flushed by the unmap that orphaned it.
                dead.push(pa);
            }
        }
        let spans = &mut holds.spans;
        spans.sort_unstable();
        if let Some(root) = self.root_frame() {
            let mut at = 0;
            while at < spans.len() {
                let (a, mut b) = spans[at];
                at += 1;
                while at < spans.len() && spans[at].0 <= b {
                    b = b.max(spans[at].1);
                    at += 1;
                }
                self.collapse(root, a, b, None, None, false, &mut dead);
            }
        }
        self.retire(&dead);
        drop(guard);
        holds.tables.clear();
        holds.spans.clear();
    }
}
