//! Deferred reclamation of unlinked tables: epochs, announcements and the limbo.
//!
//! **What.** On a table that frees the tables it empties ([`LiveCounts`]), a thread may have
//! read a table descriptor just before another thread unlinked that table. Unlinked tables
//! are therefore not handed to the allocator at once: they are *retired* with the current
//! epoch and freed, in one batch, once every operation that was running when they were
//! unlinked has finished. This is epoch-based reclamation as in crossbeam-epoch:
//!
//! - an operation *announces* the epoch it entered in, in a slot of its own taken with one
//!   compare-exchange and left with a release store (two parity counters take the overflow
//!   when every slot is busy);
//! - the epoch advances only when every announcement shows the current one, so a table
//!   retired at epoch `e` is unreachable by any running operation once the epoch is `e + 2`.
//!
//! **Bounded limbo.** While some operation stalls (a thread parked in a `walk` callback, say)
//! nothing retired can be freed. Once [`LIMBO_LIMIT`] tables wait, [`Reclaim::full`] tells
//! operations to stop claiming the tables they empty: those stay linked and empty for later
//! maps to reuse, and the engine sweeps them once reclamation has caught up. The reclaim
//! after each operation re-checks only the announcement that blocked it last time (two loads)
//! and scans the limbo at most once per epoch, so a stall costs the other operations nothing.
//!
//! **Slots.** The caller passes a hint (the engine passes the operation's IOVA, by 2 MiB
//! region), so operations on disjoint ranges announce on different cache lines; a collision
//! only costs a probe of the next slot. Nothing depends on stack addresses or thread-local
//! storage (`no_std`, kernel stacks).
//!
//! The atomics come through a shim (`iopt-lpae/src/atomic.rs`), so `loom` model-checks this
//! code itself.
//!
//! [`LiveCounts`]: crate::account::LiveCounts

use crate::atomic::{AtomicBool, AtomicU64, AtomicUsize, Mutex, fence, full_fence_after_rmw, lock};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use iopt_api::PhysAddr;

const SC: Ordering = Ordering::SeqCst;

/// Retired tables waiting for a grace period beyond which no operation claims the tables it
/// empties (see the [module docs](self)). This bounds what one stalled operation can hold
/// back to this many tables plus what the operations in flight retire themselves.
pub const LIMBO_LIMIT: usize = 4096;

/// Announcement slots; a power of two. Under the model checker two suffice (and keep each
/// reclaim's scan to two schedule points).
#[cfg(not(feature = "loom"))]
const SLOTS: usize = 32;
#[cfg(feature = "loom")]
const SLOTS: usize = 2;

#[cfg(feature = "loom")]
std::thread_local! {
    /// Model-checker builds only: makes reclaim ignore announcements, so that a test can show
    /// the checker catching a reader of freed tables (`checkers/tests/loom_engine.rs`).
    #[doc(hidden)]
    pub static IGNORE_ANNOUNCEMENTS: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Whether reclaim honours announcements (always, outside the model checker's negative test).
#[inline]
fn honour_announcements() -> bool {
    #[cfg(feature = "loom")]
    return !IGNORE_ANNOUNCEMENTS.with(core::cell::Cell::get);
    #[cfg(not(feature = "loom"))]
    true
}

/// One announcement: 0 when free, `(epoch << 1) | 1` while an operation that entered at
/// `epoch` holds it. Its owner alone clears it, so leaving is a plain release store.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

/// Counters of operations in flight by epoch parity, on their own cache lines: the fallback
/// when every slot is taken (more operations in flight than slots, or nested guards).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    by_parity: [AtomicUsize; 2],
}

/// Where an operation announced itself.
#[derive(Debug, Clone, Copy)]
pub enum Entered {
    /// It owns this slot.
    Slot(usize),
    /// It is counted in the overflow counter of this epoch's parity.
    Overflow(u64),
}

/// The reclamation state of one engine (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct Reclaim {
    /// Global epoch; a retired table tagged `e` is freed once the epoch reaches `e + 2`.
    epoch: AtomicU64,
    /// Announcements of operations in flight, one operation per slot at a time.
    slots: [Slot; SLOTS],
    /// Operations in flight that found every slot taken, by the parity of their epoch.
    overflow: Shard,
    /// Tables retired and not yet freed (a fast check before taking the lock).
    pending: AtomicUsize,
    /// Retired tables with their epoch.
    limbo: Mutex<Vec<(u64, PhysAddr)>>,
    /// The epoch at which the limbo was last drained of every table then ready (a hint,
    /// written under the limbo's lock).
    drained_at: AtomicU64,
    /// The slot, and the announcement in it, that stopped the last reclaim (a hint).
    blocked_slot: AtomicUsize,
    blocked_by: AtomicU64,
    /// Set when an operation left an emptied table linked because the limbo was full.
    unswept: AtomicBool,
}

