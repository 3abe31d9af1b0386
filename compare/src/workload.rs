//! Built-in workloads, each modelled on a real user (architecture.md, "Workloads the harness
//! must model"), seeded and parameterised. Every generator returns a [`Workload`]: a list of
//! submit / execute / complete events that the harness replays identically on every design.

use crate::ops::{BindOp, Event, JobId, TableKind, Workload};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

const K4: u64 = 4 << 10;
const K64: u64 = 64 << 10;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const RW: u32 = 0b11;

/// The built-in workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
pub enum Kind {
    /// Asynchronous VM_BIND with queue depth Q (panthor, msm, Xe/nouveau-style): mixed 4 KiB to
    /// 1 GiB binds and unbinds, queued at submit, executed in order, completed after.
    VmBind,
    /// Sparse-texture binding: many 4 KiB binds in a few 2 MiB regions (msm's case), queued
    /// deep.
    SparseTexture,
    /// DMA streaming (iommu-dma for NICs/NVMe): many short-lived 4 KiB..64 KiB maps at a high
    /// rate, each unmapped soon after.
    DmaStream,
    /// VFIO / iommufd pinned guest memory: a few huge maps with 1 GiB and 2 MiB blocks, then a
    /// full teardown, repeated.
    Vfio,
    /// Vulkan sparse residency: bind/unbind churn of 64 KiB tiles across a 4 GiB window.
    SparseResidency,
    /// Adversarial random mix: collisions, partial unmaps, holes, out-of-range and refused
    /// operations, random queue depth.
    RandomMix,
}

impl Kind {
    /// All built-in workloads, in report order.
    pub const ALL: [Kind; 6] = [
        Kind::VmBind,
        Kind::SparseTexture,
        Kind::DmaStream,
        Kind::Vfio,
        Kind::SparseResidency,
        Kind::RandomMix,
    ];

    /// The name used on the command line and in reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Kind::VmBind => "vm-bind",
            Kind::SparseTexture => "sparse-texture",
            Kind::DmaStream => "dma-stream",
            Kind::Vfio => "vfio",
            Kind::SparseResidency => "sparse-residency",
            Kind::RandomMix => "random-mix",
        }
    }

    /// The default queue depth (how many submitted binds may wait for execution).
    #[must_use]
    pub const fn default_queue_depth(self) -> usize {
        match self {
            Kind::VmBind => 16,
            Kind::SparseTexture => 256,
            Kind::DmaStream | Kind::Vfio => 1,
            Kind::SparseResidency => 32,
            Kind::RandomMix => 8,
        }
    }
}

/// Parameters every generator takes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Params {
    /// Seed; the same seed gives the same events.
    pub seed: u64,
    /// Queue depth; `None` takes the workload's default.
    pub queue_depth: Option<usize>,
    /// Size multiplier: 1.0 is the default evaluation, smaller is quicker.
    pub scale: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            seed: 1,
            queue_depth: None,
            scale: 1.0,
        }
    }
}

impl Params {
    fn n(&self, base: usize) -> usize {
        ((base as f64 * self.scale).round() as usize).max(4)
    }
}

/// Event builder with a queue of depth `depth` and completions lagging executions by `lag`.
#[derive(Debug)]
pub struct Queue {
    events: Vec<Event>,
    next: JobId,
    depth: usize,
    lag: usize,
    queued: VecDeque<JobId>,
    executed: VecDeque<JobId>,
}

impl Queue {
    /// A queue that holds at most `depth` submitted, unexecuted jobs (at least 1), and
    /// completes a job once `lag` later jobs have executed.
    #[must_use]
    pub fn new(depth: usize, lag: usize) -> Self {
        Self {
            events: Vec::new(),
            next: 1,
            depth: depth.max(1),
            lag,
            queued: VecDeque::new(),
            executed: VecDeque::new(),
        }
    }

    /// Submits a job; executes the oldest while the queue is full.
    pub fn submit(&mut self, op: BindOp) -> JobId {
        let id = self.next;
        self.next += 1;
        self.events.push(Event::Submit { id, op });
        self.queued.push_back(id);
        while self.queued.len() >= self.depth {
            self.execute_oldest();
        }
        id
    }

    fn execute_oldest(&mut self) {
        if let Some(id) = self.queued.pop_front() {
            self.events.push(Event::Execute { id });
            self.executed.push_back(id);
            while self.executed.len() > self.lag {
                let c = self.executed.pop_front().expect("non-empty");
                self.events.push(Event::Complete { id: c });
            }
        }
    }

    /// Executes and completes everything outstanding.
    pub fn flush(&mut self) {
        while !self.queued.is_empty() {
            self.execute_oldest();
        }
        while let Some(id) = self.executed.pop_front() {
            self.events.push(Event::Complete { id });
        }
    }

