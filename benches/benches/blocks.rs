//! 512 single-block calls of 2M: map into a fresh table, and unmap.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use iopt_benches::{AllocOps, BASE_IOVA, Backend, Peer, Profile, SZ_2M, pa_of};
#[cfg(feature = "prealloc")]
use iopt_benches::{Prealloc, PreallocMut};
use std::hint::black_box;

type Group<'a> = BenchmarkGroup<'a, WallTime>;

fn map<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| {
                for i in 0..n {
                    let iova = BASE_IOVA + i * SZ_2M;
                    t.map(black_box(iova), pa_of(iova), SZ_2M, 1);
                }
            },
            BatchSize::SmallInput,
        );
    });
}

fn unmap<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            || {
                let mut t = B::fresh();
                t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_2M, n);
                t
            },
            |t| {
                for i in 0..n {
                    t.unmap(black_box(BASE_IOVA + i * SZ_2M), SZ_2M, 1);
                }
            },
            BatchSize::SmallInput,
        );
    });
}

fn bench(c: &mut Criterion) {
    let n = Profile::detect().blocks();

    let mut g = c.benchmark_group("map_2m_blocks");
    g.throughput(Throughput::Elements(n));
    map::<AllocOps>(&mut g, n);
    #[cfg(feature = "prealloc")]
    map::<Prealloc>(&mut g, n);
    #[cfg(feature = "prealloc")]
    map::<PreallocMut>(&mut g, n);
    map::<Peer>(&mut g, n);
    g.finish();

    let mut g = c.benchmark_group("unmap_2m_blocks");
    g.throughput(Throughput::Elements(n));
    unmap::<AllocOps>(&mut g, n);
    #[cfg(feature = "prealloc")]
    unmap::<Prealloc>(&mut g, n);
    #[cfg(feature = "prealloc")]
    unmap::<PreallocMut>(&mut g, n);
    unmap::<Peer>(&mut g, n);
    g.finish();
}

criterion::criterion_group! {
    name = benches;
    config = iopt_benches::criterion_config();
    targets = bench
}
criterion::criterion_main!(benches);
