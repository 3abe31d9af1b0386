//! `LpaeTable`: the reference page table, allocating on demand exactly where Linux does.
//!
//! It is what io-pgtable-arm is without custom allocator pools: every missing table comes from
//! the caller's [`TableAlloc`] when a map needs it, and tables are freed only by an unmap or a
//! block map that covers them, or when the table is dropped. Both designs' backends build on the
//! same [`Engine`]; this type is the baseline they are compared with and the subject of the
//! golden replay.

use crate::account::Accounting;
use crate::engine::{Engine, PageSource, Run};
use alloc::vec::Vec;
use iopt_api::{
    AllocError, Config, FlushOps, Iova, MapError, NoFlush, PageSize, PhysAddr, Prot, TableAlloc,
};

/// An ARM LPAE IO page table that allocates table pages on demand.
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, Gather, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot};
/// use iopt_lpae::LpaeTable;
/// use iopt_sim::SimMemory;
///
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
/// let mem = SimMemory::new();
/// let table = LpaeTable::new(cfg, &mem)?;
/// table.map(Iova::new(0x1000_0000), PhysAddr::new(0x8_0000_0000), PageSize::SZ_4K, 16, Prot::READ | Prot::WRITE)?;
/// let t = table.iova_to_phys(Iova::new(0x1000_1234)).unwrap();
/// assert_eq!(t.pa, PhysAddr::new(0x8_0000_1234));
/// assert_eq!(table.unmap(Iova::new(0x1000_0000), PageSize::SZ_4K, 16, &mut Gather::new())?, 0x10000);
/// drop(table);
/// assert_eq!(mem.stats().live_pages, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct LpaeTable<A: TableAlloc, F: FlushOps = NoFlush> {
    engine: Engine<A, F>,
}

impl<A: TableAlloc> LpaeTable<A, NoFlush> {
    /// Builds an empty table with no flush callbacks.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn new(cfg: Config, alloc: A) -> Result<Self, AllocError> {
        Self::with_flush(cfg, alloc, NoFlush)
    }
}

impl<A: TableAlloc, F: FlushOps> LpaeTable<A, F> {
    /// Builds an empty table that reports invalidations to `flush`.
    ///
    /// # Errors
    ///
    /// The allocator's error if the root cannot be allocated.
    pub fn with_flush(cfg: Config, alloc: A, flush: F) -> Result<Self, AllocError> {
        Ok(Self {
            engine: Engine::new(cfg, alloc, flush)?,
        })
    }

    /// Returns the engine, for inspection.
    #[must_use]
    pub fn engine(&self) -> &Engine<A, F> {
        &self.engine
    }

    /// Maps with pages drawn from `src` instead of the allocator (what a reservation does).
    ///
    /// # Errors
    ///
    /// As [`IoPageTable::map`](iopt_api::IoPageTable::map), with the source's error in place of the allocator's.
    pub fn map_with<S: PageSource>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
        src: &mut S,
    ) -> Result<(), MapError> {
        self.engine.map(iova, pa, size, count, prot, src)
    }
}

/// Splits `[iova, iova + len)` into runs of the largest usable page sizes, as the Linux iommu
/// core does, validating each run.
///
/// # Errors
///
/// [`MapError::Empty`], [`MapError::Overflow`], [`MapError::Misaligned`] when no supported size
/// fits, or the first run's validation error.
pub fn split_range<A: TableAlloc, F: FlushOps, K: Accounting>(
    engine: &Engine<A, F, K>,
    iova: Iova,
    pa: PhysAddr,
    len: u64,
    prot: Prot,
) -> Result<Vec<Run>, MapError> {
    if len == 0 {
        return Err(MapError::Empty { iova });
    }
    iova.checked_add(len - 1)
        .ok_or(MapError::Overflow { iova, len })?;
    pa.checked_add(len - 1)
        .ok_or(MapError::Overflow { iova, len })?;
    let sizes = engine.config().page_sizes();
    let mut runs = Vec::new();
    let mut done = 0;
    while done < len {
        let (i, p) = (iova.get() + done, pa.get() + done);
        let Some((size, count)) = sizes.best_fit(i, p, len - done) else {
            let smallest = sizes.smallest().unwrap_or(PageSize::SZ_4K);
            return Err(MapError::Misaligned {
                iova: Iova::new(i),
                pa: PhysAddr::new(p),
                size: smallest,
            });
        };
        runs.push(engine.validate_map(Iova::new(i), PhysAddr::new(p), size, count, prot)?);
        done += size.get() * count;
    }
    Ok(runs)
}

