//! How an engine accounts for its table pages: the type parameter that makes the designs.
//!
//! The walker ([`Engine`](crate::Engine)) is written once. Everything that differs between
//! Linux's semantics and a table that frees the tables it empties is a handful of primitives
//! on a table's [`TableMeta`] and on its entries, chosen by the engine's [`Accounting`] type:
//!
//! - [`Untracked`] (zero-sized): Linux io-pgtable-arm. No counts; a table is freed only when
//!   an unmap at its parent's block size or a block map removes it, or at teardown, and then
//!   at once. Entries are written with plain release stores, as Linux does: overlapping calls
//!   are the caller's bug and may lose each other's leaves.
//! - [`LiveCounts`]: every table counts its valid entries (and the reservations that hold
//!   it); a table left with neither is unlinked and freed by the operation that emptied it,
//!   after a grace period ([`crate::reclaim`]). Every entry transition is a compare-exchange
//!   so that each is counted exactly once even when callers overlap.
//! - [`ReservationCounts`]: the seed message's Design 2, literally. A table counts only the
//!   reservations that hold it ("how many callers have reserved the page"); unmaps never free,
//!   and "unallocate VA" frees the tables its range leaves unreserved and empty. Entries are
//!   written with plain stores. A map outside any reservation pins its leaf table for the
//!   moment of the write, so that a concurrent release cannot free the table under it; a map
//!   inside a reservation ([`PageSource::PATH_HELD`](crate::PageSource::PATH_HELD)) needs no pin and no
//!   grace period at all.
//!
//! The primitives compile to nothing (or to the plain store) for [`Untracked`], so the
//! shared paths cost Linux's table nothing. The engine calls down into these, never the
//! reverse: a primitive answers, the engine acts (unlinks, flushes, frees).

use crate::reclaim::{Entered, Reclaim};
use core::fmt::Debug;
use core::sync::atomic::Ordering;
use iopt_api::atomic::AtomicU64;
use iopt_api::{PhysAddr, TableMeta, TableRef};

/// The live count of a table that has been claimed for freeing: no thread may write into it
/// any more, and it is unlinked and freed shortly.
pub const DEAD: u32 = u32::MAX;

const SC: Ordering = Ordering::SeqCst;

mod sealed {
    pub trait Sealed {}
}

