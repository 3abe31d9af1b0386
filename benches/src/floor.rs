//! Plain store loops: the floor a bulk map of 4K entries can reach.
//!
//! [`store_loop`] writes one descriptor per page into memory that already exists (what a map
//! costs when nothing but the leaf stores remains); [`store_loop_alloc`] first allocates zeroed
//! 4 KiB tables from the global allocator, one per 512 entries plus the levels above, links
//! them, and then stores (what a map into a fresh tree costs at best).

use crate::{SZ_4K, pa_of};

/// The bits of a stage-1 4K page descriptor for read, write, cacheable, minus the address.
pub const LEAF_BITS: u64 = 0xF47;

/// Output-address field of a descriptor.
const ADDR_MASK: u64 = ((1 << 48) - 1) & !((1 << 12) - 1);

/// Writes `leaves.len()` page descriptors for the pages from `iova` into `leaves`.
#[inline(never)]
pub fn store_loop(leaves: &mut [u64], iova: u64) {
    let mut pa = pa_of(iova);
    for e in leaves {
        *e = LEAF_BITS | (pa & ADDR_MASK);
        pa += SZ_4K;
    }
}

/// A tree of zeroed table pages: level 1 and 2 tables and the leaf tables.
#[derive(Debug)]
pub struct Tables {
    /// The tables above the leaves, root first.
    pub upper: Vec<Box<[u64]>>,
    /// The leaf tables.
    pub leaves: Vec<Box<[u64]>>,
}

/// Allocates zeroed tables for `pages` 4K pages from `iova` (1 GiB-aligned, at most 512 GiB)
/// and writes the leaves, linking every table into its parent.
#[inline(never)]
pub fn store_loop_alloc(pages: u64, iova: u64) -> Tables {
    let zeroed = || vec![0u64; 512].into_boxed_slice();
    let n_leaf = pages.div_ceil(512) as usize;
    let n_l2 = n_leaf.div_ceil(512);
    let mut upper = Vec::with_capacity(1 + n_l2);
    let mut l1 = zeroed();
    let mut l2s: Vec<Box<[u64]>> = (0..n_l2).map(|_| zeroed()).collect();
    let mut leaves = Vec::with_capacity(n_leaf);
    let mut pa = pa_of(iova);
    let mut left = pages;
    for i in 0..n_leaf {
        let mut t = zeroed();
        let n = left.min(512) as usize;
        for e in &mut t[..n] {
            *e = LEAF_BITS | (pa & ADDR_MASK);
            pa += SZ_4K;
        }
        left -= n as u64;
        // The table's "physical address" is its heap address, as with an identity map.
        l2s[i / 512][i % 512] = (t.as_ptr() as u64 & ADDR_MASK) | 3;
        leaves.push(t);
    }
    for (j, l2) in l2s.iter().enumerate() {
        l1[j] = (l2.as_ptr() as u64 & ADDR_MASK) | 3;
    }
    upper.push(l1);
    upper.extend(l2s);
    Tables { upper, leaves }
}
