//! Bad input gets a typed error and changes nothing: the full tree dump and the allocator's
//! live set are compared before and after every refused operation, including allocation
//! failure injected at every page allocation of multi-table maps.

#![allow(clippy::too_many_lines, clippy::type_complexity)] // table-driven tests

mod common;

use common::dump;
use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, MapError, PageSize, PageSizes,
    PhysAddr, Prot, Quirks, UnmapError,
};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;

const RW: Prot = Prot::READ.union(Prot::WRITE);

fn s1(ias: u32, oas: u32, quirks: Quirks) -> Config {
    Config::new(
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, ias, oas).with_quirks(quirks),
    )
    .unwrap()
}

/// Runs `op` and asserts it failed with `want` and changed nothing.
fn refused<T: std::fmt::Debug, E: std::fmt::Debug + PartialEq>(
    t: &LpaeTable<&SimMemory>,
    mem: &SimMemory,
    want: &E,
    op: impl FnOnce() -> Result<T, E>,
) {
    let before = (dump(t), mem.live_set());
    let got = op();
    assert_eq!(got.as_ref().err(), Some(want), "got {got:?}");
    assert_eq!(
        (dump(t), mem.live_set()),
        before,
        "state changed by refused op {want:?}"
    );
}

fn populated(mem: &SimMemory, quirks: Quirks) -> LpaeTable<&SimMemory> {
    let t = LpaeTable::new(s1(48, 48, quirks), mem).unwrap();
    let base = if quirks.contains(Quirks::TTBR1) {
        0xffff_0000_0000_0000
    } else {
        0
    };
    t.map(
        Iova::new(base | 0x4000_0000),
        PhysAddr::new(0x1_0000_0000),
        PageSize::SZ_2M,
        2,
        RW,
    )
    .unwrap();
    t.map(
        Iova::new(base | 0x4060_0000),
        PhysAddr::new(0x2_0000_0000),
        PageSize::SZ_4K,
        8,
        RW,
    )
    .unwrap();
    t.map(
        Iova::new(base | 0x8000_0000),
        PhysAddr::new(0x4000_0000),
        PageSize::SZ_1G,
        1,
        Prot::READ,
    )
    .unwrap();
    t
}

