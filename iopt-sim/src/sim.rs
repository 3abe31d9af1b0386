//! `SimMemory`: simulated physical memory for table pages, the default [`TableAlloc`].
//!
//! Every table page lives at a physical address `region base + slot × size` (sub-page sizes
//! are spaced a page apart, as a kernel's page allocator would place them), so descriptors
//! hold realistic addresses and the [hardware-walk oracle](crate::oracle) can read memory by
//! physical address exactly as a device would. Each page size gets its own region (1 GiB of
//! address space by default, the first at 1 GiB, so with the default layout granule tables sit
//! below 4 GiB and fit even a 32-bit output address size).
//!
//! It counts what a leak check needs (live pages, peak, calls) and injects failures: make the
//! k-th page allocation fail, so tests can prove every error path leaves nothing behind.
//!
//! **Non-coherent mode** ([`SimMemory::non_coherent`]) models a walker that does not snoop the
//! CPU's caches: every page has a second, *device* view, which the device-side accessors
//! ([`read_u64`](SimMemory::read_u64), and so the [oracle](crate::oracle)) read. CPU writes
//! reach it only through [`clean`](TableAlloc::clean), a 64-byte line at a time; a freshly
//! allocated page's device view holds [`STALE_DESCRIPTOR`] until cleaned, and a freed page's keeps
//! whatever it last held. A descriptor write the table forgets to clean is therefore a
//! translation fault (or a stale translation) in a test, not a silent pass.
//! Lookup of a page by address is lock-free (a region scan, one chunk pointer and the page's
//! live flag); allocation and freeing take a short spin lock.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use iopt_api::atomic::AtomicU64 as Entry;
use iopt_api::{AllocError, PhysAddr, TableAlloc, TableMeta, TableRef};
use once_cell::race::OnceBox;

/// Bytes of table memory a chunk of a region holds.
const CHUNK_BYTES: u64 = 1 << 16;
/// Bytes of a cache line: the unit [`TableAlloc::clean`] publishes in non-coherent mode.
pub const CACHE_LINE: u64 = 64;
/// What a non-coherent device sees in a page nobody cleaned since it was allocated: a table
/// descriptor pointing at an address no table lives at, so a walk through it faults.
pub const STALE_DESCRIPTOR: u64 = 0x0000_0dea_dbee_f003;
const MAX_REGIONS: usize = 8;

/// Layout of a [`SimMemory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimLayout {
    /// Physical address of the first region.
    pub base: u64,
    /// Bytes of address space each page size gets (rounded up to a power of two, at least
    /// 64 KiB).
    pub region_span: u64,
}

impl Default for SimLayout {
    fn default() -> Self {
        Self {
            base: 1 << 30,
            region_span: 1 << 30,
        }
    }
}

/// Backing memory for `per_chunk` consecutive pages of a region, allocated (zeroed) the first
/// time one of them is handed out. Lookups index straight into it.
#[derive(Debug)]
struct Chunk {
    entries: Box<[Entry]>,
    /// The device's view of `entries` (empty for a coherent memory).
    device: Box<[Entry]>,
    pages: Box<[PageState]>,
}

/// A page's metadata and live flag, side by side so a lookup bounds-checks once, on a cache
/// line of its own (as a kernel's `struct page` is): a table's counts change on every
/// refcounted map, and pages handed out one after the other usually go to different threads.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PageState {
    meta: TableMeta,
    live: AtomicBool,
}

/// One page as a lookup sees it.
#[derive(Clone, Copy)]
struct Page<'a> {
    entries: &'a [Entry],
    /// Empty for a coherent memory.
    device: &'a [Entry],
    meta: &'a TableMeta,
    live: &'a AtomicBool,
}

