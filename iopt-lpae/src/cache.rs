//! Cache maintenance for table walkers that do not snoop the CPU's caches
//! (`coherent_walk = false`), as Linux's io-pgtable-arm does it.
//!
//! A non-coherent SMMU or GPU reads descriptors from memory, so every CPU write must be
//! cleaned from the CPU's caches before the walker may observe it. The rules, one helper each:
//!
//! - a **new table page** is cleaned whole, after the table filled it privately and before it
//!   is linked ([`sync_table`](Engine::sync_table)); the links inside such a private chain are
//!   written already marked ([`private_link`](Engine::private_link));
//! - **leaf and clear writes** are cleaned over exactly the entries written, before the walk
//!   flush or free that relies on them ([`sync_entries`](Engine::sync_entries));
//! - a **table descriptor** is cleaned right after its compare-exchange installed it, and then
//!   marked with the software bit [`SW_SYNC`](desc::SW_SYNC) (bit 55), unless it changed
//!   meanwhile ([`sync_installed`](Engine::sync_installed));
//! - a map walk that meets a table descriptor **without** `SW_SYNC` cleans it itself
//!   ([`sync_seen`](Engine::sync_seen)): a concurrent installer may not have cleaned it yet,
//!   and the leaf about to be written below it must not become visible through an uncleaned
//!   path. Once marked, later walks skip the clean, so concurrent installers clean once.
//!
//! With a coherent walker every helper is one predictable branch; nothing is cleaned and
//! `SW_SYNC` is never set (Linux's behaviour too).

use crate::account::Accounting;
use crate::desc;
use crate::engine::Engine;
use core::sync::atomic::Ordering;
use iopt_api::{FlushOps, PhysAddr, TableAlloc, TableRef};

impl<A: TableAlloc, F: FlushOps, K: Accounting> Engine<A, F, K> {
    /// Whether descriptor writes need cleaning.
    #[inline]
    pub(crate) fn non_coherent(&self) -> bool {
        !self.config().coherent_walk()
    }

    /// The descriptor of the table at `pa` for a link written inside a private, not yet
    /// published page: that page is cleaned whole before publication, so a non-coherent
    /// walker's link is marked [`SW_SYNC`](desc::SW_SYNC) from the start.
    #[inline]
    pub(crate) fn private_link(&self, pa: PhysAddr) -> u64 {
        let d = desc::encode_table(self.config(), pa);
        if self.non_coherent() {
            d | desc::SW_SYNC
        } else {
            d
        }
    }

    /// Cleans entries `first .. first + n` of `t` (non-coherent walkers only).
    #[inline]
    pub(crate) fn sync_entries(&self, t: TableRef<'_>, first: usize, n: usize) {
        if self.non_coherent() && n > 0 {
            self.clean(t.pa.get() + first as u64 * 8, n as u64 * 8);
        }
    }

    /// Cleans a whole table page the table built privately, before it is linked.
    #[inline]
    pub(crate) fn sync_table(&self, t: TableRef<'_>) {
        if self.non_coherent() {
            self.clean(t.pa.get(), t.entries.len() as u64 * 8);
        }
    }

    /// After this thread installed the table descriptor `new` at `idx` of `t`: cleans it and
    /// then marks it [`SW_SYNC`](desc::SW_SYNC), unless it changed meanwhile.
    #[inline]
    pub(crate) fn sync_installed(&self, t: TableRef<'_>, idx: usize, new: u64) {
        if self.non_coherent() {
            self.clean(t.pa.get() + idx as u64 * 8, 8);
            if let Some(e) = t.entries.get(idx) {
                // Losing this exchange means the slot changed meanwhile: nothing to mark.
                let _ = e.compare_exchange(
                    new,
                    new | desc::SW_SYNC,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// A map walk met the table descriptor `e` at `idx` of `t`: cleans it if no installer
    /// marked it cleaned yet.
    #[inline]
    pub(crate) fn sync_seen(&self, t: TableRef<'_>, idx: usize, e: u64) {
        if self.non_coherent() && e & desc::SW_SYNC == 0 {
            self.clean(t.pa.get() + idx as u64 * 8, 8);
        }
    }

    #[cold]
    #[inline(never)]
    fn clean(&self, pa: u64, bytes: u64) {
        let c = self.counters();
        c.cache_cleans.fetch_add(1, Ordering::Relaxed);
        c.bytes_cleaned.fetch_add(bytes, Ordering::Relaxed);
        self.allocator().clean(PhysAddr::new(pa), bytes);
    }
}
