//! Interleaved ratios: the speed goals (single calls, 2M blocks, lookups, bulk maps,
//! reservations, two threads) measured round by round.
//!
//! criterion measures each backend for seconds, one after the other. On a machine whose speed
//! drifts (a virtual machine sharing its host, frequency steps) the two sides of a ratio are
//! then measured at different speeds: two criterion runs of the same code differ by up to
//! 25 % on one figure. Here each round runs every lane of a workload once, in an order that
//! rotates from round to round, and each lane's ratio against its reference is taken inside
//! the round. The report gives, per lane, the median ns per element and the median of the
//! per-round ratios with their quartiles, and checks the median against the issue's goal.
//!
//! ```text
//! cargo run --release -p iopt-benches --bin paired [-- --rounds 31] [--filter lookup] [--smoke]
//! ```
//!
//! The workloads are the criterion groups' own routines (`iopt_benches::work`) at the same
//! sizes; `--smoke` uses the CI smoke sizes. Setup (a fresh or prepared table) and teardown
//! are outside the timed part of a round.

use clap::Parser;
use iopt_benches::{AllocOps, Backend, Peer, Profile, Reserving, SZ_2M, SZ_4K, floor, work};
#[cfg(feature = "prealloc")]
use iopt_benches::{Prealloc, PreallocMut, SharedPrealloc};
#[cfg(feature = "prealloc")]
use iopt_lpae::account::ReservationCounts;
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Interleaved, per-round ratios of iopt against aarch64-paging")]
struct Args {
    /// Timed rounds per workload (one untimed warm-up round comes first).
    #[arg(long, default_value_t = 31)]
    rounds: usize,
    /// Only workloads whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// The CI smoke sizes (8 MiB instead of 1 GiB).
    #[arg(long)]
    smoke: bool,
}

/// One contender of a workload: prepares its input and times the routine on it.
struct Lane {
    name: &'static str,
    /// Runs one round; returns the time of the timed part only.
    run: Box<dyn FnMut() -> Duration>,
    /// How many times the workload's elements one round of this lane handles (2 for two
    /// threads doing one thread's work each).
    scale: u64,
}

impl Lane {
    /// This lane handles `k` times the workload's elements per round.
    fn scaled(mut self, k: u64) -> Self {
        self.scale = k;
        self
    }
}

/// A lane that builds its input with `setup` each round and times `routine` on it; the input
/// is dropped after the clock stops.
fn lane<T: 'static>(
    name: &'static str,
    setup: impl Fn() -> T + 'static,
    routine: impl Fn(&mut T) + 'static,
) -> Lane {
    Lane {
        name,
        run: Box::new(move || {
            let mut input = setup();
            let start = Instant::now();
            routine(&mut input);
            let took = start.elapsed();
            drop(black_box(input));
            took
        }),
        scale: 1,
    }
}

/// A lane whose input is built once and reused by every round (lookups).
fn lane_kept<T: 'static>(
    name: &'static str,
    mut input: T,
    routine: impl Fn(&mut T) + 'static,
) -> Lane {
    Lane {
        name,
        run: Box::new(move || {
            let start = Instant::now();
            routine(&mut input);
            start.elapsed()
        }),
        scale: 1,
    }
}

/// Whether a ratio must stay at or below the goal.
#[derive(Debug, Clone, Copy)]
struct Goal {
    /// The lane the ratio is taken against.
    reference: &'static str,
    /// The largest ratio that meets the goal.
    at_most: f64,
    /// The one lane the goal is about (the others get their ratio as context); `None`: all.
    only: Option<&'static str>,
    /// The lanes compared with the reference at all; `None`: every lane that is not itself a
    /// reference.
    lanes: Option<&'static [&'static str]>,
}

/// One workload: its lanes, the elements one round handles, and the goals its ratios meet.
struct Workload {
    name: String,
    elements: u64,
    lanes: Vec<Lane>,
    /// Which lanes are compared with which reference, and the bound each ratio must meet.
    goals: Vec<Goal>,
}

/// A workload every backend runs: how to prepare its table, and what to time on it.
trait Job: Copy + 'static {
    /// The table a round starts from.
    fn setup<B: Backend>(self) -> B;
    /// The timed part.
    fn routine<B: Backend>(self, t: &mut B);
}

