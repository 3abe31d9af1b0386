//! What is measured per backend per workload.

use serde::{Deserialize, Serialize};

/// Latency samples of one kind of call, in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Samples(pub Vec<u64>);

impl Samples {
    /// Adds a sample.
    pub fn push(&mut self, ns: u64) {
        self.0.push(ns);
    }

    /// Summarises the samples (sorting them).
    #[must_use]
    pub fn summary(&mut self) -> Latency {
        let v = &mut self.0;
        v.sort_unstable();
        let n = v.len();
        if n == 0 {
            return Latency::default();
        }
        let pct = |p: f64| {
            let idx = ((n as f64 - 1.0) * p).round() as usize;
            v[idx.min(n - 1)]
        };
        let total: u64 = v.iter().sum();
        Latency {
            count: n as u64,
            median_ns: pct(0.5),
            p99_ns: pct(0.99),
            max_ns: v[n - 1],
            mean_ns: total / n as u64,
            total_ns: total,
            histogram: histogram(v),
        }
    }
}

/// Log-spaced latency histogram: bucket `i` holds samples in `[2^(i/4), 2^((i+1)/4))` ns.
fn histogram(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &ns in sorted {
        let b = bucket(ns);
        match out.last_mut() {
            Some((k, c)) if *k == b => *c += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

/// The histogram bucket of `ns` (quarter powers of two).
#[must_use]
pub fn bucket(ns: u64) -> u64 {
    let x = ns.max(1) as f64;
    (x.log2() * 4.0).floor() as u64
}

/// The lower bound in nanoseconds of histogram bucket `b`.
#[must_use]
pub fn bucket_floor(b: u64) -> f64 {
    (b as f64 / 4.0).exp2()
}

/// Latency summary of one kind of call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Calls measured.
    pub count: u64,
    /// Median, ns.
    pub median_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// Slowest, ns.
    pub max_ns: u64,
    /// Mean, ns.
    pub mean_ns: u64,
    /// Sum, ns.
    pub total_ns: u64,
    /// `(bucket, count)`, bucket `b` covering `[2^(b/4), 2^((b+1)/4))` ns.
    pub histogram: Vec<(u64, u64)>,
}

/// One sample of the memory curve, taken after an event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Index of the event after which it was taken.
    pub event: u64,
    /// Pages the allocator has handed out and not got back: live tables plus unconsumed
    /// reservations.
    pub memory_pages: u64,
    /// Pages of live reservations (what they took when made).
    pub reserved_pages: u64,
    /// Table pages in the tree (the root included).
    pub live_tables: u64,
    /// Reserved pages held and not (yet) tables.
    pub unconsumed_pages: u64,
}

/// Everything measured for one design on one workload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Jobs submitted.
    pub jobs: u64,
    /// Jobs refused at submit (a reservation failed, or the driver's own validation).
    pub jobs_refused: u64,
    /// Jobs whose execution failed (the table refused a map or unmap).
    pub jobs_failed: u64,
    /// Reservations made.
    pub reservations: u64,
    /// Pages reservations took (sum of `Reservation::pages`).
    pub pages_reserved: u64,
    /// Reserved pages that became tables (the backend's `Stats::pages_consumed`).
    pub pages_consumed: u64,
    /// Reserved pages returned unused (the backend's `Stats::reserved_unused`).
    pub reserved_unused: u64,
    /// The most pages held by live reservations at once.
    pub peak_reserved_pages: u64,
    /// The most pages the allocator had handed out at once (live tables + unconsumed
    /// reservations): peak memory.
    pub peak_memory_pages: u64,
    /// The most table pages in the tree at once (root included).
    pub peak_live_tables: u64,
    /// Single-page allocator calls.
    pub alloc_calls: u64,
    /// Bulk allocator calls.
    pub alloc_bulk_calls: u64,
    /// Pages allocated in total.
    pub pages_allocated: u64,
    /// Single-page frees.
    pub free_calls: u64,
    /// Bulk frees.
    pub free_bulk_calls: u64,
    /// Pages freed in total (before the table was dropped).
    pub pages_freed: u64,
    /// Cache cleans issued for a non-coherent walker (0 on a coherent one).
    #[serde(default)]
    pub cache_cleans: u64,
    /// Bytes those cleans covered.
    #[serde(default)]
    pub bytes_cleaned: u64,
    /// Table pages below the root left after everything was unmapped and every reservation
    /// released (empty tables a design keeps).
    pub tables_left_after_unmap: u64,
    /// Table calls made (reserve, map, unmap, release).
    pub calls: u64,
    /// Table calls per second of time spent inside them.
    pub calls_per_sec: f64,
    /// Map calls.
    pub map: Latency,
    /// Unmap calls.
    pub unmap: Latency,
    /// Reserve calls.
    pub reserve: Latency,
    /// Release calls.
    pub release: Latency,
    /// Calls the checker compared with the model.
    pub checked_calls: u64,
    /// Translations probed through both the lookup and the hardware-walk oracle.
    pub probes: u64,
    /// Wall time of the run, checker included, ms.
    pub wall_ms: f64,
}

/// Bytes of `pages` 4 KiB pages, in MiB.
#[must_use]
pub fn mib(pages: u64) -> f64 {
    pages as f64 * 4096.0 / (1024.0 * 1024.0)
}

/// Keeps at most `max` points of a curve, keeping each bucket's highest memory sample so
/// peaks survive.
#[must_use]
pub fn downsample(points: &[CurvePoint], max: usize) -> Vec<CurvePoint> {
    if points.len() <= max || max == 0 {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max);
    points
        .chunks(per)
        .filter_map(|c| {
            c.iter()
                .max_by_key(|p| (p.memory_pages, p.reserved_pages))
                .copied()
        })
        .collect()
}