#[derive(Debug)]
struct Region {
    base: u64,
    /// Bytes a page of this region holds.
    size: u64,
    /// Distance between pages: the size, at least 4 KiB (sub-page tables are page-aligned, as
    /// a kernel page allocator and Mali's TRANSTAB require).
    stride: u64,
    /// log2 of `stride`.
    stride_shift: u32,
    /// `stride - 1`.
    stride_mask: u64,
    /// log2 of the bytes of address space a chunk covers (`stride × per_chunk`).
    chunk_span_shift: u32,
    /// `per_chunk - 1`.
    chunk_mask: usize,
    /// log2 of `per_chunk`.
    chunk_shift: u32,
    /// log2 of `entries`.
    entries_shift: u32,
    /// 8-byte entries a page holds.
    entries: usize,
    slots: usize,
    /// Pages a chunk holds (64 KiB of entries, or one page if larger).
    per_chunk: usize,
    chunks: Box<[OnceBox<Chunk>]>,
}

impl Region {
    fn new(base: u64, size: u64, span: u64) -> Option<Self> {
        let stride = size.max(4096);
        let slots = usize::try_from(span / stride).ok()?;
        let entries = usize::try_from(size / 8).ok()?;
        let per_chunk = usize::try_from((CHUNK_BYTES / size).max(1)).ok()?;
        let chunks = (0..slots.div_ceil(per_chunk))
            .map(|_| OnceBox::new())
            .collect();
        Some(Self {
            base,
            size,
            stride,
            stride_shift: stride.trailing_zeros(),
            stride_mask: stride - 1,
            chunk_span_shift: stride.trailing_zeros() + per_chunk.trailing_zeros(),
            chunk_mask: per_chunk - 1,
            chunk_shift: per_chunk.trailing_zeros(),
            entries_shift: entries.trailing_zeros(),
            entries,
            slots,
            per_chunk,
            chunks,
        })
    }

    #[inline]
    fn page(&self, index: usize) -> Option<Page<'_>> {
        let chunk = self.chunks.get(index >> self.chunk_shift)?.get()?;
        Self::in_chunk(chunk, index & self.chunk_mask, self.entries_shift)
    }

    /// The entries and state of page `i` of `chunk` (pages of `1 << entries_shift` entries),
    /// without the device view: what a table look-up needs.
    #[inline]
    fn cpu_side(chunk: &Chunk, i: usize, entries_shift: u32) -> Option<(&[Entry], &PageState)> {
        let state = chunk.pages.get(i)?;
        let entries = chunk
            .entries
            .get(i << entries_shift..(i + 1) << entries_shift)?;
        Some((entries, state))
    }

    /// The entries and state of the page at offset `off` (a multiple of the stride).
    #[inline]
    fn cpu_side_at(&self, off: u64) -> Option<(&[Entry], &PageState)> {
        let chunk = self
            .chunks
            .get(usize::try_from(off >> self.chunk_span_shift).ok()?)?
            .get()?;
        let i = usize::try_from(off >> self.stride_shift).ok()? & self.chunk_mask;
        Self::cpu_side(chunk, i, self.entries_shift)
    }

    /// Page `i` of `chunk`, whose pages hold `1 << entries_shift` entries each.
    #[inline]
    fn in_chunk(chunk: &Chunk, i: usize, entries_shift: u32) -> Option<Page<'_>> {
        let (entries, state) = Self::cpu_side(chunk, i, entries_shift)?;
        let device = if chunk.device.is_empty() {
            &[]
        } else {
            chunk
                .device
                .get(i << entries_shift..(i + 1) << entries_shift)?
        };
        Some(Page {
            entries,
            device,
            meta: &state.meta,
            live: &state.live,
        })
    }

    fn page_init(&self, index: usize, non_coherent: bool) -> Option<Page<'_>> {
        let per_chunk = self.per_chunk;
        let entries = self.entries;
        let chunk = self.chunks.get(index / per_chunk)?.get_or_init(|| {
            let mut e = Vec::with_capacity(per_chunk * entries);
            e.resize_with(per_chunk * entries, || Entry::new(0));
            let device_len = if non_coherent { per_chunk * entries } else { 0 };
            let mut d = Vec::with_capacity(device_len);
            d.resize_with(device_len, || Entry::new(STALE_DESCRIPTOR));
            let mut p = Vec::with_capacity(per_chunk);
            p.resize_with(per_chunk, PageState::default);
            Box::new(Chunk {
                entries: e.into_boxed_slice(),
                device: d.into_boxed_slice(),
                pages: p.into_boxed_slice(),
            })
        });
        Self::in_chunk(chunk, index % per_chunk, self.entries_shift)
    }

    fn index_of(&self, pa: u64) -> Option<usize> {
        let off = pa.checked_sub(self.base)?;
        if off % self.stride != 0 {
            return None;
        }
        let i = usize::try_from(off / self.stride).ok()?;
        (i < self.slots).then_some(i)
    }
}

