//! The engine's own code, model-checked with `loom`.
//!
//! With the `loom` feature, table memory (`iopt_api::atomic`: every entry and every
//! `TableMeta` count) and the reclamation protocol (`iopt_lpae::reclaim`) run on loom's
//! atomics, so loom explores the interleavings (and the weak-memory outcomes it models) of the
//! compiled engine: the same `map`, `unmap` and `lookup` a driver calls, over a small
//! allocator whose pages are loom atomics. Nothing here restates the protocol.
//!
//! The allocator poisons every page it gets back: a leaf descriptor mapping [`POISON`]. A
//! lookup that answers the poison, or any resolution of a page that is not live, is a read of
//! freed table memory; a page freed twice, or one still live at the end, is a counting bug.
//!
//! Checked, each on the eager-freeing engine (`LiveCounts`), where tables come and go under
//! concurrent callers:
//!
//! 1. `lookup_finds_its_own_map_while_a_neighbour_empties_tables`: one thread maps a page,
//!    looks it up and unmaps it; another maps and unmaps a page in another leaf table under
//!    the same level-2 table, emptying and freeing tables as it goes. The lookup always finds
//!    the page, no freed page is read, and the tree ends as the root alone.
//! 2. `two_unmaps_of_one_page_count_once`: a page and a bystander share a leaf table; two
//!    threads unmap the page. Exactly one succeeds, the bystander stays mapped, and nothing
//!    is freed while it is.
//! 3. `two_maps_race_to_install_one_path`: two threads map pages under the same empty entry;
//!    one chain is published, the other is given back, both pages translate.
//! 4. `a_lookup_racing_the_unmap_that_frees_its_path_reads_no_freed_table`: one thread looks a
//!    page up while another unmaps it, freeing its leaf table and the level-2 table above.
//!    The lookup answers the page or nothing, never a freed table's contents; and with
//!    reclamation made to ignore announcements
//!    (`reclaim_that_ignores_announcements_is_caught`), loom finds the read of a freed table.
//! 5. `a_reservation_and_the_unmap_that_empties_its_table_free_it_once`: one thread unmaps
//!    the last page of a leaf table while another reserves a range in that table and releases
//!    it. Whatever the order, the table is freed exactly once and never while reserved, and
//!    the tree ends as the root alone.
//! 6. `seed_release_spares_an_on_demand_map_into_its_tables` (`ReservationCounts`): one
//!    thread maps a page outside any reservation into the leaf table a reservation installed,
//!    while another releases the reservation, which frees the tables it leaves unreserved and
//!    empty. The transient pin and the claim's scan order them: the page always translates at
//!    the end, and no table is freed under it.
//! 7. `a_held_table_unlinked_from_above_is_freed_once_by_its_holder`: a leaf table a
//!    reservation holds (issue 20, finding 4: `iopt_lpae::engine::hold`) sits under a level-2
//!    table that was there before; one thread unmaps the whole 1 GiB at block size while
//!    another releases the hold. Whatever the order, the held table is freed exactly once
//!    (by the unmap, or by its holder after the unmap orphaned it) and the tree ends as the
//!    root alone.
//! 8. `a_table_held_from_birth_survives_a_neighbour_emptying_it`: one thread maps a page
//!    through a holding source and unmaps it, another maps and unmaps a page of its own in
//!    the same leaf table on demand. The chain the holding map installs (if it wins the
//!    install race) is still there, empty, after both unmaps, and its release frees it; a
//!    chain the other thread installed is freed by the unmaps as usual.
//!
//! Run: `cargo test -p iopt-checkers --features loom --test loom_engine --release`.
#![cfg(feature = "loom")]

use iopt_api::atomic::AtomicU64;
use iopt_api::{
    AllocError, Config, ConfigInput, Format, Gather, Iova, IovaRange, MapError, NoFlush, PageSize,
    PageSizes, PhysAddr, Prot, TableAlloc, TableMeta, TableRef,
};
use iopt_lpae::account::{LiveCounts, ReservationCounts, Reserving};
use iopt_lpae::engine::hold::{Chain, Holds};
use iopt_lpae::{Engine, PageSource};
use loom::sync::Mutex;
use loom::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};

/// Pages in the allocator, never reused within an execution (so a fresh page needs no zeroing,
/// a branch point per entry under the model checker): a root, and two threads' chains with
/// lost races.
const PAGES: usize = 16;
/// Entries poisoned on free: those the models' addresses use at every level.
const POISONED: usize = 4;
/// Physical address of page 0.
const BASE: u64 = 0x10_0000;
/// The output address of the leaf the allocator writes into every page it gets back.
const POISON: u64 = 0xdead_0000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Live {
    Never,
    Yes,
    Freed,
}

