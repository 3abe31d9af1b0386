//! The two experiments behind docs/designs.md §8: single binds on an empty tree, and peak memory
//! against queue depth (1 GiB binds, and 4 KiB binds sharing one 2 MiB region).

use crate::harness::{AnyDesign, RunError, RunOptions};
use crate::metrics::mib;
use crate::ops::{BindOp, Event, TableKind, Workload};
use crate::workload::{big_binds_queued, tiny_binds_queued};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

const K4: u64 = 4 << 10;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const G512: u64 = 512 << 30;

/// A worked example of docs/designs.md §8: a map request, and the figures the document gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkedExample {
    /// The request, as the document words it.
    pub request: Cow<'static, str>,
    /// Offset of the VA from a 512 GiB-aligned base.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// "reserved" (panthor's formula).
    pub reserved: u64,
    /// "need (4K-scattered backing)".
    pub need_scattered: u64,
    /// "need (2M-contig backing)".
    pub need_contig: u64,
}

/// The rows of docs/designs.md §8, in order.
pub const WORKED_EXAMPLES: [WorkedExample; 11] = [
    WorkedExample {
        request: Cow::Borrowed("4 KiB at 2 MiB-aligned VA"),
        offset: 0,
        size: K4,
        reserved: 3,
        need_scattered: 3,
        need_contig: 3,
    },
    WorkedExample {
        request: Cow::Borrowed("64 KiB at 2 MiB-aligned VA"),
        offset: 0,
        size: 16 * K4,
        reserved: 3,
        need_scattered: 3,
        need_contig: 3,
    },
    WorkedExample {
        request: Cow::Borrowed("8 KiB straddling a 2 MiB boundary"),
        offset: M2 - K4,
        size: 2 * K4,
        reserved: 4,
        need_scattered: 4,
        need_contig: 4,
    },
    WorkedExample {
        request: Cow::Borrowed("8 KiB straddling a 1 GiB boundary"),
        offset: G1 - K4,
        size: 2 * K4,
        reserved: 5,
        need_scattered: 5,
        need_contig: 5,
    },
    WorkedExample {
        request: Cow::Borrowed("8 KiB straddling a 512 GiB boundary"),
        offset: G512 - K4,
        size: 2 * K4,
        reserved: 6,
        need_scattered: 6,
        need_contig: 6,
    },
    WorkedExample {
        request: Cow::Borrowed("2 MiB at 2 MiB-aligned VA"),
        offset: 0,
        size: M2,
        reserved: 3,
        need_scattered: 3,
        need_contig: 2,
    },
    WorkedExample {
        request: Cow::Borrowed("2 MiB at VA + 4 KiB"),
        offset: K4,
        size: M2,
        reserved: 4,
        need_scattered: 4,
        need_contig: 4,
    },
    WorkedExample {
        request: Cow::Borrowed("1 GiB at 1 GiB-aligned VA"),
        offset: 0,
        size: G1,
        reserved: 514,
        need_scattered: 514,
        need_contig: 2,
    },
    WorkedExample {
        request: Cow::Borrowed("1 GiB at VA + 2 MiB"),
        offset: M2,
        size: G1,
        reserved: 515,
        need_scattered: 515,
        need_contig: 3,
    },
    WorkedExample {
        request: Cow::Borrowed("1 GiB at VA + 4 KiB"),
        offset: K4,
        size: G1,
        reserved: 516,
        need_scattered: 516,
        need_contig: 5,
    },
    WorkedExample {
        request: Cow::Borrowed("512 GiB at 512 GiB-aligned VA"),
        offset: 0,
        size: G512,
        reserved: 262_657,
        need_scattered: 262_657,
        need_contig: 513,
    },
];

/// Base VA of the single binds: 512 GiB-aligned.
const BASE: u64 = G512;

/// Binds larger than this are reserved and released but not mapped (a 512 GiB map of 4 KiB
/// pages would write 2^27 leaves).
pub const MAP_LIMIT: u64 = 4 * G1;

/// Which single binds are mapped, not only reserved: at most this many bytes with 2 MiB-
/// contiguous backing and with 4 KiB-scattered backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLimits {
    /// Largest 2 MiB-contiguous bind mapped.
    pub contiguous: u64,
    /// Largest 4 KiB-scattered bind mapped.
    pub scattered: u64,
}

impl Default for MapLimits {
    fn default() -> Self {
        Self {
            contiguous: MAP_LIMIT,
            scattered: MAP_LIMIT,
        }
    }
}

/// One row of the single-bind experiment: the document's figures and what each design did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SingleBind {
    /// The worked example.
    pub example: WorkedExample,
    /// Pages each design reserved with 4 KiB-scattered backing, by design order.
    pub reserved_scattered: Vec<u64>,
    /// Pages each design reserved with 2 MiB-contiguous backing.
    pub reserved_contig: Vec<u64>,
    /// Reserved pages that became tables, 2 MiB-contiguous backing (what the bind needed).
    pub consumed_contig: Vec<u64>,
    /// Whether the bind was mapped (false: reserve and release only).
    pub mapped: bool,
}

