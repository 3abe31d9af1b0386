//! Reference counting for the engine: live-entry counts, VA reservations and eager freeing.
//!
//! An engine built with [`Engine::with_policy`]`(.., `[`Policy::Refcounted`]`)` keeps, in the
//! [`TableMeta`] the allocator stores beside every table page:
//!
//! - `live_entries`: the number of valid descriptors in the table (root included), maintained
//!   by every map, unmap, install and free; transiently higher while an operation has *pinned*
//!   the table (see below), and [`DEAD`] once the table has been claimed for freeing;
//! - `reservations`: the number of live reservations covering the table. The root is never
//!   counted: it is never freed, so a reservation on it would mean nothing.
//!
//! and it changes three behaviours of the walker:
//!
//! - a table left empty (no valid descriptor, no pin) that no reservation holds is unlinked and
//!   freed by the operation that emptied it, with its ancestors when they empty too (eager
//!   freeing): a full unmap returns the tree to the root alone;
//! - a block map over a table that a reservation holds fails with [`MapError::ReservedTable`],
//!   and an unmap at block size of such a table with [`UnmapError::ReservedTable`] (Linux would
//!   free the table);
//! - [`Engine::reserve_tables`] and [`Engine::release_tables`] install and count, then
//!   uncount and free, the tables covering a range (Design 2).
//!
//! With [`Policy::Linux`] (the default of [`Engine::new`]) nothing is counted and none of this
//! code runs: the existing paths pay one predictable branch.
//!
//! # Which tables a reservation covers
//!
//! `reserve(range, max_leaf)` plans leaves the way `map_range` would place them for backing
//! that is congruent to the IOVA (the Linux iommu core's `iommu_pgsize`, restricted to sizes up
//! to `max_leaf`): a slot at level `l` gets a leaf when it lies wholly inside the range and a
//! leaf of its size is allowed there (supported by the table and not larger than `max_leaf`);
//! every other slot the range touches needs a table at level `l + 1`. The reservation
//! installs exactly those tables (counting first, against the current tree, so it takes
//! exactly the missing pages in one bulk allocation) and increments the reservation count of
//! each of them, existing ones included. This is what makes the worked examples of
//! `designs.md` §8 come out exactly: one `reserve` of 1 GiB at +4 KiB with `max_leaf = 2 MiB`
//! takes 5 pages, not the 516 of the worst case.
//!
//! # Concurrency
//!
//! Operations on disjoint ranges may run concurrently and share intermediate tables. Three
//! mechanisms keep eager freeing from freeing a table that another thread is using:
//!
//! 1. **Pin before write.** A thread that is about to add descriptors to a table first raises
//!    its `live_entries` by that many with a compare-exchange that refuses [`DEAD`]; a thread
//!    that installs a table into a parent pins the parent the same way before its
//!    compare-exchange (and unpins it if it loses the race). A table with a non-zero count can
//!    therefore not be claimed, and a claimed table can never be written again: the writer
//!    sees `DEAD` and walks again from the root, where it finds the slot empty once the
//!    claimer has unlinked it.
//! 2. **Claim.** Freeing starts with `live_entries: expected → DEAD`, where `expected` is the
//!    number of the claimer's own already-claimed children still linked in the table (0 for a
//!    leaf-level table), followed by a check that `reservations` is 0; if a reservation raced
//!    in, the claim is undone and retried only if the reservation count dropped back to 0 in
//!    between (so a concurrent release and a concurrent emptying cannot both give up).
//!    Reservations are only ever taken under a pin, so no reservation can appear on a `DEAD`
//!    table. Only the topmost claimed table of a chain is unlinked from its parent (one
//!    store, one [`FlushOps::flush_walk`] for the span it covered); the parent's count then
//!    drops by one, and whoever drops a count to 0 tries to claim that table in turn.
//! 3. **Deferred reclamation.** A thread may have read a table descriptor just before another
//!    thread unlinked it. Unlinked tables are therefore not handed to the allocator at once:
//!    they are retired with the current epoch and freed, in one `free_bulk` batch, once every
//!    operation that was running when they were unlinked has finished (epoch-based
//!    reclamation as in crossbeam-epoch: an operation announces the epoch it entered in, in a
//!    slot of its own taken with one compare-exchange and left with a plain release store, and
//!    the epoch advances only when every announcement shows the current one; threads spread
//!    over the slots by stack address, so disjoint operations do not share a cache line, and
//!    two parity counters take the overflow when every slot is busy). Every counted operation, and
//!    [`Engine::lookup`] and [`Engine::walk`], runs inside an [`OpGuard`] for this. A
//!    single-threaded caller sees every free happen before its call returns.
//!
//! 4. **Exactly-once accounting.** Every entry transition (a leaf written, a leaf or table
//!    descriptor removed) is a compare-exchange, and only the caller whose exchange succeeded
//!    changes the count for it. Two overlapping unmaps of one page therefore lower the count
//!    once (the second answers [`UnmapError::NotMapped`]); an overlapping map that finds an
//!    entry taken after it checked takes its own leaves back and answers
//!    [`MapError::AlreadyMapped`]. An unmap at block size that removes a table descriptor
//!    marks every table of the subtree [`DEAD`] (leaving one that another thread claimed first
//!    to it), so each is retired exactly once and later pins there fail. Counts cannot drift,
//!    underflow into [`DEAD`], or free a table that holds another caller's leaves.
//! 5. **Cursors are hints for misses.** A cursor (the engine's cached leaf table) is checked
//!    against the unlink count, which is bumped just after each unlink: in between, a cursor
//!    may name a table that was just claimed. Such a table is empty and takes no new leaves
//!    (pins fail), so a hit through a cursor is always right, and a miss ("not mapped") is
//!    checked again by a walk from the root before it is answered.
//! 6. **Bounded limbo.** While some operation stalls (a thread parked in a [`Engine::walk`]
//!    callback, say) no retired table can be freed. Once [`LIMBO_LIMIT`] tables wait,
//!    operations stop claiming the tables they empty: those stay linked and empty, and later
//!    maps reuse them. The reclaim attempt that follows each operation re-checks only the
//!    announcement that stopped the previous attempt (two loads) and scans the limbo at most
//!    once per epoch, so a stall costs the other operations nothing.
//!
//! So under any interleaving of valid (disjoint) operations, no descriptor is written into a
//! table that is being freed, no lookup misses a leaf mapped before it started and still
//! mapped, and no table memory is read after it went back to the allocator. Overlapping
//! concurrent operations remain a caller bug that may lose mappings inside the overlapped
//! range, never another caller's mappings, a count, a page, or memory safety (the crate has
//! no `unsafe`).
//!
//! Paths outside this module that read table memory on a refcounted engine should hold an
//! [`Engine::enter`] guard too. Pages a refcounted map installed and then had to undo (a later
//! segment of the same map failed) go back to the allocator after the grace period, not to
//! the map's page source.

// Interval arithmetic reads best with `a`/`b` bounds, `w` the plan and `f` the frame.
#![allow(clippy::many_single_char_names)]

use crate::desc::{self, Kind};
use crate::engine::{Engine, PageSource, Plan, Run, Stash, all_zero, write_leaves};
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use iopt_api::{
    AllocError, Config, FlushOps, Gather, Iova, IovaRange, MapError, PageSize, PhysAddr, Prot,
    ReserveError, TableAlloc, TableMeta, TableRef, UnmapError,
};

const SC: Ordering = Ordering::SeqCst;

/// The `live_entries` value of a table that has been claimed for freeing: no thread may write
/// into it any more, and it is unlinked and freed shortly.
pub const DEAD: u32 = u32::MAX;

/// How the engine accounts for table pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Policy {
    /// Linux io-pgtable-arm: no counts; a table is freed only by an unmap at its parent's
    /// block size, by a block map over it, or at teardown.
    #[default]
    Linux,
    /// Live-entry and reservation counts in every table's [`TableMeta`], eager freeing of
    /// tables left empty outside reservations, refusal to replace or remove reserved tables,
    /// and deferred (epoch-based) reclamation. See the [module docs](self).
    Refcounted,
}

