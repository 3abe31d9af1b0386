//! `compare`: the iopt main job. Runs both table-page allocation designs through the same
//! workloads (or a recorded trace), checks every call against an independent model and a
//! hardware-walk oracle, prints a side-by-side table and writes `report.json` and
//! `index.html` with SVG charts.

use clap::Parser;
use compare::designs;
use compare::eval::{Plan, evaluate};
use compare::harness::AnyDesign;
use compare::report::{terminal, to_json, write_all};
use compare::trace;
use compare::workload::Kind;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Compare Design 1 (caller-supplied allocator ops with worst-case pools) and Design 2
/// (refcounted VA reservations) of the iopt ARM LPAE IO page table.
///
/// With no arguments: the default evaluation — single binds on an empty tree (docs/designs.md §8),
/// peak memory against queue depth, and every built-in workload, on both designs.
#[derive(Debug, Parser)]
#[command(name = "compare", version, about, long_about)]
#[allow(clippy::struct_excessive_bools)] // command-line switches
struct Cli {
    /// Run only these built-in workloads (repeatable); skips the §8 experiments unless no
    /// --trace is given either and --experiments is set.
    #[arg(long, value_enum)]
    workload: Vec<Kind>,
    /// Replay a recorded bind trace (format: compare/traces/FORMAT.md; repeatable).
    #[arg(long)]
    trace: Vec<PathBuf>,
    /// Also run the single-bind and queue-depth experiments with --workload/--trace.
    #[arg(long)]
    experiments: bool,
    /// Seed of the generated workloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Queue depth of the queued workloads (vm-bind, sparse-texture, sparse-residency),
    /// instead of each one's default.
    #[arg(long)]
    queue_depth: Option<usize>,
    /// Directory for report.json, index.html and the charts.
    #[arg(long, default_value = "report")]
    out: PathBuf,
    /// Print report.json to stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Every workload at a tenth of the size.
    #[arg(long)]
    quick: bool,
    /// A very fast run for CI (a few seconds): small workloads, few sweep points; still
    /// checked.
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Workload size multiplier (overrides --quick/--smoke sizes).
    #[arg(long)]
    scale: Option<f64>,
    /// Measure without the checker (not recommended; for timing only).
    #[arg(long)]
    no_check: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Write the generated workloads as traces into this directory and exit.
    #[arg(long, value_name = "DIR")]
    dump_traces: Option<PathBuf>,
}

/// Builds the plan from the command line, reading every trace first (a bad line stops here,
/// before anything runs).
fn plan(cli: &Cli) -> Result<Plan, ExitCode> {
    let mut plan = if cli.smoke {
        Plan::smoke(cli.seed)
    } else if cli.quick {
        Plan::quick(cli.seed)
    } else {
        Plan::full(cli.seed)
    };
    if let Some(s) = cli.scale {
        plan.params.scale = s;
    }
    plan.params.queue_depth = cli.queue_depth;
    if cli.no_check {
        plan.run.check = None;
    }
    // Read every trace before anything runs: a bad line stops here.
    for path in &cli.trace {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", path.display());
                return Err(ExitCode::from(2));
            }
        };
        let name = path
            .file_stem()
            .map_or_else(|| "trace".to_string(), |s| s.to_string_lossy().into_owned());
        match trace::parse(&text, &name) {
            Ok(w) => plan.traces.push(w),
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return Err(ExitCode::from(2));
            }
        }
    }
    if !cli.workload.is_empty() || !cli.trace.is_empty() {
        plan.workloads.clone_from(&cli.workload);
        if !cli.experiments {
            plan.single_binds = false;
            plan.big_depths.clear();
            plan.tiny_depths.clear();
        }
    }
    Ok(plan)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let plan = match plan(&cli) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Some(dir) = &cli.dump_traces {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("error: {}: {e}", dir.display());
            return ExitCode::from(2);
        }
        for w in plan.all_workloads() {
            let p = dir.join(format!("{}.trace", w.name));
            if let Err(e) = std::fs::write(&p, trace::write(&w)) {
                eprintln!("error: {}: {e}", p.display());
                return ExitCode::from(2);
            }
            println!("{}", p.display());
        }
        return ExitCode::SUCCESS;
    }

    let d1 = designs::design1();
    let d2 = designs::design2();
    let seed = designs::design2_seed();
    let capped = designs::design1_msm_cap();
    // The first two are the compared columns; the third is Design 2 under the seed's
    // accounting, which shows what eager freeing costs and saves.
    let list: Vec<&dyn AnyDesign> = vec![&d1, &d2, &seed];
    let extra: Vec<&dyn AnyDesign> = vec![&capped];

    let workloads = plan.all_workloads();
    let total = plan.events(&workloads, list.len(), list.len() + extra.len());
    let bar = if cli.quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events ({eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let result = evaluate(&plan, &list, &extra, &mut |n| bar.inc(n));
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: the run stopped: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.json {
        match to_json(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", terminal(&report));
    }
    if report.worked_examples_reproduced == Some(false) {
        eprintln!("error: the single binds did not reproduce docs/designs.md §8 (see the table)");
        return ExitCode::FAILURE;
    }
    match write_all(&report, &cli.out) {
        Ok(files) => {
            if !cli.json {
                println!(
                    "\nWrote {} files to {} (open {}); {:.1} s.",
                    files.len(),
                    cli.out.display(),
                    cli.out.join("index.html").display(),
                    report.wall_s
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: writing the report to {}: {e}", cli.out.display());
            ExitCode::FAILURE
        }
    }
}
