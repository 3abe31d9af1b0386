//! # iopt-alloc-ops: Design 1, caller-supplied allocator ops with reservation pools
//!
//! The design Linux merged in v6.8 (custom `alloc`/`free` hooks in `io_pgtable_cfg`) as panthor
//! and msm use it for asynchronous VM_BIND: every table page, the root included, comes from the
//! caller's [`TableAlloc`](iopt_api::TableAlloc) and goes back to it. A driver that may not
//! allocate when a bind *executes* reserves at *queue* time:
//!
//! 1. [`reserve`](iopt_api::Reserve::reserve) computes a count with the table's
//!    [`CountPolicy`], checks the optional [`InFlightCap`], and takes that many pages with **one**
//!    [`alloc_bulk`](iopt_api::TableAlloc::alloc_bulk) call into a pool private to the
//!    reservation;
//! 2. [`map_reserved`](iopt_api::Reserve::map_reserved) (and
//!    [`map_range_reserved`](AllocOpsTable::map_range_reserved)) installs missing tables only
//!    from that pool and **never calls the allocator**; a pool that runs dry gives
//!    [`MapError::ReservationExhausted`](iopt_api::MapError::ReservationExhausted) and the table
//!    is unchanged (panthor has to mark the whole VM unusable there; we do not);
//! 3. [`release`](iopt_api::Reserve::release) returns the unused rest with **one**
//!    [`free_bulk`](iopt_api::TableAlloc::free_bulk) call.
//!
//! ```
//! use iopt_api::{Config, ConfigInput, Format, Gather, IoPageTable, Iova, IovaRange, PageSize,
//!                PageSizes, PhysAddr, Prot, Reserve};
//! use iopt_alloc_ops::AllocOpsTable;
//! use iopt_sim::SimMemory;
//!
//! let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 40))?;
//! let mem = SimMemory::new();
//! let table = AllocOpsTable::new(cfg, &mem)?;
//!
//! // Queue time: 64 KiB at a 2 MiB-aligned VA reserves N(512G) + N(1G) + N(2M) = 3 pages.
//! let range = IovaRange::new(Iova::new(0x4000_0000), 0x10000, 0x1000)?;
//! let res = table.reserve(range, PageSize::SZ_4K)?;
//! assert_eq!(res.pages(), 3);
//!
//! // Execution time: no allocator call.
//! let calls = mem.stats().alloc_calls + mem.stats().alloc_bulk_calls;
//! table.map_reserved(&res, range.start(), PhysAddr::new(0x8000_0000), PageSize::SZ_4K, 16,
//!                    Prot::READ | Prot::WRITE)?;
//! assert_eq!(mem.stats().alloc_calls + mem.stats().alloc_bulk_calls, calls);
//! assert_eq!(table.iova_to_phys(Iova::new(0x4000_1234)).unwrap().pa, PhysAddr::new(0x8000_1234));
//!
//! // Completion: the rest (none here: the tree held only the root) goes back in one bulk free.
//! assert_eq!(table.reservation_left(&res), Some(0));
//! table.release(res, &mut Gather::new())?;
//! assert_eq!(table.stats().pages_consumed, 3);
//! drop(table);
//! assert_eq!(mem.stats().live_pages, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Count policies
//!
//! - [`CountPolicy::WorstCase`] (default): panthor's `N(512G) + N(1G) + N(2M)` generalised to
//!   any geometry ([`worst_case_pages`]); what the tree would need if it held only the root.
//! - [`CountPolicy::MsmMerged`]: msm's merge of a job's adjacent binds that meet in the same
//!   leaf-table region (2 MiB at 4 KiB granule) before counting ([`msm_merged_pages`]; the
//!   exact interpretation is on the variant). It matters only for a batch
//!   ([`AllocOpsTable::reserve_batch`]); for one range it equals `WorstCase`.
//! - [`CountPolicy::Exact`]: the engine's exact count against the current tree.
//!
//! The reservation's leaf size is the smallest page size its maps will use (panthor: 4 KiB);
//! larger leaves need fewer tables. For unmaps, [`unmap_reserve_pages`] is panthor's 0–2 page
//! count and [`AllocOpsTable::reserve_unmap`] reserves it for remapping the borders of blocks an
//! unmap had to widen.
//!
//! ## What Design 1 does not promise
//!
//! - **Tables are freed where Linux frees them**: by an unmap whose page size equals the block
//!   size of a level holding a table, or by a block map over an empty table, and at drop — even
//!   tables that came from a live reservation (they go to the allocator, never back to the
//!   pool, as in panthor). A reservation therefore stays sufficient only while nothing frees
//!   tables in its range before its maps run. Freed pages reach the allocator only after the
//!   walk flush. [`FreePolicy::EmptyTables`] (opt-in, via
//!   [`AllocOpsTable::freeing_empty_tables`]) also frees every table an unmap leaves empty, so a
//!   full unmap returns to the root alone; there, the tables a reservation's maps install from
//!   its pool are *held* by it until release (as Design 2 reserves its tables), so unmaps inside
//!   a live reservation cannot free what its pool paid for and mapping there again needs no
//!   page; release frees those left empty (see [`iopt_lpae::engine::hold`]).
//! - **Reservations overlap freely**: two pools may both count the same missing table; the
//!   first map installs it and the other pool's page stays unused until release. A thread that
//!   loses an install race gives its page back to the pool it drew from.
//! - **A map with several runs** ([`AllocOpsTable::map_range_reserved`] over mixed page sizes)
//!   draws exactly the engine's up-front plan (each missing table counted once), so a pool sized
//!   by any policy suffices for it.
//!
//! ## Statistics
//!
//! [`stats`](iopt_api::IoPageTable::stats) reports the engine's counters, which this crate
//! updates for reservations: `alloc_bulk_calls` and `pages_allocated` at reserve,
//! `pages_reserved`, `pages_consumed` (pages that became tables, net of race losers given back),
//! `reserved_unused` (returned at release or drop), `reserved_outstanding` (held now), and
//! `free_bulk_calls`/`pages_freed` for the bulk frees. At every moment
//! `pages_reserved == pages_consumed + reserved_unused + reserved_outstanding`.
//!
//! `no_std` + `alloc`; no `unsafe`.

#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod count;
mod pool;
mod table;

pub use count::{
    CountPolicy, MSM_CAP_PAGES, msm_merged_pages, unmap_block, unmap_reserve_pages, validate,
    worst_case_pages,
};
pub use table::{AllocOpsTable, FreePolicy, InFlightCap};