/// The first slot an operation tries, from its hint: operations 2 MiB or more apart spread
/// over the slots.
#[inline]
fn first_slot(hint: u64) -> usize {
    let h = (hint >> 21).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 59) as usize & (SLOTS - 1)
}

impl Reclaim {
    /// Announces an operation: tables reachable now stay allocated until it
    /// [exits](Self::exit).
    pub fn enter(&self, hint: u64) -> Entered {
        // An epoch that moved on between the load and the exchange is harmless: an older
        // announcement only holds reclamation back further.
        let start = first_slot(hint);
        for k in 0..SLOTS {
            let i = (start + k) & (SLOTS - 1);
            let slot = &self.slots[i].0;
            if slot.load(Ordering::Relaxed) != 0 {
                continue;
            }
            // SeqCst: the epoch is read in the total order the reclaimer's advance writes it.
            let e = self.epoch.load(SC);
            // SeqCst, with the fence after it: pairs with the reclaimer's fence and slot
            // loads in `reclaim`, so a reclaimer that misses this announcement advanced the
            // epoch before it, and this operation cannot reach tables retired before that.
            if slot
                .compare_exchange(0, (e << 1) | 1, SC, Ordering::Relaxed)
                .is_ok()
            {
                full_fence_after_rmw();
                return Entered::Slot(i);
            }
        }
        self.enter_overflow()
    }

    /// [`enter`](Self::enter) when every slot is taken: a shared counter per epoch parity,
    /// re-checked against the epoch (a parity counter, unlike a slot, cannot say how old its
    /// members are).
    #[cold]
    fn enter_overflow(&self) -> Entered {
        loop {
            let e = self.epoch.load(SC);
            let count = &self.overflow.by_parity[(e & 1) as usize];
            // SeqCst: as the slot exchange in `enter`; the reclaimer loads the counter of the
            // other parity before advancing.
            count.fetch_add(1, SC);
            full_fence_after_rmw();
            if self.epoch.load(SC) == e {
                return Entered::Overflow(e);
            }
            count.fetch_sub(1, SC);
        }
    }

    /// Ends an operation. Pushes into `ready` the tables nothing can reach any more (the
    /// caller frees them) and returns whether emptied tables were left linked and the limbo
    /// has room again (the caller sweeps them).
    pub fn exit(&self, at: Entered, ready: &mut Vec<PhysAddr>) -> bool {
        match at {
            // Release: every table read of the operation happens before a reclaimer that
            // sees the slot free (its SeqCst load).
            Entered::Slot(i) => self.slots[i].0.store(0, Ordering::Release),
            // SeqCst: as the increment in `enter_overflow`.
            Entered::Overflow(e) => {
                self.overflow.by_parity[(e & 1) as usize].fetch_sub(1, SC);
            }
        }
        // SeqCst: pairs with the increment in `retire`, so a table retired before this
        // operation's exit is seen here (or by the exit of an operation after it).
        if self.pending.load(SC) != 0 {
            self.reclaim(ready);
        }
        self.unswept.load(Ordering::Relaxed)
            && self.pending.load(Ordering::Relaxed) < LIMBO_LIMIT / 2
            && self.unswept.swap(false, Ordering::Relaxed)
    }

