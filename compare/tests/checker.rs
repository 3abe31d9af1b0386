//! The checker catches a backend that is wrong: wrappers around Design 1 that map the wrong
//! address, skip an unmap, or lose a reservation's pages are each stopped with the call, its
//! inputs and both results.

use compare::check::{Call, CheckOptions, CheckedTable};
use compare::designs::design1;
use compare::harness::{Design, RunError, RunOptions, run};
use compare::ops::TableKind;
use compare::policy::Policy;
use compare::workload::{Kind, Params, generate};
use iopt_alloc_ops::AllocOpsTable;
use iopt_api::{
    Config, Gather, IoPageTable, Iova, IovaRange, MapError, PageSize, PhysAddr, Prot, Registers,
    ReleaseError, Reservation, Reserve, ReserveError, Stats, Translation, UnmapError, WalkItem,
};
use iopt_model::ReservePolicy;
use iopt_sim::SimMemory;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    WrongPa,
    SkipUnmap,
    WrongError,
}

/// Design 1 with one injected bug, triggered on the `at`-th call of its kind.
#[derive(Debug)]
struct Faulty {
    inner: AllocOpsTable<Arc<SimMemory>>,
    fault: Fault,
    at: u64,
    n: AtomicU64,
}

impl Faulty {
    fn hit(&self) -> bool {
        self.n.fetch_add(1, Ordering::Relaxed) == self.at
    }
}

