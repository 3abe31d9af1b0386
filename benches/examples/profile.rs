//! A fixed workload for instruction-level profiling (callgrind), one phase per run:
//!
//! ```text
//! cargo build --profile bench -p iopt-benches --example profile
//! valgrind --tool=callgrind --toggle-collect='profile::phase*' \
//!     target/release/examples/profile map_present alloc_ops
//! ```
//!
//! Phases: `map_new`, `map_present`, `unmap`, `lookup`, `bulk_map`, `bulk_map_present`,
//! `bulk_unmap`, `map_2m`, `unmap_2m`, and, for the two designs only, `map_reserved` (single
//! 4K maps inside a reservation made beforehand) and `vm_bind` (the bench's 2000 binds, per
//! bind); backends: `alloc_ops`, `prealloc`, `prealloc_mut` (Design 2 through its exclusive
//! entry points; the single-call phases only), `aarch64-paging`. Only the `phase_*` function does the measured work, so with
//! `--toggle-collect` the instruction count divided by the printed operation count is the cost
//! of one operation.

use iopt_benches::{AllocOps, BASE_IOVA, Backend, Peer, Reserving, SZ_2M, SZ_4K, pa_of, work};
#[cfg(feature = "prealloc")]
use iopt_benches::{Prealloc, PreallocMut};
use std::hint::black_box;

const PAGES: u64 = 16_384;
const BLOCKS: u64 = 512;

#[inline(never)]
fn phase_map<B: Backend>(t: &mut B) {
    for i in 0..PAGES {
        let iova = BASE_IOVA + i * SZ_4K;
        t.map(black_box(iova), pa_of(iova), SZ_4K, 1);
    }
}

#[inline(never)]
fn phase_unmap<B: Backend>(t: &mut B) {
    for i in 0..PAGES {
        t.unmap(black_box(BASE_IOVA + i * SZ_4K), SZ_4K, 1);
    }
}

#[inline(never)]
fn phase_lookup<B: Backend>(t: &mut B, iovas: &[u64]) {
    for &v in iovas {
        black_box(t.lookup(black_box(v)));
    }
}

#[inline(never)]
fn phase_bulk_map<B: Backend>(t: &mut B) {
    t.map(black_box(BASE_IOVA), pa_of(BASE_IOVA), SZ_4K, PAGES);
}

#[inline(never)]
fn phase_map_2m<B: Backend>(t: &mut B) {
    for i in 0..BLOCKS {
        let iova = BASE_IOVA + i * SZ_2M;
        t.map(black_box(iova), pa_of(iova), SZ_2M, 1);
    }
}

#[inline(never)]
fn phase_unmap_2m<B: Backend>(t: &mut B) {
    for i in 0..BLOCKS {
        t.unmap(black_box(BASE_IOVA + i * SZ_2M), SZ_2M, 1);
    }
}

#[inline(never)]
fn phase_bulk_unmap<B: Backend>(t: &mut B) {
    t.unmap(black_box(BASE_IOVA), SZ_4K, PAGES);
}

#[inline(never)]
fn phase_map_reserved<B: Reserving>(t: &mut B, r: &B::Res) {
    for i in 0..PAGES {
        let iova = BASE_IOVA + i * SZ_4K;
        t.map_reserved(r, black_box(iova), pa_of(iova), SZ_4K, 1);
    }
}

/// The bench's VM_BIND loop ([`work::vm_bind_queued`]).
#[inline(never)]
fn phase_vm_bind<B: Reserving>(t: &mut B, binds: &[work::Bind]) {
    work::vm_bind_queued(t, binds);
}

/// The phases that need reservations, for the designs that have them.
fn run_reserving<B: Reserving>(phase: &str) -> u64 {
    let mut t = B::fresh();
    match phase {
        "vm_bind" => {
            let binds = work::vm_bind_trace(2000, 0xB1D);
            phase_vm_bind(&mut t, &binds);
            black_box(&t);
            return 2000;
        }
        "map_reserved" => {
            let r = t.reserve(BASE_IOVA, PAGES * SZ_4K, SZ_4K);
            phase_map_reserved(&mut t, &r);
            t.release(r);
        }
        other => return run::<B>(other),
    }
    black_box(&t);
    PAGES
}

fn run<B: Backend>(phase: &str) -> u64 {
    let mut t = B::fresh();
    match phase {
        "map_new" => phase_map(&mut t),
        "map_present" => {
            t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, PAGES);
            t.clear_keep_tables(BASE_IOVA, PAGES);
            phase_map(&mut t);
        }
        "unmap" => {
            t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, PAGES);
            phase_unmap(&mut t);
        }
        "lookup" => {
            t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, PAGES);
            let iovas = work::spread(PAGES as usize, BASE_IOVA, PAGES, 7);
            phase_lookup(&mut t, &iovas);
        }
        "bulk_map" => phase_bulk_map(&mut t),
        "bulk_map_present" => {
            t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, PAGES);
            t.clear_keep_tables(BASE_IOVA, PAGES);
            phase_bulk_map(&mut t);
        }
        "map_2m" => {
            phase_map_2m(&mut t);
            black_box(&t);
            return BLOCKS;
        }
        "unmap_2m" => {
            t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_2M, BLOCKS);
            phase_unmap_2m(&mut t);
            black_box(&t);
            return BLOCKS;
        }
        "bulk_unmap" => {
            t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, PAGES);
            phase_bulk_unmap(&mut t);
        }
        other => panic!("unknown phase {other}"),
    }
    black_box(&t);
    PAGES
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let phase = args.get(1).map_or("map_present", String::as_str);
    let backend = args.get(2).map_or("alloc_ops", String::as_str);
    let ops = match backend {
        "alloc_ops" => run_reserving::<AllocOps>(phase),
        "aarch64-paging" => run::<Peer>(phase),
        #[cfg(feature = "prealloc")]
        "prealloc" => run_reserving::<Prealloc>(phase),
        #[cfg(feature = "prealloc")]
        "prealloc_mut" => run::<PreallocMut>(phase),
        other => panic!("unknown backend {other}"),
    };
    println!("{phase} {backend}: {ops} operations");
}
