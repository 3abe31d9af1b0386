//! The operation sequences the differential and fault checkers run, as typed [`Arbitrary`]
//! inputs, and how they resolve to concrete calls inside a small IOVA window.
//!
//! Addresses are not drawn from the whole input space: every operation lands in a window of a
//! few leaf tables around a base that sits on a boundary of every level (so neighbouring
//! operations share, create and free the same tables, and runs cross table boundaries), and
//! most addresses fall within a few dozen pages of the base (so operations collide). A `Raw`
//! operation passes arbitrary 64-bit values for the validation and overflow paths.

use arbitrary::Arbitrary;
use iopt_api::{Config, ConfigInput, Format, Iova, IovaRange, PageSizes, Prot, Quirks};

/// One configuration of the differential: the table's configuration and the window.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// A short name for dumps.
    pub name: &'static str,
    /// The configuration.
    pub cfg: Config,
    /// The window's centre: aligned to every page size, on a boundary of every level that the
    /// window can reach.
    pub base: u64,
    /// The window's width in bytes (four leaf tables).
    pub span: u64,
}

/// Physical addresses start here (aligned to every block size).
pub const PA_BASE: u64 = 0x8000_0000;

fn cfg(input: ConfigInput) -> Config {
    match Config::new(input) {
        Ok(c) => c,
        Err(e) => panic!("built-in configuration {input:?} is invalid: {e}"),
    }
}

/// The configurations the differential and fault checkers choose from.
#[must_use]
pub fn setups() -> Vec<Setup> {
    let g4 = PageSizes::GRANULE_4K;
    let mk = |name, c: Config, base: u64| {
        let leaf_span = c.granule().entries() as u64 * c.granule().size();
        Setup {
            name,
            cfg: c,
            base,
            span: 4 * leaf_span,
        }
    };
    vec![
        mk(
            "arm64-s1 4K 48/48",
            cfg(ConfigInput::new(Format::Arm64S1, g4, 48, 48)),
            512 << 30,
        ),
        mk(
            "panthor (arm64-s1 4K|2M 48/40)",
            cfg(ConfigInput::new(
                Format::Arm64S1,
                PageSizes::from_bits(0x20_1000),
                48,
                40,
            )),
            512 << 30,
        ),
        mk(
            "arm64-s2 4K 40/40 (2 concatenated roots)",
            cfg(ConfigInput::new(Format::Arm64S2, g4, 40, 40)),
            512 << 30,
        ),
        mk(
            "arm64-s1 16K 48/48",
            cfg(
                ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_16K, 48, 48)
                    .with_preferred_granule(iopt_api::Granule::K16),
            ),
            64 << 30,
        ),
        mk(
            "arm64-s2 64K 48/48",
            cfg(
                ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_64K, 48, 48)
                    .with_preferred_granule(iopt_api::Granule::K64),
            ),
            4 << 40,
        ),
        mk(
            "mali 4K 48/40",
            cfg(ConfigInput::new(Format::Mali, g4, 48, 40)),
            512 << 30,
        ),
        mk(
            "arm32-s1 4K 32/40",
            cfg(ConfigInput::new(Format::Arm32S1, g4, 32, 40)),
            2 << 30,
        ),
        mk(
            "arm64-s1 4K 39/44 NS|HD",
            cfg(ConfigInput::new(Format::Arm64S1, g4, 39, 44)
                .with_quirks(Quirks::NS.union(Quirks::HD))),
            256 << 30,
        ),
        mk(
            "arm64-s2 16K 40/40 S2FWB (16 concatenated roots)",
            cfg(
                ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_16K, 40, 40)
                    .with_quirks(Quirks::S2FWB)
                    .with_preferred_granule(iopt_api::Granule::K16),
            ),
            64 << 30,
        ),
        mk(
            "arm64-s1 4K 48/48 non-coherent OUTER_WBWA",
            cfg(ConfigInput::new(Format::Arm64S1, g4, 48, 48)
                .with_coherent_walk(false)
                .with_quirks(Quirks::OUTER_WBWA)),
            512 << 30,
        ),
        mk(
            "mali 4K|2M 48/40 non-coherent",
            cfg(
                ConfigInput::new(Format::Mali, PageSizes::from_bits(0x20_1000), 48, 40)
                    .with_coherent_walk(false),
            ),
            512 << 30,
        ),
    ]
}