struct Page {
    entries: Box<[AtomicU64]>,
    meta: TableMeta,
}

/// A loom-visible allocator of 4 KiB pages.
struct Pages {
    memory: Vec<Page>,
    /// Each page's state.
    live: Mutex<Vec<Live>>,
    /// Set on any read of a page that is not live, or a double free.
    violation: AtomicBool,
}

impl Pages {
    fn new() -> Self {
        let memory = (0..PAGES)
            .map(|_| Page {
                entries: (0..512).map(|_| AtomicU64::new(0)).collect(),
                meta: TableMeta::default(),
            })
            .collect();
        Self {
            memory,
            live: Mutex::new(vec![Live::Never; PAGES]),
            violation: AtomicBool::new(false),
        }
    }

    fn index(pa: PhysAddr) -> Option<usize> {
        let off = pa.get().checked_sub(BASE)?;
        let i = usize::try_from(off / 0x1000).ok()?;
        (off % 0x1000 == 0 && i < PAGES).then_some(i)
    }

    fn live_count(&self) -> usize {
        self.live
            .lock()
            .unwrap()
            .iter()
            .filter(|&&l| l == Live::Yes)
            .count()
    }

    fn flag(&self, what: &str) {
        self.violation.store(true, StdOrdering::Relaxed);
        panic!("{what}");
    }
}

impl TableAlloc for Pages {
    fn alloc(&self, _size: u64) -> Result<PhysAddr, AllocError> {
        let mut live = self.live.lock().unwrap();
        let used = live.len() - live.iter().rev().take_while(|&&l| l == Live::Never).count();
        if used == PAGES {
            return Err(AllocError::OutOfMemory {
                size: 4096,
                count: 1,
            });
        }
        live[used] = Live::Yes;
        Ok(PhysAddr::new(BASE + used as u64 * 0x1000))
    }

    fn free(&self, pa: PhysAddr, _size: u64) {
        let Some(i) = Self::index(pa) else {
            return self.flag("free of a page never handed out");
        };
        // Poison first: a reader still inside the page reads a leaf mapping POISON.
        for e in &self.memory[i].entries[..POISONED] {
            e.store(POISON | 0x403, Ordering::Relaxed);
        }
        let mut live = self.live.lock().unwrap();
        if live[i] != Live::Yes {
            drop(live);
            return self.flag("double free");
        }
        live[i] = Live::Freed;
    }

    fn table(&self, pa: PhysAddr) -> Option<TableRef<'_>> {
        let i = Self::index(pa)?;
        if self.live.lock().unwrap()[i] != Live::Yes {
            self.flag("resolution of a page not live");
        }
        let p = &self.memory[i];
        Some(TableRef {
            pa,
            entries: &p.entries,
            meta: &p.meta,
        })
    }
}

fn cfg() -> Config {
    // 4 KiB granule, 32-bit input: levels 1 to 3, a four-entry root (teardown scans it).
    Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        32,
        40,
    ))
    .unwrap()
}

type E<K> = Engine<Arc<Pages>, NoFlush, K>;

/// A closure run on a model thread.
type Step<K = LiveCounts> = fn(&Pages, &E<K>) -> bool;