/// How an engine accounts for its table pages (see the [module docs](self)). Sealed: the
/// engine's correctness rests on these exact primitives.
#[doc(hidden)]
pub trait Accounting: sealed::Sealed + Default + Debug + Send + Sync + 'static {
    /// Whether the engine keeps live counts (and may free tables it empties).
    const COUNTS: bool;
    /// The ordering of descriptor loads on shared paths. `SeqCst` where entry transitions are
    /// ordered with count updates (see `LiveCounts`), `Acquire` otherwise (pairs with the
    /// release store or exchange that published the descriptor).
    const LOAD: Ordering;
    /// The success ordering of descriptor exchanges (table installs, removals).
    const RMW: Ordering;

    /// Announces an operation (nothing to do without deferred frees). `hint` spreads
    /// operations over announcement slots: the caller passes its IOVA.
    fn enter(&self, hint: u64) -> Option<Entered>;
    /// Ends an operation; returns the tables whose grace period has ended, for the engine to
    /// free, and whether the engine should sweep emptied tables left linked.
    fn exit(&self, at: Entered, ready: &mut alloc::vec::Vec<PhysAddr>) -> bool;
    /// Hands tables the operation unlinked to reclamation: freed now (`true`: the caller
    /// frees them) or after the grace period (`false`: kept here).
    fn retire(&self, dead: &[PhysAddr]) -> bool;
    /// Whether the limbo is full, so an emptied table should stay linked for now.
    fn hold_back(&self) -> bool;
    /// Takes every retired table (no operation can be running).
    fn drain(&mut self) -> alloc::vec::Vec<PhysAddr>;
    /// Tables waiting for their grace period.
    fn deferred(&self) -> usize;

    /// Raises a table's count by `n` before writing `n` entries into it, unless the table is
    /// being freed (`false`: walk again from the root). `held`: a reservation holds every
    /// table of the caller's path for the whole call (see [`PageSource::PATH_HELD`]), so nothing
    /// can free them.
    ///
    /// [`PageSource::PATH_HELD`]: crate::PageSource::PATH_HELD
    fn pin(meta: &TableMeta, n: u32, held: bool) -> bool;
    /// The `n` entries pinned were written: where pins are transient, give them back.
    fn settle(meta: &TableMeta, n: u32, held: bool);
    /// Gives back `n` pins that were not used; the count before, where a count of entries
    /// is kept and the table is not being freed (the caller then frees it if that emptied
    /// it).
    fn unpin(meta: &TableMeta, n: u32, held: bool) -> Option<u32>;
    /// `n` entries were removed (leaves, or links to tables this caller unlinked); the count
    /// before, as for [`unpin`](Self::unpin).
    fn removed(meta: &TableMeta, n: u32) -> Option<u32>;
    /// [`pin`](Self::pin) for a caller that holds the engine exclusively.
    fn pin_exclusive(meta: &TableMeta, n: u32) -> bool;
    /// Lowers the count by one for a caller holding the engine exclusively, only when the
    /// table keeps other entries (`false`: nothing done).
    fn unpin_exclusive_keeps(meta: &TableMeta) -> bool;
    /// Claims table `t` for freeing if it holds exactly `links` valid entries (the caller's
    /// own claimed children, still linked) and no reservation. `Untracked` has nothing to
    /// claim and always succeeds (a block map replacing an empty table).
    fn try_claim(t: TableRef<'_>, links: u32) -> bool;
    /// Undoes a claim made with `links` that turned out unneeded.
    fn unclaim(meta: &TableMeta, links: u32);
    /// Sets the count of a table being built privately, which holds `n` valid entries.
    fn set_count(meta: &TableMeta, n: u32);

    /// Writes consecutive leaves into entries checked empty and pinned for them. `Err((k,
    /// units))`: entry `k` was taken meanwhile; what this call wrote is taken back and `units`
    /// count units go back to the table.
    fn put_leaves(slots: &[AtomicU64], attrs: u64, pa: u64, size: u64) -> Result<(), (u64, u32)>;
    /// Writes one leaf into an entry checked empty and pinned for it; `false` (nothing
    /// written) if another caller took the entry meanwhile.
    fn put_leaf(slot: &AtomicU64, desc: u64) -> bool;
    /// Clears `slots`, every one a leaf, in one pass; `false` (nothing done) where each
    /// removal must be counted on its own.
    fn clear_leaves(slots: &[AtomicU64]) -> bool;
    /// Removes the descriptor `old` from `slot`; `false` if another caller changed it first.
    fn remove(slot: &AtomicU64, old: u64) -> bool;
    /// Replaces the descriptor `old` in `slot` with `new`; `false` if it changed meanwhile.
    fn replace(slot: &AtomicU64, old: u64, new: u64) -> bool;
}

/// The entry writes of an accounting that counts no entries: plain release stores, as Linux
/// writes them (each pairs with the walker's and lookups' acquire loads of the entry).
/// Overlapping callers are the caller's bug and may lose each other's leaves, never a count.
macro_rules! plain_entry_writes {
    () => {
        #[inline]
        fn put_leaves(
            slots: &[AtomicU64],
            attrs: u64,
            pa: u64,
            size: u64,
        ) -> Result<(), (u64, u32)> {
            crate::engine::write_leaves(slots, attrs, pa, size, Ordering::Release);
            Ok(())
        }
        #[inline]
        fn put_leaf(slot: &AtomicU64, desc: u64) -> bool {
            slot.store(desc, Ordering::Release);
            true
        }
        #[inline]
        fn clear_leaves(slots: &[AtomicU64]) -> bool {
            crate::engine::clear_all(slots, Ordering::Release);
            true
        }
        #[inline]
        fn remove(slot: &AtomicU64, _: u64) -> bool {
            slot.store(0, Ordering::Release);
            true
        }
        #[inline]
        fn replace(slot: &AtomicU64, _: u64, new: u64) -> bool {
            slot.store(new, Ordering::Release);
            true
        }
    };
}

