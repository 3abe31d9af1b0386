//! The designs the harness compares, ready to run: each is a backend constructor, the policy
//! its users drive it with, and what the model expects of its reservations.

use crate::harness::Design;
use crate::policy::Policy;
use iopt_alloc_ops::{AllocOpsTable, InFlightCap, MSM_CAP_PAGES};
use iopt_model::{CapRule, ReservePolicy};
use iopt_sim::SimMemory;
use std::sync::Arc;

/// Design 1's table type as the harness builds it.
pub type Design1Table = AllocOpsTable<Arc<SimMemory>>;

/// Design 1 (`iopt-alloc-ops`): panthor's worst-case pools, no cap.
#[must_use]
pub fn design1() -> Design<Design1Table> {
    Design {
        name: "Design 1".to_string(),
        policy: Policy::PerBind,
        model: ReservePolicy::Pools { cap: None },
        build: Box::new(AllocOpsTable::new),
    }
}

/// Design 1 under msm's in-flight cap (1024 pages; the submitter waits for older binds).
#[must_use]
pub fn design1_msm_cap() -> Design<Design1Table> {
    Design {
        name: "Design 1 + msm cap".to_string(),
        policy: Policy::PerBind,
        model: ReservePolicy::Pools {
            cap: Some(CapRule::MsmThrottle(MSM_CAP_PAGES)),
        },
        build: Box::new(|cfg, mem| {
            Ok(AllocOpsTable::new(cfg, mem)?.with_cap(InFlightCap::MsmThrottle(MSM_CAP_PAGES)))
        }),
    }
}

/// Design 2's table type as the harness builds it.
pub type Design2Table = iopt_prealloc::PreallocTable<Arc<SimMemory>>;

/// Design 2 (`iopt-prealloc`): refcounted VA reservations, released when the unmap completes.
#[must_use]
pub fn design2() -> Design<Design2Table> {
    Design {
        name: "Design 2".to_string(),
        policy: Policy::PerMapping,
        model: ReservePolicy::Refcounts,
        build: Box::new(iopt_prealloc::PreallocTable::new),
    }
}

/// Design 2 with the seed message's accounting: reservations counted per table, tables freed
/// only at release ("unallocate VA"); unmaps never free.
pub type Design2SeedTable = iopt_prealloc::PreallocTable<
    Arc<SimMemory>,
    iopt_api::NoFlush,
    iopt_lpae::account::ReservationCounts,
>;

/// Design 2 as the seed message has it: the same reservations as [`design2`], counting
/// reservations only, so tables an unmap empties stay until the release of their range.
#[must_use]
pub fn design2_seed() -> Design<Design2SeedTable> {
    Design {
        name: "Design 2 (reservation counts)".to_string(),
        policy: Policy::PerMapping,
        model: ReservePolicy::ReservationCounts,
        build: Box::new(|cfg, mem| {
            iopt_prealloc::PreallocTable::with_accounting(cfg, mem, iopt_api::NoFlush)
        }),
    }
}
