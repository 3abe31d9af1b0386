//! Scatter-list maps: the engine's planned `map_sg`, the trait's default (segment by segment
//! with rollback) and plain `map_range` calls one segment after the other build the same tree,
//! and succeed or fail together; a failed scatter-list map changes nothing.

mod common;

use common::dump;
use iopt_api::{
    Config, ConfigInput, Format, Gather, IoPageTable, Iova, MapError, PageSize, PageSizes,
    PhysAddr, Prot, Registers, Stats, Translation, UnmapError, WalkItem,
};
use iopt_lpae::LpaeTable;
use iopt_sim::SimMemory;
use proptest::prelude::*;

/// An engine table with only the required methods forwarded: `map_sg` is the trait default.
struct Plain<'a>(LpaeTable<&'a SimMemory>);

impl IoPageTable for Plain<'_> {
    fn config(&self) -> &Config {
        self.0.config()
    }
    fn map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        self.0.map(iova, pa, size, count, prot)
    }
    fn map_range(&self, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<(), MapError> {
        self.0.map_range(iova, pa, len, prot)
    }
    fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        self.0.unmap(iova, size, count, gather)
    }
    fn iova_to_phys(&self, iova: Iova) -> Option<Translation> {
        self.0.iova_to_phys(iova)
    }
    fn walk(&self, visit: &mut dyn FnMut(WalkItem)) {
        self.0.walk(visit);
    }
    fn root(&self) -> PhysAddr {
        self.0.root()
    }
    fn registers(&self) -> Registers {
        self.0.registers()
    }
    fn stats(&self) -> Stats {
        self.0.stats()
    }
}

fn cfg() -> Config {
    Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        39,
        40,
    ))
    .unwrap()
}

const RW: Prot = Prot::READ.union(Prot::WRITE);

/// The leaves only (tables may differ: a failed default map can leave empty tables behind,
/// as Linux's does; the engine's leaves none).
fn leaves(t: &dyn IoPageTable) -> Vec<WalkItem> {
    dump(t)
        .into_iter()
        .filter(|i| matches!(i, WalkItem::Leaf { .. }))
        .collect()
}

/// A segment: `(pa in 4K pages, pages, align the PA with the IOVA for blocks?)`.
fn segment() -> impl Strategy<Value = (u64, u64, bool)> {
    (
        0u64..4096,
        prop_oneof![1u64..8, 500u64..1100, Just(0)],
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn map_sg_equals_segment_by_segment(
        pre in prop::collection::vec((0u64..2048, 1u64..64), 0..4),
        at in 0u64..4096,
        segs in prop::collection::vec(segment(), 1..5),
    ) {
        let (m1, m2, m3) = (SimMemory::new(), SimMemory::new(), SimMemory::new());
        let planned = LpaeTable::new(cfg(), &m1).unwrap();
        let default = Plain(LpaeTable::new(cfg(), &m2).unwrap());
        let by_hand = LpaeTable::new(cfg(), &m3).unwrap();
        // Some pages in the way.
        for &(p, n) in &pre {
            let iova = Iova::new(0x4000_0000 + p * 0x1000);
            let pa = PhysAddr::new(0x1_0000_0000);
            let a = planned.map(iova, pa, PageSize::SZ_4K, n, RW);
            prop_assert_eq!(&a, &default.map(iova, pa, PageSize::SZ_4K, n, RW));
            prop_assert_eq!(&a, &by_hand.map(iova, pa, PageSize::SZ_4K, n, RW));
        }
        let iova = 0x4000_0000 + at * 0x1000;
        let mut list = Vec::new();
        let mut next = iova;
        for &(pa, pages, aligned) in &segs {
            let pa = 0x2_0000_0000 + pa * 0x1000;
            let pa = if aligned { (pa & !0x1f_ffff) | (next & 0x1f_ffff) } else { pa };
            list.push((PhysAddr::new(pa), pages * 0x1000));
            next += pages * 0x1000;
        }
        let before = (leaves(&planned), m1.live_set());
        let got = planned.map_sg(Iova::new(iova), &list, RW);
        let got_default = default.map_sg(Iova::new(iova), &list, RW);
        let mut want = Ok(());
        let mut at = iova;
        for &(pa, len) in &list {
            want = by_hand.map_range(Iova::new(at), pa, len, RW);
            if want.is_err() {
                break;
            }
            at += len;
        }
        prop_assert_eq!(got.is_ok(), want.is_ok(), "{:?} vs {:?}", got, want);
        prop_assert_eq!(got_default.is_ok(), want.is_ok(), "{:?} vs {:?}", got_default, want);
        if got.is_ok() {
            prop_assert_eq!(leaves(&planned), leaves(&by_hand));
            prop_assert_eq!(leaves(&default), leaves(&by_hand));
        } else {
            // All or nothing: the planned map touched nothing, the default rolled back.
            prop_assert_eq!((leaves(&planned), m1.live_set()), before.clone());
            prop_assert_eq!(leaves(&default), before.0);
        }
    }
}