#[test]
fn map_rejections_change_nothing() {
    let mem = SimMemory::new();
    let t = populated(&mem, Quirks::empty());
    let sz = |b| PageSize::new(b).unwrap();
    let t = &t;
    let m = |iova: u64, pa: u64, size: PageSize, n: u64, prot: Prot| {
        move || t.map(Iova::new(iova), PhysAddr::new(pa), size, n, prot)
    };
    // Unsupported size, no access, zero count.
    refused(
        t,
        &mem,
        &MapError::InvalidPageSize { size: 0x10000 },
        m(0, 0, sz(0x10000), 1, RW),
    );
    refused(
        t,
        &mem,
        &MapError::NoAccess { prot: Prot::CACHE },
        m(0, 0, PageSize::SZ_4K, 1, Prot::CACHE),
    );
    refused(
        t,
        &mem,
        &MapError::Empty { iova: Iova::new(0) },
        m(0, 0, PageSize::SZ_4K, 0, RW),
    );
    // Ranges: start and end of IOVA and PA, and overflow.
    refused(
        t,
        &mem,
        &MapError::IovaOutOfRange {
            iova: Iova::new(1 << 48),
        },
        m(1 << 48, 0, PageSize::SZ_4K, 1, RW),
    );
    refused(
        t,
        &mem,
        &MapError::PaOutOfRange {
            pa: PhysAddr::new(1 << 48),
        },
        m(0, 1 << 48, PageSize::SZ_4K, 1, RW),
    );
    refused(
        t,
        &mem,
        &MapError::IovaOutOfRange {
            iova: Iova::new((1 << 48) + 0xfff),
        },
        m((1 << 48) - 0x1000, 0, PageSize::SZ_4K, 2, RW),
    );
    refused(
        t,
        &mem,
        &MapError::PaOutOfRange {
            pa: PhysAddr::new((1 << 48) + 0xfff),
        },
        m(0, (1 << 48) - 0x1000, PageSize::SZ_4K, 2, RW),
    );
    refused(
        t,
        &mem,
        &MapError::Overflow {
            iova: Iova::new(0),
            len: u64::MAX,
        },
        m(0, 0, PageSize::SZ_1G, u64::MAX, RW),
    );
    // Misalignment (Linux would silently round).
    refused(
        t,
        &mem,
        &MapError::Misaligned {
            iova: Iova::new(0x1800),
            pa: PhysAddr::new(0),
            size: PageSize::SZ_4K,
        },
        m(0x1800, 0, PageSize::SZ_4K, 1, RW),
    );
    refused(
        t,
        &mem,
        &MapError::Misaligned {
            iova: Iova::new(0x20_0000),
            pa: PhysAddr::new(0x1000),
            size: PageSize::SZ_2M,
        },
        m(0x20_0000, 0x1000, PageSize::SZ_2M, 1, RW),
    );
    // Double map: same leaf, a leaf later in the run, a block above, a block over a live table,
    // and a run spanning tables whose conflict is in the last one.
    refused(
        t,
        &mem,
        &MapError::AlreadyMapped {
            iova: Iova::new(0x4000_0000),
        },
        m(0x4000_0000, 0, PageSize::SZ_2M, 1, RW),
    );
    refused(
        t,
        &mem,
        &MapError::AlreadyMapped {
            iova: Iova::new(0x4060_0000),
        },
        m(0x405f_f000, 0, PageSize::SZ_4K, 2, RW),
    );
    refused(
        t,
        &mem,
        &MapError::AlreadyMapped {
            iova: Iova::new(0x4000_1000),
        },
        m(0x4000_1000, 0, PageSize::SZ_4K, 1, RW),
    );
    refused(
        t,
        &mem,
        &MapError::AlreadyMapped {
            iova: Iova::new(0x4060_0000),
        },
        m(0x4060_0000, 0, PageSize::SZ_2M, 1, RW),
    );
    refused(
        t,
        &mem,
        &MapError::AlreadyMapped {
            iova: Iova::new(0x8000_0000),
        },
        m(0x7fe0_0000, 0, PageSize::SZ_2M, 2, RW),
    );
    refused(
        t,
        &mem,
        &MapError::AlreadyMapped {
            iova: Iova::new(0x4000_0000),
        },
        m(0x3000_0000, 0, PageSize::SZ_4K, 0x4_3001, RW),
    );
    // map_range: zero length, no fitting size, conflict after several new tables.
    refused(t, &mem, &MapError::Empty { iova: Iova::new(0) }, || {
        t.map_range(Iova::new(0), PhysAddr::new(0), 0, RW)
    });
    refused(
        t,
        &mem,
        &MapError::Misaligned {
            iova: Iova::new(0x800),
            pa: PhysAddr::new(0),
            size: PageSize::SZ_4K,
        },
        || t.map_range(Iova::new(0x800), PhysAddr::new(0), 0x1000, RW),
    );
    refused(
        t,
        &mem,
        &MapError::AlreadyMapped {
            iova: Iova::new(0x4000_0000),
        },
        || t.map_range(Iova::new(0x1000), PhysAddr::new(0x1000), 0x4000_0000, RW),
    );
}

