//! The tables under test behind one narrow interface.

use crate::{SZ_2M, SZ_4K};
use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{El1Attributes, PhysicalAddress};
use aarch64_paging::idmap::IdTranslation;
use aarch64_paging::paging::{Constraints, El1And0, MemoryRegion, VaRange};
use iopt_alloc_ops::AllocOpsTable;
use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, IovaRange, PageSize, PageSizes,
    PhysAddr, Prot, Reservation, Reserve,
};
use iopt_sim::SimMemory;
use std::sync::Mutex;

/// The configuration of every iopt table here: `ARM_64_LPAE_S1`, 4K granule (4K|2M|1G), 48-bit
/// input and output, as in the reference figures.
///
/// # Panics
///
/// Never: the configuration is valid.
#[must_use]
pub fn cfg() -> Config {
    Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        48,
    ))
    .expect("valid configuration")
}

/// The permissions every map uses: read, write, cacheable (the same descriptor bits as the
/// aarch64-paging flags [`Peer`] uses).
#[must_use]
pub fn prot() -> Prot {
    Prot::READ | Prot::WRITE | Prot::CACHE
}

fn page_size(size: u64) -> PageSize {
    match size {
        SZ_4K => PageSize::SZ_4K,
        SZ_2M => PageSize::SZ_2M,
        _ => PageSize::SZ_1G,
    }
}

/// One page table under test. Every call panics on an error: a bench that fails must not
/// silently measure a no-op.
pub trait Backend: Sized {
    /// The criterion function name.
    const NAME: &'static str;

    /// An empty table.
    fn fresh() -> Self;

    /// Maps `count` leaves of `size` (4K or 2M) from `iova` to `pa` in one call.
    fn map(&mut self, iova: u64, pa: u64, size: u64, count: u64);

    /// Unmaps `count` leaves of `size` from `iova` in one call.
    fn unmap(&mut self, iova: u64, size: u64, count: u64);

    /// Clears `count` 4K leaves from `iova` and keeps every table page, so a later map finds
    /// its tables present.
    fn clear_keep_tables(&mut self, iova: u64, count: u64);

    /// Translates `iova` (`&mut`: a backend may use its exclusive entry point).
    fn lookup(&mut self, iova: u64) -> Option<u64>;

    /// Table pages in use (the root included), where the backend can tell.
    fn table_pages(&self) -> Option<u64>;
}

/// Reservations ahead of maps: the contract both iopt designs fulfil.
pub trait Reserving: Backend {
    /// A live reservation.
    type Res;

    /// Whether [`release`](Self::release) also unmaps what the reservation's range holds
    /// (Design 2: a reservation lives as long as the VA allocation, and releasing it is the
    /// unbind). Design 1 releases when the bind job completes and unbinds with `unmap`.
    const RELEASE_UNMAPS: bool;

    /// Reserves for maps of leaves up to `leaf` bytes in `[iova, iova + len)`.
    fn reserve(&mut self, iova: u64, len: u64, leaf: u64) -> Self::Res;

    /// Maps inside a reservation.
    fn map_reserved(&mut self, res: &Self::Res, iova: u64, pa: u64, size: u64, count: u64);

    /// Releases a reservation.
    fn release(&mut self, res: Self::Res);

    /// How many table pages a map of 4K leaves over `[iova, iova + len)` would allocate now.
    fn pages_needed(&self, iova: u64, len: u64) -> usize;
}

/// A table several threads map into at once (disjoint ranges).
pub trait Shared: Sync + Sized {
    /// The criterion function name.
    const NAME: &'static str;

    /// An empty table.
    fn fresh() -> Self;

    /// Maps one 4K page.
    fn map_4k(&self, iova: u64, pa: u64);

    /// Maps `count` 4K pages and clears them again, leaving the tables present.
    fn prefill(&self, iova: u64, count: u64);
}

fn iopt_map<T: IoPageTable>(t: &T, iova: u64, pa: u64, size: u64, count: u64) {
    t.map(
        Iova::new(iova),
        PhysAddr::new(pa),
        page_size(size),
        count,
        prot(),
    )
    .expect("map");
}

fn iopt_unmap<T: IoPageTable>(t: &T, iova: u64, size: u64, count: u64) {
    t.unmap(Iova::new(iova), page_size(size), count, &mut Gather::new())
        .expect("unmap");
}

fn iopt_lookup<T: IoPageTable>(t: &T, iova: u64) -> Option<u64> {
    t.iova_to_phys(Iova::new(iova)).map(|t| t.pa.get())
}

fn range(iova: u64, len: u64) -> IovaRange {
    IovaRange::new(Iova::new(iova), len, SZ_4K).expect("range")
}

