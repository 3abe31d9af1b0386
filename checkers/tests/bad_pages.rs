//! Pages from the caller's allocator that a table cannot use: smaller than asked, not aligned
//! to their size, or at an address a table descriptor cannot hold. Every table must refuse
//! them with [`AllocError::BadPage`], change nothing, give the page back and leak nothing
//! (before, a short page made `map` panic in the chain builder, and a page above 2^48 was
//! linked with bit 48 folded into bit 12, so the walk lost the leaf and drop freed the wrong
//! pages).

use iopt_alloc_ops::AllocOpsTable;
use iopt_api::{
    AllocError, Gather, IoPageTable, Iova, IovaRange, MapError, NoFlush, PageSize, PhysAddr, Prot,
    Reserve, ReserveError, TableAlloc, TableRef,
};
use iopt_checkers::races::config as cfg;
use iopt_lpae::LpaeTable;
use iopt_prealloc::PreallocTable;
use iopt_sim::{SimLayout, SimMemory};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// What the allocator hands out next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Good = 0,
    /// Half the size asked for.
    Short = 1,
    /// From memory based at 2^48: no 4 KiB-granule descriptor holds the address.
    High = 2,
    /// From memory based at 2^30 + 8: not aligned to the page size.
    Misaligned = 3,
}

struct Flaky {
    good: SimMemory,
    high: SimMemory,
    misaligned: SimMemory,
    mode: AtomicU8,
    short: Mutex<HashSet<u64>>,
}

impl Flaky {
    fn new() -> Self {
        let at = |base| {
            SimMemory::with_layout(SimLayout {
                base,
                region_span: 1 << 30,
            })
        };
        Self {
            good: SimMemory::new(),
            high: at(1 << 48),
            misaligned: at((1 << 30) + 8 + (8 << 30)),
            mode: AtomicU8::new(Mode::Good as u8),
            short: Mutex::new(HashSet::new()),
        }
    }

    fn set(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::SeqCst);
    }

    fn mems(&self) -> [&SimMemory; 3] {
        [&self.good, &self.high, &self.misaligned]
    }

    fn live_pages(&self) -> u64 {
        self.mems().iter().map(|m| m.stats().live_pages).sum()
    }

    fn bad_frees(&self) -> u64 {
        self.mems().iter().map(|m| m.stats().bad_frees).sum()
    }
}

impl TableAlloc for Flaky {
    fn alloc(&self, size: u64) -> Result<PhysAddr, AllocError> {
        match self.mode.load(Ordering::SeqCst) {
            0 => self.good.alloc(size),
            1 => {
                let pa = self.good.alloc(size / 2)?;
                self.short.lock().unwrap().insert(pa.get());
                Ok(pa)
            }
            2 => self.high.alloc(size),
            _ => self.misaligned.alloc(size),
        }
    }

    fn free(&self, pa: PhysAddr, size: u64) {
        if self.short.lock().unwrap().remove(&pa.get()) {
            return self.good.free(pa, size / 2);
        }
        match self.mems().into_iter().find(|m| m.table(pa).is_some()) {
            Some(m) => m.free(pa, size),
            None => self.good.free(pa, size),
        }
    }

    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        self.mems().into_iter().find_map(|m| m.table(pa))
    }
}

const BAD: [Mode; 3] = [Mode::Short, Mode::High, Mode::Misaligned];
const VA: u64 = 0x40_0000_0000;

/// A map that needs three new tables, offered each bad page kind: a typed error, the table
/// unchanged, the pages given back; then the same map with good pages works, and drop returns
/// everything.
fn refuses_bad_pages<T: IoPageTable>(make: impl Fn(Arc<Flaky>) -> T) {
    for mode in BAD {
        let mem = Arc::new(Flaky::new());
        let t = make(Arc::clone(&mem));
        let before = mem.live_pages();
        mem.set(mode);
        let got = t.map(
            Iova::new(VA),
            PhysAddr::new(0x8000_0000),
            PageSize::SZ_4K,
            1,
            Prot::READ,
        );
        assert!(
            matches!(
                got,
                Err(MapError::Alloc {
                    source: AllocError::BadPage { .. }
                })
            ),
            "{mode:?}: {got:?}"
        );
        assert_eq!(mem.live_pages(), before, "{mode:?}: pages given back");
        assert_eq!(t.iova_to_phys(Iova::new(VA)), None, "{mode:?}");
        let mut tables = 0;
        t.walk(&mut |item| {
            if matches!(item, iopt_api::WalkItem::Table { .. }) {
                tables += 1;
            }
        });
        assert_eq!(tables, 1, "{mode:?}: the root alone");
        mem.set(Mode::Good);
        t.map(
            Iova::new(VA),
            PhysAddr::new(0x8000_0000),
            PageSize::SZ_4K,
            1,
            Prot::READ,
        )
        .unwrap();
        assert_eq!(
            t.iova_to_phys(Iova::new(VA + 0x123)).map(|x| x.pa),
            Some(PhysAddr::new(0x8000_0123))
        );
        drop(t);
        assert_eq!(
            (mem.live_pages(), mem.bad_frees()),
            (0, 0),
            "{mode:?}: nothing leaked"
        );
    }
}

#[test]
fn reference_table_refuses_bad_pages() {
    refuses_bad_pages(|m| LpaeTable::new(cfg(), m).unwrap());
}

#[test]
fn design1_refuses_bad_pages() {
    refuses_bad_pages(|m| AllocOpsTable::new(cfg(), m).unwrap());
    refuses_bad_pages(|m| AllocOpsTable::freeing_empty_tables(cfg(), m, NoFlush).unwrap());
}

#[test]
fn design2_refuses_bad_pages() {
    refuses_bad_pages(|m| PreallocTable::new(cfg(), m).unwrap());
}

#[test]
fn design2_reserve_refuses_bad_pages() {
    for mode in BAD {
        let mem = Flaky::new();
        let t = PreallocTable::new(cfg(), &mem).unwrap();
        mem.set(mode);
        let range = IovaRange::new(Iova::new(VA), 0x4000, 0x1000).unwrap();
        let got = t.reserve(range, PageSize::SZ_4K);
        assert!(
            matches!(
                got,
                Err(ReserveError::Alloc {
                    source: AllocError::BadPage { .. }
                })
            ),
            "{mode:?}: {got:?}"
        );
        assert_eq!(mem.live_pages(), 1, "{mode:?}: the root alone");
        mem.set(Mode::Good);
        let res = t.reserve(range, PageSize::SZ_4K).unwrap();
        let mut g = Gather::new();
        assert!(t.release(res, &mut g).is_ok());
        drop(t);
        assert_eq!((mem.live_pages(), mem.bad_frees()), (0, 0), "{mode:?}");
    }
}

#[test]
fn bad_roots_are_refused() {
    for mode in BAD {
        let mem = Flaky::new();
        mem.set(mode);
        assert!(
            matches!(LpaeTable::new(cfg(), &mem), Err(AllocError::BadPage { .. })),
            "{mode:?}"
        );
        assert_eq!((mem.live_pages(), mem.bad_frees()), (0, 0), "{mode:?}");
    }
}