/// `count` single-leaf maps of `size`, into a fresh table or (`present`) into tables already
/// there.
#[derive(Clone, Copy)]
struct MapEach {
    count: u64,
    size: u64,
    present: bool,
}

impl Job for MapEach {
    fn setup<B: Backend>(self) -> B {
        if self.present {
            work::present(self.count)
        } else {
            B::fresh()
        }
    }
    fn routine<B: Backend>(self, t: &mut B) {
        work::map_each(t, self.count, self.size);
    }
}

/// `count` single-leaf unmaps of `size` from a table holding them.
#[derive(Clone, Copy)]
struct UnmapEach {
    count: u64,
    size: u64,
}

impl Job for UnmapEach {
    fn setup<B: Backend>(self) -> B {
        if self.size == SZ_2M {
            work::mapped_blocks(self.count)
        } else {
            work::mapped(self.count)
        }
    }
    fn routine<B: Backend>(self, t: &mut B) {
        work::unmap_each(t, self.count, self.size);
    }
}

fn lane_of<B: Backend + 'static, J: Job>(job: J) -> Lane {
    lane(
        B::NAME,
        move || job.setup::<B>(),
        move |t: &mut B| job.routine(t),
    )
}

/// `job`'s lanes: both designs (Design 2 also through its exclusive entry points) and the
/// peer.
fn backends<J: Job>(job: J) -> Vec<Lane> {
    #[allow(unused_mut)]
    let mut lanes = vec![lane_of::<AllocOps, J>(job)];
    #[cfg(feature = "prealloc")]
    {
        lanes.push(lane_of::<Prealloc, J>(job));
        lanes.push(lane_of::<Prealloc<ReservationCounts>, J>(job));
        lanes.push(lane_of::<PreallocMut, J>(job));
    }
    lanes.push(lane_of::<Peer, J>(job));
    lanes
}

fn against_peer(at_most: f64) -> Vec<Goal> {
    vec![Goal {
        reference: Peer::NAME,
        at_most,
        only: None,
        lanes: None,
    }]
}

/// [`against_peer`] for the workloads of [`backends`], plus Design 2 on the seed's accounting
/// against Design 1 where no operation can free a table concurrently (single calls on one
/// thread): within 1.2x.
fn against_peer_and_design1(at_most: f64) -> Vec<Goal> {
    #[cfg(not(feature = "prealloc"))]
    return against_peer(at_most);
    #[cfg(feature = "prealloc")]
    vec![
        Goal {
            reference: Peer::NAME,
            at_most,
            only: None,
            lanes: Some(&["alloc_ops", "prealloc", "prealloc_seed", "prealloc_mut"]),
        },
        Goal {
            reference: AllocOps::NAME,
            at_most: 1.2,
            only: Some("prealloc_seed"),
            lanes: Some(&["prealloc", "prealloc_seed"]),
        },
    ]
}

/// A map inside a reservation against a map into present tables, for one design.
fn reservation<B: Reserving + 'static>(n: u64, single: bool) -> Workload {
    let how = if single { "single" } else { "bulk" };
    Workload {
        name: format!("reserved_map/{}/{how}", B::NAME),
        elements: n,
        lanes: vec![
            lane(
                "present",
                move || work::present::<B>(n),
                move |t: &mut B| {
                    work::map_pages(t, n, single);
                },
            ),
            // Context: a map into new tables, and a map inside a reservation whose tables
            // are all present (what the reservation's own check costs).
            lane("new", B::fresh, move |t: &mut B| {
                work::map_pages(t, n, single);
            }),
            lane(
                "present+reserved",
                move || {
                    let mut t = work::present::<B>(n);
                    let r = t.reserve(iopt_benches::BASE_IOVA, n * SZ_4K, SZ_4K);
                    (t, r)
                },
                move |(t, r): &mut (B, B::Res)| work::map_pages_reserved(t, r, n, single),
            ),
            lane(
                "reserved",
                move || work::reserved::<B>(n),
                move |(t, r): &mut (B, B::Res)| work::map_pages_reserved(t, r, n, single),
            ),
        ],
        goals: vec![Goal {
            reference: "present",
            at_most: 1.0,
            only: Some("reserved"),
            lanes: None,
        }],
    }
}