/// Design 1: [`AllocOpsTable`] on [`SimMemory`]. Outside reservations it maps exactly as
/// `iopt_lpae::LpaeTable` does (same engine, same on-demand source), so it stands for both.
#[derive(Debug)]
pub struct AllocOps(pub AllocOpsTable<SimMemory>);

impl Backend for AllocOps {
    const NAME: &'static str = "alloc_ops";

    fn fresh() -> Self {
        Self(AllocOpsTable::new(cfg(), SimMemory::new()).expect("root"))
    }

    #[inline]
    fn map(&mut self, iova: u64, pa: u64, size: u64, count: u64) {
        iopt_map(&self.0, iova, pa, size, count);
    }

    #[inline]
    fn unmap(&mut self, iova: u64, size: u64, count: u64) {
        iopt_unmap(&self.0, iova, size, count);
    }

    fn clear_keep_tables(&mut self, iova: u64, count: u64) {
        // Linux policy: an unmap of 4K leaves never frees their table.
        iopt_unmap(&self.0, iova, SZ_4K, count);
    }

    #[inline]
    fn lookup(&mut self, iova: u64) -> Option<u64> {
        iopt_lookup(&self.0, iova)
    }

    fn table_pages(&self) -> Option<u64> {
        Some(self.0.stats().live_tables)
    }
}

impl Reserving for AllocOps {
    type Res = Reservation;
    const RELEASE_UNMAPS: bool = false;

    fn reserve(&mut self, iova: u64, len: u64, leaf: u64) -> Reservation {
        // Design 1 counts for the smallest leaf the maps will use.
        let _ = leaf;
        self.0
            .reserve(range(iova, len), PageSize::SZ_4K)
            .expect("reserve")
    }

    #[inline]
    fn map_reserved(&mut self, res: &Reservation, iova: u64, pa: u64, size: u64, count: u64) {
        self.0
            .map_reserved(
                res,
                Iova::new(iova),
                PhysAddr::new(pa),
                page_size(size),
                count,
                prot(),
            )
            .expect("map_reserved");
    }

    fn release(&mut self, res: Reservation) {
        self.0.release(res, &mut Gather::new()).expect("release");
    }

    fn pages_needed(&self, iova: u64, len: u64) -> usize {
        self.0
            .pages_needed(range(iova, len), PageSize::SZ_4K)
            .expect("pages_needed")
    }
}

impl Shared for AllocOps {
    const NAME: &'static str = "alloc_ops";

    fn fresh() -> Self {
        <Self as Backend>::fresh()
    }

    #[inline]
    fn map_4k(&self, iova: u64, pa: u64) {
        iopt_map(&self.0, iova, pa, SZ_4K, 1);
    }

    fn prefill(&self, iova: u64, count: u64) {
        iopt_map(&self.0, iova, crate::pa_of(iova), SZ_4K, count);
        iopt_unmap(&self.0, iova, SZ_4K, count);
    }
}

/// The accountings Design 2 runs on in the benches, with their lane names.
#[cfg(feature = "prealloc")]
pub trait Accounted: iopt_lpae::account::Reserving {
    /// The lane's name.
    const LANE: &'static str;
}

#[cfg(feature = "prealloc")]
impl Accounted for iopt_lpae::account::LiveCounts {
    const LANE: &'static str = "prealloc";
}

#[cfg(feature = "prealloc")]
impl Accounted for iopt_lpae::account::ReservationCounts {
    const LANE: &'static str = "prealloc_seed";
}

/// Design 2: [`PreallocTable`](iopt_prealloc::PreallocTable) on [`SimMemory`], counting with
/// `K` (live entries and reservations, or, `prealloc_seed`, reservations only as the seed
/// message has it). Plain maps allocate on demand; with `LiveCounts` unmaps free a table that
/// empties outside reservations, so [`Backend::clear_keep_tables`] keeps the tables by
/// holding a reservation over the range.
#[cfg(feature = "prealloc")]
#[derive(Debug)]
pub struct Prealloc<K: Accounted = iopt_lpae::account::LiveCounts> {
    /// The table.
    pub table: iopt_prealloc::PreallocTable<SimMemory, iopt_api::NoFlush, K>,
    /// Reservations [`Backend::clear_keep_tables`] holds to keep tables present.
    pub held: Vec<Reservation>,
}

#[cfg(feature = "prealloc")]
impl<K: Accounted> Backend for Prealloc<K> {
    const NAME: &'static str = K::LANE;

    fn fresh() -> Self {
        Self {
            table: iopt_prealloc::PreallocTable::with_accounting(
                cfg(),
                SimMemory::new(),
                iopt_api::NoFlush,
            )
            .expect("root"),
            held: Vec::new(),
        }
    }

