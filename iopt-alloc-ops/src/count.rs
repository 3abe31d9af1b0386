//! How many table pages a reservation takes: the count policies and the pure formulas behind
//! them.
//!
//! Every formula here is a function of the configuration and the requested ranges only, except
//! [`CountPolicy::Exact`], which asks the engine about the current tree
//! ([`Engine::pages_needed`](iopt_lpae::Engine::pages_needed)).

use alloc::vec::Vec;
use iopt_api::{AllocError, Config, Iova, IovaRange, PageSize, RangeError, ReserveError};

/// msm's in-flight cap (commit b74fae5492d1): 1024 pre-allocated pages per VM.
pub const MSM_CAP_PAGES: usize = 1024;

/// How [`reserve`](iopt_api::Reserve::reserve) sizes a reservation.
///
/// All three count the table pages for maps with leaves of the reservation's leaf size (pass
/// the smallest page size the maps will use, as the drivers do: a map with larger leaves needs
/// no more tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CountPolicy {
    /// Panthor's formula (docs/designs.md §4.5) generalised to the table's geometry: for every level
    /// `l` from `start_level + 1` to the leaf level, the number of level-`(l - 1)` block-aligned
    /// regions the range touches. For ARM_64_LPAE_S1 with a 4 KiB granule and 48-bit VA this is
    /// exactly `N(512G) + N(1G) + N(2M)`: the tables a map needs when the tree holds only the
    /// root. Never too few, whatever the tree holds and whatever runs ahead (as long as nothing
    /// frees tables of the range in between: see the crate docs).
    ///
    /// A batch ([`AllocOpsTable::reserve_batch`](crate::AllocOpsTable::reserve_batch)) sums
    /// the per-range counts, as panthor accumulates per operation.
    #[default]
    WorstCase,
    /// msm's count (docs/designs.md §5, `vm_bind_prealloc_count`): the ranges of one job, in the
    /// order given, are grouped while each range starts in the same leaf-table region (2 MiB
    /// for a 4 KiB granule) as the previous range **ends** (exclusive end, so a range ending
    /// exactly on a boundary merges with one starting there); each group is counted as one
    /// range from its lowest start to its highest end with the [`WorstCase`](Self::WorstCase)
    /// formula, and the groups are summed. For a single range this equals `WorstCase`.
    ///
    /// Where msm takes `first.iova .. last.iova + last.range`, this takes the group's lowest
    /// start and highest end, which is the same for ascending ranges and never underflows for
    /// unsorted ones. The region is the span of one leaf table at the reservation's leaf level
    /// (`block_size(leaf_level - 1)`), which is msm's hard-coded 2 MiB for its 4 KiB tables.
    MsmMerged,
    /// Exactly what a map of the range needs against the tree as it is now
    /// ([`Engine::pages_needed`](iopt_lpae::Engine::pages_needed)): for callers that know
    /// nothing is queued ahead. A batch sums the per-range counts (an upper bound when ranges
    /// share a missing table).
    Exact,
}

/// Validates a reservation request and returns the leaf level.
///
/// Checks, in the engine's order: the leaf size is supported, the range is aligned to it, and
/// both ends lie in the input range.
///
/// # Errors
///
/// [`ReserveError::BadLeafSize`] for an unsupported or misaligned leaf size,
/// [`ReserveError::OutOfRange`] when an end leaves the input range.
pub fn validate(cfg: &Config, range: IovaRange, leaf: PageSize) -> Result<u32, ReserveError> {
    let level = cfg.leaf_level(leaf).ok_or(ReserveError::BadLeafSize {
        range,
        size: leaf.get(),
    })?;
    if !range.start().is_aligned(leaf.get()) || range.len() % leaf.get() != 0 {
        return Err(ReserveError::BadLeafSize {
            range,
            size: leaf.get(),
        });
    }
    if !cfg.iova_in_range(range.start()) || !cfg.iova_in_range(range.last()) {
        return Err(ReserveError::OutOfRange { range });
    }
    Ok(level)
}

/// The worst-case formula on a validated range (first and last IOVA) for leaves at `leaf_level`.
fn worst_case_raw(cfg: &Config, start: u64, last: u64, leaf_level: u32) -> usize {
    let mut n = 0u64;
    for level in (cfg.start_level() + 1)..=leaf_level {
        let shift = cfg.level_shift(level - 1);
        n += (last >> shift) - (start >> shift) + 1;
    }
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// [`CountPolicy::WorstCase`] for one range: the tables a map of `range` with `leaf`-sized
/// leaves needs in a tree that holds only the root.
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, Iova, IovaRange, PageSize, PageSizes};
/// use iopt_alloc_ops::worst_case_pages;
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
/// let gib = IovaRange::new(Iova::new(1 << 30), 1 << 30, 4096)?;
/// assert_eq!(worst_case_pages(&cfg, gib, PageSize::SZ_4K)?, 514); // 1 + 1 + 512
/// assert_eq!(worst_case_pages(&cfg, gib, PageSize::SZ_2M)?, 2); // 2 MiB leaves: no L3
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`validate`].
pub fn worst_case_pages(
    cfg: &Config,
    range: IovaRange,
    leaf: PageSize,
) -> Result<usize, ReserveError> {
    let level = validate(cfg, range, leaf)?;
    Ok(worst_case_raw(
        cfg,
        range.start().get(),
        range.last().get(),
        level,
    ))
}

