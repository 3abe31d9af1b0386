//! Single-4K calls, one page per call, over 1 GiB (262144 calls; 8 MiB in the smoke run):
//! map into new tables, map into present tables, unmap; and lookup of one page.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use iopt_benches::{AllocOps, BASE_IOVA, Backend, Peer, Profile, SZ_4K, pa_of, work};
#[cfg(feature = "prealloc")]
use iopt_benches::{Prealloc, PreallocMut};
use std::hint::black_box;

type Group<'a> = BenchmarkGroup<'a, WallTime>;

fn map_each<B: Backend>(t: &mut B, n: u64) {
    for i in 0..n {
        let iova = BASE_IOVA + i * SZ_4K;
        t.map(black_box(iova), pa_of(iova), SZ_4K, 1);
    }
}

fn map_new<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| {
                map_each(t, n);
            },
            BatchSize::PerIteration,
        );
    });
}

fn present<B: Backend>(n: u64) -> B {
    let mut t = B::fresh();
    t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, n);
    t.clear_keep_tables(BASE_IOVA, n);
    t
}

fn map_present<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            || present::<B>(n),
            |t| {
                map_each(t, n);
            },
            BatchSize::PerIteration,
        );
    });
}

fn mapped<B: Backend>(n: u64) -> B {
    let mut t = B::fresh();
    t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, n);
    t
}

fn unmap_each<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            || mapped::<B>(n),
            |t| {
                for i in 0..n {
                    t.unmap(black_box(BASE_IOVA + i * SZ_4K), SZ_4K, 1);
                }
            },
            BatchSize::PerIteration,
        );
    });
}

fn lookup<B: Backend>(g: &mut Group<'_>, n: u64, iovas: &[u64], what: &str) {
    let mut t = mapped::<B>(n);
    assert_eq!(t.lookup(iovas[0]), Some(pa_of(iovas[0])));
    g.bench_function(BenchmarkId::new(B::NAME, what), |b| {
        b.iter(|| {
            for &v in iovas {
                black_box(t.lookup(black_box(v)));
            }
        });
    });
}

fn bench(c: &mut Criterion) {
    let p = Profile::detect();
    let n = p.pages();

    let mut g = c.benchmark_group("map_4k_single_new");
    g.throughput(Throughput::Elements(n));
    map_new::<AllocOps>(&mut g, n);
    #[cfg(feature = "prealloc")]
    map_new::<Prealloc>(&mut g, n);
    #[cfg(feature = "prealloc")]
    map_new::<PreallocMut>(&mut g, n);
    map_new::<Peer>(&mut g, n);
    g.finish();

    let mut g = c.benchmark_group("map_4k_single_present");
    g.throughput(Throughput::Elements(n));
    map_present::<AllocOps>(&mut g, n);
    #[cfg(feature = "prealloc")]
    map_present::<Prealloc>(&mut g, n);
    #[cfg(feature = "prealloc")]
    map_present::<PreallocMut>(&mut g, n);
    map_present::<Peer>(&mut g, n);
    g.finish();

    let mut g = c.benchmark_group("unmap_4k_single");
    g.throughput(Throughput::Elements(n));
    unmap_each::<AllocOps>(&mut g, n);
    #[cfg(feature = "prealloc")]
    unmap_each::<Prealloc>(&mut g, n);
    #[cfg(feature = "prealloc")]
    unmap_each::<PreallocMut>(&mut g, n);
    unmap_each::<Peer>(&mut g, n);
    g.finish();

    // 1024 lookups per iteration in a 1 GiB mapped window: the same page each time (hot), and
    // pages spread over the window (leaf tables mostly out of L1).
    let same = vec![BASE_IOVA + 0x1234_5000 % (n * SZ_4K) + 0x123; 1024];
    let spread = work::spread(1024, BASE_IOVA, n, 7);
    let mut g = c.benchmark_group("lookup");
    g.throughput(Throughput::Elements(1024));
    lookup::<AllocOps>(&mut g, n, &same, "same");
    #[cfg(feature = "prealloc")]
    lookup::<Prealloc>(&mut g, n, &same, "same");
    #[cfg(feature = "prealloc")]
    lookup::<PreallocMut>(&mut g, n, &same, "same");
    lookup::<Peer>(&mut g, n, &same, "same");
    lookup::<AllocOps>(&mut g, n, &spread, "spread");
    #[cfg(feature = "prealloc")]
    lookup::<Prealloc>(&mut g, n, &spread, "spread");
    #[cfg(feature = "prealloc")]
    lookup::<PreallocMut>(&mut g, n, &spread, "spread");
    lookup::<Peer>(&mut g, n, &spread, "spread");
    g.finish();
}

criterion::criterion_group! {
    name = benches;
    config = iopt_benches::criterion_config();
    targets = bench
}
criterion::criterion_main!(benches);
