//! The caller-supplied table allocator and the per-table metadata beside each page.
//!
//! This is Linux v6.8's `cfg->alloc`/`cfg->free` pair (Design 1's hook) made fallible, sized and
//! bulk-capable, plus the one thing a `no_std`, `unsafe`-free table needs that C gets from
//! `phys_to_virt`: a way to reach a table's entries from the physical address in a descriptor.

use crate::atomic::{AtomicU32, AtomicU64};
use crate::{AllocError, PhysAddr};
use alloc::vec::Vec;

/// Software metadata the allocator keeps beside each table page, like a kernel's `struct
/// ptdesc`: never in descriptor bits, always atomic. The allocator hands it out zeroed with the
/// page; only the table that owns the page changes it.
#[derive(Debug, Default)]
pub struct TableMeta {
    /// Valid descriptors in the table (maintained by backends that free empty tables).
    pub live_entries: AtomicU32,
    /// Live reservations covering the table (Design 2).
    pub reservations: AtomicU32,
}

impl TableMeta {
    /// Resets both counters to zero.
    pub fn clear(&self) {
        use core::sync::atomic::Ordering::Relaxed;
        self.live_entries.store(0, Relaxed);
        self.reservations.store(0, Relaxed);
    }
}

/// A live table page as the allocator exposes it: its address, its entries and its metadata.
#[derive(Debug, Clone, Copy)]
pub struct TableRef<'a> {
    /// The page's physical address (what descriptors and [`TableAlloc::clean`] use).
    pub pa: PhysAddr,
    /// The descriptors: `size / 8` of them.
    pub entries: &'a [AtomicU64],
    /// The page's software metadata.
    pub meta: &'a TableMeta,
}

/// Where table pages come from: the caller's allocator.
///
/// Contract, as Linux's custom-allocator hooks:
/// - [`alloc`](TableAlloc::alloc) returns **zeroed** memory of `size` bytes, **aligned to
///   `size`**, whose physical address the device can use; `size` is one granule, or the root's
///   size (64 bytes up to 16 concatenated granules);
/// - [`free`](TableAlloc::free) receives the same size; the table never frees a page that the
///   hardware may still walk (it issues the walk flush first);
/// - [`table`](TableAlloc::table) resolves a physical address handed out by `alloc` to the
///   page's entries, or `None` for any other address (the table then reports corruption
///   instead of following a wild pointer);
/// - [`clean`](TableAlloc::clean) makes CPU writes visible to a walker that does not snoop
///   the CPU's caches. Tables call it only when
///   [`Config::coherent_walk`](crate::Config::coherent_walk) is false: after every descriptor
///   write, over exactly the bytes written (a new table page as a whole, before it is linked).
///
/// Every method takes `&self`: tables call it concurrently from several threads.
pub trait TableAlloc: Send + Sync {
    /// Allocates one zeroed, size-aligned table page.
    ///
    /// # Errors
    ///
    /// [`AllocError::OutOfMemory`] when no memory is left, [`AllocError::UnsupportedSize`] when
    /// the allocator cannot serve `size`.
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError>;

    /// Allocates `count` pages of `size` bytes, all or nothing, appending them to `out`.
    ///
    /// The default calls [`alloc`](TableAlloc::alloc) `count` times and frees what it got if
    /// one fails; allocators with a real batch path override it.
    ///
    /// # Errors
    ///
    /// As [`alloc`](TableAlloc::alloc); on error `out` is as before and nothing is held.
    fn alloc_bulk(
        &self,
        size: u64,
        count: usize,
        out: &mut Vec<PhysAddr>,
    ) -> Result<(), AllocError> {
        let got = Obtained::new(self, out, size);
        got.out.reserve(count);
        for _ in 0..count {
            match self.alloc(size) {
                Ok(pa) => got.out.push(pa),
                // The guard's drop gives back what this call got.
                Err(AllocError::OutOfMemory { size, .. }) => {
                    return Err(AllocError::OutOfMemory { size, count });
                }
                Err(other) => return Err(other),
            }
        }
        got.keep();
        Ok(())
    }

