//! How big the workloads are: small for the CI smoke run, the sizes otherwise.

/// The sizing profile of a bench run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `cargo bench -- --test` (CI): every benchmark runs once, on small workloads.
    Smoke,
    /// The default: the workload sizes; the scaling group stops at 1 GiB.
    Quick,
    /// `IOPT_BENCH_FULL=1`: as quick, and the scaling group goes up to 64 GiB.
    Full,
}

impl Profile {
    /// Detects the profile from the command line (`--test` means smoke) and the environment
    /// (`IOPT_BENCH_FULL=1` means full).
    #[must_use]
    pub fn detect() -> Self {
        if std::env::args().any(|a| a == "--test") {
            Self::Smoke
        } else if std::env::var("IOPT_BENCH_FULL").is_ok_and(|v| v == "1") {
            Self::Full
        } else {
            Self::Quick
        }
    }

    /// Whether this is the smoke run.
    #[must_use]
    pub fn is_smoke(self) -> bool {
        self == Self::Smoke
    }

    /// 4K pages of the single-call and bulk groups: 262144 (1 GiB), or 2048 (8 MiB) in the
    /// smoke run.
    #[must_use]
    pub fn pages(self) -> u64 {
        if self.is_smoke() { 2048 } else { 262_144 }
    }

    /// 2M blocks of the block group: 512.
    #[must_use]
    pub fn blocks(self) -> u64 {
        if self.is_smoke() { 16 } else { 512 }
    }

    /// Operations of the random map/unmap mix: 100 000.
    #[must_use]
    pub fn random_ops(self) -> usize {
        if self.is_smoke() { 1000 } else { 100_000 }
    }

    /// 4K pages of the reservation groups (64 MiB).
    #[must_use]
    pub fn reserve_pages(self) -> u64 {
        if self.is_smoke() { 1024 } else { 16_384 }
    }

    /// Binds of the VM_BIND loop.
    #[must_use]
    pub fn binds(self) -> usize {
        if self.is_smoke() { 64 } else { 2000 }
    }

    /// 4K pages each thread maps in the concurrency group.
    #[must_use]
    pub fn thread_pages(self) -> u64 {
        if self.is_smoke() { 1024 } else { 65_536 }
    }

    /// Mapped sizes of the scaling group, in bytes.
    #[must_use]
    pub fn scaling_sizes(self) -> Vec<u64> {
        const M: u64 = 1 << 20;
        const G: u64 = 1 << 30;
        match self {
            Self::Smoke => vec![M, 16 * M],
            Self::Quick => vec![M, 16 * M, 256 * M, G],
            Self::Full => vec![M, 16 * M, 256 * M, G, 4 * G, 16 * G, 64 * G],
        }
    }
}