/// The engine's refcounting state: the policy and the deferred-free bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct RcState {
    policy: Policy,
    /// Global epoch; a retired table tagged `e` is freed once the epoch reaches `e + 2`.
    epoch: AtomicU64,
    /// Announcements of operations in flight, one operation per slot at a time, each on its
    /// own cache lines so that threads on disjoint ranges do not bounce one line.
    slots: [Slot; SLOTS],
    /// Operations in flight that found every slot taken, by the parity of the epoch they
    /// entered in.
    overflow: Shard,
    /// Tables retired and not yet freed (fast check before taking the lock).
    pending: AtomicUsize,
    /// Retired tables with their epoch.
    limbo: spin::Mutex<Vec<(u64, PhysAddr)>>,
    /// The epoch at which the limbo was last drained of every table then ready (a hint,
    /// written under the limbo's lock).
    drained_at: AtomicU64,
    /// The slot, and the announcement in it, that stopped the last reclaim (a hint: see
    /// `reclaim`).
    blocked_slot: AtomicUsize,
    blocked_by: AtomicU64,
    /// Set when an operation left an emptied table linked because the limbo was full.
    unswept: AtomicBool,
}

/// Retired tables waiting for a grace period beyond which no operation claims the tables it
/// empties: they stay linked, empty, for later maps to reuse, until reclamation catches up.
/// This bounds what one stalled operation can hold back (a thread parked in a `walk`
/// callback, say) to this many tables plus what the operations in flight retire themselves.
pub const LIMBO_LIMIT: usize = 4096;

/// Announcement slots; a power of two.
const SLOTS: usize = 32;

/// One announcement: 0 when free, `(epoch << 1) | 1` while an operation that entered at
/// `epoch` holds it. Its owner alone clears it, so leaving is a plain release store.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

/// Counters of operations in flight by epoch parity, on their own cache lines: the fallback
/// when every slot is taken (more threads inside operations than slots, or nested guards).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    by_parity: [AtomicUsize; 2],
}

/// The first slot the calling thread tries: thread stacks lie megabytes apart, while one
/// thread's call depth moves its stack by kilobytes, so the stack address spreads threads over
/// the slots without any thread-local storage (`no_std`). A collision only costs a probe of
/// the next slot, never correctness.
#[inline]
fn this_threads_slot() -> usize {
    let probe = 0u8;
    let addr = core::ptr::from_ref(&probe).addr() as u64;
    let h = (addr >> 20).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    usize::try_from(h >> 59).unwrap_or(0) & (SLOTS - 1)
}

/// Where an operation announced itself.
#[derive(Debug, Clone, Copy)]
enum Entered {
    /// It owns this slot.
    Slot(usize),
    /// It is counted in the overflow counter of this epoch's parity.
    Overflow(u64),
}

impl RcState {
    /// Whether the engine counts (and so dispatches to this module's paths).
    #[inline]
    pub(crate) fn counting(&self) -> bool {
        self.policy == Policy::Refcounted
    }
}

/// An operation in flight on a refcounted engine: while it lives, no table that was reachable
/// when it was taken is handed back to the allocator. Dropping it may free tables retired by
/// operations that have all finished. On a [`Policy::Linux`] engine it does nothing.
#[must_use = "the guard protects the tables only while it lives"]
pub struct OpGuard<'a, A: TableAlloc, F: FlushOps> {
    engine: &'a Engine<A, F>,
    /// Where the operation announced itself (`None` on an engine that does not count).
    entered: Option<Entered>,
}

impl<A: TableAlloc, F: FlushOps> fmt::Debug for OpGuard<'_, A, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpGuard")
            .field("entered", &self.entered)
            .finish_non_exhaustive()
    }
}

impl<A: TableAlloc, F: FlushOps> Drop for OpGuard<'_, A, F> {
    #[inline]
    fn drop(&mut self) {
        if let Some(at) = self.entered {
            self.engine.exit(at);
        }
    }
}

/// One table on a walk's path.
#[derive(Clone, Copy)]
struct Frame<'a> {
    t: TableRef<'a>,
    level: u32,
}

impl Frame<'_> {
    /// The table's address.
    #[inline]
    fn pa(&self) -> PhysAddr {
        self.t.pa
    }
}

/// A walk's path from the root, without allocating: at most four levels.
#[derive(Clone, Copy)]
struct Path<'a> {
    frames: [Frame<'a>; 4],
    len: usize,
}

impl<'a> Path<'a> {
    #[inline]
    fn new(root: Frame<'a>) -> Self {
        Self {
            frames: [root; 4],
            len: 1,
        }
    }

    #[inline]
    fn push(&mut self, f: Frame<'a>) {
        self.frames[self.len] = f;
        self.len += 1;
    }

    #[inline]
    fn last(&self) -> &Frame<'a> {
        &self.frames[self.len - 1]
    }

    #[inline]
    fn top(&self) -> usize {
        self.len - 1
    }

    #[inline]
    fn frames(&self) -> &[Frame<'a>] {
        &self.frames[..self.len]
    }
}

/// A map segment (leaves inside one leaf table) whose table exists and is pinned for the
/// leaves: committing it cannot fail; aborting it leaves the tree as before.
struct Prepared<'a> {
    path: Path<'a>,
    iova: u64,
    level: u32,
    n: u64,
    pinned: u32,
    /// Empty, unreserved tables in the segment's slots, claimed, to be replaced by leaves:
    /// (index in the segment, the table descriptor linking it).
    claimed: Vec<(usize, u64)>,
}

/// What one attempt of a one-leaf unmap on a counting engine came to.
enum LeafStep {
    /// Finished, with this answer.
    Done(Result<u64, UnmapError>),
    /// The entry changed under it, or the cursor's table answered "not mapped": walk again
    /// from the root.
    Retry,
    /// The entry holds a table: the general path removes it.
    Table,
}

/// The reservation plan of [`Engine::reserve_tables`]: which slots need a table below them.
#[derive(Debug, Clone, Copy)]
struct Want {
    /// First local IOVA.
    start: u64,
    /// Local IOVA after the last (at most `2^52`).
    end: u64,
    /// Bit `l` set: a leaf may sit at level `l` (allowed size, not above `max_leaf`).
    allowed: u8,
}

/// Orders the entry into an operation (a sequentially consistent read-modify-write just
/// before) against the loads that follow. On x86 the locked RMW already is a full fence, so
/// only the compiler must be held back (as crossbeam-epoch does); elsewhere a real fence.
#[inline]
fn full_fence_after_rmw() {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    core::sync::atomic::compiler_fence(SC);
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    fence(SC);
}

/// Raises a table's live count by `n` unless it is [`DEAD`].
#[inline]
fn pin(meta: &TableMeta, n: u32) -> bool {
    meta.live_entries
        .fetch_update(SC, SC, |c| (c != DEAD).then(|| c + n))
        .is_ok()
}

/// Lowers a table's live count by `n` (pins given back, or entries this caller removed) and
/// returns the count before, unless the table is [`DEAD`]: then an overlapping block unmap
/// has torn its subtree down (see `Engine::collect_tables`) and the count means nothing any more. Every
/// unit given back was added by this caller (a pin, or an entry it wrote), so the count never
/// goes below zero; a debug build checks.
#[inline]
fn unpin(meta: &TableMeta, n: u32) -> Option<u32> {
    // SeqCst: a zero this produces is what `try_claim`'s exchange must see, ordered with the
    // entry exchange that removed the last leaf (see `unmap_leaf_once`).
    let before = meta
        .live_entries
        .fetch_update(SC, SC, |c| (c != DEAD).then(|| c.wrapping_sub(n)))
        .ok()?;
    debug_assert!(before >= n, "live count {before} lowered by {n}");
    Some(before)
}

/// Claims a table for freeing: its live count must be exactly `expected` (the claimer's own
/// claimed children still linked in it) and no reservation may hold it.
fn try_claim(meta: &TableMeta, expected: u32) -> bool {
    loop {
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

/// Where a reservation takes its pages: the bulk allocation, topped up page by page only when
/// a concurrent free removed a table the count relied on.
struct ReserveSource<'e, A: TableAlloc, F: FlushOps> {
    engine: &'e Engine<A, F>,
    pages: Vec<PhysAddr>,
    extra: usize,
}

impl<A: TableAlloc, F: FlushOps> ReserveSource<'_, A, F> {
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

/// A source that serves from a stash first and asks `src` for the rest.
struct TopUp<'s, S: PageSource> {
    stash: Stash,
    src: &'s mut S,
}

