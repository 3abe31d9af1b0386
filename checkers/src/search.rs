//! A small seeded driver that feeds random bytes to a checker until it fails or a budget runs
//! out: what the tests use to show that a broken backend is caught, and how fast.

use crate::failure::{Failure, Outcome};
use arbitrary::Unstructured;
use std::time::{Duration, Instant};

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value below `n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// What a hunt found.
#[derive(Debug, Clone)]
pub struct Hunt {
    /// Inputs tried.
    pub inputs: u64,
    /// Time spent.
    pub elapsed: Duration,
    /// The first failure and the bytes that produced it.
    pub found: Option<(Failure, Vec<u8>)>,
}

/// Feeds `check` random inputs (64 to 4096 bytes, from `seed`) until it fails or `budget`
/// passes.
pub fn hunt(
    seed: u64,
    budget: Duration,
    mut check: impl FnMut(&mut Unstructured<'_>) -> arbitrary::Result<Outcome>,
) -> Hunt {
    let start = Instant::now();
    let mut rng = Rng(seed);
    let mut inputs = 0;
    while start.elapsed() < budget {
        let len = 64 + rng.below(4032) as usize;
        let data = rng.bytes(len);
        inputs += 1;
        if let Ok(Err(f)) = check(&mut Unstructured::new(&data)) {
            return Hunt {
                inputs,
                elapsed: start.elapsed(),
                found: Some((f, data)),
            };
        }
    }
    Hunt {
        inputs,
        elapsed: start.elapsed(),
        found: None,
    }
}
