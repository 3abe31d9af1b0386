//! The fault checker: the differential sequence with the `k`-th page allocation failing
//! (once, or from then on), in every lane. Every operation the failure hits must return the
//! allocator's typed out-of-memory error and change nothing (walk, allocator live set,
//! counters); the model then skips the operation, and the sequence goes on; at the end every
//! page must come back.

use crate::differential::{run, standard_lanes};
use crate::failure::Outcome;
use crate::input::DiffInput;
use crate::lane::LaneSpec;
use arbitrary::{Arbitrary, Unstructured};

/// A fault input: where the failure is injected, and the sequence.
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
pub struct FaultInput {
    /// The page allocation (counted from the table's construction, the root being 0) that
    /// fails, modulo 128.
    pub at: u16,
    /// Whether every allocation from then on fails too (memory exhausted).
    pub sticky: bool,
    /// The sequence.
    pub diff: DiffInput,
}

/// Runs `input` on the real designs.
///
/// # Errors
///
/// The first broken contract, with a dump.
pub fn check(input: &FaultInput) -> Outcome {
    check_with(input, &standard_lanes(&input.diff))
}

/// Runs `input` on the given lanes; returns how many injected failures were absorbed.
///
/// # Errors
///
/// The first broken contract, with a dump.
pub fn check_counted(
    input: &FaultInput,
    lanes: &[LaneSpec],
) -> Result<u64, crate::failure::Failure> {
    run(
        &input.diff,
        lanes,
        Some((u64::from(input.at % 128), input.sticky)),
    )
}

/// Runs `input` on the given lanes.
///
/// # Errors
///
/// The first broken contract, with a dump.
pub fn check_with(input: &FaultInput, lanes: &[LaneSpec]) -> Outcome {
    check_counted(input, lanes).map(|_| ())
}

/// The fuzz target's entry.
///
/// # Errors
///
/// As [`check`].
pub fn check_bytes(data: &[u8]) -> Outcome {
    let Ok(input) = FaultInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return Ok(());
    };
    check(&input)
}

/// Draws an input from `u` and checks it.
///
/// # Errors
///
/// `arbitrary`'s error when `u` runs out.
pub fn check_unstructured(u: &mut Unstructured<'_>) -> arbitrary::Result<Outcome> {
    let input = FaultInput::arbitrary(u)?;
    Ok(check(&input))
}
