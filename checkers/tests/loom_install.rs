//! Model-checked table installation and freeing, with `loom`.
//!
//! `loom` explores every interleaving (and every weak-memory outcome it models) of code written
//! against its own atomics, so it cannot see the engine's `core` atomics. These tests model the
//! **protocols** of `iopt_lpae::engine` and `iopt_lpae::refcount` faithfully and small — a few
//! table pages of two entries, the same orderings, the same steps in the same order — but they
//! check the protocol, not the compiled engine (the stress tests and the differential checker
//! run the engine itself).
//!
//! 1. `install_race_on_one_entry`: two threads map into the same empty parent entry. Each
//!    builds a private chain (L2 → L3 with its leaf) from pages of the allocator, publishes it
//!    with one compare-exchange (release) on the parent entry; the loser zeroes its pages,
//!    gives them back, descends into the winner's chain (acquire) and writes its leaf there.
//!    Checked: exactly one chain linked, both leaves present, the winner's chain fully visible
//!    to the loser, every page either linked or back in the allocator, zeroed.
//! 2. `pin_against_claim`: a table holds one leaf; one thread unmaps it and, the count having
//!    dropped to zero, claims the table (`live_entries: 0 → DEAD`), unlinks it and frees it;
//!    another maps a second leaf into it, pinning it first (`live_entries + 1` unless DEAD) and
//!    walking again from the parent when the pin fails (installing a fresh table when the
//!    entry is empty). Checked: no leaf is ever written into a claimed table, the new leaf is
//!    reachable at the end, the table is freed at most once and only when unlinked, and the
//!    surviving table's count equals its valid entries.
//! 3. `reservation_against_claim`: one thread empties the table while another takes a
//!    reservation on it (pin, `reservations + 1`, unpin) and releases it (`reservations - 1`,
//!    then try to claim): the claim's undo-and-retry rule means the table is freed exactly once
//!    and never while reserved — neither both threads give up (a leak) nor both free it.
//! 4. `a_grace_period_keeps_unlinked_tables_until_readers_leave`: `refcount.rs`'s epoch
//!    protocol. A lookup announces its epoch in a slot (compare-exchange, then the fence),
//!    walks parent → table → leaf and leaves with a release store; an unmap unlinks the table,
//!    retires it with the epoch and reclaims at its exit, advancing the epoch only past slots
//!    that show the current one. The freed page is rewritten by its next owner. Checked: the
//!    lookup never reads the rewrite, and the table is freed exactly once. Loom finds the
//!    read of a freed table when the reclaimer ignores the slots
//!    (`a_reclaimer_that_ignores_announcements_is_caught`) and when the announcement is
//!    relaxed with no fence (`an_announcement_without_the_fence_is_caught`).
//!
//! Run: `cargo test -p iopt-checkers --features loom --test loom_install --release`.
#![cfg(feature = "loom")]

use loom::sync::Arc;
use loom::sync::Mutex;
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use loom::thread;

const SC: Ordering = Ordering::SeqCst;
const DEAD: u32 = u32::MAX;
/// A descriptor: page index + 1 in the upper bits, type 3 (table) or 1 (leaf).
fn table_desc(page: usize) -> u64 {
    ((page as u64 + 1) << 12) | 3
}
fn leaf_desc(tag: u64) -> u64 {
    (tag << 12) | 1
}
fn page_of(d: u64) -> usize {
    ((d >> 12) - 1) as usize
}

/// A table page: two entries and the metadata beside it.
struct Page {
    entries: [AtomicU64; 2],
    live: AtomicU32,
    reservations: AtomicU32,
    freed: AtomicBool,
}

impl Page {
    fn new() -> Self {
        Self {
            entries: [AtomicU64::new(0), AtomicU64::new(0)],
            live: AtomicU32::new(0),
            reservations: AtomicU32::new(0),
            freed: AtomicBool::new(false),
        }
    }
}

/// Pages and an allocator holding the free ones.
struct Mem {
    pages: Vec<Page>,
    free: Mutex<Vec<usize>>,
    frees: AtomicUsize,
}

impl Mem {
    fn new(n: usize, free: &[usize]) -> Self {
        Self {
            pages: (0..n).map(|_| Page::new()).collect(),
            free: Mutex::new(free.to_vec()),
            frees: AtomicUsize::new(0),
        }
    }

    fn alloc(&self) -> usize {
        self.free.lock().unwrap().pop().expect("enough pages")
    }

    fn give_back(&self, p: usize) {
        self.free.lock().unwrap().push(p);
    }
}

/// engine.rs `publish_chain` and the descent after a lost race.
#[test]
fn install_race_on_one_entry() {
    install_race(Ordering::AcqRel);
}

