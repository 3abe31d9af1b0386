//! The walker: the one implementation of map, unmap, lookup and walk that every backend uses.
//!
//! Backends differ only in where table pages come from, which they express through a
//! [`PageSource`]: the on-demand source asks the caller's allocator page by page (Linux's
//! default), a reservation's pool hands out what it holds (Design 1), and a reserving table
//! installs its tables ahead of time so maps find them present (Design 2).
//!
//! # How a map stays all-or-nothing, even under concurrency
//!
//! A map first validates everything it can without touching memory. A run inside one leaf
//! table then descends once; where a table is missing it takes every page the rest of the path
//! needs, links them into a private chain, writes the leaves into the chain's last table, and
//! publishes the whole chain with **one** compare-exchange on the first empty entry. Nothing is
//! visible before that instant, so an allocation failure leaves nothing behind, and a thread
//! that loses the race zeroes its pages, gives them back to the source it took them from, and
//! descends again into the winner's table. A run that spans several leaf tables first plans
//! the whole run read-only (conflicts, and exactly how many pages are missing), takes that many
//! pages in one go, and only then writes.
//!
//! Entries are read with acquire loads and tables published with release compare-exchange, so
//! a concurrent walker sees a fully initialised table or none. Tables are freed only after they
//! are unlinked and [`FlushOps::flush_walk`] has returned.

mod check;
mod free;
pub mod hold;
mod map;
mod read;
mod reserve;
mod unmap;

use crate::account::{Accounting, Untracked};
use crate::desc::{self, Kind};
use crate::reclaim::Entered;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use iopt_api::atomic::AtomicU64 as Entry;
use iopt_api::{
    AllocError, Config, FlushOps, Iova, MapError, PageSize, PhysAddr, Prot, Stats, TableAlloc,
    TableRef,
};

/// Where a map gets the table pages it must install.
///
/// Every page handed out must be zeroed and granule-sized, from the same allocator the engine
/// resolves addresses with.
pub trait PageSource {
    /// Whether every map drawing from this source lies inside a live reservation that holds
    /// (by its count) every table on the map's path for the whole call, so that no
    /// operation can free them: a Design 2 reservation's maps. The engine then skips what
    /// only protects tables that may be freed (the grace period; transient pins where the
    /// accounting uses them). A source that claims this wrongly lets a concurrent release
    /// free a table under the map.
    const PATH_HELD: bool = false;

    /// Provides `count` pages, all or nothing, appended to `out`.
    ///
    /// # Errors
    ///
    /// The [`MapError`] to report (usually [`MapError::Alloc`] or
    /// [`MapError::ReservationExhausted`]); on error `out` is unchanged and nothing is held.
    fn obtain(&mut self, count: usize, out: &mut Vec<PhysAddr>) -> Result<(), MapError>;

    /// Provides one page: what a map that adds a single leaf table (the common case) needs,
    /// without a vector. The default asks [`obtain`](Self::obtain) for one.
    ///
    /// # Errors
    ///
    /// As [`obtain`](Self::obtain).
    fn obtain_one(&mut self) -> Result<PhysAddr, MapError> {
        let mut one = Vec::with_capacity(1);
        self.obtain(1, &mut one)?;
        Ok(one.first().copied().unwrap_or(PhysAddr::ZERO))
    }

    /// Takes back pages that were obtained but never became reachable. They are zeroed.
    fn give_back(&mut self, pages: &[PhysAddr]);

    /// Whether the tables a map builds from this source's pages are *held* by the source's
    /// owner (a Design 1 reservation) until it gives them up with
    /// [`Engine::release_held`]. On an engine that counts, each such table is marked
    /// [`HELD`](hold::HELD) while it is still private, before the exchange that publishes it,
    /// so no unmap can free it meanwhile; the engine then reports the chain to
    /// [`held`](Self::held). Ignored (and compiled away) otherwise. See [`hold`].
    const HOLDS: bool = false;

    /// Told, only when [`HOLDS`](Self::HOLDS) and the engine counts, of a chain of tables a
    /// map just published from this source's pages, now held: record it (see
    /// [`hold::Holds::record`]) and give it up with [`Engine::release_held`] before the
    /// engine is dropped (a held table an unmap unlinked is freed by its holder alone, so
    /// a hold never given up leaks it).
    fn held(&mut self, chain: hold::Chain<'_>) {
        let _ = chain;
    }
}

/// Statistics counters the engine and its sources maintain.
#[derive(Debug, Default)]
pub struct Counters {
    /// Calls to the allocator's `alloc`.
    pub alloc_calls: AtomicU64,
    /// Calls to the allocator's `alloc_bulk`.
    pub alloc_bulk_calls: AtomicU64,
    /// Pages obtained from the allocator.
    pub pages_allocated: AtomicU64,
    /// Calls to the allocator's `free`.
    pub free_calls: AtomicU64,
    /// Calls to the allocator's `free_bulk`.
    pub free_bulk_calls: AtomicU64,
    /// Pages returned to the allocator.
    pub pages_freed: AtomicU64,
    /// Tables reachable now.
    pub live_tables: AtomicU64,
    /// Most tables reachable at once.
    pub peak_live_tables: AtomicU64,
    /// Pages taken into reservations.
    pub pages_reserved: AtomicU64,
    /// Reserved pages that became tables.
    pub pages_consumed: AtomicU64,
    /// Reserved pages returned unused.
    pub reserved_unused: AtomicU64,
    /// Reserved pages held now.
    pub reserved_outstanding: AtomicU64,
    /// Lost table-install races.
    pub install_races_lost: AtomicU64,
    /// Tables freed for being empty.
    pub empty_tables_freed: AtomicU64,
    /// Cache cleans issued for a non-coherent walker.
    pub cache_cleans: AtomicU64,
    /// Bytes those cleans covered.
    pub bytes_cleaned: AtomicU64,
}

