//! # iopt: ARM LPAE IO page tables with a choice of allocation design
//!
//! One dependency for a driver author: the LPAE page table that SMMUs and Mali GPUs walk
//! (Linux's `io-pgtable-arm`), checked bit for bit against Linux's own outputs, with the
//! table-page allocation design chosen by cargo feature:
//!
//! | feature | backend | design |
//! |---|---|---|
//! | `alloc-ops` | [`AllocOpsTable`] | Design 1 (Linux v6.8, panthor, msm): the caller's allocator, and per-bind pools filled for the worst case at queue time |
//! | `prealloc` | [`PreallocTable`] | Design 2 (proposed on the iommu list, nouveau-style): reserving a range installs and refcounts the tables it needs; maps there never allocate, unmaps never free |
//!
//! Both are on by default; [`Table`] is one type over whichever are enabled, and
//! [`Table::new`] builds the [`Backend::default`] one, so a crate that enables exactly one
//! feature switches design by changing only its feature list. With no backend feature the
//! crate refuses to compile.
//!
//! The crate exports what a driver uses: the configuration, address and error types and traits
//! of `iopt-api`, the tables, the backend choices (`FreePolicy`, `CountPolicy`, `InFlightCap`),
//! and the format's descriptor, register and dirty-tracking helpers. Test scaffolding —
//! simulated table memory, the hardware-walk oracle and debug dumps — is in the `iopt-sim`
//! crate, which the examples below take as a dev-dependency.
//!
//! ```
//! use iopt::{Config, ConfigInput, Format, Gather, IoPageTable, Iova, IovaRange, PageSize,
//!            PageSizes, PhysAddr, Prot, Reserve, Table};
//! use iopt_sim::SimMemory; // simulated table memory; a driver passes its own `TableAlloc`
//!
//! let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 40))?;
//! let mem = SimMemory::new();
//! let table = Table::new(cfg, &mem)?;
//!
//! // Queue a bind: reserve what it needs while allocation is allowed...
//! let range = IovaRange::new(Iova::new(0x10_0000), 0x4000, 0x1000)?;
//! let res = table.reserve(range, PageSize::SZ_4K)?;
//! // ...run it later where it may not allocate...
//! table.map_reserved(&res, range.start(), PhysAddr::new(0x8000_0000), PageSize::SZ_4K, 4, Prot::READ)?;
//! assert_eq!(table.iova_to_phys(Iova::new(0x10_1234)).unwrap().pa, PhysAddr::new(0x8000_1234));
//! // ...and complete it.
//! table.unmap(range.start(), PageSize::SZ_4K, 4, &mut Gather::new())?;
//! table.release(res, &mut Gather::new())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Which design to pick
//!
//! From the `compare` harness's default run (`cargo run --release -p compare`, both designs on
//! the same workloads, every call checked against a model):
//!
//! - **Deep queues of asynchronous binds: `prealloc`.** Design 1 must hold the worst case for
//!   an empty tree per queued bind: 514 pages (2.0 MiB) for a 1 GiB bind that 2 MiB-contiguous
//!   backing maps with 2, so 128.5 MiB at queue depth 64 against Design 2's 264 KiB; 3 pages
//!   for every tiny bind even when a thousand share one 2 MiB region (11.7 MiB against 16 KiB).
//!   Over all workloads Design 1 returned 93% of what it reserved unused; Design 2 none.
//! - **Memory after unmapping: `prealloc`** (or `alloc-ops` with
//!   `FreePolicy::EmptyTables`): Design 1 keeps, as io-pgtable-arm does, every table that small
//!   unmaps empty (1,807 pages after the sparse-residency churn, against 0).
//! - **Lowest median latency of map and reserve: `alloc-ops`.** Its maps skip the counting
//!   Design 2 does (about 70-170 ns against 180-280 ns median on the streaming and sparse
//!   workloads), and a reserve is one bulk allocation without touching the tree.
//! - A driver that already owns a page pool and wants Linux's exact allocation points:
//!   **`alloc-ops`**.
//!
//! ## Dispatch
//!
//! `enum_dispatch` cannot implement a trait from another crate (`iopt-api`) for an enum here,
//! so [`Table`] dispatches through a small local macro: one `match` per call, no allocation,
//! no `dyn`.
//!
//! `no_std` + `alloc`; no `unsafe`.

#![no_std]

extern crate alloc;

#[cfg(not(any(feature = "alloc-ops", feature = "prealloc")))]
compile_error!("iopt needs a backend: enable the `alloc-ops` or the `prealloc` feature (or both)");

pub use iopt_api::*;
pub use iopt_lpae::{LpaeTable, desc, dirty, regs};

#[cfg(feature = "alloc-ops")]
pub use iopt_alloc_ops::{AllocOpsTable, CountPolicy, FreePolicy, InFlightCap};
#[cfg(feature = "prealloc")]
pub use iopt_prealloc::PreallocTable;

/// The designs compiled into this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// Design 1: caller-supplied allocator ops with per-reservation pools.
    #[cfg(feature = "alloc-ops")]
    AllocOps,
    /// Design 2: refcounted VA reservations inside the table.
    #[cfg(feature = "prealloc")]
    Prealloc,
}

/// The designs compiled into this build, in [`Backend`] order.
pub const BACKENDS: &[Backend] = &[
    #[cfg(feature = "alloc-ops")]
    Backend::AllocOps,
    #[cfg(feature = "prealloc")]
    Backend::Prealloc,
];