#[test]
fn unmap_rejections_change_nothing() {
    let mem = SimMemory::new();
    let t = populated(&mem, Quirks::empty());
    let t = &t;
    let u = |iova: u64, size: PageSize, n: u64| {
        move || t.unmap(Iova::new(iova), size, n, &mut Gather::new())
    };
    refused(
        t,
        &mem,
        &UnmapError::InvalidPageSize { size: 0x4000 },
        u(0, PageSize::SZ_16K, 1),
    );
    refused(
        t,
        &mem,
        &UnmapError::Empty {
            iova: Iova::new(0x4000_0000),
        },
        u(0x4000_0000, PageSize::SZ_2M, 0),
    );
    refused(
        t,
        &mem,
        &UnmapError::IovaOutOfRange {
            iova: Iova::new(1 << 48),
        },
        u(1 << 48, PageSize::SZ_4K, 1),
    );
    refused(
        t,
        &mem,
        &UnmapError::Misaligned {
            iova: Iova::new(0x4060_0800),
            size: PageSize::SZ_4K,
        },
        u(0x4060_0800, PageSize::SZ_4K, 1),
    );
    refused(
        t,
        &mem,
        &UnmapError::Overflow {
            iova: Iova::new(0x1000),
            len: u64::MAX,
        },
        u(0x1000, PageSize::SZ_2M, u64::MAX),
    );
    // Not mapped: an empty first entry, and a hole at the end of a run (nothing is cleared).
    refused(
        t,
        &mem,
        &UnmapError::NotMapped {
            iova: Iova::new(0x1000),
        },
        u(0x1000, PageSize::SZ_4K, 1),
    );
    refused(
        t,
        &mem,
        &UnmapError::NotMapped {
            iova: Iova::new(0x4060_8000),
        },
        u(0x4060_0000, PageSize::SZ_4K, 9),
    );
    // Partial unmap of a block (v6.13+: no split).
    refused(
        t,
        &mem,
        &UnmapError::PartialBlock {
            iova: Iova::new(0x4000_1000),
            size: PageSize::SZ_4K,
            leaf: PageSize::SZ_2M,
        },
        u(0x4000_1000, PageSize::SZ_4K, 1),
    );
    refused(
        t,
        &mem,
        &UnmapError::PartialBlock {
            iova: Iova::new(0x8020_0000),
            size: PageSize::SZ_2M,
            leaf: PageSize::SZ_1G,
        },
        u(0x8020_0000, PageSize::SZ_2M, 1),
    );
    // Successful unmaps report bytes and leave the rest alone.
    assert_eq!(
        t.unmap(
            Iova::new(0x4000_0000),
            PageSize::SZ_2M,
            2,
            &mut Gather::new()
        ),
        Ok(4 << 20)
    );
    assert_eq!(
        t.unmap(
            Iova::new(0x4000_0000),
            PageSize::SZ_2M,
            1,
            &mut Gather::new()
        ),
        Err(UnmapError::NotMapped {
            iova: Iova::new(0x4000_0000)
        })
    );
    // A block-sized unmap over a table removes it whole (Linux semantics), after a walk flush.
    assert_eq!(
        t.unmap(
            Iova::new(0x4060_0000),
            PageSize::SZ_2M,
            1,
            &mut Gather::new()
        ),
        Ok(2 << 20)
    );
    assert!(t.iova_to_phys(Iova::new(0x4060_0000)).is_none());
}

