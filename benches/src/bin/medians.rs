//! Prints the medians of the last criterion run as markdown: one table per group with the
//! median per iteration, per element, and the ratio against aarch64-paging in the same group,
//! then the issue's goals with the measured ratio and whether each is met.
//!
//! ```text
//! cargo run -p iopt-benches --bin medians [-- CRITERION_DIR]
//! ```
//!
//! `CRITERION_DIR` defaults to `$CARGO_TARGET_DIR/criterion`, else `target/criterion` (looked
//! for in the current directory and its parent).

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One benchmark's result.
#[derive(Debug, Clone)]
struct Entry {
    group: String,
    function: String,
    value: String,
    /// Median time of one iteration, in ns.
    median: f64,
    elements: Option<u64>,
}

impl Entry {
    /// Median per element (per iteration when there is no throughput), in ns.
    fn per_elem(&self) -> f64 {
        match self.elements {
            #[allow(clippy::cast_precision_loss)] // element counts are far below 2^52
            Some(n) if n > 0 => self.median / n as f64,
            _ => self.median,
        }
    }
}

fn find(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "new") {
                if p.join("estimates.json").is_file() && p.join("benchmark.json").is_file() {
                    out.push(p);
                }
            } else {
                find(&p, out);
            }
        }
    }
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

fn load(dir: &Path) -> Vec<Entry> {
    let mut dirs = Vec::new();
    find(dir, &mut dirs);
    let mut out = Vec::new();
    for d in dirs {
        let (Some(b), Some(e)) = (
            read_json(&d.join("benchmark.json")),
            read_json(&d.join("estimates.json")),
        ) else {
            continue;
        };
        let s = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let Some(median) = e.pointer("/median/point_estimate").and_then(Value::as_f64) else {
            continue;
        };
        out.push(Entry {
            group: s("group_id"),
            function: s("function_id"),
            value: s("value_str"),
            median,
            elements: b.pointer("/throughput/Elements").and_then(Value::as_u64),
        });
    }
    out.sort_by(|a, b| (&a.group, &a.value, &a.function).cmp(&(&b.group, &b.value, &b.function)));
    out
}

const PEER: &str = "aarch64-paging";

/// The variant after the backend name: `alloc_ops/present` → `present`.
fn suffix(function: &str) -> Option<&str> {
    function.split_once('/').map(|(_, s)| s)
}

/// The aarch64-paging row an entry is compared with: same group and parameter; the same
/// variant where the peer has it (`reserved` against `present`, `reserve+map` against `new`),
/// else the plain `aarch64-paging` row.
fn peer_of<'a>(e: &Entry, all: &'a [Entry]) -> Option<&'a Entry> {
    let same: Vec<&Entry> = all
        .iter()
        .filter(|p| p.group == e.group && p.value == e.value && p.function.starts_with(PEER))
        .collect();
    let want = suffix(&e.function).map(|s| match s {
        "reserved" => "present",
        "reserve+map" => "new",
        other => other,
    });
    if let Some(w) = want {
        if let Some(p) = same.iter().find(|p| suffix(&p.function) == Some(w)) {
            return Some(p);
        }
    }
    same.iter()
        .find(|p| p.function == PEER)
        .or_else(|| same.first())
        .copied()
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.2} ns")
    }
}

fn tables(all: &[Entry]) -> String {
    let mut groups: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in all {
        groups.entry(&e.group).or_default().push(e);
    }
    let mut s = String::new();
    for (g, es) in groups {
        let _ = writeln!(s, "\n### {g}\n");
        let _ = writeln!(
            s,
            "| bench | param | elements | median / iter | median / element | vs {PEER} |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
        for e in es {
            let ratio = match peer_of(e, all) {
                Some(p) if !std::ptr::eq(p, e) => format!("{:.2}×", e.per_elem() / p.per_elem()),
                _ => "—".to_owned(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.2} ns | {ratio} |",
                e.function,
                e.value,
                e.elements.map_or("—".to_owned(), |n| n.to_string()),
                fmt_ns(e.median),
                e.per_elem()
            );
        }
    }
    s
}

/// How a goal is judged.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// ours / theirs per element must be at most this.
    RatioAtMost(f64),
    /// theirs / ours per element (a speed-up) must be at least this.
    SpeedupAtLeast(f64),
    /// ours per element must be at most this many ns.
    NsAtMost(f64),
}

struct Goal {
    what: &'static str,
    group: &'static str,
    /// Parameter; `None`: any (the first found).
    value: Option<&'static str>,
    /// `{}` is replaced by the design's name.
    ours: &'static str,
    theirs: &'static str,
    check: Check,
}

const DESIGNS: [&str; 3] = ["alloc_ops", "prealloc", "prealloc_mut"];

const fn goal(
    what: &'static str,
    group: &'static str,
    value: Option<&'static str>,
    ours: &'static str,
    theirs: &'static str,
    check: Check,
) -> Goal {
    Goal {
        what,
        group,
        value,
        ours,
        theirs,
        check,
    }
}

