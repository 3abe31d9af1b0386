//! [`AllocOpsTable`]: the engine plus per-reservation pools.

use crate::count::{self, CountPolicy};
use crate::pool::{Pool, PoolSource, Pools};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicU64, AtomicUsize};
use iopt_api::{
    AllocError, Config, FlushOps, Gather, Iova, IovaRange, Issuer, MapError, NoFlush, PageSize,
    PhysAddr, Prot, RangeError, ReleaseError, Reservation, Reserve, ReserveError, TableAlloc,
};
use iopt_lpae::account::{Accounting, LiveCounts, Untracked};
use iopt_lpae::engine::hold::Holds;
use iopt_lpae::{Engine, split_range};

/// Source of table identities, so a handle of one table is never accepted by another.
static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

/// A limit on the pages held by live reservations of one table, checked when a reservation is
/// made. It never blocks: a reservation over the limit fails with
/// [`ReserveError::CapExceeded`] and the caller decides whether to wait for releases.
///
/// "In flight" counts every live reservation's full size (the pages it took), from `reserve`
/// until `release`, as msm's counter does from ioctl to job free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum InFlightCap {
    /// No limit.
    #[default]
    Unlimited,
    /// Refuse when `in_flight + needed > cap`: the limit is never exceeded, and a single
    /// reservation larger than the cap always fails.
    Strict(usize),
    /// msm's rule (b74fae5492d1) without the wait: refuse when `in_flight > cap` before adding
    /// this reservation's pages. An idle table admits any size; the total may exceed the cap
    /// by the last admitted reservation. msm uses [`MSM_CAP_PAGES`](crate::MSM_CAP_PAGES).
    MsmThrottle(usize),
}

/// An ARM LPAE IO page table whose table pages all come from, and go back to, the caller's
/// [`TableAlloc`] (Design 1, Linux v6.8's custom allocator hooks), with reservations the way
/// panthor and msm make them: a count, one bulk allocation into a pool private to the
/// reservation, maps bound to it that draw only from that pool, and one bulk free of the rest
/// at release.
///
/// Maps outside reservations allocate on demand exactly as [`iopt_lpae::LpaeTable`] does. The
/// walker is the shared [`Engine`]; this type only decides where pages come from.
///
/// `K` says when tables are freed: [`Untracked`] (the default; [`FreePolicy::Linux`]) or
/// [`LiveCounts`] ([`FreePolicy::EmptyTables`], built with
/// [`freeing_empty_tables`](AllocOpsTable::freeing_empty_tables)).
///
/// See the [crate docs](crate) for an example and the policies.
#[derive(Debug)]
pub struct AllocOpsTable<A: TableAlloc, F: FlushOps = NoFlush, K: Accounting = Untracked> {
    engine: Engine<A, F, K>,
    /// Stamps this table's reservation handles (see [`Reservation`]).
    issuer: Issuer,
    next_id: AtomicU64,
    policy: CountPolicy,
    cap: InFlightCap,
    in_flight: AtomicUsize,
    pools: Pools,
}

/// The handle word of a reservation whose maps may lie anywhere in its range (one interval);
/// a batch over disjoint ranges gets [`SCATTERED`] and its maps are checked against the pool.
const CONTIGUOUS: u64 = 1;
/// The handle word of a batch reservation over disjoint ranges.
const SCATTERED: u64 = 0;

impl<A: TableAlloc> AllocOpsTable<A, NoFlush> {
    /// Builds an empty table with no flush callbacks, the [`CountPolicy::WorstCase`] policy
    /// and no cap. The root comes from `alloc`.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated (nothing is held then).
    pub fn new(cfg: Config, alloc: A) -> Result<Self, AllocError> {
        Self::with_flush(cfg, alloc, NoFlush)
    }
}

impl<A: TableAlloc, F: FlushOps> AllocOpsTable<A, F, Untracked> {
    /// Builds an empty table that reports invalidations to `flush`.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn with_flush(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        Self::build(cfg, alloc, flush)
    }
}