/// Splits a scatter list — physical segments `(pa, len)` mapped back to back from `iova` — into
/// runs of the largest usable page sizes, as the Linux iommu core's `iommu_map_sg` does,
/// validating each run. Every engine-backed table's
/// [`IoPageTable::map_sg`](iopt_api::IoPageTable::map_sg) is this plus one planned map:
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot};
/// use iopt_lpae::LpaeTable;
/// use iopt_sim::SimMemory;
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
/// let mem = SimMemory::new();
/// let t = LpaeTable::new(cfg, &mem)?;
/// let sg = [(PhysAddr::new(0x8000_0000), 0x1000), (PhysAddr::new(0x4020_0000), 0x20_0000)];
/// t.map_sg(Iova::new(0x1f_f000), &sg, Prot::READ)?;
/// assert_eq!(t.iova_to_phys(Iova::new(0x20_0000)).unwrap().size, PageSize::SZ_2M);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`MapError::Empty`] for an empty list or segment, [`MapError::Overflow`],
/// [`MapError::Misaligned`] when a segment's address or length fits no supported size, or the
/// first run's validation error.
pub fn split_sg<A: TableAlloc, F: FlushOps, K: Accounting>(
    engine: &Engine<A, F, K>,
    iova: Iova,
    segments: &[(PhysAddr, u64)],
    prot: Prot,
) -> Result<Vec<Run>, MapError> {
    if segments.is_empty() {
        return Err(MapError::Empty { iova });
    }
    let mut runs = Vec::new();
    let mut at = iova;
    for (i, &(pa, len)) in segments.iter().enumerate() {
        runs.extend(split_range(engine, at, pa, len, prot)?);
        if i + 1 < segments.len() {
            at = at
                .checked_add(len)
                .ok_or(MapError::Overflow { iova: at, len })?;
        }
    }
    Ok(runs)
}