    #[inline]
    fn map(&mut self, iova: u64, pa: u64, size: u64, count: u64) {
        iopt_map(&self.table, iova, pa, size, count);
    }

    #[inline]
    fn unmap(&mut self, iova: u64, size: u64, count: u64) {
        iopt_unmap(&self.table, iova, size, count);
    }

    fn clear_keep_tables(&mut self, iova: u64, count: u64) {
        let r = self
            .table
            .reserve(range(iova, count * SZ_4K), PageSize::SZ_4K)
            .expect("reserve");
        self.held.push(r);
        iopt_unmap(&self.table, iova, SZ_4K, count);
    }

    #[inline]
    fn lookup(&mut self, iova: u64) -> Option<u64> {
        iopt_lookup(&self.table, iova)
    }

    fn table_pages(&self) -> Option<u64> {
        Some(self.table.stats().live_tables)
    }
}

#[cfg(feature = "prealloc")]
impl<K: Accounted> Reserving for Prealloc<K> {
    type Res = Reservation;
    const RELEASE_UNMAPS: bool = true;

    fn reserve(&mut self, iova: u64, len: u64, leaf: u64) -> Reservation {
        self.table
            .reserve(range(iova, len), page_size(leaf))
            .expect("reserve")
    }

    #[inline]
    fn map_reserved(&mut self, res: &Reservation, iova: u64, pa: u64, size: u64, count: u64) {
        self.table
            .map_reserved(
                res,
                Iova::new(iova),
                PhysAddr::new(pa),
                page_size(size),
                count,
                prot(),
            )
            .expect("map_reserved");
    }

    fn release(&mut self, res: Reservation) {
        self.table
            .release(res, &mut Gather::new())
            .expect("release");
    }

    fn pages_needed(&self, iova: u64, len: u64) -> usize {
        self.table
            .pages_needed(range(iova, len), PageSize::SZ_4K)
            .expect("pages_needed")
    }
}

/// Design 2 driven through its exclusive entry points ([`IoPageTable::map_mut`] and
/// siblings), as a driver that serialises its page-table calls under its own lock (or owns
/// the table) would: the same table and results as [`Prealloc`], without the protocol that
/// lets concurrent callers share it. aarch64-paging's `map_range` takes `&mut` too.
#[cfg(feature = "prealloc")]
#[derive(Debug)]
pub struct PreallocMut(pub Prealloc);

#[cfg(feature = "prealloc")]
impl Backend for PreallocMut {
    const NAME: &'static str = "prealloc_mut";

    fn fresh() -> Self {
        Self(Prealloc::fresh())
    }

    #[inline]
    fn map(&mut self, iova: u64, pa: u64, size: u64, count: u64) {
        self.0
            .table
            .map_mut(
                Iova::new(iova),
                PhysAddr::new(pa),
                page_size(size),
                count,
                prot(),
            )
            .expect("map_mut");
    }

    #[inline]
    fn unmap(&mut self, iova: u64, size: u64, count: u64) {
        self.0
            .table
            .unmap_mut(Iova::new(iova), page_size(size), count, &mut Gather::new())
            .expect("unmap_mut");
    }

    fn clear_keep_tables(&mut self, iova: u64, count: u64) {
        self.0.clear_keep_tables(iova, count);
    }

    #[inline]
    fn lookup(&mut self, iova: u64) -> Option<u64> {
        self.0
            .table
            .iova_to_phys_mut(Iova::new(iova))
            .map(|t| t.pa.get())
    }

    fn table_pages(&self) -> Option<u64> {
        self.0.table_pages()
    }
}

/// [`Prealloc`] shared between threads.
#[cfg(feature = "prealloc")]
#[derive(Debug)]
pub struct SharedPrealloc(
    pub iopt_prealloc::PreallocTable<SimMemory>,
    pub Mutex<Vec<Reservation>>,
);

#[cfg(feature = "prealloc")]
impl Shared for SharedPrealloc {
    const NAME: &'static str = "prealloc";

    fn fresh() -> Self {
        let p = <Prealloc as Backend>::fresh();
        Self(p.table, Mutex::new(Vec::new()))
    }

    #[inline]
    fn map_4k(&self, iova: u64, pa: u64) {
        iopt_map(&self.0, iova, pa, SZ_4K, 1);
    }

    fn prefill(&self, iova: u64, count: u64) {
        let r = self
            .0
            .reserve(range(iova, count * SZ_4K), PageSize::SZ_4K)
            .expect("reserve");
        self.1.lock().expect("lock").push(r);
    }
}

type PeerMapping = Mapping<IdTranslation<El1Attributes>, El1And0>;

