//! # compare: the iopt comparison harness
//!
//! Puts the two designs for obtaining ARM LPAE table pages through the same workloads and
//! reports, in numbers and pictures, which one wins on what. Its binary is the project's main
//! job (`cargo run --release -p compare`); the library is what the binary, the tests and future
//! fuzz targets share:
//!
//! - [`ops`]: jobs and their events (submit, execute, complete), table configurations;
//! - [`trace`]: the versioned bind-trace text format (parser with line/column errors, writer);
//! - [`workload`]: the built-in seeded workloads (async VM_BIND at queue depth Q, sparse
//!   textures, DMA streaming, VFIO, sparse residency, an adversarial mix);
//! - the independent model every backend is compared with is the `iopt-model` crate, shared
//!   with `checkers` and the crates' tests;
//! - [`check`]: the checker that compares each call's result, a sample of translations (with
//!   the hardware-walk oracle), and the allocator's books, after every call;
//! - [`policy`]: how each design's users drive it — the one place the designs differ;
//! - [`harness`]: runs one design through one workload, checking and measuring;
//! - [`experiments`]: single binds on an empty tree (docs/designs.md §8) and queue-depth sweeps;
//! - [`designs`]: the backends, ready to run; [`eval`]: the whole evaluation;
//! - [`metrics`] and [`report`]: what is measured and how it is shown.
//!
//! ```
//! use compare::{designs, harness::{run, RunOptions}, workload::{generate, Kind, Params}};
//! let w = generate(Kind::DmaStream, &Params { scale: 0.01, ..Params::default() });
//! let r = run(&designs::design1(), &w, &RunOptions::default(), &mut |_| {})?;
//! assert!(r.metrics.checked_calls > 0);
//! assert_eq!(r.metrics.tables_left_after_unmap, r.metrics.tables_left_after_unmap);
//! # Ok::<(), compare::harness::RunError>(())
//! ```

// Statistics and chart coordinates convert counts to f64 and back; the values stay far below
// 2^52.
#![allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]

pub mod check;
pub mod designs;
pub mod eval;
pub mod experiments;
pub mod harness;
pub mod metrics;
pub mod ops;
pub mod policy;
pub mod report;
pub mod trace;
pub mod workload;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
