//! The environment a checked table runs in: simulated memory behind a hooked allocator, and a
//! simulated device whose walk cache and TLB make "freed before its flush" observable.
//!
//! A real SMMU caches table descriptors (walk cache) and leaf translations (TLB). The table's
//! contract ([`FlushOps`]) is that a table page goes back to the allocator only after
//! [`FlushOps::flush_walk`] covered the span it translated, and that every cleared leaf either
//! went into the caller's [`Gather`] or was covered by a walk flush. [`Device`] models exactly
//! that: whenever the checker lets the device translate an address it caches what it walked
//! through; `flush_walk` and `flush_all` drop cached entries; the caller's flush of a gather
//! drops the gathered leaves. [`Hooked`] tells the device about every page freed, and the device
//! records a violation when a page it still caches is freed, or when, after an operation, it
//! caches a table that is no longer linked where it found it, or a leaf that is gone but was
//! neither gathered nor walk-flushed.

use iopt_api::{AllocError, Config, FlushOps, Gather, Iova, PhysAddr, TableAlloc, TableRef};
use iopt_sim::{SimLayout, SimMemory};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

/// A table descriptor the device cached: the table at `level` translating `[lo, hi]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkEntry {
    /// First IOVA the cached table translates.
    pub lo: u64,
    /// Last IOVA it translates.
    pub hi: u64,
    /// The table's level.
    pub level: u32,
    /// The table's address.
    pub table: PhysAddr,
}

/// A leaf translation the device cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbEntry {
    /// First IOVA of the leaf.
    pub iova: u64,
    /// Bytes the leaf maps.
    pub size: u64,
    /// Output address of the leaf's first byte.
    pub pa: u64,
}

#[derive(Debug, Default)]
struct DevState {
    attached: Option<(Config, PhysAddr)>,
    walk: Vec<WalkEntry>,
    tlb: Vec<TlbEntry>,
    violations: Vec<String>,
    walk_flushes: u64,
}

/// The simulated device: a walk cache and a TLB filled by [`Device::access`], emptied by the
/// table's flush callbacks (it is the table's [`FlushOps`], through an `Arc`) and by the
/// caller's [`Device::flush_gather`].
#[derive(Debug, Default)]
pub struct Device {
    state: Mutex<DevState>,
}

fn overlaps(lo: u64, hi: u64, a: u64, b: u64) -> bool {
    lo <= b && a <= hi
}

/// Classifies a descriptor as the architecture does (independently of the engine): 0 invalid,
/// 1 table, 2 leaf.
#[must_use]
pub fn classify(cfg: &Config, level: u32, d: u64) -> u8 {
    if d & 1 == 0 {
        return 0;
    }
    if level >= 3 {
        let mali = cfg.format() == iopt_api::Format::Mali;
        let leaf = if mali { d & 3 == 1 } else { d & 3 == 3 };
        return if leaf { 2 } else { 0 };
    }
    if d & 3 == 3 { 1 } else { 2 }
}

/// The output address of a descriptor (PA\[51:48\] folded into bits \[15:12\] with 64 KiB),
/// recomputed from the format document rather than taken from the engine.
#[must_use]
pub fn out_addr(cfg: &Config, d: u64) -> u64 {
    let a = d & 0x0000_ffff_ffff_f000;
    if cfg.granule().size() == 0x1_0000 {
        (a & !0xffff) | (((a >> 12) & 0xf) << 48)
    } else {
        a
    }
}

impl Device {
    /// A device not yet pointed at a table.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, DevState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Points the device at a table (its configuration and root), emptying its caches.
    pub fn attach(&self, cfg: Config, root: PhysAddr) {
        let mut s = self.lock();
        s.attached = Some((cfg, root));
        s.walk.clear();
        s.tlb.clear();
    }

    /// Detaches the device (the table is about to be dropped).
    pub fn detach(&self) {
        let mut s = self.lock();
        s.attached = None;
        s.walk.clear();
        s.tlb.clear();
    }

