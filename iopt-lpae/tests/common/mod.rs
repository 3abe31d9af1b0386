//! Helpers shared by the integration tests.
#![allow(dead_code)]

use iopt_api::{FlushOps, Gather, IoPageTable, Iova, PageSizes, WalkItem};
use std::sync::Mutex;

/// Every table and leaf, in walk order: the full state a failed operation must not change.
pub fn dump(t: &dyn IoPageTable) -> Vec<WalkItem> {
    let mut v = Vec::new();
    t.walk(&mut |i| v.push(i));
    v
}

/// Flush callbacks that record every call and check each size is a supported page size.
#[derive(Debug, Default)]
pub struct Recorder {
    pub sizes: PageSizes,
    pub walks: Mutex<Vec<(u64, u64, u64)>>,
    pub pages: Mutex<Vec<(u64, u64)>>,
    pub alls: Mutex<u32>,
}

impl Recorder {
    pub fn new(sizes: PageSizes) -> Self {
        Self {
            sizes,
            ..Self::default()
        }
    }
}

impl FlushOps for Recorder {
    fn flush_all(&self) {
        *self.alls.lock().unwrap() += 1;
    }
    fn flush_walk(&self, iova: Iova, size: u64, granule: u64) {
        assert!(
            self.sizes.bits() & size == size && size.is_power_of_two(),
            "walk flush of {size:#x}"
        );
        assert!(self.sizes.bits() & granule != 0, "granule {granule:#x}");
        self.walks.lock().unwrap().push((iova.get(), size, granule));
    }
    fn add_page(&self, gather: &mut Gather, iova: Iova, size: u64) {
        assert!(
            self.sizes.bits() & size == size && size.is_power_of_two(),
            "leaf flush of {size:#x}"
        );
        self.pages.lock().unwrap().push((iova.get(), size));
        gather.add(iova, size);
    }
}