impl<S: PageSource> PageSource for TopUp<'_, S> {
    fn obtain(&mut self, count: usize, out: &mut Vec<PhysAddr>) -> Result<(), MapError> {
        let start = out.len();
        let have = self.stash.pages.len().min(count);
        let at = self.stash.pages.len() - have;
        out.extend(self.stash.pages.drain(at..));
        if count > have {
            if let Err(e) = self.src.obtain(count - have, out) {
                self.stash.pages.extend(out.drain(start..));
                return Err(e);
            }
        }
        Ok(())
    }

    fn obtain_one(&mut self) -> Result<PhysAddr, MapError> {
        match self.stash.pages.pop() {
            Some(p) => Ok(p),
            None => self.src.obtain_one(),
        }
    }

    fn give_back(&mut self, pages: &[PhysAddr]) {
        self.stash.pages.extend_from_slice(pages);
    }
}

impl<A: TableAlloc, F: FlushOps> Engine<A, F> {
    /// Builds an empty tree with `policy`.
    ///
    /// ```
    /// use iopt_api::{Config, ConfigInput, Format, Gather, Iova, PageSize, PageSizes, PhysAddr, Prot, NoFlush};
    /// use iopt_lpae::{Engine, refcount::Policy};
    /// use iopt_sim::SimMemory;
    /// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
    /// let mem = SimMemory::new();
    /// let e = Engine::with_policy(cfg, &mem, NoFlush, Policy::Refcounted)?;
    /// let run = e.validate_map(Iova::new(0x4000_0000), PhysAddr::new(0x1000), PageSize::SZ_4K, 1, Prot::READ)?;
    /// e.map_runs(&[run], Prot::READ, &mut e.on_demand())?;
    /// assert_eq!(mem.stats().live_pages, 4); // root, L1, L2, L3
    /// let run = e.validate_unmap(Iova::new(0x4000_0000), PageSize::SZ_4K, 1)?;
    /// e.unmap_run(run, &mut Gather::new())?;
    /// assert_eq!(mem.stats().live_pages, 1); // eagerly freed: the root alone
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn with_policy(
        cfg: Config,
        alloc: A,
        flush: F,
        policy: Policy,
    ) -> Result<Self, AllocError> {
        let mut e = Self::new(cfg, alloc, flush)?;
        e.rc.policy = policy;
        Ok(e)
    }

    /// Returns the accounting policy.
    #[must_use]
    pub fn policy(&self) -> Policy {
        self.rc.policy
    }

