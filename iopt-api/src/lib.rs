//! # iopt-api: the vocabulary and contracts of iopt
//!
//! iopt implements the ARM LPAE IO page table (what SMMUs and Mali GPUs walk; Linux's
//! `io-pgtable-arm.c`) and offers two designs for obtaining table pages behind one trait. This
//! crate holds what every part agrees on, with no implementation:
//!
//! - addresses and ranges: [`Iova`], [`PhysAddr`], [`IovaRange`] (validated, never rounded);
//! - [`Prot`], [`PageSize`], [`PageSizes`];
//! - [`Config`]: a configuration validated and derived exactly as Linux does (granule choice,
//!   page-size restriction, IAS/OAS clamps, levels, start level, root size, stage-2
//!   concatenation, Mali's four levels);
//! - typed errors ([`MapError`], [`UnmapError`], [`ReserveError`], [`ReleaseError`],
//!   [`ConfigError`], [`AllocError`]): `#[non_exhaustive]`, data in every variant, `Clone + Eq`;
//! - the traits: [`IoPageTable`] (map, unmap, lookup, walk, registers, statistics),
//!   [`Reserve`] (reservations ahead of asynchronous binds), [`TableAlloc`] (the caller's
//!   allocator) and [`FlushOps`] with [`Gather`] (invalidations).
//!
//! ```
//! use iopt_api::{Config, ConfigInput, Format, PageSizes, Quirks};
//! // What panthor asks for: 64-bit stage 1, 4K|2M|1G, 48-bit VA.
//! let cfg = Config::new(
//!     ConfigInput::new(Format::Arm64S1, PageSizes::from_bits(0x4020_1000), 48, 40)
//!         .with_quirks(Quirks::NO_WARN),
//! )?;
//! assert_eq!(cfg.levels(), 4);
//! assert_eq!(cfg.block_size(2), 2 << 20);
//! # Ok::<(), iopt_api::ConfigError>(())
//! ```
//!
//! `no_std` + `alloc`; no `unsafe`.

#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod addr;
mod alloc_ops;
pub mod atomic;
mod config;
mod dirty;
mod error;
mod flush;
mod prot;
mod size;
mod table;

pub use addr::{Iova, IovaRange, PhysAddr, RangeError};
pub use alloc_ops::{TableAlloc, TableMeta, TableRef};
pub use config::{Config, ConfigError, ConfigInput, Format, Granule, Quirks, ips_encoding};
pub use dirty::{BitmapError, DirtyBitmap, DirtyFlags, DirtySink};
pub use error::{AllocError, DirtyError, MapError, ReleaseError, ReserveError, UnmapError};
pub use flush::{FlushOps, Gather, NoFlush};
pub use prot::Prot;
pub use size::{PageSize, PageSizes};
pub use table::{
    IoPageTable, Issuer, PaRun, Registers, Reservation, Reserve, Stats, Tcr, Translation, Vtcr,
    WalkItem, push_pa_run,
};
