//! A minimal table allocator for this crate's unit tests.
//!
//! The workspace's simulated memory (`iopt_sim::SimMemory`) depends on this crate, so a unit
//! test here cannot use it without compiling a second copy of the engine's types. The unit
//! tests only need zeroed, size-aligned pages that can be found again by address; everything
//! else (leak accounting, failure injection, non-coherent walkers) is tested through
//! `iopt-sim` in the integration tests.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use iopt_api::atomic::AtomicU64;
use iopt_api::{AllocError, PhysAddr, TableAlloc, TableMeta, TableRef};
use once_cell::race::OnceBox;

/// First page's physical address.
const BASE: u64 = 1 << 30;
/// Distance between pages: aligns every table size iopt uses (at most 256 KiB).
const STRIDE: u64 = 1 << 20;
/// Pages one memory hands out; slots are never reused, so every page starts zeroed.
const SLOTS: usize = 1024;

#[derive(Debug)]
struct Page {
    entries: Box<[AtomicU64]>,
    meta: TableMeta,
    live: AtomicBool,
}

/// Zeroed pages at `BASE + slot × STRIDE`, found again by address while live.
#[derive(Debug)]
pub(crate) struct TestMemory {
    pages: Box<[OnceBox<Page>]>,
    next: AtomicUsize,
}

impl TestMemory {
    pub(crate) fn new() -> Self {
        Self {
            pages: (0..SLOTS).map(|_| OnceBox::new()).collect(),
            next: AtomicUsize::new(0),
        }
    }
}

impl TableAlloc for TestMemory {
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError> {
        if size == 0 || size > STRIDE {
            return Err(AllocError::UnsupportedSize { size });
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed);
        let cell = self
            .pages
            .get(slot)
            .ok_or(AllocError::OutOfMemory { size, count: 1 })?;
        let entries = usize::try_from(size / 8).expect("table size fits usize");
        let mut v = Vec::with_capacity(entries);
        v.resize_with(entries, || AtomicU64::new(0));
        let page = cell.get_or_init(|| {
            Box::new(Page {
                entries: v.into_boxed_slice(),
                meta: TableMeta::default(),
                live: AtomicBool::new(false),
            })
        });
        page.live.store(true, Ordering::Release);
        Ok(PhysAddr::new(BASE + slot as u64 * STRIDE))
    }

    fn free(&self, pa: PhysAddr, _size: u64) {
        if let Some(page) = self.page(pa) {
            page.live.store(false, Ordering::Release);
        }
    }

    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        let page = self.page(pa)?;
        page.live.load(Ordering::Acquire).then_some(TableRef {
            pa,
            entries: &page.entries,
            meta: &page.meta,
        })
    }
}

impl TestMemory {
    fn page(&self, pa: PhysAddr) -> Option<&Page> {
        let off = pa.get().checked_sub(BASE)?;
        if off % STRIDE != 0 {
            return None;
        }
        self.pages.get(usize::try_from(off / STRIDE).ok()?)?.get()
    }
}
