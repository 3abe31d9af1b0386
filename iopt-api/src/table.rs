//! The traits every backend implements, and the values they return.

use crate::{
    Config, DirtyError, Gather, Iova, IovaRange, MapError, PageSize, PhysAddr, Prot, ReleaseError,
    ReserveError, UnmapError,
};
use core::fmt;

/// Stage-1 translation control fields (`cfg->arm_lpae_s1_cfg.tcr`): field values, not a
/// packed register, as Linux hands them to drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tcr {
    /// Intermediate physical size: 32→0, 36→1, 40→2, 42→3, 44→4, 48→5, 52→6.
    pub ips: u8,
    /// Granule (TG0 encoding 4K=0, 64K=1, 16K=2; TG1 with TTBR1: 16K=1, 4K=2, 64K=3).
    pub tg: u8,
    /// Shareability of walks (3 inner, 2 outer).
    pub sh: u8,
    /// Outer cacheability of walks.
    pub orgn: u8,
    /// Inner cacheability of walks.
    pub irgn: u8,
    /// `64 - ias`.
    pub tsz: u8,
}

/// Stage-2 translation control fields (`cfg->arm_lpae_s2_cfg.vtcr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Vtcr {
    /// Physical size, encoded like IPS.
    pub ps: u8,
    /// Granule (TG0 encoding).
    pub tg: u8,
    /// Shareability of walks.
    pub sh: u8,
    /// Outer cacheability of walks.
    pub orgn: u8,
    /// Inner cacheability of walks.
    pub irgn: u8,
    /// Starting level (SL0).
    pub sl: u8,
    /// `64 - ias`.
    pub tsz: u8,
}

/// The register values a driver programs to point hardware at the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Registers {
    /// Stage 1 (`ARM_64_LPAE_S1`, `ARM_32_LPAE_S1`).
    Stage1 {
        /// Root table address.
        ttbr: PhysAddr,
        /// Translation control fields.
        tcr: Tcr,
        /// Memory attribute indirection (0xF404FF44).
        mair: u64,
    },
    /// Stage 2 (`ARM_64_LPAE_S2`, `ARM_32_LPAE_S2`).
    Stage2 {
        /// Root table address (the first of the concatenated tables).
        vttbr: PhysAddr,
        /// Translation control fields.
        vtcr: Vtcr,
    },
    /// Mali (`ARM_MALI_LPAE`).
    Mali {
        /// AS_TRANSTAB: root address | ADRMODE_TABLE | READ_INNER (| SHARE_OUTER if coherent).
        transtab: u64,
        /// AS_MEMATTR (0x888D88).
        memattr: u64,
    },
}

/// What a lookup finds at an IOVA: the leaf and the translated address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The output address for the looked-up IOVA (leaf address plus the offset in the leaf).
    pub pa: PhysAddr,
    /// The size of the leaf that maps it.
    pub size: PageSize,
    /// The level the leaf sits at.
    pub level: u32,
    /// The permissions and attributes the leaf grants, as [`Config::effective_prot`] reports
    /// them.
    pub prot: Prot,
    /// The raw leaf descriptor.
    pub descriptor: u64,
}

/// One item of a walk over the tree, in ascending IOVA order, tables before their contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WalkItem {
    /// A table page (the root included) at `level`, covering IOVAs from `iova`.
    Table {
        /// First IOVA the table covers.
        iova: Iova,
        /// The table's level.
        level: u32,
        /// Its physical address.
        pa: PhysAddr,
        /// Valid descriptors it holds.
        live: usize,
    },
    /// A valid leaf.
    Leaf {
        /// First IOVA the leaf maps.
        iova: Iova,
        /// The leaf's level.
        level: u32,
        /// Bytes the leaf maps.
        size: PageSize,
        /// Output address of the leaf's first byte.
        pa: PhysAddr,
        /// Permissions as a lookup reports them.
        prot: Prot,
        /// The raw descriptor.
        descriptor: u64,
    },
}