/// The model checker does catch a broken protocol: publishing the chain without release
/// ordering lets the loser see the winner's entry but not its initialised chain.
#[test]
#[should_panic(expected = "published initialised")]
fn install_race_with_a_relaxed_publish_is_caught() {
    install_race(Ordering::Relaxed);
}

fn install_race(publish: Ordering) {
    loom::model(move || {
        // Page 0 is the parent (root); 1..=4 free.
        let mem = Arc::new(Mem::new(5, &[1, 2, 3, 4]));
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let mem = Arc::clone(&mem);
                thread::spawn(move || {
                    let slot = &mem.pages[0].entries[0];
                    // obtain: the whole missing path, privately.
                    let l2 = mem.alloc();
                    let l3 = mem.alloc();
                    mem.pages[l2].entries[0].store(table_desc(l3), Ordering::Relaxed);
                    mem.pages[l3].entries[t as usize].store(leaf_desc(t + 1), Ordering::Relaxed);
                    match slot.compare_exchange(0, table_desc(l2), publish, Ordering::Acquire) {
                        Ok(_) => {}
                        Err(winner) => {
                            // Lost: zero and give back, then descend into the winner's chain.
                            mem.pages[l2].entries[0].store(0, Ordering::Relaxed);
                            mem.pages[l3].entries[t as usize].store(0, Ordering::Relaxed);
                            mem.give_back(l2);
                            mem.give_back(l3);
                            let w2 = page_of(winner);
                            let link = mem.pages[w2].entries[0].load(Ordering::Acquire);
                            assert_ne!(link, 0, "the winner's chain is published initialised");
                            let w3 = page_of(link);
                            let e = &mem.pages[w3].entries[t as usize];
                            assert_eq!(e.load(Ordering::Acquire), 0);
                            e.store(leaf_desc(t + 1), Ordering::Release);
                        }
                    }
                })
            })
            .collect();
        for h in threads {
            h.join().unwrap();
        }
        let top = mem.pages[0].entries[0].load(SC);
        let l2 = page_of(top);
        let l3 = page_of(mem.pages[l2].entries[0].load(SC));
        for t in 0..2u64 {
            assert_eq!(mem.pages[l3].entries[t as usize].load(SC), leaf_desc(t + 1));
        }
        let free = mem.free.lock().unwrap().clone();
        assert_eq!(free.len(), 2, "the loser's two pages are back");
        for p in free {
            assert!(p != l2 && p != l3, "a linked page is also free");
            for e in &mem.pages[p].entries {
                assert_eq!(e.load(SC), 0, "a returned page is zeroed");
            }
        }
    });
}

/// refcount.rs `pin`.
fn pin(p: &Page, n: u32) -> bool {
    let mut cur = p.live.load(SC);
    loop {
        if cur == DEAD {
            return false;
        }
        match p.live.compare_exchange(cur, cur + n, SC, SC) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

/// refcount.rs `try_claim`.
fn try_claim(p: &Page, expected: u32) -> bool {
    loop {
        if p.reservations.load(SC) != 0 {
            return false;
        }
        if p.live.compare_exchange(expected, DEAD, SC, SC).is_err() {
            return false;
        }
        if p.reservations.load(SC) == 0 {
            return true;
        }
        p.live.store(expected, SC);
    }
}

/// Claimed: unlink from the parent entry, then free (the engine defers the free past every
/// running operation; here nothing reads a page after the walk that found it, so freeing at
/// once is the stricter check).
fn unlink_and_free(mem: &Mem, parent_slot: &AtomicU64, table: usize) {
    let old = parent_slot.swap(0, SC);
    assert_eq!(old, table_desc(table), "only the claimer unlinks");
    mem.pages[0].live.fetch_sub(1, SC);
    assert!(!mem.pages[table].freed.swap(true, SC), "freed twice");
    mem.frees.fetch_add(1, SC);
}

/// refcount.rs: unmap's `drop_live` + `cascade` against map's pin / `install_chain`.
#[test]
fn pin_against_claim() {
    loom::model(|| {
        // Page 0: parent with entry 0 -> table 1; table 1 holds one leaf at entry 0.
        let mem = Arc::new(Mem::new(3, &[2]));
        mem.pages[0].entries[0].store(table_desc(1), SC);
        mem.pages[0].live.store(1, SC);
        mem.pages[1].entries[0].store(leaf_desc(7), SC);
        mem.pages[1].live.store(1, SC);

        let unmapper = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let t = &mem.pages[1];
                let old = t.entries[0].swap(0, SC);
                assert_eq!(old, leaf_desc(7));
                if t.live.fetch_sub(1, SC) == 1 && try_claim(t, 0) {
                    unlink_and_free(&mem, &mem.pages[0].entries[0], 1);
                }
            })
        };
        let mapper = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let slot = &mem.pages[0].entries[0];
                loop {
                    let e = slot.load(SC);
                    if e == 0 {
                        // Install a fresh table holding the leaf (parent pinned first).
                        let n = mem.alloc();
                        mem.pages[n].entries[1].store(leaf_desc(9), Ordering::Relaxed);
                        mem.pages[n].live.store(1, Ordering::Relaxed);
                        assert!(pin(&mem.pages[0], 1), "the root is never claimed");
                        if slot.compare_exchange(0, table_desc(n), SC, SC).is_ok() {
                            return;
                        }
                        mem.pages[0].live.fetch_sub(1, SC);
                        mem.pages[n].entries[1].store(0, Ordering::Relaxed);
                        mem.pages[n].live.store(0, Ordering::Relaxed);
                        mem.give_back(n);
                        continue;
                    }
                    let t = &mem.pages[page_of(e)];
                    if pin(t, 1) {
                        assert!(!t.freed.load(SC), "pinned a freed table");
                        t.entries[1].store(leaf_desc(9), SC);
                        return;
                    }
                    // Dying: its parent entry empties shortly.
                    thread::yield_now();
                }
            })
        };
        unmapper.join().unwrap();
        mapper.join().unwrap();

        let e = mem.pages[0].entries[0].load(SC);
        assert_ne!(e, 0, "the new leaf's table is linked");
        let t = &mem.pages[page_of(e)];
        assert!(!t.freed.load(SC), "a linked table was freed");
        assert_eq!(
            t.entries[1].load(SC),
            leaf_desc(9),
            "the new leaf is reachable"
        );
        let valid = t.entries.iter().filter(|x| x.load(SC) != 0).count() as u32;
        assert_eq!(
            t.live.load(SC),
            valid,
            "live_entries counts the valid entries"
        );
        assert_eq!(mem.pages[0].live.load(SC), 1);
        let freed = mem.frees.load(SC);
        assert!(freed <= 1);
        assert_eq!(
            freed == 1,
            page_of(e) != 1,
            "the old table is freed iff replaced"
        );
    });
}

