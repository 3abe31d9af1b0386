//! Scaling: bulk maps of 4K entries from 1 MiB up to 1 GiB (64 GiB with `IOPT_BENCH_FULL=1`),
//! per page; the cost per page should stay flat. Before timing, checks that iopt's tree holds
//! exactly one table page per 512 leaves plus the levels above.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
#[cfg(feature = "prealloc")]
use iopt_benches::Prealloc;
use iopt_benches::{AllocOps, BASE_IOVA, Backend, Peer, Profile, SZ_4K, expected_tables_4k, pa_of};
use std::hint::black_box;

fn label(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes >> 20)
    }
}

fn one<B: Backend>(g: &mut BenchmarkGroup<'_, WallTime>, bytes: u64) {
    let pages = bytes / SZ_4K;
    g.bench_function(BenchmarkId::new(B::NAME, label(bytes)), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| {
                t.map(black_box(BASE_IOVA), pa_of(BASE_IOVA), SZ_4K, pages);
            },
            BatchSize::PerIteration,
        );
    });
}

/// Maps `bytes` into a fresh table and checks the table-page count is the exact minimum.
fn check_memory<B: Backend>(bytes: u64) {
    let mut t = B::fresh();
    t.map(BASE_IOVA, pa_of(BASE_IOVA), SZ_4K, bytes / SZ_4K);
    if let Some(got) = t.table_pages() {
        let want = expected_tables_4k(bytes);
        eprintln!(
            "scaling: {}: {} mapped in 4K leaves -> {got} table pages (exact minimum {want})",
            B::NAME,
            label(bytes)
        );
        assert_eq!(got, want, "{}: table pages for {}", B::NAME, label(bytes));
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scaling_bulk_4k");
    g.sampling_mode(SamplingMode::Flat);
    for bytes in Profile::detect().scaling_sizes() {
        check_memory::<AllocOps>(bytes);
        #[cfg(feature = "prealloc")]
        check_memory::<Prealloc>(bytes);
        g.throughput(Throughput::Elements(bytes / SZ_4K));
        one::<AllocOps>(&mut g, bytes);
        #[cfg(feature = "prealloc")]
        one::<Prealloc>(&mut g, bytes);
        one::<Peer>(&mut g, bytes);
    }
    g.finish();
}

criterion::criterion_group! {
    name = benches;
    config = iopt_benches::criterion_config();
    targets = bench
}
criterion::criterion_main!(benches);
