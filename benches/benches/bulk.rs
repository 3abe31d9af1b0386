//! Bulk map and unmap of 1 GiB in 4K entries (one call each), beside plain store loops.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
#[cfg(feature = "prealloc")]
use iopt_benches::Prealloc;
use iopt_benches::{AllocOps, BASE_IOVA, Backend, Peer, Profile, SZ_4K, floor, pa_of, work};
use std::hint::black_box;

type Group<'a> = BenchmarkGroup<'a, WallTime>;

fn map<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| {
                t.map(black_box(BASE_IOVA), pa_of(BASE_IOVA), SZ_4K, n);
            },
            BatchSize::PerIteration,
        );
    });
}

fn unmap<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            || work::mapped::<B>(n),
            |t| {
                t.unmap(black_box(BASE_IOVA), SZ_4K, n);
            },
            BatchSize::PerIteration,
        );
    });
}

fn bench(c: &mut Criterion) {
    let n = Profile::detect().pages();

    let mut g = c.benchmark_group("bulk_map_1g_4k");
    g.throughput(Throughput::Elements(n));
    map::<AllocOps>(&mut g, n);
    #[cfg(feature = "prealloc")]
    map::<Prealloc>(&mut g, n);
    map::<Peer>(&mut g, n);
    g.bench_function(BenchmarkId::new("floor/store_loop+alloc", n), |b| {
        b.iter(|| floor::store_loop_alloc(n, black_box(BASE_IOVA)));
    });
    let mut leaves = vec![0u64; n as usize];
    g.bench_function(BenchmarkId::new("floor/store_loop", n), |b| {
        b.iter(|| {
            floor::store_loop(&mut leaves, black_box(BASE_IOVA));
            black_box(&leaves);
        });
    });
    g.finish();

    let mut g = c.benchmark_group("bulk_unmap_1g_4k");
    g.throughput(Throughput::Elements(n));
    unmap::<AllocOps>(&mut g, n);
    #[cfg(feature = "prealloc")]
    unmap::<Prealloc>(&mut g, n);
    // aarch64-paging frees a whole subtable when an unmap covers it. Its row clears half a
    // leaf table per call, which keeps the tables and clears entry by entry, as iopt's
    // `alloc_ops` and Linux do (the reference figure, 2.10 ns/page, was measured so);
    // `free-subtables` is one call over the whole range.
    g.bench_function(BenchmarkId::new("aarch64-paging/free-subtables", n), |b| {
        b.iter_batched_ref(
            || work::mapped::<Peer>(n),
            |t| {
                t.unmap(black_box(BASE_IOVA), SZ_4K, n);
            },
            BatchSize::PerIteration,
        );
    });
    g.bench_function(BenchmarkId::new(Peer::NAME, n), |b| {
        b.iter_batched_ref(
            || work::mapped::<Peer>(n),
            |t| {
                t.clear_keep_tables(black_box(BASE_IOVA), n);
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

criterion::criterion_group! {
    name = benches;
    config = iopt_benches::criterion_config();
    targets = bench
}
criterion::criterion_main!(benches);
