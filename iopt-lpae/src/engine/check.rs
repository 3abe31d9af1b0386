//! Request validation: every check a map or unmap makes before touching memory, in Linux's
//! order (page size, start range, permission), then what Linux leaves to its caller
//! (alignment, overflow, the end of the range). A quick path tests a valid request in as few
//! branches as possible; the slow path finds which check failed.

use super::{Engine, Run};
use crate::account::Accounting;
use iopt_api::{FlushOps, Iova, MapError, PageSize, PhysAddr, Prot, TableAlloc, UnmapError};

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Validates a map request and converts it to a run, checking in Linux's order (page
    /// size, start range, permission) and then what Linux leaves to its caller.
    ///
    /// # Errors
    ///
    /// The first failing check's [`MapError`].
    #[inline]
    pub fn validate_map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<Run, MapError> {
        match self.quick_map_run::<true>(iova, pa, size, count, prot) {
            Some(run) => Ok(run),
            None => self.validate_map_slow(iova, pa, size, count, prot),
        }
    }

    /// The run of a map request that passes every check of [`validate_map`](Self::validate_map),
    /// tested in as few branches as possible; `None` if any check fails (the slow path then
    /// finds which, in Linux's order).
    #[inline]
    pub(crate) fn quick_map_run<const CHECK_IOVA: bool>(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Option<Run> {
        let level = self.cfg.leaf_level(size)?;
        let (i, p) = (iova.get(), pa.get());
        if count == 0 || !prot.is_accessible() || (i | p) & size.mask() != 0 {
            return None;
        }
        // One aligned leaf ends at `| (size - 1)`: no overflow to check.
        let (last_i, last_p) = if count == 1 {
            (i | (size.get() - 1), p | (size.get() - 1))
        } else {
            let tail = count.checked_mul(size.get())? - 1;
            (i.checked_add(tail)?, p.checked_add(tail)?)
        };
        // `pa <= last_pa`, so the last output address in range implies the first is.
        let ias = self.cfg.ias();
        if (CHECK_IOVA && (i >> ias != self.fast.iova_hi || last_i >> ias != self.fast.iova_hi))
            || !self.cfg.pa_in_range(PhysAddr::new(last_p))
        {
            return None;
        }
        Some(Run {
            iova: i & self.local_mask,
            pa: p,
            size,
            level,
            count,
        })
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn validate_map_slow(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<Run, MapError> {
        let cfg = &self.cfg;
        let level = cfg
            .leaf_level(size)
            .ok_or(MapError::InvalidPageSize { size: size.get() })?;
        if !cfg.iova_in_range(iova) {
            return Err(MapError::IovaOutOfRange { iova });
        }
        if !cfg.pa_in_range(pa) {
            return Err(MapError::PaOutOfRange { pa });
        }
        if !prot.is_accessible() {
            return Err(MapError::NoAccess { prot });
        }
        if count == 0 {
            return Err(MapError::Empty { iova });
        }
        let len = count.checked_mul(size.get()).ok_or(MapError::Overflow {
            iova,
            len: u64::MAX,
        })?;
        let last_iova = iova
            .checked_add(len - 1)
            .ok_or(MapError::Overflow { iova, len })?;
        let last_pa = pa
            .checked_add(len - 1)
            .ok_or(MapError::Overflow { iova, len })?;
        if !iova.is_aligned(size.get()) || !pa.is_aligned(size.get()) {
            return Err(MapError::Misaligned { iova, pa, size });
        }
        if !cfg.iova_in_range(last_iova) {
            return Err(MapError::IovaOutOfRange { iova: last_iova });
        }
        if !cfg.pa_in_range(last_pa) {
            return Err(MapError::PaOutOfRange { pa: last_pa });
        }
        Ok(Run {
            iova: iova.get() & self.local_mask,
            pa: pa.get(),
            size,
            level,
            count,
        })
    }

    /// Validates an unmap request and converts it to a run (`pa` is 0).
    ///
    /// # Errors
    ///
    /// The first failing check's [`UnmapError`].
    #[inline]
    pub fn validate_unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
    ) -> Result<Run, UnmapError> {
        match self.quick_unmap_run(iova, size, count) {
            Some(run) => Ok(run),
            None => self.validate_unmap_slow(iova, size, count),
        }
    }

    /// The run of an unmap request that passes every check of
    /// [`validate_unmap`](Self::validate_unmap); `None` if any fails.
    #[inline]
    pub(crate) fn quick_unmap_run(&self, iova: Iova, size: PageSize, count: u64) -> Option<Run> {
        let level = self.cfg.leaf_level(size)?;
        let i = iova.get();
        if count == 0 || i & size.mask() != 0 {
            return None;
        }
        // One aligned leaf ends at `i | (size - 1)`: no overflow to check.
        let last = if count == 1 {
            i | (size.get() - 1)
        } else {
            i.checked_add(count.checked_mul(size.get())? - 1)?
        };
        let ias = self.cfg.ias();
        if i >> ias != self.fast.iova_hi || last >> ias != self.fast.iova_hi {
            return None;
        }
        Some(Run {
            iova: i & self.local_mask,
            pa: 0,
            size,
            level,
            count,
        })
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn validate_unmap_slow(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
    ) -> Result<Run, UnmapError> {
        let cfg = &self.cfg;
        let level = cfg
            .leaf_level(size)
            .ok_or(UnmapError::InvalidPageSize { size: size.get() })?;
        if !cfg.iova_in_range(iova) {
            return Err(UnmapError::IovaOutOfRange { iova });
        }
        if count == 0 {
            return Err(UnmapError::Empty { iova });
        }
        let len = count.checked_mul(size.get()).ok_or(UnmapError::Overflow {
            iova,
            len: u64::MAX,
        })?;
        let last = iova
            .checked_add(len - 1)
            .ok_or(UnmapError::Overflow { iova, len })?;
        if !iova.is_aligned(size.get()) {
            return Err(UnmapError::Misaligned { iova, size });
        }
        if !cfg.iova_in_range(last) {
            return Err(UnmapError::IovaOutOfRange { iova: last });
        }
        Ok(Run {
            iova: iova.get() & self.local_mask,
            pa: 0,
            size,
            level,
            count,
        })
    }

    /// Entries the run covers in the leaf table holding `iova`, at most `remaining`.
    #[inline]
    pub(crate) fn entries_in_table(&self, level: u32, iova: u64, remaining: u64) -> u64 {
        let per = self.fast.per_table;
        let idx = (iova >> self.fast.shift[level as usize & 3]) & (per - 1);
        remaining.min(per - idx)
    }
}
