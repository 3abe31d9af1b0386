//! Reservation pools: the pages a reservation took, private to it, and the [`PageSource`] that
//! hands them to the engine.

use crate::count;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;
use iopt_api::{FlushOps, IovaRange, MapError, PhysAddr, TableAlloc};
use iopt_lpae::account::Accounting;
use iopt_lpae::engine::hold::{Chain, Holds};
use iopt_lpae::{Counters, Engine, PageSource};

/// One live reservation's record.
#[derive(Debug)]
pub(crate) struct Pool {
    /// The IOVAs maps bound to it may touch: sorted, merged `(first, last)` intervals.
    pub(crate) covers: Vec<(u64, u64)>,
    /// The hull the handle reports.
    pub(crate) range: IovaRange,
    /// Pages taken at reserve time (what the in-flight cap counts).
    pub(crate) reserved: usize,
    /// Pages not yet consumed.
    pub(crate) pages: Vec<PhysAddr>,
    /// The tables its maps installed from its pages, held until release (counting engines
    /// only; always empty under Linux's freeing).
    pub(crate) holds: Holds,
}

impl Pool {
    /// Checks that `[start, last]` lies inside the reservation.
    pub(crate) fn check_covers(&self, id: u64, start: u64, last: u64) -> Result<(), MapError> {
        match count::first_uncovered(&self.covers, start, last) {
            None => Ok(()),
            Some(at) => Err(MapError::OutsideReservation {
                id,
                range: self.range,
                iova: iopt_api::Iova::new(at),
            }),
        }
    }
}

/// The live reservations of one table, by id.
pub(crate) type Pools = spin::Mutex<BTreeMap<u64, Pool>>;

/// Hands out the pages of one reservation and takes back the ones an install race left over.
/// Never calls the allocator to obtain. Gives back to the allocator only if the pool is gone,
/// which the handle check rules out (release consumes the handle the map borrows); kept so
/// that no page can leak if that ever changes.
pub(crate) struct PoolSource<'a, A: TableAlloc, F: FlushOps, K: Accounting> {
    pub(crate) pools: &'a Pools,
    pub(crate) id: u64,
    pub(crate) engine: &'a Engine<A, F, K>,
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> PoolSource<'_, A, F, K> {
    fn counters(&self) -> &Counters {
        self.engine.counters()
    }

    /// Hands `f` the pool's pages once `count` of them are known to be there, under the lock.
    fn take(&self, count: usize, f: impl FnOnce(&mut Vec<PhysAddr>)) -> Result<(), MapError> {
        {
            let mut pools = self.pools.lock();
            let pool = pools
                .get_mut(&self.id)
                .ok_or(MapError::UnknownReservation { id: self.id })?;
            let left = pool.pages.len();
            if left < count {
                return Err(MapError::ReservationExhausted {
                    id: self.id,
                    left,
                    needed: count,
                });
            }
            f(&mut pool.pages);
        }
        let n = count as u64;
        self.counters().pages_consumed.fetch_add(n, Relaxed);
        self.counters().reserved_outstanding.fetch_sub(n, Relaxed);
        Ok(())
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> PageSource for PoolSource<'_, A, F, K> {
    fn obtain(&mut self, count: usize, out: &mut Vec<PhysAddr>) -> Result<(), MapError> {
        if count == 0 {
            return Ok(());
        }
        self.take(count, |pages| {
            out.extend(pages.drain(pages.len() - count..));
        })
    }

    fn obtain_one(&mut self) -> Result<PhysAddr, MapError> {
        let mut one = PhysAddr::ZERO;
        self.take(1, |pages| one = pages.pop().unwrap_or(PhysAddr::ZERO))?;
        Ok(one)
    }

    fn give_back(&mut self, pages: &[PhysAddr]) {
        if pages.is_empty() {
            return;
        }
        let n = pages.len() as u64;
        self.counters().pages_consumed.fetch_sub(n, Relaxed);
        let back = {
            let mut pools = self.pools.lock();
            match pools.get_mut(&self.id) {
                Some(pool) => {
                    pool.pages.extend_from_slice(pages);
                    true
                }
                None => false,
            }
        };
        if back {
            self.counters().reserved_outstanding.fetch_add(n, Relaxed);
        } else {
            self.counters().reserved_unused.fetch_add(n, Relaxed);
            self.counters().free_bulk_calls.fetch_add(1, Relaxed);
            self.counters().pages_freed.fetch_add(n, Relaxed);
            self.engine
                .allocator()
                .free_bulk(pages, self.engine.config().granule().size());
        }
    }

    /// On an engine that frees empty tables, the tables a reservation's maps build from its
    /// pool stay held by it until release: unmaps inside the reservation leave them in place,
    /// so mapping there again needs no page (Linux's freeing never frees them early anyway).
    const HOLDS: bool = K::COUNTS;

    fn held(&mut self, chain: Chain<'_>) {
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get_mut(&self.id) {
            pool.holds.record(chain);
            return;
        }
        drop(pools);
        // The pool is gone (ruled out, as in `give_back`): give the hold up at once.
        let mut holds = Holds::default();
        holds.record(chain);
        self.engine.release_held(&mut holds);
    }
}
