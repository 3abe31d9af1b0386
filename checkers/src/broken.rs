//! Deliberately broken backends, built around the real ones without touching `iopt-lpae`, so
//! the tests can show that every checker fails when it should:
//!
//! - [`Tamper`] wraps a table: [`Bug::IndexOffByOne`] puts the 4 KiB page whose leaf-table index
//!   is 7 into entry 8 and looks it up there too (an off-by-one in the index calculation that
//!   the software view cannot see); [`Bug::PartialMapOnOom`] answers an allocation failure by
//!   mapping the first page anyway (a map that is not all-or-nothing); [`Bug::RegisterTsz`]
//!   reports T0SZ one too small;
//! - [`LeakyAlloc`] drops the first page of every bulk free (a leak);
//! - [`SkipWalkFlush`] swallows `flush_walk` (tables freed while the device may walk them);
//! - [`SkipGather`] swallows `add_page` (unmapped leaves the caller never invalidates);
//! - [`BrokenCodec`] forgets the 64 KiB-granule address fold when decoding.
//!
//! Each comes with a constructor of a [`LaneSpec`] or a build function for the checkers.

use crate::descriptor::{Codec, Lpae};
use crate::env::{Device, Hooked};
use crate::lane::{Build, Design, LaneSpec, Subject};
use iopt_api::{
    AllocError, Config, FlushOps, Gather, Granule, IoPageTable, Iova, IovaRange, MapError,
    PageSize, PhysAddr, Prot, Registers, ReleaseError, Reservation, Reserve, ReserveError, Stats,
    TableAlloc, TableRef, Translation, UnmapError, WalkItem,
};
use iopt_lpae::desc::Kind;
use std::sync::Arc;

/// Which bug a [`Tamper`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// Index 7 of every leaf table is stored (and looked up) at index 8.
    IndexOffByOne,
    /// A map refused for memory maps its first page anyway.
    PartialMapOnOom,
    /// The stage-1/stage-2 T0SZ register field is one too small.
    RegisterTsz,
}

/// A table with a [`Bug`].
pub struct Tamper {
    inner: Box<dyn Subject>,
    bug: Bug,
    cfg: Config,
}

impl std::fmt::Debug for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tamper")
            .field("bug", &self.bug)
            .finish_non_exhaustive()
    }
}

impl Tamper {
    /// Wraps `inner`.
    #[must_use]
    pub fn new(inner: Box<dyn Subject>, bug: Bug) -> Self {
        let cfg = *inner.config();
        Self { inner, bug, cfg }
    }

    /// Where the buggy index puts the page at `iova` of `size` bytes.
    fn slot(&self, iova: Iova, size: PageSize, count: u64) -> Iova {
        let g = self.cfg.granule().size();
        let per = self.cfg.granule().entries() as u64;
        if self.bug == Bug::IndexOffByOne
            && size.get() == g
            && count == 1
            && (iova.get() / g) % per == 7
        {
            Iova::new(iova.get() + g)
        } else {
            iova
        }
    }
}

impl IoPageTable for Tamper {
    fn config(&self) -> &Config {
        self.inner.config()
    }

    fn map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        let r = self
            .inner
            .map(self.slot(iova, size, count), pa, size, count, prot);
        if self.bug == Bug::PartialMapOnOom && matches!(r, Err(MapError::Alloc { .. })) && count > 1
        {
            let _ = self.inner.map(iova, pa, size, 1, prot);
        }
        r
    }

    fn map_range(&self, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<(), MapError> {
        self.inner.map_range(iova, pa, len, prot)
    }

    fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        self.inner
            .unmap(self.slot(iova, size, count), size, count, gather)
    }

    fn iova_to_phys(&self, iova: Iova) -> Option<Translation> {
        let g = self.cfg.granule().size();
        let page = Iova::new(iova.get() & !(g - 1));
        let at = self.slot(page, PageSize::new(g)?, 1);
        if at == page {
            return self.inner.iova_to_phys(iova);
        }
        self.inner
            .iova_to_phys(Iova::new(at.get() + (iova.get() - page.get())))
    }

    fn walk(&self, visit: &mut dyn FnMut(WalkItem)) {
        self.inner.walk(visit);
    }

    fn root(&self) -> PhysAddr {
        self.inner.root()
    }

    fn registers(&self) -> Registers {
        let r = self.inner.registers();
        if self.bug != Bug::RegisterTsz {
            return r;
        }
        match r {
            Registers::Stage1 {
                ttbr,
                mut tcr,
                mair,
            } => {
                tcr.tsz = tcr.tsz.saturating_sub(1);
                Registers::Stage1 { ttbr, tcr, mair }
            }
            Registers::Stage2 { vttbr, mut vtcr } => {
                vtcr.tsz = vtcr.tsz.saturating_sub(1);
                Registers::Stage2 { vttbr, vtcr }
            }
            other => other,
        }
    }

    fn stats(&self) -> Stats {
        self.inner.stats()
    }

    fn map_sg(&self, iova: Iova, segments: &[(PhysAddr, u64)], prot: Prot) -> Result<(), MapError> {
        self.inner.map_sg(iova, segments, prot)
    }

    fn read_and_clear_dirty(
        &self,
        range: iopt_api::IovaRange,
        flags: iopt_api::DirtyFlags,
        sink: &mut dyn iopt_api::DirtySink,
        gather: &mut Gather,
    ) -> Result<(), iopt_api::DirtyError> {
        self.inner.read_and_clear_dirty(range, flags, sink, gather)
    }
}