/// `B`'s lookup lane: `reps` times the 1024 `iovas` per round, on a table mapped once.
fn lookup_lane<B: Backend + 'static>(n: u64, iovas: &[u64], reps: u64) -> Lane {
    let mut t = work::mapped::<B>(n);
    assert_eq!(
        t.lookup(iovas[0]),
        Some(iopt_benches::pa_of(iovas[0])),
        "{}: lookup",
        B::NAME
    );
    let iovas = iovas.to_vec();
    lane_kept(B::NAME, t, move |t: &mut B| {
        for _ in 0..reps {
            work::lookup_all(t, &iovas);
        }
    })
}

/// Lookups: 1024 per call of the routine, `reps` calls per round so that a round lasts about
/// a millisecond.
fn lookups(n: u64, spread: bool, reps: u64) -> Workload {
    let iovas = work::lookup_iovas(n, spread);
    #[allow(unused_mut)]
    let mut lanes = vec![lookup_lane::<AllocOps>(n, &iovas, reps)];
    #[cfg(feature = "prealloc")]
    {
        lanes.push(lookup_lane::<Prealloc>(n, &iovas, reps));
        lanes.push(lookup_lane::<PreallocMut>(n, &iovas, reps));
    }
    lanes.push(lookup_lane::<Peer>(n, &iovas, reps));
    Workload {
        name: format!("lookup/{}", if spread { "spread" } else { "same" }),
        elements: 1024 * reps,
        lanes,
        goals: against_peer(0.4),
    }
}

/// Thread-scaling lanes named `names`: one thread, then two at once; `routine(input, threads)`
/// runs the threads on the input `setup(threads)` builds.
fn thread_lanes<T: 'static>(
    names: [&'static str; 2],
    setup: impl Fn(u64) -> T + Copy + 'static,
    routine: impl Fn(&mut T, u64) + Copy + 'static,
) -> Vec<Lane> {
    [1, 2]
        .into_iter()
        .zip(names)
        .map(|(k, name)| lane(name, move || setup(k), move |t: &mut T| routine(t, k)).scaled(k))
        .collect()
}

/// One thread mapping `n` single pages into its region of a shared table, against two threads
/// mapping `n` each into theirs: twice the work, so the goal of 1.7× one thread's throughput is
/// a time ratio of at most 2 / 1.7. In the same rounds, the machine's own scaling at that
/// moment: the same two lanes running a multiply-add chain (no memory, nothing shared) about
/// as long as a thread's maps. A host that does not run both virtual CPUs at once fails that
/// floor too, and then the map lanes say nothing about the table.
fn threads<S: iopt_benches::Shared + Send + 'static>(n: u64, present: bool) -> Workload {
    let mut lanes = thread_lanes(
        ["1 thread", "2 threads"],
        move |k| {
            if present {
                work::prefilled::<S>(k, n)
            } else {
                <S as iopt_benches::Shared>::fresh()
            }
        },
        move |t: &mut S, k| work::map_threads(&*t, k, n),
    );
    // A multiply-add step takes ~4 cycles; a single map ~50.
    let steps = n * 8;
    lanes.extend(thread_lanes(
        ["compute, 1 thread", "compute, 2 threads"],
        |_| (),
        move |(), k| {
            std::thread::scope(|s| {
                for _ in 0..k {
                    s.spawn(move || black_box(work::spin(steps)));
                }
            });
        },
    ));
    let goal = |reference, lane: &'static [&'static str]| Goal {
        reference,
        at_most: 2.0 / 1.7,
        only: None,
        lanes: Some(lane),
    };
    Workload {
        name: format!(
            "threads_map_4k/{}/{}",
            <S as iopt_benches::Shared>::NAME,
            if present { "present" } else { "new" }
        ),
        elements: n,
        lanes,
        goals: vec![
            goal("1 thread", &["2 threads"]),
            goal("compute, 1 thread", &["compute, 2 threads"]),
        ],
    }
}