/// Linux's semantics: no counts, frees at once. See the [module docs](self).
#[derive(Debug, Default, Clone, Copy)]
pub struct Untracked;

impl sealed::Sealed for Untracked {}

impl Accounting for Untracked {
    const COUNTS: bool = false;
    const LOAD: Ordering = Ordering::Acquire;
    const RMW: Ordering = Ordering::AcqRel;

    #[inline]
    fn enter(&self, _: u64) -> Option<Entered> {
        None
    }
    #[inline]
    fn exit(&self, _: Entered, _: &mut alloc::vec::Vec<PhysAddr>) -> bool {
        false
    }
    #[inline]
    fn retire(&self, _: &[PhysAddr]) -> bool {
        true
    }
    #[inline]
    fn hold_back(&self) -> bool {
        false
    }
    fn drain(&mut self) -> alloc::vec::Vec<PhysAddr> {
        alloc::vec::Vec::new()
    }
    fn deferred(&self) -> usize {
        0
    }
    #[inline]
    fn pin(_: &TableMeta, _: u32, _: bool) -> bool {
        true
    }
    #[inline]
    fn settle(_: &TableMeta, _: u32, _: bool) {}
    #[inline]
    fn unpin(_: &TableMeta, _: u32, _: bool) -> Option<u32> {
        None
    }
    #[inline]
    fn removed(_: &TableMeta, _: u32) -> Option<u32> {
        None
    }
    #[inline]
    fn pin_exclusive(_: &TableMeta, _: u32) -> bool {
        true
    }
    #[inline]
    fn unpin_exclusive_keeps(_: &TableMeta) -> bool {
        true
    }
    #[inline]
    fn try_claim(_: TableRef<'_>, _: u32) -> bool {
        true
    }
    #[inline]
    fn unclaim(_: &TableMeta, _: u32) {}
    #[inline]
    fn set_count(_: &TableMeta, _: u32) {}

    plain_entry_writes!();
}

/// Claims a table whose count is `expected` and which no reservation holds: the count goes
/// to [`DEAD`].
fn claim_counted(meta: &TableMeta, expected: u32) -> bool {
    loop {
        // SeqCst, all four: a reservation is taken under a pin (`reserve_walk`), so the
        // claim's exchange and the reservation checks around it must be totally ordered with
        // that pin and the reservation increment.
        if meta.reservations.load(SC) != 0 {
            return false;
        }
        if meta
            .live_entries
            .compare_exchange(expected, DEAD, SC, SC)
            .is_err()
        {
            return false;
        }
        if meta.reservations.load(SC) == 0 {
            return true;
        }
        // A reservation was taken between the first check and the claim (under a pin that
        // was released again). Undo; retry only if it has been released meanwhile, since its
        // releaser may have seen DEAD and left the freeing to us.
        meta.live_entries.store(expected, SC);
    }
}

/// The operation hooks of an accounting that frees tables while other operations may read
/// them: every one goes to its [`Reclaim`] (the grace period of [`crate::reclaim`]).
macro_rules! deferred_reclamation {
    () => {
        #[inline]
        fn enter(&self, hint: u64) -> Option<Entered> {
            Some(self.reclaim.enter(hint))
        }
        #[inline]
        fn exit(&self, at: Entered, ready: &mut alloc::vec::Vec<PhysAddr>) -> bool {
            self.reclaim.exit(at, ready)
        }
        #[inline]
        fn retire(&self, dead: &[PhysAddr]) -> bool {
            self.reclaim.retire(dead);
            false
        }
        #[inline]
        fn hold_back(&self) -> bool {
            self.reclaim.full()
        }
        fn drain(&mut self) -> alloc::vec::Vec<PhysAddr> {
            self.reclaim.drain()
        }
        fn deferred(&self) -> usize {
            self.reclaim.pending()
        }
    };
}

/// Live-entry counts, eager freeing, deferred reclamation. See the [module docs](self) and
/// [`crate::reclaim`].
#[derive(Debug, Default)]
pub struct LiveCounts {
    reclaim: Reclaim,
}