impl Counters {
    /// Returns a snapshot.
    #[must_use]
    pub fn snapshot(&self) -> Stats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            alloc_calls: r(&self.alloc_calls),
            alloc_bulk_calls: r(&self.alloc_bulk_calls),
            pages_allocated: r(&self.pages_allocated),
            free_calls: r(&self.free_calls),
            free_bulk_calls: r(&self.free_bulk_calls),
            pages_freed: r(&self.pages_freed),
            live_tables: r(&self.live_tables),
            peak_live_tables: r(&self.peak_live_tables),
            pages_reserved: r(&self.pages_reserved),
            pages_consumed: r(&self.pages_consumed),
            reserved_unused: r(&self.reserved_unused),
            reserved_outstanding: r(&self.reserved_outstanding),
            install_races_lost: r(&self.install_races_lost),
            empty_tables_freed: r(&self.empty_tables_freed),
            cache_cleans: r(&self.cache_cleans),
            bytes_cleaned: r(&self.bytes_cleaned),
        }
    }

    pub(crate) fn add_live(&self, n: u64) {
        let now = self.live_tables.fetch_add(n, Ordering::Relaxed) + n;
        self.peak_live_tables.fetch_max(now, Ordering::Relaxed);
    }
}

/// The on-demand source: one allocator call per missing table, as Linux's default
/// `__arm_lpae_alloc_pages` does; pages that end up unused go straight back.
#[derive(Debug)]
pub struct OnDemand<'a, A: TableAlloc + ?Sized> {
    alloc: &'a A,
    counters: &'a Counters,
    size: u64,
}

impl<'a, A: TableAlloc + ?Sized> OnDemand<'a, A> {
    /// A source drawing `size`-byte pages from `alloc`, counting in `counters`.
    #[must_use]
    pub fn new(alloc: &'a A, counters: &'a Counters, size: u64) -> Self {
        Self {
            alloc,
            counters,
            size,
        }
    }
}

impl<A: TableAlloc + ?Sized> OnDemand<'_, A> {
    /// Counts `calls` allocator calls that gave `pages` pages (once per request, not per page:
    /// each count is a locked add).
    fn count(&self, calls: u64, pages: u64) {
        self.counters
            .alloc_calls
            .fetch_add(calls, Ordering::Relaxed);
        self.counters
            .pages_allocated
            .fetch_add(pages, Ordering::Relaxed);
    }
}

impl<A: TableAlloc + ?Sized> PageSource for OnDemand<'_, A> {
    fn obtain(&mut self, count: usize, out: &mut Vec<PhysAddr>) -> Result<(), MapError> {
        // Gives back what this call got if `alloc` fails or panics.
        let mut got = Unplaced {
            src: OnDemand::new(self.alloc, self.counters, self.size),
            start: out.len(),
            out,
        };
        got.out.reserve(count);
        for k in 0..count as u64 {
            match self.alloc.alloc(self.size) {
                Ok(pa) => got.out.push(pa),
                Err(e) => {
                    self.count(k + 1, k);
                    return Err(e.into());
                }
            }
        }
        got.start = got.out.len();
        self.count(count as u64, count as u64);
        Ok(())
    }

    fn obtain_one(&mut self) -> Result<PhysAddr, MapError> {
        let got = self.alloc.alloc(self.size);
        self.count(1, u64::from(got.is_ok()));
        Ok(got?)
    }

    fn give_back(&mut self, pages: &[PhysAddr]) {
        for &pa in pages {
            self.counters.free_calls.fetch_add(1, Ordering::Relaxed);
            self.counters.pages_freed.fetch_add(1, Ordering::Relaxed);
            self.alloc.free(pa, self.size);
        }
    }
}

/// Pages a call appended to `out` from `src` and has not yet placed: given back to `src` when
/// the guard drops with `out` longer than `start`, so an error or a panic unwinding out of the
/// allocator leaks none of them. The owner disarms it by moving `start` to the end.
struct Unplaced<'v, S: PageSource> {
    src: S,
    out: &'v mut Vec<PhysAddr>,
    start: usize,
}

impl<S: PageSource> Drop for Unplaced<'_, S> {
    fn drop(&mut self) {
        if self.out.len() > self.start {
            self.src.give_back(&self.out[self.start..]);
            self.out.truncate(self.start);
        }
    }
}

/// The pages of a new chain of tables (at most 4), obtained from `src` and not yet published:
/// given back to `src` when the guard drops still armed, so a panic unwinding out of the
/// allocator (its `alloc`, `table` or `clean`) between obtaining and publishing leaks none.
/// [`keep`](Self::keep) disarms it; the disarmed drop is a compare.
pub(crate) struct Fresh<'s, S: PageSource> {
    pub(crate) src: &'s mut S,
    pub(crate) pages: [PhysAddr; 4],
    pub(crate) n: usize,
}

impl<'s, S: PageSource> Fresh<'s, S> {
    pub(crate) fn new(src: &'s mut S) -> Self {
        Self {
            src,
            pages: [PhysAddr::ZERO; 4],
            n: 0,
        }
    }

    /// The pages are placed (published, or handed back by the caller): nothing to give back.
    pub(crate) fn keep(&mut self) {
        self.n = 0;
    }
}