/// The free lists and the allocation counters, under one lock: every allocation and free
/// takes it anyway, so the counters cost plain adds instead of a locked read-modify-write
/// each (they were seven per page allocated).
#[derive(Debug, Default)]
struct FreeState {
    next_fresh: [usize; MAX_REGIONS],
    free: [Vec<usize>; MAX_REGIONS],
    live_pages: u64,
    live_bytes: u64,
    peak_pages: u64,
    alloc_calls: u64,
    alloc_bulk_calls: u64,
    pages_allocated: u64,
    free_calls: u64,
    free_bulk_calls: u64,
    pages_freed: u64,
}

/// Counters of a [`SimMemory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SimStats {
    /// Pages handed out and not yet returned.
    pub live_pages: u64,
    /// Bytes of those pages.
    pub live_bytes: u64,
    /// The most pages live at once.
    pub peak_pages: u64,
    /// Calls to `alloc`.
    pub alloc_calls: u64,
    /// Calls to `alloc_bulk`.
    pub alloc_bulk_calls: u64,
    /// Pages handed out in total.
    pub pages_allocated: u64,
    /// Calls to `free`.
    pub free_calls: u64,
    /// Calls to `free_bulk`.
    pub free_bulk_calls: u64,
    /// Pages returned in total.
    pub pages_freed: u64,
    /// Allocations refused by failure injection.
    pub injected_failures: u64,
    /// Frees of an address that was not live (a double free or a foreign page).
    pub bad_frees: u64,
    /// Calls to `clean`.
    pub cleans: u64,
    /// Bytes those calls asked to clean.
    pub bytes_cleaned: u64,
    /// Cleans of a range that is not inside one live page.
    pub bad_cleans: u64,
}

/// Simulated physical memory for table pages: each page size in its own region of physical
/// addresses, lock-free lookup, leak accounting and failure injection.
///
/// ```
/// use iopt_api::TableAlloc;
/// use iopt_sim::SimMemory;
/// let mem = SimMemory::new();
/// let pa = mem.alloc(4096)?;
/// assert_eq!(pa.get() % 4096, 0);
/// assert_eq!(mem.table(pa).unwrap().entries.len(), 512);
/// assert_eq!(mem.stats().live_pages, 1);
/// mem.free(pa, 4096);
/// assert_eq!(mem.stats().live_pages, 0);
///
/// mem.fail_at(0); // the next page allocation fails
/// assert!(mem.alloc(4096).is_err());
/// assert!(mem.alloc(4096).is_ok());
/// # Ok::<(), iopt_api::AllocError>(())
/// ```
#[derive(Debug)]
pub struct SimMemory {
    layout: SimLayout,
    /// Whether pages have a device view that only `clean` updates.
    non_coherent: bool,
    /// log2 of the region span.
    span_shift: u32,
    /// `region_span - 1`.
    span_mask: u64,
    regions: [OnceBox<Region>; MAX_REGIONS],
    state: spin::Mutex<FreeState>,
    /// Page allocations so far (the index failure injection counts in); written under the
    /// `state` lock.
    alloc_index: AtomicU64,
    /// Page allocation index that fails (`u64::MAX`: none).
    fail_index: AtomicU64,
    /// Whether every allocation from `fail_index` on fails.
    fail_sticky: AtomicBool,
    injected: AtomicU64,
    bad_frees: AtomicU64,
    cleans: AtomicU64,
    bytes_cleaned: AtomicU64,
    bad_cleans: AtomicU64,
}

impl Default for SimMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl SimMemory {
    /// Creates an empty memory with the default layout.
    #[must_use]
    pub fn new() -> Self {
        Self::with_layout(SimLayout::default())
    }