impl sealed::Sealed for LiveCounts {}

impl Accounting for LiveCounts {
    const COUNTS: bool = true;
    // SeqCst on every entry load, exchange and count update of a counting engine: a claimer's
    // `count: 0 → DEAD` and a writer's pin-then-exchange must be totally ordered with the
    // entry exchanges that changed the count, or a claimer could free a table a writer just
    // wrote a leaf into (the store→load order acquire/release does not give).
    const LOAD: Ordering = Ordering::SeqCst;
    const RMW: Ordering = Ordering::SeqCst;

    deferred_reclamation!();

    #[inline]
    fn pin(meta: &TableMeta, n: u32, _: bool) -> bool {
        // SeqCst: ordered with `try_claim`'s exchange (a pinned table cannot be claimed, a
        // claimed one cannot be pinned) and with the entry exchanges that follow. A held
        // table is pinned too: the pins become the counts of the entries written.
        meta.live_entries
            .fetch_update(SC, SC, |c| (c != DEAD).then(|| c + n))
            .is_ok()
    }
    #[inline]
    fn settle(_: &TableMeta, _: u32, _: bool) {
        // The pins are now the written entries' counts.
    }
    #[inline]
    fn unpin(meta: &TableMeta, n: u32, _: bool) -> Option<u32> {
        Self::removed(meta, n)
    }
    #[inline]
    fn removed(meta: &TableMeta, n: u32) -> Option<u32> {
        // SeqCst: a zero this produces is what `try_claim`'s exchange must see, ordered with
        // the entry exchange that removed the last leaf. A DEAD count means an overlapping
        // block unmap tore the subtree down: the count means nothing any more. Every unit
        // given back was added by this caller, so the count never goes below zero.
        let before = meta
            .live_entries
            .fetch_update(SC, SC, |c| (c != DEAD).then(|| c.wrapping_sub(n)))
            .ok()?;
        debug_assert!(before >= n, "live count {before} lowered by {n}");
        Some(before)
    }
    #[inline]
    fn pin_exclusive(meta: &TableMeta, n: u32) -> bool {
        // Relaxed: no other operation runs (`&mut` engine).
        let live = meta.live_entries.load(Ordering::Relaxed);
        if live == DEAD {
            return false;
        }
        meta.live_entries.store(live + n, Ordering::Relaxed);
        true
    }
    #[inline]
    fn unpin_exclusive_keeps(meta: &TableMeta) -> bool {
        let live = meta.live_entries.load(Ordering::Relaxed);
        if live <= 1 || live == DEAD {
            return false;
        }
        meta.live_entries.store(live - 1, Ordering::Relaxed);
        true
    }
    fn try_claim(t: TableRef<'_>, links: u32) -> bool {
        claim_counted(t.meta, links)
    }
    #[inline]
    fn unclaim(meta: &TableMeta, expected: u32) {
        // SeqCst: a pin that failed on DEAD retries; it must see the table alive again.
        meta.live_entries.store(expected, SC);
    }
    #[inline]
    fn set_count(meta: &TableMeta, n: u32) {
        // Relaxed: the table is private until the exchange that publishes it.
        meta.live_entries.store(n, Ordering::Relaxed);
    }