impl<S: PageSource> Drop for Fresh<'_, S> {
    fn drop(&mut self) {
        if self.n != 0 {
            self.src.give_back(&self.pages[..self.n]);
        }
    }
}

/// A source that hands out pages from a vector, for the execution phase of a planned map.
#[derive(Debug, Default)]
pub struct Stash {
    /// The pages held.
    pub pages: Vec<PhysAddr>,
}

impl PageSource for Stash {
    fn obtain(&mut self, count: usize, out: &mut Vec<PhysAddr>) -> Result<(), MapError> {
        if self.pages.len() < count {
            return Err(MapError::ReservationExhausted {
                id: 0,
                left: self.pages.len(),
                needed: count,
            });
        }
        let at = self.pages.len() - count;
        out.extend(self.pages.drain(at..));
        Ok(())
    }

    fn obtain_one(&mut self) -> Result<PhysAddr, MapError> {
        self.pages.pop().ok_or(MapError::ReservationExhausted {
            id: 0,
            left: 0,
            needed: 1,
        })
    }

    fn give_back(&mut self, pages: &[PhysAddr]) {
        self.pages.extend_from_slice(pages);
    }
}

/// A validated run of leaves: `count` leaves of `size` at `level` from local IOVA `iova`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// IOVA with the TTBR1 high bits cleared.
    pub iova: u64,
    /// Output address of the first leaf.
    pub pa: u64,
    /// Leaf size.
    pub size: PageSize,
    /// Leaf level.
    pub level: u32,
    /// Leaves in the run.
    pub count: u64,
}

/// What planning a map found: the pages it must obtain. Runs are planned in ascending IOVA
/// order, so a table two runs both need is the last one counted at its level: `last` keeps,
/// per level, the index of the region whose table was counted last, so it is counted once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Plan {
    pub(crate) missing: usize,
    last: [Option<u64>; 4],
}

/// One table on a walk's path.
#[derive(Clone, Copy)]
pub(crate) struct Frame<'a> {
    pub(crate) t: TableRef<'a>,
    pub(crate) level: u32,
}

impl Frame<'_> {
    /// The table's address.
    #[inline]
    pub(crate) fn pa(&self) -> PhysAddr {
        self.t.pa
    }
}

/// A walk's path from the root (or, from a cursor, the leaf table alone), without
/// allocating: at most four levels.
#[derive(Clone, Copy)]
pub(crate) struct Path<'a> {
    frames: [Frame<'a>; 4],
    len: usize,
}

impl<'a> Path<'a> {
    #[inline]
    pub(crate) fn new(first: Frame<'a>) -> Self {
        Self {
            frames: [first; 4],
            len: 1,
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, f: Frame<'a>) {
        self.frames[self.len] = f;
        self.len += 1;
    }

    #[inline]
    pub(crate) fn last(&self) -> &Frame<'a> {
        &self.frames[self.len - 1]
    }

    #[inline]
    pub(crate) fn top(&self) -> usize {
        self.len - 1
    }

    #[inline]
    pub(crate) fn frames(&self) -> &[Frame<'a>] {
        &self.frames[..self.len]
    }
}

/// An operation in flight: while it lives, no table that was reachable when it was taken is
/// handed back to the allocator (on an engine that defers frees; otherwise it is nothing).
/// Dropping it frees the tables whose grace period ended, and sweeps emptied tables left
/// linked while reclamation was held back.
#[must_use = "the guard protects the tables only while it lives"]
pub struct OpGuard<'a, A: TableAlloc, F: FlushOps, K: Accounting> {
    engine: &'a Engine<A, F, K>,
    entered: Option<Entered>,
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> fmt::Debug for OpGuard<'_, A, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpGuard")
            .field("entered", &self.entered)
            .finish_non_exhaustive()
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Drop for OpGuard<'_, A, F, K> {
    #[inline]
    fn drop(&mut self) {
        if let Some(at) = self.entered {
            self.engine.exit(at);
        }
    }
}

/// A source that serves from a stash first and asks `src` for the rest: a multi-segment map
/// obtains its planned pages up front and tops up only when concurrent frees removed tables
/// the plan counted.
pub(crate) struct TopUp<'s, S: PageSource> {
    pub(crate) stash: Stash,
    pub(crate) src: &'s mut S,
}

/// Gives the stash's unused pages back to `src`: at the end of every planned map, and on a
/// panic unwinding out of the allocator midway, so that neither leaks them.
impl<S: PageSource> Drop for TopUp<'_, S> {
    fn drop(&mut self) {
        if !self.stash.pages.is_empty() {
            self.src.give_back(&self.stash.pages);
            self.stash.pages.clear();
        }
    }
}

impl<S: PageSource> PageSource for TopUp<'_, S> {
    const PATH_HELD: bool = S::PATH_HELD;

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

    const HOLDS: bool = S::HOLDS;

    fn held(&mut self, chain: hold::Chain<'_>) {
        self.src.held(chain);
    }
}

/// The LPAE walker over one table tree. Backends own one and add their page policy; `K`
/// says how table pages are accounted for ([`Untracked`]: Linux's semantics;
/// [`LiveCounts`](crate::account::LiveCounts): counts, eager freeing, reservations).
#[derive(Debug)]
pub struct Engine<A: TableAlloc, F: FlushOps, K: Accounting = Untracked> {
    cfg: Config,
    alloc: A,
    flush: F,
    root: PhysAddr,
    counters: Counters,
    local_mask: u64,
    /// Geometry and encodings the hot paths use, derived from `cfg` once.
    fast: Fast,
    /// The accounting: nothing, or the counts' deferred-free state.
    acct: K,
    /// The leaf tables recent operations used, one slot per hash of the region, each on its
    /// own cache line so threads working in different regions do not contend (Linux policy
    /// only).
    cursors: [LeafCursor; CURSOR_SLOTS],
    /// Bumped before any table page is freed, and (refcounted engines) after any table
    /// descriptor is removed: a cursor taken under an older value is stale.
    unlinks: AtomicU64,
}

