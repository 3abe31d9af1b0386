//! # iopt-prealloc: Design 2, refcounted VA reservations inside the table
//!
//! The design Jason Gunthorpe proposed on the iommu list (2023-11-10, never merged, and what
//! nouveau ships for its own page tables): an "allocate VA" call installs every table level that
//! covers a range and takes a reference on each table page, so later maps there never allocate
//! and later unmaps never free; "unallocate VA" drops the references and frees, in one batch,
//! whatever falls to zero. [`PreallocTable`] is a complete ARM LPAE page table built that way
//! on the shared [`Engine`] of `iopt-lpae`, over the engine's [`LiveCounts`] accounting.
//!
//! ```
//! use iopt_api::{Config, ConfigInput, Format, Gather, IoPageTable, Iova, IovaRange, PageSize,
//!     PageSizes, PhysAddr, Prot, Reserve};
//! use iopt_sim::SimMemory;
//! use iopt_prealloc::PreallocTable;
//!
//! // panthor's configuration: 48-bit stage 1, 4 KiB and 2 MiB pages.
//! let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::from_bits(0x20_1000), 48, 40))?;
//! let mem = SimMemory::new();
//! let table = PreallocTable::new(cfg, &mem)?;
//!
//! // At VM_BIND submit: reserve 1 GiB at +4 KiB for 2 MiB-contiguous backing. Exactly the
//! // 5 missing tables are taken (one L1, two L2, two L3), in one bulk allocation; the worst
//! // case of Design 1 would be 516.
//! let range = IovaRange::new(Iova::new((1 << 30) + 0x1000), 1 << 30, 0x1000)?;
//! assert_eq!(table.pages_needed(range, PageSize::SZ_2M)?, 5);
//! let r = table.reserve(range, PageSize::SZ_2M)?;
//! assert_eq!(r.pages(), 5);
//!
//! // At run_job: maps inside the reservation never call the allocator.
//! let before = mem.stats();
//! let blocks = Iova::new((1 << 30) + (2 << 20));
//! table.map_reserved(&r, blocks, PhysAddr::new(0x4020_0000), PageSize::SZ_2M, 8, Prot::READ)?;
//! table.map_reserved(&r, Iova::new((1 << 30) + 0x1000), PhysAddr::new(0x8000_0000), PageSize::SZ_4K, 4, Prot::READ)?;
//! assert_eq!(mem.stats().pages_allocated, before.pages_allocated);
//! assert_eq!(table.iova_to_phys(Iova::new(0x4020_0123)).unwrap().pa, PhysAddr::new(0x4020_0123));
//!
//! // Unmaps inside it free nothing.
//! let mut gather = Gather::new();
//! table.unmap(blocks, PageSize::SZ_2M, 8, &mut gather)?;
//! assert_eq!(mem.stats().pages_freed, before.pages_freed);
//!
//! // At cleanup: release unmaps what is left in the range and frees the tables in one batch.
//! table.release(r, &mut gather)?;
//! assert_eq!(mem.stats().live_pages, 1); // the root alone
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Semantics, decided
//!
//! - **What a reservation covers.** `reserve(range, max_leaf)` plans leaves as `map_range`
//!   places them for IOVA-congruent backing, with sizes up to `max_leaf`: a slot gets a leaf
//!   where it lies wholly inside the range and its size is allowed, and a table below it
//!   everywhere else the range touches. It installs exactly the missing tables of that plan (one
//!   `alloc_bulk`, none when nothing is missing) and increments the reservation count of every
//!   table of the plan, existing ones included. The root is never counted (it is never freed).
//!   The range must be aligned to the smallest page size, not to `max_leaf`.
//!   [`Reserve::pages_needed`] returns exactly what `reserve` would take now.
//! - **Maps.** [`Reserve::map_reserved`] checks that the run lies inside the reservation
//!   ([`MapError::OutsideReservation`]) and never calls the allocator: a map that would need a
//!   table the plan did not install (a leaf smaller than planned, e.g. 4 KiB pages where the
//!   reservation planned 2 MiB blocks) is refused with [`MapError::ReservationExhausted`]
//!   (`left: 0`) and changes nothing. A plain [`IoPageTable::map`](iopt_api::IoPageTable::map) works anywhere: it finds the
//!   reserved tables present and allocates on demand what is missing, like Linux.
//! - **Block over a reserved table.** Refused with [`MapError::ReservedTable`]; an unmap at
//!   block size that would remove a reserved table with [`UnmapError::ReservedTable`](iopt_api::UnmapError::ReservedTable). Linux
//!   would free the table.
//! - **Unmaps** never free a table a reservation holds. Outside reservations, a table left
//!   empty by an unmap is freed at once (eager freeing), with its empty ancestors, after the
//!   walk flush; so a full unmap plus the release of every reservation returns to the root
//!   alone.
//! - **Release unmaps first.** [`Reserve::release`] removes every leaf inside the reservation's
//!   range (adding it to the gather), including leaves mapped there under another, overlapping
//!   reservation, then drops the counts and frees every table left with neither live entries
//!   nor reservations, in one batch after one [`FlushOps::flush_walk`] per unlinked subtree.
//!   Release therefore cannot fail for a live handle (the cleanup path of a fence-signalling
//!   job must not fail), and a table another reservation holds survives. A handle of another
//!   table, or one rebuilt from a released handle's fields, is
//!   [`ReserveError::UnknownReservation`], in a [`ReleaseError`] that gives the handle back
//!   untouched (one sent to the wrong table can still be released on its own): handles carry
//!   the table's secret key (see [`Reservation`]), and the one the table issued is consumed
//!   by its release.
//! - **Differences from [`LpaeTable`](iopt_lpae::LpaeTable)** on plain map/unmap sequences:
//!   none in results, errors or translations, except that an unmap at a block size over a
//!   slot that Linux would still hold an *empty* table in (left behind by earlier small
//!   unmaps) is [`UnmapError::NotMapped`](iopt_api::UnmapError::NotMapped) here, since that table was freed when it emptied.
//!
//! ## Concurrency
//!
//! All operations take `&self` and may run concurrently on disjoint ranges, sharing
//! intermediate tables: tables are installed with compare-exchange (the loser returns its
//! pages), counts are atomics beside each page, eager frees use a pin/claim protocol on the
//! live count so that no thread can write into a table being freed, and freed pages are
//! returned to the allocator only after every operation that could still hold a pointer to
//! them has finished. The engine's [`account`](iopt_lpae::account) and [`reclaim`](iopt_lpae::reclaim) modules document the
//! protocol.
//!
//! That protocol costs two locked read-modify-writes per shared call (announcing the call to
//! the grace period, and pinning the leaf table). A caller that holds the table exclusively
//! (behind its own lock, as panthor's `op_lock` serialises its page-table calls) can use
//! [`IoPageTable::map_mut`](iopt_api::IoPageTable::map_mut),
//! [`unmap_mut`](iopt_api::IoPageTable::unmap_mut) and
//! [`iova_to_phys_mut`](iopt_api::IoPageTable::iova_to_phys_mut) instead: the same results,
//! and on a hit of the engine's leaf-table cursor neither operation (single calls take about
//! half the time; `benches/README.md` has the figures).
//!
//! `no_std` + `alloc`; no `unsafe`.

