//! Single-4K calls, one page per call, over 1 GiB (262144 calls; 8 MiB in the smoke run):
//! map into new tables, map into present tables, unmap; and lookup of one page.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use iopt_benches::{AllocOps, Backend, Peer, Profile, SZ_4K, pa_of, work};
#[cfg(feature = "prealloc")]
use iopt_benches::{Prealloc, PreallocMut};

type Group<'a> = BenchmarkGroup<'a, WallTime>;

fn map_new<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| work::map_each(t, n, SZ_4K),
            BatchSize::PerIteration,
        );
    });
}

fn map_present<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            || work::present::<B>(n),
            |t| work::map_each(t, n, SZ_4K),
            BatchSize::PerIteration,
        );
    });
}

fn unmap_each<B: Backend>(g: &mut Group<'_>, n: u64) {
    g.bench_function(BenchmarkId::new(B::NAME, n), |b| {
        b.iter_batched_ref(
            || work::mapped::<B>(n),
            |t| work::unmap_each(t, n, SZ_4K),
            BatchSize::PerIteration,
        );
    });
}

fn lookup<B: Backend>(g: &mut Group<'_>, n: u64, iovas: &[u64], what: &str) {
    let mut t = work::mapped::<B>(n);
    assert_eq!(t.lookup(iovas[0]), Some(pa_of(iovas[0])));
    g.bench_function(BenchmarkId::new(B::NAME, what), |b| {
        b.iter(|| work::lookup_all(&mut t, iovas));
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
    let same = work::lookup_iovas(n, false);
    let spread = work::lookup_iovas(n, true);
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
