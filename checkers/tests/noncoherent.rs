//! Non-coherent walkers (`coherent_walk = false`): every descriptor write is cleaned over
//! exactly what it wrote before anything can rely on it, installed table descriptors carry
//! `SW_SYNC` (bit 55), and a clean that is skipped shows up as a wrong hardware translation.
//!
//! The memory is `SimMemory::non_coherent`: the hardware-walk oracle reads only what was
//! cleaned, and a page nobody cleaned since its allocation reads as a stale table descriptor.

use iopt_alloc_ops::AllocOpsTable;
use iopt_api::{
    AllocError, Config, ConfigInput, Format, Gather, IoPageTable, Iova, IovaRange, PageSize,
    PageSizes, PhysAddr, Prot, Quirks, Reserve, TableAlloc, TableRef, WalkItem,
};
use iopt_lpae::desc::SW_SYNC;
use iopt_prealloc::PreallocTable;
use iopt_sim::SimMemory;
use iopt_sim::oracle::{Access, Fault, Walker};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Non-coherent memory that logs every clean and can drop the `skip`-th one, as a table that
/// forgot it would.
#[derive(Debug)]
struct Recorder {
    mem: SimMemory,
    log: Mutex<Vec<(u64, u64)>>,
    seen: AtomicUsize,
    skip: Option<usize>,
    /// The address the skipped clean was for.
    skipped: Mutex<Option<u64>>,
}

impl Recorder {
    fn new(skip: Option<usize>) -> Self {
        Self {
            mem: SimMemory::non_coherent(),
            log: Mutex::new(Vec::new()),
            seen: AtomicUsize::new(0),
            skip,
            skipped: Mutex::new(None),
        }
    }

    fn take_log(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl TableAlloc for Recorder {
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
        self.mem.free(pa, size);
    }
    fn free_bulk(&self, pages: &[PhysAddr], size: u64) {
        self.mem.free_bulk(pages, size);
    }
    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        self.mem.table(pa)
    }
    fn clean(&self, pa: PhysAddr, bytes: u64) {
        let k = self.seen.fetch_add(1, Ordering::Relaxed);
        self.log.lock().unwrap().push((pa.get(), bytes));
        if self.skip == Some(k) {
            *self.skipped.lock().unwrap() = Some(pa.get());
        } else {
            self.mem.clean(pa, bytes);
        }
    }
}

fn config(format: Format, coherent: bool) -> Config {
    let oas = if format == Format::Mali { 40 } else { 48 };
    let mut input = ConfigInput::new(format, PageSizes::from_bits(0x4020_1000), 48, oas)
        .with_coherent_walk(coherent);
    if format == Format::Arm64S1 && !coherent {
        input = input.with_quirks(Quirks::OUTER_WBWA);
    }
    Config::new(input).unwrap()
}

const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHE);

fn page(n: u64) -> PageSize {
    PageSize::new(n).unwrap()
}

/// Maps `n` 4 KiB pages at `iova` to `pa`, read-write.
fn map4k(t: &dyn IoPageTable, iova: u64, pa: u64, n: u64) {
    t.map(Iova::new(iova), PhysAddr::new(pa), page(K4), n, RW)
        .unwrap();
}

/// The table as the workload needs it: the plain operations, and reservations where the
/// design has them.
trait Subject: IoPageTable {
    fn reserved_cycle(&self, gather: &mut Gather, probe: &mut dyn FnMut(&[u64]));
}

impl<A: TableAlloc, K: iopt_lpae::account::Accounting> Subject
    for AllocOpsTable<A, iopt_api::NoFlush, K>
{
    fn reserved_cycle(&self, gather: &mut Gather, probe: &mut dyn FnMut(&[u64])) {
        reserved_cycle(self, gather, probe);
    }
}

impl<A: TableAlloc> Subject for PreallocTable<A> {
    fn reserved_cycle(&self, gather: &mut Gather, probe: &mut dyn FnMut(&[u64])) {
        reserved_cycle(self, gather, probe);
    }
}

