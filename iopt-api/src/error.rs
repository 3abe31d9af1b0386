//! Typed errors of the table operations.
//!
//! Every variant carries the data needed to say what was wrong, and every error means the
//! operation changed nothing: no descriptor, no table page, no allocator state. The enums are
//! `Clone + Eq` so the harness can assert that two backends fail identically.

use crate::{Iova, IovaRange, PageSize, PhysAddr, Prot, RangeError, Reservation};

/// The caller's allocator could not supply table memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// The allocator is out of memory (or a test injected a failure).
    #[error("table allocator failed to provide {count} page(s) of {size:#x} bytes")]
    OutOfMemory {
        /// Bytes per table asked for.
        size: u64,
        /// Tables asked for in this call.
        count: usize,
    },
    /// The allocator cannot provide this size or alignment at all.
    #[error("table allocator does not support {size:#x}-byte tables")]
    UnsupportedSize {
        /// Bytes per table asked for.
        size: u64,
    },
    /// The allocator returned a page the table cannot use: not resolvable by
    /// [`TableAlloc::table`](crate::TableAlloc::table), smaller than asked, not aligned to its
    /// size, not zeroed, or at an address a table descriptor cannot hold or the output
    /// address size does not reach. The page was given back; nothing changed.
    #[error("table allocator returned an unusable page at {pa} for a {size:#x}-byte table")]
    BadPage {
        /// The page's physical address.
        pa: PhysAddr,
        /// Bytes per table asked for.
        size: u64,
    },
}

/// Why a map was refused. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// The page size is not one the table supports (Linux: -EINVAL).
    #[error("page size {size:#x} is not supported")]
    InvalidPageSize {
        /// The requested size in bytes.
        size: u64,
    },
    /// Neither READ nor WRITE was given (Linux: -EINVAL).
    #[error("prot {prot:?} grants neither read nor write")]
    NoAccess {
        /// The requested prot.
        prot: Prot,
    },
    /// The run starts or ends outside the input address range (Linux: -ERANGE).
    #[error("iova {iova} is outside the input address range")]
    IovaOutOfRange {
        /// The first offending IOVA.
        iova: Iova,
    },
    /// The run's output addresses exceed the output address size (Linux: -ERANGE).
    #[error("physical address {pa} is outside the output address range")]
    PaOutOfRange {
        /// The first offending physical address.
        pa: PhysAddr,
    },
    /// The IOVA or PA is not a multiple of the page size (Linux leaves this to its caller).
    #[error("iova {iova} or pa {pa} is not aligned to {size}")]
    Misaligned {
        /// Requested IOVA.
        iova: Iova,
        /// Requested PA.
        pa: PhysAddr,
        /// Requested page size.
        size: PageSize,
    },
    /// Zero pages or zero bytes were requested.
    #[error("empty map at {iova}")]
    Empty {
        /// Requested IOVA.
        iova: Iova,
    },
    /// `iova + length` or `pa + length` does not fit in 64 bits.
    #[error("map at {iova} of {len:#x} bytes overflows")]
    Overflow {
        /// Requested IOVA.
        iova: Iova,
        /// Requested length (saturated).
        len: u64,
    },
    /// A leaf already exists in the run or above it, or a block would replace a table that
    /// still holds mappings (Linux: -EEXIST).
    #[error("iova {iova} is already mapped")]
    AlreadyMapped {
        /// The first IOVA found mapped.
        iova: Iova,
    },
    /// A table page could not be obtained (Linux: -ENOMEM).
    #[error("out of table memory: {source}")]
    Alloc {
        /// The allocator's error.
        #[source]
        source: AllocError,
    },
    /// The reservation a map was bound to has too few pages left.
    #[error("reservation #{id} has {left} page(s) left, the map needs {needed}")]
    ReservationExhausted {
        /// The reservation.
        id: u64,
        /// Pages left in it.
        left: usize,
        /// Pages the map needs.
        needed: usize,
    },
    /// The run is not inside the reservation it was bound to.
    #[error("map at {iova} lies outside reservation #{id} {range}")]
    OutsideReservation {
        /// The reservation.
        id: u64,
        /// The reservation's range.
        range: IovaRange,
        /// The first IOVA outside it.
        iova: Iova,
    },
    /// A block map would replace a table that a live reservation holds.
    #[error("block at {iova} would replace a table held by a reservation")]
    ReservedTable {
        /// The block's IOVA.
        iova: Iova,
    },
    /// The handle was not issued by this table: another table's, or one rebuilt from a
    /// released handle's fields.
    #[error("reservation #{id} is not live on this table")]
    UnknownReservation {
        /// The reservation.
        id: u64,
    },
    /// A table descriptor points at memory the allocator does not recognise as a live table:
    /// the tree was corrupted from outside. The walk stopped there.
    #[error("table descriptor at iova {iova} points at unknown memory {pa}")]
    BrokenTable {
        /// The IOVA being walked.
        iova: Iova,
        /// The address in the descriptor.
        pa: PhysAddr,
    },
}

