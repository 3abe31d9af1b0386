//! Exhaustive fault injection: fixed workloads run once cleanly, to count their page
//! allocations, and then once per allocation index `k` with the `k`-th allocation failing.
//! Every failing operation must return the allocator's typed error and leave the walk, the
//! allocator's live set and the counters exactly as before (the [`Lane`] compares full
//! snapshots), the model skips it, and the operation retried succeeds; the workload must end
//! in the same shape as the clean run, and every page must come back when the table is
//! dropped.

use crate::failure::Failure;
use crate::input::{PA_BASE, Step, setups};
use crate::lane::{Lane, LaneSpec};
use iopt_api::Prot;

const K4: u64 = 0x1000;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
/// 512 GiB: a level-0 boundary of the 48-bit 4 KiB configuration the workloads run on.
const B: u64 = 512 << 30;
const RW: Prot = Prot::READ.union(Prot::WRITE);

fn map(res: Option<usize>, iova: u64, size: u64, count: u64) -> Step {
    Step::Map {
        res,
        iova,
        pa: PA_BASE + (iova % (64 * G1)),
        size,
        count,
        prot: RW,
    }
}

fn map_range(iova: u64, len: u64, congruent: bool) -> Step {
    let pa = if congruent {
        PA_BASE + (iova % (64 * G1))
    } else {
        PA_BASE + K4
    };
    Step::MapRange {
        iova,
        pa,
        len,
        prot: RW | Prot::CACHE,
    }
}

fn reserve(start: u64, len: u64, leaf: u64) -> Step {
    Step::Reserve { start, len, leaf }
}

fn unmap(iova: u64, size: u64, count: u64) -> Step {
    Step::Unmap { iova, size, count }
}

/// Reservations of several shapes (one page, 64 KiB across a 2 MiB boundary, 2 MiB blocks
/// across the 512 GiB boundary, 128 KiB across a 1 GiB boundary) with maps inside them and
/// on demand between them.
#[must_use]
pub fn reserve_workload() -> Vec<Step> {
    vec![
        reserve(B, K4, K4),
        map(Some(0), B, K4, 1),
        reserve(B + 3 * M2 - 0x8000, 0x10000, K4),
        map(Some(1), B + 3 * M2 - 0x8000, K4, 16),
        map(None, B + 8 * M2 + K4, K4, 3),
        reserve(B - M2, 2 * M2, M2),
        map(Some(2), B + M2, M2, 1),
        reserve(B + 4 * G1 - 16 * K4, 32 * K4, K4),
        map(Some(3), B + 4 * G1 - 16 * K4, K4, 32),
        Step::Release { res: 0 },
        reserve(B, K4, K4),
        map(Some(4), B, K4, 1),
        Step::Flush,
    ]
}

/// `map_range` calls that each need several tables: 4 KiB pages and 2 MiB blocks across the
/// 512 GiB boundary (six tables), an overlapping one that must fail, 4 KiB pages across a
/// leaf-table boundary, and a 1 GiB block with a page after it.
#[must_use]
pub fn map_range_workload() -> Vec<Step> {
    vec![
        map_range(B - 2 * M2 - 3 * K4, 4 * M2 + 6 * K4, true),
        map_range(B - 4 * K4, 2 * K4, true),
        map_range(B + 8 * M2 - 5 * K4, 10 * K4, false),
        map_range(B + 2 * G1, G1 + K4, true),
        unmap(B - 2 * M2 - 3 * K4, K4, 3),
        map_range(B - 2 * M2 - 3 * K4, 3 * K4, false),
        Step::Flush,
    ]
}

/// Maps bound to reservations: within a leaf table, across two leaf tables, outside the
/// reservation, over an existing page, and again after an unmap.
#[must_use]
pub fn map_reserved_workload() -> Vec<Step> {
    vec![
        reserve(B + 16 * M2, 0x10000, K4),
        map(Some(0), B + 16 * M2, K4, 4),
        map(Some(0), B + 16 * M2 + 0x4000, K4, 4),
        map(Some(0), B + 16 * M2 + 0xc000, K4, 8),
        map(Some(0), B + 16 * M2, K4, 1),
        reserve(B + 64 * M2 - 0x2000, 0x4000, K4),
        map(Some(1), B + 64 * M2 - 0x2000, K4, 4),
        unmap(B + 64 * M2 - 0x2000, K4, 4),
        map(Some(1), B + 64 * M2 - 0x2000, K4, 4),
        map(None, B + 64 * M2 + 0x4000, K4, 2),
        Step::Release { res: 0 },
        Step::Release { res: 1 },
        Step::Release { res: 1 },
        Step::Flush,
    ]
}