/// Implements [`IoPageTable`](iopt_api::IoPageTable) for a backend type `$ty<A, F>` that keeps
/// its [`Engine`] in a field named `engine`, with maps outside reservations drawing pages on
/// demand from the caller's allocator. Every backend's plain operations are the engine's; this
/// writes the forwarding once.
#[macro_export]
macro_rules! impl_io_page_table_on_engine {
    ($ty:ident) => {
        $crate::impl_io_page_table_on_engine!(@impl [] $ty<A, F>);
    };
    ($ty:ident<K>) => {
        $crate::impl_io_page_table_on_engine!(@impl [K: $crate::account::Accounting] $ty<A, F, K>);
    };
    ($ty:ident<K: $bound:path>) => {
        $crate::impl_io_page_table_on_engine!(@impl [K: $bound] $ty<A, F, K>);
    };
    (@impl [$($k:tt)*] $ty:ident<$($p:ident),*>) => {
        impl<A: ::iopt_api::TableAlloc, F: ::iopt_api::FlushOps, $($k)*> ::iopt_api::IoPageTable
            for $ty<$($p),*>
        {
            fn config(&self) -> &::iopt_api::Config {
                self.engine.config()
            }

            #[inline]
            fn map(
                &self,
                iova: ::iopt_api::Iova,
                pa: ::iopt_api::PhysAddr,
                size: ::iopt_api::PageSize,
                count: u64,
                prot: ::iopt_api::Prot,
            ) -> Result<(), ::iopt_api::MapError> {
                self.engine
                    .map(iova, pa, size, count, prot, &mut self.engine.on_demand())
            }

            fn map_range(
                &self,
                iova: ::iopt_api::Iova,
                pa: ::iopt_api::PhysAddr,
                len: u64,
                prot: ::iopt_api::Prot,
            ) -> Result<(), ::iopt_api::MapError> {
                let runs = $crate::split_range(&self.engine, iova, pa, len, prot)?;
                self.engine
                    .map_runs(&runs, prot, &mut self.engine.on_demand())
            }

            #[inline]
            fn unmap(
                &self,
                iova: ::iopt_api::Iova,
                size: ::iopt_api::PageSize,
                count: u64,
                gather: &mut ::iopt_api::Gather,
            ) -> Result<u64, ::iopt_api::UnmapError> {
                self.engine.unmap(iova, size, count, gather)
            }

            fn unmap_collect(
                &self,
                iova: ::iopt_api::Iova,
                size: ::iopt_api::PageSize,
                count: u64,
                gather: &mut ::iopt_api::Gather,
                removed: &mut ::alloc::vec::Vec<::iopt_api::PaRun>,
            ) -> Result<u64, ::iopt_api::UnmapError> {
                let run = self.engine.validate_unmap(iova, size, count)?;
                self.engine.unmap_collect(run, gather, removed)
            }

            fn map_sg(
                &self,
                iova: ::iopt_api::Iova,
                segments: &[(::iopt_api::PhysAddr, u64)],
                prot: ::iopt_api::Prot,
            ) -> Result<(), ::iopt_api::MapError> {
                let runs = $crate::split_sg(&self.engine, iova, segments, prot)?;
                self.engine
                    .map_runs(&runs, prot, &mut self.engine.on_demand())
            }

            fn read_and_clear_dirty(
                &self,
                range: ::iopt_api::IovaRange,
                flags: ::iopt_api::DirtyFlags,
                sink: &mut dyn ::iopt_api::DirtySink,
                gather: &mut ::iopt_api::Gather,
            ) -> Result<(), ::iopt_api::DirtyError> {
                self.engine.read_and_clear_dirty(range, flags, sink, gather)
            }

            fn iova_to_phys(&self, iova: ::iopt_api::Iova) -> Option<::iopt_api::Translation> {
                self.engine.lookup(iova)
            }

            fn map_mut(
                &mut self,
                iova: ::iopt_api::Iova,
                pa: ::iopt_api::PhysAddr,
                size: ::iopt_api::PageSize,
                count: u64,
                prot: ::iopt_api::Prot,
            ) -> Result<(), ::iopt_api::MapError> {
                self.engine.map_mut(iova, pa, size, count, prot)
            }

            fn unmap_mut(
                &mut self,
                iova: ::iopt_api::Iova,
                size: ::iopt_api::PageSize,
                count: u64,
                gather: &mut ::iopt_api::Gather,
            ) -> Result<u64, ::iopt_api::UnmapError> {
                self.engine.unmap_mut(iova, size, count, gather)
            }

            fn iova_to_phys_mut(
                &mut self,
                iova: ::iopt_api::Iova,
            ) -> Option<::iopt_api::Translation> {
                self.engine.lookup_mut(iova)
            }

            fn walk(&self, visit: &mut dyn FnMut(::iopt_api::WalkItem)) {
                self.engine.walk(visit);
            }

            fn root(&self) -> ::iopt_api::PhysAddr {
                self.engine.root()
            }

            fn registers(&self) -> ::iopt_api::Registers {
                $crate::regs::registers(self.engine.config(), self.engine.root())
            }

            fn stats(&self) -> ::iopt_api::Stats {
                self.engine.counters().snapshot()
            }
        }
    };
}

impl_io_page_table_on_engine!(LpaeTable);