/// Reserve 4 MiB, map pages in both halves, release, probing after the maps and after the
/// release.
fn reserved_cycle<T: Reserve + ?Sized>(t: &T, gather: &mut Gather, probe: &mut dyn FnMut(&[u64])) {
    let base = 0x80_0000_0000;
    let range = IovaRange::new(Iova::new(base), 2 * M2, K4).unwrap();
    let r = t.reserve(range, page(K4)).unwrap();
    t.map_reserved(
        &r,
        Iova::new(base + 3 * K4),
        PhysAddr::new(0x9000_0000),
        page(K4),
        1,
        RW,
    )
    .unwrap();
    t.map_reserved(
        &r,
        Iova::new(base + M2),
        PhysAddr::new(0xa000_0000),
        page(K4),
        8,
        RW,
    )
    .unwrap();
    let touched = [base, base + 3 * K4, base + M2];
    probe(&touched);
    t.release(r, gather).unwrap();
    probe(&touched);
}

/// The operations, each returning the IOVAs it touched; `probe` runs after each one.
fn workload(t: &dyn Subject, probe: &mut dyn FnMut(&[u64])) {
    let mut g = Gather::new();
    let pa = |a: u64| PhysAddr::new(a);
    t.map(Iova::new(0x1000_0000), pa(0x8000_0000), page(K4), 1, RW)
        .unwrap();
    probe(&[0x1000_0000]);
    t.map(Iova::new(0x1000_2000), pa(0x8000_2000), page(K4), 1, RW)
        .unwrap();
    probe(&[0x1000_2000]);
    t.map(Iova::new(0x4000_0000), pa(0xc000_0000), page(M2), 1, RW)
        .unwrap();
    probe(&[0x4000_0000]);
    t.map_range(Iova::new(0x101f_0000), pa(0x8100_0000), 0x2_0000, RW)
        .unwrap();
    probe(&[0x101f_0000, 0x1020_0000, 0x1020_f000]);
    assert_eq!(t.unmap(Iova::new(0x1000_2000), page(K4), 1, &mut g), Ok(K4));
    probe(&[0x1000_2000]);
    assert_eq!(t.unmap(Iova::new(0x4000_0000), page(M2), 1, &mut g), Ok(M2));
    probe(&[0x4000_0000]);
    t.map(Iova::new(0x4000_0000), pa(0xd000_0000), page(K4), 4, RW)
        .unwrap();
    probe(&[0x4000_0000, 0x4000_3000]);
    // A block over an empty leaf table replaces (and frees) the table.
    assert_eq!(
        t.unmap(Iova::new(0x4000_0000), page(K4), 4, &mut g),
        Ok(4 * K4)
    );
    probe(&[0x4000_0000, 0x4000_3000]);
    t.map(Iova::new(0x4000_0000), pa(0xe000_0000), page(M2), 1, RW)
        .unwrap();
    probe(&[0x4000_0000, 0x4000_3000]);
    t.reserved_cycle(&mut g, probe);
    assert_eq!(
        t.unmap(Iova::new(0x101f_0000), page(K4), 32, &mut g),
        Ok(32 * K4)
    );
    probe(&[0x101f_0000, 0x1020_0000, 0x1020_f000]);
}

/// Compares what the device sees in memory with the CPU's view of every reachable table,
/// and the hardware walk with the table's own lookup
/// at every touched IOVA and at neighbours in other cache lines of every table on its way;
/// returns the first
/// difference.
fn mismatch(t: &dyn Subject, mem: &SimMemory, walker: &Walker, touched: &[u64]) -> Option<String> {
    // Every table the CPU reaches must read the same in memory (a clean that would only
    // have unlinked a table leaves the walker a path into it).
    let mut tables = vec![t.root()];
    t.walk(&mut |item| {
        if let WalkItem::Table { pa, .. } = item {
            tables.push(pa);
        }
    });
    if let Some((pa, cpu, dev)) = tables.iter().find_map(|&p| mem.first_stale(p)) {
        return Some(format!("{pa:?}: the CPU holds {cpu:#x}, memory {dev:#x}"));
    }
    // Far from everything mapped: what the root and the first tables hold elsewhere.
    let far = [0x7f00_0000_0000, 0x10_0000_0000, 0x1_0000_0000];
    for &base in touched.iter().chain(&far) {
        // Other cache lines of the tables on the way: 8, 64 and 200 entries along at each level.
        let deltas = [K4, M2, 1 << 30]
            .into_iter()
            .flat_map(|bs| [8 * bs, 64 * bs, 200 * bs])
            .chain([0]);
        for delta in deltas {
            let iova = base.wrapping_add(delta);
            let sw = t.iova_to_phys(Iova::new(iova)).map(|x| x.pa.get());
            let hw = match walker.translate(mem, iova, Access::READ) {
                Ok(h) => Some(h.pa.get()),
                Err(Fault::Translation { .. }) => None,
                // A walk through stale memory: an external abort, not an empty entry.
                Err(f) => return Some(format!("{iova:#x}: the walker faults with {f:?}")),
            };
            if sw != hw {
                return Some(format!(
                    "{iova:#x}: table says {sw:x?}, the walker sees {hw:x?}"
                ));
            }
        }
    }
    None
}

