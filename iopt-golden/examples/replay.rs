//! Replays recorded Linux io-pgtable-arm sets through every iopt table and prints, per table
//! and file, the summary: cases passed, the fraction of calls compared, the allowed
//! differences by kind and the resynchronisations.
//!
//! ```text
//! cargo run -p iopt-golden --example replay -- FILE...
//! cargo run -p iopt-golden --example replay            # the two embedded sets
//! ```
//!
//! Each FILE holds one case a line in the schema of `iopt-golden/README.md` (any `kind`,
//! case numbers increasing from anywhere). Exit status: 0 when every table matched Linux on
//! every file (allowed differences aside) and returned every table page, 1 on any mismatch
//! or leak, 2 when a file cannot be read or parsed.

#[path = "../tests/common/tables.rs"]
mod tables;

use std::process::ExitCode;

use iopt_golden::Case;
use tables::{SUBJECTS, replay_checked};

/// Failed cases printed in full per table and file.
const SHOWN: usize = 5;

fn load(args: &[String]) -> Result<Vec<(String, Vec<Case>)>, String> {
    if args.is_empty() {
        let sets = iopt_golden::embedded_sets().map_err(|e| e.to_string())?;
        return Ok(sets
            .into_iter()
            .map(|(name, cases)| (format!("embedded {name} set"), cases))
            .collect());
    }
    args.iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            let cases = iopt_golden::parse(&text).map_err(|e| format!("{path}: {e}"))?;
            Ok((path.clone(), cases))
        })
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: replay [FILE...]   (no FILE: the two embedded sets)");
        return ExitCode::SUCCESS;
    }
    let files = match load(&args) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("replay: {e}");
            return ExitCode::from(2);
        }
    };
    let mut failed = false;
    let mut table = Vec::new();
    for (file, cases) in &files {
        for subject in &SUBJECTS {
            let (summary, leaks) = replay_checked(subject, cases);
            println!("== {} on {file}", subject.name);
            // The summary lists up to 20 failed cases; keep the console readable.
            let text = summary.to_string();
            let mut shown = 0;
            for line in text.lines() {
                if line.starts_with("case ") {
                    shown += 1;
                }
                if shown <= SHOWN || !line.starts_with(['c', ' ']) {
                    println!("{line}");
                }
            }
            for leak in &leaks {
                println!("  LEAK {leak}");
            }
            failed |= !summary.all_passed() || !leaks.is_empty();
            table.push((
                subject.name,
                file.as_str(),
                summary.passed,
                summary.cases,
                summary.mismatches,
                100.0 * summary.compared_fraction(),
                summary.resyncs,
            ));
        }
    }
    println!(
        "\n{:<42} {:<36} {:>9} {:>10} {:>9} {:>7}",
        "table", "file", "passed", "mismatch", "compared", "resyncs"
    );
    for (name, file, passed, cases, mismatches, compared, resyncs) in table {
        let file = file.rsplit('/').next().unwrap_or(file);
        println!(
            "{name:<42} {file:<36} {:>9} {mismatches:>10} {compared:>8.2}% {resyncs:>7}",
            format!("{passed}/{cases}")
        );
    }
    if failed {
        println!("\nreplay: MISMATCH (see the failed cases above)");
        ExitCode::FAILURE
    } else {
        println!("\nreplay: every table matched Linux on every file");
        ExitCode::SUCCESS
    }
}