    /// Hands unlinked (and flushed) tables to reclamation, tagged with the current epoch.
    #[inline]
    pub fn retire(&self, dead: &[PhysAddr]) {
        if !dead.is_empty() {
            self.retire_some(dead);
        }
    }

    #[inline(never)]
    fn retire_some(&self, dead: &[PhysAddr]) {
        // SeqCst fence and load: the unlinks before happen before the epoch is read, so any
        // operation that could still reach these tables announced an epoch no newer than it.
        fence(SC);
        let e = self.epoch.load(SC);
        let mut limbo = lock(&self.limbo);
        limbo.extend(dead.iter().map(|&p| (e, p)));
        // SeqCst: pairs with the load in `exit`.
        self.pending.fetch_add(dead.len(), SC);
    }

    /// Whether the limbo is full: operations should leave the tables they empty linked.
    #[inline]
    pub fn full(&self) -> bool {
        if self.pending.load(Ordering::Relaxed) >= LIMBO_LIMIT {
            self.unswept.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Advances the epoch as far as finished operations allow and moves into `ready` every
    /// retired table no running operation can still reach.
    fn reclaim(&self, ready: &mut Vec<PhysAddr>) {
        // A stalled operation holds the epoch back. While the slot that stopped the last
        // attempt still shows the same announcement (an epoch older than the current one,
        // and the epoch only grows), no attempt can succeed and nothing new became free.
        // Relaxed: hints, re-validated by the full scan whenever they say go.
        let b = self.blocked_slot.load(Ordering::Relaxed);
        if let Some(s) = self.slots.get(b) {
            let v = self.blocked_by.load(Ordering::Relaxed);
            if v != 0
                && s.0.load(Ordering::Relaxed) == v
                && self.drained_at.load(Ordering::Relaxed) == self.epoch.load(Ordering::Relaxed)
            {
                return;
            }
        }
        for _ in 0..2 {
            // SeqCst fence: pairs with the one after the announcing exchange in `enter`.
            fence(SC);
            let e = self.epoch.load(SC);
            let old = ((e + 1) & 1) as usize;
            // SeqCst: pairs with the announcing exchange in `enter`, so an operation that
            // read tables unlinked before this point is seen here.
            let behind = self.slots.iter().enumerate().find_map(|(i, s)| {
                let v = s.0.load(SC);
                (v != 0 && v >> 1 != e && honour_announcements()).then_some((i, v))
            });
            if let Some((i, v)) = behind {
                self.blocked_by.store(v, Ordering::Relaxed);
                self.blocked_slot.store(i, Ordering::Relaxed);
                break;
            }
            // SeqCst: pairs with the increment in `enter_overflow`.
            if self.overflow.by_parity[old].load(SC) != 0 && honour_announcements() {
                break;
            }
            // SeqCst: the epoch's total order is what `enter` and `retire` read.
            let _ = self.epoch.compare_exchange(e, e + 1, SC, SC);
        }
        let now = self.epoch.load(SC);
        // Tables retired after the last drain carry an epoch at least that drain's, so none
        // of them is ready unless the epoch moved since: scan the limbo once per epoch.
        if self.drained_at.load(Ordering::Relaxed) == now {
            return;
        }
        let start = ready.len();
        {
            let mut limbo = lock(&self.limbo);
            limbo.retain(|&(e, p)| {
                if e + 2 <= now {
                    ready.push(p);
                    false
                } else {
                    true
                }
            });
            self.drained_at.fetch_max(now, Ordering::Relaxed);
        }
        if ready.len() > start {
            // SeqCst: as the increment in `retire`.
            self.pending.fetch_sub(ready.len() - start, SC);
        }
    }

    /// Takes every retired table (the caller has exclusive access: no operation runs).
    pub fn drain(&mut self) -> Vec<PhysAddr> {
        let items = core::mem::take(&mut *lock(&self.limbo));
        self.pending.store(0, SC);
        items.into_iter().map(|(_, p)| p).collect()
    }

    /// Tables retired and not yet freed.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.pending.load(SC)
    }
}