impl IoPageTable for Faulty {
    fn config(&self) -> &Config {
        self.inner.config()
    }
    fn map(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        self.inner.map(iova, pa, size, count, prot)
    }
    fn map_range(&self, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<(), MapError> {
        self.inner.map_range(iova, pa, len, prot)
    }
    fn unmap(
        &self,
        iova: Iova,
        size: PageSize,
        count: u64,
        gather: &mut Gather,
    ) -> Result<u64, UnmapError> {
        if self.fault == Fault::SkipUnmap && self.hit() {
            return Ok(size.get() * count);
        }
        self.inner.unmap(iova, size, count, gather)
    }
    fn iova_to_phys(&self, iova: Iova) -> Option<Translation> {
        self.inner.iova_to_phys(iova)
    }
    fn walk(&self, visit: &mut dyn FnMut(WalkItem)) {
        self.inner.walk(visit);
    }
    fn root(&self) -> PhysAddr {
        self.inner.root()
    }
    fn registers(&self) -> Registers {
        self.inner.registers()
    }
    fn stats(&self) -> Stats {
        self.inner.stats()
    }
}

impl Reserve for Faulty {
    fn reserve(&self, range: IovaRange, max_leaf: PageSize) -> Result<Reservation, ReserveError> {
        self.inner.reserve(range, max_leaf)
    }
    fn map_reserved(
        &self,
        r: &Reservation,
        iova: Iova,
        pa: PhysAddr,
        size: PageSize,
        count: u64,
        prot: Prot,
    ) -> Result<(), MapError> {
        match self.fault {
            Fault::WrongPa if self.hit() => self.inner.map_reserved(
                r,
                iova,
                PhysAddr::new(pa.get() + size.get()),
                size,
                count,
                prot,
            ),
            Fault::WrongError => {
                // The first map the table refuses reports the wrong error.
                let got = self.inner.map_reserved(r, iova, pa, size, count, prot);
                if got.is_err() && self.hit() {
                    return Err(MapError::Empty { iova });
                }
                got
            }
            _ => self.inner.map_reserved(r, iova, pa, size, count, prot),
        }
    }
    fn release(&self, r: Reservation, gather: &mut Gather) -> Result<(), ReleaseError> {
        self.inner.release(r, gather)
    }
    fn pages_needed(&self, range: IovaRange, leaf: PageSize) -> Result<usize, ReserveError> {
        self.inner.pages_needed(range, leaf)
    }
}

fn faulty(fault: Fault, at: u64) -> Design<Faulty> {
    Design {
        name: format!("faulty {fault:?}"),
        policy: Policy::PerBind,
        model: ReservePolicy::Pools { cap: None },
        build: Box::new(move |cfg, mem| {
            Ok(Faulty {
                inner: AllocOpsTable::new(cfg, mem)?,
                fault,
                at,
                n: AtomicU64::new(0),
            })
        }),
    }
}

fn divergence(fault: Fault, kind: Kind, at: u64) -> compare::check::Divergence {
    let w = generate(
        kind,
        &Params {
            scale: 0.05,
            ..Params::default()
        },
    );
    match run(&faulty(fault, at), &w, &RunOptions::default(), &mut |_| {}) {
        Err(RunError::Divergence(d)) => *d,
        other => panic!("{fault:?} not caught: {other:?}"),
    }
}

#[test]
fn a_wrong_address_is_caught() {
    let d = divergence(Fault::WrongPa, Kind::VmBind, 5);
    eprintln!("{d}");
    assert!(matches!(d.call, Call::Map { .. }), "{d}");
    assert!(
        d.what.contains("lookup") || d.what.contains("oracle"),
        "{d}"
    );
    assert!(d.context.contains("faulty WrongPa on vm-bind"), "{d}");
    // The report names the call and its inputs.
    assert!(d.to_string().contains("map_reserved(#"), "{d}");
}

#[test]
fn a_skipped_unmap_is_caught() {
    let d = divergence(Fault::SkipUnmap, Kind::DmaStream, 3);
    assert!(matches!(d.call, Call::Unmap { .. }), "{d}");
}

#[test]
fn a_wrong_error_is_caught() {
    // The random mix makes maps fail; the first failing one reports the wrong error.
    let d = divergence(Fault::WrongError, Kind::RandomMix, 0);
    assert_eq!(d.what, "map result", "{d}");
    assert!(d.backend.contains("Empty"), "{d}");
}

#[test]
fn the_real_backends_agree_with_the_model_on_the_adversarial_mix() {
    let w = generate(
        Kind::RandomMix,
        &Params {
            seed: 11,
            scale: 0.15,
            ..Params::default()
        },
    );
    let opts = RunOptions::default();
    let a = run(&design1(), &w, &opts, &mut |_| {}).expect("Design 1 agrees");
    let b = run(&compare::designs::design2(), &w, &opts, &mut |_| {}).expect("Design 2 agrees");
    assert!(a.metrics.jobs_failed > 0, "the mix makes jobs fail");
    assert!(a.metrics.jobs_refused > 0, "and refuses some at submit");
    assert!(b.metrics.checked_calls > 100);
}

#[test]
fn checked_table_by_hand() {
    let cfg = TableKind::Panthor.config();
    let mem = Arc::new(SimMemory::new());
    let table = AllocOpsTable::new(cfg, Arc::clone(&mem)).unwrap();
    let mut t = CheckedTable::new(
        &table,
        &mem,
        ReservePolicy::Pools { cap: None },
        CheckOptions::default(),
    );
    let range = IovaRange::new(Iova::new(0x20_0000), 0x40_0000, 0x1000).unwrap();
    let r = t.reserve(range, PageSize::SZ_4K).unwrap().unwrap();
    assert_eq!(r.pages(), 4);
    t.map(Some(&r), 0x20_0000, 0x4000_0000, 2 << 20, 1, Prot::READ)
        .unwrap()
        .unwrap();
    // Cutting the block is refused identically.
    assert!(matches!(
        t.unmap(0x20_1000, 0x1000, 1).unwrap(),
        Err(UnmapError::PartialBlock { .. })
    ));
    // Outside the reservation: refused identically.
    assert!(matches!(
        t.map(Some(&r), 0x60_0000, 0x5000_0000, 0x1000, 1, Prot::READ)
            .unwrap(),
        Err(MapError::OutsideReservation { .. })
    ));
    t.release(r).unwrap().unwrap();
    t.full_check().unwrap();
    assert!(t.checker().calls() >= 4);
}