impl Reserve for Tamper {
    fn reserve(&self, range: IovaRange, max_leaf: PageSize) -> Result<Reservation, ReserveError> {
        self.inner.reserve(range, max_leaf)
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
        self.inner.map_reserved(
            reservation,
            self.slot(iova, size, count),
            pa,
            size,
            count,
            prot,
        )
    }

    fn release(&self, reservation: Reservation, gather: &mut Gather) -> Result<(), ReleaseError> {
        self.inner.release(reservation, gather)
    }

    fn pages_needed(&self, range: IovaRange, leaf: PageSize) -> Result<usize, ReserveError> {
        self.inner.pages_needed(range, leaf)
    }
}

impl Subject for Tamper {
    fn deferred_frees(&self) -> usize {
        self.inner.deferred_frees()
    }
}

/// A lane running `design` with `bug`.
#[must_use]
pub fn tampered(design: Design, bug: Bug) -> LaneSpec {
    LaneSpec {
        name: format!("{design:?} with {bug:?}"),
        design,
        build: Box::new(move |cfg, alloc| {
            Ok(Box::new(Tamper::new(design.build(cfg, alloc)?, bug)) as Box<dyn Subject>)
        }),
        exclusive: false,
    }
}

/// A build function for the configuration checker: `design` with `bug`.
#[must_use]
pub fn tampered_build(design: Design, bug: Bug) -> Box<Build> {
    Box::new(move |cfg, alloc| {
        Ok(Box::new(Tamper::new(design.build(cfg, alloc)?, bug)) as Box<dyn Subject>)
    })
}

/// An allocator that drops the first page of every bulk free: a leak.
#[derive(Debug, Clone)]
pub struct LeakyAlloc(pub Hooked);

impl TableAlloc for LeakyAlloc {
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError> {
        self.0.alloc(size)
    }
    fn alloc_bulk(
        &self,
        size: u64,
        count: usize,
        out: &mut Vec<PhysAddr>,
    ) -> Result<(), AllocError> {
        self.0.alloc_bulk(size, count, out)
    }
    fn free(&self, pa: PhysAddr, size: u64) {
        self.0.free(pa, size);
    }
    fn free_bulk(&self, pages: &[PhysAddr], size: u64) {
        self.0.free_bulk(pages.get(1..).unwrap_or_default(), size);
    }
    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        self.0.table(pa)
    }
    fn clean(&self, pa: PhysAddr, bytes: u64) {
        self.0.clean(pa, bytes);
    }
}

/// Flush callbacks that swallow `flush_walk`.
#[derive(Debug, Clone)]
pub struct SkipWalkFlush(pub Arc<Device>);

impl FlushOps for SkipWalkFlush {
    fn flush_all(&self) {
        self.0.flush_all();
    }
    fn flush_walk(&self, _iova: Iova, _size: u64, _granule: u64) {}
}

/// Flush callbacks that swallow `add_page`: cleared leaves never reach the gather.
#[derive(Debug, Clone)]
pub struct SkipGather(pub Arc<Device>);

impl FlushOps for SkipGather {
    fn flush_all(&self) {
        self.0.flush_all();
    }
    fn flush_walk(&self, iova: Iova, size: u64, granule: u64) {
        self.0.flush_walk(iova, size, granule);
    }
    fn add_page(&self, _gather: &mut Gather, _iova: Iova, _size: u64) {}
}

/// A lane running `design` over [`LeakyAlloc`].
#[must_use]
pub fn leaky(design: Design) -> LaneSpec {
    LaneSpec {
        name: format!("{design:?} over a leaky allocator"),
        design,
        build: Box::new(move |cfg, alloc| {
            let dev = Arc::clone(&alloc.dev);
            design.build_with(cfg, LeakyAlloc(alloc), dev)
        }),
        exclusive: false,
    }
}

/// A lane running `design` with [`SkipWalkFlush`].
#[must_use]
pub fn no_walk_flush(design: Design) -> LaneSpec {
    LaneSpec {
        name: format!("{design:?} without walk flushes"),
        design,
        build: Box::new(move |cfg, alloc| {
            let dev = SkipWalkFlush(Arc::clone(&alloc.dev));
            design.build_with(cfg, alloc, dev)
        }),
        exclusive: false,
    }
}

/// A lane running `design` with [`SkipGather`].
#[must_use]
pub fn no_gather(design: Design) -> LaneSpec {
    LaneSpec {
        name: format!("{design:?} without gathering"),
        design,
        build: Box::new(move |cfg, alloc| {
            let dev = SkipGather(Arc::clone(&alloc.dev));
            design.build_with(cfg, alloc, dev)
        }),
        exclusive: false,
    }
}

/// The engine's codec, except that decoding forgets the 64 KiB-granule fold of PA\[51:48\].
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokenCodec;

impl Codec for BrokenCodec {
    fn encode_leaf(&self, cfg: &Config, level: u32, pa: PhysAddr, prot: Prot) -> u64 {
        Lpae.encode_leaf(cfg, level, pa, prot)
    }
    fn encode_table(&self, cfg: &Config, table: PhysAddr) -> u64 {
        Lpae.encode_table(cfg, table)
    }
    fn kind(&self, format: iopt_api::Format, level: u32, d: u64) -> Kind {
        Lpae.kind(format, level, d)
    }
    fn unpack_pa(&self, d: u64, granule: Granule) -> PhysAddr {
        let _ = granule;
        PhysAddr::new(d & 0x0000_ffff_ffff_f000)
    }
    fn pack_pa(&self, pa: PhysAddr) -> u64 {
        Lpae.pack_pa(pa)
    }
    fn decode_prot(&self, cfg: &Config, d: u64) -> Prot {
        Lpae.decode_prot(cfg, d)
    }
}