/// A run of leaves an unmap removed whose output addresses are contiguous: what iommufd asks
/// back from an unmap so it can unpin exactly those pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PaRun {
    /// First IOVA of the run.
    pub iova: Iova,
    /// Output address of its first byte.
    pub pa: PhysAddr,
    /// Bytes in the run.
    pub len: u64,
}

/// Appends a removed leaf to `runs`, extending the last run when both the IOVA and the output
/// address continue it.
pub fn push_pa_run(runs: &mut alloc::vec::Vec<PaRun>, iova: Iova, pa: PhysAddr, len: u64) {
    if let Some(last) = runs.last_mut() {
        if last.iova.checked_add(last.len) == Some(iova)
            && last.pa.checked_add(last.len) == Some(pa)
        {
            last.len += len;
            return;
        }
    }
    runs.push(PaRun { iova, pa, len });
}

/// Counters every backend keeps, so the designs are compared on the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stats {
    /// Calls to [`TableAlloc::alloc`](crate::TableAlloc::alloc).
    pub alloc_calls: u64,
    /// Calls to [`TableAlloc::alloc_bulk`](crate::TableAlloc::alloc_bulk).
    pub alloc_bulk_calls: u64,
    /// Pages obtained from the allocator, by either call.
    pub pages_allocated: u64,
    /// Calls to `free`.
    pub free_calls: u64,
    /// Calls to `free_bulk`.
    pub free_bulk_calls: u64,
    /// Pages given back to the allocator.
    pub pages_freed: u64,
    /// Table pages reachable now (the root included).
    pub live_tables: u64,
    /// The most table pages ever reachable at once.
    pub peak_live_tables: u64,
    /// Pages taken into reservations.
    pub pages_reserved: u64,
    /// Reserved pages that became tables.
    pub pages_consumed: u64,
    /// Reserved pages returned unused at release.
    pub reserved_unused: u64,
    /// Reserved pages held now and not yet tables.
    pub reserved_outstanding: u64,
    /// Table installs lost to a concurrent installer (the page went back to its source).
    pub install_races_lost: u64,
    /// Tables freed because an unmap or release left them empty.
    pub empty_tables_freed: u64,
    /// Calls to [`TableAlloc::clean`](crate::TableAlloc::clean) (non-coherent walkers only).
    pub cache_cleans: u64,
    /// Bytes those calls cleaned.
    pub bytes_cleaned: u64,
}

/// An ARM LPAE IO page table: the operations of Linux's `io_pgtable_ops`, typed.
///
/// All operations take `&self` and may run concurrently on **disjoint** IOVA ranges, as Linux's
/// lockless io-pgtable allows; overlapping concurrent operations are a caller bug that may give
/// wrong mappings but never undefined behaviour.
pub trait IoPageTable: Send + Sync {
    /// Returns the configuration the table was built with.
    fn config(&self) -> &Config;

    /// Maps `count` pages of `size` bytes from `iova` to `pa`, all or nothing.
    ///
    /// Unlike Linux's `map_pages`, a run may cross leaf-table boundaries: the whole request is
    /// mapped or none of it.
    ///
    /// # Errors
    ///
    /// [`MapError::InvalidPageSize`], [`MapError::NoAccess`], [`MapError::Empty`],
    /// [`MapError::Overflow`], [`MapError::Misaligned`], [`MapError::IovaOutOfRange`],
    /// [`MapError::PaOutOfRange`], [`MapError::AlreadyMapped`], [`MapError::Alloc`], and
    /// backend-specific reservation errors. On error the table and the allocator are unchanged.
    fn map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError>;