/// A single bind on an empty tree: submit, execute, complete.
#[must_use]
pub fn single_bind(ex: &WorkedExample, contiguous: bool) -> Workload {
    let va = BASE + ex.offset;
    let pa = 0x1000_0000_0000 + (va & (M2 - 1)) + if contiguous { 0 } else { K4 };
    Workload {
        name: format!("single: {}", ex.request),
        description: ex.request.to_string(),
        table: TableKind::Panthor,
        events: vec![
            Event::Submit {
                id: 1,
                op: BindOp::Map {
                    va,
                    size: ex.size,
                    pa,
                    prot: 3,
                },
            },
            Event::Execute { id: 1 },
            Event::Complete { id: 1 },
        ],
    }
}

/// Runs each worked example on every design, both backings, each on a fresh table.
///
/// # Errors
///
/// The first run that failed.
pub fn single_binds(
    examples: &[WorkedExample],
    designs: &[&dyn AnyDesign],
    limits: MapLimits,
    opts: &RunOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<SingleBind>, RunError> {
    let mut rows = Vec::new();
    for ex in examples {
        let mapped = ex.size <= limits.contiguous;
        let o = RunOptions {
            reserve_only: !mapped,
            ..*opts
        };
        let os = RunOptions {
            reserve_only: ex.size > limits.scattered,
            ..*opts
        };
        let mut row = SingleBind {
            example: ex.clone(),
            reserved_scattered: Vec::new(),
            reserved_contig: Vec::new(),
            consumed_contig: Vec::new(),
            mapped,
        };
        for d in designs {
            let s = d.run(&single_bind(ex, false), &os, progress)?;
            row.reserved_scattered.push(s.metrics.pages_reserved);
            let c = d.run(&single_bind(ex, true), &o, progress)?;
            row.reserved_contig.push(c.metrics.pages_reserved);
            row.consumed_contig
                .push(c.metrics.peak_live_tables.saturating_sub(1));
        }
        rows.push(row);
    }
    Ok(rows)
}

impl SingleBind {
    /// Whether the first design reproduced the "reserved" column and the second the "need"
    /// columns.
    #[must_use]
    pub fn reproduces(&self) -> bool {
        let e = &self.example;
        self.reserved_scattered.len() >= 2
            && self.reserved_scattered[0] == e.reserved
            && self.reserved_contig[0] == e.reserved
            && self.reserved_scattered[1] == e.need_scattered
            && self.reserved_contig[1] == e.need_contig
    }
}

/// Where a curve changes slope.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bend {
    /// The queue depth where the slope changes.
    pub at: usize,
    /// Pages per extra queued bind before it.
    pub slope_before: f64,
    /// Pages per extra queued bind after it.
    pub slope_after: f64,
}

/// One design's curve in a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// The design.
    pub design: String,
    /// Peak memory (allocator pages: live tables + unconsumed reservations), per point.
    pub peak_memory_pages: Vec<u64>,
    /// Peak pages held by live reservations, per point.
    pub peak_reserved_pages: Vec<u64>,
    /// Where the memory curve bends (from the origin: an empty table holds 1 page, the root).
    pub bends: Vec<Bend>,
    /// The curve's shape in words, computed from the bends.
    pub shape: String,
}

/// A queue-depth sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// Short name (file names).
    pub name: String,
    /// Chart title.
    pub title: String,
    /// What is queued.
    pub description: String,
    /// The queue depths.
    pub depths: Vec<usize>,
    /// One curve per design.
    pub series: Vec<Series>,
}

/// Finds where a piecewise-linear curve through `(0, y0)` and the points changes slope by
/// more than 5% of the largest slope (and at least a quarter page per bind).
#[must_use]
pub fn bends(depths: &[usize], ys: &[u64], y0: u64) -> Vec<Bend> {
    let mut xs = vec![0usize];
    xs.extend_from_slice(depths);
    let mut vs = vec![y0 as f64];
    vs.extend(ys.iter().map(|&y| y as f64));
    let slopes: Vec<f64> = (1..xs.len())
        .map(|i| (vs[i] - vs[i - 1]) / (xs[i] - xs[i - 1]).max(1) as f64)
        .collect();
    let big = slopes.iter().fold(0.0f64, |m, s| m.max(s.abs()));
    let tol = (big * 0.05).max(0.25);
    let mut out = Vec::new();
    let mut ref_slope = slopes.first().copied().unwrap_or(0.0);
    for i in 1..slopes.len() {
        if (slopes[i] - ref_slope).abs() > tol {
            out.push(Bend {
                at: xs[i],
                slope_before: ref_slope,
                slope_after: slopes[i],
            });
            ref_slope = slopes[i];
        }
    }
    out
}