/// A bulk map of `n` 4K pages, against the peer and the store loop with table allocation.
fn bulk(n: u64) -> Workload {
    let mut bulk = vec![lane(
        AllocOps::NAME,
        AllocOps::fresh,
        move |t: &mut AllocOps| work::map_pages(t, n, false),
    )];
    #[cfg(feature = "prealloc")]
    bulk.push(lane(
        <Prealloc>::NAME,
        <Prealloc>::fresh,
        move |t: &mut Prealloc| {
            work::map_pages(t, n, false);
        },
    ));
    bulk.push(lane(Peer::NAME, Peer::fresh, move |t: &mut Peer| {
        work::map_pages(t, n, false);
    }));
    bulk.push(lane(
        "floor/store_loop+alloc",
        || (),
        move |()| {
            black_box(floor::store_loop_alloc(
                n,
                black_box(iopt_benches::BASE_IOVA),
            ));
        },
    ));
    Workload {
        name: "bulk_map_1g_4k".into(),
        elements: n,
        lanes: bulk,
        goals: vec![
            Goal {
                reference: Peer::NAME,
                at_most: 0.45,
                only: None,
                lanes: None,
            },
            Goal {
                reference: "floor/store_loop+alloc",
                at_most: 1.5,
                only: None,
                lanes: None,
            },
        ],
    }
}

fn workloads(p: Profile) -> Vec<Workload> {
    let n = p.pages();
    let blocks = p.blocks();
    let reps = if p.is_smoke() { 1 } else { 32 };
    let mut w = vec![
        Workload {
            name: "map_4k_single_new".into(),
            elements: n,
            lanes: backends(MapEach {
                count: n,
                size: SZ_4K,
                present: false,
            }),
            goals: against_peer_and_design1(0.33),
        },
        Workload {
            name: "map_4k_single_present".into(),
            elements: n,
            lanes: backends(MapEach {
                count: n,
                size: SZ_4K,
                present: true,
            }),
            goals: against_peer_and_design1(0.33),
        },
        Workload {
            name: "unmap_4k_single".into(),
            elements: n,
            lanes: backends(UnmapEach {
                count: n,
                size: SZ_4K,
            }),
            goals: against_peer_and_design1(0.25),
        },
        Workload {
            name: "map_2m_blocks".into(),
            elements: blocks,
            lanes: backends(MapEach {
                count: blocks,
                size: SZ_2M,
                present: false,
            }),
            goals: against_peer_and_design1(0.4),
        },
        Workload {
            name: "unmap_2m_blocks".into(),
            elements: blocks,
            lanes: backends(UnmapEach {
                count: blocks,
                size: SZ_2M,
            }),
            goals: against_peer_and_design1(0.4),
        },
        lookups(n, false, reps),
        lookups(n, true, reps),
    ];
    w.push(bulk(n));
    for present in [false, true] {
        w.push(threads::<AllocOps>(p.thread_pages(), present));
        #[cfg(feature = "prealloc")]
        w.push(threads::<SharedPrealloc>(p.thread_pages(), present));
    }
    let rn = p.reserve_pages();
    for single in [true, false] {
        w.push(reservation::<AllocOps>(rn, single));
        #[cfg(feature = "prealloc")]
        w.push(reservation::<Prealloc>(rn, single));
        #[cfg(feature = "prealloc")]
        w.push(reservation::<Prealloc<ReservationCounts>>(rn, single));
    }
    w
}

/// The median of `v` (sorted in place); `v` is not empty.
fn median(v: &mut [f64]) -> f64 {
    quantile(v, 0.5)
}

/// The `q` quantile of `v` (sorted in place) by linear interpolation; `v` is not empty.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)] // a few hundred rounds at most
    let at = q * (v.len() - 1) as f64;
    #[allow(clippy::cast_sign_loss)] // `at` is within 0..len
    let lo = at.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    #[allow(clippy::cast_precision_loss)]
    let frac = at - lo as f64;
    v[lo] + (v[hi] - v[lo]) * frac
}

