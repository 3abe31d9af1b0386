//! A VM_BIND-style driver loop: binds are queued at submit time (where allocation is allowed),
//! executed later in order (where it is not), and completed after. Each bind reserves at submit
//! and releases at completion, so execution never calls the allocator.
//!
//! Run with `cargo run -p iopt --example vm_bind` (add `--no-default-features --features
//! alloc-ops` to try Design 1 alone).

use iopt::{
    Backend, Config, ConfigInput, FlushOps, Format, Gather, IoPageTable, Iova, IovaRange, PageSize,
    PageSizes, PhysAddr, Prot, Reservation, Reserve, Table,
};
use iopt_sim::SimMemory;
use std::collections::VecDeque;

/// Flush callbacks that count, as a GPU driver's LOCK/FLUSH_PT would be issued.
#[derive(Debug, Default)]
struct Flushes(std::sync::atomic::AtomicU64);

impl FlushOps for Flushes {
    fn flush_walk(&self, _iova: Iova, _size: u64, _granule: u64) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Bind {
    va: u64,
    pa: u64,
    pages: u64,
    res: Reservation,
}

fn run(backend: Backend) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = Config::new(ConfigInput::new(
        Format::Arm64S1,
        PageSizes::GRANULE_4K,
        48,
        40,
    ))?;
    let mem = SimMemory::new();
    let flushes = Flushes::default();
    let vm = Table::with_backend(backend, cfg, &mem, &flushes)?;
    let mut queue = VecDeque::new();
    let mut peak_reserved = 0u64;
    // Submit: 256 binds of 16 KiB scattered over 64 MiB, queue depth up to 32.
    for job in 0..256u64 {
        let va = 0x1_0000_0000 + (job * 0x4_0000) % (64 << 20);
        let range = IovaRange::new(Iova::new(va), 0x4000, 0x1000)?;
        let res = vm.reserve(range, PageSize::SZ_4K)?;
        queue.push_back(Bind {
            va,
            pa: 0x80_0000_0000 + job * 0x4000,
            pages: 4,
            res,
        });
        peak_reserved = peak_reserved.max(vm.stats().reserved_outstanding);
        if queue.len() == 32 {
            execute_and_complete(&vm, &mem, queue.drain(..).collect())?;
        }
    }
    execute_and_complete(&vm, &mem, queue.drain(..).collect())?;
    let s = vm.stats();
    println!(
        "{backend:?}: reserved {} pages, consumed {}, returned unused {}, peak held unconsumed {}, \
         live tables now {} (peak {}), allocator calls {} single + {} bulk, walk flushes {}",
        s.pages_reserved,
        s.pages_consumed,
        s.reserved_unused,
        peak_reserved,
        s.live_tables,
        s.peak_live_tables,
        s.alloc_calls,
        s.alloc_bulk_calls,
        flushes.0.load(std::sync::atomic::Ordering::Relaxed),
    );
    drop(vm);
    assert_eq!(mem.stats().live_pages, 0, "every page came back");
    Ok(())
}

fn execute_and_complete(
    vm: &Table<&SimMemory, &Flushes>,
    mem: &SimMemory,
    binds: Vec<Bind>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Execute: no allocation may happen here.
    let calls = mem.stats().alloc_calls + mem.stats().alloc_bulk_calls;
    for b in &binds {
        vm.map_reserved(
            &b.res,
            Iova::new(b.va),
            PhysAddr::new(b.pa),
            PageSize::SZ_4K,
            b.pages,
            Prot::READ | Prot::WRITE,
        )?;
    }
    assert_eq!(
        mem.stats().alloc_calls + mem.stats().alloc_bulk_calls,
        calls,
        "execution allocated"
    );
    // Complete: the buffers are unbound later; reservations go back.
    let mut gather = Gather::new();
    for b in binds {
        vm.unmap(Iova::new(b.va), PageSize::SZ_4K, b.pages, &mut gather)?;
        vm.release(b.res, &mut gather)?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "alloc-ops")]
    run(Backend::AllocOps)?;
    #[cfg(feature = "prealloc")]
    run(Backend::Prealloc)?;
    Ok(())
}