    /// Maps `len` bytes from `iova` to `pa`, choosing the largest usable page size for each
    /// piece as the Linux iommu core does (`iommu_pgsize`), all or nothing.
    ///
    /// # Errors
    ///
    /// As [`map`](IoPageTable::map); [`MapError::Misaligned`] when no supported size fits the
    /// alignment of the addresses or the length.
    fn map_range(&self, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<(), MapError>;

    /// Maps a scatter list: the physical segments `(pa, len)` back to back from `iova`, each
    /// split into the largest usable page sizes as [`map_range`](IoPageTable::map_range) does
    /// (Linux's `iommu_map_sg`), all or nothing.
    ///
    /// The default maps segment by segment and, when one fails, unmaps the leaves the earlier
    /// ones made; engine-backed tables validate and plan the whole list first and allocate
    /// the missing tables in one call.
    ///
    /// # Errors
    ///
    /// [`MapError::Empty`] for an empty list or segment, [`MapError::Overflow`] when the list
    /// runs past the top of the address space, else as [`map_range`](IoPageTable::map_range).
    /// On error no leaf of the list is left; engine-backed tables leave nothing at all (the
    /// default may leave emptied tables behind, as Linux does).
    fn map_sg(&self, iova: Iova, segments: &[(PhysAddr, u64)], prot: Prot) -> Result<(), MapError> {
        if segments.is_empty() {
            return Err(MapError::Empty { iova });
        }
        let mut at = iova;
        for (i, &(pa, len)) in segments.iter().enumerate() {
            let next = if i + 1 < segments.len() {
                at.checked_add(len)
                    .ok_or(MapError::Overflow { iova: at, len })
            } else {
                Ok(at)
            };
            if let Err(e) = next.and_then(|n| self.map_range(at, pa, len, prot).map(|()| n)) {
                // Undo the segments mapped so far, leaf by leaf.
                let mut made = alloc::vec::Vec::new();
                self.walk(&mut |item| {
                    if let WalkItem::Leaf { iova: l, size, .. } = item {
                        if l >= iova && l < at {
                            made.push((l, size));
                        }
                    }
                });
                let mut gather = Gather::new();
                for (l, size) in made {
                    let _ = self.unmap(l, size, 1, &mut gather);
                }
                return Err(e);
            }
            if let Ok(n) = next {
                at = n;
            }
        }
        Ok(())
    }

    /// Unmaps `count` pages of `size` bytes from `iova`, all or nothing, returning the bytes
    /// unmapped. A `size` equal to a level's block size removes a table found there with all it
    /// holds (Linux semantics). Cleared leaves are added to `gather`.
    ///
    /// # Errors
    ///
    /// [`UnmapError::InvalidPageSize`], [`UnmapError::Empty`], [`UnmapError::Overflow`],
    /// [`UnmapError::Misaligned`], [`UnmapError::IovaOutOfRange`], [`UnmapError::NotMapped`]
    /// when any page of the run is not mapped, [`UnmapError::PartialBlock`] when the run would
    /// cut a larger leaf. On error nothing changed.
    fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError>;

    /// Unmaps as [`unmap`](IoPageTable::unmap) does and appends to `removed` the output
    /// address runs of every leaf it cleared, in IOVA order, contiguous runs merged (iommufd's
    /// request: unpin exactly what was unmapped). Nothing is appended on error.
    ///
    /// The default finds the leaves with [`walk`](IoPageTable::walk); engine-backed tables
    /// walk only the range. The plain `unmap` pays nothing for this.
    ///
    /// # Errors
    ///
    /// As [`unmap`](IoPageTable::unmap).
    fn unmap_collect(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
        removed: &mut alloc::vec::Vec<PaRun>,
    ) -> Result<u64, UnmapError> {
        let start = iova.get();
        let end = count
            .checked_mul(size.get())
            .and_then(|l| start.checked_add(l));
        let mut found = alloc::vec::Vec::new();
        self.walk(&mut |item| {
            if let WalkItem::Leaf {
                iova: at,
                size: s,
                pa,
                ..
            } = item
            {
                let inside = at.get() >= start && end.is_none_or(|e| at.get() < e);
                if inside {
                    push_pa_run(&mut found, at, pa, s.get());
                }
            }
        });
        let bytes = self.unmap(iova, size, count, gather)?;
        removed.extend(found);
        Ok(bytes)
    }

    /// Translates `iova` the way software sees the table (Linux's `iova_to_phys`), or `None`
    /// when nothing maps it or it lies outside the input range.
    fn iova_to_phys(&self, iova: Iova) -> Option<Translation>;

    /// [`map`](IoPageTable::map) by a caller that holds the table exclusively: a driver that
    /// serialises its page-table operations under its own lock (as panthor's `op_lock` and
    /// msm's VM lock do) or owns the table outright. The same result and errors; a backend
    /// may skip the protocol that lets concurrent callers share the table. The default calls
    /// [`map`](IoPageTable::map).
    ///
    /// # Errors
    ///
    /// As [`map`](IoPageTable::map). On error the table and the allocator are unchanged.
    fn map_mut(
        &mut self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        self.map(iova, pa, size, count, prot)
    }

    /// [`unmap`](IoPageTable::unmap) by a caller that holds the table exclusively; see
    /// [`map_mut`](IoPageTable::map_mut). The default calls [`unmap`](IoPageTable::unmap).
    ///
    /// # Errors
    ///
    /// As [`unmap`](IoPageTable::unmap). On error nothing changed.
    fn unmap_mut(
        &mut self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        self.unmap(iova, size, count, gather)
    }

    /// [`iova_to_phys`](IoPageTable::iova_to_phys) by a caller that holds the table
    /// exclusively; see [`map_mut`](IoPageTable::map_mut). The default calls
    /// [`iova_to_phys`](IoPageTable::iova_to_phys).
    fn iova_to_phys_mut(&mut self, iova: Iova) -> Option<Translation> {
        self.iova_to_phys(iova)
    }

    /// Calls `visit` for every table and leaf, in ascending IOVA order.
    fn walk(&self, visit: &mut dyn FnMut(WalkItem));

    /// Returns the root table's physical address.
    fn root(&self) -> PhysAddr;

    /// Returns the register values for this table.
    fn registers(&self) -> Registers;

    /// Returns the statistics counters.
    fn stats(&self) -> Stats;

    /// Reports every dirty leaf in `range` (its whole block) to `sink` and adds it to
    /// `gather`, then marks it clean unless `flags` has
    /// [`DirtyFlags::NO_CLEAR`](crate::DirtyFlags::NO_CLEAR) (Linux's
    /// `read_and_clear_dirty`, for 64-bit stage-1 tables with the `ARM_HD` quirk, whose
    /// writable leaves start dirty). The caller invalidates the gathered range afterwards, so
    /// the walker sees the clean state.
    ///
    /// The default supports no format.
    ///
    /// # Errors
    ///
    /// [`DirtyError::Unsupported`] when the table does not track dirty state,
    /// [`DirtyError::OutOfRange`], [`DirtyError::NotMapped`] when the range holds an unmapped
    /// page: checked before anything is reported or cleaned.
    fn read_and_clear_dirty(
        &self,
        range: IovaRange,
        flags: crate::DirtyFlags,
        sink: &mut dyn crate::DirtySink,
        gather: &mut Gather,
    ) -> Result<(), DirtyError> {
        let _ = (range, flags, sink, gather);
        Err(DirtyError::Unsupported {
            format: self.config().format(),
        })
    }
}

/// A reservation of table pages for future maps in a range.
///
/// Returned by [`Reserve::reserve`] and consumed by a successful [`Reserve::release`] (a
/// refused one gives it back in the [`ReleaseError`]); dropping it without
/// releasing keeps its pages held until the table is dropped, which is almost always a bug,
/// hence `#[must_use]`.
///
/// A handle is a capability. The table that issues it stamps it with its [`Issuer`]'s secret
/// key, which no method, `Debug` or `Hash` reveals, and it is neither `Clone` nor `Copy`. So a
/// handle the table accepts is one it issued, and since [`Reserve::release`] takes the handle
/// by value, the reservation stays live for as long as any `&Reservation` is borrowed: a map
/// inside it needs no look-up in the table's registry to know that. A handle rebuilt from the
/// public fields (another issuer's key) is refused as unknown.
#[must_use = "a reservation holds table pages until it is released"]
#[derive(PartialEq, Eq)]
pub struct Reservation {
    table: u64,
    id: u64,
    range: IovaRange,
    leaf: PageSize,
    pages: usize,
    /// The issuer's secret: never read outside [`Issuer::word`].
    key: u64,
    /// A word the backend chose when it issued the handle.
    word: u64,
}

impl Reservation {
    /// Returns the identity of the table that made it.
    #[must_use]
    pub const fn table_id(&self) -> u64 {
        self.table
    }

