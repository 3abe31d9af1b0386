//! Dirty tracking: device writes through the hardware-walk oracle (behaving as an SMMU with
//! HTTU) are exactly what `read_and_clear_dirty` reports, cleaning works, and refused calls
//! change nothing.

use iopt_api::{
    Config, ConfigInput, DirtyError, Format, Gather, IoPageTable, Iova, IovaRange, PageSize,
    PageSizes, PhysAddr, Prot, Quirks,
};
use iopt_lpae::LpaeTable;
use iopt_lpae::dirty::{DirtyBitmap, DirtyFlags};
use iopt_sim::SimMemory;
use iopt_sim::oracle::{Access, Fault, Walker};

const RW: Prot = Prot::READ.union(Prot::WRITE);

fn hd_table(mem: &SimMemory) -> (LpaeTable<&SimMemory>, Walker) {
    let cfg = Config::new(
        ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48).with_quirks(Quirks::HD),
    )
    .unwrap();
    let t = LpaeTable::new(cfg, mem).unwrap();
    let w = Walker::from_registers(cfg.format(), &t.registers(), false, 0).unwrap();
    (t, w)
}

fn harvest(t: &LpaeTable<&SimMemory>, range: IovaRange, flags: DirtyFlags) -> Vec<(Iova, u64)> {
    let mut out = Vec::new();
    t.engine()
        .read_and_clear_dirty(range, flags, &mut out, &mut Gather::new())
        .unwrap();
    out
}

#[test]
fn device_writes_are_what_is_reported() {
    let mem = SimMemory::new();
    let (t, hw) = hd_table(&mem);
    t.map(
        Iova::new(0x40_0000),
        PhysAddr::new(0x8000_0000),
        PageSize::SZ_4K,
        512,
        RW,
    )
    .unwrap();
    t.map(
        Iova::new(0x60_0000),
        PhysAddr::new(0x9000_0000),
        PageSize::SZ_2M,
        1,
        RW,
    )
    .unwrap();
    t.map(
        Iova::new(0x80_0000),
        PhysAddr::new(0xa000_0000),
        PageSize::SZ_4K,
        4,
        Prot::READ,
    )
    .unwrap();
    let all = IovaRange::new(Iova::new(0x40_0000), 0x40_4000, 0x1000).unwrap();
    // Writable leaves start dirty: all 512 pages and the block; the read-only pages never.
    let first = harvest(&t, all, DirtyFlags::empty());
    assert_eq!(first.len(), 513);
    assert!(
        first.contains(&(Iova::new(0x60_0000), 2 << 20)),
        "the whole block is reported"
    );
    // Cleaned: a second harvest reports nothing, and a write now still succeeds (DBM).
    assert!(harvest(&t, all, DirtyFlags::empty()).is_empty());
    // The device writes three pages and inside the block.
    for iova in [0x40_1008u64, 0x40_1ff0, 0x40_3000, 0x7f_fff8] {
        hw.device_write(&mem, iova).unwrap();
    }
    let mut bitmap = DirtyBitmap::new(Iova::new(0x40_0000), 12, 0x404).unwrap();
    t.engine()
        .read_and_clear_dirty(all, DirtyFlags::empty(), &mut bitmap, &mut Gather::new())
        .unwrap();
    let pages: Vec<u64> = bitmap.dirty_pages().map(Iova::get).collect();
    let mut want = vec![0x40_1000, 0x40_3000];
    want.extend((0x60_0000..0x80_0000).step_by(0x1000));
    assert_eq!(pages, want);
    assert!(
        harvest(&t, all, DirtyFlags::empty()).is_empty(),
        "second call reports nothing"
    );
    // NO_CLEAR reports without cleaning.
    hw.device_write(&mem, 0x40_2000).unwrap();
    let one = IovaRange::new(Iova::new(0x40_2000), 0x1000, 0x1000).unwrap();
    assert_eq!(
        harvest(&t, one, DirtyFlags::NO_CLEAR),
        vec![(Iova::new(0x40_2000), 0x1000)]
    );
    assert_eq!(
        harvest(&t, one, DirtyFlags::empty()),
        vec![(Iova::new(0x40_2000), 0x1000)]
    );
    assert!(harvest(&t, one, DirtyFlags::empty()).is_empty());
    // Read-only leaves stay read-only for the device.
    assert_eq!(
        hw.device_write(&mem, 0x80_0000),
        Err(Fault::Permission { level: 3 })
    );
    assert!(hw.translate(&mem, 0x80_0000, Access::READ).is_ok());
}

#[test]
fn refused_harvests_change_nothing() {
    let mem = SimMemory::new();
    let (t, _) = hd_table(&mem);
    t.map(
        Iova::new(0x40_0000),
        PhysAddr::new(0x8000_0000),
        PageSize::SZ_4K,
        2,
        RW,
    )
    .unwrap();
    // A hole after the first two pages: refused before anything is cleaned.
    let with_hole = IovaRange::new(Iova::new(0x40_0000), 0x3000, 0x1000).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        t.engine().read_and_clear_dirty(
            with_hole,
            DirtyFlags::empty(),
            &mut out,
            &mut Gather::new()
        ),
        Err(DirtyError::NotMapped {
            iova: Iova::new(0x40_2000)
        })
    );
    assert!(out.is_empty());
    let ok = IovaRange::new(Iova::new(0x40_0000), 0x2000, 0x1000).unwrap();
    assert_eq!(
        harvest(&t, ok, DirtyFlags::empty()).len(),
        2,
        "still dirty after the refused call"
    );
    let far = IovaRange::new(Iova::new(1 << 48), 0x1000, 0x1000).unwrap();
    assert!(matches!(
        t.engine()
            .read_and_clear_dirty(far, DirtyFlags::empty(), &mut out, &mut Gather::new()),
        Err(DirtyError::OutOfRange { .. })
    ));
    // Other formats do not track dirty state.
    let s2 = Config::new(ConfigInput::new(
        Format::Arm64S2,
        PageSizes::GRANULE_4K,
        48,
        48,
    ))
    .unwrap();
    let t2 = LpaeTable::new(s2, &mem).unwrap();
    assert_eq!(
        t2.engine()
            .read_and_clear_dirty(ok, DirtyFlags::empty(), &mut out, &mut Gather::new()),
        Err(DirtyError::Unsupported {
            format: Format::Arm64S2
        })
    );
}