impl<A: TableAlloc, F: FlushOps> AllocOpsTable<A, F, LiveCounts> {
    /// Builds an empty table that also frees every table an unmap leaves empty
    /// ([`FreePolicy::EmptyTables`]).
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn freeing_empty_tables(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        Self::build(cfg, alloc, flush)
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> AllocOpsTable<A, F, K> {
    fn build(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        Ok(Self {
            engine: Engine::with_accounting(cfg, alloc, flush)?,
            issuer: Issuer::new(NEXT_TABLE_ID.fetch_add(1, Relaxed)),
            next_id: AtomicU64::new(1),
            policy: CountPolicy::default(),
            cap: InFlightCap::default(),
            in_flight: AtomicUsize::new(0),
            pools: spin::Mutex::new(BTreeMap::new()),
        })
    }

    /// Sets the count policy [`Reserve::reserve`] and [`reserve_batch`](Self::reserve_batch)
    /// use.
    #[must_use]
    pub fn with_policy(mut self, policy: CountPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the in-flight cap.
    #[must_use]
    pub fn with_cap(mut self, cap: InFlightCap) -> Self {
        self.cap = cap;
        self
    }

    /// Returns when tables are freed.
    #[must_use]
    pub fn free_policy(&self) -> FreePolicy {
        if K::COUNTS {
            FreePolicy::EmptyTables
        } else {
            FreePolicy::Linux
        }
    }

    /// Returns the default count policy.
    #[must_use]
    pub fn policy(&self) -> CountPolicy {
        self.policy
    }

    /// Returns the in-flight cap.
    #[must_use]
    pub fn cap(&self) -> InFlightCap {
        self.cap
    }

    /// Returns this table's identity (what [`Reservation::table_id`] holds).
    #[must_use]
    pub fn table_id(&self) -> u64 {
        self.issuer.table_id()
    }

    /// Returns the engine, for inspection.
    #[must_use]
    pub fn engine(&self) -> &Engine<A, F, K> {
        &self.engine
    }

    /// Returns the pages counted against the cap: the full size of every live reservation.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Returns the number of live reservations.
    #[must_use]
    pub fn live_reservations(&self) -> usize {
        self.pools.lock().len()
    }

    /// Returns the tables live reservations hold (empty under Linux's freeing; see
    /// [`map_reserved`](Reserve::map_reserved)).
    #[must_use]
    pub fn held_tables(&self) -> Vec<PhysAddr> {
        self.pools
            .lock()
            .values()
            .flat_map(|p| p.holds.tables().iter().copied())
            .collect()
    }

    /// Returns the unused pages left in a live reservation of this table, or `None` for an
    /// unknown handle.
    #[must_use]
    pub fn reservation_left(&self, reservation: &Reservation) -> Option<usize> {
        self.issuer.word(reservation)?;
        self.pools
            .lock()
            .get(&reservation.id())
            .map(|p| p.pages.len())
    }

    fn granule(&self) -> u64 {
        self.engine.config().granule().size()
    }

    /// Counts the pages a reservation of `ranges` (one job's map operations, in submission
    /// order) with `leaf`-sized leaves takes under `policy`, without reserving anything.
    ///
    /// # Errors
    ///
    /// [`ReserveError::BadLeafSize`] or [`ReserveError::OutOfRange`] for any range,
    /// [`ReserveError::Range`] for an empty slice.
    pub fn count(
        &self,
        ranges: &[IovaRange],
        leaf: PageSize,
        policy: CountPolicy,
    ) -> Result<usize, ReserveError> {
        let cfg = self.engine.config();
        if ranges.is_empty() {
            return Err(ReserveError::Range {
                source: RangeError::Empty { start: Iova::ZERO },
            });
        }
        match policy {
            CountPolicy::MsmMerged => count::msm_merged_pages(cfg, ranges, leaf),
            CountPolicy::WorstCase => ranges.iter().try_fold(0usize, |n, &r| {
                Ok(n.saturating_add(count::worst_case_pages(cfg, r, leaf)?))
            }),
            CountPolicy::Exact => ranges
                .iter()
                .try_fold(0usize, |n, &r| Ok(n.saturating_add(self.exact(r, leaf)?))),
        }
    }

    fn exact(&self, range: IovaRange, leaf: PageSize) -> Result<usize, ReserveError> {
        count::validate(self.engine.config(), range, leaf)?;
        self.engine.pages_needed(range, leaf).map_err(|e| match e {
            MapError::InvalidPageSize { .. } | MapError::Misaligned { .. } => {
                ReserveError::BadLeafSize {
                    range,
                    size: leaf.get(),
                }
            }
            MapError::BrokenTable { iova, pa } => ReserveError::BrokenTable { iova, pa },
            _ => ReserveError::OutOfRange { range },
        })
    }

    /// Reserves for `range` with an explicit policy instead of the table's.
    ///
    /// # Errors
    ///
    /// As [`Reserve::reserve`].
    pub fn reserve_with(
        &self,
        range: IovaRange,
        leaf: PageSize,
        policy: CountPolicy,
    ) -> Result<Reservation, ReserveError> {
        let n = self.count(&[range], leaf, policy)?;
        self.take(
            alloc::vec![(range.start().get(), range.last().get())],
            range,
            leaf,
            n,
        )
    }

    /// Reserves once for all map operations of one job (msm's and panthor's per-job
    /// reservation), counting with the table's policy. The handle's range is the hull of
    /// `ranges`; maps bound to it must lie inside their union.
    ///
    /// # Errors
    ///
    /// As [`Reserve::reserve`]; [`ReserveError::Range`] for an empty slice;
    /// [`ReserveError::Alloc`] also when the set of ranges cannot be allocated.
    pub fn reserve_batch(
        &self,
        ranges: &[IovaRange],
        leaf: PageSize,
    ) -> Result<Reservation, ReserveError> {
        self.reserve_batch_with(ranges, leaf, self.policy)
    }

    /// [`reserve_batch`](Self::reserve_batch) with an explicit policy.
    ///
    /// The union of `ranges` is sorted and merged once here, so a map bound to the handle
    /// checks its bounds by binary search, whatever the batch's size.
    ///
    /// # Errors
    ///
    /// As [`reserve_batch`](Self::reserve_batch).
    pub fn reserve_batch_with(
        &self,
        ranges: &[IovaRange],
        leaf: PageSize,
        policy: CountPolicy,
    ) -> Result<Reservation, ReserveError> {
        let n = self.count(ranges, leaf, policy)?;
        let covers = count::union(ranges)?;
        let lo = covers.first().map_or(0, |c| c.0);
        let hi = covers.last().map_or(0, |c| c.1);
        let hull = hull(lo, hi).ok_or(ReserveError::OutOfRange { range: ranges[0] })?;
        self.take(covers, hull, leaf, n)
    }

    /// Panthor's unmap reservation count for `range` on this table's geometry
    /// ([`unmap_reserve_pages`](crate::unmap_reserve_pages) with the leaf-table span of the
    /// smallest page size): 0, 1 or 2.
    #[must_use]
    pub fn unmap_reserve_pages(&self, range: IovaRange) -> usize {
        count::unmap_block(self.engine.config()).map_or(0, |b| count::unmap_reserve_pages(range, b))
    }

    /// Reserves what remapping the edges of an unmap of `range` needs, the way panthor
    /// prepares an unmap: [`unmap_reserve_pages`](Self::unmap_reserve_pages) pages, bound to
    /// `range` widened to whole leaf-table spans, with the smallest page size as leaf. The
    /// caller unmaps the widened blocks and remaps the borders with
    /// [`map_range_reserved`](Self::map_range_reserved).
    ///
    /// # Errors
    ///
    /// As [`Reserve::reserve`] with the smallest page size.
    pub fn reserve_unmap(&self, range: IovaRange) -> Result<Reservation, ReserveError> {
        let cfg = self.engine.config();
        let leaf = cfg
            .page_sizes()
            .smallest()
            .ok_or(ReserveError::BadLeafSize { range, size: 0 })?;
        count::validate(cfg, range, leaf)?;
        let n = self.unmap_reserve_pages(range);
        let widened = count::unmap_block(cfg)
            .and_then(|b| {
                let lo = range.start().get() & !(b - 1);
                let hi = range.last().get() | (b - 1);
                hull(lo, hi)
            })
            .unwrap_or(range);
        self.take(
            alloc::vec![(widened.start().get(), widened.last().get())],
            widened,
            leaf,
            n,
        )
    }

    /// Admits `needed` pages under the cap, adding them to the in-flight count.
    fn admit(&self, needed: usize) -> Result<(), ReserveError> {
        let refuse = |cur: usize, cap: usize| ReserveError::CapExceeded {
            in_flight: cur,
            needed,
            cap,
        };
        match self.cap {
            InFlightCap::Unlimited => {
                self.in_flight.fetch_add(needed, Relaxed);
                Ok(())
            }
            InFlightCap::Strict(cap) => self
                .in_flight
                .fetch_update(Relaxed, Relaxed, |cur| {
                    cur.checked_add(needed).filter(|&t| t <= cap)
                })
                .map(drop)
                .map_err(|cur| refuse(cur, cap)),
            InFlightCap::MsmThrottle(cap) => self
                .in_flight
                .fetch_update(Relaxed, Relaxed, |cur| {
                    if cur <= cap {
                        cur.checked_add(needed)
                    } else {
                        None
                    }
                })
                .map(drop)
                .map_err(|cur| refuse(cur, cap)),
        }
    }

    /// Takes `n` pages in one bulk call into a new pool and returns its handle.
    fn take(
        &self,
        covers: Vec<(u64, u64)>,
        range: IovaRange,
        leaf: PageSize,
        n: usize,
    ) -> Result<Reservation, ReserveError> {
        self.admit(n)?;
        let c = self.engine.counters();
        let mut pages = Vec::new();
        if n > 0 {
            c.alloc_bulk_calls.fetch_add(1, Relaxed);
            if let Err(e) = self
                .engine
                .allocator()
                .alloc_bulk(self.granule(), n, &mut pages)
            {
                self.in_flight.fetch_sub(n, Relaxed);
                return Err(e.into());
            }
            c.pages_allocated.fetch_add(n as u64, Relaxed);
        }
        c.pages_reserved.fetch_add(n as u64, Relaxed);
        c.reserved_outstanding.fetch_add(n as u64, Relaxed);
        let id = self.next_id.fetch_add(1, Relaxed);
        let word = if covers.len() == 1 {
            CONTIGUOUS
        } else {
            SCATTERED
        };
        let mut pools = self.pools.lock();
        pools.insert(
            id,
            Pool {
                covers,
                range,
                reserved: n,
                pages,
                holds: Holds::default(),
            },
        );
        drop(pools);
        Ok(self.issuer.issue(id, range, leaf, n, word))
    }

    /// Checks a reserved map in the order both designs use: the handle, then the arguments
    /// (`args` validates them and returns its result with the IOVA span `[start, last]` it
    /// covers), then the bounds. One look at the pools answers both reservation questions.
    fn checked<T>(
        &self,
        r: &Reservation,
        args: impl FnOnce() -> Result<(T, u64, u64), MapError>,
    ) -> Result<T, MapError> {
        let id = r.id();
        if self.issuer.word(r).is_none() {
            return Err(MapError::UnknownReservation { id });
        }
        let pools = self.pools.lock();
        let pool = pools.get(&id).ok_or(MapError::UnknownReservation { id })?;
        let (v, start, last) = args()?;
        pool.check_covers(id, start, last)?;
        Ok(v)
    }

    /// [`Reserve::map_reserved`] through the registry, checking in order: batch reservations
    /// over disjoint ranges, and every error. Out of line, so that the hot path inlines into
    /// its caller small.
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
        let run = self.checked(reservation, || {
            let run = self.engine.validate_map(iova, pa, size, count, prot)?;
            // validate_map checked that `iova + size * count - 1` does not overflow.
            Ok((run, iova.get(), iova.get() + (size.get() * count - 1)))
        })?;
        self.engine
            .map_run(run, prot, &mut self.pool_source(reservation.id()))
    }

    /// Three words, built on every reserved map: the rest is reached through the engine only
    /// when the pool is used.
    fn pool_source(&self, id: u64) -> PoolSource<'_, A, F, K> {
        PoolSource {
            pools: &self.pools,
            id,
            engine: &self.engine,
        }
    }

    /// Maps `len` bytes inside a reservation, choosing page sizes as
    /// [`IoPageTable::map_range`](iopt_api::IoPageTable::map_range) does (panthor's split of a scatterlist segment into 4 KiB and
    /// 2 MiB pages), all or nothing, without calling the allocator.
    ///
    /// # Errors
    ///
    /// As [`IoPageTable::map_range`](iopt_api::IoPageTable::map_range), plus [`MapError::UnknownReservation`],
    /// [`MapError::OutsideReservation`] and [`MapError::ReservationExhausted`]. On error the
    /// table, the pool and the allocator are unchanged.
    pub fn map_range_reserved(
        &self,
        reservation: &Reservation,
        iova: Iova,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let runs = self.checked(reservation, || {
            let runs = split_range(&self.engine, iova, pa, len, prot)?;
            // split_range checked that `iova + len - 1` does not overflow.
            Ok((runs, iova.get(), iova.get() + (len - 1)))
        })?;
        self.engine
            .map_runs(&runs, prot, &mut self.pool_source(reservation.id()))
    }
}

/// The range `[lo, hi]` (inclusive), if it is one.
fn hull(lo: u64, hi: u64) -> Option<IovaRange> {
    let len = hi.checked_sub(lo)?.checked_add(1)?;
    IovaRange::new(Iova::new(lo), len, 1).ok()
}

iopt_lpae::impl_io_page_table_on_engine!(AllocOpsTable<K>);

impl<A: TableAlloc, F: FlushOps, K: Accounting> Reserve for AllocOpsTable<A, F, K> {
    /// Counts with the table's [`CountPolicy`], checks the [`InFlightCap`], and takes the pages
    /// with one [`TableAlloc::alloc_bulk`] call (none for a count of zero) into a pool private
    /// to the reservation.
    fn reserve(&self, range: IovaRange, max_leaf: PageSize) -> Result<Reservation, ReserveError> {
        self.reserve_with(range, max_leaf, self.policy)
    }

