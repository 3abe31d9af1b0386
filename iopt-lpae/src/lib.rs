//! # iopt-lpae: the shared ARM LPAE format engine
//!
//! Everything about the LPAE format that both allocation designs share, written once:
//!
//! - [`desc`]: descriptor encoding and decoding for the 64-bit and 32-bit stage-1 and stage-2
//!   formats and Mali (type bits, address packing up to 52 bits, AP/AttrIndx/SH/AF/nG/XN,
//!   S2AP/MemAttr with S2FWB, NS/NSTABLE, DBM);
//! - [`regs`]: register outputs (TCR fields, MAIR, VTCR with SL0, TTBR/VTTBR, Mali
//!   TRANSTAB/MEMATTR);
//! - [`engine`]: the one walker (map, unmap, lookup, walk) behind a narrow [`PageSource`] hook
//!   through which backends supply table pages;
//! - [`account`]: how the engine accounts for table pages, as a type parameter:
//!   [`Untracked`](account::Untracked) (Linux) or [`LiveCounts`](account::LiveCounts)
//!   (live-entry and reservation counts, eager freeing, Design 2's reserve/release), with
//!   [`reclaim`] deferring frees past concurrent readers;
//! - [`LpaeTable`]: the on-demand reference table (Linux's behaviour) on the engine.
//!
//! Table memory comes from the caller's [`TableAlloc`](iopt_api::TableAlloc). Simulated memory,
//! the hardware-walk oracle and debug dumps, which tests use, live in the `iopt-sim` crate.
//!
//! ```
//! use iopt_api::{Config, ConfigInput, Format, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot};
//! use iopt_lpae::LpaeTable;
//! use iopt_sim::{SimMemory, oracle::{Access, Walker}};
//!
//! let cfg = Config::new(ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_4K, 40, 40))?;
//! let mem = SimMemory::new();
//! let table = LpaeTable::new(cfg, &mem)?;
//! table.map(Iova::new(0x4020_0000), PhysAddr::new(0x8_0020_0000), PageSize::SZ_2M, 1, Prot::READ)?;
//! // The device's view agrees with the software walk.
//! let hw = Walker::from_registers(cfg.format(), &table.registers(), false, 0).unwrap();
//! let t = hw.translate(&mem, 0x4020_1234, Access::READ).unwrap();
//! assert_eq!(t.pa, PhysAddr::new(0x8_0020_1234));
//! assert!(hw.translate(&mem, 0x4020_1234, Access::WRITE).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `no_std` + `alloc`; no `unsafe`.

#![no_std]

extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

pub mod account;
mod atomic;
mod cache;
mod collect;
pub mod desc;
pub mod dirty;
pub mod engine;
pub mod reclaim;
pub mod regs;
mod table;
#[cfg(test)]
mod test_mem;

pub use engine::{Counters, Engine, OnDemand, OpGuard, PageSource, Run, Stash};
pub use table::{LpaeTable, split_range, split_sg};
