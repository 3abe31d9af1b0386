//! Linux's io-pgtable-arm selftest sequence (`arm_lpae_run_tests`, v6.14+), over every granule
//! set × (ias ≤ oas) pair × stage 1 and 2, with a flush recorder that fails on any flush size
//! outside the page-size bitmap, and the hardware-walk oracle checking every translation.

#![allow(clippy::too_many_lines, clippy::type_complexity)] // table-driven tests

mod common;

use common::Recorder;
use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, PageSizes, PhysAddr, Prot, Quirks,
};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;
use iopt_sim::oracle::{Access, Walker};

const SIZES: [u32; 6] = [32, 36, 40, 42, 44, 48];

fn check_hw(t: &LpaeTable<&SimMemory, &Recorder>, mem: &SimMemory, w: &Walker, iova: u64) {
    let sw = t.iova_to_phys(Iova::new(iova));
    // Write-only stage-2 leaves fault on reads, as hardware does: probe with an allowed access.
    let write = sw.is_some_and(|s| !s.prot.contains(Prot::READ));
    let hw = w.translate(
        mem,
        iova,
        Access {
            write,
            exec: false,
            privileged: true,
        },
    );
    match (sw, hw) {
        (Some(s), Ok(h)) => assert_eq!(
            (s.pa, u64::from(s.level)),
            (h.pa, u64::from(h.level)),
            "iova {iova:#x}"
        ),
        (None, Err(_)) => {}
        (s, h) => panic!("software {s:?} vs hardware {h:?} at {iova:#x}"),
    }
}

fn run(format: Format, sizes: PageSizes, ias: u32, oas: u32) -> usize {
    let cfg = Config::new(ConfigInput::new(format, sizes, ias, oas).with_quirks(Quirks::NO_WARN))
        .unwrap_or_else(|e| panic!("{format} {sizes:?} {ias}/{oas}: {e}"));
    let mem = SimMemory::new();
    let rec = Recorder::new(cfg.page_sizes());
    let t = LpaeTable::with_flush(cfg, &mem, &rec).unwrap();
    let hw = Walker::from_registers(format, &t.registers(), false, 0).expect("walker");
    let rw = Prot::READ | Prot::WRITE | Prot::NOEXEC | Prot::CACHE;
    for iova in [42, (1 << 30) + 42, (2 << 30) + 42] {
        assert!(t.iova_to_phys(Iova::new(iova)).is_none());
        check_hw(&t, &mem, &hw, iova);
    }
    let sizes: Vec<_> = cfg.page_sizes().iter().collect();
    let step = |i: usize| i as u64 * (1 << 30);
    for (i, &size) in sizes.iter().enumerate() {
        let iova = step(i);
        if !cfg.iova_in_range(Iova::new(iova + size.get() - 1)) {
            continue; // Linux's selftest skips nothing here for its own matrix; neither do we below.
        }
        t.map(Iova::new(iova), PhysAddr::new(iova), size, 1, rw)
            .unwrap();
        let err = t.map(
            Iova::new(iova),
            PhysAddr::new(iova + size.get()),
            size,
            1,
            Prot::READ | Prot::NOEXEC,
        );
        assert!(
            matches!(err, Err(iopt_api::MapError::AlreadyMapped { .. })),
            "{err:?}"
        );
        assert_eq!(
            t.iova_to_phys(Iova::new(iova + 42)).unwrap().pa,
            PhysAddr::new(iova + 42)
        );
        check_hw(&t, &mem, &hw, iova + 42);
    }
    let mut gather = Gather::new();
    for (i, &size) in sizes.iter().enumerate() {
        let iova = step(i);
        if !cfg.iova_in_range(Iova::new(iova + size.get() - 1)) {
            continue;
        }
        assert_eq!(
            t.unmap(Iova::new(iova), size, 1, &mut gather).unwrap(),
            size.get()
        );
        assert!(t.iova_to_phys(Iova::new(iova + 42)).is_none());
        check_hw(&t, &mem, &hw, iova + 42);
        t.map(Iova::new(iova), PhysAddr::new(iova), size, 1, Prot::WRITE)
            .unwrap();
        assert_eq!(
            t.iova_to_phys(Iova::new(iova + 42)).unwrap().pa,
            PhysAddr::new(iova + 42)
        );
        check_hw(&t, &mem, &hw, iova + 42);
    }
    // Top of the IAS: the last root entry (the last granule of a concatenated root).
    let largest = cfg.page_sizes().largest().unwrap();
    let top = (1u64 << cfg.ias()) - largest.get();
    t.map(Iova::new(top), PhysAddr::new(top), largest, 1, rw)
        .unwrap();
    check_hw(&t, &mem, &hw, top + 42);
    assert_eq!(
        t.unmap(Iova::new(top), largest, 1, &mut gather).unwrap(),
        largest.get()
    );
    drop(t);
    assert_eq!(*rec.alls.lock().unwrap(), 1, "flush_all once at teardown");
    assert_eq!(mem.stats().live_pages, 0, "teardown returns every page");
    assert_eq!(mem.stats().bad_frees, 0);
    rec.pages.lock().unwrap().len()
}

#[test]
fn linux_selftest_matrix() {
    let mut tables = 0;
    for format in [Format::Arm64S1, Format::Arm64S2] {
        for sizes in [
            PageSizes::GRANULE_4K,
            PageSizes::GRANULE_16K,
            PageSizes::GRANULE_64K,
        ] {
            for oas in SIZES {
                for ias in SIZES.into_iter().filter(|&i| i <= oas) {
                    let cfg = Config::new(
                        ConfigInput::new(format, sizes, ias, oas).with_quirks(Quirks::NO_WARN),
                    );
                    match cfg {
                        Ok(_) => {
                            run(format, sizes, ias, oas);
                            tables += 1;
                        }
                        // Only mandatory concatenations needing more than 16 root tables fail.
                        Err(iopt_api::ConfigError::ConcatenationTooLarge { .. }) => {
                            assert_eq!(format, Format::Arm64S2);
                        }
                        Err(e) => panic!("{format} {sizes:?} {ias}/{oas}: {e}"),
                    }
                }
            }
        }
    }
    // 21 pairs x 3 granules x 2 stages, minus the stage-2 configurations the v6.14 rule rejects.
    assert!(tables >= 120, "ran {tables} tables");
}