#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use iopt_api::{
    AllocError, Config, FlushOps, Gather, Iova, IovaRange, Issuer, MapError, NoFlush, PageSize,
    PhysAddr, Prot, ReleaseError, Reservation, Reserve, ReserveError, TableAlloc,
};
use iopt_lpae::account::{LiveCounts, Reserving};
use iopt_lpae::{Engine, PageSource};

/// Identities of tables, so a reservation of one table is refused by another.
static NEXT_TABLE: AtomicU64 = AtomicU64::new(1);

/// The source of maps bound to a reservation: it has no pages to give. `HELD` when the
/// reservation holds the map's leaf table and every table above it (see
/// [`holds_path`]).
struct NoAlloc<const HELD: bool> {
    id: u64,
}

/// Whether a reservation with leaves up to `max_leaf` installed, and so holds, the leaf table
/// of every `size` leaf inside it: when even the table one level up could not hold a leaf of
/// its own block size (`max_leaf` below it), the reservation needed a table at every level
/// down to `size`'s. Otherwise a `size` leaf may sit below a block-sized slot the
/// reservation left to a leaf, in a table nobody reserved.
#[inline]
fn holds_path(cfg: &Config, max_leaf: PageSize, size: PageSize) -> bool {
    max_leaf.get() < size.get().saturating_mul(cfg.granule().entries() as u64)
}

