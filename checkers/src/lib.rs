//! # iopt-checkers: nothing lost under bad input, failure and concurrency
//!
//! The checkers behind the fuzz targets in `fuzz/` and this crate's tests, as functions over
//! typed [`arbitrary::Arbitrary`] inputs (or raw bytes):
//!
//! - [`differential`]: a sequence of map / map_range / map_sg / unmap / unmap_collect /
//!   lookup / device write / read_and_clear_dirty / reserve / map_reserved / release / flush
//!   over a small IOVA window (on coherent and non-coherent walkers), run on Design 1,
//!   Design 2 and the model
//!   (`iopt_model::Model`); results, errors, translations (software lookup and the
//!   hardware-walk oracle) and structural invariants must agree after every operation;
//! - [`faults`]: the same sequence with an allocation failure injected at an arbitrary index:
//!   a typed error, nothing changed, nothing leaked;
//! - [`config`]: arbitrary configurations: a typed error, or a table whose geometry and
//!   register outputs match the rules of `docs/lpae-format.md` §3 and §5, re-derived here;
//! - [`descriptor`]: descriptor encode/decode round trips, decoding of arbitrary 64-bit values
//!   at any level and format, and the oracle on arbitrary raw memory: never a panic.
//!
//! After every operation a [`lane::Lane`] checks, from raw memory ([`scan`]): every table
//! reachable exactly once and live; the allocator's live pages equal the reachable tables plus
//! the unconsumed reservation pages; on refcounted engines the `live_entries` and
//! `reservations` counts of every table equal what they count (and no empty, unreserved table
//! survives); and, through a simulated device ([`env::Device`]) that caches what it walks, that
//! no table page is freed, or unlinked, before a walk flush covered it and no removed leaf
//! escapes both the gather and the walk flushes.
//!
//! A failure is a [`Failure`] with a readable dump (`iopt_sim::debug::render` of the tree, the
//! model, the device caches and the last operations).
//!
//! [`workloads`] drives the exhaustive fault injection, [`stress`] the concurrency stress,
//! [`races`] the targeted race hunts (one shape of concurrent use each, with a hang watchdog),
//! [`broken`] holds deliberately broken backends that the tests show each checker catches, and
//! [`search`] is the small seeded input generator those tests use.
//!
//! ## Where each runs
//!
//! - `cargo test -p iopt-checkers` (stable, debug, about 35 s on 2 cores): the four checkers
//!   on random inputs with a time budget (`tests/props.rs`, arbtest; `IOPT_CHECKERS_BUDGET_MS`
//!   overrides each budget), the committed regression corpus `fuzz/regressions/<target>/`
//!   (`tests/regressions.rs`), exhaustive fault injection (`tests/fault_injection.rs`, which
//!   prints how many injection points it exercised), the concurrency stress
//!   (`tests/stress.rs`; `IOPT_STRESS_OPS` sets the operations per thread) and the broken
//!   backends (`tests/broken.rs`);
//! - `cargo test -p iopt-checkers --release --test races`: the race hunts, one at a time,
//!   3 s each (`IOPT_RACE_SECS` sets the budget, `IOPT_RACE_HANG_SECS` the hang watchdog);
//! - `cargo test -p iopt-checkers --features loom --test loom_engine --release`: the engine's
//!   own map, unmap, lookup, reserve and release, model-checked with `loom` (table memory and
//!   reclamation on loom's atomics; see that file);
//! - `fuzz/` (its own workspace, nightly): one libFuzzer target per checker; `.ci/fuzz-smoke`
//!   runs each for 60 s.
//!
//! ## What the checkers bridge
//!
//! `iopt_model::Model` is the reference for results, with one difference bridged here
//! (and counted in [`lane::bridged`]): a map whose run spans several leaf tables is planned
//! whole, so the engine reports a leaf in the way before a reserved table in the way earlier
//! in the run (a run inside one table reports them in slot order, as the model does).

pub mod broken;
pub mod config;
pub mod descriptor;
pub mod differential;
pub mod env;
pub mod failure;
pub mod faults;
pub mod input;
pub mod lane;
pub mod races;
pub mod scan;
pub mod search;
pub mod stress;
pub mod workloads;

pub use failure::{Failure, Outcome};
