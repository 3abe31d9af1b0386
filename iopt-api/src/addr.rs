//! Address newtypes and the validated IOVA range.
//!
//! An [`Iova`] is an address the device issues; a [`PhysAddr`] is an output address in the
//! system's physical (or intermediate physical) address space. Keeping them apart in the type
//! system makes the classic "swapped arguments to map" bug a compile error. Arithmetic is
//! checked: every operation that could wrap returns an `Option`.

use core::fmt;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The zero address.
            pub const ZERO: Self = Self(0);

            #[doc = concat!("Creates ", $what, " from its raw value.")]
            #[must_use]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// Returns the raw value.
            #[must_use]
            pub const fn get(self) -> u64 {
                self.0
            }

            /// Adds `bytes`, or returns `None` on overflow.
            #[must_use]
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// Subtracts `bytes`, or returns `None` on underflow.
            #[must_use]
            pub const fn checked_sub(self, bytes: u64) -> Option<Self> {
                match self.0.checked_sub(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// Returns the distance `self - earlier` in bytes, or `None` if `earlier` is above.
            #[must_use]
            pub const fn offset_from(self, earlier: Self) -> Option<u64> {
                self.0.checked_sub(earlier.0)
            }

            /// Returns whether the address is a multiple of `align` (a power of two; zero or a
            /// non-power-of-two is never satisfied).
            #[must_use]
            pub const fn is_aligned(self, align: u64) -> bool {
                align.is_power_of_two() && self.0 & (align - 1) == 0
            }

            /// Rounds down to a multiple of `align` (a power of two), or `None` if it is not one.
            #[must_use]
            pub const fn align_down(self, align: u64) -> Option<Self> {
                if align.is_power_of_two() {
                    Some(Self(self.0 & !(align - 1)))
                } else {
                    None
                }
            }

            /// Rounds up to a multiple of `align` (a power of two), or `None` on overflow or if
            /// `align` is not a power of two.
            #[must_use]
            pub const fn align_up(self, align: u64) -> Option<Self> {
                if !align.is_power_of_two() {
                    return None;
                }
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }

            /// Returns the offset of the address within an `align`-sized block (`align` a power
            /// of two; otherwise 0).
            #[must_use]
            pub const fn offset_in(self, align: u64) -> u64 {
                if align.is_power_of_two() { self.0 & (align - 1) } else { 0 }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl From<$name> for u64 {
            fn from(a: $name) -> u64 {
                a.0
            }
        }
    };
}

address_type!(
    /// An I/O virtual address: what a device behind the SMMU or GPU MMU issues.
    ///
    /// ```
    /// use iopt_api::Iova;
    /// let a = Iova::new(0x1234_5000);
    /// assert!(a.is_aligned(0x1000));
    /// assert_eq!(a.align_down(0x20_0000), Some(Iova::new(0x1220_0000)));
    /// assert_eq!(Iova::new(u64::MAX).checked_add(1), None);
    /// assert_eq!(format!("{a:?}"), "Iova(0x12345000)");
    /// ```
    Iova,
    "an IOVA"
);

address_type!(
    /// A physical (output) address: what a leaf descriptor points at, or where a table lives.
    ///
    /// ```
    /// use iopt_api::PhysAddr;
    /// let pa = PhysAddr::new(0x8_0000_0000);
    /// assert_eq!(pa.checked_add(0x42), Some(PhysAddr::new(0x8_0000_0042)));
    /// assert_eq!(format!("{pa}"), "0x800000000");
    /// ```
    PhysAddr,
    "a physical address"
);

/// Why an [`IovaRange`] could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RangeError {
    /// The length was zero.
    #[error("empty range at {start}")]
    Empty {
        /// Start of the rejected range.
        start: Iova,
    },
    /// `start + len` does not fit in 64 bits.
    #[error("range at {start} of {len:#x} bytes overflows")]
    Overflow {
        /// Start of the rejected range.
        start: Iova,
        /// Requested length.
        len: u64,
    },
    /// Start or length is not a multiple of the required alignment.
    #[error("range at {start} of {len:#x} bytes is not aligned to {align:#x}")]
    Misaligned {
        /// Start of the rejected range.
        start: Iova,
        /// Requested length.
        len: u64,
        /// Required alignment.
        align: u64,
    },
}

/// A non-empty, non-wrapping range of IOVAs `[start, start + len)`.
///
/// The constructor validates and never rounds: a caller that passes a misaligned range gets an
/// error, not a silently larger range. The end is exclusive but may be `2^64` (the last byte is
/// `u64::MAX`), which the TTBR1 upper half needs.
///
/// ```
/// use iopt_api::{Iova, IovaRange, RangeError};
/// let r = IovaRange::new(Iova::new(0x20_0000), 0x1000, 0x1000)?;
/// assert_eq!(r.last(), Iova::new(0x20_0fff));
/// assert!(matches!(IovaRange::new(Iova::new(0x1000), 0, 0x1000), Err(RangeError::Empty { .. })));
/// assert!(matches!(
///     IovaRange::new(Iova::new(0x1800), 0x1000, 0x1000),
///     Err(RangeError::Misaligned { .. })
/// ));
/// # Ok::<(), RangeError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IovaRange {
    start: Iova,
    len: u64,
}

impl IovaRange {
    /// Builds `[start, start + len)`, requiring `start` and `len` to be multiples of `align`.
    ///
    /// # Errors
    ///
    /// - [`RangeError::Empty`] if `len == 0`;
    /// - [`RangeError::Misaligned`] if `align` is not a power of two or `start`/`len` are not
    ///   multiples of it;
    /// - [`RangeError::Overflow`] if the last byte `start + len - 1` does not fit in 64 bits.
    pub const fn new(start: Iova, len: u64, align: u64) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        if !align.is_power_of_two() || start.get() & (align - 1) != 0 || len & (align - 1) != 0 {
            return Err(RangeError::Misaligned { start, len, align });
        }
        if start.get().checked_add(len - 1).is_none() {
            return Err(RangeError::Overflow { start, len });
        }
        Ok(Self { start, len })
    }

    /// Returns the first address.
    #[must_use]
    pub const fn start(&self) -> Iova {
        self.start
    }

    /// Returns the length in bytes (never zero).
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: a range is never empty. Present for API symmetry with collections.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Returns the last address inside the range.
    #[must_use]
    pub const fn last(&self) -> Iova {
        Iova::new(self.start.get() + (self.len - 1))
    }

    /// Returns the exclusive end, or `None` when the range ends at `2^64`.
    #[must_use]
    pub const fn end(&self) -> Option<Iova> {
        self.start.checked_add(self.len)
    }

    /// Returns whether `iova` lies inside the range.
    #[must_use]
    pub const fn contains(&self, iova: Iova) -> bool {
        iova.get() >= self.start.get() && iova.get() <= self.last().get()
    }

    /// Returns whether the two ranges share at least one address.
    #[must_use]
    pub const fn overlaps(&self, other: &Self) -> bool {
        self.start.get() <= other.last().get() && other.start.get() <= self.last().get()
    }

    /// Returns whether `other` lies entirely inside `self`.
    #[must_use]
    pub const fn covers(&self, other: &Self) -> bool {
        self.start.get() <= other.start.get() && other.last().get() <= self.last().get()
    }
}

impl fmt::Debug for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IovaRange({:#x}..={:#x})",
            self.start.get(),
            self.last().get()
        )
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.start.get(), self.last().get())
    }
}
