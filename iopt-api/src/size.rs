//! Page and block sizes, and sets of them.

use core::fmt;

/// A page or block size: a power of two from 4 KiB up to 4 TiB as LPAE allows.
///
/// Which sizes a particular table accepts is its [`PageSizes`] bitmap; this type only
/// guarantees the value is a power of two, so index arithmetic on it never divides by zero.
///
/// ```
/// use iopt_api::PageSize;
/// assert_eq!(PageSize::SZ_2M.get(), 2 << 20);
/// assert_eq!(PageSize::SZ_2M.shift(), 21);
/// assert_eq!(PageSize::new(3 << 12), None);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PageSize(u64);

impl PageSize {
    /// 4 KiB.
    pub const SZ_4K: Self = Self(1 << 12);
    /// 16 KiB.
    pub const SZ_16K: Self = Self(1 << 14);
    /// 64 KiB.
    pub const SZ_64K: Self = Self(1 << 16);
    /// 2 MiB.
    pub const SZ_2M: Self = Self(1 << 21);
    /// 32 MiB.
    pub const SZ_32M: Self = Self(1 << 25);
    /// 512 MiB.
    pub const SZ_512M: Self = Self(1 << 29);
    /// 1 GiB.
    pub const SZ_1G: Self = Self(1 << 30);
    /// 4 TiB (64 KiB granule, 52-bit output only).
    pub const SZ_4T: Self = Self(1 << 42);

    /// Returns the size if `bytes` is a power of two, `None` otherwise (zero included).
    #[must_use]
    pub const fn new(bytes: u64) -> Option<Self> {
        if bytes.is_power_of_two() {
            Some(Self(bytes))
        } else {
            None
        }
    }

    /// Returns the size with the given log2.
    #[must_use]
    pub const fn from_shift(shift: u32) -> Option<Self> {
        if shift < 64 {
            Some(Self(1 << shift))
        } else {
            None
        }
    }

    /// Returns the size in bytes.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Returns log2 of the size.
    #[must_use]
    pub const fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// Returns `size - 1`, the mask of offsets within one page of this size.
    #[must_use]
    pub const fn mask(self) -> u64 {
        self.0 - 1
    }
}

impl fmt::Debug for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.shift();
        match s {
            40.. => write!(f, "{}T", 1u64 << (s - 40)),
            30.. => write!(f, "{}G", 1u64 << (s - 30)),
            20.. => write!(f, "{}M", 1u64 << (s - 20)),
            10.. => write!(f, "{}K", 1u64 << (s - 10)),
            _ => write!(f, "{}B", self.0),
        }
    }
}

/// A set of page sizes, as Linux's `pgsize_bitmap`: bit n set means `1 << n` bytes.
///
/// ```
/// use iopt_api::{PageSize, PageSizes};
/// let s = PageSizes::from_bits(0x4020_1000);
/// assert!(s.contains(PageSize::SZ_2M));
/// assert_eq!(s.smallest(), Some(PageSize::SZ_4K));
/// assert_eq!(s.iter().count(), 3);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct PageSizes(u64);

impl PageSizes {
    /// 4K | 2M | 1G: the sizes a 4 KiB granule offers.
    pub const GRANULE_4K: Self = Self((1 << 12) | (1 << 21) | (1 << 30));
    /// 16K | 32M: the sizes a 16 KiB granule offers.
    pub const GRANULE_16K: Self = Self((1 << 14) | (1 << 25));
    /// 64K | 512M: the sizes a 64 KiB granule offers (4T is added with a 52-bit output).
    pub const GRANULE_64K: Self = Self((1 << 16) | (1 << 29));

    /// Wraps a raw bitmap.
    #[must_use]
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// Returns the raw bitmap.
    #[must_use]
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Returns whether `size` is in the set.
    #[must_use]
    pub const fn contains(self, size: PageSize) -> bool {
        self.0 & size.get() != 0
    }

    /// Returns whether the set is empty.
    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Returns the smallest size.
    #[must_use]
    pub const fn smallest(self) -> Option<PageSize> {
        if self.0 == 0 {
            None
        } else {
            Some(PageSize(1 << self.0.trailing_zeros()))
        }
    }

    /// Returns the largest size.
    #[must_use]
    pub const fn largest(self) -> Option<PageSize> {
        if self.0 == 0 {
            None
        } else {
            Some(PageSize(1 << self.0.ilog2()))
        }
    }

    /// Iterates the sizes in ascending order.
    pub fn iter(self) -> impl DoubleEndedIterator<Item = PageSize> + Clone {
        (0..64u32)
            .filter(move |b| self.0 & (1 << b) != 0)
            .map(|b| PageSize(1 << b))
    }

    /// Picks the size the Linux iommu core (`iommu_pgsize`) would use for the next piece of a
    /// map of `len` bytes from `iova` to `pa`: the largest size in the set that both addresses
    /// are aligned to and that fits in `len`, and how many consecutive pages of it to map before
    /// a larger size becomes usable. Returns `None` when no size fits.
    ///
    /// ```
    /// use iopt_api::{PageSize, PageSizes};
    /// let s = PageSizes::GRANULE_4K;
    /// // 4 KiB pages up to the next 2 MiB boundary, then blocks.
    /// assert_eq!(s.best_fit(0x1f_f000, 0x1f_f000, 0x40_1000), Some((PageSize::SZ_4K, 1)));
    /// assert_eq!(s.best_fit(0x20_0000, 0x20_0000, 0x40_0000), Some((PageSize::SZ_2M, 2)));
    /// assert_eq!(s.best_fit(0x800, 0, 0x1000), None);
    /// ```
    #[must_use]
    pub fn best_fit(self, iova: u64, pa: u64, len: u64) -> Option<(PageSize, u64)> {
        if len == 0 {
            return None;
        }
        let addr_merge = iova | pa;
        let fits = u64::MAX >> len.leading_zeros();
        let mut cand = self.0 & fits;
        if addr_merge != 0 {
            let low = addr_merge.trailing_zeros();
            cand &= u64::MAX >> (63 - low);
        }
        if cand == 0 {
            return None;
        }
        let shift = cand.ilog2();
        let mut size = len;
        let larger = if shift == 63 {
            0
        } else {
            self.0 & !(u64::MAX >> (63 - shift))
        };
        if larger != 0 {
            let next = 1u64 << larger.trailing_zeros();
            if (iova ^ pa) & (next - 1) == 0 {
                let offset = next - (addr_merge & (next - 1));
                if offset.checked_add(next).is_some_and(|e| e <= len) {
                    size = offset;
                }
            }
        }
        Some((PageSize(1 << shift), size >> shift))
    }
}

impl fmt::Debug for PageSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PageSizes(")?;
        let mut first = true;
        for s in self.iter() {
            if !first {
                f.write_str("|")?;
            }
            first = false;
            write!(f, "{s}")?;
        }
        f.write_str(")")
    }
}
