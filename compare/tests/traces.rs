//! Trace replay: the shipped example traces give the expected metrics on both designs, and
//! malformed traces are refused with the line and column of the problem before anything runs.

use compare::designs::{design1, design2};
use compare::harness::{RunOptions, RunResult, run};
use compare::ops::{Event, TableKind};
use compare::trace::{self, parse};
use std::path::{Path, PathBuf};
use std::process::Command;

fn traces_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("traces")
}

fn replay(name: &str) -> (compare::ops::Workload, RunResult, RunResult) {
    let text = std::fs::read_to_string(traces_dir().join(name)).expect("trace exists");
    let w = parse(&text, name).expect("the example parses");
    let o = RunOptions::default();
    let a = run(&design1(), &w, &o, &mut |_| {}).expect("Design 1 replays");
    let b = run(&design2(), &w, &o, &mut |_| {}).expect("Design 2 replays");
    (w, a, b)
}

#[test]
fn panthor_vm_bind_trace() {
    let (w, d1, d2) = replay("panthor-vm-bind.trace");
    assert_eq!(w.table, TableKind::Panthor);
    assert_eq!((w.events.len(), w.jobs()), (21, 7));
    let (a, b) = (&d1.metrics, &d2.metrics);
    assert_eq!((a.jobs, a.jobs_failed, a.jobs_refused), (7, 0, 0));
    assert_eq!((b.jobs, b.jobs_failed, b.jobs_refused), (7, 0, 0));
    // Design 1: 514 (1 GiB) + 3 (2 MiB) + 3 x 3 (tiny binds), all held at once.
    assert_eq!(a.pages_reserved, 526);
    assert_eq!(a.peak_reserved_pages, 526);
    assert_eq!(a.peak_memory_pages, 527);
    // Tables actually built: L1, the 1 GiB bind's L2 (2 MiB blocks), the 2 MiB bind's L2 + L3,
    // the texture's L2 + L3.
    assert_eq!(a.pages_consumed, 6);
    assert_eq!(a.reserved_unused, 520);
    // Design 2 reserves exactly those.
    assert_eq!(b.pages_reserved, 6);
    assert_eq!(b.peak_memory_pages, 7);
    assert_eq!(b.reserved_unused, 0);
    // io-pgtable-arm keeps the tables small unmaps leave (L1, three L2, one L3); Design 2
    // frees them at release.
    assert_eq!(a.tables_left_after_unmap, 5);
    assert_eq!(b.tables_left_after_unmap, 0);
    // One bulk allocation per reservation for Design 1, one per reservation that needed pages
    // for Design 2 (plus the root's single call each).
    assert_eq!((a.alloc_calls, a.alloc_bulk_calls), (1, 5));
    assert_eq!((b.alloc_calls, b.alloc_bulk_calls), (1, 3));
    assert!(a.checked_calls > 0 && a.probes > 0);
}

#[test]
fn smmu_dma_trace() {
    let (w, d1, d2) = replay("smmu-dma.trace");
    assert_eq!(w.table, TableKind::Smmu);
    let (a, b) = (&d1.metrics, &d2.metrics);
    // The double map and the cut block fail on both designs, identically (the checker would
    // have stopped the run otherwise).
    assert_eq!((a.jobs, a.jobs_failed), (7, 2));
    assert_eq!((b.jobs, b.jobs_failed), (7, 2));
    assert_eq!(a.pages_reserved, 15);
    assert_eq!(b.pages_reserved, 4);
    assert_eq!(a.peak_memory_pages, 7);
    assert_eq!(b.peak_memory_pages, 5);
    assert_eq!(a.tables_left_after_unmap, 4);
    assert_eq!(b.tables_left_after_unmap, 0);
}

#[test]
fn written_traces_read_back() {
    for name in ["panthor-vm-bind.trace", "smmu-dma.trace"] {
        let text = std::fs::read_to_string(traces_dir().join(name)).unwrap();
        let w = parse(&text, name).unwrap();
        let again = parse(&trace::write(&w), name).unwrap();
        assert_eq!(again.events, w.events);
        assert_eq!(again.table, w.table);
    }
    let g = compare::workload::generate(
        compare::workload::Kind::RandomMix,
        &compare::workload::Params {
            scale: 0.05,
            ..Default::default()
        },
    );
    assert_eq!(parse(&trace::write(&g), "g").unwrap().events, g.events);
}