    /// The device translates `iova` by reading memory, caching every table descriptor it
    /// passes and the leaf it finds. A table address that no live page backs is a violation
    /// (the device would read freed memory).
    pub fn access(&self, mem: &SimMemory, iova: u64) {
        let mut s = self.lock();
        let Some((cfg, root)) = s.attached else {
            return;
        };
        if !cfg.iova_in_range(Iova::new(iova)) {
            return;
        }
        let local = iova & ((1u64 << cfg.ias()) - 1);
        let mut table = root.get();
        let mut level = cfg.start_level();
        loop {
            let idx = cfg.index(local, level) as u64;
            let Some(d) = mem.read_u64(PhysAddr::new(table + idx * 8)) else {
                let msg = format!(
                    "device walk of {iova:#x} read L{level} table {table:#x}, which is not live \
                     memory (a freed page is still linked)"
                );
                s.violations.push(msg);
                return;
            };
            let span = cfg.block_size(level);
            match classify(&cfg, level, d) {
                1 => {
                    let next = PhysAddr::new(out_addr(&cfg, d));
                    let lo = iova & !(span - 1);
                    let e = WalkEntry {
                        lo,
                        hi: lo + (span - 1),
                        level: level + 1,
                        table: next,
                    };
                    if !s.walk.contains(&e) {
                        s.walk.push(e);
                    }
                    table = next.get();
                    level += 1;
                }
                2 => {
                    let e = TlbEntry {
                        iova: iova & !(span - 1),
                        size: span,
                        pa: out_addr(&cfg, d),
                    };
                    if !s.tlb.contains(&e) {
                        s.tlb.push(e);
                    }
                    return;
                }
                _ => return,
            }
        }
    }

    /// The caller's invalidation of everything `gather` holds (Linux's `iotlb_sync`): drops
    /// the cached leaves in its range and empties it.
    pub fn flush_gather(&self, gather: &mut Gather) {
        if let Some((a, b)) = gather.range() {
            let mut s = self.lock();
            s.tlb
                .retain(|t| !overlaps(t.iova, t.iova + (t.size - 1), a.get(), b.get()));
        }
        gather.reset();
    }

    /// A page is being handed back to the allocator: the device must not cache it.
    fn on_free(&self, pa: PhysAddr) {
        let mut s = self.lock();
        if let Some(e) = s.walk.iter().find(|e| e.table == pa).copied() {
            s.violations.push(format!(
                "table page {pa} (L{} for [{:#x}, {:#x}]) was freed while the device still \
                 cached it: no flush_walk covered its span before the free",
                e.level, e.lo, e.hi
            ));
        }
    }

    /// Checks the caches against the table as it is now, after an operation:
    ///
    /// - every cached table descriptor must still be linked where the device found it
    ///   (`linked` lists `(level, first IOVA, address)` of every reachable table below the
    ///   root): a table unlinked without a walk flush over it is a violation;
    /// - every cached leaf that no longer translates the same way (`now(iova)` gives the
    ///   current `(pa, size)`) must lie inside `gather`'s range (the caller still has to
    ///   invalidate it), or else it was removed without being gathered or walk-flushed.
    pub fn audit(
        &self,
        linked: &[(u32, u64, PhysAddr)],
        now: &dyn Fn(u64) -> Option<(u64, u64)>,
        gather: &Gather,
    ) {
        let mut s = self.lock();
        let mut found = Vec::new();
        for e in &s.walk {
            if !linked.contains(&(e.level, e.lo, e.table)) {
                found.push(format!(
                    "the device still caches L{} table {} for [{:#x}, {:#x}], which is no longer \
                     linked there: it was unlinked without a flush_walk over its span",
                    e.level, e.table, e.lo, e.hi
                ));
            }
        }
        let pending = gather.range().map(|(a, b)| (a.get(), b.get()));
        for t in &s.tlb {
            if now(t.iova) == Some((t.pa, t.size)) {
                continue;
            }
            let gathered = pending.is_some_and(|(a, b)| t.iova >= a && t.iova + (t.size - 1) <= b);
            if !gathered {
                found.push(format!(
                    "the device still caches the leaf {:#x} (+{:#x}) -> {:#x}, which is gone, \
                     but it was neither added to the gather nor covered by a flush_walk",
                    t.iova, t.size, t.pa
                ));
            }
        }
        // Report each stale entry once, then forget it, so one bug gives one message.
        if !found.is_empty() {
            s.walk
                .retain(|e| linked.contains(&(e.level, e.lo, e.table)));
            s.violations.extend(found);
        }
    }