/// refcount.rs: the emptying unmap's claim against a reservation taken and released.
#[test]
fn reservation_against_claim() {
    reservation_race(try_claim);
}

/// A claim that checks the reservation count only before its compare-exchange (no re-check,
/// no undo) frees a table while a reservation holds it: the model checker finds it.
#[test]
#[should_panic(expected = "reserved a freed table")]
fn a_claim_without_the_recheck_is_caught() {
    reservation_race(|p, expected| {
        p.reservations.load(SC) == 0 && p.live.compare_exchange(expected, DEAD, SC, SC).is_ok()
    });
}

fn reservation_race(try_claim: fn(&Page, u32) -> bool) {
    loom::model(move || {
        let mem = Arc::new(Mem::new(2, &[]));
        mem.pages[0].entries[0].store(table_desc(1), SC);
        mem.pages[0].live.store(1, SC);
        mem.pages[1].entries[0].store(leaf_desc(7), SC);
        mem.pages[1].live.store(1, SC);

        let unmapper = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let t = &mem.pages[1];
                t.entries[0].swap(0, SC);
                if t.live.fetch_sub(1, SC) == 1 && try_claim(t, 0) {
                    unlink_and_free(&mem, &mem.pages[0].entries[0], 1);
                }
            })
        };
        let reserver = {
            let mem = Arc::clone(&mem);
            thread::spawn(move || {
                let slot = &mem.pages[0].entries[0];
                let e = slot.load(SC);
                if e == 0 {
                    return; // already gone: the reservation would install a new table
                }
                let t = &mem.pages[page_of(e)];
                // reserve_walk: pin, count the reservation, unpin.
                if !pin(t, 1) {
                    return;
                }
                t.reservations.fetch_add(1, SC);
                t.live.fetch_sub(1, SC);
                assert!(!t.freed.load(SC), "reserved a freed table");
                // release_tables / collapse: drop the reservation, claim if empty.
                t.reservations.fetch_sub(1, SC);
                if try_claim(t, 0) {
                    unlink_and_free(&mem, slot, page_of(e));
                }
            })
        };
        unmapper.join().unwrap();
        reserver.join().unwrap();

        // The table is empty and unreserved: exactly one of the threads freed it.
        assert_eq!(
            mem.frees.load(SC),
            1,
            "an empty, unreserved table was kept (or freed twice)"
        );
        assert_eq!(mem.pages[0].entries[0].load(SC), 0);
        assert_eq!(mem.pages[1].live.load(SC), DEAD);
    });
}

// ---- the grace period ---------------------------------------------------------------------

/// A leaf value the freed page's next owner writes: a reader must never see it.
const POISON: u64 = 0xdead;