/// An address selector: even values land within 24 pages of the base (collisions), odd ones
/// anywhere in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub struct Addr(pub u16);

/// A count selector: mostly 1-4, sometimes up to 64 or across a leaf table, rarely 0 or huge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub struct Count(pub u16);

/// One scatter-list segment of [`Op::MapSg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Arbitrary)]
pub struct Seg {
    /// Output address selector, as [`Op::MapRange`]'s.
    pub pa: u16,
    /// Length in smallest pages.
    pub pages: Count,
    /// Even: output congruent to the segment's IOVA (blocks possible); odd: skewed.
    pub skew: u8,
}

/// One operation of a sequence.
#[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
pub enum Op {
    /// `map` of `count` pages of a size picked by `size` at `at`.
    Map {
        /// Where.
        at: Addr,
        /// Page size selector.
        size: u8,
        /// How many.
        count: Count,
        /// Output address selector (in pages of the size).
        pa: u16,
        /// `Prot` bits.
        prot: u8,
    },
    /// `map_reserved` inside (or around) the range of the `res`-th reservation made.
    MapReserved {
        /// Which reservation (index among all `reserve` calls, live or not).
        res: u8,
        /// Offset in pages of the size from the reservation's start.
        off: u16,
        /// Page size selector.
        size: u8,
        /// How many.
        count: Count,
        /// Output address selector.
        pa: u16,
        /// `Prot` bits.
        prot: u8,
    },
    /// `map_range` of `pages` smallest pages: the table picks the page sizes.
    MapRange {
        /// Where.
        at: Addr,
        /// Length in smallest pages.
        pages: Count,
        /// Output address selector (in 2 MiB-ish blocks).
        pa: u16,
        /// Even: output congruent to the IOVA (blocks possible); odd: skewed by pages.
        skew: u8,
        /// `Prot` bits.
        prot: u8,
    },
    /// `unmap` of `count` pages of a size.
    Unmap {
        /// Where.
        at: Addr,
        /// Page size selector.
        size: u8,
        /// How many.
        count: Count,
    },
    /// A software lookup and a device access at `at` plus a byte offset.
    Lookup {
        /// Where.
        at: Addr,
        /// Byte offset in the smallest page.
        off: u16,
    },
    /// `reserve` of `pages` smallest pages at `at`, for leaves of a size.
    Reserve {
        /// Where.
        at: Addr,
        /// Length in smallest pages.
        pages: Count,
        /// Leaf size selector.
        leaf: u8,
    },
    /// `release` of the `res`-th reservation (a second release of the same one, or of one
    /// that failed, must be refused).
    Release {
        /// Which reservation.
        res: u8,
    },
    /// `unmap` of (part of) an earlier map: the whole run, one page of it, or the block
    /// holding it (a table-removing unmap where a table is there).
    UnmapRecent {
        /// Which earlier map (index among all map calls made).
        pick: u8,
        /// What to unmap: whole run, one page, or the enclosing block.
        part: u8,
    },
    /// The caller invalidates what the gather holds (`iotlb_sync`).
    Flush,
    /// `map_sg` of one to four segments back to back from `at`.
    MapSg {
        /// Where.
        at: Addr,
        /// The segments (the first `n % 4 + 1` are used).
        segs: [Seg; 4],
        /// How many segments, less one (mod 4).
        n: u8,
        /// `Prot` bits.
        prot: u8,
    },
    /// `unmap_collect`: `unmap` that also returns the output runs it cleared.
    UnmapCollect {
        /// Where.
        at: Addr,
        /// Page size selector.
        size: u8,
        /// How many.
        count: Count,
    },
    /// A device write through the hardware walk at `at` plus a byte offset (an SMMU with
    /// HTTU marks a DBM leaf dirty).
    DeviceWrite {
        /// Where.
        at: Addr,
        /// Byte offset in the smallest page.
        off: u16,
    },
    /// `read_and_clear_dirty` over `pages` smallest pages from `at`.
    ReadDirty {
        /// Where.
        at: Addr,
        /// Length in smallest pages.
        pages: Count,
        /// Odd: `NO_CLEAR` (report without cleaning).
        keep: u8,
    },
    /// An operation with raw values, for the validation paths.
    Raw {
        /// Which operation (map, unmap, map_range, reserve, lookup).
        kind: u8,
        /// IOVA (raw, or relative to the base when `kind` says so).
        iova: u64,
        /// PA or length.
        pa: u64,
        /// log2 of the page size (any value).
        shift: u8,
        /// Count or length.
        count: u64,
        /// `Prot` bits.
        prot: u8,
    },
}

