//! The evaluation: which workloads, traces and experiments to run on which designs, run them,
//! and assemble the [`Report`].

use crate::experiments::{
    BIG_DEPTHS, MapLimits, SingleBind, TINY_DEPTHS, WORKED_EXAMPLES, big_sweep, single_binds,
    tiny_sweep,
};
use crate::harness::{AnyDesign, RunError, RunOptions};
use crate::ops::Workload;
use crate::report::{DesignResult, REPORT_VERSION, Report, WorkloadReport, conclude};
use crate::workload::{Kind, Params, generate};
use std::time::Instant;

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Parameters of the generated workloads.
    pub params: Params,
    /// Built-in workloads to run.
    pub workloads: Vec<Kind>,
    /// Extra workloads (replayed traces).
    pub traces: Vec<Workload>,
    /// Run the single-bind experiment (docs/designs.md §8).
    pub single_binds: bool,
    /// Queue depths of the 1 GiB sweep (empty: skip it).
    pub big_depths: Vec<usize>,
    /// Queue depths of the tiny-bind sweep (empty: skip it).
    pub tiny_depths: Vec<usize>,
    /// Run options.
    pub run: RunOptions,
}

impl Plan {
    /// The default evaluation: every workload, both experiments, full size.
    #[must_use]
    pub fn full(seed: u64) -> Self {
        Self {
            params: Params {
                seed,
                queue_depth: None,
                scale: 1.0,
            },
            workloads: Kind::ALL.to_vec(),
            traces: Vec::new(),
            single_binds: true,
            big_depths: BIG_DEPTHS.to_vec(),
            tiny_depths: TINY_DEPTHS.to_vec(),
            run: RunOptions::default(),
        }
    }

    /// A very fast run for CI: every workload at a small scale, the experiments on a few
    /// points, still checked.
    #[must_use]
    pub fn smoke(seed: u64) -> Self {
        Self {
            params: Params {
                seed,
                queue_depth: None,
                scale: 0.02,
            },
            big_depths: vec![1, 8],
            tiny_depths: vec![1, 64],
            single_binds: true,
            ..Self::full(seed)
        }
    }

    /// Between the two: every workload at a tenth of the size, all sweep points.
    #[must_use]
    pub fn quick(seed: u64) -> Self {
        Self {
            params: Params {
                seed,
                queue_depth: None,
                scale: 0.1,
            },
            ..Self::full(seed)
        }
    }

    /// The generated workloads and traces, in report order.
    #[must_use]
    pub fn all_workloads(&self) -> Vec<Workload> {
        let mut v: Vec<Workload> = self
            .workloads
            .iter()
            .map(|&k| generate(k, &self.params))
            .collect();
        v.extend(self.traces.iter().cloned());
        v
    }

    /// Events the plan will replay (for a progress bar): every workload on every design, and
    /// an estimate for the experiments.
    #[must_use]
    pub fn events(&self, workloads: &[Workload], designs: usize, sweep_designs: usize) -> u64 {
        let w: usize = workloads.iter().map(|w| w.events.len()).sum();
        let single = if self.single_binds { 11 * 2 * 3 } else { 0 };
        let big: usize = self.big_depths.iter().map(|q| 3 * q).sum();
        let tiny: usize = self
            .tiny_depths
            .iter()
            .map(|q| 3 * q + 3 * q.saturating_sub(512))
            .sum();
        (w * designs + single * designs + (big + tiny) * sweep_designs) as u64
    }
}

/// Runs `plan` on `designs` (the first two are the compared columns); the sweeps also run
/// `sweep_extra` (Design 1 under msm's cap, say).
///
/// # Errors
///
/// The first run that failed: a divergence from the model, a leak, or a build error.
pub fn evaluate(
    plan: &Plan,
    designs: &[&dyn AnyDesign],
    sweep_extra: &[&dyn AnyDesign],
    progress: &mut dyn FnMut(u64),
) -> Result<Report, RunError> {
    let start = Instant::now();
    let workloads = plan.all_workloads();
    let mut report = Report {
        version: REPORT_VERSION,
        seed: plan.params.seed,
        scale: plan.params.scale,
        designs: designs.iter().map(|d| d.name().to_string()).collect(),
        single_binds: Vec::new(),
        worked_examples_reproduced: None,
        sweeps: Vec::new(),
        workloads: Vec::new(),
        conclusion: Vec::new(),
        wall_s: 0.0,
    };
    if plan.single_binds {
        report.single_binds = single_binds(
            &WORKED_EXAMPLES,
            designs,
            MapLimits::default(),
            &plan.run,
            progress,
        )?;
    }
    let mut sweepers: Vec<&dyn AnyDesign> = designs.to_vec();
    sweepers.extend_from_slice(sweep_extra);
    if !plan.big_depths.is_empty() {
        report
            .sweeps
            .push(big_sweep(&plan.big_depths, &sweepers, &plan.run, progress)?);
    }
    if !plan.tiny_depths.is_empty() {
        report.sweeps.push(tiny_sweep(
            &plan.tiny_depths,
            plan.params.seed,
            &sweepers,
            &plan.run,
            progress,
        )?);
    }
    for w in &workloads {
        let mut results = Vec::new();
        for d in designs {
            let r = d.run(w, &plan.run, progress)?;
            report.worked_examples_reproduced =
                Some(report.single_binds.iter().all(SingleBind::reproduces));
            results.push(DesignResult {
                design: d.name().to_string(),
                metrics: r.metrics,
                curve: r.curve,
            });
        }
        report.workloads.push(WorkloadReport {
            name: w.name.clone(),
            description: w.description.clone(),
            table: w.table.name().to_string(),
            events: w.events.len(),
            jobs: w.jobs(),
            results,
        });
    }
    report.conclusion = conclude(&report);
    report.wall_s = start.elapsed().as_secs_f64();
    Ok(report)
}
