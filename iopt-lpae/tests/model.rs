//! Differential property test: random map / map_range / unmap / lookup sequences in a small
//! IOVA window (so operations collide), checked after every operation against an independent
//! model of Linux's semantics and tree shape (`iopt-model`, the workspace's one reference model,
//! with Design 1's reservation policy and no reservations: exactly Linux's on-demand table), and
//! against the hardware-walk oracle.

#![allow(clippy::too_many_lines)]

mod common;

use common::dump;
use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, PageSize, PageSizes, PhysAddr, Prot,
    Quirks, WalkItem,
};
use iopt_lpae::LpaeTable;
use iopt_model::{Model, ReservePolicy};
use iopt_sim::SimMemory;
use iopt_sim::oracle::{Access, Walker};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
enum Op {
    Map {
        page: u64,
        size_idx: usize,
        count: u64,
        pa_page: u64,
        prot: u32,
    },
    MapRange {
        page: u64,
        pages: u64,
        pa_page: u64,
        prot: u32,
    },
    Unmap {
        page: u64,
        size_idx: usize,
        count: u64,
    },
    Lookup {
        page: u64,
        offset: u64,
    },
}

/// Window: 4 GiB, so 1G blocks, 2M blocks and 4K pages all collide.
const WINDOW_PAGES: u64 = 1 << 20;

fn op() -> impl Strategy<Value = Op> {
    let page = 0..WINDOW_PAGES;
    prop_oneof![
        4 => (page.clone(), 0..3usize, 1..600u64, 0..(1u64 << 24), 0..64u32)
            .prop_map(|(page, size_idx, count, pa_page, prot)| Op::Map { page, size_idx, count, pa_page, prot }),
        2 => (page.clone(), 1..2048u64, 0..(1u64 << 24), 0..64u32)
            .prop_map(|(page, pages, pa_page, prot)| Op::MapRange { page, pages, pa_page, prot }),
        3 => (page.clone(), 0..3usize, 1..600u64).prop_map(|(page, size_idx, count)| Op::Unmap { page, size_idx, count }),
        2 => (page, 0..4096u64).prop_map(|(page, offset)| Op::Lookup { page, offset }),
    ]
}