/// Runs `setup`, then `a` and `b` on two threads, then `check` with both results, then tears
/// the engine down and checks that every page came back. The engine's calls run on spawned
/// threads with stacks large enough for them.
fn model<K: Reserving>(
    setup: fn(&E<K>),
    a: Step<K>,
    b: Step<K>,
    check: fn(&Pages, &E<K>, bool, bool),
) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.max_branches = 20_000;
    builder.check(move || {
        let big = || loom::thread::Builder::new().stack_size(1 << 20);
        let pages = Arc::new(Pages::new());
        let e = {
            let pages = Arc::clone(&pages);
            big()
                .spawn(move || {
                    let e = E::<K>::with_accounting(cfg(), pages, NoFlush).unwrap();
                    setup(&e);
                    Arc::new(e)
                })
                .unwrap()
                .join()
                .unwrap()
        };
        let run = |f: Step<K>| {
            let (p, e) = (Arc::clone(&pages), Arc::clone(&e));
            big().spawn(move || f(&p, &e)).unwrap()
        };
        let (ta, tb) = (run(a), run(b));
        let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
        big()
            .spawn({
                let pages = Arc::clone(&pages);
                move || {
                    check(&pages, &e, ra, rb);
                    drop(e);
                }
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(pages.live_count(), 0, "pages leaked");
        assert!(!pages.violation.load(StdOrdering::Relaxed));
    });
}

fn map<K: Reserving>(e: &E<K>, iova: u64, pa: u64) {
    e.map(
        Iova::new(iova),
        PhysAddr::new(pa),
        PageSize::SZ_4K,
        1,
        Prot::READ,
        &mut e.on_demand(),
    )
    .unwrap();
}

fn unmap<K: Reserving>(e: &E<K>, iova: u64) -> bool {
    e.unmap(Iova::new(iova), PageSize::SZ_4K, 1, &mut Gather::new())
        .is_ok()
}

fn lookup<K: Reserving>(e: &E<K>, iova: u64) -> Option<u64> {
    e.lookup(Iova::new(iova)).map(|t| t.pa.get())
}

#[test]
fn lookup_finds_its_own_map_while_a_neighbour_empties_tables() {
    // Two leaf tables under one level-2 table: 0x4000_0000 and 0x4020_0000.
    model::<LiveCounts>(
        |_| {},
        |_, e| {
            map(e, 0x4000_0000, 0x1000);
            assert_eq!(lookup(e, 0x4000_0000), Some(0x1000), "own page missed");
            unmap(e, 0x4000_0000)
        },
        |_, e| {
            map(e, 0x4020_0000, 0x2000);
            unmap(e, 0x4020_0000)
        },
        |pages, e, a, b| {
            assert!(a && b);
            // Tables unlinked while the other thread was inside wait for a later operation's
            // reclaim; nothing else is left.
            assert_eq!(
                pages.live_count(),
                1 + e.deferred_frees(),
                "tables left linked after both unmaps"
            );
        },
    );
}

#[test]
fn two_unmaps_of_one_page_count_once() {
    let unmap_p: Step = |_, e| unmap(e, 0x4000_0000);
    model::<LiveCounts>(
        |e| {
            map(e, 0x4000_0000, 0x1000);
            map(e, 0x4000_1000, 0x2000);
        },
        unmap_p,
        unmap_p,
        |pages, e, a, b| {
            assert!(a ^ b, "both or neither unmap succeeded");
            assert_eq!(lookup(e, 0x4000_1000), Some(0x2000), "bystander lost");
            assert_eq!(pages.live_count(), 3);
        },
    );
}

#[test]
fn two_maps_race_to_install_one_path() {
    model::<LiveCounts>(
        |_| {},
        |_, e| {
            map(e, 0x4000_0000, 0x1000);
            true
        },
        |_, e| {
            map(e, 0x4000_1000, 0x2000);
            true
        },
        |pages, e, _, _| {
            assert_eq!(lookup(e, 0x4000_0000), Some(0x1000));
            assert_eq!(lookup(e, 0x4000_1000), Some(0x2000));
            assert_eq!(
                pages.live_count(),
                3,
                "one chain, the loser's pages given back"
            );
        },
    );
}

fn lookup_races_the_freeing_unmap() {
    model::<LiveCounts>(
        |e| map(e, 0x4000_0000, 0x1000),
        |_, e| {
            let seen = lookup(e, 0x4000_0000);
            assert!(matches!(seen, None | Some(0x1000)), "read {seen:x?}");
            true
        },
        |_, e| unmap(e, 0x4000_0000),
        |pages, e, _, b| {
            assert!(b);
            assert_eq!(pages.live_count(), 1 + e.deferred_frees());
        },
    );
}

#[test]
fn a_lookup_racing_the_unmap_that_frees_its_path_reads_no_freed_table() {
    lookup_races_the_freeing_unmap();
}

#[test]
#[should_panic(expected = "not live")]
fn reclaim_that_ignores_announcements_is_caught() {
    iopt_lpae::reclaim::IGNORE_ANNOUNCEMENTS.with(|c| c.set(true));
    lookup_races_the_freeing_unmap();
}

#[test]
fn a_reservation_and_the_unmap_that_empties_its_table_free_it_once() {
    model::<LiveCounts>(
        |e| map(e, 0x4000_0000, 0x1000),
        |_, e| unmap(e, 0x4000_0000),
        |_, e| {
            let range = IovaRange::new(Iova::new(0x4000_1000), 0x1000, 0x1000).unwrap();
            e.reserve_tables(range, PageSize::SZ_4K).unwrap();
            e.release_tables(range, PageSize::SZ_4K, &mut Gather::new())
                .unwrap();
            true
        },
        |pages, e, a, _| {
            assert!(a);
            assert_eq!(pages.live_count(), 1 + e.deferred_frees());
        },
    );
}

#[test]
fn seed_release_spares_an_on_demand_map_into_its_tables() {
    model::<ReservationCounts>(
        |e| {
            let range = IovaRange::new(Iova::new(0x4000_0000), 0x1000, 0x1000).unwrap();
            e.reserve_tables(range, PageSize::SZ_4K).unwrap();
        },
        |_, e| {
            map(e, 0x4000_1000, 0x2000);
            assert_eq!(lookup(e, 0x4000_1000), Some(0x2000), "own page missed");
            true
        },
        |_, e| {
            let range = IovaRange::new(Iova::new(0x4000_0000), 0x1000, 0x1000).unwrap();
            e.release_tables(range, PageSize::SZ_4K, &mut Gather::new())
                .unwrap();
            true
        },
        |pages, e, _, _| {
            assert_eq!(
                lookup(e, 0x4000_1000),
                Some(0x2000),
                "page lost to the release"
            );
            assert_eq!(pages.live_count(), 3 + e.deferred_frees());
        },
    );
}

/// A page source whose tables are held, as a Design 1 reservation's pool on this engine.
struct Holding<'a> {
    alloc: &'a Pages,
    holds: Holds,
}

