//! Deterministic workloads: the random map/unmap mix and the VM_BIND trace.

use crate::{BASE_IOVA, Backend, Reserving, SZ_1G, SZ_2M, SZ_4K, Shared, pa_of};
use std::collections::VecDeque;
use std::hint::black_box;

/// A small deterministic generator (xorshift64*), so every backend replays the same ops.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a non-zero seed.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One map or unmap of `count` leaves of `size` at `iova` (output `pa_of(iova)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Map (`true`) or unmap.
    pub map: bool,
    /// First IOVA.
    pub iova: u64,
    /// Leaf size: 4K, or 2M for a whole block.
    pub size: u64,
    /// Leaves.
    pub count: u64,
}

impl Op {
    /// Bytes covered.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.size * self.count
    }

    /// Whether it covers nothing (never, for generated ops).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The window of the random mix: 64 GiB.
pub const RANDOM_WINDOW: u64 = 64 * SZ_1G;

/// `n` random maps and unmaps in a 64 GiB window, starting from an empty table: each op picks
/// one of the window's 32768 2 MiB slots; a free slot gets a map of `4K << k` bytes (`k` uniform
/// in 0..=9, so 4K..2M; 2M as one block), an occupied one is unmapped exactly as it was mapped.
#[must_use]
pub fn random_ops(n: usize, seed: u64) -> Vec<Op> {
    let slots = RANDOM_WINDOW / SZ_2M;
    let mut used: Vec<Option<Op>> = vec![None; slots as usize];
    let mut rng = Rng::new(seed);
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let s = rng.below(slots) as usize;
        if let Some(op) = used[s].take() {
            ops.push(Op { map: false, ..op });
        } else {
            let len = SZ_4K << rng.below(10);
            let (size, count) = if len == SZ_2M {
                (SZ_2M, 1)
            } else {
                (SZ_4K, len / SZ_4K)
            };
            let op = Op {
                map: true,
                iova: BASE_IOVA + s as u64 * SZ_2M,
                size,
                count,
            };
            used[s] = Some(op);
            ops.push(op);
        }
    }
    ops
}

/// One VM_BIND map operation (it is unbound later with the same size and count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    /// First IOVA.
    pub iova: u64,
    /// Leaf size: 4K or 2M.
    pub size: u64,
    /// Leaves.
    pub count: u64,
}

impl Bind {
    /// Bytes bound.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.size * self.count
    }

    /// Whether it binds nothing (never, for generated binds).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Output address.
    #[must_use]
    pub fn pa(&self) -> u64 {
        pa_of(self.iova)
    }
}

/// A GPU-like bind trace of `n` binds over disjoint IOVAs: 50 % sparse-texture tiles of 4K..64K
/// packed into shared 2 MiB regions, 35 % buffers of 64K..2M in 4K pages, 15 % large buffers of
/// 2M..32M in 2M blocks.
#[must_use]
pub fn vm_bind_trace(n: usize, seed: u64) -> Vec<Bind> {
    let mut rng = Rng::new(seed);
    let mut sparse = BASE_IOVA;
    let mut buffers = BASE_IOVA + 64 * SZ_1G;
    let mut large = BASE_IOVA + 128 * SZ_1G;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = rng.below(100);
        let bind = if r < 50 {
            let count = 1 + rng.below(16);
            // Tiles stay inside one 2 MiB region.
            if (sparse % SZ_2M) + count * SZ_4K > SZ_2M {
                sparse = sparse.next_multiple_of(SZ_2M);
            }
            let b = Bind {
                iova: sparse,
                size: SZ_4K,
                count,
            };
            sparse += count * SZ_4K;
            b
        } else if r < 85 {
            let count = 16 + rng.below(497);
            let b = Bind {
                iova: buffers,
                size: SZ_4K,
                count,
            };
            buffers = (buffers + count * SZ_4K).next_multiple_of(SZ_2M);
            b
        } else {
            let count = 1 + rng.below(16);
            let b = Bind {
                iova: large,
                size: SZ_2M,
                count,
            };
            large += count * SZ_2M;
            b
        };
        out.push(bind);
    }
    out
}

/// `n` IOVAs of 4K pages spread pseudo-randomly over `[base, base + pages * 4K)`.
#[must_use]
pub fn spread(n: usize, base: u64, pages: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| base + rng.below(pages) * SZ_4K + 0x123)
        .collect()
}

/// How many binds wait between submit and execute in the VM_BIND loop.
pub const QUEUE_DEPTH: usize = 8;

/// Unbinds every bind of `binds` with `unmap`.
pub fn unbind_all<B: Backend>(t: &mut B, binds: &[Bind]) {
    for bind in binds {
        t.unmap(bind.iova, bind.size, bind.count);
    }
}

/// The VM_BIND loop of the `vm_bind` group and the profile example: binds queued
/// [`QUEUE_DEPTH`] deep, reserved at submit and mapped inside the reservation at execute.
/// Design 1 releases at completion and unbinds with `unmap`; Design 2 keeps the reservation
/// until the unbind, which is its release. Then every bind is unbound.
pub fn vm_bind_queued<B: Reserving>(t: &mut B, binds: &[Bind]) {
    let mut queue = VecDeque::with_capacity(QUEUE_DEPTH);
    let mut held = Vec::new();
    let mut execute = |t: &mut B, bind: &Bind, r: B::Res| {
        t.map_reserved(&r, bind.iova, bind.pa(), bind.size, bind.count);
        if B::RELEASE_UNMAPS {
            held.push(r);
        } else {
            t.release(r);
        }
    };
    for bind in binds {
        let bind = black_box(bind);
        let r = t.reserve(bind.iova, bind.len(), bind.size);
        queue.push_back((bind, r));
        if queue.len() == QUEUE_DEPTH {
            if let Some((bind, r)) = queue.pop_front() {
                execute(t, bind, r);
            }
        }
    }
    while let Some((bind, r)) = queue.pop_front() {
        execute(t, bind, r);
    }
    if B::RELEASE_UNMAPS {
        for r in held {
            t.release(r);
        }
    } else {
        unbind_all(t, binds);
    }
}