/// A differential input: a configuration selector and a sequence.
///
/// Decoding takes operations until the data runs out (at most [`MAX_OPS`]), whether or not it
/// is the last value decoded, so random bytes give long sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffInput {
    /// Configuration selector (index into [`setups`]).
    pub config: u8,
    /// In-flight cap of Design 1's reservations: 0-3 none, then strict or msm throttle.
    pub cap: u8,
    /// The operations (at most [`MAX_OPS`] are run).
    pub ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for DiffInput {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let config = u.arbitrary()?;
        let cap = u.arbitrary()?;
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < MAX_OPS {
            ops.push(Op::arbitrary(u)?);
        }
        Ok(Self { config, cap, ops })
    }

    fn arbitrary_take_rest(mut u: arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Self::arbitrary(&mut u)
    }
}

/// Operations run per input, at most.
pub const MAX_OPS: usize = 48;

/// A resolved call, the same for every lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `map` (`res: None`) or `map_reserved` with the `res`-th reservation.
    Map {
        /// Reservation index.
        res: Option<usize>,
        /// IOVA.
        iova: u64,
        /// PA.
        pa: u64,
        /// Page size (a power of two).
        size: u64,
        /// Pages.
        count: u64,
        /// Prot.
        prot: Prot,
    },
    /// `map_range`.
    MapRange {
        /// IOVA.
        iova: u64,
        /// PA.
        pa: u64,
        /// Bytes.
        len: u64,
        /// Prot.
        prot: Prot,
    },
    /// `unmap`.
    Unmap {
        /// IOVA.
        iova: u64,
        /// Page size (a power of two).
        size: u64,
        /// Pages.
        count: u64,
    },
    /// Lookup and device access.
    Lookup {
        /// IOVA.
        iova: u64,
    },
    /// `reserve` (the range is a valid `IovaRange`; the leaf a power of two).
    Reserve {
        /// First IOVA.
        start: u64,
        /// Bytes.
        len: u64,
        /// Leaf size.
        leaf: u64,
    },
    /// `release` of the `res`-th reservation.
    Release {
        /// Reservation index.
        res: usize,
    },
    /// The caller's flush of the gather.
    Flush,
    /// `map_sg` of the first `n` segments `(pa, len)`.
    MapSg {
        /// IOVA.
        iova: u64,
        /// Segments.
        segs: [(u64, u64); 4],
        /// Segments used.
        n: usize,
        /// Prot.
        prot: Prot,
    },
    /// `unmap_collect`.
    UnmapCollect {
        /// IOVA.
        iova: u64,
        /// Page size (a power of two).
        size: u64,
        /// Pages.
        count: u64,
    },
    /// A device write through the hardware walk.
    DeviceWrite {
        /// IOVA.
        iova: u64,
    },
    /// `read_and_clear_dirty` (the range is a valid `IovaRange`).
    ReadDirty {
        /// First IOVA.
        start: u64,
        /// Bytes.
        len: u64,
        /// `NO_CLEAR`.
        keep: bool,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Step::Map {
                res: None,
                iova,
                pa,
                size,
                count,
                prot,
            } => write!(
                f,
                "map(iova {iova:#x}, pa {pa:#x}, size {size:#x}, count {count}, {prot:?})"
            ),
            Step::Map {
                res: Some(r),
                iova,
                pa,
                size,
                count,
                prot,
            } => write!(
                f,
                "map_reserved(res[{r}], iova {iova:#x}, pa {pa:#x}, size {size:#x}, count \
                 {count}, {prot:?})"
            ),
            Step::MapRange {
                iova,
                pa,
                len,
                prot,
            } => write!(
                f,
                "map_range(iova {iova:#x}, pa {pa:#x}, len {len:#x}, {prot:?})"
            ),
            Step::Unmap { iova, size, count } => {
                write!(f, "unmap(iova {iova:#x}, size {size:#x}, count {count})")
            }
            Step::Lookup { iova } => write!(f, "lookup({iova:#x})"),
            Step::Reserve { start, len, leaf } => {
                write!(f, "reserve([{start:#x}, +{len:#x}), leaf {leaf:#x})")
            }
            Step::Release { res } => write!(f, "release(res[{res}])"),
            Step::Flush => f.write_str("flush gather"),
            Step::MapSg {
                iova,
                segs,
                n,
                prot,
            } => {
                write!(f, "map_sg(iova {iova:#x}, [")?;
                for (i, (pa, len)) in segs.iter().take(n).enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}(pa {pa:#x}, len {len:#x})")?;
                }
                write!(f, "], {prot:?})")
            }
            Step::UnmapCollect { iova, size, count } => {
                write!(
                    f,
                    "unmap_collect(iova {iova:#x}, size {size:#x}, count {count})"
                )
            }
            Step::DeviceWrite { iova } => write!(f, "device write({iova:#x})"),
            Step::ReadDirty { start, len, keep } => {
                let flag = if keep { ", NO_CLEAR" } else { "" };
                write!(f, "read_and_clear_dirty([{start:#x}, +{len:#x}){flag})")
            }
        }
    }
}