/// The issue's goals, as rows of the last run can judge them.
const GOALS: [Goal; 14] = [
    goal(
        "single-4K map, new tables ≤ 0.33× aarch64-paging",
        "map_4k_single_new",
        None,
        "{}",
        PEER,
        Check::RatioAtMost(0.33),
    ),
    goal(
        "single-4K map, present tables ≤ 0.33× aarch64-paging",
        "map_4k_single_present",
        None,
        "{}",
        PEER,
        Check::RatioAtMost(0.33),
    ),
    goal(
        "single-4K unmap ≤ 0.25× aarch64-paging",
        "unmap_4k_single",
        None,
        "{}",
        PEER,
        Check::RatioAtMost(0.25),
    ),
    goal(
        "2M block map ≤ 0.4× aarch64-paging",
        "map_2m_blocks",
        None,
        "{}",
        PEER,
        Check::RatioAtMost(0.4),
    ),
    goal(
        "2M block unmap ≤ 0.4× aarch64-paging",
        "unmap_2m_blocks",
        None,
        "{}",
        PEER,
        Check::RatioAtMost(0.4),
    ),
    goal(
        "lookup (same page) ≤ 0.4× aarch64-paging",
        "lookup",
        Some("same"),
        "{}",
        PEER,
        Check::RatioAtMost(0.4),
    ),
    goal(
        "lookup (spread) ≤ 0.4× aarch64-paging",
        "lookup",
        Some("spread"),
        "{}",
        PEER,
        Check::RatioAtMost(0.4),
    ),
    goal(
        "bulk map 1 GiB of 4K ≤ 1.0 ns/page",
        "bulk_map_1g_4k",
        None,
        "{}",
        "{}",
        Check::NsAtMost(1.0),
    ),
    goal(
        "bulk map 1 GiB of 4K ≤ 0.45× aarch64-paging",
        "bulk_map_1g_4k",
        None,
        "{}",
        PEER,
        Check::RatioAtMost(0.45),
    ),
    goal(
        "bulk map ≤ 1.5× store loop with table allocation",
        "bulk_map_1g_4k",
        None,
        "{}",
        "floor/store_loop+alloc",
        Check::RatioAtMost(1.5),
    ),
    goal(
        "map in a reservation ≤ 1.0× map into present tables (single)",
        "reserved_map",
        Some("single"),
        "{}/reserved",
        "{}/present",
        Check::RatioAtMost(1.0),
    ),
    goal(
        "map in a reservation ≤ 1.0× map into present tables (bulk)",
        "reserved_map",
        Some("bulk"),
        "{}/reserved",
        "{}/present",
        Check::RatioAtMost(1.0),
    ),
    goal(
        "2 threads ≥ 1.7× one thread (new tables)",
        "threads_map_4k",
        Some("2"),
        "{}/new",
        "{}/new@1",
        Check::SpeedupAtLeast(1.7),
    ),
    goal(
        "2 threads ≥ 1.7× one thread (present tables)",
        "threads_map_4k",
        Some("2"),
        "{}/present",
        "{}/present@1",
        Check::SpeedupAtLeast(1.7),
    ),
];

fn lookup<'a>(
    all: &'a [Entry],
    group: &str,
    function: &str,
    value: Option<&str>,
) -> Option<&'a Entry> {
    all.iter()
        .find(|e| e.group == group && e.function == function && value.is_none_or(|v| e.value == v))
}

fn goal_table(all: &[Entry]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n### Goals\n");
    let _ = writeln!(s, "| goal | design | measured | met |");
    let _ = writeln!(s, "|---|---|---:|:---:|");
    for goal in &GOALS {
        for d in DESIGNS {
            let ours_name = goal.ours.replace("{}", d);
            let Some(ours) = lookup(all, goal.group, &ours_name, goal.value) else {
                continue;
            };
            // `name@value` picks another parameter of the same group.
            let theirs_spec = goal.theirs.replace("{}", d);
            let (tname, tvalue) = match theirs_spec.split_once('@') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => (theirs_spec.clone(), ours.value.clone()),
            };
            let theirs = lookup(all, goal.group, &tname, Some(&tvalue));
            let (measured, met) = match (goal.check, theirs) {
                (Check::NsAtMost(max), _) => {
                    let v = ours.per_elem();
                    (format!("{v:.2} ns"), v <= max)
                }
                (Check::RatioAtMost(max), Some(t)) => {
                    let r = ours.per_elem() / t.per_elem();
                    (format!("{r:.2}×"), r <= max)
                }
                (Check::SpeedupAtLeast(min), Some(t)) => {
                    let r = t.per_elem() / ours.per_elem();
                    (format!("{r:.2}×"), r >= min)
                }
                (_, None) => continue,
            };
            let _ = writeln!(
                s,
                "| {} | {d} | {measured} | {} |",
                goal.what,
                if met { "yes" } else { "**no**" }
            );
        }
    }
    s
}

fn default_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return Path::new(&t).join("criterion");
    }
    for c in ["target/criterion", "../target/criterion"] {
        if Path::new(c).is_dir() {
            return PathBuf::from(c);
        }
    }
    PathBuf::from("target/criterion")
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(default_dir, PathBuf::from);
    let all = load(&dir);
    if all.is_empty() {
        eprintln!("no criterion results under {}", dir.display());
        std::process::exit(1);
    }
    print!("{}", tables(&all));
    print!("{}", goal_table(&all));
}