/// What one workload measured: per lane, the round times in ns.
struct Measured {
    workload: String,
    elements: u64,
    /// Per lane: its name, its round times in ns, its [`Lane::scale`].
    lanes: Vec<(&'static str, Vec<f64>, u64)>,
    goals: Vec<Goal>,
}

/// Runs one untimed warm-up round, then `rounds` timed rounds, each lane once per round,
/// starting with a different lane each round.
fn measure(mut w: Workload, rounds: usize) -> Measured {
    let k = w.lanes.len();
    let mut times = vec![Vec::with_capacity(rounds); k];
    for round in 0..=rounds {
        for j in 0..k {
            let i = (round + j) % k;
            let took = (w.lanes[i].run)();
            if round > 0 {
                #[allow(clippy::cast_precision_loss)] // rounds last well under 2^52 ns
                times[i].push(took.as_nanos() as f64);
            }
        }
    }
    Measured {
        workload: w.name,
        elements: w.elements,
        lanes: w
            .lanes
            .iter()
            .zip(times)
            .map(|(l, t)| (l.name, t, l.scale))
            .collect(),
        goals: w.goals,
    }
}

/// One row of the report: a lane's ratio against a reference.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    workload: String,
    lane: &'static str,
    ns_per_elem: f64,
    reference: &'static str,
    /// Median, first and third quartile of the per-round ratios.
    ratio: [f64; 3],
    /// The goal, if this lane has one against this reference.
    at_most: Option<f64>,
}

impl Row {
    /// Whether the median ratio meets the goal; `None` for a context row.
    fn met(&self) -> Option<bool> {
        self.at_most.map(|x| self.ratio[0] <= x)
    }
}

/// The rows of `m`: every lane that is not itself a reference, against each reference.
fn rows(m: &Measured) -> Vec<Row> {
    let mut out = Vec::new();
    for g in &m.goals {
        let Some((_, reference, _)) = m.lanes.iter().find(|(n, _, _)| *n == g.reference) else {
            continue;
        };
        for (name, times, scale) in &m.lanes {
            // A goal's own list decides; without one, every lane that is not a reference.
            let compared = match g.lanes {
                Some(l) => l.contains(name),
                None => !m.goals.iter().any(|x| x.reference == *name),
            };
            if !compared || *name == g.reference {
                continue;
            }
            let mut ratios: Vec<f64> = times.iter().zip(reference).map(|(a, b)| a / b).collect();
            let per = per_element(times, m.elements * scale);
            out.push(Row {
                workload: m.workload.clone(),
                lane: name,
                ns_per_elem: per,
                reference: g.reference,
                ratio: [
                    median(&mut ratios),
                    quantile(&mut ratios, 0.25),
                    quantile(&mut ratios, 0.75),
                ],
                at_most: g.only.is_none_or(|l| l == *name).then_some(g.at_most),
            });
        }
    }
    out
}

/// The references' own medians, ns per element.
fn reference_rows(m: &Measured) -> Vec<(String, &'static str, f64)> {
    m.lanes
        .iter()
        .filter(|(n, _, _)| m.goals.iter().any(|g| g.reference == *n))
        .map(|(n, times, scale)| {
            (
                m.workload.clone(),
                *n,
                per_element(times, m.elements * scale),
            )
        })
        .collect()
}

/// The median round time over `elements`, in ns.
fn per_element(times: &[f64], elements: u64) -> f64 {
    let mut t = times.to_vec();
    #[allow(clippy::cast_precision_loss)] // element counts are far below 2^52
    let per = median(&mut t) / elements as f64;
    per
}

fn report(measured: &[Measured], rounds: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Per-round ratios over {rounds} rounds (median [first quartile – third quartile]); \
         ns per element are medians of the rounds.\n"
    );
    let _ = writeln!(
        s,
        "| workload | lane | ns/elem | against | ratio | quartiles | goal | met |"
    );
    let _ = writeln!(s, "|---|---|---:|---|---:|---|---:|---|");
    for m in measured {
        for (w, n, per) in reference_rows(m) {
            let _ = writeln!(s, "| {w} | {n} | {per:.2} | (reference) | | | | |");
        }
        for r in rows(m) {
            let (goal, met) = match (r.at_most, r.met()) {
                (Some(x), Some(true)) => (format!("≤ {x:.2}×"), "yes"),
                (Some(x), _) => (format!("≤ {x:.2}×"), "**no**"),
                (None, _) => ("(context)".to_string(), ""),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {} | {:.2}× | {:.2}–{:.2} | {goal} | {met} |",
                r.workload, r.lane, r.ns_per_elem, r.reference, r.ratio[0], r.ratio[1], r.ratio[2],
            );
        }
    }
    s
}