    /// Maps inside the reservation: the run must lie inside it
    /// ([`MapError::OutsideReservation`]); missing tables come only from its pool, and when the
    /// pool holds too few the map fails with [`MapError::ReservationExhausted`] and changes
    /// nothing. Leaves larger than the reservation's leaf are allowed (they need fewer
    /// tables); smaller ones may exhaust it.
    ///
    /// Under [`FreePolicy::EmptyTables`], every table the map installs from the pool is held
    /// by the reservation until [`release`](Reserve::release) (its `reservations` count
    /// raised before it is published, [`iopt_lpae::engine::hold`]): unmaps inside the
    /// reservation leave it in place, empty, so mapping there again needs no page. Like a
    /// table Design 2 reserves, a held table cannot be replaced by a block map or removed by
    /// an unmap at its parent's block size meanwhile ([`MapError::ReservedTable`],
    /// [`UnmapError::ReservedTable`](iopt_api::UnmapError::ReservedTable)).
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
        // The hot path: this table issued the handle (so, borrowed, it is live), the
        // reservation is one interval and the run lies inside it. No lock is taken unless the
        // map needs tables from the pool. Anything else takes the checks below, in order.
        if self.issuer.word(reservation) == Some(CONTIGUOUS) && reservation.holds(iova, size, count)
        {
            // In bounds: the engine's own checks come next, as on the slow path.
            let mut src = self.pool_source(reservation.id());
            return self
                .engine
                .map_within(iova, pa, size, count, prot, &mut src);
        }
        self.map_reserved_checked(reservation, iova, pa, size, count, prot)
    }