type Build = fn(Config, &'static Recorder) -> Box<dyn Subject>;

fn designs() -> [(&'static str, Build); 3] {
    [
        ("Design 1", |c, a| {
            Box::new(AllocOpsTable::new(c, a).unwrap())
        }),
        ("Design 1, eager free", |c, a| {
            Box::new(AllocOpsTable::freeing_empty_tables(c, a, iopt_api::NoFlush).unwrap())
        }),
        ("Design 2", |c, a| {
            Box::new(PreallocTable::new(c, a).unwrap())
        }),
    ]
}

/// What a run with one clean skipped showed.
#[derive(Debug)]
enum Seen {
    /// A hardware walk, or memory, disagreed with the table.
    Caught(#[allow(dead_code)] String),
    /// The skipped clean was of a table page the same operation then unlinked and freed: no
    /// walk can reach what it would have published.
    Moot,
    Unnoticed,
}

/// Runs the workload with the `skip`-th clean dropped; returns the cleans issued and what
/// the hardware walks saw.
fn run(format: Format, build: Build, skip: Option<usize>) -> (usize, Seen) {
    let rec: &'static Recorder = Box::leak(Box::new(Recorder::new(skip)));
    let cfg = config(format, false);
    let t = build(cfg, rec);
    let walker = Walker::from_registers(format, &t.registers(), false, cfg.ias()).unwrap();
    let mut seen = Seen::Unnoticed;
    workload(t.as_ref(), &mut |touched| {
        if !matches!(seen, Seen::Unnoticed) {
            return;
        }
        if let Some(why) = mismatch(t.as_ref(), &rec.mem, &walker, touched) {
            seen = Seen::Caught(why);
        } else if let Some(pa) = *rec.skipped.lock().unwrap() {
            if rec.mem.table(PhysAddr::new(pa & !0xfff)).is_none() {
                seen = Seen::Moot;
            }
        }
    });
    let n = rec.seen.load(Ordering::Relaxed);
    drop(t);
    assert_eq!(rec.mem.stats().live_pages, 0, "leak");
    assert_eq!(rec.mem.stats().bad_cleans, 0, "a clean outside a live page");
    (n, seen)
}

#[test]
fn with_every_clean_done_the_walker_sees_what_the_table_holds() {
    for format in [Format::Arm64S1, Format::Mali] {
        for (name, build) in designs() {
            let (n, seen) = run(format, build, None);
            assert!(n > 10, "{name} {format:?}: only {n} cleans");
            assert!(
                matches!(seen, Seen::Unnoticed),
                "{name} {format:?}: {seen:?}"
            );
        }
    }
}

#[test]
fn every_single_skipped_clean_is_caught_by_a_hardware_walk() {
    for format in [Format::Arm64S1, Format::Mali] {
        for (name, build) in designs() {
            let (n, _) = run(format, build, None);
            let mut moot = 0;
            for k in 0..n {
                match run(format, build, Some(k)).1 {
                    Seen::Caught(_) => {}
                    Seen::Moot => moot += 1,
                    Seen::Unnoticed => {
                        panic!("{name} {format:?}: skipping clean #{k} of {n} went unnoticed")
                    }
                }
            }
            // No clean is wasted on a table the same operation unlinks.
            assert_eq!(moot, 0, "{name} {format:?}: {moot} of {n} cleans moot");
            eprintln!("{name} {format:?}: each of {n} cleans skipped alone is caught");
        }
    }
}

#[test]
fn cleans_cover_exactly_the_entries_written() {
    let rec: &'static Recorder = Box::leak(Box::new(Recorder::new(None)));
    let cfg = config(Format::Arm64S1, false);
    let t = AllocOpsTable::new(cfg, rec).unwrap();
    let root = t.root().get();
    // Construction: the whole root, before the registers point a walker at it.
    assert_eq!(rec.take_log(), [(root, 4096)]);

    // A new path: three private pages, each cleaned whole, then the one descriptor that
    // links them.
    map4k(&t, 0x1000_0000, 0x8000_0000, 1);
    let log = rec.take_log();
    assert_eq!(log.len(), 4, "{log:x?}");
    assert!(log[..3].iter().all(|&(_, n)| n == 4096), "{log:x?}");
    assert_eq!(log[3], (root, 8), "L0 entry 0");
    let leaf_table = log[2].0;

    // Into the existing leaf table: one 8-byte clean at the entry written.
    map4k(&t, 0x1000_5000, 0x8000_5000, 1);
    assert_eq!(rec.take_log(), [(leaf_table + 5 * 8, 8)]);

    // Twenty entries in one call: one clean of 160 bytes.
    map4k(&t, 0x1001_0000, 0x8001_0000, 20);
    assert_eq!(rec.take_log(), [(leaf_table + 16 * 8, 160)]);

    // Unmapping three of them: one clean of 24 bytes.
    let mut g = Gather::new();
    t.unmap(Iova::new(0x1001_8000), page(K4), 3, &mut g)
        .unwrap();
    assert_eq!(rec.take_log(), [(leaf_table + 24 * 8, 24)]);

    // A failed map writes nothing and cleans nothing.
    assert!(
        t.map(Iova::new(0x1000_5000), PhysAddr::new(0), page(K4), 1, RW)
            .is_err()
    );
    assert_eq!(rec.take_log(), []);

    let s = t.stats();
    assert_eq!(s.cache_cleans, 8);
    assert_eq!(s.bytes_cleaned, 4 * 4096 + 8 + 8 + 160 + 24);
}

#[test]
fn installed_table_descriptors_carry_sw_sync_only_when_not_coherent() {
    for coherent in [true, false] {
        let mem = SimMemory::non_coherent();
        let cfg = config(Format::Arm64S1, coherent);
        let t = PreallocTable::new(cfg, &mem).unwrap();
        map4k(&t, 0x1000_0000, 0x8000_0000, 1);
        let root = mem.table(t.root()).unwrap();
        let l0 = root.entries[0].load(Ordering::Relaxed);
        assert_eq!(l0 & 3, 3, "a table descriptor");
        assert_eq!(l0 & SW_SYNC != 0, !coherent, "coherent = {coherent}");
        if coherent {
            assert_eq!(t.stats().cache_cleans, 0);
        } else {
            // Bit 55 is software-only: the walker ignores it.
            let w = Walker::from_registers(Format::Arm64S1, &t.registers(), false, 48).unwrap();
            let hw = w.translate(&mem, 0x1000_0000, Access::READ).unwrap();
            assert_eq!(hw.pa.get(), 0x8000_0000);
        }
    }
}

/// A walk that meets a table descriptor no installer marked as cleaned (an installer on
/// another CPU between its compare-exchange and its clean) cleans it before writing below.
#[test]
fn a_map_below_an_unsynced_table_descriptor_cleans_it_first() {
    for policy in ["linux", "refcounted"] {
        let rec: &'static Recorder = Box::leak(Box::new(Recorder::new(None)));
        let cfg = config(Format::Arm64S1, false);
        let t: Box<dyn IoPageTable> = if policy == "linux" {
            Box::new(AllocOpsTable::new(cfg, rec).unwrap())
        } else {
            Box::new(PreallocTable::new(cfg, rec).unwrap())
        };
        map4k(t.as_ref(), 0x1000_0000, 0x8000_0000, 1);
        let root = rec.mem.table(t.root()).unwrap();
        root.entries[0].fetch_and(!SW_SYNC, Ordering::Relaxed);
        rec.take_log();
        // Another leaf table under the same L0 entry, so no cursor short-cuts the walk.
        map4k(t.as_ref(), 0x2000_0000, 0x9000_0000, 1);
        let log = rec.take_log();
        assert_eq!(
            log.first(),
            Some(&(t.root().get(), 8)),
            "{policy}: {log:x?}"
        );
        // The clean by the walk does not mark it; the installer still will.
        assert_eq!(root.entries[0].load(Ordering::Relaxed) & SW_SYNC, 0);
    }
}
