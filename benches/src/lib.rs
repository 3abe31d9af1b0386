//! # iopt-benches: criterion benchmarks of iopt beside aarch64-paging
//!
//! The benches under `benches/` run every workload of issue 7's reference table (single-4K map
//! into new and into present tables, single-4K unmap, bulk map/unmap of 1 GiB in 4K entries,
//! 512 × 2M map/unmap, 100k random map/unmap in a 64 GiB window, lookup) plus reservations,
//! release, `pages_needed`, a VM_BIND-like bind loop, a scaling group and a concurrency group.
//! In every group each backend is one criterion function with the same parameter and
//! `Throughput::Elements`, so one report shows the ratio.
//!
//! This library holds what the benches share:
//!
//! - [`Backend`]: one table behind one narrow interface (map, unmap, lookup), implemented by
//!   [`AllocOps`] (Design 1, `iopt-alloc-ops` on [`SimMemory`](iopt_sim::SimMemory); outside a
//!   reservation it maps exactly as `LpaeTable` does, through the same engine and on-demand
//!   source) and by [`Peer`] (aarch64-paging 0.12.3, a never-activated [`Mapping`] with an
//!   identity translation, so no break-before-make checks and no TLB maintenance run);
//! - `Prealloc` (feature `prealloc`, on by default): Design 2, `iopt-prealloc`'s
//!   `PreallocTable` on the same memory;
//! - [`Reserving`]: reserve / map inside / release / `pages_needed`, for the iopt designs;
//! - [`Shared`]: a table several threads map into at once;
//! - [`floor`]: the plain store loops that bound what a bulk map can cost;
//! - [`work`]: deterministic workloads (the random map/unmap mix, the VM_BIND trace);
//! - [`Profile`]: sizes for the smoke run (`-- --test`), the default quick run, and the full
//!   run (`IOPT_BENCH_FULL=1`).
//!
//! The `medians` binary reads `target/criterion/**/new/estimates.json` and prints the medians
//! and the ratios against aarch64-paging as a markdown table.
//!
//! [`Mapping`]: aarch64_paging::Mapping

pub mod floor;
pub mod work;

mod backend;
mod profile;

#[cfg(feature = "prealloc")]
pub use backend::{Accounted, Prealloc, PreallocMut, SharedPrealloc};
pub use backend::{AllocOps, Backend, LockedPeer, Peer, Reserving, Shared, cfg, prot};
pub use profile::Profile;

/// 4 KiB.
pub const SZ_4K: u64 = 1 << 12;
/// 2 MiB.
pub const SZ_2M: u64 = 1 << 21;
/// 1 GiB.
pub const SZ_1G: u64 = 1 << 30;

/// Where the benches map: 512 GiB, the start of level-0 entry 1, so every range up to 512 GiB
/// lies under one level-1 table and the table count is exact arithmetic.
pub const BASE_IOVA: u64 = 1 << 39;

/// Output address of the leaf at `iova`: a fixed offset, keeping 2 MiB alignment.
#[must_use]
#[inline]
pub const fn pa_of(iova: u64) -> u64 {
    iova + (1 << 44)
}

/// Table pages (the root included) that mapping `len` bytes of 4K leaves at a 1 GiB-aligned
/// `BASE_IOVA`-relative range needs on a 48-bit, 4-level table: one leaf table per 512 entries
/// plus the levels above.
#[must_use]
pub const fn expected_tables_4k(len: u64) -> u64 {
    let l3 = len.div_ceil(SZ_2M);
    let l2 = len.div_ceil(SZ_1G);
    1 + 1 + l2 + l3
}

/// The criterion defaults of every bench here: 10 samples, 1 s warm-up, 3 s measurement
/// (command-line flags override them). Table builds of 1 GiB take milliseconds, so 10 samples
/// are already hundreds of operations per sample.
#[must_use]
pub fn criterion_config() -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
}