/// What the hot paths would otherwise recompute from the configuration on every call.
#[derive(Debug)]
struct Fast {
    /// `level_shift(level)` for levels 0..=3.
    shift: [u32; 4],
    /// Index mask of a table at each level (the root's may be narrower or wider).
    index_mask: [u64; 4],
    /// Entries of a granule-sized table.
    per_table: u64,
    /// Bytes of a granule-sized table.
    granule_size: u64,
    /// Type bits of a level-3 leaf: page (3), or 1 for Mali.
    page_type: u64,
    /// `iova >> ias` of every IOVA in the input range: 0, or all ones above IAS for TTBR1.
    iova_hi: u64,
    /// What turns a local IOVA back into the caller's form (the TTBR1 high bits, or 0).
    ext_bits: u64,
    /// `desc::prot_bits` for every combination of the six `Prot` flags (the only bits it
    /// reads).
    prot_bits: [u64; 64],
    /// `desc::decode_prot` for every combination of the descriptor bits it reads, indexed by
    /// [`Fast::prot_key`].
    decoded: [u8; 256],
    /// `desc::unpack_pa` without the granule match: `(p | p << fold) & mask` of the address
    /// field `p` (fold 36 for a 64K granule's PA\[51:48\], else 0).
    unpack_fold: u32,
    unpack_mask: u64,
}

impl Fast {
    /// The bits of a leaf descriptor `desc::decode_prot` reads, packed into eight: \[7:2\]
    /// (AP or S2AP, AttrIndx or MemAttr), DBM, and whether any XN bit is set.
    #[inline]
    fn prot_key(desc: u64) -> usize {
        (((desc >> 2) & 0x3f) | ((desc & desc::DBM) >> 45) | (u64::from(desc & desc::XN != 0) << 7))
            as usize
    }

    #[inline]
    fn decode_prot(&self, desc: u64) -> Prot {
        Prot::from_bits_retain(u32::from(self.decoded[Self::prot_key(desc)]))
    }

    fn new(cfg: &Config, local_mask: u64) -> Self {
        let mut prot_bits = [0; 64];
        for (p, bits) in prot_bits.iter_mut().enumerate() {
            *bits = desc::prot_bits(cfg, Prot::from_bits_retain(p as u32));
        }
        let mut decoded = [0; 256];
        for (k, p) in decoded.iter_mut().enumerate() {
            let k = k as u64;
            let desc = ((k & 0x3f) << 2)
                | if k & 0x40 != 0 { desc::DBM } else { 0 }
                | if k & 0x80 != 0 { desc::XN } else { 0 };
            *p = desc::decode_prot(cfg, desc).bits() as u8;
        }
        let ttbr1 = cfg.is_ttbr1();
        let k64 = cfg.granule() == iopt_api::Granule::K64;
        Self {
            decoded,
            unpack_fold: if k64 { 36 } else { 0 },
            unpack_mask: if k64 {
                desc::ADDR_MASK << 4
            } else {
                desc::ADDR_MASK
            },
            shift: [0, 1, 2, 3].map(|l| cfg.level_shift(l)),
            per_table: cfg.granule().entries() as u64,
            granule_size: cfg.granule().size(),
            page_type: desc::leaf_type(cfg.format(), 3),
            index_mask: [0, 1, 2, 3].map(|l| {
                let bits = if l == cfg.start_level() {
                    cfg.pgd_bits()
                } else {
                    cfg.granule().bits_per_level()
                };
                (1u64 << bits) - 1
            }),
            iova_hi: if ttbr1 { u64::MAX >> cfg.ias() } else { 0 },
            ext_bits: if ttbr1 { !local_mask } else { 0 },
            prot_bits,
        }
    }
}

/// Cursor slots; a power of two.
const CURSOR_SLOTS: usize = 16;

/// The leaf table the last operation descended to, so that the next one in the same region
/// skips the descent. A seqlock over three words; `epoch` is the engine's unlink count when the
/// table was found, so a cursor is trusted only while no table has been freed since. (Under
/// the Linux policy a table is only unlinked by an unmap or block map covering it, which an
/// operation inside it can only race by overlapping it, a caller bug.) A refcounted engine
/// also bumps the count after every unlink, so a cursor that checks out names a table that
/// was still linked after the caller entered its grace period: the table cannot be freed
/// before the caller leaves it, and a pin tells whether it is being claimed.
#[derive(Debug, Default)]
#[repr(align(64))]
struct LeafCursor {
    seq: AtomicU64,
    key: AtomicU64,
    table: AtomicU64,
    epoch: AtomicU64,
    /// The key a lookup last failed to find here (a hint only, never trusted for a table).
    missed: AtomicU64,
}

impl<A: TableAlloc, F: FlushOps> Engine<A, F, Untracked> {
    /// Builds an empty tree with Linux's semantics: allocates the root (`cfg.pgd_bytes()`)
    /// from `alloc`.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn new(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        Self::with_accounting(cfg, alloc, flush)
    }
}

