//! Concurrency: 1 vs 2 threads mapping single 4K pages into disjoint 1 GiB ranges of one
//! table, into new tables and into present ones. Throughput is pages over all threads, so the
//! 2-thread row's per-page time is half the 1-thread row's when scaling is perfect.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
#[cfg(feature = "prealloc")]
use iopt_benches::SharedPrealloc;
use iopt_benches::{AllocOps, LockedPeer, Profile, Shared, work};

fn one<S: Shared>(g: &mut BenchmarkGroup<'_, WallTime>, threads: u64, n: u64) {
    g.bench_function(BenchmarkId::new(format!("{}/new", S::NAME), threads), |b| {
        b.iter_batched_ref(
            S::fresh,
            |t| work::map_threads(&*t, threads, n),
            BatchSize::PerIteration,
        );
    });
    g.bench_function(
        BenchmarkId::new(format!("{}/present", S::NAME), threads),
        |b| {
            b.iter_batched_ref(
                || work::prefilled::<S>(threads, n),
                |t| work::map_threads(&*t, threads, n),
                BatchSize::PerIteration,
            );
        },
    );
}

fn bench(c: &mut Criterion) {
    let n = Profile::detect().thread_pages();
    let mut g = c.benchmark_group("threads_map_4k");
    for threads in [1, 2] {
        g.throughput(Throughput::Elements(threads * n));
        one::<AllocOps>(&mut g, threads, n);
        #[cfg(feature = "prealloc")]
        one::<SharedPrealloc>(&mut g, threads, n);
        one::<LockedPeer>(&mut g, threads, n);
    }
    g.finish();
}

criterion::criterion_group! {
    name = benches;
    config = iopt_benches::criterion_config();
    targets = bench
}
criterion::criterion_main!(benches);
