//! Every table iopt ships, built the same way for the golden replay, the example and the
//! kunit-style anchor: `LpaeTable`, Design 1 with each free policy, Design 2, and the facade
//! with each backend. Each table takes its pages from its own `SimMemory`, kept here so the
//! caller can check that every page came back once the table is dropped.

use std::sync::Arc;

use iopt::{Backend, Table};
use iopt_alloc_ops::AllocOpsTable;
use iopt_api::{Config, IoPageTable, NoFlush};
use iopt_lpae::LpaeTable;
use iopt_prealloc::PreallocTable;
use iopt_sim::SimMemory;

/// A table under test: a name for the summaries, and how to build one.
#[derive(Clone, Copy)]
pub struct Subject {
    /// The name summaries print.
    pub name: &'static str,
    /// Builds an empty table over `mem`.
    pub build: fn(Config, Arc<SimMemory>) -> Box<dyn IoPageTable>,
}

/// Every table, in the order the summaries list them.
pub const SUBJECTS: [Subject; 6] = [
    Subject {
        name: "LpaeTable",
        build: |cfg, mem| Box::new(LpaeTable::new(cfg, mem).expect("root")),
    },
    Subject {
        name: "AllocOpsTable (FreePolicy::Linux)",
        build: |cfg, mem| Box::new(AllocOpsTable::with_flush(cfg, mem, NoFlush).expect("root")),
    },
    Subject {
        name: "AllocOpsTable (FreePolicy::EmptyTables)",
        build: |cfg, mem| {
            Box::new(AllocOpsTable::freeing_empty_tables(cfg, mem, NoFlush).expect("root"))
        },
    },
    Subject {
        name: "PreallocTable",
        build: |cfg, mem| Box::new(PreallocTable::new(cfg, mem).expect("root")),
    },
    Subject {
        name: "iopt::Table (Backend::AllocOps)",
        build: |cfg, mem| {
            Box::new(Table::with_backend(Backend::AllocOps, cfg, mem, NoFlush).expect("root"))
        },
    },
    Subject {
        name: "iopt::Table (Backend::Prealloc)",
        build: |cfg, mem| {
            Box::new(Table::with_backend(Backend::Prealloc, cfg, mem, NoFlush).expect("root"))
        },
    },
];

/// Replays `cases` against fresh tables of `subject`, one per case, and checks afterwards
/// that each case's memory got every table page back. Returns the summary and a line per
/// case that leaked or freed a page twice.
#[allow(dead_code)] // not every test target replays
pub fn replay_checked(
    subject: &Subject,
    cases: &[iopt_golden::Case],
) -> (iopt_golden::Summary, Vec<String>) {
    let mut memories = Vec::new();
    let summary = iopt_golden::replay_all(cases, |cfg| {
        let mem = Arc::new(SimMemory::new());
        memories.push(Arc::clone(&mem));
        (subject.build)(cfg, mem)
    });
    let leaks = memories
        .iter()
        .enumerate()
        .filter_map(|(i, mem)| {
            let s = mem.stats();
            (s.live_pages != 0 || s.bad_frees != 0).then(|| {
                format!(
                    "{}: table {i} of the run left {} pages live, {} bad frees",
                    subject.name, s.live_pages, s.bad_frees
                )
            })
        })
        .collect();
    (summary, leaks)
}