impl<A: TableAlloc, F: FlushOps> Engine<A, F, crate::account::LiveCounts> {
    /// Builds an empty tree that counts live entries and reservations and frees the tables
    /// it empties (see [`crate::account`]).
    ///
    /// ```
    /// use iopt_api::{Config, ConfigInput, Format, Gather, Iova, PageSize, PageSizes, PhysAddr, Prot, NoFlush};
    /// use iopt_lpae::Engine;
    /// use iopt_sim::SimMemory;
    /// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
    /// let mem = SimMemory::new();
    /// let e = Engine::counting(cfg, &mem, NoFlush)?;
    /// e.map(Iova::new(0x4000_0000), PhysAddr::new(0x1000), PageSize::SZ_4K, 1, Prot::READ, &mut e.on_demand())?;
    /// assert_eq!(mem.stats().live_pages, 4); // root, L1, L2, L3
    /// e.unmap(Iova::new(0x4000_0000), PageSize::SZ_4K, 1, &mut Gather::new())?;
    /// assert_eq!(mem.stats().live_pages, 1); // eagerly freed: the root alone
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn counting(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        Self::with_accounting(cfg, alloc, flush)
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Builds an empty tree with the accounting `K`: allocates the root (`cfg.pgd_bytes()`)
    /// from `alloc`.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn with_accounting(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        let root = alloc.alloc(cfg.pgd_bytes())?;
        if let Err(e) = check_page(&cfg, &alloc, root, cfg.pgd_bytes()) {
            alloc.free(root, cfg.pgd_bytes());
            return Err(e);
        }
        let counters = Counters::default();
        if !cfg.coherent_walk() {
            // The zeroed root must reach memory before the registers point a walker at it.
            alloc.clean(root, cfg.pgd_bytes());
            counters.cache_cleans.store(1, Ordering::Relaxed);
            counters
                .bytes_cleaned
                .store(cfg.pgd_bytes(), Ordering::Relaxed);
        }
        counters.alloc_calls.store(1, Ordering::Relaxed);
        counters.pages_allocated.store(1, Ordering::Relaxed);
        counters.add_live(1);
        let local_mask = if cfg.ias() >= 64 {
            u64::MAX
        } else {
            (1u64 << cfg.ias()) - 1
        };
        Ok(Self {
            cfg,
            alloc,
            flush,
            root,
            counters,
            local_mask,
            fast: Fast::new(&cfg, local_mask),
            acct: K::default(),
            cursors: Default::default(),
            unlinks: AtomicU64::new(0),
        })
    }

    /// Returns the configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Returns the allocator.
    #[must_use]
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// Returns the flush callbacks.
    #[must_use]
    pub fn flush_ops(&self) -> &F {
        &self.flush
    }

    /// Returns the counters.
    #[must_use]
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The unlink count: read before a walk whose result goes into the cursor.
    #[inline]
    pub(crate) fn unlink_epoch(&self) -> u64 {
        self.unlinks.load(Ordering::Acquire)
    }

    /// Records that a table descriptor was just removed (after the removing store), so that
    /// no cursor taken before can lead to the table.
    #[inline]
    pub(crate) fn note_unlinked(&self) {
        self.unlinks.fetch_add(1, Ordering::AcqRel);
    }