/// Reservations released and made again, overlapping ones, and maps on demand where released
/// tables were.
#[must_use]
pub fn release_workload() -> Vec<Step> {
    let a = B + 128 * M2;
    vec![
        reserve(a, 4 * M2, K4),
        map(Some(0), a, K4, 8),
        map(Some(0), a + 3 * M2, K4, 2),
        Step::Release { res: 0 },
        reserve(a, 4 * M2, K4),
        map(Some(1), a + M2, K4, 4),
        reserve(a + 2 * M2, 2 * M2, K4),
        map(Some(2), a + 2 * M2, K4, 4),
        Step::Release { res: 1 },
        Step::Release { res: 2 },
        map(None, a, K4, 2),
        map(None, a + 3 * M2, K4, 1),
        Step::Flush,
    ]
}

/// Unmaps that empty tables (freed at once by Design 2 and by Design 1 with eager freeing),
/// maps that need them again, a block-sized unmap over a table, and a block map over an
/// emptied table.
#[must_use]
pub fn eager_free_workload() -> Vec<Step> {
    let a = B + 256 * M2;
    vec![
        map(None, a - 2 * K4, K4, 4),
        unmap(a - 2 * K4, K4, 4),
        map(None, a - 2 * K4, K4, 4),
        map(None, a + 2 * M2, K4, 1),
        unmap(a + 2 * M2, M2, 1),
        map(None, a + 4 * M2, K4, 1),
        unmap(a + 4 * M2, K4, 1),
        map(None, a + 4 * M2, M2, 1),
        unmap(a - 2 * K4, K4, 2),
        unmap(a, K4, 2),
        unmap(a + 4 * M2, M2, 1),
        map(None, a + 8 * M2, K4, 1),
        Step::Flush,
    ]
}

/// The workloads by name.
#[must_use]
pub fn all() -> Vec<(&'static str, Vec<Step>)> {
    vec![
        ("reserve", reserve_workload()),
        ("map_range multi-table", map_range_workload()),
        ("map_reserved", map_reserved_workload()),
        ("release", release_workload()),
        ("eager-free unmap", eager_free_workload()),
    ]
}

/// What exhaustive injection over one workload and lane did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Page allocations of the clean run: the injection points, each failed once.
    pub points: u64,
    /// Operations that met their injected failure and were retried.
    pub hits: u64,
}

/// Runs `steps` on `spec` cleanly, then once per allocation index with that allocation
/// failing.
///
/// # Errors
///
/// The first broken contract, with a dump.
pub fn exhaustive(steps: &[Step], spec: &LaneSpec) -> Result<Tally, Failure> {
    let setup = setups()[0];
    let mut clean = Lane::new(spec, setup, None)?;
    for (n, s) in steps.iter().enumerate() {
        clean.step(n, s)?;
    }
    let points = clean.alloc.mem.allocations_attempted();
    let shape = clean.shape();
    clean.finish(steps.len())?;
    let mut hits = 0;
    for k in 0..points {
        let mut lane = Lane::new(spec, setup, Some((k, false)))?;
        let mut retried = 0;
        for (n, s) in steps.iter().enumerate() {
            if lane.step_retrying(n, s)? {
                retried += 1;
            }
        }
        let absorbed = lane.injected_hits;
        if absorbed != 1 || lane.shape() != shape {
            return Err(Failure::new(
                format!(
                    "[{}] failing allocation #{k} of {points}: {absorbed} injected failure(s) \
                     met (expected 1), final shape {} the clean run's",
                    spec.name,
                    if lane.shape() == shape {
                        "equals"
                    } else {
                        "differs from"
                    }
                ),
                lane.dump(),
            ));
        }
        // The construction's retry is not a step.
        hits += retried.max(absorbed);
        lane.finish(steps.len())?;
    }
    Ok(Tally { points, hits })
}