/// `(trace, line, column, part of the message)`.
const BAD: &[(&str, usize, usize, &str)] = &[
    ("", 1, 1, "empty trace"),
    ("submit 1 map 0 4K 0 rw\n", 1, 1, "first line must be"),
    ("iopt-trace v2\n", 1, 1, "unsupported trace version"),
    (
        "iopt-trace v1\nsubmit 1 map 0x1000 2Q 0x2000 rw\n",
        2,
        21,
        "size",
    ),
    (
        "iopt-trace v1\nsubmit 1 map 0x1000 4K 0x2000 rx\n",
        2,
        32,
        "unknown flag 'x'",
    ),
    (
        "iopt-trace v1\nsubmit 1 map 0x1000 4K 0x2000\n",
        2,
        30,
        "expected a prot",
    ),
    (
        "iopt-trace v1\nsubmit 1 remap 0x1000 4K\n",
        2,
        10,
        "expected map or unmap",
    ),
    (
        "iopt-trace v1\nsubmit 1 unmap 0x1000 4K extra\n",
        2,
        26,
        "unexpected \"extra\"",
    ),
    (
        "iopt-trace v1\nsubmit 1 unmap 0x1000 0\n",
        2,
        23,
        "must not be zero",
    ),
    ("iopt-trace v1\nexecute 7\n", 2, 9, "never submitted"),
    (
        "iopt-trace v1\nsubmit 1 unmap 0 4K\ncomplete 1\n",
        3,
        10,
        "completes before it executes",
    ),
    (
        "iopt-trace v1\nsubmit 1 unmap 0 4K\nexecute 1\nexecute 1\n",
        4,
        9,
        "already executed",
    ),
    (
        "iopt-trace v1\nsubmit 1 unmap 0 4K\nsubmit 1 unmap 0 4K\n",
        3,
        8,
        "already submitted on line 2",
    ),
    (
        "iopt-trace v1\nsubmit 1 unmap 0 4K\nconfig smmu\n",
        3,
        1,
        "before the first job",
    ),
    ("iopt-trace v1\nconfig arm32\n", 2, 8, "unknown table"),
    (
        "iopt-trace v1\n  frobnicate 1 # comment\n",
        2,
        3,
        "unknown keyword",
    ),
    (
        "iopt-trace v1\nsubmit 99999999999999999999 unmap 0 4K\n",
        2,
        8,
        "job id",
    ),
    ("iopt-trace v1\nsubmit 1 unmap 0x 4K\n", 2, 16, "va"),
];

#[test]
fn malformed_traces_name_line_and_column() {
    for &(text, line, column, what) in BAD {
        let e = parse(text, "bad").expect_err(text);
        assert_eq!((e.line, e.column), (line, column), "{text:?}: {e}");
        assert!(
            e.message.contains(what),
            "{text:?}: {:?} lacks {what:?}",
            e.message
        );
        assert!(
            e.to_string()
                .starts_with(&format!("line {line}, column {column}: "))
        );
    }
}

#[test]
fn the_binary_refuses_a_bad_trace_and_runs_nothing() {
    let dir = std::env::temp_dir().join(format!("compare-bad-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.trace");
    // A good first job, then a bad line: the good job must not run either.
    std::fs::write(&bad, "iopt-trace v1\nsubmit 1 map 0x1000 4K 0x2000 rw\nexecute 1\nsubmit 2 map 0x1000 2Q 0x2000 rw\n").unwrap();
    let out = dir.join("report");
    let o = Command::new(env!("CARGO_BIN_EXE_compare"))
        .args(["--quiet", "--trace"])
        .arg(&bad)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("runs");
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 4, column 21"), "{err}");
    assert!(
        o.stdout.is_empty(),
        "nothing printed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!out.exists(), "no report written");
    let _ = std::fs::remove_dir_all(&dir);
    // And a parse error returns no events at all.
    assert!(parse("iopt-trace v1\nexecute 1\n", "x").is_err());
    let ok = parse("iopt-trace v1 # v1\n\n# nothing\n", "x").unwrap();
    assert_eq!(ok.events, Vec::<Event>::new());
}