/// The span of one leaf table for leaves at `leaf_level`: the region msm merges in and the
/// block an unmap reservation covers. `None` when the leaves sit in the root (no tables).
fn leaf_table_span(cfg: &Config, leaf_level: u32) -> Option<u64> {
    (leaf_level > cfg.start_level()).then(|| cfg.block_size(leaf_level - 1))
}

/// [`CountPolicy::MsmMerged`] for the ranges of one job, in submission order.
///
/// ```
/// use iopt_api::{Config, ConfigInput, Format, Iova, IovaRange, PageSize, PageSizes};
/// use iopt_alloc_ops::msm_merged_pages;
/// let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48))?;
/// // 1000 contiguous 4 KiB binds from a 2 MiB-aligned VA: one group over two 2 MiB regions.
/// let ops: Vec<IovaRange> = (0..1000)
///     .map(|i| IovaRange::new(Iova::new(0x4000_0000 + i * 4096), 4096, 4096))
///     .collect::<Result<_, _>>()?;
/// assert_eq!(msm_merged_pages(&cfg, &ops, PageSize::SZ_4K)?, 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`validate`] for any range; [`ReserveError::Range`] with [`RangeError::Empty`] for an
/// empty slice.
pub fn msm_merged_pages(
    cfg: &Config,
    ranges: &[IovaRange],
    leaf: PageSize,
) -> Result<usize, ReserveError> {
    let first = ranges.first().ok_or(ReserveError::Range {
        source: RangeError::Empty { start: Iova::ZERO },
    })?;
    let mut level = 0;
    for &r in ranges {
        level = validate(cfg, r, leaf)?;
    }
    let Some(span) = leaf_table_span(cfg, level) else {
        return Ok(0);
    };
    let region = |a: u128| a / u128::from(span);
    let end = |r: &IovaRange| u128::from(r.last().get()) + 1;
    let mut total = 0usize;
    // The open group: lowest start, highest last, and the previous range's exclusive end.
    let mut lo = first.start().get();
    let mut hi = first.last().get();
    let mut prev_end = end(first);
    for r in &ranges[1..] {
        if region(prev_end) == region(u128::from(r.start().get())) {
            lo = lo.min(r.start().get());
            hi = hi.max(r.last().get());
        } else {
            total = total.saturating_add(worst_case_raw(cfg, lo, hi, level));
            lo = r.start().get();
            hi = r.last().get();
        }
        prev_end = end(r);
    }
    Ok(total.saturating_add(worst_case_raw(cfg, lo, hi, level)))
}

/// Panthor's unmap reservation (docs/designs.md §4.6), generalised to a leaf-table span `block`
/// (2 MiB for a 4 KiB granule): one page if the range starts inside a block, plus one if it
/// ends inside a block other than the one it starts in. These are the leaf tables needed to
/// remap the edges of blocks that an unmap widened to whole blocks: 0, 1 or 2.
///
/// `block` must be a power of two; any other value gives 0.
///
/// ```
/// use iopt_api::{Iova, IovaRange};
/// use iopt_alloc_ops::unmap_reserve_pages;
/// const M2: u64 = 2 << 20;
/// let r = IovaRange::new(Iova::new(0x4000_1000), M2, 4096)?;
/// assert_eq!(unmap_reserve_pages(r, M2), 2);
/// # Ok::<(), iopt_api::RangeError>(())
/// ```
#[must_use]
pub fn unmap_reserve_pages(range: IovaRange, block: u64) -> usize {
    if !block.is_power_of_two() {
        return 0;
    }
    let b = u128::from(block);
    let start = u128::from(range.start().get());
    let end = u128::from(range.last().get()) + 1;
    let round_up = |a: u128| a.div_ceil(b) * b;
    let mut n = 0;
    if start % b != 0 {
        n += 1;
    }
    if end % b != 0 && round_up(end) != round_up(start) {
        n += 1;
    }
    n
}

/// The leaf-table span an unmap reservation works in: the table covering one entry of the
/// level above the smallest page size's level (2 MiB for a 4 KiB granule).
#[must_use]
pub fn unmap_block(cfg: &Config) -> Option<u64> {
    let smallest = cfg.page_sizes().smallest()?;
    leaf_table_span(cfg, cfg.leaf_level(smallest)?)
}