#[test]
fn ttbr1_range_is_inverted() {
    let mem = SimMemory::new();
    let t = populated(&mem, Quirks::TTBR1);
    let hi = 0xffff_0000_0000_0000u64;
    assert_eq!(
        t.iova_to_phys(Iova::new(hi | 0x4060_1234)).unwrap().pa,
        PhysAddr::new(0x2_0000_1234)
    );
    refused(
        &t,
        &mem,
        &MapError::IovaOutOfRange {
            iova: Iova::new(0x1000),
        },
        || t.map(Iova::new(0x1000), PhysAddr::new(0), PageSize::SZ_4K, 1, RW),
    );
    // The walk reports upper-half addresses.
    let leaves: Vec<u64> = dump(&t)
        .into_iter()
        .filter_map(|i| match i {
            iopt_api::WalkItem::Leaf { iova, .. } => Some(iova.get()),
            _ => None,
        })
        .collect();
    assert!(leaves.iter().all(|&a| a >> 48 == 0xffff), "{leaves:x?}");
    // The very top of the upper half maps and unmaps.
    t.map(
        Iova::new(u64::MAX - 0xfff),
        PhysAddr::new(0x1000),
        PageSize::SZ_4K,
        1,
        RW,
    )
    .unwrap();
    // The device walks the upper half from TTBR1 with the TG1 encoding.
    let hw =
        iopt_sim::oracle::Walker::from_registers(Format::Arm64S1, &t.registers(), true, 0).unwrap();
    let access = iopt_sim::oracle::Access::READ;
    assert_eq!(
        hw.translate(&mem, u64::MAX - 0xff, access)
            .unwrap()
            .pa
            .get(),
        0x1f00
    );
    assert_eq!(
        hw.translate(&mem, hi | 0x4060_1234, access)
            .unwrap()
            .pa
            .get(),
        0x2_0000_1234
    );
    assert!(
        hw.translate(&mem, 0x4060_1234, access).is_err(),
        "lower half faults"
    );
    assert_eq!(
        t.unmap(
            Iova::new(u64::MAX - 0xfff),
            PageSize::SZ_4K,
            1,
            &mut Gather::new()
        ),
        Ok(0x1000)
    );
}

/// Fails the k-th page allocation of `op` for every k until it succeeds; returns how many
/// injection points were exercised.
fn inject_everywhere(
    build: for<'a> fn(&'a SimMemory) -> LpaeTable<&'a SimMemory>,
    op: impl Fn(&LpaeTable<&SimMemory>) -> Result<(), MapError>,
) -> u64 {
    let mut k = 0;
    loop {
        let mem = SimMemory::new();
        let t = build(&mem);
        let before = (dump(&t), mem.live_set());
        mem.fail_at(k);
        match op(&t) {
            Ok(()) => {
                assert_eq!(
                    mem.stats().injected_failures,
                    0,
                    "succeeded although allocation {k} failed"
                );
                drop(t);
                assert_eq!(mem.stats().live_pages, 0);
                return k;
            }
            Err(e) => {
                assert!(matches!(e, MapError::Alloc { .. }), "k={k}: {e:?}");
                assert_eq!((dump(&t), mem.live_set()), before, "k={k}: state changed");
                drop(t);
                assert_eq!(mem.stats().live_pages, 0, "k={k}: leaked");
                assert_eq!(mem.stats().bad_frees, 0);
            }
        }
        k += 1;
    }
}

#[test]
fn allocation_failure_at_every_point() {
    fn empty(m: &SimMemory) -> LpaeTable<&SimMemory> {
        LpaeTable::new(s1(48, 48, Quirks::empty()), m).unwrap()
    }
    fn one_page(m: &SimMemory) -> LpaeTable<&SimMemory> {
        let t = empty(m);
        t.map(
            Iova::new(0x4000_0000),
            PhysAddr::new(0),
            PageSize::SZ_4K,
            1,
            RW,
        )
        .unwrap();
        t
    }
    let mut points = 0;
    // One run inside one leaf table: the private chain of L1, L2, L3.
    points += inject_everywhere(empty, |t| {
        t.map(
            Iova::new(0x80_0000_0000),
            PhysAddr::new(0),
            PageSize::SZ_4K,
            16,
            RW,
        )
    });
    // A run across three leaf tables and two L1 entries (planned path).
    points += inject_everywhere(empty, |t| {
        t.map(
            Iova::new(0x7fff_f000),
            PhysAddr::new(0),
            PageSize::SZ_4K,
            0x401,
            RW,
        )
    });
    // map_range mixing 4K pages and 2M blocks.
    points += inject_everywhere(empty, |t| {
        t.map_range(
            Iova::new(0x1f_f000),
            PhysAddr::new(0x1f_f000),
            0x40_2000,
            RW,
        )
    });
    // Into a partly populated tree.
    points += inject_everywhere(one_page, |t| {
        t.map(
            Iova::new(0x4010_0000),
            PhysAddr::new(0),
            PageSize::SZ_4K,
            0x201,
            RW,
        )
    });
    assert!(points >= 12, "{points} injection points");
}

