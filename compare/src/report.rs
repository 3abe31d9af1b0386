//! The report: a side-by-side terminal table, `report.json`, and `index.html` with SVG charts,
//! plus a conclusion written from the numbers.

use crate::experiments::{SingleBind, Sweep, fmt_mib, human};
use crate::metrics::{CurvePoint, Latency, Metrics, bucket_floor, mib};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Version of the `report.json` layout.
pub const REPORT_VERSION: u32 = 1;

/// One design's result on one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesignResult {
    /// The design.
    pub design: String,
    /// What was measured.
    pub metrics: Metrics,
    /// Memory over time (downsampled).
    pub curve: Vec<CurvePoint>,
}

/// One workload's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadReport {
    /// Name.
    pub name: String,
    /// What it models.
    pub description: String,
    /// Table configuration.
    pub table: String,
    /// Events replayed.
    pub events: usize,
    /// Jobs submitted.
    pub jobs: usize,
    /// One result per design, in design order.
    pub results: Vec<DesignResult>,
}

/// Everything a run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Layout version ([`REPORT_VERSION`]).
    pub version: u32,
    /// Seed of the generated workloads.
    pub seed: u64,
    /// Size multiplier of the workloads.
    pub scale: f64,
    /// Designs compared, in column order.
    pub designs: Vec<String>,
    /// Single binds on an empty tree (docs/designs.md §8), if run.
    pub single_binds: Vec<SingleBind>,
    /// Whether every single bind reproduced docs/designs.md §8 (Design 1 the "reserved" column,
    /// Design 2 the "need" columns); `None` when not run.
    pub worked_examples_reproduced: Option<bool>,
    /// Queue-depth sweeps, if run.
    pub sweeps: Vec<Sweep>,
    /// Workloads and traces.
    pub workloads: Vec<WorkloadReport>,
    /// Conclusions computed from the numbers.
    pub conclusion: Vec<String>,
    /// Wall time of the whole evaluation, seconds.
    pub wall_s: f64,
}

fn ns(v: u64) -> String {
    if v >= 10_000_000 {
        format!("{:.1} ms", v as f64 / 1e6)
    } else if v >= 10_000 {
        format!("{:.1} µs", v as f64 / 1e3)
    } else {
        format!("{v} ns")
    }
}

fn lat(l: &Latency) -> String {
    if l.count == 0 {
        "-".to_string()
    } else {
        format!("{} / {}", ns(l.median_ns), ns(l.p99_ns))
    }
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else {
        format!("{:.0} k/s", v / 1e3)
    }
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t
}