    /// Returns the reservation's identity, unique within its table.
    #[must_use]
    pub const fn id(&self) -> u64 {
        self.id
    }

    /// Returns the reserved range.
    #[must_use]
    pub const fn range(&self) -> IovaRange {
        self.range
    }

    /// Returns the largest leaf size maps in the range may use.
    #[must_use]
    pub const fn max_leaf(&self) -> PageSize {
        self.leaf
    }

    /// Returns the pages taken from the allocator when the reservation was made.
    #[must_use]
    pub const fn pages(&self) -> usize {
        self.pages
    }

    /// Whether `count` leaves of `size` from `iova` lie inside the reserved range, for any
    /// arguments (no overflow; a zero count lies inside wherever `iova` does, and a map
    /// refuses it anyway).
    ///
    /// ```
    /// use iopt_api::{Iova, IovaRange, Issuer, PageSize};
    /// let range = IovaRange::new(Iova::new(0x10_0000), 0x10_0000, 0x1000).unwrap();
    /// let r = Issuer::new(1).issue(1, range, PageSize::SZ_4K, 0, 0);
    /// assert!(r.holds(Iova::new(0x1f_f000), PageSize::SZ_4K, 1));
    /// assert!(!r.holds(Iova::new(0x1f_f000), PageSize::SZ_4K, 2));
    /// assert!(!r.holds(Iova::new(0xf_f000), PageSize::SZ_4K, 1));
    /// assert!(!r.holds(Iova::new(0x10_0000), PageSize::SZ_4K, u64::MAX));
    /// ```
    #[inline]
    #[must_use]
    pub fn holds(&self, iova: Iova, size: PageSize, count: u64) -> bool {
        // `off < len` puts `iova` inside; then the run fits if its length does not pass
        // the bytes left (`count` leaves of `size`, a power of two, as one shift).
        let off = iova.get().wrapping_sub(self.range.start().get());
        let left = self.range.len().wrapping_sub(off);
        off < self.range.len() && count <= left >> size.shift()
    }
}

impl core::hash::Hash for Reservation {
    /// Hashes the table and the reservation identity only: a hasher must not learn the key.
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.table.hash(state);
        self.id.hash(state);
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Reservation(#{} of table {}, {}, leaf {}, {} pages)",
            self.id, self.table, self.range, self.leaf, self.pages
        )
    }
}