/// aarch64-paging 0.12.3: a [`Mapping`] over an identity translation (tables from the global
/// allocator), 4 levels from level 0 (48-bit VA), never activated, so `map_range` runs no
/// break-before-make check and no TLB maintenance — as in the reference figures. Unmap
/// is `map_range` without `VALID`; lookup is `walk_range` over one byte.
#[derive(Debug)]
pub struct Peer(pub PeerMapping);

impl Peer {
    /// The flags [`prot`] encodes to: valid, MAIR index 1, inner shareable, accessed,
    /// non-global, EL0-accessible, read-write.
    #[must_use]
    pub fn flags() -> El1Attributes {
        El1Attributes::VALID
            | El1Attributes::ATTRIBUTE_INDEX_1
            | El1Attributes::INNER_SHAREABLE
            | El1Attributes::ACCESSED
            | El1Attributes::NON_GLOBAL
            | El1Attributes::USER
    }

    /// Maps `[iova, iova + len)` to `pa` with `constraints`.
    ///
    /// # Panics
    ///
    /// If aarch64-paging refuses the range.
    #[inline]
    pub fn map_region(&mut self, iova: u64, pa: u64, len: u64, constraints: Constraints) {
        self.0
            .map_range(
                &MemoryRegion::new(iova as usize, (iova + len) as usize),
                PhysicalAddress(pa as usize),
                Self::flags(),
                constraints,
            )
            .expect("map_range");
    }

    /// Unmaps `[iova, iova + len)` in one `map_range` without `VALID`. A whole 2 MiB (or 1 GiB)
    /// chunk over a subtable frees that subtable.
    ///
    /// # Panics
    ///
    /// If aarch64-paging refuses the range.
    #[inline]
    pub fn unmap_region(&mut self, iova: u64, len: u64) {
        self.0
            .map_range(
                &MemoryRegion::new(iova as usize, (iova + len) as usize),
                PhysicalAddress(crate::pa_of(iova) as usize),
                El1Attributes::empty(),
                Constraints::empty(),
            )
            .expect("unmap");
    }
}

impl Backend for Peer {
    const NAME: &'static str = "aarch64-paging";

    fn fresh() -> Self {
        Self(Mapping::with_asid_and_va_range(
            IdTranslation::new(),
            1,
            0,
            El1And0,
            VaRange::Lower,
        ))
    }

    #[inline]
    fn map(&mut self, iova: u64, pa: u64, size: u64, count: u64) {
        let constraints = if size == SZ_4K {
            Constraints::NO_BLOCK_MAPPINGS
        } else {
            Constraints::empty()
        };
        self.map_region(iova, pa, size * count, constraints);
    }

    #[inline]
    fn unmap(&mut self, iova: u64, size: u64, count: u64) {
        self.unmap_region(iova, size * count);
    }

    fn clear_keep_tables(&mut self, iova: u64, count: u64) {
        // Half a leaf table per call: no chunk covers a whole subtable, so none is freed.
        let half = SZ_2M / 2;
        let end = iova + count * SZ_4K;
        let mut at = iova;
        while at < end {
            let next = ((at / half) + 1) * half;
            let next = next.min(end);
            self.unmap_region(at, next - at);
            at = next;
        }
    }

    #[inline]
    fn lookup(&mut self, iova: u64) -> Option<u64> {
        let va = iova as usize;
        let mut out = None;
        self.0
            .walk_range(&MemoryRegion::new(va, va + 1), &mut |_, d, level| {
                if d.is_valid() {
                    let granule = SZ_4K << (9 * (3 - level as u64));
                    let off = iova & (granule - 1);
                    out = Some(d.output_address().0 as u64 + off);
                }
                Ok(())
            })
            .ok()?;
        out
    }

    fn table_pages(&self) -> Option<u64> {
        None
    }
}

/// [`Peer`] behind a mutex: aarch64-paging maps through `&mut`, so threads sharing one address
/// space must lock around each call.
#[derive(Debug)]
pub struct LockedPeer(pub Mutex<Peer>);

impl Shared for LockedPeer {
    const NAME: &'static str = "aarch64-paging+mutex";

    fn fresh() -> Self {
        Self(Mutex::new(<Peer as Backend>::fresh()))
    }

    #[inline]
    fn map_4k(&self, iova: u64, pa: u64) {
        self.0
            .lock()
            .expect("lock")
            .map_region(iova, pa, SZ_4K, Constraints::NO_BLOCK_MAPPINGS);
    }

    fn prefill(&self, iova: u64, count: u64) {
        let mut p = self.0.lock().expect("lock");
        p.map(iova, crate::pa_of(iova), SZ_4K, count);
        p.clear_keep_tables(iova, count);
    }
}