/// The rows of the per-workload table: label and value per metrics.
/// A row of the per-workload table: its label and how to show the value.
type Row = (&'static str, fn(&Metrics) -> String);

/// Picks one latency summary out of the metrics.
type Pick = fn(&Metrics) -> &Latency;

fn rows() -> Vec<Row> {
    vec![
        ("jobs (refused at submit / failed)", |m| {
            format!("{} ({} / {})", m.jobs, m.jobs_refused, m.jobs_failed)
        }),
        ("pages reserved", |m| m.pages_reserved.to_string()),
        ("  consumed (became tables)", |m| {
            m.pages_consumed.to_string()
        }),
        ("  reserved but unused", |m| m.reserved_unused.to_string()),
        ("peak held by live reservations", |m| {
            fmt_mib(m.peak_reserved_pages)
        }),
        ("peak memory (tables + unconsumed)", |m| {
            fmt_mib(m.peak_memory_pages)
        }),
        ("peak live tables", |m| m.peak_live_tables.to_string()),
        ("allocator calls single / bulk", |m| {
            format!("{} / {}", m.alloc_calls, m.alloc_bulk_calls)
        }),
        ("frees single / bulk (pages)", |m| {
            format!(
                "{} / {} ({})",
                m.free_calls, m.free_bulk_calls, m.pages_freed
            )
        }),
        ("cache cleans (KiB cleaned)", |m| {
            format!("{} ({})", m.cache_cleans, m.bytes_cleaned / 1024)
        }),
        ("tables left after full unmap", |m| {
            m.tables_left_after_unmap.to_string()
        }),
        ("map latency median / p99", |m| lat(&m.map)),
        ("unmap latency median / p99", |m| lat(&m.unmap)),
        ("reserve latency median / p99", |m| lat(&m.reserve)),
        ("release latency median / p99", |m| lat(&m.release)),
        ("table calls / s (in the calls)", |m| rate(m.calls_per_sec)),
        ("checked calls / oracle probes", |m| {
            format!("{} / {}", m.checked_calls, m.probes)
        }),
    ]
}

/// Renders the terminal report.
#[must_use]
pub fn terminal(r: &Report) -> String {
    let mut out = String::new();
    if !r.single_binds.is_empty() {
        let mut t = table();
        let mut header = vec![
            "single bind on an empty tree (docs/designs.md §8)".to_string(),
            "§8 reserved".into(),
            "§8 need 4K / 2M".into(),
        ];
        for d in &r.designs {
            header.push(format!("{d} 4K-scattered / 2M-contig"));
        }
        t.set_header(header);
        for row in &r.single_binds {
            let e = &row.example;
            let mut cells = vec![
                Cell::new(format!(
                    "{}{}",
                    e.request,
                    if row.mapped { "" } else { " (reserve only)" }
                )),
                Cell::new(e.reserved).set_alignment(CellAlignment::Right),
                Cell::new(format!("{} / {}", e.need_scattered, e.need_contig))
                    .set_alignment(CellAlignment::Right),
            ];
            for i in 0..r.designs.len() {
                cells.push(
                    Cell::new(format!(
                        "{} / {}",
                        row.reserved_scattered[i], row.reserved_contig[i]
                    ))
                    .set_alignment(CellAlignment::Right),
                );
            }
            t.add_row(cells);
        }
        let ok = r.single_binds.iter().filter(|x| x.reproduces()).count();
        let _ = writeln!(
            out,
            "{t}\ndocs/designs.md §8 reproduced: {ok} of {} rows ({} = \"reserved\", {} = \"need\" for each backing)\n",
            r.single_binds.len(),
            r.designs.first().map_or("-", String::as_str),
            r.designs.get(1).map_or("-", String::as_str)
        );
    }
    for s in &r.sweeps {
        let mut t = table();
        let mut header = vec![format!("peak memory, {}", s.name)];
        header.extend(s.series.iter().map(|x| x.design.clone()));
        t.set_header(header);
        for (i, q) in s.depths.iter().enumerate() {
            let mut cells = vec![Cell::new(format!("Q = {q}"))];
            for x in &s.series {
                cells.push(
                    Cell::new(format!(
                        "{} (reserved {})",
                        human(x.peak_memory_pages[i]),
                        x.peak_reserved_pages[i]
                    ))
                    .set_alignment(CellAlignment::Right),
                );
            }
            t.add_row(cells);
        }
        let _ = writeln!(out, "{}\n{t}", s.description);
        for x in &s.series {
            let _ = writeln!(out, "  {}: {}", x.design, x.shape);
        }
        out.push('\n');
    }
    for w in &r.workloads {
        let mut t = table();
        let mut header = vec![format!(
            "{} ({} events, table {})",
            w.name, w.events, w.table
        )];
        header.extend(w.results.iter().map(|x| x.design.clone()));
        t.set_header(header);
        for (label, f) in rows() {
            let mut cells = vec![Cell::new(label)];
            cells.extend(
                w.results
                    .iter()
                    .map(|x| Cell::new(f(&x.metrics)).set_alignment(CellAlignment::Right)),
            );
            t.add_row(cells);
        }
        let _ = writeln!(out, "{}\n{t}\n", w.description);
    }
    if !r.conclusion.is_empty() {
        let _ = writeln!(out, "Conclusion (computed from the numbers above):");
        for c in &r.conclusion {
            let _ = writeln!(out, "- {c}");
        }
    }
    out
}

fn ratio(a: f64, b: f64) -> String {
    if b <= 0.0 {
        "∞".to_string()
    } else {
        let x = a / b;
        if x >= 10.0 {
            format!("{x:.0}×")
        } else {
            format!("{x:.1}×")
        }
    }
}

/// Writes the conclusion from the numbers: which design wins on each measure, by how much.
#[must_use]
#[allow(clippy::too_many_lines)] // one paragraph per finding, in report order
pub fn conclude(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    if r.designs.len() < 2 {
        return out;
    }
    let (d1, d2) = (&r.designs[0], &r.designs[1]);
    if let Some(row) = r
        .single_binds
        .iter()
        .find(|x| x.example.size == 1 << 30 && x.example.offset == 0)
    {
        out.push(format!(
            "A single 1 GiB bind with 2 MiB-contiguous backing: {d1} reserves {} pages and {d2} {} ({} as many for {d1}), because {d1} counts for 4 KiB leaves on an empty tree whatever the backing and the tree hold.",
            row.reserved_contig[0],
            row.reserved_contig[1],
            ratio(row.reserved_contig[0] as f64, row.reserved_contig[1] as f64)
        ));
    }
    for s in &r.sweeps {
        let last = s.depths.len() - 1;
        let q = s.depths[last];
        let a = &s.series[0];
        let b = s
            .series
            .iter()
            .find(|x| &x.design == d2)
            .unwrap_or(&s.series[s.series.len() - 1]);
        out.push(format!(
            "{} at Q={q}: {d1} peaks at {} ({} reserved), {d2} at {} ({} reserved): {} less memory with {d2}. {d1}: {}. {d2}: {}.",
            s.name,
            fmt_mib(a.peak_memory_pages[last]),
            a.peak_reserved_pages[last],
            fmt_mib(b.peak_memory_pages[last]),
            b.peak_reserved_pages[last],
            ratio(a.peak_memory_pages[last] as f64, b.peak_memory_pages[last] as f64),
            a.shape,
            b.shape
        ));
        for x in s.series.iter().skip(1).filter(|x| &x.design != d2) {
            out.push(format!("{} in {}: {}.", x.design, s.name, x.shape));
        }
    }
    let mut mem_wins = Vec::new();
    let mut lat_notes = Vec::new();
    let mut left = Vec::new();
    let mut unused = (0u64, 0u64, 0u64, 0u64);
    for w in &r.workloads {
        if w.results.len() < 2 {
            continue;
        }
        let (a, b) = (&w.results[0].metrics, &w.results[1].metrics);
        let (pa, pb) = (a.peak_memory_pages, b.peak_memory_pages);
        let who = if pa > pb { d2 } else { d1 };
        mem_wins.push(format!(
            "{} {} ({} vs {} pages)",
            w.name,
            if pa == pb {
                "tie".to_string()
            } else {
                format!(
                    "{who} by {}",
                    ratio(pa.max(pb) as f64, pa.min(pb).max(1) as f64)
                )
            },
            pa,
            pb
        ));
        left.push(format!(
            "{} {} vs {}",
            w.name, a.tables_left_after_unmap, b.tables_left_after_unmap
        ));
        unused.0 += a.reserved_unused;
        unused.1 += a.pages_reserved;
        unused.2 += b.reserved_unused;
        unused.3 += b.pages_reserved;
        if a.map.count > 0 && b.map.count > 0 {
            lat_notes.push(format!(
                "{} map p50 {} vs {}, p99 {} vs {}; reserve p50 {} vs {}",
                w.name,
                ns(a.map.median_ns),
                ns(b.map.median_ns),
                ns(a.map.p99_ns),
                ns(b.map.p99_ns),
                ns(a.reserve.median_ns),
                ns(b.reserve.median_ns)
            ));
        }
    }
    if unused.1 > 0 {
        let pct = |u: u64, r: u64| {
            if r == 0 {
                0.0
            } else {
                100.0 * u as f64 / r as f64
            }
        };
        out.push(format!(
            "Over all workloads {d1} reserved {} pages and returned {} of them unused ({:.1}%); {d2} reserved {} and returned {} unused ({:.1}%).",
            unused.1,
            unused.0,
            pct(unused.0, unused.1),
            unused.3,
            unused.2,
            pct(unused.2, unused.3)
        ));
    }
    if !left.is_empty() {
        out.push(format!(
            "Table pages left after everything is unmapped and every reservation released ({d1} vs {d2}): {}. {d1} keeps what small unmaps empty, as io-pgtable-arm does (freed only by a covering unmap); {d2} frees what empties.",
            left.join("; ")
        ));
    }
    if !mem_wins.is_empty() {
        out.push(format!(
            "Peak memory per workload ({d1} vs {d2}): {}.",
            mem_wins.join("; ")
        ));
    }
    if !lat_notes.is_empty() {
        out.push(format!("Latency ({d1} vs {d2}): {}.", lat_notes.join("; ")));
    }
    let (mut ba, mut bb, mut sa, mut sb) = (0, 0, 0, 0);
    for w in &r.workloads {
        if w.results.len() >= 2 {
            ba += w.results[0].metrics.alloc_bulk_calls;
            bb += w.results[1].metrics.alloc_bulk_calls;
            sa += w.results[0].metrics.alloc_calls;
            sb += w.results[1].metrics.alloc_calls;
        }
    }
    if ba + bb + sa + sb > 0 {
        out.push(format!(
            "Allocator traffic over all workloads: {d1} {ba} bulk + {sa} single calls, {d2} {bb} bulk + {sb} single calls."
        ));
    }
    let cleans: Vec<String> = r
        .workloads
        .iter()
        .filter(|w| w.results.len() >= 2 && w.results[0].metrics.cache_cleans > 0)
        .map(|w| {
            let (a, b) = (&w.results[0].metrics, &w.results[1].metrics);
            // Every table built is cleaned whole once: pages obtained minus pool pages
            // returned unused.
            let built = |m: &Metrics| m.pages_allocated.saturating_sub(m.reserved_unused);
            format!(
                "{} {} vs {} cleans, {} vs {} KiB, {} vs {} tables built",
                w.name,
                a.cache_cleans,
                b.cache_cleans,
                a.bytes_cleaned / 1024,
                b.bytes_cleaned / 1024,
                built(a),
                built(b)
            )
        })
        .collect();
    if !cleans.is_empty() {
        out.push(format!(
            "Cache cleans on the non-coherent panthor table ({d1} vs {d2}): {}. Each is a DC CVAC per line and a barrier on a real GPU. Every table built is cleaned whole (4 KiB) before it is linked; {d1} builds a missing table privately with its leaves and cleans it once, while {d2} links empty tables at reserve time and cleans the leaves again when the maps fill them.",
            cleans.join("; ")
        ));
    }
    out
}

const COLORS: [RGBColor; 4] = [
    RGBColor(200, 60, 40),
    RGBColor(30, 100, 200),
    RGBColor(230, 150, 20),
    RGBColor(60, 150, 60),
];

/// The peak-memory-against-queue-depth chart of one sweep, as SVG.
///
/// # Errors
///
/// A drawing error.
pub fn sweep_svg(s: &Sweep) -> Result<String, Box<dyn std::error::Error>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 440)).into_drawing_area();
        root.fill(&WHITE)?;
        let xmax = *s.depths.last().unwrap_or(&1) as f64;
        let ymax = s
            .series
            .iter()
            .flat_map(|x| x.peak_memory_pages.iter())
            .map(|&p| mib(p))
            .fold(0.01f64, f64::max)
            * 2.0;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Peak memory vs queue depth: {}", s.title),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (1f64..xmax * 1.05).log_scale(),
                (0.001f64..ymax).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("queue depth Q (binds queued at once)")
            .y_desc("peak memory, MiB (log)")
            .y_label_formatter(&|v| {
                let t = format!("{v:.3}");
                t.trim_end_matches('0').trim_end_matches('.').to_string()
            })
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (i, x) in s.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = s
                .depths
                .iter()
                .zip(&x.peak_memory_pages)
                .map(|(&q, &p)| (q as f64, mib(p)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(x.design.clone())
                .legend(move |(a, b)| {
                    PathElement::new(vec![(a, b), (a + 18, b)], c.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            // Label the figures docs/designs.md quotes (Q = 1, 8, 64) and the last point.
            let last = s.depths.len().saturating_sub(1);
            chart.draw_series(
                s.depths
                    .iter()
                    .enumerate()
                    .filter(|&(k, q)| matches!(q, 1 | 8 | 64) || k == last)
                    .map(|(k, _)| {
                        let (qx, y) = pts[k];
                        let h = if k == last { HPos::Right } else { HPos::Left };
                        let style = ("sans-serif", 12)
                            .into_font()
                            .color(&c)
                            .pos(Pos::new(h, VPos::Bottom));
                        Text::new(human(x.peak_memory_pages[k]), (qx, y * 1.3), style)
                    }),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// The memory-over-time chart of one workload: allocator pages, reservations and live tables
/// per design, as SVG.
///
/// # Errors
///
/// A drawing error.
pub fn curve_svg(w: &WorkloadReport) -> Result<String, Box<dyn std::error::Error>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let xmax = w
            .results
            .iter()
            .filter_map(|r| r.curve.last())
            .map(|p| p.event)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let ymax = w
            .results
            .iter()
            .flat_map(|r| r.curve.iter())
            .map(|p| p.memory_pages.max(p.reserved_pages))
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Reserved vs used over time: {}", w.name),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("event")
            .y_desc("pages")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (i, r) in w.results.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let mem: Vec<(f64, f64)> = r
                .curve
                .iter()
                .map(|p| (p.event as f64, p.memory_pages as f64))
                .collect();
            let used: Vec<(f64, f64)> = r
                .curve
                .iter()
                .map(|p| (p.event as f64, p.live_tables as f64))
                .collect();
            chart
                .draw_series(LineSeries::new(mem, c.stroke_width(2)))?
                .label(format!("{}: memory (tables + unconsumed)", r.design))
                .legend(move |(a, b)| {
                    PathElement::new(vec![(a, b), (a + 18, b)], c.stroke_width(2))
                });
            let light = c.mix(0.5);
            chart
                .draw_series(LineSeries::new(used, light.stroke_width(1)))?
                .label(format!("{}: live tables (used)", r.design))
                .legend(move |(a, b)| {
                    PathElement::new(vec![(a, b), (a + 18, b)], light.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// The latency distributions of one workload (map, unmap, reserve per design), as SVG.
///
/// # Errors
///
/// A drawing error.
pub fn latency_svg(w: &WorkloadReport) -> Result<String, Box<dyn std::error::Error>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let kinds: [(&str, Pick); 3] = [
            ("map", |m| &m.map),
            ("unmap", |m| &m.unmap),
            ("reserve", |m| &m.reserve),
        ];
        let mut lo = f64::MAX;
        let mut hi = 1f64;
        for r in &w.results {
            for (_, f) in &kinds {
                for &(b, _) in &f(&r.metrics).histogram {
                    lo = lo.min(bucket_floor(b));
                    hi = hi.max(bucket_floor(b + 1));
                }
            }
        }
        if lo >= hi {
            lo = 1.0;
        }
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Latency distribution: {}", w.name),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((lo.max(1.0)..hi).log_scale(), 0f64..1.0)?;
        chart
            .configure_mesh()
            .x_desc("latency, ns (log)")
            .y_desc("fraction of calls ≤ x")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let styles = [1u32, 2, 3];
        for (i, r) in w.results.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            for (k, (name, f)) in kinds.iter().enumerate() {
                let l = f(&r.metrics);
                if l.count == 0 {
                    continue;
                }
                let mut acc = 0u64;
                let pts: Vec<(f64, f64)> = l
                    .histogram
                    .iter()
                    .map(|&(b, n)| {
                        acc += n;
                        (bucket_floor(b + 1), acc as f64 / l.count as f64)
                    })
                    .collect();
                let st = if k == 0 {
                    c.stroke_width(2)
                } else {
                    c.mix(1.0 - 0.3 * k as f64).stroke_width(styles[k])
                };
                chart
                    .draw_series(LineSeries::new(pts, st))?
                    .label(format!("{} {name}", r.design))
                    .legend(move |(a, b)| PathElement::new(vec![(a, b), (a + 18, b)], st));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Writes `report.json`, every chart and `index.html` into `dir`, returning the files written.
///
/// # Errors
///
/// An I/O, serialisation or drawing error.
#[allow(clippy::too_many_lines)] // the page, section by section
pub fn write_all(r: &Report, dir: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(r)?)?;
    files.push(json);
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>iopt: Design 1 vs Design 2</title>\
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>\n\
<h1>iopt: table-page allocation, Design 1 vs Design 2</h1>\n<p>Seed {}, scale {}, {:.1} s. Every call was checked against an independent model and a hardware-walk oracle while it was measured. See <code>report.json</code> for every number.</p>\n",
        r.seed, r.scale, r.wall_s
    );
    if !r.conclusion.is_empty() {
        html.push_str("<h2>Conclusion</h2>\n<ul>\n");
        for c in &r.conclusion {
            let _ = writeln!(html, "<li>{}</li>", esc(c));
        }
        html.push_str("</ul>\n");
    }
    for s in &r.sweeps {
        let name = format!("peak-vs-queue-depth-{}.svg", slug(&s.name));
        std::fs::write(dir.join(&name), sweep_svg(s)?)?;
        files.push(dir.join(&name));
        let _ = writeln!(
            html,
            "<h2>Peak memory vs queue depth: {}</h2>\n<p>{}</p>\n<img src=\"{name}\" alt=\"peak memory vs queue depth\">\n<ul>",
            esc(&s.name),
            esc(&s.description)
        );
        for x in &s.series {
            let _ = writeln!(
                html,
                "<li><b>{}</b>: {}</li>",
                esc(&x.design),
                esc(&x.shape)
            );
        }
        html.push_str("</ul>\n");
    }
    if !r.single_binds.is_empty() {
        html.push_str("<h2>Single binds on an empty tree (docs/designs.md §8)</h2>\n<table><tr><th>request</th><th>§8 reserved</th><th>§8 need 4K / 2M</th>");
        for d in &r.designs {
            let _ = write!(html, "<th>{} 4K / 2M</th>", esc(d));
        }
        html.push_str("</tr>\n");
        for row in &r.single_binds {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{} / {}</td>",
                esc(&row.example.request),
                row.example.reserved,
                row.example.need_scattered,
                row.example.need_contig
            );
            for i in 0..r.designs.len() {
                let _ = write!(
                    html,
                    "<td>{} / {}</td>",
                    row.reserved_scattered[i], row.reserved_contig[i]
                );
            }
            html.push_str("</tr>\n");
        }
        html.push_str("</table>\n");
    }
    for w in &r.workloads {
        let base = slug(&w.name);
        let c = format!("reserved-vs-used-{base}.svg");
        std::fs::write(dir.join(&c), curve_svg(w)?)?;
        files.push(dir.join(&c));
        let l = format!("latency-{base}.svg");
        std::fs::write(dir.join(&l), latency_svg(w)?)?;
        files.push(dir.join(&l));
        let _ = write!(
            html,
            "<h2>{}</h2>\n<p>{} ({} events, {} jobs, table {})</p>\n<table><tr><th>metric</th>",
            esc(&w.name),
            esc(&w.description),
            w.events,
            w.jobs,
            w.table
        );
        for x in &w.results {
            let _ = write!(html, "<th>{}</th>", esc(&x.design));
        }
        html.push_str("</tr>\n");
        for (label, f) in rows() {
            let _ = write!(html, "<tr><td>{}</td>", esc(label.trim()));
            for x in &w.results {
                let _ = write!(html, "<td>{}</td>", esc(&f(&x.metrics)));
            }
            html.push_str("</tr>\n");
        }
        let _ = writeln!(
            html,
            "</table>\n<img src=\"{c}\" alt=\"reserved vs used over time\">\n<img src=\"{l}\" alt=\"latency distribution\">"
        );
    }
    html.push_str("</body></html>\n");
    let index = dir.join("index.html");
    std::fs::write(&index, html)?;
    files.push(index);
    Ok(files)
}

/// Returns `Ok` if `r` is well-formed (used by `--json`).
///
/// # Errors
///
/// A serialisation error.
pub fn to_json(r: &Report) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(r)
}