    /// Creates an empty memory whose device does not snoop the CPU's caches (see the module
    /// docs): the device sees only what [`clean`](TableAlloc::clean) published.
    ///
    /// ```
    /// use iopt_api::{PhysAddr, TableAlloc};
    /// use iopt_sim::{SimMemory, STALE_DESCRIPTOR};
    /// use core::sync::atomic::Ordering;
    /// let mem = SimMemory::non_coherent();
    /// let pa = mem.alloc(4096)?;
    /// assert_eq!(mem.read_u64(pa), Some(STALE_DESCRIPTOR)); // never cleaned
    /// mem.table(pa).unwrap().entries[1].store(0x4003, Ordering::Relaxed);
    /// mem.clean(pa, 4096);
    /// assert_eq!(mem.read_u64(PhysAddr::new(pa.get() + 8)), Some(0x4003));
    /// mem.table(pa).unwrap().entries[1].store(0, Ordering::Relaxed);
    /// assert_eq!(mem.read_u64(PhysAddr::new(pa.get() + 8)), Some(0x4003)); // still cached
    /// assert!(mem.first_stale(pa).is_some());
    /// # Ok::<(), iopt_api::AllocError>(())
    /// ```
    #[must_use]
    pub fn non_coherent() -> Self {
        Self::non_coherent_with_layout(SimLayout::default())
    }

    /// [`non_coherent`](Self::non_coherent) with `layout`.
    #[must_use]
    pub fn non_coherent_with_layout(layout: SimLayout) -> Self {
        let mut mem = Self::with_layout(layout);
        mem.non_coherent = true;
        mem
    }

    /// Returns whether the device sees only cleaned lines.
    #[must_use]
    pub fn is_non_coherent(&self) -> bool {
        self.non_coherent
    }

    /// Creates an empty memory with `layout`.
    #[must_use]
    pub fn with_layout(layout: SimLayout) -> Self {
        let span = layout.region_span.max(1 << 16).next_power_of_two();
        let layout = SimLayout {
            base: layout.base,
            region_span: span,
        };
        Self {
            layout,
            non_coherent: false,
            span_shift: span.trailing_zeros(),
            span_mask: span - 1,
            regions: Default::default(),
            state: spin::Mutex::new(FreeState::default()),
            alloc_index: AtomicU64::new(0),
            fail_index: AtomicU64::new(u64::MAX),
            fail_sticky: AtomicBool::new(false),
            injected: AtomicU64::new(0),
            bad_frees: AtomicU64::new(0),
            cleans: AtomicU64::new(0),
            bytes_cleaned: AtomicU64::new(0),
            bad_cleans: AtomicU64::new(0),
        }
    }

    /// Makes the page allocation `k` allocations from now fail, once (0: the very next one).
    /// A bulk allocation that would include it fails whole.
    pub fn fail_at(&self, k: u64) {
        let now = self.alloc_index.load(Ordering::SeqCst);
        self.fail_sticky.store(false, Ordering::SeqCst);
        self.fail_index
            .store(now.saturating_add(k), Ordering::SeqCst);
    }

    /// Makes every page allocation from `k` allocations from now on fail (memory exhausted).
    pub fn fail_from(&self, k: u64) {
        self.fail_at(k);
        self.fail_sticky.store(true, Ordering::SeqCst);
    }

    /// Cancels failure injection.
    pub fn clear_failure(&self) {
        self.fail_index.store(u64::MAX, Ordering::SeqCst);
        self.fail_sticky.store(false, Ordering::SeqCst);
    }

    /// Returns how many page allocations were attempted so far (successful or not).
    #[must_use]
    pub fn allocations_attempted(&self) -> u64 {
        self.alloc_index.load(Ordering::SeqCst)
    }

    /// Returns a snapshot of the counters.
    #[must_use]
    pub fn stats(&self) -> SimStats {
        let r = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let st = self.state.lock();
        SimStats {
            live_pages: st.live_pages,
            live_bytes: st.live_bytes,
            peak_pages: st.peak_pages,
            alloc_calls: st.alloc_calls,
            alloc_bulk_calls: st.alloc_bulk_calls,
            pages_allocated: st.pages_allocated,
            free_calls: st.free_calls,
            free_bulk_calls: st.free_bulk_calls,
            pages_freed: st.pages_freed,
            injected_failures: r(&self.injected),
            bad_frees: r(&self.bad_frees),
            cleans: r(&self.cleans),
            bytes_cleaned: r(&self.bytes_cleaned),
            bad_cleans: r(&self.bad_cleans),
        }
    }

