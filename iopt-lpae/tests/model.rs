//! Differential property test: random map / map_range / unmap / lookup sequences in a small
//! IOVA window (so operations collide), checked after every operation against an independent
//! model of Linux's semantics and tree shape, and against the hardware-walk oracle.

#![allow(clippy::too_many_lines)]

mod common;

use common::dump;
use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, MapError, PageSize, PageSizes,
    PhysAddr, Prot, Quirks, UnmapError, WalkItem,
};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;
use iopt_sim::oracle::{Access, Walker};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// The model: leaves by first IOVA, and the set of table pages that exist (level, index of the
/// region they cover), which under Linux's policy appear with the first leaf below them and go
/// only with a covering unmap or a block map over them.
#[derive(Debug, Default, Clone)]
struct Model {
    leaves: BTreeMap<u64, (u64, u64, Prot)>, // iova -> (size, pa, prot)
    tables: BTreeSet<(u32, u64)>,
}

impl Model {
    fn overlaps(&self, start: u64, len: u64) -> Option<u64> {
        let end = start + len;
        // A leaf starting before `start` may cover it.
        if let Some((&i, &(s, _, _))) = self.leaves.range(..start).next_back() {
            if i + s > start {
                return Some(start);
            }
        }
        self.leaves.range(start..end).next().map(|(&i, _)| i)
    }

    fn tables_on_path(
        cfg: &Config,
        iova: u64,
        level: u32,
    ) -> impl Iterator<Item = (u32, u64)> + '_ {
        (cfg.start_level() + 1..=level).map(move |l| (l, iova >> cfg.level_shift(l - 1)))
    }

    fn drop_tables_under(&mut self, cfg: &Config, iova: u64, level: u32) {
        let size = cfg.block_size(level);
        self.tables.retain(|&(l, idx)| {
            if l <= level {
                return true;
            }
            let start = idx << cfg.level_shift(l - 1);
            !(start >= iova && start < iova + size)
        });
    }

    fn map(
        &mut self,
        cfg: &Config,
        iova: u64,
        pa: u64,
        size: u64,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        // The error names the first page of the run that overlaps an existing leaf.
        if self.overlaps(iova, size * count).is_some() {
            let k = (0..count)
                .find(|k| self.overlaps(iova + k * size, size).is_some())
                .unwrap();
            return Err(MapError::AlreadyMapped {
                iova: Iova::new(iova + k * size),
            });
        }
        let level = cfg.leaf_level(PageSize::new(size).unwrap()).unwrap();
        for k in 0..count {
            let i = iova + k * size;
            let new: Vec<_> = Self::tables_on_path(cfg, i, level).collect();
            self.tables.extend(new);
            // A block replaces any (necessarily empty) table below it.
            if level < 3 {
                self.drop_tables_under(cfg, i, level);
            }
            self.leaves
                .insert(i, (size, pa + k * size, cfg.effective_prot(prot)));
        }
        Ok(())
    }

    fn unmap(&mut self, cfg: &Config, iova: u64, size: u64, count: u64) -> Result<u64, UnmapError> {
        let level = cfg.leaf_level(PageSize::new(size).unwrap()).unwrap();
        // Check everything first: each target entry must hold a leaf of exactly this size or a
        // table; a larger leaf covering it is a partial unmap.
        for k in 0..count {
            let i = iova + k * size;
            if let Some((&li, &(ls, _, _))) = self.leaves.range(..=i).next_back() {
                if li + ls > i && ls > size {
                    return Err(UnmapError::PartialBlock {
                        iova: Iova::new(i),
                        size: PageSize::new(size).unwrap(),
                        leaf: PageSize::new(ls).unwrap(),
                    });
                }
            }
            let is_leaf = self.leaves.get(&i).is_some_and(|&(s, _, _)| s == size);
            let is_table = level < 3
                && self
                    .tables
                    .contains(&(level + 1, i >> cfg.level_shift(level)));
            if !is_leaf && !is_table {
                return Err(UnmapError::NotMapped { iova: Iova::new(i) });
            }
        }
        for k in 0..count {
            let i = iova + k * size;
            let gone: Vec<u64> = self.leaves.range(i..i + size).map(|(&a, _)| a).collect();
            for a in gone {
                self.leaves.remove(&a);
            }
            if level < 3 {
                self.drop_tables_under(cfg, i, level);
            }
        }
        Ok(size * count)
    }

    fn lookup(&self, iova: u64) -> Option<(u64, u64, Prot)> {
        let (&i, &(s, pa, prot)) = self.leaves.range(..=iova).next_back()?;
        (i + s > iova).then_some((pa + (iova - i), s, prot))
    }
}

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
    let mut model = Model::default();
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
                let want = if prot.is_accessible() {
                    model.map(&cfg, iova, pa, size, count, prot)
                } else {
                    Err(MapError::NoAccess { prot })
                };
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
                match got {
                    Ok(()) => {
                        // Model it piece by piece as the iommu core would split it.
                        let mut done = 0;
                        while done < len {
                            let (s, n) = cfg
                                .page_sizes()
                                .best_fit(iova + done, pa + done, len - done)
                                .unwrap();
                            model
                                .map(&cfg, iova + done, pa + done, s.get(), n, prot)
                                .unwrap();
                            done += s.get() * n;
                        }
                    }
                    Err(MapError::AlreadyMapped { .. }) => {
                        assert!(model.overlaps(iova, len).is_some(), "spurious conflict");
                        assert_eq!(
                            (dump(&t), mem.live_set()),
                            before,
                            "refused map_range changed state"
                        );
                    }
                    Err(e) => panic!("map_range: {e:?}"),
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
                let want = model.unmap(&cfg, iova, size, count);
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
                tables.insert((level, iova.get() >> cfg.level_shift(level - 1)));
            }
            _ => {}
        });
        assert_eq!(leaves, model.leaves, "leaves after {op:?}");
        assert_eq!(tables, model.tables, "tables after {op:?}");
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