    /// Takes the violations recorded so far.
    pub fn take_violations(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().violations)
    }

    /// Returns how many walk flushes the table issued.
    pub fn walk_flushes(&self) -> u64 {
        self.lock().walk_flushes
    }

    /// Renders the caches, for a failure dump.
    pub fn describe(&self) -> String {
        let s = self.lock();
        let mut out = String::new();
        for e in &s.walk {
            let _ = writeln!(
                out,
                "  walk cache: L{} table {} for [{:#x}, {:#x}]",
                e.level, e.table, e.lo, e.hi
            );
        }
        for t in &s.tlb {
            let _ = writeln!(out, "  tlb: {:#x} +{:#x} -> {:#x}", t.iova, t.size, t.pa);
        }
        out
    }
}

impl FlushOps for Device {
    fn flush_all(&self) {
        let mut s = self.lock();
        s.walk.clear();
        s.tlb.clear();
    }

    fn flush_walk(&self, iova: Iova, size: u64, granule: u64) {
        let _ = granule;
        let a = iova.get();
        let b = a.saturating_add(size.saturating_sub(1));
        let mut s = self.lock();
        s.walk_flushes += 1;
        s.walk.retain(|e| !overlaps(e.lo, e.hi, a, b));
        s.tlb
            .retain(|t| !overlaps(t.iova, t.iova + (t.size - 1), a, b));
    }
}

/// The allocator every checked table uses: [`SimMemory`], with every free reported to the
/// [`Device`] first.
#[derive(Debug, Clone)]
pub struct Hooked {
    /// The memory.
    pub mem: Arc<SimMemory>,
    /// The device told about frees.
    pub dev: Arc<Device>,
}

impl Hooked {
    /// Fresh memory and a fresh device.
    #[must_use]
    pub fn new() -> Self {
        Self {
            mem: Arc::new(SimMemory::new()),
            dev: Device::new(),
        }
    }

    /// Fresh memory as `cfg`'s walker sees it (non-coherent when `cfg` says so: the device
    /// then reads only what the table cleaned) and a fresh device.
    #[must_use]
    ///
    /// The memory lies below the configuration's output address size where it can (tables
    /// must: the engine refuses table pages the OAS does not reach); an OAS below 2^21 has no
    /// room for it, and building a table then fails with `AllocError::BadPage`.
    pub fn for_config(cfg: &Config) -> Self {
        let layout = if cfg.oas() < 34 {
            // Eight regions and the base below 2^oas: 9 * 2^(oas - 5) < 2^oas.
            let span = 1u64 << cfg.oas().saturating_sub(5).max(16);
            SimLayout {
                base: span,
                region_span: span,
            }
        } else {
            SimLayout::default()
        };
        let mem = if cfg.coherent_walk() {
            SimMemory::with_layout(layout)
        } else {
            SimMemory::non_coherent_with_layout(layout)
        };
        Self {
            mem: Arc::new(mem),
            dev: Device::new(),
        }
    }
}

impl Default for Hooked {
    fn default() -> Self {
        Self::new()
    }
}

impl TableAlloc for Hooked {
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError> {
        self.mem.alloc(size)
    }

    fn alloc_bulk(
        &self,
        size: u64,
        count: usize,
        out: &mut Vec<PhysAddr>,
    ) -> Result<(), AllocError> {
        self.mem.alloc_bulk(size, count, out)
    }

    fn free(&self, pa: PhysAddr, size: u64) {
        self.dev.on_free(pa);
        self.mem.free(pa, size);
    }

    fn free_bulk(&self, pages: &[PhysAddr], size: u64) {
        for &pa in pages {
            self.dev.on_free(pa);
        }
        self.mem.free_bulk(pages, size);
    }

    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        self.mem.table(pa)
    }

    fn clean(&self, pa: PhysAddr, bytes: u64) {
        self.mem.clean(pa, bytes);
    }
}