/// Sorts and merges ranges that overlap or touch: the set of IOVAs a batch reservation covers,
/// built once when the reservation is made, so each map's bounds check is a binary search.
///
/// # Errors
///
/// [`AllocError::OutOfMemory`] (with the bytes of one interval and the ranges' count) when the
/// set cannot be allocated: the allocation is fallible, as a batch may hold many ranges.
pub(crate) fn union(ranges: &[IovaRange]) -> Result<Vec<(u64, u64)>, AllocError> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    v.try_reserve_exact(ranges.len())
        .map_err(|_| AllocError::OutOfMemory {
            size: core::mem::size_of::<(u64, u64)>() as u64,
            count: ranges.len(),
        })?;
    v.extend(ranges.iter().map(|r| (r.start().get(), r.last().get())));
    v.sort_unstable();
    // Merge in place: `v[..kept]` is the merged prefix.
    let mut kept = 0;
    for i in 0..v.len() {
        let (s, l) = v[i];
        if kept > 0 && s <= v[kept - 1].1.saturating_add(1) {
            v[kept - 1].1 = v[kept - 1].1.max(l);
        } else {
            v[kept] = (s, l);
            kept += 1;
        }
    }
    v.truncate(kept);
    v.shrink_to_fit();
    Ok(v)
}

/// Returns the first IOVA of `[start, last]` that no interval of `set` covers. `set` is sorted
/// and merged (as [`union`] builds it: no two intervals overlap or touch), so the run is
/// covered exactly when one interval holds both ends: a binary search, O(log n).
pub(crate) fn first_uncovered(set: &[(u64, u64)], start: u64, last: u64) -> Option<u64> {
    // The last interval starting at or before `start`.
    let Some(i) = set.partition_point(|&(s, _)| s <= start).checked_sub(1) else {
        return Some(start);
    };
    let (_, l) = set[i];
    if l < start {
        Some(start)
    } else if l >= last {
        None
    } else {
        // `l < last`, so no overflow; the next interval starts past `l + 1` (merged).
        Some(l + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u64, len: u64) -> IovaRange {
        IovaRange::new(Iova::new(s), len, 1).unwrap()
    }

    #[test]
    fn union_and_coverage() {
        let set = union(&[r(0x3000, 0x1000), r(0x1000, 0x1000), r(0x2000, 0x1000)]).unwrap();
        assert_eq!(set, [(0x1000, 0x3fff)]);
        assert_eq!(first_uncovered(&set, 0x1000, 0x3fff), None);
        assert_eq!(first_uncovered(&set, 0x1000, 0x4fff), Some(0x4000));
        assert_eq!(first_uncovered(&set, 0x0, 0x1fff), Some(0));
        let set = union(&[r(0x1000, 0x1000), r(0x5000, 0x1000)]).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(first_uncovered(&set, 0x1000, 0x5fff), Some(0x2000));
        assert_eq!(first_uncovered(&set, 0x5000, 0x5fff), None);
        let top = union(&[r(u64::MAX - 0xfff, 0x1000)]).unwrap();
        assert_eq!(first_uncovered(&top, u64::MAX - 0xfff, u64::MAX), None);
    }

    /// The linear scan the binary search replaced: the reference.
    fn first_uncovered_scan(set: &[(u64, u64)], start: u64, last: u64) -> Option<u64> {
        let mut at = start;
        for &(s, l) in set {
            if l < at {
                continue;
            }
            if s > at {
                return Some(at);
            }
            if l >= last {
                return None;
            }
            at = l + 1;
        }
        Some(at)
    }

    proptest::proptest! {
        #[test]
        fn binary_search_agrees_with_the_scan(
            raw in proptest::collection::vec((0u64..64, 1u64..8), 0..12),
            top in proptest::bool::ANY,
            start in 0u64..80,
            len in 1u64..24,
        ) {
            // Small units scaled to pages; optionally shifted to the top of the space.
            let base = if top { u64::MAX - (128 << 12) + 1 } else { 0 };
            let ranges: Vec<IovaRange> = raw
                .iter()
                .map(|&(s, n)| r(base + (s << 12), n << 12))
                .collect();
            let set = union(&ranges).unwrap();
            for w in set.windows(2) {
                proptest::prop_assert!(w[0].1.saturating_add(1) < w[1].0, "merged: {:x?}", set);
            }
            let first = base + (start << 12);
            let last = first + (len << 12) - 1;
            proptest::prop_assert_eq!(
                first_uncovered(&set, first, last),
                first_uncovered_scan(&set, first, last)
            );
        }
    }
}