impl Step {
    /// The IOVA range the step touches, `(first, bytes)`.
    #[must_use]
    pub fn touched(&self) -> Option<(u64, u64)> {
        match *self {
            Step::Map {
                iova, size, count, ..
            }
            | Step::Unmap { iova, size, count }
            | Step::UnmapCollect { iova, size, count } => Some((iova, size.saturating_mul(count))),
            Step::MapSg { iova, segs, n, .. } => Some((
                iova,
                segs.iter()
                    .take(n)
                    .fold(0u64, |a, &(_, l)| a.saturating_add(l)),
            )),
            Step::MapRange { iova, len, .. } => Some((iova, len)),
            Step::Lookup { iova } | Step::DeviceWrite { iova } => Some((iova, 1)),
            Step::Reserve { start, len, .. } | Step::ReadDirty { start, len, .. } => {
                Some((start, len))
            }
            Step::Release { .. } | Step::Flush => None,
        }
    }
}

/// Resolves operations to steps for one setup, remembering the reservation ranges asked for
/// (so `MapReserved` can aim inside them whatever each lane answered).
#[derive(Debug, Clone)]
pub struct Resolver {
    setup: Setup,
    sizes: Vec<u64>,
    reserves: Vec<(u64, u64)>,
    /// Earlier maps: `(iova, page size, pages)`.
    maps: Vec<(u64, u64, u64)>,
}

impl Resolver {
    /// A resolver for `setup`.
    #[must_use]
    pub fn new(setup: Setup) -> Self {
        let sizes = setup
            .cfg
            .page_sizes()
            .iter()
            .map(iopt_api::PageSize::get)
            .collect();
        Self {
            setup,
            sizes,
            reserves: Vec::new(),
            maps: Vec::new(),
        }
    }

    fn smallest(&self) -> u64 {
        self.sizes[0]
    }

    /// A page size: mostly the smallest, then the next ones; rarely any power of two.
    fn size(&self, sel: u8) -> u64 {
        if sel >= 248 {
            return 1u64 << (sel % 64);
        }
        let i = match sel % 8 {
            0..=4 => 0,
            5 | 6 => 1,
            _ => 2,
        };
        self.sizes[i.min(self.sizes.len() - 1)]
    }

    fn count(c: Count) -> u64 {
        let x = u64::from(c.0);
        let hi = x >> 5;
        match x % 32 {
            0 => 0,
            1..=23 => 1 + hi % 4,
            24..=29 => 1 + hi % 64,
            30 => 500 + hi % 600,
            _ => u64::MAX / (hi + 1),
        }
    }

