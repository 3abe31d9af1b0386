//! A lock-free look-aside index of live reservations, for the reserved-map hot path.
//!
//! Both designs keep their reservations in a locked registry, and every map inside a
//! reservation must prove that its handle is live and that the range lies inside it. Taking
//! the registry's lock costs a locked read-modify-write per call, about as much as the rest of
//! a single-page map into a present table. [`Lookaside`] answers the common case without one:
//! a fixed array of slots, one per `id % SLOTS`, each a small seqlock holding a reservation's
//! id, the IOVA span maps may touch, and one word the backend chooses. Readers only load;
//! writers (reserve and release, rare) take the slot's sequence with a compare-exchange.
//!
//! It is an index, never the authority: a reservation whose slot is taken by another live id,
//! or whose span is not one interval, is simply not published, and a reader that finds no
//! consistent entry falls back to the registry. A reader that does find one may act on it:
//! the reservation was live at that instant, and handles are consumed by release, so only a
//! forged duplicate handle can race with its own release (the registry check has the same
//! window between its unlock and the map).
//!
//! ```
//! use iopt_lpae::lookaside::{Lookaside, Span};
//!
//! let index = Lookaside::new();
//! index.publish(7, Span { first: 0x10_0000, last: 0x1f_ffff, tag: 0x1000 });
//! assert_eq!(index.get(7).map(|s| s.last), Some(0x1f_ffff));
//! assert_eq!(index.get(7 + 64), None); // same slot, other id
//! index.retract(7);
//! assert_eq!(index.get(7), None);
//! ```

use core::sync::atomic::{AtomicU64, Ordering, fence};

/// Slots of the index (a power of two); ids `i` and `i + SLOTS` share one.
pub const SLOTS: usize = 64;

/// What a slot says about one live reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First IOVA maps bound to the reservation may touch.
    pub first: u64,
    /// Last such IOVA (inclusive).
    pub last: u64,
    /// A word the backend chooses (Design 2 keeps the reservation's leaf size there).
    pub tag: u64,
}

impl Span {
    /// Whether `count` leaves of `size` bytes from `iova` lie inside `[first, last]`: the
    /// bounds check of a map inside a reservation, in 128 bits so that no argument can
    /// overflow it (a zero count is inside wherever `iova` is; the map's own checks refuse it).
    ///
    /// ```
    /// use iopt_lpae::lookaside::Span;
    /// let s = Span { first: 0x10_0000, last: 0x1f_ffff, tag: 0 };
    /// assert!(s.holds(0x1f_f000, 0x1000, 1));
    /// assert!(!s.holds(0x1f_f000, 0x1000, 2));
    /// assert!(!s.holds(0xf_f000, 0x1000, 1));
    /// assert!(!s.holds(0x10_0000, 0x1000, u64::MAX));
    /// ```
    #[inline]
    #[must_use]
    pub fn holds(&self, iova: u64, size: u64, count: u64) -> bool {
        let end = u128::from(iova) + u128::from(count) * u128::from(size);
        self.first <= iova && end <= u128::from(self.last) + 1
    }
}

/// One seqlock: `seq` is odd while a writer is inside. `id` 0 means empty.
#[derive(Debug, Default)]
struct Slot {
    seq: AtomicU64,
    id: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
    tag: AtomicU64,
}

/// The index. See the [module docs](self).
#[derive(Debug)]
pub struct Lookaside {
    slots: [Slot; SLOTS],
}

impl Default for Lookaside {
    fn default() -> Self {
        Self::new()
    }
}

impl Lookaside {
    /// An empty index.
    #[must_use]
    pub fn new() -> Self {
        Self {
            slots: core::array::from_fn(|_| Slot::default()),
        }
    }

    fn at(&self, id: u64) -> &Slot {
        &self.slots[(id as usize) & (SLOTS - 1)]
    }