impl From<AllocError> for MapError {
    fn from(source: AllocError) -> Self {
        MapError::Alloc { source }
    }
}

/// Why an unmap was refused. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnmapError {
    /// The page size is not one the table supports.
    #[error("page size {size:#x} is not supported")]
    InvalidPageSize {
        /// The requested size in bytes.
        size: u64,
    },
    /// The run starts or ends outside the input address range.
    #[error("iova {iova} is outside the input address range")]
    IovaOutOfRange {
        /// The first offending IOVA.
        iova: Iova,
    },
    /// The IOVA is not a multiple of the page size.
    #[error("iova {iova} is not aligned to {size}")]
    Misaligned {
        /// Requested IOVA.
        iova: Iova,
        /// Requested page size.
        size: PageSize,
    },
    /// Zero pages or zero bytes were requested.
    #[error("empty unmap at {iova}")]
    Empty {
        /// Requested IOVA.
        iova: Iova,
    },
    /// `iova + length` does not fit in 64 bits.
    #[error("unmap at {iova} of {len:#x} bytes overflows")]
    Overflow {
        /// Requested IOVA.
        iova: Iova,
        /// Requested length (saturated).
        len: u64,
    },
    /// Some page of the run is not mapped (Linux returns 0 or a short count).
    #[error("iova {iova} is not mapped")]
    NotMapped {
        /// The first unmapped IOVA.
        iova: Iova,
    },
    /// The run would cut a larger leaf (Linux v6.13+: WARN and 0; no split).
    #[error("unmap of {size} at {iova} would split a {leaf} leaf")]
    PartialBlock {
        /// The IOVA inside the leaf.
        iova: Iova,
        /// The requested page size.
        size: PageSize,
        /// The size of the leaf found there.
        leaf: PageSize,
    },
    /// The unmap would remove a table that a live reservation holds.
    #[error("unmap at {iova} would remove a table held by a reservation")]
    ReservedTable {
        /// The IOVA of the table entry.
        iova: Iova,
    },
    /// A table descriptor points at memory the allocator does not recognise as a live table.
    #[error("table descriptor at iova {iova} points at unknown memory {pa}")]
    BrokenTable {
        /// The IOVA being walked.
        iova: Iova,
        /// The address in the descriptor.
        pa: PhysAddr,
    },
}

/// Why a reservation could not be made or released. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReserveError {
    /// The range itself is invalid.
    #[error("invalid range: {source}")]
    Range {
        /// Why.
        #[source]
        source: RangeError,
    },
    /// The range leaves the input address range.
    #[error("range {range} is outside the input address range")]
    OutOfRange {
        /// The requested range.
        range: IovaRange,
    },
    /// The leaf size is not one the table supports, or the range is not aligned to it.
    #[error("leaf size {size:#x} is unsupported or misaligned for {range}")]
    BadLeafSize {
        /// The requested range.
        range: IovaRange,
        /// The requested leaf size in bytes.
        size: u64,
    },
    /// The allocator could not supply the pages.
    #[error("out of table memory: {source}")]
    Alloc {
        /// The allocator's error.
        #[source]
        source: AllocError,
    },
    /// The in-flight cap would be exceeded.
    #[error("{in_flight} page(s) in flight + {needed} needed exceeds the cap of {cap}")]
    CapExceeded {
        /// Pages already held by live reservations.
        in_flight: usize,
        /// Pages this reservation needs.
        needed: usize,
        /// The cap.
        cap: usize,
    },
    /// A leaf already covers part of the range at a level the reservation must install a
    /// table on.
    #[error("iova {iova} is covered by a leaf larger than the reservation's leaf size")]
    BlockInTheWay {
        /// The IOVA of the leaf.
        iova: Iova,
    },
    /// The handle was not issued by this table: another table's, or one rebuilt from a
    /// released handle's fields.
    #[error("reservation #{id} is not live on this table")]
    UnknownReservation {
        /// The reservation.
        id: u64,
    },
    /// A table descriptor points at memory the allocator does not recognise as a live table.
    #[error("table descriptor at iova {iova} points at unknown memory {pa}")]
    BrokenTable {
        /// The IOVA being walked.
        iova: Iova,
        /// The address in the descriptor.
        pa: PhysAddr,
    },
    /// The range still holds mappings that the release policy refuses to drop.
    #[error("range {range} still has mappings at {iova}")]
    StillMapped {
        /// The reservation's range.
        range: IovaRange,
        /// The first mapped IOVA.
        iova: Iova,
    },
}

