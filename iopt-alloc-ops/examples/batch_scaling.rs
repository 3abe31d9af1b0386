//! Per-map cost of maps bound to one batch reservation over `n` disjoint ranges, at
//! n = 10^3, 10^4 and 10^5: the bounds check of a batch map must not grow with the batch.
//!
//! Run: `cargo run --release -p iopt-alloc-ops --example batch_scaling`.

use iopt_alloc_ops::{AllocOpsTable, CountPolicy};
use iopt_api::{
    Config, ConfigInput, Format, Gather, Iova, IovaRange, PageSize, PageSizes, PhysAddr, Prot,
    Reserve,
};
use iopt_sim::SimMemory;
use std::hint::black_box;
use std::time::Instant;

/// Reserves one batch of `n` one-page ranges on a fresh table and maps every range once, in
/// `order`; returns the mean time of one map in nanoseconds.
fn per_map(cfg: Config, n: u64, order: &[u64]) -> Result<f64, Box<dyn std::error::Error>> {
    let mem = SimMemory::new();
    let t = AllocOpsTable::new(cfg, &mem)?;
    // One 4 KiB page every 8 KiB: no two ranges touch, so none merge.
    let ranges: Vec<IovaRange> = (0..n)
        .map(|i| IovaRange::new(Iova::new(0x40_0000_0000 + i * 0x2000), 0x1000, 0x1000))
        .collect::<Result<_, _>>()?;
    let res = t.reserve_batch_with(&ranges, PageSize::SZ_4K, CountPolicy::MsmMerged)?;
    let start = Instant::now();
    for &i in order {
        let r = ranges[i as usize];
        t.map_reserved(
            black_box(&res),
            r.start(),
            PhysAddr::new(0x8000_0000 + i * 0x1000),
            PageSize::SZ_4K,
            1,
            Prot::READ,
        )?;
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / f64::from(u32::try_from(n)?);
    t.release(res, &mut Gather::new())?;
    Ok(ns)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        40,
    ))?;
    println!(
        "{:>8} {:>18} {:>18}",
        "ranges", "ns/map ascending", "ns/map scrambled"
    );
    for n in [1_000u64, 10_000, 100_000] {
        let ascending: Vec<u64> = (0..n).collect();
        // Every range once in an order no position of the set is favoured by.
        let scrambled: Vec<u64> = (0..n).map(|i| (i * 7919) % n).collect();
        let a = per_map(cfg, n, &ascending)?;
        let s = per_map(cfg, n, &scrambled)?;
        println!("{n:>8} {a:>18.0} {s:>18.0}");
    }
    Ok(())
}