    /// Enters `slot` as its only writer; returns the (even) sequence it held.
    fn lock(slot: &Slot) -> u64 {
        loop {
            let s = slot.seq.load(Ordering::Relaxed);
            if s & 1 == 0
                && slot
                    .seq
                    .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                // Readers that see any of the writes below must see the odd sequence.
                fence(Ordering::Release);
                return s;
            }
            core::hint::spin_loop();
        }
    }

    /// Publishes live reservation `id` (never 0) with `span`, if its slot is free; returns
    /// whether it did. A reservation not published is still found through the registry.
    pub fn publish(&self, id: u64, span: Span) -> bool {
        if id == 0 {
            return false;
        }
        let slot = self.at(id);
        let s = Self::lock(slot);
        let free = slot.id.load(Ordering::Relaxed) == 0;
        if free {
            slot.id.store(id, Ordering::Relaxed);
            slot.first.store(span.first, Ordering::Relaxed);
            slot.last.store(span.last, Ordering::Relaxed);
            slot.tag.store(span.tag, Ordering::Relaxed);
        }
        slot.seq.store(s + 2, Ordering::Release);
        free
    }

    /// Removes `id` if it is published. Call before the registry forgets it, so no reader
    /// finds a reservation the registry no longer holds for longer than the release takes.
    pub fn retract(&self, id: u64) {
        let slot = self.at(id);
        if slot.id.load(Ordering::Relaxed) != id || id == 0 {
            return;
        }
        let s = Self::lock(slot);
        if slot.id.load(Ordering::Relaxed) == id {
            slot.id.store(0, Ordering::Relaxed);
        }
        slot.seq.store(s + 2, Ordering::Release);
    }

    /// The span of live reservation `id`, if its slot holds it and no writer was inside
    /// while it was read. `None` says nothing: ask the registry.
    #[inline]
    #[must_use]
    pub fn get(&self, id: u64) -> Option<Span> {
        let slot = self.at(id);
        let s1 = slot.seq.load(Ordering::Acquire);
        let found = slot.id.load(Ordering::Relaxed);
        let span = Span {
            first: slot.first.load(Ordering::Relaxed),
            last: slot.last.load(Ordering::Relaxed),
            tag: slot.tag.load(Ordering::Relaxed),
        };
        fence(Ordering::Acquire);
        let s2 = slot.seq.load(Ordering::Relaxed);
        (s1 == s2 && s1 & 1 == 0 && found == id && id != 0).then_some(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::vec::Vec;

    fn span(id: u64) -> Span {
        Span {
            first: id << 20,
            last: (id << 20) + 0xf_ffff,
            tag: !id,
        }
    }

    #[test]
    fn publish_get_retract_and_collisions() {
        let x = Lookaside::new();
        assert!(!x.publish(0, span(0)), "id 0 marks an empty slot");
        assert_eq!(x.get(0), None);
        assert!(x.publish(3, span(3)));
        assert_eq!(x.get(3), Some(span(3)));
        // Another id on the same slot is not published and not mistaken for the first.
        let other = 3 + SLOTS as u64;
        assert!(!x.publish(other, span(other)));
        assert_eq!(x.get(other), None);
        // Retracting an id that is not there leaves the slot alone.
        x.retract(other);
        assert_eq!(x.get(3), Some(span(3)));
        x.retract(3);
        assert_eq!(x.get(3), None);
        assert!(x.publish(other, span(other)));
        assert_eq!(x.get(other), Some(span(other)));
        assert_eq!(x.get(3), None);
    }

    /// Readers never see a torn entry: every span read belongs to the id read with it, while
    /// writers keep replacing the slot's reservation.
    #[test]
    fn readers_never_see_a_torn_entry() {
        let x = Arc::new(Lookaside::new());
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (x, stop) = (Arc::clone(&x), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut n = w;
                    while !stop.load(Ordering::Relaxed) {
                        let id = 5 + (n % 64) * SLOTS as u64;
                        if x.publish(id, span(id)) {
                            for _ in 0..64 {
                                core::hint::spin_loop();
                            }
                            x.retract(id);
                        }
                        n += 2;
                    }
                })
            })
            .collect();
        let mut seen = 0u64;
        for round in 0..200_000u64 {
            let id = 5 + (round % 64) * SLOTS as u64;
            if let Some(s) = x.get(id) {
                assert_eq!(s, span(id), "torn read for id {id}");
                seen += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        std::println!("{seen} consistent reads");
    }
}