    /// Returns the root table's address.
    #[must_use]
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// Returns an on-demand source over this engine's allocator.
    #[must_use]
    pub fn on_demand(&self) -> OnDemand<'_, A> {
        OnDemand::new(&self.alloc, &self.counters, self.fast.granule_size)
    }

    /// Converts a local IOVA back to the caller's form (TTBR1: high bits set).
    #[inline]
    pub(crate) fn external(&self, local: u64) -> Iova {
        Iova::new(local | self.fast.ext_bits)
    }

    /// The output address of descriptor `entry` (`desc::unpack_pa`, branch-free).
    #[inline]
    pub(crate) fn unpack(&self, entry: u64) -> PhysAddr {
        let p = entry & desc::ADDR_MASK;
        PhysAddr::new((p | (p << self.fast.unpack_fold)) & self.fast.unpack_mask)
    }

    /// The size of a leaf at `level` (precomputed shifts).
    #[inline]
    pub(crate) fn leaf_size(&self, level: u32) -> u64 {
        1 << self.fast.shift[level as usize & 3]
    }

    /// The type bits of a leaf at `level`: the format's page type at level 3, a block above.
    #[inline]
    pub(crate) fn leaf_type(&self, level: u32) -> u64 {
        if level == 3 {
            self.fast.page_type
        } else {
            desc::TYPE_BLOCK
        }
    }

    /// The leaf attribute bits for `prot` (`desc::prot_bits`, precomputed).
    #[inline]
    pub(crate) fn leaf_bits(&self, prot: Prot) -> u64 {
        self.fast.prot_bits[(prot.bits() & 63) as usize]
    }

    /// Index of `iova` in a table at `level` (`Config::index` with precomputed shifts).
    #[inline]
    pub(crate) fn index(&self, iova: u64, level: u32) -> usize {
        let l = level as usize & 3;
        ((iova >> self.fast.shift[l]) & self.fast.index_mask[l]) as usize
    }

    /// The root as the first frame of a path.
    #[inline]
    pub(crate) fn root_frame(&self) -> Option<Frame<'_>> {
        self.alloc.table(self.root).map(|t| Frame {
            t,
            level: self.cfg.start_level(),
        })
    }

    /// The local IOVA after the last one the table translates (saturating at `u64::MAX`).
    pub(crate) fn local_end(&self) -> u64 {
        self.local_mask.saturating_add(1)
    }

    fn root_table(&self) -> Option<TableRef<'_>> {
        self.alloc.table(self.root)
    }

    pub(crate) fn resolve(&self, entry: u64) -> Option<TableRef<'_>> {
        self.alloc.table(self.unpack(entry))
    }

    /// `desc::kind` with the format's level-3 leaf type precomputed.
    #[inline]
    pub(crate) fn kind(&self, level: u32, entry: u64) -> Kind {
        let t = entry & desc::TYPE_MASK;
        if level == 3 {
            if t == self.fast.page_type {
                Kind::Leaf
            } else {
                Kind::Invalid
            }
        } else {
            match t {
                desc::TYPE_TABLE => Kind::Table,
                desc::TYPE_BLOCK => Kind::Leaf,
                _ => Kind::Invalid,
            }
        }
    }

    /// The cursor key of the table at `level` covering `iova`.
    #[inline]
    fn cursor_key(&self, level: u32, iova: u64) -> u64 {
        ((iova >> self.fast.shift[(level - 1) as usize & 3]) << 2) | u64::from(level & 3)
    }

    /// The cursor slot for a key: neighbouring regions land in different slots.
    #[inline]
    fn cursor_slot(&self, key: u64) -> &LeafCursor {
        let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        &self.cursors[(h as usize) & (CURSOR_SLOTS - 1)]
    }

    /// The cached leaf table at `level` for `iova`, if the cursor holds it and no table was
    /// freed since it was cached.
    #[inline(always)]
    #[allow(clippy::inline_always)] // on every single-call path; measured: not inlined otherwise
    pub(crate) fn cursor_get(&self, level: u32, iova: u64) -> Option<TableRef<'_>> {
        if level <= self.cfg.start_level() {
            return None;
        }
        let want = self.cursor_key(level, iova);
        let c = self.cursor_slot(want);
        let s1 = c.seq.load(Ordering::Acquire);
        let key = c.key.load(Ordering::Acquire);
        let pa = c.table.load(Ordering::Acquire);
        let epoch = c.epoch.load(Ordering::Acquire);
        if s1 & 1 != 0
            || c.seq.load(Ordering::Acquire) != s1
            || key != want
            || epoch != self.unlinks.load(Ordering::Acquire)
        {
            return None;
        }
        self.alloc.table(PhysAddr::new(pa))
    }

    /// Caches `table` as the leaf table at `level` for `iova`, found when the unlink count was
    /// `epoch`. Skipped when another thread is updating the cursor.
    #[inline]
    pub(crate) fn cursor_set(&self, level: u32, iova: u64, table: PhysAddr, epoch: u64) {
        if level <= self.cfg.start_level() {
            return;
        }
        let key = self.cursor_key(level, iova);
        let c = self.cursor_slot(key);
        let s = c.seq.load(Ordering::Acquire);
        if s & 1 != 0
            || (c.key.load(Ordering::Relaxed) == key
                && c.table.load(Ordering::Relaxed) == table.get()
                && c.epoch.load(Ordering::Relaxed) == epoch)
        {
            return;
        }
        if c.seq
            .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        c.key.store(key, Ordering::Relaxed);
        c.table.store(table.get(), Ordering::Relaxed);
        c.epoch.store(epoch, Ordering::Relaxed);
        c.seq.store(s + 2, Ordering::Release);
    }
}

/// Resolves a page `alloc` just handed out for a `size`-byte table and checks that the table
/// can use it: resolvable, at least `size` bytes of entries, aligned to `size`, with zeroed
/// metadata, and at an address that a table descriptor can hold and the output address size
/// reaches. A page that fails would make descriptors point elsewhere than the table written
/// (an address folded into other bits), or a walk run off its entries.
///
/// # Errors
///
/// [`AllocError::BadPage`]; the caller gives the page back.
pub(crate) fn check_page<'a, A: TableAlloc + ?Sized>(
    cfg: &Config,
    alloc: &'a A,
    pa: PhysAddr,
    size: u64,
) -> Result<TableRef<'a>, AllocError> {
    let bad = AllocError::BadPage { pa, size };
    let t = alloc.table(pa).ok_or(bad)?;
    let p = pa.get();
    let big_enough = (t.entries.len() as u64).saturating_mul(8) >= size;
    let aligned = size.is_power_of_two() && p & (size - 1) == 0;
    let reachable = p
        .checked_add(size.saturating_sub(1))
        .is_some_and(|last| cfg.pa_in_range(PhysAddr::new(last)));
    let encodable = desc::unpack_pa(desc::pack_pa(pa), cfg.granule()) == pa;
    let fresh = t.meta.live_entries.load(Ordering::Relaxed) == 0
        && t.meta.reservations.load(Ordering::Relaxed) == 0;
    if big_enough && aligned && reachable && encodable && fresh {
        Ok(t)
    } else {
        Err(bad)
    }
}

/// Whether every entry of `slots` reads zero (loads with `order`): eight loads folded into one
/// test per trip, since atomic loads are not vectorised.
#[inline]
pub(crate) fn all_zero(slots: &[Entry], order: Ordering) -> bool {
    let mut octs = slots.chunks_exact(8);
    for o in &mut octs {
        let any = o[0].load(order)
            | o[1].load(order)
            | o[2].load(order)
            | o[3].load(order)
            | o[4].load(order)
            | o[5].load(order)
            | o[6].load(order)
            | o[7].load(order);
        if any != 0 {
            return false;
        }
    }
    octs.remainder().iter().all(|e| e.load(order) == 0)
}