    /// Returns the addresses of every live page, in ascending order: the allocator's live set,
    /// which tests compare before and after a failed operation.
    #[must_use]
    pub fn live_set(&self) -> Vec<(PhysAddr, u64)> {
        let mut out = Vec::new();
        for region in self.regions.iter().filter_map(OnceBox::get) {
            for (c, chunk) in region.chunks.iter().enumerate() {
                let Some(chunk) = chunk.get() else { continue };
                for (k, state) in chunk.pages.iter().enumerate() {
                    if state.live.load(Ordering::Acquire) {
                        let i = c * region.per_chunk + k;
                        out.push((
                            PhysAddr::new(region.base + i as u64 * region.stride),
                            region.size,
                        ));
                    }
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// Reads the 64-bit word at `pa`, as a device would: `None` if no live page holds it. In
    /// non-coherent mode this is the device view: what was last cleaned.
    #[must_use]
    pub fn read_u64(&self, pa: PhysAddr) -> Option<u64> {
        let (page, off) = self.word_at(pa)?;
        let view = if self.non_coherent {
            page.device
        } else {
            page.entries
        };
        Some(view.get(off)?.load(Ordering::Acquire))
    }

    /// Atomically ANDs `mask` into the 64-bit word at `pa` (a device's hardware update of a
    /// descriptor) and returns the old value: `None` if no live page holds it. In non-coherent
    /// mode the device view is updated and returned, and the CPU view is updated too (as if
    /// the CPU invalidated the line before its next read).
    #[must_use]
    pub fn fetch_and_u64(&self, pa: PhysAddr, mask: u64) -> Option<u64> {
        let (page, off) = self.word_at(pa)?;
        let cpu = page.entries.get(off)?;
        if self.non_coherent {
            let old = page.device.get(off)?.fetch_and(mask, Ordering::AcqRel);
            cpu.fetch_and(mask, Ordering::AcqRel);
            return Some(old);
        }
        Some(cpu.fetch_and(mask, Ordering::AcqRel))
    }

    /// The live page holding the 8-byte word at `pa` (rounded down) and the word's index.
    fn word_at(&self, pa: PhysAddr) -> Option<(Page<'_>, usize)> {
        let (region, index) = self.locate(pa.get() & !7)?;
        let page = region.page(index)?;
        if !page.live.load(Ordering::Acquire) {
            return None;
        }
        let off = (pa.get() - region.base - index as u64 * region.stride) / 8;
        Some((page, usize::try_from(off).ok()?))
    }

    /// In non-coherent mode, the first word of the live page at `page` whose device view
    /// differs from the CPU view (ignoring the software bit [`SW_SYNC`](iopt_lpae::desc::SW_SYNC),
    /// which tables set after cleaning and hardware ignores), as `(address, cpu, device)`: a
    /// write nobody cleaned. Check the pages a walker can reach (pages still in a pool are
    /// cleaned when they become tables). `None` when the page is clean or not live, and always
    /// for a coherent memory.
    #[must_use]
    pub fn first_stale(&self, page: PhysAddr) -> Option<(PhysAddr, u64, u64)> {
        if !self.non_coherent {
            return None;
        }
        let (p, off) = self.word_at(page)?;
        let base = page.get() - off as u64 * 8;
        p.entries
            .iter()
            .zip(p.device)
            .enumerate()
            .find_map(|(w, (cpu, dev))| {
                let (cpu, dev) = (cpu.load(Ordering::Acquire), dev.load(Ordering::Acquire));
                ((cpu ^ dev) & !iopt_lpae::desc::SW_SYNC != 0)
                    .then(|| (PhysAddr::new(base + w as u64 * 8), cpu, dev))
            })
    }

    /// Finds the region and page index holding `pa`: region `i` starts at `base + i × span`,
    /// so this is arithmetic, not a search.
    #[inline]
    fn locate(&self, pa: u64) -> Option<(&Region, usize)> {
        let (region, off) = self.locate_offset(pa)?;
        Some((region, usize::try_from(off >> region.stride_shift).ok()?))
    }

    /// The region holding `pa` and `pa`'s offset in it. Region `i` spans exactly
    /// `[base + i × span, base + (i + 1) × span)` and its slots cover the span, so the page
    /// index of any offset is below the slot count.
    #[inline]
    fn locate_offset(&self, pa: u64) -> Option<(&Region, u64)> {
        let off = pa.checked_sub(self.layout.base)?;
        let region = self
            .regions
            .get(usize::try_from(off >> self.span_shift).ok()?)?
            .get()?;
        Some((region, off & self.span_mask))
    }

    fn region_for(&self, size: u64) -> Result<(usize, &Region), AllocError> {
        if !size.is_power_of_two() || size < 8 || size > self.layout.region_span {
            return Err(AllocError::UnsupportedSize { size });
        }
        for (i, r) in self.regions.iter().enumerate() {
            match r.get() {
                Some(region) if region.size == size => return Ok((i, region)),
                Some(_) => {}
                None => {
                    let base = self.layout.base + self.layout.region_span * i as u64;
                    let span = self.layout.region_span;
                    let fresh = Region::new(base, size, span)
                        .ok_or(AllocError::UnsupportedSize { size })?;
                    let region = r.get_or_init(|| Box::new(fresh));
                    if region.size == size {
                        return Ok((i, region));
                    }
                }
            }
        }
        Err(AllocError::UnsupportedSize { size })
    }

    /// Counts `count` page allocations for failure injection; `false` if one of them is the
    /// one to fail. Called with the `state` lock held (the only writers of `alloc_index`).
    fn take_indices(&self, count: u64) -> bool {
        let first = self.alloc_index.load(Ordering::SeqCst);
        self.alloc_index
            .store(first.saturating_add(count), Ordering::SeqCst);
        let fail = self.fail_index.load(Ordering::SeqCst);
        let hit = if self.fail_sticky.load(Ordering::SeqCst) {
            first.saturating_add(count) > fail
        } else {
            fail >= first && fail < first.saturating_add(count)
        };
        if hit {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        !hit
    }

    /// Takes `count` page indices of region `ri` under the lock: failure injection, the
    /// availability check and the counters, then `each` for every index picked.
    fn pick(
        &self,
        st: &mut FreeState,
        (ri, region): (usize, &Region),
        count: usize,
        mut each: impl FnMut(usize),
    ) -> Result<(), AllocError> {
        let size = region.size;
        if !self.take_indices(count as u64) {
            return Err(AllocError::OutOfMemory { size, count });
        }
        let available = st.free[ri].len() + (region.slots - st.next_fresh[ri]);
        if available < count {
            return Err(AllocError::OutOfMemory { size, count });
        }
        for _ in 0..count {
            let i = if let Some(i) = st.free[ri].pop() {
                i
            } else {
                st.next_fresh[ri] += 1;
                st.next_fresh[ri] - 1
            };
            each(i);
        }
        let n = count as u64;
        st.pages_allocated += n;
        st.live_bytes += n * size;
        st.live_pages += n;
        st.peak_pages = st.peak_pages.max(st.live_pages);
        Ok(())
    }

    /// Makes picked page `i` of `region` live (creating its chunk on first use).
    fn hand_out(&self, region: &Region, i: usize) -> Option<PhysAddr> {
        let page = region.page_init(i, self.non_coherent)?;
        // Whatever the memory held before is what the device sees until a clean.
        for d in page.device {
            d.store(STALE_DESCRIPTOR, Ordering::Relaxed);
        }
        page.live.store(true, Ordering::Release);
        Some(PhysAddr::new(region.base + i as u64 * region.stride))
    }

    /// Checks and zeroes a page being freed; returns its region and index, or counts a bad
    /// free. The caller puts it on the free list.
    fn retire_page(&self, pa: PhysAddr, size: u64) -> Option<(usize, usize)> {
        let found = self
            .regions
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.get().filter(|r| r.size == size).map(|r| (i, r)))
            .and_then(|(ri, region)| {
                let index = region.index_of(pa.get())?;
                Some((ri, index, region.page(index)?))
            });
        let Some((ri, index, page)) = found else {
            self.bad_frees.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if !page.live.swap(false, Ordering::AcqRel) {
            self.bad_frees.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        for e in page.entries {
            e.store(0, Ordering::Relaxed);
        }
        page.meta.clear();
        Some((ri, index))
    }

    /// Puts a retired page on its free list and counts it.
    fn put_back(st: &mut FreeState, (ri, index): (usize, usize), size: u64) {
        st.free[ri].push(index);
        st.pages_freed += 1;
        st.live_bytes -= size;
        st.live_pages -= 1;
    }
}

impl TableAlloc for SimMemory {
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError> {
        let found = self.region_for(size);
        let mut picked = None;
        let region = {
            let mut st = self.state.lock();
            st.alloc_calls += 1;
            let found = found?;
            self.pick(&mut st, found, 1, |i| picked = Some(i))?;
            found.1
        };
        picked
            .and_then(|i| self.hand_out(region, i))
            .ok_or(AllocError::OutOfMemory { size, count: 1 })
    }

    fn alloc_bulk(
        &self,
        size: u64,
        count: usize,
        out: &mut Vec<PhysAddr>,
    ) -> Result<(), AllocError> {
        let found = self.region_for(size);
        let mut picked = Vec::with_capacity(count);
        let region = {
            let mut st = self.state.lock();
            st.alloc_bulk_calls += 1;
            let found = found?;
            self.pick(&mut st, found, count, |i| picked.push(i))?;
            found.1
        };
        out.reserve(count);
        for i in picked {
            out.push(
                self.hand_out(region, i)
                    .ok_or(AllocError::OutOfMemory { size, count })?,
            );
        }
        Ok(())
    }

    fn free(&self, pa: PhysAddr, size: u64) {
        let page = self.retire_page(pa, size);
        let mut st = self.state.lock();
        st.free_calls += 1;
        if let Some(page) = page {
            Self::put_back(&mut st, page, size);
        }
    }

    fn free_bulk(&self, pages: &[PhysAddr], size: u64) {
        let retired: Vec<(usize, usize)> = pages
            .iter()
            .filter_map(|&pa| self.retire_page(pa, size))
            .collect();
        let mut st = self.state.lock();
        st.free_bulk_calls += 1;
        for page in retired {
            Self::put_back(&mut st, page, size);
        }
    }

    fn clean(&self, pa: PhysAddr, bytes: u64) {
        self.cleans.fetch_add(1, Ordering::Relaxed);
        self.bytes_cleaned.fetch_add(bytes, Ordering::Relaxed);
        let Some((page, off)) = self.word_at(pa) else {
            self.bad_cleans.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let words = page.entries.len() as u64;
        let end = (off as u64 * 8).checked_add(bytes);
        if bytes == 0 || end.is_none_or(|e| e > words * 8) {
            self.bad_cleans.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !self.non_coherent {
            return;
        }
        // Whole lines: a clean publishes every word of each line it touches.
        let first = (off as u64 * 8) & !(CACHE_LINE - 1);
        let last = (off as u64 * 8 + bytes)
            .next_multiple_of(CACHE_LINE)
            .min(words * 8);
        let range = usize::try_from(first / 8).unwrap_or(0)..usize::try_from(last / 8).unwrap_or(0);
        for (cpu, dev) in page.entries[range.clone()].iter().zip(&page.device[range]) {
            dev.store(cpu.load(Ordering::Acquire), Ordering::Release);
        }
    }

    #[inline]
    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        let (region, off) = self.locate_offset(pa.get())?;
        if off & region.stride_mask != 0 {
            return None;
        }
        let (entries, state) = region.cpu_side_at(off)?;
        if !state.live.load(Ordering::Acquire) {
            return None;
        }
        Some(TableRef {
            pa,
            entries,
            meta: &state.meta,
        })
    }
}
