//! Mapping permissions and attributes, with Linux's `IOMMU_*` bit values.

bitflags::bitflags! {
    /// Permissions and memory attributes of a mapping, bit-compatible with Linux's `IOMMU_READ`
    /// (bit 0) .. `IOMMU_PRIV` (bit 5), so values recorded from Linux (the golden matrix, traces)
    /// convert with [`Prot::from_bits_retain`].
    ///
    /// A map needs at least one of [`Prot::READ`] and [`Prot::WRITE`].
    ///
    /// ```
    /// use iopt_api::Prot;
    /// let p = Prot::READ | Prot::WRITE | Prot::CACHE;
    /// assert_eq!(p.bits(), 7);
    /// assert!(p.is_accessible());
    /// assert!(!Prot::CACHE.is_accessible());
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
    pub struct Prot: u32 {
        /// The device may read (`IOMMU_READ`).
        const READ = 1 << 0;
        /// The device may write (`IOMMU_WRITE`).
        const WRITE = 1 << 1;
        /// Cacheable, inner-shareable normal memory (`IOMMU_CACHE`).
        const CACHE = 1 << 2;
        /// The device may not execute from it (`IOMMU_NOEXEC`).
        const NOEXEC = 1 << 3;
        /// Device memory, nGnRE (`IOMMU_MMIO`); wins over `CACHE` for the memory type.
        const MMIO = 1 << 4;
        /// Privileged access only (`IOMMU_PRIV`); stage 1 leaves out AP\[1\].
        const PRIV = 1 << 5;
    }
}

impl Prot {
    /// Returns whether the mapping grants any access (READ or WRITE), which map requires.
    #[must_use]
    pub const fn is_accessible(self) -> bool {
        self.intersects(Prot::READ.union(Prot::WRITE))
    }
}