    /// Flushes and returns the events.
    #[must_use]
    pub fn finish(mut self) -> Vec<Event> {
        self.flush();
        self.events
    }
}

/// Physical backing: 2 MiB-congruent with the VA (blocks usable) or 4 KiB-offset (4 KiB
/// leaves only, as scattered pages give).
fn backing(va: u64, contiguous: bool, base: u64) -> u64 {
    let pa = base + (va & (G1 - 1)) + ((va >> 30) & 0xff) * G1;
    if contiguous { pa } else { pa + K4 }
}

/// Generates a built-in workload.
#[must_use]
pub fn generate(kind: Kind, p: &Params) -> Workload {
    let depth = p.queue_depth.unwrap_or(kind.default_queue_depth());
    let mut rng =
        ChaCha8Rng::seed_from_u64(p.seed ^ (kind as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let (table, description, events) = match kind {
        Kind::VmBind => (
            TableKind::Panthor,
            format!("async VM_BIND, queue depth {depth}: mixed 4K..1G binds and unbinds"),
            vm_bind(&mut rng, p, depth),
        ),
        Kind::SparseTexture => (
            TableKind::Panthor,
            format!("sparse textures: 1000 4K binds per 2 MiB region, queue depth {depth}"),
            sparse_texture(&mut rng, p, depth),
        ),
        Kind::DmaStream => (
            TableKind::Smmu,
            "DMA streaming: short-lived 4K..64K maps, 64 in flight".to_string(),
            dma_stream(&mut rng, p),
        ),
        Kind::Vfio => (
            TableKind::Smmu,
            "VFIO guest RAM: 1G/2M-block maps, then full teardown, repeated".to_string(),
            vfio(&mut rng, p),
        ),
        Kind::SparseResidency => (
            TableKind::Panthor,
            format!("sparse residency: 64K tile bind/unbind churn in 4 GiB, queue depth {depth}"),
            sparse_residency(&mut rng, p, depth),
        ),
        Kind::RandomMix => (
            TableKind::Smmu,
            "adversarial mix: collisions, partial unmaps, holes, bad inputs, random depth"
                .to_string(),
            random_mix(&mut rng, p),
        ),
    };
    Workload {
        name: kind.name().to_string(),
        description,
        table,
        events,
    }
}

/// A simple VA allocator: bump with alignment, plus the live mappings.
#[derive(Debug, Default)]
struct Vas {
    next: u64,
    live: BTreeMap<u64, u64>,
}

impl Vas {
    fn alloc(&mut self, size: u64, align: u64) -> u64 {
        let va = self.next.div_ceil(align) * align;
        self.next = va + size;
        self.live.insert(va, size);
        va
    }

    fn take_random(&mut self, rng: &mut ChaCha8Rng) -> Option<(u64, u64)> {
        if self.live.is_empty() {
            return None;
        }
        let k = rng.random_range(0..self.live.len());
        let (&va, &size) = self.live.iter().nth(k)?;
        self.live.remove(&va);
        Some((va, size))
    }
}

fn vm_bind(rng: &mut ChaCha8Rng, p: &Params, depth: usize) -> Vec<Event> {
    let mut q = Queue::new(depth, 1);
    let mut vas = Vas {
        next: 0x10_0000_0000,
        ..Vas::default()
    };
    let n = p.n(2500);
    for _ in 0..n {
        if !vas.live.is_empty() && rng.random_bool(0.42) {
            let (va, size) = vas.take_random(rng).expect("non-empty");
            q.submit(BindOp::Unmap { va, size });
            continue;
        }
        let roll: f64 = rng.random();
        let (size, align) = if roll < 0.35 {
            (rng.random_range(1..=16u64) * K4, K4)
        } else if roll < 0.60 {
            (rng.random_range(1..=32u64) * K64, K64)
        } else if roll < 0.82 {
            (
                rng.random_range(1..=16u64) * M2 + if rng.random_bool(0.3) { K64 } else { 0 },
                M2,
            )
        } else if roll < 0.97 {
            (rng.random_range(16..=128u64) * M2, M2)
        } else {
            (G1, G1)
        };
        let contiguous = size >= M2 && rng.random_bool(0.8);
        let va = vas.alloc(size, align);
        q.submit(BindOp::Map {
            va,
            size,
            pa: backing(va, contiguous, 0x80_0000_0000),
            prot: RW,
        });
    }
    q.finish()
}

/// `maps` 4 KiB binds into the 2 MiB region at `base`, in random page order; a page that is
/// already bound is unbound first (sparse textures rebind the same tiles).
fn tiny_binds(q: &mut Queue, rng: &mut ChaCha8Rng, base: u64, maps: usize) {
    let pages = (M2 / K4) as usize;
    let mut bound = vec![false; pages];
    let mut order: Vec<usize> = (0..pages).collect();
    for k in 0..maps {
        if k % pages == 0 {
            order.shuffle(rng);
        }
        let page = order[k % pages];
        let va = base + page as u64 * K4;
        if bound[page] {
            q.submit(BindOp::Unmap { va, size: K4 });
        }
        bound[page] = true;
        q.submit(BindOp::Map {
            va,
            size: K4,
            pa: 0x40_0000_0000 + rng.random_range(0..1u64 << 20) * K4,
            prot: RW,
        });
    }
}

/// The sweep's tiny-bind case: `maps` 4 KiB binds in one 2 MiB region, all queued at once.
#[must_use]
pub fn tiny_binds_queued(maps: usize, seed: u64) -> Workload {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut q = Queue::new(usize::MAX, usize::MAX);
    tiny_binds(&mut q, &mut rng, 0x8000_0000, maps);
    Workload {
        name: format!("tiny-binds-q{maps}"),
        description: format!("{maps} 4 KiB binds in one 2 MiB region, all queued at once"),
        table: TableKind::Panthor,
        events: q.finish(),
    }
}

/// The sweep's large-bind case: `q` binds of `size` bytes at consecutive `size`-aligned VAs,
/// 2 MiB-contiguous backing, all queued at once.
#[must_use]
pub fn big_binds_queued(q_depth: usize, size: u64) -> Workload {
    let mut q = Queue::new(usize::MAX, usize::MAX);
    for i in 0..q_depth as u64 {
        let va = 0x100_0000_0000 + i * size;
        q.submit(BindOp::Map {
            va,
            size,
            pa: backing(va, true, 0x80_0000_0000),
            prot: RW,
        });
    }
    Workload {
        name: format!("big-binds-q{q_depth}"),
        description: format!("{q_depth} binds of {size:#x} bytes, all queued at once"),
        table: TableKind::Panthor,
        events: q.finish(),
    }
}

fn sparse_texture(rng: &mut ChaCha8Rng, p: &Params, depth: usize) -> Vec<Event> {
    let mut q = Queue::new(depth, 4);
    let regions = p.n(4).min(64);
    let maps = ((1000.0 * p.scale.min(1.0)).round() as usize).max(16);
    for r in 0..regions as u64 {
        tiny_binds(&mut q, rng, 0x2_0000_0000 + r * 7 * M2, maps);
    }
    q.finish()
}

fn dma_stream(rng: &mut ChaCha8Rng, p: &Params) -> Vec<Event> {
    let mut q = Queue::new(1, 0);
    let n = p.n(20_000);
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    // An IOVA allocator as iommu-dma's: recently freed ranges of the same size are reused
    // first (the rcache), otherwise allocate downwards from the top of a 4 GiB window.
    let mut cache: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut top: u64 = 0x1_0000_0000;
    for _ in 0..n {
        let size = K4 << rng.random_range(0..=4u32);
        let va = if let Some(va) = cache.get_mut(&size).and_then(Vec::pop) {
            va
        } else {
            top -= size;
            top &= !(size - 1);
            top
        };
        q.submit(BindOp::Map {
            va,
            size,
            pa: 0x2_0000_0000 + rng.random_range(0..1u64 << 22) * K4,
            prot: if rng.random_bool(0.5) { 1 } else { RW },
        });
        inflight.push_back((va, size));
        if inflight.len() > 64 {
            let (va, size) = inflight.pop_front().expect("non-empty");
            q.submit(BindOp::Unmap { va, size });
            cache.entry(size).or_default().push(va);
        }
    }
    q.finish()
}

fn vfio(rng: &mut ChaCha8Rng, p: &Params) -> Vec<Event> {
    let mut q = Queue::new(1, 0);
    let cycles = p.n(6).min(12);
    for c in 0..cycles as u64 {
        let gib = rng.random_range(4..=16u64);
        let mut maps: Vec<(u64, u64, u64)> = Vec::new();
        // Low RAM below the 3 GiB PCI hole on 1 GiB pages; high RAM above 4 GiB; a 2 MiB-page
        // backed region; a few small ROM/BAR maps on 4 KiB pages.
        let host = 0x100_0000_0000 + c * 0x40_0000_0000;
        maps.push((0, 3 * G1, host));
        maps.push((4 * G1, (gib - 3) * G1, host + 4 * G1));
        let thp = (gib + 2) * G1;
        maps.push((
            thp,
            64 * M2 + M2 * rng.random_range(0..64u64),
            host + 0x20_0000_0000 + M2,
        ));
        for k in 0..4u64 {
            maps.push((
                0xC000_0000 + k * 0x10_0000,
                K64 << k,
                host + 0x30_0000_0000 + k * 0x100_0000,
            ));
        }
        for &(va, size, pa) in &maps {
            q.submit(BindOp::Map {
                va,
                size,
                pa,
                prot: RW,
            });
        }
        maps.shuffle(rng);
        for &(va, size, _) in &maps {
            q.submit(BindOp::Unmap { va, size });
        }
    }
    q.finish()
}

fn sparse_residency(rng: &mut ChaCha8Rng, p: &Params, depth: usize) -> Vec<Event> {
    let mut q = Queue::new(depth, 2);
    let n = p.n(8000);
    let base = 0x20_0000_0000;
    let tiles = (4 * G1 / K64) as usize;
    let mut bound: BTreeSet<usize> = BTreeSet::new();
    // Residency concentrates where the camera looks: tiles are drawn from a moving hot spot.
    let mut centre = tiles / 2;
    for i in 0..n {
        if i % 200 == 0 {
            centre = rng.random_range(0..tiles);
        }
        let spread = 4096usize;
        let t = (centre + rng.random_range(0..spread)).min(tiles - 1);
        let va = base + t as u64 * K64;
        if bound.remove(&t) {
            q.submit(BindOp::Unmap { va, size: K64 });
        } else {
            bound.insert(t);
            q.submit(BindOp::Map {
                va,
                size: K64,
                pa: 0x60_0000_0000 + rng.random_range(0..1u64 << 16) * K64,
                prot: RW,
            });
        }
    }
    q.finish()
}

fn random_mix(rng: &mut ChaCha8Rng, p: &Params) -> Vec<Event> {
    let n = p.n(3000);
    let mut events = Vec::new();
    let window = 8 * G1;
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut queued: VecDeque<JobId> = VecDeque::new();
    let mut executed: VecDeque<JobId> = VecDeque::new();
    for id in (1..).take(n) {
        let roll: f64 = rng.random();
        let op = if roll < 0.5 || live.is_empty() {
            let (size, align) = match rng.random_range(0..10u32) {
                0..=3 => (rng.random_range(1..=64u64) * K4, K4),
                4..=5 => (rng.random_range(1..=8u64) * M2, M2),
                6 => (
                    rng.random_range(1..=3u64) * M2 + rng.random_range(1..=16u64) * K4,
                    K4,
                ),
                7 => (G1, G1),
                8 => (rng.random_range(1..=600u64) * K4, M2),
                _ => (rng.random_range(1..=4u64) * M2, K4),
            };
            let mut va = rng.random_range(0..window / align) * align;
            let bad = rng.random_range(0..40u32);
            let mut pa = backing(va, rng.random_bool(0.6), 0x40_0000_0000);
            let mut prot = if rng.random_bool(0.9) {
                RW
            } else {
                rng.random_range(0..64u32)
            };
            let mut size = size;
            match bad {
                0 => va = (1 << 48) - K4 * rng.random_range(0..4u64), // leaves the VA range
                1 => pa = (1 << 48) - K4,                             // leaves the PA range
                2 => va += 0x800,                                     // misaligned
                3 => prot = 0,                                        // no access
                4 => size += 0x800,                                   // a size no page size fits
                _ => {}
            }
            if bad > 4 {
                live.push((va, size));
            }
            BindOp::Map { va, size, pa, prot }
        } else {
            let k = rng.random_range(0..live.len());
            let (va, size) = live[k];
            match rng.random_range(0..6u32) {
                0..=2 => {
                    live.swap_remove(k);
                    BindOp::Unmap { va, size }
                }
                // A piece of it: may cut a block, or be fine.
                3 => {
                    let off = rng.random_range(0..size.div_ceil(K4).max(1)) * K4;
                    BindOp::Unmap {
                        va: va + off,
                        size: K4 * rng.random_range(1..=8u64),
                    }
                }
                // More than it: runs into holes.
                4 => BindOp::Unmap {
                    va,
                    size: size + M2,
                },
                _ => BindOp::Unmap {
                    va: rng.random_range(0..window / M2) * M2,
                    size: M2,
                },
            }
        };
        events.push(Event::Submit { id, op });
        queued.push_back(id);
        let depth = rng.random_range(1..=8usize);
        while queued.len() >= depth {
            let e = queued.pop_front().expect("non-empty");
            events.push(Event::Execute { id: e });
            executed.push_back(e);
        }
        while executed.len() > rng.random_range(0..3usize) {
            let c = executed.pop_front().expect("non-empty");
            events.push(Event::Complete { id: c });
        }
    }
    for e in queued {
        events.push(Event::Execute { id: e });
        executed.push_back(e);
    }
    for c in executed {
        events.push(Event::Complete { id: c });
    }
    events
}