// ---- the timed routines the benches and `paired` share -------------------------------------

/// A table whose first `n` 4K pages from [`BASE_IOVA`] are mapped (one bulk call).
#[must_use]
pub fn mapped<B: Backend>(n: u64) -> B {
    let mut t = B::fresh();
    t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, n);
    t
}

/// A table whose tables for `n` 4K pages from [`BASE_IOVA`] are present and empty: mapped,
/// then cleared with [`Backend::clear_keep_tables`].
#[must_use]
pub fn present<B: Backend>(n: u64) -> B {
    let mut t = mapped::<B>(n);
    t.clear_keep_tables(BASE_IOVA, n);
    t
}

/// A table holding `n` 2M blocks from [`BASE_IOVA`] (one bulk call).
#[must_use]
pub fn mapped_blocks<B: Backend>(n: u64) -> B {
    let mut t = B::fresh();
    t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_2M, n);
    t
}

/// Maps `n` leaves of `size` from [`BASE_IOVA`], one call per leaf.
pub fn map_each<B: Backend>(t: &mut B, n: u64, size: u64) {
    for i in 0..n {
        let iova = BASE_IOVA + i * size;
        t.map(black_box(iova), pa_of(iova), size, 1);
    }
}

/// Unmaps `n` leaves of `size` from [`BASE_IOVA`], one call per leaf.
pub fn unmap_each<B: Backend>(t: &mut B, n: u64, size: u64) {
    for i in 0..n {
        t.unmap(black_box(BASE_IOVA + i * size), size, 1);
    }
}

/// Maps `n` 4K pages from [`BASE_IOVA`]: `n` single-page calls, or one call.
pub fn map_pages<B: Backend>(t: &mut B, n: u64, single: bool) {
    if single {
        map_each(t, n, SZ_4K);
    } else {
        t.map(black_box(BASE_IOVA), pa_of(BASE_IOVA), SZ_4K, n);
    }
}

/// [`map_pages`] inside the reservation `r`.
pub fn map_pages_reserved<B: Reserving>(t: &mut B, r: &B::Res, n: u64, single: bool) {
    if single {
        for i in 0..n {
            let iova = BASE_IOVA + i * SZ_4K;
            t.map_reserved(r, black_box(iova), pa_of(iova), SZ_4K, 1);
        }
    } else {
        t.map_reserved(r, black_box(BASE_IOVA), pa_of(BASE_IOVA), SZ_4K, n);
    }
}

/// A fresh table with a reservation for `n` 4K pages from [`BASE_IOVA`].
#[must_use]
pub fn reserved<B: Reserving>(n: u64) -> (B, B::Res) {
    let mut t = B::fresh();
    let r = t.reserve(BASE_IOVA, n * SZ_4K, SZ_4K);
    (t, r)
}

/// Looks up every IOVA of `iovas`.
pub fn lookup_all<B: Backend>(t: &mut B, iovas: &[u64]) {
    for &v in iovas {
        black_box(t.lookup(black_box(v)));
    }
}

/// The 1024 IOVAs of the `lookup` group for a window of `n` mapped 4K pages: the `same` page
/// each time, or `spread` over the window.
#[must_use]
pub fn lookup_iovas(n: u64, spread_them: bool) -> Vec<u64> {
    if spread_them {
        spread(1024, BASE_IOVA, n, 7)
    } else {
        vec![BASE_IOVA + 0x1234_5000 % (n * SZ_4K) + 0x123; 1024]
    }
}

/// The 1 GiB region thread `thread` maps into in the concurrency workloads.
#[must_use]
pub fn thread_region(thread: u64) -> u64 {
    BASE_IOVA + thread * SZ_1G
}

/// A shared table with the tables of `n` 4K pages present in the regions of `threads`
/// threads ([`Shared::prefill`]).
#[must_use]
pub fn prefilled<S: Shared>(threads: u64, n: u64) -> S {
    let t = S::fresh();
    for k in 0..threads {
        t.prefill(thread_region(k), n);
    }
    t
}

/// `threads` threads at once, each mapping `n` single 4K pages into its own region of `t`.
pub fn map_threads<S: Shared>(t: &S, threads: u64, n: u64) {
    std::thread::scope(|s| {
        for k in 0..threads {
            s.spawn(move || {
                let base = thread_region(k);
                for i in 0..n {
                    let iova = base + i * SZ_4K;
                    t.map_4k(black_box(iova), pa_of(iova));
                }
            });
        }
    });
}

/// A dependent multiply-add chain of `n` steps: compute that touches no memory, the floor of
/// what two threads can gain over one.
#[must_use]
pub fn spin(n: u64) -> u64 {
    let mut x = black_box(1u64);
    for i in 0..n {
        x = x.wrapping_mul(0x5851_F42D_4C95_7F2D).wrapping_add(i);
    }
    x
}