impl PageSource for Holding<'_> {
    fn obtain(&mut self, count: usize, out: &mut Vec<PhysAddr>) -> Result<(), MapError> {
        for _ in 0..count {
            out.push(self.alloc.alloc(4096)?);
        }
        Ok(())
    }

    fn give_back(&mut self, pages: &[PhysAddr]) {
        for &p in pages {
            self.alloc.free(p, 4096);
        }
    }

    const HOLDS: bool = true;

    fn held(&mut self, chain: Chain<'_>) {
        self.holds.record(chain);
    }
}

/// The holds the set-up made, for the releasing thread of the same execution.
static SET_UP_HOLDS: std::sync::Mutex<Option<Holds>> = std::sync::Mutex::new(None);

#[test]
fn a_held_table_unlinked_from_above_is_freed_once_by_its_holder() {
    model::<LiveCounts>(
        |e| {
            // On demand: the level-2 table and one leaf table; held: a second leaf table.
            map(e, 0x4000_0000, 0x1000);
            let mut src = Holding {
                alloc: e.allocator(),
                holds: Holds::default(),
            };
            e.map(
                Iova::new(0x4020_0000),
                PhysAddr::new(0x2000),
                PageSize::SZ_4K,
                1,
                Prot::READ,
                &mut src,
            )
            .unwrap();
            assert_eq!(src.holds.tables().len(), 1);
            unmap(e, 0x4020_0000);
            *SET_UP_HOLDS.lock().unwrap() = Some(src.holds);
        },
        |_, e| {
            e.unmap(
                Iova::new(0x4000_0000),
                PageSize::SZ_1G,
                1,
                &mut Gather::new(),
            )
            .is_ok()
        },
        |_, e| {
            let mut holds = SET_UP_HOLDS.lock().unwrap().take().unwrap();
            e.release_held(&mut holds);
            true
        },
        |pages, e, a, _| {
            assert!(a);
            assert_eq!(pages.live_count(), 1 + e.deferred_frees());
        },
    );
}

/// The holds thread `a` made, for the check of the same execution.
static RACED_HOLDS: std::sync::Mutex<Option<Holds>> = std::sync::Mutex::new(None);

#[test]
fn a_table_held_from_birth_survives_a_neighbour_emptying_it() {
    model::<LiveCounts>(
        |_| {},
        |pages, e| {
            let mut src = Holding {
                alloc: pages,
                holds: Holds::default(),
            };
            e.map(
                Iova::new(0x4000_0000),
                PhysAddr::new(0x1000),
                PageSize::SZ_4K,
                1,
                Prot::READ,
                &mut src,
            )
            .unwrap();
            let ok = unmap(e, 0x4000_0000);
            *RACED_HOLDS.lock().unwrap() = Some(src.holds);
            ok
        },
        |_, e| {
            map(e, 0x4000_1000, 0x2000);
            unmap(e, 0x4000_1000)
        },
        |pages, e, a, b| {
            assert!(a && b);
            let mut holds = RACED_HOLDS.lock().unwrap().take().unwrap();
            // Held: the chain stays (root, level 2, leaf); else only the root.
            let want = if holds.is_empty() { 1 } else { 3 };
            assert_eq!(pages.live_count(), want + e.deferred_frees());
            e.release_held(&mut holds);
            assert_eq!(pages.live_count(), 1 + e.deferred_frees());
        },
    );
}