    #[inline]
    fn put_leaves(slots: &[AtomicU64], attrs: u64, pa: u64, size: u64) -> Result<(), (u64, u32)> {
        let n = slots.len() as u64;
        let at = |k: usize| attrs | crate::desc::pack_pa(PhysAddr::new(pa + k as u64 * size));
        for (k, e) in slots.iter().enumerate() {
            // SeqCst (see `LOAD`): ordered with the pin before it and the count updates of
            // whoever removes the leaf later. From zero, so an overlapping map that got there
            // first is seen, not overwritten with its count unit lost.
            if e.compare_exchange(0, at(k), SC, SC).is_err() {
                let taken_back = slots[..k]
                    .iter()
                    .enumerate()
                    .filter(|&(j, e)| e.compare_exchange(at(j), 0, SC, SC).is_ok())
                    .count() as u32;
                return Err((k as u64, (n - k as u64) as u32 + taken_back));
            }
        }
        Ok(())
    }
    #[inline]
    fn put_leaf(slot: &AtomicU64, desc: u64) -> bool {
        // SeqCst, as `put_leaves`.
        slot.compare_exchange(0, desc, SC, SC).is_ok()
    }
    #[inline]
    fn clear_leaves(_: &[AtomicU64]) -> bool {
        false
    }
    #[inline]
    fn remove(slot: &AtomicU64, old: u64) -> bool {
        // SeqCst (see `LOAD`): exactly once, so two overlapping unmaps of one entry cannot
        // both lower the table's count.
        slot.compare_exchange(old, 0, SC, SC).is_ok()
    }
    #[inline]
    fn replace(slot: &AtomicU64, old: u64, new: u64) -> bool {
        // SeqCst (see `LOAD`).
        slot.compare_exchange(old, new, SC, SC).is_ok()
    }
}

/// Accountings that keep reservation counts, on which the engine offers Design 2's
/// `reserve_tables` and `release_tables`.
#[doc(hidden)]
pub trait Reserving: Accounting {}

impl Reserving for LiveCounts {}

/// Reservation counts only: the seed's Design 2. See the [module docs](self).
#[derive(Debug, Default)]
pub struct ReservationCounts {
    reclaim: Reclaim,
}

impl sealed::Sealed for ReservationCounts {}

impl Reserving for ReservationCounts {}

impl Accounting for ReservationCounts {
    const COUNTS: bool = false;
    // Acquire: descriptors are published by release stores and exchanges; the claims of a
    // release order themselves through the pin count (see `try_claim`).
    const LOAD: Ordering = Ordering::Acquire;
    const RMW: Ordering = Ordering::AcqRel;

    deferred_reclamation!();

    #[inline]
    fn pin(meta: &TableMeta, n: u32, held: bool) -> bool {
        // SeqCst: ordered with a release's claim (`try_claim`'s exchange): a pinned table
        // cannot be claimed, a claimed one cannot be pinned.
        held || meta
            .live_entries
            .fetch_update(SC, SC, |c| (c != DEAD).then(|| c + n))
            .is_ok()
    }
    #[inline]
    fn settle(meta: &TableMeta, n: u32, held: bool) {
        if !held {
            // SeqCst: pairs with the claim's exchange, which reads this value: the entries
            // written before it are then visible to the claim's scan.
            meta.live_entries.fetch_sub(n, SC);
        }
    }
    #[inline]
    fn unpin(meta: &TableMeta, n: u32, held: bool) -> Option<u32> {
        Self::settle(meta, n, held);
        None
    }
    #[inline]
    fn removed(_: &TableMeta, _: u32) -> Option<u32> {
        // Entries are not counted: unmaps never free.
        None
    }
    #[inline]
    fn pin_exclusive(_: &TableMeta, _: u32) -> bool {
        true
    }
    #[inline]
    fn unpin_exclusive_keeps(_: &TableMeta) -> bool {
        true
    }
    fn try_claim(t: TableRef<'_>, links: u32) -> bool {
        // No pin in flight and no reservation (as `LiveCounts`, with a count of pins only),
        // then a scan: the table must hold nothing but the caller's claimed children. A
        // writer pins before it writes and unpins after, so a claim that wins the exchange
        // sees every entry written before the last unpin (SeqCst exchange, acquiring the
        // unpin's value), and no entry can be written after it (pins fail on DEAD).
        if !claim_counted(t.meta, 0) {
            return false;
        }
        // SeqCst: after the claim in the total order, as the scan must be.
        let valid = t.entries.iter().filter(|e| e.load(SC) != 0).count();
        if valid == links as usize {
            return true;
        }
        t.meta.live_entries.store(0, SC);
        false
    }
    #[inline]
    fn unclaim(meta: &TableMeta, _: u32) {
        // SeqCst: a pin that failed on DEAD retries; it must see the table alive again.
        meta.live_entries.store(0, SC);
    }
    #[inline]
    fn set_count(_: &TableMeta, _: u32) {}

    plain_entry_writes!();
}