    /// Returns a page obtained from this allocator.
    fn free(&self, pa: PhysAddr, size: u64);

    /// Returns several pages of the same size. The default frees them one by one.
    fn free_bulk(&self, pages: &[PhysAddr], size: u64) {
        for &pa in pages {
            self.free(pa, size);
        }
    }

    /// Resolves a live page's physical address to its memory.
    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>>;

    /// Makes the CPU's writes to the `bytes` bytes at `pa` (inside one live page) visible to
    /// a non-coherent table walker before the call returns: Linux's
    /// `dma_sync_single_for_device(.., DMA_TO_DEVICE)`, on Arm a `DC CVAC` per cache line
    /// followed by a `DSB`. The default does nothing, which is right for coherent walkers only.
    fn clean(&self, pa: PhysAddr, bytes: u64) {
        let _ = (pa, bytes);
    }
}

impl<T: TableAlloc + ?Sized> TableAlloc for &T {
    #[inline]
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError> {
        (**self).alloc(size)
    }
    #[inline]
    fn alloc_bulk(
        &self,
        size: u64,
        count: usize,
        out: &mut Vec<PhysAddr>,
    ) -> Result<(), AllocError> {
        (**self).alloc_bulk(size, count, out)
    }
    #[inline]
    fn free(&self, pa: PhysAddr, size: u64) {
        (**self).free(pa, size);
    }
    #[inline]
    fn free_bulk(&self, pages: &[PhysAddr], size: u64) {
        (**self).free_bulk(pages, size);
    }
    #[inline]
    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        (**self).table(pa)
    }
    #[inline]
    fn clean(&self, pa: PhysAddr, bytes: u64) {
        (**self).clean(pa, bytes);
    }
}

impl<T: TableAlloc + ?Sized> TableAlloc for alloc::sync::Arc<T> {
    #[inline]
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError> {
        (**self).alloc(size)
    }
    #[inline]
    fn alloc_bulk(
        &self,
        size: u64,
        count: usize,
        out: &mut Vec<PhysAddr>,
    ) -> Result<(), AllocError> {
        (**self).alloc_bulk(size, count, out)
    }
    #[inline]
    fn free(&self, pa: PhysAddr, size: u64) {
        (**self).free(pa, size);
    }
    #[inline]
    fn free_bulk(&self, pages: &[PhysAddr], size: u64) {
        (**self).free_bulk(pages, size);
    }
    #[inline]
    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        (**self).table(pa)
    }
    #[inline]
    fn clean(&self, pa: PhysAddr, bytes: u64) {
        (**self).clean(pa, bytes);
    }
}

/// The pages one [`TableAlloc::alloc_bulk`] call appended to `out`, given back to the
/// allocator when the guard drops unless [`keep`](Obtained::keep) was called: on an error and
/// on a panic unwinding out of [`TableAlloc::alloc`] alike, so neither leaks what the call got
/// before it. Disarmed on success, its drop is a compare and nothing more.
struct Obtained<'a, A: TableAlloc + ?Sized> {
    alloc: &'a A,
    out: &'a mut Vec<PhysAddr>,
    start: usize,
    size: u64,
}

impl<'a, A: TableAlloc + ?Sized> Obtained<'a, A> {
    fn new(alloc: &'a A, out: &'a mut Vec<PhysAddr>, size: u64) -> Self {
        let start = out.len();
        Self {
            alloc,
            out,
            start,
            size,
        }
    }

    /// Success: the pages stay in `out`, the caller's now.
    fn keep(mut self) {
        self.start = self.out.len();
    }
}

impl<A: TableAlloc + ?Sized> Drop for Obtained<'_, A> {
    fn drop(&mut self) {
        if self.out.len() > self.start {
            self.alloc.free_bulk(&self.out[self.start..], self.size);
            self.out.truncate(self.start);
        }
    }
}