impl<const HELD: bool> PageSource for NoAlloc<HELD> {
    const PATH_HELD: bool = HELD;

    fn obtain(
        &mut self,
        count: usize,
        _out: &mut alloc::vec::Vec<PhysAddr>,
    ) -> Result<(), MapError> {
        if count == 0 {
            return Ok(());
        }
        Err(MapError::ReservationExhausted {
            id: self.id,
            left: 0,
            needed: count,
        })
    }

    fn give_back(&mut self, pages: &[PhysAddr]) {
        debug_assert!(pages.is_empty(), "a reserved map obtained no pages");
    }
}

/// An ARM LPAE IO page table with refcounted VA reservations (Design 2). See the
/// [crate docs](crate) for the semantics.
///
/// `K` is what the table counts: [`LiveCounts`] (the default: live entries and reservations,
/// and tables an unmap empties outside reservations are freed at once) or
/// [`ReservationCounts`](iopt_lpae::account::ReservationCounts) (the seed message's Design
/// 2: reservations only, tables freed at release), built with
/// [`with_accounting`](PreallocTable::with_accounting).
pub struct PreallocTable<A: TableAlloc, F: FlushOps = NoFlush, K: Reserving = LiveCounts> {
    engine: Engine<A, F, K>,
    /// Stamps this table's reservation handles. A handle it recognises is live (release
    /// consumes it) and says what it reserved, so the table keeps no registry.
    issuer: Issuer,
    next: AtomicU64,
    /// Live reservations.
    live: AtomicUsize,
}

impl<A: TableAlloc, F: FlushOps, K: Reserving> fmt::Debug for PreallocTable<A, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreallocTable")
            .field("id", &self.issuer.table_id())
            .field("root", &self.engine.root())
            .field("reservations", &self.live_reservations())
            .finish_non_exhaustive()
    }
}

impl<A: TableAlloc> PreallocTable<A, NoFlush> {
    /// Builds an empty table (the root only) with no flush callbacks.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn new(cfg: Config, alloc: A) -> Result<Self, AllocError> {
        Self::with_flush(cfg, alloc, NoFlush)
    }
}

impl<A: TableAlloc, F: FlushOps> PreallocTable<A, F, LiveCounts> {
    /// Builds an empty table that reports invalidations to `flush`.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn with_flush(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        Self::with_accounting(cfg, alloc, flush)
    }
}

impl<A: TableAlloc, F: FlushOps, K: Reserving> PreallocTable<A, F, K> {
    /// Builds an empty table that counts with `K` and reports invalidations to `flush`.
    ///
    /// ```
    /// use iopt_api::{Config, ConfigInput, Format, Gather, Iova, IoPageTable, IovaRange, NoFlush, PageSize, PageSizes, PhysAddr, Prot, Reserve};
    /// use iopt_lpae::account::ReservationCounts;
    /// use iopt_prealloc::PreallocTable;
    /// use iopt_sim::SimMemory;
    /// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
    /// let mem = SimMemory::new();
    /// let t = PreallocTable::<_, _, ReservationCounts>::with_accounting(cfg, &mem, NoFlush)?;
    /// let range = IovaRange::new(Iova::new(0x4000_0000), 0x20_0000, 0x1000)?;
    /// let r = t.reserve(range, PageSize::SZ_4K)?;
    /// t.map_reserved(&r, Iova::new(0x4000_0000), PhysAddr::new(0x1000), PageSize::SZ_4K, 1, Prot::READ)?;
    /// t.unmap(Iova::new(0x4000_0000), PageSize::SZ_4K, 1, &mut Gather::new())?;
    /// assert_eq!(mem.stats().live_pages, 4); // unmaps never free: the reservation's tables stay
    /// t.release(r, &mut Gather::new()).map_err(|e| e.error())?;
    /// assert_eq!(mem.stats().live_pages, 1); // "unallocate VA" frees them
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn with_accounting(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        Ok(Self {
            engine: Engine::with_accounting(cfg, alloc, flush)?,
            issuer: Issuer::new(NEXT_TABLE.fetch_add(1, Ordering::Relaxed)),
            next: AtomicU64::new(1),
            live: AtomicUsize::new(0),
        })
    }

    /// Returns the engine, for inspection.
    #[must_use]
    pub fn engine(&self) -> &Engine<A, F, K> {
        &self.engine
    }