fn run(cfg: Config, ops: &[Op]) {
    let mem = SimMemory::new();
    let t = LpaeTable::new(cfg, &mem).unwrap();
    let hw = Walker::from_registers(cfg.format(), &t.registers(), false, cfg.ias()).unwrap();
    let mut model = Model::new(cfg, ReservePolicy::Pools { cap: None });
    let sizes: Vec<u64> = cfg.page_sizes().iter().map(PageSize::get).collect();
    let check = |iova: u64, model: &Model, t: &LpaeTable<&SimMemory>| {
        let got = t
            .iova_to_phys(Iova::new(iova))
            .map(|x| (x.pa.get(), x.size.get(), x.prot));
        assert_eq!(got, model.lookup(iova), "lookup {iova:#x}");
        // Probe with an access the leaf allows (write-only leaves fault on reads).
        let write = model
            .lookup(iova)
            .is_some_and(|(_, _, p)| !p.contains(Prot::READ));
        let dev = hw.translate(
            &mem,
            iova,
            Access {
                write,
                exec: false,
                privileged: true,
            },
        );
        match (model.lookup(iova), dev) {
            (Some((pa, size, _)), Ok(h)) => assert_eq!(
                (h.pa.get(), h.leaf_size),
                (pa, size),
                "device walk {iova:#x}"
            ),
            (None, Err(_)) => {}
            (m, d) => panic!("model {m:?} vs device {d:?} at {iova:#x}"),
        }
    };
    for op in ops {
        match *op {
            Op::Map {
                page,
                size_idx,
                count,
                pa_page,
                prot,
            } => {
                let size = sizes[size_idx % sizes.len()];
                let pages = size / 4096;
                let iova = (page / pages) * size;
                let count = count.min((WINDOW_PAGES * 4096 - iova) / size).max(1);
                let pa = (pa_page / pages) * size;
                let prot = Prot::from_bits_retain(prot);
                let got = t.map(
                    Iova::new(iova),
                    PhysAddr::new(pa),
                    PageSize::new(size).unwrap(),
                    count,
                    prot,
                );
                let want = model.map(None, iova, pa, size, count, prot);
                assert_eq!(got, want, "map {iova:#x} {size:#x} x{count}");
                check(iova, &model, &t);
            }
            Op::MapRange {
                page,
                pages,
                pa_page,
                prot,
            } => {
                // Same offset modulo 2M so blocks get used where alignment allows.
                let iova = page * 4096;
                let pa = (pa_page << 12 & !0x1f_ffff) | (iova & 0x1f_ffff);
                let len = (pages * 4096).min(WINDOW_PAGES * 4096 - iova);
                let prot = Prot::from_bits_retain(prot) | Prot::READ;
                let before = (dump(&t), mem.live_set());
                let got = t.map_range(Iova::new(iova), PhysAddr::new(pa), len, prot);
                let want = model.map_range(iova, pa, len, prot);
                assert_eq!(got, want, "map_range {iova:#x} {len:#x}");
                if got.is_err() {
                    assert_eq!(
                        (dump(&t), mem.live_set()),
                        before,
                        "refused map_range changed state"
                    );
                }
                check(iova, &model, &t);
            }
            Op::Unmap {
                page,
                size_idx,
                count,
            } => {
                let size = sizes[size_idx % sizes.len()];
                let iova = (page / (size / 4096)) * size;
                let count = count.min((WINDOW_PAGES * 4096 - iova) / size).max(1);
                let before = (dump(&t), mem.live_set());
                let got = t.unmap(
                    Iova::new(iova),
                    PageSize::new(size).unwrap(),
                    count,
                    &mut Gather::new(),
                );
                let want = model.unmap(iova, size, count);
                assert_eq!(got, want, "unmap {iova:#x} {size:#x} x{count}");
                if got.is_err() {
                    assert_eq!(
                        (dump(&t), mem.live_set()),
                        before,
                        "refused unmap changed state"
                    );
                }
                check(iova, &model, &t);
            }
            Op::Lookup { page, offset } => check(page * 4096 + offset * 8 % 4096, &model, &t),
        }
        // Structure: the leaves and the tables equal the model's.
        let mut leaves = BTreeMap::new();
        let mut tables = BTreeSet::new();
        t.walk(&mut |item| match item {
            WalkItem::Leaf {
                iova,
                size,
                pa,
                prot,
                ..
            } => {
                leaves.insert(iova.get(), (size.get(), pa.get(), prot));
            }
            WalkItem::Table { iova, level, .. } if level > cfg.start_level() => {
                tables.insert((level, iova.get()));
            }
            _ => {}
        });
        let want_leaves: BTreeMap<u64, (u64, u64, Prot)> = model
            .leaves()
            .iter()
            .map(|(&i, l)| (i, (l.size, l.pa, l.prot)))
            .collect();
        let want_tables: BTreeSet<(u32, u64)> = model.table_keys().into_iter().collect();
        assert_eq!(leaves, want_leaves, "leaves after {op:?}");
        assert_eq!(tables, want_tables, "tables after {op:?}");
        assert_eq!(
            mem.stats().live_pages,
            tables.len() as u64 + 1,
            "allocator live set = reachable tables"
        );
    }
    drop(t);
    assert_eq!(mem.stats().live_pages, 0);
    assert_eq!(mem.stats().bad_frees, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn s1_4k_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let cfg = Config::new(ConfigInput::new(Format::Arm64S1, PageSizes::GRANULE_4K, 48, 48)).unwrap();
        run(cfg, &ops);
    }

    #[test]
    fn s2_concatenated_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let cfg = Config::new(ConfigInput::new(Format::Arm64S2, PageSizes::GRANULE_4K, 40, 40)).unwrap();
        run(cfg, &ops);
    }

    #[test]
    fn mali_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let cfg = Config::new(ConfigInput::new(Format::Mali, PageSizes::GRANULE_4K, 36, 40)).unwrap();
        run(cfg, &ops);
    }

    #[test]
    fn s1_ns_32bit_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let cfg = Config::new(ConfigInput::new(Format::Arm32S1, PageSizes::GRANULE_4K, 32, 40).with_quirks(Quirks::NS)).unwrap();
        run(cfg, &ops);
    }
}