/// refcount.rs `enter` / `exit` / `retire` / `reclaim` with two announcement slots.
struct Grace {
    epoch: AtomicU64,
    slots: [AtomicU64; 2],
    limbo: Mutex<Vec<(u64, usize)>>,
    pending: AtomicUsize,
}

impl Grace {
    fn new() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            slots: [AtomicU64::new(0), AtomicU64::new(0)],
            limbo: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(0),
        }
    }

    /// Announces the epoch in a free slot, starting at `start`; the slot taken.
    fn enter(&self, start: usize, announce: Ordering) -> usize {
        loop {
            for k in 0..2 {
                let i = (start + k) & 1;
                if self.slots[i].load(Ordering::Relaxed) != 0 {
                    continue;
                }
                let e = self.epoch.load(SC);
                if self.slots[i]
                    .compare_exchange(0, (e << 1) | 1, announce, Ordering::Relaxed)
                    .is_ok()
                {
                    if announce == SC {
                        fence(SC);
                    }
                    return i;
                }
            }
            thread::yield_now();
        }
    }

    fn exit(&self, slot: usize, mem: &Mem, honour_slots: bool) {
        self.slots[slot].store(0, Ordering::Release);
        if self.pending.load(SC) != 0 {
            self.reclaim(mem, honour_slots);
        }
    }

    fn retire(&self, page: usize) {
        fence(SC);
        let e = self.epoch.load(SC);
        self.limbo.lock().unwrap().push((e, page));
        self.pending.fetch_add(1, SC);
    }

    fn reclaim(&self, mem: &Mem, honour_slots: bool) {
        for _ in 0..2 {
            fence(SC);
            let e = self.epoch.load(SC);
            let behind = self.slots.iter().any(|s| {
                let v = s.load(SC);
                v != 0 && v >> 1 != e
            });
            if honour_slots && behind {
                break;
            }
            let _ = self.epoch.compare_exchange(e, e + 1, SC, SC);
        }
        let now = self.epoch.load(SC);
        let ready: Vec<usize> = {
            let mut limbo = self.limbo.lock().unwrap();
            let (ready, keep): (Vec<_>, Vec<_>) = limbo.drain(..).partition(|&(e, _)| e + 2 <= now);
            *limbo = keep;
            ready.into_iter().map(|(_, p)| p).collect()
        };
        if !ready.is_empty() {
            self.pending.fetch_sub(ready.len(), SC);
            for p in ready {
                // The allocator hands the page to its next owner, who writes it.
                mem.pages[p].entries[0].store(POISON, Ordering::Relaxed);
                mem.pages[p].freed.store(true, Ordering::Relaxed);
                mem.frees.fetch_add(1, SC);
            }
        }
    }
}

/// A lookup walks parent → table (page 0) → leaf inside the grace period while an unmap
/// unlinks the table, retires it and reclaims at its exit. Checked: the lookup never reads
/// the freed page's new contents, and the table is freed exactly once by the end (a last
/// reclaim after both operations).
fn grace_race(announce: Ordering, honour_slots: bool) {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(move || {
        let mem = Arc::new(Mem::new(1, &[]));
        mem.pages[0].entries[0].store(leaf_desc(7), SC);
        let parent = Arc::new(AtomicU64::new(table_desc(0)));
        let grace = Arc::new(Grace::new());
        let reader = {
            let (mem, parent, grace) = (Arc::clone(&mem), Arc::clone(&parent), Arc::clone(&grace));
            thread::spawn(move || {
                let slot = grace.enter(0, announce);
                let d = parent.load(Ordering::Acquire);
                if d != 0 {
                    let leaf = mem.pages[page_of(d)].entries[0].load(Ordering::Acquire);
                    assert_ne!(leaf, POISON, "a lookup read a freed table");
                }
                grace.exit(slot, &mem, honour_slots);
            })
        };
        let slot = grace.enter(1, announce);
        let old = parent.swap(0, SC);
        grace.retire(page_of(old));
        grace.exit(slot, &mem, honour_slots);
        reader.join().unwrap();
        // Both operations have left: a later operation's exit frees what is left.
        let slot = grace.enter(1, announce);
        grace.exit(slot, &mem, honour_slots);
        assert_eq!(mem.frees.load(SC), 1, "the unlinked table is freed once");
    });
}

#[test]
fn a_grace_period_keeps_unlinked_tables_until_readers_leave() {
    grace_race(SC, true);
}

#[test]
#[should_panic(expected = "a lookup read a freed table")]
fn a_reclaimer_that_ignores_announcements_is_caught() {
    grace_race(SC, false);
}

#[test]
#[should_panic(expected = "a lookup read a freed table")]
fn an_announcement_without_the_fence_is_caught() {
    grace_race(Ordering::Relaxed, true);
}
