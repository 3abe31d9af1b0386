//! docs/designs.md §8 reproduced by running the backends: single binds on an empty tree (Design 1
//! reserves the "reserved" column, Design 2 the "need" columns) and peak memory against queue
//! depth (2.0 / 16.1 / 128.5 MiB for 1, 8, 64 queued 1 GiB binds under Design 1; 3,000 vs 3
//! pages for 1000 tiny binds in one 2 MiB region).

use compare::designs::{design1, design1_msm_cap, design2};
use compare::experiments::{
    MapLimits, WORKED_EXAMPLES, big_sweep, human, single_binds, tiny_sweep,
};
use compare::harness::{AnyDesign, RunOptions};
use compare::metrics::mib;

fn check_rows(rows: &[compare::experiments::SingleBind]) {
    for row in rows {
        let e = &row.example;
        // Design 1: the panthor formula, whatever the backing.
        assert_eq!(
            row.reserved_scattered[0], e.reserved,
            "Design 1, {}",
            e.request
        );
        assert_eq!(
            row.reserved_contig[0], e.reserved,
            "Design 1, {}",
            e.request
        );
        // Design 2: what the bind needs.
        assert_eq!(
            row.reserved_scattered[1], e.need_scattered,
            "Design 2, {}",
            e.request
        );
        assert_eq!(
            row.reserved_contig[1], e.need_contig,
            "Design 2, {}",
            e.request
        );
        assert!(row.reproduces());
        if row.mapped {
            // The tables the map really created: Design 1 consumed exactly the need too.
            assert_eq!(
                row.consumed_contig[0], e.need_contig,
                "Design 1 consumed, {}",
                e.request
            );
            assert_eq!(
                row.consumed_contig[1], e.need_contig,
                "Design 2 tables, {}",
                e.request
            );
        }
    }
}

#[test]
fn single_binds_reproduce_the_worked_examples() {
    let (d1, d2) = (design1(), design2());
    let designs: [&dyn AnyDesign; 2] = [&d1, &d2];
    // Debug builds: every row but the 512 GiB one (2^18 table pages per reservation); map the
    // 2 MiB-contiguous binds, reserve only the 1 GiB scattered ones (2^18 leaves each). The
    // release-mode main job runs all eleven and maps everything up to 4 GiB, and
    // `all_eleven_rows_in_release` below runs the last row when tests are optimised.
    let limits = MapLimits {
        contiguous: (1 << 30) + 4096,
        scattered: 2 << 20,
    };
    let rows = single_binds(
        &WORKED_EXAMPLES[..10],
        &designs,
        limits,
        &RunOptions::default(),
        &mut |_| {},
    )
    .expect("runs");
    check_rows(&rows);
    let d1: Vec<u64> = rows.iter().map(|r| r.reserved_contig[0]).collect();
    assert_eq!(d1, [3, 3, 4, 5, 6, 3, 4, 514, 515, 516]);
    let d2: Vec<u64> = rows.iter().map(|r| r.reserved_contig[1]).collect();
    assert_eq!(d2, [3, 3, 4, 5, 6, 2, 4, 2, 3, 5]);
}

#[test]
fn the_512_gib_row_from_the_counting_apis() {
    use compare::ops::TableKind;
    use iopt_alloc_ops::{AllocOpsTable, CountPolicy};
    use iopt_api::{Iova, IovaRange, PageSize, Reserve};
    use iopt_prealloc::PreallocTable;
    use iopt_sim::SimMemory;
    let cfg = TableKind::Panthor.config();
    let range = IovaRange::new(Iova::new(512 << 30), 512 << 30, 4096).unwrap();
    let mem = SimMemory::new();
    let t1 = AllocOpsTable::new(cfg, &mem).unwrap();
    assert_eq!(
        t1.count(&[range], PageSize::SZ_4K, CountPolicy::WorstCase)
            .unwrap(),
        262_657
    );
    assert_eq!(iopt_model::worst_case(&cfg, 512 << 30, 512 << 30), 262_657);
    let t2 = PreallocTable::new(cfg, &mem).unwrap();
    assert_eq!(t2.pages_needed(range, PageSize::SZ_4K).unwrap(), 262_657);
    assert_eq!(t2.pages_needed(range, PageSize::SZ_2M).unwrap(), 513);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "2^18-page reservations: run with --release"
)]
fn all_eleven_rows_in_release() {
    let (d1, d2) = (design1(), design2());
    let designs: [&dyn AnyDesign; 2] = [&d1, &d2];
    let rows = single_binds(
        &WORKED_EXAMPLES,
        &designs,
        MapLimits::default(),
        &RunOptions::default(),
        &mut |_| {},
    )
    .expect("runs");
    check_rows(&rows);
    assert_eq!(rows[10].reserved_contig, [262_657, 513]);
    assert_eq!(rows[10].reserved_scattered, [262_657, 262_657]);
}

#[test]
fn peak_memory_against_queue_depth() {
    let (d1, d2, capped) = (design1(), design2(), design1_msm_cap());
    let designs: [&dyn AnyDesign; 3] = [&d1, &d2, &capped];
    let opts = RunOptions::default();
    let sweep = big_sweep(&[1, 8, 64], &designs, &opts, &mut |_| {}).expect("runs");
    let (a, b, c) = (&sweep.series[0], &sweep.series[1], &sweep.series[2]);
    // Design 1 holds its worst case, 514 pages, per queued 1 GiB bind.
    assert_eq!(a.peak_reserved_pages, [514, 8 * 514, 64 * 514]);
    let figures: Vec<String> = a
        .peak_reserved_pages
        .iter()
        .map(|&p| format!("{:.1}", mib(p)))
        .collect();
    assert_eq!(figures, ["2.0", "16.1", "128.5"]);
    // Peak memory adds only the root (nothing executes before every bind is queued).
    assert_eq!(a.peak_memory_pages, [515, 8 * 514 + 1, 64 * 514 + 1]);
    assert_eq!(human(a.peak_memory_pages[2]), "128.5 MiB");
    assert!(
        a.bends.is_empty(),
        "Design 1 is a straight line: {:?}",
        a.bends
    );
    // Design 2 holds what the binds need: one L1 for all, one L2 per GiB.
    assert_eq!(b.peak_reserved_pages, [2, 9, 65]);
    assert_eq!(b.peak_memory_pages, [3, 10, 66]);
    assert_eq!(b.bends.len(), 1);
    assert_eq!(b.bends[0].at, 1);
    assert!((b.bends[0].slope_after - 1.0).abs() < 1e-9);
    // msm's cap flattens Design 1 once two binds are in flight.
    assert_eq!(c.peak_reserved_pages, [514, 1028, 1028]);
    assert!(!c.bends.is_empty() && c.bends[0].at <= 8, "{:?}", c.bends);

    let tiny = tiny_sweep(&[1, 1000], 7, &designs[..2], &opts, &mut |_| {}).expect("runs");
    assert_eq!(tiny.series[0].peak_reserved_pages, [3, 3000]);
    assert_eq!(tiny.series[1].peak_reserved_pages, [3, 3]);
    assert_eq!(tiny.series[1].peak_memory_pages, [4, 4]);
}