    /// Returns the unused pages with one [`TableAlloc::free_bulk`] call (none if all were
    /// used). Under Linux's freeing, tables made from the pool stay in the tree: Design 1
    /// frees tables only where Linux does. Under [`FreePolicy::EmptyTables`] the tables the
    /// reservation's maps installed from its pool were held by it (see
    /// [`map_reserved`](Reserve::map_reserved)); release gives them up and frees, after the
    /// walk flush and the grace period, every one left empty, with the ancestors that
    /// empties. Tables still holding leaves stay. `gather` is untouched.
    ///
    /// A refused release (a handle of another table, or a rebuilt one) touches nothing and
    /// gives the handle back.
    fn release(&self, reservation: Reservation, gather: &mut Gather) -> Result<(), ReleaseError> {
        let _ = gather;
        let unknown = ReserveError::UnknownReservation {
            id: reservation.id(),
        };
        if self.issuer.word(&reservation).is_none() {
            return Err(ReleaseError::new(reservation, unknown));
        }
        let pool = self.pools.lock().remove(&reservation.id());
        let Some(mut pool) = pool else {
            return Err(ReleaseError::new(reservation, unknown));
        };
        if K::COUNTS {
            self.engine.release_held(&mut pool.holds);
        }
        let n = pool.pages.len() as u64;
        let c = self.engine.counters();
        if n > 0 {
            c.free_bulk_calls.fetch_add(1, Relaxed);
            c.pages_freed.fetch_add(n, Relaxed);
            self.engine
                .allocator()
                .free_bulk(&pool.pages, self.granule());
        }
        c.reserved_unused.fetch_add(n, Relaxed);
        c.reserved_outstanding.fetch_sub(n, Relaxed);
        self.in_flight.fetch_sub(pool.reserved, Relaxed);
        Ok(())
    }