fn main() {
    let args = Args::parse();
    let profile = if args.smoke {
        Profile::Smoke
    } else {
        Profile::Quick
    };
    let rounds = args.rounds.max(1);
    let mut measured = Vec::new();
    for w in workloads(profile) {
        if args.filter.as_ref().is_some_and(|f| !w.name.contains(f)) {
            continue;
        }
        eprintln!("{}: {} lanes × {rounds} rounds", w.name, w.lanes.len());
        measured.push(measure(w, rounds));
    }
    print!("{}", report(&measured, rounds));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let mut v = [4.0, 1.0, 3.0, 2.0];
        assert!((median(&mut v) - 2.5).abs() < 1e-12);
        assert!((quantile(&mut v, 0.25) - 1.75).abs() < 1e-12);
        assert!((quantile(&mut v, 1.0) - 4.0).abs() < 1e-12);
        assert!((quantile(&mut [7.0], 0.75) - 7.0).abs() < 1e-12);
    }

    #[test]
    fn ratios_are_taken_inside_each_round() {
        // Lane "a" is twice as slow as the reference in every round, while the machine's speed
        // halves from round to round: the per-round ratio stays 2.
        let m = Measured {
            workload: "w".into(),
            elements: 10,
            lanes: vec![
                ("a", vec![20.0, 40.0, 80.0], 1),
                ("ref", vec![10.0, 20.0, 40.0], 1),
            ],
            goals: vec![Goal {
                reference: "ref",
                at_most: 1.5,
                only: None,
                lanes: None,
            }],
        };
        let r = rows(&m);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].lane, "a");
        assert!(
            r[0].ratio.iter().all(|x| (x - 2.0).abs() < 1e-12),
            "{:?}",
            r[0]
        );
        assert!((r[0].ns_per_elem - 4.0).abs() < 1e-12);
        assert_eq!(r[0].met(), Some(false));
        let refs = reference_rows(&m);
        assert_eq!(refs.len(), 1);
        assert_eq!((refs[0].0.as_str(), refs[0].1), ("w", "ref"));
        assert!((refs[0].2 - 2.0).abs() < 1e-12);
    }

    #[test]
    fn goals_compare_only_their_lanes() {
        let goal = |reference, lanes: &'static [&'static str]| Goal {
            reference,
            at_most: 1.0,
            only: None,
            lanes: Some(lanes),
        };
        let m = Measured {
            workload: "w".into(),
            elements: 1,
            lanes: vec![
                ("a", vec![3.0], 1),
                ("ref a", vec![2.0], 1),
                ("b", vec![1.0], 2),
                ("ref b", vec![2.0], 1),
            ],
            goals: vec![goal("ref a", &["a"]), goal("ref b", &["b"])],
        };
        let r = rows(&m);
        let pairs: Vec<_> = r.iter().map(|x| (x.lane, x.reference, x.met())).collect();
        assert_eq!(
            pairs,
            [("a", "ref a", Some(false)), ("b", "ref b", Some(true))]
        );
        // A lane handling twice the elements reports half the time per element.
        assert!((r[1].ns_per_elem - 0.5).abs() < 1e-12);
    }

    /// Every workload runs at the smoke sizes, and every lane gets a finite, positive ratio
    /// against each of its workload's references.
    #[test]
    fn smoke_run_reports_every_lane() {
        let measured: Vec<_> = workloads(Profile::Smoke)
            .into_iter()
            .map(|w| measure(w, 2))
            .collect();
        for m in &measured {
            let compared = m.lanes.len() - m.goals.len();
            let expected: usize = m
                .goals
                .iter()
                .map(|g| g.lanes.map_or(compared, <[&str]>::len))
                .sum();
            let r = rows(m);
            assert_eq!(r.len(), expected, "{}", m.workload);
            for row in &r {
                assert!(
                    row.ratio.iter().all(|x| x.is_finite() && *x > 0.0),
                    "{row:?}"
                );
            }
        }
        let text = report(&measured, 2);
        assert!(text.contains("| lookup/spread | alloc_ops |"), "{text}");
        assert!(text.contains("| bulk_map_1g_4k | alloc_ops |"), "{text}");
        assert!(
            text.contains("| threads_map_4k/alloc_ops/new | compute, 2 threads |"),
            "{text}"
        );
    }
}
