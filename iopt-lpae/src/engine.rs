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

use crate::desc::{self, Kind};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use iopt_api::{
    AllocError, Config, FlushOps, Gather, Iova, IovaRange, MapError, PageSize, PhysAddr, Prot,
    Stats, TableAlloc, TableRef, Translation, UnmapError, WalkItem,
};

/// Where a map gets the table pages it must install.
///
/// Every page handed out must be zeroed and granule-sized, from the same allocator the engine
/// resolves addresses with.
pub trait PageSource {
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
        let start = out.len();
        out.reserve(count);
        for k in 0..count as u64 {
            match self.alloc.alloc(self.size) {
                Ok(pa) => out.push(pa),
                Err(e) => {
                    self.count(k + 1, k);
                    let got: Vec<PhysAddr> = out.drain(start..).collect();
                    self.give_back(&got);
                    return Err(e.into());
                }
            }
        }
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

/// The LPAE walker over one table tree. Backends own one and add their page policy.
#[derive(Debug)]
pub struct Engine<A: TableAlloc, F: FlushOps> {
    cfg: Config,
    alloc: A,
    flush: F,
    root: PhysAddr,
    counters: Counters,
    local_mask: u64,
    /// Geometry and encodings the hot paths use, derived from `cfg` once.
    fast: Fast,
    /// Refcounting policy and deferred-free state (see [`crate::refcount`]).
    pub(crate) rc: crate::refcount::RcState,
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

impl<A: TableAlloc, F: FlushOps> Engine<A, F> {
    /// Builds an empty tree: allocates the root (`cfg.pgd_bytes()`) from `alloc`.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn new(cfg: Config, alloc: A, flush: F) -> Result<Self, iopt_api::AllocError> {
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
            rc: crate::refcount::RcState::default(),
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

    fn granule(&self) -> u64 {
        self.cfg.granule().size()
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

    fn root_table(&self) -> Option<TableRef<'_>> {
        self.alloc.table(self.root)
    }

    fn resolve(&self, entry: u64) -> Option<TableRef<'_>> {
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

    /// Maps `count` leaves of `size` from `iova` to `pa` with `prot`, all or nothing, drawing
    /// missing tables from `src`: [`validate_map`](Self::validate_map) and
    /// [`map_run`](Self::map_run) in one step, so a valid request pays for its checks once.
    ///
    /// # Errors
    ///
    /// As [`validate_map`](Self::validate_map) and [`map_runs`](Self::map_runs).
    #[inline]
    pub fn map<S: PageSource>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        self.map_checking::<true, S>(iova, pa, size, count, prot, src)
    }

    /// [`map`](Self::map) of a run the caller has already proved to lie inside a range it
    /// checked against the input address size (a reservation's: both designs refuse to
    /// reserve outside it): the same result and errors, without checking the IOVA against
    /// the input address size again. The caller's proof is trusted: a debug assertion
    /// catches a run outside the input address size, and a release build maps it where its
    /// low `ias` bits point.
    ///
    /// # Errors
    ///
    /// As [`map`](Self::map).
    #[inline]
    pub fn map_within<S: PageSource>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        debug_assert!(
            self.quick_map_run::<false>(iova, pa, size, count, prot)
                .is_none()
                || self
                    .quick_map_run::<true>(iova, pa, size, count, prot)
                    .is_some(),
            "map_within: {iova} + {count} x {size} is outside the input address size"
        );
        self.map_checking::<false, S>(iova, pa, size, count, prot, src)
    }