/// What a backend issues [`Reservation`] handles with: a table identity and a secret key.
///
/// [`issue`](Self::issue) stamps each handle with the key; [`word`](Self::word) recognises the
/// handles this issuer made. The key mixes a global counter, a stack address and the table
/// identity: it guards against handles rebuilt by mistake (from a released handle's fields, or
/// another table's), not against code that sets out to read private memory, which could
/// forge anything.
///
/// ```
/// use iopt_api::{Iova, IovaRange, Issuer, PageSize};
/// let range = IovaRange::new(Iova::new(0x20_0000), 0x20_0000, 0x1000)?;
/// let issuer = Issuer::new(7);
/// let r = issuer.issue(1, range, PageSize::SZ_4K, 1, 42);
/// assert_eq!(issuer.word(&r), Some(42));
/// // Same table id, same fields, another key: not a handle this issuer made.
/// let copy = Issuer::new(7).issue(r.id(), r.range(), r.max_leaf(), r.pages(), 42);
/// assert_eq!(issuer.word(&copy), None);
/// # Ok::<(), iopt_api::RangeError>(())
/// ```
pub struct Issuer {
    table: u64,
    key: u64,
}

impl Issuer {
    /// An issuer for table `table` with a fresh key.
    #[must_use]
    pub fn new(table: u64) -> Self {
        static SALT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
        let n = SALT.fetch_add(0x9E37_79B9_7F4A_7C15, core::sync::atomic::Ordering::Relaxed);
        let here = core::ptr::addr_of!(n) as usize as u64;
        Self {
            table,
            key: mix(n ^ here.rotate_left(29) ^ table.rotate_left(47)),
        }
    }