impl Default for Backend {
    /// Design 2 when it is compiled in (it reserves what binds need, not the worst case),
    /// otherwise Design 1.
    fn default() -> Self {
        #[cfg(feature = "prealloc")]
        {
            Backend::Prealloc
        }
        #[cfg(not(feature = "prealloc"))]
        {
            Backend::AllocOps
        }
    }
}

/// A page table of whichever design was chosen.
// Design 2's variant carries its reclamation slots (4 KiB, a cache line pair each) inline:
// a table is built once and used in place, and a box would add an indirection to every call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
#[non_exhaustive]
pub enum Table<A: TableAlloc, F: FlushOps = NoFlush> {
    /// Design 1.
    #[cfg(feature = "alloc-ops")]
    AllocOps(AllocOpsTable<A, F>),
    /// Design 2.
    #[cfg(feature = "prealloc")]
    Prealloc(PreallocTable<A, F>),
}

macro_rules! dispatch {
    ($self:expr, $t:ident => $body:expr) => {
        match $self {
            #[cfg(feature = "alloc-ops")]
            Table::AllocOps($t) => $body,
            #[cfg(feature = "prealloc")]
            Table::Prealloc($t) => $body,
        }
    };
}

impl<A: TableAlloc> Table<A, NoFlush> {
    /// Builds an empty table of the [`Backend::default`] design with no flush callbacks.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn new(cfg: Config, alloc: A) -> Result<Self, AllocError> {
        Self::with_backend(Backend::default(), cfg, alloc, NoFlush)
    }
}

impl<A: TableAlloc, F: FlushOps> Table<A, F> {
    /// Builds an empty table of `backend`'s design that reports invalidations to `flush`.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn with_backend(
        backend: Backend,
        cfg: Config,
        alloc: A,
        flush: F,
    ) -> Result<Self, AllocError> {
        Ok(match backend {
            #[cfg(feature = "alloc-ops")]
            Backend::AllocOps => Table::AllocOps(AllocOpsTable::with_flush(cfg, alloc, flush)?),
            #[cfg(feature = "prealloc")]
            Backend::Prealloc => Table::Prealloc(PreallocTable::with_flush(cfg, alloc, flush)?),
        })
    }

    /// Returns which design this table uses.
    #[must_use]
    pub fn backend(&self) -> Backend {
        match self {
            #[cfg(feature = "alloc-ops")]
            Table::AllocOps(_) => Backend::AllocOps,
            #[cfg(feature = "prealloc")]
            Table::Prealloc(_) => Backend::Prealloc,
        }
    }
}

impl<A: TableAlloc, F: FlushOps> IoPageTable for Table<A, F> {
    fn config(&self) -> &Config {
        dispatch!(self, t => t.config())
    }

    fn map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        dispatch!(self, t => t.map(iova, pa, size, count, prot))
    }

    fn map_range(&self, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<(), MapError> {
        dispatch!(self, t => t.map_range(iova, pa, len, prot))
    }

    fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        dispatch!(self, t => t.unmap(iova, size, count, gather))
    }

    fn unmap_collect(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
        removed: &mut alloc::vec::Vec<PaRun>,
    ) -> Result<u64, UnmapError> {
        dispatch!(self, t => t.unmap_collect(iova, size, count, gather, removed))
    }

    fn map_sg(&self, iova: Iova, segments: &[(PhysAddr, u64)], prot: Prot) -> Result<(), MapError> {
        dispatch!(self, t => t.map_sg(iova, segments, prot))
    }

    fn read_and_clear_dirty(
        &self,
        range: IovaRange,
        flags: DirtyFlags,
        sink: &mut dyn DirtySink,
        gather: &mut Gather,
    ) -> Result<(), DirtyError> {
        dispatch!(self, t => t.read_and_clear_dirty(range, flags, sink, gather))
    }

    fn iova_to_phys(&self, iova: Iova) -> Option<Translation> {
        dispatch!(self, t => t.iova_to_phys(iova))
    }

    fn map_mut(
        &mut self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        dispatch!(self, t => t.map_mut(iova, pa, size, count, prot))
    }

    fn unmap_mut(
        &mut self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        dispatch!(self, t => t.unmap_mut(iova, size, count, gather))
    }

    fn iova_to_phys_mut(&mut self, iova: Iova) -> Option<Translation> {
        dispatch!(self, t => t.iova_to_phys_mut(iova))
    }

    fn walk(&self, visit: &mut dyn FnMut(WalkItem)) {
        dispatch!(self, t => t.walk(visit));
    }

    fn root(&self) -> PhysAddr {
        dispatch!(self, t => t.root())
    }

    fn registers(&self) -> Registers {
        dispatch!(self, t => t.registers())
    }

    fn stats(&self) -> Stats {
        dispatch!(self, t => t.stats())
    }
}

impl<A: TableAlloc, F: FlushOps> Reserve for Table<A, F> {
    fn reserve(&self, range: IovaRange, max_leaf: PageSize) -> Result<Reservation, ReserveError> {
        dispatch!(self, t => t.reserve(range, max_leaf))
    }

    fn map_reserved(
        &self,
        reservation: &Reservation,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        dispatch!(self, t => t.map_reserved(reservation, iova, pa, size, count, prot))
    }

    fn release(&self, reservation: Reservation, gather: &mut Gather) -> Result<(), ReleaseError> {
        dispatch!(self, t => t.release(reservation, gather))
    }

    fn pages_needed(&self, range: IovaRange, leaf: PageSize) -> Result<usize, ReserveError> {
        dispatch!(self, t => t.pages_needed(range, leaf))
    }
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