    /// Enters an operation: tables reachable now stay allocated until the guard drops. The
    /// engine's own operations do this; a backend needs it only around its own reads of table
    /// memory. A no-op with [`Policy::Linux`].
    pub fn enter(&self) -> OpGuard<'_, A, F> {
        if !self.rc.counting() {
            return OpGuard {
                engine: self,
                entered: None,
            };
        }
        // Announce the epoch in a free slot: one compare-exchange, which on x86 is also the
        // fence that orders the announcement before the table reads that follow. An epoch
        // that moved on meanwhile is harmless: an older announcement only holds reclamation
        // back further (`reclaim` waits for every slot to show the current epoch).
        let start = this_threads_slot();
        for k in 0..SLOTS {
            let i = (start + k) & (SLOTS - 1);
            let slot = &self.rc.slots[i].0;
            if slot.load(Ordering::Relaxed) != 0 {
                continue;
            }
            let e = self.rc.epoch.load(SC);
            if slot
                .compare_exchange(0, (e << 1) | 1, SC, Ordering::Relaxed)
                .is_ok()
            {
                full_fence_after_rmw();
                return OpGuard {
                    engine: self,
                    entered: Some(Entered::Slot(i)),
                };
            }
        }
        self.enter_overflow()
    }

    /// [`enter`](Self::enter) when every slot is taken: a shared counter per epoch parity,
    /// re-checked against the epoch (a parity counter, unlike a slot, cannot say how old its
    /// members are).
    #[cold]
    fn enter_overflow(&self) -> OpGuard<'_, A, F> {
        loop {
            let e = self.rc.epoch.load(SC);
            let count = &self.rc.overflow.by_parity[(e & 1) as usize];
            count.fetch_add(1, SC);
            full_fence_after_rmw();
            if self.rc.epoch.load(SC) == e {
                return OpGuard {
                    engine: self,
                    entered: Some(Entered::Overflow(e)),
                };
            }
            count.fetch_sub(1, SC);
        }
    }

    #[inline]
    fn exit(&self, at: Entered) {
        match at {
            // Release: every table read of the operation happens before a reclaimer that
            // sees the slot free.
            Entered::Slot(i) => self.rc.slots[i].0.store(0, Ordering::Release),
            Entered::Overflow(e) => {
                self.rc.overflow.by_parity[(e & 1) as usize].fetch_sub(1, SC);
            }
        }
        if self.rc.pending.load(SC) != 0 {
            self.reclaim();
        }
        if self.rc.unswept.load(Ordering::Relaxed)
            && self.rc.pending.load(Ordering::Relaxed) < LIMBO_LIMIT / 2
        {
            self.sweep();
        }
    }

    /// Claims the empty tables that operations left linked while the limbo was full (see
    /// [`LIMBO_LIMIT`]): one post-order pass over the whole tree, once reclamation has caught
    /// up, with the claims a release makes ([`collapse`](Self::collapse) clearing nothing).
    #[cold]
    #[inline(never)]
    fn sweep(&self) {
        if !self.rc.unswept.swap(false, Ordering::Relaxed) {
            return;
        }
        let guard = self.enter();
        let mut dead = Vec::new();
        if let Some(root) = self.root_frame() {
            let end = self.lmask().saturating_add(1);
            self.collapse(root, 0, end, None, None, false, &mut dead);
        }
        self.retire(&dead);
        drop(guard);
    }

    /// Hands unlinked (and flushed) tables to deferred reclamation.
    #[inline]
    fn retire(&self, dead: &[PhysAddr]) {
        if !dead.is_empty() {
            self.retire_some(dead);
        }
    }

    #[inline(never)]
    fn retire_some(&self, dead: &[PhysAddr]) {
        fence(SC);
        let e = self.rc.epoch.load(SC);
        let mut limbo = self.rc.limbo.lock();
        limbo.extend(dead.iter().map(|&p| (e, p)));
        self.rc.pending.fetch_add(dead.len(), SC);
    }

    /// Advances the epoch as far as finished operations allow and frees, in one batch, every
    /// retired table no running operation can still reach.
    fn reclaim(&self) {
        // A stalled operation holds the epoch back. While the slot that stopped the last
        // attempt still shows the same announcement (an epoch older than the current one, and
        // the epoch only grows), no attempt can succeed and nothing new became free: two loads
        // instead of a scan of every slot, so a stall costs the other operations nothing.
        let b = self.rc.blocked_slot.load(Ordering::Relaxed);
        if let Some(s) = self.rc.slots.get(b) {
            let v = self.rc.blocked_by.load(Ordering::Relaxed);
            if v != 0
                && s.0.load(Ordering::Relaxed) == v
                && self.rc.drained_at.load(Ordering::Relaxed)
                    == self.rc.epoch.load(Ordering::Relaxed)
            {
                return;
            }
        }
        for _ in 0..2 {
            fence(SC);
            let e = self.rc.epoch.load(SC);
            let old = ((e + 1) & 1) as usize;
            // SeqCst: pairs with the announcing compare-exchange in `enter` (and the fence
            // above with the one after it), so an operation that read tables unlinked before
            // this point is seen here.
            let behind = self.rc.slots.iter().enumerate().find_map(|(i, s)| {
                let v = s.0.load(SC);
                (v != 0 && v >> 1 != e).then_some((i, v))
            });
            if let Some((i, v)) = behind {
                self.rc.blocked_by.store(v, Ordering::Relaxed);
                self.rc.blocked_slot.store(i, Ordering::Relaxed);
                break;
            }
            if self.rc.overflow.by_parity[old].load(SC) != 0 {
                break;
            }
            let _ = self.rc.epoch.compare_exchange(e, e + 1, SC, SC);
        }
        let now = self.rc.epoch.load(SC);
        // Tables retired after the last drain carry an epoch at least that drain's, so none
        // of them is ready unless the epoch moved since: scan the limbo once per epoch.
        if self.rc.drained_at.load(Ordering::Relaxed) == now {
            return;
        }
        let ready: Vec<PhysAddr> = {
            let mut limbo = self.rc.limbo.lock();
            let mut ready = Vec::new();
            limbo.retain(|&(e, p)| {
                if e + 2 <= now {
                    ready.push(p);
                    false
                } else {
                    true
                }
            });
            self.rc.drained_at.fetch_max(now, Ordering::Relaxed);
            ready
        };
        if !ready.is_empty() {
            self.rc.pending.fetch_sub(ready.len(), SC);
            self.free_tables(&ready);
        }
    }

    /// Frees every retired table now (no operation can be running: `&mut self`).
    pub fn quiesce(&mut self) {
        let items = core::mem::take(&mut *self.rc.limbo.lock());
        self.rc.pending.store(0, SC);
        let pages: Vec<PhysAddr> = items.into_iter().map(|(_, p)| p).collect();
        self.free_tables(&pages);
    }

    /// Returns how many unlinked tables wait for running operations to finish before they are
    /// freed (0 whenever no operation is running).
    #[must_use]
    pub fn deferred_frees(&self) -> usize {
        self.rc.pending.load(SC)
    }

    // ---- small helpers -------------------------------------------------------------------

    fn lmask(&self) -> u64 {
        let ias = self.config().ias();
        if ias >= 64 {
            u64::MAX
        } else {
            (1u64 << ias) - 1
        }
    }

    #[inline]
    fn ext(&self, local: u64) -> Iova {
        self.external(local)
    }

    #[inline]
    fn kind_of(&self, level: u32, e: u64) -> Kind {
        self.kind(level, e)
    }

    #[inline]
    fn table_of(&self, e: u64) -> Option<(TableRef<'_>, PhysAddr)> {
        let pa = self.unpack(e);
        self.allocator().table(pa).map(|t| (t, pa))
    }

    #[inline]
    fn root_frame(&self) -> Option<Frame<'_>> {
        self.allocator().table(self.root()).map(|t| Frame {
            t,
            level: self.config().start_level(),
        })
    }

    /// Entries of a run in the leaf table holding `iova` (as the engine splits segments).
    #[inline]
    fn seg_len(&self, level: u32, iova: u64, remaining: u64) -> u64 {
        self.entries_in_table(level, iova, remaining)
    }

    fn note_dead(&self, pa: PhysAddr, dead: &mut Vec<PhysAddr>) {
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
    /// `child` to its claimer (see `Engine::collect_tables`).
    fn unlink(&self, parent: Frame<'_>, idx: usize, iova_in_slot: u64, child: PhysAddr) -> bool {
        let cfg = self.config();
        let Some(slot) = parent.t.entries.get(idx) else {
            return false;
        };
        let old = slot.load(SC);
        if self.kind_of(parent.level, old) != Kind::Table || self.unpack(old) != child {
            return false;
        }
        // SeqCst: ordered with the claim of `child` before it and the parent's count update
        // after it, which other claimers read.
        if slot.compare_exchange(old, 0, SC, SC).is_err() {
            return false;
        }
        self.note_unlinked();
        self.sync_entries(parent.t, idx, 1);
        let span = cfg.block_size(parent.level);
        self.flush_ops().flush_walk(
            self.ext(iova_in_slot & !(span - 1)),
            span,
            cfg.granule().size(),
        );
        true
    }

    /// Lowers the live count of `path[i]` by `n` and frees it, and the ancestors it leaves
    /// empty, if that emptied it.
    /// Returns whether `path[i]` was freed (it is then unlinked).
    #[inline]
    fn drop_live(
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
        unpin(path[i].t.meta, n) == Some(n) && self.emptied(path, i, iova, dead)
    }

    /// [`drop_live`](Self::drop_live) after `path[i]`'s count reached zero.
    #[inline(never)]
    fn emptied(&self, path: &[Frame<'_>], i: usize, iova: u64, dead: &mut Vec<PhysAddr>) -> bool {
        if self.rc.pending.load(Ordering::Relaxed) >= LIMBO_LIMIT {
            // Reclamation is held back (see `LIMBO_LIMIT`): keep the table linked and empty,
            // for a sweep once it catches up.
            self.rc.unswept.store(true, Ordering::Relaxed);
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
        let mut path = Path::new(self.root_frame()?);
        let mut l = self.config().start_level();
        while l < level {
            let e = path.last().t.entries.get(self.index(iova, l))?.load(SC);
            if self.kind_of(l, e) != Kind::Table {
                return None;
            }
            let (t, _) = self.table_of(e)?;
            l += 1;
            path.push(Frame { t, level: l });
        }
        (path.last().pa() == pa).then_some(path)
    }

    /// The leaf table the cursor holds for a map of `n` leaves at `iova`, pinned for them, as a
    /// one-frame path: only when every target entry is empty and the table is not dying (else
    /// the full walk decides).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn cursor_pinned(&self, iova: u64, target: u32, n: u64) -> Option<Frame<'_>> {
        let (t, pins) = self.cursor_empty(iova, target, n, SC)?;
        pin(t.meta, pins).then_some(Frame { t, level: target })
    }

    /// The leaf table the cursor holds for `n` leaves at `iova`, with `n` as a pin count, if
    /// every target entry is empty (loaded with `order`): the check both the shared and the
    /// exclusive cursor-hit maps make before pinning.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn cursor_empty(
        &self,
        iova: u64,
        target: u32,
        n: u64,
        order: Ordering,
    ) -> Option<(TableRef<'_>, u32)> {
        let t = self.cursor_get(target, iova)?;
        let first = self.index(iova, target);
        let slots = t.entries.get(first..first + usize::try_from(n).ok()?)?;
        if !all_zero(slots, order) {
            return None;
        }
        Some((t, u32::try_from(n).ok()?))
    }

    /// `path[i]`'s count just reached 0: claim it and every ancestor holding nothing else,
    /// unlink the topmost, and continue above if that empties its parent. Returns whether
    /// `path[i]` itself was claimed.
    fn cascade(&self, path: &[Frame<'_>], i: usize, iova: u64, dead: &mut Vec<PhysAddr>) -> bool {
        if i == 0 || !try_claim(path[i].t.meta, 0) {
            return false;
        }
        let cfg = self.config();
        let mut i = i;
        loop {
            let mut top = i;
            self.note_dead(path[top].pa(), dead);
            while top > 1 && try_claim(path[top - 1].t.meta, 1) {
                top -= 1;
                self.note_dead(path[top].pa(), dead);
            }
            let parent = path[top - 1];
            if !self.unlink(parent, cfg.index(iova, parent.level), iova, path[top].pa())
                || unpin(parent.t.meta, 1) != Some(1)
            {
                return true;
            }
            i = top - 1;
            if i == 0 || !try_claim(path[i].t.meta, 0) {
                return true;
            }
        }
    }

    // ---- map -----------------------------------------------------------------------------

    /// [`Engine::map_runs`] on a refcounted engine.
    #[inline]
    pub(crate) fn map_runs_counted<S: PageSource>(
        &self,
        runs: &[Run],
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        let guard = self.enter();
        let bits = self.leaf_bits(prot);
        let mut dead = Vec::new();
        let result = match runs {
            [r] if self.seg_len(r.level, r.iova, r.count) == r.count => {
                self.map_one(r, bits, src, &mut dead)
            }
            _ => self.map_many(runs, bits, src, &mut dead),
        };
        self.retire(&dead);
        drop(guard);
        result
    }

    /// One segment: prepare, then commit (the prepared segment stays where it was built).
    #[inline]
    fn map_one<S: PageSource>(
        &self,
        r: &Run,
        bits: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        // The cursor's leaf table, pinned: write straight into it (no prepared segment).
        if let Some(leaf) = self.cursor_pinned(r.iova, r.level, r.count) {
            return self
                .write_pinned(leaf.t, r.iova, r.level, r.count, r.pa, bits)
                .map_err(|(k, units)| {
                    self.drop_live(&[leaf], 0, units, r.iova, dead);
                    MapError::AlreadyMapped {
                        iova: self.ext(r.iova + k * r.size.get()),
                    }
                });
        }
        let mut slot = None;
        let p = self.prepare(r.iova, r.level, r.count, src, dead, &mut slot)?;
        self.commit(p, r.pa, bits, dead)
    }

    /// Several segments: plan (conflicts, exact missing count), obtain once, prepare every
    /// segment (undoing all on failure), then commit them all.
    fn map_many<S: PageSource>(
        &self,
        runs: &[Run],
        bits: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        let cfg = self.config();
        let root = self.root_frame().ok_or(MapError::BrokenTable {
            iova: Iova::ZERO,
            pa: self.root(),
        })?;
        let mut plan = Plan::default();
        for r in runs {
            let end = r.iova + r.count * r.size.get();
            self.plan(
                &mut plan,
                root.t,
                cfg.start_level(),
                r.level,
                r.iova,
                end,
                true,
            )?;
        }
        let mut top = TopUp {
            stash: Stash::default(),
            src,
        };
        top.src.obtain(plan.missing, &mut top.stash.pages)?;
        let mut prepared: Vec<(Prepared<'_>, u64)> = Vec::new();
        let mut failure = None;
        'runs: for r in runs {
            let (mut iova, mut pa, mut left) = (r.iova, r.pa, r.count);
            while left > 0 {
                let n = self.seg_len(r.level, iova, left);
                let mut slot = None;
                match self.prepare(iova, r.level, n, &mut top, dead, &mut slot) {
                    Ok(_) => prepared.extend(slot.map(|p| (p, pa))),
                    Err(e) => {
                        failure = Some(e);
                        break 'runs;
                    }
                }
                let bytes = n * r.size.get();
                iova += bytes;
                pa += bytes;
                left -= n;
            }
        }
        if let Some(e) = failure {
            for (p, _) in prepared.iter().rev() {
                self.abort(p, dead);
            }
            top.src.give_back(&top.stash.pages);
            return Err(e);
        }
        let mut result = Ok(());
        for (i, (p, pa)) in prepared.iter().enumerate() {
            if let Err(e) = self.commit(p, *pa, bits, dead) {
                // An overlapping operation changed an entry since the plan: undo the segments
                // written before, and release the ones not yet written.
                for (q, qpa) in &prepared[..i] {
                    self.uncommit(q, *qpa, bits, dead);
                }
                for (q, _) in &prepared[i + 1..] {
                    self.abort(q, dead);
                }
                result = Err(e);
                break;
            }
        }
        top.src.give_back(&top.stash.pages);
        result
    }

    /// Makes the leaf table of a segment exist and pins it for the segment's leaves, checking
    /// every target slot; installs a missing path as one privately built chain published with
    /// one compare-exchange. The prepared segment is built in `out` (where the caller keeps
    /// it: it is too large to return by value cheaply).
    #[allow(clippy::too_many_arguments)]
    fn prepare<'a, 's, S: PageSource>(
        &'a self,
        iova: u64,
        target: u32,
        n: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
        out: &'s mut Option<Prepared<'a>>,
    ) -> Result<&'s Prepared<'a>, MapError> {
        let cfg = self.config();
        let epoch = self.unlink_epoch();
        if let Some(leaf) = self.cursor_pinned(iova, target, n) {
            return Ok(out.insert(Prepared {
                path: Path::new(leaf),
                iova,
                level: target,
                n,
                pinned: n as u32,
                claimed: Vec::new(),
            }));
        }
        let root = self.root_frame().ok_or(MapError::BrokenTable {
            iova: self.ext(iova),
            pa: self.root(),
        })?;
        let p = out.insert(Prepared {
            path: Path::new(root),
            iova,
            level: target,
            n,
            pinned: 0,
            claimed: Vec::new(),
        });
        // The root is never freed: a walk that must start again reuses its frame.
        'descend: loop {
            let path = &mut p.path;
            let mut level = cfg.start_level();
            while level < target {
                let cur = path.last();
                let idx = self.index(iova, level);
                let slot = cur.t.entries.get(idx).ok_or(MapError::BrokenTable {
                    iova: self.ext(iova),
                    pa: cur.pa(),
                })?;
                let e = slot.load(SC);
                match self.kind_of(level, e) {
                    Kind::Table => {
                        self.sync_seen(cur.t, idx, e);
                        let (t, _) = self.table_of(e).ok_or(MapError::BrokenTable {
                            iova: self.ext(iova),
                            pa: self.unpack(e),
                        })?;
                        level += 1;
                        path.push(Frame { t, level });
                    }
                    Kind::Leaf => {
                        return Err(MapError::AlreadyMapped {
                            iova: self.ext(iova),
                        });
                    }
                    Kind::Invalid => {
                        if self.install_chain(path, idx, iova, target, n, src, dead)? {
                            self.cursor_set(target, iova, path.last().pa(), epoch);
                            p.pinned = n as u32;
                            return Ok(p);
                        }
                        core::hint::spin_loop();
                        p.path = Path::new(root);
                        continue 'descend;
                    }
                }
            }
            if let Some((pinned, claimed)) = self.prepare_leaf(path, iova, target, n, dead)? {
                self.cursor_set(target, iova, path.last().pa(), epoch);
                p.pinned = pinned;
                p.claimed = claimed;
                return Ok(p);
            }
            core::hint::spin_loop();
            p.path = Path::new(root);
        }
    }

    /// The leaf-table half of [`prepare`](Self::prepare): checks the segment's slots, pins
    /// the table for the new leaves and claims the empty tables they replace, returning the
    /// pin count and the claims. `Ok(None)`: the table is dying, walk again.
    #[allow(clippy::type_complexity)]
    fn prepare_leaf(
        &self,
        path: &Path<'_>,
        iova: u64,
        target: u32,
        n: u64,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<Option<(u32, Vec<(usize, u64)>)>, MapError> {
        let cfg = self.config();
        let size = cfg.block_size(target);
        {
            let cur = path.last();
            let first = self.index(iova, target);
            let slots =
                cur.t
                    .entries
                    .get(first..first + n as usize)
                    .ok_or(MapError::BrokenTable {
                        iova: self.ext(iova),
                        pa: cur.pa(),
                    })?;
            let mut free = 0u32;
            let mut claimed = Vec::new();
            // The common case: every target slot is empty.
            let scan = if all_zero(slots, SC) {
                free = n as u32;
                &[]
            } else {
                slots
            };
            for (k, e) in scan.iter().enumerate() {
                let v = e.load(SC);
                let at = self.ext(iova + k as u64 * size);
                match self.kind_of(target, v) {
                    Kind::Invalid => free += 1,
                    Kind::Leaf => return Err(MapError::AlreadyMapped { iova: at }),
                    Kind::Table => {
                        let (sub, _) = self.table_of(v).ok_or(MapError::BrokenTable {
                            iova: at,
                            pa: self.unpack(v),
                        })?;
                        if self.subtree_has_leaf(sub, target + 1) {
                            return Err(MapError::AlreadyMapped { iova: at });
                        }
                        if sub.meta.reservations.load(SC) != 0 {
                            return Err(MapError::ReservedTable { iova: at });
                        }
                        claimed.push((k, v));
                    }
                }
            }
            if !pin(cur.t.meta, free) {
                return Ok(None);
            }
            for (j, &(k, link)) in claimed.iter().enumerate() {
                if !self
                    .table_of(link)
                    .is_some_and(|(t, _)| try_claim(t.meta, 0))
                {
                    for &(_, done) in &claimed[..j] {
                        if let Some((t, _)) = self.table_of(done) {
                            t.meta.live_entries.store(0, SC);
                        }
                    }
                    self.drop_live(path.frames(), path.top(), free, iova, dead);
                    return Err(MapError::AlreadyMapped {
                        iova: self.ext(iova + k as u64 * size),
                    });
                }
            }
            Ok(Some((free, claimed)))
        }
    }

    /// Installs the tables from below `path`'s last table down to `target` at its empty entry
    /// `idx`, the leaf table pinned for `n` leaves. `Ok(false)`: lost a race or met a dying
    /// table, walk again.
    #[allow(clippy::too_many_arguments)]
    fn install_chain<'a, S: PageSource>(
        &'a self,
        path: &mut Path<'a>,
        idx: usize,
        iova: u64,
        target: u32,
        n: u64,
        src: &mut S,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<bool, MapError> {
        let cfg = self.config();
        let cur = path.last();
        let slot = &cur.t.entries[idx];
        let level = cur.level;
        let need = (target - level) as usize;
        let (held, tables) = self.obtain_chain(need, src)?;
        let pages = &held[..need];
        let chain = &tables[..need];
        for (i, t) in chain.iter().enumerate() {
            if i + 1 < need {
                t.entries[cfg.index(iova, level + 1 + i as u32)]
                    .store(self.private_link(pages[i + 1]), Ordering::Relaxed);
                t.meta.live_entries.store(1, Ordering::Relaxed);
            } else {
                t.meta.live_entries.store(n as u32, Ordering::Relaxed);
            }
        }
        let reset = |chain: &[TableRef<'_>]| {
            for (i, t) in chain.iter().enumerate() {
                if i + 1 < need {
                    t.entries[cfg.index(iova, level + 1 + i as u32)].store(0, Ordering::Relaxed);
                }
                t.meta.clear();
            }
        };
        if !pin(cur.t.meta, 1) {
            reset(chain);
            src.give_back(pages);
            return Ok(false);
        }
        // The leaves come later (commit); everything else in the chain is written now.
        for &t in chain {
            self.sync_table(t);
        }
        let new = desc::encode_table(cfg, pages[0]);
        if slot.compare_exchange(0, new, SC, SC).is_err() {
            reset(chain);
            src.give_back(pages);
            self.counters()
                .install_races_lost
                .fetch_add(1, Ordering::Relaxed);
            self.drop_live(path.frames(), path.top(), 1, iova, dead);
            return Ok(false);
        }
        self.sync_installed(cur.t, idx, new);
        self.counters().add_live(need as u64);
        for (i, &t) in chain.iter().enumerate() {
            path.push(Frame {
                t,
                level: level + 1 + i as u32,
            });
        }
        Ok(true)
    }

    /// Writes `n` leaves from `iova` (mapping `pa` on) into the leaf table `t`, whose target
    /// entries were empty and are pinned for them: each with a compare-exchange from zero, so
    /// that an overlapping map that got there first is seen, not overwritten with its count
    /// unit lost. On such a conflict at entry `k` the leaves written so far are taken back and
    /// `Err((k, units))` says how many count units the caller gives back (the pins of the
    /// entries not written, and of those taken back; a leaf an overlapping unmap removed first
    /// was counted off by it).
    // Measured (callgrind): left to `#[inline]` it stays out of line, 25 instructions of
    // call overhead per single-leaf map.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn write_pinned(
        &self,
        t: TableRef<'_>,
        iova: u64,
        level: u32,
        n: u64,
        pa: u64,
        bits: u64,
    ) -> Result<(), (u64, u32)> {
        let first = self.index(iova, level);
        let attrs = bits | self.leaf_type(level);
        let size = self.leaf_size(level);
        let slots = &t.entries[first..first + n as usize];
        let at = |k: usize| attrs | desc::pack_pa(PhysAddr::new(pa + k as u64 * size));
        for (k, e) in slots.iter().enumerate() {
            // SeqCst, as every entry transition on a counting engine: ordered with the pin
            // before it and with the count updates of whoever removes the leaf later.
            if e.compare_exchange(0, at(k), SC, SC).is_err() {
                let taken_back = slots[..k]
                    .iter()
                    .enumerate()
                    .filter(|&(j, e)| e.compare_exchange(at(j), 0, SC, SC).is_ok())
                    .count() as u32;
                self.sync_entries(t, first, k);
                return Err((k as u64, (n - k as u64) as u32 + taken_back));
            }
        }
        self.sync_entries(t, first, n as usize);
        Ok(())
    }

    /// Writes a prepared segment's leaves: fails only when an overlapping operation changed
    /// one of its entries since it was prepared (a caller bug); the segment is then undone
    /// (its pins given back, the empty tables it claimed freed) and the error names the entry.
    fn commit(
        &self,
        p: &Prepared<'_>,
        pa: u64,
        bits: u64,
        dead: &mut Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        let t = p.path.last().t;
        let size = self.leaf_size(p.level);
        if p.claimed.is_empty() {
            return self
                .write_pinned(t, p.iova, p.level, p.n, pa, bits)
                .map_err(|(k, units)| {
                    self.drop_live(p.path.frames(), p.path.top(), units, p.iova, dead);
                    MapError::AlreadyMapped {
                        iova: self.ext(p.iova + k * size),
                    }
                });
        }
        let leaf_type = self.leaf_type(p.level);
        let first = self.index(p.iova, p.level);
        let slots = &t.entries[first..first + p.n as usize];
        let d = |k: usize| bits | leaf_type | desc::pack_pa(PhysAddr::new(pa + k as u64 * size));
        let claim = |k: usize| p.claimed.iter().find(|c| c.0 == k);
        for (k, e) in slots.iter().enumerate() {
            let expected = claim(k).map_or(0, |c| c.1);
            // SeqCst, as every entry transition on a counting engine (see `write_pinned`).
            if e.compare_exchange(expected, d(k), SC, SC).is_ok() {
                if let Some(&(_, link)) = claim(k) {
                    // The link's count unit is now the leaf's.
                    self.replaced_table(t, first + k, p.iova + k as u64 * size, size);
                    self.note_dead(self.unpack(link), dead);
                }
                continue;
            }
            // Take back what this call wrote, give back the pins of what it did not, and
            // unlink the tables it claimed and did not yet replace.
            let mut units = 0u32;
            for (j, e) in slots.iter().enumerate() {
                match (j < k, claim(j)) {
                    (true, _) => units += u32::from(e.compare_exchange(d(j), 0, SC, SC).is_ok()),
                    (false, None) => units += 1,
                    (false, Some(&(_, link))) => {
                        if e.compare_exchange(link, 0, SC, SC).is_ok() {
                            self.replaced_table(t, first + j, p.iova + j as u64 * size, size);
                            units += 1;
                        }
                        // Unlinked here or by the overlapping unmap that got there first
                        // (which leaves a claimed table to its claimer): retired once, here.
                        self.note_dead(self.unpack(link), dead);
                    }
                }
            }
            self.sync_entries(t, first, p.n as usize);
            self.drop_live(p.path.frames(), p.path.top(), units, p.iova, dead);
            return Err(MapError::AlreadyMapped {
                iova: self.ext(p.iova + k as u64 * size),
            });
        }
        self.sync_entries(t, first, p.n as usize);
        Ok(())
    }

    /// After the table descriptor at `idx` of `t` (covering `size` bytes from `iova`) was
    /// replaced: no cursor may lead to the old table, and the walker forgets it.
    fn replaced_table(&self, t: TableRef<'_>, idx: usize, iova: u64, size: u64) {
        self.note_unlinked();
        self.sync_entries(t, idx, 1);
        self.flush_ops()
            .flush_walk(self.ext(iova), size, self.config().granule().size());
    }

    /// Takes back the leaves a committed segment wrote, where they are still its own.
    fn uncommit(&self, p: &Prepared<'_>, pa: u64, bits: u64, dead: &mut Vec<PhysAddr>) {
        let t = p.path.last().t;
        let first = self.index(p.iova, p.level);
        let attrs = bits | self.leaf_type(p.level);
        let size = self.leaf_size(p.level);
        let units = t.entries[first..first + p.n as usize]
            .iter()
            .enumerate()
            .filter(|&(k, e)| {
                let d = attrs | desc::pack_pa(PhysAddr::new(pa + k as u64 * size));
                // SeqCst, as every entry transition on a counting engine (see `write_pinned`).
                e.compare_exchange(d, 0, SC, SC).is_ok()
            })
            .count() as u32;
        if !self.drop_live(p.path.frames(), p.path.top(), units, p.iova, dead) {
            self.sync_entries(t, first, p.n as usize);
        }
    }

    /// Undoes a prepared segment: releases its claims and pins (freeing what that empties).
    fn abort(&self, p: &Prepared<'_>, dead: &mut Vec<PhysAddr>) {
        for &(_, link) in &p.claimed {
            if let Some((t, _)) = self.table_of(link) {
                // Unclaimed: empty, still linked, freed by whoever empties it next.
                t.meta.live_entries.store(0, SC);
            }
        }
        self.drop_live(p.path.frames(), p.path.top(), p.pinned, p.iova, dead);
    }

    // ---- unmap ---------------------------------------------------------------------------

    /// The path from the root to the leaf table of `iova` for an unmap at `r.level`, built in
    /// `slot` (where the caller keeps it: a path is too large to return by value cheaply).
    #[inline]
    fn unmap_path<'a, 's>(
        &'a self,
        iova: u64,
        r: Run,
        from_root: bool,
        slot: &'s mut Option<Path<'a>>,
    ) -> Result<&'s Path<'a>, UnmapError> {
        let cfg = self.config();
        // A cursor names a table that was linked when the cursor was checked, but it may have
        // been claimed since (emptied by others): the caller retries from the root when the
        // cursor's table does not hold what it came to remove. A table holding the caller's
        // leaves cannot be claimed, so a hit is final.
        if !from_root {
            if let Some(t) = self.cursor_get(r.level, iova) {
                return Ok(slot.insert(Path::new(Frame { t, level: r.level })));
            }
        }
        let epoch = self.unlink_epoch();
        let root = self.root_frame().ok_or(UnmapError::BrokenTable {
            iova: self.ext(iova),
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
                .map_or(0, |e| e.load(SC));
            match self.kind_of(level, e) {
                Kind::Invalid => {
                    return Err(UnmapError::NotMapped {
                        iova: self.ext(iova),
                    });
                }
                Kind::Leaf => {
                    return Err(UnmapError::PartialBlock {
                        iova: self.ext(iova),
                        size: r.size,
                        leaf: PageSize::new(cfg.block_size(level)).unwrap_or(r.size),
                    });
                }
                Kind::Table => {
                    let (t, _) = self.table_of(e).ok_or(UnmapError::BrokenTable {
                        iova: self.ext(iova),
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

    /// [`Engine::unmap_run`] on a refcounted engine.
    pub(crate) fn unmap_run_counted(&self, r: Run, gather: &mut Gather) -> Result<u64, UnmapError> {
        if r.count == 1 {
            if let Some(done) = self.unmap_one_counted(r, gather) {
                return done;
            }
        }
        let guard = self.enter();
        let size = r.size.get();
        // Check pass: every entry valid, no reserved table to remove. A run inside one leaf
        // table keeps its path for the clear pass: the leaves it holds keep the tables alive.
        let single = self.seg_len(r.level, r.iova, r.count) == r.count;
        let mut kept = None;
        let (mut iova, mut left) = (r.iova, r.count);
        while left > 0 {
            let n = self.seg_len(r.level, iova, left);
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
        // Clear pass. A run over several leaf tables walks from the root again: a cursor could
        // name a claimed table that never held the run.
        let mut dead = Vec::new();
        let (mut iova, mut left) = (r.iova, r.count);
        let mut result = Ok(r.count * size);
        while left > 0 {
            let n = self.seg_len(r.level, iova, left);
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
    /// with an exchange and returns how many this call removed (only those lower the count:
    /// an overlapping unmap that got there first counted its own). A removed table descriptor
    /// takes its subtree with it (Linux semantics for an unmap at block size), retired after
    /// the walk flush.
    fn clear_segment(
        &self,
        t: TableRef<'_>,
        iova: u64,
        n: u64,
        r: Run,
        gather: &mut Gather,
        dead: &mut Vec<PhysAddr>,
    ) -> u32 {
        let cfg = self.config();
        let size = r.size.get();
        let first = self.index(iova, r.level);
        let slots = &t.entries[first..first + n as usize];
        let mut removed = 0u32;
        for (k, e) in slots.iter().enumerate() {
            let mut old = e.load(SC);
            let at = self.ext(iova + k as u64 * size);
            loop {
                if self.kind_of(r.level, old) == Kind::Invalid {
                    break;
                }
                // SeqCst as every entry transition on a counting engine (see `unmap_leaf_once`).
                match e.compare_exchange(old, 0, SC, SC) {
                    Ok(_) => {
                        removed += 1;
                        if self.kind_of(r.level, old) == Kind::Table {
                            self.note_unlinked();
                            self.sync_entries(t, first + k, 1);
                            self.flush_ops().flush_walk(at, size, cfg.granule().size());
                            self.collect_tables(old, r.level + 1, dead);
                        } else {
                            self.flush_ops().add_page(gather, at, size);
                        }
                        break;
                    }
                    Err(now) => old = now,
                }
            }
        }
        removed
    }

    /// [`unmap_run_counted`](Self::unmap_run_counted) of one leaf without its two passes and
    /// loops: `None` (nothing done) when the entry holds a table, which the general path
    /// handles.
    #[inline]
    pub(crate) fn unmap_one_counted(
        &self,
        r: Run,
        gather: &mut Gather,
    ) -> Option<Result<u64, UnmapError>> {
        let guard = self.enter();
        let mut dead = Vec::new();
        let mut from_root = false;
        let out = loop {
            let mut kept = None;
            match self.unmap_leaf_once(r, from_root, &mut kept, gather, &mut dead) {
                LeafStep::Retry => from_root = true,
                LeafStep::Done(x) => break Some(x),
                LeafStep::Table => break None,
            }
        };
        self.retire(&dead);
        drop(guard);
        out
    }

    /// One attempt of [`unmap_one_counted`](Self::unmap_one_counted), from the cursor's table
    /// unless `from_root`.
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
                iova: self.ext(r.iova),
                pa: t.pa,
            }));
        };
        let old = e.load(SC);
        match self.kind_of(r.level, old) {
            Kind::Table => return LeafStep::Table,
            // A cursor may name a table claimed since it was cached (empty, or it could not
            // have been claimed): only a walk from the root may answer "not mapped".
            Kind::Invalid if !from_root && path.frames()[0].pa() != self.root() => {
                return LeafStep::Retry;
            }
            Kind::Invalid => {
                return LeafStep::Done(Err(UnmapError::NotMapped {
                    iova: self.ext(r.iova),
                }));
            }
            Kind::Leaf => {}
        }
        // Exactly once: only the caller whose exchange removes the leaf counts it, so two
        // overlapping unmaps of one page cannot both lower the table's count. SeqCst, as every
        // entry transition on a counting engine: it is ordered with the count updates (pins,
        // claims) that other threads make on the same table.
        if e.compare_exchange(old, 0, SC, SC).is_err() {
            return LeafStep::Retry;
        }
        let size = r.size.get();
        self.flush_ops().add_page(gather, self.ext(r.iova), size);
        if !self.drop_live(path.frames(), path.top(), 1, r.iova, dead) {
            self.sync_entries(t, idx, 1);
        }
        LeafStep::Done(Ok(size))
    }

    // ---- exclusive access ----------------------------------------------------------------

    /// A single-table map on a refcounted engine whose caller holds it exclusively (the
    /// engine's `&mut self` entry points): no other operation can run, so there is no grace
    /// period to enter and no concurrent claim to refuse, and the pin is a plain load and
    /// store of the count instead of the three locked read-modify-writes of the shared path.
    /// `false` (nothing done) unless the cursor holds the leaf table, every target entry is
    /// empty and the run stays inside it; the shared path then decides, with the same result.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(crate) fn map_one_exclusive(&self, r: &Run, prot: Prot) -> bool {
        if r.count != 1 && self.seg_len(r.level, r.iova, r.count) != r.count {
            return false;
        }
        let Some((t, n)) = self.cursor_empty(r.iova, r.level, r.count, Ordering::Relaxed) else {
            return false;
        };
        let live = t.meta.live_entries.load(Ordering::Relaxed);
        if live == DEAD {
            return false;
        }
        t.meta.live_entries.store(live + n, Ordering::Relaxed);
        let first = self.index(r.iova, r.level);
        write_leaves(
            &t.entries[first..first + r.count as usize],
            self.leaf_bits(prot) | self.leaf_type(r.level),
            r.pa,
            self.leaf_size(r.level),
            Ordering::Release,
        );
        self.sync_entries(t, first, r.count as usize);
        true
    }

    /// A one-leaf unmap on a refcounted engine held exclusively: a plain count update, no
    /// grace period. `None` (nothing done) unless the cursor holds the leaf table, the entry
    /// is a leaf and the table keeps other entries (a table this unmap would empty is freed by
    /// the shared path).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub(crate) fn unmap_one_exclusive(&self, r: &Run, gather: &mut Gather) -> Option<u64> {
        let t = self.cursor_get(r.level, r.iova)?;
        let idx = self.index(r.iova, r.level);
        let e = t.entries.get(idx)?;
        let old = e.load(Ordering::Relaxed);
        let live = t.meta.live_entries.load(Ordering::Relaxed);
        if self.kind_of(r.level, old) != Kind::Leaf || live <= 1 || live == DEAD {
            return None;
        }
        t.meta.live_entries.store(live - 1, Ordering::Relaxed);
        e.store(0, Ordering::Release);
        let size = r.size.get();
        self.flush_ops().add_page(gather, self.ext(r.iova), size);
        self.sync_entries(t, idx, 1);
        Some(size)
    }

    // ---- reservations --------------------------------------------------------------------

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
        let m = self.lmask();
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
            let r = match self.kind_of(level, e) {
                Kind::Invalid => Ok(self.count_virtual(w, level + 1, at, next)),
                Kind::Leaf => Err(ReserveError::BlockInTheWay { iova: self.ext(at) }),
                Kind::Table => match self.table_of(e) {
                    Some((sub, _)) => self.count_existing(sub, level + 1, at, next, w),
                    None => Err(ReserveError::BlockInTheWay { iova: self.ext(at) }),
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
    /// reservation count of every table covering the range (see the [module docs](self)).
    /// Returns the pages taken from the allocator. All or nothing.
    ///
    /// The engine does not track reservations; the caller must release each successful
    /// reservation exactly once with the same arguments.
    ///
    /// # Errors
    ///
    /// As [`reserve_pages_needed`](Self::reserve_pages_needed), plus [`ReserveError::Alloc`].
    /// Nothing changed.
    ///
    /// # Panics
    ///
    /// If the engine's policy is not [`Policy::Refcounted`].
    pub fn reserve_tables(
        &self,
        range: IovaRange,
        max_leaf: PageSize,
    ) -> Result<usize, ReserveError> {
        assert!(self.rc.counting(), "reservations need Policy::Refcounted");
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
        if !src.pages.is_empty() {
            let n = src.pages.len() as u64;
            c.free_bulk_calls.fetch_add(1, Ordering::Relaxed);
            c.pages_freed.fetch_add(n, Ordering::Relaxed);
            c.reserved_unused.fetch_add(n, Ordering::Relaxed);
            self.allocator()
                .free_bulk(&src.pages, self.config().granule().size());
        }
        self.retire(&dead);
        drop(guard);
        result.map(|()| need + src.extra)
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
        src: &mut ReserveSource<'_, A, F>,
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
                result = Err(ReserveError::BlockInTheWay { iova: self.ext(at) });
                return false;
            };
            loop {
                let e = slot.load(SC);
                match self.kind_of(f.level, e) {
                    Kind::Leaf => {
                        result = Err(ReserveError::BlockInTheWay { iova: self.ext(at) });
                        return false;
                    }
                    Kind::Table => {
                        let Some((sub, spa)) = self.table_of(e) else {
                            result = Err(ReserveError::BlockInTheWay { iova: self.ext(at) });
                            return false;
                        };
                        if !pin(sub.meta, 1) {
                            // Being freed: its parent slot empties shortly.
                            core::hint::spin_loop();
                            continue;
                        }
                        self.sync_seen(f.t, idx, e);
                        sub.meta.reservations.fetch_add(1, SC);
                        unpin(sub.meta, 1);
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
                        let pinned = pin(f.t.meta, 1);
                        debug_assert!(pinned);
                        for &(_, t) in &built {
                            self.sync_table(t);
                        }
                        let new = desc::encode_table(cfg, top);
                        if pinned && slot.compare_exchange(0, new, SC, SC).is_ok() {
                            self.sync_installed(f.t, idx, new);
                            let c = self.counters();
                            c.add_live(built.len() as u64);
                            c.pages_consumed
                                .fetch_add(built.len() as u64, Ordering::Relaxed);
                            taken.extend(built.iter().map(|&(p, _)| p));
                            return true;
                        }
                        if pinned {
                            unpin(f.t.meta, 1);
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
        src: &mut ReserveSource<'_, A, F>,
        built: &mut Vec<(PhysAddr, TableRef<'a>)>,
    ) -> Result<PhysAddr, ReserveError> {
        let cfg = self.config();
        let p = src.take()?;
        let t = match crate::engine::check_page(cfg, self.allocator(), p, cfg.granule().size()) {
            Ok(t) => t,
            Err(source) => {
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
        self.slots(level, a, b, |s, at, next| {
            if !self.needs_child(w, level, s) {
                return true;
            }
            match self.build(w, level + 1, at, next, src, built) {
                Ok(c) => {
                    t.entries[cfg.index(at, level)].store(self.private_link(c), Ordering::Relaxed);
                    t.meta.live_entries.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(e) => {
                    result = Err(e);
                    false
                }
            }
        });
        result
    }

    /// Zeroes privately built tables and returns their pages to the reservation's source.
    fn dismantle(built: &[(PhysAddr, TableRef<'_>)], src: &mut ReserveSource<'_, A, F>) {
        for &(p, t) in built {
            for e in t.entries {
                e.store(0, Ordering::Relaxed);
            }
            t.meta.clear();
            src.pages.push(p);
        }
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
    ///
    /// # Panics
    ///
    /// If the engine's policy is not [`Policy::Refcounted`].
    pub fn release_tables(
        &self,
        range: IovaRange,
        max_leaf: PageSize,
        gather: &mut Gather,
    ) -> Result<(), ReserveError> {
        assert!(self.rc.counting(), "reservations need Policy::Refcounted");
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

    /// Post-order pass over the tables under `f` that `[a, b)` touches: clears the leaves
    /// inside the range (with `gather`), drops `f`'s reservation if `dec_self`, and claims
    /// every table left with nothing. Returns whether `f` itself was claimed (and is still
    /// linked: the caller unlinks it or claims its parent in turn).
    #[allow(clippy::too_many_arguments)]
    fn collapse(
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
            match self.kind_of(f.level, e) {
                Kind::Leaf => {
                    if let (Some(g), Some(w)) = (gather.as_deref_mut(), w) {
                        // Counted only if this exchange removed it (exactly once, and SeqCst,
                        // as in `unmap_leaf_once`).
                        if s >= w.start
                            && s + bs <= w.end
                            && slot.compare_exchange(e, 0, SC, SC).is_ok()
                        {
                            span = Some(span.map_or((idx, idx), |(lo, _)| (lo, idx)));
                            self.flush_ops().add_page(g, self.ext(s), bs);
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
            unpin(f.t.meta, cleared);
        }
        if dec_self {
            f.t.meta.reservations.fetch_sub(1, SC);
        }
        let is_root = f.pa() == self.root();
        let k = kids.len() as u32;
        if !is_root && try_claim(f.t.meta, k) {
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
            && unpin(f.t.meta, unlinked) == Some(unlinked)
            && !is_root
            && try_claim(f.t.meta, 0)
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