    /// An address for a page of `size` bytes.
    fn addr(&self, a: Addr, size: u64) -> u64 {
        let base = self.setup.base;
        let x = i64::from(a.0 >> 1);
        let slot = if a.0 & 1 == 0 {
            let s = (x % 48) - 24;
            // Big pages: only the two around the base.
            if size.saturating_mul(48) > self.setup.span {
                s.rem_euclid(2) - 1
            } else {
                s
            }
        } else {
            let n = i64::try_from((self.setup.span / size).max(2)).unwrap_or(2);
            x % n - n / 2
        };
        if slot < 0 {
            base.wrapping_sub(slot.unsigned_abs().wrapping_mul(size))
        } else {
            base.wrapping_add(slot.unsigned_abs().wrapping_mul(size))
        }
    }

    fn pa(sel: u16, size: u64) -> u64 {
        PA_BASE.wrapping_add(u64::from(sel % 512).wrapping_mul(size))
    }

    /// An output address for a range at `iova`: congruent to it modulo the second page size
    /// (so blocks fit) when `skew` is even, else skewed by whole small pages.
    fn range_pa(&self, iova: u64, pa: u16, skew: u8) -> (u64, u64) {
        let g = self.smallest();
        let block = self.sizes.get(1).copied().unwrap_or(g);
        let base = PA_BASE.wrapping_add(u64::from(pa % 256).wrapping_mul(block));
        let pa = if skew % 2 == 0 {
            base + (iova & (block - 1))
        } else {
            base + u64::from(skew / 2) * g
        };
        (pa, block)
    }

    fn prot(p: u8) -> Prot {
        Prot::from_bits_truncate(u32::from(p) & 0x3f)
    }

    /// Resolves `op`; `None` when it makes no call (a range that cannot be formed).
    #[must_use]
    pub fn resolve(&mut self, op: &Op) -> Option<Step> {
        let step = self.resolve_inner(op)?;
        match step {
            Step::Map {
                iova, size, count, ..
            } if count > 0 && count < 4096 => self.maps.push((iova, size, count)),
            Step::MapRange { iova, len, .. } => {
                let g = self.smallest();
                if len > 0 && len % g == 0 && len / g < 4096 {
                    self.maps.push((iova, g, len / g));
                }
            }
            Step::MapSg { iova, segs, n, .. } => {
                let g = self.smallest();
                let len = segs
                    .iter()
                    .take(n)
                    .fold(0u64, |a, &(_, l)| a.saturating_add(l));
                if len > 0 && len % g == 0 && len / g < 4096 {
                    self.maps.push((iova, g, len / g));
                }
            }
            _ => {}
        }
        Some(step)
    }

