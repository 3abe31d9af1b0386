//! Hardware dirty tracking (64-bit stage 1 with the `ARM_HD` quirk), as iommufd uses it for
//! live migration.
//!
//! With `ARM_HD`, every writable leaf is written with DBM (bit 51) and AP\[2\] clear, so it
//! starts out *dirty*; an SMMU with HTTU clears AP\[2\] when the device writes through a leaf
//! whose AP\[2\] is set. [`Engine::read_and_clear_dirty`] reports every dirty leaf's whole
//! block to a [`DirtySink`] and cleans it by setting AP\[2\] (unless
//! [`DirtyFlags::NO_CLEAR`]); the caller then invalidates the gathered range so the SMMU sees
//! the clean state. Unlike Linux, a range with a hole is refused before anything is cleaned.

use crate::account::Accounting;
use crate::desc::{self, Kind};
use crate::engine::Engine;
use core::sync::atomic::Ordering;
use iopt_api::{DirtyError, FlushOps, Format, Gather, Iova, IovaRange, TableAlloc};

pub use iopt_api::{BitmapError, DirtyBitmap, DirtyFlags, DirtySink};

/// A leaf found by the range walk: where its descriptor lives and what it maps.
struct LeafAt<'a> {
    slot: &'a iopt_api::atomic::AtomicU64,
    table: iopt_api::TableRef<'a>,
    idx: usize,
    start: u64,
    size: u64,
}

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Finds the leaf covering `iova` (a local address).
    fn leaf_at(&self, iova: u64) -> Result<LeafAt<'_>, DirtyError> {
        let cfg = self.config();
        let ext = |a: u64| {
            if cfg.is_ttbr1() {
                Iova::new(a | !((1u64 << cfg.ias()) - 1))
            } else {
                Iova::new(a)
            }
        };
        let mut pa = self.root();
        let mut level = cfg.start_level();
        loop {
            let table = self.allocator().table(pa).ok_or(DirtyError::BrokenTable {
                iova: ext(iova),
                pa,
            })?;
            let idx = cfg.index(iova, level);
            let slot = table.entries.get(idx).ok_or(DirtyError::BrokenTable {
                iova: ext(iova),
                pa,
            })?;
            let d = slot.load(Ordering::Acquire);
            match desc::kind(cfg.format(), level, d) {
                Kind::Invalid => return Err(DirtyError::NotMapped { iova: ext(iova) }),
                Kind::Table => {
                    pa = desc::unpack_pa(d, cfg.granule());
                    level += 1;
                }
                Kind::Leaf => {
                    let size = cfg.block_size(level);
                    return Ok(LeafAt {
                        slot,
                        table,
                        idx,
                        start: iova & !(size - 1),
                        size,
                    });
                }
            }
        }
    }

    /// Reports every dirty leaf in `range` (its whole block) to `sink` and the gather, and
    /// cleans it unless `flags` has [`DirtyFlags::NO_CLEAR`] (Linux's
    /// `read_and_clear_dirty`). The caller invalidates the gathered range afterwards.
    ///
    /// # Errors
    ///
    /// [`DirtyError::Unsupported`] for any format but 64-bit stage 1,
    /// [`DirtyError::OutOfRange`] when the range leaves the input range,
    /// [`DirtyError::NotMapped`] when the range holds an unmapped page — checked before any
    /// leaf is reported or cleaned.
    pub fn read_and_clear_dirty(
        &self,
        range: IovaRange,
        flags: DirtyFlags,
        sink: &mut dyn DirtySink,
        gather: &mut Gather,
    ) -> Result<(), DirtyError> {
        let _guard = self.enter();
        let cfg = self.config();
        if cfg.format() != Format::Arm64S1 {
            return Err(DirtyError::Unsupported {
                format: cfg.format(),
            });
        }
        if !cfg.iova_in_range(range.start()) || !cfg.iova_in_range(range.last()) {
            return Err(DirtyError::OutOfRange { range });
        }
        let mask = if cfg.ias() >= 64 {
            u64::MAX
        } else {
            (1u64 << cfg.ias()) - 1
        };
        let first = range.start().get() & mask;
        let last = range.last().get() & mask;
        let high = range.start().get() & !mask;
        // Check pass: every page of the range is mapped.
        let mut at = first;
        loop {
            let leaf = self.leaf_at(at)?;
            match (leaf.start + leaf.size).checked_sub(1) {
                Some(end) if end < last => at = end + 1,
                _ => break,
            }
        }
        // Harvest pass.
        let mut at = first;
        loop {
            let leaf = self.leaf_at(at)?;
            let d = leaf.slot.load(Ordering::Acquire);
            if d & (desc::AP_RDONLY | desc::DBM) == desc::DBM {
                let iova = Iova::new(high | leaf.start);
                sink.record(iova, leaf.size);
                gather.add(iova, leaf.size);
                if !flags.contains(DirtyFlags::NO_CLEAR) {
                    leaf.slot.fetch_or(desc::AP_RDONLY, Ordering::AcqRel);
                    self.sync_entries(leaf.table, leaf.idx, 1);
                }
            }
            match (leaf.start + leaf.size).checked_sub(1) {
                Some(end) if end < last => at = end + 1,
                _ => return Ok(()),
            }
        }
    }
}