    /// Returns the table identity the issued handles carry.
    #[must_use]
    pub const fn table_id(&self) -> u64 {
        self.table
    }

    /// Issues a handle for reservation `id` of `range` with leaves up to `leaf`, which took
    /// `pages` pages, carrying `word` for the backend's own use.
    pub const fn issue(
        &self,
        id: u64,
        range: IovaRange,
        leaf: PageSize,
        pages: usize,
        word: u64,
    ) -> Reservation {
        Reservation {
            table: self.table,
            id,
            range,
            leaf,
            pages,
            key: self.key,
            word,
        }
    }

    /// The word `r` was issued with, if this issuer issued it (`None` for a handle of
    /// another table or a rebuilt one).
    #[inline]
    #[must_use]
    pub fn word(&self, r: &Reservation) -> Option<u64> {
        (r.key == self.key && r.table == self.table).then_some(r.word)
    }
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Issuer(table {})", self.table)
    }
}

/// splitmix64's finaliser: spreads every input bit over the output.
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Reservation of table pages ahead of maps: the contract both designs fulfil differently.
///
/// Inside a live reservation a map never calls the allocator and cannot fail for memory, and an
/// unmap never frees a table page.
pub trait Reserve: IoPageTable {
    /// Reserves what maps of leaves up to `max_leaf` anywhere in `range` will need.
    ///
    /// # Errors
    ///
    /// [`ReserveError::OutOfRange`], [`ReserveError::BadLeafSize`], [`ReserveError::Alloc`],
    /// [`ReserveError::CapExceeded`], [`ReserveError::BlockInTheWay`]. Nothing changed.
    fn reserve(&self, range: IovaRange, max_leaf: PageSize) -> Result<Reservation, ReserveError>;

    /// Maps inside a reservation, without calling the allocator.
    ///
    /// # Errors
    ///
    /// As [`IoPageTable::map`], plus [`MapError::OutsideReservation`],
    /// [`MapError::ReservationExhausted`] and [`MapError::UnknownReservation`].
    fn map_reserved(
        &self,
        reservation: &Reservation,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError>;

    /// Releases a reservation: returns unused pages and lets empty tables go.
    ///
    /// # Errors
    ///
    /// A [`ReleaseError`] that gives the handle back, with [`ReserveError::UnknownReservation`]
    /// for a handle this table did not issue (another table's, or one rebuilt from a released
    /// handle's fields), or [`ReserveError::StillMapped`] where the backend refuses to drop
    /// mappings. Nothing changed: the handle is as live as it was, so one sent to the wrong
    /// table can still be released on its own.
    fn release(&self, reservation: Reservation, gather: &mut Gather) -> Result<(), ReleaseError>;

    /// Returns exactly how many table pages a map of `range` with leaves of `leaf` would
    /// allocate against the current tree.
    ///
    /// # Errors
    ///
    /// [`ReserveError::OutOfRange`] and [`ReserveError::BadLeafSize`].
    fn pages_needed(&self, range: IovaRange, leaf: PageSize) -> Result<usize, ReserveError>;
}