    #[allow(clippy::too_many_lines)]
    fn resolve_inner(&mut self, op: &Op) -> Option<Step> {
        let g = self.smallest();
        Some(match *op {
            Op::Map {
                at,
                size,
                count,
                pa,
                prot,
            } => {
                let size = self.size(size);
                Step::Map {
                    res: None,
                    iova: self.addr(at, size),
                    pa: Self::pa(pa, size),
                    size,
                    count: Self::count(count),
                    prot: Self::prot(prot),
                }
            }
            Op::MapReserved {
                res,
                off,
                size,
                count,
                pa,
                prot,
            } => {
                if self.reserves.is_empty() {
                    return None;
                }
                let i = usize::from(res) % self.reserves.len();
                let (start, len) = self.reserves[i];
                let size = self.size(size);
                let pages = (len / size).max(1);
                let iova = (start & !(size - 1))
                    .wrapping_add((u64::from(off) % (pages + 1)).wrapping_mul(size));
                Step::Map {
                    res: Some(i),
                    iova,
                    pa: Self::pa(pa, size),
                    size,
                    count: Self::count(count).min(pages.max(1)),
                    prot: Self::prot(prot),
                }
            }
            Op::MapRange {
                at,
                pages,
                pa,
                skew,
                prot,
            } => {
                let iova = self.addr(at, g);
                let (pa, _) = self.range_pa(iova, pa, skew);
                Step::MapRange {
                    iova,
                    pa,
                    len: Self::count(pages).wrapping_mul(g),
                    prot: Self::prot(prot),
                }
            }
            Op::Unmap { at, size, count } => {
                let size = self.size(size);
                Step::Unmap {
                    iova: self.addr(at, size),
                    size,
                    count: Self::count(count),
                }
            }
            Op::Lookup { at, off } => Step::Lookup {
                iova: self.addr(at, g) + u64::from(off) % g,
            },
            Op::MapSg { at, segs, n, prot } => {
                let iova = self.addr(at, g);
                let n = usize::from(n % 4) + 1;
                let mut out = [(0, 0); 4];
                let mut next = iova;
                for (o, seg) in out.iter_mut().zip(&segs).take(n) {
                    let len = Self::count(seg.pages).wrapping_mul(g);
                    let (pa, _) = self.range_pa(next, seg.pa, seg.skew);
                    *o = (pa, len);
                    next = next.wrapping_add(len);
                }
                Step::MapSg {
                    iova,
                    segs: out,
                    n,
                    prot: Self::prot(prot),
                }
            }
            Op::UnmapCollect { at, size, count } => {
                let size = self.size(size);
                Step::UnmapCollect {
                    iova: self.addr(at, size),
                    size,
                    count: Self::count(count),
                }
            }
            Op::DeviceWrite { at, off } => Step::DeviceWrite {
                iova: self.addr(at, g) + u64::from(off) % g,
            },
            Op::ReadDirty { at, pages, keep } => {
                let start = self.addr(at, g);
                let len = Self::count(pages).clamp(1, 4096) * g;
                IovaRange::new(Iova::new(start), len, 1).ok()?;
                Step::ReadDirty {
                    start,
                    len,
                    keep: keep % 2 == 1,
                }
            }
            Op::Reserve { at, pages, leaf } => {
                let start = self.addr(at, g);
                let len = Self::count(pages).clamp(1, 4096) * g;
                self.reserve(start, len, self.size(leaf))?
            }
            Op::Release { res } => {
                if self.reserves.is_empty() {
                    return None;
                }
                Step::Release {
                    res: usize::from(res) % self.reserves.len(),
                }
            }
            Op::UnmapRecent { pick, part } => {
                if self.maps.is_empty() {
                    return None;
                }
                let (iova, size, count) = self.maps[usize::from(pick) % self.maps.len()];
                match part % 4 {
                    0 | 1 => Step::Unmap { iova, size, count },
                    2 => Step::Unmap {
                        iova: iova.wrapping_add((u64::from(part / 4) % count).wrapping_mul(size)),
                        size,
                        count: 1,
                    },
                    _ => {
                        let block = self
                            .sizes
                            .iter()
                            .copied()
                            .find(|&b| b > size)
                            .unwrap_or(size);
                        Step::Unmap {
                            iova: iova & !(block - 1),
                            size: block,
                            count: 1,
                        }
                    }
                }
            }
            Op::Flush => Step::Flush,
            Op::Raw {
                kind,
                iova,
                pa,
                shift,
                count,
                prot,
            } => {
                let iova = if kind & 0x80 == 0 {
                    self.setup.base.wrapping_add(iova % (self.setup.span * 2))
                } else {
                    iova
                };
                let size = 1u64 << (shift % 64);
                let prot = Self::prot(prot);
                match kind % 5 {
                    0 => Step::Map {
                        res: None,
                        iova,
                        pa,
                        size,
                        count,
                        prot,
                    },
                    1 => Step::Unmap { iova, size, count },
                    2 => Step::MapRange {
                        iova,
                        pa,
                        len: count,
                        prot,
                    },
                    3 => self.reserve(iova, count, size)?,
                    _ => Step::Lookup { iova },
                }
            }
        })
    }

    fn reserve(&mut self, start: u64, len: u64, leaf: u64) -> Option<Step> {
        iopt_api::IovaRange::new(iopt_api::Iova::new(start), len, 1).ok()?;
        self.reserves.push((start, len));
        Some(Step::Reserve { start, len, leaf })
    }
}

/// Picks a setup by selector.
#[must_use]
pub fn setup(sel: u8) -> Setup {
    let all = setups();
    all[usize::from(sel) % all.len()]
}