#[test]
fn root_allocation_failure_is_an_error() {
    let mem = SimMemory::new();
    mem.fail_at(0);
    assert!(LpaeTable::new(s1(48, 48, Quirks::empty()), &mem).is_err());
    assert_eq!(mem.stats().live_pages, 0);
}

#[test]
fn block_over_empty_table_replaces_it() {
    let mem = SimMemory::new();
    let rec = common::Recorder::new(PageSizes::GRANULE_4K);
    let t = LpaeTable::with_flush(s1(48, 48, Quirks::empty()), &mem, &rec).unwrap();
    t.map(
        Iova::new(0x20_0000),
        PhysAddr::new(0),
        PageSize::SZ_4K,
        1,
        RW,
    )
    .unwrap();
    t.unmap(Iova::new(0x20_0000), PageSize::SZ_4K, 1, &mut Gather::new())
        .unwrap();
    let live = mem.stats().live_pages;
    t.map(
        Iova::new(0x20_0000),
        PhysAddr::new(0x20_0000),
        PageSize::SZ_2M,
        1,
        RW,
    )
    .unwrap();
    assert_eq!(
        mem.stats().live_pages,
        live - 1,
        "the empty L3 table was freed"
    );
    assert_eq!(
        rec.walks.lock().unwrap().as_slice(),
        &[(0x20_0000, 0x20_0000, 0x1000)]
    );
    assert_eq!(
        t.iova_to_phys(Iova::new(0x20_1000)).unwrap().size,
        PageSize::SZ_2M
    );
}

#[test]
fn map_range_obtains_exactly_the_missing_tables() {
    // [2M - 4K, 4M + 4K) with 2M-contiguous backing: 4K page, 2M block, 4K page. Needs an L1,
    // an L2 and two L3 tables; the L1 and L2 are shared by all three runs.
    let mem = SimMemory::new();
    let t = LpaeTable::new(s1(48, 48, Quirks::empty()), &mem).unwrap();
    let start = 0x1f_f000;
    t.map_range(Iova::new(start), PhysAddr::new(start), 0x20_2000, RW)
        .unwrap();
    let s = t.stats();
    assert_eq!(
        (s.pages_allocated, s.pages_freed, s.live_tables),
        (1 + 4, 0, 1 + 4)
    );
}

#[test]
fn scatter_list_maps_like_the_iommu_core_and_all_or_nothing() {
    let mem = SimMemory::new();
    let t = LpaeTable::new(s1(48, 48, Quirks::empty()), &mem).unwrap();
    // Random-ish lists: compare with mapping each segment by map_range on a second table.
    let mut seed = 0x1234_5678_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut iova = 0x1_0000_0000u64;
    for _ in 0..20 {
        let segs: Vec<(PhysAddr, u64)> = (0..=next() % 5)
            .map(|_| {
                let pages = 1 + next() % 1100;
                let pa = (next() % (1 << 20)) << 12;
                (PhysAddr::new(pa), pages << 12)
            })
            .collect();
        let total: u64 = segs.iter().map(|s| s.1).sum();
        t.map_sg(Iova::new(iova), &segs, RW).unwrap();
        let mut at = iova;
        for &(pa, len) in &segs {
            for off in (0..len).step_by(0x1000) {
                assert_eq!(
                    t.iova_to_phys(Iova::new(at + off)).unwrap().pa.get(),
                    pa.get() + off
                );
            }
            at += len;
        }
        iova = (iova + total + 0x20_0000) & !0x1f_ffff;
    }
    // A list whose last segment collides changes nothing.
    let before = (dump(&t), mem.live_set());
    let segs = [
        (PhysAddr::new(0), 0x40_0000),
        (PhysAddr::new(0x1000), 0x1000),
    ];
    assert!(matches!(
        t.map_sg(Iova::new(0x1_0000_0000 - 0x40_0000), &segs, RW),
        Err(MapError::AlreadyMapped { .. })
    ));
    assert_eq!((dump(&t), mem.live_set()), before);
    // A misaligned segment is refused up front.
    let segs = [(PhysAddr::new(0x800), 0x1000)];
    assert!(matches!(
        t.map_sg(Iova::new(0x10_0000), &segs, RW),
        Err(MapError::Misaligned { .. })
    ));
    assert_eq!((dump(&t), mem.live_set()), before);
}

