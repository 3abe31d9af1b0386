//! TLB and walk-cache maintenance: the callbacks a driver supplies and the gather that
//! batches leaf invalidations.
//!
//! The rules follow Linux's `iommu_flush_ops`: removing a **table** entry calls
//! [`FlushOps::flush_walk`] synchronously, and only after it returns is the table's memory
//! handed back to the allocator, so a walker can never fetch descriptors from a recycled page.
//! Removing **leaves** records them in a [`Gather`] through [`FlushOps::add_page`]; the caller
//! invalidates the gathered range when it is ready (Linux's `iotlb_sync`).

use crate::Iova;

/// The driver's invalidation callbacks. Every method has a no-op default, as Linux skips
/// missing callbacks. Sizes passed are always page sizes the table supports.
pub trait FlushOps: Send + Sync {
    /// Invalidates everything (called once, when the table is dropped).
    fn flush_all(&self) {}

    /// Invalidates walk caches (and leaves) for `[iova, iova + size)` after a table entry was
    /// removed; `granule` is the table granule. Returns only when the invalidation is complete.
    fn flush_walk(&self, iova: Iova, size: u64, granule: u64) {
        let _ = (iova, size, granule);
    }

    /// Records a cleared leaf of `size` bytes at `iova` for a later invalidation. The default
    /// adds it to the gather's range.
    #[inline]
    fn add_page(&self, gather: &mut Gather, iova: Iova, size: u64) {
        gather.add(iova, size);
    }
}

/// Flush callbacks that do nothing: for tables no hardware walks (tests, simulation).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFlush;

impl FlushOps for NoFlush {}

/// A batch of cleared leaves awaiting one TLB invalidation (Linux's `iommu_iotlb_gather`).
///
/// ```
/// use iopt_api::{Gather, Iova};
/// let mut g = Gather::new();
/// g.add(Iova::new(0x2000), 0x1000);
/// g.add(Iova::new(0x5000), 0x1000);
/// assert_eq!(g.range(), Some((Iova::new(0x2000), Iova::new(0x5fff))));
/// assert_eq!(g.pages(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gather {
    start: u64,
    last: u64,
    pgsize: u64,
    pages: u64,
}

impl Gather {
    /// An empty gather.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            start: u64::MAX,
            last: 0,
            pgsize: 0,
            pages: 0,
        }
    }

    /// Adds `[iova, iova + size)` to the range.
    #[inline]
    pub fn add(&mut self, iova: Iova, size: u64) {
        let s = iova.get();
        let l = s.saturating_add(size.saturating_sub(1));
        self.start = self.start.min(s);
        self.last = self.last.max(l);
        self.pgsize = self.pgsize.max(size);
        self.pages += 1;
    }

    /// Returns the first and last IOVA to invalidate, or `None` if nothing was gathered.
    #[must_use]
    pub fn range(&self) -> Option<(Iova, Iova)> {
        (self.pages > 0).then(|| (Iova::new(self.start), Iova::new(self.last)))
    }

    /// Returns the largest leaf size gathered (0 if none).
    #[must_use]
    pub const fn pgsize(&self) -> u64 {
        self.pgsize
    }

    /// Returns the number of leaves gathered.
    #[must_use]
    pub const fn pages(&self) -> u64 {
        self.pages
    }

    /// Returns whether nothing was gathered.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Empties the gather (after the caller's invalidation).
    pub fn reset(&mut self) {
        *self = Self::new();
    }
}

impl<T: FlushOps + ?Sized> FlushOps for &T {
    #[inline]
    fn flush_all(&self) {
        (**self).flush_all();
    }
    #[inline]
    fn flush_walk(&self, iova: Iova, size: u64, granule: u64) {
        (**self).flush_walk(iova, size, granule);
    }
    #[inline]
    fn add_page(&self, gather: &mut Gather, iova: Iova, size: u64) {
        (**self).add_page(gather, iova, size);
    }
}

impl<T: FlushOps + ?Sized> FlushOps for alloc::sync::Arc<T> {
    #[inline]
    fn flush_all(&self) {
        (**self).flush_all();
    }
    #[inline]
    fn flush_walk(&self, iova: Iova, size: u64, granule: u64) {
        (**self).flush_walk(iova, size, granule);
    }
    #[inline]
    fn add_page(&self, gather: &mut Gather, iova: Iova, size: u64) {
        (**self).add_page(gather, iova, size);
    }
}