fn shape(depths: &[usize], ys: &[u64], bends: &[Bend]) -> String {
    let (Some(&q1), Some(&qn)) = (depths.first(), depths.last()) else {
        return String::new();
    };
    let (y1, yn) = (ys[0], ys[ys.len() - 1]);
    if bends.is_empty() {
        let slope = (yn as f64 - 1.0) / qn as f64;
        return format!(
            "straight line from the origin: {slope:.1} pages ({}) per queued bind, {} at Q={q1} to {} at Q={qn}; no bend",
            human(slope.round() as u64),
            fmt_mib(y1),
            fmt_mib(yn)
        );
    }
    let parts: Vec<String> = bends
        .iter()
        .map(|b| {
            format!(
                "bends at Q={} from {:.1} to {:.1} pages per queued bind",
                b.at, b.slope_before, b.slope_after
            )
        })
        .collect();
    format!(
        "{}; {} at Q={q1}, {} at Q={qn}",
        parts.join(", then "),
        fmt_mib(y1),
        fmt_mib(yn)
    )
}

/// `pages` 4 KiB pages as "N pages (x.y MiB)", or KiB below 1 MiB.
#[must_use]
pub fn fmt_mib(pages: u64) -> String {
    format!("{pages} pages ({})", human(pages))
}

/// `pages` 4 KiB pages in MiB with one decimal, or in KiB below 1 MiB.
#[must_use]
pub fn human(pages: u64) -> String {
    if pages < 256 {
        format!("{} KiB", pages * 4)
    } else {
        format!("{:.1} MiB", mib(pages))
    }
}

/// Queue depths of the 1 GiB sweep.
pub const BIG_DEPTHS: [usize; 12] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64];
/// Queue depths of the tiny-bind sweep.
pub const TINY_DEPTHS: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000];

/// Runs one sweep: `make(q)` is the workload at depth `q`.
///
/// # Errors
///
/// The first run that failed.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    name: &str,
    title: &str,
    description: &str,
    depths: &[usize],
    make: &dyn Fn(usize) -> Workload,
    designs: &[&dyn AnyDesign],
    opts: &RunOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Sweep, RunError> {
    let mut series: Vec<Series> = designs
        .iter()
        .map(|d| Series {
            design: d.name().to_string(),
            peak_memory_pages: Vec::new(),
            peak_reserved_pages: Vec::new(),
            bends: Vec::new(),
            shape: String::new(),
        })
        .collect();
    for &q in depths {
        let w = make(q);
        for (d, s) in designs.iter().zip(series.iter_mut()) {
            let r = d.run(&w, opts, progress)?;
            s.peak_memory_pages.push(r.metrics.peak_memory_pages);
            s.peak_reserved_pages.push(r.metrics.peak_reserved_pages);
        }
    }
    for s in &mut series {
        s.bends = bends(depths, &s.peak_memory_pages, 1);
        s.shape = shape(depths, &s.peak_memory_pages, &s.bends);
    }
    Ok(Sweep {
        name: name.to_string(),
        title: title.to_string(),
        description: description.to_string(),
        depths: depths.to_vec(),
        series,
    })
}

/// The 1 GiB sweep: Q binds of 1 GiB, 1 GiB-aligned, 2 MiB-contiguous backing, queued at once.
///
/// # Errors
///
/// The first run that failed.
pub fn big_sweep(
    depths: &[usize],
    designs: &[&dyn AnyDesign],
    opts: &RunOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Sweep, RunError> {
    sweep(
        "1gib-binds",
        "Q binds of 1 GiB (2 MiB-contiguous backing)",
        "Q binds of 1 GiB each, 1 GiB-aligned, 2 MiB-contiguous backing, all queued before the first executes",
        depths,
        &|q| big_binds_queued(q, G1),
        designs,
        opts,
        progress,
    )
}

/// The tiny-bind sweep: Q 4 KiB binds in one 2 MiB region, queued at once.
///
/// # Errors
///
/// The first run that failed.
pub fn tiny_sweep(
    depths: &[usize],
    seed: u64,
    designs: &[&dyn AnyDesign],
    opts: &RunOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Sweep, RunError> {
    sweep(
        "tiny-binds",
        "Q binds of 4 KiB in one 2 MiB region",
        "Q separate 4 KiB binds in one 2 MiB region (a page bound twice is unbound in between), all queued before the first executes",
        depths,
        &|q| tiny_binds_queued(q, seed),
        designs,
        opts,
        progress,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn straight_lines_and_bends() {
        let d = [1, 2, 4, 8];
        assert!(bends(&d, &[515, 1029, 2057, 4113], 1).is_empty());
        let b = bends(&d, &[3, 4, 6, 10], 1);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].at, 1);
        let flat = bends(&d, &[4, 4, 4, 4], 1);
        assert_eq!(flat[0].at, 1);
        assert!((flat[0].slope_after).abs() < 1e-9);
    }
}
