//! What dirty tracking reports into: the flags of a harvest, the sink trait and iommufd's
//! bitmap. The harvest itself is [`IoPageTable::read_and_clear_dirty`](crate::IoPageTable::read_and_clear_dirty).

use crate::Iova;
use alloc::vec::Vec;

bitflags::bitflags! {
    /// Options of [`IoPageTable::read_and_clear_dirty`](crate::IoPageTable::read_and_clear_dirty)
    /// (Linux's `IOMMU_DIRTY_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DirtyFlags: u32 {
        /// Report without cleaning (`IOMMU_DIRTY_NO_CLEAR`).
        const NO_CLEAR = 1 << 0;
    }
}

/// Where dirty ranges are recorded.
pub trait DirtySink {
    /// Records that `[iova, iova + len)` was written.
    fn record(&mut self, iova: Iova, len: u64);
}

impl DirtySink for Vec<(Iova, u64)> {
    fn record(&mut self, iova: Iova, len: u64) {
        self.push((iova, len));
    }
}

/// Why a [`DirtyBitmap`] could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// Pages of `1 << page_shift` bytes do not fit a 64-bit address space (`page_shift` is 64
    /// or more).
    #[error("page shift {page_shift} is not below 64")]
    PageShift {
        /// The requested shift.
        page_shift: u32,
    },
    /// The window `[base, base + pages << page_shift)` runs past the top of the 64-bit space.
    #[error(
        "{pages} page(s) of 2^{page_shift} bytes from {base} run past the top of the address space"
    )]
    Window {
        /// The requested base.
        base: Iova,
        /// The requested shift.
        page_shift: u32,
        /// The requested page count.
        pages: u64,
    },
    /// The bits could not be allocated.
    #[error("cannot allocate a bitmap of {pages} page(s)")]
    Alloc {
        /// The requested page count.
        pages: u64,
    },
}

/// A dirty bitmap over `[base, base + pages << page_shift)`, one bit a page, as iommufd's
/// `iova_bitmap`. Records outside the window are ignored. The window may end at the very top
/// of the address space (a TTBR1 table's upper half).
///
/// ```
/// use iopt_api::Iova;
/// use iopt_api::{DirtyBitmap, DirtySink};
/// let mut b = DirtyBitmap::new(Iova::new(0x10_0000), 12, 64)?;
/// b.record(Iova::new(0x10_2000), 0x2000);
/// assert_eq!(b.dirty_pages().collect::<Vec<_>>(), vec![Iova::new(0x10_2000), Iova::new(0x10_3000)]);
/// # Ok::<(), iopt_api::BitmapError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    base: u64,
    /// Below 64.
    page_shift: u32,
    /// `base + (pages << page_shift)` is at most 2^64.
    pages: u64,
    bits: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty bitmap of `pages` pages of `1 << page_shift` bytes from `base`.
    ///
    /// # Errors
    ///
    /// [`BitmapError::PageShift`] when `page_shift` is 64 or more, [`BitmapError::Window`]
    /// when the window runs past 2^64, [`BitmapError::Alloc`] when the bits cannot be
    /// allocated.
    pub fn new(base: Iova, page_shift: u32, pages: u64) -> Result<Self, BitmapError> {
        if page_shift >= 64 {
            return Err(BitmapError::PageShift { page_shift });
        }
        let end = u128::from(base.get()) + (u128::from(pages) << page_shift);
        if end > 1 << 64 {
            return Err(BitmapError::Window {
                base,
                page_shift,
                pages,
            });
        }
        let words =
            usize::try_from(pages.div_ceil(64)).map_err(|_| BitmapError::Alloc { pages })?;
        let mut bits = Vec::new();
        bits.try_reserve_exact(words)
            .map_err(|_| BitmapError::Alloc { pages })?;
        bits.resize(words, 0);
        Ok(Self {
            base: base.get(),
            page_shift,
            pages,
            bits,
        })
    }

    /// The page of the window holding `iova`, if any.
    fn page_of(&self, iova: u64) -> Option<u64> {
        let p = iova.checked_sub(self.base)? >> self.page_shift;
        (p < self.pages).then_some(p)
    }

    fn get(&self, p: u64) -> bool {
        self.bits
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    /// Returns whether the page holding `iova` is marked.
    #[must_use]
    pub fn is_dirty(&self, iova: Iova) -> bool {
        self.page_of(iova.get()).is_some_and(|p| self.get(p))
    }

    /// Iterates the marked pages' addresses in ascending order.
    pub fn dirty_pages(&self) -> impl Iterator<Item = Iova> + '_ {
        // Every page of the window starts below 2^64 (checked at construction).
        (0..self.pages)
            .filter(|&p| self.get(p))
            .map(|p| Iova::new(self.base + (p << self.page_shift)))
    }
}

impl DirtySink for DirtyBitmap {
    /// Marks every page of the window that `[iova, iova + len)` touches; a range running past
    /// 2^64 ends there.
    fn record(&mut self, iova: Iova, len: u64) {
        if len == 0 {
            return;
        }
        // The last byte, saturated at the top of the address space, then clipped to the
        // window.
        let last = iova.get().saturating_add(len - 1);
        let Some(first) = self.page_of(iova.get().max(self.base)) else {
            return;
        };
        if last < self.base {
            return;
        }
        let end = ((last - self.base) >> self.page_shift).min(self.pages - 1);
        for p in first..=end {
            if let Some(w) = self.bits.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
    }
}
