//! What dirty tracking reports into: the flags of a harvest, the sink trait and iommufd's
//! bitmap. The harvest itself is [`IoPageTable::read_and_clear_dirty`](crate::IoPageTable::read_and_clear_dirty).

use crate::Iova;
use alloc::vec;
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

/// A dirty bitmap over `[base, base + pages << page_shift)`, one bit a page, as iommufd's
/// `iova_bitmap`. Records outside the window are ignored.
///
/// ```
/// use iopt_api::Iova;
/// use iopt_api::{DirtyBitmap, DirtySink};
/// let mut b = DirtyBitmap::new(Iova::new(0x10_0000), 12, 64);
/// b.record(Iova::new(0x10_2000), 0x2000);
/// assert_eq!(b.dirty_pages().collect::<Vec<_>>(), vec![Iova::new(0x10_2000), Iova::new(0x10_3000)]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    base: u64,
    page_shift: u32,
    pages: u64,
    bits: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty bitmap of `pages` pages of `1 << page_shift` bytes from `base`.
    #[must_use]
    pub fn new(base: Iova, page_shift: u32, pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        Self {
            base: base.get(),
            page_shift,
            pages,
            bits: vec![0; words],
        }
    }

    /// Returns whether the page holding `iova` is marked.
    #[must_use]
    pub fn is_dirty(&self, iova: Iova) -> bool {
        let Some(p) = iova
            .get()
            .checked_sub(self.base)
            .map(|o| o >> self.page_shift)
        else {
            return false;
        };
        p < self.pages && self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Iterates the marked pages' addresses in ascending order.
    pub fn dirty_pages(&self) -> impl Iterator<Item = Iova> + '_ {
        (0..self.pages)
            .filter(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .map(|p| Iova::new(self.base + (p << self.page_shift)))
    }
}

impl DirtySink for DirtyBitmap {
    fn record(&mut self, iova: Iova, len: u64) {
        let start = iova.get().max(self.base);
        let end = iova
            .get()
            .saturating_add(len)
            .min(self.base + (self.pages << self.page_shift));
        let mut a = start;
        while a < end {
            let p = (a - self.base) >> self.page_shift;
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
            a = (self.base + ((p + 1) << self.page_shift)).max(a + 1);
        }
    }
}
