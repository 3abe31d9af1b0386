//! Unmap that hands back what it removed: the output-address runs of every leaf an unmap
//! clears, as iommufd needs to unpin exactly those pages. The leaves are found by a walk limited
//! to the unmapped range before the ordinary unmap runs, so the plain unmap pays nothing.

use crate::account::Accounting;
use crate::desc::{self, Kind};
use crate::engine::{Engine, Run};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use iopt_api::{FlushOps, Gather, Iova, PaRun, TableAlloc, TableRef, UnmapError, push_pa_run};

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Unmaps a validated run as [`unmap_run`](Engine::unmap_run) does and appends the
    /// output-address runs of the leaves it cleared to `removed` (nothing on error).
    ///
    /// # Errors
    ///
    /// As [`unmap_run`](Engine::unmap_run).
    pub fn unmap_collect(
        &self,
        r: Run,
        gather: &mut Gather,
        removed: &mut Vec<PaRun>,
    ) -> Result<u64, UnmapError> {
        let mut found = Vec::new();
        {
            let _guard = self.enter();
            let last = r.iova + (r.count * r.size.get() - 1);
            if let Some(root) = self.allocator().table(self.root()) {
                self.leaves_in(
                    root,
                    self.config().start_level(),
                    0,
                    r.iova,
                    last,
                    &mut found,
                );
            }
        }
        let bytes = self.unmap_run(r, gather)?;
        removed.extend(found);
        Ok(bytes)
    }

    /// Appends the leaves of `table` (at `level`, covering local IOVAs from `base`) that
    /// intersect `[first, last]`.
    fn leaves_in(
        &self,
        table: TableRef<'_>,
        level: u32,
        base: u64,
        first: u64,
        last: u64,
        out: &mut Vec<PaRun>,
    ) {
        let cfg = self.config();
        let shift = cfg.level_shift(level);
        let entries = cfg.entries_at(level).min(table.entries.len());
        let lo = usize::try_from((first.max(base) - base) >> shift).unwrap_or(usize::MAX);
        let hi =
            usize::try_from((last - base) >> shift).map_or(entries - 1, |h| h.min(entries - 1));
        let high = if cfg.is_ttbr1() {
            !((1u64 << cfg.ias()) - 1)
        } else {
            0
        };
        for i in lo..=hi {
            let Some(e) = table.entries.get(i).map(|e| e.load(Ordering::Acquire)) else {
                break;
            };
            let at = base + ((i as u64) << shift);
            match desc::kind(cfg.format(), level, e) {
                Kind::Invalid => {}
                Kind::Leaf => push_pa_run(
                    out,
                    Iova::new(high | at),
                    desc::unpack_pa(e, cfg.granule()),
                    1 << shift,
                ),
                Kind::Table => {
                    if let Some(sub) = self.allocator().table(desc::unpack_pa(e, cfg.granule())) {
                        self.leaves_in(sub, level + 1, at, first, last, out);
                    }
                }
            }
        }
    }
}