#[test]
fn unmap_collect_hands_back_the_removed_output_runs() {
    use iopt_api::PaRun;
    let mem = SimMemory::new();
    let t = LpaeTable::new(s1(48, 48, Quirks::empty()), &mem).unwrap();
    // Three 4K pages contiguous in PA, one elsewhere, then a 2M block.
    t.map(
        Iova::new(0x20_0000),
        PhysAddr::new(0x8000_0000),
        PageSize::SZ_4K,
        3,
        RW,
    )
    .unwrap();
    t.map(
        Iova::new(0x20_3000),
        PhysAddr::new(0x9000_0000),
        PageSize::SZ_4K,
        1,
        RW,
    )
    .unwrap();
    t.map(
        Iova::new(0x40_0000),
        PhysAddr::new(0xa000_0000),
        PageSize::SZ_2M,
        1,
        RW,
    )
    .unwrap();
    let mut removed = Vec::new();
    assert_eq!(
        t.unmap_collect(
            Iova::new(0x20_0000),
            PageSize::SZ_4K,
            4,
            &mut Gather::new(),
            &mut removed
        ),
        Ok(0x4000)
    );
    assert_eq!(
        removed,
        vec![
            PaRun {
                iova: Iova::new(0x20_0000),
                pa: PhysAddr::new(0x8000_0000),
                len: 0x3000
            },
            PaRun {
                iova: Iova::new(0x20_3000),
                pa: PhysAddr::new(0x9000_0000),
                len: 0x1000
            },
        ]
    );
    // Refused: nothing appended, nothing changed.
    let before = (dump(&t), mem.live_set());
    assert!(
        t.unmap_collect(
            Iova::new(0x20_0000),
            PageSize::SZ_4K,
            1,
            &mut Gather::new(),
            &mut removed
        )
        .is_err()
    );
    assert_eq!(removed.len(), 2);
    assert_eq!((dump(&t), mem.live_set()), before);
    // A covering unmap of a table hands back every leaf below it.
    t.map(
        Iova::new(0x60_0000),
        PhysAddr::new(0xb000_0000),
        PageSize::SZ_4K,
        2,
        RW,
    )
    .unwrap();
    t.map(
        Iova::new(0x60_5000),
        PhysAddr::new(0xb000_2000),
        PageSize::SZ_4K,
        1,
        RW,
    )
    .unwrap();
    removed.clear();
    assert_eq!(
        t.unmap_collect(
            Iova::new(0x40_0000),
            PageSize::SZ_2M,
            2,
            &mut Gather::new(),
            &mut removed
        ),
        Ok(4 << 20)
    );
    assert_eq!(
        removed,
        vec![
            PaRun {
                iova: Iova::new(0x40_0000),
                pa: PhysAddr::new(0xa000_0000),
                len: 2 << 20
            },
            PaRun {
                iova: Iova::new(0x60_0000),
                pa: PhysAddr::new(0xb000_0000),
                len: 0x2000
            },
            PaRun {
                iova: Iova::new(0x60_5000),
                pa: PhysAddr::new(0xb000_2000),
                len: 0x1000
            },
        ]
    );
}
