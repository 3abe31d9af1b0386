//! Conformance against Linux's own io-pgtable-arm: every one of the 470 recorded
//! configurations and operation sequences is replayed through the public API of the on-demand
//! reference table. Register outputs, per-operation results, final leaf descriptors (bit for
//! bit) and tables per level must match; the only differences accepted are the ones the data's
//! README lists, each counted and printed.

use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;
use std::sync::{Arc, Mutex};

#[test]
fn linux_golden_matrix() {
    let cases = iopt_golden::cases().expect("embedded golden data parses");
    assert_eq!(cases.len(), 470);
    let memories = Mutex::new(Vec::new());
    let summary = iopt_golden::replay_all(&cases, |cfg| {
        let mem = Arc::new(SimMemory::new());
        memories.lock().unwrap().push(Arc::clone(&mem));
        Box::new(LpaeTable::new(cfg, mem).expect("root allocation"))
    });
    println!("{summary}");
    assert!(summary.all_passed(), "{summary}");
    assert_eq!(summary.cases, 470);
    assert_eq!(
        summary.ops_replayed, summary.ops_total,
        "every recorded call replayed"
    );
    // Every table page came back when each case's table was dropped.
    for mem in memories.into_inner().unwrap() {
        assert_eq!(mem.stats().live_pages, 0);
        assert_eq!(mem.stats().bad_frees, 0);
    }
}
