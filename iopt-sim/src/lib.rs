//! # iopt-sim: simulated memory, a hardware-walk oracle and debug dumps for iopt
//!
//! What tests, examples, benchmarks and the `compare` harness need around a page table, and
//! a driver does not: a driver brings its own table memory and its own device. Keeping these
//! out of the engine crate and the `iopt` facade keeps their public surface to what a driver
//! uses, while every test in the workspace still runs against the same simulated memory and
//! the same independent walker.
//!
//! - [`SimMemory`]: simulated physical memory for table pages, a
//!   [`TableAlloc`](iopt_api::TableAlloc) that places pages at realistic physical addresses,
//!   counts what a leak check needs, injects allocation failures, and can model a walker that
//!   does not snoop the CPU's caches ([`SimMemory::non_coherent`]);
//! - [`oracle`]: a hardware-walk oracle that translates from the register values a driver
//!   programs and raw memory, sharing no code with the engine, so each checks the other;
//! - [`debug`]: the descriptors on one IOVA's path and a readable dump of a whole tree.
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
//! `no_std` + `alloc` like the table crates, so the no-`std` builds can test with it too; no
//! `unsafe`.

#![no_std]

extern crate alloc;

pub mod debug;
pub mod oracle;
mod sim;

pub use sim::{CACHE_LINE, STALE_DESCRIPTOR, SimLayout, SimMemory, SimStats};
