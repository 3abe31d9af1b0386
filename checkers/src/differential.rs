//! The differential checker: one operation sequence over a small IOVA window, run on
//! Design 1, Design 2 and the model, with every result, error, translation (software lookup
//! and hardware-walk oracle) and structural invariant compared after every operation.
//!
//! Beside map / map_range / unmap / lookup and the reservation calls, the sequence holds the
//! rest of Linux's `io_pgtable_ops` and iommufd's requests: `map_sg` (must succeed exactly
//! when the model, mapping segment by segment, does), `unmap_collect` (the runs returned are
//! the model's leaves in the range, merged), device writes through the hardware walk (an
//! SMMU with HTTU: through where the model says writable, a permission or translation fault
//! elsewhere) and `read_and_clear_dirty` (reports exactly the leaves whose raw descriptors are
//! dirty, decoded independently, and a second harvest finds nothing). Two configurations are
//! non-coherent: after every step each reachable table must read the same in the device's
//! view of memory as in the CPU's.
//!
//! Each design is compared with `iopt_model::Model` under that design's reservation
//! semantics (Design 1: worst-case pools, optionally under an in-flight cap; Design 2:
//! refcounted installation), since the designs deliberately differ there (Design 2's release
//! unmaps, Design 1's does not). Everything else — map, map_range, unmap, lookup, validation
//! order, tree shape — the model answers the same way for both.

use crate::failure::Outcome;
use crate::input::{DiffInput, MAX_OPS, Resolver, setup};
use crate::lane::{Design, Lane, LaneSpec};
use arbitrary::{Arbitrary, Unstructured};
use iopt_alloc_ops::FreePolicy;
use iopt_model::CapRule;

/// Design 1's cap for a selector: none most of the time, else a small strict or msm cap.
#[must_use]
pub fn cap(sel: u8) -> Option<CapRule> {
    let n = usize::from(sel / 8) % 24;
    match sel % 8 {
        4 | 5 => Some(CapRule::Strict(n)),
        6 | 7 => Some(CapRule::MsmThrottle(n)),
        _ => None,
    }
}

/// The lanes of the differential: Design 1 (with the input's cap) and Design 2, each against
/// the model, Design 2 again through its exclusive entry points, and Design 1 with eager
/// freeing against the invariants alone.
#[must_use]
pub fn standard_lanes(input: &DiffInput) -> Vec<LaneSpec> {
    vec![
        LaneSpec::real(
            "Design 1",
            Design::AllocOps {
                free: FreePolicy::Linux,
                cap: cap(input.cap),
            },
        ),
        LaneSpec::real("Design 2", Design::Prealloc),
        // The exclusive (`&mut`) entry points skip Design 2's concurrency protocol on their
        // fast paths; against the same model, they must give exactly the same answers.
        LaneSpec::real("Design 2, exclusive", Design::Prealloc).exclusive(),
        // Not modelled: its results are not compared, but every invariant, the device's
        // flush contract, the oracle against its own walk and "an error changes nothing" are.
        LaneSpec::real("Design 1, eager free", Design::D1_EAGER),
    ]
}

/// Runs `input` on the real designs.
///
/// # Errors
///
/// The first disagreement or broken invariant, with a dump.
pub fn check(input: &DiffInput) -> Outcome {
    check_with(input, &standard_lanes(input))
}

/// Runs `input` on the given lanes (the real designs, or broken variants in tests).
///
/// # Errors
///
/// The first disagreement or broken invariant, with a dump.
pub fn check_with(input: &DiffInput, lanes: &[LaneSpec]) -> Outcome {
    run(input, lanes, None).map(|_| ())
}

/// Runs `input` on `specs`, with an injected allocation failure for every lane if given;
/// returns the injected failures absorbed.
pub(crate) fn run(
    input: &DiffInput,
    specs: &[LaneSpec],
    inject: Option<(u64, bool)>,
) -> Result<u64, crate::failure::Failure> {
    let setup = setup(input.config);
    let mut lanes = specs
        .iter()
        .map(|s| Lane::new(s, setup, inject))
        .collect::<Result<Vec<_>, _>>()?;
    let mut resolver = Resolver::new(setup);
    let mut n = 0;
    for op in input.ops.iter().take(MAX_OPS) {
        let Some(step) = resolver.resolve(op) else {
            continue;
        };
        for lane in &mut lanes {
            lane.step(n, &step)?;
        }
        n += 1;
    }
    let mut hits = 0;
    for lane in lanes {
        hits += lane.injected_hits;
        lane.finish(n)?;
    }
    Ok(hits)
}

/// The fuzz target's entry: decodes a [`DiffInput`] from `data` and checks it.
///
/// # Errors
///
/// As [`check`].
pub fn check_bytes(data: &[u8]) -> Outcome {
    let Ok(input) = DiffInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return Ok(());
    };
    check(&input)
}

/// Draws an input from `u` and checks it (for property tests).
///
/// # Errors
///
/// `arbitrary`'s error when `u` runs out.
pub fn check_unstructured(u: &mut Unstructured<'_>) -> arbitrary::Result<Outcome> {
    let input = DiffInput::arbitrary(u)?;
    Ok(check(&input))
}
