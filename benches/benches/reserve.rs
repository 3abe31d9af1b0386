//! Reservations: a map inside a reservation against a map into present tables, release,
//! `pages_needed`, and a VM_BIND-like bind loop.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
#[cfg(feature = "prealloc")]
use iopt_benches::Prealloc;
use iopt_benches::work::{self, Bind};
use iopt_benches::{AllocOps, BASE_IOVA, Backend, Peer, Profile, Reserving, SZ_2M, SZ_4K, pa_of};
use std::hint::black_box;

type Group<'a> = BenchmarkGroup<'a, WallTime>;

fn variant(name: &str, what: &str) -> String {
    format!("{name}/{what}")
}

fn plain<B: Backend>(g: &mut Group<'_>, n: u64, single: bool) {
    let p = if single { "single" } else { "bulk" };
    g.bench_function(BenchmarkId::new(variant(B::NAME, "present"), p), |b| {
        b.iter_batched_ref(
            || work::present::<B>(n),
            |t| {
                work::map_pages(t, n, single);
            },
            BatchSize::PerIteration,
        );
    });
    g.bench_function(BenchmarkId::new(variant(B::NAME, "new"), p), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| {
                work::map_pages(t, n, single);
            },
            BatchSize::PerIteration,
        );
    });
}

fn reserved<B: Reserving>(g: &mut Group<'_>, n: u64, single: bool) {
    let param = if single { "single" } else { "bulk" };
    let len = n * SZ_4K;
    g.bench_function(BenchmarkId::new(variant(B::NAME, "reserved"), param), |b| {
        b.iter_batched_ref(
            || work::reserved::<B>(n),
            |(t, r)| {
                work::map_pages_reserved(t, r, n, single);
            },
            BatchSize::PerIteration,
        );
    });
    g.bench_function(
        BenchmarkId::new(variant(B::NAME, "reserve+map"), param),
        |b| {
            b.iter_batched_ref(
                B::fresh,
                |t| {
                    let r = t.reserve(black_box(BASE_IOVA), len, SZ_4K);
                    work::map_pages_reserved(t, &r, n, single);
                    r
                },
                BatchSize::PerIteration,
            );
        },
    );
}

/// `k` reservations of 2 MiB each, in distinct 2 MiB regions of one 1 GiB window.
fn reserve_k<B: Reserving>(k: u64, map: bool) -> (B, Vec<B::Res>) {
    let mut t = B::fresh();
    let mut rs = Vec::new();
    for i in 0..k {
        let iova = BASE_IOVA + i * SZ_2M;
        let r = t.reserve(iova, SZ_2M, SZ_4K);
        if map {
            t.map_reserved(&r, iova, pa_of(iova), SZ_4K, 512);
            t.unmap(iova, SZ_4K, 512);
        }
        rs.push(r);
    }
    (t, rs)
}

fn release<B: Reserving>(g: &mut Group<'_>, k: u64) {
    for (what, map) in [("unused", false), ("mapped+unmapped", true)] {
        g.bench_function(BenchmarkId::new(B::NAME, what), |b| {
            b.iter_batched_ref(
                || reserve_k::<B>(k, map),
                |(t, rs)| {
                    for r in rs.drain(..) {
                        t.release(black_box(r));
                    }
                },
                BatchSize::PerIteration,
            );
        });
    }
}

fn pages_needed<B: Reserving>(g: &mut Group<'_>) {
    // A 1 GiB window where every other 2 MiB region holds a leaf table.
    let mut t = B::fresh();
    for i in (0..512).step_by(2) {
        let iova = BASE_IOVA + i * SZ_2M;
        t.map(iova, pa_of(iova), SZ_4K, 1);
    }
    for (what, iova, len) in [
        ("2m_present", BASE_IOVA, SZ_2M),
        ("2m_missing", BASE_IOVA + SZ_2M, SZ_2M),
        ("64m", BASE_IOVA, 64 << 20),
        ("1g", BASE_IOVA, 1 << 30),
        ("1g_empty", BASE_IOVA + (8 << 30), 1 << 30),
    ] {
        g.bench_function(BenchmarkId::new(B::NAME, what), |b| {
            b.iter(|| t.pages_needed(black_box(iova), len));
        });
    }
}

/// Binds queued `QUEUE_DEPTH` deep: [`work::vm_bind_queued`].
fn vm_bind_reserved<B: Reserving>(g: &mut Group<'_>, binds: &[Bind]) {
    g.bench_function(
        BenchmarkId::new(variant(B::NAME, "reserved"), binds.len()),
        |b| {
            b.iter_batched_ref(
                B::fresh,
                |t| work::vm_bind_queued(t, binds),
                BatchSize::PerIteration,
            );
        },
    );
}

/// The same binds mapped synchronously, without reservations.
fn vm_bind_sync<B: Backend>(g: &mut Group<'_>, binds: &[Bind], name: &str) {
    g.bench_function(BenchmarkId::new(name, binds.len()), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| {
                for bind in binds {
                    let bind = black_box(bind);
                    t.map(bind.iova, bind.pa(), bind.size, bind.count);
                }
                work::unbind_all(t, binds);
            },
            BatchSize::PerIteration,
        );
    });
}

fn bench(c: &mut Criterion) {
    let profile = Profile::detect();
    let n = profile.reserve_pages();

    let mut g = c.benchmark_group("reserved_map");
    g.throughput(Throughput::Elements(n));
    for single in [true, false] {
        plain::<AllocOps>(&mut g, n, single);
        #[cfg(feature = "prealloc")]
        plain::<Prealloc>(&mut g, n, single);
        reserved::<AllocOps>(&mut g, n, single);
        #[cfg(feature = "prealloc")]
        reserved::<Prealloc>(&mut g, n, single);
        plain::<Peer>(&mut g, n, single);
    }
    g.finish();

    let k = if profile.is_smoke() { 8 } else { 64 };
    let mut g = c.benchmark_group("release");
    g.throughput(Throughput::Elements(k));
    release::<AllocOps>(&mut g, k);
    #[cfg(feature = "prealloc")]
    release::<Prealloc>(&mut g, k);
    g.finish();

    let mut g = c.benchmark_group("pages_needed");
    g.throughput(Throughput::Elements(1));
    pages_needed::<AllocOps>(&mut g);
    #[cfg(feature = "prealloc")]
    pages_needed::<Prealloc>(&mut g);
    g.finish();

    let binds = work::vm_bind_trace(profile.binds(), 0xB1D);
    let mut g = c.benchmark_group("vm_bind");
    g.throughput(Throughput::Elements(binds.len() as u64));
    vm_bind_reserved::<AllocOps>(&mut g, &binds);
    #[cfg(feature = "prealloc")]
    vm_bind_reserved::<Prealloc>(&mut g, &binds);
    vm_bind_sync::<AllocOps>(&mut g, &binds, "alloc_ops/sync");
    #[cfg(feature = "prealloc")]
    vm_bind_sync::<Prealloc>(&mut g, &binds, "prealloc/sync");
    vm_bind_sync::<Peer>(&mut g, &binds, "aarch64-paging");
    g.finish();
}

criterion::criterion_group! {
    name = benches;
    config = iopt_benches::criterion_config();
    targets = bench
}
criterion::criterion_main!(benches);