/// Stores zero into every entry of `slots`, four per trip.
#[inline]
pub(crate) fn clear_all(slots: &[Entry], order: Ordering) {
    let mut quads = slots.chunks_exact(4);
    for q in &mut quads {
        q[0].store(0, order);
        q[1].store(0, order);
        q[2].store(0, order);
        q[3].store(0, order);
    }
    for e in quads.remainder() {
        e.store(0, order);
    }
}

/// Writes consecutive leaves mapping `pa`, `pa + size`, ... into `slots`. Below 2^48 the packed
/// address grows by `size` from one descriptor to the next, so each is one add from the last;
/// above, PA\[51:48\] folds into bits \[15:12\] and each is packed afresh.
#[inline]
pub(crate) fn write_leaves(slots: &[Entry], attrs: u64, pa: u64, size: u64, order: Ordering) {
    if let [e] = slots {
        // A single-page map: skip the loop set-up.
        e.store(attrs | desc::pack_pa(PhysAddr::new(pa)), order);
        return;
    }
    let end = pa + size * slots.len() as u64;
    if end <= 1 << 48 {
        let mut d = attrs | desc::pack_pa(PhysAddr::new(pa));
        // Four stores per trip: the loop's own overhead is spread over four entries.
        let mut quads = slots.chunks_exact(4);
        for q in &mut quads {
            q[0].store(d, order);
            q[1].store(d + size, order);
            q[2].store(d + 2 * size, order);
            q[3].store(d + 3 * size, order);
            d += 4 * size;
        }
        for e in quads.remainder() {
            e.store(d, order);
            d += size;
        }
    } else {
        for (k, e) in slots.iter().enumerate() {
            e.store(
                attrs | desc::pack_pa(PhysAddr::new(pa + k as u64 * size)),
                order,
            );
        }
    }
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Drop for Engine<A, F, K> {
    fn drop(&mut self) {
        self.flush.flush_all();
        let mut pages = self.acct.drain();
        if let Some(root) = self.root_table() {
            let level = self.cfg.start_level();
            if level < 3 {
                for e in root.entries {
                    let v = e.load(Ordering::Acquire);
                    if self.kind(level, v) == Kind::Table {
                        self.collect_tables(v, level + 1, &mut pages);
                    }
                }
            }
        }
        self.free_tables(&pages);
        self.counters.free_calls.fetch_add(1, Ordering::Relaxed);
        self.counters.pages_freed.fetch_add(1, Ordering::Relaxed);
        self.counters.live_tables.fetch_sub(1, Ordering::Relaxed);
        self.alloc.free(self.root, self.cfg.pgd_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_mem::TestMemory as SimMemory;
    use iopt_api::{ConfigInput, Format, Granule, NoFlush, PageSizes, Quirks};
    use iopt_api::{Gather, UnmapError};
    use proptest::prelude::*;

    /// The one-entry and all-leaves unmap paths report what the entry-by-entry path does:
    /// every page gathered, the first hole named, nothing cleared on failure.
    #[test]
    fn unmap_fast_paths_gather_and_refuse_like_the_loop() {
        let cfg = Config::new(ConfigInput::new(
            Format::Arm64S1,
            PageSizes::GRANULE_4K,
            48,
            48,
        ))
        .unwrap();
        let e = Engine::new(cfg, SimMemory::new(), NoFlush).unwrap();
        let sz = PageSize::SZ_4K;
        let (va, pa) = (0x4000_0000u64, 0x8000_0000u64);
        let map = |i: u64, n: u64| {
            e.map(
                Iova::new(va + i * 0x1000),
                PhysAddr::new(pa + i * 0x1000),
                sz,
                n,
                Prot::READ,
                &mut e.on_demand(),
            )
        };
        map(0, 700).unwrap();
        // A hole at page 600: a run over it fails there and clears nothing.
        let mut g = Gather::new();
        e.unmap(Iova::new(va + 600 * 0x1000), sz, 1, &mut g)
            .unwrap();
        assert_eq!(
            (g.pages(), g.range()),
            (
                1,
                Some((
                    Iova::new(va + 600 * 0x1000),
                    Iova::new(va + 601 * 0x1000 - 1)
                ))
            )
        );
        let mut g = Gather::new();
        assert_eq!(
            e.unmap(Iova::new(va + 520 * 0x1000), sz, 100, &mut g),
            Err(UnmapError::NotMapped {
                iova: Iova::new(va + 600 * 0x1000)
            })
        );
        assert_eq!(g, Gather::new());
        assert!(e.lookup(Iova::new(va + 520 * 0x1000)).is_some());
        assert_eq!(
            e.unmap(Iova::new(va + 600 * 0x1000), sz, 1, &mut g),
            Err(UnmapError::NotMapped {
                iova: Iova::new(va + 600 * 0x1000)
            })
        );
        // Across two leaf tables, all leaves: every page gathered once.
        let mut g = Gather::new();
        assert_eq!(e.unmap(Iova::new(va), sz, 600, &mut g), Ok(600 * 0x1000));
        assert_eq!((g.pages(), g.pgsize()), (600, 0x1000));
        assert_eq!(
            g.range(),
            Some((Iova::new(va), Iova::new(va + 600 * 0x1000 - 1)))
        );
        assert!(e.lookup(Iova::new(va + 599 * 0x1000)).is_none());
        assert!(e.lookup(Iova::new(va + 601 * 0x1000)).is_some());
        // A single map into an empty entry, and refused over a leaf.
        map(5, 1).unwrap();
        assert_eq!(
            map(5, 1),
            Err(MapError::AlreadyMapped {
                iova: Iova::new(va + 5 * 0x1000)
            })
        );
        assert_eq!(
            e.lookup(Iova::new(va + 5 * 0x1000 + 7)).map(|t| t.pa),
            Some(PhysAddr::new(pa + 5 * 0x1000 + 7))
        );
    }

    #[test]
    fn unrolled_scan_and_fill_match_plain_loops() {
        for len in 0..=40usize {
            let slots: Vec<AtomicU64> = (0..len).map(|_| AtomicU64::new(0)).collect();
            assert!(all_zero(&slots, Ordering::Relaxed));
            for k in 0..len {
                slots[k].store(1 << (k % 64), Ordering::Relaxed);
                assert!(!all_zero(&slots, Ordering::Relaxed), "len {len}, set {k}");
                slots[k].store(0, Ordering::Relaxed);
            }
            for (pa, size) in [(0x8000_0000u64, 0x1000u64), ((1 << 48) - 0x4000, 0x1000)] {
                write_leaves(&slots, 0x703, pa, size, Ordering::Relaxed);
                for (k, e) in slots.iter().enumerate() {
                    let want = 0x703 | desc::pack_pa(PhysAddr::new(pa + k as u64 * size));
                    assert_eq!(e.load(Ordering::Relaxed), want, "len {len}, entry {k}");
                }
                for e in &slots {
                    e.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    fn configs() -> Vec<Config> {
        let mut out = Vec::new();
        for (format, quirks) in [
            (Format::Arm64S1, Quirks::empty()),
            (Format::Arm64S1, Quirks::TTBR1),
            (Format::Arm64S2, Quirks::empty()),
            (Format::Arm32S1, Quirks::empty()),
            (Format::Mali, Quirks::empty()),
        ] {
            for granule in [Granule::K4, Granule::K16, Granule::K64] {
                for (ias, oas) in [(48, 48), (39, 40), (32, 32), (40, 42), (52, 52)] {
                    let input = ConfigInput::new(format, PageSizes::from_bits(!0), ias, oas)
                        .with_quirks(quirks)
                        .with_preferred_granule(granule);
                    if let Ok(cfg) = Config::new(input) {
                        out.push(cfg);
                    }
                }
            }
        }
        out
    }

    /// Addresses near the edges the checks care about, or anywhere.
    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            (0u32..64, 0u64..4, any::<bool>()).prop_map(|(bit, off, neg)| {
                let v = (1u64 << bit).wrapping_add(off << 12);
                if neg { v.wrapping_neg() } else { v }
            }),
            (0u64..1 << 20).prop_map(|p| p << 12),
            (0u64..1 << 10).prop_map(|p| p << 30),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// The quick checks accept exactly what the full validation accepts, with the same run.
        #[test]
        fn quick_validation_agrees(
            which in any::<prop::sample::Index>(),
            raw in (addr(), addr()),
            aligned in (0u64..1 << 12, 0u64..1 << 12, 0u8..8),
            shift in (12u32..43, any::<prop::sample::Index>(), any::<bool>()),
            count in prop_oneof![3 => 0u64..4, 1 => any::<u64>(), 1 => (0u32..64).prop_map(|b| 1u64 << b)],
            prot in prop_oneof![any::<u32>(), 0u32..64],
        ) {
            let cfgs = configs();
            let cfg = cfgs[which.index(cfgs.len())];
            let e = Engine::new(cfg, SimMemory::new(), NoFlush).unwrap();
            // A supported size mostly, any power of two sometimes.
            let sizes: Vec<u32> = (12..43)
                .filter(|&s| cfg.leaf_level(PageSize::from_shift(s).unwrap()).is_some())
                .collect();
            let shift = if shift.2 { shift.0 } else { sizes[shift.1.index(sizes.len())] };
            // Arbitrary addresses, or multiples of the size (in the TTBR1 half mostly where the
            // table translates it).
            let (ik, pk, mode) = aligned;
            let (iova, pa) = if mode == 0 {
                raw
            } else {
                let high = cfg.is_ttbr1() != (mode == 1);
                let hi = if high { u64::MAX << cfg.ias() } else { 0 };
                (hi | ik << shift, pk << shift)
            };
            let (iova, pa) = (Iova::new(iova), PhysAddr::new(pa));
            let size = PageSize::from_shift(shift).unwrap();
            let prot = Prot::from_bits_retain(prot);
            prop_assert_eq!(
                e.quick_map_run::<true>(iova, pa, size, count, prot),
                e.validate_map_slow(iova, pa, size, count, prot).ok()
            );
            prop_assert_eq!(
                e.quick_unmap_run(iova, size, count),
                e.validate_unmap_slow(iova, size, count).ok()
            );
            prop_assert_eq!(e.leaf_bits(prot), desc::prot_bits(&cfg, prot));
            prop_assert_eq!(e.unpack(raw.0), desc::unpack_pa(raw.0, cfg.granule()));
            prop_assert_eq!(e.unpack(raw.1), desc::unpack_pa(raw.1, cfg.granule()));
            let d = raw.0;
            prop_assert_eq!(e.fast.decode_prot(d), desc::decode_prot(&cfg, d));
            let d = desc::prot_bits(&cfg, prot) | (raw.1 & !0x0038_0000_0000_0ffc);
            prop_assert_eq!(e.fast.decode_prot(d), desc::decode_prot(&cfg, d));
            for level in cfg.start_level()..4 {
                prop_assert_eq!(e.index(iova.get(), level), cfg.index(iova.get(), level));
                for d in [raw.0, raw.1, raw.0 & 3, raw.1 & 3] {
                    prop_assert_eq!(e.kind(level, d), desc::kind(cfg.format(), level, d));
                }
            }
        }
    }
}