    /// [`map`](Self::map), checking the IOVA against the input address size on the quick
    /// path only if `CHECK_IOVA` (errors still come from the full checks, in Linux's order).
    #[inline]
    fn map_checking<const CHECK_IOVA: bool, S: PageSource>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        if let Some(run) = self.quick_map_run::<CHECK_IOVA>(iova, pa, size, count, prot) {
            return self.map_run(run, prot, src);
        }
        let run = self.validate_map_slow(iova, pa, size, count, prot)?;
        self.map_runs_general(&[run], prot, src)
    }

    /// Unmaps `count` leaves of `size` from `iova`, all or nothing:
    /// [`validate_unmap`](Self::validate_unmap) and [`unmap_run`](Self::unmap_run) in one
    /// step. Returns the bytes unmapped.
    ///
    /// # Errors
    ///
    /// As [`validate_unmap`](Self::validate_unmap) and [`unmap_run`](Self::unmap_run).
    #[inline]
    pub fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        if let Some(run) = self.quick_unmap_run(iova, size, count) {
            return self.unmap_run(run, gather);
        }
        let run = self.validate_unmap_slow(iova, size, count)?;
        self.unmap_run_general(run, gather)
    }

    /// [`map`](Self::map) for a caller that holds the engine exclusively, drawing missing
    /// tables on demand: the same result and errors, without the protocol that lets
    /// concurrent callers share a refcounted engine (on a cursor hit, no grace period and no
    /// locked update of the leaf table's count). A driver that serialises its page-table
    /// operations under its own lock, or owns the table outright, pays only for the walk. On
    /// an engine that does not count this is [`map`](Self::map).
    ///
    /// ```
    /// use iopt_api::{Config, ConfigInput, Format, Gather, Iova, PageSize, PageSizes, PhysAddr, Prot, NoFlush};
    /// use iopt_lpae::{Engine, refcount::Policy};
    /// use iopt_sim::SimMemory;
    /// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
    /// let mem = SimMemory::new();
    /// let mut e = Engine::with_policy(cfg, &mem, NoFlush, Policy::Refcounted)?;
    /// let (a, b) = (Iova::new(0x4000_0000), Iova::new(0x4000_1000));
    /// e.map_mut(a, PhysAddr::new(0x1000), PageSize::SZ_4K, 1, Prot::READ)?;
    /// e.map_mut(b, PhysAddr::new(0x2000), PageSize::SZ_4K, 1, Prot::READ)?; // the cursor's table
    /// assert_eq!(e.lookup_mut(b).map(|t| t.pa), Some(PhysAddr::new(0x2000)));
    /// let mut gather = Gather::new();
    /// e.unmap_mut(b, PageSize::SZ_4K, 1, &mut gather)?; // the table keeps `a`
    /// e.unmap_mut(a, PageSize::SZ_4K, 1, &mut gather)?; // empties it: freed as by `unmap`
    /// assert_eq!(mem.stats().live_pages, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`map`](Self::map).
    #[inline]
    pub fn map_mut(
        &mut self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let this: &Self = self;
        if this.rc.counting() {
            if let Some(run) = this.quick_map_run::<true>(iova, pa, size, count, prot) {
                if this.map_one_exclusive(&run, prot) {
                    return Ok(());
                }
                return this.map_run(run, prot, &mut this.on_demand());
            }
        }
        this.map(iova, pa, size, count, prot, &mut this.on_demand())
    }

    /// [`unmap`](Self::unmap) for a caller that holds the engine exclusively: the same result
    /// and errors; a one-leaf unmap that leaves its table non-empty needs no grace period and
    /// no locked count update. On an engine that does not count this is
    /// [`unmap`](Self::unmap).
    ///
    /// # Errors
    ///
    /// As [`unmap`](Self::unmap).
    #[inline]
    pub fn unmap_mut(
        &mut self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        let this: &Self = self;
        if this.rc.counting() && count == 1 {
            if let Some(run) = this.quick_unmap_run(iova, size, count) {
                if let Some(bytes) = this.unmap_one_exclusive(&run, gather) {
                    return Ok(bytes);
                }
                return this.unmap_run(run, gather);
            }
        }
        this.unmap(iova, size, count, gather)
    }

    /// [`lookup`](Self::lookup) for a caller that holds the engine exclusively: no grace period
    /// (no table can be freed under it).
    #[must_use]
    #[inline]
    pub fn lookup_mut(&mut self, iova: Iova) -> Option<Translation> {
        if !self.cfg.iova_in_range(iova) {
            return None;
        }
        self.lookup_in_range(iova)
    }

    /// Whether a lookup that missed the cursor should cache the table at `level` it found for
    /// `iova`: only when the previous lookup that missed in this slot wanted the same table
    /// (repeated lookups in one region), so that lookups spread over many tables do not
    /// rewrite the cursor (a locked read-modify-write) on every call. A plain store
    /// otherwise.
    #[inline]
    fn cursor_worth_caching(&self, level: u32, iova: u64) -> bool {
        if level <= self.cfg.start_level() {
            return false;
        }
        let key = self.cursor_key(level, iova);
        let c = self.cursor_slot(key);
        if c.missed.load(Ordering::Relaxed) == key {
            return true;
        }
        c.missed.store(key, Ordering::Relaxed);
        false
    }

    /// Validates a map request and converts it to a run, checking in Linux's order (page
    /// size, start range, permission) and then what Linux leaves to its caller.
    ///
    /// # Errors
    ///
    /// The first failing check's [`MapError`].
    #[inline]
    pub fn validate_map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<Run, MapError> {
        match self.quick_map_run::<true>(iova, pa, size, count, prot) {
            Some(run) => Ok(run),
            None => self.validate_map_slow(iova, pa, size, count, prot),
        }
    }

    /// The run of a map request that passes every check of [`validate_map`](Self::validate_map),
    /// tested in as few branches as possible; `None` if any check fails (the slow path then
    /// finds which, in Linux's order).
    #[inline]
    fn quick_map_run<const CHECK_IOVA: bool>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Option<Run> {
        let level = self.cfg.leaf_level(size)?;
        let (i, p) = (iova.get(), pa.get());
        if count == 0 || !prot.is_accessible() || (i | p) & size.mask() != 0 {
            return None;
        }
        // One aligned leaf ends at `| (size - 1)`: no overflow to check.
        let (last_i, last_p) = if count == 1 {
            (i | (size.get() - 1), p | (size.get() - 1))
        } else {
            let tail = count.checked_mul(size.get())? - 1;
            (i.checked_add(tail)?, p.checked_add(tail)?)
        };
        // `pa <= last_pa`, so the last output address in range implies the first is.
        let ias = self.cfg.ias();
        if (CHECK_IOVA && (i >> ias != self.fast.iova_hi || last_i >> ias != self.fast.iova_hi))
            || !self.cfg.pa_in_range(PhysAddr::new(last_p))
        {
            return None;
        }
        Some(Run {
            iova: i & self.local_mask,
            pa: p,
            size,
            level,
            count,
        })
    }

    #[cold]
    #[inline(never)]
    fn validate_map_slow(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<Run, MapError> {
        let cfg = &self.cfg;
        let level = cfg
            .leaf_level(size)
            .ok_or(MapError::InvalidPageSize { size: size.get() })?;
        if !cfg.iova_in_range(iova) {
            return Err(MapError::IovaOutOfRange { iova });
        }
        if !cfg.pa_in_range(pa) {
            return Err(MapError::PaOutOfRange { pa });
        }
        if !prot.is_accessible() {
            return Err(MapError::NoAccess { prot });
        }
        if count == 0 {
            return Err(MapError::Empty { iova });
        }
        let len = count.checked_mul(size.get()).ok_or(MapError::Overflow {
            iova,
            len: u64::MAX,
        })?;
        let last_iova = iova
            .checked_add(len - 1)
            .ok_or(MapError::Overflow { iova, len })?;
        let last_pa = pa
            .checked_add(len - 1)
            .ok_or(MapError::Overflow { iova, len })?;
        if !iova.is_aligned(size.get()) || !pa.is_aligned(size.get()) {
            return Err(MapError::Misaligned { iova, pa, size });
        }
        if !cfg.iova_in_range(last_iova) {
            return Err(MapError::IovaOutOfRange { iova: last_iova });
        }
        if !cfg.pa_in_range(last_pa) {
            return Err(MapError::PaOutOfRange { pa: last_pa });
        }
        Ok(Run {
            iova: iova.get() & self.local_mask,
            pa: pa.get(),
            size,
            level,
            count,
        })
    }

    /// Validates an unmap request and converts it to a run (`pa` is 0).
    ///
    /// # Errors
    ///
    /// The first failing check's [`UnmapError`].
    #[inline]
    pub fn validate_unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
    ) -> Result<Run, UnmapError> {
        match self.quick_unmap_run(iova, size, count) {
            Some(run) => Ok(run),
            None => self.validate_unmap_slow(iova, size, count),
        }
    }

    /// The run of an unmap request that passes every check of
    /// [`validate_unmap`](Self::validate_unmap); `None` if any fails.
    #[inline]
    fn quick_unmap_run(&self, iova: Iova, size: PageSize, count: u64) -> Option<Run> {
        let level = self.cfg.leaf_level(size)?;
        let i = iova.get();
        if count == 0 || i & size.mask() != 0 {
            return None;
        }
        // One aligned leaf ends at `i | (size - 1)`: no overflow to check.
        let last = if count == 1 {
            i | (size.get() - 1)
        } else {
            i.checked_add(count.checked_mul(size.get())? - 1)?
        };
        let ias = self.cfg.ias();
        if i >> ias != self.fast.iova_hi || last >> ias != self.fast.iova_hi {
            return None;
        }
        Some(Run {
            iova: i & self.local_mask,
            pa: 0,
            size,
            level,
            count,
        })
    }

    #[cold]
    #[inline(never)]
    fn validate_unmap_slow(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
    ) -> Result<Run, UnmapError> {
        let cfg = &self.cfg;
        let level = cfg
            .leaf_level(size)
            .ok_or(UnmapError::InvalidPageSize { size: size.get() })?;
        if !cfg.iova_in_range(iova) {
            return Err(UnmapError::IovaOutOfRange { iova });
        }
        if count == 0 {
            return Err(UnmapError::Empty { iova });
        }
        let len = count.checked_mul(size.get()).ok_or(UnmapError::Overflow {
            iova,
            len: u64::MAX,
        })?;
        let last = iova
            .checked_add(len - 1)
            .ok_or(UnmapError::Overflow { iova, len })?;
        if !iova.is_aligned(size.get()) {
            return Err(UnmapError::Misaligned { iova, size });
        }
        if !cfg.iova_in_range(last) {
            return Err(UnmapError::IovaOutOfRange { iova: last });
        }
        Ok(Run {
            iova: iova.get() & self.local_mask,
            pa: 0,
            size,
            level,
            count,
        })
    }

    /// Entries the run covers in the leaf table holding `iova`, at most `remaining`.
    #[inline]
    pub(crate) fn entries_in_table(&self, level: u32, iova: u64, remaining: u64) -> u64 {
        let per = self.fast.per_table;
        let idx = (iova >> self.fast.shift[level as usize & 3]) & (per - 1);
        remaining.min(per - idx)
    }

    /// Counts into `plan` the tables at levels `level+1 ..= target` needed to cover
    /// `[start, end)` below an empty entry at `level`, skipping a table already counted for an
    /// earlier run.
    fn missing_below(&self, plan: &mut Plan, level: u32, target: u32, start: u64, end: u64) {
        for m in (level + 1)..=target {
            let shift = self.cfg.level_shift(m - 1);
            let lo = start >> shift;
            let hi = (end - 1) >> shift;
            let last = &mut plan.last[m as usize];
            let shared = u64::from(*last == Some(lo));
            plan.missing += usize::try_from(hi - lo + 1 - shared).unwrap_or(usize::MAX);
            *last = Some(hi);
        }
    }

    /// Whether the subtree of `table` at `level` holds any leaf.
    pub(crate) fn subtree_has_leaf(&self, table: TableRef<'_>, level: u32) -> bool {
        table.entries.iter().any(|e| {
            let e = e.load(Ordering::Acquire);
            match self.kind(level, e) {
                Kind::Invalid => false,
                Kind::Leaf => true,
                Kind::Table => self
                    .resolve(e)
                    .is_none_or(|t| self.subtree_has_leaf(t, level + 1)),
            }
        })
    }

    /// Read-only pass over `[start, end)` (local IOVAs) of `table` at `level`: conflicts, and
    /// the tables a map of leaves at `target` would add, counted into `plan`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan(
        &self,
        plan: &mut Plan,
        table: TableRef<'_>,
        level: u32,
        target: u32,
        start: u64,
        end: u64,
        strict: bool,
    ) -> Result<(), MapError> {
        let shift = self.cfg.level_shift(level);
        if level == target {
            // The leaf table of a segment: a run of zero entries (the common case of a map
            // into present tables) needs nothing and conflicts with nothing.
            let first = self.index(start, level);
            let last = self.index(end - 1, level);
            if table
                .entries
                .get(first..=last)
                .is_some_and(|s| all_zero(s, Ordering::Acquire))
            {
                return Ok(());
            }
        }
        let mut at = start;
        while at < end {
            let next = ((at >> shift) + 1)
                .checked_shl(shift)
                .unwrap_or(u64::MAX)
                .min(end);
            let idx = self.index(at, level);
            let e = table
                .entries
                .get(idx)
                .map_or(0, |e| e.load(Ordering::Acquire));
            match (self.kind(level, e), level == target) {
                (Kind::Invalid, true) => {}
                (Kind::Invalid, false) => self.missing_below(plan, level, target, at, next),
                (Kind::Leaf, _) => {
                    if strict {
                        return Err(MapError::AlreadyMapped {
                            iova: self.external(at),
                        });
                    }
                }
                (Kind::Table, true) => {
                    let sub = self.resolve(e).ok_or(MapError::BrokenTable {
                        iova: self.external(at),
                        pa: self.unpack(e),
                    })?;
                    if strict && self.subtree_has_leaf(sub, level + 1) {
                        return Err(MapError::AlreadyMapped {
                            iova: self.external(at),
                        });
                    }
                }
                (Kind::Table, false) => {
                    let sub = self.resolve(e).ok_or(MapError::BrokenTable {
                        iova: self.external(at),
                        pa: self.unpack(e),
                    })?;
                    self.plan(plan, sub, level + 1, target, at, next, strict)?;
                }
            }
            at = next;
        }
        Ok(())
    }

    /// Returns exactly how many table pages a map of `range` with `leaf`-sized leaves would
    /// allocate now (leaves already in the way are skipped, not counted).
    ///
    /// # Errors
    ///
    /// [`MapError::InvalidPageSize`] or [`MapError::Misaligned`] for a bad leaf size,
    /// [`MapError::IovaOutOfRange`] for a range outside the table.
    pub fn pages_needed(&self, range: IovaRange, leaf: PageSize) -> Result<usize, MapError> {
        let _guard = self.enter();
        let level = self
            .cfg
            .leaf_level(leaf)
            .ok_or(MapError::InvalidPageSize { size: leaf.get() })?;
        if !range.start().is_aligned(leaf.get()) || range.len() % leaf.get() != 0 {
            return Err(MapError::Misaligned {
                iova: range.start(),
                pa: PhysAddr::ZERO,
                size: leaf,
            });
        }
        if !self.cfg.iova_in_range(range.start()) {
            return Err(MapError::IovaOutOfRange {
                iova: range.start(),
            });
        }
        if !self.cfg.iova_in_range(range.last()) {
            return Err(MapError::IovaOutOfRange { iova: range.last() });
        }
        let root = self.root_table().ok_or(MapError::BrokenTable {
            iova: range.start(),
            pa: self.root,
        })?;
        let start = range.start().get() & self.local_mask;
        let end = (range.last().get() & self.local_mask) + 1;
        let mut plan = Plan::default();
        self.plan(
            &mut plan,
            root,
            self.cfg.start_level(),
            level,
            start,
            end,
            false,
        )?;
        Ok(plan.missing)
    }

    /// Maps validated runs with `prot`, all or nothing, drawing missing tables from `src`.
    ///
    /// Runs must be disjoint and in ascending IOVA order (as [`split_range`](crate::split_range)
    /// makes them); then exactly the missing tables are obtained, in one call to the source.
    ///
    /// # Errors
    ///
    /// [`MapError::AlreadyMapped`] on a conflict, the source's error when it cannot supply the
    /// pages, [`MapError::BrokenTable`] on a corrupted tree. Nothing changed.
    pub fn map_runs<S: PageSource>(
        &self,
        runs: &[Run],
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        if let [r] = runs {
            return self.map_run(*r, prot, src);
        }
        self.map_runs_general(runs, prot, src)
    }

    /// [`map_runs`](Self::map_runs) of one run: a run inside one leaf table (every
    /// single-page map) goes straight to its segment.
    ///
    /// # Errors
    ///
    /// As [`map_runs`](Self::map_runs).
    // Measured (callgrind): with plain `#[inline]` a map through a reservation's page source
    // called it out of line, 20 instructions more per single-page map than through
    // `OnDemand`.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn map_run<S: PageSource>(&self, r: Run, prot: Prot, src: &mut S) -> Result<(), MapError> {
        if !self.rc.counting()
            && (r.count == 1 || self.entries_in_table(r.level, r.iova, r.count) == r.count)
        {
            let bits = self.leaf_bits(prot);
            return self.map_segment(r.iova, r.pa, r.level, r.count, bits, src);
        }
        if self.rc.counting() {
            return self.map_runs_counted(&[r], prot, src);
        }
        self.map_runs_general(&[r], prot, src)
    }

    fn map_runs_general<S: PageSource>(
        &self,
        runs: &[Run],
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        if self.rc.counting() {
            return self.map_runs_counted(runs, prot, src);
        }
        // Plan everything first: conflicts anywhere refuse the whole map before any write.
        let root = self.root_table().ok_or(MapError::BrokenTable {
            iova: Iova::ZERO,
            pa: self.root,
        })?;
        let mut plan = Plan::default();
        for r in runs {
            let end = r.iova + (r.count * r.size.get());
            self.plan(
                &mut plan,
                root,
                self.cfg.start_level(),
                r.level,
                r.iova,
                end,
                true,
            )?;
        }
        // Exactly the distinct missing tables (runs come in ascending order); anything a
        // concurrent installer saves us goes back to the source.
        let mut stash = Stash::default();
        src.obtain(plan.missing, &mut stash.pages)?;
        let bits = self.leaf_bits(prot);
        let mut result = Ok(());
        'runs: for r in runs {
            let mut iova = r.iova;
            let mut pa = r.pa;
            let mut left = r.count;
            while left > 0 {
                let n = self.entries_in_table(r.level, iova, left);
                if let Err(e) = self.map_segment(iova, pa, r.level, n, bits, &mut stash) {
                    result = Err(e);
                    break 'runs;
                }
                let bytes = n * r.size.get();
                iova += bytes;
                pa += bytes;
                left -= n;
            }
        }
        src.give_back(&stash.pages);
        result
    }

    /// Maps `n` leaves inside one leaf table. Checks every target entry before writing any.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn map_segment<S: PageSource>(
        &self,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
        src: &mut S,
    ) -> Result<(), MapError> {
        let table = match self.cursor_get(target, iova) {
            Some(table) => table,
            None => match self.descend_for_map(iova, pa, target, n, bits, src)? {
                Some(table) => table,
                None => return Ok(()),
            },
        };
        if n == 1 {
            // One leaf into an empty entry: no loop set-up. Anything else (a conflict, an
            // empty table to replace) takes the general path.
            let idx = self.index(iova, target);
            if let Some(e) = table.entries.get(idx) {
                if e.load(Ordering::Acquire) == 0 {
                    e.store(
                        bits | self.leaf_type(target) | desc::pack_pa(PhysAddr::new(pa)),
                        Ordering::Release,
                    );
                    self.sync_entries(table, idx, 1);
                    return Ok(());
                }
            }
        }
        self.fill_leaf_table(table, iova, pa, target, n, bits)
    }

    /// Descends to the leaf table of a segment the cursor did not hold, caching it. Where a
    /// table is missing, publishes the whole path with the leaves already written and returns
    /// `None`: the segment is mapped.
    #[inline(never)]
    fn descend_for_map<S: PageSource>(
        &self,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
        src: &mut S,
    ) -> Result<Option<TableRef<'_>>, MapError> {
        let cfg = &self.cfg;
        'descend: loop {
            let epoch = self.unlinks.load(Ordering::Acquire);
            let mut table = self.root_table().ok_or(MapError::BrokenTable {
                iova: self.external(iova),
                pa: self.root,
            })?;
            let mut table_pa = self.root;
            let mut level = cfg.start_level();
            while level < target {
                let idx = self.index(iova, level);
                let slot = table.entries.get(idx).ok_or(MapError::BrokenTable {
                    iova: self.external(iova),
                    pa: self.root,
                })?;
                let e = slot.load(Ordering::Acquire);
                match self.kind(level, e) {
                    Kind::Table => {
                        self.sync_seen(table, idx, e);
                        table_pa = self.unpack(e);
                        table = self.alloc.table(table_pa).ok_or(MapError::BrokenTable {
                            iova: self.external(iova),
                            pa: table_pa,
                        })?;
                        level += 1;
                    }
                    Kind::Leaf => {
                        return Err(MapError::AlreadyMapped {
                            iova: self.external(iova),
                        });
                    }
                    Kind::Invalid => {
                        if self.publish_chain(
                            table, idx, iova, pa, level, target, n, bits, src, epoch,
                        )? {
                            return Ok(None);
                        }
                        continue 'descend;
                    }
                }
            }
            self.cursor_set(target, iova, table_pa, epoch);
            return Ok(Some(table));
        }
    }

    /// Writes `n` leaves from `iova` into the leaf table `table`, after checking that every
    /// target entry is free (or an empty table, which the block then replaces).
    #[inline]
    fn fill_leaf_table(
        &self,
        table: TableRef<'_>,
        iova: u64,
        pa: u64,
        target: u32,
        n: u64,
        bits: u64,
    ) -> Result<(), MapError> {
        let cfg = &self.cfg;
        let size = 1 << self.fast.shift[target as usize & 3];
        let leaf_type = desc::leaf_type(cfg.format(), target);
        // At the leaf table: every target entry must be free (or an empty table).
        let first = self.index(iova, target);
        let last = first + n as usize;
        let slots = table
            .entries
            .get(first..last)
            .ok_or(MapError::BrokenTable {
                iova: self.external(iova),
                pa: self.root,
            })?;
        // The common case: every target entry is zero.
        if all_zero(slots, Ordering::Acquire) {
            write_leaves(slots, bits | leaf_type, pa, size, Ordering::Release);
            self.sync_entries(table, first, n as usize);
            return Ok(());
        }
        let mut replace = false;
        for (k, e) in slots.iter().enumerate() {
            let v = e.load(Ordering::Acquire);
            match self.kind(target, v) {
                Kind::Invalid => {}
                Kind::Leaf => {
                    return Err(MapError::AlreadyMapped {
                        iova: self.external(iova + k as u64 * size),
                    });
                }
                Kind::Table => {
                    let at = self.external(iova + k as u64 * size);
                    let sub = self.resolve(v).ok_or(MapError::BrokenTable {
                        iova: at,
                        pa: self.unpack(v),
                    })?;
                    if self.subtree_has_leaf(sub, target + 1) {
                        return Err(MapError::AlreadyMapped { iova: at });
                    }
                    replace = true;
                }
            }
        }
        if !replace {
            write_leaves(slots, bits | leaf_type, pa, size, Ordering::Release);
            self.sync_entries(table, first, n as usize);
            return Ok(());
        }
        for (k, e) in slots.iter().enumerate() {
            let out = PhysAddr::new(pa + k as u64 * size);
            let old = e.swap(bits | leaf_type | desc::pack_pa(out), Ordering::AcqRel);
            self.sync_entries(table, first + k, 1);
            if self.kind(target, old) == Kind::Table {
                self.retire_subtree(old, target + 1, self.external(iova + k as u64 * size), size);
            }
        }
        Ok(())
    }

    /// Builds the path below the empty entry `idx` of `parent` (at `level`) privately: tables for levels
    /// `level + 1 ..= target`, linked, with the `n` leaves written into the last one; then
    /// publishes it with one compare-exchange. Returns `false` when another thread installed a
    /// table there first: the pages are then zeroed and given back, and the caller descends
    /// again.
    #[allow(clippy::too_many_arguments)]
    fn publish_chain<S: PageSource>(
        &self,
        parent: TableRef<'_>,
        idx: usize,
        iova: u64,
        pa: u64,
        level: u32,
        target: u32,
        n: u64,
        bits: u64,
        src: &mut S,
        epoch: u64,
    ) -> Result<bool, MapError> {
        let cfg = &self.cfg;
        let size = cfg.block_size(target);
        let leaf_type = desc::leaf_type(cfg.format(), target);
        let need = (target - level) as usize;
        let (held, tables) = self.obtain_chain(need, src)?;
        let pages = &held[..need];
        let chain = &tables[..need];
        for i in 0..need - 1 {
            let idx = cfg.index(iova, level + 1 + i as u32);
            chain[i].entries[idx].store(self.private_link(pages[i + 1]), Ordering::Relaxed);
        }
        let first = cfg.index(iova, target);
        let leaves = &chain[need - 1].entries[first..first + n as usize];
        write_leaves(leaves, bits | leaf_type, pa, size, Ordering::Relaxed);
        for &t in chain {
            self.sync_table(t);
        }
        let new = desc::encode_table(cfg, pages[0]);
        if parent.entries[idx]
            .compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.sync_installed(parent, idx, new);
            self.counters.add_live(need as u64);
            self.cursor_set(target, iova, pages[need - 1], epoch);
            return Ok(true);
        }
        for (i, t) in chain.iter().enumerate().take(need - 1) {
            t.entries[cfg.index(iova, level + 1 + i as u32)].store(0, Ordering::Relaxed);
        }
        for e in leaves {
            e.store(0, Ordering::Relaxed);
        }
        src.give_back(pages);
        self.counters
            .install_races_lost
            .fetch_add(1, Ordering::Relaxed);
        Ok(false)
    }

    /// Obtains the `need` (1 to 3) pages of a new chain of tables from `src` and resolves
    /// them, in arrays (no vectors for the common single page). A page the table cannot use
    /// ([`check_page`]) sends them all back to `src`.
    pub(crate) fn obtain_chain<S: PageSource>(
        &self,
        need: usize,
        src: &mut S,
    ) -> Result<([PhysAddr; 4], [TableRef<'_>; 4]), MapError> {
        let mut held = [PhysAddr::ZERO; 4];
        if need == 1 {
            held[0] = src.obtain_one()?;
        } else {
            let mut got = Vec::with_capacity(need);
            src.obtain(need, &mut got)?;
            held[..need].copy_from_slice(&got);
        }
        let pages = &held[..need];
        let resolve = |p: PhysAddr| {
            check_page(&self.cfg, &self.alloc, p, self.fast.granule_size)
                .map_err(|source| MapError::Alloc { source })
        };
        let mut tables = match resolve(pages[0]) {
            Ok(t) => [t; 4],
            Err(e) => {
                src.give_back(pages);
                return Err(e);
            }
        };
        for (slot, &p) in tables.iter_mut().zip(pages).skip(1) {
            match resolve(p) {
                Ok(t) => *slot = t,
                Err(e) => {
                    src.give_back(pages);
                    return Err(e);
                }
            }
        }
        Ok((held, tables))
    }

    /// Frees the subtree of an unlinked table descriptor `entry` (its table sits at `level`)
    /// after the walk flush for the `size` bytes at `iova` it covered.
    fn retire_subtree(&self, entry: u64, level: u32, iova: Iova, size: u64) {
        self.flush.flush_walk(iova, size, self.granule());
        let mut pages = Vec::new();
        self.collect_tables(entry, level, &mut pages);
        self.free_tables(&pages);
    }

    /// Post-order list of the tables below (and including) the unlinked table `entry` points
    /// at, each marked claimed ([`DEAD`](crate::refcount::DEAD)) on the way, so that a later
    /// pin there fails. On a counting engine a table some other operation claimed first is
    /// left to it with everything below it (a claimer owns the whole chain it claims): each
    /// table is listed exactly once.
    pub(crate) fn collect_tables(&self, entry: u64, level: u32, out: &mut Vec<PhysAddr>) {
        let pa = self.unpack(entry);
        if let Some(t) = self.alloc.table(pa) {
            // SeqCst: ordered with the pins and claims other operations make on the same
            // count (`refcount::pin`, `refcount::try_claim`), which must see it.
            if t.meta
                .live_entries
                .swap(crate::refcount::DEAD, Ordering::SeqCst)
                == crate::refcount::DEAD
            {
                return;
            }
            if level < 3 {
                for e in t.entries {
                    let v = e.load(Ordering::Acquire);
                    if self.kind(level, v) == Kind::Table {
                        self.collect_tables(v, level + 1, out);
                    }
                }
            }
        }
        out.push(pa);
    }

    /// Returns granule-sized table pages to the allocator in one bulk call.
    pub fn free_tables(&self, pages: &[PhysAddr]) {
        if pages.is_empty() {
            return;
        }
        self.unlinks.fetch_add(1, Ordering::AcqRel);
        self.counters
            .free_bulk_calls
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .pages_freed
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        self.counters
            .live_tables
            .fetch_sub(pages.len() as u64, Ordering::Relaxed);
        self.alloc.free_bulk(pages, self.granule());
    }

    /// Unmaps a validated run, all or nothing, and returns the bytes unmapped.
    ///
    /// # Errors
    ///
    /// [`UnmapError::NotMapped`] if any entry of the run is empty, [`UnmapError::PartialBlock`]
    /// if a larger leaf covers it, [`UnmapError::BrokenTable`] on a corrupted tree.
    #[inline]
    pub fn unmap_run(&self, r: Run, gather: &mut Gather) -> Result<u64, UnmapError> {
        // A run inside one leaf table: one descent, check, then clear.
        if !self.rc.counting()
            && (r.count == 1 || self.entries_in_table(r.level, r.iova, r.count) == r.count)
        {
            let table = match self.cursor_get(r.level, r.iova) {
                Some(t) => t,
                None => self.descend_for_unmap(r.iova, &r)?,
            };
            if r.count == 1 {
                return self.unmap_one(table, r, gather);
            }
            self.check_mapped(table, r.iova, r.count, r)?;
            self.clear_entries(table, r.iova, r.count, r, gather);
            return Ok(r.count * r.size.get());
        }
        if self.rc.counting() && r.count == 1 {
            if let Some(done) = self.unmap_one_counted(r, gather) {
                return done;
            }
        }
        self.unmap_run_general(r, gather)
    }

    /// A one-entry run in its leaf table `table`: [`check_mapped`](Self::check_mapped) and
    /// [`clear_entries`](Self::clear_entries) for a single leaf, without their loops.
    #[inline]
    fn unmap_one(
        &self,
        table: TableRef<'_>,
        r: Run,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        let idx = self.index(r.iova, r.level);
        let e = table.entries.get(idx).ok_or(UnmapError::BrokenTable {
            iova: self.external(r.iova),
            pa: self.root,
        })?;
        let old = e.load(Ordering::Acquire);
        match self.kind(r.level, old) {
            Kind::Leaf => {
                e.store(0, Ordering::Release);
                self.sync_entries(table, idx, 1);
                self.flush
                    .add_page(gather, self.external(r.iova), r.size.get());
            }
            Kind::Table => self.clear_entries(table, r.iova, 1, r, gather),
            Kind::Invalid => {
                return Err(UnmapError::NotMapped {
                    iova: self.external(r.iova),
                });
            }
        }
        Ok(r.size.get())
    }

    /// [`unmap_run`](Self::unmap_run) of a run over several leaf tables, or on a refcounted
    /// engine.
    fn unmap_run_general(&self, r: Run, gather: &mut Gather) -> Result<u64, UnmapError> {
        if self.rc.counting() {
            return self.unmap_run_counted(r, gather);
        }
        // Check every leaf table of the run before clearing any.
        let size = r.size.get();
        let mut iova = r.iova;
        let mut left = r.count;
        while left > 0 {
            let n = self.entries_in_table(r.level, iova, left);
            let table = self.descend_for_unmap(iova, &r)?;
            self.check_mapped(table, iova, n, r)?;
            iova += n * size;
            left -= n;
        }
        let mut iova = r.iova;
        let mut left = r.count;
        while left > 0 {
            let n = self.entries_in_table(r.level, iova, left);
            let table = self.descend_for_unmap(iova, &r)?;
            self.clear_entries(table, iova, n, r, gather);
            iova += n * size;
            left -= n;
        }
        Ok(r.count * size)
    }

    /// The check pass of an unmap over the `n` entries from `iova` of the leaf table `table`:
    /// fails with [`UnmapError::NotMapped`] at the first empty entry, or
    /// [`UnmapError::ReservedTable`] at the first table a reservation holds (only a counting
    /// engine has any), whichever comes first.
    #[inline]
    pub(crate) fn check_mapped(
        &self,
        table: TableRef<'_>,
        iova: u64,
        n: u64,
        r: Run,
    ) -> Result<(), UnmapError> {
        let first = self.index(iova, r.level);
        let slots =
            table
                .entries
                .get(first..first + n as usize)
                .ok_or(UnmapError::BrokenTable {
                    iova: self.external(iova),
                    pa: table.pa,
                })?;
        if n > 1 && self.all_leaves(slots, r.level) {
            return Ok(());
        }
        for (k, e) in slots.iter().enumerate() {
            let v = e.load(Ordering::Acquire);
            let at = || self.external(iova + k as u64 * r.size.get());
            match self.kind(r.level, v) {
                Kind::Invalid => return Err(UnmapError::NotMapped { iova: at() }),
                Kind::Table
                    if self
                        .resolve(v)
                        .is_some_and(|t| t.meta.reservations.load(Ordering::Relaxed) != 0) =>
                {
                    return Err(UnmapError::ReservedTable { iova: at() });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Clears `n` checked entries from `iova`: leaves go to the gather, tables are retired
    /// after their walk flush. The caller owns the range, so a load and a plain store suffice
    /// (no read-modify-write per entry).
    #[inline]
    fn clear_entries(&self, table: TableRef<'_>, iova: u64, n: u64, r: Run, gather: &mut Gather) {
        let size = r.size.get();
        let first = self.index(iova, r.level);
        let slots = &table.entries[first..first + n as usize];
        if n > 1 && self.clear_leaves(table, first, iova, n, size, r.level, gather) {
            return;
        }
        for (k, e) in slots.iter().enumerate() {
            let old = e.load(Ordering::Acquire);
            e.store(0, Ordering::Release);
            let at = self.external(iova + k as u64 * size);
            match self.kind(r.level, old) {
                Kind::Leaf => self.flush.add_page(gather, at, size),
                Kind::Table => {
                    // The walker must stop seeing the table before its flush and free.
                    self.sync_entries(table, first + k, 1);
                    self.retire_subtree(old, r.level + 1, at, size);
                }
                Kind::Invalid => {}
            }
        }
        self.sync_entries(table, first, n as usize);
    }

    /// Clears the `n` entries from `first` of `table` if they are all leaves (the common bulk
    /// unmap) in one pass, then gathers them; `false` (nothing done) otherwise. Out of line:
    /// single-page unmaps never come here.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn clear_leaves(
        &self,
        table: TableRef<'_>,
        first: usize,
        iova: u64,
        n: u64,
        size: u64,
        level: u32,
        gather: &mut Gather,
    ) -> bool {
        let slots = &table.entries[first..first + n as usize];
        if !self.all_leaves(slots, level) {
            return false;
        }
        clear_all(slots, Ordering::Release);
        self.sync_entries(table, first, n as usize);
        let mut at = self.external(iova);
        for _ in 0..n {
            self.flush.add_page(gather, at, size);
            at = Iova::new(at.get().wrapping_add(size));
        }
        true
    }

    /// Whether every entry of `slots` (at `level`) is a leaf: their type bits, folded with AND
    /// and with OR, both equal the level's leaf type. Out of line: for runs of several
    /// entries only.
    #[inline(never)]
    pub(crate) fn all_leaves(&self, slots: &[AtomicU64], level: u32) -> bool {
        let want = self.leaf_type(level);
        let (mut and, mut or) = (u64::MAX, 0);
        for e in slots {
            let v = e.load(Ordering::Acquire);
            and &= v;
            or |= v;
        }
        and & desc::TYPE_MASK == want && or & desc::TYPE_MASK == want
    }

    /// Descends to the leaf table of `iova` for an unmap at `r.level` and caches it in the
    /// cursor.
    #[inline(never)]
    fn descend_for_unmap(&self, iova: u64, r: &Run) -> Result<TableRef<'_>, UnmapError> {
        let epoch = self.unlinks.load(Ordering::Acquire);
        let mut table = self.root_table().ok_or(UnmapError::BrokenTable {
            iova: self.external(iova),
            pa: self.root,
        })?;
        let mut table_pa = self.root;
        let mut level = self.cfg.start_level();
        while level < r.level {
            let e = table
                .entries
                .get(self.index(iova, level))
                .map_or(0, |e| e.load(Ordering::Acquire));
            match self.kind(level, e) {
                Kind::Invalid => {
                    return Err(UnmapError::NotMapped {
                        iova: self.external(iova),
                    });
                }
                Kind::Leaf => {
                    return Err(UnmapError::PartialBlock {
                        iova: self.external(iova),
                        size: r.size,
                        leaf: PageSize::new(self.cfg.block_size(level)).unwrap_or(r.size),
                    });
                }
                Kind::Table => {
                    table_pa = self.unpack(e);
                    table = self.alloc.table(table_pa).ok_or(UnmapError::BrokenTable {
                        iova: self.external(iova),
                        pa: table_pa,
                    })?;
                    level += 1;
                }
            }
        }
        self.cursor_set(r.level, iova, table_pa, epoch);
        Ok(table)
    }

    /// Translates `iova` in software (`iova_to_phys`). `None` outside the input range or when
    /// no leaf maps it.
    #[must_use]
    pub fn lookup(&self, iova: Iova) -> Option<Translation> {
        if !self.cfg.iova_in_range(iova) {
            return None;
        }
        let _guard = self.enter();
        self.lookup_in_range(iova)
    }

    /// The body of [`lookup`](Self::lookup) for an `iova` inside the input range. The caller
    /// keeps the tables alive: a guard from [`enter`](Self::enter), or exclusive access.
    #[inline]
    fn lookup_in_range(&self, iova: Iova) -> Option<Translation> {
        let local = iova.get() & self.local_mask;
        // The last operation's leaf table usually holds the next lookup's page; failing that,
        // the table above it (cached by earlier lookups) saves the top of the descent.
        let epoch = self.unlinks.load(Ordering::Acquire);
        let cached = match self.cursor_get(3, local) {
            Some(t) => Some((t, 3)),
            None => self.cursor_get(2, local).map(|t| (t, 2)),
        };
        if let Some((table, level)) = cached {
            if let Some(found) = self.lookup_below(table, level, local, epoch) {
                return Some(found);
            }
            // A cursor names a table that was linked when it was checked; on a counting
            // engine it may have been claimed since (emptied by other callers' unmaps), and
            // the page then lives in the table that replaced it. A leaf found is an answer,
            // a miss is not: only a walk from the root may say "not mapped".
        }
        self.lookup_below(self.root_table()?, self.cfg.start_level(), local, epoch)
    }

    /// The descent of [`lookup_in_range`](Self::lookup_in_range) from `table` at `level`.
    #[inline]
    fn lookup_below<'a>(
        &'a self,
        mut table: TableRef<'a>,
        mut level: u32,
        local: u64,
        epoch: u64,
    ) -> Option<Translation> {
        loop {
            let e = table
                .entries
                .get(self.index(local, level))?
                .load(Ordering::Acquire);
            match self.kind(level, e) {
                Kind::Invalid => return None,
                Kind::Table => {
                    let pa = self.unpack(e);
                    table = self.alloc.table(pa)?;
                    level += 1;
                    if level >= 2 && self.cursor_worth_caching(level, local) {
                        self.cursor_set(level, local, pa, epoch);
                    }
                }
                Kind::Leaf => {
                    let size = PageSize::from_shift(self.fast.shift[level as usize & 3])?;
                    let base = self.unpack(e);
                    return Some(Translation {
                        pa: PhysAddr::new(base.get() | (local & size.mask())),
                        size,
                        level,
                        prot: self.fast.decode_prot(e),
                        descriptor: e,
                    });
                }
            }
        }
    }

    /// Visits every table and leaf in ascending IOVA order.
    pub fn walk(&self, visit: &mut dyn FnMut(WalkItem)) {
        let _guard = self.enter();
        if let Some(root) = self.root_table() {
            self.walk_table(root, self.root, self.cfg.start_level(), 0, visit);
        }
    }

    fn walk_table(
        &self,
        table: TableRef<'_>,
        pa: PhysAddr,
        level: u32,
        base: u64,
        visit: &mut dyn FnMut(WalkItem),
    ) {
        let entries = self.cfg.entries_at(level).min(table.entries.len());
        let live = table.entries[..entries]
            .iter()
            .filter(|e| e.load(Ordering::Acquire) != 0)
            .count();
        visit(WalkItem::Table {
            iova: self.external(base),
            level,
            pa,
            live,
        });
        let shift = self.cfg.level_shift(level);
        for (i, e) in table.entries[..entries].iter().enumerate() {
            let v = e.load(Ordering::Acquire);
            let iova = base + ((i as u64) << shift);
            match self.kind(level, v) {
                Kind::Invalid => {}
                Kind::Leaf => {
                    if let Some(size) = PageSize::new(self.cfg.block_size(level)) {
                        visit(WalkItem::Leaf {
                            iova: self.external(iova),
                            level,
                            size,
                            pa: self.unpack(v),
                            prot: desc::decode_prot(&self.cfg, v),
                            descriptor: v,
                        });
                    }
                }
                Kind::Table => {
                    let sub_pa = self.unpack(v);
                    if let Some(sub) = self.alloc.table(sub_pa) {
                        self.walk_table(sub, sub_pa, level + 1, iova, visit);
                    }
                }
            }
        }
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
pub(crate) fn all_zero(slots: &[AtomicU64], order: Ordering) -> bool {
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
pub(crate) fn clear_all(slots: &[AtomicU64], order: Ordering) {
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
pub(crate) fn write_leaves(slots: &[AtomicU64], attrs: u64, pa: u64, size: u64, order: Ordering) {
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

impl<A: TableAlloc, F: FlushOps> Drop for Engine<A, F> {
    fn drop(&mut self) {
        self.flush.flush_all();
        let mut pages = Vec::new();
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
