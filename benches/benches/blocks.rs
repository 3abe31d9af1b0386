//! 512 single-block calls of 2M: map into a fresh table, and unmap.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use iopt_benches::{AllocOps, Backend, Peer, Profile, SZ_2M, work};
#[cfg(feature = "prealloc")]
use iopt_benches::{Prealloc, PreallocMut};

type Group<'a> = BenchmarkGroup<'a, WallTime>;

fn map<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| work::map_each(t, n, SZ_2M),
            BatchSize::SmallInput,
        );
    });
}

fn unmap<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            || work::mapped_blocks::<B>(n),
            |t| work::unmap_each(t, n, SZ_2M),
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