    /// Returns this table's identity (what [`Reservation::table_id`] holds).
    #[must_use]
    pub fn id(&self) -> u64 {
        self.issuer.table_id()
    }

    /// Returns how many reservations are live.
    #[must_use]
    pub fn live_reservations(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// [`Reserve::map_reserved`] with every check, in order (the handle, the arguments, the
    /// bounds): maps the hot path does not take, and every error. Out of line, so that the hot
    /// path inlines into its caller small.
    #[inline(never)]
    fn map_reserved_checked(
        &self,
        reservation: &Reservation,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let id = reservation.id();
        if self.issuer.word(reservation).is_none() {
            return Err(MapError::UnknownReservation { id });
        }
        let run = self.engine.validate_map(iova, pa, size, count, prot)?;
        let range = reservation.range();
        let last = iova.get() + (count * size.get() - 1);
        if !range.contains(iova) {
            return Err(MapError::OutsideReservation { id, range, iova });
        }
        if !range.contains(Iova::new(last)) {
            let past = range.end().unwrap_or(Iova::new(last));
            return Err(MapError::OutsideReservation {
                id,
                range,
                iova: past,
            });
        }
        if holds_path(self.engine.config(), reservation.max_leaf(), size) {
            return self.engine.map_run(run, prot, &mut NoAlloc::<true> { id });
        }
        self.engine.map_run(run, prot, &mut NoAlloc::<false> { id })
    }
}

impl<A: TableAlloc, F: FlushOps, K: Reserving> Drop for PreallocTable<A, F, K> {
    fn drop(&mut self) {
        // Nothing can be running; hand back anything still waiting for a grace period (the
        // engine's own drop then frees the tree, reserved tables included).
        self.engine.quiesce();
    }
}

iopt_lpae::impl_io_page_table_on_engine!(PreallocTable<K: Reserving>);

impl<A: TableAlloc, F: FlushOps, K: Reserving> Reserve for PreallocTable<A, F, K> {
    /// Installs and counts the tables `range` needs for leaves up to `max_leaf` (see the
    /// [crate docs](crate)); takes exactly the missing pages in one `alloc_bulk`.
    fn reserve(&self, range: IovaRange, max_leaf: PageSize) -> Result<Reservation, ReserveError> {
        let pages = self.engine.reserve_tables(range, max_leaf)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(self.issuer.issue(id, range, max_leaf, pages, 0))
    }

    #[inline]
    fn map_reserved(
        &self,
        reservation: &Reservation,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        // The hot path: this table issued the handle (so, borrowed, it is live) and the run
        // lies inside it; the engine's argument checks come next, as on the checked path.
        // Anything else takes the checked path, in order.
        if self.issuer.word(reservation).is_some() && reservation.holds(iova, size, count) {
            let id = reservation.id();
            if holds_path(self.engine.config(), reservation.max_leaf(), size) {
                return self.engine.map_within(
                    iova,
                    pa,
                    size,
                    count,
                    prot,
                    &mut NoAlloc::<true> { id },
                );
            }
            return self.engine.map_within(
                iova,
                pa,
                size,
                count,
                prot,
                &mut NoAlloc::<false> { id },
            );
        }
        self.map_reserved_checked(reservation, iova, pa, size, count, prot)
    }

    /// Unmaps the range and drops the reservation's counts (see the [crate docs](crate)). A
    /// refused release (a handle of another table, or a rebuilt one) touches nothing and gives
    /// the handle back.
    fn release(&self, reservation: Reservation, gather: &mut Gather) -> Result<(), ReleaseError> {
        let id = reservation.id();
        if self.issuer.word(&reservation).is_none() {
            return Err(ReleaseError::new(
                reservation,
                ReserveError::UnknownReservation { id },
            ));
        }
        let (range, leaf) = (reservation.range(), reservation.max_leaf());
        // The engine refuses (bad arguments, no root) before it clears or uncounts anything,
        // so on error the reservation still holds every table it counted: the handle given
        // back is live.
        if let Err(e) = self.engine.release_tables(range, leaf, gather) {
            return Err(ReleaseError::new(reservation, e));
        }
        self.live.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    fn pages_needed(&self, range: IovaRange, leaf: PageSize) -> Result<usize, ReserveError> {
        self.engine.reserve_pages_needed(range, leaf)
    }
}