impl From<AllocError> for ReserveError {
    fn from(source: AllocError) -> Self {
        ReserveError::Alloc { source }
    }
}

impl From<RangeError> for ReserveError {
    fn from(source: RangeError) -> Self {
        ReserveError::Range { source }
    }
}

/// Why a [`Reserve::release`](crate::Reserve::release) was refused, with the handle given
/// back.
///
/// Nothing was changed: a handle the table did not issue (another table's) is still live on
/// the table that did, and can be released there with [`into_reservation`](Self::into_reservation).
/// Not `Clone`, as the handle it carries is not.
///
/// ```
/// use iopt_api::{Iova, IovaRange, Issuer, PageSize, ReleaseError, ReserveError};
/// let range = IovaRange::new(Iova::new(0x10_0000), 0x1000, 0x1000)?;
/// let r = Issuer::new(1).issue(3, range, PageSize::SZ_4K, 2, 0);
/// let e = ReleaseError::new(r, ReserveError::UnknownReservation { id: 3 });
/// assert_eq!(e.error(), ReserveError::UnknownReservation { id: 3 });
/// assert_eq!(e.to_string(), "release refused: reservation #3 is not live on this table");
/// let r = e.into_reservation();
/// assert_eq!(r.pages(), 2);
/// # drop(r);
/// # Ok::<(), iopt_api::RangeError>(())
/// ```
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("release refused: {error}")]
#[must_use = "a failed release gives back a handle that still holds table pages"]
#[non_exhaustive]
pub struct ReleaseError {
    reservation: Reservation,
    #[source]
    error: ReserveError,
}

impl ReleaseError {
    /// The refusal of `reservation`'s release for `error`.
    pub const fn new(reservation: Reservation, error: ReserveError) -> Self {
        Self { reservation, error }
    }

    /// Returns why the release was refused.
    #[must_use]
    pub const fn error(&self) -> ReserveError {
        self.error
    }

    /// Returns the handle, still live on the table that issued it.
    pub const fn reservation(&self) -> &Reservation {
        &self.reservation
    }

    /// Gives the handle back, to release it where it belongs.
    pub fn into_reservation(self) -> Reservation {
        self.reservation
    }

    /// Splits into the handle and the reason.
    pub fn into_parts(self) -> (Reservation, ReserveError) {
        (self.reservation, self.error)
    }
}

/// Why a dirty-state harvest was refused. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirtyError {
    /// Only 64-bit stage-1 tables track dirty state (Linux: -EINVAL).
    #[error("{format} does not track dirty state")]
    Unsupported {
        /// The table's format.
        format: crate::Format,
    },
    /// The range leaves the input address range (Linux: -EINVAL).
    #[error("range {range} is outside the input address range")]
    OutOfRange {
        /// The requested range.
        range: IovaRange,
    },
    /// The range holds an unmapped page (Linux: -EINVAL, after cleaning what came before).
    #[error("iova {iova} is not mapped")]
    NotMapped {
        /// The first unmapped IOVA.
        iova: Iova,
    },
    /// A table descriptor points at memory the allocator does not recognise as a live table.
    #[error("table descriptor at iova {iova} points at unknown memory {pa}")]
    BrokenTable {
        /// The IOVA being walked.
        iova: Iova,
        /// The address in the descriptor.
        pa: PhysAddr,
    },
}
