//! 100k random maps and unmaps of 4K..2M in a 64 GiB window, from an empty table.

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
#[cfg(feature = "prealloc")]
use iopt_benches::Prealloc;
use iopt_benches::work::{self, Op};
use iopt_benches::{AllocOps, Backend, Peer, Profile, pa_of};
use std::hint::black_box;

fn run<B: Backend>(g: &mut BenchmarkGroup<'_, WallTime>, ops: &[Op]) {
    g.bench_function(BenchmarkId::new(B::NAME, ops.len()), |b| {
        b.iter_batched_ref(
            B::fresh,
            |t| {
                for op in ops {
                    let op = black_box(op);
                    if op.map {
                        t.map(op.iova, pa_of(op.iova), op.size, op.count);
                    } else {
                        t.unmap(op.iova, op.size, op.count);
                    }
                }
            },
            BatchSize::PerIteration,
        );
    });
}

fn bench(c: &mut Criterion) {
    let ops = work::random_ops(Profile::detect().random_ops(), 0x10_2030);
    let mut g = c.benchmark_group("random_64g");
    g.throughput(Throughput::Elements(ops.len() as u64));
    run::<AllocOps>(&mut g, &ops);
    #[cfg(feature = "prealloc")]
    run::<Prealloc>(&mut g, &ops);
    run::<Peer>(&mut g, &ops);
    g.finish();
}

criterion::criterion_group! {
    name = benches;
    config = iopt_benches::criterion_config();
    targets = bench
}
criterion::criterion_main!(benches);