    fn pages_needed(&self, range: IovaRange, leaf: PageSize) -> Result<usize, ReserveError> {
        self.exact(range, leaf)
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Drop for AllocOpsTable<A, F, K> {
    /// Returns the pages of every unreleased reservation in one bulk free; the engine then
    /// frees the tree and the root.
    fn drop(&mut self) {
        let mut pools = core::mem::take(self.pools.get_mut());
        if K::COUNTS {
            // Held tables an unmap unlinked are freed by their holder alone.
            for pool in pools.values_mut() {
                self.engine.release_held(&mut pool.holds);
            }
        }
        let pages: Vec<PhysAddr> = pools.into_values().flat_map(|p| p.pages).collect();
        if pages.is_empty() {
            return;
        }
        let n = pages.len() as u64;
        let c = self.engine.counters();
        c.free_bulk_calls.fetch_add(1, Relaxed);
        c.pages_freed.fetch_add(n, Relaxed);
        c.reserved_unused.fetch_add(n, Relaxed);
        c.reserved_outstanding.fetch_sub(n, Relaxed);
        self.engine.allocator().free_bulk(&pages, self.granule());
    }
}

/// When table pages go back to the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum FreePolicy {
    /// Linux io-pgtable-arm: a table is freed only by an unmap at its parent's block size, by a
    /// block map over it, or when the table is dropped. Tables emptied by small unmaps stay.
    #[default]
    Linux,
    /// Also free every table an unmap leaves empty, and its ancestors when they empty too, so a
    /// full unmap returns the tree to the root alone. Frees happen after the walk flush and,
    /// under concurrency, once no operation that could still see the table is running.
    EmptyTables,
}
